#!/usr/bin/env bash
# Fetch the Higgs Audio V2 checkpoints for inference.py:
#   generation model -> ./model_cache      audio tokenizer -> ./tokenizer_cache
# Run `bash download.sh --help` for the options.
set -euo pipefail

PINNED_MODEL_REVISION=10840182ca4ad5d9d9113b60b9bb3c1ef1ba3f84
PINNED_TOKENIZER_REVISION=9d4988fbd4ad07b4cac3a5fa462741a41810dbec

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHON=${PYTHON:-python3}

MODEL_REPO=${HIGGS_MODEL_REPO:-bosonai/higgs-audio-v2-generation-3B-base}
TOKENIZER_REPO=${HIGGS_TOKENIZER_REPO:-bosonai/higgs-audio-v2-tokenizer}
MODEL_REVISION=${HIGGS_MODEL_REVISION:-}
TOKENIZER_REVISION=${HIGGS_TOKENIZER_REVISION:-}
MODEL_DIR=${HIGGS_MODEL_DIR:-./model_cache}
TOKENIZER_DIR=${HIGGS_TOKENIZER_DIR:-./tokenizer_cache}
STAGING_DIR=${HIGGS_STAGING_DIR:-./original_cache}
ORIGINAL=${HIGGS_ORIGINAL:-0}
KEEP_STAGING=${HIGGS_KEEP_STAGING:-0}
ONLY=${HIGGS_ONLY:-all}

usage() {
    cat <<EOF
Usage: bash download.sh [options]

Downloads the Higgs Audio V2 generation model and audio tokenizer with the
huggingface_hub CLI (hf download) and verifies them, ready for inference.py.
Re-running resumes an interrupted download: finished files are kept (a file cut
off mid-way starts again), and a folder whose files all match the hub's sizes
is skipped.

Options (each also settable by the environment variable in brackets):
  --model-repo ID          generation model repo  [HIGGS_MODEL_REPO]
                           (default: bosonai/higgs-audio-v2-generation-3B-base)
  --model-revision REV     branch, tag or commit  [HIGGS_MODEL_REVISION] (default: main)
  --model-dir DIR          target folder          [HIGGS_MODEL_DIR] (default: ./model_cache)
  --tokenizer-repo ID      audio tokenizer repo   [HIGGS_TOKENIZER_REPO]
                           (default: bosonai/higgs-audio-v2-tokenizer)
  --tokenizer-revision REV branch, tag or commit  [HIGGS_TOKENIZER_REVISION] (default: main)
  --tokenizer-dir DIR      target folder          [HIGGS_TOKENIZER_DIR] (default: ./tokenizer_cache)
  --only model|tokenizer   fetch just one of the two                 [HIGGS_ONLY]
  --original               fetch Boson's original-layout checkpoints at their pinned
                           revisions (model ${PINNED_MODEL_REVISION:0:12}, tokenizer ${PINNED_TOKENIZER_REVISION:0:12})
                           into the staging folder, then convert them into the target
                           folders with convert_weights.py           [HIGGS_ORIGINAL=1]
  --staging-dir DIR        where --original downloads go (default: ./original_cache)
                                                                     [HIGGS_STAGING_DIR]
  --keep-staging           keep the original-layout download after converting
                                                                     [HIGGS_KEEP_STAGING=1]
  -h, --help               show this help

Environment read by huggingface_hub:
  HF_ENDPOINT   hub or mirror to use, e.g. HF_ENDPOINT=https://hf-mirror.com bash download.sh
  HF_TOKEN      access token (or log in once with: hf auth login)
  HF_XET_HIGH_PERFORMANCE=1   more parallel Xet transfers (needs the hf_xet package)
  HF_HUB_ENABLE_HF_TRANSFER=1 hf_transfer speed-up (huggingface_hub < 1.0 only)
EOF
}

die() {
    echo "error: $*" >&2
    exit 1
}

while [ $# -gt 0 ]; do
    opt=$1
    case $opt in --*) opt=${opt//_/-} ;; esac   # --model_dir works like --model-dir
    case $opt in
        -h | --help) usage; exit 0 ;;
        --original) ORIGINAL=1; shift; continue ;;
        --keep-staging) KEEP_STAGING=1; shift; continue ;;
        --*=*) val=${1#*=}; opt=${opt%%=*}; shift ;;
        --*)
            [ $# -ge 2 ] || die "$1 needs a value (see bash download.sh --help)"
            val=$2; shift 2 ;;
        *) die "unexpected argument '$1' (see bash download.sh --help)" ;;
    esac
    case $opt in
        --model-repo) MODEL_REPO=$val ;;
        --model-revision) MODEL_REVISION=$val ;;
        --model-dir) MODEL_DIR=$val ;;
        --tokenizer-repo) TOKENIZER_REPO=$val ;;
        --tokenizer-revision) TOKENIZER_REVISION=$val ;;
        --tokenizer-dir) TOKENIZER_DIR=$val ;;
        --staging-dir) STAGING_DIR=$val ;;
        --only) ONLY=$val ;;
        *) die "unknown option $opt (see bash download.sh --help)" ;;
    esac
