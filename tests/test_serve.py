"""serve.py over real HTTP on 127.0.0.1: routes, formats, streaming, voices, errors, batching, load, limits.

Three servers on the tiny checkpoints, each started once: `server` (two CPU engines, batches of 8,
voices, API key), `small` (one engine, batches of 4, a queue of 4) and `impatient` (a 1 s timeout).
A test-only hook (HOOK, loaded into the server's processes through PYTHONPATH) lets a text make the
engine fail ("__boom__"; "__sever__": after the first piece of a stream) or wait until the test
creates NAME.release ("__hold_NAME__": before the decode; "__drip_NAME__": after a stream's first
piece), so queue, batch, timeout and cancel tests need no timing.
"""

import asyncio
import base64
import io
import json
import os
import queue
import socket
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import soundfile as sf
from prometheus_client.parser import text_string_to_metric_families

import inference
import serve
from conftest import ROOT

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
BUDGET = 48  # max_new_tokens of the test servers: short audio, fast batches
CHUNK_WORDS = 8  # `server` speaks a text of more words chunk by chunk
LONG = ("The sun rises in the east and sets in the west. This simple fact has been observed by people "
        "for thousands of years, in every land.")
HOOK = '''
import os
if os.environ.get("HIGGS_TEST_HOOKS"):
    import re, time
    from pathlib import Path
    import inference
    hooks = Path(os.environ["HIGGS_TEST_HOOKS"])
    _generate_frames, _speak = inference.Engine.generate_frames, inference.speak

    def wait_for(name):
        (hooks / f"{name}.started").touch()
        deadline = time.monotonic() + 120
        while not (hooks / f"{name}.release").exists() and time.monotonic() < deadline:
            time.sleep(0.02)

    def generate_frames(self, prompts, params, seeds, *args, **kw):
        texts = " ".join(p.text for p in prompts)
        if "__boom__" in texts:
            raise RuntimeError("injected engine failure\\nsecond line")
        for name in re.findall(r"__hold_(\\w+?)__", texts):
            wait_for(name)
        return (yield from _generate_frames(self, prompts, params, seeds, *args, **kw))

    class AfterFirstPiece:
        """speak()'s stream; past its first piece it waits (__drip_NAME__) or fails (__sever__)."""

        def __init__(self, stream, text):
            self.stream, self.pieces_of, self.text, self.pieces = stream, iter(stream), text, 0
            self.close = stream.close

        def __iter__(self):
            return self

        def __next__(self):
            if self.pieces == 1:
                for name in re.findall(r"__drip_(\\w+?)__", self.text):
                    wait_for(name)
                if "__sever__" in self.text:
                    raise RuntimeError("injected failure mid-stream")
            self.pieces += 1
            return next(self.pieces_of)

        @property
        def result(self):
            return self.stream.result

    def speak(engine, text, *args, **kw):
        return AfterFirstPiece(_speak(engine, text, *args, **kw), text)

    inference.Engine.generate_frames = generate_frames
    inference.speak = speak
'''


