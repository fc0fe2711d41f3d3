"""quality.py, eval_audio.py --mode quality, inference.py --asr_check and download.sh --eval_models.

Normalisation and scoring are checked on known strings (Seed-TTS-eval's rules: run_wer.py process_one).
The models are tiny random Whisper and WavLMForXVector checkpoints built here with the real transformers
classes and written in the real repos' on-disk formats (built once per session), so the plumbing runs end
to end; a stub transcriber stands in where a test needs a known transcript.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

import eval_audio  # noqa: E402
import hub as hubpy  # noqa: E402
import inference  # noqa: E402
import quality  # noqa: E402
from local_hub import LocalHub  # noqa: E402


WHISPER_CORPUS = [
    "the quick brown fox jumps over the lazy dog near the river bank",
    "have you ever wondered why the sky looks blue during the day",
    "今天天气很好，我们一起去公园散步吧。四是四，十是十。",
]


def build_tiny_whisper(out: Path, seed: int = 0) -> Path:
    """WhisperForConditionalGeneration + WhisperProcessor files as openai/whisper-* has them, tiny and random:
    byte-level BPE with Whisper's special, language, task and timestamp tokens; 16 mel bins."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import (GenerationConfig, WhisperConfig, WhisperFeatureExtractor,
                              WhisperForConditionalGeneration, WhisperTokenizer)

    out.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(WHISPER_CORPUS * 4, trainer=trainers.BpeTrainer(
        vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    model = json.loads(bpe.to_str())["model"]
    vocab = dict(model["vocab"], **{"<|endoftext|>": len(model["vocab"])})
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    special = ["<|startoftranscript|>", "<|en|>", "<|zh|>", "<|translate|>", "<|transcribe|>", "<|startoflm|>",
               "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>"]
    tok = WhisperTokenizer(vocab=vocab, merges=merges, additional_special_tokens=special)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ["<|endoftext|>", *special]}
    eot = ids["<|endoftext|>"]
    config = WhisperConfig(vocab_size=len(tok), num_mel_bins=16, d_model=16, encoder_layers=1, decoder_layers=1,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                           decoder_ffn_dim=32, max_source_positions=1500, max_target_positions=64,
                           decoder_start_token_id=ids["<|startoftranscript|>"], eos_token_id=eot, bos_token_id=eot,
                           pad_token_id=eot)
    torch.manual_seed(seed)
    whisper = WhisperForConditionalGeneration(config)
    whisper.generation_config = GenerationConfig(
        decoder_start_token_id=ids["<|startoftranscript|>"], eos_token_id=eot, pad_token_id=eot, bos_token_id=eot,
        max_length=16, is_multilingual=True, no_timestamps_token_id=ids["<|notimestamps|>"],
        prev_sot_token_id=ids["<|startofprev|>"], max_initial_timestamp_index=50,
        lang_to_id={"<|en|>": ids["<|en|>"], "<|zh|>": ids["<|zh|>"]},
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]})
    whisper.save_pretrained(out)
    tok.save_pretrained(out)
    WhisperFeatureExtractor(feature_size=16).save_pretrained(out)
    return out


def build_tiny_wavlm_sv(out: Path, seed: int = 0) -> Path:
    """WavLMForXVector as microsoft/wavlm-base-plus-sv has it: config.json, preprocessor_config.json and a
    pytorch_model.bin with the legacy weight_g / weight_v names of its positional convolution; tiny, random."""
    import torch
    from transformers import Wav2Vec2FeatureExtractor, WavLMConfig, WavLMForXVector

    out.mkdir(parents=True, exist_ok=True)
    config = WavLMConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                         conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                         tdnn_dim=(16, 16, 16, 16, 32), xvector_output_dim=8, num_buckets=32, max_bucket_distance=80)
    torch.manual_seed(seed)
    state = WavLMForXVector(config).state_dict()
    legacy = {k.replace("parametrizations.weight.original0", "weight_g")
              .replace("parametrizations.weight.original1", "weight_v"): v for k, v in state.items()}
    torch.save(legacy, out / "pytorch_model.bin")
    config.save_pretrained(out)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=False,
                             return_attention_mask=True).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def eval_models(tmp_path_factory):
    """(whisper dir, wavlm dir): tiny random checkpoints in the real formats, built once per session."""
    from transformers.utils import logging as hf_logging

    root = tmp_path_factory.mktemp("eval_models")
    hf_logging.disable_progress_bar()
    try:
        return build_tiny_whisper(root / "whisper-large-v3"), build_tiny_wavlm_sv(root / "wavlm-base-plus-sv")
    finally:
        hf_logging.enable_progress_bar()


