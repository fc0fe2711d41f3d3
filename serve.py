#!/usr/bin/env python3
"""OpenAI-compatible speech server for Higgs Audio V2: batched requests, one engine process per device.

    python3 serve.py --model_path ./model_cache --tokenizer_path ./tokenizer_cache --device npu:0 --port 8000
    curl -s 127.0.0.1:8000/v1/audio/speech -H 'Content-Type: application/json' \\
         -d '{"model": "higgs-audio-v2", "input": "Hello there.", "voice": "default"}' -o hello.wav

Routes: POST /v1/audio/speech, GET /v1/audio/voices, GET /v1/models, GET /health, GET /metrics.
docs/serve.md has the details (batching, several NPUs, several hosts, benchmarks).

Layout: this process runs the HTTP side (FastAPI on uvicorn) and the batching scheduler; every
device gets its own engine process (inference.load_engine), which runs one batch at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import logging
import math
import multiprocessing
import os
import re
import secrets
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError

import inference
from inference import SAMPLE_RATE, UserError, first_line

MODEL_ID = "higgs-audio-v2"
# OpenAI's model names, so that clients written for them work unchanged
MODEL_ALIASES = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")
MAX_INPUT_CHARS = 4096  # OpenAI's limit
DEFAULT_VOICE = "default"  # no reference audio: the model picks a voice (steered by the scene)
VOICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
CHUNK_SAMPLES = SAMPLE_RATE // 2  # audio per streamed piece / SSE delta
# response_format -> (libsndfile container, subtype, media type); mp3 and opus only where libsndfile writes them
FORMATS = {
    "wav": ("WAV", "PCM_16", "audio/wav"),
    "pcm": ("RAW", "PCM_16", "audio/pcm"),  # raw s16le, 24 kHz, mono
    "flac": ("FLAC", "PCM_16", "audio/flac"),
    "mp3": ("MP3", "MPEG_LAYER_III", "audio/mpeg"),
    "opus": ("OGG", "OPUS", "audio/ogg"),
}

log = logging.getLogger("serve")


def writable_formats() -> list[str]:
    import soundfile as sf

    return [name for name, (container, subtype, _) in FORMATS.items() if sf.check_format(container, subtype)]


def encode_audio(audio, fmt: str) -> bytes:
    """float32 waveform -> bytes of `fmt`. Converted to 16 bits once, as the CLI's WAV (so the WAV is the
    CLI's, byte for byte); flac and pcm then hold exactly the WAV's samples (libsndfile's own FLAC float
    conversion rounds differently)."""
    import numpy as np
    import soundfile as sf

    pcm = inference.pcm16_bytes(audio)  # the CLI's conversion (clipped, NaN -> 0)
    if fmt == "pcm":
        return pcm
    container, subtype, _ = FORMATS[fmt]
    out = io.BytesIO()
    sf.write(out, np.frombuffer(pcm, dtype="<i2"), SAMPLE_RATE, format=container, subtype=subtype)
    return out.getvalue()


# --------------------------------------------------------------------------- errors


class ApiError(Exception):
    """An error answer in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ClientGone(Exception):
    pass


def validation_error(e: ValidationError) -> ApiError:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"])
    if err["type"] == "extra_forbidden":
        return ApiError(400, f"Unrecognized request argument supplied: {loc}", param=loc, code="unknown_parameter")
    if err["type"] == "json_invalid":
        return ApiError(400, f"The request body is not valid JSON ({err['msg']})", code="invalid_json")
    if not loc:
        return ApiError(400, f"The request body must be a JSON object ({err['msg']})", code="invalid_json")
    return ApiError(400, f"{loc}: {err['msg']}", param=loc, code="invalid_value")


# --------------------------------------------------------------------------- request


class SpeechBody(BaseModel):
    """OpenAI's /v1/audio/speech fields plus Higgs' sampling extras; unknown fields are refused (typos)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    model: str = MODEL_ID
    input: str
    voice: str = DEFAULT_VOICE
    response_format: str | None = None  # wav; pcm for stream_format sse
    speed: float = 1.0
    stream_format: Literal["audio", "sse"] | None = None
    seed: int | None = None  # None: a random one, returned in X-Higgs-Seed
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    max_new_tokens: int | None = None
    scene: str | None = None


# The records below cross the queues to and from the engine processes (pickled): they live at module level,
# where a spawned process finds them.


@dataclass
class RequestSpec:
    """One checked request, as its engine process gets it."""

    request: inference.SpeechRequest  # text, seed, scene; the engine fills in the voice's codes
    voice: str | None  # a --voices_dir name; None: the default voice
    params: inference.SamplingParams
    format: str  # response_format
    speak: bool  # alone through inference.speak (long or streamed), not in a batch
    stream: bool  # pieces sent as they come
    id: str = ""  # set when dispatched: the answers name the request
    serial: int = 0  # set when dispatched: the server cancels a streamed job by it


@dataclass
class Job:
    """One request on its way through the queue to an engine; `events` is what the engine sends back."""

    id: str
    spec: RequestSpec
    key: tuple  # requests with the same key may share a batch
    deadline: float
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    state: str = "queued"  # queued -> running -> done | cancelled
    serial: int = 0  # names the job to its engine process (cancelling a streamed one)
    engine: object = None  # the EngineProc running it
    batch_size: int = 0

    @property
    def engine_label(self) -> str:
        return self.engine.label if self.engine is not None else "-"


@dataclass
class Call:
    """What one request's log line and metrics need."""

    id: str
    t0: float
    chars: int = 0
    frames: int | None = None
    ttfa: float | None = None
    status: int = 500
    job: Job | None = None
    streaming: bool = False
    completed: bool = False  # a streamed body was sent to its end


