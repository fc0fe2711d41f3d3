#!/usr/bin/env python3
"""Precision and performance reports for the Higgs Audio V2 engine, to read, hear and gate on.

    python3 eval_audio.py --mode all                     # eval_results/{precision,performance,summary}.json + report.html
    python3 eval_audio.py --medium --mode performance    # real widths, random weights: no download needed
    python3 eval_audio.py --mode quality                 # Whisper WER/CER, speaker similarity (docs/quality.md)

Exit status: 0 every check passed, 1 a check failed, 2 a usage mistake. The engine
(loading, prompt, sampling, decoding) is imported from inference.py; the stock
baseline is transformers' own `model.generate()` on the same model object.
"""

from __future__ import annotations

import argparse
import base64
import html
import math
import os
import platform
import shutil
import statistics
import struct
import sys
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path

import inference
from inference import SAMPLE_RATE, SamplingParams, UserError

# --------------------------------------------------------------------------- documented thresholds
# Speech as Higgs Audio produces it sits around RMS 0.03-0.1 with peaks 0.3-0.9.
RMS_RANGE = (0.005, 0.35)  # about -46 .. -9 dBFS
PEAK_RANGE = (0.05, 1.0)
CLIP_LEVEL = 0.999  # |sample| at or above this counts as clipped (before PCM_16 conversion)
MAX_CLIP_RATIO = 0.001  # at most 0.1 % of the samples clipped
SILENCE_WINDOW_S = 0.01  # 10 ms windows ...
SILENCE_LEVEL = 1e-3  # ... with RMS below -60 dBFS are silent
MAX_SILENT_RUN_S = 2.0  # longest silent block allowed
PARITY_FRAMES = 64  # teacher-forced frames compared between the device and CPU fp32
PARITY_MIN_COSINE = 0.999
COPY_BYTES_CPU = 256 * 2**20  # buffer of the copy-bandwidth measurement
COPY_BYTES_ACCEL = 1024 * 2**20
TARGET_RATIO_ACCEL = 3.0  # fast-decode targets (reported, not gating: timings vary by machine)
TARGET_RATIO_CPU = 2.0
TARGET_BANDWIDTH_SHARE = 0.70
# quality (Seed-TTS-eval style, docs/quality.md): means over the clips, as Seed-TTS-eval averages per clip
MAX_WER = 0.05  # English clips: Whisper word error rate
MAX_CER = 0.05  # Chinese clips: Whisper character error rate
MIN_SIM = 0.55  # cloned clips: WavLM x-vector cosine with the reference voice
# the long-text row of --mode performance: about 150 words and 100 characters, three chunks at the default
# --chunk_words, spoken with and without --stream from one seed (docs/longform.md)
LONG_TEXT = (
    "The old lighthouse stood at the edge of the cliff for more than a century. Every night its keeper climbed "
    "the narrow stairs, lit the great lamp, and watched the beam sweep across the dark water. Ships passing in "
    "the storm trusted that light with their lives, and not one of them was lost while he kept it burning. "
    "灯塔守护人每天晚上都会爬上狭窄的楼梯，点亮那盏巨大的灯。暴风雨中经过的船只把生命托付给这束光，"
    "在他守护的岁月里，没有一艘船迷失方向。"
    "When the keeper grew old, the town built an automatic lamp, and the lighthouse fell silent. Yet on stormy "
    "nights people still say they can see a small light moving up the stairs, as if someone were going to check "
    "that the beam still reaches the sea. Children tell the story to each other, and the fishermen smile, "
    "because they know the sea remembers those who cared for it."
)
# streamed vs one decode of the same codes: 129 dB (real-size codec) and 151 dB (tiny) measured on CPU fp32, 24.5 dB
# with no context. Accelerators run fp32 convolutions in TF32 / HF32 by default, where decodes of other lengths
# differ by more than rounding (not measured here): the gate catches a broken window, not that noise.
STREAM_MIN_SNR_DB = 50.0
MAX_TRAILING_SILENCE_S = 2.0  # no clip may end in more near-silence than this (the runaway rule's measure)


@dataclass(frozen=True)
class Published:
    wer_percent: float
    sim_percent: float
    note: str


BOSON_PUBLISHED = Published(2.44, 67.70,
                            "Boson's Higgs Audio v2 on Seed-TTS-eval (Whisper-large-v3 WER, WavLM-large ECAPA SIM)")

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"


def jsonable(x):
    """A record -> what json.dumps takes: a dataclass by its to_json() or else its fields in order; lists and
    dicts item by item. Records become dicts only here, where the JSON files are written."""
    if is_dataclass(x) and not isinstance(x, type):
        if hasattr(x, "to_json"):
            return x.to_json()
        return {f.name: jsonable(getattr(x, f.name)) for f in fields(x)}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    return x


# --------------------------------------------------------------------------- metrics and checks


@dataclass
class SignalMetrics:
    samples: int
    duration_s: float
    rms: float
    peak: float
    nan_count: int
    inf_count: int
    clipping_ratio: float
    longest_silent_run_s: float
    max_sample_jump: float


@dataclass
class CodeMetrics:
    frames: int
    aligned_frames: int
    valid_frame_share: float
    code_entropy_bits: list[float]


@dataclass
class Check:
    name: str
    status: str  # PASS, FAIL or SKIP
    value: object
    threshold: object
    detail: str = ""


