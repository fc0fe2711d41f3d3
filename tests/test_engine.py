"""The decode loop: Boson's delay / EOS / RAS rules, determinism, batches, stock parity."""

import warnings
from types import SimpleNamespace

import pytest
import torch
from torch.overrides import TorchFunctionMode

import inference
from inference import DecodeState, SamplingParams, revert_delay_pattern, sample_frame

CFG = SimpleNamespace(audio_stream_bos_id=1024, audio_stream_eos_id=1025, num_codebooks=8)
GREEDY = SamplingParams(temperature=0, ras_win_len=0)
V = 1026
TORCH_VERSION = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])


def fresh_state(batch=1, window=1):
    return DecodeState(
        num_delay=torch.zeros(batch, dtype=torch.long),
        remaining=torch.full((batch,), -1, dtype=torch.long),
        window=torch.full((batch, window, 8), -1, dtype=torch.long),
    )


def logits_for(codes):
    """Logits whose argmax per codebook is `codes` ([C] list)."""
    logits = torch.zeros(1, 8, V)
    for c, code in enumerate(codes):
        logits[0, c, code] = 10.0
    return logits


def run_frames(planned):
    """Feed one planned argmax frame per step; return emitted frames and the frame where it finished."""
    state, out, done_at = fresh_state(), [], None
    for t, codes in enumerate(planned, start=1):
        frame, state, done = sample_frame(logits_for(codes), state, GREEDY, None, None, CFG)
        out.append(frame[0].tolist())
        if bool(done[0]):
            done_at = t
            break
    return out, done_at


def test_codebooks_leave_bos_one_per_frame():
    out, _ = run_frames([[5] * 8] * 9)
    for t, frame in enumerate(out, start=1):
        assert frame == [5] * min(t, 8) + [1024] * (8 - min(t, 8)), t


def test_eos_in_codebook_zero_closes_one_codebook_per_frame():
    planned = [[5] * 8] * 10 + [[1025] + [7] * 7] + [[9] * 8] * 10
    out, done_at = run_frames(planned)
    f = 10  # 0-based index of the EOS frame in `out`
    assert out[f] == [1025] + [7] * 7
    for k in range(1, 8):  # the original: next[: 8 - remaining] = EOS, remaining counts down from 7
        assert out[f + k] == [1025] * k + [9] * (8 - k), k
    assert done_at == f + 8  # 8 - 0 - 1 = 7 more frames


def test_eos_in_later_codebook_forces_lower_codebooks():
    planned = [[5] * 8] * 10 + [[6, 6, 6, 1025, 6, 6, 6, 6]] + [[9] * 8] * 10
    out, done_at = run_frames(planned)
    f = 10
    assert out[f] == [1025] * 4 + [6] * 4  # codebooks < 3 forced to EOS in that frame
    for k in range(1, 5):  # the original forces next[: 8 - remaining], remaining = 4, 3, 2, 1
        assert out[f + k] == [1025] * (3 + k) + [9] * (5 - k), k
    assert done_at == f + 1 + 4  # 8 - 3 - 1 = 4 more frames, then done: no extra all-EOS frame


def test_eos_in_last_codebook_finishes_at_once():
    out, done_at = run_frames([[5] * 8] * 10 + [[6] * 7 + [1025]])
    assert out[-1] == [1025] * 8 and done_at == 11


def test_eos_sampled_while_codebook_still_delayed_is_ignored():
    # frame 1: only codebook 0 is released; EOS in codebook 4 is overwritten by BOS
    out, done_at = run_frames([[5, 5, 5, 5, 1025, 5, 5, 5]] + [[5] * 8] * 3)
    assert out[0] == [5] + [1024] * 7 and done_at is None


