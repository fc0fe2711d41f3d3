"""download.sh against a local hub on 127.0.0.1 (tests/local_hub.py) serving the tiny checkpoints.

The real hub cannot be reached from the test machines; `hf download` (huggingface_hub's CLI)
is pointed at the local hub with HF_ENDPOINT, exactly as a user points it at a mirror.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from local_hub import LocalHub  # noqa: E402

import inference  # noqa: E402

DOWNLOAD = ROOT / "download.sh"
MODEL_REPO = "bosonai/higgs-audio-v2-generation-3B-base"
TOKENIZER_REPO = "bosonai/higgs-audio-v2-tokenizer"
PINNED_MODEL = "10840182ca4ad5d9d9113b60b9bb3c1ef1ba3f84"
PINNED_TOKENIZER = "9d4988fbd4ad07b4cac3a5fa462741a41810dbec"

pytestmark = pytest.mark.skipif(shutil.which("hf") is None, reason="the hf CLI (huggingface_hub) is not installed")


@pytest.fixture
def hub(tiny_ckpt):
    model_dir, tokenizer_dir = tiny_ckpt
    hub = LocalHub()
    hub.add_repo(MODEL_REPO, model_dir)
    hub.add_repo(TOKENIZER_REPO, tokenizer_dir)
    hub.start()
    yield hub
    hub.stop()


def run_download(cwd: Path, hub_url: str, *args: str, env: dict | None = None, timeout: float = 120):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HIGGS_", "HUGGINGFACE_"))}
    full_env.update(
        HF_ENDPOINT=hub_url,
        HF_HOME=str(cwd / "hf_home"),
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_UPDATE_CHECK="1",
        HF_HUB_DISABLE_TELEMETRY="1",
    )
    full_env.update(env or {})
    return subprocess.run(["bash", str(DOWNLOAD), *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def error_line(proc) -> str:
    """The script's one-line reason: the last stderr line, which must start with 'error:'."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines, f"no error message; stdout:\n{proc.stdout}"
    assert lines[-1].startswith("error: "), proc.stderr
    return lines[-1]


def assert_same_files(src: Path, dst: Path) -> None:
    names = sorted(p.name for p in src.iterdir() if p.is_file())
    assert names == sorted(p.name for p in dst.iterdir() if p.is_file())
    for name in names:
        assert (src / name).read_bytes() == (dst / name).read_bytes(), name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- full download


@pytest.fixture(scope="module")
def downloaded(tiny_ckpt, tmp_path_factory):
    """One full download shared by the read-only tests below: (work dir, hub, first run)."""
    model_dir, tokenizer_dir = tiny_ckpt
    hub = LocalHub()
    hub.add_repo(MODEL_REPO, model_dir)
    hub.add_repo(TOKENIZER_REPO, tokenizer_dir)
    hub.start()
    work = tmp_path_factory.mktemp("download")
    proc = run_download(work, hub.url)
    yield work, hub, proc
    hub.stop()


def test_full_download_is_byte_identical_and_loads(downloaded, tiny_ckpt):
    work, hub, proc = downloaded
    assert proc.returncode == 0, proc.stdout + proc.stderr
    model_dir, tokenizer_dir = work / "model_cache", work / "tokenizer_cache"
    assert_same_files(tiny_ckpt[0], model_dir)
    assert_same_files(tiny_ckpt[1], tokenizer_dir)
    assert "sizes match the hub" in proc.stdout
    assert proc.stdout.rstrip().splitlines()[-1].strip() == 'python3 inference.py --text "Hello there."'
    # every file fetched once (no double downloads), through /resolve
    gets = [r.path for r in hub.resolve_requests("GET")]
    assert len(gets) == len(set(gets)) == 10 + 3
    engine = inference.load_engine(model_dir, tokenizer_dir, device="cpu", dtype="float32")
    assert engine.config.num_codebooks == 8
    codes = engine.encode_audio(np.zeros(24000, dtype="float32"))  # 1 s of silence -> 25 frames
    assert tuple(codes.shape) == (8, 25)
    assert len(engine.build_prompt("Hello there.").input_ids) > 10


def test_rerun_on_complete_folders_downloads_nothing(downloaded):
    work, hub, first = downloaded
    assert first.returncode == 0
    before = len(hub.requests)
    proc = run_download(work, hub.url)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    new = hub.requests[before:]
    assert [r.path for r in new if "/resolve/" in r.path] == []
    assert all(r.path.startswith("/api/models/") for r in new), [r.path for r in new]
    assert proc.stdout.count("already complete") == 2


