"""One test aimed at each rule that a plausible one-line bug would break.

Each test here is listed in tests/mutation_check.py with the bug it must catch.
"""

import contextlib

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

import inference
from inference import SamplingParams

V = 1026
C = 8


# --------------------------------------------------------------------------- sampling filters


def test_top_p_keeps_a_tie_that_reaches_the_mass_exactly():
    """4 tied codes (0.25 each), top_p 0.5: the two best already hold 0.5, so exactly two survive,
    as transformers' TopPLogitsWarper (remove where cumulative <= 1 - top_p) keeps."""
    from transformers.generation.logits_process import TopPLogitsWarper

    logits = torch.full((C, V), float("-inf"))
    logits[:, :4] = 0.0
    params = SamplingParams(temperature=1.0, top_k=0, top_p=0.5)
    ours = inference.filter_logits(logits, params)
    theirs = TopPLogitsWarper(0.5)(None, logits.clone())
    assert (torch.isfinite(ours).sum(dim=-1) == 2).all()
    assert torch.equal(torch.isfinite(ours).sum(dim=-1), torch.isfinite(theirs).sum(dim=-1))


def test_top_k_keeps_exactly_k_codes():
    torch.manual_seed(0)
    logits = torch.randn(C, V) * 3  # distinct values: no tie at the k-th
    for k in (5, 50, 1):
        ours = inference.filter_logits(logits, SamplingParams(temperature=0.7, top_k=k, top_p=1.0))
        kept = torch.isfinite(ours)
        assert (kept.sum(dim=-1) == k).all(), k
        best = torch.topk(logits, k, dim=-1).indices
        assert kept.gather(-1, best).all(), k


# --------------------------------------------------------------------------- RAS inside the real decode loop


@contextlib.contextmanager
def forward_hook(module, hook, pre=False):
    handle = (module.register_forward_pre_hook(hook, with_kwargs=True) if pre
              else module.register_forward_hook(hook, with_kwargs=True))
    try:
        yield
    finally:
        handle.remove()


def test_ras_window_holds_the_last_fed_frames(tiny_engine):
    """After generate, the step's window is the last W frames fed to the model (frame 0 = BOS first)."""
    n, w = 20, 7
    prompts = [tiny_engine.build_prompt(t) for t in ("Window check.", "A second, longer row of text.")]
    params = SamplingParams(max_new_tokens=n, ras_win_len=w)
    tiny_engine.reset_decode_state()
    gens, _ = tiny_engine.generate(prompts, params, [1, 2], forced_frames=n)
    window = tiny_engine.decode_context.bufs.window
    for i, gen in enumerate(gens):
        assert torch.equal(window[i].cpu(), gen.codes[n - 1 - w: n - 1]), i  # frames fed at steps n-w .. n-1


def test_ras_breaks_a_model_that_repeats_one_code(tiny_engine):
    """A model whose argmax is always code 5: greedy without RAS repeats it forever; with RAS the
    repeats in the window trigger resamples, so other codes appear in every codebook."""

    def favour_five(module, args, kwargs, out):
        logits = out.logits.view(*out.logits.shape[:-1], C, V)
        logits[..., 5] = logits.amax(dim=-1) + 1.0  # the best code, but not by much: a resample moves off it
        return out

    n = 40
    prompt = tiny_engine.build_prompt("Repeat after me.")
    with forward_hook(tiny_engine.model, favour_five):
        off, _ = tiny_engine.generate([prompt], SamplingParams(temperature=0, ras_win_len=0), [1], forced_frames=n)
        on, _ = tiny_engine.generate([prompt], SamplingParams(temperature=0, ras_win_len=7, ras_win_max_num_repeat=2),
                                     [1], forced_frames=n)
    released = slice(C, None)  # from frame 8 on every codebook has left BOS
    assert (off[0].codes[released] == 5).all()
    assert ((on[0].codes[released] != 5).any(dim=0)).all()


# --------------------------------------------------------------------------- positions in the real decode loop


def test_decode_steps_feed_the_next_position_per_row(tiny_engine):
    """Each decode step feeds row i at position len_i + k (k-th step after the prefill), left padding or not."""
    texts = ["Hi", "A longer line, so that the batch is left padded."]
    prompts = [tiny_engine.build_prompt(t) for t in texts]
    lengths = [len(p.input_ids) for p in prompts]
    assert lengths[0] != lengths[1]
    seen = []

    def record(module, args, kwargs):
        seen.append(kwargs["position_ids"].detach().cpu().clone())

    n = 12
    tiny_engine.reset_decode_state()
    with forward_hook(tiny_engine.model, record, pre=True):
        tiny_engine.generate(prompts, SamplingParams(temperature=0), [1, 1], forced_frames=n)
    steps = seen[1:]  # seen[0] is the prefill
    assert len(steps) == n - 1
    for k, pos in enumerate(steps):
        assert pos[:, -1].tolist() == [length + k for length in lengths], k


# --------------------------------------------------------------------------- Boson's re-encode padding


