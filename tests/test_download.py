"""download.sh (+ hub.py) against a local hub on 127.0.0.1 (tests/local_hub.py) serving the tiny checkpoints.

The real hub cannot be reached from the test machines; `hf download` (huggingface_hub's CLI)
is pointed at the local hub with HF_ENDPOINT, exactly as a user points it at a mirror.
Requests of download.sh's own source check carry the "higgs-download/check" user agent
(`Request.check`); the others are `hf download`'s.
"""

from __future__ import annotations

import io
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

import checkpoints  # noqa: E402
import hub as hubpy  # noqa: E402
import inference  # noqa: E402

DOWNLOAD = ROOT / "download.sh"
MODEL_REPO = "bosonai/higgs-audio-v2-generation-3B-base"
TOKENIZER_REPO = "bosonai/higgs-audio-v2-tokenizer"
EUSTLB_TOKENIZER = "eustlb/higgs-audio-v2-tokenizer"
OMNIVOICE = "k2-fsa/OmniVoice"
PINNED_MODEL = "10840182ca4ad5d9d9113b60b9bb3c1ef1ba3f84"
PINNED_TOKENIZER = "9d4988fbd4ad07b4cac3a5fa462741a41810dbec"

# the hf CLI of this interpreter, as download.sh finds it: a venv's python -m pytest works unactivated
pytestmark = pytest.mark.skipif(hubpy.find_hf_cli(sys.executable) is None,
                                reason="the hf CLI (huggingface_hub) is not installed")


@pytest.fixture
def hub(tiny_ckpt):
    model_dir, tokenizer_dir = tiny_ckpt
    hub = LocalHub()
    hub.add_repo(MODEL_REPO, model_dir)
    hub.add_repo(TOKENIZER_REPO, tokenizer_dir)
    hub.start()
    yield hub
    hub.stop()


def run_download(cwd: Path, hub_url: str, *args: str, env: dict | None = None, timeout: float = 180):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HIGGS_", "HUGGINGFACE_"))}
    full_env.update(
        HF_ENDPOINT=hub_url,
        HF_HOME=str(cwd / "hf_home"),
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_UPDATE_CHECK="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        PYTHON=sys.executable,  # the interpreter running the tests (and its hf), not whatever python3 is on PATH
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


def downloads(hub: LocalHub, since: int = 0) -> list:
    """GETs on /resolve/ made by `hf download` (not by the source check)."""
    return [r for r in hub.requests[since:] if "/resolve/" in r.path and r.method == "GET" and not r.check]


def fetched(hub: LocalHub, since: int = 0) -> list:
    """Whole-file GETs on /resolve/, by hf or by the source check (hf copies what the check
    already fetched, config.json or an index, from huggingface_hub's cache)."""
    return [r for r in hub.requests[since:] if "/resolve/" in r.path and r.method == "GET" and r.range is None]


def names(requests) -> set[str]:
    return {r.path.rsplit("/", 1)[-1] for r in requests}


def assert_checks_read_headers_only(hub: LocalHub) -> None:
    """The source check reads safetensors files with Range requests of the header's size, never whole."""
    probes = [r for r in hub.requests if r.check and r.method == "GET" and r.path.endswith(".safetensors")]
    assert probes and all(r.range and r.range.startswith("bytes=0-") for r in probes), [(r.path, r.range)
                                                                                       for r in probes]
    assert all(r.sent <= 100_001 for r in probes)


def python_dir(tmp_path: Path, hf_script: str | None = None) -> dict:
    """env for download.sh with PYTHON in a folder of its own (an interpreter symlink, like a venv's
    bin/), holding `hf_script` as its hf CLI if given: download.sh must take that one."""
    import huggingface_hub

    bin_dir = tmp_path / "pybin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(os.path.realpath(sys.executable))
    if hf_script is not None:
        (bin_dir / "hf").write_text(hf_script)
        (bin_dir / "hf").chmod(0o755)
    site = str(Path(huggingface_hub.__file__).resolve().parent.parent)  # this interpreter's packages
    return {"PYTHON": str(bin_dir / "python3"), "PYTHONPATH": site}


def path_without_hf() -> str:
    return os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep)
                           if d and not (Path(d) / "hf").exists() and not (Path(d) / "huggingface-cli").exists())


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
    n = len(checkpoints.folder_tensors(tiny_ckpt[0]))
    assert f"  model: {MODEL_REPO}@main: ok: {n} of {n} tensors in 3 safetensors headers match" in proc.stdout
    assert f"  tokenizer: {TOKENIZER_REPO}@main: ok: " in proc.stdout
    assert "note:" not in proc.stdout  # Boson's own repos: no licence note
    assert "sizes match the hub, tensors match the checked source" in proc.stdout
    assert proc.stdout.rstrip().splitlines()[-1].strip() == 'python3 inference.py --text "Hello there."'
    # every file fetched once (no double downloads), the weights by hf; the check read headers only
    gets = [r.path for r in fetched(hub)]
    assert len(gets) == len(set(gets)) == 10 + 3
    assert len([r for r in downloads(hub) if r.path.endswith(".safetensors")]) == 3 + 1
    assert_checks_read_headers_only(hub)
    assert "Traceback" not in proc.stdout + proc.stderr
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
    assert proc.stdout.count("checked at this commit by an earlier run") == 2


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
    # the shard, plus the gate files that are always written last (config.json, the index)
    assert names(downloads(hub, before)) == {"model-00002-of-00003.safetensors", "config.json",
                                              "model.safetensors.index.json"}
    assert shard.read_bytes() == (work / "model_cache" / shard.name).read_bytes()
    assert "already complete" in proc.stdout  # the tokenizer
    inference.check_model_dir(tmp_path / "model_cache")