def test_complete_folder_is_verified_not_trusted(downloaded, tmp_path):
    """A shard truncated after a good download is noticed and fetched again (and only that one)."""
    work, hub, first = downloaded
    assert first.returncode == 0
    for name in ("model_cache", "tokenizer_cache"):
        shutil.copytree(work / name, tmp_path / name)
    shard = tmp_path / "model_cache" / "model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])
    before = len(hub.requests)
    proc = run_download(tmp_path, hub.url)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    gets = {r.path.rsplit("/", 1)[-1] for r in hub.requests[before:] if "/resolve/" in r.path and r.method == "GET"}
    # the shard, plus the gate files that are always written last (config.json, the index)
    assert gets == {"model-00002-of-00003.safetensors", "config.json", "model.safetensors.index.json"}
    assert shard.read_bytes() == (work / "model_cache" / shard.name).read_bytes()
    assert "already complete" in proc.stdout  # the tokenizer
    inference.check_model_dir(tmp_path / "model_cache")


# --------------------------------------------------------------------------- interruption


def test_interrupted_download_is_refused_then_resumes(hub, tmp_path, tiny_ckpt):
    """Connection dropped mid-shard: exit != 0, inference.py refuses the folder, the re-run
    fetches only what is missing."""
    shard = "model-00002-of-00003.safetensors"
    total = sum(p.stat().st_size for p in tiny_ckpt[0].iterdir())
    hub.cut[shard] = 300_000  # send 300 kB, drop the connection, refuse the client's retries
    args = ("--model_dir", "m", "--only", "model")
    proc = run_download(tmp_path, hub.url, *args)
    assert proc.returncode != 0
    line = error_line(proc)
    assert "interrupted" in line and "re-run bash download.sh" in line, line
    model_dir = tmp_path / "m"
    with pytest.raises(inference.UserError):
        inference.check_model_dir(model_dir)
    assert not (model_dir / "config.json").exists() and not (model_dir / "model.safetensors.index.json").exists()
    assert not (model_dir / shard).exists()
    assert (model_dir / "model-00001-of-00003.safetensors").exists()

    hub.cut.clear()
    before = len(hub.requests)
    proc = run_download(tmp_path, hub.url, *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    second = [r for r in hub.requests[before:] if "/resolve/" in r.path and r.method == "GET"]
    got = {r.path.rsplit("/", 1)[-1] for r in second}
    assert shard in got
    assert "model-00001-of-00003.safetensors" not in got and "model-00003-of-00003.safetensors" not in got
    model_bytes_second = sum(r.sent for r in second if f"/{MODEL_REPO}/" in r.path)
    assert model_bytes_second < total / 2, (model_bytes_second, total)
    assert_same_files(tiny_ckpt[0], model_dir)
    inference.check_model_dir(model_dir)
    assert proc.stdout.rstrip().splitlines()[-1].strip() == 'python3 inference.py --text "Hello there." --model_path m'


def test_dropped_connection_resumes_with_range(hub, tmp_path):
    """Within a run, huggingface_hub resumes a dropped transfer with a Range request
    (it writes 10 MiB chunks, so the file must be bigger than that). Private repo + HF_TOKEN."""
    repo = tmp_path / "repo"
    repo.mkdir()
    data = os.urandom(21 * 2**20)
    (repo / "big.safetensors").write_bytes(data)
    (repo / "config.json").write_text("{}")
    hub.add_repo("acme/big", repo)
    hub.tokens["acme/big"] = "hf_right"  # private: HF_TOKEN must reach every request
    hub.cut["big.safetensors"] = 15 * 2**20
    hub.refuse_after_cut = False
    proc = run_download(tmp_path, hub.url, "--only", "model", "--model-repo", "acme/big", "--model-dir", "big",
                        env={"HF_TOKEN": "hf_right"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    gets = [r for r in hub.resolve_requests("GET") if r.path.endswith("big.safetensors")]
    assert [r.range for r in gets] == [None, f"bytes={10 * 2**20}-"]
    assert gets[1].sent == len(data) - 10 * 2**20
    assert (tmp_path / "big" / "big.safetensors").read_bytes() == data


# --------------------------------------------------------------------------- one-line failures


def test_repo_not_found_404(hub, tmp_path):
    proc = run_download(tmp_path, hub.url, "--model-repo", "bosonai/no-such-model", env={"HF_TOKEN": "hf_x"})
    assert proc.returncode != 0
    line = error_line(proc)
    assert "bosonai/no-such-model" in line and "not found" in line and "404" in line, line
    assert not (tmp_path / "model_cache").exists()


def test_revision_not_found_404(hub, tmp_path):
    proc = run_download(tmp_path, hub.url, "--tokenizer-revision", "v9.9", "--only", "tokenizer", "--tokenizer-dir=t")
    assert proc.returncode != 0
    line = error_line(proc)
    assert "revision 'v9.9' not found" in line and "404" in line, line
    assert f"==> tokenizer: {TOKENIZER_REPO}@v9.9 -> t" in proc.stdout
    assert not (tmp_path / "t").exists()
    assert hub.resolve_requests() == []


def test_private_repo_without_token_401(hub, tmp_path):
    hub.tokens[MODEL_REPO] = "hf_right"
    proc = run_download(tmp_path, hub.url)
    assert proc.returncode != 0
    line = error_line(proc)
    assert "401" in line and "HF_TOKEN" in line, line


def test_wrong_token_401(hub, tmp_path):
    hub.tokens[MODEL_REPO] = "hf_right"
    proc = run_download(tmp_path, hub.url, "--only", "model", env={"HF_TOKEN": "hf_wrong"})
    assert proc.returncode != 0
    line = error_line(proc)
    assert "401" in line and "token" in line, line
    assert hub.resolve_requests() == []


def test_gated_repo_403(hub, tmp_path):
    hub.gated.add(TOKENIZER_REPO)
    proc = run_download(tmp_path, hub.url, "--only", "tokenizer", env={"HF_TOKEN": "hf_someone"})
    assert proc.returncode != 0
    line = error_line(proc)
    assert f"{TOKENIZER_REPO} is gated (HTTP 403)" in line and "HF_TOKEN" in line, line


def test_unreachable_endpoint(tmp_path):
    proc = run_download(tmp_path, f"http://127.0.0.1:{free_port()}", timeout=60)
    assert proc.returncode != 0
    line = error_line(proc)
    assert "cannot reach http://127.0.0.1:" in line and "hf-mirror.com" in line, line


def test_not_enough_disk_space(hub, tmp_path):
    """A real 20 MB file system: the checkpoints plus the script's 100 MB margin do not fit."""
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(small)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        proc = run_download(small, hub.url)
    finally:
        subprocess.run(["umount", str(small)], check=False)
    assert proc.returncode != 0
    line = error_line(proc)
    assert "not enough disk space" in line and "MB free" in line, line
    assert hub.resolve_requests() == []


def test_disk_full_during_download(hub, tmp_path):
    """hf failing with ENOSPC (a stand-in `hf` first on PATH prints what huggingface_hub raises)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "hf").write_text("#!/bin/sh\necho \"OSError: [Errno 28] No space left on device\" >&2\nexit 1\n")
    (fake / "hf").chmod(0o755)
    env = {"PATH": f"{fake}{os.pathsep}{os.environ['PATH']}"}
    proc = run_download(tmp_path, hub.url, "--only", "tokenizer", env=env)
    assert proc.returncode != 0
    assert error_line(proc) == (f"error: disk full while downloading {TOKENIZER_REPO}: "
                                "free some space and re-run bash download.sh")
    with pytest.raises(inference.UserError):
        inference.check_tokenizer_dir(tmp_path / "tokenizer_cache")


def test_new_commit_on_main_is_fetched(downloaded, tiny_ckpt, tmp_path):
    """Same sizes but main moved on: not 'complete'; hf compares ETags and fetches only what changed."""
    work, _, first = downloaded
    assert first.returncode == 0
    shutil.copytree(work / "tokenizer_cache", tmp_path / "tokenizer_cache")
    changed = tmp_path / "new_tok"
    shutil.copytree(tiny_ckpt[1], changed)
    cfg = json.loads((changed / "preprocessor_config.json").read_text())
    cfg["padding_value"] = 1.0  # 0.0 -> 1.0: same size, new content, new commit
    (changed / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    assert (changed / "preprocessor_config.json").stat().st_size == (
        tiny_ckpt[1] / "preprocessor_config.json").stat().st_size
    hub = LocalHub()
    hub.add_repo(TOKENIZER_REPO, changed)
    hub.start()
    try:
        proc = run_download(tmp_path, hub.url, "--only", "tokenizer")
    finally:
        hub.stop()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "already complete" not in proc.stdout
    gets = {r.path.rsplit("/", 1)[-1] for r in hub.resolve_requests("GET")}
    assert gets == {"preprocessor_config.json", "config.json"}  # not the weights
    assert (tmp_path / "tokenizer_cache" / "preprocessor_config.json").read_bytes() == (
        changed / "preprocessor_config.json").read_bytes()


def test_missing_cli_says_what_to_install(tmp_path):
    dirs = [d for d in os.environ["PATH"].split(os.pathsep)
            if d and not (Path(d) / "hf").exists() and not (Path(d) / "huggingface-cli").exists()]
    env = {"PATH": os.pathsep.join(dirs)}
    proc = subprocess.run(["bash", str(DOWNLOAD)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert error_line(proc) == "error: the 'hf' command is not installed: pip install -U huggingface_hub"


def test_help_and_bad_flags(tmp_path):
    proc = subprocess.run(["bash", str(DOWNLOAD), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for flag in ("--model-repo", "--model-revision", "--model-dir", "--tokenizer-repo", "--tokenizer-revision",
                 "--tokenizer-dir", "--original", "--staging-dir", "--keep-staging", "--only", "HF_ENDPOINT",
                 "HF_TOKEN", PINNED_MODEL[:12], PINNED_TOKENIZER[:12]):
        assert flag in proc.stdout, flag
    proc = subprocess.run(["bash", str(DOWNLOAD), "--model-dirr", "x"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode != 0 and "unknown option --model-dirr" in error_line(proc)


# --------------------------------------------------------------------------- --original

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "boson"  # Boson's original layouts, tiny

STUB_CONVERTER = '''
import argparse, json, os, shutil, sys
from pathlib import Path
p = argparse.ArgumentParser()
p.add_argument("--kind"); p.add_argument("--src"); p.add_argument("--dst"); p.add_argument("--force", action="store_true")
a = p.parse_args()
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
assert json.loads((Path(a.src) / "config.json").read_text())["model_type"] == "higgs_audio"
dst = Path(a.dst)
dst.mkdir(parents=True, exist_ok=True)
shutil.copy(Path(os.environ["STUB_NATIVE"]) / "config.json", dst / "config.json")  # half-written
sys.exit("boom: tensor layers.0.mlp.up_proj.weight has the wrong shape")
'''


@pytest.fixture
def original_hub():
    """A hub serving Boson's original layouts (tests/fixtures/boson) at the pinned commits."""
    if not (FIXTURES / "model" / "config.json").is_file() or not (FIXTURES / "tokenizer" / "model.pth").is_file():
        pytest.skip("tests/fixtures/boson/{model,tokenizer} are missing")
    hub = LocalHub()
    hub.add_repo(MODEL_REPO, FIXTURES / "model", revisions=(), commit=PINNED_MODEL)
    hub.add_repo(TOKENIZER_REPO, FIXTURES / "tokenizer", revisions=(), commit=PINNED_TOKENIZER)
    hub.start()
    yield hub
    hub.stop()


@pytest.mark.skipif(not (ROOT / "convert_weights.py").is_file(), reason="convert_weights.py is missing")
def test_original_downloads_pinned_and_converts(original_hub, tmp_path):
    hub = original_hub
    proc = run_download(tmp_path, hub.url, "--original", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    infos = [r.path for r in hub.requests if "/revision/" in r.path]
    assert len(infos) >= 2 and all(PINNED_MODEL in p or PINNED_TOKENIZER in p for p in infos), infos
    assert proc.stdout.count("converted and checked") == 2
    assert not (tmp_path / "original_cache").exists()  # the original download is removed after converting
    model_dir, tok_dir = tmp_path / "model_cache", tmp_path / "tokenizer_cache"
    engine = inference.load_engine(model_dir, tok_dir, device="cpu", dtype="float32")
    assert tuple(engine.encode_audio(np.zeros(24000, dtype="float32")).shape) == (8, 25)
    assert proc.stdout.rstrip().splitlines()[-1].strip() == 'python3 inference.py --text "Hello there."'

    before = len(hub.requests)
    proc = run_download(tmp_path, hub.url, "--original")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("already holds a verified conversion") == 2
    assert hub.requests[before:] == []  # checked locally against the recorded sizes; no hub, no converter
    # a converted folder that lost a file is not taken as converted: it goes back to the hub
    (model_dir / "tokenizer.json").unlink()
    proc = run_download(tmp_path, f"http://127.0.0.1:{free_port()}", "--original", "--only", "model")
    assert proc.returncode != 0 and "cannot reach" in error_line(proc)


def test_original_converter_failure_leaves_target_refused(original_hub, tiny_ckpt, tmp_path):
    """convert_weights.py failing (a stand-in next to a copy of download.sh): exit != 0, its last
    line as the reason, the half-written target refused by inference.py, the download kept."""
    hub = original_hub
    app = tmp_path / "app"
    app.mkdir()
    shutil.copy(DOWNLOAD, app / "download.sh")
    shutil.copy(ROOT / "inference.py", app / "inference.py")
    (app / "convert_weights.py").write_text(STUB_CONVERTER)
    log = tmp_path / "stub.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HIGGS_"))}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_XET="1",
               STUB_LOG=str(log), STUB_NATIVE=str(tiny_ckpt[0]))
    proc = subprocess.run(["bash", str(app / "download.sh"), "--original", "--only", "model", "--model-dir", "m2",
                           "--keep-staging"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert error_line(proc) == ("error: convert_weights.py --kind model failed: "
                                "boom: tensor layers.0.mlp.up_proj.weight has the wrong shape")
    assert [json.loads(line) for line in log.read_text().splitlines()] == [
        ["--kind", "model", "--src", "./original_cache/model", "--dst", "m2", "--force"]]
    with pytest.raises(inference.UserError):
        inference.check_model_dir(tmp_path / "m2")
    assert (tmp_path / "original_cache" / "model" / "model.safetensors.index.json").is_file()
