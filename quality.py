"""Is it intelligible, is it the right voice: the one scorer behind `eval_audio.py --mode quality` and
`inference.py --asr_check`, measured as Seed-TTS-eval measures it (docs/quality.md).

    transcript = Transcriber("eval_models/whisper-large-v3")(audio, 24000, "en")
    score("Hello, world!", transcript)          # Score(metric="WER", error=0.0, ...)

Intelligibility: Whisper (transformers' real classes, from a local folder) transcribes the audio
resampled to 16 kHz, in the language of the text; the text and the transcript are normalised as
Seed-TTS-eval's run_wer.py does and compared with jiwer: by words (WER) for English and other
space-separated text, by characters (CER) for Chinese. Voice: the cosine of WavLMForXVector speaker
embeddings of the clip and its reference voice. Heavy imports (torch, transformers, jiwer) happen
inside the functions.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import checkpoints
from checkpoints import UserError

ASR_SAMPLE_RATE = 16000  # what Whisper and WavLM take
EVAL_MODELS = Path("eval_models")  # where `bash download.sh --eval_models` puts them
DEFAULT_ASR_MODEL = EVAL_MODELS / "whisper-large-v3"
DEFAULT_SV_MODEL = EVAL_MODELS / "wavlm-base-plus-sv"
DOWNLOAD_HINT = "bash download.sh --eval_models"
PROCESSOR_FILES = {"whisper": ("preprocessor_config.json", "tokenizer_config.json"),
                   "wavlm-sv": ("preprocessor_config.json",)}

_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_WORD = re.compile(r"[^\W_]+")
# full-width ASCII forms (U+FF01-FF5E) and the ideographic space, folded to ASCII
_FOLD_WIDTH = {0x3000: " ", **{c: c - 0xFEE0 for c in range(0xFF01, 0xFF5F)}}
_CURLY_APOSTROPHE = re.compile(r"(?<=[^\W\d_])[\u2019\u02bc](?=[^\W\d_])")  # it’s -> it's


# --------------------------------------------------------------------------- normalisation and scoring


@lru_cache(maxsize=1)
def punctuation() -> str:
    """Seed-TTS-eval's punctuation_all: zhon's Chinese punctuation + ASCII punctuation."""
    from zhon.hanzi import punctuation as hanzi

    return hanzi + string.punctuation


def language_of(text: str) -> str:
    """"zh" when Chinese characters are at least as many as the other words, else "en"."""
    han = len(_HAN.findall(text))
    words = len(_WORD.findall(_HAN.sub(" ", text)))
    return "zh" if han and han >= words else "en"


def fold(text: str) -> str:
    """The one step beyond Seed-TTS-eval: full-width letters and digits to ASCII (a text's "３" against
    Whisper's "3"), and a typographic apostrophe inside a word to "'" (kept, as Seed-TTS-eval keeps "'")."""
    return _CURLY_APOSTROPHE.sub("'", text.translate(_FOLD_WIDTH))


def to_simplified(text: str) -> str:
    """Seed-TTS-eval converts the Chinese transcript to simplified characters (zhconv, zh-cn)."""
    import zhconv

    return zhconv.convert(text, "zh-cn")


def normalize(text: str, lang: str) -> str:
    """Seed-TTS-eval's process_one, after fold(): Chinese in simplified characters, punctuation removed
    except "'", double spaces halved, lower-cased; Chinese then split into characters (Latin letters too).
    Seed-TTS-eval simplifies only the transcript and lower-cases only English: for its own test sets
    (simplified, hardly any Latin in the Chinese one) that is the same."""
    text = fold(text)
    if lang == "zh":
        text = to_simplified(text)
    for mark in punctuation():
        if mark != "'":
            text = text.replace(mark, "")
    text = text.replace("  ", " ").lower()
    return " ".join(text) if lang == "zh" else text


@dataclass
class Aligned:
    """One step of the text-vs-transcript alignment (quality.json keeps these fields)."""

    op: str  # "equal", "substitute", "delete" or "insert"
    ref: str  # the text's words (or characters) in this step
    hyp: str  # the transcript's


@dataclass
class Score:
    lang: str  # "en" or "zh"
    metric: str  # "WER" (words) or "CER" (characters)
    error: float | None  # (S + D + I) / reference units; None when the text has nothing to score
    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0
    reference_units: int = 0
    reference: str = ""  # normalised text
    hypothesis: str = ""  # normalised transcript
    alignment: list[Aligned] = field(default_factory=list)

    @property
    def unit(self) -> str:
        return "character" if self.metric == "CER" else "word"


def score(text: str, transcript: str, lang: str | None = None) -> Score:
    """WER (or CER for Chinese) of `transcript` against `text`, after Seed-TTS-eval's normalisation."""
    import jiwer

    lang = lang or language_of(text)
    metric = "CER" if lang == "zh" else "WER"
    ref, hyp = normalize(text, lang), normalize(transcript, lang)
    if not ref.split():
        return Score(lang, metric, None, hypothesis=hyp)
    out = jiwer.process_words(ref, hyp)  # jiwer's default: spaces collapsed and stripped, then split
    ref_words, hyp_words = out.references[0], out.hypotheses[0]
    alignment = [Aligned(c.type, " ".join(ref_words[c.ref_start_idx:c.ref_end_idx]),
                         " ".join(hyp_words[c.hyp_start_idx:c.hyp_end_idx])) for c in out.alignments[0]]
    return Score(lang, metric, float(out.wer), out.substitutions, out.deletions, out.insertions, len(ref_words),
                 " ".join(ref_words), " ".join(hyp_words), alignment)


def mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


# --------------------------------------------------------------------------- audio measures


def trailing_silence_s(audio, rate: int) -> float:
    """Seconds of near-silence at the end: the runaway rule's measure (inference.trailing_silent_frames,
    40 ms frames below -50 dBFS), on the audio at 24 kHz."""
    import inference

    rms = inference.frame_stats(inference.resample(audio, rate, inference.SAMPLE_RATE))[:, 0]
    frames = inference.trailing_silent_frames(rms)
    return round(frames / inference.FRAMES_PER_SECOND, 3)


def speech_rate(score_: Score, voiced_s: float) -> float | None:
    """Units heard (transcript words, or characters for Chinese) per second of audio before its trailing silence."""
    units = len(score_.hypothesis.split())
    return round(units / voiced_s, 3) if voiced_s > 0 else None


# --------------------------------------------------------------------------- model folders


def find_model(path, default: Path, prefix: str) -> Path:
    """`path` as given; without one, `default`, or else the one eval_models/{prefix}* folder there is
    (download.sh names the folder after the repo: --asr_model_repo openai/whisper-small -> whisper-small)."""
    if path:
        return Path(path)
    if default.is_dir():
        return default
    found = sorted(p for p in default.parent.glob(prefix + "*") if p.is_dir()) if default.parent.is_dir() else []
    return found[0] if len(found) == 1 else default


def check_model_folder(kind: str, path: Path, flag: str) -> Path:
    """The folder holds the model `kind` names, its tensors matching its config.json (checkpoints.py)."""
    what = checkpoints.KINDS[kind][3]
    if not path.is_dir():
        raise UserError(f"{flag} {path}: no {what} there; fetch it with: bash download.sh --eval_models "
                        f"(or pass {flag} PATH to a local copy)")
    config = checkpoints.read_json(path / "config.json")
    if config.get("model_type") != checkpoints.KINDS[kind][0]:
        raise UserError(f"{flag} {path}: config.json has model_type {config.get('model_type')!r}, not a {what} "
                        f"({checkpoints.KINDS[kind][0]!r}); fetch one with: bash download.sh --eval_models")
    checkpoints.verify_folder(kind, path, config)
    for name in PROCESSOR_FILES[kind]:
        if not (path / name).is_file():
            raise UserError(f"{flag} {path}: {name} is missing (re-run: bash download.sh --eval_models)")
    return path


def pick_dtype(device):
    import torch

    return torch.float32 if device.type == "cpu" else torch.float16 if device.type == "cuda" else torch.bfloat16


def _load(kind: str, cls, path: Path, device):
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars are noise in a log
    try:
        model, info = cls.from_pretrained(path, dtype=pick_dtype(device), output_loading_info=True)
    finally:
        hf_logging.enable_progress_bar()
    checkpoints.check_loading_info(kind, path, info)
    return model.to(device).eval()


class Transcriber:
    """Whisper from a local folder: float audio at any rate -> text, in a given language ("en", "zh")."""

    def __init__(self, path, device="cpu", flag: str = "--asr_model"):
        import torch
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        self.path = check_model_folder("whisper", Path(path), flag)
        self.device = torch.device(device)
        self.processor = WhisperProcessor.from_pretrained(self.path)
        self.model = _load("whisper", WhisperForConditionalGeneration, self.path, self.device)

    def __call__(self, audio, rate: int, lang: str) -> str:
        import torch

        import inference

        audio = inference.resample(audio, rate, ASR_SAMPLE_RATE)
        extractor = self.processor.feature_extractor
        long_form = audio.size > extractor.n_samples  # over 30 s: Whisper's own sequential long-form decoding
        inputs = extractor(audio, sampling_rate=ASR_SAMPLE_RATE, return_tensors="pt", return_attention_mask=True,
                           **({"truncation": False, "padding": "longest"} if long_form else {}))
        features = inputs.input_features.to(self.device, self.model.dtype)
        kwargs = {}
        if long_form:
            kwargs = {"attention_mask": inputs.attention_mask.to(self.device), "return_timestamps": True}
        with torch.inference_mode():
            ids = self.model.generate(features, language=lang, task="transcribe", **kwargs)
        ids = ids["sequences"] if isinstance(ids, dict) else ids
        return self.processor.batch_decode(ids, skip_special_tokens=True)[0].strip()


class SpeakerEncoder:
    """WavLMForXVector from a local folder: the cosine of two clips' speaker embeddings."""

    def __init__(self, path, device="cpu", flag: str = "--sv_model"):
        import torch
        from transformers import AutoFeatureExtractor, WavLMForXVector

        self.path = check_model_folder("wavlm-sv", Path(path), flag)
        self.device = torch.device(device)
        self.extractor = AutoFeatureExtractor.from_pretrained(self.path)
        self.model = _load("wavlm-sv", WavLMForXVector, self.path, self.device)
        # the x-vector's TDNN layers need this many feature frames (fewer raise inside the model), and its
        # statistics pooling two frames out of them (one gives a NaN standard deviation)
        cfg = self.model.config
        need = 2 + sum((k - 1) * d for k, d in zip(cfg.tdnn_kernel, cfg.tdnn_dilation))
        self.min_samples = next(n for n in range(1, 10 * ASR_SAMPLE_RATE, 80)
                                if int(self.model._get_feat_extract_output_lengths(torch.tensor(n))) >= need)

    def embed(self, audio, rate: int):
        import torch

        import inference

        audio = inference.resample(audio, rate, ASR_SAMPLE_RATE)
        if audio.size < self.min_samples:
            return None
        inputs = self.extractor(audio, sampling_rate=ASR_SAMPLE_RATE, return_tensors="pt")
        with torch.inference_mode():
            out = self.model(input_values=inputs.input_values.to(self.device, self.model.dtype))
        return torch.nn.functional.normalize(out.embeddings.float()[0], dim=-1).cpu()

    def similarity(self, audio, rate: int, ref_audio, ref_rate: int) -> float | None:
        """Cosine of the two embeddings; None when a clip is too short for the model (about 0.3 s)."""
        a, b = self.embed(audio, rate), self.embed(ref_audio, ref_rate)
        return None if a is None or b is None else float(a @ b)


# --------------------------------------------------------------------------- inference.py --asr_check


@dataclass
class Heard:
    """What AsrCheck heard in one attempt (the sidecar's `asr` entry)."""

    transcript: str
    metric: str  # "WER" or "CER"
    error: float | None  # None: nothing to score
    max_error: float


class AsrCheck:
    """One more retry rule for inference.synthesize: an attempt whose transcript is further than
    `max_error` (WER, or CER for Chinese) from its text is unusable. Called with (text, 24 kHz audio);
    returns (reason or None, what the sidecar records)."""

    def __init__(self, transcriber: Transcriber, max_error: float):
        self.transcriber = transcriber
        self.max_error = max_error

    def __call__(self, text: str, audio, rate: int = 24000) -> tuple[str | None, Heard]:
        lang = language_of(text)
        transcript = self.transcriber(audio, rate, lang)
        s = score(text, transcript, lang)
        info = Heard(transcript, s.metric, None if s.error is None else round(s.error, 4), self.max_error)
        if s.error is not None and s.error > self.max_error:
            heard = transcript if len(transcript) <= 60 else transcript[:57] + "..."
            return (f"ASR check: {s.metric} {s.error:.0%} > {self.max_error:.0%} "
                    f"({s.substitutions + s.deletions + s.insertions} of {s.reference_units} {s.unit}s differ; "
                    f"heard {heard!r})"), info
        return None, info
