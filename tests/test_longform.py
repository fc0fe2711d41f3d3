"""Long texts in one voice, and audio that starts playing while it is generated.

Splitter, chunk seeds, runaway guard and stream decoder as units; then the chunk loop (inference.speak)
on the tiny checkpoints: each chunk's prompt, streamed audio against one decode of the same codes.
"""

import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import inference
from inference import SamplingParams, chunk_cost, split_text

CFG_BOS = 1024
NUM_CB = 8


def no_space(text: str) -> str:
    return re.sub(r"\s+", "", text)


def assert_chunks(text: str, chunks: list[str], budget: float) -> None:
    """Within budget, none empty, and together the text again (less whitespace)."""
    assert all(c and c == c.strip() for c in chunks)
    assert all(chunk_cost(c) <= budget for c in chunks), [(c, chunk_cost(c)) for c in chunks]
    assert no_space("".join(chunks)) == no_space(text)


# --------------------------------------------------------------------------- splitter


def test_english_sentences_are_packed_whole():
    sentences = ["The sun rises in the east.", "It sets in the west!", "Have you seen it?",
                 "Birds sing; people wake.", "Then the day begins."]
    text = " ".join(sentences)
    chunks = split_text(text, 10)
    assert_chunks(text, chunks, 10)
    assert len(chunks) == 3
    for chunk in chunks:  # every cut is at a sentence end: each chunk is whole sentences
        assert any(chunk.endswith(s) for s in sentences) and any(chunk.startswith(s) for s in sentences)


def test_short_text_and_zero_budget_give_one_chunk():
    text = "A short text. Two sentences."
    assert split_text(text, 60) == [text]
    assert split_text(" " + text * 40 + "\n", 0) == [(text * 40).strip()]


def test_chinese_cuts_at_full_width_marks():
    text = "今天天气很好，我们一起去公园散步吧。你好，世界！这是在处理器上运行的语音合成测试。太阳从东方升起；从西方落下？"
    chunks = split_text(text, 10)  # 20 CJK characters = 10 words
    assert_chunks(text, chunks, 10)
    assert len(chunks) > 1
    assert all(c[-1] in "。！？；，" for c in chunks)


def test_mixed_scripts_cut_between_cjk_and_latin_words_only():
    text = "我用Python写代码，It works very well indeed, 真的很好！Then we test the whole system again tomorrow."
    chunks = split_text(text, 4)
    assert_chunks(text, chunks, 4)
    for word in re.findall(r"[A-Za-z]+", text):
        assert any(re.search(rf"(?<![A-Za-z]){word}(?![A-Za-z])", c) for c in chunks), word


def test_numbers_stay_whole():
    text = "Pi is about 3.14 and e is about 2.718, while a crowd of 1,000 people paid 12,500.50 dollars in total."
    chunks = split_text(text, 3)
    assert_chunks(text, chunks, 3)
    for number in ("3.14", "2.718", "1,000", "12,500.50"):
        assert any(number in c for c in chunks), (number, chunks)


@pytest.mark.parametrize("text,abbreviations", [
    ("Dr. Smith met Mr. Jones and Mrs. Lee today.", ["Dr.", "Mr.", "Mrs."]),
    ("We saw many birds, e.g. crows, i.e. black ones.", ["e.g.", "i.e."]),
    ("Books by J. K. Rowling sold well in the U.S. market.", ["J.", "K.", "U.S."]),
    ("It opens at 9 a.m. on weekdays, vs. noon on Sundays.", ["a.m.", "vs."]),
])
def test_a_period_after_an_abbreviation_is_only_a_word_boundary(text, abbreviations):
    levels = inference._break_levels(text)
    for abbreviation in abbreviations:
        after = text.index(abbreviation) + len(abbreviation)
        assert levels.get(after) == inference._WORD, (abbreviation, levels.get(after))
    assert levels[len(text) - 1 - text[::-1].index(" ")] == inference._WORD  # an ordinary word boundary
    assert_chunks(text, split_text(text, 4), 4)