class Server:
    def __init__(self, root, tiny_ckpt, *flags, key=None):
        self.root = root
        self.hooks = root / "hooks"
        site = root / "site"
        for d in (self.hooks, site):
            d.mkdir()
        (site / "sitecustomize.py").write_text(HOOK)
        # one thread per engine: three servers share the test machine's cores (spinning OpenMP threads of
        # several processes on a few cores slow each decode step many times over)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(ROOT)]), HIGGS_TEST_HOOKS=str(self.hooks),
                   OMP_NUM_THREADS="1")
        model_dir, tok_dir = tiny_ckpt
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "serve.py"), "--model_path", str(model_dir), "--tokenizer_path",
             str(tok_dir), "--port", "0", "--retries", "0", "--max_new_tokens", str(BUDGET), *flags],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        self.lines = []
        urls = queue.Queue()

        def read():
            for line in self.proc.stderr:
                self.lines.append(line)
                if "listening on http://" in line:
                    urls.put(line.split("listening on ")[1].split()[0])

        self.reader = threading.Thread(target=read, daemon=True)
        self.reader.start()
        self.key = key
        try:
            self.url = urls.get(timeout=60)
            self.http = self.client()
            # asked at once: the engines take seconds to load (the health test looks at these)
            self.early = (self.get("/health"), self.speech(input="Too early."))
            wait_until(lambda: self.get("/health").status_code == 200 or self.proc.poll() is not None, 180)
            assert self.proc.poll() is None, "".join(self.lines)
        except BaseException:  # a server that failed to come up must not outlive the test (nor its engines)
            self.stop()
            raise

    def client(self, **kw):
        return httpx.Client(base_url=self.url, timeout=60, headers=AUTH if self.key else {}, **kw)

    def get(self, path, **kw):
        return self.http.get(path, **kw)

    def speech(self, **body):
        return self.http.post("/v1/audio/speech", json=body)

    def metric(self, name, **labels) -> float:
        for family in text_string_to_metric_families(self.get("/metrics").text):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return s.value
        return 0.0

    def hold(self, name):
        """Keeps one engine busy until release(name): a request whose text holds the engine."""
        box = {}

        def post():
            with self.client() as client:
                box["r"] = client.post("/v1/audio/speech",
                                       json={"input": f"__hold_{name}__ hold.", "seed": 1, "max_new_tokens": 20})

        thread = threading.Thread(target=post)
        thread.start()
        wait_until(lambda: (self.hooks / f"{name}.started").exists())
        return thread, box

    def release(self, name):
        (self.hooks / f"{name}.release").touch()

    def log_lines(self, text):
        return [line for line in self.lines if text in line]

    def stop(self):
        for started in self.hooks.glob("*.started"):
            self.release(started.stem)
        self.proc.send_signal(2)  # SIGINT: a graceful stop
        try:
            return self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            if hasattr(self, "http"):  # not when stopped before it came up
                self.http.close()
            self.reader.join(timeout=10)  # it ends at the pipe's EOF
            self.proc.stderr.close()
            (self.root / "server.log").write_text("".join(self.lines))  # kept by pytest, for a failure's story


def wait_until(condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def samples(response) -> np.ndarray:
    """int16 samples of a wav / flac / pcm answer."""
    fmt = response.headers["content-type"]
    if fmt == "audio/pcm":
        return np.frombuffer(response.content, dtype="<i2")
    return sf.read(io.BytesIO(response.content), dtype="int16")[0]


def expected_samples(frames: int) -> int:
    return max(frames - 9, 0) * 960  # BOS frame + 7 delay frames + the closing column; 960 samples per frame


def error_of(response, status, param=None, code=None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in response.text and "\n" not in body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param
    if code is not None:
        assert body["error"]["code"] == code
    return body["error"]


def sse_events(text: str) -> list[dict]:
    return [json.loads(block[len("data: "):]) for block in text.split("\n\n") if block.startswith("data: ")]


def raw_post(server, body: dict) -> socket.socket:
    """A POST on a bare socket, so that a test can kill the client (RST) whenever it likes."""
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)))
    data = json.dumps(body).encode()
    auth = f"Authorization: Bearer {server.key}\r\n" if server.key else ""
    sock.sendall(f"POST /v1/audio/speech HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{auth}"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def kill(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
    sock.close()


@pytest.fixture(scope="module")
def voices_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("voices")
    t = np.arange(36000) / 24000
    sf.write(folder / "alice.wav", (0.3 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 3 * t)), 24000)
    (folder / "alice.txt").write_text("Hello, I am Alice.", encoding="utf-8")
    rng = np.random.default_rng(1)
    sf.write(folder / "bob.wav", 0.2 * rng.standard_normal(30000), 16000)  # resampled to 24 kHz at start-up
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_ckpt, voices_dir):
    s = Server(tmp_path_factory.mktemp("server"), tiny_ckpt, "--device", "cpu,cpu", "--max_batch_size", "8",
               "--voices_dir", str(voices_dir), "--api_key", KEY, "--chunk_words", str(CHUNK_WORDS), key=KEY)
    yield s
    assert s.stop() == 0, "".join(s.lines[-20:])