class TrackedStream(StreamingResponse):
    """A streamed answer that reports its end once, however it ends (done, error, client gone)."""

    def __init__(self, content, on_close, call: Call, **kw):
        super().__init__(content, **kw)
        self.on_close, self.call = on_close, call

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # the generator's own cleanup, even if it never started
            if not self.call.completed and self.call.status == 200:
                self.call.status = 499  # the client hung up before the end
            self.on_close(self.call)


def parse_request(body: bytes, opts, voices: dict, formats: list[str]) -> tuple[SpeechBody, RequestSpec, tuple]:
    """The request body -> (request, engine spec, batch key), or ApiError 400/404 naming the field."""
    try:
        req = SpeechBody.model_validate_json(body or b"null")
    except ValidationError as e:
        raise validation_error(e) from None
    if req.model not in (opts.served_model_name, *MODEL_ALIASES):
        raise ApiError(404, f"The model {req.model!r} does not exist; this server has {opts.served_model_name!r}",
                       param="model", code="model_not_found")
    if not req.input.strip():
        raise ApiError(400, "input is empty: give the text to speak", param="input", code="invalid_value")
    if len(req.input) > MAX_INPUT_CHARS:
        raise ApiError(400, f"input is {len(req.input)} characters; at most {MAX_INPUT_CHARS} are allowed",
                       param="input", code="string_above_max_length")
    if req.scene is not None and len(req.scene) > MAX_INPUT_CHARS:
        raise ApiError(400, f"scene is {len(req.scene)} characters; at most {MAX_INPUT_CHARS} are allowed",
                       param="scene", code="string_above_max_length")
    if req.speed != 1.0:
        raise ApiError(400, f"speed {req.speed}: only 1.0 is supported (Higgs Audio has no speed control; "
                       "resample the audio on the client if needed)", param="speed", code="unsupported_value")
    if req.voice != DEFAULT_VOICE and req.voice not in voices:
        names = ", ".join([DEFAULT_VOICE, *sorted(voices)])
        raise ApiError(400, f"voice {req.voice!r} is not one of: {names} (GET /v1/audio/voices)",
                       param="voice", code="invalid_value")
    fmt = req.response_format or ("pcm" if req.stream_format == "sse" else "wav")
    if fmt not in formats:
        raise ApiError(400, f"response_format {fmt!r}: this server writes {', '.join(formats)}",
                       param="response_format", code="invalid_value")
    if req.stream_format == "sse" and fmt != "pcm":
        raise ApiError(400, "stream_format sse sends base64 PCM (s16le, 24 kHz, mono): set response_format to pcm",
                       param="response_format", code="invalid_value")
    params = inference.SamplingParams(
        max_new_tokens=req.max_new_tokens if req.max_new_tokens is not None else opts.max_new_tokens,
        temperature=req.temperature if req.temperature is not None else opts.temperature,
        top_k=req.top_k if req.top_k is not None else opts.top_k,
        top_p=req.top_p if req.top_p is not None else opts.top_p,
    )

    def seed_check():
        if req.seed is not None:
            inference.check_seed(req.seed, opts.retries, flag="seed")

    # the engine's own rules, one field at a time, so that the error names the field
    checks = [(name, inference.SamplingParams(**{name: getattr(params, name)}).validate)
              for name in ("temperature", "top_k", "top_p")]
    checks.append(("seed", seed_check))
    for name, check in checks:
        try:
            check()
        except UserError as e:
            raise ApiError(400, str(e).removeprefix("--"), param=name, code="invalid_value") from None
    if not inference.MIN_FRAMES <= params.max_new_tokens <= opts.max_new_tokens:
        raise ApiError(400, f"max_new_tokens {params.max_new_tokens}: this server takes {inference.MIN_FRAMES} "
                       f"(the fewest that give any audio) to {opts.max_new_tokens} (25 frames = 1 s)",
                       param="max_new_tokens", code="invalid_value")
    seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
    voice = None if req.voice == DEFAULT_VOICE else req.voice
    # as the CLI: a text of one chunk, not streamed, is decoded in a batch with others (synthesize); a
    # longer text, or a stream of pcm / wav, goes through speak() alone (chunk by chunk, pieces as they come)
    stream = req.stream_format == "sse" or (req.stream_format == "audio" and fmt in ("pcm", "wav"))
    alone = stream or len(inference.split_text(req.input, opts.chunk_words)) > 1
    scene = inference.DEFAULT_SCENE if req.scene is None else (req.scene or None)
    spec = RequestSpec(inference.SpeechRequest(text=req.input, seed=seed, scene=scene), voice=voice, params=params,
                       format=fmt, speak=alone, stream=stream)
    # one batch shares its sampling settings and budget; rows with and without a reference voice cannot mix
    key = ("alone", secrets.token_hex(8)) if alone else \
        (voice is not None, params.temperature, params.top_k, params.top_p, params.max_new_tokens)
    return req, spec, key


# --------------------------------------------------------------------------- voices