def test_abbreviation_inside_a_sentence_is_not_a_sentence_end():
    text = "Dr. Smith met Mr. Jones. They talked about tea, e.g. green tea."
    assert split_text(text, 7) == ["Dr. Smith met Mr. Jones.", "They talked about tea, e.g. green tea."]


@pytest.mark.parametrize("text", ['He said "Stop. Wait. Go home now." and left the house very quietly.',
                                  "“你好，”他说，“今天天气很好。”然后我们离开了这里。",
                                  "She wrote (see the notes, the maps, the lists) and then she left again."])
def test_no_cut_inside_quotes_or_brackets_that_fit(text):
    chunks = split_text(text, 8)
    assert_chunks(text, chunks, 8)
    spans = inference._quoted_spans(text)
    assert spans
    starts, pos = [], 0
    for chunk in chunks:
        pos = text.index(chunk, pos)
        starts.append(pos)
        pos += len(chunk)
    for a, b in spans:
        assert not any(a < s < b for s in starts[1:]), (text[a:b], chunks)


def test_quoted_span_too_long_alone_is_cut_inside():
    text = 'He read "one two three four five six seven eight nine ten" aloud.'
    chunks = split_text(text, 4)
    assert_chunks(text, chunks, 4)


def test_single_overlong_sentence_is_cut_at_clauses_then_words():
    clauses = "first we walk, then we run, after that we swim across, and at last we rest"
    chunks = split_text(clauses + ".", 6)
    assert_chunks(clauses + ".", chunks, 6)
    assert [c.rstrip(",.") for c in chunks] == ["first we walk, then we run", "after that we swim across",
                                                "and at last we rest"]
    words = " ".join(["word"] * 200) + "."
    chunks = split_text(words, 60)
    assert_chunks(words, chunks, 60)
    assert [chunk_cost(c) for c in chunks] == [50, 50, 50, 50]  # even, not 60 + 60 + 60 + 20


def test_empty_lines_make_no_chunks():
    text = "\n\nFirst line here.\n\n\n   \nSecond line here.\n \n\nThird line.\n\n"
    chunks = split_text(text, 3)
    assert chunks == ["First line here.", "Second line here.", "Third line."]
    assert split_text("\n \n\t", 3) == []


TOKENS = ["word", "speech", "Hello", "3.14", "1,000", "Dr.", "e.g.", "你好", "世界", "我们", "。", "，", "、", "！",
          ", ", ". ", "! ", "? ", "; ", ": ", "\n", "\n\n", " ", " ", '"', "“", "”", "(", ")", "「", "」", "’s"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(TOKENS), max_size=80), st.integers(min_value=1, max_value=12))
def test_any_text_splits_within_budget_and_joins_back(tokens, budget):
    text = "".join(tokens)
    chunks = split_text(text, budget)
    assert_chunks(text, chunks, budget)
    # a Latin word or number (letters, digits, inner "." and ",") is never cut
    for word in re.findall(r"[A-Za-z0-9](?:[A-Za-z0-9.,]*[A-Za-z0-9])?", text):
        assert any(word in c for c in chunks), (word, chunks)


# --------------------------------------------------------------------------- seeds, runaway rule


def test_chunk_seeds_never_collide_with_retries():
    retries = 5
    seeds = [inference.chunk_seed(7, k, retries) + a for k in range(50) for a in range(retries + 1)]
    assert len(set(seeds)) == len(seeds)
    assert inference.chunk_seed(7, 0, retries) == 7  # a text of one chunk keeps --seed
    assert list(inference.retry_seeds(7, retries)) == seeds[:retries + 1]