@pytest.fixture(scope="module")
def small(tmp_path_factory, tiny_ckpt):
    s = Server(tmp_path_factory.mktemp("small"), tiny_ckpt, "--device", "cpu", "--max_batch_size", "4",
               "--max_queue", "4")
    yield s
    assert s.stop() == 0, "".join(s.lines[-20:])


@pytest.fixture(scope="module")
def impatient(tmp_path_factory, tiny_ckpt):
    """Its own server: a timeout short enough to test would make the other servers' tests timed."""
    s = Server(tmp_path_factory.mktemp("impatient"), tiny_ckpt, "--device", "cpu", "--request_timeout", "1")
    yield s
    assert s.stop() == 0, "".join(s.lines[-20:])


# --------------------------------------------------------------------------- routes


def test_health_says_503_until_the_engines_are_loaded(server):
    health, speech = server.early
    assert health.status_code == 503 and health.json()["status"] == "loading"
    error_of(speech, 503, code="not_ready")
    assert server.get("/health").json()["status"] == "ok"


def test_health_is_open_everything_else_needs_the_key(server):
    health = httpx.get(server.url + "/health")
    assert health.status_code == 200
    assert [e["engine"] for e in health.json()["engines"]] == ["cpu#0", "cpu#1"]  # --device cpu,cpu: two engines
    with httpx.Client(base_url=server.url, timeout=30) as bare:
        for method, path in (("GET", "/v1/models"), ("GET", "/v1/audio/voices"), ("GET", "/metrics"),
                             ("POST", "/v1/audio/speech")):
            error_of(bare.request(method, path, json={"input": "Hi."}), 401, code="invalid_api_key")
            wrong = bare.request(method, path, json={"input": "Hi."}, headers={"Authorization": "Bearer nope"})
            error_of(wrong, 401, code="invalid_api_key")
    assert server.get("/v1/models").status_code == 200


def test_models_and_voices(server):
    model = server.get("/v1/models").json()["data"][0]
    assert model["id"] == "higgs-audio-v2" and model["sample_rate"] == 24000
    writable = {"mp3": sf.check_format("MP3", "MPEG_LAYER_III"), "opus": sf.check_format("OGG", "OPUS")}
    assert set(model["response_formats"]) == {"wav", "pcm", "flac"} | {f for f, ok in writable.items() if ok}
    voices = {v["name"]: v for v in server.get("/v1/audio/voices").json()["voices"]}
    assert list(voices) == ["default", "alice", "bob"] == model["voices"]
    assert voices["alice"]["transcript"] == "Hello, I am Alice." and voices["alice"]["duration_s"] == 1.5
    assert voices["bob"]["transcript"] is None and voices["bob"]["duration_s"] == pytest.approx(30000 / 16000, abs=1e-3)


def test_every_format_reads_back(server):
    formats = server.get("/v1/models").json()["data"][0]["response_formats"]
    with ThreadPoolExecutor(len(formats)) as pool:
        answers = dict(zip(formats, pool.map(
            lambda f: server.speech(input="Every format.", seed=5, response_format=f), formats)))
    wav = answers["wav"]
    assert wav.status_code == 200 and wav.headers["content-type"] == "audio/wav"
    info = sf.info(io.BytesIO(wav.content))
    assert (info.samplerate, info.channels, info.subtype) == (24000, 1, "PCM_16")
    reference = samples(wav)
    assert reference.size == expected_samples(int(wav.headers["x-higgs-frames"])) > 0
    for fmt in ("flac", "pcm"):  # lossless: the very same samples
        assert np.array_equal(samples(answers[fmt]), reference), fmt
    for fmt in set(formats) - {"wav", "flac", "pcm"}:  # lossy: readable, 24 kHz, about as long
        audio, rate = sf.read(io.BytesIO(answers[fmt].content))
        assert rate == 24000 and abs(audio.shape[0] - reference.size) < 0.1 * 24000, fmt