def read_voices(voices_dir: str | None) -> dict:
    """NAME.wav (+ NAME.txt transcript) -> {name: (24 kHz mono float32, transcript or None)}, checked now."""
    import soundfile as sf

    if voices_dir is None:
        return {}
    folder = Path(voices_dir)
    if not folder.is_dir():
        raise UserError(f"--voices_dir {folder}: not a folder")
    voices = {}
    for wav in sorted(folder.glob("*.wav")):
        name = wav.stem
        if name == DEFAULT_VOICE:
            raise UserError(f"--voices_dir {folder}: {wav.name}: 'default' is the model's own voice (no reference "
                            "audio); rename the file")
        if not VOICE_NAME.match(name):
            raise UserError(f"--voices_dir {folder}: {wav.name}: a voice name takes letters, digits, '_', '.' and "
                            "'-' (a letter or digit first, 64 at most); rename the file")
        try:
            frames = sf.info(str(wav)).frames
        except Exception as e:  # soundfile raises its own error types
            raise UserError(f"--voices_dir: {wav}: cannot read audio ({first_line(e)})") from None
        if frames == 0:
            raise UserError(f"--voices_dir: {wav} holds no samples")
        transcript = None
        if wav.with_suffix(".txt").is_file():
            try:
                transcript = wav.with_suffix(".txt").read_text(encoding="utf-8").strip() or None
            except (OSError, UnicodeDecodeError) as e:
                raise UserError(f"--voices_dir: {wav.with_suffix('.txt')}: cannot read as UTF-8 text "
                                f"({first_line(e)})") from None
        voices[name] = (inference.load_reference_audio(str(wav)), transcript)
    if not voices:
        raise UserError(f"--voices_dir {folder}: no NAME.wav files in it")
    return voices


# --------------------------------------------------------------------------- devices


def parse_devices(spec: str) -> list[str]:
    """--device cpu | npu:0,npu:1 | cpu,cpu | all -> one device string per engine process."""
    import torch

    if spec == "all":
        if inference.npu_available():
            return [f"npu:{i}" for i in range(torch.npu.device_count())]
        if torch.cuda.is_available():
            return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        raise UserError("--device all: no NPU or CUDA GPU here; on a CPU give --device cpu (or cpu,cpu,...)")
    devices = []
    for part in spec.split(","):
        device = inference.pick_device(part.strip())
        if device.type != "cpu":
            count = torch.npu.device_count() if device.type == "npu" else torch.cuda.device_count()
            if device.index >= count:
                raise UserError(f"--device {part.strip()}: no such device; this host has {count} "
                                f"{device.type.upper()} devices (0 to {count - 1})")
        devices.append(str(device))
    return devices


# --------------------------------------------------------------------------- engine process


@dataclass
class EngineOptions:
    """The server's flags an engine process needs."""

    model_path: str
    tokenizer_path: str
    dtype: str
    graph: str
    max_batch_size: int
    max_new_tokens: int
    retries: int
    chunk_words: float
    context_chunks: int
    threads: int  # torch threads; 0: torch's default


@dataclass
class EngineInfo:
    """An engine process's "ready" message."""

    device: str
    dtype: str


@dataclass
class Done:
    """A request's last message: what its answer's headers and SSE "done" event say."""

    frames: int
    samples: int
    seed: int
    outcome: str
    attempts: int
    chunks: int
    prompt_tokens: int
    batch_size: int


@dataclass
class BatchStats:
    """A batch's "batch_done" message: for the metrics and Retry-After."""

    frames: int = 0  # every attempt's
    decode_steps: int = 0
    decode_s: float = 0.0
    seconds: float = 0.0  # the whole batch