def signal_metrics(audio) -> SignalMetrics:
    """Everything precision.json says about one waveform (float32, 24 kHz)."""
    import numpy as np

    audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    base = inference.audio_stats(audio)
    clean = np.nan_to_num(audio, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float64)
    n = clean.size
    clip_ratio = float(np.mean(np.abs(clean) >= CLIP_LEVEL)) if n else 0.0
    jump = float(np.max(np.abs(np.diff(clean)))) if n > 1 else 0.0
    win = int(round(SILENCE_WINDOW_S * SAMPLE_RATE))
    longest = 0
    if n >= win:
        frames = clean[: n // win * win].reshape(-1, win)
        silent = np.sqrt(np.mean(frames**2, axis=1)) < SILENCE_LEVEL
        run = 0
        for s in silent:
            run = run + 1 if s else 0
            longest = max(longest, run)
    return SignalMetrics(
        samples=base.samples,
        duration_s=base.duration_s,
        rms=round(base.rms, 6),
        peak=round(base.peak, 6),
        nan_count=int(np.isnan(audio).sum()),
        inf_count=int(np.isinf(audio).sum()),
        clipping_ratio=round(clip_ratio, 6),
        longest_silent_run_s=round(longest * SILENCE_WINDOW_S, 3),
        max_sample_jump=round(jump, 6),
    )


def code_metrics(codes, cfg) -> CodeMetrics:
    """Delay-pattern codes [T, C] -> frame counts, share of valid frames, entropy per codebook (bits)."""
    import numpy as np

    aligned = inference.revert_delay_pattern(codes)
    bos = cfg.audio_stream_bos_id
    a = aligned.cpu().numpy()
    valid_rows = inference.valid_frame_mask(aligned, bos).cpu().numpy()
    entropy = []
    for c in range(codes.shape[1]):
        col = a[:, c][a[:, c] < bos] if a.size else a[:0, 0]
        if col.size == 0:
            entropy.append(0.0)
            continue
        p = np.bincount(col, minlength=bos).astype(np.float64) / col.size
        p = p[p > 0]
        entropy.append(round(float(-(p * np.log2(p)).sum()), 4))
    return CodeMetrics(
        frames=int(codes.shape[0]),
        aligned_frames=int(a.shape[0]),
        valid_frame_share=round(float(valid_rows.mean()), 4) if a.shape[0] else 0.0,
        code_entropy_bits=entropy,
    )


def check(name: str, ok: bool | None, value, threshold, detail: str = "") -> Check:
    return Check(name, SKIP if ok is None else (PASS if ok else FAIL), value, threshold, detail)


def audio_checks(m: SignalMetrics, prefix: str = "") -> list[Check]:
    """Checks on one waveform's signal_metrics; thresholds are the module constants."""
    non_finite = m.nan_count + m.inf_count
    return [
        check(f"{prefix}finite output", non_finite == 0, non_finite, "NaN + Inf samples == 0"),
        check(f"{prefix}RMS in speech range", RMS_RANGE[0] <= m.rms <= RMS_RANGE[1], m.rms,
              f"{RMS_RANGE[0]} <= RMS <= {RMS_RANGE[1]}"),
        check(f"{prefix}peak in speech range", PEAK_RANGE[0] <= m.peak <= PEAK_RANGE[1], m.peak,
              f"{PEAK_RANGE[0]} <= peak <= {PEAK_RANGE[1]}"),
        check(f"{prefix}no clipping", m.clipping_ratio <= MAX_CLIP_RATIO, m.clipping_ratio,
              f"share of |x| >= {CLIP_LEVEL} <= {MAX_CLIP_RATIO}"),
        check(f"{prefix}no long silence", m.longest_silent_run_s <= MAX_SILENT_RUN_S, m.longest_silent_run_s,
              f"longest run of {SILENCE_WINDOW_S * 1000:.0f} ms windows below RMS {SILENCE_LEVEL} <= "
              f"{MAX_SILENT_RUN_S} s"),
    ]


# --------------------------------------------------------------------------- helpers


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif device.type == "npu":
        torch.npu.reset_peak_memory_stats(device)


def _wav_bytes(audio) -> bytes:
    with tempfile.TemporaryDirectory(prefix="eval-wav-") as tmp:
        path = Path(tmp) / "a.wav"
        inference.write_wav_atomic(path, audio)
        return path.read_bytes()


def _decode(engine, codes):
    """Delay codes -> (audio or None, seconds spent decoding)."""
    aligned = inference.revert_delay_pattern(codes)
    if aligned.shape[0] == 0:
        return None, 0.0
    inference.synchronize(engine.device)
    t0 = time.perf_counter()
    audio = engine.decode_audio(aligned)
    inference.synchronize(engine.device)
    return audio, time.perf_counter() - t0


class Progress:
    """One tqdm bar on stderr for the whole run; log lines go to stdout above it."""

    def __init__(self, total: int):
        from tqdm import tqdm

        # a bar belongs on a terminal; in a log file it is a wall of carriage returns
        self.bar = tqdm(total=total, unit="run", file=sys.stderr, dynamic_ncols=True, leave=False,
                        disable=not sys.stderr.isatty())

    def step(self, desc: str) -> None:
        self.bar.set_description(desc)

    def done(self, n: int = 1) -> None:
        self.bar.update(n)

    def log(self, msg: str) -> None:
        from tqdm import tqdm

        tqdm.write(msg, file=sys.stdout)
        sys.stdout.flush()

    def warn(self, msg: str) -> None:
        from tqdm import tqdm

        tqdm.write(f"warning: {msg}", file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


def environment(engine, args, medium: dict | None) -> dict:
    env = host_environment(args, engine.device)
    env.update(dtype=_dtype_name(engine.dtype), dtype_reason=engine.dtype_reason, graph=engine.graph_mode,
               model_path=None if medium else str(args.model_path),
               tokenizer_path=None if medium else str(args.tokenizer_path),
               medium_model=medium, num_params=engine.num_params)
    return env


def peak_host_rss_bytes() -> int | None:
    """Largest resident set of this process so far (Linux reports KiB)."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except (ImportError, OSError):
        return None


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "npu":
        return torch.npu.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def cann_version() -> str | None:
    """CANN toolkit version from its install info, best effort."""
    homes = [os.environ.get("ASCEND_TOOLKIT_HOME"), "/usr/local/Ascend/ascend-toolkit/latest"]
    for home in filter(None, homes):
        for info in sorted(Path(home).glob("*/ascend_toolkit_install.info")) + [Path(home) / "version.cfg"]:
            try:
                for line in info.read_text().splitlines():
                    if line.strip().startswith("version="):
                        return line.split("=", 1)[1].strip()
            except OSError:
                continue
    return None


# --------------------------------------------------------------------------- precision


def precision_params(args) -> SamplingParams:
    return SamplingParams(max_new_tokens=max(args.tokens))


def parity_wanted(engine, args) -> bool:
    import torch

    fp32_cpu = engine.device.type == "cpu" and engine.dtype == torch.float32
    return args.parity == "on" or (args.parity == "auto" and not fp32_cpu)


@dataclass
class ParitySkipped:
    status: str
    reason: str


@dataclass
class Parity:
    reference: str
    device: str
    dtype: str
    prompt_tokens: int
    frames: int
    cosine_similarity: float
    cosine_similarity_audio_frames: float
    min_cosine_per_position: float
    max_abs_diff: float
    greedy_agreement_teacher_forced: float
    greedy_agreement_free_running: float
    first_divergent_frame: int | None
    check: Check
    status: str


def parity(engine, args, prompt, progress: Progress) -> Parity | ParitySkipped:
    """Teacher-forced logits of prompt + PARITY_FRAMES frames: the device vs CPU fp32."""
    import torch

    if not parity_wanted(engine, args):
        reason = "--parity off" if args.parity == "off" else "the device is CPU fp32 itself (use --parity on to force)"
        return ParitySkipped(SKIP, reason)
    progress.step("parity: CPU fp32 reference")
    ref = inference.load_engine(args.model_path, args.tokenizer_path, "cpu", "float32")
    progress.step("parity: frames on the device")
    gens, _ = engine.generate([prompt], SamplingParams(max_new_tokens=PARITY_FRAMES), [args.seeds[0]],
                              forced_frames=PARITY_FRAMES)
    codes = gens[0].codes[:PARITY_FRAMES]
    n = codes.shape[0]
    forced = inference.Prompt(
        input_ids=torch.cat([prompt.input_ids, prompt.input_ids.new_full((n,), engine.config.audio_token_id)]),
        audio_input_ids=codes, text=prompt.text,
    )
    dev = engine.prompt_logits(forced).cpu().double()
    cpu = ref.prompt_logits(forced).double()
    progress.done()

    def cosine(a, b):
        return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-30))

    per_pos = torch.nn.functional.cosine_similarity(dev.flatten(1), cpu.flatten(1), dim=1)
    audio_dev, audio_cpu = dev[-n:], cpu[-n:]
    agree = float((audio_dev.argmax(-1) == audio_cpu.argmax(-1)).double().mean())
    progress.step("parity: greedy on both")
    greedy = SamplingParams(max_new_tokens=PARITY_FRAMES, temperature=0.0)
    g_dev = engine.generate([prompt], greedy, [0], forced_frames=PARITY_FRAMES)[0][0].codes
    g_cpu = ref.generate([prompt], greedy, [0], forced_frames=PARITY_FRAMES)[0][0].codes
    same = (g_dev == g_cpu)
    diverged = (~same.all(dim=1)).nonzero()
    progress.done()
    del ref
    cos = round(cosine(dev, cpu), 7)
    gate = check("device parity: teacher-forced logits cosine vs CPU fp32", cos >= PARITY_MIN_COSINE, cos,
                 f"cosine >= {PARITY_MIN_COSINE} over prompt + {n} frames")
    return Parity(
        reference="cpu float32",
        device=str(engine.device),
        dtype=_dtype_name(engine.dtype),
        prompt_tokens=int(len(prompt.input_ids)),
        frames=int(n),
        cosine_similarity=cos,
        cosine_similarity_audio_frames=round(cosine(audio_dev, audio_cpu), 7),
        min_cosine_per_position=round(float(per_pos.min()), 7),
        max_abs_diff=float((dev - cpu).abs().max()),
        greedy_agreement_teacher_forced=round(agree, 4),
        greedy_agreement_free_running=round(float(same.double().mean()), 4),
        first_divergent_frame=int(diverged[0, 0]) if diverged.numel() else None,
        check=gate,
        status=gate.status,
    )


@dataclass
class SeedRun:
    """One seed of the precision report; in the JSON row `codes` and `signal` (absent without audio) are
    spread out at the top level."""

    seed: int
    finished_by_eos: bool
    codes: CodeMetrics
    wav: str | None
    signal: SignalMetrics | None
    checks: list[Check]
    usable: bool
    unusable_reason: str | None

    def to_json(self) -> dict:
        return {"seed": self.seed, "finished_by_eos": self.finished_by_eos, **jsonable(self.codes), "wav": self.wav,
                **(jsonable(self.signal) if self.signal is not None else {}), "checks": jsonable(self.checks),
                "usable": self.usable, "unusable_reason": self.unusable_reason}


@dataclass
class GreedyRun:
    frames: int
    finished_by_eos: bool
    wav: str | None
    signal: SignalMetrics | None  # spread out in the JSON, as in SeedRun

    def to_json(self) -> dict:
        return {"frames": self.frames, "finished_by_eos": self.finished_by_eos, "wav": self.wav,
                **(jsonable(self.signal) if self.signal is not None else {})}


@dataclass
class Determinism:
    seed: int
    identical_codes: bool
    identical_wav_bytes: bool
    greedy_identical_codes: bool
    greedy: GreedyRun


@dataclass
class CrossSeed:
    usable_seeds: list[int]
    all_usable: bool


@dataclass
class Thresholds:
    rms_range: list[float]
    peak_range: list[float]
    clip_level: float
    max_clip_ratio: float
    silence_window_s: float
    silence_level_rms: float
    max_silent_run_s: float
    parity_frames: int
    parity_min_cosine: float
    usable: str


@dataclass
class PrecisionResult:
    text: str
    sampling: SamplingParams
    thresholds: Thresholds
    seeds: list[SeedRun]
    determinism: Determinism
    cross_seed: CrossSeed
    device_parity: Parity | ParitySkipped
    checks: list[Check]

    def to_json(self) -> dict:
        out = {f.name: jsonable(getattr(self, f.name)) for f in fields(self)}
        out["sampling"]["note"] = "inference.py defaults; max_new_tokens = max(--tokens)"
        return out


def run_precision(engine, args, out_dir: Path, progress: Progress) -> PrecisionResult:
    import torch

    params = precision_params(args)
    prompt = engine.build_prompt(args.text)
    audio_dir = out_dir / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    checks, seeds, codes_by_seed, wav_by_seed = [], [], {}, {}
    for seed in args.seeds:
        progress.step(f"precision: seed {seed}")
        gens, timings = engine.generate([prompt], params, [seed])
        gen = gens[0]
        audio, _ = _decode(engine, gen.codes)
        codes = code_metrics(gen.codes, engine.config)
        reason = inference.judge_attempt(args.text, gen.codes, audio)
        codes_by_seed[seed] = gen.codes
        if audio is not None:
            wav = audio_dir / f"seed_{seed}.wav"
            inference.write_wav_atomic(wav, audio)
            wav_by_seed[seed] = wav.read_bytes()
            wav_name, signal = str(wav.relative_to(out_dir)), signal_metrics(audio)
            seed_checks = audio_checks(signal, f"seed {seed}: ")
        else:
            wav_name, signal = None, None
            seed_checks = [check(f"seed {seed}: audio produced", False, gen.codes.shape[0],
                                 f">= {inference.MIN_FRAMES} frames")]
        entry = SeedRun(seed, gen.finished, codes, wav_name, signal, seed_checks, reason is None, reason)
        checks += entry.checks
        seeds.append(entry)
        progress.log(f"precision: seed {seed}: {codes.frames} frames, "
                     f"{signal.duration_s if signal else 0:.2f} s, RMS {signal.rms if signal else 0:.4f}, "
                     f"peak {signal.peak if signal else 0:.3f}, "
                     f"{'usable' if reason is None else 'unusable: ' + reason}")
        progress.done()

    # determinism: the first seed again, then greedy twice
    seed0 = args.seeds[0]
    progress.step(f"precision: seed {seed0} again")
    gen = engine.generate([prompt], params, [seed0])[0][0]
    audio, _ = _decode(engine, gen.codes)
    first_wav = wav_by_seed.get(seed0)
    same_codes = torch.equal(codes_by_seed[seed0], gen.codes)
    same_wav = first_wav is not None and audio is not None and _wav_bytes(audio) == first_wav
    checks.append(check(f"determinism: seed {seed0} twice gives identical codes", same_codes, same_codes, "identical"))
    checks.append(check(f"determinism: seed {seed0} twice gives identical WAV bytes", same_wav, same_wav, "identical"))
    progress.done()
    greedy = SamplingParams(max_new_tokens=params.max_new_tokens, temperature=0.0)
    progress.step("precision: greedy twice")
    g1 = engine.generate([prompt], greedy, [seed0])[0][0]
    g2 = engine.generate([prompt], greedy, [seed0])[0][0]
    same_greedy = torch.equal(g1.codes, g2.codes)
    checks.append(check("determinism: temperature 0 twice gives identical codes", same_greedy, same_greedy,
                        "identical"))
    greedy_entry = GreedyRun(int(g1.codes.shape[0]), g1.finished, None, None)
    g_audio, _ = _decode(engine, g1.codes)
    if g_audio is not None:
        inference.write_wav_atomic(audio_dir / "greedy.wav", g_audio)
        greedy_entry.wav, greedy_entry.signal = "audio/greedy.wav", signal_metrics(g_audio)
    progress.done(2)

    usable = [s.seed for s in seeds if s.usable]
    checks.append(check("cross-seed: every seed gives a usable result", len(usable) == len(seeds),
                        f"{len(usable)}/{len(seeds)} usable", "all seeds usable (inference.judge_attempt)",
                        "; ".join(f"seed {s.seed}: {s.unusable_reason}" for s in seeds if not s.usable)))

    par = parity(engine, args, prompt, progress)
    if isinstance(par, Parity):
        checks.append(par.check)
    else:
        checks.append(check("device parity: teacher-forced logits cosine vs CPU fp32", None, None,
                            f"cosine >= {PARITY_MIN_COSINE}", par.reason))
    return PrecisionResult(
        text=args.text,
        sampling=params,
        thresholds=thresholds(),
        seeds=seeds,
        determinism=Determinism(seed0, same_codes, same_wav, same_greedy, greedy_entry),
        cross_seed=CrossSeed(usable, len(usable) == len(seeds)),
        device_parity=par,
        checks=checks,
    )


def thresholds() -> Thresholds:
    return Thresholds(
        rms_range=list(RMS_RANGE), peak_range=list(PEAK_RANGE), clip_level=CLIP_LEVEL,
        max_clip_ratio=MAX_CLIP_RATIO, silence_window_s=SILENCE_WINDOW_S, silence_level_rms=SILENCE_LEVEL,
        max_silent_run_s=MAX_SILENT_RUN_S, parity_frames=PARITY_FRAMES, parity_min_cosine=PARITY_MIN_COSINE,
        usable="inference.judge_attempt: >= 9 frames, finite, not silent, long enough for the text",
    )


# --------------------------------------------------------------------------- performance


@dataclass
class CopyBandwidth:
    gb_s: float
    buffer_bytes: int
    method: str


def copy_bandwidth(device, dtype) -> CopyBandwidth:
    """Device memory copy: bytes read + bytes written per second, best of a few copies."""
    import torch

    nbytes = COPY_BYTES_CPU if device.type == "cpu" else COPY_BYTES_ACCEL
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    inference.synchronize(device)
    best = math.inf
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        inference.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    del src, dst
    return CopyBandwidth(round(2 * nbytes / best / 1e9, 3), nbytes,
                         "tensor.copy_ of the buffer, best of 5; read + write bytes counted")


class _Clock:
    """A generate() streamer that only records when each put() arrives."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


@dataclass
class TimedRun:
    """One timed generation of a performance budget, ours or stock."""

    frames: int
    prefill_s: float
    decode_s: float
    decode_steps: int
    audio_decode_s: float
    audio_s: float
    finite: bool  # the decoded audio holds no NaN / Inf
    peak_device_memory_bytes: int | None
    graph: str | None = None  # ours: what the decode step ran as ("on", "compile", "off")

    def tokens_per_s(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s > 0 else math.inf

    def to_json(self) -> dict:
        return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def run_ours(engine, prompt, params, n: int, seed: int) -> TimedRun:
    _reset_peak(engine.device)
    gens, t = engine.generate([prompt], params, [seed], forced_frames=n)
    audio, decode_s = _decode(engine, gens[0].codes)
    return TimedRun(int(gens[0].codes.shape[0]), t.prefill_s, t.decode_s, t.decode_steps, decode_s,
                    0.0 if audio is None else audio.size / SAMPLE_RATE,
                    bool(audio is None or inference.audio_stats(audio).non_finite == 0),
                    inference.peak_memory_bytes(engine.device), t.decode_mode)


def run_stock(engine, prompt, params, n: int, seed: int) -> TimedRun:
    """transformers' own generate() on the same model, forced to run the whole budget (eos_token_id=None)."""
    import torch

    torch.manual_seed(seed)
    device = engine.device
    ids = prompt.input_ids[None].to(device)
    clock = _Clock()
    kwargs = {"do_sample": False} if params.greedy else {
        "do_sample": True, "temperature": params.temperature, "top_k": params.top_k, "top_p": params.top_p}
    _reset_peak(device)
    inference.synchronize(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = engine.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                    eos_token_id=None, streamer=clock, **kwargs)
    inference.synchronize(device)
    t_end = time.perf_counter()
    first = clock.times[1] if len(clock.times) > 1 else t_end  # put #0 is the prompt, #1 the first frame
    codes = out[0].cpu()
    audio, decode_s = _decode(engine, codes)
    return TimedRun(int(codes.shape[0]), first - t0, t_end - first, max(int(codes.shape[0]) - 1, 0), decode_s,
                    0.0 if audio is None else audio.size / SAMPLE_RATE,
                    bool(audio is None or inference.audio_stats(audio).non_finite == 0),
                    inference.peak_memory_bytes(device))


@dataclass
class TokensPerS:
    median: float
    min: float
    max: float


@dataclass
class RunSummary:
    """One side of a budget, ours or stock: medians over the timed runs, and the runs themselves."""

    frames: int
    prefill_ms: float
    decode_tokens_per_s: TokensPerS
    ms_per_frame: float
    audio_decode_s: float
    audio_s: float
    real_time_factor: float | None
    peak_device_memory_bytes: int | None
    bandwidth_gb_s: float
    bandwidth_share_of_copy: float | None
    graph: str | None
    runs: list[TimedRun]


def summarize_runs(runs: list[TimedRun], bytes_per_step: int, copy_gb_s: float) -> RunSummary:
    tps = [r.tokens_per_s() for r in runs]
    med = statistics.median
    tok_s = med(tps)
    gen_s = med(r.prefill_s + r.decode_s + r.audio_decode_s for r in runs)
    audio_s = runs[0].audio_s
    bw = bytes_per_step * tok_s / 1e9
    peaks = [r.peak_device_memory_bytes for r in runs if r.peak_device_memory_bytes is not None]
    return RunSummary(
        frames=runs[0].frames,
        prefill_ms=round(med(r.prefill_s for r in runs) * 1000, 2),
        decode_tokens_per_s=TokensPerS(round(tok_s, 2), round(min(tps), 2), round(max(tps), 2)),
        ms_per_frame=round(1000 / tok_s, 3),
        audio_decode_s=round(med(r.audio_decode_s for r in runs), 4),
        audio_s=round(audio_s, 3),
        real_time_factor=round(gen_s / audio_s, 4) if audio_s else None,
        peak_device_memory_bytes=max(peaks) if peaks else None,
        bandwidth_gb_s=round(bw, 3),
        bandwidth_share_of_copy=round(bw / copy_gb_s, 4) if copy_gb_s else None,
        graph=runs[-1].graph,
        runs=list(runs),
    )


def kv_bytes_per_token(engine) -> int:
    cfg = engine.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    elem = next(engine.model.parameters()).element_size()
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * elem


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # not on every platform
        return None


def warn_if_loaded(load: float | None, cores: int | None, progress: Progress, at_end: bool = False) -> None:
    if load is not None and cores and load > cores:
        progress.warn(f"load average {load:.1f} {'rose above' if at_end else 'exceeds'} the {cores} cores: other "
                      "work competes for the CPU, so these timings are noisy (the ours/stock ratio less so: "
                      "the runs alternate)")


@dataclass
class Spread:
    min: float
    max: float


@dataclass
class Budget:
    """One token budget of the performance report: ours and stock side by side."""

    tokens: int
    bytes_read_per_step: int
    ours: RunSummary
    stock: RunSummary
    ratio_tokens_per_s: float | None
    ratio_pairs: list[float]
    ratio_spread: Spread | None
    ratio_prefill: float | None


@dataclass
class LoadAverage:
    cores: int | None
    start: float | None
    end: float | None = None


@dataclass
class Target:
    target: float
    best: float
    met: bool
    note: str


@dataclass
class Targets:
    gating: bool
    ratio_vs_stock: Target
    bandwidth_share: Target


@dataclass
class LongTextRun:
    chunks: int
    frames: int
    audio_s: float
    time_to_first_audio_s: float | None
    total_s: float
    generate_s: float
    real_time_factor: float | None
    pieces: int
    usable_chunks: int


@dataclass
class StreamWindow:
    context_frames: int
    lookahead_frames: int


@dataclass
class StreamComparison:
    same_codes: bool
    snr_db: float | None
    max_abs_diff: float | None


@dataclass
class LongText:
    text: str
    chunk_words: int
    context_chunks: int
    stream_window: StreamWindow
    stream: LongTextRun
    one_shot: LongTextRun
    streamed_vs_one_decode: StreamComparison
    note: str


PERFORMANCE_DEFINITIONS = {
    "graph": "ours: decode step mode the engine reported (on = CUDA/NPU graph replay, off = eager, "
             "compile = torch.compile)",
    "tokens_per_s": "decode steps per second after the prefill; one step = one frame of 8 codes",
    "prefill_ms": "prompt forward until the first frame is available (time to first frame)",
    "real_time_factor": "(prefill + decode + audio decode) seconds / audio seconds; < 1 is faster than real time",
    "bytes_read_per_step": "weights one audio decode step reads (no text MLP / text head / text embeddings) "
                           "+ KV cache at the mean context (prompt + tokens/2)",
    "bandwidth_gb_s": "bytes_read_per_step x median tokens/s",
    "ratio_tokens_per_s": "median over the repeats of ours / stock tokens/s of each back-to-back pair; "
                          "ratio_spread: the smallest and largest pair",
    "stock": "transformers model.generate(do_sample, temperature, top_k, top_p, eos_token_id=None) on the "
             "same model object, default (dynamic) KV cache",
}


@dataclass
class PerformanceResult:
    text: str
    prompt_tokens: int
    seed: int
    sampling: SamplingParams
    repeats: int
    load_average: LoadAverage
    weights_bytes_per_step: int
    kv_cache_bytes_per_token: int
    long_text: LongText
    copy_bandwidth: CopyBandwidth
    budgets: list[Budget]
    targets: Targets
    checks: list[Check]

    def to_json(self) -> dict:
        j = {f.name: jsonable(getattr(self, f.name)) for f in fields(self)}
        j["sampling"]["note"] = "max_new_tokens replaced by each budget; EOS ignored (forced)"
        head = {k: j.pop(k) for k in ("text", "prompt_tokens", "seed", "sampling", "repeats")}
        return {**head, "warmup_runs": 1,
                "order": "per budget: one warm-up each, then ours and stock alternate (ours, stock, ours, stock, ...)",
                "load_average": j.pop("load_average"), "definitions": PERFORMANCE_DEFINITIONS, **j}


def run_performance(engine, args, progress: Progress) -> PerformanceResult:
    params = SamplingParams(max_new_tokens=max(args.tokens))
    prompt = engine.build_prompt(args.text)
    prompt_len = int(len(prompt.input_ids))
    progress.step("performance: copy bandwidth")
    copy = copy_bandwidth(engine.device, engine.dtype)
    progress.log(f"performance: device copy bandwidth {copy.gb_s:.1f} GB/s")
    weights = engine.decode_bytes_per_frame()
    kv = kv_bytes_per_token(engine)
    seed = args.seeds[0]
    load = LoadAverage(os.cpu_count(), load_average())
    warn_if_loaded(load.start, load.cores, progress)
    budgets, checks = [], []
    contenders = (("ours", run_ours), ("stock", run_stock))
    for n in args.tokens:
        bytes_per_step = weights + kv * (prompt_len + n // 2)
        for name, fn in contenders:
            progress.step(f"performance: {name} {n} tokens warm-up")
            fn(engine, prompt, params, n, seed)
            progress.done()
        # ours, stock, ours, stock, ...: a burst of load elsewhere hits both halves of a pair alike, so the
        # per-pair ratio stays honest where a ratio of two separately timed blocks would not
        runs = {name: [] for name, _ in contenders}
        for r in range(args.repeats):
            for name, fn in contenders:
                progress.step(f"performance: {name} {n} tokens {r + 1}/{args.repeats}")
                runs[name].append(fn(engine, prompt, params, n, seed))
                progress.done()
        sides = {}
        for name, _ in contenders:
            sides[name] = summarize_runs(runs[name], bytes_per_step, copy.gb_s)
            ok = all(x.frames == n for x in runs[name])
            checks.append(check(f"performance: {name} ran the whole {n}-token budget", ok,
                                [x.frames for x in runs[name]], f"frames == {n}"))
            if name == "ours":
                fin = all(x.finite for x in runs[name])
                checks.append(check(f"performance: ours {n} tokens gives finite audio", fin, fin, "no NaN/Inf"))
        ours, stock = sides["ours"].decode_tokens_per_s.median, sides["stock"].decode_tokens_per_s.median
        pairs = [o.tokens_per_s() / st.tokens_per_s() for o, st in zip(runs["ours"], runs["stock"])
                 if st.tokens_per_s() > 0]
        row = Budget(n, bytes_per_step, sides["ours"], sides["stock"],
                     ratio_tokens_per_s=round(statistics.median(pairs), 3) if pairs else None,
                     ratio_pairs=[round(x, 3) for x in pairs],
                     ratio_spread=Spread(round(min(pairs), 3), round(max(pairs), 3)) if pairs else None,
                     ratio_prefill=round(sides["stock"].prefill_ms / sides["ours"].prefill_ms, 3)
                     if sides["ours"].prefill_ms else None)
        spread = row.ratio_spread or Spread(math.nan, math.nan)
        progress.log(f"performance: {n} tokens: ours (graph {row.ours.graph}) {ours:.1f} tok/s ({row.ours.ms_per_frame:.2f} ms/frame), "
                     f"stock {stock:.1f} tok/s ({row.stock.ms_per_frame:.2f} ms/frame), "
                     f"ours/stock {row.ratio_tokens_per_s or math.nan:.2f}x "
                     f"(pairs {spread.min:.2f}-{spread.max:.2f})")
        budgets.append(row)
    long_text, long_text_checks = run_long_text(engine, args.long_text, params, seed, progress)
    checks += long_text_checks
    load.end = load_average()
    warn_if_loaded(load.end, load.cores, progress, at_end=True)
    # a capture or compile failure decodes eagerly with one warning line; a gate must not pass that by
    expected = engine.decode_mode()
    used = sorted({b.ours.graph for b in budgets})
    checks.append(check("performance: ours decoded in the requested graph mode", used == [expected], used,
                        f"graph {expected} (--graph {engine.graph_mode} on {engine.device.type})",
                        "" if used == [expected] else "fell back to eager: see the warning line above"))
    accel = engine.device.type != "cpu"
    target_ratio = TARGET_RATIO_ACCEL if accel else TARGET_RATIO_CPU
    best_ratio = max(b.ratio_tokens_per_s or 0 for b in budgets)
    best_share = max(b.ours.bandwidth_share_of_copy or 0 for b in budgets)
    return PerformanceResult(
        text=args.text,
        prompt_tokens=prompt_len,
        seed=seed,
        sampling=params,
        repeats=args.repeats,
        load_average=load,
        weights_bytes_per_step=weights,
        kv_cache_bytes_per_token=kv,
        long_text=long_text,
        copy_bandwidth=copy,
        budgets=budgets,
        targets=Targets(
            gating=False,
            ratio_vs_stock=Target(target_ratio, best_ratio, best_ratio >= target_ratio,
                                  "target: >= 3x on accelerators, >= 2x on CPU tiny"),
            bandwidth_share=Target(TARGET_BANDWIDTH_SHARE, best_share, best_share >= TARGET_BANDWIDTH_SHARE,
                                   "meaningful at real widths on an accelerator"),
        ),
        checks=checks,
    )


def run_long_text(engine, text: str, params: SamplingParams, seed: int,
                  progress: Progress) -> tuple[LongText, list[Check]]:
    """One long text through inference.speak twice from one seed, --stream and one-shot: time to first audio,
    total time and real-time factor side by side, and a check that both give the same audio."""
    import numpy as np
    import torch

    rows, outputs = {}, {}
    for name, stream in (("stream", True), ("one_shot", False)):
        progress.step(f"performance: long text, {name.replace('_', '-')}")
        speech = inference.speak(engine, text, params, seed=seed, retries=0, stream=stream)
        pieces = list(speech)
        progress.done()
        result = speech.result
        audio_s = result.samples / SAMPLE_RATE
        ttfa = result.time_to_first_audio_s
        rows[name] = LongTextRun(chunks=len(result.chunks), frames=int(result.codes.shape[0]),
                                 audio_s=round(audio_s, 3),
                                 time_to_first_audio_s=None if ttfa is None else round(ttfa, 4),
                                 total_s=round(result.total_s, 4), generate_s=round(result.generate_s, 4),
                                 real_time_factor=round(result.total_s / audio_s, 4) if audio_s else None,
                                 pieces=len(pieces), usable_chunks=sum(c.usable for c in result.chunks))
        outputs[name] = (np.concatenate(pieces) if pieces else np.zeros(0, np.float32), result.codes)
    (streamed, codes_s), (whole, codes_w) = outputs["stream"], outputs["one_shot"]
    # the finite-audio check judges NaN / Inf; here a NaN where the other run has one is the same sample
    streamed, whole = np.nan_to_num(streamed), np.nan_to_num(whole)
    same_codes = bool(torch.equal(codes_s, codes_w))
    snr, max_diff = math.nan, None
    if same_codes and whole.size and streamed.size == whole.size:
        err = float(np.sum((streamed.astype(np.float64) - whole) ** 2))
        snr = math.inf if err == 0 else 10 * math.log10(float(np.sum(whole.astype(np.float64) ** 2)) / err)
        max_diff = float(np.abs(streamed - whole).max())
    s, w = rows["stream"], rows["one_shot"]
    progress.log(f"performance: long text ({s.chunks} chunks, {s.audio_s:.1f} s of audio): time to first audio "
                 f"{s.time_to_first_audio_s} s streamed vs {w.time_to_first_audio_s} s one-shot; real-time "
                 f"factor {s.real_time_factor} vs {w.real_time_factor}; streamed vs one decode: SNR "
                 f"{snr:.1f} dB, max abs diff {max_diff}")
    ok = same_codes and snr >= STREAM_MIN_SNR_DB
    long_text = LongText(
        text=text,
        chunk_words=inference.CHUNK_WORDS,
        context_chunks=inference.CONTEXT_CHUNKS,
        stream_window=StreamWindow(inference.STREAM_CONTEXT, inference.STREAM_LOOKAHEAD),
        stream=s,
        one_shot=w,
        streamed_vs_one_decode=StreamComparison(same_codes, None if math.isnan(snr) else
                                                (999.0 if math.isinf(snr) else round(snr, 1)), max_diff),
        note="one seed, --retries 0, default --chunk_words / --context_chunks; time to first audio: from the "
             "call to the first audio piece (one-shot: the whole text); real-time factor: total s / audio s",
    )
    return long_text, [check("performance: long text streamed equals its one-shot decode", ok,
                             None if math.isnan(snr) else round(min(snr, 999.0), 1), f"same codes, SNR >= "
                             f"{STREAM_MIN_SNR_DB:g} dB", "" if same_codes else "the two runs gave other codes")]


# --------------------------------------------------------------------------- images (no matplotlib)


def png_bytes(rgb) -> bytes:
    """[H, W, 3] uint8 -> PNG file bytes (zlib + struct, no imaging library)."""
    import numpy as np

    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w, _ = rgb.shape
    raw = np.concatenate([np.zeros((h, 1), dtype=np.uint8), rgb.reshape(h, w * 3)], axis=1).tobytes()

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def waveform_scale(audio) -> float:
    """Vertical half-range of the waveform image: 1.0, or the peak rounded up when the audio is quiet."""
    import numpy as np

    x = np.nan_to_num(np.asarray(audio, dtype=np.float32))
    peak = float(np.abs(x).max()) if x.size else 0.0
    for scale in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5):
        if peak <= scale:
            return scale
    return 1.0


def waveform_image(audio, width: int = 900, height: int = 140, scale: float = 1.0):
    import numpy as np

    img = np.full((height, width, 3), 250, dtype=np.uint8)
    img[height // 2, :] = (200, 200, 200)
    x = (np.nan_to_num(np.asarray(audio, dtype=np.float32)) / scale).clip(-1, 1)
    if x.size == 0:
        return img
    edges = np.linspace(0, x.size, width + 1).astype(int)
    lo = np.array([x[a:max(b, a + 1)].min() if a < x.size else 0 for a, b in zip(edges[:-1], edges[1:])])
    hi = np.array([x[a:max(b, a + 1)].max() if a < x.size else 0 for a, b in zip(edges[:-1], edges[1:])])
    to_row = lambda v: ((1 - (v + 1) / 2) * (height - 1)).round().astype(int)  # noqa: E731
    top, bottom = to_row(hi), to_row(lo)
    rows = np.arange(height)[:, None]
    mask = (rows >= top[None, :]) & (rows <= bottom[None, :])
    img[mask] = (31, 100, 180)
    return img


_MAGMA = [(0, 0, 4), (59, 15, 112), (140, 41, 129), (222, 73, 104), (254, 159, 109), (252, 253, 191)]


def spectrogram_image(audio, width: int = 900, height: int = 200, n_fft: int = 512, hop: int = 240, db: float = 80.0):
    """Log-magnitude STFT, 0-12 kHz bottom to top, db dynamic range, magma-like colours."""
    import numpy as np

    x = np.nan_to_num(np.asarray(audio, dtype=np.float64))
    if x.size < n_fft:
        x = np.pad(x, (0, n_fft - x.size))
    n_frames = 1 + (x.size - n_fft) // hop
    idx = np.arange(n_fft)[None, :] + hop * np.arange(n_frames)[:, None]
    spec = np.abs(np.fft.rfft(x[idx] * np.hanning(n_fft)[None, :], axis=1)).T  # [F, T]
    level = 20 * np.log10(spec + 1e-10)
    top = level.max()
    norm = ((level - (top - db)) / db).clip(0, 1)
    rows = np.linspace(norm.shape[0] - 1, 0, height).round().astype(int)
    cols = np.linspace(0, norm.shape[1] - 1, width).round().astype(int)
    v = norm[rows][:, cols]
    anchors = np.array(_MAGMA, dtype=np.float64)
    pos = v * (len(anchors) - 1)
    i = np.minimum(pos.astype(int), len(anchors) - 2)
    frac = (pos - i)[..., None]
    return (anchors[i] * (1 - frac) + anchors[i + 1] * frac).round().astype(np.uint8)


# --------------------------------------------------------------------------- quality (Seed-TTS-eval style)

# The built-in set: plain sentences, numbers, questions, a long sentence and tongue-twisters in each language.
QUALITY_SENTENCES = [
    ("en-plain-1", "The quick brown fox jumps over the lazy dog near the river bank."),
    ("en-plain-2", "She walked to the market this morning to buy fresh bread and apples."),
    ("en-plain-3", "What a wonderful surprise it was to see all of my old friends again!"),
    ("en-numbers-1", "The meeting starts at 9:30 in room 214 and should take about 45 minutes."),
    ("en-numbers-2", "The recipe needs 2 cups of flour, 3 eggs and 1 spoon of sugar."),
    ("en-question-1", "Have you ever wondered why the sky looks blue during the day?"),
    ("en-question-2", "Could you tell me the way to the nearest train station, please?"),
    ("en-long", "When the storm finally passed, the villagers came out of their houses, looked at the fallen trees "
                "and flooded fields, and quietly began the long work of putting everything back together again."),
    ("en-twister-1", "Peter Piper picked a peck of pickled peppers."),
    ("en-twister-2", "How much wood would a woodchuck chuck if a woodchuck could chuck wood?"),
    ("zh-plain-1", "今天天气很好，我们一起去公园散步吧。"),
    ("zh-plain-2", "他每天早上七点起床，然后骑自行车去上班。"),
    ("zh-plain-3", "这家餐厅的饭菜味道不错，价格也很实惠。"),
    ("zh-numbers-1", "会议将在下午3点开始，请大家提前10分钟到场。"),
    ("zh-numbers-2", "这本书一共有320页，我已经读了一半。"),
    ("zh-question-1", "你知道最近的地铁站在哪里吗？"),
    ("zh-question-2", "明天我们是去爬山还是去看电影？"),
    ("zh-long", "秋天到了，田野里的稻子一片金黄，农民们一边收割一边唱着歌，"
                "脸上露出了丰收的喜悦，孩子们也在田埂上追逐嬉戏。"),
    ("zh-twister-1", "四是四，十是十，十四是十四，四十是四十。"),
    ("zh-twister-2", "吃葡萄不吐葡萄皮，不吃葡萄倒吐葡萄皮。"),
]
CLONE_SENTENCES = [  # spoken in the --ref_audio voice
    ("en-clone", "Thank you for calling. Please leave a message after the tone, and I will get back to you soon."),
    ("zh-clone", "感谢您的来电，请在提示音后留言，我会尽快给您回复。"),
]


def quality_models(args, device, progress: Progress):
    """(Transcriber, SpeakerEncoder or None, SV note): the ASR model is needed (checked before), the SV
    model only for SIM: without it the other scores still come, with a line naming the download."""
    import quality

    progress.step("quality: loading Whisper")
    asr = quality.Transcriber(args.asr_path, device)
    sv_path = quality.find_model(args.sv_model, quality.DEFAULT_SV_MODEL, "wavlm")
    if not sv_path.is_dir():
        note = (f"no speaker-verification model at {sv_path}: speaker similarity not measured "
                f"(fetch it: {quality.DOWNLOAD_HINT}, or pass --sv_model PATH)")
        progress.warn(note)
        return asr, None, note
    progress.step("quality: loading WavLM")
    return asr, quality.SpeakerEncoder(sv_path, device), None


@dataclass
class ClipScore:
    """What the quality mode measured of one clip."""

    lang: str
    transcript: str
    metric: str
    error: float | None
    substitutions: int
    deletions: int
    insertions: int
    reference_units: int
    alignment: list  # of quality.Aligned
    duration_s: float
    trailing_silence_s: float
    speech_rate: float | None
    speech_rate_unit: str
    similarity: float | None = None
    similarity_note: str | None = None  # in the JSON only when there is one

    def to_json(self) -> dict:
        out = {f.name: jsonable(getattr(self, f.name)) for f in fields(self)}
        if self.similarity_note is None:
            del out["similarity_note"]
        return out


@dataclass
class Clip:
    """One clip of quality.json: where it came from, then its score's fields."""

    id: str
    text: str
    seed: int | None
    ref_audio: str | None
    finished_by_eos: bool | None
    hit_max_new_tokens: bool | None
    usable: bool | None
    wav: str | None
    score: ClipScore
    similarity_note: str | None = None  # known before scoring (--from: the reference is missing); JSON: after wav

    def to_json(self) -> dict:
        out = {f.name: jsonable(getattr(self, f.name)) for f in fields(self)
               if f.name not in ("score", "similarity_note")}
        if self.similarity_note is not None:
            out["similarity_note"] = self.similarity_note
        return out | self.score.to_json()

    @property
    def why_no_similarity(self) -> str | None:
        return self.similarity_note or self.score.similarity_note


def score_clip(cid: str, text: str, audio, rate: int, asr, sv, ref) -> ClipScore:
    """Transcript, WER/CER, SIM (when `ref` = (audio, rate) of the reference voice), duration, trailing
    silence and speech rate of clip `cid`."""
    import quality

    lang = quality.language_of(text)
    if audio is None or audio.size == 0:
        transcript, duration, silence = "", 0.0, 0.0
    else:
        transcript = asr(audio, rate, lang)
        duration, silence = round(audio.size / rate, 3), quality.trailing_silence_s(audio, rate)
    s = quality.score(text, transcript, lang)
    out = ClipScore(lang=lang, transcript=transcript, metric=s.metric,
                    error=None if s.error is None else round(s.error, 4), substitutions=s.substitutions,
                    deletions=s.deletions, insertions=s.insertions, reference_units=s.reference_units,
                    alignment=s.alignment, duration_s=duration, trailing_silence_s=silence,
                    speech_rate=quality.speech_rate(s, duration - silence), speech_rate_unit=f"{s.unit}s/s")
    if ref is not None and sv is not None and audio is not None and audio.size:
        sim = sv.similarity(audio, rate, *ref)
        if sim is None:
            out.similarity_note = f"{cid}: too short for the speaker model"
        else:
            out.similarity = round(sim, 4)
    return out


def quality_checks(clips: list[Clip], sv_note: str | None) -> list[Check]:
    import quality

    checks = []
    for lang, metric, limit in (("en", "WER", MAX_WER), ("zh", "CER", MAX_CER)):
        errors = [c.score.error for c in clips if c.score.lang == lang and c.score.error is not None]
        value = quality.mean(errors)
        worst = sorted((c for c in clips if c.score.lang == lang and c.score.error),
                       key=lambda c: -c.score.error)[:3]
        checks.append(check(f"quality: mean {metric} of the {'English' if lang == 'en' else 'Chinese'} clips",
                            None if value is None else value <= limit, None if value is None else round(value, 4),
                            f"{metric} <= {limit:.0%} (Whisper, Seed-TTS-eval normalisation)",
                            f"no {lang} clip" if value is None else
                            "; ".join(f"{c.id}: {c.score.error:.0%}" for c in worst)))
    cloned = [c for c in clips if c.ref_audio]
    sims = [c.score.similarity for c in cloned if c.score.similarity is not None]
    value = quality.mean(sims)
    if not cloned:
        why = "no clip has a reference voice (pass --ref_audio)"
    elif sv_note:
        why = sv_note
    else:
        why = "; ".join(c.why_no_similarity for c in cloned if c.why_no_similarity)
    checks.append(check("quality: mean speaker similarity of the cloned clips", None if value is None else
                        value >= MIN_SIM, None if value is None else round(value, 4),
                        f"cosine >= {MIN_SIM} (WavLMForXVector)", why))
    long_tail = [c for c in clips if c.score.trailing_silence_s > MAX_TRAILING_SILENCE_S]
    worst = max((c.score.trailing_silence_s for c in clips), default=0.0)
    checks.append(check("quality: no clip ends in a long silence", not long_tail, worst,
                        f"trailing silence <= {MAX_TRAILING_SILENCE_S} s (40 ms frames below -50 dBFS)",
                        "; ".join(f"{c.id}: {c.score.trailing_silence_s:.2f} s" for c in long_tail)))
    return checks


@dataclass
class QualityThresholds:
    max_wer: float
    max_cer: float
    min_sim: float
    max_trailing_silence_s: float
    aggregate: str


@dataclass
class QualitySummary:
    wer_mean: float | None
    en_clips: int
    cer_mean: float | None
    zh_clips: int
    sim_mean: float | None
    cloned_clips: int
    max_trailing_silence_s: float | None
    hit_max_new_tokens: int


@dataclass
class GeneratedSet:
    """How the quality mode generated the built-in set (not there with --from)."""

    sampling: SamplingParams
    seed: int
    ref_audio: str | None
    ref_text: str | None

    def to_json(self) -> dict:
        return {"sampling": {**jsonable(self.sampling), "seed": self.seed, "retries": 0,
                             "note": "inference.py defaults; max_new_tokens = max(--tokens); one attempt per sentence"},
                "ref_audio": self.ref_audio, "ref_text": self.ref_text}


QUALITY_NORMALISATION = (
    "Seed-TTS-eval run_wer.py process_one (zhon + ASCII punctuation removed except \"'\"; "
    "Chinese split into characters, zhconv zh-cn), plus: full-width forms folded, typographic "
    "apostrophes kept as \"'\", both sides simplified and lower-cased; jiwer edit distance")


@dataclass
class QualityResult:
    source: str
    asr_model: str
    sv_model: str | None
    thresholds: QualityThresholds
    published: Published
    generated: GeneratedSet | None  # its fields spread out in the JSON
    summary: QualitySummary
    clips: list[Clip]
    checks: list[Check]

    def to_json(self) -> dict:
        return {"source": self.source, "asr_model": self.asr_model, "sv_model": self.sv_model,
                "thresholds": jsonable(self.thresholds), "normalisation": QUALITY_NORMALISATION,
                "published": jsonable(self.published),
                **(self.generated.to_json() if self.generated is not None else {}),
                "summary": jsonable(self.summary), "clips": jsonable(self.clips), "checks": jsonable(self.checks)}


def quality_result(clips: list[Clip], checks: list[Check], source: str, asr, sv,
                   generated: GeneratedSet | None) -> QualityResult:
    import quality

    def avg(key, pred):
        return quality.mean(getattr(c.score, key) for c in clips if pred(c))

    wer, cer = avg("error", lambda c: c.score.lang == "en"), avg("error", lambda c: c.score.lang == "zh")
    sim = avg("similarity", lambda c: c.ref_audio)
    return QualityResult(
        source=source,
        asr_model=str(asr.path),
        sv_model=None if sv is None else str(sv.path),
        thresholds=QualityThresholds(MAX_WER, MAX_CER, MIN_SIM, MAX_TRAILING_SILENCE_S, "mean over the clips"),
        published=BOSON_PUBLISHED,
        generated=generated,
        summary=QualitySummary(
            wer_mean=None if wer is None else round(wer, 4), en_clips=sum(c.score.lang == "en" for c in clips),
            cer_mean=None if cer is None else round(cer, 4), zh_clips=sum(c.score.lang == "zh" for c in clips),
            sim_mean=None if sim is None else round(sim, 4), cloned_clips=sum(bool(c.ref_audio) for c in clips),
            max_trailing_silence_s=max((c.score.trailing_silence_s for c in clips), default=None),
            hit_max_new_tokens=sum(bool(c.hit_max_new_tokens) for c in clips),
        ),
        clips=clips,
        checks=checks,
    )


def log_clip(progress: Progress, clip: Clip) -> None:
    s = clip.score
    err = "–" if s.error is None else f"{s.error:.0%}"
    sim = "" if s.similarity is None else f", SIM {s.similarity:.3f}"
    progress.log(f"quality: {clip.id}: {s.metric} {err}{sim}, {s.duration_s:.2f} s, heard "
                 f"{inference.cut(s.transcript, 60)!r}")


def run_quality(engine, args, out_dir: Path, progress: Progress) -> QualityResult:
    """The built-in set (+ 2 cloning prompts with --ref_audio), generated with the engine, then scored."""
    asr, sv, sv_note = quality_models(args, engine.device, progress)
    params = SamplingParams(max_new_tokens=max(args.tokens))
    seed = args.seeds[0]
    groups = [[(cid, text, None) for cid, text in QUALITY_SENTENCES]]
    ref = ref_codes = None
    if args.ref_audio:
        ref = (args.ref_wave, inference.SAMPLE_RATE)
        ref_codes = engine.encode_audio(args.ref_wave)
        groups.append([(cid, text, args.ref_audio) for cid, text in CLONE_SENTENCES])
    audio_dir = out_dir / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    clips = []
    for group in groups:
        for start in range(0, len(group), args.batch_size):
            batch = group[start:start + args.batch_size]
            cloned = batch[0][2] is not None
            requests = [inference.SpeechRequest(text, seed, inference.DEFAULT_SCENE, ref_codes if cloned else None,
                                                args.ref_text if cloned else None, label=f"quality {cid}: ")
                        for cid, text, _ in batch]
            progress.step(f"quality: generating {', '.join(cid for cid, _, _ in batch)}")
            # one attempt per sentence, as Seed-TTS-eval scores one sample per prompt: no retries
            results = inference.synthesize(engine, requests, params, retries=0)
            progress.done()
            for (cid, text, ref_path), result in zip(batch, results):
                best = result.best
                wav_name = None
                if best.audio is not None:
                    wav = audio_dir / f"quality_{cid}.wav"
                    inference.write_wav_atomic(wav, best.audio)
                    wav_name = str(wav.relative_to(out_dir))
                progress.step(f"quality: scoring {cid}")
                clip = Clip(id=cid, text=text, seed=best.generation.seed, ref_audio=ref_path,
                            finished_by_eos=best.generation.finished,
                            hit_max_new_tokens=not best.generation.finished, usable=result.usable, wav=wav_name,
                            score=score_clip(cid, text, best.audio, inference.SAMPLE_RATE, asr, sv,
                                             ref if ref_path else None))
                clips.append(clip)
                log_clip(progress, clip)
                progress.done()
    generated = GeneratedSet(params, seed, args.ref_audio, args.ref_text)
    source = f"built-in set: {len(QUALITY_SENTENCES)} sentences" + (
        f" + {len(CLONE_SENTENCES)} cloned in the voice of {args.ref_audio}" if args.ref_audio else "")
    return quality_result(clips, quality_checks(clips, sv_note), source, asr, sv, generated)


@dataclass
class Sidecar:
    """What --from reads of one inference.py JSON sidecar, its types checked where it is read."""

    path: Path
    text: str
    seed_used: int | None
    finished_by_eos: bool | None
    usable: bool | None
    ref_audio: str | None  # parameters.ref_audio


def read_sidecar(path: Path) -> Sidecar | None:
    """The sidecar at `path`; None for a JSON that is not one: unreadable, no "text" string and "sample_rate",
    or (with a warning line) a field of another type than inference.py writes."""
    try:
        data = inference.read_json(path)
    except UserError:
        return None
    if not (isinstance(data.get("text"), str) and "sample_rate" in data):
        return None
    params = data.get("parameters") if isinstance(data.get("parameters"), dict) else {}
    expected = {"seed_used": (data, int), "finished_by_eos": (data, bool), "usable": (data, bool),
                "ref_audio": (params, str)}
    for key, (where, kind) in expected.items():
        value = where.get(key)
        # bool is an int to isinstance, but not a seed
        if value is not None and not (isinstance(value, kind) and (kind is bool or not isinstance(value, bool))):
            print(f"warning: --from {path}: {'parameters.' if where is params else ''}{key} is "
                  f"{inference.cut(repr(value), 40)}, not {kind.__name__} or null as inference.py writes it: "
                  "file skipped", file=sys.stderr)
            return None
    return Sidecar(path, data["text"], data.get("seed_used"), data.get("finished_by_eos"), data.get("usable"),
                   params.get("ref_audio"))


def sidecars(from_dir: Path) -> list[Sidecar]:
    """Every inference.py output in the folder: a JSON with a "text"."""
    found = [sc for sc in map(read_sidecar, sorted(from_dir.glob("*.json"))) if sc is not None]
    if not found:
        raise UserError(f"--from {from_dir}: no inference.py output there (WAV files with their JSON sidecars)")
    return found


def reference_path(value: str | None, from_dir: Path) -> Path | None:
    """A sidecar's parameters.ref_audio, as given to inference.py: relative to where it ran, or to the folder."""
    if not value:
        return None
    for p in (Path(value), from_dir / value, from_dir / Path(value).name):
        if p.is_file():
            return p
    return None


def run_quality_from(args, device, out_dir: Path, progress: Progress) -> QualityResult:
    """Score an existing inference.py output folder: nothing is generated."""
    asr, sv, sv_note = quality_models(args, device, progress)
    refs: dict[Path, tuple] = {}
    clips = []
    for sc in args.from_sidecars:
        cid = sc.path.stem
        wav = sc.path.with_suffix(".wav")
        audio, rate = inference.read_audio(wav, "--from") if wav.is_file() else (None, inference.SAMPLE_RATE)
        ref = note = None
        if sc.ref_audio:
            ref_path = reference_path(sc.ref_audio, args.from_dir)
            if ref_path is None:
                note = f"{cid}: reference {sc.ref_audio} not found"
            else:
                if ref_path not in refs:  # one read per reference file, however many clips share it
                    refs[ref_path] = inference.read_audio(ref_path, "reference audio")
                ref = refs[ref_path]
        progress.step(f"quality: scoring {cid}")
        finished = sc.finished_by_eos
        clip = Clip(id=cid, text=sc.text, seed=sc.seed_used, ref_audio=sc.ref_audio, finished_by_eos=finished,
                    hit_max_new_tokens=None if finished is None else not finished, usable=sc.usable,
                    wav=str(wav.resolve()) if wav.is_file() else None,
                    score=score_clip(cid, sc.text, audio, rate, asr, sv, ref), similarity_note=note)
        clips.append(clip)
        log_clip(progress, clip)
        progress.done()
    return quality_result(clips, quality_checks(clips, sv_note), f"--from {args.from_dir}: {len(clips)} clips", asr,
                          sv, None)


# --------------------------------------------------------------------------- report.html


_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px;color:#1d232a;background:#fff;max-width:1000px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:13px;margin:6px 0}
td,th{border:1px solid #d6dbe0;padding:3px 8px;text-align:left;vertical-align:top} th{background:#f2f4f6}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-weight:600;font-size:12px;color:#fff}
.PASS{background:#1f883d}.FAIL{background:#cf222e}.SKIP{background:#8c959f}
.big{font-size:16px;padding:3px 12px}
.card{border:1px solid #d6dbe0;border-radius:6px;padding:10px;margin:12px 0}
.card img{display:block;width:100%;max-width:900px;margin:6px 0;border:1px solid #eee}
audio{width:100%;max-width:900px} .muted{color:#57606a;font-size:12px}
"""


def _badge(status: str, big: bool = False) -> str:
    return f'<span class="badge {status}{" big" if big else ""}">{status}</span>'


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def _table(rows: list[list], head: list[str]) -> str:
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for r in rows:
        out.append("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>")
    return "".join(out) + "</table>"


def _wav_card(title: str, wav_path: Path, stats: SignalMetrics, frames: int) -> str:
    import numpy as np
    import soundfile as sf

    data = wav_path.read_bytes()
    audio, _ = sf.read(str(wav_path), dtype="float32")
    audio = np.asarray(audio).reshape(-1)
    scale = waveform_scale(audio)
    wave = base64.b64encode(png_bytes(waveform_image(audio, scale=scale))).decode()
    spec = base64.b64encode(png_bytes(spectrogram_image(audio))).decode()
    facts = ", ".join(f"{k} {_fmt(v)}" for k, v in (
        ("duration_s", stats.duration_s), ("rms", stats.rms), ("peak", stats.peak),
        ("clipping_ratio", stats.clipping_ratio), ("longest_silent_run_s", stats.longest_silent_run_s),
        ("frames", frames)))
    return (f'<div class="card"><b>{html.escape(title)}</b> <span class="muted">{html.escape(str(wav_path.name))}: '
            f'{facts}</span>'
            f'<audio controls preload="metadata" src="data:audio/wav;base64,{base64.b64encode(data).decode()}"></audio>'
            f'<img alt="waveform of {html.escape(title)}" src="data:image/png;base64,{wave}">'
            f'<img alt="spectrogram of {html.escape(title)}" src="data:image/png;base64,{spec}">'
            f'<div class="muted">top: waveform, full height = &plusmn;{scale:g}; bottom: spectrogram 0-12 kHz, 80 dB range</div></div>')


def _ratio_cell(budget: Budget) -> str:
    ratio, spread = budget.ratio_tokens_per_s, budget.ratio_spread
    if ratio is None:
        return "–"
    return f"<b>{ratio:.2f}×</b>" + (f" ({spread.min:.2f}–{spread.max:.2f})" if spread else "")


def marked_transcript(lang: str, alignment: list) -> str:
    """The normalised transcript (`alignment`: quality.Aligned steps) with what differs from the text marked:
    a substituted or inserted word highlighted (the text's word in its tooltip), a word of the text not heard
    struck through."""
    sep = "" if lang == "zh" else " "
    out = []
    for a in alignment:
        ref, hyp = html.escape(a.ref), html.escape(a.hyp)
        if a.op == "equal":
            out.append(hyp)
        elif a.op == "substitute":
            out.append(f'<mark title="the text says: {ref}">{hyp}</mark>')
        elif a.op == "insert":
            out.append(f'<mark style="background:#ffd8b5" title="not in the text">{hyp}</mark>')
        else:
            out.append(f'<del style="color:#cf222e" title="in the text, not heard">{ref}</del>')
    return sep.join(out) or "<span class='muted'>(nothing heard)</span>"


def _clip_player(clip: Clip, out_dir: Path) -> str:
    if not clip.wav:
        return "–"
    data = (out_dir / clip.wav).read_bytes()  # an absolute path (--from) stays itself
    return (f'<audio controls preload="none" style="width:220px" '
            f'src="data:audio/wav;base64,{base64.b64encode(data).decode()}"></audio>')


def quality_html(q: QualityResult, out_dir: Path) -> str:
    s, t = q.summary, q.thresholds

    def pct(v):
        return "–" if v is None else f"{v * 100:.2f} %"

    parts = ["<h2>Quality: intelligibility and voice (Seed-TTS-eval style)</h2>",
             f"<div class='muted'>{html.escape(q.source)}; ASR {html.escape(q.asr_model)}, speaker model "
             f"{html.escape(str(q.sv_model or 'none'))}</div>"]
    pub = q.published
    parts.append(_table([
        ["mean WER, English", pct(s.wer_mean), f"&le; {t.max_wer * 100:g} %", str(s.en_clips),
         f"{pub.wer_percent} %"],
        ["mean CER, Chinese", pct(s.cer_mean), f"&le; {t.max_cer * 100:g} %", str(s.zh_clips), "–"],
        ["mean speaker similarity", pct(s.sim_mean), f"&ge; {t.min_sim * 100:g} %", str(s.cloned_clips),
         f"{pub.sim_percent} %"],
        ["longest trailing silence", _fmt(s.max_trailing_silence_s), f"&le; {t.max_trailing_silence_s} s",
         "", "–"],
        ["clips without EOS (hit max_new_tokens)", str(s.hit_max_new_tokens), "reported", "", "–"],
    ], ["measure", "this run", "gate", "clips", "Boson published"]))
    parts.append(f"<div class='muted'>{html.escape(pub.note)}; not the same sentences, ASR for Chinese or "
                 "speaker model as this run: a guide, not a like-for-like comparison (docs/quality.md)</div>")
    rows = []
    for c in q.clips:
        cs = c.score
        err = "–" if cs.error is None else f"{cs.metric} {cs.error * 100:.1f} %"
        rows.append([html.escape(c.id), html.escape(c.text),
                     marked_transcript(cs.lang, cs.alignment)
                     + f"<div class='muted'>{html.escape(cs.transcript)}</div>", err,
                     _fmt(cs.similarity), _fmt(cs.duration_s), _fmt(cs.trailing_silence_s),
                     _fmt(cs.speech_rate), "–" if c.finished_by_eos is None else
                     ("yes" if c.finished_by_eos else "<b>no</b>"), _clip_player(c, out_dir)])
    parts.append(_table(rows, ["clip", "text", "heard (differences marked)", "error", "SIM", "s",
                               "trailing silence s", "rate /s", "EOS", "listen"]))
    return "\n".join(parts)


def _signal(s: SeedRun, key: str):
    return None if s.signal is None else getattr(s.signal, key)


def render_html(summary: Summary, precision: PrecisionResult | None, performance: PerformanceResult | None,
                out_dir: Path, quality: QualityResult | None = None) -> str:
    env = summary.environment
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>Higgs Audio eval: {summary.status}</title>"
             f"<style>{_CSS}</style></head><body>",
             f"<h1>Higgs Audio V2 evaluation {_badge(summary.status, True)}</h1>",
             f"<div class='muted'>{html.escape(summary.finished_at)} · mode {summary.mode} · "
             f"{summary.checks_passed} passed, {summary.checks_failed} failed, "
             f"{summary.checks_skipped} skipped</div>"]
    parts.append("<h2>Summary</h2>")
    rows = [["device", f"{_fmt(env['device'])} ({_fmt(env['device_name'])})"], ["dtype", _fmt(env["dtype"])],
            ["model", _fmt(summary.model)], ["torch / torch_npu / transformers",
                                                f"{_fmt(env['torch'])} / {_fmt(env['torch_npu'])} / "
                                                f"{_fmt(env['transformers'])}"], ["CANN", _fmt(env["cann"])]]
    for k, v in summary.headline.items():
        rows.append([html.escape(k), _fmt(v)])
    parts.append(_table(rows, ["item", "value"]))
    if performance:
        parts.append("<h2>Performance: ours vs stock <code>model.generate()</code></h2>")
        rows = []
        for b in performance.budgets:
            for name in ("ours", "stock"):
                s = getattr(b, name)
                t = s.decode_tokens_per_s
                label = name if name == "stock" else f"ours (graph {s.graph})"
                rows.append([str(b.tokens), label, f"{t.median:.2f} ({t.min:.2f}–{t.max:.2f})",
                             _fmt(s.ms_per_frame), _fmt(s.prefill_ms), _fmt(s.audio_decode_s),
                             _fmt(s.real_time_factor), _fmt(s.bandwidth_gb_s),
                             _fmt(s.bandwidth_share_of_copy),
                             _fmt(None if s.peak_device_memory_bytes is None
                                  else round(s.peak_device_memory_bytes / 2**30, 3)),
                             _ratio_cell(b) if name == "ours" else ""])
        parts.append(_table(rows, ["tokens", "run", "tokens/s median (min–max)", "ms/frame", "prefill ms",
                                   "audio decode s", "RTF", "GB/s", "share of copy BW", "peak mem GiB",
                                   "ours/stock median of pairs (min–max)"]))
        parts.append(f"<div class='muted'>copy bandwidth {performance.copy_bandwidth.gb_s} GB/s measured in "
                     f"this run; {performance.repeats} repeats after 1 warm-up, ours and stock alternating; "
                     f"{html.escape(PERFORMANCE_DEFINITIONS['real_time_factor'])}</div>")
        lt = performance.long_text
        parts.append("<h2>Long text: streamed vs one-shot</h2>")
        parts.append(_table([[name.replace("_", "-"), _fmt(r.chunks), _fmt(r.audio_s),
                              _fmt(r.time_to_first_audio_s), _fmt(r.total_s), _fmt(r.real_time_factor),
                              _fmt(r.pieces)] for name, r in (("stream", lt.stream), ("one_shot", lt.one_shot))],
                            ["run", "chunks", "audio s", "time to first audio s", "total s", "RTF", "pieces"]))
        parts.append(f"<div class='muted'>{html.escape(lt.note)}</div>")
    parts.append("<h2>Checks</h2>")
    checks = (precision.checks if precision else []) + (performance.checks if performance else [])
    checks += (quality.checks if quality else []) or ([check("quality: intelligibility and voice", None, None,
                                                             "a Whisper model", summary.quality.skipped)]
                                                      if isinstance(summary.quality, QualitySkipped) else [])
    parts.append(_table([[_badge(c.status), html.escape(c.name), _fmt(c.value), _fmt(c.threshold),
                          _fmt(c.detail or None)] for c in checks],
                        ["status", "check", "value", "threshold", "detail"]))
    if precision:
        par = jsonable(precision.device_parity)
        parts.append("<h2>Device parity vs CPU fp32</h2>")
        parts.append(_table([[html.escape(k), _fmt(v)] for k, v in par.items() if k != "check"], ["item", "value"]))
        parts.append("<h2>Audio</h2>")
        rows = [[str(s.seed), _fmt(s.codes.frames), _fmt(_signal(s, "duration_s")), _fmt(_signal(s, "rms")),
                 _fmt(_signal(s, "peak")), _fmt(_signal(s, "nan_count")), _fmt(_signal(s, "inf_count")),
                 _fmt(_signal(s, "clipping_ratio")), _fmt(_signal(s, "longest_silent_run_s")),
                 _fmt(_signal(s, "max_sample_jump")), _fmt(s.codes.valid_frame_share),
                 " ".join(f"{e:.2f}" for e in s.codes.code_entropy_bits),
                 _badge(PASS if s.usable else FAIL)] for s in precision.seeds]
        parts.append(_table(rows, ["seed", "frames", "s", "RMS", "peak", "NaN", "Inf", "clip", "silence s",
                                   "max jump", "valid", "entropy bits / codebook", "usable"]))
        for s in precision.seeds:
            if s.wav:
                parts.append(_wav_card(f"seed {s.seed}", out_dir / s.wav, s.signal, s.codes.frames))
        g = precision.determinism.greedy
        if g.wav:
            parts.append(_wav_card("greedy (temperature 0)", out_dir / g.wav, g.signal, g.frames))
    if quality:
        parts.append(quality_html(quality, out_dir))
    parts.append("<h2>Environment</h2>")
    parts.append(_table([[html.escape(k), _fmt(v)] for k, v in env.items()], ["item", "value"]))
    parts.append("</body></html>")
    return "\n".join(parts)


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Precision and performance reports for the Higgs Audio V2 engine.",
                                formatter_class=inference.HelpFormatter)
    add_flag = inference.add_flag
    add_flag(p, "--mode", choices=("all", "precision", "performance", "quality"), default="all",
             help="which reports to make (all: quality too when a Whisper model is there)")
    add_flag(p, "--text", default=inference.DEFAULT_TEXT, help="text to speak")
    add_flag(p, "--output_dir", default="eval_results", help="folder for the JSON files, report.html, audio/")

    precision = p.add_argument_group("precision")
    add_flag(precision, "--seeds", type=int, nargs="+", default=[1, 37, 42, 74], help="one WAV per seed")
    add_flag(precision, "--parity", choices=("auto", "on", "off"), default="auto",
             help="device parity vs CPU fp32 (auto: unless the run itself is CPU fp32)")

    performance = p.add_argument_group("performance")
    add_flag(performance, "--tokens", type=int, nargs="+", default=[512, 1024, 2048],
             help="token budgets (frames), each forced to run in full; precision: max_new_tokens = the largest")
    add_flag(performance, "--repeats", type=int, default=3, help="timed runs per budget after one warm-up")
    add_flag(performance, "--long_text", default=LONG_TEXT,
             help="text of the long-text row: time to first audio with and without --stream, and the "
                  "real-time factor (default: a built-in English + Chinese story of three chunks)")

    qual = p.add_argument_group("quality (Seed-TTS-eval style, docs/quality.md)")
    add_flag(qual, "--asr_model", default=None, metavar="PATH",
             help=f"Whisper folder (default {quality_defaults()[0]}: bash download.sh --eval_models)")
    add_flag(qual, "--sv_model", default=None, metavar="PATH",
             help=f"WavLMForXVector folder for speaker similarity (default {quality_defaults()[1]})")
    add_flag(qual, "--from", dest="from_dir", default=None, metavar="DIR",
             help="score the WAVs + JSON sidecars inference.py wrote there instead of generating the built-in set")
    add_flag(qual, "--ref_audio", default=None,
             help="also speak 2 sentences in this voice and measure the speaker similarity")
    add_flag(qual, "--ref_text", default=None, help="transcript of --ref_audio")
    add_flag(qual, "--batch_size", type=int, default=4, help="built-in sentences generated together")

    inference.add_model_flags(p.add_argument_group("model and device"))
    add_flag(p, "--medium", action="store_true",
             help="evaluate a random-weight model with the real widths (hidden 3072, 24 heads, 8 KV heads, "
                  "vocab 128256) and --medium_layers layers, built in a temp dir, instead of --model_path")
    add_flag(p, "--medium_layers", type=int, default=2, help="layers of the --medium model (the real one has 28)")
    return p


MAX_MEDIUM_LAYERS = 28  # the real model's depth


def validate(args) -> None:
    inference.check_utf8_args(args, "check the shell's encoding")
    if not args.text.strip():
        raise UserError("--text is empty")
    for seed in args.seeds:
        inference.check_seed(seed, flag="--seeds")
    if any(n < inference.MIN_FRAMES + 1 for n in args.tokens):
        raise UserError(f"--tokens: every budget must be >= {inference.MIN_FRAMES + 1} frames, got {args.tokens}")
    if args.repeats < 1:
        raise UserError(f"--repeats must be >= 1, got {args.repeats}")
    if not 1 <= args.medium_layers <= MAX_MEDIUM_LAYERS:
        raise UserError(f"--medium_layers must be from 1 to {MAX_MEDIUM_LAYERS} (the real model's depth), "
                        f"got {args.medium_layers}")
    args.tokens = sorted(set(args.tokens))
    args.seeds = list(dict.fromkeys(args.seeds))
    validate_quality(args)


def quality_defaults() -> tuple[str, str]:
    import quality

    return f"./{quality.DEFAULT_ASR_MODEL}", f"./{quality.DEFAULT_SV_MODEL}"


def validate_quality(args) -> None:
    """Decide whether quality runs (args.quality, or args.quality_note saying why not) and check its
    inputs before anything loads."""
    import quality

    if args.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.from_dir is not None:
        if args.mode != "quality":
            raise UserError(f"--from scores existing audio: use it with --mode quality (not --mode {args.mode})")
        if args.ref_audio is not None:
            raise UserError("--ref_audio is for the built-in set; with --from each sidecar names its own reference")
        args.from_dir = Path(args.from_dir)
        if not args.from_dir.is_dir():
            raise UserError(f"--from {args.from_dir}: no such folder (give the --output_dir of an inference.py run)")
        args.from_sidecars = sidecars(args.from_dir)
    if args.ref_text is not None and args.ref_audio is None:
        raise UserError("--ref_text needs --ref_audio")
    args.asr_path = quality.find_model(args.asr_model, quality.DEFAULT_ASR_MODEL, "whisper")
    args.quality, args.quality_note = args.mode == "quality", None
    if args.mode == "all":
        args.quality = args.asr_model is not None or args.asr_path.is_dir()
        if not args.quality:
            args.quality_note = (f"no Whisper model at {args.asr_path} (fetch it: {quality.DOWNLOAD_HINT}, "
                                 "or pass --asr_model PATH)")
    if args.quality:
        quality.check_model_folder("whisper", args.asr_path, "--asr_model")
        if args.sv_model is not None:  # named: it must be there (the default may be missing: SIM is skipped)
            quality.check_model_folder("wavlm-sv", Path(args.sv_model), "--sv_model")
    if args.ref_audio is not None and args.mode not in ("quality", "all"):
        raise UserError(f"--ref_audio is for the quality mode (not --mode {args.mode})")
    args.ref_wave = inference.load_reference_audio(args.ref_audio) if args.ref_audio and args.quality else None


def quality_steps(args) -> int:
    """Progress steps of the quality mode: a batch generated, a clip scored."""
    if not args.quality:
        return 0
    if args.from_dir is not None:
        return len(args.from_sidecars)
    n = len(QUALITY_SENTENCES) + (len(CLONE_SENTENCES) if args.ref_audio else 0)
    batches = -(-len(QUALITY_SENTENCES) // args.batch_size) + (-(-len(CLONE_SENTENCES) // args.batch_size)
                                                                if args.ref_audio else 0)
    return n + batches


def host_environment(args, device=None) -> dict:
    """The machine's and libraries' fields of environment(); the engine's stay empty (--from needs no engine)."""
    import torch
    import transformers

    device = device or inference.pick_device(args.device)
    env = {"device": str(device), "device_name": device_name(device), "dtype": None, "dtype_reason": None,
           "graph": None, "python": platform.python_version(), "torch": torch.__version__, "torch_npu": None,
           "transformers": transformers.__version__, "cann": None, "cpu_threads": torch.get_num_threads(),
           "model_path": None, "tokenizer_path": None, "medium_model": None, "num_params": None,
           "peak_host_rss_bytes": peak_host_rss_bytes()}
    try:
        import torch_npu

        env["torch_npu"] = getattr(torch_npu, "__version__", None)
        env["cann"] = cann_version()
    except ImportError:
        pass
    return env


def build_medium(root: Path, layers: int, log) -> tuple[Path, Path, dict]:
    import tiny_checkpoints
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    sizes = {"hidden_size": 3072, "intermediate_size": 8192, "num_attention_heads": 24, "num_key_value_heads": 8,
             "head_dim": 128, "vocab_size": 128256, "num_hidden_layers": layers}
    t0 = time.perf_counter()
    model_dir = tiny_checkpoints.build_generation_model(root / "model", seed=0, dtype="bfloat16", **sizes)
    tokenizer_dir = tiny_checkpoints.build_audio_tokenizer(root / "tokenizer", seed=0)
    log(f"medium model: random weights, real widths, {layers} layers, built in {time.perf_counter() - t0:.1f}s "
        f"in {root}")
    return model_dir, tokenizer_dir, sizes | {"num_codebooks": 8, "codebook_size": 1026, "weights": "random"}


def overall(checks: list[Check]) -> tuple[str, int, int, int]:
    passed = sum(c.status == PASS for c in checks)
    failed = sum(c.status == FAIL for c in checks)
    skipped = sum(c.status == SKIP for c in checks)
    return (FAIL if failed else PASS), passed, failed, skipped


@dataclass
class SummarySeed:
    seed: int
    usable: bool
    duration_s: float | None
    rms: float | None
    peak: float | None
    wav: str | None


@dataclass
class SummaryPrecision:
    seeds: list[SummarySeed]
    deterministic: bool
    parity_cosine: float | None
    parity_greedy_agreement: float | None


@dataclass
class SummaryBudget:
    tokens: int
    ours_tokens_per_s: float
    stock_tokens_per_s: float
    ratio: float | None
    ours_ms_per_frame: float
    stock_ms_per_frame: float
    ours_prefill_ms: float
    ours_real_time_factor: float | None
    ours_bandwidth_gb_s: float
    ours_bandwidth_share_of_copy: float | None
    peak_device_memory_bytes: int | None


@dataclass
class SummaryQuality:
    summary: QualitySummary
    source: str

    def to_json(self) -> dict:
        return {**jsonable(self.summary), "source": self.source}


@dataclass
class QualitySkipped:
    skipped: str  # why: no Whisper model


@dataclass
class Summary:
    status: str
    mode: str
    checks_passed: int
    checks_failed: int
    checks_skipped: int
    failed_checks: list[str]
    finished_at: str
    model: str
    environment: dict  # whatever the host reports
    headline: dict[str, object]  # label -> value, the lines the run has
    precision: SummaryPrecision | None
    performance: list[SummaryBudget] | None
    quality: SummaryQuality | QualitySkipped | None
    files: list[str]


def evaluate(args, out_dir: Path, engine=None, log=print) -> int:
    medium = None
    tmp = None
    try:
        if args.from_dir is not None:  # --from scores existing audio: no engine
            engine = None
        elif engine is None:
            if args.medium:
                tmp = tempfile.mkdtemp(prefix="higgs-medium-")
                args.model_path, args.tokenizer_path, medium = build_medium(Path(tmp), args.medium_layers, log)
            engine = inference.load_engine(args.model_path, args.tokenizer_path, args.device, args.dtype, log=log,
                                           graph=args.graph)
        if engine is not None:
            log(f"Model: {engine.num_params / 1e9:.3f} B parameters on {engine.device} ({_dtype_name(engine.dtype)})")
            # the largest budget must fit before anything runs (precision decodes it too), not OOM halfway through
            engine.check_decode_memory(1, len(engine.build_prompt(args.text).input_ids), max(args.tokens),
                                       SamplingParams(max_new_tokens=max(args.tokens)), flag="--tokens")
        inference.make_output_dir(out_dir)  # only now: a run that fails to load leaves no empty folder
        n_prec = len(args.seeds) + 3 + (2 if engine is not None and parity_wanted(engine, args) else 0)
        n_perf = len(args.tokens) * 2 * (1 + args.repeats) + 2  # + the long text, streamed and one-shot
        total = (n_prec if args.mode in ("all", "precision") else 0) + (n_perf if args.mode in ("all", "performance")
                                                                         else 0) + quality_steps(args)
        progress = Progress(total)
        precision = performance = quality_ = None
        try:
            if args.mode in ("all", "precision"):
                precision = run_precision(engine, args, out_dir, progress)
            if args.mode in ("all", "performance"):
                performance = run_performance(engine, args, progress)
            if args.quality and args.from_dir is None:
                quality_ = run_quality(engine, args, out_dir, progress)
            elif args.quality:
                quality_ = run_quality_from(args, inference.pick_device(args.device), out_dir, progress)
        finally:
            progress.close()
        env = environment(engine, args, medium) if args.from_dir is None else host_environment(args)
        # records become JSON here, each file with the environment first
        if quality_ is not None:
            inference.write_json_atomic(out_dir / "quality.json", {"environment": env, **quality_.to_json()})
        elif args.quality_note:  # --mode all without a Whisper model: said, and shown as a skipped check
            log(f"quality: skipped: {args.quality_note}")
        if performance is not None:
            inference.write_json_atomic(out_dir / "performance.json", {"environment": env, **performance.to_json()})
        if precision is not None:
            inference.write_json_atomic(out_dir / "precision.json", {"environment": env, **precision.to_json()})
        checks = (precision.checks if precision else []) + (performance.checks if performance else [])
        checks += (quality_.checks if quality_ else []) or ([check("quality: intelligibility and voice", None, None,
                                                                 "a Whisper model", args.quality_note)]
                                                           if args.quality_note else [])
        status, passed, failed, skipped = overall(checks)
        headline = {}
        if quality_:
            q = quality_.summary
            for key, name in (("wer_mean", "quality: mean WER (English)"), ("cer_mean", "quality: mean CER (Chinese)"),
                              ("sim_mean", "quality: mean speaker similarity")):
                if getattr(q, key) is not None:
                    headline[name] = getattr(q, key)
        par = precision.device_parity if precision else None
        measured = par if isinstance(par, Parity) else None
        if precision:
            headline["seeds usable"] = f"{len(precision.cross_seed.usable_seeds)}/{len(precision.seeds)}"
            headline["parity cosine vs CPU fp32"] = measured.cosine_similarity if measured else par.status
        if performance:
            for b in performance.budgets:
                headline[f"{b.tokens} tokens: ours / stock tokens/s"] = (
                    f"{b.ours.decode_tokens_per_s.median} / {b.stock.decode_tokens_per_s.median} "
                    f"({b.ratio_tokens_per_s}x)")
            lt = performance.long_text
            headline["long text: time to first audio, streamed / one-shot (s)"] = (
                f"{lt.stream.time_to_first_audio_s} / {lt.one_shot.time_to_first_audio_s}")
            headline["long text: real-time factor, streamed / one-shot"] = (
                f"{lt.stream.real_time_factor} / {lt.one_shot.real_time_factor}")
        det = precision.determinism if precision else None
        summary = Summary(
            status=status,
            mode=args.mode,
            checks_passed=passed,
            checks_failed=failed,
            checks_skipped=skipped,
            failed_checks=[c.name for c in checks if c.status == FAIL],
            finished_at=time.strftime("%Y-%m-%d %H:%M:%S %z"),
            model="medium (random weights, real widths)" if medium else str(args.model_path)
            if args.from_dir is None else f"none (--from {args.from_dir})",
            environment=env,
            headline=headline,
            precision=None if not precision else SummaryPrecision(
                seeds=[SummarySeed(s.seed, s.usable, _signal(s, "duration_s"), _signal(s, "rms"), _signal(s, "peak"),
                                   s.wav) for s in precision.seeds],
                deterministic=det.identical_codes and det.identical_wav_bytes and det.greedy_identical_codes,
                parity_cosine=measured.cosine_similarity if measured else None,
                parity_greedy_agreement=measured.greedy_agreement_teacher_forced if measured else None,
            ),
            performance=None if not performance else [
                SummaryBudget(tokens=b.tokens, ours_tokens_per_s=b.ours.decode_tokens_per_s.median,
                              stock_tokens_per_s=b.stock.decode_tokens_per_s.median,
                              ratio=b.ratio_tokens_per_s, ours_ms_per_frame=b.ours.ms_per_frame,
                              stock_ms_per_frame=b.stock.ms_per_frame, ours_prefill_ms=b.ours.prefill_ms,
                              ours_real_time_factor=b.ours.real_time_factor,
                              ours_bandwidth_gb_s=b.ours.bandwidth_gb_s,
                              ours_bandwidth_share_of_copy=b.ours.bandwidth_share_of_copy,
                              peak_device_memory_bytes=b.ours.peak_device_memory_bytes) for b in performance.budgets],
            quality=SummaryQuality(quality_.summary, quality_.source) if quality_
            else QualitySkipped(args.quality_note) if args.quality_note else None,
            files=[n for n in ("precision.json", "performance.json", "quality.json", "summary.json", "report.html")
                   if n == "summary.json" or n == "report.html" or (n == "precision.json" and precision)
                   or (n == "performance.json" and performance) or (n == "quality.json" and quality_)],
        )
        inference.write_json_atomic(out_dir / "summary.json", jsonable(summary))
        page = render_html(summary, precision, performance, out_dir, quality_)
        with inference.atomic_output(out_dir / "report.html") as tmp_html:
            tmp_html.write_text(page, encoding="utf-8")
        for c in checks:
            if c.status != PASS:
                log(f"  {c.status}  {c.name}: {c.value} (threshold: {c.threshold})")
        log(f"{status}: {passed} passed, {failed} failed, {skipped} skipped; wrote "
            + ", ".join(str(out_dir / f) for f in summary.files))
        return 1 if failed else 0
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def check_output_kinds(out_dir: Path, mode: str) -> None:
    """What the run will write must not already exist as the other kind (a folder named report.html, a file
    named audio): found now, not after minutes of measuring."""
    files = ["summary.json", "report.html"]
    files += ["precision.json"] if mode in ("all", "precision") else []
    files += ["performance.json"] if mode in ("all", "performance") else []
    files += ["quality.json"] if mode in ("all", "quality") else []
    for name in files:
        if (out_dir / name).is_dir():
            raise UserError(f"--output_dir {out_dir}: {name} there is a folder, but this run writes a file by that "
                            "name: move it away or pick another --output_dir")
    audio = out_dir / "audio"
    if mode in ("all", "precision", "quality") and audio.exists() and not audio.is_dir():
        raise UserError(f"--output_dir {out_dir}: audio there is a file, but this run writes its WAVs into a folder "
                        "by that name: move it away or pick another --output_dir")


def main(argv=None, engine=None) -> int:
    """CLI entry; `engine` lets tests reuse a loaded engine (then --model_path only serves --parity)."""
    args = build_parser().parse_args(argv)

    def body() -> int:
        validate(args)
        out_dir = inference.prepare_output_dir(args.output_dir)
        check_output_kinds(out_dir, args.mode)
        return evaluate(args, out_dir, engine=engine, log=inference.log)

    return inference.run_cli(body, "the reports were not finished")


if __name__ == "__main__":
    sys.exit(main())
