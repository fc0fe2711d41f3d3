#!/usr/bin/env python3
"""The Python half of download.sh: hub queries, source checks, size checks, markers, log filter.

download.sh runs `python3 hub.py COMMAND ARGS...`; every failure is one line on stderr and an
exit status (see EXIT_*). The functions are importable for the tests. Heavy imports
(huggingface_hub, transformers through checkpoints.py) happen inside the commands that need them:
`filter` runs next to every `hf download` and must start fast.

Per target folder, under DIR/.cache/:
    huggingface/higgs-download.json  what was verified there (source, commit, sizes, tensor shapes)
    higgs-download/checked.json      the source checked before the download began (a re-run after an
                                     interruption needs no second check of the same commit)
    higgs-download/download.log      everything `hf download` printed, tracebacks included
    higgs-download/stage/            where a source in a repo's subfolder is downloaded, before its
                                     files move to the top of DIR
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from checkpoints import first_line  # checkpoints.py imports only the stdlib at module level

ROOT = Path(__file__).resolve().parent
MARKER = Path(".cache") / "huggingface" / "higgs-download.json"
STAGING = Path(".cache") / "higgs-download"
CHECKED = STAGING / "checked.json"
STAGE = STAGING / "stage"
USER_AGENT = "higgs-download/check"  # marks this script's own hub queries (the tests tell them from hf's)
LIBRARY = dict(zip(("library_name", "library_version"), USER_AGENT.split("/")))  # how huggingface_hub takes it
OFFICIAL_OWNER = "bosonai"
LABELS = {"model": "generation model", "tokenizer": "audio tokenizer",
          "whisper": "Whisper speech recognition model", "wavlm-sv": "WavLM speaker-verification model"}
CLASSES = {"model": "HiggsAudioV2ForConditionalGeneration", "tokenizer": "HiggsAudioV2TokenizerModel",
           "whisper": "WhisperForConditionalGeneration", "wavlm-sv": "WavLMForXVector"}
# download.sh --eval_models: only the files the transformers classes read (openai/whisper-large-v3 also holds
# fp32, PyTorch and Flax copies of its weights: 18 GB where 3 GB do)
EVAL_KINDS = ("whisper", "wavlm-sv")
EVAL_CONFIGS = {"config.json", "generation_config.json", "preprocessor_config.json", "tokenizer.json",
                "tokenizer_config.json", "vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json",
                "normalizer.json"}
SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def eval_files(files: dict[str, int]) -> dict[str, int]:
    """The configs, tokenizer and one copy of the weights: model.safetensors, else its shards and index,
    else pytorch_model.bin (microsoft/wavlm-base-plus-sv has nothing else)."""
    if "model.safetensors" in files:
        weights = {"model.safetensors"}
    elif "model.safetensors.index.json" in files:
        weights = {"model.safetensors.index.json"} | {n for n in files if SHARD.fullmatch(n)}
    else:
        weights = {"pytorch_model.bin"}
    return {n: size for n, size in files.items() if n in EVAL_CONFIGS or n in weights}

EXIT_OTHER, EXIT_NETWORK, EXIT_ACCESS, EXIT_NOT_FOUND, EXIT_DISK, EXIT_WRONG = 1, 3, 4, 5, 6, 7


class HubError(Exception):
    """One line for the user and the exit status download.sh ends with."""

    def __init__(self, code: int, msg: str):
        super().__init__(msg)
        self.code, self.msg = code, msg


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Source:
    """REPO[/SUBFOLDER][@REVISION]; "original:REPO@REV" is Boson's original layout (converted after)."""

    repo: str
    subfolder: str = ""
    revision: str = "main"
    original: bool = False

    @classmethod
    def parse(cls, spec: str) -> "Source":
        original = spec.startswith("original:")
        body = spec[len("original:"):] if original else spec
        body, _, rev = body.partition("@")
        parts = [p for p in body.split("/") if p]
        if len(parts) < 2:
            raise HubError(EXIT_OTHER, f"source '{spec}': expected OWNER/NAME[/SUBFOLDER][@REVISION]")
        return cls("/".join(parts[:2]), "/".join(parts[2:]), rev or "main", original)

    @property
    def key(self) -> str:  # what the marker records (the revision is recorded as a commit)
        return f"{self.repo}/{self.subfolder}" if self.subfolder else self.repo

    @property
    def label(self) -> str:
        return f"{self.key}@{self.revision}"


def hub_api():
    from huggingface_hub import HfApi

    return HfApi(**LIBRARY)


def timeout() -> float:
    return float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or 30)


