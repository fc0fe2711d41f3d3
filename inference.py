#!/usr/bin/env python3
"""Higgs Audio V2 text-to-speech on Ascend NPU, CUDA or CPU.

    python3 inference.py --text "Hello there." --seed 1
    python3 inference.py --selftest            # proves the stack works, no download needed

The engine (load -> prompt -> prefill -> decode frame by frame -> revert delay
pattern -> decode codes -> WAV) lives in this file; eval_audio.py and the tests
import it from here.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
import os
import re
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:  # for annotations only: importing torch costs seconds, and --help must stay fast
    import numpy as np
    import torch
    from transformers import StaticCache

    import quality

import checkpoints
from checkpoints import UserError, first_line, read_json  # noqa: F401  (scripts and tests import them from here)

DEFAULT_TEXT = (
    "In the quiet of the morning, birds begin to sing as the first rays of sunlight "
    "paint the sky in shades of orange and pink."
)
DEFAULT_SCENE = "Audio is recorded from a quiet room."
SYSTEM_MESSAGE = "Generate audio following instruction."
SAMPLE_RATE = 24000
ASR_MAX_ERROR = 0.2  # --asr_check: an attempt above this WER/CER is unusable
MIN_FRAMES = 10  # BOS frame + 7 delay frames + closing column eat 9: fewer leave nothing to decode
SILENCE_RMS = 1e-4  # about -80 dBFS
MAX_UNITS_PER_SECOND = 7.0  # words (or CJK characters) per second, over twice a normal pace
FINISHED_CHECK_EVERY = 16  # frames between host reads of "all rows finished"
NOISE_CHUNK = 32  # frames of sampling noise per host draw; a multiple of FINISHED_CHECK_EVERY, so that
# a chunk's last frame is a sync frame and the next chunk is drawn before that sync (NoiseSource.prefetch)
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts (negatives wrap mod 2**64)
REENCODE_PAD = 320  # samples per side when the acoustic path of encode_audio comes out one frame short


# --------------------------------------------------------------------------- device / dtype


def npu_available() -> bool:
    try:
        import torch_npu  # noqa: F401  (registers the "npu" device with torch)
    except ImportError:
        return False
    import torch

    return bool(torch.npu.is_available())


def pick_device(requested: str | None = None):
    import torch

    if requested in (None, "", "auto"):
        if npu_available():
            return torch.device("npu:0")
        if torch.cuda.is_available():
            return torch.device("cuda:0")
        return torch.device("cpu")
    if requested.startswith("npu"):
        if not npu_available():
            raise UserError(
                f"--device {requested}: torch_npu is not installed or sees no NPU "
                "(install torch + torch_npu matching your CANN, and source set_env.sh)"
            )
    elif requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {requested}: torch sees no CUDA GPU")
    elif requested != "cpu":
        raise UserError(f"--device {requested}: expected auto, cpu, cuda[:N] or npu[:N]")
    device = torch.device(requested)
    return torch.device(device.type, 0) if device.type != "cpu" and device.index is None else device


def available_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def free_memory_bytes(device) -> int:
    """What new tensors on `device` can still take: free device memory plus what torch's caching allocator
    holds unused (a freed decode context lands there), or the host's MemAvailable for a CPU."""
    import torch

    if device.type in ("cuda", "npu"):
        m = torch.cuda if device.type == "cuda" else torch.npu
        free, _ = m.mem_get_info(device)
        return free + m.memory_reserved(device) - m.memory_allocated(device)
    return available_memory_bytes()


def pick_dtype(requested: str | None, device, num_params: int):
    """auto: bf16 on accelerators; on CPU fp32 if it fits in free memory, else bf16."""
    import torch

    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if requested not in (None, "", "auto"):
        if requested not in names:
            raise UserError(f"--dtype {requested}: expected auto, float32, bfloat16 or float16")
        return names[requested], "requested"
    if device.type != "cpu":
        return torch.bfloat16, "auto: accelerator"
    need = num_params * 4 * 1.2
    if need < available_memory_bytes():
        return torch.float32, "auto: CPU, fp32 fits in free memory"
    return torch.bfloat16, "auto: CPU, fp32 would not fit in free memory"


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "npu":
        torch.npu.synchronize(device)


def peak_memory_bytes(device) -> int | None:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    if device.type == "npu":
        return torch.npu.max_memory_allocated(device)
    return None


# --------------------------------------------------------------------------- checkpoint checks


def convert_hint(path: Path, kind: str) -> str:
    return f"python3 convert_weights.py --kind {kind} --src {path} --dst {path}-native"