def engine_main(index: int, device: str, opts: EngineOptions, voices: dict, jobs, results, cancel) -> None:
    """One engine process: load, encode the voices, then run the batches it is sent until None."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the server; the server stops us
    label = f"{device}#{index}"

    def send(*msg):
        results.put((index, *msg))

    def say(msg: str) -> None:
        print(f"[{label}] {msg}", file=sys.stderr, flush=True)

    if opts.threads:
        import torch

        torch.set_num_threads(opts.threads)
    try:
        engine = inference.load_engine(opts.model_path, opts.tokenizer_path, device, opts.dtype, log=say,
                                       graph=opts.graph)
        refs = {}
        for name, (waveform, transcript) in voices.items():
            if waveform.size < engine.min_audio_samples():
                raise UserError(f"--voices_dir: voice {name!r} is {waveform.size / SAMPLE_RATE * 1000:.0f} ms long; "
                                "a voice clones best from a few seconds of speech")
            refs[name] = (engine.encode_audio(waveform), transcript)
        # a full batch of long prompts must fit: about one token per character (CJK; English takes fewer),
        # the longest voice and the template around them
        longest = MAX_INPUT_CHARS + max((c.shape[1] for c, _ in refs.values()), default=0) + 256
        try:
            engine.check_decode_memory(opts.max_batch_size, longest, opts.max_new_tokens,
                                       inference.SamplingParams(max_new_tokens=opts.max_new_tokens))
        except UserError as e:
            raise UserError(f"a full batch of long requests does not fit; lower --max_batch_size "
                            f"{opts.max_batch_size} or --max_new_tokens {opts.max_new_tokens} ({e})") from None
    except UserError as e:
        send("failed", f"engine on {device}: {e}")
        return
    say(f"ready: {engine.num_params / 1e9:.3f} B parameters, {str(engine.dtype).replace('torch.', '')}, "
        f"{len(refs)} voices encoded")
    send("ready", EngineInfo(str(engine.device), str(engine.dtype).replace("torch.", "")))
    while (batch := jobs.get()) is not None:
        if batch[0].speak:
            run_speak(engine, refs, opts, batch[0], send, cancel, say)
        else:
            run_batch(engine, refs, opts.retries, batch, send)


def run_batch(engine, refs: dict, retries: int, specs: list[RequestSpec], send) -> None:
    """One static batch through inference.synthesize: every row decodes with its own seed (seed + 1, ...
    on retries), so its audio is what it would be alone. An engine error fails the batch's rows (500) and
    leaves the process serving; its traceback goes to the log, never into an answer."""
    import numpy as np

    t0 = time.perf_counter()
    stats = BatchStats()
    requests = []
    for s in specs:
        ref_codes, ref_text = refs[s.voice] if s.voice else (None, None)
        requests.append(replace(s.request, ref_codes=ref_codes, ref_text=ref_text))
    try:
        results = inference.synthesize(engine, requests, specs[0].params, retries)
    except UserError as e:
        return finish_batch(specs, ("error", 400, str(e)), stats, t0, send)
    except Exception as e:  # noqa: BLE001  an engine bug fails this batch only; the traceback goes to the log
        return finish_batch(specs, engine_error(e), stats, t0, send)
    for spec, result in zip(specs, results):
        best = result.best
        frames = int(best.generation.codes.shape[0])
        stats.frames += sum(a.frames for a in result.attempts)
        stats.decode_steps, stats.decode_s = best.timings.decode_steps, best.timings.decode_s  # the batch's
        audio = best.audio if best.audio is not None else np.zeros(0, dtype=np.float32)
        send("audio", spec.id, audio)
        send("done", spec.id, Done(frames=frames, samples=int(audio.size), seed=best.generation.seed,
                                   outcome=best.reason or "ok", attempts=len(result.attempts), chunks=1,
                                   prompt_tokens=result.prompt_tokens, batch_size=len(specs)))
    finish_batch(specs, None, stats, t0, send)


def run_speak(engine, refs: dict, opts: EngineOptions, spec: RequestSpec, send, cancel, say) -> None:
    """One request alone through inference.speak: a long text chunk by chunk, its pieces sent as they come
    (stream) or once at the end. Stops at the next host sync when the server cancels it (client gone,
    timeout): `cancel` then holds this job's serial."""
    t0 = time.perf_counter()
    stats = BatchStats()
    ref_codes, ref_text = refs[spec.voice] if spec.voice else (None, None)
    request = spec.request
    pieces = 0
    try:
        speech = inference.speak(engine, request.text, spec.params, seed=request.seed, retries=opts.retries,
                                 scene=request.scene, ref_codes=ref_codes, ref_text=ref_text,
                                 chunk_words=opts.chunk_words, context_chunks=opts.context_chunks, stream=spec.stream)
        for piece in speech:
            send("audio", spec.id, piece)
            pieces += 1
            if cancel.value == spec.serial:
                speech.close()
                say(f"request {spec.id} cancelled after {pieces} pieces (client gone or timed out)")
                return finish_batch([spec], ("error", 499, "cancelled"), stats, t0, send)
    except UserError as e:
        return finish_batch([spec], ("error", 400, str(e)), stats, t0, send)
    except Exception as e:  # noqa: BLE001  as in run_batch: this request fails, the engine goes on
        return finish_batch([spec], engine_error(e), stats, t0, send)
    result = speech.result
    chunks = result.chunks
    stats.frames = sum(a.frames for c in chunks for a in c.attempts)
    stats.decode_steps = sum(c.timings.decode_steps for c in chunks)
    stats.decode_s = sum(c.timings.decode_s for c in chunks)
    bad = [f"chunk {c.index + 1}: {c.outcome}" if len(chunks) > 1 else c.outcome for c in chunks if not c.usable]
    send("done", spec.id, Done(frames=sum(c.generated_frames for c in chunks), samples=result.samples,
                               seed=request.seed, outcome="; ".join(bad) or "ok",
                               attempts=sum(len(c.attempts) for c in chunks), chunks=len(chunks),
                               prompt_tokens=sum(c.prompt_tokens for c in chunks), batch_size=1))
    finish_batch([spec], None, stats, t0, send)


def engine_error(e: Exception) -> tuple:
    """The log gets the traceback; the answer one line (500)."""
    traceback.print_exc()
    first = first_line(e)
    return "error", 500, f"engine error: {type(e).__name__}: {first}"[:300]


def finish_batch(specs: list[RequestSpec], error, stats: BatchStats, t0: float, send) -> None:
    if error is not None:
        for s in specs:
            send(error[0], s.id, *error[1:])
    stats.seconds = time.perf_counter() - t0
    send("batch_done", stats)


# --------------------------------------------------------------------------- scheduler


@dataclass
class EngineProc:
    index: int
    device: str
    process: object
    jobs: object  # multiprocessing queue of batches
    cancel: object  # multiprocessing Value: the serial of a streamed job to stop
    state: str = "loading"  # loading -> ready -> dead
    busy: bool = False  # from a batch's dispatch to its "batch_done" (its rows' "done" come before that)
    running: dict = field(default_factory=dict)  # job id -> Job, the rows of its batch still to answer

    @property
    def label(self) -> str:
        return f"{self.device}#{self.index}"