def test_ras_resamples_repeated_codes_even_when_greedy():
    window = torch.tensor([[[3] * 8, [3] * 8, [4] * 8]])  # code 3 seen twice in every codebook
    state = fresh_state(window=3)
    state.window = window
    state.num_delay = torch.full((1,), 7)
    logits = torch.zeros(1, 8, V)
    logits[0, :, 3] = 5.0
    logits[0, :, 11] = 4.0
    params = SamplingParams(temperature=0, ras_win_len=3, ras_win_max_num_repeat=2)
    ras_noise = torch.zeros(1, 8, V)
    ras_noise[0, :, 3] = -1e6  # makes 3 lose the race: the resample picks the next most likely code
    frame, _, _ = sample_frame(logits, state, params, None, ras_noise, CFG)
    assert frame[0].tolist() == [11] * 8
    params_off = SamplingParams(temperature=0, ras_win_len=0)
    frame, _, _ = sample_frame(logits, state, params_off, None, None, CFG)
    assert frame[0].tolist() == [3] * 8


def test_top_k_top_p_filter_like_transformers():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(8, V) * 3
    params = SamplingParams(temperature=0.7, top_k=50, top_p=0.8)
    ours = inference.filter_logits(logits, params)
    theirs = TopPLogitsWarper(0.8)(None, TopKLogitsWarper(50)(None, TemperatureLogitsWarper(0.7)(None, logits)))
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    assert torch.allclose(ours[~torch.isinf(ours)], theirs[~torch.isinf(theirs)])


def test_race_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.2])
    noise = inference.NoiseSource([0], 1, 3, torch.device("cpu"), chunk=20000)._draw()[:, 0, 0, 0]  # [20000, 3]
    picks = inference.race_sample(probs.log().expand(20000, 3), noise)
    freq = torch.bincount(picks, minlength=3).float() / 20000
    assert torch.allclose(freq, probs, atol=0.02)


def test_revert_delay_pattern_inverts_build_delay_pattern(tiny_engine):
    codes = torch.randint(0, 1024, (1, 8, 12))
    with_eos = torch.cat([codes, torch.full((1, 8, 1), 1025)], dim=2)  # the closing EOS column
    delayed = tiny_engine.processor.build_delay_pattern(with_eos)[0].T  # [13 + 7, 8]
    generated = torch.cat([torch.full((1, 8), 1024), delayed])  # frame 0: all BOS
    assert torch.equal(revert_delay_pattern(generated), codes[0].T)  # BOS and EOS columns dropped, as Boson


def test_same_seed_same_codes_other_seed_different(tiny_engine):
    prompt = tiny_engine.build_prompt("Determinism check.")
    params = SamplingParams(max_new_tokens=40)
    a = tiny_engine.generate([prompt], params, [3])[0][0].codes
    b = tiny_engine.generate([prompt], params, [3])[0][0].codes
    c = tiny_engine.generate([prompt], params, [4])[0][0].codes
    assert torch.equal(a, b)
    assert not torch.equal(a[: min(len(a), len(c))], c[: min(len(a), len(c))])
    greedy = SamplingParams(max_new_tokens=40, temperature=0)
    g1 = tiny_engine.generate([prompt], greedy, [1])[0][0].codes
    assert torch.equal(g1, tiny_engine.generate([prompt], greedy, [1])[0][0].codes)  # RAS noise is seeded too
    no_ras = SamplingParams(max_new_tokens=40, temperature=0, ras_win_len=0)
    n1 = tiny_engine.generate([prompt], no_ras, [1])[0][0].codes
    assert torch.equal(n1, tiny_engine.generate([prompt], no_ras, [2])[0][0].codes)  # nothing random left


def test_row_result_does_not_depend_on_its_batch(tiny_engine):
    texts = ["Hello world.", "太阳从东方升起，从西方落下。", "A much longer sentence with many words to pad.", "Hi"]
    prompts = [tiny_engine.build_prompt(t) for t in texts]
    assert len({len(p.input_ids) for p in prompts}) > 1  # left padding is exercised
    params = SamplingParams(max_new_tokens=60, temperature=0)
    alone = [tiny_engine.generate([p], params, [1])[0][0] for p in prompts]
    together, _ = tiny_engine.generate(prompts, params, [1] * 4)
    for a, b in zip(alone, together):
        assert torch.equal(a.codes, b.codes)
        assert a.finished == b.finished