def chain(e):
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__


def mirror_set(endpoint: str) -> bool:
    """HF_ENDPOINT names a hub other than huggingface.co (a mirror): then don't suggest setting it."""
    env = os.environ.get("HF_ENDPOINT", "").rstrip("/")
    return bool(env) and env != "https://huggingface.co" and env == endpoint.rstrip("/")


def explain(e: BaseException, repo: str, rev: str, endpoint: str) -> HubError:
    """A failed hub call as one line and an exit status."""
    from huggingface_hub import errors

    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, errors.GatedRepoError):
        return HubError(EXIT_ACCESS, f"{repo} is gated (HTTP {status}): accept its terms on {endpoint}/{repo} "
                                     "and set HF_TOKEN=hf_... (or run: hf auth login)")
    if isinstance(e, errors.RevisionNotFoundError):
        return HubError(EXIT_NOT_FOUND, f"revision '{rev}' not found in {repo} on {endpoint} (HTTP 404)")
    if isinstance(e, errors.RepositoryNotFoundError):
        if status == 401:
            return HubError(EXIT_ACCESS, f"{repo} on {endpoint}: not found or needs a token (HTTP 401): check the "
                                         "name, or set HF_TOKEN=hf_... (or run: hf auth login)")
        return HubError(EXIT_NOT_FOUND, f"repository {repo} not found on {endpoint} (HTTP {status or 404})")
    if isinstance(e, getattr(errors, "OfflineModeIsEnabled", ())) or "offline" in type(e).__name__.lower():
        return HubError(EXIT_NETWORK, "HF_HUB_OFFLINE=1 is set: unset it to download")
    if status in (401, 403):
        return HubError(EXIT_ACCESS, f"access to {repo} on {endpoint} denied (HTTP {status}): the token is invalid "
                                     "or lacks permission; check HF_TOKEN (or run: hf auth login)")
    if status is not None:
        return HubError(EXIT_OTHER, f"{endpoint} answered HTTP {status} for {repo}@{rev}")
    for c in chain(e):
        name = type(c).__name__
        if any(k in name for k in ("Connect", "Timeout", "Network", "Proxy", "Protocol")) or isinstance(c, OSError):
            if mirror_set(endpoint):
                hint = ("check the network and that this mirror is up (HF_ENDPOINT points at it; "
                        "unset HF_ENDPOINT to use huggingface.co)")
            else:
                hint = "check the network, or use a mirror: HF_ENDPOINT=https://hf-mirror.com bash download.sh"
            return HubError(EXIT_NETWORK, f"cannot reach {endpoint} ({first_line(c)[:120]}); {hint}")
    return HubError(EXIT_OTHER, f"querying {repo}@{rev} on {endpoint} failed: {type(e).__name__}: {first_line(e)}")


def repo_listing(api, repo: str, rev: str) -> tuple[str, dict[str, int]]:
    """(commit, {path: size}) of repo@rev."""
    try:
        info = api.model_info(repo, revision=rev, files_metadata=True, timeout=timeout())
    except Exception as e:  # noqa: BLE001 - every hub failure becomes one line
        raise explain(e, repo, rev, api.endpoint) from None
    files = {s.rfilename: s.size for s in info.siblings or []}
    if not info.sha or not files or any(size is None for size in files.values()):
        raise HubError(EXIT_OTHER, f"{api.endpoint} did not list the files of {repo}@{rev} with their sizes")
    return info.sha, files


def file_get(api, src: Source, commit: str, name: str, byte_range: str | None = None):
    """A streamed GET of one file of the source (a context manager): the answer is read only as far as wanted."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session

    url = hf_hub_url(src.repo, name, subfolder=src.subfolder or None, revision=commit, endpoint=api.endpoint)
    headers = build_hf_headers(token=api.token, **LIBRARY)
    if byte_range:
        headers["Range"] = byte_range
    return get_session().stream("GET", url, headers=headers, timeout=timeout())


def serves_ranges(api, src: Source, commit: str, name: str) -> bool:
    """Whether the endpoint answers a Range read with part of the file (206). huggingface_hub reads a header
    read's answer whole, so on a mirror that ignores Range it would pull whole shards."""
    from huggingface_hub.utils import hf_raise_for_status

    with file_get(api, src, commit, name, "bytes=0-7") as response:
        hf_raise_for_status(response)
        return response.status_code == 206  # closed unread otherwise