def test_seed_decides_the_audio(server):
    first = server.speech(input="Seeds.")
    seed = int(first.headers["x-higgs-seed"])  # none asked: a random one, said in the answer
    again = server.speech(input="Seeds.", seed=seed)
    other = server.speech(input="Seeds.", seed=seed + 1)
    assert first.content == again.content
    assert first.content != other.content


def test_sse_and_audio_streams_carry_the_same_audio(server):
    request = dict(input="Streaming.", seed=9)
    sse = server.speech(**request, stream_format="sse")
    assert sse.headers["content-type"].startswith("text/event-stream")
    events = sse_events(sse.text)
    types = [e["type"] for e in events]
    assert types[-1] == "speech.audio.done" and set(types[:-1]) == {"speech.audio.delta"} and len(types) > 1
    pcm = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    done = events[-1]
    assert len(pcm) == 2 * done["samples"] > 0 and done["seed"] == 9 and done["chunks"] == 1
    assert done["usage"]["output_tokens"] == done["frames"] > 0 and done["usage"]["input_tokens"] > 0
    with server.http.stream("POST", "/v1/audio/speech", json=dict(request, stream_format="audio",
                                                                  response_format="pcm")) as streamed:
        assert streamed.headers["content-type"] == "audio/pcm"
        assert b"".join(streamed.iter_bytes()) == pcm
    wav = server.speech(**request, stream_format="audio")  # a streamed WAV: sizes unknown in its header
    assert samples(wav).tobytes() == pcm
    # flac needs the whole signal: decoded as a whole answer, encoded, then sent in pieces
    flac = server.speech(**request, stream_format="audio", response_format="flac")
    assert flac.headers["content-type"] == "audio/flac" and "x-higgs-frames" not in flac.headers
    assert np.array_equal(samples(flac), samples(server.speech(**request, response_format="flac")))


def test_long_input_is_spoken_chunk_by_chunk(server):
    import inference

    chunks = len(inference.split_text(LONG, CHUNK_WORDS))
    assert chunks > 1
    whole = server.speech(input=LONG, seed=3, max_new_tokens=24, response_format="pcm")
    assert whole.status_code == 200 and whole.headers["x-higgs-chunks"] == str(chunks)
    events = sse_events(server.speech(input=LONG, seed=3, max_new_tokens=24, stream_format="sse").text)
    assert events[-1]["type"] == "speech.audio.done" and events[-1]["chunks"] == chunks
    streamed = np.frombuffer(b"".join(base64.b64decode(e["audio"]) for e in events[:-1]), dtype="<i2")
    at_once = samples(whole)
    # the same codes, decoded piece by piece or at once: equal up to float rounding
    assert streamed.size == at_once.size == events[-1]["samples"] > 0
    assert np.abs(streamed.astype(int) - at_once).max() <= 2


