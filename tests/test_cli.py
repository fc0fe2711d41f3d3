"""inference.py as a user runs it: files, determinism, retries, batches, bad input."""

import json
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf

import inference
from conftest import ROOT

SHORT = "Hello world."


def cli(tiny_ckpt, out_dir, *extra):
    model_dir, tok_dir = tiny_ckpt
    return ["--model_path", str(model_dir), "--tokenizer_path", str(tok_dir), "--device", "cpu",
            "--output_dir", str(out_dir), "--max_new_tokens", "120", *extra]


def run_cli(tiny_ckpt, out_dir, *extra):
    return inference.main(cli(tiny_ckpt, out_dir, *extra))


def test_writes_wav_and_sidecar(tiny_ckpt, tmp_path, capsys):
    assert run_cli(tiny_ckpt, tmp_path, "--text", SHORT, "--seed", "7") == 0
    wav = tmp_path / "output_7.wav"
    info = sf.info(str(wav))
    assert (info.samplerate, info.channels, info.subtype, info.format) == (24000, 1, "PCM_16", "WAV")
    side = json.loads(wav.with_suffix(".json").read_text())
    assert side["text"] == SHORT and side["seed_requested"] == 7 and side["usable"] is True
    assert side["parameters"]["temperature"] == 0.3 and side["parameters"]["top_k"] == 50
    assert side["parameters"]["ras_win_len"] == 7 and side["parameters"]["dtype"] == "float32"
    assert side["attempts"][-1]["outcome"] == "ok" and side["attempts"][-1]["seed"] == side["seed_used"]
    assert side["frames"] >= 10 and side["duration_s"] == pytest.approx(info.frames / 24000, abs=1e-3)
    assert side["rms"] > 0 and 0 < side["peak"]
    for key in ("prefill_s", "decode_s", "audio_decode_s", "frames_per_s", "real_time_factor", "bandwidth_gb_s"):
        assert key in side["timings"]
    log = capsys.readouterr().out
    for expected in ("Device: cpu", "parameters", "Input text: 'Hello world.'", "Input tokens:", "frames/s",
                     "Audio shape:", "valid frames", "Real-time factor", "Achieved bandwidth", f"Saved: {wav}"):
        assert expected in log
    assert not list(tmp_path.glob(".*tmp"))


def test_same_seed_same_bytes_other_seed_differs(tiny_ckpt, tmp_path):
    # seed 9: past seed 5's retries (5..8), so no attempt of the two runs shares a seed
    for sub, seed in (("a", "5"), ("b", "5"), ("c", "9")):
        assert run_cli(tiny_ckpt, tmp_path / sub, "--text", SHORT, "--seed", seed) == 0
    a, b, c = ((tmp_path / s / f"output_{n}.wav").read_bytes() for s, n in (("a", 5), ("b", 5), ("c", 9)))
    assert a == b
    assert a != c


def test_greedy_is_reproducible(tiny_ckpt, tmp_path):
    for sub in ("a", "b"):
        # greedy never closes on the random tiny model: a text that needs more than 120 frames is not a runaway
        assert run_cli(tiny_ckpt, tmp_path / sub, "--text", "Hello world, how are you today, my friend?",
                       "--temperature", "0", "--output", "g.wav") == 0
    assert (tmp_path / "a" / "g.wav").read_bytes() == (tmp_path / "b" / "g.wav").read_bytes()


def test_unusable_first_attempt_is_retried_with_next_seed(tiny_ckpt, tmp_path, monkeypatch):
    real_generate = inference.Engine.generate
    calls = []

    def first_attempt_ends_early(self, prompts, params, seeds, **kw):
        gens, timings = real_generate(self, prompts, params, seeds, **kw)
        calls.append(seeds[0])
        if len(calls) == 1:  # as if EOS came after 5 frames
            gens = [inference.Generation(codes=g.codes[:5], finished=True, seed=g.seed) for g in gens]
        return gens, timings

    monkeypatch.setattr(inference.Engine, "generate", first_attempt_ends_early)
    assert run_cli(tiny_ckpt, tmp_path, "--text", SHORT, "--seed", "11") == 0
    side = json.loads((tmp_path / "output_11.json").read_text())
    assert calls[:2] == [11, 12] and calls == list(range(11, 11 + len(calls)))
    assert [a["seed"] for a in side["attempts"]] == calls
    assert side["attempts"][0]["outcome"].startswith("too short: 5 frames")
    assert side["attempts"][-1]["outcome"] == "ok" and side["seed_used"] == calls[-1]


def test_all_attempts_unusable_keeps_best_and_fails(tiny_ckpt, tmp_path, capsys):
    long_text = " ".join(["word"] * 70)  # needs >= 10 s of audio; 30 frames give 0.8 s
    # --chunk_words 0: one text judged as a whole (70 words would otherwise be spoken as two chunks)
    rc = run_cli(tiny_ckpt, tmp_path, "--text", long_text, "--max_new_tokens", "30", "--retries", "2",
                 "--chunk_words", "0")
    assert rc == 1
    side = json.loads((tmp_path / "output_1.json").read_text())
    assert side["usable"] is False and len(side["attempts"]) == 3
    assert all("too short for the text" in a["outcome"] for a in side["attempts"])
    assert (tmp_path / "output_1.wav").is_file()
    err = capsys.readouterr().err
    assert "every attempt was unusable" in err