def check_model_dir(path: str | os.PathLike) -> dict:
    """Validate a generation-model folder before the expensive load; return its config."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"model folder {path} does not exist (run: bash download.sh, or pass --model_path)")
    if not (path / "config.json").is_file():
        raise UserError(f"{path}/config.json is missing: an unfinished download? (re-run: bash download.sh)")
    config = read_json(path / "config.json")
    if config.get("model_type") == "higgs_audio":
        raise UserError(
            f"{path} holds Boson's original checkpoint layout (model_type higgs_audio); convert it first: "
            + convert_hint(path, "model")
        )
    if config.get("model_type") != "higgs_audio_v2":
        raise UserError(f"{path}/config.json: model_type {config.get('model_type')!r}, expected 'higgs_audio_v2'")
    checkpoints.folder_tensors(path)  # index, shards and headers readable and consistent
    for name in ("tokenizer.json", "chat_template.jinja"):
        if not (path / name).is_file():
            raise UserError(f"{path} has no {name} (re-run: bash download.sh)")
    return config


def check_tokenizer_dir(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise UserError(
            f"audio tokenizer folder {path} does not exist (run: bash download.sh, or pass --tokenizer_path)"
        )
    if (path / "model.pth").is_file() and not (path / "model.safetensors").is_file():
        raise UserError(
            f"{path} holds Boson's original audio tokenizer (model.pth); convert it first: "
            + convert_hint(path, "tokenizer")
        )
    config = read_json(path / "config.json")
    if config.get("model_type") != "higgs_audio_v2_tokenizer":
        raise UserError(
            f"{path}/config.json: model_type {config.get('model_type')!r}, expected 'higgs_audio_v2_tokenizer'"
        )
    if not (path / "model.safetensors").is_file():
        raise UserError(f"{path} has no model.safetensors (re-run: bash download.sh)")
    checkpoints.read_header(path / "model.safetensors")
    return config


# --------------------------------------------------------------------------- sampling


@dataclass
class SamplingParams:
    max_new_tokens: int = 2048
    temperature: float = 0.3
    top_k: int = 50
    top_p: float = 0.95
    ras_win_len: int = checkpoints.RAS_WIN_LEN  # Boson's generation_config.json
    ras_win_max_num_repeat: int = checkpoints.RAS_WIN_MAX_NUM_REPEAT

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError(f"--max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0 or math.isinf(self.temperature):
            raise UserError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"--top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top_p must be in (0, 1], got {self.top_p}")
        if self.ras_win_len < 0 or self.ras_win_max_num_repeat < 0:
            raise UserError("--ras_win_len and --ras_max_repeat must be >= 0 (0 disables)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def ras(self) -> bool:
        return self.ras_win_len > 0 and self.ras_win_max_num_repeat > 0


def filter_logits(logits, params: SamplingParams):
    """temperature -> top-k -> top-p per codebook, as transformers' warpers do; logits [..., V] float32."""
    import torch

    scores = logits / params.temperature
    vocab = scores.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(scores, params.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if params.top_p < 1.0:
        sorted_scores, sorted_idx = torch.sort(scores, dim=-1, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - params.top_p)
        remove_sorted[..., -1] = False  # keep at least the best token
        remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
        scores = scores.masked_fill(remove, -math.inf)
    return scores


def race_sample(scores, gumbel):
    """Exponential race argmax(p / E), E ~ Exp(1), written as Gumbel-max: argmax(scores - log E).

    Draws exactly from softmax(scores) without computing it. The noise comes from a
    seeded CPU generator, so one seed gives the same choice whatever the device, and
    the step itself holds no random op (graph capture).
    """
    return (scores + gumbel).argmax(dim=-1)


@dataclass
class DecodeState:
    """Per-row state of Boson's delay / EOS rules, all tensors on the device."""

    num_delay: torch.Tensor  # [B] codebooks released so far (codebook c > num_delay stays BOS)
    remaining: torch.Tensor  # [B] frames until the last codebook closes; -1 = no EOS seen yet
    window: torch.Tensor  # [B, W, C] last RAS window of audio frames (-1 = empty)


def sample_frame(logits, state: DecodeState, params: SamplingParams, noise, ras_noise, cfg):
    """One frame of Boson's `_sample_audio_tokens`, batched, as tensor ops (no host sync).

    logits [B, C, V] float32 -> codes [B, C]. Order as the original: sample, RAS
    resample, release one more codebook from BOS, then EOS closing.
    """
    import torch

    bos, eos, num_cb = cfg.audio_stream_bos_id, cfg.audio_stream_eos_id, cfg.num_codebooks
    if params.greedy:
        codes = logits.argmax(dim=-1)
    else:
        codes = race_sample(filter_logits(logits, params), noise)
    if params.ras:
        repeats = (state.window == codes[:, None, :]).sum(dim=1)
        resampled = race_sample(logits, ras_noise)  # raw logits: no temperature, as the original
        # a count never exceeds the window, so a larger threshold acts the same (and 2**64 fits no tensor)
        threshold = min(params.ras_win_max_num_repeat, state.window.shape[1] + 1)
        codes = torch.where(repeats >= threshold, resampled, codes)

    cb = torch.arange(num_cb, device=codes.device)[None, :]
    codes = torch.where(cb > state.num_delay[:, None], bos, codes)
    num_delay = (state.num_delay + 1).clamp(max=num_cb - 1)

    closing = state.remaining >= 0
    codes = torch.where(closing[:, None] & (cb < (num_cb - state.remaining)[:, None]), eos, codes)
    remaining = torch.where(closing, state.remaining - 1, state.remaining)
    is_eos = codes == eos
    first_eos = is_eos.int().argmax(dim=-1)
    opening = ~closing & is_eos.any(dim=-1)
    codes = torch.where(opening[:, None] & (cb < first_eos[:, None]), eos, codes)
    remaining = torch.where(opening, num_cb - first_eos - 1, remaining)
    done_now = (closing | opening) & (remaining <= 0)

    return codes, DecodeState(num_delay, torch.where(done_now, -1, remaining), state.window), done_now


def revert_delay_pattern(codes):
    """[T, C] generated delay-pattern codes (frame 0 all BOS) -> [T - C - 1, C] aligned codes.

    Codebook c of audio frame t sits at row t + c + 1. Like Boson's serve engine, the
    last aligned column (the closing EOS column, or an unfinished one) is dropped.
    """
    import torch

    num_cb = codes.shape[1]
    n = max(codes.shape[0] - num_cb - 1, 0)
    return torch.stack([codes[c + 1 : c + 1 + n, c] for c in range(num_cb)], dim=1)


def valid_frame_mask(aligned, bos_id: int):
    """[T, C] aligned codes -> [T] bool: frames with a real code (< BOS) in every codebook."""
    return (aligned < bos_id).all(dim=1)


def conv_stack_length(module, length: int) -> int:
    """Output length after every Conv1d in `module`, in order (the codec's paths are plain conv stacks whose
    residual branches keep the length); 0 when one of them would get less input than its kernel spans."""
    import torch

    for conv in (m for m in module.modules() if isinstance(m, torch.nn.Conv1d)):
        if conv.padding == "same":
            continue
        padded = length + (0 if conv.padding == "valid" else 2 * conv.padding[0])
        span = conv.dilation[0] * (conv.kernel_size[0] - 1) + 1
        if padded < span:
            return 0
        length = (padded - span) // conv.stride[0] + 1
    return length


def encode_waveform(audio_tokenizer, waveform, device):
    """24 kHz mono float waveform -> codes [C, T], as Boson's tokenizer encodes them.

    The native `encode` pads hop/2 = 480 samples per side when the acoustic path
    comes out one frame short; Boson re-encodes with 320, so we do the same.
    """
    import torch
    import torch.nn.functional as F

    tok = audio_tokenizer
    x = torch.as_tensor(waveform, dtype=torch.float32, device=device).reshape(1, 1, -1)
    with torch.no_grad():
        semantic = tok.encoder_semantic(tok._extract_semantic_features(x).transpose(1, 2))
        acoustic = tok.acoustic_encoder(x)
        if acoustic.shape[2] != semantic.shape[2]:
            acoustic = tok.acoustic_encoder(F.pad(x, (REENCODE_PAD, REENCODE_PAD)))
        embeddings = torch.cat([acoustic, semantic], dim=1)
        embeddings = tok.fc(embeddings.transpose(1, 2)).transpose(1, 2)
        codes = tok.quantizer.encode(embeddings, tok.config.target_bandwidths[-1])
    return codes[:, 0].long()  # [C, T]


# --------------------------------------------------------------------------- engine


@dataclass
class Prompt:
    input_ids: torch.Tensor  # [T] long
    audio_input_ids: torch.Tensor | None = None  # [Ta, C] long, delay pattern applied, or None
    text: str = ""


@dataclass
class Generation:
    codes: torch.Tensor  # [n_frames, C] long, delay pattern, frame 0 all BOS
    finished: bool  # closed by EOS (False: hit max_new_tokens)
    seed: int


@dataclass
class Timings:
    """Seconds spent in one Engine.generate call, and in decoding its codes to audio."""

    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    decode_mode: str = "off"  # what the step ran as: "on" (graph replay), "compile" or "off" (eager)
    audio_decode_s: float = 0.0
    wall_s: float = 0.0  # a chunk's whole time, its retries included (speak)


def rounded(timings: Timings, digits: int = 4) -> Timings:
    """Its seconds rounded as the JSON sidecar shows them."""
    return replace(timings, **{k: round(v, digits) for k, v in asdict(timings).items() if isinstance(v, float)})


def chat_messages(text: str, scene: str | None, ref_text: str | None = None, with_ref: bool = False,
                  history=()) -> list[dict]:
    """Boson's layout: system (+ scene), then one user/assistant pair per earlier audio (the reference voice,
    then each text in `history`: earlier chunks, as Boson's generation.py), then the user text to speak."""
    messages = [{"role": "system", "content": [{"type": "text", "text": SYSTEM_MESSAGE}]}]
    if scene:
        messages.append({"role": "scene", "content": [{"type": "text", "text": scene}]})
    turns = ([ref_text or ""] if with_ref else []) + list(history)
    for i, turn_text in enumerate(turns):
        messages.append({"role": "user", "content": [{"type": "text", "text": turn_text}]})
        messages.append({"role": "assistant", "content": [{"type": "audio", "path": f"audio-{i}"}]})
    messages.append({"role": "user", "content": [{"type": "text", "text": text}]})
    return messages


GRAPH_MODES = ("auto", "on", "off", "compile")


class Engine:
    """Model, processor and codec on one device; the decode-step mode is fixed at construction."""

    def __init__(self, model, processor, audio_tokenizer, device, dtype, dtype_reason="", load_seconds=0.0,
                 graph_mode: str = "auto", compile_backend: str = "inductor"):
        if graph_mode not in GRAPH_MODES:
            raise UserError(f"--graph {graph_mode}: expected {', '.join(GRAPH_MODES)}")
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.audio_tokenizer = audio_tokenizer
        self.config = model.config
        self.device = device
        self.dtype = dtype
        self.dtype_reason = dtype_reason
        self.load_seconds = load_seconds
        self.chat_template = processor.chat_template
        self.graph_mode = graph_mode  # requested: auto (graph on cuda/npu) | on | off | compile
        self.compile_backend = compile_backend  # torch.compile backend for graph_mode "compile"
        self.decode_context: DecodeContext | None = None  # reused while shapes and settings stay the same
        self.compiled_step = None  # torch.compile'd decode_step, built on first use
        # transformers 5.24 renamed the forward's `past_key_values` to `cache` (the old name goes in 5.40)
        self.cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def reset_decode_state(self) -> None:
        """Forget the reused decode context and compiled step: the next generate builds them anew."""
        self.decode_context = None
        self.compiled_step = None

    def with_graph_mode(self, graph_mode: str, compile_backend: str | None = None) -> "Engine":
        """The same loaded weights decoding in another mode (with a decode context of its own)."""
        return Engine(self.model, self.processor, self.audio_tokenizer, self.device, self.dtype, self.dtype_reason,
                      self.load_seconds, graph_mode, compile_backend or self.compile_backend)

    def decode_mode(self) -> str:
        """What the decode step is asked to run as on this device: "on" (graph replay), "compile" or "off"."""
        if self.graph_mode == "compile":
            return "compile"
        return "off" if self.graph_mode == "off" or self.device.type == "cpu" else "on"

    # ---------------- sizes for the report
    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def decode_bytes_per_frame(self) -> int:
        """Weights one audio decode step reads: all but the text MLPs and text embeddings."""
        total = 0
        for name, p in self.model.named_parameters():
            if ".mlp." in name or "post_attention_layernorm" in name and "audio" not in name:
                continue
            if name.endswith("embed_tokens.weight"):
                continue
            if "embed_audio_tokens" in name:
                total += p.element_size() * p.shape[1] * self.config.num_codebooks
                continue
            total += p.numel() * p.element_size()
        return total

    # ---------------- prompt
    def messages(self, text: str, scene: str | None, ref_text: str | None = None, with_ref: bool = False,
                 history=()):
        return chat_messages(text, scene, ref_text, with_ref, history)

    def build_prompt(self, text: str, scene: str | None = DEFAULT_SCENE, ref_codes=None, ref_text=None,
                     history=()) -> Prompt:
        """Render the chat template and tokenize it; `ref_codes` [C, T] puts a reference voice in the assistant turn.

        `history`: (text, codes [C, T]) of earlier chunks, each an earlier user turn and the assistant turn that
        spoke it (after the reference's pair), as Boson's generation.py prompts a long text chunk by chunk.

        User text is data, never control: only the template's own markers become control tokens. A special-token
        string inside `text`, `scene` or `ref_text` (e.g. "<|eot_id|>") is neutralised, not refused: it is tokenized
        as its ordinary byte-level pieces (transformers' `sanitize_control_tokens`). This is done here so that every
        caller (CLI, eval_audio.py, a server) gets it. Prompts without such strings tokenize exactly as a plain
        tokenization of the rendered template (Boson parity); the template's `| trim` of user text is kept.
        """
        import torch
        import transformers

        if "sanitize_control_tokens" not in inspect.signature(self.tokenizer.apply_chat_template).parameters:
            # older releases would pass the flag to the template and silently parse user text as control tokens
            raise UserError(f"transformers {transformers.__version__} cannot keep user text out of the prompt's "
                            "control tokens (pip install 'transformers>=5.20,<6')")
        history = list(history)
        ids = self.tokenizer.apply_chat_template(
            self.messages(text, scene, ref_text, with_ref=ref_codes is not None, history=[t for t, _ in history]),
            chat_template=self.chat_template, add_generation_prompt=True,
            tokenize=True, sanitize_control_tokens=True, return_dict=False,
        )
        audios = ([] if ref_codes is None else [ref_codes]) + [codes for _, codes in history]
        delayed = []
        for codes in audios:
            with_markers = torch.cat(
                [
                    codes.new_full((codes.shape[0], 1), self.config.audio_stream_bos_id),
                    codes,
                    codes.new_full((codes.shape[0], 1), self.config.audio_stream_eos_id),
                ],
                dim=1,
            )
            delayed.append(self.processor.build_delay_pattern(with_markers[None])[0].T.cpu())  # [Ta, C]
        # expand the template's audio tokens at id level, one per audio in order: an <|AUDIO_OUT|> typed by the
        # user is plain text by now, so it can neither be expanded nor shift the expansion
        audio_token = self.tokenizer.convert_tokens_to_ids(self.processor.audio_token)
        if ids.count(audio_token) != len(delayed):
            raise AssertionError(f"the template wrote {ids.count(audio_token)} audio tokens for {len(delayed)} audios")
        segments = iter(delayed)
        expanded_ids = []
        for token in ids:
            if token == audio_token:
                expanded_ids += self.tokenizer.encode(self.processor.get_audio_tokens(next(segments).shape[0]),
                                                      add_special_tokens=False)
            else:
                expanded_ids.append(token)
        audio_input_ids = torch.cat(delayed) if delayed else None
        return Prompt(input_ids=torch.tensor(expanded_ids, dtype=torch.long), audio_input_ids=audio_input_ids,
                      text=text)

    # ---------------- reference audio
    def encode_audio(self, waveform):
        """24 kHz mono float waveform -> codes [C, T], as Boson's tokenizer encodes them (encode_waveform)."""
        return encode_waveform(self.audio_tokenizer, waveform, self.device)

    def min_audio_samples(self) -> int:
        """Fewest 24 kHz samples encode_audio takes: both codec paths must give the same frame count, >= 1.

        Worked out from the codec's own conv stack (kernel, stride, padding, dilation of every
        Conv1d on each path), the way encode_audio feeds it; a shorter clip would stop in a conv
        with "Kernel size can't be greater than actual input size".
        """
        if getattr(self, "_min_audio_samples", None) is None:
            tok = self.audio_tokenizer
            cfg = tok.config
            factor = max(cfg.semantic_downsample_factor, 1)

            def frames(n: int) -> int:
                # _extract_semantic_features: resample (torchaudio keeps ceil(n * new / old)), pad 160 per side
                sem = conv_stack_length(tok.semantic_model.feature_extractor,
                                           math.ceil(n * cfg.semantic_sample_rate / cfg.sample_rate) + 2 * 160)
                sem = conv_stack_length(tok.encoder_semantic, -(-sem // factor)) if sem else 0
                acoustic = conv_stack_length(tok.acoustic_encoder, n)  # runs even when it comes out short
                if acoustic and acoustic != sem:
                    acoustic = conv_stack_length(tok.acoustic_encoder, n + 2 * REENCODE_PAD)
                return sem if acoustic == sem else 0

            limit = 100 * cfg.hop_length
            self._min_audio_samples = next((n for n in range(1, limit) if frames(n) >= 1), limit)
        return self._min_audio_samples

    def decode_audio(self, aligned_codes):
        """[T, C] codes (< 1024) -> float32 numpy waveform at 24 kHz."""
        import torch

        codes = aligned_codes.clamp(0, self.config.audio_stream_bos_id - 1).T[None].to(self.device)
        with torch.no_grad():
            audio = self.audio_tokenizer.decode(codes).audio_values
        return audio.reshape(-1).float().cpu().numpy()

    # ---------------- model steps
    def _batch_inputs(self, prompts: list[Prompt]):
        """Left-pad the prompts; returns input_ids, mask, position_ids, audio ids/mask."""
        import torch

        pad = self.config.pad_token_id if self.config.pad_token_id is not None else 0
        lengths = [len(p.input_ids) for p in prompts]
        width = max(lengths)
        input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            input_ids[i, width - lengths[i]:] = p.input_ids
            mask[i, width - lengths[i]:] = 1
        audio, audio_mask = None, None
        if any(p.audio_input_ids is not None for p in prompts):
            if any(p.audio_input_ids is None for p in prompts):
                raise ValueError("all prompts of a batch must carry reference audio, or none")
            frames = max(p.audio_input_ids.shape[0] for p in prompts)
            audio = torch.full((len(prompts), frames, self.config.num_codebooks),
                               self.config.audio_stream_eos_id, dtype=torch.long)
            audio_mask = torch.zeros((len(prompts), frames), dtype=torch.bool)
            for i, p in enumerate(prompts):
                audio[i, : p.audio_input_ids.shape[0]] = p.audio_input_ids
                audio_mask[i, : p.audio_input_ids.shape[0]] = True
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        return input_ids, mask, position_ids, audio, audio_mask

    def prompt_logits(self, prompt: Prompt):
        """Teacher-forced logits of the prompt, [T, C, V] float32 (for parity checks)."""
        import torch

        input_ids, mask, position_ids, audio, audio_mask = self._batch_inputs([prompt])
        with torch.no_grad():
            out = self.model(
                input_ids=input_ids.to(self.device),
                attention_mask=mask.to(self.device),
                position_ids=position_ids.to(self.device),
                audio_input_ids=None if audio is None else audio.to(self.device),
                audio_input_ids_mask=None if audio_mask is None else audio_mask.to(self.device),
                use_cache=False,
            )
        return out.logits[0].float().reshape(-1, self.config.num_codebooks, self.config.codebook_size)

    def generate(self, prompts: list[Prompt], params: SamplingParams, seeds: list[int],
                 progress: bool = False, forced_frames: int | None = None, **kwargs):
        """generate_frames run to the end: returns (list[Generation], Timings)."""
        frames = self.generate_frames(prompts, params, seeds, progress, forced_frames, **kwargs)
        while True:
            try:
                next(frames)
            except StopIteration as done:
                return done.value

    def generate_frames(self, prompts: list[Prompt], params: SamplingParams, seeds: list[int],
                        progress: bool = False, forced_frames: int | None = None, frame_limit: int | None = None,
                        min_cache_len: int = 0):
        """Prefill (eager), then decode frame by frame with Boson's sampling rules.

        A generator: at every host sync (each FINISHED_CHECK_EVERY frames) it yields (t, out_codes), the
        device buffer [B, max_frames, C] whose rows 0..t are final (streaming reads them there, so the step
        itself still reads nothing back); its return value is generate's. `frame_limit` stops the decode
        earlier than max_new_tokens without changing the decode context (a chunk's runaway budget);
        `min_cache_len` sizes the KV cache for the longest prompt expected, so that chunks of one text
        share one cache (and one captured graph).

        Every decode step has static shapes and no host sync, so on cuda/npu it is
        captured once as a graph and replayed. Returns (list[Generation], Timings);
        `forced_frames` runs exactly that many frames whatever EOS says (benchmarks).
        """
        import torch

        params.validate()
        for seed in seeds:
            check_seed(int(seed), flag="seed")
        cfg = self.config
        num_cb = cfg.num_codebooks
        batch = len(prompts)
        device = self.device
        max_frames = forced_frames or params.max_new_tokens
        input_ids, mask, position_ids, audio, audio_mask = self._batch_inputs(prompts)
        prompt_len = input_ids.shape[1]
        # the window holds reference + generated frames, never more than the prompt + max_frames: a longer
        # one would only hold empty (-1) slots, so capping it changes no count (and --ras_win_len 1e9 fits)
        window_len = max(min(params.ras_win_len, prompt_len + max_frames), 1)
        ctx = self._decode_context(batch, max(prompt_len + max_frames, min_cache_len), max_frames, window_len, params)
        cache, bufs = ctx.cache, ctx.bufs
        # One mask as long as the cache: left padding masked, causality comes from the cache slot.
        full_mask = torch.ones((batch, bufs.attention_mask.shape[1]), dtype=torch.long)
        full_mask[:, :prompt_len] = mask

        window = torch.full((batch, window_len, num_cb), -1, dtype=torch.long)
        if audio is not None and params.ras:
            # the original's RAS window also sees the reference audio frames before frame 0
            for i, p in enumerate(prompts):
                tail = p.audio_input_ids[-params.ras_win_len:]
                window[i, window.shape[1] - tail.shape[0]:] = tail
        bufs.reset(cfg.audio_stream_bos_id, position_ids[:, -1:] + 1, full_mask, window)
        noise = NoiseSource(seeds, num_cb, cfg.codebook_size, device) if bufs.noise is not None else None

        timings = Timings()
        synchronize(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            self.model(
                input_ids=input_ids.to(device),
                attention_mask=bufs.attention_mask[:, :prompt_len],
                position_ids=position_ids.to(device),
                audio_input_ids=None if audio is None else audio.to(device),
                audio_input_ids_mask=None if audio_mask is None else audio_mask.to(device),
                **{self.cache_kwarg: cache},
                use_cache=True,
                logits_to_keep=1,
            )
        synchronize(device)
        timings.prefill_s = time.perf_counter() - t0

        runner = ctx.runner
        bar = None
        if progress and max_frames > 1:
            from tqdm import tqdm

            bar = tqdm(total=min(max_frames, frame_limit or max_frames), initial=1, unit="frame", desc="decode",
                       file=sys.stderr, leave=False)
        steps = 0
        t1 = time.perf_counter()
        for t in range(1, min(max_frames, frame_limit or max_frames)):
            with torch.no_grad():  # per step: a yield must not leave grad mode off in the caller
                if noise is not None:
                    noise.fill(bufs, t)
                runner.run()
                if noise is not None:
                    noise.prefetch(t)
            steps += 1
            if bar is not None:
                bar.update(1)
            if t % FINISHED_CHECK_EVERY == 0:
                if forced_frames is None and bool(bufs.finished.all()):
                    break
                yield t, bufs.out_codes
        synchronize(device)
        if bar is not None:
            bar.close()
        timings.decode_s = time.perf_counter() - t1
        timings.decode_steps = steps
        timings.decode_mode = runner.mode

        n_frames = bufs.n_frames.cpu().tolist()
        finished = bufs.finished.cpu().tolist()
        codes_cpu = bufs.out_codes.to("cpu", copy=True)  # the buffer is reused by the next call
        # frames past a row's EOS (checked only every few frames) are trimmed here
        kept = [steps + 1 if forced_frames else min(n_frames[i], steps + 1) for i in range(batch)]
        results = [
            Generation(codes=codes_cpu[i, : kept[i]], finished=bool(finished[i]), seed=int(seeds[i]))
            for i in range(batch)
        ]
        return results, timings

    def _decode_context(self, batch, min_cache_len, max_frames, window_len, params: SamplingParams):
        """Cache, buffers and step runner, reused while the shapes and sampling settings stay the same.

        Reuse keeps the captured graph (and torch.compile's static-address guards) valid
        across attempts, lines of a text file and benchmark repeats. The cache length is
        rounded up to a multiple of 256 so that similar prompts share one.
        """
        from transformers import StaticCache

        cache_len = -(-min_cache_len // 256) * 256
        sampled = not params.greedy or params.ras
        key = (batch, cache_len, max_frames, window_len, asdict(params) | {"max_new_tokens": 0},
               self.graph_mode, self.compile_backend, str(self.device))
        ctx = self.decode_context
        if ctx is not None and ctx.key == key:
            ctx.cache.reset()
            return ctx
        self.decode_context = None  # free the old cache before allocating the new one
        self.check_decode_memory(batch, min_cache_len - max_frames, max_frames, params)
        cache = StaticCache(config=self.config, max_cache_len=cache_len)
        bufs = DecodeBuffers.create(batch, self.config.num_codebooks, self.config.codebook_size, max_frames,
                                    cache_len, window_len, self.device, sampled)
        model, cfg, cache_kwarg = self.model, self.config, self.cache_kwarg
        eager_step = decode_step  # looked up now: a context keeps the step it was built with

        def step():
            eager_step(model, cache, bufs, params, cfg, cache_kwarg)

        def compiled():
            compiled_step(model, cache, bufs, params, cfg, cache_kwarg)

        compiled_step = self._compiled_step() if self.decode_mode() == "compile" else None

        runner = StepRunner(step, self.device, self.decode_mode() == "on",
                            compiled=compiled if compiled_step is not None else None)
        self.decode_context = DecodeContext(key, cache, bufs, runner)
        return self.decode_context

    def decode_memory_bytes(self, batch: int, prompt_len: int, max_frames: int, params: SamplingParams):
        """(device bytes, host bytes) one decode context takes: StaticCache + DecodeBuffers + noise + host copies."""
        import torch

        cfg = self.config
        cache_len = -(-(prompt_len + max_frames) // 256) * 256
        window_len = max(min(params.ras_win_len, prompt_len + max_frames), 1)
        num_cb, long = cfg.num_codebooks, 8
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv = (cfg.num_hidden_layers * 2 * batch * cfg.num_key_value_heads * head_dim * cache_len
              * torch.empty((), dtype=self.dtype).element_size())
        sampled = not params.greedy or params.ras
        noise = 2 * batch * num_cb * cfg.codebook_size * 4 * (1 + 2 * NOISE_CHUNK) if sampled else 0  # + 2 chunks
        # mask, codes, window; then frame, position, num_delay, remaining, n_frames, finished (bool), t
        device = kv + noise + batch * (cache_len + max_frames * num_cb + window_len * num_cb) * long
        device += batch * (num_cb + 4) * long + batch + long
        host = batch * (cache_len + max_frames * num_cb + window_len * num_cb) * long  # mask, codes copy, window
        return device, host

    def check_decode_memory(self, batch: int, prompt_len: int, max_frames: int, params: SamplingParams,
                            flag: str = "--max_new_tokens") -> None:
        """Refuse, before allocating, a decode the device (or the host) cannot hold: one error line, not an OOM."""
        def over(frames):
            device, host = self.decode_memory_bytes(batch, prompt_len, frames, params)
            if self.device.type == "cpu":
                return [("this machine", device + host, free_memory_bytes(self.device))]
            return [(str(self.device), device, free_memory_bytes(self.device)),
                    ("the host", host, available_memory_bytes())]

        short = [(where, need, free) for where, need, free in over(max_frames) if need > free]
        if not short:
            return
        where, need, free = short[0]
        lo, hi = 0, max_frames  # the largest budget that fits, for the hint
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if all(n <= f for _, n, f in over(mid)) else (lo, mid - 1)
        rows = f" x {batch} rows" if batch > 1 else ""
        hint = (f"at most about {lo} fit" + (" (or lower --batch_size)" if batch > 1 else "")) if lo else \
            "nothing fits next to the loaded model"
        raise UserError(f"{flag} {max_frames}{rows}: the KV cache and decode buffers need {need / 2**30:.1f} GiB "
                        f"but {where} has {free / 2**30:.1f} GiB free; lower {flag} ({hint})")

    def _compiled_step(self):
        """torch.compile(fullgraph=True) of the step: fails loudly on any host sync or graph break."""
        import torch

        if self.compiled_step is None:
            self.compiled_step = torch.compile(decode_step, fullgraph=True, dynamic=False,
                                               backend=self.compile_backend)
        return self.compiled_step


@dataclass
class DecodeBuffers:
    """Static tensors one decode step reads and updates in place (what a graph replays on)."""

    frame: torch.Tensor  # [B, C] codes fed to the model
    position_ids: torch.Tensor  # [B, 1]
    attention_mask: torch.Tensor  # [B, cache_len]
    noise: torch.Tensor | None  # [B, C, V] Gumbel noise (-log E) for sampling, or None when nothing is random
    ras_noise: torch.Tensor | None  # [B, C, V] the same for the RAS resample
    num_delay: torch.Tensor
    remaining: torch.Tensor
    finished: torch.Tensor
    n_frames: torch.Tensor
    window: torch.Tensor
    out_codes: torch.Tensor  # [B, max_frames, C]
    t: torch.Tensor  # 0-d: index of the frame the next step writes

    @classmethod
    def create(cls, batch, num_cb, vocab, max_frames, cache_len, window_len, device, sampled):
        import torch

        def longs(*shape):
            return torch.zeros(shape, dtype=torch.long, device=device)

        return cls(
            frame=longs(batch, num_cb),
            position_ids=longs(batch, 1),
            attention_mask=longs(batch, cache_len),
            noise=torch.zeros((batch, num_cb, vocab), device=device) if sampled else None,
            ras_noise=torch.zeros((batch, num_cb, vocab), device=device) if sampled else None,
            num_delay=longs(batch),
            remaining=longs(batch),
            finished=torch.zeros(batch, dtype=torch.bool, device=device),
            n_frames=longs(batch),
            window=longs(batch, window_len, num_cb),
            out_codes=longs(batch, max_frames, num_cb),
            t=longs(),
        )

    def reset(self, bos, next_positions, full_mask, window) -> None:
        """Start values of a generation, written in place (a captured graph keeps the addresses)."""
        self.frame.fill_(bos)  # frame 0: all BOS
        self.position_ids.copy_(next_positions)
        self.attention_mask.copy_(full_mask)
        self.num_delay.zero_()
        self.remaining.fill_(-1)
        self.finished.fill_(False)
        self.n_frames.fill_(self.out_codes.shape[1])
        self.window.copy_(window)
        self.out_codes.fill_(bos)
        self.t.fill_(1)


@dataclass
class DecodeContext:
    key: tuple
    cache: StaticCache
    bufs: DecodeBuffers
    runner: StepRunner


def decode_step(model, cache, bufs: DecodeBuffers, params: SamplingParams, cfg, cache_kwarg: str) -> None:
    """Forward one frame through the model, sample the next one, update `bufs` in place.

    Static shapes, no host sync, no random op: safe to capture as a CUDA/NPU graph and
    to compile with torch.compile(fullgraph=True).
    """
    import torch

    batch, num_cb = bufs.frame.shape
    out = model(
        audio_input_ids=bufs.frame[:, None, :],
        attention_mask=bufs.attention_mask,
        position_ids=bufs.position_ids,
        **{cache_kwarg: cache},
        use_cache=True,
    )
    logits = out.logits[:, -1].float().reshape(batch, num_cb, cfg.codebook_size)
    window = torch.cat([bufs.window[:, 1:], bufs.frame[:, None]], dim=1)  # RAS sees the frame just fed
    state = DecodeState(bufs.num_delay, bufs.remaining, window)
    codes, new, done_now = sample_frame(logits, state, params, bufs.noise, bufs.ras_noise, cfg)
    # rows that finished earlier stop changing: they keep emitting EOS
    codes = torch.where(bufs.finished[:, None], cfg.audio_stream_eos_id, codes)
    bufs.n_frames.copy_(torch.where(done_now & ~bufs.finished, bufs.t + 1, bufs.n_frames))
    bufs.finished.copy_(bufs.finished | done_now)
    bufs.num_delay.copy_(new.num_delay)
    bufs.remaining.copy_(new.remaining)
    bufs.window.copy_(window)
    bufs.out_codes.index_copy_(1, bufs.t.reshape(1), codes[:, None, :])
    bufs.frame.copy_(codes)
    bufs.position_ids.add_(1)
    bufs.t.add_(1)


class NoiseSource:
    """Gumbel noise -log E, E = -log U ~ Exp(1), U ~ Uniform[0, 1), from one seeded CPU generator per row.

    `uniform_` gives the same stream on every torch release and host CPU, so one seed picks the
    same codes everywhere; `exponential_` does not (torch 2.6 on x86 takes MKL's, 2.9 its own)
    and is 2.5x slower. U = 0 gives -inf noise: that code is never picked.

    Drawn `chunk` frames at a time and copied to the device in one transfer. The next chunk is
    drawn at the last frame of the current one (`prefetch`), while the device still works on the
    frames queued since the last host sync; drawing it at the first frame of the new chunk, just
    after a sync, would leave the device idle for the whole draw (about 7 ms per 32 frames of
    batch 1 on a 2-core CPU).
    """

    def __init__(self, seeds, num_cb, vocab, device, chunk=NOISE_CHUNK):
        import torch

        self.generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        self.shape = (num_cb, vocab)
        self.device = device
        self.chunk = chunk
        self.pin = device.type in ("cuda", "npu")
        self.block = None
        self.block_start = None
        self.upcoming = None

    def _draw(self):
        import torch

        # per row: chunk frames x (sampling, RAS) noise, in a fixed order
        uniform = torch.stack([torch.empty(self.chunk, 2, *self.shape).uniform_(generator=g)
                               for g in self.generators], dim=1)  # [chunk, B, 2, C, V]
        draws = uniform.log_().neg_().log_().neg_()  # -log(-log U)
        if self.pin:
            draws = draws.pin_memory()
        return draws.to(self.device, non_blocking=True)

    def fill(self, bufs: DecodeBuffers, t: int) -> None:
        if self.block is None or t - self.block_start >= self.chunk:
            self.block = self.upcoming if self.upcoming is not None else self._draw()
            self.upcoming = None
            self.block_start = t
        k = t - self.block_start
        bufs.noise.copy_(self.block[k, :, 0])
        bufs.ras_noise.copy_(self.block[k, :, 1])

    def prefetch(self, t: int) -> None:
        """Call after frame t is queued and before the host waits: draws the next chunk at the last frame of this one."""
        if self.upcoming is None and self.block is not None and t - self.block_start == self.chunk - 1:
            self.upcoming = self._draw()


class StepRunner:
    """Runs the decode step eagerly, or captures it once as a CUDA/NPU graph and replays it.

    The first frames run eagerly on a side stream (they are real frames, and warm up the
    kernels); the next call is captured. A capture failure falls back to eager with one
    warning line.
    """

    WARMUP = 2

    def __init__(self, step, device, enabled: bool, compiled=None):
        self.step = step
        self.device = device
        self.compiled = compiled  # torch.compile'd step (--graph compile), tried first
        self.mode = "compile" if compiled is not None else "off"  # what the step runs as so far
        self.captured = None  # the captured CUDA/NPU graph, once there is one
        self.calls = 0
        self.api = graph_api(device) if enabled else None
        if enabled and self.api is None:
            hint = " (torch.npu.NPUGraph needs CANN 8.1.RC1+ and torch_npu 7.0.0+)" if device.type == "npu" else ""
            print(f"warning: no graph API for {device}{hint}; decoding eagerly", file=sys.stderr)

    def run(self) -> None:
        if self.captured is not None:
            self.captured.replay()
            return
        if self.compiled is not None:
            first = self.calls == 0
            self.calls += 1
            try:
                self.compiled()
                return
            except Exception as e:
                if not first:  # compiling happens on the first call; a later error is a real one
                    raise
                # tracing failed before anything ran, so the buffers are untouched
                print(f"warning: torch.compile of the decode step failed ({type(e).__name__}: "
                      f"{first_line(e)}); decoding eagerly", file=sys.stderr)
                self.compiled = None
                self.mode = "off"
        if self.api is None:
            self.step()
            return
        graph_cls, graph_ctx, stream_cls, stream_ctx, current_stream = self.api  # a GraphAPI
        self.calls += 1
        if self.calls <= self.WARMUP:
            side = stream_cls()
            side.wait_stream(current_stream())
            with stream_ctx(side):
                self.step()
            current_stream().wait_stream(side)
            return
        try:
            graph = graph_cls()
            with graph_ctx(graph):
                self.step()
        except Exception as e:  # capture is best effort: eager decoding is always correct
            print(f"warning: graph capture failed on {self.device} ({type(e).__name__}: "
                  f"{first_line(e)}); decoding eagerly", file=sys.stderr)
            self.api = None
            synchronize(self.device)
            self.step()
            return
        self.captured = graph
        self.mode = "on"
        graph.replay()  # capture records without running: run this frame now


class GraphAPI(NamedTuple):
    """torch.cuda's graph-capture API, or torch_npu's mirror of it."""

    graph: type  # CUDAGraph / NPUGraph
    graph_context: object  # torch.cuda.graph / torch.npu.graph
    stream: type
    stream_context: object
    current_stream: object


def graph_api(device) -> GraphAPI | None:
    """The graph-capture API for a cuda or npu device; None where there is none."""
    import torch

    if device.type == "cuda":
        m = torch.cuda
    elif device.type == "npu":
        m = torch.npu  # torch_npu mirrors the CUDA graph API: NPUGraph, torch.npu.graph
    else:
        return None
    graph_cls = getattr(m, "CUDAGraph", None) or getattr(m, "NPUGraph", None)
    if graph_cls is None or not hasattr(m, "graph"):
        return None
    return GraphAPI(graph_cls, m.graph, m.Stream, m.stream, m.current_stream)


def first_difference_from_eager(engine: Engine, prompt: Prompt, params: SamplingParams, seed: int, codes):
    """First frame where an eager run (same seed, as many frames) differs from `codes`, or None.

    `codes` come from the graph-replayed or compiled step: a stale static buffer or a missed
    in-place update shows up here as other codes.
    """
    eager, _ = engine.with_graph_mode("off").generate([prompt], params, [seed], forced_frames=codes.shape[0])
    differ = (codes != eager[0].codes).any(dim=1).nonzero()
    return int(differ[0]) if len(differ) else None


def load_engine(model_path, tokenizer_path, device=None, dtype=None, log=None, graph="auto") -> Engine:
    """The one loader: CLI, selftest, eval, convert_weights' smoke check and tests all use it.

    Weights are verified twice: the safetensors headers against the tensors the config asks
    for before loading (one clear line when a folder holds another model), and transformers'
    own loading report after it (nothing initialised at random).
    """
    log = log or (lambda msg: None)
    if graph not in GRAPH_MODES:
        raise UserError(f"--graph {graph}: expected {', '.join(GRAPH_MODES)}")
    model_path, tokenizer_path = Path(model_path), Path(tokenizer_path)
    config = check_model_dir(model_path)
    tokenizer_config = check_tokenizer_dir(tokenizer_path)
    model_expected = checkpoints.verify_folder("model", model_path, config)
    codec_expected = checkpoints.verify_folder("tokenizer", tokenizer_path, tokenizer_config)
    quantizers, codebooks = codec_expected.model.config.num_quantizers, model_expected.model.config.num_codebooks
    if quantizers != codebooks:
        raise UserError(f"{tokenizer_path} has {quantizers} quantizers but the model in {model_path} expects "
                        f"{codebooks} codebooks: the two folders do not belong together")
    num_params = model_expected.parameter_count()
    log(f"Weights verified: generation model {num_params / 1e9:.3f} B parameters ({len(model_expected.shapes)} "
        f"tensors), audio tokenizer {codec_expected.parameter_count() / 1e6:.1f} M parameters "
        f"({len(codec_expected.shapes)} tensors)")
    device = pick_device(device) if not hasattr(device, "type") else device
    torch_dtype, reason = pick_dtype(dtype, device, num_params)
    log(f"Device: {device}  dtype: {str(torch_dtype).replace('torch.', '')} ({reason})")

    import torch
    from transformers import (
        AutoTokenizer,
        DacFeatureExtractor,
        HiggsAudioV2ForConditionalGeneration,
        HiggsAudioV2Processor,
        HiggsAudioV2TokenizerModel,
    )
    from transformers.utils import logging as hf_logging

    t0 = time.perf_counter()
    hf_logging.set_verbosity_error()
    bars = hf_logging.is_progress_bar_enabled()
    if not sys.stderr.isatty():  # "Loading weights" bars belong on a terminal, not in logs
        hf_logging.disable_progress_bar()
    try:
        log(f"Loading generation model from {model_path} ...")
        # device_map streams shards straight onto the accelerator (no full host copy)
        model, info = HiggsAudioV2ForConditionalGeneration.from_pretrained(
            model_path, dtype=torch_dtype, device_map=None if device.type == "cpu" else str(device),
            output_loading_info=True,
        )
        checkpoints.check_loading_info("model", model_path, info)
        model.eval()
        log(f"Loading audio tokenizer from {tokenizer_path} ...")
        audio_tokenizer, info = HiggsAudioV2TokenizerModel.from_pretrained(
            tokenizer_path, dtype=torch.float32, output_loading_info=True)
        checkpoints.check_loading_info("tokenizer", tokenizer_path, info)
        audio_tokenizer = audio_tokenizer.to(device).eval()
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"cannot load the checkpoint: {first_line(e)} (re-run: bash download.sh)") from None
    finally:
        hf_logging.set_verbosity_warning()
        if bars:
            hf_logging.enable_progress_bar()
    tokenizer = load_text_tokenizer(model_path, AutoTokenizer)
    processor = HiggsAudioV2Processor(
        load_feature_extractor(tokenizer_path, DacFeatureExtractor), tokenizer, audio_tokenizer,
        chat_template=read_text(model_path / "chat_template.jinja"), **processor_token_args(model_path, tokenizer),
    )
    engine = Engine(model, processor, audio_tokenizer, device, torch_dtype, reason, time.perf_counter() - t0,
                    graph_mode=graph)
    check_chat_template(engine, model_path)
    if graph == "on" and device.type == "cpu":
        print("warning: --graph on: a CPU has no graph capture; decoding eagerly (--graph compile compiles the "
              "step instead)", file=sys.stderr)
    return engine


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read as UTF-8 text ({first_line(e)}; re-run: bash download.sh)") \
            from None


def load_text_tokenizer(model_path: Path, tokenizer_cls):
    try:
        return tokenizer_cls.from_pretrained(model_path)
    # the tokenizers library reports a malformed tokenizer.json as a bare Exception
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{model_path}/tokenizer.json cannot be loaded ({type(e).__name__}: "
                        f"{first_line(e, 120)}; re-run: bash download.sh)") from None


def load_feature_extractor(tokenizer_path: Path, extractor_cls):
    """From the audio tokenizer folder; its sampling rate must be the codec's 24 kHz."""
    path = tokenizer_path / "preprocessor_config.json"
    if not path.is_file():
        return extractor_cls(feature_size=1, hop_length=1, sampling_rate=SAMPLE_RATE)
    fields = read_json(path)
    if fields.get("sampling_rate", SAMPLE_RATE) != SAMPLE_RATE:
        raise UserError(f"{path}: sampling_rate {fields.get('sampling_rate')!r}, expected {SAMPLE_RATE}")
    try:
        return extractor_cls.from_pretrained(tokenizer_path)
    except (TypeError, ValueError, KeyError) as e:
        raise UserError(f"{path}: not a valid feature-extractor config ({first_line(e, 120)})") from None


def processor_token_args(model_path: Path, tokenizer) -> dict:
    """Audio marker tokens and stream ids from processor_config.json, each checked."""
    path = model_path / "processor_config.json"
    if not path.is_file():
        return {}
    config = read_json(path)
    args = {}
    for key in ("audio_token", "audio_bos_token", "audio_eos_token", "audio_delay_token"):
        if key in config:
            token = config[key]
            if not isinstance(token, str) or tokenizer.convert_tokens_to_ids(token) in (None, tokenizer.unk_token_id):
                raise UserError(f"{path}: {key} {token!r} is not a token of {model_path}/tokenizer.json")
            args[key] = token
    for key in ("audio_stream_bos_id", "audio_stream_eos_id"):
        if key in config:
            if not isinstance(config[key], int) or isinstance(config[key], bool) or config[key] < 0:
                raise UserError(f"{path}: {key} {config[key]!r} is not a code id")
            args[key] = config[key]
    return args


def check_chat_template(engine: Engine, model_path: Path) -> None:
    """Render one prompt now, so a broken template is a load error, not a failure mid-run."""
    from jinja2 import TemplateError

    try:
        ids = engine.build_prompt("Hello.").input_ids
    except TemplateError as e:
        raise UserError(f"{model_path}/chat_template.jinja: {type(e).__name__}: {first_line(e, 120)} "
                        "(re-run: bash download.sh)") from None
    if len(ids) == 0 or int(ids[-1]) != engine.config.audio_bos_token_id:
        raise UserError(f"{model_path}/chat_template.jinja: a prompt does not end with the audio-start token "
                        f"(id {engine.config.audio_bos_token_id}); the template or tokenizer does not fit the model")


# --------------------------------------------------------------------------- attempts / retry


def speech_units(text: str) -> int:
    """Words of space-separated scripts plus CJK characters; only letters and digits speak, so punctuation
    (full-width "。", "，", "！" between CJK characters, a lone "-") counts for nothing."""
    cjk = sum(c.isalnum() for c in re.findall(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]", text))
    runs = re.findall(r"[^\s\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]+", text)
    return cjk + sum(any(c.isalnum() for c in run) for run in runs)


def min_expected_seconds(text: str) -> float:
    return speech_units(text) / MAX_UNITS_PER_SECOND


def retry_seeds(seed: int, retries: int) -> range:
    """Attempt k uses seed + k: documented, and different for every attempt (lazy: --retries may be huge)."""
    return range(seed, seed + retries + 1)


def check_seed(seed: int, retries: int = 0, flag: str = "--seed") -> None:
    """Every seed an attempt may use (seed .. seed + retries) must be one torch's generator accepts."""
    if retries > SEED_MAX - SEED_MIN:
        raise UserError(f"--retries {retries}: at most {SEED_MAX - SEED_MIN} (retries use seed+1, seed+2, ...)")
    if not SEED_MIN <= seed <= SEED_MAX - retries:
        tail = f" and --retries {retries} adds up to {retries} to it" if retries else ""
        raise UserError(f"{flag} {seed}: torch takes seeds from {SEED_MIN} to {SEED_MAX}{tail}; "
                        f"pick one from {SEED_MIN} to {SEED_MAX - retries}")


@dataclass
class AudioStats:
    samples: int = 0
    duration_s: float = 0.0
    rms: float = 0.0
    peak: float = 0.0
    non_finite: int = 0  # NaN / inf samples


def audio_stats(audio) -> AudioStats:
    import numpy as np

    if audio is None:
        return AudioStats()
    finite = np.isfinite(audio)
    clean = np.where(finite, audio, 0.0)
    return AudioStats(
        samples=int(audio.size),
        duration_s=round(audio.size / SAMPLE_RATE, 3),
        rms=float(np.sqrt(np.mean(clean.astype(np.float64) ** 2))) if audio.size else 0.0,
        peak=float(np.max(np.abs(clean))) if audio.size else 0.0,
        non_finite=int(audio.size - finite.sum()),
    )


def judge_attempt(text: str, codes, audio) -> str | None:
    """None if usable, else the reason. The rules are in docs/design.md (Retry rule)."""
    return judge_chunk(text, codes.shape[0], audio_stats(audio))


# --------------------------------------------------------------------------- output


@contextmanager
def atomic_output(path: Path):
    """Yields a temp path beside `path`, renamed over it when the block succeeds, removed when it fails.

    The result gets the mode a plain open() would give it (0666 less the umask), not mkstemp's 0600.
    """
    # a name near the file system's limit must not make the temp name (prefix + 8 + ".tmp") too long
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:64]}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0o022)  # reading the umask means setting it: put it straight back
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_wav_atomic(path: Path, audio) -> None:
    """PCM_16 mono 24 kHz, through a temp file and a rename: never a half-written WAV."""
    import numpy as np
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        sf.write(str(tmp), np.clip(np.nan_to_num(audio), -1.0, 1.0), SAMPLE_RATE, subtype="PCM_16", format="WAV")


def write_json_atomic(path: Path, data: dict) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def read_audio(path, what: str = "audio"):
    """(mono float32 samples, sample rate) of any soundfile-readable file; one error line when it cannot be read."""
    import soundfile as sf

    try:
        audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises its own error types
        raise UserError(f"{what} {path}: cannot read audio ({first_line(e)})") from None
    return audio.mean(axis=1), rate


def resample(audio, rate: int, target: int):
    """Mono (or [samples, channels], averaged) float32 audio at `rate` Hz -> `target` Hz, torchaudio's resampler."""
    import numpy as np

    audio = np.asarray(audio, dtype=np.float32)
    audio = audio.mean(axis=1) if audio.ndim == 2 else audio.reshape(-1)
    if rate == target or audio.size == 0:
        return audio
    import torch
    import torchaudio

    return torchaudio.functional.resample(torch.from_numpy(np.ascontiguousarray(audio)), rate, target).numpy()


def load_reference_audio(path: str):
    """Any soundfile-readable file -> 24 kHz mono float32 numpy."""
    import numpy as np

    audio, rate = read_audio(path, "--ref_audio")
    if audio.size == 0:
        raise UserError(f"--ref_audio {path}: the file holds no samples")
    if rate != SAMPLE_RATE:
        audio = resample(audio, rate, SAMPLE_RATE)
    return np.ascontiguousarray(audio, dtype=np.float32)


# --------------------------------------------------------------------------- long texts and streaming

# A chunk holds at most CHUNK_WORDS words, a CJK character counting half a word: at a normal pace (2.5 words or
# 5 CJK characters a second) that is about 24 s of speech, 600 frames. That leaves the 2048-frame budget over 3x
# headroom, keeps a prompt with the reference and two context chunks near 2,000 audio positions, and still gives
# a few sentences of prosody per chunk (Boson's 200 words is about 80 s, right at the budget).
CHUNK_WORDS = 60
CONTEXT_CHUNKS = 2  # earlier chunks (text + codes) in each chunk's prompt, as Boson's --generation_chunk_buffer_size
CHUNK_SEED_STRIDE = 2**32  # chunk k starts at seed + k * 2**32: no collision with any chunk's retries (< 2**32)
NORMAL_WORDS_PER_SECOND = 2.5  # 150 words a minute; a CJK character counts half a word (5 a second)
RUNAWAY_FACTOR = 3.0  # a runaway chunk longer than this many times what its text needs is unusable
RUNAWAY_MIN_NEED_S = 1.0  # "Yes." still may take a breath: no text needs less than this
TRAILING_SILENCE_S = 2.0  # a chunk ending in more near-silence than this ran away
NEAR_SILENCE_RMS = 10 ** (-50 / 20)  # -50 dBFS over one 40 ms frame: room tone, not speech
KEEP_PAUSE_FRAMES = 12  # near-silence kept where a runaway is trimmed: a 0.48 s pause (>= STREAM_LOOKAHEAD)
FRAME_SAMPLES = 960  # samples per codec frame (24 kHz / 25 Hz)
FRAMES_PER_SECOND = SAMPLE_RATE // FRAME_SAMPLES
# The codec decoder's receptive field, measured (docs/longform.md): one frame's codes reach 9.8 frames to each side
# on the real architecture (8.3 on the tiny codec). Windows with 10 frames of context and of lookahead give the
# one-shot decode to float rounding (129 dB SNR real-size, 151 dB tiny; 24.5 / 41.6 dB with none), so no crossfade.
STREAM_CONTEXT = 10
STREAM_LOOKAHEAD = 10

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af"
_CJK_CHAR = re.compile(f"[{_CJK}]")
_SENTENCE_END = ".!?;。！？；"
_CLAUSE_END = ",:，、："
_FULL_WIDTH_END = "。！？；，、："  # end a sentence or clause without a space after them
_PAIRS = {"“": "”", "‘": "’", "「": "」", "『": "』", "«": "»", "《": "》", "(": ")", "（": "）", "【": "】", "[": "]"}
_CLOSERS = set(_PAIRS.values()) | {'"', "'"}
# "Dr. Smith", "e.g. this": a period after these is not a sentence end (lower-cased, without the period)
_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "inc", "ltd", "co", "corp", "mt",
                  "fig", "vol", "dept", "approx", "no", "gen", "gov", "sen", "rep", "capt", "lt", "col", "sgt"}
# where a cut may go, best first; inside quotes or brackets only when the quoted span alone is too long;
# _ANY (next to a CJK character, e.g. between '“' and '你') only when nothing else keeps a chunk in budget
_LINE, _SENTENCE, _CLAUSE, _WORD, _QUOTED, _QUOTED_WORD, _ANY = 6, 5, 4, 3, 2, 1, 0
_CUT_PENALTY = {_LINE: 0, _SENTENCE: 0, _CLAUSE: 1, _WORD: 10, _QUOTED: 30, _QUOTED_WORD: 100, _ANY: 1000}


def chunk_cost(text: str) -> float:
    """Words of space-separated scripts plus half a CJK character each: about equal speaking time per unit."""
    cjk = len(_CJK_CHAR.findall(text))
    return (speech_units(text) - cjk) + cjk / 2 if cjk else float(speech_units(text))


def _quoted_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of every matched quote or bracket pair; an unmatched one protects nothing."""
    spans, stack = [], []
    for i, c in enumerate(text):
        if c == "’" and 0 < i < len(text) - 1 and text[i - 1].isalpha() and text[i + 1].isalpha():
            continue  # an apostrophe: it’s
        if c == '"':
            if stack and stack[-1][0] == '"':
                spans.append((stack.pop()[1], i + 1))
            else:
                stack.append((c, i))
        elif c in _PAIRS:
            stack.append((c, i))
        elif c in _PAIRS.values():
            for depth in range(len(stack) - 1, -1, -1):
                if _PAIRS.get(stack[depth][0]) == c:
                    spans.append((stack[depth][1], i + 1))
                    del stack[depth:]
                    break
    return spans


def _is_abbreviation(text: str, dot: int) -> bool:
    """Whether the "." at `dot` ends an abbreviation (Dr. / e.g. / U.S. / J.) rather than a sentence."""
    start = dot
    while start > 0 and (text[start - 1].isalpha() or text[start - 1] == "."):
        start -= 1
    word = text[start:dot]
    if not word or not word.replace(".", "").isalpha():
        return False
    if "." in word:  # e.g, i.e, U.S, a.m: letters joined by periods
        return all(len(part) == 1 for part in word.split("."))
    return word.lower() in _ABBREVIATIONS or (len(word) == 1 and word.isupper() and word not in "IA")


def _break_levels(text: str) -> dict[int, int]:
    """Position p -> how good a place to cut between text[:p] and text[p:] is (_LINE ... _ANY).

    Never inside a word or a number (3.14, 1,000: no space after the mark), never after an
    abbreviation; inside quotes or brackets every place ranks below any place outside them.
    """
    inside = [0] * (len(text) + 1)
    for start, end in _quoted_spans(text):
        for p in range(start + 1, end):
            inside[p] = 1
    levels: dict[int, int] = {}

    def put(p: int, level: int) -> None:
        if 0 < p < len(text):
            if inside[p] and level >= _WORD:
                level = _QUOTED if level > _WORD else _QUOTED_WORD
            levels[p] = max(levels.get(p, -1), level)

    for i, c in enumerate(text):
        nxt = text[i + 1] if i + 1 < len(text) else ""
        if nxt and not c.isspace() and not nxt.isspace() and (_CJK_CHAR.match(c) or _CJK_CHAR.match(nxt)):
            put(i + 1, _ANY)  # a CJK character next to anything: never inside a Latin word or number
        if c == "\n":
            put(i, _LINE)
        elif c.isspace():
            if i > 0 and not text[i - 1].isspace():
                put(i, _WORD)
        elif c in _SENTENCE_END or c in _CLAUSE_END:
            if nxt and (nxt in _SENTENCE_END or nxt in _CLAUSE_END):
                continue  # "?!", "...": cut after the last mark of a run
            j = i + 1
            while j < len(text) and text[j] in _CLOSERS:
                j += 1
            after = text[j] if j < len(text) else ""
            if not (after == "" or after.isspace() or c in _FULL_WIDTH_END or _CJK_CHAR.match(after)):
                continue  # 3.14, 1,000, a.m.: not followed by a space
            if c == "." and _is_abbreviation(text, i):
                continue
            put(j, _SENTENCE if c in _SENTENCE_END else _CLAUSE)
        elif nxt and c.isalnum() and nxt.isalnum() and (_CJK_CHAR.match(c) or _CJK_CHAR.match(nxt)):
            put(i + 1, _WORD)  # between CJK characters, or a CJK character and a Latin word
    return levels


def split_text(text: str, max_words: float = CHUNK_WORDS) -> list[str]:
    """Cut `text` into chunks of at most `max_words` (chunk_cost), at the best places available.

    The text is cut into sentences (line breaks, sentence ends); only a sentence too long alone is cut
    further, at clause ends, then between words, and a quoted span too long alone inside it the same
    way. These pieces are then grouped into chunks by a small dynamic programme: the fewest weak cuts
    first (_CUT_PENALTY: a clause end 1, a word boundary 10, inside quotes 30 and 100), then the fewest
    chunks, then chunks of even size (no "apples," left alone at the end). The chunks are stripped
    substrings that follow each other: joined, they give the text back (less whitespace). `max_words`
    0: one chunk.
    """
    import bisect

    if max_words <= 0 or chunk_cost(text) <= max_words:
        return [text.strip()] if text.strip() else []
    levels = _break_levels(text)
    by_level = {level: sorted(p for p, v in levels.items() if v >= level) for level in range(_LINE + 1)}

    def pieces(start: int, end: int, level: int):
        cuts = by_level[level]
        bounds = [start, *cuts[bisect.bisect_right(cuts, start):bisect.bisect_left(cuts, end)], end]
        for a, b in zip(bounds, bounds[1:]):
            if level > _ANY and chunk_cost(text[a:b]) > max_words:
                yield from pieces(a, b, level - 1)
            else:
                yield a, b

    spans = list(pieces(0, len(text), _LINE))
    costs = [chunk_cost(text[a:b]) for a, b in spans]  # additive: every cut lies between words
    # best[i]: (weak-cut penalty, chunks, sum of squared chunk costs) of the best grouping of spans[:i]
    best: list = [(0, 0, 0.0)] + [None] * len(spans)
    back = [0] * (len(spans) + 1)
    for i in range(1, len(spans) + 1):
        total = 0.0
        for j in range(i - 1, -1, -1):
            total += costs[j]
            if total > max_words and j < i - 1:
                break
            if best[j] is None:
                continue
            cut = _CUT_PENALTY[levels[spans[j][0]]] if j else 0
            score = (best[j][0] + cut, best[j][1] + 1, best[j][2] + total * total)
            if best[i] is None or score < best[i]:
                best[i], back[i] = score, j
    groups, i = [], len(spans)
    while i:
        groups.append((spans[back[i]][0], spans[i - 1][1]))
        i = back[i]
    return [text[a:b].strip() for a, b in reversed(groups) if text[a:b].strip()]


def chunk_seed(seed: int, k: int, retries: int = 0) -> int:
    """Chunk k's first seed: seed + k * 2**32, taken mod 2**64 (torch's seed space) into the accepted range.

    Its retries add 1, 2, ... as for any text, so every chunk and attempt of a text gets its own seed while
    --retries < 2**32; chunk 0 is the plain --seed, so a text of one chunk is generated as before.
    """
    s = seed + k * CHUNK_SEED_STRIDE
    if s + retries > SEED_MAX:
        s -= 2**64  # torch.Generator.manual_seed(s - 2**64) == manual_seed(s)
    return s


def needed_seconds(text: str) -> float:
    """What a text needs at a normal pace (NORMAL_WORDS_PER_SECOND), at least RUNAWAY_MIN_NEED_S."""
    return max(chunk_cost(text) / NORMAL_WORDS_PER_SECOND, RUNAWAY_MIN_NEED_S)


def runaway_limit_frames(text: str) -> int:
    """Aligned frames above which a runaway chunk is unusable: RUNAWAY_FACTOR x needed_seconds."""
    return math.ceil(RUNAWAY_FACTOR * needed_seconds(text) * FRAMES_PER_SECOND)


def chunk_frame_budget(text: str, max_new_tokens: int, num_codebooks: int) -> int:
    """Frames to generate for a chunk at most: past the runaway limit a chunk without EOS is unusable anyway,
    so it stops one aligned frame beyond it (plus the delay pattern's BOS frame, C-1 delay rows, closing column)."""
    return min(max_new_tokens, runaway_limit_frames(text) + 1 + num_codebooks + 1)


def frame_stats(audio):
    """float32 [T * 960] -> [T, 3]: RMS, peak and non-finite sample count of each codec frame (as audio_stats:
    a non-finite sample counts as 0 in the RMS and peak)."""
    import numpy as np

    n = audio.size // FRAME_SAMPLES
    frames = np.asarray(audio[: n * FRAME_SAMPLES], dtype=np.float64).reshape(n, FRAME_SAMPLES)
    finite = np.isfinite(frames)
    clean = np.where(finite, frames, 0.0)
    return np.stack([np.sqrt((clean**2).mean(axis=1)), np.abs(clean).max(axis=1, initial=0.0),
                     (~finite).sum(axis=1)], axis=1)


def stats_of_frames(stats) -> AudioStats:
    """frame_stats rows -> the AudioStats of their audio."""
    import numpy as np

    n = len(stats)
    return AudioStats(samples=n * FRAME_SAMPLES, duration_s=round(n * FRAME_SAMPLES / SAMPLE_RATE, 3),
                      rms=float(np.sqrt(np.mean(stats[:, 0] ** 2))) if n else 0.0,
                      peak=float(stats[:, 1].max()) if n else 0.0, non_finite=int(stats[:, 2].sum()) if n else 0)


def trailing_silent_frames(rms) -> int:
    n = 0
    for value in reversed(rms):
        if not value < NEAR_SILENCE_RMS:
            break
        n += 1
    return n


@dataclass
class Guard:
    keep: int  # aligned frames to keep
    reason: str | None  # why the chunk is unusable, or None
    note: str = ""  # what the guard did, for the log ("" when nothing)


def runaway_guard(text: str, rms, finished: bool) -> Guard:
    """The runaway rule for one chunk, on the RMS of its frames.

    A chunk that reached its frame budget without EOS, or ends in more than TRAILING_SILENCE_S of
    near-silence, gets that trailing silence cut to a KEEP_PAUSE_FRAMES pause; it is unusable when
    it is then still longer than RUNAWAY_FACTOR x what its text needs.
    """
    n = len(rms)
    silent = trailing_silent_frames(rms)
    long_silence = silent > TRAILING_SILENCE_S * FRAMES_PER_SECOND
    if finished and not long_silence:
        return Guard(n, None)
    keep = n - max(silent - KEEP_PAUSE_FRAMES, 0)
    why = f"{silent / FRAMES_PER_SECOND:.2f} s of trailing near-silence" if long_silence else \
        "no EOS within the chunk's frame budget"
    note = f"{why}: trimmed {(n - keep) / FRAMES_PER_SECOND:.2f} s" if keep < n else why
    limit = runaway_limit_frames(text)
    if keep > limit:
        return Guard(keep, f"runaway: {why}; {keep / FRAMES_PER_SECOND:.2f} s left > {RUNAWAY_FACTOR:g} x the "
                           f"{needed_seconds(text):.2f} s the text needs", note)
    return Guard(keep, None, note)


def judge_chunk(text: str, generated_frames: int, stats: AudioStats) -> str | None:
    """The retry rule (docs/design.md) on a chunk's frame count and AudioStats: None if usable, else the reason."""
    if generated_frames < MIN_FRAMES:
        return f"too short: {generated_frames} frames (< {MIN_FRAMES})"
    if stats.samples == 0:
        return "nothing to decode"
    if stats.non_finite:
        return f"non-finite audio: {stats.non_finite} samples"
    need = min_expected_seconds(text)
    if stats.duration_s < need:
        return f"too short for the text: {stats.duration_s:.2f} s < {need:.2f} s ({speech_units(text)} words/chars)"
    if stats.rms < SILENCE_RMS:
        return f"silent: RMS {stats.rms:.2e}"
    return None


@dataclass
class Verdict:
    """The retry rule's answer for one attempt."""

    keep: int  # aligned frames kept (the runaway guard may trim a silent tail)
    stats: AudioStats  # of the kept frames
    reason: str | None  # why the attempt is unusable; None = usable
    note: str = ""  # what the runaway guard did ("" when nothing)
    asr: quality.Heard | None = None  # what `check` reported, when it ran


def judge(text: str, gen: Generation, stats, audio=None, check=None) -> Verdict:
    """The retry rule for one attempt, the same for every entry point (batch, chunk, stream): the runaway
    guard on the frame_stats rows of its aligned frames, judge_chunk on what it keeps, then `check`
    (e.g. quality.AsrCheck) on the kept audio when there is audio to give it."""
    guard = runaway_guard(text, stats[:, 0], gen.finished)
    kept = stats_of_frames(stats[:guard.keep])
    reason = guard.reason or judge_chunk(text, int(gen.codes.shape[0]), kept)
    checked = None
    if reason is None and check is not None and audio is not None:
        reason, checked = check(text, audio[:guard.keep * FRAME_SAMPLES])
    return Verdict(guard.keep, kept, reason, guard.note, checked)


def within_budget(gen: Generation, budget: int) -> Generation:
    """A batch row cut to its own frame budget: what it gives when decoded alone with frame_limit=budget
    (rows are independent), finished only if its EOS came within the budget."""
    if gen.codes.shape[0] <= budget:
        return gen
    return Generation(codes=gen.codes[:budget], finished=False, seed=gen.seed)


def cache_len_for(prompt_tokens: int, max_new_tokens: int) -> int:
    """KV-cache positions for a chunk's prompt: rounded up to 1024 so that the chunks of a text, whose prompts
    grow with their history, share one cache (and one captured graph)."""
    return -(-(prompt_tokens + max_new_tokens) // 1024) * 1024


class StreamDecoder:
    """Aligned codes in as they are generated, audio out in pieces equal to one decode of all the codes.

    The codec decoder is a stack of same-padded convolutions, so a sample depends on the codes of a
    limited number of frames on each side (its receptive field, measured in docs/longform.md). New
    frames are decoded in a window reaching `context` frames back and `lookahead` frames ahead, and
    only the window's centre is kept; the last `lookahead` frames wait for the frames after them
    (or for `pull(final=True)`). With context and lookahead at least the receptive field the pieces
    match a one-shot decode to float rounding, so there is no crossfade.

    `hold_silence`: audio of a trailing run of near-silent frames is held back until a louder frame
    follows it, so that a runaway's trailing silence can still be trimmed (`truncate`) unheard.
    """

    def __init__(self, decode, context: int | None = None, lookahead: int | None = None, hold_silence: bool = False):
        self.decode = decode  # [T, C] long codes -> float32 numpy, T * FRAME_SAMPLES samples
        self.context = STREAM_CONTEXT if context is None else context
        self.lookahead = STREAM_LOOKAHEAD if lookahead is None else lookahead
        self.hold_silence = hold_silence
        self.codes = None  # [T, C] every aligned frame so far
        self.ready = 0  # frames [0, ready) are decoded for good; [emitted, ready) wait in self.pending
        self.emitted = 0
        self.pending = []  # one float32 array per frame
        self.stats = []  # frame_stats rows of frames [0, ready)
        self.decoded_frames = 0  # frames run through the codec, context included (what streaming costs)

    def __len__(self) -> int:
        return 0 if self.codes is None else int(self.codes.shape[0])

    def append(self, aligned) -> None:
        import torch

        if len(aligned):
            self.codes = aligned.clone() if self.codes is None else torch.cat([self.codes, aligned])

    def can_truncate(self, n: int) -> bool:
        """Whether frames n.. may still change: no audio out so far was decoded with them as right context."""
        return n >= len(self) or self.emitted == 0 or n >= self.emitted + self.lookahead

    def truncate(self, n: int) -> None:
        """Forget frames n..: a trimmed runaway tail, or a retried attempt that nobody has heard yet."""
        if not self.can_truncate(n):
            raise ValueError(f"cannot cut at frame {n}: audio up to frame {self.emitted} is out already")
        if n >= len(self):
            return
        self.codes = self.codes[:n]
        keep = max(min(self.ready, n - self.lookahead), self.emitted)
        del self.pending[keep - self.emitted:]
        del self.stats[keep:]
        self.ready = keep

    def _window(self, end: int):
        """Audio of frames [ready, end), decoded with up to `context` frames before them."""
        import numpy as np

        start = max(self.ready - self.context, 0)
        stop = min(end + self.lookahead, len(self))
        audio = self.decode(self.codes[start:stop])
        self.decoded_frames += stop - start
        kept = audio[(self.ready - start) * FRAME_SAMPLES:(end - start) * FRAME_SAMPLES]
        return np.asarray(kept, dtype=np.float32).reshape(end - self.ready, FRAME_SAMPLES)

    def pull(self, final: bool = False):
        """Audio of every frame that is final now (all of them when `final`: the codes end here)."""
        import numpy as np

        end = len(self) if final else len(self) - self.lookahead
        if end > self.ready:
            frames = self._window(end)
            self.pending += list(frames)
            self.stats += list(frame_stats(frames.reshape(-1)))
            self.ready = end
        out = len(self.pending)
        if self.hold_silence and not final:
            while out > 0 and self.stats[self.emitted + out - 1][0] < NEAR_SILENCE_RMS:
                out -= 1
        piece = np.concatenate(self.pending[:out]) if out else np.zeros(0, dtype=np.float32)
        del self.pending[:out]
        self.emitted += out
        return piece

    def frame_stats_from(self, start: int):
        """frame_stats of frames start.. as they sound if the codes end here: a chunk's frames at its end, for
        the runaway and retry rules (the last `lookahead` frames decoded without the frames that will follow)."""
        import numpy as np

        tail = self._window(len(self)) if len(self) > self.ready else np.zeros((0, FRAME_SAMPLES), np.float32)
        return np.concatenate([np.asarray(self.stats[start:], dtype=np.float64).reshape(-1, 3),
                               frame_stats(tail.reshape(-1))])


class AlignedReader:
    """Delay-pattern rows of one generation row, read at host syncs -> aligned frames as they become final.

    Aligned frame j takes codebook c from row j + c + 1, so rows 0..t give frames j <= t - C; the last of
    those is held back, as revert_delay_pattern drops the last column at the end.
    """

    def __init__(self, num_codebooks: int):
        self.num_cb = num_codebooks
        self.rows = None
        self.frames = 0  # aligned frames handed out

    def read(self, out_codes, t: int, row: int = 0):
        import torch

        have = 0 if self.rows is None else self.rows.shape[0]
        new = out_codes[row, have:t + 1].to("cpu", copy=True)
        self.rows = new if self.rows is None else torch.cat([self.rows, new])
        n = max(self.rows.shape[0] - self.num_cb - 1, 0)
        if n <= self.frames:
            return self.rows.new_zeros((0, self.num_cb))
        aligned = torch.stack([self.rows[c + 1 + self.frames: c + 1 + n, c] for c in range(self.num_cb)], dim=1)
        self.frames = n
        return aligned


@dataclass
class ChunkResult:
    index: int
    text: str
    seed: int  # the seed of the attempt kept
    start_frame: int  # where its frames begin in the text's codes
    frames: int  # aligned frames kept (after the runaway guard)
    generated_frames: int  # delay-pattern frames generated by the attempt kept
    finished: bool  # closed by EOS
    usable: bool
    outcome: str  # "ok" or why it is unusable
    guard: str  # what the runaway guard did ("" when nothing)
    prompt_tokens: int
    attempts: list = field(default_factory=list)  # one Attempt each
    timings: Timings = field(default_factory=Timings)  # of the attempt kept (wall_s: of the whole chunk)


@dataclass
class SpeechResult:
    chunks: list  # ChunkResult per chunk
    codes: torch.Tensor  # [T, C] aligned codes of the whole text: the audio is their one decode
    samples: int
    streamed: bool
    time_to_first_audio_s: float | None  # from the call to the first piece handed out
    total_s: float  # the whole call
    generate_s: float  # prefill + decode of every attempt (what the real-time factor counts)
    decode_modes: list = field(default_factory=list)

    @property
    def usable(self) -> bool:
        return all(c.usable for c in self.chunks)


def _speak(engine, chunks: list[str], params: SamplingParams, seed: int, retries: int, scene, ref_codes, ref_text,
           context_chunks: int, stream: bool, log, progress: bool, check=None):
    """The chunk loop behind speak(): a generator of float32 pieces; returns a SpeechResult."""
    import numpy as np
    import torch

    t_start = time.perf_counter()
    cfg = engine.config
    num_cb = cfg.num_codebooks
    decoder = StreamDecoder(engine.decode_audio, hold_silence=True) if stream else None
    done: list[ChunkResult] = []
    kept_codes: list = []  # aligned codes of each chunk, as kept
    first_audio = None
    generate_s = 0.0
    min_cache = 0
    modes = set()
    many = len(chunks) > 1
    for k, text in enumerate(chunks):
        t_chunk = time.perf_counter()
        label = f"chunk {k + 1}/{len(chunks)}: " if many else ""
        # the reference voice, else chunk 0 (it fixes the voice), then the last context_chunks chunks
        first = max(k - context_chunks, 0 if ref_codes is not None else 1)
        turns = ([] if ref_codes is not None or k == 0 else [0]) + list(range(first, k))
        prompt = engine.build_prompt(text, scene, ref_codes, ref_text,
                                     history=[(chunks[i], kept_codes[i].T) for i in turns])
        # one cache for the whole text: grown in steps of 1024 positions, so that chunks share it (and its graph)
        if many:  # (one chunk: the cache synthesize() sizes, so a short text decodes the same either way)
            min_cache = max(min_cache, cache_len_for(len(prompt.input_ids), params.max_new_tokens))
        budget = chunk_frame_budget(text, params.max_new_tokens, num_cb)
        base = chunk_seed(seed, k, retries)
        start = sum(c.shape[0] for c in kept_codes)
        if many:
            log(f"{label}{cut(text, 60)!r} ({chunk_cost(text):g} words, {len(turns) + (ref_codes is not None)} "
                f"earlier audio turns, {len(prompt.input_ids)} prompt tokens)")
        attempts, best = [], None
        for a in range(retries + 1):
            attempt_seed = base + a
            reader = AlignedReader(num_cb)
            frames = engine.generate_frames([prompt], params, [attempt_seed], progress=progress,
                                            frame_limit=budget, min_cache_len=min_cache)
            while True:
                try:
                    t, out_codes = next(frames)
                except StopIteration as stop:
                    gens, timings = stop.value
                    break
                if decoder is not None:
                    decoder.append(reader.read(out_codes, t))
                    piece = decoder.pull()
                    if piece.size:
                        if first_audio is None:
                            first_audio = time.perf_counter() - t_start
                            log(f"{label}time to first audio: {first_audio:.2f} s")
                        yield piece
            gen = gens[0]
            modes.add(timings.decode_mode)
            generate_s += timings.prefill_s + timings.decode_s
            aligned = revert_delay_pattern(gen.codes)
            t_dec = time.perf_counter()
            audio = None
            if decoder is not None:
                decoder.append(aligned[reader.frames:])
                stats = decoder.frame_stats_from(start)
            else:
                audio = engine.decode_audio(aligned) if aligned.shape[0] else np.zeros(0, np.float32)
                stats = frame_stats(audio)
            verdict = judge(text, gen, stats, audio, check)
            reason = verdict.reason
            timing = replace(timings, audio_decode_s=time.perf_counter() - t_dec)
            attempts.append(Attempt(seed=attempt_seed, frames=int(gen.codes.shape[0]), finished=gen.finished,
                                    outcome=reason or "ok", stats=verdict.stats, asr=verdict.asr))
            candidate = (verdict, aligned[:verdict.keep], gen, timing, attempt_seed)
            # --stream keeps the attempt the decoder holds (the last); otherwise the best: usable, then longest
            if best is None or decoder is not None or \
                    (reason is None, verdict.keep) > (best[0].reason is None, best[0].keep):
                best = candidate
            if verdict.note:
                log(f"{label}attempt {a + 1} (seed {attempt_seed}): runaway guard: {verdict.note}")
            if reason is None:
                log(f"{label}attempt {a + 1} (seed {attempt_seed}): ok, {verdict.keep} frames "
                    f"({verdict.keep / FRAMES_PER_SECOND:.2f} s)")
                break
            log(f"{label}attempt {a + 1} (seed {attempt_seed}) unusable: {reason}")
            if decoder is not None and a < retries:
                if not decoder.can_truncate(start):
                    log(f"{label}kept: its audio is out already (--stream cannot take it back)")
                    break
                decoder.truncate(start)
        verdict, codes, gen, timing, used_seed = best
        keep = verdict.keep
        if decoder is not None:
            decoder.truncate(start + keep)
        kept_codes.append(codes)
        done.append(ChunkResult(
            index=k, text=text, seed=used_seed, start_frame=start, frames=keep,
            generated_frames=int(gen.codes.shape[0]), finished=gen.finished, usable=verdict.reason is None,
            outcome=verdict.reason or "ok", guard=verdict.note, prompt_tokens=int(len(prompt.input_ids)),
            attempts=attempts, timings=rounded(replace(timing, wall_s=time.perf_counter() - t_chunk))))
    codes = torch.cat(kept_codes) if kept_codes else torch.zeros((0, num_cb), dtype=torch.long)
    if decoder is not None:
        tail = decoder.pull(final=True)
        samples = decoder.emitted * FRAME_SAMPLES
    else:
        tail = engine.decode_audio(codes) if codes.shape[0] else np.zeros(0, np.float32)
        samples = tail.size
    # one clock reading: a one-shot text's first audio is its end (the caller's time with the piece is not ours)
    total_s = time.perf_counter() - t_start
    if tail.size:
        if first_audio is None:
            first_audio = total_s
        yield tail
    return SpeechResult(chunks=done, codes=codes, samples=samples, streamed=stream,
                        time_to_first_audio_s=first_audio, total_s=total_s,
                        generate_s=generate_s, decode_modes=sorted(modes))


class SpeechStream:
    """What speak() returns: iterate it for the audio pieces; `result` (a SpeechResult) once it is exhausted.

    `close()` (or leaving a for loop early and dropping it) stops the generation at its next host sync.
    """

    def __init__(self, pieces):
        self._pieces = pieces
        self.result: SpeechResult | None = None

    def __iter__(self):
        self.result = yield from self._pieces

    def close(self) -> None:
        self._pieces.close()


def check_long_text_options(chunk_words: float, context_chunks: int, stream: bool, asr_check: bool) -> None:
    """speak()'s options, checked the same way for the Python API and (before the engine loads) the CLI."""
    if chunk_words < 0:
        raise UserError(f"--chunk_words must be >= 0 (0 = one chunk, however long), got {chunk_words}")
    if context_chunks < 0:
        raise UserError(f"--context_chunks must be >= 0, got {context_chunks}")
    if stream and asr_check:
        raise UserError("--asr_check cannot retry a chunk that --stream has already played: drop one of them")


def speak(engine: Engine, text: str, params: SamplingParams | None = None, *, seed: int = 1, retries: int = 3,
          scene: str | None = DEFAULT_SCENE, ref_audio=None, ref_codes=None, ref_text: str | None = None,
          chunk_words: float = CHUNK_WORDS, context_chunks: int = CONTEXT_CHUNKS, stream: bool = True,
          log=None, progress: bool = False, check=None) -> SpeechStream:
    """Speak `text` (any length) in one voice: the Python API under the CLI and the server.

    Iterating the returned SpeechStream yields float32 numpy pieces at 24 kHz (SAMPLE_RATE, mono) whose
    concatenation is the whole audio; `stream=True` yields them while the text is generated (pieces of
    about 0.6 s, the first after about 32 frames), `stream=False` yields one piece at the end, decoded
    from all chunks' codes at once. The options are the CLI's; `ref_audio` is 24 kHz mono float32 (or
    pass `ref_codes` [C, T] from engine.encode_audio). A user mistake raises UserError here, before any
    audio; an engine failure raises from the iteration. Unusable chunks do not raise: see
    stream.result.chunks[i].usable / .outcome. `check` (text, audio) -> (reason or None, details), e.g.
    quality.AsrCheck, is one more retry rule per chunk; not with `stream` (what is heard stays).
    """
    params = params or SamplingParams()
    params.validate()
    check_seed(seed, retries)
    log = log or (lambda msg: None)
    if not text or not text.strip():
        raise UserError("the text is empty: give the text to speak")
    check_long_text_options(chunk_words, context_chunks, stream, check is not None)
    if params.max_new_tokens < MIN_FRAMES:
        raise UserError(f"--max_new_tokens {params.max_new_tokens}: at least {MIN_FRAMES} frames are needed")
    chunks = split_text(text, chunk_words)
    if len(chunks) > 1 and retries >= CHUNK_SEED_STRIDE:
        raise UserError(f"--retries {retries}: at most {CHUNK_SEED_STRIDE - 1} with several chunks "
                        f"(chunk k starts at seed + k * {CHUNK_SEED_STRIDE})")
    if ref_audio is not None:
        if ref_audio.size < engine.min_audio_samples():
            raise UserError(f"the reference audio ({ref_audio.size} samples) is shorter than the "
                            f"{engine.min_audio_samples()} samples the audio tokenizer needs")
        ref_codes = engine.encode_audio(ref_audio)
    if len(chunks) > 1:
        log(f"Text: {len(chunks)} chunks of at most {chunk_words:g} words (a CJK character counts half), "
            f"{context_chunks} context chunks")
    return SpeechStream(_speak(engine, chunks, params, seed, retries, scene, ref_codes, ref_text, context_chunks,
                               stream, log, progress, check))


# --------------------------------------------------------------------------- synthesis


@dataclass
class SpeechRequest:
    """One text to speak, with its own seed and voice; rows of one batch share the SamplingParams."""

    text: str
    seed: int
    scene: str | None = DEFAULT_SCENE
    ref_codes: torch.Tensor | None = None  # [C, T] codes of a reference voice, or None
    ref_text: str | None = None  # transcript of the reference voice
    label: str = ""  # prefixes its log lines, e.g. "line 3: "


@dataclass
class Attempt:
    """What one attempt gave, as the sidecar lists it."""

    seed: int
    frames: int
    finished: bool
    outcome: str  # "ok" or the reason it was unusable
    stats: AudioStats = field(default_factory=AudioStats)
    asr: quality.Heard | None = None  # --asr_check: what Whisper heard (quality.AsrCheck)


@dataclass
class Candidate:
    """One attempt's output, kept while it is the best so far."""

    generation: Generation
    aligned: torch.Tensor  # [T, C] codes after the delay revert
    audio: np.ndarray | None  # float32 numpy at 24 kHz, or None when nothing was left to decode
    timings: Timings
    reason: str | None  # why it is unusable; None = usable

    @property
    def usable(self) -> bool:
        return self.reason is None

    def better_than(self, other: Candidate) -> bool:
        """A usable attempt beats an unusable one; then the longer audio wins."""
        if self.usable != other.usable:
            return self.usable
        return audio_stats(self.audio).samples > audio_stats(other.audio).samples


@dataclass
class Synthesis:
    """A request's result: every attempt, and the best one."""

    request: SpeechRequest
    prompt_tokens: int
    attempts: list[Attempt]
    best: Candidate

    @property
    def usable(self) -> bool:
        return self.best.usable


def synthesize(engine: Engine, requests: list[SpeechRequest], params: SamplingParams, retries: int,
               progress: bool = False, log=None, check=None) -> list[Synthesis]:
    """Requests -> one Synthesis each. They decode as one batch; each unusable one is retried with its
    next seed (seed + 1, seed + 2, ...) together with the others still pending. Every row has its text's
    frame budget and is judged by `judge` (runaway guard included), so a text gives what speak() gives
    for it, alone or in a batch. `check` (text, audio) -> (reason or None, details), e.g.
    quality.AsrCheck, is one more rule for attempts the others pass."""
    import numpy as np

    log = log or (lambda msg: None)
    num_cb = engine.config.num_codebooks
    prompts = [engine.build_prompt(r.text, r.scene, r.ref_codes, r.ref_text) for r in requests]
    budgets = [chunk_frame_budget(r.text, params.max_new_tokens, num_cb) for r in requests]
    attempts: list[list[Attempt]] = [[] for _ in requests]
    best: list[Candidate | None] = [None] * len(requests)
    pending = list(range(len(requests)))
    for attempt_no in range(retries + 1):
        if not pending:
            break
        seeds = [requests[i].seed + attempt_no for i in pending]
        gens, timings = engine.generate([prompts[i] for i in pending], params, seeds, progress=progress,
                                        frame_limit=max(budgets[i] for i in pending))
        still = []
        for i, gen in zip(pending, gens):
            request = requests[i]
            gen = within_budget(gen, budgets[i])
            t_dec = time.perf_counter()
            aligned = revert_delay_pattern(gen.codes)
            audio = engine.decode_audio(aligned) if aligned.shape[0] > 0 else None
            verdict = judge(request.text, gen, frame_stats(np.zeros(0, np.float32) if audio is None else audio),
                            audio, check)
            trimmed = verdict.keep < aligned.shape[0]
            if trimmed:  # its audio is the decode of what is kept
                aligned = aligned[:verdict.keep]
                audio = engine.decode_audio(aligned) if verdict.keep else None
            row_timings = replace(timings, audio_decode_s=time.perf_counter() - t_dec)
            candidate = Candidate(gen, aligned, audio, row_timings, verdict.reason)
            attempts[i].append(Attempt(seed=gen.seed, frames=int(gen.codes.shape[0]), finished=gen.finished,
                                       outcome=candidate.reason or "ok", stats=verdict.stats, asr=verdict.asr))
            if best[i] is None or candidate.better_than(best[i]):
                best[i] = candidate
            tag = f"{request.label}attempt {attempt_no + 1} (seed {gen.seed})"
            if trimmed:  # (a note without a trim repeats the no-EOS remark below)
                log(f"{tag}: runaway guard: {verdict.note}")
            # no EOS within --max_new_tokens: the model was still speaking, so the end may be cut off
            cut_off = "" if gen.finished or budgets[i] < params.max_new_tokens else \
                (f" (no EOS within --max_new_tokens {params.max_new_tokens}: the end may be cut off; "
                 "raise --max_new_tokens)")
            if candidate.usable:
                log(f"{tag}: ok, {gen.codes.shape[0]} frames{cut_off}")
            else:
                log(f"{tag} unusable: {candidate.reason}{cut_off}")
                still.append(i)
        pending = still
    return [Synthesis(r, int(len(p.input_ids)), a, b) for r, p, a, b in zip(requests, prompts, attempts, best)]


def report(engine: Engine, result: Synthesis, log) -> dict:
    """Log what the best attempt took, and return the sidecar's summary fields."""
    best = result.best
    gen, timings = best.generation, best.timings
    frames = int(gen.codes.shape[0])
    steps = max(timings.decode_steps, 1)
    frames_per_s = steps / timings.decode_s if timings.decode_s > 0 else float("inf")
    bytes_per_frame = engine.decode_bytes_per_frame()
    stats = audio_stats(best.audio)
    gen_s = timings.prefill_s + timings.decode_s
    rtf = gen_s / stats.duration_s if stats.duration_s else None
    valid = int(valid_frame_mask(best.aligned, engine.config.audio_stream_bos_id).sum())
    log(f"Generated {frames} frames in {gen_s:.2f}s (prefill {timings.prefill_s * 1000:.0f} ms, "
        f"{frames_per_s:.1f} frames/s = tokens/s, {1000 / frames_per_s:.1f} ms/frame)")
    log(f"Audio codes: {tuple(gen.codes.shape)} -> valid frames after delay revert: {valid}")
    log(f"Audio shape: ({stats.samples},)  duration {stats.duration_s:.2f}s  decode {timings.audio_decode_s:.2f}s")
    if rtf is not None:
        log(f"Real-time factor: {rtf:.3f} (generation s / audio s; < 1 is faster than real time)")
    log(f"Achieved bandwidth: {bytes_per_frame * frames_per_s / 1e9:.2f} GB/s "
        f"({bytes_per_frame / 1e6:.1f} MB read per decode step)")
    peak = peak_memory_bytes(engine.device)
    if peak is not None:
        log(f"Peak device memory: {peak / 2**30:.2f} GiB")
    return {
        "frames": frames,
        "finished_by_eos": gen.finished,
        "valid_frames": valid,
        "duration_s": stats.duration_s,
        "rms": stats.rms if best.audio is not None else None,
        "peak": stats.peak if best.audio is not None else None,
        "timings": {
            "load_s": round(engine.load_seconds, 3),
            "prefill_s": round(timings.prefill_s, 4),
            "decode_s": round(timings.decode_s, 4),
            "audio_decode_s": round(timings.audio_decode_s, 4),
            "frames_per_s": round(frames_per_s, 2),
            "ms_per_frame": round(1000 / frames_per_s, 3),
            "real_time_factor": None if rtf is None else round(rtf, 4),
            "bandwidth_gb_s": round(bytes_per_frame * frames_per_s / 1e9, 3),
            "peak_device_memory_bytes": peak,
        },
    }


# --------------------------------------------------------------------------- CLI


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help lists each flag once (its --kebab-case alias stays hidden) with its default, except where
    the default is None or off: there the help says what happens without the flag."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)

    def _format_action_invocation(self, action):
        opts = action.option_strings
        shown = [o for o in opts if not (o.startswith("--") and "-" in o[2:] and "--" + o[2:].replace("-", "_") in opts)]
        if shown != action.option_strings:
            action = copy.copy(action)
            action.option_strings = shown
        return super()._format_action_invocation(action)


def add_flag(parser, name: str, **kwargs):
    """A --snake_case flag (the spelling every script uses); --kebab-case is accepted as a hidden alias."""
    names = [name] + ([name.replace("_", "-")] if "_" in name.lstrip("-") else [])
    return parser.add_argument(*names, **kwargs)


DTYPES = {"auto": "auto", "float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def dtype_choice(value: str) -> str:
    """--dtype: the short names (fp32, bf16, fp16) are accepted and shown as the long ones."""
    return DTYPES.get(value, value)


def add_model_flags(parser, dtype_help: str = "auto (bf16 on accelerators; fp32 on CPU if it fits)") -> None:
    """The checkpoint and device flags every script that loads the engine takes."""
    add_flag(parser, "--model_path", default="./model_cache", help="generation model folder (transformers-native)")
    add_flag(parser, "--tokenizer_path", default="./tokenizer_cache", help="audio tokenizer folder")
    add_flag(parser, "--device", default="auto", help="auto (npu:0 > cuda:0 > cpu), cpu, cuda[:N] or npu[:N]")
    add_flag(parser, "--dtype", default="auto", type=dtype_choice, choices=("auto", "float32", "bfloat16", "float16"),
             help=dtype_help)
    add_flag(parser, "--graph", default="auto", choices=GRAPH_MODES,
             help="capture the decode step as a CUDA/NPU graph (auto: on for cuda/npu, off for cpu); "
                  "compile: torch.compile(fullgraph=True) of the step instead")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Higgs Audio V2 text-to-speech on Ascend NPU, CUDA or CPU.",
        formatter_class=HelpFormatter,
    )
    text = p.add_argument_group("text")
    # default None, filled in by validate_args: a --text next to --text_file must be refused, not ignored
    add_flag(text, "--text", default=None, help="text to speak (English, Chinese or mixed); without --text and "
             f"--text_file: {DEFAULT_TEXT!r}")
    add_flag(text, "--text_file", default=None,
             help="UTF-8 file, one text per line: one WAV per line, output_{line}_{seed}.wav (not with --text)")
    add_flag(text, "--batch_size", type=int, default=1, help="lines of --text_file generated together")

    sampling = p.add_argument_group("sampling (Boson's defaults)")
    add_flag(sampling, "--max_new_tokens", type=int, default=SamplingParams.max_new_tokens,
             help="audio frames to generate at most (25 = 1 s)")
    add_flag(sampling, "--temperature", type=float, default=SamplingParams.temperature,
             help="sampling temperature; 0 means greedy")
    add_flag(sampling, "--top_k", type=int, default=SamplingParams.top_k,
             help="keep the k most likely codes per codebook (0 = off)")
    add_flag(sampling, "--top_p", type=float, default=SamplingParams.top_p,
             help="nucleus sampling mass per codebook, in (0, 1]")
    add_flag(sampling, "--ras_win_len", type=int, default=SamplingParams.ras_win_len,
             help="repetition-aware sampling window (0 disables)")
    add_flag(sampling, "--ras_max_repeat", type=int, default=SamplingParams.ras_win_max_num_repeat,
             help="repeats within the window that trigger a resample (0 disables)")
    add_flag(sampling, "--seed", type=int, default=1, help="random seed; retries use seed+1, seed+2, ...")
    add_flag(sampling, "--retries", type=int, default=3, help="extra attempts with the next seeds when unusable")

    voice = p.add_argument_group("voice and scene")
    add_flag(voice, "--scene", default=DEFAULT_SCENE, help="scene description ('' for none)")
    add_flag(voice, "--ref_audio", default=None, help="reference voice to clone (WAV/FLAC/OGG, any rate)")
    add_flag(voice, "--ref_text", default=None, help="transcript of --ref_audio")

    longform = p.add_argument_group("long text and streaming")
    add_flag(longform, "--chunk_words", type=int, default=CHUNK_WORDS,
             help="a longer text is spoken in chunks of at most this many words (a CJK character counts half; "
                  "about 24 s of speech), cut at sentence ends, then clause ends; 0 = one chunk, however long")
    add_flag(longform, "--context_chunks", type=int, default=CONTEXT_CHUNKS,
             help="earlier chunks (text and audio codes) in each chunk's prompt, after the reference voice "
                  "(without --ref_audio the first chunk is kept too: it fixes the voice)")
    add_flag(longform, "--stream", action="store_true",
             help="write audio while it is generated: the WAV grows under a temp name and is renamed when "
                  "complete; with --output -, raw PCM to stdout as it comes")

    output = p.add_argument_group("output")
    add_flag(output, "--output_dir", default="./output_audio", help="folder for WAV + JSON sidecar")
    add_flag(output, "--output", default=None,
             help="WAV file name (default output_{seed}.wav); - writes raw PCM16 24 kHz mono to stdout for a "
                  "pipe (| aplay -r 24000 -f S16_LE -c 1), the log goes to stderr, no file is written")

    add_model_flags(p.add_argument_group("model and device"),
                    "auto (bf16 on accelerators; fp32 on CPU if it fits); fp32 / bf16 / fp16 work too")

    checks = p.add_argument_group("checks")
    add_flag(checks, "--selftest", action="store_true",
             help="build tiny checkpoints in a temp dir and run the whole pipeline (no download)")
    add_flag(checks, "--asr_check", nargs="?", const="", default=None, metavar="PATH",
             help="transcribe each attempt with Whisper (PATH, default ./eval_models/whisper-large-v3: bash "
                  "download.sh --eval_models) and retry one whose WER/CER is above --asr_max_error")
    add_flag(checks, "--asr_max_error", type=float, default=ASR_MAX_ERROR,
             help="with --asr_check: the highest word (or, for Chinese, character) error rate that is usable")
    return p


def check_utf8_args(args, hint: str = "check the shell's encoding, or put the text in a UTF-8 --text_file") -> None:
    """Every string flag must encode as UTF-8: a lone surrogate (from bytes the shell could not decode)
    would otherwise fail deep in the tokenizer, the console or the JSON sidecar."""
    for name, value in vars(args).items():
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                raise UserError(f"--{name}: not valid UTF-8 text (an undecodable byte or lone surrogate "
                                f"{value[e.start]!r} at character {e.start + 1}); {hint}") from None


def validate_args(args) -> None:
    check_utf8_args(args)
    if args.text is not None and args.text_file is not None:
        raise UserError("--text and --text_file both given: pass one (--text_file speaks every line of the file)")
    if args.text_file is None:
        if args.text is None:
            args.text = DEFAULT_TEXT
        if not args.text.strip():
            raise UserError("--text is empty: give the text to speak")
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.retries < 0:
        raise UserError(f"--retries must be >= 0, got {args.retries}")
    if args.ref_text is not None and args.ref_audio is None:
        raise UserError("--ref_text needs --ref_audio")
    if args.output == "-" and args.text_file is not None:
        raise UserError("--output - writes one text to stdout: give it with --text, not --text_file")
    if args.output is not None and args.output != "-" and (os.sep in args.output or not args.output.endswith(".wav")):
        raise UserError(f"--output {args.output!r}: give a file name ending in .wav (the folder is --output_dir)")
    if args.output is not None and args.output.startswith("."):
        raise UserError(f"--output {args.output!r}: give the name a stem that does not start with a dot, e.g. "
                        "speech.wav (a leading dot makes a hidden file)")
    sampling_params(args).validate()
    if args.max_new_tokens < MIN_FRAMES:
        raise UserError(f"--max_new_tokens {args.max_new_tokens}: at least {MIN_FRAMES} frames are needed for "
                        "any audio (the first 9 carry the delay pattern); 25 frames = 1 s")
    check_seed(args.seed, args.retries)
    check_long_text_options(args.chunk_words, args.context_chunks, args.stream, args.asr_check is not None)
    if not 0 <= args.asr_max_error < math.inf:
        raise UserError(f"--asr_max_error must be >= 0 (0.2 = 20 % of the words may differ), got {args.asr_max_error}")


def sampling_params(args) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        ras_win_len=args.ras_win_len, ras_win_max_num_repeat=args.ras_max_repeat,
    )


def read_texts(args) -> list[str]:
    if args.text_file is None:
        return [args.text]
    try:
        raw = Path(args.text_file).read_bytes()
    except OSError as e:
        raise UserError(f"--text_file {args.text_file}: {e.strerror}") from None
    try:
        content = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"--text_file {args.text_file}: not UTF-8 (byte {e.start}); save it as UTF-8") from None
    # lines are what "\n" ends (as editors and `wc -l` count them; "\r\n" too), not str.splitlines(), which
    # also breaks at U+2028, U+0085, \x0b, \x0c, \x1c-\x1e: output_{line}_*.wav must name the editor's line
    texts = [line.strip() for line in content.split("\n")]
    if not any(texts):
        raise UserError(f"--text_file {args.text_file} has no non-empty line")
    return texts


def prepare_output_dir(path: str) -> Path:
    """Check early that `path` can be written, without creating it: a run that fails before its first
    file (a missing model, a bad flag) leaves no empty folder behind. make_output_dir creates it later."""
    out = Path(path)
    try:
        existing = out
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise UserError(f"--output_dir {out}: not writable ({existing} is a file, not a folder)")
        # a probe where the first file (or the folder itself) will go, removed at once
        probe = tempfile.mkdtemp(dir=existing, prefix=".write-test-")
        os.rmdir(probe)
    except OSError as e:
        raise UserError(f"--output_dir {out}: not writable ({e.strerror})") from None
    return out


def make_output_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--output_dir {out}: cannot create it ({e.strerror})") from None


def check_output_names(out: Path, names: list[str], flag: str = "--output") -> None:
    """Before the run: every file it will write (WAV and its .json sidecar) must be creatable as a file."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        name_max = os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    for name in names:
        for each in (name, str(Path(name).with_suffix(".json"))):
            if len(os.fsencode(each)) > name_max:
                raise UserError(f"{flag}: the file name {cut(each, 40)!r} is {len(os.fsencode(each))} bytes; "
                                f"this file system allows {name_max}: give a shorter name")
            if (out / each).is_dir():
                raise UserError(f"{flag}: {out / each} is a folder; give another file name or --output_dir")


def cut(text: str, n: int = 80) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def output_name(args, line_no: int) -> str:
    # named after the requested seed, so scripts can predict it; the sidecar has the one used
    if args.text_file is not None:
        return f"output_{line_no + 1}_{args.seed}.wav"
    return args.output or f"output_{args.seed}.wav"


def job_units(args, jobs: list[tuple[int, str]]):
    """Lines in order: a batch (list) of lines that are one chunk each, or one (line_no, text) tuple for a
    line that speak() takes chunk by chunk (several chunks, --stream, or --output -)."""
    batch = []
    for job in jobs:
        if args.stream or args.output == "-" or len(split_text(job[1], args.chunk_words)) > 1:
            if batch:
                yield batch
                batch = []
            yield job
            continue
        batch.append(job)
        if len(batch) == args.batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def pcm16_bytes(audio) -> bytes:
    """float32 audio -> little-endian PCM16, converted by libsndfile exactly as write_wav_atomic's WAV."""
    import io

    import numpy as np
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.clip(np.nan_to_num(audio), -1.0, 1.0), SAMPLE_RATE, subtype="PCM_16", format="RAW",
             endian="LITTLE")
    return buf.getvalue()