@pytest.mark.parametrize("voice,stream", [("default", False), ("alice", False), ("default", True)])
def test_same_audio_as_the_cli(server, tiny_ckpt, voices_dir, tmp_path, voice, stream):
    """A whole answer is inference.py's WAV, byte for byte; a streamed one is inference.py --stream's."""
    import inference

    model_dir, tok_dir = tiny_ckpt
    ref = ["--ref_audio", str(voices_dir / "alice.wav"), "--ref_text", "Hello, I am Alice."] if voice == "alice" else []
    assert inference.main(["--model_path", str(model_dir), "--tokenizer_path", str(tok_dir), "--device", "cpu",
                           "--text", "Like the CLI.", "--seed", "8", "--retries", "0", "--max_new_tokens", str(BUDGET),
                           "--output_dir", str(tmp_path), *ref, *(["--stream"] if stream else [])]) in (0, 1)
    cli = (tmp_path / "output_8.wav").read_bytes()  # exit 1: unusable, but written
    if not stream:
        assert server.speech(input="Like the CLI.", seed=8, voice=voice).content == cli
    else:
        answer = server.speech(input="Like the CLI.", seed=8, voice=voice, stream_format="audio")
        assert samples(answer).tobytes() == sf.read(io.BytesIO(cli), dtype="int16")[0].tobytes()


def test_voices_are_names_that_change_the_audio(server):
    default = server.speech(input="Voices.", seed=3)
    alice = server.speech(input="Voices.", seed=3, voice="alice")
    bob = server.speech(input="Voices.", seed=3, voice="bob")
    assert alice.status_code == bob.status_code == 200
    assert len({default.content, alice.content, bob.content}) == 3
    for name in ("carol", "../voices/alice", "alice.wav", "/etc/passwd"):
        error_of(server.speech(input="Voices.", voice=name), 400, param="voice")


@pytest.mark.parametrize("body,status,param", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (b"", 400, None),
    ({"voice": "alice"}, 400, "input"),
    ({"input": "   "}, 400, "input"),
    ({"input": "x" * 4097}, 400, "input"),
    ({"input": "Hi.", "speed": 1.5}, 400, "speed"),
    ({"input": "Hi.", "temprature": 0.5}, 400, "temprature"),
    ({"input": "Hi.", "top_k": "5"}, 400, "top_k"),
    ({"input": "Hi.", "top_k": -1}, 400, "top_k"),
    ({"input": "Hi.", "top_p": 0}, 400, "top_p"),
    ({"input": "Hi.", "temperature": -1}, 400, "temperature"),
    ({"input": "Hi.", "max_new_tokens": 5}, 400, "max_new_tokens"),
    ({"input": "Hi.", "max_new_tokens": BUDGET + 1}, 400, "max_new_tokens"),
    ({"input": "Hi.", "seed": 2**64}, 400, "seed"),
    ({"input": "Hi.", "seed": 1.5}, 400, "seed"),
    ({"input": "Hi.", "response_format": "aac"}, 400, "response_format"),
    ({"input": "Hi.", "stream_format": "sse", "response_format": "wav"}, 400, "response_format"),
    ({"input": "Hi.", "stream_format": "video"}, 400, "stream_format"),
    ({"input": "Hi.", "model": "gpt-5"}, 404, "model"),
])
def test_bad_requests_get_openai_errors(server, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    answer = server.http.post("/v1/audio/speech", content=content, headers={"Content-Type": "application/json"})
    error = error_of(answer, status, param=param)
    assert error["type"] == "invalid_request_error" and error["message"]


def test_unknown_route_and_method_get_openai_errors(server):
    error_of(server.get("/v1/nope"), 404, code="not_found")
    error_of(server.get("/v1/audio/speech"), 405, code="method_not_allowed")


def test_openai_model_names_are_accepted(server):
    assert server.speech(input="Alias.", model="tts-1", seed=1, max_new_tokens=12).status_code == 200


def test_special_token_text_is_spoken_not_obeyed(server):
    # a control token would add 1 prompt token (2 with its space); as text it is several byte-level pieces
    def prompt_tokens(text, **extra):
        answer = server.speech(input=text, seed=2, stream_format="sse", max_new_tokens=12, **extra)
        assert answer.status_code == 200, answer.text
        return sse_events(answer.text)[-1]["usage"]["input_tokens"]

    assert prompt_tokens("Hi <|eot_id|>") > prompt_tokens("Hi") + 2
    # the reference voice goes where the template's audio token is; one typed by the user is plain text
    assert prompt_tokens("Hi <|AUDIO_OUT|>", voice="alice") > prompt_tokens("Hi", voice="alice") + 2


def test_engine_error_is_one_line_500_and_the_server_goes_on(server):
    error = error_of(server.speech(input="__boom__ now.", seed=1), 500, code="engine_error")
    assert error["type"] == "server_error"
    assert error["message"] == "engine error: RuntimeError: injected engine failure"
    assert server.speech(input="Still here.", seed=1).status_code == 200
    assert any("RuntimeError: injected engine failure" in line for line in server.lines)  # the log has it


def test_one_log_line_per_request(server):
    answer = server.speech(input="Log me.", seed=4)
    rid = answer.headers["x-request-id"]
    wait_until(lambda: server.log_lines(rid))
    [line] = server.log_lines(rid)
    for part in ("status=200", "chars=7", f"frames={answer.headers['x-higgs-frames']}", "ttfa_ms=", "total_ms="):
        assert part in line


# --------------------------------------------------------------------------- load


def test_32_concurrent_clients_all_get_their_audio(server):
    before_ok = server.metric("higgs_requests_total", status="200")
    before_batches = server.metric("higgs_batch_size_count") - server.metric("higgs_batch_size_bucket", le="1.0")
    budget = 40

    async def run():
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=120, limits=limits) as client:
            async def one_client(i):
                answers = []
                for k in range(2):
                    r = await client.post("/v1/audio/speech", json={
                        "input": f"Client {i}, request {k}.", "seed": 100 * i + k, "max_new_tokens": budget})
                    answers.append(r)
                return answers

            return [r for rs in await asyncio.gather(*(one_client(i) for i in range(32))) for r in rs]

    answers = asyncio.run(run())
    assert len(answers) == 64 and [r.status_code for r in answers] == [200] * 64
    for r in answers:
        frames = int(r.headers["x-higgs-frames"])
        assert frames <= budget and samples(r).size == expected_samples(frames)
        assert sf.info(io.BytesIO(r.content)).samplerate == 24000
    assert {r.headers["x-higgs-engine"] for r in answers} == {"cpu#0", "cpu#1"}  # spread over both engines
    assert server.metric("higgs_requests_total", status="200") - before_ok == 64
    after_batches = server.metric("higgs_batch_size_count") - server.metric("higgs_batch_size_bucket", le="1.0")
    assert after_batches > before_batches  # some batches held more than one request
    assert max(int(r.headers["x-higgs-batch-size"]) for r in answers) > 1