class Scheduler:
    """The queue and the engine processes: an idle engine takes the oldest request plus up to
    max_batch_size - 1 later compatible ones as one batch. All state lives on the event loop's thread;
    the reader thread only hands messages over (call_soon_threadsafe)."""

    def __init__(self, opts, devices: list[str], voices: dict, metrics, on_fatal):
        self.opts, self.devices, self.voices, self.metrics, self.on_fatal = opts, devices, voices, metrics, on_fatal
        self.queue: list[Job] = []
        self.engines: list[EngineProc] = []
        self.next_engine = 0
        self.serials = 0
        self.batch_seconds = None  # moving average, for Retry-After
        self.stopping = False
        self.loop = None

    # ---------------- life cycle
    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        ctx = multiprocessing.get_context("spawn")  # no fork: torch, NPU and CUDA runtimes do not survive it
        self.results = ctx.Queue()
        cpus = sum(d == "cpu" for d in self.devices)
        # CPU engines share the cores (unless OMP_NUM_THREADS says how many each takes)
        threads = max(1, (os.cpu_count() or 1) // cpus) if cpus > 1 and "OMP_NUM_THREADS" not in os.environ else 0
        a = self.opts
        opts = EngineOptions(model_path=a.model_path, tokenizer_path=a.tokenizer_path, dtype=a.dtype, graph=a.graph,
                             max_batch_size=a.max_batch_size, max_new_tokens=a.max_new_tokens, retries=a.retries,
                             chunk_words=a.chunk_words, context_chunks=a.context_chunks, threads=threads)
        for index, device in enumerate(self.devices):
            jobs, cancel = ctx.Queue(), ctx.Value("q", -1, lock=False)
            proc = ctx.Process(target=engine_main, args=(index, device, opts, self.voices, jobs, self.results, cancel),
                               name=f"higgs-engine-{device}-{index}", daemon=True)
            proc.start()
            self.engines.append(EngineProc(index, device, proc, jobs, cancel))
            threading.Thread(target=self._watch, args=(self.engines[-1],), daemon=True).start()
        threading.Thread(target=self._read, daemon=True).start()

    def stop(self) -> None:
        self.stopping = True
        for e in self.engines:
            if e.process.is_alive():
                e.jobs.put(None)
        for e in self.engines:
            e.process.join(timeout=10)
            if e.process.is_alive():
                e.process.terminate()
                e.process.join(timeout=5)
        self.results.put(None)

    def _read(self) -> None:
        while (msg := self.results.get()) is not None:
            self.loop.call_soon_threadsafe(self._on_message, msg)

    def _watch(self, engine: EngineProc) -> None:
        engine.process.join()
        if not self.stopping:
            self.loop.call_soon_threadsafe(self._on_exit, engine, engine.process.exitcode)

    # ---------------- state
    @property
    def loading(self) -> bool:
        return not self.engines or any(e.state == "loading" for e in self.engines)

    @property
    def ready(self) -> bool:
        """Every engine has loaded (start-up is over) and at least one still serves."""
        return not self.loading and self.serving() > 0

    def serving(self) -> int:
        return sum(e.state == "ready" for e in self.engines)

    def status(self) -> list[dict]:
        return [{"engine": e.label, "state": e.state, "running": len(e.running)} for e in self.engines]

    def retry_after(self) -> int:
        return max(1, math.ceil(self.batch_seconds or 1.0))

    # ---------------- requests
    def submit(self, job: Job) -> None:
        if not self.ready:
            raise ApiError(503, "the model is still loading; retry when GET /health says 200" if self.loading else
                           "no engine is serving (see the server log)", "server_error", code="not_ready",
                           headers={"Retry-After": "5"} if self.loading else None)
        if len(self.queue) >= self.opts.max_queue:
            raise ApiError(429, f"the server is busy: {len(self.queue)} requests are waiting (--max_queue "
                           f"{self.opts.max_queue}); retry later", "rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(self.retry_after())})
        self.serials += 1
        job.serial = self.serials
        self.queue.append(job)
        self.metrics.queue_depth.set(len(self.queue))
        self._dispatch()

    def cancel(self, job: Job) -> None:
        """The client left or timed out: a queued request gives up its place; a streamed one running alone
        stops at its engine's next host sync; a row of a batch runs on, and its result is dropped."""
        if job.state == "queued" and job in self.queue:
            self.queue.remove(job)
            self.metrics.queue_depth.set(len(self.queue))
        if job.state == "running" and job.spec.speak and job.id in job.engine.running:
            job.engine.cancel.value = job.serial
        if job.state != "done":
            job.state = "cancelled"

    def _dispatch(self) -> None:
        n = len(self.engines)
        for k in range(n):
            if not self.queue:
                break
            engine = self.engines[(self.next_engine + k) % n]
            if engine.state != "ready" or engine.busy:
                continue
            head = self.queue[0]
            batch = [j for j in self.queue if j.key == head.key][: self.opts.max_batch_size]
            for job in batch:
                self.queue.remove(job)
                job.state, job.engine, job.batch_size = "running", engine, len(batch)
                engine.running[job.id] = job
            engine.busy = True
            engine.jobs.put([replace(j.spec, id=j.id, serial=j.serial) for j in batch])
            self.metrics.batch_size.observe(len(batch))
            self.next_engine = (self.next_engine + k + 1) % n  # spread batches over the engines
        self.metrics.queue_depth.set(len(self.queue))

    def _on_message(self, msg) -> None:
        index, kind, *payload = msg
        engine = self.engines[index]
        if kind == "ready":
            engine.state = "ready"
            self.metrics.engines_ready.set(self.serving())
            log.info(f"engine {engine.label} ready ({payload[0].dtype})")
            if not self.loading:
                log.info(f"ready: {len(self.engines)} engine(s) on {', '.join(self.devices)}")
            self._dispatch()
        elif kind == "failed":
            engine.state = "dead"
            self.on_fatal(2, payload[0])
        elif kind in ("audio", "done", "error"):
            job = engine.running.get(payload[0])
            if job is not None:
                job.events.put_nowait((kind, *payload[1:]))
                if kind != "audio":
                    engine.running.pop(job.id)
        elif kind == "batch_done":
            stats: BatchStats = payload[0]
            for job in engine.running.values():  # nothing may wait forever on a row the engine forgot
                job.events.put_nowait(("error", 500, "engine error: the batch ended without this row"))
            engine.running, engine.busy = {}, False
            self.metrics.frames.inc(stats.frames)
            if stats.decode_s > 0:
                self.metrics.frames_per_s.labels(engine.label).set(stats.decode_steps / stats.decode_s)
            a = stats.seconds
            self.batch_seconds = a if self.batch_seconds is None else 0.8 * self.batch_seconds + 0.2 * a
            self._dispatch()

    def _on_exit(self, engine: EngineProc, code) -> None:
        was = engine.state
        engine.state = "dead"
        self.metrics.engines_ready.set(self.serving())
        for job in engine.running.values():
            job.events.put_nowait(("error", 500, f"engine error: the engine process on {engine.device} exited "
                                                 f"(code {code})"))
        engine.running, engine.busy = {}, False
        if was == "loading":
            self.on_fatal(1, f"the engine process on {engine.device} exited while loading (code {code}); "
                             "its traceback is above")
        elif was == "ready":
            log.error(f"error: engine {engine.label} exited (code {code}); {self.serving()} engine(s) left")
            if not self.serving():
                for job in self.queue:
                    job.events.put_nowait(("error", 503, "no engine is serving (see the server log)"))
                self.queue.clear()


# --------------------------------------------------------------------------- metrics


class Metrics:
    def __init__(self, max_batch_size: int):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("higgs_requests", "Speech requests answered, by HTTP status", ["status"], registry=r)
        self.queue_depth = Gauge("higgs_queue_depth", "Requests waiting for an engine", registry=r)
        self.running = Gauge("higgs_requests_in_flight", "Requests accepted and not yet answered", registry=r)
        self.engines_ready = Gauge("higgs_engines_ready", "Engine processes serving", registry=r)
        buckets = sorted({b for b in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64) if b < max_batch_size}
                         | {max_batch_size})
        self.batch_size = Histogram("higgs_batch_size", "Requests per engine batch", buckets=buckets, registry=r)
        self.frames = Counter("higgs_generated_frames", "Audio frames generated, all rows (25 frames = 1 s)",
                              registry=r)
        self.frames_per_s = Gauge("higgs_decode_frames_per_second", "Decode steps per second of the last batch",
                                  ["engine"], registry=r)
        self.ttfa = Histogram("higgs_time_to_first_audio_seconds", "From request to its first audio bytes",
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120), registry=r)
        self.latency = Histogram("higgs_request_duration_seconds", "From request to its last byte",
                                 buckets=(0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300), registry=r)