class AudioTally:
    """AudioStats of pieces as they go out, without keeping them."""

    def __init__(self):
        self.samples, self.sum_sq, self.peak, self.non_finite = 0, 0.0, 0.0, 0

    def add(self, piece) -> None:
        stats = audio_stats(piece)
        self.samples += stats.samples
        self.sum_sq += stats.rms**2 * stats.samples
        self.peak = max(self.peak, stats.peak)
        self.non_finite += stats.non_finite

    def stats(self) -> AudioStats:
        return AudioStats(samples=self.samples, duration_s=round(self.samples / SAMPLE_RATE, 3),
                          rms=math.sqrt(self.sum_sq / self.samples) if self.samples else 0.0, peak=self.peak,
                          non_finite=self.non_finite)


def write_pieces(stream, sink, tally: AudioTally) -> None:
    """Each piece to `sink` (a binary file: stdout, or a WAV's data) as PCM16, flushed at once."""
    for piece in stream:
        tally.add(piece)
        sink(pcm16_bytes(piece))


def report_speech(engine: Engine, result: SpeechResult, stats: AudioStats, log) -> dict:
    """Log what a speak() run took, and return the sidecar's summary fields."""
    rtf = result.generate_s / stats.duration_s if stats.duration_s else None
    frames = int(result.codes.shape[0])
    log(f"Generated {len(result.chunks)} chunk(s), {frames} frames = {frames / FRAMES_PER_SECOND:.2f} s of audio, "
        f"in {result.generate_s:.2f} s of generation ({result.total_s:.2f} s in all)")
    if rtf is not None:
        log(f"Real-time factor: {rtf:.3f} (generation s / audio s; < 1 is faster than real time)")
    if result.time_to_first_audio_s is not None:
        how = "streamed" if result.streamed else "after the whole text (--stream plays it sooner)"
        log(f"Time to first audio: {result.time_to_first_audio_s:.2f} s ({how})")
    peak = peak_memory_bytes(engine.device)
    return {
        "frames": frames,
        "duration_s": stats.duration_s,
        "rms": stats.rms,
        "peak": stats.peak,
        "time_to_first_audio_s": None if result.time_to_first_audio_s is None else
        round(result.time_to_first_audio_s, 4),
        "timings": {
            "load_s": round(engine.load_seconds, 3),
            "total_s": round(result.total_s, 4),
            "generate_s": round(result.generate_s, 4),
            "real_time_factor": None if rtf is None else round(rtf, 4),
            "decode_modes": result.decode_modes,
            "peak_device_memory_bytes": peak,
        },
        "chunks": [asdict(c) for c in result.chunks],
    }