def speech_like(seconds: float, rate: int = 24000, seed: int = 0) -> np.ndarray:
    """Voiced harmonics under a syllable envelope, no silence."""
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(seed)
    voice = sum(np.sin(2 * np.pi * 150 * k * t + rng.uniform(0, 6.28)) / k for k in range(1, 8))
    return (0.18 * voice * (0.25 + 0.75 * np.abs(np.sin(2 * np.pi * 2 * t)))).astype(np.float32)


def one_error_line(err: str, *needles) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("warning:", "["))]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# --------------------------------------------------------------------------- normalisation and scoring


@pytest.mark.parametrize("text, expected", [
    ("Hello, World! It's 9:30.", "hello world it's 930"),  # punctuation out, "'" kept, lower-cased
    ("Wait... what?!  OK", "wait what ok"),
    ("“Quoted” — and (bracketed) text", "quoted and bracketed text"),  # zhon's typographic marks count too
    ("It’s Ｆｉｎｅ， ｒｅａｌｌｙ", "it's fine really"),  # typographic apostrophe kept as "'", full width folded
    ("fine,really - no", "finereally no"),  # as Seed-TTS-eval: a mark goes without leaving a space
])
def test_english_normalisation(text, expected):
    assert quality.normalize(text, "en") == expected


@pytest.mark.parametrize("text, expected", [
    ("今天天气很好，我们去公园。", "今 天 天 气 很 好 我 们 去 公 园"),  # split into characters, 。，out
    ("「你好」——《世界》…", "你 好 世 界"),
    ("今天天氣很好！", "今 天 天 气 很 好"),  # traditional -> simplified (zhconv zh-cn)
    ("我有３个ＡＩ助手", "我 有 3 个 a i 助 手"),  # full width folded, Latin letters split and lower-cased
])
def test_chinese_normalisation(text, expected):
    assert quality.normalize(text, "zh") == expected


@pytest.mark.parametrize("text, lang", [
    ("Hello there.", "en"), ("今天天气很好。", "zh"), ("我喜欢Python编程", "zh"),
    ("The word 你好 means hello", "en"), ("123 456", "en"),
])
def test_language_from_the_text(text, lang):
    assert quality.language_of(text) == lang


@pytest.mark.parametrize("text, transcript, metric, error, sdi", [
    ("The quick brown fox.", "the quick brown fox", "WER", 0.0, (0, 0, 0)),  # case and punctuation only
    ("The quick brown fox.", "The quick fox.", "WER", 1 / 4, (0, 1, 0)),  # a word dropped
    ("Good morning!", "good morning everyone", "WER", 1 / 2, (0, 0, 1)),  # a word added
    ("It's a test.", "its a test", "WER", 1 / 3, (1, 0, 0)),  # the apostrophe is part of the word
    ("It is 9:30 now.", "It is 9.30 now.", "WER", 0.0, (0, 0, 0)),  # both "930" once punctuation goes
    ("I need 3 eggs.", "I need three eggs.", "WER", 1 / 4, (1, 0, 0)),  # numbers are not normalised
    ("今天天气很好，我们去公园。", "今天天气很好我们去公圆", "CER", 1 / 11, (1, 0, 0)),
    ("今天天气很好。", "今天天氣很好", "CER", 0.0, (0, 0, 0)),  # a traditional transcript
    ("我喜欢Python编程", "我喜欢python编程", "CER", 0.0, (0, 0, 0)),  # mixed: scored by characters
    ("我有３个苹果", "我有3个苹果", "CER", 0.0, (0, 0, 0)),
    ("The quick brown fox.", "", "WER", 1.0, (0, 4, 0)),  # nothing heard: every word deleted
])
def test_score_on_known_strings(text, transcript, metric, error, sdi):
    s = quality.score(text, transcript)
    assert s.metric == metric
    assert s.error == pytest.approx(error)
    assert (s.substitutions, s.deletions, s.insertions) == sdi


