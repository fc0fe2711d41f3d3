#!/usr/bin/env python3
"""Convert Boson's ORIGINAL Higgs Audio V2 checkpoints to the transformers-native layout.

    python3 convert_weights.py --src ./higgs-audio-v2-generation-3B-base --dst ./model_cache
    python3 convert_weights.py --src ./higgs-audio-v2-tokenizer --dst ./tokenizer_cache
    python3 convert_weights.py --src ORIGINAL --dst OUT --dry_run     # print the mapping only

The kind (generation model or audio tokenizer) is detected from the folder; --kind forces it.
Tensors are streamed one at a time (read, renamed / concatenated / weight-norm folded,
written), into a temp folder that is renamed into place only when complete and verified with
the loader inference.py uses. Every source tensor is mapped or explicitly dropped; anything
else is an error that names it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import shutil
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import checkpoints  # noqa: E402
import inference  # noqa: E402  (stdlib-only at import time)
from inference import UserError, add_flag, log, run_cli  # noqa: E402

SHARD_BYTES = 2 * 1024**3  # output shard size (peak RAM does not depend on it: tensors stream)
DELAY_TOKEN = "<|reserved_special_token_6|>"
DELAY_TOKEN_DEFAULT_ID = 128014
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
HUBERT_HEAD_DIM = 64  # HuBERT base (768 / 12) and large (1024 / 16)

# safetensors dtype name -> (torch dtype name, bytes per element)
ST_DTYPES = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
    "U8": ("uint8", 1), "BOOL": ("bool", 1),
}
TORCH_TO_ST = {v[0]: k for k, v in ST_DTYPES.items()}


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


# --------------------------------------------------------------------------- safetensors streaming


class SafetensorsFile:
    """Reads one tensor at a time with plain file reads (no mmap: RSS stays one tensor)."""

    def __init__(self, path: Path):
        self.path = path
        header = checkpoints.read_header(path)  # types, offsets and truncation checked
        with open(path, "rb") as f:
            self.data_start = 8 + struct.unpack("<Q", f.read(8))[0]
        self.entries = header
        for name, e in header.items():
            if e["dtype"] not in ST_DTYPES:
                raise UserError(f"{path}: tensor {name} has unsupported dtype {e['dtype']}")

    def shape(self, name) -> list[int]:
        return list(self.entries[name]["shape"])

    def dtype(self, name) -> str:
        return ST_DTYPES[self.entries[name]["dtype"]][0]

    def nbytes(self, name) -> int:
        start, end = self.entries[name]["data_offsets"]
        return end - start

    def iter_bytes(self, name, chunk: int = 16 * 1024**2):
        """The tensor's raw bytes in chunks: a copy never holds the whole tensor in memory."""
        start, end = self.entries[name]["data_offsets"]
        with open(self.path, "rb") as f:
            f.seek(self.data_start + start)
            left = end - start
            while left > 0:
                buf = f.read(min(chunk, left))
                if not buf:
                    raise UserError(f"{self.path} is truncated while reading {name}")
                left -= len(buf)
                yield buf

    def read(self, name):
        import torch

        e = self.entries[name]
        start, end = e["data_offsets"]
        buf = bytearray(end - start)
        with open(self.path, "rb") as f:
            f.seek(self.data_start + start)
            if f.readinto(buf) != len(buf):
                raise UserError(f"{self.path} is truncated while reading {name}")
        dtype = getattr(torch, ST_DTYPES[e["dtype"]][0])
        if not buf:
            return torch.empty(e["shape"], dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(e["shape"])


@dataclass
class Target:
    """One output tensor: its name, dtype, shape and how to produce it."""

    name: str
    dtype: str  # torch dtype name
    shape: list[int]
    sources: list[str]  # source keys it is made from
    how: str  # "copy", "concat", "weight-norm fold", ...
    produce: object = field(repr=False, default=None)  # () -> tensor
    chunks: object = field(repr=False, default=None)  # () -> iterator of raw bytes (streams, preferred)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ST_DTYPES[TORCH_TO_ST[self.dtype]][1]


def write_safetensors(path: Path, targets: list[Target]) -> None:
    """Header first (shapes are known), then each tensor's bytes as it is produced."""
    import torch

    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for t in targets:
        header[t.name] = {"dtype": TORCH_TO_ST[t.dtype], "shape": t.shape, "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in targets:
            if t.chunks is not None:
                written = 0
                for buf in t.chunks():
                    f.write(buf)
                    written += len(buf)
                if written != t.nbytes:
                    raise AssertionError(f"{t.name}: wrote {written} bytes, planned {t.nbytes}")
                continue
            tensor = t.produce()
            if list(tensor.shape) != t.shape or str(tensor.dtype).replace("torch.", "") != t.dtype:
                raise AssertionError(f"{t.name}: produced {tuple(tensor.shape)} {tensor.dtype}, planned {t.shape} {t.dtype}")
            data = tensor.contiguous().reshape(-1)
            if data.numel():
                f.write(data.view(torch.uint8).numpy())
            del tensor, data


def write_sharded(out_dir: Path, targets: list[Target]) -> list[str]:
    shards, current, size = [], [], 0
    for t in targets:
        if current and size + t.nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append(t)
        size += t.nbytes
    if current:
        shards.append(current)
    weight_map, names = {}, []
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(out_dir / name, shard)
        names.append(name)
        weight_map.update({t.name: name for t in shard})
    index = {"metadata": {"total_size": sum(t.nbytes for t in targets)}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


# --------------------------------------------------------------------------- plan (shared)


@dataclass
class Plan:
    kind: str  # "model" | "tokenizer"
    config: object  # the native transformers config
    targets: list[Target]
    dropped: list[tuple[str, str]]  # (source key, reason)
    notes: list[str]
    source_bytes: int
    extra_files: dict  # name -> source path to copy, or None to generate

    def print_mapping(self, log) -> None:
        log(f"Key mapping ({len(self.targets)} target tensors):")
        for t in self.targets:
            src = " + ".join(t.sources) if t.sources else "(generated)"
            log(f"  {src} -> {t.name} {t.shape} {t.dtype} [{t.how}]")
        log(f"Dropped ({len(self.dropped)} source tensors):")
        for key, reason in self.dropped:
            log(f"  {key}: {reason}")


# Transformations a rename-table row names (the generation model's frozen + trainable pairs are
# concatenated wherever they occur, so no row names that).
COPY = "copy"  # the tensor as it is
FOLD = "weight-norm fold"  # a g + v pair -> the plain weight g * v / ||v||; the module's other tensors copied
PAIR = "weight-norm pair"  # a g or v half, copied as the native parametrization's original0 / original1
UNFOLD = "weight-norm unfold"  # a plain weight -> the native (g over dim 2, v) pair


class Rule(NamedTuple):
    """One row of a rename table: the source keys `source` matches become `target`, made by `how`.

    target: a str.format template ({key}; {rest}: the key after the match; the pattern's named groups),
    a function (of the key; for FOLD, of the module path after the match), {half: name} for PAIR,
    or None: the key is dropped and `how` says why.
    """

    source: str | re.Pattern  # an exact key, or a pattern matched from the key's start
    target: object
    how: str  # COPY, FOLD, PAIR, UNFOLD; for a dropped key, the reason


def drop(source, reason: str) -> Rule:
    return Rule(source, None, reason)


def first_rule(rules, key: str, half: str | None = None):
    """(rule, match) of the first row whose source matches key, or (None, None); a PAIR row takes
    weight-norm halves only."""
    for rule in rules:
        if rule.how == PAIR and not half:
            continue
        m = re.fullmatch(re.escape(rule.source), key) if isinstance(rule.source, str) else rule.source.match(key)
        if m:
            return rule, m
    return None, None


def renamed(template: str, key: str, m: re.Match) -> str:
    return template.format(key=key, rest=key[m.end():], **m.groupdict())


def check_targets(plan_targets: list[Target], expected: dict, allowed_extra=()) -> None:
    """Every tensor the native model holds is filled, with the shape its config gives."""
    names = {t.name for t in plan_targets}
    missing = sorted(set(expected) - names)
    if missing:
        raise UserError(f"the source does not provide {len(missing)} tensor(s) the native model needs: "
                        + ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""))
    extra = sorted(names - set(expected) - set(allowed_extra))
    if extra:
        raise AssertionError(f"mapping produced tensors the native model does not have: {extra[:8]}")
    bad = [f"{t.name} {t.shape} (config says {expected[t.name]})" for t in plan_targets
           if t.name in expected and t.shape != expected[t.name]]
    if bad:
        raise UserError("shapes do not match the config: " + "; ".join(bad[:6]))


def expected_shapes(model_cls, config, **kwargs) -> dict:
    import torch

    with torch.device("meta"):
        model = model_cls(config, **kwargs)
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def in_native_order(targets: list[Target], order) -> list[Target]:
    """Sorted the way the native model lists its tensors; any it does not list go last."""
    rank = {name: i for i, name in enumerate(order)}
    return sorted(targets, key=lambda t: rank.get(t.name, len(rank)))


def unknown_error(keys: list[str], what: str) -> UserError:
    shown = ", ".join(keys[:10]) + (f" ... ({len(keys)} in all)" if len(keys) > 10 else "")
    return UserError(f"unknown tensor name(s) in the {what}: {shown}; nothing was written")


def dtype_name(tensor) -> str:
    return str(tensor.dtype).replace("torch.", "")


# --------------------------------------------------------------------------- generation model: rules


LAYER_RE = re.compile(
    r"^layers\.(\d+)\.((?:self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj|audio_mlp\.(?:gate|up|down)_proj)"
    r"\.(?:weight|bias)|(?:input_layernorm|post_attention_layernorm|audio_input_layernorm"
    r"|audio_post_attention_layernorm)\.weight)$"
)
# A PartiallyFrozen fine-tune stores X.weight as X.{embedding|linear}_frozen.weight + ..._trainable.weight:
# the pair counts as X.weight below and is concatenated on dim 0.
SPLIT_RE = re.compile(r"^(.*)\.(embedding|linear)_(frozen|trainable)\.weight$")
# What the native model cannot express: refused before anything is planned (what, pattern searched in the key).
MODEL_REFUSED = (
    ("audio tower with weights (audio understanding; not expressible)", re.compile(r"^(audio_tower|audio_encoder_proj)\.")),
    ("audio self-attention", re.compile(r"\.audio_attn\.|audio_post_audio_attn")),
    ("audio embedding projector", re.compile(r"^audio_out_embed_projector\.")),
    ("audio-head transformer layers / RQ-transformer", re.compile(r"^audio_decoder_proj\.(?!audio_lm_head|text_lm_head)")),
)
# Boson config.json switches the native model cannot express: (field, refused when set (else when unset), error)
MODEL_CONFIG_REFUSED = (
    ("use_audio_out_self_attention", True,
     "use_audio_out_self_attention is on: the native model has no audio self-attention"),
    ("use_rq_transformer", True, "use_rq_transformer is on: the native model has no RQ-transformer head"),
    ("use_delay_pattern", False,
     "use_delay_pattern is off: the native model and inference.py decode with the delay pattern only"),
    ("audio_decoder_proj_num_layers", True,
     "audio_decoder_proj_num_layers > 0: the native model has no transformer layers in its audio head"),
    ("use_audio_out_embed_projector", True,
     "use_audio_out_embed_projector is on: the native model has no audio embedding projector"),
    ("audio_embed_avg", True, "audio_embed_avg is on: the native model sums the codebook embeddings"),
)
TEXT_HEAD = "audio_decoder_proj.text_lm_head.weight"


def model_rules(keep_text_head: bool) -> tuple[Rule, ...]:
    """Every source key of the generation model (a frozen / trainable half as its X.weight): first match decides."""
    text_head = (Rule(TEXT_HEAD, "text_lm_head.weight", COPY) if keep_text_head
                 else drop(TEXT_HEAD, "text head, not needed for speech (keep it with --keep_text_head)"))
    return (
        drop(re.compile(r".*rotary_emb\.inv_freq\Z", re.S), "rotary buffer, recomputed from the config"),
        drop("audio_codebook_weights", "unused codebook loss weights"),
        text_head,
        Rule("embed_tokens.weight", "model.embed_tokens.weight", COPY),
        Rule("norm.weight", "model.norm.weight", COPY),
        Rule("audio_codebook_embeddings.weight", "model.embed_audio_tokens.embed_audio_tokens.weight", COPY),
        Rule("audio_decoder_proj.audio_lm_head.weight", "audio_lm_head.weight", COPY),
        Rule(LAYER_RE, "model.{key}", COPY),  # attention, text MLP, audio MLP (dual FFN), their norms
    )


# --------------------------------------------------------------------------- generation model


def read_index(src: Path) -> dict[str, SafetensorsFile]:
    """key -> open shard, from model.safetensors.index.json or a single model.safetensors."""
    index_path = src / "model.safetensors.index.json"
    if index_path.exists():
        weight_map = inference.read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise UserError(f"{index_path} has no weight_map")
        shard_names = sorted(set(weight_map.values()))
        missing = [s for s in shard_names if not (src / s).is_file()]
        if missing:
            raise UserError(f"{src} is incomplete: missing shard(s) {', '.join(missing)}")
        files = {s: SafetensorsFile(src / s) for s in shard_names}
        result = {}
        for key, shard in weight_map.items():
            if key not in files[shard].entries:
                raise UserError(f"{index_path} lists {key} in {shard}, but that shard does not hold it")
            result[key] = files[shard]
        for shard, f in files.items():
            for key in f.entries:
                result.setdefault(key, f)
        return result
    single = src / "model.safetensors"
    if single.is_file():
        f = SafetensorsFile(single)
        return {key: f for key in f.entries}
    raise UserError(f"{src} has no model.safetensors.index.json or model.safetensors")


def tokenizer_special_ids(src: Path) -> dict[str, int]:
    path = src / "tokenizer.json"
    if not path.is_file():
        raise UserError(
            f"{src} has no tokenizer.json: the converted folder must carry the text tokenizer "
            "(copy tokenizer.json, tokenizer_config.json and special_tokens_map.json of the original repo into it)"
        )
    data = inference.read_json(path)
    ids = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
    vocab = data.get("model", {}).get("vocab") or {}
    for name in (DELAY_TOKEN, "<|eot_id|>", "<|begin_of_text|>", "<|end_of_text|>", "<|AUDIO_OUT|>",
                 "<|audio_out_bos|>", "<|audio_eos|>"):
        if name not in ids and isinstance(vocab, dict) and name in vocab:
            ids[name] = vocab[name]
    return ids


def refuse_model_config(cfg: dict, num_layers: int) -> list[str]:
    """Errors for what HiggsAudioV2 cannot express; returns notes for what is ignored."""
    adapter = cfg.get("audio_adapter_type", "stack")
    layers = cfg.get("audio_dual_ffn_layers") or []
    if adapter not in ("dual_ffn", "dual_ffn_fast_forward"):
        raise UserError(f"audio_adapter_type {adapter!r}: the native model has a dual FFN (audio MLP) in every "
                        "layer; this checkpoint cannot be converted")
    uncovered = sorted(set(range(num_layers)) - set(layers))
    if uncovered:
        raise UserError(
            f"audio_dual_ffn_layers covers {len(set(layers) & set(range(num_layers)))} of {num_layers} layers "
            f"(not {uncovered[:6]}{' ...' if len(uncovered) > 6 else ''}): fast-forward layers cannot be expressed "
            "by the native model (they would load with missing weights and give wrong audio)"
        )
    for name, refused_when_set, why in MODEL_CONFIG_REFUSED:
        if bool(cfg.get(name)) == refused_when_set:
            raise UserError(f"{why}; this checkpoint cannot be converted")
    notes = []
    if not cfg.get("skip_audio_tower", False):
        notes.append("config has skip_audio_tower false but the checkpoint holds no audio-tower weights: "
                     "nothing to convert there (audio input understanding is not used for speech generation)")
    return notes


def rope_parameters(text: dict) -> dict:
    theta = float(text.get("rope_theta", 10000.0))
    scaling = text.get("rope_scaling") or text.get("rope_parameters")
    if not scaling:
        return {"rope_type": "default", "rope_theta": theta}
    params = dict(scaling)
    params["rope_type"] = params.pop("type", None) or params.get("rope_type", "default")
    params.setdefault("rope_theta", theta)
    return params


def classify_model_keys(keys: list[str], keep_text_head: bool) -> tuple[dict, list]:
    """Source keys -> ({native name: {"whole" | "frozen" | "trainable": source key}}, dropped); refuses
    what the native model cannot express and names every key no rule knows, before anything is planned."""
    for what, pattern in MODEL_REFUSED:
        found = [k for k in keys if pattern.search(k)]
        if found:
            raise UserError(f"the checkpoint has {what}: {', '.join(found[:4])}{' ...' if len(found) > 4 else ''}; "
                            "the native model cannot express it")
    rules = model_rules(keep_text_head)
    groups: dict[str, dict[str, str]] = {}
    dropped, unknown = [], []
    for key in keys:
        split = SPLIT_RE.match(key)
        base, part = (f"{split.group(1)}.weight", split.group(3)) if split else (key, "whole")
        rule, m = first_rule(rules, base)
        if rule is None:
            unknown.append(key)
            continue
        if rule.target is None:
            dropped.append((key, rule.how))
            continue
        target = renamed(rule.target, base, m)
        if part in groups.setdefault(target, {}):
            raise UserError(f"two source tensors map to {target}: {groups[target][part]} and {key}")
        groups[target][part] = key
    if unknown:
        raise unknown_error(unknown, "generation checkpoint")
    for target, parts in groups.items():
        if "whole" in parts and len(parts) > 1 or "whole" not in parts and set(parts) != {"frozen", "trainable"}:
            raise UserError(f"{target}: expected one tensor or a frozen + trainable pair, got {sorted(parts.values())}")
    return groups, dropped


def native_model_config(src: Path, cfg: dict, text: dict, groups: dict, shards: dict):
    """(HiggsAudioV2Config, notes) from Boson's config.json, its tokenizer.json and the embedding tensor."""
    from transformers import HiggsAudioV2Config

    notes = []
    tok_ids = tokenizer_special_ids(src)
    if "model.embed_tokens.weight" not in groups:
        raise UserError(f"{src} has no embed_tokens.weight: not a Higgs Audio generation model checkpoint")
    emb_key = groups["model.embed_tokens.weight"]
    vocab = sum(shards[k].shape(k)[0] for k in emb_key.values())
    hidden = int(text["hidden_size"])
    num_cb = int(cfg.get("audio_num_codebooks", 12))
    codebook_size = int(cfg.get("audio_codebook_size", 1024)) + 2  # + stream BOS + stream EOS
    heads = int(text["num_attention_heads"])
    head_dim = int(text.get("head_dim") or hidden // heads)
    for name, expect in (("<|AUDIO_OUT|>", cfg.get("audio_out_token_idx", 128016)),
                         ("<|audio_out_bos|>", cfg.get("audio_out_bos_token_id", 128013))):
        if name in tok_ids and tok_ids[name] != expect:
            raise UserError(f"tokenizer.json gives {name} id {tok_ids[name]} but config.json says {expect}")
    delay_id = tok_ids.get(DELAY_TOKEN, DELAY_TOKEN_DEFAULT_ID)
    if DELAY_TOKEN not in tok_ids:
        notes.append(f"{DELAY_TOKEN} not in tokenizer.json: delay token id {DELAY_TOKEN_DEFAULT_ID}")
    eos_id = tok_ids.get("<|eot_id|>", 128009)
    pad_id = cfg.get("pad_token_id", text.get("pad_token_id", tok_ids.get("<|end_of_text|>", 128001)))
    bos_id = text.get("bos_token_id", tok_ids.get("<|begin_of_text|>", 128000))
    dtype = shards[next(iter(emb_key.values()))].dtype(next(iter(emb_key.values())))
    config = HiggsAudioV2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(text["intermediate_size"]),
        num_hidden_layers=int(text["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(text.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        hidden_act=text.get("hidden_act", "silu"),
        max_position_embeddings=int(text.get("max_position_embeddings", 131072)),
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-5)),
        rope_parameters=rope_parameters(text),
        attention_bias=bool(text.get("attention_bias", False)),
        mlp_bias=bool(text.get("mlp_bias", False)),
        tie_word_embeddings=False,
        num_codebooks=num_cb,
        codebook_size=codebook_size,
        audio_token_id=int(cfg.get("audio_out_token_idx", 128016)),
        audio_bos_token_id=int(cfg.get("audio_out_bos_token_id", 128013)),
        audio_delay_token_id=int(delay_id),
        audio_stream_bos_id=int(cfg.get("audio_stream_bos_id", 1024)),
        audio_stream_eos_id=int(cfg.get("audio_stream_eos_id", 1025)),
        bos_token_id=int(bos_id),
        eos_token_id=int(eos_id),
        pad_token_id=int(pad_id),
    )
    config.architectures = ["HiggsAudioV2ForConditionalGeneration"]
    config.dtype = dtype
    return config, notes


def streamed_copy(name: str, f: SafetensorsFile, key: str) -> Target:
    return Target(name, f.dtype(key), f.shape(key), [key], "copy", lambda: f.read(key), lambda: f.iter_bytes(key))


def streamed_concat(name: str, fa: SafetensorsFile, a: str, fb: SafetensorsFile, b: str) -> Target:
    """A frozen + trainable pair joined on dim 0: for row-major tensors, the bytes of b appended to a's."""
    if fa.dtype(a) != fb.dtype(b) or fa.shape(a)[1:] != fb.shape(b)[1:]:
        raise UserError(f"{a} and {b} cannot be concatenated: {fa.shape(a)} {fa.dtype(a)} vs {fb.shape(b)} {fb.dtype(b)}")

    def concat():
        import torch

        return torch.cat([fa.read(a), fb.read(b)], dim=0)

    def concat_bytes():
        yield from fa.iter_bytes(a)
        yield from fb.iter_bytes(b)

    return Target(name, fa.dtype(a), [fa.shape(a)[0] + fb.shape(b)[0], *fa.shape(a)[1:]], [a, b],
                  "concat frozen + trainable (dim 0)", concat, concat_bytes)


def plan_model(src: Path, keep_text_head: bool) -> Plan:
    from transformers import HiggsAudioV2ForConditionalGeneration

    cfg = inference.read_json(src / "config.json")
    text = cfg.get("text_config") or {}
    if not text:
        raise UserError(f"{src}/config.json has no text_config")
    notes = refuse_model_config(cfg, int(text["num_hidden_layers"]))
    shards = read_index(src)
    source_bytes = sum(f.path.stat().st_size for f in {id(f): f for f in shards.values()}.values())
    groups, dropped = classify_model_keys(sorted(shards), keep_text_head)
    config, config_notes = native_model_config(src, cfg, text, groups, shards)
    targets = [streamed_copy(name, shards[parts["whole"]], parts["whole"]) if "whole" in parts
               else streamed_concat(name, shards[parts["frozen"]], parts["frozen"],
                                    shards[parts["trainable"]], parts["trainable"])
               for name, parts in groups.items()]
    # ordered as the model without the optional text head lists its tensors: the text head goes last
    targets = in_native_order(targets, expected_shapes(HiggsAudioV2ForConditionalGeneration, config))
    check_targets(targets, expected_shapes(HiggsAudioV2ForConditionalGeneration, config, use_text_head=keep_text_head))
    extra = {name: src / name for name in TOKENIZER_FILES if (src / name).is_file()}
    return Plan("model", config, targets, dropped, notes + config_notes, source_bytes, extra)


def write_model_folder(plan: Plan, out: Path, log) -> None:
    names = write_sharded(out, plan.targets)
    log(f"  wrote {len(names)} shard(s) + index ({len(plan.targets)} tensors)")
    plan.config.save_pretrained(out)
    checkpoints.generation_config_for(plan.config).save_pretrained(out)
    for name, path in plan.extra_files.items():
        shutil.copyfile(path, out / name)
    checkpoints.write_processor_files(out)  # chat_template.jinja + processor_config.json
    log("  wrote config.json, generation_config.json, tokenizer files, chat_template.jinja, processor_config.json")


def verify_model(path: Path, log) -> None:
    """The checks inference.py makes, a strict load and one forward over a real chat prompt."""
    import torch
    from transformers import AutoTokenizer, HiggsAudioV2ForConditionalGeneration
    from transformers.utils import logging as hf_logging

    config = inference.check_model_dir(path)
    checkpoints.verify_folder("model", path, config)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        dtype = getattr(torch, config.get("dtype") or "float32")
        model, info = HiggsAudioV2ForConditionalGeneration.from_pretrained(path, dtype=dtype, output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(path)
    finally:
        hf_logging.set_verbosity_warning()
    checkpoints.check_loading_info("model", path, info)
    messages = inference.chat_messages("Hello.", inference.DEFAULT_SCENE)
    rendered = tokenizer.apply_chat_template(messages, chat_template=(path / "chat_template.jinja").read_text(),
                                             tokenize=False, add_generation_prompt=True)
    ids = tokenizer(rendered, add_special_tokens=False, return_tensors="pt").input_ids
    if ids[0, -1].item() != model.config.audio_bos_token_id:
        raise UserError(f"verification: the chat prompt does not end with <|audio_out_bos|> "
                        f"(id {model.config.audio_bos_token_id}); check the tokenizer files")
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    want = model.config.num_codebooks * model.config.codebook_size
    if logits.shape[-1] != want or not torch.isfinite(logits).all():
        raise UserError(f"verification: forward gave logits {tuple(logits.shape)} (finite: "
                        f"{bool(torch.isfinite(logits).all())}), expected last dim {want}")
    log(f"  verified: strict load, chat prompt of {ids.shape[1]} tokens, forward -> logits {tuple(logits.shape)} finite")


# --------------------------------------------------------------------------- audio tokenizer: rules


ORIGINAL_TOKENIZER_KEYS = ("n_q", "ratios", "D")
POS_CONV = "semantic_model.encoder.pos_conv_embed.conv"  # HuBERT's positional conv: weight norm over dim 2
WEIGHT_NORM_RE = re.compile(
    r"^(.*)\.(weight_g|weight_v|parametrizations\.weight\.original0|parametrizations\.weight\.original1)$")
WEIGHT_NORM_HALF = {"weight_g": "g", "parametrizations.weight.original0": "g",
                    "weight_v": "v", "parametrizations.weight.original1": "v"}


def tokenizer_rules(nb: int) -> tuple[Rule, ...]:
    """Every model.pth key of a codec with nb encoder / decoder blocks: the first row that matches decides.
    A FOLD row's target names the key's module from what follows the match (Boson's DAC Sequential
    indices), or None: unknown; a PAIR row's target is {half: native name}."""
    return (
        drop(re.compile(r"^quantizer\.vq\.layers\.\d+\._codebook\.(inited|cluster_size|embed_avg)$"),
             "RVQ training buffer (the native buffer gets its inference default)"),
        drop("semantic_model.masked_spec_embed", "HuBERT training-only mask embedding"),
        Rule(re.compile(r"encoder\.block\."), partial(acoustic_module, "acoustic_encoder", nb), FOLD),
        Rule(re.compile(r"decoder_2\.model\."), partial(acoustic_module, "acoustic_decoder", nb), FOLD),
        Rule(re.compile(r"encoder_semantic\.|decoder_semantic\."), semantic_codec_name, COPY),
        Rule(re.compile(r"^quantizer\.vq\.layers\.(?P<i>\d+)\._codebook\.embed$"),
             "quantizer.quantizers.{i}.codebook.embed", COPY),
        Rule(re.compile(r"^quantizer\.vq\.layers\.(?P<i>\d+)\.(?P<proj>project_(?:in|out)\.(?:weight|bias))$"),
             "quantizer.quantizers.{i}.{proj}", COPY),
        Rule(re.compile(r"fc_prior\."), "fc.{rest}", COPY),
        Rule(re.compile(r"fc_post1\."), "fc1.{rest}", COPY),
        Rule(re.compile(r"fc_post2\."), "fc2.{rest}", COPY),
        Rule(re.compile(re.escape(f"{POS_CONV}.")), {"g": f"{POS_CONV}.parametrizations.weight.original0",
                                                      "v": f"{POS_CONV}.parametrizations.weight.original1"}, PAIR),
        Rule(f"{POS_CONV}.weight", f"{POS_CONV}.parametrizations.weight", UNFOLD),
        Rule(re.compile(r"semantic_model\."), "{key}", COPY),  # HuBERT: the native names already
    )


def _default_true(shape):
    import torch

    return torch.ones(1)


def _zeros(shape):
    import torch

    return torch.zeros(shape)


def _identity(shape):
    import torch

    return torch.eye(shape[0])


class Default(NamedTuple):
    """A native tensor model.pth has no counterpart for, and the value it gets when written."""

    pattern: re.Pattern  # matched against the native name
    how: str
    value: object  # shape -> tensor
    square_only: bool = False


TOKENIZER_DEFAULTS = (
    Default(re.compile(r"^quantizer\.quantizers\.\d+\.codebook\.inited$"), "default (True)", _default_true),
    Default(re.compile(r"^quantizer\.quantizers\.\d+\.codebook\.(cluster_size|embed_avg)$"),
            "default (zeros, unused at inference)", _zeros),
    # Boson has an Identity when codebook_dim == dim; a non-square projection stays missing
    Default(re.compile(r"^quantizer\.quantizers\.\d+\.project_(in|out)\.weight$"),
            "identity (Boson has no projection)", _identity, square_only=True),
    Default(re.compile(r"^quantizer\.quantizers\.\d+\.project_(in|out)\.bias$"), "zeros (Boson has no projection)", _zeros),
)


# --------------------------------------------------------------------------- audio tokenizer


def fold_weight_norm(g, v):
    """weight = g * v / ||v||, the norm over every dim where g has size 1 (dim 0 for Conv1d,
    the input-channel dim 0 for ConvTranspose1d, dim 2 for HuBERT's positional conv)."""
    dims = [d for d in range(v.dim()) if g.shape[d] == 1]
    v32, g32 = v.float(), g.float()
    norm = v32.pow(2).sum(dim=dims, keepdim=True).sqrt()
    return (v32 * (g32 / norm)).to(v.dtype)


def load_pth(path: Path) -> dict:
    import torch

    import pickle
    import zipfile

    try:
        with open(path, "rb") as f:
            head = f.read(2)
        zipped = zipfile.is_zipfile(path)
    except FileNotFoundError:
        raise UserError(f"{path} is missing") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    if not zipped and head == b"PK":
        raise UserError(f"{path} is truncated (a zip archive without its end); re-download Boson's audio tokenizer")
    if not zipped and head[:1] != b"\x80":  # torch.save writes a zip, or (legacy) a pickle: protocol byte 0x80
        raise UserError(f"{path} is not a PyTorch checkpoint (neither torch.save's zip format nor its legacy "
                        "pickle); re-download Boson's audio tokenizer")
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) format cannot be mmapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refuses anything but tensors and containers
        lines = str(e).splitlines() or [type(e).__name__]
        why = next((line.strip() for line in lines if "Unsupported" in line), lines[0])
        raise UserError(f"{path} cannot be loaded safely (weights_only): {why}") from None
    except Exception as e:  # torch reports a truncated or garbled file with many error types (EOFError, KeyError, ...)
        detail = checkpoints.first_line(e) if str(e).strip() else ""
        raise UserError(f"{path} is truncated or not a PyTorch checkpoint ({type(e).__name__}"
                        f"{': ' + detail[:120] if detail else ''}); re-download Boson's audio tokenizer") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} is not a flat state dict of tensors")
    return state


def acoustic_module(native: str, nb: int, path: str) -> str | None:
    """Boson's DAC Sequential indices (`path`: the module after encoder.block. / decoder_2.model.) -> the
    native DacEncoder / DacDecoder module, or None."""
    try:
        parts = path.split(".")
        top = int(parts[0])
        rest = parts[1:]
        outer = {0: "conv1", nb + 1: "snake1", nb + 2: "conv2"}  # the same in encoder and decoder
        if top in outer:
            return f"{native}.{outer[top]}"
        if not (1 <= top <= nb and rest[:1] == ["block"]):
            return None
        j = int(rest[1])
        base = f"{native}.block.{top - 1}"
        unit = ["snake1", "conv1", "snake2", "conv2"]  # ResidualUnit's Sequential
        if native == "acoustic_encoder":  # block: 3 ResidualUnits (dilation 1, 3, 9), snake, conv
            if j <= 2:
                return f"{base}.res_unit{j + 1}.{unit[int(rest[3])]}"
            return f"{base}.snake1" if j == 3 else f"{base}.conv1"
        if j == 0:  # decoder block: snake, transposed conv, 3 ResidualUnits
            return f"{base}.snake1"
        if j == 1:
            return f"{base}.conv_t1"
        return f"{base}.res_unit{j - 1}.{unit[int(rest[3])]}"
    except (ValueError, IndexError):
        return None


def semantic_codec_name(key: str) -> str:
    for old, new in ((".conv.conv.", ".conv."), (".conv.deconv.", ".conv."), (".conv1.conv.", ".conv1."),
                     (".conv2.conv.", ".conv2.")):
        key = key.replace(old, new)
    return key


def conv_weight(state: dict, module: str):
    """A conv's weight as its shape reads: the v of a weight-norm pair (either spelling) or the plain weight."""
    for name in ("weight_v", "parametrizations.weight.original1", "weight"):
        if f"{module}.{name}" in state:
            return state[f"{module}.{name}"]
    return None


def hubert_config(state: dict) -> dict:
    p = "semantic_model."
    need = f"{p}feature_projection.projection.weight"
    if need not in state:
        raise UserError(f"model.pth has no {need}: the semantic teacher is not a HuBERT model")
    hidden = state[need].shape[0]
    convs = sorted(int(m.group(1)) for k in state
                   if (m := re.match(rf"^{p}feature_extractor\.conv_layers\.(\d+)\.conv\.weight$", k)))
    layers = {int(m.group(1)) for k in state if (m := re.match(rf"^{p}encoder\.layers\.(\d+)\.", k))}
    pos = conv_weight(state, POS_CONV)
    if not convs or not layers or pos is None or hidden % HUBERT_HEAD_DIM:
        raise UserError("model.pth: cannot read the HuBERT sizes from its tensors")
    if len(convs) != 7:
        raise UserError(f"model.pth: HuBERT with {len(convs)} feature-extractor convs (expected 7)")
    group_norm = f"{p}feature_extractor.conv_layers.1.layer_norm.weight" not in state
    return {
        "hidden_size": hidden,
        "num_hidden_layers": len(layers),
        "num_attention_heads": hidden // HUBERT_HEAD_DIM,
        "intermediate_size": state[f"{p}encoder.layers.0.feed_forward.intermediate_dense.weight"].shape[0],
        "conv_dim": [state[f"{p}feature_extractor.conv_layers.{i}.conv.weight"].shape[0] for i in convs],
        "conv_kernel": [state[f"{p}feature_extractor.conv_layers.{i}.conv.weight"].shape[2] for i in convs],
        "conv_stride": [5, 2, 2, 2, 2, 2, 2],
        "conv_bias": f"{p}feature_extractor.conv_layers.0.conv.bias" in state,
        "feat_extract_norm": "group" if group_norm else "layer",
        "do_stable_layer_norm": not group_norm,  # HuBERT base: group / post-norm; large: layer / pre-norm
        "feat_proj_layer_norm": f"{p}feature_projection.layer_norm.weight" in state,
        "num_conv_pos_embeddings": pos.shape[2],
        "num_conv_pos_embedding_groups": hidden // pos.shape[1],
        "mask_time_prob": 0.0,
    }


def refuse_tokenizer_config(cfg: dict) -> None:
    """Errors for what HiggsAudioV2Tokenizer cannot express."""
    teacher = cfg.get("semantic_techer", "hubert_base")
    if teacher not in ("hubert_base", "hubert_base_general"):
        raise UserError(f"semantic_techer {teacher!r}: only HuBERT teachers can be expressed by the native tokenizer")
    if not isinstance(cfg.get("bins", 1024), int):
        raise UserError("bins is a list (residual FSQ): the native tokenizer has residual VQ only")
    for name, want in (("vq_scale", 1), ("downsample_mode", "step_down"), ("merge_mode", "concat"),
                       ("causal", False), ("normalize", False)):
        if name in cfg and cfg[name] != want:
            raise UserError(f"{name} {cfg[name]!r}: the native tokenizer supports {want!r} only")


def native_tokenizer_config(cfg: dict, state: dict):
    """(HiggsAudioV2TokenizerConfig, notes) from Boson's config.json and the tensor shapes."""
    from transformers import HiggsAudioV2TokenizerConfig

    ratios = list(cfg.get("ratios", [8, 5, 4, 2]))
    n_q, bins = int(cfg.get("n_q", 8)), cfg.get("bins", 1024)
    refuse_tokenizer_config(cfg)
    sample_rate = int(cfg.get("sample_rate", 16000))

    # widths from tensor shapes (Boson's code hard-codes 64 / 1024 / 768 and ignores n_filters)
    def weight_of(prefix):
        w = conv_weight(state, prefix)
        if w is None:
            raise UserError(f"model.pth has no {prefix}.weight(_v): not a Higgs Audio tokenizer checkpoint")
        return w

    enc_width = weight_of("encoder.block.0").shape[0]
    dec_width = weight_of("decoder_2.model.0").shape[0]
    acoustic_hidden = weight_of(f"encoder.block.{len(ratios) + 2}").shape[0]
    semantic_hidden = weight_of("encoder_semantic.conv.conv").shape[0]
    if "D" in cfg and int(cfg["D"]) != acoustic_hidden:
        raise UserError(f"config D {cfg['D']} but the encoder's last conv has {acoustic_hidden} channels")
    emb = state.get("quantizer.vq.layers.0._codebook.embed")
    if emb is None:
        raise UserError("model.pth has no quantizer.vq.layers.0._codebook.embed")
    hubert = hubert_config(state)
    if hubert["hidden_size"] != semantic_hidden:
        raise UserError(f"HuBERT width {hubert['hidden_size']} != semantic encoder width {semantic_hidden}")

    # the last bandwidth decides the quantizer count: keep the list up to n_q quantizers
    bits_per_q = math.ceil(sample_rate / math.prod(ratios)) * math.ceil(math.log2(bins))  # frame rate x bits a code

    def quantizers(bandwidth):  # how many quantizers a bandwidth (kbps) selects
        return int(1000 * bandwidth // bits_per_q)

    per_q = bits_per_q / 1000
    bandwidths = [b for b in cfg.get("target_bandwidths", [n_q * per_q]) if quantizers(b) <= n_q]
    if not bandwidths or quantizers(bandwidths[-1]) != n_q:
        bandwidths.append(round(n_q * per_q, 6))
    config = HiggsAudioV2TokenizerConfig(
        target_bandwidths=bandwidths,
        sample_rate=sample_rate,
        codebook_size=int(bins),
        codebook_dim=int(emb.shape[1]),
        acoustic_model_config={
            "encoder_hidden_size": int(enc_width),
            "downsampling_ratios": ratios,
            "decoder_hidden_size": int(dec_width),
            "upsampling_ratios": ratios,  # explicit: left out, DacConfig reverses them
            "hidden_size": int(acoustic_hidden),
            "sampling_rate": sample_rate,
        },
        semantic_model_config=hubert,
        semantic_sample_rate=int(cfg.get("semantic_sample_rate") or 16000),
    )
    config.architectures = ["HiggsAudioV2TokenizerModel"]
    if config.num_quantizers != n_q or config.hop_length != math.prod(ratios):
        raise AssertionError(f"config gives {config.num_quantizers} quantizers / hop {config.hop_length}")
    boson_factor = int(math.prod(ratios) / (sample_rate / config.semantic_sample_rate) / 320)
    if config.semantic_downsample_factor != boson_factor:
        raise AssertionError("semantic downsample factor differs from Boson's")
    notes = [f"target_bandwidths {cfg.get('target_bandwidths')} -> {bandwidths}: exactly n_q = {n_q} quantizers "
             f"at hop {config.hop_length}",
             f"widths from tensor shapes: acoustic encoder {enc_width}, decoder {dec_width}, latent {acoustic_hidden}, "
             f"semantic {semantic_hidden}; HuBERT {hubert['num_hidden_layers']} layers x {hubert['hidden_size']}, "
             f"{hubert['num_attention_heads']} heads (head dim {HUBERT_HEAD_DIM})"]
    return config, notes


def classify_tokenizer_keys(state: dict, rules) -> tuple[dict, dict, list, list]:
    """model.pth keys -> (copies {native name: key}, weight-norm groups {native name: {"g": key, "v": key},
    or {"w": key} for a plain weight to unfold}, dropped, unknown)."""
    copies, weight_norm, dropped, unknown = {}, {}, [], []
    for key in sorted(state):
        wn = WEIGHT_NORM_RE.match(key)
        module, _, param = (wn.group(1), ".", wn.group(2)) if wn else key.rpartition(".")  # "" for a dotless key
        half = WEIGHT_NORM_HALF.get(param)  # "g" | "v" | None
        rule, m = first_rule(rules, key, half)
        if rule is None:
            unknown.append(key)
        elif rule.target is None:
            dropped.append((key, rule.how))
        elif rule.how == FOLD:
            name = rule.target(module[m.end():])
            if name is None:
                unknown.append(key)
            elif half:
                weight_norm.setdefault(f"{name}.weight", {})[half] = key
            else:
                copies[f"{name}.{param}"] = key
        elif rule.how == PAIR:
            copies[rule.target[half]] = key
        elif rule.how == UNFOLD:
            weight_norm[rule.target] = {"w": key}
        else:
            copies[rule.target(key) if callable(rule.target) else renamed(rule.target, key, m)] = key
    return copies, weight_norm, dropped, unknown


def check_tokenizer_names(copies: dict, weight_norm: dict, unknown: list, expected: dict) -> None:
    """Every key is known and lands on a tensor the native tokenizer holds (an unfold's pair is checked later)."""
    bad = [key for name, key in copies.items() if name not in expected]
    bad += [key for name, halves in weight_norm.items() if "w" not in halves and name not in expected
            for key in halves.values()]
    if unknown or bad:
        raise unknown_error(sorted(set(unknown) | set(bad)), "audio tokenizer model.pth")


def state_copy(name: str, state: dict, key: str, how: str = "copy") -> Target:
    t = state[key]
    return Target(name, dtype_name(t), list(t.shape), [key], how, lambda: state[key].detach().clone())


def weight_norm_fold(name: str, state: dict, halves: dict) -> Target:
    if set(halves) != {"g", "v"}:
        raise UserError(f"model.pth: weight-norm pair incomplete for {name}: {sorted(halves.values())}")
    g, v = state[halves["g"]], state[halves["v"]]
    dims = [d for d in range(v.dim()) if g.shape[d] == 1]
    return Target(name, dtype_name(v), list(v.shape), [halves["g"], halves["v"]],
                  f"weight-norm fold (norm over dims {dims})",
                  lambda g=halves["g"], v=halves["v"]: fold_weight_norm(state[g], state[v]))


def weight_norm_unfold(base: str, state: dict, key: str) -> list[Target]:
    """A plain weight -> the native parametrization's (g, v) pair, norm over dim 2 (HuBERT's positional conv)."""
    w = state[key]
    g_shape = [1, 1, w.shape[2]]
    return [Target(f"{base}.original0", dtype_name(w), g_shape, [key], "weight-norm g over dim 2",
                   lambda: state[key].float().pow(2).sum(dim=(0, 1), keepdim=True).sqrt().to(state[key].dtype)),
            state_copy(f"{base}.original1", state, key, how="weight-norm v")]


def tokenizer_defaults(expected: dict, have: set) -> list[Target]:
    """The native-only tensors (TOKENIZER_DEFAULTS) that no source key filled."""
    targets = []
    for name, shape in expected.items():
        if name in have:
            continue
        for d in TOKENIZER_DEFAULTS:
            if d.pattern.match(name) and (not d.square_only or shape[0] == shape[1]):
                targets.append(Target(name, "float32", list(shape), [], d.how, partial(d.value, shape)))
                break
    return targets


def plan_tokenizer(src: Path) -> Plan:
    from transformers import HiggsAudioV2TokenizerModel

    cfg = inference.read_json(src / "config.json")
    state = load_pth(src / "model.pth")
    source_bytes = (src / "model.pth").stat().st_size
    config, notes = native_tokenizer_config(cfg, state)
    expected = expected_shapes(HiggsAudioV2TokenizerModel, config)
    nb = len(config.acoustic_model_config.downsampling_ratios)
    copies, weight_norm, dropped, unknown = classify_tokenizer_keys(state, tokenizer_rules(nb))
    check_tokenizer_names(copies, weight_norm, unknown, expected)
    targets = [state_copy(name, state, key) for name, key in copies.items()]
    for name, halves in weight_norm.items():
        targets += weight_norm_unfold(name, state, halves["w"]) if "w" in halves else [
            weight_norm_fold(name, state, halves)]
    targets += tokenizer_defaults(expected, {t.name for t in targets})
    targets = in_native_order(targets, expected)
    check_targets(targets, expected)
    return Plan("tokenizer", config, targets, dropped, notes, source_bytes, {})


def write_tokenizer_folder(plan: Plan, out: Path, log) -> None:
    from transformers import DacFeatureExtractor

    write_safetensors(out / "model.safetensors", plan.targets)
    plan.config.save_pretrained(out)
    DacFeatureExtractor(**checkpoints.feature_extractor_args(plan.config.sample_rate)).save_pretrained(out)
    log(f"  wrote model.safetensors ({len(plan.targets)} tensors), config.json, preprocessor_config.json")


def verify_tokenizer(path: Path, log) -> None:
    """The checks inference.py makes, a strict load, encode 1 s (Boson's padding rule) and decode."""
    import numpy as np
    import torch
    from transformers import HiggsAudioV2TokenizerModel
    from transformers.utils import logging as hf_logging

    checkpoints.verify_folder("tokenizer", path, inference.check_tokenizer_dir(path))
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model, info = HiggsAudioV2TokenizerModel.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    finally:
        hf_logging.set_verbosity_warning()
    checkpoints.check_loading_info("tokenizer", path, info)
    model.eval()
    wave = (0.1 * np.sin(2 * np.pi * 220 * np.arange(24000) / 24000)).astype(np.float32)
    codes = inference.encode_waveform(model, wave, torch.device("cpu"))
    with torch.no_grad():
        audio = model.decode(codes[None]).audio_values
    n_q = model.config.num_quantizers
    if codes.shape[0] != n_q or not torch.isfinite(audio).all():
        raise UserError(f"verification: encode gave {tuple(codes.shape)}, decode finite {bool(torch.isfinite(audio).all())}")
    log(f"  verified: strict load, {n_q} quantizers at hop {model.config.hop_length}; "
        f"encode 1 s -> codes {tuple(codes.shape)}, decode -> {audio.shape[-1]} samples")


# --------------------------------------------------------------------------- CLI


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


COUNT = ("a positive integer", lambda v: _is_int(v) and v > 0)
ID = ("an integer >= 0", lambda v: _is_int(v) and v >= 0)
OPTIONAL_ID = ("an integer >= 0 or null", lambda v: v is None or _is_int(v) and v >= 0)
# the fields of Boson's original config.json files that the converter reads, with the type each must have
ORIGINAL_FIELDS = {
    "model": {
        "audio_num_codebooks": COUNT, "audio_codebook_size": COUNT, "audio_out_token_idx": ID,
        "audio_out_bos_token_id": ID, "audio_stream_bos_id": ID, "audio_stream_eos_id": ID, "pad_token_id": OPTIONAL_ID,
        "audio_decoder_proj_num_layers": ID, "audio_adapter_type": ("a string", lambda v: isinstance(v, str)),
        "audio_dual_ffn_layers": ("a list of layer numbers or null",
                                  lambda v: v is None or isinstance(v, list) and all(_is_int(x) for x in v)),
    },
    "text_config": {
        "num_hidden_layers": COUNT, "hidden_size": COUNT, "num_attention_heads": COUNT, "intermediate_size": COUNT,
        "num_key_value_heads": ("a positive integer or null", lambda v: v is None or _is_int(v) and v > 0),
        "head_dim": ("a positive integer or null", lambda v: v is None or _is_int(v) and v > 0),
        "max_position_embeddings": COUNT, "pad_token_id": OPTIONAL_ID, "bos_token_id": OPTIONAL_ID,
        "rms_norm_eps": ("a number", _is_number), "rope_theta": ("a number", _is_number),
        "rope_scaling": ("an object or null", lambda v: v is None or isinstance(v, dict)),
        "rope_parameters": ("an object or null", lambda v: v is None or isinstance(v, dict)),
        "hidden_act": ("a string", lambda v: isinstance(v, str)),
    },
    "tokenizer": {
        "n_q": COUNT, "bins": COUNT, "D": COUNT, "sample_rate": COUNT, "semantic_sample_rate": COUNT,
        "codebook_dim": COUNT, "n_filters": COUNT,
        "ratios": ("a non-empty list of positive integers",
                   lambda v: isinstance(v, list) and v and all(_is_int(x) and x > 0 for x in v)),
        "target_bandwidths": ("a non-empty list of positive numbers",
                              lambda v: isinstance(v, list) and v and all(_is_number(x) and x > 0 for x in v)),
        "semantic_techer": ("a string", lambda v: isinstance(v, str)),
    },
}
TEXT_REQUIRED = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")


def check_original_config(path: Path, cfg: dict, kind: str) -> None:
    """Every field the converter reads has the type Boson's files give it: one line, not a TypeError later."""
    def check(fields: dict, where: str, values: dict) -> None:
        for key, (what, ok) in fields.items():
            if key in values and not ok(values[key]):
                raise UserError(f"{path}: {where}{key} is {values[key]!r}, expected {what}")

    check(ORIGINAL_FIELDS[kind], "", cfg)
    if kind == "model":
        text = cfg.get("text_config")
        if not isinstance(text, dict):
            raise UserError(f"{path}: text_config is {text!r}, expected an object (the text model's sizes)")
        missing = [k for k in TEXT_REQUIRED if k not in text]
        if missing:
            raise UserError(f"{path}: text_config has no {', '.join(missing)}")
        check(ORIGINAL_FIELDS["text_config"], "text_config.", text)


def detect_kind(src: Path) -> tuple[str, bool]:
    """(kind, is_native) from the folder's files."""
    if not src.is_dir():
        raise UserError(f"--src {src}: not a folder")
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"--src {src}: no config.json (not a Higgs Audio checkpoint folder)")
    cfg = inference.read_json(cfg_path)
    model_type = cfg.get("model_type")
    if model_type == "higgs_audio":
        check_original_config(cfg_path, cfg, "model")
        return "model", False
    if model_type == "higgs_audio_v2":
        return "model", True
    if model_type == "higgs_audio_v2_tokenizer":
        return "tokenizer", True
    if (src / "model.pth").is_file() or all(k in cfg for k in ORIGINAL_TOKENIZER_KEYS):
        if not (src / "model.pth").is_file():
            raise UserError(f"--src {src}: an original audio-tokenizer config.json without model.pth")
        check_original_config(cfg_path, cfg, "tokenizer")
        return "tokenizer", False
    raise UserError(f"--src {src}: config.json has model_type {model_type!r}; expected Boson's original "
                    "generation model (higgs_audio) or audio tokenizer (config.json + model.pth)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Convert Boson's ORIGINAL Higgs Audio V2 generation model or audio tokenizer into the "
                    "transformers-native folders that inference.py loads.",
        formatter_class=inference.HelpFormatter,
    )
    add_flag(p, "--src", required=True, help="folder with the original checkpoint (config.json + safetensors "
             "shards for the model; config.json + model.pth for the audio tokenizer)")
    add_flag(p, "--dst", required=True, help="output folder (created; use it as --model_path / --tokenizer_path)")
    add_flag(p, "--kind", choices=("auto", "model", "tokenizer"), default="auto",
             help="what --src holds; auto detects it from the files")
    add_flag(p, "--dry_run", action="store_true", help="print the key mapping and what is dropped; write nothing")
    add_flag(p, "--force", action="store_true", help="replace a non-empty --dst")
    add_flag(p, "--no_verify", action="store_true",
             help="skip loading the result and running one forward before it is moved into place")
    add_flag(p, "--keep_text_head", action="store_true",
             help="keep the text LM head (text_lm_head.weight; not needed for speech, dropped by default)")
    return p


def convert(args, log) -> int:
    src, dst = Path(args.src), Path(args.dst)
    kind, native = detect_kind(src)
    if args.kind != "auto" and args.kind != kind:
        raise UserError(f"--kind {args.kind}, but {src} holds a {'native' if native else 'original'} {kind}")
    if native:
        log(f"{src} is already a transformers-native {kind} folder: nothing to convert")
        (inference.check_model_dir if kind == "model" else inference.check_tokenizer_dir)(src)
        if not args.no_verify:
            (verify_model if kind == "model" else verify_tokenizer)(src, log)
        log(f"{src} is valid; use it as --{'model_path' if kind == 'model' else 'tokenizer_path'} (not rewritten)")
        return 0
    if dst.resolve() == src.resolve():
        raise UserError("--dst must differ from --src")
    dst_busy = dst.exists() and (not dst.is_dir() or any(dst.iterdir()))
    if dst_busy and not args.force and not args.dry_run:
        raise UserError(f"--dst {dst} exists and is not empty; pass --force to replace it")
    if args.keep_text_head and kind != "model":
        raise UserError("--keep_text_head applies to the generation model only")

    t0 = time.perf_counter()
    log(f"Source: Boson's original {kind} at {src} ({human(sum(f.stat().st_size for f in src.iterdir() if f.is_file()))})")
    if kind == "model":  # config refusals and shard checks first: they need no torch
        cfg = inference.read_json(src / "config.json")
        refuse_model_config(cfg, int((cfg.get("text_config") or {}).get("num_hidden_layers", 0)))
        read_index(src)
    import torch  # noqa: F401  (the baseline RSS includes torch + the transformers classes used)
    from transformers import HiggsAudioV2ForConditionalGeneration, HiggsAudioV2TokenizerModel  # noqa: F401

    baseline = peak_rss_bytes()
    plan = plan_model(src, args.keep_text_head) if kind == "model" else plan_tokenizer(src)
    for note in plan.notes:
        log(f"note: {note}")
    total = sum(t.nbytes for t in plan.targets)
    if args.dry_run:
        plan.print_mapping(log)
        log(f"Dry run: {len(plan.targets)} tensors ({human(total)}) would be written to {dst}; nothing written"
            + (f" (note: {dst} is not empty: --force would be needed)" if dst_busy else ""))
        return 0
    log(f"Dropped {len(plan.dropped)} source tensor(s): "
        + ", ".join(sorted({reason.split(' (')[0].split(',')[0] for _, reason in plan.dropped})) if plan.dropped
        else "Dropped no source tensor")
    parent = dst.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{dst.name}.converting-"))
    except OSError as e:
        raise UserError(f"--dst {dst}: cannot create it ({e.strerror})") from None
    try:
        log(f"Writing {len(plan.targets)} tensors ({human(total)}) into {tmp.name} ...")
        (write_model_folder if kind == "model" else write_tokenizer_folder)(plan, tmp, log)
        peak = peak_rss_bytes()
        log(f"Peak RSS while converting: {human(peak)} = {human(baseline)} Python + torch + transformers "
            f"+ {human(peak - baseline)} for the tensors (source {human(plan.source_bytes)}); "
            f"{time.perf_counter() - t0:.1f}s")
        if not args.no_verify:
            (verify_model if kind == "model" else verify_tokenizer)(tmp, log)
        old = None
        if dst.exists():
            old = Path(tempfile.mkdtemp(dir=parent, prefix=f".{dst.name}.old-"))
            os.rmdir(old)
            os.replace(dst, old)
        os.replace(tmp, dst)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"Done: {dst} (use it as --{'model_path' if kind == 'model' else 'tokenizer_path'})")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: convert(args, log), "nothing was moved into --dst")


if __name__ == "__main__":
    sys.exit(main())