# --------------------------------------------------------------------------- interruption


def test_interrupted_download_is_refused_then_resumes(hub, tmp_path, tiny_ckpt):
    """Connection dropped mid-shard: exit != 0, one line naming the log (no traceback on screen, the
    whole of it in the log), inference.py refuses the folder, the re-run fetches only what is missing."""
    shard = "model-00002-of-00003.safetensors"
    total = sum(p.stat().st_size for p in tiny_ckpt[0].iterdir())
    hub.cut[shard] = 300_000  # send 300 kB, drop the connection, refuse the client's retries
    args = ("--model_dir", "m", "--only", "model")
    proc = run_download(tmp_path, hub.url, *args)
    assert proc.returncode != 0
    line = error_line(proc)
    log = "m/.cache/higgs-download/download.log"
    assert "interrupted" in line and "re-run bash download.sh" in line and f"(details: {log})" in line, line
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "Traceback (most recent call last)" in (tmp_path / log).read_text()
    assert "%|" in proc.stderr  # hf's progress bars still reach the user
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
    assert "checked at this commit by an earlier run" in proc.stdout  # no second header check
    second = downloads(hub, before)
    got = names(second)
    assert shard in got
    assert "model-00001-of-00003.safetensors" not in got and "model-00003-of-00003.safetensors" not in got
    model_bytes_second = sum(r.sent for r in second if f"/{MODEL_REPO}/" in r.path)
    assert model_bytes_second < total / 2, (model_bytes_second, total)
    assert_same_files(tiny_ckpt[0], model_dir)
    inference.check_model_dir(model_dir)
    assert proc.stdout.rstrip().splitlines()[-1].strip() == 'python3 inference.py --text "Hello there." --model_path m'


