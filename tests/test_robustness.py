"""Zero tracebacks: odd arguments, texts, files and numbers get exit 2 and one `error:` line.

The CLI runs in-process (inference.main with captured output) and the tiny engine is loaded once
(the session fixture), so a property-based example costs milliseconds to a second, not a subprocess.
"""

import contextlib
import io
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import inference

try:
    from hypothesis import HealthCheck, event, given, settings
    from hypothesis import strategies as st
except ImportError:  # requirements-dev.txt brings it; without it only the property tests skip
    given = None

SHORT = "Hello world."


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def tiny_loader(tiny_ckpt, tiny_engine, monkeypatch):
    """inference.load_engine returns the session's tiny engine for the tiny paths; any other path goes to the
    real loader (missing or corrupted folders must fail there, as for a user)."""
    real = inference.load_engine
    tiny = tuple(str(p) for p in tiny_ckpt)

    def load(model_path, tokenizer_path, *args, **kwargs):
        if (str(model_path), str(tokenizer_path)) == tiny:
            return tiny_engine
        return real(model_path, tokenizer_path, *args, **kwargs)

    monkeypatch.setattr(inference, "load_engine", load)
    return tiny_ckpt


def base_args(tiny_ckpt, out_dir, *extra, max_new_tokens="40"):
    model_dir, tok_dir = tiny_ckpt
    return ["--model_path", str(model_dir), "--tokenizer_path", str(tok_dir), "--device", "cpu",
            "--dtype", "float32", "--output_dir", str(out_dir), "--max_new_tokens", max_new_tokens, *extra]