def test_chunk_seed_wraps_inside_torchs_range_to_the_same_generator():
    top = inference.SEED_MAX - 2
    s = inference.chunk_seed(top, 3, retries=4)
    assert inference.SEED_MIN <= s and s + 4 <= inference.SEED_MAX
    assert (s - (top + 3 * inference.CHUNK_SEED_STRIDE)) % 2**64 == 0
    a = torch.Generator().manual_seed(s)
    b = torch.Generator().manual_seed(s % 2**64)
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))


def rms_frames(loud: int, silent: int):
    return np.array([0.1] * loud + [1e-5] * silent)


def test_runaway_guard_leaves_a_normal_chunk_alone():
    text = "Ten words of text that need about four seconds here."
    short_pause = rms_frames(100, 20)  # 0.8 s pause after EOS: normal
    assert inference.runaway_guard(text, short_pause, finished=True) == inference.Guard(120, None)


def test_runaway_guard_trims_long_trailing_silence():
    text = "Ten words of text that need about four seconds here."
    g = inference.runaway_guard(text, rms_frames(100, 80), finished=True)  # 3.2 s of near-silence after speech
    assert g.keep == 100 + inference.KEEP_PAUSE_FRAMES and g.reason is None
    assert "trailing near-silence" in g.note and "trimmed 2.72 s" in g.note


def test_runaway_without_eos_is_unusable_only_beyond_three_times_the_need():
    text = "Ten words of text that need about four seconds here."
    limit = inference.runaway_limit_frames(text)
    assert limit == 3 * 4 * 25  # 10 words at 2.5 words/s = 4 s
    assert inference.runaway_guard(text, rms_frames(limit, 0), finished=False).reason is None
    g = inference.runaway_guard(text, rms_frames(limit + 1, 0), finished=False)
    assert g.reason.startswith("runaway: no EOS") and "3 x the 4.00 s" in g.reason
    # trimming the trailing silence can bring it back under the limit
    g = inference.runaway_guard(text, rms_frames(limit - 20, 60), finished=False)
    assert g.reason is None and g.keep == limit - 20 + inference.KEEP_PAUSE_FRAMES


def test_chunk_budget_stops_one_frame_past_the_runaway_limit():
    text = "Hi."
    budget = inference.chunk_frame_budget(text, 2048, NUM_CB)
    aligned = budget - NUM_CB - 1  # what revert_delay_pattern leaves of that many generated frames
    assert aligned == inference.runaway_limit_frames(text) + 1
    assert inference.chunk_frame_budget(text, 40, NUM_CB) == 40


# --------------------------------------------------------------------------- stream decoder


def snr_db(x, ref) -> float:
    err = float(np.sum((x.astype(np.float64) - ref) ** 2))
    return float("inf") if err == 0 else 10 * np.log10(float(np.sum(ref.astype(np.float64) ** 2)) / err)


SNR_BOUND_DB = 100.0  # measured: 151 dB on the tiny codec, 129 dB on the real architecture (docs/longform.md)


def stream(engine, codes, step=16, **kwargs):
    decoder = inference.StreamDecoder(engine.decode_audio, **kwargs)
    pieces = []
    for start in range(0, codes.shape[0], step):
        decoder.append(codes[start:start + step])
        pieces.append(decoder.pull())
    pieces.append(decoder.pull(final=True))
    return np.concatenate(pieces), decoder


def test_windowed_decode_matches_one_decode_only_with_context(tiny_engine):
    codes = torch.randint(0, 1024, (96, NUM_CB), generator=torch.Generator().manual_seed(0))
    whole = tiny_engine.decode_audio(codes)
    streamed, decoder = stream(tiny_engine, codes)
    assert streamed.size == whole.size == 96 * 960
    good = snr_db(streamed, whole)
    print(f"context {decoder.context} lookahead {decoder.lookahead}: SNR {good:.1f} dB, "
          f"max abs diff {np.abs(streamed - whole).max():.2e}")
    assert good >= SNR_BOUND_DB
    no_context, _ = stream(tiny_engine, codes, context=0)
    assert snr_db(no_context, whole) < SNR_BOUND_DB
    no_lookahead, _ = stream(tiny_engine, codes, lookahead=0)
    assert snr_db(no_lookahead, whole) < SNR_BOUND_DB


