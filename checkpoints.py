"""What a checkpoint folder must hold, checked before any weight is trusted.

A folder whose config.json names the right model but whose safetensors hold other tensors
loads without complaint in transformers: every unmatched weight is initialised at random and
the result speaks noise. So every loader (inference.load_engine, convert_weights.py's
verification, eval_audio.py through the engine, hub.py before and after a download) compares
the tensors on disk, or on the hub, with the ones the transformers class builds from the
config, and turns any difference into one UserError line.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit
# safetensors dtype -> bytes per element
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
               "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
EXAMPLES = 3  # tensor names shown in an error line


class UserError(Exception):
    """A mistake the user can fix: printed as one line, no traceback."""


# kind -> (model_type in config.json, transformers config class, model class, what users call it,
#          the name prefixes that identify it in an error line)
KINDS = {
    "model": ("higgs_audio_v2", "HiggsAudioV2Config", "HiggsAudioV2ForConditionalGeneration", "generation model",
              "model.layers.* / audio_lm_head.*"),
    "tokenizer": ("higgs_audio_v2_tokenizer", "HiggsAudioV2TokenizerConfig", "HiggsAudioV2TokenizerModel",
                  "audio tokenizer", "acoustic_encoder.* / quantizer.* / semantic_model.*"),
    # the evaluation models of quality.py (bash download.sh --eval_models)
    "whisper": ("whisper", "WhisperConfig", "WhisperForConditionalGeneration", "Whisper speech recognition model",
                "model.encoder.* / model.decoder.*"),
    "wavlm-sv": ("wavlm", "WavLMConfig", "WavLMForXVector", "WavLM speaker-verification model",
                 "wavlm.* / tdnn.* / feature_extractor.*"),
}
HIGGS_KINDS = ("model", "tokenizer")
PICKLE_KINDS = ("wavlm-sv",)  # microsoft/wavlm-base-plus-sv ships only pytorch_model.bin


# --------------------------------------------------------------------------- JSON and headers


def first_line(e: BaseException, limit: int | None = None) -> str:
    """An exception's first non-blank line (its type name when it has none), for one-line errors."""
    line = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    return line if limit is None else line[:limit]


def read_json(path: Path, what: str = "an object") -> dict:
    """A JSON file that must hold an object (config.json, an index, a processor config)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} is missing") from None
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise UserError(f"{path} cannot be read as JSON: {first_line(e)}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} holds a JSON {type(data).__name__}, expected {what} (re-run: bash download.sh)")
    return data


def parse_header(raw: bytes, where: str, data_bytes: int | None = None) -> dict[str, dict]:
    """A safetensors JSON header -> {name: {"dtype", "shape", "data_offsets"}}, every field checked.

    `data_bytes` is how many bytes follow the header in the file (None when unknown, as for
    a remote header): every tensor must lie inside them and fill exactly its shape.
    """
    try:
        header = json.loads(raw)
    except ValueError as e:  # also bad UTF-8
        raise UserError(f"{where}: not a safetensors file (header is not JSON: {first_line(e)})") from None
    if not isinstance(header, dict):
        raise UserError(f"{where}: not a safetensors file (header is a JSON {type(header).__name__})")
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        ok = (isinstance(entry, dict) and entry.get("dtype") in DTYPE_BYTES
              and isinstance(entry.get("shape"), list)
              and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in entry["shape"])
              and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2
              and all(isinstance(o, int) and not isinstance(o, bool) for o in entry["data_offsets"]))
        if not ok:
            raise UserError(f"{where}: tensor {name!r} has a malformed header entry (re-download this file)")
        start, end = entry["data_offsets"]
        if not 0 <= start <= end or end - start != math.prod(entry["shape"]) * DTYPE_BYTES[entry["dtype"]]:
            raise UserError(f"{where}: tensor {name!r} has offsets {entry['data_offsets']} that do not fit its "
                            f"shape {entry['shape']} {entry['dtype']} (re-download this file)")
        if data_bytes is not None and end > data_bytes:
            raise UserError(f"{where} is truncated: tensor {name!r} ends at byte {end} of the data, the file holds "
                            f"{data_bytes} (re-download this file)")
        tensors[name] = {"dtype": entry["dtype"], "shape": list(entry["shape"]), "data_offsets": [start, end]}
    return tensors


def read_header(path: Path) -> dict[str, dict]:
    """The checked header of a local safetensors file (reads only the header)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise UserError(f"{path} is truncated or not a safetensors file ({size} bytes; re-download it)")
            n = struct.unpack("<Q", head)[0]
            if n > MAX_HEADER_BYTES:
                raise UserError(f"{path}: not a safetensors file (header length {n} bytes is over the format's "
                                f"100 MB limit; re-download it)")
            if 8 + n > size:
                raise UserError(f"{path} is truncated: its header needs {8 + n} bytes, the file has {size} "
                                "(re-download it)")
            raw = f.read(n)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    return parse_header(raw, str(path), data_bytes=size - 8 - n)