def test_client_killed_mid_stream_leaves_the_server_serving(server):
    sock = raw_post(server, {"input": "Kill me while I stream.", "seed": 6, "stream_format": "audio",
                             "response_format": "pcm"})
    received = b""
    while b"\r\n\r\n" not in received:  # the status line and headers: the stream has begun
        received += sock.recv(4096)
    assert received.startswith(b"HTTP/1.1 200")
    kill(sock)
    wait_until(lambda: server.metric("higgs_requests_in_flight") == 0)
    assert server.get("/health").status_code == 200
    assert server.speech(input="After the kill.", seed=6).status_code == 200


def test_client_gone_mid_stream_stops_its_decode(server):
    sock = raw_post(server, {"input": "__drip_cut__ " + LONG, "seed": 6, "stream_format": "audio",
                             "response_format": "pcm"})
    received = b""
    while b"\r\n\r\n" not in received:  # the headers go out with the first audio
        received += sock.recv(4096)
    rid = next(line.split(b":")[1].strip().decode() for line in received.split(b"\r\n")
               if line.lower().startswith(b"x-request-id:"))
    wait_until(lambda: (server.hooks / "cut.started").exists())  # the engine waits after its first piece
    kill(sock)
    wait_until(lambda: any("status=499" in line for line in server.log_lines(rid)))
    server.release("cut")
    wait_until(lambda: server.log_lines(f"request {rid} cancelled"))  # it stopped at its next piece
    assert server.speech(input="After the cut.", seed=6).status_code == 200


