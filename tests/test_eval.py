"""eval_audio.py: every mode writes its documented files, checks can fail, the report opens in Chromium."""

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest

import eval_audio
import inference

ROOT = Path(__file__).resolve().parent.parent

PRECISION_SEED_FIELDS = {
    "seed", "wav", "duration_s", "samples", "frames", "aligned_frames", "rms", "peak", "nan_count", "inf_count",
    "clipping_ratio", "longest_silent_run_s", "max_sample_jump", "valid_frame_share", "code_entropy_bits",
    "usable", "unusable_reason", "finished_by_eos", "checks",
}
RUN_FIELDS = {"frames", "prefill_ms", "decode_tokens_per_s", "ms_per_frame", "audio_decode_s", "audio_s",
              "real_time_factor", "peak_device_memory_bytes", "bandwidth_gb_s", "bandwidth_share_of_copy", "runs"}
ENV_FIELDS = {"device", "device_name", "dtype", "torch", "torch_npu", "transformers", "cann"}


def speech_like(n: int, seed: int = 0) -> np.ndarray:
    """Voiced 150 Hz harmonics under a 4 Hz syllable envelope: RMS ~0.1, peak ~0.4, no silent block."""
    t = np.arange(n) / inference.SAMPLE_RATE
    rng = np.random.default_rng(seed)
    voice = sum(np.sin(2 * np.pi * 150 * k * t + rng.uniform(0, 6.28)) / k for k in range(1, 8))
    env = 0.25 + 0.75 * np.abs(np.sin(2 * np.pi * 2 * t))
    x = 0.18 * voice * env + 0.005 * rng.standard_normal(n)
    return x.astype(np.float32)