def test_matches_stock_generate_before_eos(tiny_engine):
    prompt = tiny_engine.build_prompt("Stock parity.")
    n = 30
    stock = tiny_engine.model.generate(
        input_ids=prompt.input_ids[None], attention_mask=torch.ones(1, len(prompt.input_ids), dtype=torch.long),
        max_new_tokens=n, do_sample=False,
    )[0]
    ours = tiny_engine.generate([prompt], SamplingParams(max_new_tokens=n, temperature=0, ras_win_len=0), [0])[0][0]
    eos_rows = (ours.codes == 1025).any(dim=1).nonzero()
    upto = int(eos_rows[0]) if len(eos_rows) else ours.codes.shape[0]
    assert upto >= 9
    assert torch.equal(stock[:upto], ours.codes[:upto])


def test_forced_frames_runs_the_whole_budget(tiny_engine):
    prompt = tiny_engine.build_prompt("Benchmarks force the length.")
    gens, timings = tiny_engine.generate([prompt], SamplingParams(max_new_tokens=8), [1], forced_frames=70)
    assert gens[0].codes.shape == (70, 8)
    assert timings.decode_steps == 69


@pytest.mark.parametrize("bad", [
    dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1), dict(max_new_tokens=0),
])
def test_bad_sampling_params(bad):
    with pytest.raises(inference.UserError):
        SamplingParams(**bad).validate()


@pytest.fixture(scope="module")
def endless_engine(tiny_ckpt):
    """The tiny model with its BOS/EOS logits pinned at 0: under top-k 50 they never win, so every frame is sampled."""
    engine = inference.load_engine(*tiny_ckpt, device="cpu", dtype="float32")
    head = engine.model.audio_lm_head.weight
    with torch.no_grad():
        head.view(engine.config.num_codebooks, engine.config.codebook_size, -1)[:, CFG.audio_stream_bos_id:] = 0
    return engine


@pytest.mark.parametrize("temperature", [0.3, 0.0])
def test_compiled_step_has_no_graph_break_and_same_codes(endless_engine, temperature):
    """fullgraph compiling proves the step has no host sync or data-dependent branch (graph capture needs that)."""
    engine = endless_engine
    prompt = engine.build_prompt("Compile check.")
    params = SamplingParams(max_new_tokens=8, temperature=temperature, top_k=50)
    engine = engine.with_graph_mode("compile", "aot_eager")
    gens, timings = engine.generate([prompt], params, [3], forced_frames=200)
    if timings.decode_mode == "off" and TORCH_VERSION < (2, 9):
        pytest.skip(f"torch {torch.__version__}: dynamo cannot compile the transformers model in one graph "
                    "(the step fell back to eager); CI runs torch 2.9.1")
    assert timings.decode_mode == "compile"
    codes = gens[0].codes
    assert codes.shape == (200, 8)
    assert (codes[8:] < 1024).all()  # all 200 frames carry sampled codes: nothing compared is padding
    assert inference.first_difference_from_eager(engine, prompt, params, 3, codes) is None


class HostReadWatch(TorchFunctionMode):
    """Records every op that would make the host wait for device data, or copy host data in.

    Graph capture runs the step's Python eagerly, where transformers' "am I tracing?" checks
    do not see an NPU capture; so the eager step itself must be free of these.
    """

    READS = {torch.Tensor.__bool__, torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__int__,
             torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.numpy, torch.Tensor.cpu}
    NAMES = {"tensor", "as_tensor", "nonzero", "argwhere", "masked_select", "unique", "unique_consecutive"}

    def __init__(self):
        super().__init__()
        self.hits = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        index = args[1] if name in ("__getitem__", "__setitem__", "index_put_") and len(args) > 1 else None
        parts = index if isinstance(index, tuple) else (index,)
        data_dependent_index = any(
            isinstance(i, list) or (isinstance(i, torch.Tensor) and i.dtype == torch.bool) for i in parts)
        if func in self.READS or name in self.NAMES or data_dependent_index:
            self.hits.append(name)
        return func(*args, **kwargs)