def test_judge_rules():
    codes = np.zeros((40, 8))
    speech = (0.1 * np.sin(np.arange(24000) / 10)).astype(np.float32)
    assert inference.judge_attempt("Two words", codes, speech) is None
    assert "too short: 8 frames" in inference.judge_attempt("Hi", codes[:8], speech)
    assert "silent" in inference.judge_attempt("Hi", codes, np.zeros(24000, np.float32))
    assert "non-finite" in inference.judge_attempt("Hi", codes, np.full(24000, np.nan, np.float32))
    assert "too short for the text" in inference.judge_attempt("天" * 14, codes, speech[:24000 // 4])
    assert inference.speech_units("Hello 世界 again") == 4


def test_text_file_batches(tiny_ckpt, tmp_path):
    text_file = tmp_path / "lines.txt"
    text_file.write_text("First line.\n第二行。\n\nThird line here.\n", encoding="utf-8")
    out = tmp_path / "out"
    assert run_cli(tiny_ckpt, out, "--text_file", str(text_file), "--batch_size", "2", "--seed", "3") == 0
    names = sorted(p.name for p in out.glob("*.wav"))
    assert names == ["output_1_3.wav", "output_2_3.wav", "output_4_3.wav"]
    assert json.loads((out / "output_2_3.json").read_text())["text"] == "第二行。"


def test_reference_audio_voice_cloning(tiny_ckpt, tmp_path):
    ref = tmp_path / "ref.wav"
    t = np.arange(16000 * 1.3) / 16000
    sf.write(str(ref), (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000)
    assert run_cli(tiny_ckpt, tmp_path, "--text", SHORT, "--ref_audio", str(ref), "--ref_text", "A voice.") == 0
    side = json.loads((tmp_path / "output_1.json").read_text())
    assert side["parameters"]["ref_audio"] == str(ref) and side["usable"]


def test_boson_encode_padding_rule(tiny_engine):
    """Clips whose acoustic path comes out one frame short are re-encoded with 320 samples per side."""
    import torch

    for seconds in (1.5, 2.0, 1.23):
        wave = np.random.default_rng(0).standard_normal(int(24000 * seconds)).astype(np.float32) * 0.1
        codes = tiny_engine.encode_audio(wave)
        semantic_frames = tiny_engine.audio_tokenizer.encoder_semantic(
            tiny_engine.audio_tokenizer._extract_semantic_features(torch.from_numpy(wave)[None, None]).transpose(1, 2)
        ).shape[2]
        assert codes.shape == (8, semantic_frames)


# ---------------------------------------------------------------- bad input, as a user sees it

def run_proc(args, cwd=ROOT, timeout=240):
    return subprocess.run([sys.executable, "inference.py", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def assert_clean_failure(proc, *needles):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("args, needle", [
    (["--text", ""], "--text is empty"),
    (["--text", "   "], "--text is empty"),
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--top_p", "0"], "--top_p must be in (0, 1]"),
    (["--top_p", "1.2"], "--top_p must be in (0, 1]"),
    (["--top_k", "-3"], "--top_k must be >= 0"),
    (["--max_new_tokens", "0"], "--max_new_tokens must be >= 1"),
    (["--model_path", "/nonexistent/model"], "does not exist"),
    (["--output", "../x.wav"], "--output"),
])
def test_bad_arguments(tiny_ckpt, tmp_path, args, needle):
    proc = run_proc(cli(tiny_ckpt, tmp_path / "out", *args))
    assert_clean_failure(proc, needle)
    assert not list(tmp_path.rglob("*.wav"))


def test_bad_files(tiny_ckpt, tmp_path):
    model_dir, tok_dir = tiny_ckpt
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café\n".encode("latin-1"))
    assert_clean_failure(run_proc(cli(tiny_ckpt, tmp_path / "o", "--text_file", str(latin1))), "not UTF-8")

    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF....not audio")
    assert_clean_failure(run_proc(cli(tiny_ckpt, tmp_path / "o", "--ref_audio", str(broken))), "--ref_audio")

    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert_clean_failure(run_proc(cli(tiny_ckpt, a_file / "sub")), "not writable")

    no_tok = run_proc(cli(tiny_ckpt, tmp_path / "o") + ["--tokenizer_path", str(tmp_path / "none")])
    assert_clean_failure(no_tok, "audio tokenizer folder")

    original = tmp_path / "original"
    shutil.copytree(model_dir, original)
    config = json.loads((original / "config.json").read_text())
    config["model_type"] = "higgs_audio"
    (original / "config.json").write_text(json.dumps(config))
    proc = run_proc(cli(tiny_ckpt, tmp_path / "o") + ["--model_path", str(original)])
    assert_clean_failure(proc, f"python3 convert_weights.py --kind model --src {original} --dst {original}-native")

    partial = tmp_path / "partial"
    shutil.copytree(model_dir, partial)
    (partial / "model-00003-of-00003.safetensors").unlink()
    proc = run_proc(cli(tiny_ckpt, tmp_path / "o") + ["--model_path", str(partial)])
    assert_clean_failure(proc, "missing model-00003-of-00003.safetensors")
    assert not list((tmp_path / "o").rglob("*.wav"))


def test_ctrl_c_exits_cleanly(tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "inference.py", *cli(tiny_ckpt, out, "--text", SHORT)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    for line in proc.stdout:
        if "Loading generation model" in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "Traceback" not in err and "interrupted" in err
    assert not list(out.rglob("*.wav")) and not list(out.rglob(".*tmp"))
