"""Parity with Boson's own code (boson_multimodal 0.1.1), issues 3 and 4.

tests/fixtures/boson/ holds a tiny generation model and audio tokenizer in Boson's ORIGINAL
layout, built and saved by boson_multimodal itself, and records.pt with what Boson's code
produced for them (tests/boson_fixtures/make_fixtures.py, run in a side env). Here the
fixture is converted with convert_weights.py as a user would, loaded with inference.load_engine
on CPU in fp32, and our prompt, logits, greedy decode loop and codec must give Boson's results.
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "boson"
RECORDS = torch.load(FIXTURE / "records.pt", weights_only=False)
PROMPTS = {p["name"]: p for p in RECORDS["prompts"]}
ATOL = 1e-4


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The model through the CLI in a subprocess (as a user runs it); meanwhile the audio
    tokenizer through the same entry point in this process (saves a second interpreter start)."""
    import convert_weights

    out = tmp_path_factory.mktemp("boson-converted")
    proc = subprocess.Popen([sys.executable, str(ROOT / "convert_weights.py"), "--src", str(FIXTURE / "model"),
                             "--dst", str(out / "model")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert convert_weights.main(["--src", str(FIXTURE / "tokenizer"), "--dst", str(out / "tokenizer")]) == 0
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout + stderr
    assert "verified" in stdout and "Done:" in stdout
    return out / "model", out / "tokenizer"


@pytest.fixture(scope="module")
def engine(converted):
    import inference

    return inference.load_engine(*converted, device="cpu", dtype="float32")


def our_prompt(engine, rec):
    ref = rec.get("ref_codes")
    return engine.build_prompt(rec["text"], rec["scene"] or None,
                               ref_codes=None if ref is None else ref.long(), ref_text=rec["ref_text"])


@pytest.mark.parametrize("name", list(PROMPTS))
def test_prompt_ids_match_boson(engine, name):
    """Boson expands each <|AUDIO_OUT|> to one id per audio frame; the native processor writes
    the delay token for the last C-1 frames. Both are audio positions (same embeddings)."""
    rec = PROMPTS[name]
    prompt = our_prompt(engine, rec)
    ids = prompt.input_ids.clone()
    ids[ids == engine.config.audio_delay_token_id] = engine.config.audio_token_id
    assert ids.tolist() == rec["expanded_input_ids"].tolist()
    if rec.get("ref_codes") is not None:
        # the reference turn's audio: stream BOS + codes + stream EOS, delay pattern, as Boson's collator
        assert torch.equal(prompt.audio_input_ids, rec["audio_out_ids"].long().T)
        assert int((rec["input_ids"] == engine.config.audio_token_id).sum()) == 1  # Boson's unexpanded prompt


@pytest.mark.parametrize("name", list(PROMPTS))
def test_prefill_logits_match_boson(engine, name):
    rec = PROMPTS[name]
    logits = engine.prompt_logits(our_prompt(engine, rec))
    assert logits.shape[1:] == (8, 1026)
    torch.testing.assert_close(logits[rec["prefill_rows"]], rec["prefill_logits"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", list(PROMPTS))
def test_decode_step_logits_match_boson(engine, name):
    """Teacher-forced over Boson's frames: our logits at frame j-1 are the ones Boson sampled frame j from."""
    import inference

    rec = PROMPTS[name]
    prompt = our_prompt(engine, rec)
    codes = rec["codes"].long()
    audio = codes if prompt.audio_input_ids is None else torch.cat([prompt.audio_input_ids, codes])
    forced = inference.Prompt(
        input_ids=torch.cat([prompt.input_ids, torch.full((len(codes),), engine.config.audio_token_id)]),
        audio_input_ids=audio,
    )
    logits = engine.prompt_logits(forced)
    start = len(prompt.input_ids)
    ours = logits[start + rec["step_index"]]
    torch.testing.assert_close(ours, rec["step_logits"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", list(PROMPTS))
def test_greedy_codes_match_boson(engine, name):
    """Boson's audio_sequences column 0 is the all-BOS frame, as our frame 0: compare as is."""
    import inference

    rec = PROMPTS[name]
    params = inference.SamplingParams(temperature=0, ras_win_len=0, max_new_tokens=rec["max_new_tokens"])
    (gen,), _ = engine.generate([our_prompt(engine, rec)], params, [0])
    assert gen.codes.tolist() == rec["codes"].long().tolist()
    assert gen.finished == rec["finished"]


def test_first_eos_in_codebook_above_zero(engine):
    """The fixture's EOS prompt: first stream EOS in codebook 3 at frame 12; Boson forces
    codebooks 0-2 to EOS there and closes one more codebook per frame (4 more frames)."""
    rec = PROMPTS["eos_in_codebook_3"]
    codes = rec["codes"].long()
    frame, cb, eos = RECORDS["eos_frame"], RECORDS["eos_codebook"], engine.config.audio_stream_eos_id
    assert not (codes[:frame] == eos).any()
    assert codes[frame].tolist()[: cb + 1] == [eos] * (cb + 1) and eos not in codes[frame].tolist()[cb + 1:]
    assert codes.shape[0] == frame + (8 - cb - 1) + 1 and rec["finished"]
    for k in range(1, 8 - cb):  # closing frames
        assert codes[frame + k].tolist()[: cb + k] == [eos] * (cb + k)


def test_batch_rows_match_boson(engine):
    """Left-padded batch of the four text-only prompts: each row still gives Boson's codes."""
    import inference

    recs = [r for r in RECORDS["prompts"] if r.get("ref_codes") is None]
    params = inference.SamplingParams(temperature=0, ras_win_len=0, max_new_tokens=max(r["max_new_tokens"] for r in recs))
    gens, _ = engine.generate([our_prompt(engine, r) for r in recs], params, [0] * len(recs))
    for rec, gen in zip(recs, gens):
        n = rec["codes"].shape[0]
        assert gen.codes[:n].tolist() == rec["codes"].long().tolist(), rec["name"]


@pytest.mark.parametrize("seconds", ["1.5", "2.0"])
def test_encode_matches_boson(engine, seconds):
    """1.5 s is a length where the native encode's hop/2 padding would differ from Boson's 320."""
    rec = RECORDS["codec"][seconds]
    codes = engine.encode_audio(rec["waveform"].numpy())
    assert codes.tolist() == rec["codes"].long().tolist()


@pytest.mark.parametrize("seconds", ["1.5", "2.0"])
def test_decode_matches_boson(engine, seconds):
    rec = RECORDS["codec"][seconds]
    audio = engine.decode_audio(rec["codes"].long().T)
    assert audio.shape == tuple(rec["audio"].shape)
    assert np.abs(audio - rec["audio"].numpy()).max() <= ATOL


def test_reference_codes_are_boson_encode_of_ref_wav(engine):
    """The reference-audio prompt's codes came from Boson's encode of ref.wav; ours agree."""
    import soundfile as sf

    wave, rate = sf.read(FIXTURE / "ref.wav", dtype="float32")
    assert rate == 24000
    rec = PROMPTS["reference_audio"]
    assert engine.encode_audio(wave).tolist() == rec["ref_codes"].long().tolist()