done

case $ONLY in all | model | tokenizer) ;; *) die "--only must be model or tokenizer, got '$ONLY'" ;; esac
case $ORIGINAL in 1 | true | yes) ORIGINAL=1 ;; *) ORIGINAL=0 ;; esac
case $KEEP_STAGING in 1 | true | yes) KEEP_STAGING=1 ;; *) KEEP_STAGING=0 ;; esac
if [ "$ORIGINAL" = 1 ]; then
    MODEL_REVISION=${MODEL_REVISION:-$PINNED_MODEL_REVISION}
    TOKENIZER_REVISION=${TOKENIZER_REVISION:-$PINNED_TOKENIZER_REVISION}
else
    MODEL_REVISION=${MODEL_REVISION:-main}
    TOKENIZER_REVISION=${TOKENIZER_REVISION:-main}
fi

# --------------------------------------------------------------------------- tools

if command -v hf >/dev/null 2>&1; then
    HF=(hf)
elif command -v huggingface-cli >/dev/null 2>&1; then
    HF=(huggingface-cli)
else
    die "the 'hf' command is not installed: pip install -U huggingface_hub"
fi
command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found (set PYTHON=/path/to/python3)"
# the interpreter itself, not a pyenv/conda shim: the helper below runs a dozen times
py_name=$PYTHON
PYTHON=$("$py_name" -c "import sys, huggingface_hub; print(sys.executable)" 2>/dev/null) \
    || die "$py_name cannot import huggingface_hub: $py_name -m pip install -U huggingface_hub"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/higgs-download.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
trap 'echo >&2; echo "error: interrupted; re-run bash download.sh to resume (finished files are kept)" >&2; exit 130' INT TERM

# Small Python helper: hub queries through huggingface_hub's API, size checks, markers.
helper() {
    "$PYTHON" - "$@" <<'PY'
import json, os, sys, time
from pathlib import Path

MARKER = Path(".cache") / "huggingface" / "higgs-download.json"


def gb(n):
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def fail(code, msg):
    print(msg, file=sys.stderr)
    sys.exit(code)


def chain(e):
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__


def explain(e, repo, rev, endpoint):
    """One line for a failed hub call, and an exit code."""
    from huggingface_hub import errors

    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, errors.GatedRepoError):
        return 4, (f"{repo} is gated (HTTP {status}): accept its terms on {endpoint}/{repo} "
                   "and set HF_TOKEN=hf_... (or run: hf auth login)")
    if isinstance(e, errors.RevisionNotFoundError):
        return 5, f"revision '{rev}' not found in {repo} on {endpoint} (HTTP 404)"
    if isinstance(e, errors.RepositoryNotFoundError):
        if status == 401:
            return 4, (f"{repo} on {endpoint}: not found or needs a token (HTTP 401): check the name, "
                       "or set HF_TOKEN=hf_... (or run: hf auth login)")
        return 5, f"repository {repo} not found on {endpoint} (HTTP {status or 404})"
    if isinstance(e, getattr(errors, "OfflineModeIsEnabled", ())) or "offline" in type(e).__name__.lower():
        return 3, "HF_HUB_OFFLINE=1 is set: unset it to download"
    if status in (401, 403):
        return 4, (f"access to {repo} on {endpoint} denied (HTTP {status}): the token is invalid or lacks "
                   "permission; check HF_TOKEN (or run: hf auth login)")
    if status is not None:
        return 1, f"{endpoint} answered HTTP {status} for {repo}@{rev}"
    for c in chain(e):
        name = type(c).__name__
        if any(k in name for k in ("Connect", "Timeout", "Network", "Proxy", "Protocol")) or isinstance(c, OSError):
            detail = str(c).splitlines()[0] if str(c) else name
            return 3, (f"cannot reach {endpoint} ({detail[:120]}); check the network, "
                       "or use a mirror: HF_ENDPOINT=https://hf-mirror.com bash download.sh")
    return 1, f"querying {repo}@{rev} on {endpoint} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def cmd_info(repo, rev, out):
    """Resolve rev to a commit and list the repo's files with their sizes."""
    from huggingface_hub import HfApi, constants

    endpoint = constants.ENDPOINT
    timeout = float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or 30)
    try:
        info = HfApi().model_info(repo, revision=rev, files_metadata=True, timeout=timeout)
    except Exception as e:  # noqa: BLE001 - every failure becomes one line
        code, msg = explain(e, repo, rev, endpoint)
        fail(code, msg)
    files = [(s.rfilename, s.size) for s in info.siblings or []]
    if not info.sha or not files or any(size is None for _, size in files):
        fail(1, f"{endpoint} did not list the files of {repo}@{rev} with their sizes")
    with open(out, "w") as f:
        json.dump({"repo": repo, "revision": rev, "commit": info.sha, "files": dict(files)}, f)
    print(f"{info.sha}\t{len(files)}\t{sum(size for _, size in files)}")