def test_held_silence_can_be_cut_unheard(tiny_engine):
    loud = torch.randint(0, 1024, (40, NUM_CB), generator=torch.Generator().manual_seed(1))
    decoder = inference.StreamDecoder(lambda c: np.concatenate(
        [np.full(960, 0.1 if bool((row < 512).all()) else 0.0, np.float32) for row in c]), hold_silence=True)
    quiet = torch.full((30, NUM_CB), 600)  # decodes to silence in this fake codec
    decoder.append(torch.full((40, NUM_CB), 5))
    decoder.append(quiet)
    out = decoder.pull()
    assert out.size == 40 * 960  # the loud frames go out, the silent tail waits
    assert decoder.can_truncate(40 + inference.KEEP_PAUSE_FRAMES)
    assert not decoder.can_truncate(40 + inference.STREAM_LOOKAHEAD - 1)
    decoder.truncate(40 + inference.KEEP_PAUSE_FRAMES)
    decoder.append(loud[:5] % 512)
    rest = decoder.pull(final=True)
    assert rest.size == (inference.KEEP_PAUSE_FRAMES + 5) * 960
    with pytest.raises(ValueError):
        decoder.truncate(10)


# --------------------------------------------------------------------------- the chunk loop on the tiny model


def spoken(engine, text, **kwargs):
    stream_ = inference.speak(engine, text, **kwargs)
    pieces = list(stream_)
    return (np.concatenate(pieces) if pieces else np.zeros(0, np.float32)), stream_.result, pieces


@pytest.fixture()
def prompts_seen(tiny_engine, monkeypatch):
    seen = []
    original = tiny_engine.generate_frames

    def recording(prompts, *args, **kwargs):
        seen.append(prompts[0])
        return original(prompts, *args, **kwargs)

    monkeypatch.setattr(tiny_engine, "generate_frames", recording)
    return seen


def audio_segments(engine, prompt):
    """The prompt's audios, each back to aligned codes [T, C] (stream BOS and EOS frames dropped)."""
    ids, audio = prompt.input_ids, prompt.audio_input_ids
    cfg = engine.config
    is_audio = (ids == cfg.audio_token_id) | (ids == cfg.audio_delay_token_id)
    assert int(is_audio.sum()) == audio.shape[0]  # one audio position per audio frame
    # a segment starts where every codebook holds the stream BOS (codebook 0's BOS frame)
    starts = [i for i in range(audio.shape[0]) if int(audio[i, 0]) == cfg.audio_stream_bos_id]
    segments = []
    for a, b in zip(starts, starts[1:] + [audio.shape[0]]):
        aligned = engine.processor.revert_delay_pattern(audio[a:b])
        segments.append(aligned[1:-1])
    return segments


PARAMS = SamplingParams(max_new_tokens=24)


@pytest.fixture()
def endless(tiny_engine):
    """The tiny engine with EOS (and BOS) never sampled: every chunk runs to its frame budget."""
    head = tiny_engine.model.audio_lm_head.weight
    saved = head.detach().clone()
    with torch.no_grad():
        head.view(NUM_CB, tiny_engine.config.codebook_size, -1)[:, CFG_BOS:] = 0  # as test_engine's endless_engine
    yield tiny_engine
    with torch.no_grad():
        head.copy_(saved)
THREE = "Go now, please. 你好世界。 Stop here, friend."


