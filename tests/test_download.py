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
    fetches only what is missing. (Custom folders, both flag spellings.)"""
    shard = "model-00002-of-00003.safetensors"
    total = sum(p.stat().st_size for p in tiny_ckpt[0].iterdir())
    hub.cut[shard] = 300_000  # send 300 kB, drop the connection, refuse the client's retries
    args = ("--model_dir", "m", "--tokenizer-dir=t")
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
    assert not (tmp_path / "t").exists()  # stopped at the first failure

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
    assert_same_files(tiny_ckpt[1], tmp_path / "t")
    assert proc.stdout.rstrip().splitlines()[-1].strip() == (
        'python3 inference.py --text "Hello there." --model_path m --tokenizer_path t')


def test_dropped_connection_resumes_with_range(hub, tmp_path):
    """Within a run, huggingface_hub resumes a dropped transfer with a Range request
    (it writes 10 MiB chunks, so the file must be bigger than that)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    data = os.urandom(21 * 2**20)
    (repo / "big.safetensors").write_bytes(data)
    (repo / "config.json").write_text("{}")
    hub.add_repo("acme/big", repo)
    hub.cut["big.safetensors"] = 15 * 2**20
    hub.refuse_after_cut = False
    proc = run_download(tmp_path, hub.url, "--only", "model", "--model-repo", "acme/big", "--model-dir", "big")
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
    proc = run_download(tmp_path, hub.url, "--tokenizer-revision", "v9.9", "--only", "tokenizer")
    assert proc.returncode != 0
    line = error_line(proc)
    assert "revision 'v9.9' not found" in line and "404" in line, line
    assert hub.resolve_requests() == []


def test_private_repo_without_token_401(hub, tmp_path):
    hub.tokens[MODEL_REPO] = "hf_right"
    proc = run_download(tmp_path, hub.url)
    assert proc.returncode != 0
    line = error_line(proc)
    assert "401" in line and "HF_TOKEN" in line, line


def test_wrong_token_401_and_right_token_works(hub, tmp_path):
    hub.tokens[MODEL_REPO] = "hf_right"
    proc = run_download(tmp_path, hub.url, "--only", "model", env={"HF_TOKEN": "hf_wrong"})
    assert proc.returncode != 0
    line = error_line(proc)
    assert "401" in line and "token" in line, line
    proc = run_download(tmp_path, hub.url, "--only", "model", env={"HF_TOKEN": "hf_right"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    inference.check_model_dir(tmp_path / "model_cache")


def test_unreachable_endpoint(tmp_path):
    proc = run_download(tmp_path, f"http://127.0.0.1:{free_port()}", timeout=60)
    assert proc.returncode != 0
    line = error_line(proc)
    assert "cannot reach http://127.0.0.1:" in line and "hf-mirror.com" in line, line


def test_not_enough_disk_space(hub, tmp_path):
    proc = run_download(tmp_path, hub.url, env={"_HIGGS_TEST_FREE_BYTES": str(50 * 2**20)})
    assert proc.returncode != 0
    line = error_line(proc)
    assert "not enough disk space" in line and "MB free" in line, line
    assert hub.resolve_requests() == []


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