def speak_text(engine: Engine, args, params: SamplingParams, line_no: int, text: str, ref_codes, check,
               out_dir: Path | None, log) -> bool:
    """One text through speak(): to stdout (--output -), or to a WAV written as it comes and renamed when
    complete (its header is right after every piece), and its JSON sidecar. True when every chunk is usable."""
    import wave

    label = f"line {line_no + 1}: " if args.text_file is not None else ""
    log(f"{label}Input text: {cut(text)!r}")
    stream = speak(engine, text, params, seed=args.seed, retries=args.retries, scene=args.scene or None,
                   ref_codes=ref_codes, ref_text=args.ref_text, chunk_words=args.chunk_words,
                   context_chunks=args.context_chunks, stream=args.stream, log=lambda m: log(label + m),
                   progress=sys.stderr.isatty(), check=check)
    tally = AudioTally()
    if out_dir is None:  # --output -
        out = sys.stdout.buffer

        def sink(data: bytes) -> None:
            out.write(data)
            out.flush()

        try:
            write_pieces(stream, sink, tally)
        except BrokenPipeError:
            stream.close()
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
            print("error: the reader of --output - closed the pipe; stopped", file=sys.stderr)
            return False
        report_speech(engine, stream.result, tally.stats(), log)
        return stream.result.usable
    make_output_dir(out_dir)
    wav_path = out_dir / output_name(args, line_no)
    with atomic_output(wav_path) as tmp, open(tmp, "wb") as f, wave.open(f, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)

        def sink(data: bytes) -> None:
            w.writeframes(data)  # patches the RIFF and data sizes after each piece
            f.flush()

        write_pieces(stream, sink, tally)
    result = stream.result
    stats = tally.stats()
    summary = report_speech(engine, result, stats, log)
    sidecar = {
        "text": text,
        "wav": str(wav_path),
        "sample_rate": SAMPLE_RATE,
        "seed_requested": args.seed,
        "seed_used": result.chunks[0].seed if len(result.chunks) == 1 else None,  # per chunk: chunks[i].seed
        "usable": result.usable,
        "parameters": {
            **asdict(params), "scene": args.scene, "retries": args.retries, "ref_audio": args.ref_audio,
            "ref_text": args.ref_text, "chunk_words": args.chunk_words, "context_chunks": args.context_chunks,
            "stream": args.stream, "device": str(engine.device), "dtype": str(engine.dtype).replace("torch.", ""),
            "model_path": str(args.model_path), "tokenizer_path": str(args.tokenizer_path),
        },
        "stream_window": {"context_frames": STREAM_CONTEXT, "lookahead_frames": STREAM_LOOKAHEAD} if args.stream
        else None,
        **summary,
    }
    write_json_atomic(wav_path.with_suffix(".json"), sidecar)
    if result.usable:
        log(f"{label}Saved: {wav_path}")
    else:
        bad = [c for c in result.chunks if not c.usable]
        log(f"{label}Saved with {len(bad)} unusable chunk(s): {wav_path}")
        print(f"error: chunk {bad[0].index + 1} of {cut(text, 40)!r} was unusable ({bad[0].outcome}); "
              f"see {wav_path.with_suffix('.json')}", file=sys.stderr)
    return result.usable