def test_chunk_prompt_holds_reference_and_previous_chunks_codes(tiny_engine, prompts_seen):
    ref = torch.randint(0, 1024, (NUM_CB, 15), generator=torch.Generator().manual_seed(2))
    _, result, _ = spoken(tiny_engine, THREE, params=PARAMS, retries=0, chunk_words=3, context_chunks=1,
                          ref_codes=ref, ref_text="Reference words.", stream=False)
    assert [c.text for c in result.chunks] == ["Go now, please.", "你好世界。", "Stop here, friend."]
    assert len(prompts_seen) == 3
    kept = [result.codes[c.start_frame:c.start_frame + c.frames] for c in result.chunks]
    for k, prompt in enumerate(prompts_seen):
        segments = audio_segments(tiny_engine, prompt)
        assert torch.equal(segments[0], ref.T)  # the reference voice in every chunk's prompt
        expected = [kept[k - 1]] if k else []  # --context_chunks 1: the chunk before
        assert len(segments) == 1 + len(expected)
        for got, want in zip(segments[1:], expected):
            assert torch.equal(got, want)
        rendered = tiny_engine.tokenizer.decode(prompt.input_ids)
        assert rendered.index("Reference words.") < (rendered.index(result.chunks[k - 1].text) if k else 10**9)
        assert rendered.rstrip().endswith("<|audio_out_bos|>")
        assert result.chunks[k].text in rendered.split("<|start_header_id|>user")[-1]


def test_without_reference_the_first_chunk_fixes_the_voice(tiny_engine, prompts_seen):
    text = "One two. Three four. Five six. Seven eight."
    _, result, _ = spoken(tiny_engine, text, params=PARAMS, retries=0, chunk_words=2, context_chunks=1,
                          stream=False)
    assert len(result.chunks) == 4
    kept = [result.codes[c.start_frame:c.start_frame + c.frames] for c in result.chunks]
    wanted = [[], [0], [0, 1], [0, 2]]  # chunk 0 always, then the chunk before
    for k, prompt in enumerate(prompts_seen):
        segments = audio_segments(tiny_engine, prompt) if prompt.audio_input_ids is not None else []
        assert len(segments) == len(wanted[k])
        for got, i in zip(segments, wanted[k]):
            assert torch.equal(got, kept[i])
    assert [c.seed for c in result.chunks] == [inference.chunk_seed(1, k) for k in range(4)]


def test_streamed_audio_equals_one_decode_of_the_codes(endless):
    # 33: the decode ends on a sync frame (t = 32), where the reader must still hold the last column back
    audio, result, pieces = spoken(endless, THREE, params=SamplingParams(max_new_tokens=33), retries=0,
                                   chunk_words=3, stream=True)
    assert result.streamed and len(pieces) > len(result.chunks)  # pieces came while chunks were generated
    assert [c.frames for c in result.chunks] == [33 - NUM_CB - 1] * 3
    assert audio.size == result.samples == sum(c.frames for c in result.chunks) * 960
    whole = endless.decode_audio(result.codes)
    snr = snr_db(audio, whole)
    print(f"streamed vs one decode: SNR {snr:.1f} dB, max abs diff {np.abs(audio - whole).max():.2e}")
    assert snr >= SNR_BOUND_DB
    assert result.time_to_first_audio_s is not None and result.time_to_first_audio_s < result.total_s


def test_one_shot_gives_the_same_codes_and_audio_as_streaming(endless):
    text = "Go now, please. Stop here, friend."
    kwargs = dict(params=SamplingParams(max_new_tokens=24), retries=0, chunk_words=3, seed=5)
    streamed, s_result, _ = spoken(endless, text, stream=True, **kwargs)
    whole, w_result, pieces = spoken(endless, text, stream=False, **kwargs)
    assert len(w_result.chunks) == 2
    assert len(pieces) == 1
    assert torch.equal(s_result.codes, w_result.codes)
    assert snr_db(streamed, whole) >= SNR_BOUND_DB