def fake_decoder(kind: str):
    def decode(aligned):
        n = int(aligned.shape[0]) * 960
        x = speech_like(n, seed=int(aligned.sum()) % 1000)  # deterministic in the codes
        if kind == "nan":
            x[n // 3] = np.nan
            x[n // 2] = np.inf
        elif kind == "silent":
            x[:] = 0.0
        return x

    return decode


def aligned_len(frames: int) -> int:
    import torch

    return inference.revert_delay_pattern(torch.zeros((frames, 8), dtype=torch.long)).shape[0]


def check_status(checks, name_part):
    hits = [c for c in checks if name_part in c["name"]]
    assert hits, f"no check named like {name_part!r}"
    return {c["status"] for c in hits}


# --------------------------------------------------------------------------- checks as functions


def test_audio_checks_pass_for_speech_and_fail_for_broken_audio():
    good = eval_audio.signal_metrics(speech_like(48000))
    assert eval_audio.RMS_RANGE[0] < good.rms < eval_audio.RMS_RANGE[1]
    assert {c.status for c in eval_audio.audio_checks(good)} == {"PASS"}
    for c in eval_audio.audio_checks(good):
        assert c.threshold, c  # every check carries its threshold

    silent = eval_audio.signal_metrics(np.zeros(24000 * 3, dtype=np.float32))
    assert silent.longest_silent_run_s == 3.0
    failed = {c.name for c in eval_audio.audio_checks(silent) if c.status == "FAIL"}
    assert failed == {"RMS in speech range", "peak in speech range", "no long silence"}

    broken = speech_like(48000)
    broken[100], broken[200] = np.nan, -np.inf
    m = eval_audio.signal_metrics(broken)
    assert (m.nan_count, m.inf_count) == (1, 1)
    assert [c.status for c in eval_audio.audio_checks(m) if c.name == "finite output"] == ["FAIL"]

    clipped = np.clip(speech_like(48000) * 20, -1, 1)
    m = eval_audio.signal_metrics(clipped)
    assert m.clipping_ratio > eval_audio.MAX_CLIP_RATIO
    assert [c.status for c in eval_audio.audio_checks(m) if c.name == "no clipping"] == ["FAIL"]


def test_code_metrics_counts_valid_frames_and_entropy(tiny_engine):
    import torch

    cfg = tiny_engine.config
    t, c = 40, cfg.num_codebooks
    codes = torch.randint(0, 1024, (t, c))
    codes[0] = cfg.audio_stream_bos_id
    for k in range(c):  # delay pattern: codebook k starts at row k + 1
        codes[1: k + 1, k] = cfg.audio_stream_bos_id
    codes[-3:] = cfg.audio_stream_eos_id
    m = eval_audio.code_metrics(codes, cfg)
    assert m.frames == t and m.aligned_frames == inference.revert_delay_pattern(codes).shape[0]
    assert 0 < m.valid_frame_share < 1
    assert len(m.code_entropy_bits) == c and all(0 < e <= 10 for e in m.code_entropy_bits)


def test_png_writer_round_trips():
    img = np.zeros((7, 5, 3), dtype=np.uint8)
    img[2, 3] = (10, 200, 30)
    data = eval_audio.png_bytes(img)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", data[16:24])
    assert (w, h) == (5, 7)
    idat_len = struct.unpack(">I", data[33:37])[0]
    raw = zlib.decompress(data[41: 41 + idat_len])
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(7, 1 + 5 * 3)
    assert (rows[:, 0] == 0).all() and tuple(rows[2, 1 + 3 * 3: 1 + 3 * 3 + 3]) == (10, 200, 30)
    wave = eval_audio.waveform_image(speech_like(24000))
    spec = eval_audio.spectrogram_image(speech_like(24000))
    assert wave.shape == (140, 900, 3) and spec.shape == (200, 900, 3)
    assert wave.std() > 0 and spec.std() > 0


# --------------------------------------------------------------------------- the CLI end to end


@pytest.fixture(scope="module")
def all_run(tiny_ckpt, tmp_path_factory):
    """`eval_audio.py --mode all` as a user runs it, on the tiny checkpoint (random weights).

    Seeds 3 and 4 (here and below) run the whole budget on the seed-0 tiny checkpoint; others close early.
    """
    out = tmp_path_factory.mktemp("eval_all")
    cmd = [sys.executable, str(ROOT / "eval_audio.py"), "--mode", "all", "--model_path", str(tiny_ckpt[0]),
           "--tokenizer_path", str(tiny_ckpt[1]), "--tokens", "16", "--seeds", "3", "--repeats", "1",
           "--parity", "on", "--device", "cpu", "--output_dir", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    return proc, out


def test_mode_all_writes_every_file_with_the_documented_fields(all_run):
    proc, out = all_run
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    precision = json.loads((out / "precision.json").read_text())
    performance = json.loads((out / "performance.json").read_text())
    assert (out / "report.html").is_file()
    # exit status follows the checks (random weights may well fail the speech-range ones)
    assert (proc.returncode == 1) == (summary["checks_failed"] > 0) == (summary["status"] == "FAIL")
    assert ("FAIL:" if proc.returncode else "PASS:") in proc.stdout

    assert ENV_FIELDS <= set(precision["environment"]) and ENV_FIELDS <= set(performance["environment"])
    assert precision["environment"]["graph"] == "auto"  # the requested --graph, as the engine holds it
    (seed,) = precision["seeds"]
    assert PRECISION_SEED_FIELDS <= set(seed)
    assert (out / seed["wav"]).is_file() and seed["samples"] == aligned_len(16) * 960
    assert len(seed["code_entropy_bits"]) == 8
    det = precision["determinism"]
    assert det["identical_codes"] and det["identical_wav_bytes"] and det["greedy_identical_codes"]
    assert set(precision["thresholds"]) >= {"rms_range", "peak_range", "max_clip_ratio", "max_silent_run_s",
                                            "parity_min_cosine"}
    for c in precision["checks"] + performance["checks"]:
        assert set(c) == {"name", "status", "value", "threshold", "detail"} and c["status"] in ("PASS", "FAIL", "SKIP")
    for part in ("finite output", "RMS in speech range", "peak in speech range", "no clipping", "no long silence",
                 "twice gives identical codes", "identical WAV bytes", "cross-seed", "device parity"):
        check_status(precision["checks"], part)

    par = precision["device_parity"]  # --parity on: CPU fp32 against itself
    assert par["status"] == "PASS" and par["frames"] == eval_audio.PARITY_FRAMES
    assert par["cosine_similarity"] > 0.999999 and par["max_abs_diff"] < 1e-3
    assert par["greedy_agreement_teacher_forced"] == 1.0 and par["greedy_agreement_free_running"] == 1.0

    (budget,) = performance["budgets"]
    assert budget["tokens"] == 16 and budget["ratio_tokens_per_s"] > 0
    for name in ("ours", "stock"):
        assert RUN_FIELDS <= set(budget[name]), name
        assert budget[name]["frames"] == 16 and len(budget[name]["runs"]) == 1
        t = budget[name]["decode_tokens_per_s"]
        assert 0 < t["min"] <= t["median"] <= t["max"]
    assert performance["copy_bandwidth"]["gb_s"] > 0 and performance["targets"]["gating"] is False
    assert check_status(performance["checks"], "whole 16-token budget") == {"PASS"}
    assert summary["performance"][0]["tokens"] == 16 and summary["precision"]["parity_cosine"] > 0.999
    assert set(summary["files"]) == {"precision.json", "performance.json", "summary.json", "report.html"}


def test_mode_precision_passes_on_speech_like_audio(tiny_engine, tiny_ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tiny_engine, "decode_audio", fake_decoder("speech"))
    rc = eval_audio.main(["--mode", "precision", "--tokens", "24", "--seeds", "3", "4", "--text", "Hello.",
                          "--model_path", str(tiny_ckpt[0]), "--tokenizer_path", str(tiny_ckpt[1]),
                          "--output_dir", str(tmp_path)], engine=tiny_engine)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert rc == 0, summary["failed_checks"]
    assert summary["status"] == "PASS" and summary["checks_failed"] == 0
    assert not (tmp_path / "performance.json").exists()
    precision = json.loads((tmp_path / "precision.json").read_text())
    assert [s["seed"] for s in precision["seeds"]] == [3, 4] and all(s["usable"] for s in precision["seeds"])
    assert precision["device_parity"]["status"] == "SKIP"  # CPU fp32 is its own reference
    assert sorted(p.name for p in (tmp_path / "audio").iterdir()) == ["greedy.wav", "seed_3.wav", "seed_4.wav"]
    assert "PASS: " in capsys.readouterr().out


@pytest.mark.parametrize("kind,failing", [("nan", "finite output"), ("silent", "RMS in speech range")])
def test_injected_bad_audio_fails_with_nonzero_exit(kind, failing, tiny_engine, tiny_ckpt, tmp_path, monkeypatch,
                                                     capsys):
    monkeypatch.setattr(tiny_engine, "decode_audio", fake_decoder(kind))
    rc = eval_audio.main(["--mode", "precision", "--tokens", "24", "--seeds", "5", "--text", "Hello.",
                          "--model_path", str(tiny_ckpt[0]), "--tokenizer_path", str(tiny_ckpt[1]),
                          "--output_dir", str(tmp_path)], engine=tiny_engine)
    assert rc == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    precision = json.loads((tmp_path / "precision.json").read_text())
    assert summary["status"] == "FAIL" and any(failing in n for n in summary["failed_checks"])
    assert check_status(precision["checks"], failing) == {"FAIL"}
    assert check_status(precision["checks"], "cross-seed") == {"FAIL"}
    assert "FAIL: " in capsys.readouterr().out
    assert "FAIL" in (tmp_path / "report.html").read_text()


def test_mode_performance_alone(tiny_engine, tiny_ckpt, tmp_path):
    rc = eval_audio.main(["--mode", "performance", "--tokens", "11", "13", "--seeds", "2", "--repeats", "2",
                          "--output_dir", str(tmp_path)], engine=tiny_engine)
    assert rc == 0
    assert not (tmp_path / "precision.json").exists()
    perf = json.loads((tmp_path / "performance.json").read_text())
    assert [b["tokens"] for b in perf["budgets"]] == [11, 13] and perf["repeats"] == 2
    for b in perf["budgets"]:
        assert len(b["ours"]["runs"]) == 2 and len(b["stock"]["runs"]) == 2
        assert b["ours"]["frames"] == b["stock"]["frames"] == b["tokens"]
        assert b["bytes_read_per_step"] > perf["weights_bytes_per_step"] > 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["precision"] is None and len(summary["performance"]) == 2
    assert check_status(perf["checks"], "requested graph mode") == {"PASS"}  # cpu auto: eager


def test_graph_fallback_fails_the_performance_gate(tiny_engine, tmp_path, capsys):
    def failing_backend(graph_module, example_inputs):
        raise RuntimeError("this backend cannot compile the step")

    rc = eval_audio.main(["--mode", "performance", "--tokens", "11", "--repeats", "1", "--output_dir", str(tmp_path)],
                         engine=tiny_engine.with_graph_mode("compile", failing_backend))
    assert rc == 1
    perf = json.loads((tmp_path / "performance.json").read_text())
    assert perf["budgets"][0]["ours"]["graph"] == "off"
    assert check_status(perf["checks"], "requested graph mode") == {"FAIL"}
    assert "torch.compile of the decode step failed" in capsys.readouterr().err


def test_usage_mistakes_exit_2(tmp_path, capsys):
    assert eval_audio.main(["--tokens", "5", "--output_dir", str(tmp_path)]) == 2
    assert "error: --tokens" in capsys.readouterr().err
    assert eval_audio.main(["--model_path", str(tmp_path / "nope"), "--output_dir", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert eval_audio.main(["--repeats", "0", "--output_dir", str(tmp_path)]) == 2


def test_medium_builds_the_real_widths(monkeypatch, tmp_path):
    import tiny_checkpoints

    seen = {}

    class Stop(Exception):
        pass

    def fake(out_dir, seed=0, dtype="bfloat16", **sizes):
        seen.update(sizes)
        raise Stop

    monkeypatch.setattr(tiny_checkpoints, "build_generation_model", fake)
    with pytest.raises(Stop):
        eval_audio.build_medium(tmp_path, 3, log=lambda m: None)
    assert seen == {"hidden_size": 3072, "intermediate_size": 8192, "num_attention_heads": 24,
                    "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "num_hidden_layers": 3}


# --------------------------------------------------------------------------- the page in a real browser


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium(*args, timeout=120):
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        return subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install -y chromium); "
                                             "CI installs it")
def test_report_opens_in_headless_chromium(all_run, tmp_path):
    _, out = all_run
    page = (out / "report.html").resolve()
    text = page.read_text()
    assert "http://" not in text and "https://" not in text  # self-contained: nothing to fetch

    dom = chromium("--dump-dom", page.as_uri()).stdout
    audios = re.findall(r"<audio[^>]*src=\"data:audio/wav;base64,([A-Za-z0-9+/=]+)\"", dom)
    images = re.findall(r"<img[^>]*src=\"data:image/png;base64,", dom)
    assert len(audios) == 2  # seed 3 + greedy
    assert len(images) == 4  # waveform + spectrogram per WAV
    assert "Higgs Audio V2 evaluation" in dom and "ours/stock" in dom

    # every player's WAV really decodes in the browser: read its duration back from the DOM
    probe = tmp_path / "probe.html"
    probe.write_text("<html><body>" + "".join(
        f'<audio preload="auto" src="data:audio/wav;base64,{b64}"></audio>' for b64 in audios) +
        "<div id='r'>pending</div><script>const a=[...document.querySelectorAll('audio')];"
        "Promise.all(a.map(x=>new Promise(ok=>{x.onloadedmetadata=()=>ok(x.duration);x.onerror=()=>ok(-1)})))"
        ".then(d=>{document.getElementById('r').textContent='durations '+d.join(',')});</script></body></html>")
    probed = chromium("--virtual-time-budget=10000", "--dump-dom", probe.as_uri()).stdout
    durations = re.search(r"durations ([-\d.,]+)", probed)
    assert durations, probed[-500:]
    seconds = round(aligned_len(16) * 960 / inference.SAMPLE_RATE, 2)
    assert [round(float(d), 2) for d in durations.group(1).split(",")] == [seconds, seconds]

    shot, blank = tmp_path / "report.png", tmp_path / "blank.png"
    (tmp_path / "blank.html").write_text("<html><body></body></html>")
    chromium("--window-size=1100,2600", f"--screenshot={shot}", page.as_uri())
    chromium("--window-size=1100,2600", f"--screenshot={blank}", (tmp_path / "blank.html").as_uri())
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data[16:24]) == (1100, 2600)
    # a blank page of the same size compresses to almost nothing; text, tables and images do not
    assert len(data) > 10 * len(blank.read_bytes()), (len(data), len(blank.read_bytes()))
    shutil.copyfile(shot, Path(tempfile.gettempdir()) / "eval_report_screenshot.png")  # to look at by hand


def test_non_finite_audio_fails_the_performance_gate(tiny_engine, tmp_path, monkeypatch):
    """Performance mode decodes what it timed: NaN / Inf audio there must fail its "finite audio" check."""
    monkeypatch.setattr(tiny_engine, "decode_audio", fake_decoder("nan"))
    rc = eval_audio.main(["--mode", "performance", "--tokens", "11", "--repeats", "1",
                          "--output_dir", str(tmp_path)], engine=tiny_engine)
    assert rc == 1
    perf = json.loads((tmp_path / "performance.json").read_text())
    assert check_status(perf["checks"], "gives finite audio") == {"FAIL"}
    failed = json.loads((tmp_path / "summary.json").read_text())["failed_checks"]
    assert failed and all("finite audio" in name for name in failed)  # the only reason it failed


# --------------------------------------------------------------------------- odd input


def one_error_line(err: str, *needles):
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_tokens_beyond_memory_are_refused_before_running(tiny_engine, tmp_path, capsys):
    out = tmp_path / "new"
    rc = eval_audio.main(["--mode", "performance", "--tokens", "1000000000", "--output_dir", str(out)],
                         engine=tiny_engine)
    assert rc == 2
    one_error_line(capsys.readouterr().err, "--tokens 1000000000", "GiB")
    assert not out.exists()


@pytest.mark.parametrize("seed", [str(2**64), str(-(2**63) - 1)])
def test_seeds_outside_torch_range_are_refused(tmp_path, capsys, seed):
    assert eval_audio.main(["--seeds", "1", seed, "--output_dir", str(tmp_path / "o")]) == 2
    one_error_line(capsys.readouterr().err, f"--seeds {seed}")


def test_lone_surrogate_text_is_refused(tmp_path, capsys):
    assert eval_audio.main(["--text", "abc\udc80def", "--output_dir", str(tmp_path / "o")]) == 2
    one_error_line(capsys.readouterr().err, "--text", "not valid UTF-8")


def test_failed_load_leaves_no_output_folder(tmp_path, capsys):
    out = tmp_path / "new"
    assert eval_audio.main(["--model_path", str(tmp_path / "nope"), "--output_dir", str(out)]) == 2
    one_error_line(capsys.readouterr().err, "does not exist")
    assert not out.exists()


@pytest.mark.parametrize("mode, name, kind", [
    ("performance", "report.html", "dir"), ("performance", "summary.json", "dir"),
    ("performance", "performance.json", "dir"), ("precision", "precision.json", "dir"),
    ("precision", "audio", "file"),
])
def test_outputs_that_exist_as_the_other_kind(tiny_engine, tmp_path, capsys, mode, name, kind):
    (tmp_path / name).mkdir() if kind == "dir" else (tmp_path / name).write_text("mine")
    rc = eval_audio.main(["--mode", mode, "--tokens", "11", "--repeats", "1", "--seeds", "3",
                          "--output_dir", str(tmp_path)], engine=tiny_engine)
    assert rc == 2
    one_error_line(capsys.readouterr().err, name, "move it away")
    assert [p.name for p in tmp_path.iterdir()] == [name]  # refused before anything ran


def test_performance_alternates_and_reports_the_median_pair_ratio(tiny_engine, tmp_path, monkeypatch, capsys):
    """ours, stock, ours, stock: the ratio is the median of the per-pair ratios, with their spread; a load
    average above the core count is warned about; files honour the umask; no progress bar off a terminal."""
    calls = []
    # decode tokens/s of each call: warm-up first, then the three timed repeats
    speeds = {"ours": [1.0, 12.0, 40.0, 20.0], "stock": [1.0, 4.0, 10.0, 20.0]}

    def fake(name):
        def run(engine, prompt, params, n, seed):
            calls.append(name)
            tok_s = speeds[name][sum(c == name for c in calls) - 1]
            return eval_audio.TimedRun(frames=n, prefill_s=0.01, decode_s=(n - 1) / tok_s, decode_steps=n - 1,
                                       audio_decode_s=0.01, audio_s=0.1, finite=True, peak_device_memory_bytes=None,
                                       graph="off")
        return run

    monkeypatch.setattr(eval_audio, "run_ours", fake("ours"))
    monkeypatch.setattr(eval_audio, "run_stock", fake("stock"))
    monkeypatch.setattr(eval_audio.os, "getloadavg", lambda: (99.0, 99.0, 99.0))
    monkeypatch.setattr(eval_audio.os, "cpu_count", lambda: 2)
    old = os.umask(0o027)
    try:
        rc = eval_audio.main(["--mode", "performance", "--tokens", "11", "--repeats", "3",
                              "--output_dir", str(tmp_path)], engine=tiny_engine)
    finally:
        os.umask(old)
    err = capsys.readouterr().err
    assert rc == 0, err
    assert calls == ["ours", "stock"] * 4
    budget = json.loads((tmp_path / "performance.json").read_text())["budgets"][0]
    assert budget["ratio_pairs"] == [3.0, 4.0, 1.0]
    assert budget["ratio_tokens_per_s"] == 3.0  # the ratio of the medians would be 20 / 10 = 2
    assert budget["ratio_spread"] == {"min": 1.0, "max": 4.0}
    assert "warning: load average 99.0 exceeds the 2 cores" in err
    assert json.loads((tmp_path / "performance.json").read_text())["load_average"]["start"] == 99.0
    for name in ("performance.json", "summary.json", "report.html"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640, name
    assert "\r" not in err  # no tqdm bar: stderr is not a terminal
    assert "3.00×</b> (1.00–4.00)" in (tmp_path / "report.html").read_text(encoding="utf-8")