@pytest.mark.parametrize("texts,params", [
    (["Sampled with RAS."], SamplingParams(max_new_tokens=24, temperature=0.7, top_k=20, top_p=0.9)),
    (["Hi", "A longer line, so the batch is left padded."], SamplingParams(max_new_tokens=24, temperature=0)),
])
def test_decode_step_reads_nothing_back_to_the_host(tiny_engine, monkeypatch, texts, params):
    watch = HostReadWatch()
    steps = []

    def watched_step(*args):
        steps.append(1)
        with watch:
            original_step(*args)

    original_step = inference.decode_step
    monkeypatch.setattr(inference, "decode_step", watched_step)
    tiny_engine.reset_decode_state()  # a new decode context picks up the watched step
    try:
        prompts = [tiny_engine.build_prompt(t) for t in texts]
        tiny_engine.generate(prompts, params, [1] * len(prompts), forced_frames=24)
    finally:
        tiny_engine.reset_decode_state()
    assert len(steps) == 23
    assert watch.hits == []


def test_graph_mode_is_off_on_cpu_and_validated(tiny_ckpt, tiny_engine):
    _, timings = tiny_engine.generate([tiny_engine.build_prompt("x")], SamplingParams(max_new_tokens=12), [1])
    assert timings.decode_mode == "off"
    with pytest.raises(inference.UserError, match="--graph"):
        inference.load_engine(*tiny_ckpt, device="cpu", dtype="float32", graph="sometimes")


def test_graph_on_for_cpu_says_it_decodes_eagerly(tiny_ckpt, capsys):
    engine = inference.load_engine(*tiny_ckpt, device="cpu", dtype="float32", graph="on")
    assert engine.decode_mode() == "off"
    warnings_ = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings_) == 1 and "decoding eagerly" in warnings_[0] and "--graph compile" in warnings_[0]


class _FailingCapture:
    """A graph API whose capture fails, as a torch_npu build without a capturable op would."""

    class Graph:
        def replay(self):
            raise AssertionError("never captured")

    @staticmethod
    def graph(_):
        raise RuntimeError("operation not permitted when stream is capturing")

    class Stream:
        def wait_stream(self, _):
            pass

    @staticmethod
    def stream(_):
        import contextlib

        return contextlib.nullcontext()

    @staticmethod
    def current_stream():
        return _FailingCapture.Stream()


def test_graph_capture_failure_falls_back_to_eager_with_one_warning(capsys):
    calls = []
    runner = inference.StepRunner(lambda: calls.append(1), torch.device("cpu"), enabled=False)
    f = _FailingCapture
    runner.api = (f.Graph, f.graph, f.Stream, f.stream, f.current_stream)
    for _ in range(6):
        runner.run()
    assert len(calls) == 6  # 2 warm-up frames, the frame whose capture failed, then eager
    assert runner.mode == "off" and runner.api is None
    warnings = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(warnings) == 1 and "graph capture failed" in warnings[0] and "decoding eagerly" in warnings[0]


def test_compile_failure_falls_back_to_eager_with_one_warning(capsys):
    calls = []

    def failing_compile():
        raise RuntimeError("Unsupported: dynamo cannot trace this")

    runner = inference.StepRunner(lambda: calls.append(1), torch.device("cpu"), enabled=False, compiled=failing_compile)
    assert runner.mode == "compile"
    for _ in range(4):
        runner.run()
    assert len(calls) == 4 and runner.mode == "off"  # the failed frame ran eagerly too
    warnings = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(warnings) == 1 and "torch.compile of the decode step failed" in warnings[0]