def test_runaway_chunk_is_retried_with_the_next_seed(endless):
    lines = []
    _, result, _ = spoken(endless, "Hi.", params=SamplingParams(max_new_tokens=200), retries=1, stream=False,
                          log=lines.append)
    chunk = result.chunks[0]
    budget = inference.chunk_frame_budget("Hi.", 200, NUM_CB)
    assert [a.frames for a in chunk.attempts] == [budget, budget]  # stopped at the runaway budget, not 200
    assert [a.seed for a in chunk.attempts] == [1, 2]
    assert all(a.outcome.startswith("runaway: no EOS") for a in chunk.attempts)
    assert not chunk.usable and not result.usable
    assert any("unusable: runaway" in line for line in lines)


def test_a_text_sounds_the_same_batched_alone_chunked_or_streamed(tiny_engine):
    """One retry rule (runaway guard included) for every entry point: synthesize, alone or in a batch
    with a text of another frame budget, gives speak()'s codes and audio for a text of one chunk."""
    params = SamplingParams(max_new_tokens=200)  # beyond the text's frame budget: the budget bites
    text, other = "Hello there, my friend.", "Yes."
    guarded = 0
    for seed in range(2, 7):
        alone, = inference.synthesize(tiny_engine, [inference.SpeechRequest(text, seed)], params, retries=0)
        batched = inference.synthesize(tiny_engine, [inference.SpeechRequest(other, seed + 100),
                                                     inference.SpeechRequest(text, seed)], params, retries=0)[1]
        whole, result, _ = spoken(tiny_engine, text, params=params, seed=seed, retries=0, stream=False)
        streamed, s_result, _ = spoken(tiny_engine, text, params=params, seed=seed, retries=0, stream=True)
        a = alone.attempts[0]
        guarded += a.outcome.startswith("runaway") or a.stats.samples // 960 < a.frames - NUM_CB - 1
        assert alone.attempts[0].frames <= inference.chunk_frame_budget(text, 200, NUM_CB) < 200
        for got in (alone, batched):
            assert got.attempts == result.chunks[0].attempts
            assert torch.equal(got.best.aligned, result.codes)
            assert np.array_equal(got.best.audio, whole)
        assert torch.equal(s_result.codes, result.codes)
        assert snr_db(streamed, whole) >= SNR_BOUND_DB
    assert guarded  # the guard acted on at least one of them


def test_runaway_rows_of_a_batch_stop_at_their_own_budget_and_are_retried(endless):
    lines = []
    texts = ["Hi.", "Go now, please, and stop here, my good old friend."]
    results = inference.synthesize(endless, [inference.SpeechRequest(t, 1) for t in texts],
                                   SamplingParams(max_new_tokens=400), retries=1, log=lines.append)
    for text, result in zip(texts, results):
        budget = inference.chunk_frame_budget(text, 400, NUM_CB)
        assert budget < 400
        assert [a.frames for a in result.attempts] == [budget, budget]
        assert [a.seed for a in result.attempts] == [1, 2]
        assert all(a.outcome.startswith("runaway: no EOS") for a in result.attempts)
        assert not result.usable
    assert results[0].attempts[0].frames < results[1].attempts[0].frames
    assert sum("unusable: runaway" in line for line in lines) == 4


def test_streamed_attempt_nobody_heard_is_retried(tiny_engine):
    head = tiny_engine.model.audio_lm_head.weight
    saved = head.detach().clone()
    with torch.no_grad():  # EOS wins in every codebook: each attempt closes within the delay pattern
        rows = head.view(NUM_CB, tiny_engine.config.codebook_size, -1)
        rows[:, CFG_BOS + 1] = rows[:, :CFG_BOS].abs().sum(dim=1) * 10
    lines = []
    try:
        audio, result, pieces = spoken(tiny_engine, "Go now, please. Stop here.", retries=2, chunk_words=3,
                                       params=SamplingParams(max_new_tokens=40), stream=True, log=lines.append)
    finally:
        with torch.no_grad():
            head.copy_(saved)
    assert [len(c.attempts) for c in result.chunks] == [3, 3]  # nothing was heard, so every retry ran
    assert all(a.outcome.startswith(("too short", "nothing to decode")) for c in result.chunks for a in c.attempts)
    assert not any("kept: its audio is out already" in line for line in lines)
    assert audio.size == result.samples == result.codes.shape[0] * 960