def test_engine_error_mid_stream_ends_the_sse_with_an_error_event(server):
    answer = server.speech(input="__sever__ " + LONG, seed=2, stream_format="sse")
    assert answer.status_code == 200  # the status line went out with the first audio
    events = sse_events(answer.text)
    assert [e["type"] for e in events] == ["speech.audio.delta"] * (len(events) - 1) + ["error"]
    assert events[-1]["error"]["message"] == "engine error: RuntimeError: injected failure mid-stream"
    assert server.speech(input="Still serving.", seed=2).status_code == 200


# --------------------------------------------------------------------------- batching and limits (one engine)


def test_alone_or_in_a_full_batch_the_same_samples(small):
    mates = [{"input": "Batch mates must not matter.", "seed": 42},
             {"input": "Another text, longer than the first one by far.", "seed": 7},
             {"input": "短い。", "seed": 42}, {"input": "Third mate.", "seed": 43}]
    alone = [small.speech(**m) for m in mates]
    assert [a.headers["x-higgs-batch-size"] for a in alone] == ["1"] * 4
    holder = small.hold("batch")
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(small.speech, **m) for m in mates]
        wait_until(lambda: small.metric("higgs_queue_depth") == 4)
        small.release("batch")
        together = [f.result() for f in futures]
    holder[0].join()
    assert [a.headers["x-higgs-batch-size"] for a in together] == ["4"] * 4  # one full batch
    for a, b in zip(alone, together):
        assert a.headers["x-higgs-frames"] == b.headers["x-higgs-frames"]
        assert np.array_equal(samples(a), samples(b))
    assert len({a.content for a in alone}) == 4  # four different answers: a mix-up would show


def test_full_queue_answers_429(small):
    holder = small.hold("queue")
    with ThreadPoolExecutor(4) as pool:
        queued = [pool.submit(small.speech, input=f"Queued {i}.", seed=i) for i in range(4)]
        wait_until(lambda: small.metric("higgs_queue_depth") == 4)
        for _ in range(2):
            over = small.speech(input="One too many.", seed=1)
            error_of(over, 429, code="queue_full")
            assert int(over.headers["retry-after"]) >= 1
        small.release("queue")
        assert [f.result().status_code for f in queued] == [200] * 4
    holder[0].join()
    assert small.metric("higgs_requests_total", status="429") == 2


def test_request_past_its_timeout_answers_504(impatient):
    holder = impatient.hold("timeout")
    late = impatient.speech(input="Too late.", seed=1)  # waits behind the held engine for --request_timeout 1
    error_of(late, 504, code="timeout")
    assert impatient.metric("higgs_queue_depth") == 0  # it gave up its place
    impatient.release("timeout")
    holder[0].join()
    error_of(holder[1]["r"], 504, code="timeout")  # the held one ran out of time too
    wait_until(lambda: impatient.metric("higgs_requests_in_flight") == 0)
    assert impatient.get("/health").status_code == 200


def test_client_that_leaves_the_queue_frees_its_place(small):
    holder = small.hold("leave")
    sock = raw_post(small, {"input": "I will not wait.", "seed": 1})
    wait_until(lambda: small.metric("higgs_queue_depth") == 1)
    kill(sock)
    wait_until(lambda: small.metric("higgs_queue_depth") == 0)
    wait_until(lambda: small.log_lines("status=499"))
    small.release("leave")
    holder[0].join()
    nxt = small.speech(input="Next.", seed=1)
    assert nxt.status_code == 200, nxt.text


