#!/usr/bin/env python3
"""Benchmark serve.py: one request at a time vs the batching server vs streaming, at 1, 4 and 8 clients.

    python3 bench_serve.py                                   # tiny checkpoints on the CPU (built in a temp dir)
    python3 bench_serve.py --model_path ./model_cache --tokenizer_path ./tokenizer_cache --device npu:0

Starts serve.py twice on the same device (two copies of the model on it): with --max_batch_size 1 and
with --max_batch_size 8. Every level sends the same requests (same texts and seeds, so the same audio)
from N concurrent clients, in three modes one after the other:

- one at a time: whole answers from the --max_batch_size 1 server (each request decoded alone, in order);
- batching: whole answers from the --max_batch_size 8 server;
- streaming: stream_format audio (raw PCM as it is generated) from the batching server; a streamed
  request is decoded alone, chunk by chunk (inference.speak), so it never shares a batch.

It prints requests/s, p50/p95 latency and p50/p95 time to first audio (the first body byte; for a whole
answer that is when all of it is ready). Not a test: it only measures (docs/serve.md has a table).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent
MODES = (("one at a time", 1, False), ("batching", 8, False), ("streaming", 8, True))  # name, batch, stream
TEXTS = [
    "The sun rises in the east and sets in the west.",
    "Hello world, this is a test of the speech server.",
    "清晨的宁静中，鸟儿开始歌唱。",
    "It was the night before my birthday.",
]


def start_server(args, batch: int):
    cmd = [sys.executable, str(ROOT / "serve.py"), "--model_path", str(args.model_path), "--tokenizer_path",
           str(args.tokenizer_path), "--device", args.device, "--port", "0", "--max_batch_size", str(batch),
           "--max_new_tokens", str(args.max_new_tokens), "--retries", "0", "--max_queue", "1000"]
    env = dict(os.environ)
    if args.device.startswith("cpu") and "OMP_NUM_THREADS" not in env:
        # the two servers share the cores; more OpenMP threads than cores makes every decode step crawl
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // 2))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    urls = queue.Queue()

    def read():
        for line in proc.stderr:
            if "listening on http://" in line:
                urls.put(line.split("listening on ")[1].split()[0])
            elif line.startswith("error:") or "Traceback" in line:
                print(line, end="", file=sys.stderr)

    threading.Thread(target=read, daemon=True).start()
    url = urls.get(timeout=120)
    import httpx

    deadline = time.monotonic() + 600
    while httpx.get(url + "/health").status_code != 200:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"error: serve.py did not start (exit {proc.poll()})")
        time.sleep(0.2)
    return proc, url


@dataclass
class LevelResult:
    """One mode at one concurrency level."""

    rps: float  # requests per second
    latency: list[float]  # seconds, one per request
    ttfa: list[float]  # time to first audio, seconds, one per request


async def run_level(url: str, clients: int, requests: int, max_new_tokens: int, stream: bool) -> LevelResult:
    """`requests` requests from `clients` concurrent clients -> req/s, latency and TTFA lists."""
    import httpx

    jobs = list(range(requests))
    latency, ttfa = [], []

    async def client(http):
        while jobs:
            i = jobs.pop(0)
            body = {"input": TEXTS[i % len(TEXTS)], "seed": i, "max_new_tokens": max_new_tokens,
                    "response_format": "pcm"}
            if stream:
                body["stream_format"] = "audio"
            t0 = time.perf_counter()
            first = None
            async with http.stream("POST", "/v1/audio/speech", json=body) as r:
                if r.status_code != 200:
                    raise SystemExit(f"error: request {i}: HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                async for chunk in r.aiter_bytes():
                    if first is None and chunk:
                        first = time.perf_counter() - t0
            latency.append(time.perf_counter() - t0)
            ttfa.append(first if first is not None else latency[-1])

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        # first calls pay one-off costs (allocations, graph capture on NPU/CUDA): not part of the numbers
        await http.post("/v1/audio/speech", json={"input": TEXTS[0], "seed": 0, "max_new_tokens": max_new_tokens,
                                                  **({"stream_format": "audio", "response_format": "pcm"}
                                                     if stream else {})})
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - t0
    return LevelResult(requests / wall, latency, ttfa)


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default=None, help="default: tiny checkpoints built in a temp dir")
    p.add_argument("--tokenizer_path", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--clients", default="1,4,8", help="concurrency levels")
    p.add_argument("--requests", type=int, default=16, help="requests per level and mode")
    p.add_argument("--max_new_tokens", type=int, default=64, help="audio frames per request at most")
    args = p.parse_args()
    levels = [int(c) for c in args.clients.split(",")]

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        if args.model_path is None:
            sys.path.insert(0, str(ROOT))
            import tiny_checkpoints

            args.model_path, args.tokenizer_path = tiny_checkpoints.build_tiny_checkpoints(tmp)
        servers = {batch: start_server(args, batch) for batch in sorted({b for _, b, _ in MODES})}
        results = {}
        try:
            for c in levels:  # the modes alternate, so a busy machine slows them alike
                for name, batch, stream in MODES:
                    results[name, c] = r = asyncio.run(run_level(servers[batch][1], c, args.requests,
                                                                 args.max_new_tokens, stream))
                    print(f"  {name:>13}, {c} clients: {r.rps:.2f} req/s", file=sys.stderr)
        finally:
            for proc, _ in servers.values():
                proc.send_signal(2)
                proc.wait(timeout=60)

    print(f"\n{args.requests} requests per level and mode, max_new_tokens {args.max_new_tokens}, device "
          f"{args.device}, {os.cpu_count()} CPU cores; latency and time to first audio (TTFA) in seconds\n")
    print("| clients | mode | req/s | latency p50 | latency p95 | TTFA p50 | TTFA p95 |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for c in levels:
        for name, _, _ in MODES:
            r = results[name, c]
            print(f"| {c} | {name} | {r.rps:.2f} | {pct(r.latency, 50):.2f} | {pct(r.latency, 95):.2f} "
                  f"| {pct(r.ttfa, 50):.2f} | {pct(r.ttfa, 95):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