def is_gate(name):
    """Files written last: inference.py refuses a folder without them."""
    return name == "config.json" or name.endswith(".index.json")


def compare(folder, files, skip_gates=False):
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


def cmd_verify(folder, listing, mode="all"):
    """Exit 0 when every listed file is there with the listed size (mode "mark": then write
    the marker; "nogates": ignore the gate files); else say what is wrong, and with "ungate"
    remove the gate files."""
    data = json.load(open(listing))
    files = data["files"]
    bad = compare(folder, files, skip_gates=(mode == "nogates"))
    if mode == "mark" and not bad:
        # same sizes, but written for another commit (main moved on): let hf compare ETags
        try:
            old = json.loads((Path(folder) / MARKER).read_text()).get("commit")
        except (OSError, ValueError):
            old = None
        if old not in (None, data["commit"]):
            fail(1, f"holds commit {old[:12]}, the hub has {data['commit'][:12]}")
    if not bad:
        if mode in ("mark", "ungate"):
            cmd_mark(folder, listing)
        return
    if mode == "ungate":
        cmd_gates(folder, listing)
    name, size, have = bad[0]
    what = "missing" if have is None else f"{have} bytes, the hub lists {size}"
    more = f" (+{len(bad) - 1} more)" if len(bad) > 1 else ""
    fail(1, f"{name}: {what}{more}")


def cmd_prepare(folder, listing):
    """Before downloading: gate files out, stale partial files out, enough disk? Prints the bytes to fetch."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    cmd_gates(folder, listing)
    cmd_clean(folder)
    files = json.load(open(listing))["files"]
    need = sum(size for _, size, _ in compare(folder, files))
    cmd_disk(need, folder)
    print(need)


def cmd_need(folder, listing):
    """Bytes still to download into folder."""
    files = json.load(open(listing))["files"]
    print(sum(size for _, size, _ in compare(folder, files)))


def cmd_total(listing, pattern=""):
    files = json.load(open(listing))["files"]
    print(sum(size for name, size in files.items() if pattern in name))


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
            fail(6, f"not enough disk space for {names[dev]}: {gb(n)} to write (+100 MB headroom), "
                    f"{gb(free[dev])} free; free up {gb(n + margin - free[dev])} or pick another folder")


def cmd_gates(folder, listing):
    """Remove the gate files so that an unfinished folder is refused by inference.py."""
    files = json.load(open(listing))["files"]
    for name in files:
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
    d = Path(folder) / ".cache" / "huggingface" / "download"
    if d.is_dir():
        for p in d.rglob("*.incomplete"):
            p.unlink(missing_ok=True)


def cmd_mark(folder, listing, extra="{}"):
    data = json.load(open(listing))
    data.update(json.loads(extra))
    data["verified_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    path = Path(folder) / MARKER
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def cmd_snapshot(folder, out):
    """Record every file of a converted folder with its size (a listing like cmd_info's)."""
    folder = Path(folder)
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
             if p.is_file() and ".cache" not in p.relative_to(folder).parts}
    json.dump({"files": files}, open(out, "w"))


def cmd_converted(folder, repo, commit):
    """Exit 0 when folder holds a verified conversion of repo@commit."""
    path = Path(folder) / MARKER
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        fail(1, "not converted yet")
    if data.get("source_repo") != repo or data.get("source_commit") != commit:
        fail(1, f"converted from {data.get('source_repo')}@{data.get('source_commit')}")
    bad = compare(folder, data["files"])
    if bad:
        fail(1, f"{bad[0][0]} changed or missing")


def cmd_check(kind, folder, script_dir):
    """The same check inference.py runs before loading."""
    sys.path.insert(0, script_dir)
    import inference

    try:
        (inference.check_model_dir if kind == "model" else inference.check_tokenizer_dir)(folder)
    except inference.UserError as e:
        fail(1, str(e))