def streamed_header(api, src: Source, commit: str, name: str) -> dict[str, list[int]]:
    """{tensor: shape} from the start of a plain GET, closed once the header is in: a header check on a
    mirror that ignores Range, without downloading the shard."""
    import checkpoints
    from huggingface_hub.utils import hf_raise_for_status

    raw, need = b"", None
    with file_get(api, src, commit, name) as response:
        hf_raise_for_status(response)
        for piece in response.iter_bytes():
            raw += piece
            if need is None and len(raw) >= 8:
                need = 8 + int.from_bytes(raw[:8], "little")
                if need - 8 > checkpoints.MAX_HEADER_BYTES:
                    raise checkpoints.UserError(f"{src.label}: {name} is not a safetensors file (header length "
                                                f"{need - 8} bytes is over the format's 100 MB limit)")
            if need is not None and len(raw) >= need:
                break
    if need is None or len(raw) < need:
        raise checkpoints.UserError(f"{src.label}: {name} ends before its safetensors header does")
    header = checkpoints.parse_header(raw[8:need], f"{src.label}: {name}")
    return {tensor: list(entry["shape"]) for tensor, entry in header.items()}


def weight_files(api, src: Source, commit: str, files: dict[str, int]) -> list[str]:
    """The safetensors files the source's weights are in: model.safetensors, or the index's shards."""
    from huggingface_hub import errors

    if "model.safetensors" in files:
        return ["model.safetensors"]
    if "model.safetensors.index.json" in files:
        path = api.hf_hub_download(src.repo, "model.safetensors.index.json", subfolder=src.subfolder or None,
                                   revision=commit)
        weight_map = json.loads(Path(path).read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise json.JSONDecodeError("no weight_map object", "", 0)
        return sorted(set(map(str, weight_map.values())))
    raise errors.NotASafetensorsRepoError("no model.safetensors")


def remote_tensors(api, src: Source, commit: str, files: dict[str, int]) -> tuple[dict[str, list[int]], int, str]:
    """({name: shape}, number of headers read, what was read) from the remote safetensors headers: HTTP Range
    reads of each file's first bytes, or on a mirror that ignores Range, the start of each file, the
    connection closed after its header. Nothing else is downloaded."""
    from huggingface_hub import errors

    try:
        names = weight_files(api, src, commit, files)
        if serves_ranges(api, src, commit, names[0]):
            prefix = f"{src.subfolder}/" if src.subfolder else ""
            per_file = {n: {t: list(i.shape) for t, i in api.parse_safetensors_file_metadata(
                src.repo, prefix + n, revision=commit, timeout=timeout()).tensors.items()} for n in names}
        else:
            print(f"  note: {api.endpoint} ignores HTTP Range requests: each header is read from the start of "
                  "its file, the connection closed after it", flush=True)
            per_file = {n: streamed_header(api, src, commit, n) for n in names}
    except errors.NotASafetensorsRepoError:
        hint = (" (Boson's original layout: that is the 'original' source)" if "model.pth" in files
                or any(n.endswith(".pth") for n in files) else "")
        raise HubError(EXIT_WRONG, f"{src.label} has no model.safetensors(.index.json){hint}") from None
    except errors.SafetensorsParsingError as e:
        raise HubError(EXIT_WRONG, f"{src.label}: a safetensors header cannot be read ({first_line(e)})") from None
    except json.JSONDecodeError as e:  # the index
        raise HubError(EXIT_WRONG, f"{src.label}: model.safetensors.index.json cannot be read ({first_line(e)})") \
            from None
    found: dict[str, list[int]] = {}
    for name, tensors in sorted(per_file.items()):
        for tensor, shape in tensors.items():
            if tensor in found:
                raise HubError(EXIT_WRONG, f"{src.label}: tensor {tensor} is stored in two files")
            found[tensor] = shape
    what = "model.safetensors" if list(per_file) == ["model.safetensors"] else f"the {len(per_file)} shards"
    return found, len(per_file), what


def read_marker(folder, name: Path = MARKER) -> dict | None:
    try:
        data = json.loads((Path(folder) / name).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def marker_source(marker: dict | None) -> str | None:
    if not marker:
        return None
    if marker.get("converted_by"):
        return f"original:{marker.get('source_repo')}@{marker.get('source_commit')}"
    return marker.get("source", marker.get("repo"))  # "repo": written by download.sh before sources existed


def check_source(api, kind: str, src: Source, folder: Path) -> tuple[dict, str]:
    """Verify one candidate before anything is downloaded: (listing, what was found). Raises HubError
    (hub problems) or checkpoints.UserError (it holds something else)."""
    import checkpoints

    commit, all_files = repo_listing(api, src.repo, src.revision)
    prefix = src.subfolder + "/" if src.subfolder else ""
    files = {n[len(prefix):]: s for n, s in all_files.items() if n.startswith(prefix)}
    if not files:
        raise checkpoints.UserError(f"{src.label} has no files under {src.subfolder}/")
    if kind in EVAL_KINDS:
        files = eval_files(files)
    listing = {"kind": kind, "source": src.key, "repo": src.repo, "subfolder": src.subfolder,
               "revision": src.revision, "commit": commit, "files": files, "only": kind in EVAL_KINDS}
    if src.original:
        return check_original(api, kind, src, listing)
    for record in (MARKER, CHECKED):  # same source, same commit: the same bytes as checked before
        old = read_marker(folder, record)
        if old and marker_source(old) == src.key and old.get("commit") == commit and old.get("tensors"):
            listing.update(tensors=old["tensors"], config_sha256=old.get("config_sha256"))
            return listing, f"checked at this commit by an earlier run ({folder / record})"
    if "config.json" not in files:
        raise checkpoints.UserError(f"{src.label} has no config.json")
    try:
        path = api.hf_hub_download(src.repo, "config.json", subfolder=src.subfolder or None, revision=commit)
    except Exception as e:  # noqa: BLE001
        raise explain(e, src.repo, src.revision, api.endpoint) from None
    raw = Path(path).read_bytes()
    try:
        config = json.loads(raw)
    except ValueError as e:
        raise checkpoints.UserError(f"{src.label}: config.json is not JSON ({first_line(e)})") from None
    expected = checkpoints.Expected(kind, config, f"{src.label}: config.json")
    if kind in checkpoints.PICKLE_KINDS and "pytorch_model.bin" in files:
        # a pickle has no header to read over HTTP: its tensors are checked after the download
        listing.update(config_sha256=hashlib.sha256(raw).hexdigest())
        return listing, (f"config.json builds {CLASSES[kind]}; its pytorch_model.bin is checked against it "
                         "after the download")
    try:
        found, nheaders, what = remote_tensors(api, src, commit, files)
    except HubError:
        raise
    except Exception as e:  # noqa: BLE001
        raise explain(e, src.repo, src.revision, api.endpoint) from None
    checkpoints.check_tensors(kind, f"{src.label}: {what}", found, expected)
    listing.update(tensors=found, config_sha256=hashlib.sha256(raw).hexdigest())
    n = len(expected.shapes)
    return listing, (f"{n} of {n} tensors in {nheaders} safetensors header{'s' * (nheaders > 1)} match "
                     f"{CLASSES[kind]} built from its config.json")


def check_original(api, kind: str, src: Source, listing: dict) -> tuple[dict, str]:
    """Boson's original layout can't be compared with the transformers class before converting: check
    that it is that layout; convert_weights.py and the folder check after it do the rest."""
    import checkpoints

    files = listing["files"]
    if kind == "tokenizer":
        if "model.pth" not in files or "config.json" not in files:
            raise checkpoints.UserError(f"{src.label} does not hold Boson's original audio tokenizer "
                                        "(config.json + model.pth)")
    else:
        if "config.json" not in files or not any(n.endswith(".safetensors") for n in files):
            raise checkpoints.UserError(f"{src.label} does not hold Boson's original generation model "
                                        "(config.json + safetensors shards)")
        try:
            path = api.hf_hub_download(src.repo, "config.json", revision=listing["commit"])
        except Exception as e:  # noqa: BLE001
            raise explain(e, src.repo, src.revision, api.endpoint) from None
        model_type = checkpoints.read_json(Path(path)).get("model_type")
        if model_type != "higgs_audio":
            raise checkpoints.UserError(f"{src.label}: config.json has model_type {model_type!r}, not Boson's "
                                        "original 'higgs_audio'")
    listing["original"] = True
    return listing, "Boson's original layout; converted with convert_weights.py and checked after"


def pick(api, kind: str, folder: Path, explicit: bool, specs: list[str], out) -> dict:
    """The first source in `specs` that verifies, written to `out` as its listing. An explicit choice
    (one source the user named) that fails is an error naming what it holds; no fallback."""
    import checkpoints

    sources = [Source.parse(s) for s in specs]
    if not explicit:  # what this folder already verifiably holds goes first: no re-download on a re-run
        held = marker_source(read_marker(folder))
        sources.sort(key=lambda s: (f"original:{s.repo}@{s.revision}" if s.original else s.key) != held)
    failures = []
    for src in sources:
        name = f"{src.label} (original layout)" if src.original else src.label
        try:
            listing, how = check_source(api, kind, src, folder)
        except HubError as e:
            if explicit or e.code == EXIT_NETWORK:  # unreachable: every other source would time out too
                raise
            failures.append(e)
        except checkpoints.UserError as e:
            if explicit:
                raise HubError(EXIT_WRONG, str(e)) from None
            failures.append(HubError(EXIT_WRONG, str(e)))
        else:
            print(f"  {kind}: {name}: ok: {how} (commit {listing['commit'][:12]})", flush=True)
            if kind not in EVAL_KINDS and src.repo.split("/")[0] != OFFICIAL_OWNER:
                print(f"    note: these files come from {src.repo}, not from Boson AI's own repos; they are "
                      f"under that repo's licence: {api.endpoint}/{src.repo}", flush=True)
            Path(out).write_text(json.dumps(listing))
            return listing
        print(f"  {kind}: {name}: skipped: {failures[-1].msg}", flush=True)
    first = failures[0]
    raise HubError(first.code, f"no source holds a usable {LABELS[kind]} (each one's reason is above); "
                               f"the first: {first.msg}")


def cmd_pick(work, *groups):
    """pick WORK KIND DIR EXPLICIT SOURCE... [-- KIND DIR EXPLICIT SOURCE...]: writes WORK/KIND.json."""
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()  # get_safetensors_metadata's "Parse safetensors files" bar
    api = hub_api()
    args, plans = list(groups), []
    while args:
        end = args.index("--") if "--" in args else len(args)
        kind, folder, explicit, *specs = args[:end]
        plans.append((kind, Path(folder), explicit == "1", specs))
        args = args[end + 1:]
    for kind, folder, explicit, specs in plans:
        pick(api, kind, folder, explicit, specs, Path(work) / f"{kind}.json")


def cmd_info(repo, rev, out):
    """Resolve rev to a commit and list the repo's files with their sizes (no check of their tensors)."""
    commit, files = repo_listing(hub_api(), repo, rev)
    listing = {"kind": "none", "source": repo, "repo": repo, "subfolder": "", "revision": rev, "commit": commit,
               "files": files}
    Path(out).write_text(json.dumps(listing))
    print(f"{commit}\t{len(files)}\t{sum(files.values())}")


def cmd_describe(listing):
    d = load(listing)
    print("\t".join([Source(d["repo"], d["subfolder"], d["revision"]).label, d["repo"], d["commit"],
                     d["subfolder"] or "-", "original" if d.get("original") else "-", str(len(d["files"])),
                     str(sum(d["files"].values()))]))


# --------------------------------------------------------------------------- local folders


def load(listing) -> dict:
    return json.loads(Path(listing).read_text())


def is_gate(name: str) -> bool:
    """Files written last: inference.py refuses a folder without them."""
    return name == "config.json" or name.endswith(".index.json")


def compare(folder, files: dict[str, int], skip_gates: bool = False) -> list[tuple[str, int, int | None]]:
    folder = Path(folder)
    bad = []
    for name, size in sorted(files.items()):
        if skip_gates and is_gate(name):
            continue
        p = folder / name
        have = p.stat().st_size if p.is_file() else None
        if have != size:
            bad.append((name, size, have))
    return bad


def size_problem(bad) -> str:
    name, size, have = bad[0]
    what = "missing" if have is None else f"{have} bytes, the hub lists {size}"
    return f"{name}: {what}" + (f" (+{len(bad) - 1} more)" if len(bad) > 1 else "")


def tensor_problem(kind: str, folder: Path, data: dict) -> str | None:
    """Local headers against the tensors verified on the hub (the same check_tensors line), then the
    folder check inference.py runs before loading. None when both pass."""
    sys.path.insert(0, str(ROOT))
    import checkpoints
    import inference

    try:
        if data.get("config_sha256") and hashlib.sha256((folder / "config.json").read_bytes()).hexdigest() \
                != data["config_sha256"]:
            return f"{folder}/config.json is not the one checked on the hub"
        if data.get("tensors"):
            checkpoints.check_tensors(kind, str(folder), checkpoints.folder_tensors(
                folder, pickle_ok=kind in checkpoints.PICKLE_KINDS), data["tensors"])
        else:
            checkpoints.verify_folder(kind, folder)
        if kind in EVAL_KINDS:  # the check eval_audio.py and inference.py --asr_check run before loading
            import quality

            quality.check_model_folder(kind, folder, "the folder")
        else:
            (inference.check_model_dir if kind == "model" else inference.check_tokenizer_dir)(folder)
    except (checkpoints.UserError, OSError) as e:
        return str(e)
    return None


def cmd_verify(folder, listing):
    """Exit 0 when folder already holds this listing, verified: every file at the hub's size, the same
    source and commit recorded, the same tensors in the local headers. Then refresh the marker."""
    folder, data = Path(folder), load(listing)
    bad = compare(folder, data["files"])
    if bad:
        raise HubError(EXIT_OTHER, size_problem(bad))
    old = read_marker(folder)
    if marker_source(old) != data["source"] or old.get("commit") != data["commit"]:
        raise HubError(EXIT_OTHER, f"holds {marker_source(old)}@{(old or {}).get('commit')}, not "
                                   f"{data['source']}@{data['commit']}")
    if data["kind"] in LABELS:
        if not old.get("tensors"):
            raise HubError(EXIT_OTHER, "its tensors were not verified yet")
        problem = tensor_problem(data["kind"], folder, data)
        if problem:
            raise HubError(EXIT_OTHER, problem)
    mark(folder, data)


def stage_dir(folder: Path, data: dict) -> Path:
    """Where hf writes a subfolder source: DIR/.cache/higgs-download/stage/SUBFOLDER."""
    return Path(folder) / STAGE / data["subfolder"]


def cmd_prepare(folder, listing):
    """Before downloading: stale files out, gate files out, partial files out, a subfolder source's
    files parked where hf finds them, enough disk? Prints the bytes to fetch."""
    folder, data = Path(folder), load(listing)
    folder.mkdir(parents=True, exist_ok=True)
    old = read_marker(folder) or {}
    for name in old.get("files", {}):  # what an earlier download from another source/commit left behind
        if name not in data["files"] and ".." not in Path(name).parts:
            (folder / name).unlink(missing_ok=True)
    cmd_gates(folder, listing)
    cmd_clean(folder)
    if data.get("tensors"):
        write_json(folder / CHECKED, data)
    where = folder
    if data["subfolder"]:
        where = stage_dir(folder, data)
        for name in data["files"]:
            top, parked = folder / name, where / name
            if top.is_file():  # hf compares it with the hub there (its metadata lives in the stage)
                parked.parent.mkdir(parents=True, exist_ok=True)
                os.replace(top, parked)
    need = sum(size for _, size, _ in compare(where, data["files"]))
    cmd_disk(need, folder)
    print(need)


def phase_files(data: dict, phase: str) -> list[str]:
    return [n for n in sorted(data["files"]) if is_gate(n) == (phase == "gates")]


def cmd_files(listing, phase):
    """The repo paths of a subfolder (or "only") source's files of one phase (weights, then gates), one a line."""
    data = load(listing)
    for name in phase_files(data, phase):
        print(f"{data['subfolder']}/{name}" if data["subfolder"] else name)


def cmd_only(listing):
    """1 when only the listed files are to be fetched (download.sh --eval_models), else 0."""
    print(1 if load(listing).get("only") else 0)


def cmd_unstage(folder, listing, phase):
    """Move a subfolder source's downloaded files of one phase to the top of the folder."""
    folder, data = Path(folder), load(listing)
    for name in phase_files(data, phase):
        parked = stage_dir(folder, data) / name
        if parked.is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(parked, folder / name)


def cmd_verify_download(kind, folder, listing, phase):
    """After `hf download`: sizes (phase "weights": all but the gate files), and at the end the
    headers against the tensors verified on the hub plus inference.py's folder check. On any
    failure the gate files go, so inference.py refuses the folder; on success the marker is written."""
    folder, data = Path(folder), load(listing)
    bad = compare(folder, data["files"], skip_gates=(phase == "weights"))
    problem = size_problem(bad) if bad else None
    if not problem and phase == "all" and kind in LABELS:
        problem = tensor_problem(kind, folder, data)
    if problem:
        cmd_gates(folder, listing)
        raise HubError(EXIT_OTHER, f"{folder} is incomplete or wrong after downloading ({problem}); "
                                   "re-run bash download.sh")
    if phase == "all":
        if kind in LABELS and not data.get("tensors"):  # verified through checkpoints.verify_folder: record it
            sys.path.insert(0, str(ROOT))
            import checkpoints

            data["tensors"] = checkpoints.folder_tensors(folder, pickle_ok=kind in checkpoints.PICKLE_KINDS)
        mark(folder, data)


def cmd_need(folder, listing):
    """Bytes still to download into folder."""
    print(sum(size for _, size, _ in compare(folder, load(listing)["files"])))


def cmd_total(listing, pattern=""):
    print(sum(size for name, size in load(listing)["files"].items() if pattern in name))


def free_bytes(folder):
    p = Path(folder).absolute()
    while not p.exists():
        p = p.parent
    st = os.statvfs(p)
    return st.f_bavail * st.f_frsize, os.stat(p).st_dev


def cmd_disk(*pairs):
    """pairs: NEED FOLDER ...; folders on one file system add up."""
    need, free, names = {}, {}, {}
    for i in range(0, len(pairs), 2):
        n, folder = int(pairs[i]), pairs[i + 1]
        f, dev = free_bytes(folder)
        need[dev] = need.get(dev, 0) + n
        free[dev] = f
        names.setdefault(dev, folder)
    for dev, n in need.items():
        margin = 100 * 2**20  # metadata, logs, rounding
        if n + margin > free[dev]:
            raise HubError(EXIT_DISK, f"not enough disk space for {names[dev]}: {gb(n)} to write (+100 MB headroom), "
                                      f"{gb(free[dev])} free; free up {gb(n + margin - free[dev])} or pick another "
                                      "folder")


def cmd_gates(folder, listing):
    """Remove the gate files (and the marker) so that an unfinished folder is refused by inference.py."""
    for name in load(listing)["files"]:
        if is_gate(name):
            (Path(folder) / name).unlink(missing_ok=True)
    (Path(folder) / MARKER).unlink(missing_ok=True)


def cmd_ungate(folder):
    """Like cmd_gates for a folder without a hub listing (a conversion target)."""
    folder = Path(folder)
    for p in [folder / "config.json", *folder.glob("*.index.json"), folder / MARKER]:
        p.unlink(missing_ok=True)


def cmd_clean(folder):
    """Drop partial files left by a killed download (huggingface_hub never reuses them)."""
    d = Path(folder) / ".cache"
    if d.is_dir():
        for p in d.rglob("*.incomplete"):
            p.unlink(missing_ok=True)


def write_json(path: Path, data: dict) -> None:
    import inference  # its temp-file-and-rename writer (cheap: torch is imported lazily there)

    path.parent.mkdir(parents=True, exist_ok=True)
    inference.write_json_atomic(path, data)


def mark(folder, data: dict, extra: dict | None = None):
    write_json(Path(folder) / MARKER, {**data, **(extra or {}), "verified_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def cmd_mark(folder, listing, extra="{}"):
    mark(folder, load(listing), json.loads(extra))


def cmd_snapshot(folder, out):
    """Record every file of a converted folder with its size (a listing like cmd_info's)."""
    folder = Path(folder)
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
             if p.is_file() and ".cache" not in p.relative_to(folder).parts}
    Path(out).write_text(json.dumps({"files": files}))


def cmd_converted(folder, repo, commit):
    """Exit 0 when folder holds a verified conversion of repo@commit."""
    data = read_marker(folder)
    if data is None:
        raise HubError(EXIT_OTHER, "not converted yet")
    if data.get("source_repo") != repo or data.get("source_commit") != commit:
        raise HubError(EXIT_OTHER, f"converted from {data.get('source_repo')}@{data.get('source_commit')}")
    bad = compare(folder, data.get("files", {}))
    if bad:
        raise HubError(EXIT_OTHER, f"{bad[0][0]} changed or missing")


def cmd_check(kind, folder):
    """The folder check inference.py runs before loading (convert_weights.py has already compared
    its output's headers with the transformers class)."""
    sys.path.insert(0, str(ROOT))
    import checkpoints
    import inference

    try:
        (inference.check_model_dir if kind == "model" else inference.check_tokenizer_dir)(folder)
    except checkpoints.UserError as e:
        raise HubError(EXIT_OTHER, str(e)) from None


# --------------------------------------------------------------------------- the hf CLI


def find_hf_cli(python_given: str = "", executable: str = sys.executable, path: str | None = None) -> str | None:
    """The hf CLI that belongs to this interpreter: next to $PYTHON as given (a venv's bin/python,
    activated or not), next to sys.executable, then on PATH."""
    dirs = []
    if os.sep in python_given:
        dirs.append(Path(python_given).parent)
    dirs.append(Path(executable).parent)
    for d in dirs:
        for name in ("hf", "huggingface-cli"):
            p = d / name
            if p.is_file() and os.access(p, os.X_OK):
                return str(p)
    for name in ("hf", "huggingface-cli"):
        found = shutil.which(name, path=path)
        if found:
            return found
    return None


def cmd_env(python_given=""):
    """ENDPOINT|transfer paths|hf CLI path (empty when none)."""
    import huggingface_hub as hh
    from importlib.util import find_spec

    from huggingface_hub import constants

    if os.environ.get("HF_HUB_DISABLE_XET", "").lower() in ("1", "true", "yes", "on"):
        xet = "off (HF_HUB_DISABLE_XET)"
    else:
        xet = "on" if find_spec("hf_xet") else "not installed (pip install hf_xet)"
    transport = f"huggingface_hub {hh.__version__}, hf_xet {xet}"
    if int(hh.__version__.split(".")[0]) < 1 and find_spec("hf_transfer"):
        transport += ", hf_transfer available"
    print(f"{constants.ENDPOINT}|{transport}|{find_hf_cli(python_given) or ''}")


PROGRESS = re.compile(rb"\d+%\|.*\||\[\d+:\d\d")  # a tqdm bar: "Fetching 3 files:  33%|███  | 1/3 [00:01<...]"


def filter_output(src, out, log) -> None:
    """Copy everything from src (hf's stdout+stderr) to log; pass only progress bars on to out."""
    buf, open_line = b"", False

    def show(text: bytes, newline: bool) -> None:
        nonlocal open_line
        if PROGRESS.search(text):
            out.write(b"\r" + text + (b"\n" if newline else b""))
            out.flush()
            open_line = not newline

    while True:
        chunk = src.read1(65536) if hasattr(src, "read1") else src.read(65536)
        if not chunk:
            break
        log.write(chunk)
        log.flush()
        *complete, buf = re.split(rb"(?<=[\r\n])", buf + chunk)
        for piece in complete:
            show(piece[:-1], piece.endswith(b"\n"))
        if PROGRESS.search(buf) and buf.rstrip().endswith(b"]"):  # a whole bar: tqdm writes each at once
            show(buf, False)
            buf = b""
    if buf:
        show(buf, False)
    if open_line:
        out.write(b"\n")
        out.flush()


def cmd_filter(log):
    """`hf download ... 2>&1 | hub.py filter LOG`: tracebacks and warnings go to LOG only."""
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        try:
            filter_output(sys.stdin.buffer, sys.stderr.buffer, f)
        except KeyboardInterrupt:  # Ctrl-C reaches the whole pipeline; download.sh says what happened
            sys.exit(130)


def failure(log_text: str, repo: str, endpoint: str, log_path: str) -> str:
    """One line for a failed `hf download`, from what it printed."""
    lines = [ln.strip() for ln in re.split(r"[\r\n]+", log_text) if ln.strip()]

    def last(pattern):
        hits = [ln for ln in lines if re.search(pattern, ln, re.I)]
        return hits[-1][:120] if hits else ""

    if re.search(r"No space left on device|ENOSPC|Errno 28|Not enough free disk space", log_text, re.I):
        return f"disk full while downloading {repo}: free some space and re-run bash download.sh"
    if re.search(r"GatedRepo|40[13] Client Error|403 Forbidden|Unauthorized|Invalid credentials", log_text):
        return f"access to {repo} denied by {endpoint} (HTTP 401/403): check HF_TOKEN (or run: hf auth login)"
    if re.search(r"Not Found|NotFound|404 Client Error", log_text):
        return f"{repo}: file or revision not found on {endpoint} (HTTP 404)"
    network = r"connect|timed? ?out|disconnect|protocol|network|incomplete|Consistency check"
    if re.search(network, log_text, re.I):
        return (f"download of {repo} interrupted (network: {last(network)}); re-run bash download.sh to resume "
                f"(details: {log_path})")
    tail = [ln for ln in lines if not PROGRESS.search(ln.encode())]
    return f"hf download {repo} failed: {(tail[-1] if tail else '')[:160]} (details: {log_path})"


def cmd_failure(log, repo, endpoint):
    try:
        text = Path(log).read_text(errors="replace")
    except OSError:
        text = ""
    print(failure(text, repo, endpoint, log))


# --------------------------------------------------------------------------- main


def main(argv: list[str]) -> int:
    cmds = {k[4:].replace("_", "-"): v for k, v in globals().items() if k.startswith("cmd_")}
    if not argv or argv[0] not in cmds:
        print(f"usage: hub.py {{{','.join(sorted(cmds))}}} ARGS... (run by download.sh)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT))
    try:
        cmds[argv[0]](*argv[1:])
    except HubError as e:
        print(e.msg, file=sys.stderr)
        return e.code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