def test_speak_refuses_bad_options_before_any_audio(tiny_engine):
    with pytest.raises(inference.UserError, match="empty"):
        inference.speak(tiny_engine, "  \n")
    with pytest.raises(inference.UserError, match="--chunk_words"):
        inference.speak(tiny_engine, "Hello.", chunk_words=-1)
    with pytest.raises(inference.UserError, match="--context_chunks"):
        inference.speak(tiny_engine, "Hello.", context_chunks=-2)
    with pytest.raises(inference.UserError, match="--retries"):
        inference.speak(tiny_engine, "One. Two. Three.", chunk_words=1, retries=inference.CHUNK_SEED_STRIDE)


# --------------------------------------------------------------------------- the CLI and eval_audio.py

ENGLISH = ["The sun is up.", "Birds sing now.", "We walk outside.", "The air is cool.", "Dogs bark twice.",
           "A boat goes by.", "Kids play ball.", "The bell rings.", "Rain may come.", "We go home.",
           "Tea is warm.", "The cat sleeps.", "Lights turn on.", "Stars come out.", "Night is here."]
CHINESE = ["太阳升起。", "鸟儿歌唱。", "我们出门。", "空气清新。", "小狗在叫。", "小船经过。", "孩子玩球。", "钟声响了。",
           "可能下雨。", "我们回家。", "茶很温暖。", "小猫睡觉。", "灯亮起来。", "星星出来。", "夜晚来了。"]
THIRTY = " ".join(s for pair in zip(ENGLISH, CHINESE) for s in pair)


def cli(tiny_ckpt, *args):
    return ["--model_path", str(tiny_ckpt[0]), "--tokenizer_path", str(tiny_ckpt[1]), "--device", "cpu", *args]


def test_thirty_sentences_make_one_wav_of_all_chunks_frames(tiny_ckpt, tmp_path, capsys):
    import json

    import soundfile as sf

    assert len(re.findall(r"[.。]", THIRTY)) == 30
    rc = inference.main(cli(tiny_ckpt, "--text", THIRTY, "--chunk_words", "12", "--max_new_tokens", "24",
                            "--retries", "0", "--output_dir", str(tmp_path), "--output", "long.wav"))
    out = capsys.readouterr().out
    assert rc in (0, 1)  # 1: a chunk of the random tiny model was unusable; the WAV holds every chunk anyway
    side = json.loads((tmp_path / "long.json").read_text())
    chunks = side["chunks"]
    assert len(chunks) == len(split_text(THIRTY, 12)) > 3
    assert no_space("".join(c["text"] for c in chunks)) == no_space(THIRTY)
    assert [c["start_frame"] for c in chunks] == [sum(c["frames"] for c in chunks[:i]) for i in range(len(chunks))]
    assert [c["seed"] for c in chunks] == [inference.chunk_seed(1, k) for k in range(len(chunks))]
    assert all(c["timings"]["decode_steps"] >= 1 and c["attempts"] for c in chunks)
    audio, rate = sf.read(tmp_path / "long.wav", dtype="float32")
    assert rate == 24000 and audio.size == sum(c["frames"] for c in chunks) * 960 == side["frames"] * 960
    assert side["time_to_first_audio_s"] > 0 and side["timings"]["real_time_factor"] > 0
    assert "Time to first audio" in out and f"chunk {len(chunks)}/{len(chunks)}" in out
    assert not list(tmp_path.glob(".*tmp"))