def test_compiled_step_error_after_the_first_frame_is_raised():
    results = iter([None, RuntimeError("device lost")])

    def compiled():
        r = next(results)
        if r is not None:
            raise r

    runner = inference.StepRunner(lambda: None, torch.device("cpu"), enabled=False, compiled=compiled)
    runner.run()
    with pytest.raises(RuntimeError, match="device lost"):
        runner.run()


def test_engine_calls_no_deprecated_transformers_api(tiny_engine):
    """A rename in transformers (5.24: past_key_values -> cache) shows up here long before the old name goes."""
    tiny_engine.reset_decode_state()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prompt = tiny_engine.build_prompt("No deprecations.")
        gens, _ = tiny_engine.generate([prompt], SamplingParams(max_new_tokens=16), [1], forced_frames=16)
        audio = tiny_engine.decode_audio(revert_delay_pattern(gens[0].codes).clamp(max=1023))
        tiny_engine.encode_audio(audio)
    deprecations = [f"{w.category.__name__}: {w.message}" for w in caught
                    if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert deprecations == []


def test_noise_prefetch_keeps_the_draws_and_draws_before_a_host_sync(monkeypatch):
    """The next chunk is drawn at a sync frame (while queued frames run), and the seeded stream is unchanged."""
    assert inference.NOISE_CHUNK % inference.FINISHED_CHECK_EVERY == 0
    cpu = torch.device("cpu")
    plain = inference.NoiseSource([5, 6], 8, V, cpu)
    ahead = inference.NoiseSource([5, 6], 8, V, cpu)
    drawn_at, t = [], 0
    real_draw = ahead._draw

    def watched_draw():
        drawn_at.append(t)
        return real_draw()

    monkeypatch.setattr(ahead, "_draw", watched_draw)

    def buffers():
        return SimpleNamespace(noise=torch.zeros(2, 8, V), ras_noise=torch.zeros(2, 8, V))

    a, b = buffers(), buffers()
    for t in range(1, 100):
        plain.fill(a, t)
        ahead.fill(b, t)
        ahead.prefetch(t)
        assert torch.equal(a.noise, b.noise) and torch.equal(a.ras_noise, b.ras_noise), t
    assert drawn_at == [1, 32, 64, 96]
    assert all(frame % inference.FINISHED_CHECK_EVERY == 0 for frame in drawn_at[1:])


def test_reused_decode_context_keeps_every_address(tiny_engine):
    """A captured graph replays on fixed addresses: the next generation must refill the same cache and buffers."""
    params = SamplingParams(max_new_tokens=30)
    tiny_engine.reset_decode_state()
    tiny_engine.generate([tiny_engine.build_prompt("First prompt.")], params, [1])
    ctx = tiny_engine.decode_context

    def addresses():
        tensors = [getattr(layer, name) for layer in ctx.cache.layers
                   for name in ("keys", "values", "cumulative_length")]
        tensors += [v for v in vars(ctx.bufs).values() if isinstance(v, torch.Tensor)]
        return [t.data_ptr() for t in tensors]

    before = addresses()
    assert len(before) == 3 * tiny_engine.config.num_hidden_layers + 12
    tiny_engine.generate([tiny_engine.build_prompt("A second, longer prompt with other words in it.")], params, [2])
    assert tiny_engine.decode_context is ctx
    assert addresses() == before


def test_noise_is_gumbel_of_torchs_portable_uniform_stream():
    """Seed 1's first uniforms, the same on torch 2.6 and 2.9 (exponential_ is not): if torch changes this
    stream, seeds stop reproducing earlier runs, and this test says so."""
    bufs = SimpleNamespace(noise=torch.zeros(1, 8, V), ras_noise=torch.zeros(1, 8, V))
    inference.NoiseSource([1], 8, V, torch.device("cpu")).fill(bufs, 1)
    first_uniforms = torch.tensor([0.7576315999031067, 0.2793108820915222, 0.40306925773620605])
    assert torch.allclose(bufs.noise[0, 0, :3], -torch.log(-torch.log(first_uniforms)), rtol=0, atol=1e-6)