def cmd_env():
    """The endpoint, and which transfer paths this huggingface_hub has."""
    import huggingface_hub as hh
    from huggingface_hub import constants
    from importlib.util import find_spec

    if os.environ.get("HF_HUB_DISABLE_XET", "").lower() in ("1", "true", "yes", "on"):
        xet = "off (HF_HUB_DISABLE_XET)"
    else:
        xet = "on" if find_spec("hf_xet") else "not installed (pip install hf_xet)"
    transport = f"huggingface_hub {hh.__version__}, hf_xet {xet}"
    if int(hh.__version__.split(".")[0]) < 1 and find_spec("hf_transfer"):
        transport += ", hf_transfer available"
    print(f"{constants.ENDPOINT}|{transport}")


cmds = {k[4:]: v for k, v in globals().items() if k.startswith("cmd_")}
cmds[sys.argv[1]](*sys.argv[2:])
PY
}

# --------------------------------------------------------------------------- steps

# run a helper step that must succeed: on failure, print its one-line reason and stop
must() {
    local rc=0
    helper "$@" 2>"$WORK/must.err" || rc=$?
    if [ "$rc" != 0 ]; then
        echo "error: $(grep -v '^\s*$' "$WORK/must.err" | tail -n 1)" >&2
        exit "$rc"
    fi
}

IFS='|' read -r ENDPOINT TRANSPORT <<<"$(helper env)"
case $ENDPOINT in
    http://* | https://*) ;;
    *) die "HF_ENDPOINT='$ENDPOINT' must start with http:// or https:// (e.g. https://hf-mirror.com)" ;;
esac
# no once-a-day PyPI / skill hint look-ups from the hf CLI (slow or blocked behind some networks)
export HF_HUB_DISABLE_UPDATE_CHECK=${HF_HUB_DISABLE_UPDATE_CHECK:-1}

# classify a failed `hf download` from its log: one line
hf_failure() {
    local log=$1 repo=$2
    if grep -qiE "No space left on device|ENOSPC|Errno 28" "$log"; then
        echo "disk full while downloading $repo: free some space and re-run bash download.sh"
    elif grep -qE "GatedRepo|40[13] Client Error|403 Forbidden|Unauthorized|Invalid credentials" "$log"; then
        echo "access to $repo denied by $ENDPOINT (HTTP 401/403): check HF_TOKEN (or run: hf auth login)"
    elif grep -qE "Not Found|NotFound|404 Client Error" "$log"; then
        echo "$repo: file or revision not found on $ENDPOINT (HTTP 404)"
    elif grep -qiE "connect|timed? ?out|disconnect|protocol|network|incomplete|Consistency check" "$log"; then
        echo "download of $repo interrupted (network: $(grep -iE "connect|time|disconnect|protocol|incomplete|consistency" "$log" | tail -n 1 | cut -c1-120)); re-run bash download.sh to resume"
    elif grep -qi "Not enough free disk space" "$log"; then
        echo "disk full while downloading $repo: free some space and re-run bash download.sh"
    else
        echo "hf download $repo failed: $(grep -v '^\s*$' "$log" | tail -n 1 | cut -c1-160)"
    fi
}

run_hf() {  # run_hf LOG REPO ARGS... : hf download with its output shown and logged
    local log=$1 repo=$2
    shift 2
    if ! "${HF[@]}" download "$repo" "$@" 2>&1 | tee -a "$log"; then
        die "$(hf_failure "$log" "$repo")"
    fi
}

# fetch_repo NAME REPO REV DIR: download REPO@REV into DIR and verify it (sizes as the hub lists them).
# config.json and *.index.json are written last: until then inference.py refuses the folder.
fetch_repo() {
    local name=$1 repo=$2 rev=$3 dir=$4 listing info commit nfiles total need log why
    listing="$WORK/$name.json"
    log="$WORK/$name.log"
    echo "==> $name: $repo@$rev -> $dir"
    info=$(must info "$repo" "$rev" "$listing") || exit $?
    IFS=$'\t' read -r commit nfiles total <<<"$info"
    echo "    commit ${commit:0:12}, $nfiles files, $(helper_gb "$total")"
    if [ -d "$dir" ] && helper verify "$dir" "$listing" mark 2>/dev/null; then
        echo "    already complete (every file present with the hub's size); nothing to download"
        return 0
    fi
    need=$(must prepare "$dir" "$listing") || exit $?
    echo "    downloading $(helper_gb "$need") ..."
    : >"$log"
    run_hf "$log" "$repo" --revision "$commit" --local-dir "$dir" --exclude "config.json" --exclude "*.index.json"
    why=$(helper verify "$dir" "$listing" nogates 2>&1) \
        || die "$dir is incomplete after downloading ($why); re-run bash download.sh"
    run_hf "$log" "$repo" --revision "$commit" --local-dir "$dir" --include "config.json" --include "*.index.json"
    why=$(helper verify "$dir" "$listing" ungate 2>&1) \
        || die "$dir is incomplete after downloading ($why); re-run bash download.sh"
    echo "    verified: $nfiles files, sizes match the hub (commit ${commit:0:12})"
}