def run_subprocess(tiny_ckpt, *args, **kwargs):
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, str(inference.__file__), *cli(tiny_ckpt, *args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def test_stdout_pcm_is_the_file_output(tiny_ckpt, tmp_path, capsys):
    import soundfile as sf

    args = ["--text", THREE, "--chunk_words", "3", "--max_new_tokens", "40", "--retries", "0", "--seed", "4"]
    proc = run_subprocess(tiny_ckpt, *args, "--stream", "--output", "-")
    pcm, err = proc.communicate(timeout=300)
    assert proc.returncode in (0, 1), err.decode()
    assert b"Time to first audio" in err  # the log went to stderr
    piped, _ = sf.read(__import__("io").BytesIO(pcm), format="RAW", samplerate=24000, channels=1,
                       subtype="PCM_16", endian="LITTLE", dtype="int16")
    for stream in (["--stream"], []):
        inference.main(cli(tiny_ckpt, *args, *stream, "--output_dir", str(tmp_path), "--output", "f.wav"))
        capsys.readouterr()
        written, _ = sf.read(tmp_path / "f.wav", dtype="int16")
        assert written.size == piped.size > 0
        if stream:
            assert np.array_equal(written, piped)
        else:  # one decode vs windows: float rounding, at most one PCM step apart
            assert np.abs(written.astype(int) - piped).max() <= 1


def test_ctrl_c_during_a_streamed_file_leaves_nothing(tiny_ckpt, tmp_path):
    import signal
    import time
    import wave

    text = " ".join(ENGLISH * 4)
    proc = run_subprocess(tiny_ckpt, "--text", text, "--chunk_words", "3", "--max_new_tokens", "64",
                          "--retries", "0", "--stream", "--output_dir", str(tmp_path), "--output", "s.wav")
    grown = None
    deadline = time.monotonic() + 240
    while grown is None and proc.poll() is None and time.monotonic() < deadline:
        for tmp in tmp_path.glob(".s.wav.*.tmp"):
            size = tmp.stat().st_size
            if size > 44:  # audio has gone out
                with wave.open(str(tmp)) as w:  # the header of the growing file is a valid WAV's
                    grown = (w.getnchannels(), w.getframerate(), w.getsampwidth(), w.getnframes(), size)
        time.sleep(0.05)
    assert grown is not None, "the run ended (or stalled) before its WAV grew"
    channels, rate, width, frames, size = grown
    assert (channels, rate, width) == (1, 24000, 2) and 0 < 44 + 2 * frames <= size
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()
    assert "interrupted (Ctrl-C)" in err.decode() and "Traceback" not in err.decode()
    assert list(tmp_path.iterdir()) == []


def test_eval_performance_shows_long_text_streamed_and_one_shot(endless, tmp_path):
    import json

    import eval_audio

    text = " ".join(ENGLISH * 2)  # over --chunk_words 60: two chunks
    rc = eval_audio.main(["--mode", "performance", "--tokens", "40", "--repeats", "1", "--output_dir", str(tmp_path),
                          "--long_text", text], engine=endless)
    assert rc == 0
    lt = json.loads((tmp_path / "performance.json").read_text())["long_text"]
    stream, one_shot = lt["stream"], lt["one_shot"]
    assert stream["chunks"] == one_shot["chunks"] == len(split_text(text)) == 2
    assert stream["pieces"] > 1 and one_shot["pieces"] == 1
    for row in (stream, one_shot):
        assert row["time_to_first_audio_s"] > 0 and row["real_time_factor"] > 0 and row["audio_s"] > 0
    assert one_shot["time_to_first_audio_s"] == one_shot["total_s"]  # nothing before the whole text is done
    assert lt["streamed_vs_one_decode"]["same_codes"] and lt["streamed_vs_one_decode"]["snr_db"] >= SNR_BOUND_DB
    page = (tmp_path / "report.html").read_text()
    assert "Long text: streamed vs one-shot" in page
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "long text: time to first audio, streamed / one-shot (s)" in summary["headline"]