def test_an_engine_is_busy_until_its_batch_is_done():
    """In-process, no engine: a row's "done" comes before its batch's "batch_done", and a request that
    arrives in between must wait for the next batch, not join the finished one's bookkeeping."""
    opts = serve.build_parser().parse_args([])
    batches = []
    scheduler = serve.Scheduler(opts, ["cpu"], {}, serve.Metrics(opts.max_batch_size), on_fatal=None)
    scheduler.engines = [serve.EngineProc(0, "cpu", None, SimpleNamespace(put=batches.append), None, state="ready")]

    def job(name):
        spec = serve.RequestSpec(inference.SpeechRequest(text=name, seed=0), voice=None,
                                 params=inference.SamplingParams(), format="wav", speak=False, stream=False)
        return serve.Job(name, spec, key=("same",), deadline=float("inf"))

    async def run():
        first, second = job("first"), job("second")
        scheduler.submit(first)
        scheduler._on_message((0, "audio", "first", np.zeros(960, dtype=np.float32)))
        scheduler._on_message((0, "done", "first", serve.Done(frames=10, samples=960, seed=0, outcome="ok", attempts=1,
                                                              chunks=1, prompt_tokens=5, batch_size=1)))
        scheduler.submit(second)
        assert [[j.id for j in b] for b in batches] == [["first"]]  # the engine has not said it is free
        scheduler._on_message((0, "batch_done", serve.BatchStats(frames=10, decode_steps=9, decode_s=0.1, seconds=0.2)))
        assert [[j.id for j in b] for b in batches] == [["first"], ["second"]]
        assert [first.events.get_nowait()[0] for _ in range(2)] == ["audio", "done"]
        assert second.events.empty()  # no "batch ended without this row" for a row of the next batch

    asyncio.run(run())


# --------------------------------------------------------------------------- start-up errors


def broken_voices(tmp_path, name, data=None):
    folder = tmp_path / "voices"
    folder.mkdir()
    if data is None:
        sf.write(folder / name, np.zeros(24000), 24000)
    else:
        (folder / name).write_bytes(data)
    return str(folder)


@pytest.mark.parametrize("flags,expected", [
    (["--device", "tpu"], "--device tpu"),
    (["--max_batch_size", "0"], "--max_batch_size"),
    (["--voices_dir", "/nonexistent/voices"], "--voices_dir"),
    ("default.wav", "the model's own voice"),
    ("bad name.wav", "a voice name takes"),
    (("broken.wav", b"not audio"), "cannot read audio"),
    ("port", "cannot listen"),
])
def test_startup_mistakes_are_one_line(tiny_ckpt, tmp_path, capsys, flags, expected):
    taken = None
    if flags == "port":
        taken = socket.create_server(("127.0.0.1", 0))
        flags = ["--port", str(taken.getsockname()[1])]
    elif isinstance(flags, str):
        flags = ["--voices_dir", broken_voices(tmp_path, flags)]
    elif isinstance(flags, tuple):
        flags = ["--voices_dir", broken_voices(tmp_path, *flags)]
    model_dir, tok_dir = tiny_ckpt
    try:
        code = serve.main(["--model_path", str(model_dir), "--tokenizer_path", str(tok_dir), "--device", "cpu",
                           *flags])
    finally:
        if taken is not None:
            taken.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err


def test_engine_that_cannot_start_stops_the_server(tiny_ckpt, tmp_path):
    """A voice too short to encode is found by the engine process: the server says so and exits 2."""
    folder = tmp_path / "voices"
    folder.mkdir()
    sf.write(folder / "tiny.wav", np.zeros(100), 24000)
    model_dir, tok_dir = tiny_ckpt
    done = subprocess.run([sys.executable, str(ROOT / "serve.py"), "--model_path", str(model_dir), "--tokenizer_path",
                           str(tok_dir), "--device", "cpu", "--port", "0", "--voices_dir", str(folder)],
                          capture_output=True, text=True, timeout=180)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode == 2 and len(errors) == 1 and "voice 'tiny'" in errors[0], done.stderr
    assert "Traceback" not in done.stderr