# --------------------------------------------------------------------------- HTTP


def build_app(opts, devices: list[str], voices: dict, formats: list[str], on_fatal):
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.exceptions import HTTPException

    metrics = Metrics(opts.max_batch_size)
    scheduler = Scheduler(opts, devices, voices, metrics, on_fatal)
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, scheduler.stop)

    app = FastAPI(title="Higgs Audio V2 speech server", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.scheduler, app.state.metrics = scheduler, metrics

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(ApiError(e.status_code, str(e.detail), code=code).body(), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request, e: Exception):
        # the traceback goes to the log (uvicorn prints it), never into the answer
        return JSONResponse(ApiError(500, "internal server error (see the server log)", "server_error").body(),
                            status_code=500)

    def check_key(request: Request) -> None:
        if opts.api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), opts.api_key.encode()):
            raise ApiError(401, "Incorrect API key provided (send it as: Authorization: Bearer KEY)",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    @app.get("/health")
    async def health():
        if scheduler.loading:
            status, code = "loading", 503
        elif not scheduler.ready:
            status, code = "down", 503
        else:  # "degraded": an engine died, the others still serve
            status, code = "ok" if scheduler.serving() == len(scheduler.engines) else "degraded", 200
        return JSONResponse({"status": status, "engines": scheduler.status()}, status_code=code)

    api = APIRouter(dependencies=[Depends(check_key)])

    @api.get("/v1/models")
    async def models():
        entry = {"id": opts.served_model_name, "object": "model", "created": started, "owned_by": "bosonai",
                 "aliases": list(MODEL_ALIASES), "response_formats": formats, "stream_formats": ["audio", "sse"],
                 "voices": [DEFAULT_VOICE, *sorted(voices)], "sample_rate": SAMPLE_RATE,
                 "max_input_characters": MAX_INPUT_CHARS, "max_new_tokens": opts.max_new_tokens,
                 "max_batch_size": opts.max_batch_size, "engines": [e.label for e in scheduler.engines]}
        return {"object": "list", "data": [entry]}

    @api.get("/v1/audio/voices")
    async def list_voices():
        listed = [{"name": DEFAULT_VOICE, "duration_s": 0.0, "transcript": None}]
        listed += [{"name": name, "duration_s": round(w.size / SAMPLE_RATE, 3), "transcript": text}
                   for name, (w, text) in sorted(voices.items())]
        return {"voices": listed}

    @api.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @api.post("/v1/audio/speech")
    async def speech(request: Request):
        call = Call(f"speech-{uuid.uuid4().hex[:16]}", time.monotonic())
        try:
            req, spec, key = parse_request(await request.body(), opts, voices, formats)
            call.chars = len(req.input)
            job = Job(call.id, spec, key, deadline=call.t0 + opts.request_timeout)
            scheduler.submit(job)
            call.job = job
            metrics.running.inc()
            first = await next_event(job, request)
            call.ttfa = time.monotonic() - call.t0
            headers = {"X-Request-Id": call.id, "X-Higgs-Seed": str(spec.request.seed),
                       "X-Higgs-Engine": job.engine_label, "X-Higgs-Batch-Size": str(job.batch_size)}
            if req.stream_format is not None:
                media = "text/event-stream" if req.stream_format == "sse" else FORMATS[spec.format][2]
                call.status, call.streaming = 200, True
                return TrackedStream(stream(call, first, req.stream_format, spec.format), on_close=call_end,
                                     call=call, media_type=media, headers=headers | {"Cache-Control": "no-cache"})
            audio, done = await collect(job, first, request)
            call.frames = done.frames
            headers.update({"X-Higgs-Frames": str(done.frames), "X-Higgs-Attempts": str(done.attempts),
                            "X-Higgs-Chunks": str(done.chunks), "X-Higgs-Outcome": ascii_header(done.outcome)})
            body = await asyncio.to_thread(encode_audio, audio, spec.format)  # mp3 of minutes takes a while
            call.status = 200
            return Response(body, media_type=FORMATS[spec.format][2], headers=headers)
        except ApiError as e:
            call.status = e.status
            raise
        except ClientGone:
            call.status = 499  # nginx's "client closed request": nobody reads this answer
            return Response(status_code=499)
        finally:
            if not call.streaming:
                call_end(call)

    def call_end(call: Call) -> None:
        """Once per request: give up its place or its row, count it, log its line."""
        total = time.monotonic() - call.t0
        if call.job is not None:
            scheduler.cancel(call.job)
            metrics.running.dec()
        metrics.requests.labels(str(call.status)).inc()
        metrics.latency.observe(total)
        if call.ttfa is not None and call.status == 200:
            metrics.ttfa.observe(call.ttfa)
        job = call.job
        log.info(f"request {call.id} status={call.status} chars={call.chars} frames={call.frames} "
                 f"ttfa_ms={'-' if call.ttfa is None else round(call.ttfa * 1000)} "
                 f"total_ms={round(total * 1000)} batch={job.batch_size if job else '-'} "
                 f"engine={job.engine_label if job else '-'}")

    async def next_event(job: Job, request=None):
        """The engine's next message for `job`: ApiError 504 past the deadline; ClientGone if `request`'s
        client hangs up meanwhile (a streamed answer needs no watch: Starlette cancels it)."""
        getter = asyncio.ensure_future(job.events.get())
        waiting = {getter}
        watcher = asyncio.ensure_future(disconnected(request)) if request is not None else None
        if watcher is not None:
            waiting.add(watcher)
        try:
            done, _ = await asyncio.wait(waiting, timeout=max(job.deadline - time.monotonic(), 0),
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waiting:
                task.cancel()
        if getter in done:
            event = getter.result()
            if event[0] == "error":
                status, message = event[1], event[2]
                raise ApiError(status, message, "server_error" if status >= 500 else "invalid_request_error",
                               code="engine_error" if status >= 500 else "invalid_value")
            return event
        if watcher in done:
            raise ClientGone()
        raise ApiError(504, f"the request took longer than --request_timeout {opts.request_timeout:g} s",
                       "server_error", code="timeout")

    async def disconnected(request) -> None:
        # the body is read already, so the next ASGI message is the client hanging up
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def collect(job: Job, first, request=None) -> tuple:
        """All audio of `job` up to its "done" -> (waveform, Done)."""
        import numpy as np

        pieces, event = [], first
        while event[0] == "audio":
            pieces.append(event[1])
            event = await next_event(job, request)
        job.state = "done"
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32), event[1]

    async def stream(call: Call, first, stream_format: str, fmt: str):
        """A streamed body: pcm / wav as the audio comes, SSE deltas of base64 PCM, or flac / mp3 / opus
        encoded whole and then sent in pieces (their encoders want the whole signal)."""
        job = call.job
        try:
            if stream_format == "audio" and fmt not in ("pcm", "wav"):
                audio, done = await collect(job, first)
                data = await asyncio.to_thread(encode_audio, audio, fmt)
                for start in range(0, len(data), 64 * 1024):
                    yield data[start:start + 64 * 1024]
            else:
                if stream_format == "audio" and fmt == "wav":
                    yield streaming_wav_header()
                event = first
                while event[0] == "audio":
                    audio = event[1]
                    for start in range(0, audio.size, CHUNK_SAMPLES):
                        piece = encode_audio(audio[start:start + CHUNK_SAMPLES], "pcm")
                        yield sse({"type": "speech.audio.delta", "audio": base64.b64encode(piece).decode()}) \
                            if stream_format == "sse" else piece
                    event = await next_event(job)
                done = event[1]
                job.state = "done"
            call.frames = done.frames
            if stream_format == "sse":
                usage = {"input_tokens": done.prompt_tokens, "output_tokens": done.frames,
                         "total_tokens": done.prompt_tokens + done.frames}
                yield sse({"type": "speech.audio.done", "usage": usage,
                           **{k: getattr(done, k) for k in ("seed", "frames", "samples", "chunks", "outcome",
                                                            "batch_size")}})
        except ApiError as e:
            call.status = e.status
            if stream_format != "sse":
                raise  # the status line is gone: breaking the connection is the only way to say it failed
            yield sse({"type": "error", **e.body()})
        call.completed = True  # runs only once the last piece was taken (sent)

    app.include_router(api)
    return app


def sse(data: dict) -> bytes:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def streaming_wav_header() -> bytes:
    """A 16-bit mono 24 kHz WAV header whose sizes say "unknown" (0xFFFFFFFF), as streamed WAVs do."""
    import struct

    return (b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVE" + b"fmt "
            + struct.pack("<IHHIIHH", 16, 1, 1, SAMPLE_RATE, SAMPLE_RATE * 2, 2, 16)
            + b"data" + struct.pack("<I", 0xFFFFFFFF))


def ascii_header(text: str) -> str:
    return text.encode("ascii", "replace").decode()[:200]


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    add = inference.add_flag
    p = argparse.ArgumentParser(description="OpenAI-compatible speech server for Higgs Audio V2 (docs/serve.md).",
                                formatter_class=inference.HelpFormatter)
    model = p.add_argument_group("model and devices")
    add(model, "--model_path", default="./model_cache", help="generation model folder (transformers-native)")
    add(model, "--tokenizer_path", default="./tokenizer_cache", help="audio tokenizer folder")
    add(model, "--device", default="auto",
        help="auto, cpu, npu:0, cuda:0, a comma list (npu:0,npu:1 or cpu,cpu: one engine process each), "
             "or all (every NPU, else every CUDA GPU)")
    add(model, "--dtype", default="auto", type=inference.dtype_choice,
        choices=("auto", "float32", "bfloat16", "float16"), help="auto (bf16 on accelerators; fp32 on CPU if it fits)")
    add(model, "--graph", default="auto", choices=inference.GRAPH_MODES, help="decode step capture, as inference.py")
    add(model, "--voices_dir", default=None, help="folder of NAME.wav (+ NAME.txt transcript) reference voices")
    http = p.add_argument_group("HTTP")
    add(http, "--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    add(http, "--port", type=int, default=8000, help="TCP port (0: any free one, printed at start)")
    add(http, "--api_key", default=None,  # not the variable's value: --help would print the key
        help="require 'Authorization: Bearer KEY' on every route but /health; without the flag: "
             "$HIGGS_API_KEY if set, else no key")
    add(http, "--served_model_name", default=MODEL_ID, help="the model id clients send and /v1/models lists")
    limits = p.add_argument_group("batching and limits")
    add(limits, "--max_batch_size", type=int, default=8, help="requests decoded together by one engine")
    add(limits, "--max_queue", type=int, default=64, help="requests waiting at most; more get 429")
    add(limits, "--request_timeout", type=float, default=300.0, help="seconds a request may take in all (504)")
    sampling = p.add_argument_group("sampling defaults (a request may set its own)")
    add(sampling, "--max_new_tokens", type=int, default=inference.SamplingParams.max_new_tokens,
        help="default and ceiling of a request's max_new_tokens (audio frames, 25 = 1 s)")
    add(sampling, "--temperature", type=float, default=inference.SamplingParams.temperature, help="0 = greedy")
    add(sampling, "--top_k", type=int, default=inference.SamplingParams.top_k, help="0 = off")
    add(sampling, "--top_p", type=float, default=inference.SamplingParams.top_p, help="in (0, 1]")
    add(sampling, "--retries", type=int, default=3,
        help="extra attempts (seed+1, ...) for unusable audio, as inference.py")
    longform = p.add_argument_group("long text and streaming (as inference.py)")
    add(longform, "--chunk_words", type=float, default=inference.CHUNK_WORDS,
        help="a longer input is spoken chunk by chunk, each of at most this many words (a CJK character counts "
             "half; 0: one chunk)")
    add(longform, "--context_chunks", type=int, default=inference.CONTEXT_CHUNKS,
        help="earlier chunks (text + audio) in each chunk's prompt, for one voice across the text")
    return p


def validate_args(args) -> None:
    inference.check_utf8_args(args, hint="check the shell's encoding")
    for name, low in (("max_batch_size", 1), ("max_queue", 1), ("max_new_tokens", inference.MIN_FRAMES),
                      ("retries", 0), ("chunk_words", 0), ("context_chunks", 0)):
        if getattr(args, name) < low:
            raise UserError(f"--{name} must be >= {low}, got {getattr(args, name)}")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port}: expected 0..65535")
    if not 0 < args.request_timeout < math.inf:
        raise UserError(f"--request_timeout must be > 0 seconds, got {args.request_timeout}")
    if args.api_key is None:
        args.api_key = os.environ.get("HIGGS_API_KEY")
    if args.api_key is not None and not args.api_key.strip():
        raise UserError("--api_key is empty: give a key, or leave the flag out for no key")
    inference.SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                             top_p=args.top_p).validate()
    inference.check_model_dir(args.model_path)  # the cheap checks now, not after the engines start
    inference.check_tokenizer_dir(args.tokenizer_path)


def listen(host: str, port: int) -> socket.socket:
    try:
        return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as e:
        raise UserError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e}; another server "
                        "on that port? pick another --port)") from None


def serve(args) -> int:
    import uvicorn

    validate_args(args)
    devices = parse_devices(args.device)
    voices = read_voices(args.voices_dir)
    formats = writable_formats()
    sock = listen(args.host, args.port)
    exit_code = 0
    server = None

    def on_fatal(code: int, message: str) -> None:
        nonlocal exit_code
        print(f"error: {message}", file=sys.stderr, flush=True)
        exit_code = code
        server.should_exit = True

    app = build_app(args, devices, voices, formats, on_fatal)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=10)
    server = uvicorn.Server(config)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    log.info(f"listening on http://{shown}:{port} (engines on {', '.join(devices)} loading; "
             f"formats {', '.join(formats)}; {len(voices)} voices)")
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C once it has shut down: for a server, a normal stop
        log.info("stopped (Ctrl-C)")
    return exit_code


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not log.handlers:  # this logger only: the root logger belongs to whoever imports us
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s serve: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    return inference.run_cli(lambda: serve(args), "the server stopped")


if __name__ == "__main__":
    sys.exit(main())