def test_score_alignment_marks_what_differs():
    s = quality.score("the cat sat on the mat", "today the bat sat on mat")
    ops = [(a.op, a.ref, a.hyp) for a in s.alignment]
    assert ("substitute", "cat", "bat") in ops and ("delete", "the", "") in ops and ("insert", "", "today") in ops
    page = eval_audio.marked_transcript("en", s.alignment)
    assert "<mark title=\"the text says: cat\">bat</mark>" in page and ">the</del>" in page and ">today</mark>" in page


def test_a_text_with_nothing_to_score():
    assert quality.score("!!! …", "hello").error is None


def test_trailing_silence_and_speech_rate():
    audio = np.concatenate([speech_like(2.0), np.zeros(24000 * 3, np.float32)])
    assert quality.trailing_silence_s(audio, 24000) == pytest.approx(3.0, abs=0.04)
    assert quality.trailing_silence_s(speech_like(2.0), 24000) == 0.0
    assert quality.trailing_silence_s(inference.resample(audio, 24000, 16000), 16000) == pytest.approx(3.0, abs=0.08)
    s = quality.score("one two three four", "one two three four")
    assert quality.speech_rate(s, 2.0) == 2.0


# --------------------------------------------------------------------------- the models, loaded for real


def test_tiny_models_load_verified_and_score(eval_models):
    whisper, wavlm = eval_models
    asr = quality.Transcriber(whisper)
    text = asr(speech_like(1.5), 24000, "zh")
    assert isinstance(text, str)
    sv = quality.SpeakerEncoder(wavlm)
    a, b = speech_like(2.0, seed=1), np.random.default_rng(2).standard_normal(32000).astype(np.float32)
    assert sv.similarity(a, 24000, a, 24000) == pytest.approx(1.0, abs=1e-5)
    assert -1.0 <= sv.similarity(a, 24000, b, 16000) < 0.9999
    assert sv.similarity(a[:sv.min_samples // 2], 16000, a, 24000) is None  # too short: no x-vector, no crash
    assert np.isfinite(sv.similarity(a[:sv.min_samples], 16000, a, 24000))


def test_a_clip_over_30_s_goes_to_whisper_whole(eval_models, monkeypatch):
    """Whisper's features stop at 30 s; a longer clip goes whole to its sequential long-form decoding
    (needs the attention mask and timestamps), a shorter one as one padded window."""
    asr = quality.Transcriber(eval_models[0])
    seen = []

    def generate(features, **kwargs):
        seen.append((features.shape[-1], sorted(kwargs)))
        return np.zeros((1, 3), dtype=np.int64)

    monkeypatch.setattr(asr.model, "generate", generate)
    monkeypatch.setattr(asr.processor, "batch_decode", lambda ids, skip_special_tokens: ["x"])
    asr(np.zeros(16000 * 35, np.float32), 16000, "en")
    asr(np.zeros(16000 * 5, np.float32), 16000, "en")
    assert seen == [(3500, ["attention_mask", "language", "return_timestamps", "task"]),
                    (3000, ["language", "task"])]


def test_a_wrong_or_missing_model_folder_is_one_line(eval_models, tmp_path):
    whisper, wavlm = eval_models
    with pytest.raises(inference.UserError, match="download.sh --eval_models"):
        quality.check_model_folder("whisper", tmp_path / "nope", "--asr_model")
    with pytest.raises(inference.UserError, match="not a Whisper speech recognition model"):
        quality.check_model_folder("whisper", wavlm, "--asr_model")
    broken = tmp_path / "broken"
    shutil.copytree(whisper, broken)
    (broken / "tokenizer_config.json").unlink()
    with pytest.raises(inference.UserError, match="tokenizer_config.json is missing"):
        quality.check_model_folder("whisper", broken, "--asr_model")


# --------------------------------------------------------------------------- the retry rule


class StubTranscriber:
    """Returns the queued transcripts in order (then the last one again)."""

    def __init__(self, *answers):
        self.answers, self.calls = list(answers), 0

    def __call__(self, audio, rate, lang):
        self.calls += 1
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


def test_a_wrong_transcript_makes_the_attempt_unusable_and_retried(tiny_engine, monkeypatch):
    monkeypatch.setattr(tiny_engine, "decode_audio", lambda aligned: speech_like(aligned.shape[0] * 960 / 24000))
    text = "Hello there."
    check = quality.AsrCheck(StubTranscriber("yellow hair", "Hello there!"), max_error=0.2)
    request = inference.SpeechRequest(text, seed=5)
    (result,) = inference.synthesize(tiny_engine, [request], inference.SamplingParams(max_new_tokens=30), retries=2,
                                     check=check)
    first, second = result.attempts
    assert first.outcome.startswith("ASR check: WER 100% > 20%") and "yellow hair" in first.outcome
    assert first.asr.transcript == "yellow hair" and first.asr.error == 1.0
    assert second.outcome == "ok" and second.asr.error == 0.0 and second.seed == 6
    assert result.usable and result.best.generation.seed == 6 and check.transcriber.calls == 2


def test_no_check_no_transcription(tiny_engine, monkeypatch):
    monkeypatch.setattr(tiny_engine, "decode_audio", lambda aligned: speech_like(aligned.shape[0] * 960 / 24000))
    (result,) = inference.synthesize(tiny_engine, [inference.SpeechRequest("Hello there.", seed=5)],
                                     inference.SamplingParams(max_new_tokens=30), retries=2)
    assert [a.asr for a in result.attempts] == [None]


# --------------------------------------------------------------------------- the CLIs end to end


def test_asr_check_and_from_end_to_end(tiny_ckpt, eval_models, tmp_path, monkeypatch, capsys):
    """inference.py --asr_check with the tiny Whisper (random: it hears nothing right, so every attempt is
    retried and the sidecar records what it heard), then eval_audio.py --mode quality --from that folder."""
    whisper, wavlm = eval_models
    ref = tmp_path / "ref.wav"
    inference.write_wav_atomic(ref, speech_like(2.0, seed=3))
    (tmp_path / "texts.txt").write_text("Hello there.\n你好。\n", encoding="utf-8")
    out = tmp_path / "out"
    rc = inference.main(["--text_file", str(tmp_path / "texts.txt"), "--model_path", str(tiny_ckpt[0]),
                         "--tokenizer_path", str(tiny_ckpt[1]), "--device", "cpu", "--max_new_tokens", "30",
                         "--retries", "1", "--seed", "3", "--ref_audio", str(ref), "--batch_size", "2",
                         "--asr_check", str(whisper), "--output_dir", str(out)])
    captured = capsys.readouterr()
    assert rc == 1, captured.err  # random Whisper: nothing passes
    for line in (1, 2):
        sidecar = json.loads((out / f"output_{line}_3.json").read_text())
        attempts = sidecar["attempts"]
        assert len(attempts) == 2 and [a["seed"] for a in attempts] == [3, 4]
        heard = [a for a in attempts if a["asr"] is not None]
        for a in heard:
            assert a["outcome"].startswith("ASR check: ") and a["asr"]["max_error"] == 0.2
            assert a["asr"]["metric"] == ("WER" if line == 1 else "CER")
        assert sidecar["asr_check"]["model"] == str(whisper)
    assert "ASR check: Whisper from" in captured.out

    report = tmp_path / "report"
    rc = eval_audio.main(["--mode", "quality", "--from", str(out), "--asr_model", str(whisper), "--sv_model",
                          str(wavlm), "--device", "cpu", "--output_dir", str(report)])
    assert rc == 1  # random Whisper: the WER / CER gates fail
    q = json.loads((report / "quality.json").read_text())
    assert [c["id"] for c in q["clips"]] == ["output_1_3", "output_2_3"]
    assert [c["lang"] for c in q["clips"]] == ["en", "zh"]
    for c in q["clips"]:
        assert c["ref_audio"] == str(ref) and -1 <= c["similarity"] <= 1  # the sidecar's reference voice
        assert c["duration_s"] > 0 and c["trailing_silence_s"] >= 0 and c["hit_max_new_tokens"] in (True, False)
    statuses = {c["name"]: c["status"] for c in q["checks"]}
    assert statuses["quality: mean WER of the English clips"] == "FAIL"
    summary = json.loads((report / "summary.json").read_text())
    assert "quality.json" in summary["files"] and summary["quality"]["en_clips"] == 1
    page = (report / "report.html").read_text()
    assert "Quality: intelligibility and voice" in page and page.count("<audio controls") == 2


def write_clip(folder: Path, name: str, text: str, audio, ref_audio: str | None = None) -> None:
    """What inference.py leaves: name.wav + name.json."""
    inference.write_wav_atomic(folder / f"{name}.wav", audio)
    inference.write_json_atomic(folder / f"{name}.json", {
        "text": text, "wav": str(folder / f"{name}.wav"), "sample_rate": 24000, "seed_used": 1, "usable": True,
        "finished_by_eos": True, "parameters": {"ref_audio": ref_audio}})


@pytest.mark.parametrize("field,value", [("seed_used", "1"), ("seed_used", True), ("usable", 1),
                                         ("finished_by_eos", "yes"), ("ref_audio", 5)])
def test_a_sidecar_of_other_types_is_skipped_with_a_warning(tmp_path, capsys, field, value):
    """--from reads JSON it did not write: a field of another type than inference.py writes skips that file."""
    write_clip(tmp_path, "good", "Hello there.", speech_like(1.0))
    write_clip(tmp_path, "bad", "Hello there.", speech_like(1.0))
    data = json.loads((tmp_path / "bad.json").read_text())
    (data["parameters"] if field == "ref_audio" else data)[field] = value
    (tmp_path / "bad.json").write_text(json.dumps(data))
    assert [sc.path.name for sc in eval_audio.sidecars(tmp_path)] == ["good.json"]
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"warning: --from {tmp_path / 'bad.json'}: ") and "file skipped" in err, err
    assert len(err.splitlines()) == 1


@pytest.fixture
def clips(tmp_path):
    """A --from folder: an English and a Chinese clip, and one cloned from ref.wav (its own audio)."""
    folder = tmp_path / "clips"
    folder.mkdir()
    voice = speech_like(2.5, seed=7)
    inference.write_wav_atomic(tmp_path / "ref.wav", voice)
    write_clip(folder, "a", "The quick brown fox jumps over the lazy dog.", speech_like(3.0, seed=1))
    write_clip(folder, "b", "今天天气很好，我们一起去公园散步吧。", speech_like(3.0, seed=2))
    write_clip(folder, "c", "Thank you for calling.", voice, ref_audio=str(tmp_path / "ref.wav"))
    return folder


RIGHT = ["the quick brown fox jumps over the lazy dog", "今天天气很好我们一起去公园散步吧", "Thank you for calling."]


@pytest.mark.parametrize("heard, status, failing", [
    (RIGHT, 0, set()),
    (["the quick brown fox jumps over the dog"] + RIGHT[1:], 1, {"quality: mean WER of the English clips"}),
    (RIGHT[:1] + ["今天天气很好我们一起去公园"] + RIGHT[2:], 1, {"quality: mean CER of the Chinese clips"}),
])
def test_the_gates_follow_the_transcripts(clips, eval_models, tmp_path, monkeypatch, heard, status, failing):
    """A stub transcriber in place of Whisper's: what it hears decides the gates (the clip of the
    reference voice itself has similarity 1)."""
    stub = StubTranscriber(*heard)
    monkeypatch.setattr(quality.Transcriber, "__call__", lambda self, audio, rate, lang: stub(audio, rate, lang))
    out = tmp_path / "report"
    rc = eval_audio.main(["--mode", "quality", "--from", str(clips), "--asr_model", str(eval_models[0]),
                          "--sv_model", str(eval_models[1]), "--device", "cpu", "--output_dir", str(out)])
    q = json.loads((out / "quality.json").read_text())
    assert rc == status
    assert {c["name"] for c in q["checks"] if c["status"] == "FAIL"} == failing
    assert q["thresholds"] == {"max_wer": eval_audio.MAX_WER, "max_cer": eval_audio.MAX_CER,
                               "min_sim": eval_audio.MIN_SIM, "max_trailing_silence_s": 2.0,
                               "aggregate": "mean over the clips"}
    assert q["summary"]["sim_mean"] == pytest.approx(1.0, abs=1e-4)


def test_a_long_trailing_silence_fails_its_gate(clips, eval_models, tmp_path, monkeypatch):
    write_clip(clips, "d", "Stop here.", np.concatenate([speech_like(1.0), np.zeros(24000 * 3, np.float32)]))
    stub = StubTranscriber(*RIGHT[:3], "stop here")
    monkeypatch.setattr(quality.Transcriber, "__call__", lambda self, audio, rate, lang: stub(audio, rate, lang))
    rc = eval_audio.main(["--mode", "quality", "--from", str(clips), "--asr_model", str(eval_models[0]),
                          "--sv_model", str(eval_models[1]), "--device", "cpu", "--output_dir", str(tmp_path / "r")])
    q = json.loads((tmp_path / "r" / "quality.json").read_text())
    assert rc == 1
    (bad,) = [c for c in q["checks"] if c["status"] == "FAIL"]
    assert bad["name"] == "quality: no clip ends in a long silence" and "d: 3.0" in bad["detail"]


def test_without_the_speaker_model_the_rest_still_runs(clips, eval_models, tmp_path, monkeypatch, capsys):
    stub = StubTranscriber(*RIGHT)
    monkeypatch.setattr(quality.Transcriber, "__call__", lambda self, audio, rate, lang: stub(audio, rate, lang))
    monkeypatch.chdir(tmp_path)  # no ./eval_models here
    rc = eval_audio.main(["--mode", "quality", "--from", str(clips), "--asr_model", str(eval_models[0]),
                          "--device", "cpu", "--output_dir", str(tmp_path / "r")])
    q = json.loads((tmp_path / "r" / "quality.json").read_text())
    sim = next(c for c in q["checks"] if "similarity" in c["name"])
    assert rc == 0 and sim["status"] == "SKIP" and "download.sh --eval_models" in sim["detail"]
    assert "download.sh --eval_models" in capsys.readouterr().err


def test_missing_asr_model_is_one_line_naming_the_download(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert eval_audio.main(["--mode", "quality", "--output_dir", str(tmp_path / "r")]) == 2
    one_error_line(capsys.readouterr().err, "--asr_model", "download.sh --eval_models")
    assert inference.main(["--asr_check", "--output_dir", str(tmp_path / "o")]) == 2
    one_error_line(capsys.readouterr().err, "--asr_check", "download.sh --eval_models")
    assert not (tmp_path / "r").exists() and not (tmp_path / "o").exists()
    args = eval_audio.build_parser().parse_args(["--mode", "all"])
    eval_audio.validate(args)  # --mode all without a Whisper model: quality is left out, and says why
    assert not args.quality and "download.sh --eval_models" in args.quality_note


def test_mode_all_includes_quality_when_whisper_is_there(eval_models, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "eval_models").mkdir()
    shutil.copytree(eval_models[0], tmp_path / "eval_models" / "whisper-small")  # the only one: found
    args = eval_audio.build_parser().parse_args(["--mode", "all"])
    eval_audio.validate(args)
    assert args.quality and args.quality_note is None and args.asr_path.name == "whisper-small"
    assert eval_audio.quality_steps(args) == 20 + 5  # 20 clips scored, in 5 batches of --batch_size 4
    assert eval_audio.main(["--mode", "all", "--sv_model", str(tmp_path / "nope"), "--output_dir",
                            str(tmp_path / "r")]) == 2  # a speaker model named but missing: refused up front
    one_error_line(capsys.readouterr().err, "--sv_model", "download.sh --eval_models")


@pytest.mark.parametrize("argv, needle", [
    (["--mode", "precision", "--from", "x"], "--from scores existing audio"),
    (["--mode", "quality", "--ref_text", "hi"], "--ref_text needs --ref_audio"),
    (["--mode", "quality", "--batch_size", "0"], "--batch_size"),
])
def test_quality_usage_mistakes(argv, needle, tmp_path, capsys):
    assert eval_audio.main([*argv, "--output_dir", str(tmp_path / "r")]) == 2
    one_error_line(capsys.readouterr().err, needle)


def test_mode_quality_generates_the_built_in_set(tiny_engine, eval_models, tmp_path, monkeypatch):
    """The built-in set and the cloning prompts, generated with the engine and scored (a stub hears each
    text right: the Whisper plumbing runs in the tests above), into quality.json and the report's Quality section."""
    monkeypatch.setattr(tiny_engine, "decode_audio", lambda aligned: speech_like(aligned.shape[0] * 960 / 24000))
    stub = StubTranscriber(*[text for _, text in eval_audio.QUALITY_SENTENCES + eval_audio.CLONE_SENTENCES])
    monkeypatch.setattr(quality.Transcriber, "__call__", lambda self, audio, rate, lang: stub(audio, rate, lang))
    ref = tmp_path / "voice.wav"
    inference.write_wav_atomic(ref, speech_like(2.0, seed=9))
    out = tmp_path / "r"
    rc = eval_audio.main(["--mode", "quality", "--asr_model", str(eval_models[0]), "--sv_model", str(eval_models[1]),
                          "--tokens", "40", "--seeds", "2", "--batch_size", "8", "--ref_audio", str(ref),
                          "--ref_text", "A voice.", "--output_dir", str(out)], engine=tiny_engine)
    q = json.loads((out / "quality.json").read_text())
    statuses = {c["name"]: c["status"] for c in q["checks"]}
    assert statuses["quality: mean WER of the English clips"] == statuses["quality: mean CER of the Chinese clips"] \
        == "PASS" and q["summary"]["wer_mean"] == q["summary"]["cer_mean"] == 0.0
    assert rc == (1 if "FAIL" in statuses.values() else 0)
    ids = [cid for cid, _ in eval_audio.QUALITY_SENTENCES + eval_audio.CLONE_SENTENCES]
    assert [c["id"] for c in q["clips"]] == ids and len(ids) == 22
    assert sum(c["lang"] == "en" for c in q["clips"]) == 11 and q["summary"]["cloned_clips"] == 2
    for c in q["clips"]:
        assert (out / c["wav"]).is_file() and c["hit_max_new_tokens"] == (not c["finished_by_eos"])
        assert {"transcript", "error", "metric", "duration_s", "trailing_silence_s", "speech_rate",
                "similarity", "alignment"} <= set(c)
        assert (c["similarity"] is None) == (c["ref_audio"] is None)
    assert q["sampling"]["max_new_tokens"] == 40 and q["sampling"]["retries"] == 0
    page = (out / "report.html").read_text()
    assert page.count('<audio controls preload="none"') == 22 and "Boson published" in page


# --------------------------------------------------------------------------- download.sh --eval_models


def run_download(cwd: Path, hub_url: str, *args: str):
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HIGGS_", "HUGGINGFACE_"))}
    env.update(HF_ENDPOINT=hub_url, HF_HOME=str(cwd / "hf_home"), HF_HUB_DISABLE_XET="1",
               HF_HUB_DISABLE_UPDATE_CHECK="1", HF_HUB_DISABLE_TELEMETRY="1", PYTHON=sys.executable)
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["bash", str(ROOT / "download.sh"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.mark.skipif(hubpy.find_hf_cli(sys.executable) is None, reason="the hf CLI (huggingface_hub) is not installed")
def test_download_eval_models(eval_models, tmp_path):
    """Against a local hub: only the files the transformers classes read are fetched (whisper-large-v3 also
    holds other copies of its weights), the pickle-only WavLM repo is checked after its download, both load;
    a repo holding something else is refused in one line."""
    import torch

    whisper, wavlm = eval_models
    repo = tmp_path / "repo_whisper"
    shutil.copytree(whisper, repo)
    for name in ("pytorch_model.bin", "flax_model.msgpack", "model.fp32-00001-of-00002.safetensors"):
        (repo / name).write_bytes(b"another copy of the weights")
    (repo / "README.md").write_text("# whisper\n")
    wrong = tmp_path / "repo_wrong"
    shutil.copytree(wavlm, wrong)
    torch.save({"encoder.weight": torch.zeros(2, 2)}, wrong / "pytorch_model.bin")
    hub = LocalHub()
    hub.add_repo("openai/whisper-large-v3", repo)
    hub.add_repo("microsoft/wavlm-base-plus-sv", wavlm)
    hub.start()
    try:
        proc = run_download(tmp_path / "work", hub.url, "--eval_models")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        got_whisper = tmp_path / "work" / "eval_models" / "whisper-large-v3"
        got_wavlm = tmp_path / "work" / "eval_models" / "wavlm-base-plus-sv"
        assert files_of(got_whisper) == files_of(whisper) and files_of(got_wavlm) == files_of(wavlm)
        assert "python3 eval_audio.py --mode quality" in proc.stdout
        quality.Transcriber(got_whisper)
        quality.SpeakerEncoder(got_wavlm)
    finally:
        hub.stop()
    # a pickle has no header to check before the download: the check after it (hub.py verify-download)
    # compares its tensors with the class, and a folder of other tensors is refused
    problem = hubpy.tensor_problem("wavlm-sv", wrong, {})
    assert "pytorch_model.bin holds 1 tensors" in problem and "0 of 56" in problem
    assert hubpy.tensor_problem("wavlm-sv", got_wavlm, {}) is None


# --------------------------------------------------------------------------- real speech


ESPEAK = shutil.which("espeak-ng")


@pytest.mark.skipif(ESPEAK is None, reason="espeak-ng is not installed (Debian: apt-get install -y espeak-ng); "
                                           "CI installs it")
def test_real_speech_from_espeak(tmp_path):
    """A sentence spoken by espeak-ng: with a transcriber that hears it right the scorer gives 0 %, with one
    word dropped 1/9; the speech itself is not silence, silence appended after it is."""
    text = "The quick brown fox jumps over the lazy dog."
    wav = tmp_path / "fox.wav"
    subprocess.run([ESPEAK, "-v", "en-us", "-w", str(wav), text], check=True, capture_output=True, timeout=60)
    audio, rate = inference.read_audio(wav)
    right = eval_audio.score_clip("fox", text, audio, rate, StubTranscriber(text.lower()), None, None)
    assert right.error == 0.0 and right.metric == "WER" and right.reference_units == 9
    assert 1.5 < right.duration_s < 6 and right.trailing_silence_s < 0.5
    assert 1.5 < right.speech_rate < 6  # words a second
    dropped = eval_audio.score_clip("fox", text, audio, rate,
                                    StubTranscriber("The quick brown fox jumps over the dog."), None, None)
    assert dropped.error == round(1 / 9, 4) and dropped.deletions == 1  # quality.json keeps 4 decimals
    assert ">lazy</del>" in eval_audio.marked_transcript(dropped.lang, dropped.alignment)
    check = quality.AsrCheck(StubTranscriber("The quick brown fox jumps over the dog."), max_error=0.1)
    reason, info = check(text, audio, rate)
    assert reason.startswith("ASR check: WER 11% > 10%") and info.error == pytest.approx(1 / 9, abs=1e-4)
    tail = np.concatenate([audio, np.zeros(rate * 3, np.float32)])
    assert quality.trailing_silence_s(tail, rate) == pytest.approx(3.0 + right.trailing_silence_s, abs=0.05)