def pickle_tensors(path: Path) -> dict[str, list[int]]:
    """{tensor name: shape} of a PyTorch pytorch_model.bin, read with torch.load(weights_only=True):
    plain tensors only, no code runs; memory-mapped, so nothing is read beyond what the shapes need."""
    import pickle
    import zipfile

    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, OSError) as e:
        detail = first_line(e, 160)
        raise UserError(f"{path}: not a readable PyTorch state dict ({detail}); re-download it") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise UserError(f"{path}: holds no state dict of tensors (re-download it)")
    return {name: list(t.shape) for name, t in state.items()}


def folder_tensors(folder: Path, pickle_ok: bool = False) -> dict[str, list[int]]:
    """{tensor name: shape} of a folder's model.safetensors, or of the shards its index lists
    (with `pickle_ok`, of its pytorch_model.bin when it has no safetensors)."""
    folder = Path(folder)
    index_path = folder / "model.safetensors.index.json"
    if not index_path.exists():
        single = folder / "model.safetensors"
        if not single.is_file() and pickle_ok and (folder / "pytorch_model.bin").is_file():
            return pickle_tensors(folder / "pytorch_model.bin")
        if not single.is_file():
            raise UserError(f"{folder} has no model.safetensors(.index.json) (re-run: bash download.sh)")
        return {name: e["shape"] for name, e in read_header(single).items()}
    index = read_json(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise UserError(f"{index_path}: weight_map must map tensor names to shard files (re-run: bash download.sh)")
    total = index.get("metadata", {}).get("total_size") if isinstance(index.get("metadata"), dict) else None
    if total is not None and (not isinstance(total, (int, float)) or isinstance(total, bool) or total < 0):
        raise UserError(f"{index_path}: metadata.total_size is {total!r}, not a byte count (re-run: bash download.sh)")
    shards = sorted(set(weight_map.values()))
    bad = [s for s in shards if Path(s).name != s]
    if bad:
        raise UserError(f"{index_path} names shard {bad[0]!r} outside the folder")
    missing = [s for s in shards if not (folder / s).is_file()]
    if missing:
        raise UserError(f"{folder} is incomplete: missing {', '.join(missing)} (re-run: bash download.sh)")
    found: dict[str, list[int]] = {}
    for shard in shards:
        for name, e in read_header(folder / shard).items():
            if name in found:
                raise UserError(f"{folder}: tensor {name} is stored in two shards (re-run: bash download.sh)")
            found[name] = e["shape"]
    for name, shard in weight_map.items():
        if name not in found:
            raise UserError(f"{index_path} lists {name} in {shard}, but no shard holds it (re-run: bash download.sh)")
    return found


# --------------------------------------------------------------------------- what the class expects


def _meta_model(kind: str, config: dict, where: str):
    """The transformers model built from `config` on the meta device (no memory, no weights)."""
    import torch
    import transformers

    model_type, config_cls, model_cls, what, _ = KINDS[kind]
    if config.get("model_type") != model_type:
        raise UserError(f"{where}: model_type {config.get('model_type')!r}, expected {model_type!r} "
                        f"(this is not a {'Higgs Audio V2 ' if kind in HIGGS_KINDS else ''}{what})")
    try:
        from huggingface_hub.errors import StrictDataclassError  # transformers 5.2x validates config fields
    except ImportError:
        StrictDataclassError = TypeError  # noqa: N806
    try:
        cfg = getattr(transformers, config_cls).from_dict(config)
        with torch.device("meta"):
            return getattr(transformers, model_cls)(cfg)
    # a config is untrusted input: a wrong type or size surfaces as any of these while building
    except (StrictDataclassError, TypeError, ValueError, KeyError, AttributeError, IndexError, ZeroDivisionError,
            RuntimeError) as e:
        detail = first_line(e)
        raise UserError(f"{where}: config.json does not describe a valid {what} ({detail[:160]})") from None


def _canonical_names(model, names) -> dict[str, str]:
    """Checkpoint name -> the model's name for it, with transformers' own load-time renames
    (legacy weight_g/weight_v -> parametrizations, base-model prefix). Exact names on a
    transformers without that API."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:
        return {n: n for n in names}
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta = model.state_dict()
    return {n: rename_source_key(n, renamings, converters, model.base_model_prefix, meta)[0] for n in names}


class Expected:
    """The tensors a Higgs Audio V2 class stores for one config, and which it may skip."""

    def __init__(self, kind: str, config: dict, where: str = "config.json"):
        if not isinstance(config, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(config).__name__}")
        self.kind = kind
        self.model = _meta_model(kind, config, where)
        tied = set(getattr(self.model, "all_tied_weights_keys", None) or {})
        self.shapes = {k: list(v.shape) for k, v in self.model.state_dict().items() if k not in tied}
        self.ignore_missing = [re.compile(p) for p in (self.model._keys_to_ignore_on_load_missing or ())]
        self.ignore_unexpected = [re.compile(p) for p in (self.model._keys_to_ignore_on_load_unexpected or ())]

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def expected_tensors(kind: str, config: dict, where: str = "config.json") -> dict[str, list[int]]:
    """{name: shape} the transformers class stores for `config` (tied copies left out)."""
    return Expected(kind, config, where).shapes


def describe(names) -> str:
    """What a set of tensor names looks like, for the error line."""
    names = list(names)
    tops = {n.split(".")[0] for n in names}
    if not names:
        return "no tensors"
    if any(n.startswith("model.layers.") for n in names) or "audio_lm_head" in tops:
        return f"{len(names)} tensors of a generation model (model.layers.*)"
    if tops & {"acoustic_encoder", "acoustic_decoder", "quantizer", "semantic_model"}:
        return f"{len(names)} tensors of an audio tokenizer (acoustic_encoder.* / quantizer.*)"
    if any(n.startswith("layers.") for n in names) or "audio_decoder_proj" in tops:
        return f"{len(names)} tensors of Boson's original generation model layout (convert it with convert_weights.py)"
    return f"{len(names)} tensors of an unknown model ({', '.join(sorted(tops)[:EXAMPLES])}, ...)"


def _examples(names) -> str:
    names = sorted(str(n) for n in names)
    return ", ".join(names[:EXAMPLES]) + (f" (+{len(names) - EXAMPLES} more)" if len(names) > EXAMPLES else "")


def check_tensors(kind: str, where: str, found: dict[str, list[int]], expected) -> None:
    """Raise one UserError line unless `found` holds exactly the tensors `expected` asks for.

    `expected` is an Expected (renames and ignore rules applied) or a plain {name: shape}.
    """
    shapes = expected.shapes if isinstance(expected, Expected) else expected
    rename = _canonical_names(expected.model, found) if isinstance(expected, Expected) else {n: n for n in found}
    ignore_unexpected = expected.ignore_unexpected if isinstance(expected, Expected) else []
    ignore_missing = expected.ignore_missing if isinstance(expected, Expected) else []
    have = {rename[n]: shape for n, shape in found.items()}
    missing = [n for n in shapes if n not in have and not any(p.search(n) for p in ignore_missing)]
    unexpected = [n for n in have if n not in shapes and not any(p.search(n) for p in ignore_unexpected)]
    wrong = [n for n in shapes if n in have and list(have[n]) != list(shapes[n])]
    if not (missing or unexpected or wrong):
        return
    what = KINDS[kind][3]
    matched = len(shapes) - len(missing) - len(wrong)
    if matched == 0 or matched < len(shapes) // 2:
        raise UserError(
            f"{where} holds {describe(found)}, not the {what}'s {KINDS[kind][4]}: "
            f"{matched} of {len(shapes)} expected tensors match (missing e.g. {_examples(missing)}); "
            f"see docs/{'download' if kind in HIGGS_KINDS else 'quality'}.md for sources that hold it"
        )
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({_examples(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({_examples(unexpected)})")
    if wrong:
        n = sorted(wrong)[0]
        parts.append(f"{len(wrong)} with another shape ({n}: {list(have[n])}, config.json says {shapes[n]})")
    raise UserError(f"{where} does not hold a complete {what}: {matched} of {len(shapes)} expected tensors match; "
                    f"{'; '.join(parts)} (re-run: bash download.sh)")


def verify_folder(kind: str, folder: Path, config: dict | None = None) -> Expected:
    """Headers of a local folder against its config.json; returns the Expected (for counts)."""
    folder = Path(folder)
    config = read_json(folder / "config.json") if config is None else config
    expected = Expected(kind, config, f"{folder}/config.json")
    index = folder / "model.safetensors.index.json"
    where = f"the shards in {folder}" if index.exists() else str(folder / "model.safetensors")
    if kind in PICKLE_KINDS and not index.exists() and not (folder / "model.safetensors").exists():
        where = str(folder / "pytorch_model.bin")
    check_tensors(kind, where, folder_tensors(folder, pickle_ok=kind in PICKLE_KINDS), expected)
    return expected


def check_loading_info(kind: str, folder: Path, info: dict) -> None:
    """transformers' own report after from_pretrained(output_loading_info=True): anything it
    had to initialise at random, or could not use, is an error."""
    problems = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
    if info.get("error_msgs"):
        problems["errors"] = [first_line(m) for m in info["error_msgs"]]
    if problems:
        detail = "; ".join(f"{k.replace('_', ' ')}: {_examples(v)}" for k, v in problems.items())
        raise UserError(f"{folder}: the {KINDS[kind][3]} does not load cleanly ({detail}) (re-run: bash download.sh)")


# --------------------------------------------------------------------------- the on-disk contract
# What a transformers-native Higgs Audio V2 folder holds beside its weights, as the hub repos
# have it. convert_weights.py writes it for real checkpoints, tiny_checkpoints.py for tests.

ASSETS = Path(__file__).resolve().parent / "assets"
CHAT_TEMPLATE_PATH = ASSETS / "chat_template.jinja"

NUM_CODEBOOKS = 8
CODEBOOK_SIZE = 1026  # 1024 codes + stream BOS (1024) + stream EOS (1025)
AUDIO_STREAM_BOS_ID = 1024
AUDIO_STREAM_EOS_ID = 1025
RAS_WIN_LEN = 7  # Boson's generation_config.json: repetition-aware sampling window
RAS_WIN_MAX_NUM_REPEAT = 2

# Llama-3 special tokens as Higgs Audio names them, in the real order (the real ones start
# at id 128000; the tiny test tokenizer appends them after its small BPE vocabulary).
SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|audio_bos|>",
    "<|audio_eos|>",
    "<|audio_out_bos|>",
    "<|reserved_special_token_6|>",  # delay token of the delay pattern
    "<|AUDIO|>",
    "<|AUDIO_OUT|>",
    "<|scene_desc_start|>",
    "<|scene_desc_end|>",
]

PROCESSOR_CONFIG = {
    "audio_bos_token": "<|audio_out_bos|>",
    "audio_delay_token": "<|reserved_special_token_6|>",
    "audio_eos_token": "<|audio_eos|>",
    "audio_stream_bos_id": AUDIO_STREAM_BOS_ID,
    "audio_stream_eos_id": AUDIO_STREAM_EOS_ID,
    "audio_token": "<|AUDIO_OUT|>",
    "processor_class": "HiggsAudioV2Processor",
}


def feature_extractor_args(sampling_rate: int) -> dict:
    """DacFeatureExtractor arguments of the audio tokenizer folder (raw mono samples in)."""
    return {"feature_size": 1, "hop_length": 1, "padding_side": "right", "padding_value": 0.0,
            "sampling_rate": sampling_rate, "return_attention_mask": True}


def generation_config_for(config):
    """generation_config.json: the config's special ids plus Boson's RAS defaults."""
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        ras_win_len=RAS_WIN_LEN,
        ras_win_max_num_repeat=RAS_WIN_MAX_NUM_REPEAT,
    )


def write_processor_files(model_dir: Path) -> None:
    """chat_template.jinja + processor_config.json, as the hub repo has them."""
    import shutil

    shutil.copyfile(CHAT_TEMPLATE_PATH, model_dir / "chat_template.jinja")
    (model_dir / "processor_config.json").write_text(json.dumps(PROCESSOR_CONFIG, indent=2) + "\n")