helper_gb() {
    awk -v n="$1" 'BEGIN { if (n >= 1e8) printf "%.2f GB", n / 1e9; else printf "%.1f MB", n / 1e6 }'
}

# convert_repo KIND REPO REV STAGING TARGET: original layout -> transformers-native
convert_repo() {
    local kind=$1 repo=$2 rev=$3 staging=$4 target=$5 listing info commit why weights
    listing="$WORK/$kind.json"
    echo "==> $kind (original layout): $repo@$rev -> $target"
    if [ -d "$target" ] && helper converted "$target" "$repo" "$rev" 2>/dev/null \
        && helper check "$kind" "$target" "$SCRIPT_DIR" 2>/dev/null; then
        echo "    $target already holds a verified conversion of $repo@${rev:0:12}; nothing to do"
        return 0
    fi
    [ -f "$SCRIPT_DIR/convert_weights.py" ] || die "$SCRIPT_DIR/convert_weights.py is missing (needed by --original)"
    # the conversion writes about as much as the original weights take
    info=$(must info "$repo" "$rev" "$listing") || exit $?
    IFS=$'\t' read -r commit _ _ <<<"$info"
    weights=$(helper total "$listing" "")
    local need=$weights
    if [ -d "$staging" ]; then need=$(helper need "$staging" "$listing"); fi
    must disk "$need" "$staging" "$weights" "$target"
    fetch_repo "$kind-original" "$repo" "$commit" "$staging"
    echo "    converting $staging -> $target"
    if [ -d "$target" ]; then helper ungate "$target"; fi
    if ! "$PYTHON" "$SCRIPT_DIR/convert_weights.py" --kind "$kind" --src "$staging" --dst "$target" --force 2>&1 \
        | tee "$WORK/$kind-convert.log"; then
        if [ -d "$target" ]; then helper ungate "$target"; fi
        die "convert_weights.py --kind $kind failed: $(grep -v '^\s*$' "$WORK/$kind-convert.log" | tail -n 1 | cut -c1-160)"
    fi
    why=$(helper check "$kind" "$target" "$SCRIPT_DIR" 2>&1) || die "converted $kind in $target is not loadable: $why"
    helper snapshot "$target" "$WORK/$kind-converted.json"
    helper mark "$target" "$WORK/$kind-converted.json" \
        "{\"source_repo\": \"$repo\", \"source_commit\": \"$commit\", \"converted_by\": \"convert_weights.py\"}"
    echo "    converted and checked: $target"
    if [ "$KEEP_STAGING" = 1 ]; then
        echo "    kept the original download in $staging"
    else
        rm -rf "$staging"
        echo "    removed the original download $staging (keep it with --keep-staging)"
    fi
}

echo "Hub: $ENDPOINT ($TRANSPORT)"
if [ "$ORIGINAL" = 1 ]; then
    [ "$ONLY" = tokenizer ] || convert_repo model "$MODEL_REPO" "$MODEL_REVISION" "$STAGING_DIR/model" "$MODEL_DIR"
    [ "$ONLY" = model ] || convert_repo tokenizer "$TOKENIZER_REPO" "$TOKENIZER_REVISION" "$STAGING_DIR/tokenizer" "$TOKENIZER_DIR"
    [ "$KEEP_STAGING" = 1 ] || rmdir "$STAGING_DIR" 2>/dev/null || true
else
    [ "$ONLY" = tokenizer ] || fetch_repo model "$MODEL_REPO" "$MODEL_REVISION" "$MODEL_DIR"
    [ "$ONLY" = model ] || fetch_repo tokenizer "$TOKENIZER_REPO" "$TOKENIZER_REVISION" "$TOKENIZER_DIR"
fi

next="python3 inference.py --text \"Hello there.\""
[ "$MODEL_DIR" = ./model_cache ] || next+=" --model_path $(printf %q "$MODEL_DIR")"
[ "$TOKENIZER_DIR" = ./tokenizer_cache ] || next+=" --tokenizer_path $(printf %q "$TOKENIZER_DIR")"
echo
echo "Done. Next:"
echo "    $next"