def run(args, log) -> int:
    validate_args(args)
    texts = read_texts(args)
    params = sampling_params(args)
    to_stdout = args.output == "-"
    out_dir = None if to_stdout else prepare_output_dir(args.output_dir)
    jobs = [(i, t) for i, t in enumerate(texts) if t]
    if not to_stdout:
        check_output_names(out_dir, [output_name(args, i) for i, _ in jobs],
                           "--output" if args.output and args.text_file is None else "--output_dir")
    ref_audio = load_reference_audio(args.ref_audio) if args.ref_audio else None
    asr_path = None
    if args.asr_check is not None:  # the Whisper folder is checked before the long engine load
        import quality  # only --asr_check needs it

        asr_path = quality.check_model_folder(
            "whisper", quality.find_model(args.asr_check, quality.DEFAULT_ASR_MODEL, "whisper"), "--asr_check")

    engine = load_engine(args.model_path, args.tokenizer_path, args.device, args.dtype, log=log, graph=args.graph)
    log(f"Model: {engine.num_params / 1e9:.3f} B parameters, loaded in {engine.load_seconds:.1f}s")
    check = None
    if asr_path is not None:
        check = quality.AsrCheck(quality.Transcriber(asr_path, engine.device, flag="--asr_check"), args.asr_max_error)
        log(f"ASR check: Whisper from {asr_path}; an attempt above {args.asr_max_error:.0%} WER/CER is retried")
    if ref_audio is not None and ref_audio.size < engine.min_audio_samples():
        need = engine.min_audio_samples()
        raise UserError(f"--ref_audio {args.ref_audio}: {ref_audio.size / SAMPLE_RATE * 1000:.1f} ms of audio is "
                        f"too short; the audio tokenizer needs at least {need} samples at {SAMPLE_RATE} Hz "
                        f"({need / SAMPLE_RATE * 1000:.1f} ms), and a voice clones best from a few seconds of speech")
    ref_codes = engine.encode_audio(ref_audio) if ref_audio is not None else None
    if ref_codes is not None:
        log(f"Reference audio: {ref_audio.size / SAMPLE_RATE:.2f}s -> {ref_codes.shape[1]} frames")
    log(f"Generation: max_new_tokens={params.max_new_tokens} temperature={params.temperature} "
        f"top_k={params.top_k} top_p={params.top_p} seed={args.seed} "
        f"ras={params.ras_win_len}/{params.ras_win_max_num_repeat} retries={args.retries}")

    failures = 0
    for chunk in job_units(args, jobs):
        if isinstance(chunk, tuple):  # a text of several chunks, --stream or --output -: chunk by chunk (speak)
            failures += not speak_text(engine, args, params, *chunk, ref_codes, check, out_dir, log)
            continue
        requests = [SpeechRequest(text, args.seed, args.scene or None, ref_codes, args.ref_text,
                                  label=f"line {line_no + 1}: " if args.text_file is not None else "")
                    for line_no, text in chunk]
        for request in requests:
            log(f"{request.label}Input text: {cut(request.text)!r}")
        results = synthesize(engine, requests, params, args.retries, progress=sys.stderr.isatty(), log=log,
                             check=check)
        make_output_dir(out_dir)  # only now: a run that fails before its first file leaves no empty folder
        for (line_no, text), result in zip(chunk, results):
            best = result.best
            log(f"Input tokens: {result.prompt_tokens}")
            wav_path = out_dir / output_name(args, line_no)
            summary = report(engine, result, log)
            if best.audio is not None:
                write_wav_atomic(wav_path, best.audio)
            sidecar = {
                "text": text,
                "wav": str(wav_path) if best.audio is not None else None,
                "sample_rate": SAMPLE_RATE,
                "seed_requested": args.seed,
                "seed_used": best.generation.seed,
                "usable": result.usable,
                "parameters": {
                    **asdict(params), "scene": args.scene, "retries": args.retries,
                    "ref_audio": args.ref_audio, "ref_text": args.ref_text, "batch_size": args.batch_size,
                    "device": str(engine.device), "dtype": str(engine.dtype).replace("torch.", ""),
                    "model_path": str(args.model_path), "tokenizer_path": str(args.tokenizer_path),
                },
                "attempts": [asdict(a) for a in result.attempts],
                **summary,
            }
            if check is not None:  # what Whisper heard in the attempt kept
                kept = next(a for a in result.attempts if a.seed == best.generation.seed)
                heard = asdict(kept.asr) if kept.asr else {"transcript": None, "error": None,
                                                           "note": f"not transcribed: {kept.outcome}"}
                sidecar["asr_check"] = {"model": str(asr_path), **heard}
            write_json_atomic(wav_path.with_suffix(".json"), sidecar)
            if result.usable:
                log(f"Saved: {wav_path}")
            else:
                failures += 1
                if best.audio is not None:
                    log(f"Saved the best unusable attempt: {wav_path}")
                print(f"error: every attempt was unusable for {cut(text, 40)!r} "
                      f"({result.attempts[-1].outcome}); see {wav_path.with_suffix('.json')}", file=sys.stderr)
    return 1 if failures else 0