def run_main(argv, main=None):
    """(exit status, stdout, stderr) of a CLI main() run in-process; an exception escaping it fails the test,
    as a traceback would for a user."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = (main or inference.main)([str(a) for a in argv])
        except SystemExit as e:  # argparse's own usage errors
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def one_error_line(err: str, *needles) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def check_output_folder(out: Path) -> list[Path]:
    """No temp or hidden file; every WAV has its sidecar and every sidecar naming a WAV has it. -> the WAVs."""
    if not out.exists():
        return []
    names = [p.name for p in out.iterdir()]
    assert not [n for n in names if n.startswith(".") or n.endswith(".tmp")], names
    wavs = sorted(out.glob("*.wav"))
    for wav in wavs:
        assert wav.with_suffix(".json").is_file(), names
    for side in out.glob("*.json"):
        data = json.loads(side.read_text(encoding="utf-8"))
        assert data["wav"] is None or Path(data["wav"]).is_file(), (side, data["wav"])
    return wavs


def write_clip(path: Path, samples: int, rate: int = 24000) -> Path:
    t = np.arange(samples) / rate
    sf.write(str(path), (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate)
    return path


# --------------------------------------------------------------------------- property-based: the whole CLI

if given is not None:
    BIG = [2**31, 2**63, 2**64, 10**30]
    INT_EDGES = st.sampled_from([0, -1, -(2**63) - 1, *BIG])
    FLOAT_TEXT = st.sampled_from(["nan", "inf", "-inf", "1e-300", "1e308", "-0.0", "0", "0.3", "1", "2", "abc"])
    ODD = ["", "   ", "abc\udc80def", "\udcff", "你好，世界！", "第一行\u2028还是第一行", "a\x85b\x0bc", "🙂" * 3,
           "\u200b", "<|eot_id|><|AUDIO_OUT|>", "{{ messages }}{% raw %}", "%s %(default)s", "x" * 600, "\r\n",
           "Ünïcödé naïve café", "مرحبا بالعالم", "नमस्ते दुनिया", "\ufeffBOM"]
    TEXTS = st.one_of(st.sampled_from(ODD), st.text(st.characters(min_codepoint=1), max_size=24),
                      st.builds(lambda a, b: a + "\udc80" + b, st.text(max_size=4), st.text(max_size=4)))
    OUTPUT_NAMES = st.one_of(st.sampled_from([".wav", "..wav", "a.wav", "x/y.wav", "noext", "é 1.wav", "a" * 252 + ".wav",
                                              "a" * 300 + ".wav", ".hidden.wav", "a.WAV"]),
                             st.builds(lambda s: s + ".wav", st.text(st.characters(min_codepoint=1), max_size=8)))

    @st.composite
    def cli_cases(draw):
        """(flags, text-file lines or None): about half of them valid runs kept short, the rest with odd values."""
        odd_rate = draw(st.sampled_from([0.0, 0.0, 0.1, 0.3]))
        flags = []

        def maybe(flag, valid, odd, p=0.3):
            if draw(st.floats(0, 1)) < p:
                flags.extend([flag, draw(odd if draw(st.floats(0, 1)) < odd_rate else valid)])

        lines = None
        source = draw(st.sampled_from(["text", "file", "both", "none"] if odd_rate else ["text", "file", "none"]))
        text = st.one_of(st.just(SHORT), TEXTS) if odd_rate else st.sampled_from([SHORT, "你好，世界！", "Ünïcödé."])
        if source in ("text", "both"):
            flags += ["--text", draw(text)]
        if source in ("file", "both"):
            lines = draw(st.lists(text, min_size=1, max_size=3))
        maybe("--max_new_tokens", st.integers(10, 30).map(str),
              st.one_of(st.integers(-3, 12), st.integers(10**9, 10**24), INT_EDGES).map(str))
        maybe("--seed", st.integers(-3, 10**6).map(str),
              st.one_of(INT_EDGES.map(str), st.sampled_from([str(2**64 - 1), str(-(2**63)), str(2**64 - 3)])))
        maybe("--retries", st.integers(0, 1).map(str), st.sampled_from(["-1", str(2**65), "x"]))
        maybe("--temperature", st.sampled_from(["0", "0.3", "1", "1e-300", "1e308"]), FLOAT_TEXT)
        maybe("--top_p", st.sampled_from(["0.5", "0.95", "1"]), FLOAT_TEXT)
        maybe("--top_k", st.one_of(st.integers(0, 60), st.sampled_from(BIG)).map(str),
              st.integers(-5, -1).map(str))
        maybe("--ras_win_len", st.sampled_from(["0", "1", "7", str(10**12)]), st.sampled_from(["-5", "1.5"]))
        maybe("--ras_max_repeat", st.one_of(st.integers(0, 3), st.sampled_from(BIG)).map(str),
              st.sampled_from(["-1"]))
        maybe("--batch_size", st.sampled_from(["1", "2", str(10**12)]), st.sampled_from(["0", "-1", "2.5"]))
        maybe("--scene", st.sampled_from(["", "A quiet room."]), TEXTS, p=0.2)
        maybe("--output", st.sampled_from(["a.wav", "é 1.wav", "a" * 200 + ".wav"]), OUTPUT_NAMES, p=0.3)
        # reference clip, written by the test: 1 s of tone; odd: 1 ms, not audio at all, or missing
        ref = draw(st.sampled_from([None, None, None, 24000]))
        if draw(st.floats(0, 1)) < odd_rate:
            ref = draw(st.sampled_from([24, "garbage", "missing"]))
        if ref is not None:
            maybe("--ref_text", st.just("A voice."), TEXTS, p=0.5)
        return flags, lines, ref

    @settings(max_examples=30, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(case=cli_cases())
    def test_no_traceback_for_any_arguments(tiny_loader, tmp_path, case):
        flags, lines, ref = case
        work = Path(tempfile.mkdtemp(dir=tmp_path))
        out = work / "out"  # not there yet: a refused run must not create it
        extra = list(flags)
        if ref is not None:
            clip = work / "ref.wav"
            if isinstance(ref, int):
                write_clip(clip, ref)
            elif ref == "garbage":
                clip.write_bytes(b"RIFF....not audio")
            extra += ["--ref_audio", str(clip)]
        if lines is not None:
            (work / "lines.txt").write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
            extra += ["--text_file", str(work / "lines.txt")]
        # one retry and 24 frames by default keep an example well under a second; the flags may override them
        rc, stdout, err = run_main(base_args(tiny_loader, out, "--retries", "1", *extra, max_new_tokens="24"))
        event(f"exit {rc}")  # pytest --hypothesis-show-statistics: how many examples got how far
        assert rc in (0, 1, 2, 130), (rc, err)
        assert "Traceback" not in err and "Traceback" not in stdout, err
        wavs = check_output_folder(out)
        if rc == 2 and "usage:" not in err:  # argparse's own errors print the usage first
            one_error_line(err)
            assert not out.exists(), list(out.iterdir())
        if rc == 0:
            assert wavs, stdout


def test_property_tests_can_run():
    """The property test above needs hypothesis (requirements-dev.txt): say so rather than pass silently."""
    if given is None:
        pytest.skip("hypothesis is not installed: pip install -r requirements-dev.txt")


# --------------------------------------------------------------------------- numbers at the edges


def test_max_new_tokens_beyond_memory_is_refused_before_allocating(tiny_loader, tmp_path, monkeypatch):
    created = []
    real_create = inference.DecodeBuffers.create
    monkeypatch.setattr(inference.DecodeBuffers, "create",
                        classmethod(lambda cls, *a, **k: created.append(a) or real_create(*a, **k)))
    out = tmp_path / "out"
    rc, _, err = run_main(base_args(tiny_loader, out, "--text", SHORT, max_new_tokens="1000000000"))
    assert rc == 2
    one_error_line(err, "--max_new_tokens 1000000000", "GiB", "at most about")
    assert not created and not out.exists()


def test_decode_memory_estimate_is_what_a_decode_allocates(tiny_engine):
    """The estimate behind the refusal is the bytes a context really holds (cache + buffers) plus the noise blocks."""
    params = inference.SamplingParams(max_new_tokens=300)
    prompt = tiny_engine.build_prompt(SHORT)
    tiny_engine.generate([prompt, prompt], params, [1, 1])
    ctx = tiny_engine.decode_context
    held = sum(t.nbytes for layer in ctx.cache.layers for t in (layer.keys, layer.values))
    held += sum(v.nbytes for v in vars(ctx.bufs).values() if hasattr(v, "nbytes"))
    cfg = tiny_engine.config
    batch = 2
    noise_blocks = 2 * inference.NOISE_CHUNK * batch * 2 * cfg.num_codebooks * cfg.codebook_size * 4  # now + next
    device, host = tiny_engine.decode_memory_bytes(2, len(prompt.input_ids), 300, params)
    assert device == held + noise_blocks
    assert host == ctx.bufs.attention_mask.nbytes + ctx.bufs.out_codes.nbytes + ctx.bufs.window.nbytes


@pytest.mark.parametrize("seed, retries", [(-(2**63) - 1, 0), (2**64, 0), (2**64 - 2, 3), (0, 2**65)])
def test_seed_outside_torch_range_is_refused(tiny_loader, tmp_path, seed, retries):
    rc, _, err = run_main(base_args(tiny_loader, tmp_path / "o", "--text", SHORT, "--seed", seed,
                                    "--retries", retries))
    assert rc == 2
    one_error_line(err, "--retries" if retries > 2**64 else f"--seed {seed}")


@pytest.mark.parametrize("seed", [-(2**63), 2**64 - 1])
def test_seeds_at_the_ends_of_torch_range_run(tiny_loader, tmp_path, seed):
    rc, _, err = run_main(base_args(tiny_loader, tmp_path / "o", "--text", SHORT, "--seed", seed, "--retries", 0))
    assert rc in (0, 1), err
    assert (tmp_path / "o" / f"output_{seed}.json").is_file()


def test_huge_ras_window_is_capped_without_changing_codes(tiny_engine):
    prompt = tiny_engine.build_prompt(SHORT)
    normal = inference.SamplingParams(max_new_tokens=40, ras_win_len=500)
    huge = inference.SamplingParams(max_new_tokens=40, ras_win_len=10**12)
    a = tiny_engine.generate([prompt], normal, [3], forced_frames=40)[0][0].codes
    b = tiny_engine.generate([prompt], huge, [3], forced_frames=40)[0][0].codes
    assert (a == b).all()


def test_huge_ras_threshold_acts_as_one_above_the_window(tiny_engine):
    prompt = tiny_engine.build_prompt(SHORT)
    above = inference.SamplingParams(max_new_tokens=40, ras_win_len=3, ras_win_max_num_repeat=4)
    huge = inference.SamplingParams(max_new_tokens=40, ras_win_len=3, ras_win_max_num_repeat=2**64)
    a = tiny_engine.generate([prompt], above, [3], forced_frames=40)[0][0].codes
    b = tiny_engine.generate([prompt], huge, [3], forced_frames=40)[0][0].codes
    assert (a == b).all()


# --------------------------------------------------------------------------- audio


def test_too_short_reference_clip_names_the_minimum(tiny_loader, tiny_engine, tmp_path):
    need = tiny_engine.min_audio_samples()
    rc, _, err = run_main(base_args(tiny_loader, tmp_path / "o", "--text", SHORT,
                                    "--ref_audio", write_clip(tmp_path / "1ms.wav", 24)))
    assert rc == 2
    one_error_line(err, "--ref_audio", "1.0 ms", f"at least {need} samples")
    assert not (tmp_path / "o").exists()


def test_min_audio_samples_is_where_the_codec_starts_to_work(tiny_engine):
    """Computed from the conv stack; checked here against the codec itself on both sides of the edge."""
    need = tiny_engine.min_audio_samples()
    wave = np.random.default_rng(0).standard_normal(need + 3000).astype(np.float32) * 0.1
    for n in (need, need + 1, need + 479, need + 2999):
        assert tiny_engine.encode_audio(wave[:n]).shape[1] >= 1
    with pytest.raises(RuntimeError):
        tiny_engine.encode_audio(wave[: need - 1])


# --------------------------------------------------------------------------- file system


def test_output_naming_an_existing_folder_is_refused(tiny_loader, tmp_path):
    out = tmp_path / "o"
    (out / "speech.wav").mkdir(parents=True)
    rc, _, err = run_main(base_args(tiny_loader, out, "--text", SHORT, "--output", "speech.wav"))
    assert rc == 2
    one_error_line(err, "is a folder")
    (out / "speech.wav").rmdir()
    (out / "output_1.json").mkdir()  # the sidecar's name counts too
    rc, _, err = run_main(base_args(tiny_loader, out, "--text", SHORT))
    assert rc == 2
    one_error_line(err, "output_1.json is a folder")
    assert sorted(p.name for p in out.iterdir()) == ["output_1.json"]


def test_output_name_too_long_for_the_file_system(tiny_loader, tmp_path):
    name_max = os.pathconf(tmp_path, "PC_NAME_MAX")
    out = tmp_path / "o"
    too_long = "a" * (name_max - len(".wav") + 1) + ".wav"  # the name fits only without its extension
    rc, _, err = run_main(base_args(tiny_loader, out, "--text", SHORT, "--output", too_long))
    assert rc == 2
    one_error_line(err, f"allows {name_max}")
    longest = "a" * (name_max - len(".json")) + ".wav"  # its .json sidecar is exactly name_max bytes
    rc, _, err = run_main(base_args(tiny_loader, out, "--text", SHORT, "--output", longest))
    assert rc in (0, 1), err
    assert check_output_folder(out) == [out / longest]


@pytest.mark.parametrize("name", [".wav", ".x.wav"])
def test_output_must_not_be_a_hidden_file(tiny_loader, tmp_path, name):
    rc, _, err = run_main(base_args(tiny_loader, tmp_path / "o", "--text", SHORT, "--output", name))
    assert rc == 2
    one_error_line(err, "--output", "leading dot")


def test_files_honour_the_umask(tiny_loader, tmp_path):
    old = os.umask(0o027)
    try:
        rc, _, err = run_main(base_args(tiny_loader, tmp_path / "o", "--text", SHORT))
    finally:
        os.umask(old)
    assert rc in (0, 1), err
    for name in ("output_1.wav", "output_1.json"):
        assert (tmp_path / "o" / name).stat().st_mode & 0o777 == 0o640, name


def test_failed_run_leaves_no_output_folder(tiny_ckpt, tmp_path):
    out = tmp_path / "new" / "deeper"
    rc, _, err = run_main(["--text", SHORT, "--model_path", tmp_path / "no-model", "--tokenizer_path",
                           tiny_ckpt[1], "--output_dir", out, "--device", "cpu"])
    assert rc == 2
    one_error_line(err, "does not exist")
    assert not (tmp_path / "new").exists()


def test_unwritable_output_dir_is_still_found_early(tiny_ckpt, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    rc, _, err = run_main(["--text", SHORT, "--model_path", tiny_ckpt[0], "--tokenizer_path", tiny_ckpt[1],
                           "--output_dir", a_file / "sub"])
    assert rc == 2
    one_error_line(err, "not writable", "is a file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # the probe left nothing


# --------------------------------------------------------------------------- text


@pytest.mark.parametrize("flag", ["--text", "--scene", "--ref_text", "--output_dir"])
def test_lone_surrogate_in_a_string_flag(tiny_loader, tmp_path, flag):
    values = {"--text": SHORT, "--output_dir": tmp_path / "o"}
    values[flag] = "abc\udc80def"
    extra = ["--ref_audio", write_clip(tmp_path / "ref.wav", 24000)] if flag == "--ref_text" else []
    argv = base_args(tiny_loader, values["--output_dir"], "--text", values["--text"], *extra)
    if flag in ("--scene", "--ref_text"):
        argv += [flag, values[flag]]
    rc, _, err = run_main(argv)
    assert rc == 2
    one_error_line(err, flag, "not valid UTF-8", "character 4")


def test_text_and_text_file_together_are_refused(tiny_loader, tmp_path):
    lines = tmp_path / "lines.txt"
    lines.write_text("One.\n", encoding="utf-8")
    rc, _, err = run_main(base_args(tiny_loader, tmp_path / "o", "--text", SHORT, "--text_file", lines))
    assert rc == 2
    one_error_line(err, "--text and --text_file")
    help_text = inference.build_parser().format_help()
    assert inference.DEFAULT_TEXT[:40] in " ".join(help_text.split())  # --help still shows the default text


def test_line_numbers_follow_newlines_only(tiny_loader, tmp_path):
    lines = tmp_path / "lines.txt"
    # U+2028, \x0b, \x0c, \x1c and \x85 are inside lines 1-2; \r\n ends line 2; line 3 is empty
    lines.write_bytes("One\u2028still one\x0b\x0c.\r\nTwo\x1c\x85 too.\r\n\nFour.\n".encode("utf-8"))
    out = tmp_path / "o"
    rc, stdout, err = run_main(base_args(tiny_loader, out, "--text_file", lines, "--retries", "0"))
    assert rc in (0, 1), err
    assert sorted(p.name for p in check_output_folder(out)) == ["output_1_1.wav", "output_2_1.wav", "output_4_1.wav"]
    assert json.loads((out / "output_2_1.json").read_text(encoding="utf-8"))["text"] == "Two\x1c\x85 too."


def test_full_width_punctuation_is_not_a_word():
    assert inference.speech_units("你好，世界！") == inference.speech_units("你好世界") == 4
    assert inference.speech_units("第二行。") == 3
    assert inference.speech_units("カ・ナ") == 2  # the katakana middle dot sits inside the CJK range
    assert inference.speech_units("Hello , world — ! 2") == 3  # letters and digits make words


# --------------------------------------------------------------------------- what the console says


def test_attempt_lines_name_their_line_and_a_missing_eos(tiny_loader, tmp_path, monkeypatch):
    real_generate = inference.Engine.generate

    def no_eos(self, prompts, params, seeds, **kw):
        gens, timings = real_generate(self, prompts, params, seeds, **kw)
        return [inference.Generation(codes=g.codes, finished=False, seed=g.seed) for g in gens], timings

    monkeypatch.setattr(inference.Engine, "generate", no_eos)
    lines = tmp_path / "lines.txt"
    lines.write_text("First line.\n\nThird line.\n", encoding="utf-8")
    rc, stdout, err = run_main(base_args(tiny_loader, tmp_path / "o", "--text_file", lines, "--batch_size", "2",
                                         "--retries", "0"))
    assert rc in (0, 1), err
    attempts = [line for line in stdout.splitlines() if "attempt 1 (seed 1)" in line]
    assert [line.split(":")[0] for line in attempts] == ["line 1", "line 3"]
    assert all("no EOS within --max_new_tokens 40" in line for line in attempts), attempts


def test_no_progress_bar_off_a_terminal(tiny_loader, tmp_path):
    rc, _, err = run_main(base_args(tiny_loader, tmp_path / "o", "--text", SHORT))
    assert rc in (0, 1) and "\r" not in err and "frame/s" not in err, err


# --------------------------------------------------------------------------- corrupted checkpoints, real loader


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _json_edit(name: str, edit):
    def apply(model: Path, tok: Path) -> None:
        data = json.loads((model / name).read_text())
        (model / name).write_text(json.dumps(edit(data)))
    return apply


def _garble_shard_header(model: Path, tok: Path) -> None:
    shard = model / "model-00001-of-00003.safetensors"
    data = bytearray(shard.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    data[8: 8 + n] = b"\xff" * n
    shard.write_bytes(bytes(data))


def _fields(**changes):
    return lambda c: {**c, **changes}


LOADER_HARDENING = pytest.mark.xfail(strict=True, reason="loader hardening in progress")
CORRUPTIONS = {
    "config truncated": lambda m, t: _truncate(m / "config.json"),
    "config garbled": lambda m, t: (m / "config.json").write_bytes(b"\xff\xfe{garbage"),
    "config a JSON list": lambda m, t: (m / "config.json").write_text("[1, 2]"),
    "config null": lambda m, t: (m / "config.json").write_text("null"),
    "config hidden_size a string": _json_edit("config.json", _fields(hidden_size="64")),
    "config sizes that do not fit the weights": _json_edit("config.json", _fields(hidden_size=128)),
    "index truncated": lambda m, t: _truncate(m / "model.safetensors.index.json"),
    "index weight_map a list": _json_edit("model.safetensors.index.json", lambda d: {**d, "weight_map": []}),
    "index total_size not a number": _json_edit(
        "model.safetensors.index.json", lambda d: {**d, "metadata": {"total_size": "many"}}),
    "shard truncated header": lambda m, t: _truncate(m / "model-00002-of-00003.safetensors", 0.0001),
    "shard garbled header": _garble_shard_header,
    "chat template syntax error": lambda m, t: (m / "chat_template.jinja").write_text("{% if %}{{ oops"),
    "tokenizer.json garbled": lambda m, t: _truncate(m / "tokenizer.json"),
    "codec config a JSON list": lambda m, t: (t / "config.json").write_text("[]"),
    "codec weights truncated": lambda m, t: _truncate(t / "model.safetensors"),
    "preprocessor_config not JSON": lambda m, t: (t / "preprocessor_config.json").write_text("sampling_rate: 24000"),
}
STILL_TRACEBACK = set()  # corruption names that the loader does not turn into one line yet


@pytest.mark.parametrize("name", [pytest.param(n, marks=LOADER_HARDENING) if n in STILL_TRACEBACK else n
                                  for n in CORRUPTIONS])
def test_corrupted_checkpoint_gives_one_error_line(tiny_ckpt, tmp_path, name):
    model, tok = tmp_path / "model", tmp_path / "tokenizer"
    shutil.copytree(tiny_ckpt[0], model)
    shutil.copytree(tiny_ckpt[1], tok)
    CORRUPTIONS[name](model, tok)
    out = tmp_path / "out"
    rc, _, err = run_main(["--text", SHORT, "--model_path", model, "--tokenizer_path", tok, "--device", "cpu",
                           "--dtype", "float32", "--output_dir", out, "--max_new_tokens", "20"])
    assert rc == 2, err
    one_error_line(err)
    assert not out.exists()