def test_dropped_connection_resumes_with_range(hub, tmp_path, tiny_ckpt):
    """Within a run, huggingface_hub resumes a dropped transfer with a Range request
    (it writes 10 MiB chunks, so the file must be bigger than that). Private repo + HF_TOKEN:
    the source check and hf both send it."""
    repo = tmp_path / "repo"
    shutil.copytree(tiny_ckpt[0], repo)
    data = os.urandom(21 * 2**20)
    (repo / "big.bin").write_bytes(data)
    hub.add_repo("acme/big", repo)
    hub.tokens["acme/big"] = "hf_right"  # private: HF_TOKEN must reach every request
    hub.cut["big.bin"] = 15 * 2**20
    hub.refuse_after_cut = False
    proc = run_download(tmp_path, hub.url, "--only", "model", "--model-repo", "acme/big", "--model-dir", "big",
                        env={"HF_TOKEN": "hf_right"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "note: these files come from acme/big" in proc.stdout
    gets = [r for r in downloads(hub) if r.path.endswith("big.bin")]
    assert [r.range for r in gets] == [None, f"bytes={10 * 2**20}-"]
    assert gets[1].sent == len(data) - 10 * 2**20
    assert (tmp_path / "big" / "big.bin").read_bytes() == data


# --------------------------------------------------------------------------- one-line failures


def test_repo_not_found_404(hub, tmp_path):
    proc = run_download(tmp_path, hub.url, "--model-repo", "bosonai/no-such-model", env={"HF_TOKEN": "hf_x"})
    assert proc.returncode != 0
    line = error_line(proc)
    assert "bosonai/no-such-model" in line and "not found" in line and "404" in line, line
    assert not (tmp_path / "model_cache").exists()


def test_revision_not_found_404(hub, tmp_path):
    """An explicit revision belongs to the first source only: no fallback to the others."""
    proc = run_download(tmp_path, hub.url, "--tokenizer-revision", "v9.9", "--only", "tokenizer", "--tokenizer-dir=t")
    assert proc.returncode != 0
    line = error_line(proc)
    assert line.startswith("error: revision 'v9.9' not found") and "404" in line and TOKENIZER_REPO in line, line
    assert not (tmp_path / "t").exists()
    assert hub.resolve_requests() == []
    assert not any("eustlb" in r.path or OMNIVOICE in r.path for r in hub.requests)


def test_private_repo_without_token_401(hub, tmp_path):
    """Every source of the model answers 401: the first one's reason is the line."""
    hub.tokens[MODEL_REPO] = "hf_right"
    proc = run_download(tmp_path, hub.url)
    assert proc.returncode != 0
    line = error_line(proc)
    assert line.startswith("error: no source holds a usable generation model"), line
    assert "401" in line and "HF_TOKEN" in line and MODEL_REPO in line, line
    assert proc.stdout.count("  model: ") == 3 and proc.stdout.count(": skipped: ") == 3


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


def test_unreachable_mirror(tmp_path):
    """HF_ENDPOINT already names the hub that can't be reached: check it, don't suggest setting it."""
    proc = run_download(tmp_path, f"http://127.0.0.1:{free_port()}", timeout=60)
    assert proc.returncode != 0
    line = error_line(proc)
    assert "cannot reach http://127.0.0.1:" in line and "mirror is up" in line and "HF_ENDPOINT" in line, line
    assert "hf-mirror.com" not in line
    assert proc.stdout.count(": skipped: ") == 0  # unreachable: the other sources are not tried


def test_unreachable_hub_without_mirror_suggests_one(monkeypatch):
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    err = hubpy.explain(ConnectionRefusedError(111, "Connection refused"), MODEL_REPO, "main",
                        "https://huggingface.co")
    assert err.code == hubpy.EXIT_NETWORK
    assert "cannot reach https://huggingface.co" in err.msg and "HF_ENDPOINT=https://hf-mirror.com" in err.msg
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.com")
    err = hubpy.explain(ConnectionRefusedError(111, "Connection refused"), MODEL_REPO, "main",
                        "https://hf-mirror.com")
    assert "HF_ENDPOINT=https://hf-mirror.com" not in err.msg and "mirror is up" in err.msg


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
    assert downloads(hub) == []


FAKE_HF_ENOSPC = "#!/bin/sh\necho \"OSError: [Errno 28] No space left on device\" >&2\nexit 1\n"


def test_disk_full_during_download(hub, tmp_path):
    """hf failing with ENOSPC (a stand-in `hf` next to PYTHON prints what huggingface_hub raises)."""
    env = python_dir(tmp_path, FAKE_HF_ENOSPC)
    proc = run_download(tmp_path, hub.url, "--only", "tokenizer", env=env)
    assert proc.returncode != 0
    assert error_line(proc) == (f"error: disk full while downloading {TOKENIZER_REPO}: "
                                "free some space and re-run bash download.sh")
    assert "OSError" not in proc.stdout + proc.stderr  # hf's own words stay in the log
    with pytest.raises(inference.UserError):
        inference.check_tokenizer_dir(tmp_path / "tokenizer_cache")


# a stand-in hf that "succeeds" but leaves one file cut short (a broken mirror, a disk error hf missed)
FAKE_HF_TRUNCATES = """#!/bin/sh
dir=
while [ $# -gt 0 ]; do case $1 in --local-dir) dir=$2; shift 2 ;; *) shift ;; esac; done
mkdir -p "$dir" && cp "$FAKE_SRC"/* "$dir"/ && head -c 1000 "$FAKE_SRC/$FAKE_CUT" > "$dir/$FAKE_CUT"
"""


def test_hf_that_exits_0_but_truncates_a_shard_is_caught(hub, tmp_path, tiny_ckpt):
    """The post-download verification decides, not hf's exit status."""
    env = python_dir(tmp_path, FAKE_HF_TRUNCATES)
    env.update(FAKE_SRC=str(tiny_ckpt[0]), FAKE_CUT="model-00002-of-00003.safetensors")
    proc = run_download(tmp_path, hub.url, "--only", "model", env=env)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    line = error_line(proc)
    assert "model_cache is incomplete or wrong after downloading" in line and "model-00002-of-00003" in line, line
    assert "Done." not in proc.stdout
    assert not (tmp_path / "model_cache" / "config.json").exists()
    with pytest.raises(inference.UserError):
        inference.check_model_dir(tmp_path / "model_cache")


def test_post_download_check_compares_headers_not_just_sizes(tiny_ckpt, tmp_path):
    """Same file sizes as listed, other tensors inside (a hub or mirror serving other bytes at the
    checked commit): refused, gate files removed, no marker."""
    folder = tmp_path / "t"
    shutil.copytree(tiny_ckpt[1], folder)
    found = checkpoints.folder_tensors(folder)
    renamed = {("x." + k if i == 0 else k): v for i, (k, v) in enumerate(sorted(found.items()))}
    listing = tmp_path / "listing.json"
    files = {p.name: p.stat().st_size for p in folder.iterdir()}
    listing.write_text(json.dumps({"kind": "tokenizer", "source": EUSTLB_TOKENIZER, "repo": EUSTLB_TOKENIZER,
                                   "subfolder": "", "revision": "main", "commit": "c" * 40, "files": files,
                                   "tensors": renamed}))
    with pytest.raises(hubpy.HubError) as e:
        hubpy.cmd_verify_download("tokenizer", str(folder), str(listing), "all")
    assert "incomplete or wrong after downloading" in e.value.msg and "1 missing" in e.value.msg, e.value.msg
    assert not (folder / "config.json").exists() and not (folder / hubpy.MARKER).exists()
    # the same folder against the tensors it holds passes and is recorded
    shutil.copy(tiny_ckpt[1] / "config.json", folder / "config.json")
    listing.write_text(listing.read_text().replace('"x.', '"'))
    hubpy.cmd_verify_download("tokenizer", str(folder), str(listing), "all")
    assert hubpy.read_marker(folder)["tensors"] == found


def test_new_commit_on_main_is_fetched(downloaded, tiny_ckpt, tmp_path):
    """Same sizes but main moved on: not 'complete'; checked again, hf compares ETags and fetches only
    what changed."""
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
    assert names(fetched(hub)) == {"preprocessor_config.json", "config.json"}  # not the weights
    assert_checks_read_headers_only(hub)
    assert (tmp_path / "tokenizer_cache" / "preprocessor_config.json").read_bytes() == (
        changed / "preprocessor_config.json").read_bytes()


def test_missing_cli_says_what_to_install(tmp_path):
    """No hf next to the interpreter nor on PATH."""
    env = {"PATH": path_without_hf(), **python_dir(tmp_path)}
    proc = subprocess.run(["bash", str(DOWNLOAD)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert error_line(proc) == "error: the 'hf' command is not installed: pip install -U huggingface_hub"


def test_hf_cli_is_looked_up_next_to_the_interpreter_first(tmp_path):
    venv_bin, executable_bin, on_path = (tmp_path / d for d in ("venv_bin", "exe_bin", "on_path"))
    for d in (venv_bin, executable_bin, on_path):
        d.mkdir()
        (d / "hf").write_text("#!/bin/sh\n")
        (d / "hf").chmod(0o755)
    find = hubpy.find_hf_cli
    path = str(on_path)
    assert find(str(venv_bin / "python"), str(executable_bin / "python3"), path) == str(venv_bin / "hf")
    assert find("python3", str(executable_bin / "python3"), path) == str(executable_bin / "hf")
    (executable_bin / "hf").unlink()
    assert find("python3", str(executable_bin / "python3"), path) == str(on_path / "hf")
    assert find("python3", str(executable_bin / "python3"), str(tmp_path)) is None


def test_filter_passes_progress_bars_and_logs_everything():
    bar1 = b"Fetching 3 files:   0%|          | 0/3 [00:00<?, ?it/s]"
    bar2 = b"Fetching 3 files: 100%|##########| 3/3 [00:00<00:00, 9.1it/s]"
    noise = (b"Hint: install the skill\nError while downloading from http://x/a.safetensors: peer closed\n"
             b"Trying to resume download...\nTraceback (most recent call last):\n  File \"x.py\", line 1\n"
             b"httpx.RemoteProtocolError: Server disconnected\n")
    src = io.BytesIO(b"\r" + bar1 + b"\r" + bar2 + b"\n" + noise)
    out, log = io.BytesIO(), io.BytesIO()
    hubpy.filter_output(src, out, log)
    assert out.getvalue() == b"\r" + bar1 + b"\r" + bar2 + b"\n"
    assert log.getvalue() == src.getvalue()


def test_help_and_bad_flags(tmp_path):
    proc = subprocess.run(["bash", str(DOWNLOAD), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for flag in ("--model_repo", "--model_revision", "--model_dir", "--tokenizer_repo", "--tokenizer_revision",
                 "--tokenizer_dir", "--original", "--staging_dir", "--keep_staging", "--only", "HF_ENDPOINT",
                 "HF_TOKEN", PINNED_MODEL[:12], PINNED_TOKENIZER[:12], EUSTLB_TOKENIZER,
                 f"{OMNIVOICE}/audio_tokenizer", "download.log"):
        assert flag in proc.stdout, flag
    proc = subprocess.run(["bash", str(DOWNLOAD), "--model-dirr", "x"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode != 0 and "unknown option --model-dirr" in error_line(proc)


# --------------------------------------------------------------------------- choosing a source


def lm_copy(model_dir: Path, codec_dir: Path, out: Path) -> Path:
    """What bosonai/higgs-audio-v2-tokenizer's main was seen to hold: the codec's config.json next to
    a model.safetensors that is the generation model's weights."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True)
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(codec_dir / name, out / name)
    tensors = {}
    for shard in sorted(model_dir.glob("model-*.safetensors")):
        tensors.update(load_file(shard))
    save_file(tensors, out / "model.safetensors")
    (out / "notes.txt").write_text("a file the codec repos don't have\n")
    return out


@pytest.fixture(scope="module")
def repos(tiny_ckpt, tmp_path_factory):
    """Folders a hub serves as repos: the right codec, an LM copy, OmniVoice with the codec in
    audio_tokenizer/, and OmniVoice with a codec of other shapes there."""
    model_dir, codec = tiny_ckpt
    root = tmp_path_factory.mktemp("repos")
    out = {"codec": codec, "lm_copy": lm_copy(model_dir, codec, root / "lm_copy")}
    for name, bad in (("omnivoice", False), ("omnivoice_bad", True)):
        d = root / name
        (d / "audio_tokenizer").mkdir(parents=True)
        (d / "config.json").write_text(json.dumps({"model_type": "omnivoice"}))
        shutil.copy(out["lm_copy"] / "model.safetensors", d / "model.safetensors")  # OmniVoice's own LM
        for f in codec.iterdir():
            shutil.copy(f, d / "audio_tokenizer" / f.name)
        if bad:  # 2048 codes per codebook: every codebook tensor has another shape
            cfg = json.loads((codec / "config.json").read_text())
            cfg["codebook_size"] = 2048
            (d / "audio_tokenizer" / "config.json").write_text(json.dumps(cfg, indent=2))
        out[name] = d
    return out


def serve(**repos_by_id) -> LocalHub:
    hub = LocalHub()
    for repo_id, folder in repos_by_id.items():
        hub.add_repo(repo_id, folder)
    return hub.start()


def test_tokenizer_repo_holding_the_lm_is_skipped_for_the_next_source(repos, tmp_path):
    """(a) main of the first source serves the generation model's tensors under a codec config.json; the
    next source holds the codec: it is the one downloaded, byte for byte, and the output says why.
    The target folder already holds an older download of the LM copy (download.sh before sources were
    checked): it is replaced, its extra file removed. hf is found next to PYTHON with none on PATH."""
    hub = serve(**{TOKENIZER_REPO: repos["lm_copy"], EUSTLB_TOKENIZER: repos["codec"], OMNIVOICE: repos["omnivoice"]})
    old = tmp_path / "tokenizer_cache"
    shutil.copytree(repos["lm_copy"], old)
    files = {p.name: p.stat().st_size for p in old.iterdir()}
    (old / ".cache" / "huggingface").mkdir(parents=True)
    (old / hubpy.MARKER).write_text(json.dumps({"repo": TOKENIZER_REPO, "revision": "main", "commit": "0" * 40,
                                                "files": files}))
    try:
        proc = run_download(tmp_path, hub.url, "--only", "tokenizer", env={"PATH": path_without_hf()})
    finally:
        hub.stop()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert f"; {Path(sys.executable).parent / 'hf'})" in out.splitlines()[0]
    skipped = next(line for line in out.splitlines() if line.startswith(f"  tokenizer: {TOKENIZER_REPO}@main: "))
    assert "skipped: " in skipped and "generation model" in skipped and "audio tokenizer" in skipped, skipped
    assert f"  tokenizer: {EUSTLB_TOKENIZER}@main: ok: " in out
    assert f"note: these files come from {EUSTLB_TOKENIZER}" in out
    assert f"==> tokenizer: {EUSTLB_TOKENIZER}@main -> ./tokenizer_cache" in out
    assert OMNIVOICE not in out  # the first source that verifies is taken
    assert_same_files(repos["codec"], old)
    checkpoints.verify_folder("tokenizer", old)
    inference.check_tokenizer_dir(old)
    assert not [r for r in downloads(hub) if TOKENIZER_REPO in r.path]  # the LM copy: headers only
    assert_checks_read_headers_only(hub)


def test_a_mirror_that_ignores_range_still_gets_the_header_check(repos, tmp_path):
    """(a) again on a mirror that answers Range reads with the whole file: the wrong first source is still
    skipped before anything is downloaded (headers read from the start of each file, then closed)."""
    hub = serve(**{TOKENIZER_REPO: repos["lm_copy"], EUSTLB_TOKENIZER: repos["codec"]})
    hub.ignore_range = True
    try:
        proc = run_download(tmp_path, hub.url, "--only", "tokenizer")
    finally:
        hub.stop()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"note: {hub.url} ignores HTTP Range requests" in proc.stdout
    skipped = next(line for line in proc.stdout.splitlines() if line.startswith(f"  tokenizer: {TOKENIZER_REPO}@main: "))
    assert "skipped: " in skipped and "generation model" in skipped, skipped
    assert_same_files(repos["codec"], tmp_path / "tokenizer_cache")
    assert not [r for r in downloads(hub) if TOKENIZER_REPO in r.path]  # the LM copy: headers only
    assert not [r for r in hub.requests if r.range == "bytes=0-100000"]  # huggingface_hub's whole-answer read


def test_streamed_header_read_stops_after_the_header(tmp_path):
    """On a Range-ignoring mirror a 64 MB shard's header check takes its header, not the shard."""
    from huggingface_hub import HfApi

    big = tmp_path / "big"
    big.mkdir()
    header = json.dumps({"w": {"dtype": "U8", "shape": [64 << 20], "data_offsets": [0, 64 << 20]}}).encode()
    (big / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(64 << 20))
    hub = serve(**{"someone/big": big})
    hub.ignore_range = True
    try:
        src = hubpy.Source("someone/big")
        commit = hub.repos["someone/big"]["main"].commit
        api = HfApi(endpoint=hub.url)
        assert not hubpy.serves_ranges(api, src, commit, "model.safetensors")
        assert hubpy.streamed_header(api, src, commit, "model.safetensors") == {"w": [64 << 20]}
    finally:
        hub.stop()
    sent = [r.sent for r in hub.requests if r.path.endswith("model.safetensors")]
    assert len(sent) == 2 and max(sent) < 32 << 20, sent  # closed long before the end


def test_explicit_source_that_fails_the_check_is_an_error(repos, tmp_path):
    hub = serve(**{TOKENIZER_REPO: repos["lm_copy"], EUSTLB_TOKENIZER: repos["codec"]})
    try:
        proc = run_download(tmp_path, hub.url, "--only", "tokenizer", "--tokenizer-repo", TOKENIZER_REPO)
    finally:
        hub.stop()
    assert proc.returncode != 0
    line = error_line(proc)
    assert line.startswith(f"error: {TOKENIZER_REPO}@main: model.safetensors holds ") and "generation model" in line
    assert not any("eustlb" in r.path for r in hub.requests)  # no fallback away from an explicit choice
    assert not (tmp_path / "tokenizer_cache").exists()


def test_no_source_holds_the_codec(repos, tmp_path):
    """(b) every source wrong: one line, nothing downloaded, nothing inference.py would load."""
    hub = serve(**{TOKENIZER_REPO: repos["lm_copy"], EUSTLB_TOKENIZER: repos["lm_copy"],
                   OMNIVOICE: repos["omnivoice_bad"]})
    hub.add_repo(TOKENIZER_REPO, repos["lm_copy"], revisions=(), commit=PINNED_TOKENIZER)
    try:
        proc = run_download(tmp_path, hub.url, "--only", "tokenizer")
    finally:
        hub.stop()
    assert proc.returncode != 0
    line = error_line(proc)
    assert line.startswith("error: no source holds a usable audio tokenizer"), line
    assert TOKENIZER_REPO in line and "generation model" in line, line
    skipped = [ln for ln in proc.stdout.splitlines() if ": skipped: " in ln]
    assert len(skipped) == 4, proc.stdout
    assert "another shape" in skipped[2] and f"{OMNIVOICE}/audio_tokenizer" in skipped[2], skipped[2]
    assert "original audio tokenizer" in skipped[3], skipped[3]
    assert [ln for ln in proc.stderr.splitlines() if ln.strip()] == [line]
    assert downloads(hub) == []
    with pytest.raises(inference.UserError):
        inference.check_tokenizer_dir(tmp_path / "tokenizer_cache")


def test_codec_in_a_subfolder_lands_flat(repos, tmp_path):
    """(c) the OmniVoice source: audio_tokenizer/'s files land at the top of tokenizer_cache/, OmniVoice's
    own weights are not fetched; a re-run finds it complete, a damaged file is fetched again alone."""
    hub = serve(**{TOKENIZER_REPO: repos["lm_copy"], OMNIVOICE: repos["omnivoice"]})
    try:
        proc = run_download(tmp_path, hub.url, "--only", "tokenizer")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        out = proc.stdout
        assert f"  tokenizer: {EUSTLB_TOKENIZER}@main: skipped: " in out and "not found" in out
        assert f"  tokenizer: {OMNIVOICE}/audio_tokenizer@main: ok: " in out
        assert f"note: these files come from {OMNIVOICE}, not from Boson AI's own repos; they are under that " \
               f"repo's licence: {hub.url}/{OMNIVOICE}" in out
        target = tmp_path / "tokenizer_cache"
        assert_same_files(repos["codec"], target)
        assert not (target / "audio_tokenizer").exists()
        omni = [r for r in fetched(hub) if f"/{OMNIVOICE}/" in r.path]
        assert names(omni) == {p.name for p in repos["codec"].iterdir()}
        assert all("/audio_tokenizer/" in r.path for r in omni)  # not OmniVoice's own weights
        checkpoints.verify_folder("tokenizer", target)

        before = len(hub.requests)
        proc = run_download(tmp_path, hub.url, "--only", "tokenizer")
        assert proc.returncode == 0 and "already complete" in proc.stdout, proc.stdout + proc.stderr
        assert downloads(hub, before) == []

        weights = target / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:5000])
        before = len(hub.requests)
        proc = run_download(tmp_path, hub.url, "--only", "tokenizer")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        got = names(fetched(hub, before))
        assert "model.safetensors" in got and "preprocessor_config.json" not in got, got
        assert_same_files(repos["codec"], target)
    finally:
        hub.stop()


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
    for name in ("inference.py", "hub.py", "checkpoints.py"):  # what download.sh imports
        shutil.copy(ROOT / name, app / name)
    (app / "convert_weights.py").write_text(STUB_CONVERTER)
    log = tmp_path / "stub.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HIGGS_"))}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_XET="1",
               STUB_LOG=str(log), STUB_NATIVE=str(tiny_ckpt[0]), PYTHON=sys.executable)
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