def test_reencode_pads_320_zeros_per_side(tiny_engine):
    """When the acoustic path comes out one frame short, the clip is re-encoded padded with 320 zeros
    per side (Boson), not the native hop/2 = 480; a clip that fits is encoded once, unpadded."""
    seen = []

    def record(module, args, kwargs):
        seen.append(args[0].detach().cpu().clone())

    rng = np.random.default_rng(0)
    for seconds, reencoded in ((1.5, True), (2.0, False)):  # tiny tokenizer: 1.5 s comes out one frame short
        wave = (rng.standard_normal(int(24000 * seconds)) * 0.1).astype(np.float32)
        seen.clear()
        with forward_hook(tiny_engine.audio_tokenizer.acoustic_encoder, record, pre=True):
            codes = tiny_engine.encode_audio(wave)
        x = torch.from_numpy(wave)[None, None]
        assert torch.equal(seen[0], x)
        if reencoded:
            assert len(seen) == 2 and torch.equal(seen[1], F.pad(x, (320, 320)))
        else:
            assert len(seen) == 1
        assert codes.shape == (C, round(seconds * 25))


# --------------------------------------------------------------------------- output files


def test_atomic_output_failure_half_way_keeps_the_old_file(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with inference.atomic_output(path) as tmp:
            tmp.write_text("half of the new")
            raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temp file left
    with inference.atomic_output(path) as tmp:
        tmp.write_text("new")
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_wav_write_failing_half_way_keeps_the_old_wav(tmp_path, monkeypatch):
    path = tmp_path / "a.wav"
    sf.write(str(path), np.zeros(2400, np.float32), inference.SAMPLE_RATE, subtype="PCM_16")  # the old take
    before = path.read_bytes()

    def half_write(file, *args, **kwargs):
        with open(file, "wb") as f:
            f.write(before[:20])
        raise OSError("No space left on device")

    monkeypatch.setattr(sf, "write", half_write)
    with pytest.raises(OSError):
        inference.write_wav_atomic(path, np.ones(2400, np.float32) * 0.5)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.wav"]


# --------------------------------------------------------------------------- reference audio


def test_reference_audio_is_resampled_to_24k(tmp_path):
    rate, seconds, tone = 16000, 1.3, 440.0
    t = np.arange(int(rate * seconds)) / rate
    path = tmp_path / "ref16k.wav"
    sf.write(str(path), (0.3 * np.sin(2 * np.pi * tone * t)).astype(np.float32), rate)
    audio = inference.load_reference_audio(str(path))
    assert audio.dtype == np.float32
    assert audio.size == round(t.size * inference.SAMPLE_RATE / rate)
    spectrum = np.abs(np.fft.rfft(audio))
    peak_hz = np.argmax(spectrum) * inference.SAMPLE_RATE / audio.size
    assert abs(peak_hz - tone) <= inference.SAMPLE_RATE / audio.size  # the tone stays a 440 Hz tone


# --------------------------------------------------------------------------- graph capture


class FakeGraphAPI:
    """inference.graph_api's 5-tuple with CUDA's semantics: inside `graph(g)` the step's work is
    recorded, not run (the step asks `capturing`); `g.replay()` runs what was recorded."""

    def __init__(self):
        self.capturing = None
        self.captures = 0
        api = self

        class Graph:
            def __init__(self):
                self.recorded = []

            def replay(self):
                for work in self.recorded:
                    work()

        @contextlib.contextmanager
        def graph(g):
            api.capturing, api.captures = g, api.captures + 1
            try:
                yield
            finally:
                api.capturing = None

        class Stream:
            def wait_stream(self, _):
                pass

        self.tuple = (Graph, graph, Stream, lambda _: contextlib.nullcontext(), Stream)

    def run_or_record(self, work):
        if self.capturing is not None:
            self.capturing.recorded.append(work)
        else:
            work()


def test_captured_frame_is_run_too():
    """Warm-up frames run eagerly, the capture records the next one, and that frame must still run."""
    fake = FakeGraphAPI()
    frames = []
    runner = inference.StepRunner(lambda: fake.run_or_record(lambda: frames.append(len(frames) + 1)),
                                  torch.device("cpu"), enabled=False)
    runner.api = fake.tuple
    for _ in range(6):
        runner.run()
    assert runner.mode == "on" and fake.captures == 1
    assert frames == [1, 2, 3, 4, 5, 6]


def test_graph_replayed_decode_gives_the_eager_codes(tiny_engine, monkeypatch):
    """The whole engine on the fake graph API: same codes as eager decoding, in graph mode "on"."""
    prompt = tiny_engine.build_prompt("Graph replay check.")
    params = SamplingParams(max_new_tokens=30)
    tiny_engine.reset_decode_state()
    eager, timings = tiny_engine.generate([prompt], params, [7], forced_frames=30)
    assert timings.decode_mode == "off"

    fake = FakeGraphAPI()
    real_step = inference.decode_step
    monkeypatch.setattr(inference, "decode_step", lambda *a: fake.run_or_record(lambda: real_step(*a)))
    monkeypatch.setattr(inference, "graph_api", lambda device: fake.tuple)
    engine = tiny_engine.with_graph_mode("on")  # same model; its own decode context
    engine.decode_mode = lambda: "on"  # a CPU has no graph API: the fake stands in for CUDA's
    graphed, timings = engine.generate([prompt], params, [7], forced_frames=30)
    assert timings.decode_mode == "on" and fake.captures == 1
    assert torch.equal(graphed[0].codes, eager[0].codes)