def selftest(args, log) -> int:
    """Tiny checkpoints in a temp dir -> the full pipeline on the chosen device -> PASS/FAIL."""
    import numpy as np
    import soundfile as sf

    import tiny_checkpoints

    checks = []
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="higgs-selftest-") as tmp:
        t0 = time.perf_counter()
        model_dir, tokenizer_dir = tiny_checkpoints.build_tiny_checkpoints(tmp)
        checks.append(("build tiny checkpoints (3 shards + index, tokenizer, codec)", time.perf_counter() - t0))
        t0 = time.perf_counter()
        engine = load_engine(model_dir, tokenizer_dir, args.device, args.dtype, log=log, graph=args.graph)
        checks.append((f"load on {engine.device} ({str(engine.dtype).replace('torch.', '')})", time.perf_counter() - t0))
        text = "Hello from the self test. 你好。"
        t0 = time.perf_counter()
        prompt = engine.build_prompt(text)
        checks.append((f"chat prompt: {len(prompt.input_ids)} tokens", time.perf_counter() - t0))
        params = SamplingParams(max_new_tokens=60, temperature=args.temperature or 0.3)
        t0 = time.perf_counter()
        gens, timings = engine.generate([prompt], params, [args.seed], forced_frames=60)
        codes = gens[0].codes
        if codes.shape != (60, engine.config.num_codebooks) or not bool((codes[0] == 1024).all()):
            raise AssertionError(f"unexpected codes: shape {tuple(codes.shape)}")
        fps = timings.decode_steps / timings.decode_s
        checks.append((f"prefill + 60 frames ({fps:.1f} frames/s, graph {timings.decode_mode})", time.perf_counter() - t0))
        t0 = time.perf_counter()
        if timings.decode_mode != "off":
            differs_at = first_difference_from_eager(engine, prompt, params, args.seed, codes)
            if differs_at is not None:
                raise AssertionError(f"graph {timings.decode_mode} decode gives other codes than eager "
                                     f"from frame {differs_at}")
            checks.append((f"graph {timings.decode_mode} decode: 60 frames equal to eager", time.perf_counter() - t0))
        elif engine.decode_mode() != "off":
            what = "torch.compile" if engine.decode_mode() == "compile" else "graph capture"
            checks.append((f"{what} failed, decoding eagerly (slower; see warning)", 0.0, "warn"))
        t0 = time.perf_counter()
        aligned = revert_delay_pattern(codes)
        audio = engine.decode_audio(aligned)
        stats = audio_stats(audio)
        if stats.non_finite or stats.samples != aligned.shape[0] * 960:
            raise AssertionError(f"bad audio: {stats}")
        checks.append((f"decode {aligned.shape[0]} frames -> {stats.samples} samples", time.perf_counter() - t0))
        t0 = time.perf_counter()
        wav = Path(tmp) / "selftest.wav"
        write_wav_atomic(wav, audio)
        info = sf.info(str(wav))
        if (info.samplerate, info.channels, info.subtype) != (SAMPLE_RATE, 1, "PCM_16"):
            raise AssertionError(f"bad WAV: {info}")
        back, _ = sf.read(str(wav), dtype="float32")
        if not np.allclose(back, np.clip(audio, -1, 1), atol=1 / 16384):
            raise AssertionError("WAV does not read back")
        checks.append(("WAV 24 kHz mono PCM_16 written and read back", time.perf_counter() - t0))
    for name, seconds, *status in checks:
        print(f"  {(status or ['ok'])[0]:<5} {name:<62} {seconds * 1000:8.0f} ms")
    print(f"PASS: selftest on {engine.device} in {time.perf_counter() - t_all:.1f}s")
    return 0


def log(msg: str) -> None:
    print(msg, flush=True)


def log_to_stderr(msg: str) -> None:
    """The log when stdout carries audio (--output -)."""
    print(msg, file=sys.stderr, flush=True)


def run_cli(body, interrupted_note: str = "no partial output was left") -> int:
    """Every script's top level: a user mistake is one stderr line (exit 2), Ctrl-C exits 130."""
    try:
        return body()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"error: interrupted (Ctrl-C); {interrupted_note}", file=sys.stderr)
        return 130


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        if not args.selftest:
            return run(args, log_to_stderr if args.output == "-" else log)
        try:
            return selftest(args, log)
        except AssertionError as e:
            print(f"FAIL: selftest: {e}", file=sys.stderr)
            return 1

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
