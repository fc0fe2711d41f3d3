#!/usr/bin/env bash
# Fetch the Higgs Audio V2 checkpoints for inference.py:
#   generation model -> ./model_cache      audio tokenizer -> ./tokenizer_cache
# Run `bash download.sh --help` for the options. The Python half is hub.py.
set -euo pipefail

# Where each checkpoint comes from, tried in this order: the first source whose safetensors headers
# hold the tensors transformers builds from its config.json is downloaded (read through HTTP Range,
# before any weight is fetched). REPO[/SUBFOLDER][@REVISION]; "original" = Boson's original layout at
# the pinned revision below, converted with convert_weights.py.
MODEL_SOURCES=(
    bosonai/higgs-audio-v2-generation-3B-base
    eustlb/higgs-audio-v2-generation-3B-base      # the copy transformers' docs and tests use
    original
)
TOKENIZER_SOURCES=(
    bosonai/higgs-audio-v2-tokenizer              # its model.safetensors was seen holding a copy of the 3B LM
    eustlb/higgs-audio-v2-tokenizer               # the codec transformers' docs and tests use
    k2-fsa/OmniVoice/audio_tokenizer              # the same codec inside OmniVoice (~806 MB; that repo's licence)
    original
)
ORIGINAL_MODEL_REPO=bosonai/higgs-audio-v2-generation-3B-base
ORIGINAL_TOKENIZER_REPO=bosonai/higgs-audio-v2-tokenizer
PINNED_MODEL_REVISION=10840182ca4ad5d9d9113b60b9bb3c1ef1ba3f84
PINNED_TOKENIZER_REVISION=9d4988fbd4ad07b4cac3a5fa462741a41810dbec

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHON=${PYTHON:-python3}

MODEL_REPO=${HIGGS_MODEL_REPO:-}
TOKENIZER_REPO=${HIGGS_TOKENIZER_REPO:-}
MODEL_REVISION=${HIGGS_MODEL_REVISION:-}
TOKENIZER_REVISION=${HIGGS_TOKENIZER_REVISION:-}
MODEL_DIR=${HIGGS_MODEL_DIR:-./model_cache}
TOKENIZER_DIR=${HIGGS_TOKENIZER_DIR:-./tokenizer_cache}
STAGING_DIR=${HIGGS_STAGING_DIR:-./original_cache}
ORIGINAL=${HIGGS_ORIGINAL:-0}
KEEP_STAGING=${HIGGS_KEEP_STAGING:-0}
ONLY=${HIGGS_ONLY:-all}
EVAL_MODELS=${HIGGS_EVAL_MODELS:-0}
ASR_MODEL_REPO=${HIGGS_ASR_MODEL_REPO:-openai/whisper-large-v3}
SV_MODEL_REPO=${HIGGS_SV_MODEL_REPO:-microsoft/wavlm-base-plus-sv}
EVAL_DIR=${HIGGS_EVAL_DIR:-./eval_models}

usage() {
    cat <<EOF
Usage: bash download.sh [options]

Downloads the Higgs Audio V2 generation model and audio tokenizer with the
huggingface_hub CLI (hf download) and verifies them, ready for inference.py.

Before downloading, each source below is checked in order: its config.json and the
headers of its safetensors files (HTTP Range reads, 100 kB each) must hold exactly the
tensors that transformers builds from that config.json. The first one that does is
downloaded; the others are listed with the reason they were skipped. After the download
the local files are checked again (sizes and headers) before the folder counts as done.
  generation model: ${MODEL_SOURCES[*]}
  audio tokenizer:  ${TOKENIZER_SOURCES[*]}
("original": Boson's original layout at a pinned revision, converted with convert_weights.py.)

Re-running resumes an interrupted download: finished files are kept (a file cut off
mid-way starts again), and a folder that already holds a verified download is skipped.
What hf printed (tracebacks included) goes to DIR/.cache/higgs-download/download.log.

Options (each also settable by the environment variable in brackets; the
--kebab-case spellings, e.g. --model-dir, work too):
  --model_repo ID          use only this generation model repo: ID or ID/SUBFOLDER;
                           one that fails the check is an error   [HIGGS_MODEL_REPO]
  --model_revision REV     branch, tag or commit (default: main)  [HIGGS_MODEL_REVISION]
                           (without --model_repo: of ${MODEL_SOURCES[0]} only)
  --model_dir DIR          target folder          [HIGGS_MODEL_DIR] (default: ./model_cache)
  --tokenizer_repo ID      use only this audio tokenizer repo, e.g. eustlb/higgs-audio-v2-tokenizer
                           or k2-fsa/OmniVoice/audio_tokenizer (a subfolder: its files land
                           at the top of the target folder)       [HIGGS_TOKENIZER_REPO]
  --tokenizer_revision REV branch, tag or commit (default: main)  [HIGGS_TOKENIZER_REVISION]
                           (without --tokenizer_repo: of ${TOKENIZER_SOURCES[0]} only)
  --tokenizer_dir DIR      target folder          [HIGGS_TOKENIZER_DIR] (default: ./tokenizer_cache)
  --only model|tokenizer   fetch just one of the two                 [HIGGS_ONLY]
  --original               fetch only Boson's original-layout checkpoints at their pinned
                           revisions (model ${PINNED_MODEL_REVISION:0:12}, tokenizer ${PINNED_TOKENIZER_REVISION:0:12})
                           into the staging folder, then convert them into the target
                           folders with convert_weights.py           [HIGGS_ORIGINAL=1]
  --staging_dir DIR        where original-layout downloads go (default: ./original_cache)
                                                                     [HIGGS_STAGING_DIR]
  --keep_staging           keep the original-layout download after converting
                                                                     [HIGGS_KEEP_STAGING=1]
  --eval_models            fetch instead the models eval_audio.py --mode quality and
                           inference.py --asr_check use (docs/quality.md): a Whisper ASR model
                           and a WavLM speaker-verification model, into EVAL_DIR/NAME,
                           checked like the rest (only the files their transformers
                           classes read)                             [HIGGS_EVAL_MODELS=1]
  --asr_model_repo ID      Whisper repo (default: openai/whisper-large-v3, ~3.1 GB; any
                           openai/whisper-* size works)              [HIGGS_ASR_MODEL_REPO]
  --sv_model_repo ID       speaker-verification repo (default: microsoft/wavlm-base-plus-sv)
                                                                     [HIGGS_SV_MODEL_REPO]
  --eval_dir DIR           where --eval_models go (default: ./eval_models) [HIGGS_EVAL_DIR]
  -h, --help               show this help

Environment read by huggingface_hub:
  HF_ENDPOINT   hub or mirror to use, e.g. HF_ENDPOINT=https://hf-mirror.com bash download.sh
  HF_TOKEN      access token (or log in once with: hf auth login)
  HF_XET_HIGH_PERFORMANCE=1   more parallel Xet transfers (needs the hf_xet package)
  HF_HUB_ENABLE_HF_TRANSFER=1 hf_transfer speed-up (huggingface_hub < 1.0 only)
PYTHON=/path/to/python picks the interpreter; the hf CLI next to it is used first (a venv
works without being activated), then the one on PATH.
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
        --eval-models) EVAL_MODELS=1; shift; continue ;;
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
        --asr-model-repo) ASR_MODEL_REPO=$val ;;
        --sv-model-repo) SV_MODEL_REPO=$val ;;
        --eval-dir) EVAL_DIR=$val ;;
        *) die "unknown option $opt (see bash download.sh --help)" ;;
    esac
done

case $ONLY in all | model | tokenizer) ;; *) die "--only must be model or tokenizer, got '$ONLY'" ;; esac
case $ORIGINAL in 1 | true | yes) ORIGINAL=1 ;; *) ORIGINAL=0 ;; esac
case $KEEP_STAGING in 1 | true | yes) KEEP_STAGING=1 ;; *) KEEP_STAGING=0 ;; esac
case $EVAL_MODELS in 1 | true | yes) EVAL_MODELS=1 ;; *) EVAL_MODELS=0 ;; esac

# sources KIND: the candidates as hub.py takes them, after "EXPLICIT" (1: the user named one source)
sources() {
    local repo rev list src
    if [ "$1" = model ]; then
        repo=$MODEL_REPO rev=$MODEL_REVISION list=("${MODEL_SOURCES[@]}")
        src="original:$ORIGINAL_MODEL_REPO@$PINNED_MODEL_REVISION"
    else
        repo=$TOKENIZER_REPO rev=$TOKENIZER_REVISION list=("${TOKENIZER_SOURCES[@]}")
        src="original:$ORIGINAL_TOKENIZER_REPO@$PINNED_TOKENIZER_REVISION"
    fi
    if [ -n "$repo$rev" ]; then
        repo=${repo:-${list[0]}}
        case $repo in *@*) echo 1 "$repo" ;; *) echo 1 "$repo@${rev:-main}" ;; esac
    else
        echo 0 "${list[@]/#original/$src}"
    fi
}

# --------------------------------------------------------------------------- tools

command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found (set PYTHON=/path/to/python3)"
# the interpreter itself, not a pyenv/conda shim: hub.py runs a dozen times
py_given=$PYTHON
PYTHON=$("$py_given" -c "import sys, huggingface_hub; print(sys.executable)" 2>/dev/null) \
    || die "$py_given cannot import huggingface_hub: $py_given -m pip install -U huggingface_hub"
[ -f "$SCRIPT_DIR/hub.py" ] || die "$SCRIPT_DIR/hub.py is missing (download.sh needs it next to it)"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/higgs-download.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
trap 'echo >&2; echo "error: interrupted; re-run bash download.sh to resume (finished files are kept)" >&2; exit 130' INT TERM

helper() {
    "$PYTHON" "$SCRIPT_DIR/hub.py" "$@"
}

# run a helper step that must succeed: on failure, print its one-line reason and stop
# (a traceback is a bug in hub.py: shown whole)
must() {
    local rc=0
    helper "$@" 2>"$WORK/must.err" || rc=$?
    if [ "$rc" != 0 ]; then
        if grep -q "^Traceback (most recent call last)" "$WORK/must.err"; then
            cat "$WORK/must.err" >&2
            echo "error: hub.py $1 failed (a bug: the traceback is above)" >&2
        else
            echo "error: $(grep -v '^\s*$' "$WORK/must.err" | tail -n 1)" >&2
        fi
        exit "$rc"
    fi
}

# no once-a-day PyPI / skill hint look-ups from the hf CLI (slow or blocked behind some networks)
export HF_HUB_DISABLE_UPDATE_CHECK=${HF_HUB_DISABLE_UPDATE_CHECK:-1}
IFS='|' read -r ENDPOINT TRANSPORT HF_CLI <<<"$(helper env "$py_given")"
case $ENDPOINT in
    http://* | https://*) ;;
    *) die "HF_ENDPOINT='$ENDPOINT' must start with http:// or https:// (e.g. https://hf-mirror.com)" ;;
esac
[ -n "$HF_CLI" ] || die "the 'hf' command is not installed: pip install -U huggingface_hub"

# --------------------------------------------------------------------------- steps

# run_hf LOG REPO ARGS...: hf download; its progress bars are shown, everything it prints is logged
run_hf() {
    local log=$1 repo=$2 status
    shift 2
    echo "== $(date '+%F %T') $HF_CLI download $repo $*" >>"$log"
    set +e
    "$HF_CLI" download "$repo" "$@" 2>&1 | "$PYTHON" "$SCRIPT_DIR/hub.py" filter "$log"
    status=("${PIPESTATUS[@]}")
    set -e
    [ "${status[1]}" = 0 ] || exit "${status[1]}"   # Ctrl-C
    [ "${status[0]}" = 0 ] || die "$(helper failure "$log" "$repo" "$ENDPOINT")"
}

# verify_download KIND DIR LISTING weights|all: the post-download verification (sizes; at the end
# also the headers against the tensors checked on the hub, and inference.py's folder check)
verify_download() {
    must verify-download "$@"
}

helper_gb() {
    awk -v n="$1" 'BEGIN { if (n >= 1e8) printf "%.2f GB", n / 1e9; else printf "%.1f MB", n / 1e6 }'
}

# fetch_repo NAME KIND LISTING DIR: download the source in LISTING into DIR and verify it.
# config.json and *.index.json are written last: until then inference.py refuses the folder.
fetch_repo() {
    local name=$1 kind=$2 listing=$3 dir=$4 label repo commit sub nfiles total need log stage files
    IFS=$'\t' read -r label repo commit sub _ nfiles total <<<"$(helper describe "$listing")"
    echo "==> $name: $label -> $dir"
    echo "    commit ${commit:0:12}, $nfiles files, $(helper_gb "$total")"
    if [ -d "$dir" ] && helper verify "$dir" "$listing" 2>/dev/null; then
        echo "    already complete (every file present with the hub's size, tensors verified); nothing to download"
        return 0
    fi
    need=$(must prepare "$dir" "$listing") || exit $?
    log="$dir/.cache/higgs-download/download.log"
    mkdir -p "$(dirname "$log")"
    : >"$log"
    echo "    downloading $(helper_gb "$need") ..."
    if [ "$sub" = - ] && [ "$(helper only "$listing")" = 1 ]; then
        # only the listed files (a repo may hold its weights in several formats)
        mapfile -t files < <(helper files "$listing" weights)
        [ "${#files[@]}" = 0 ] || run_hf "$log" "$repo" "${files[@]}" --revision "$commit" --local-dir "$dir"
        verify_download "$kind" "$dir" "$listing" weights
        mapfile -t files < <(helper files "$listing" gates)
        [ "${#files[@]}" = 0 ] || run_hf "$log" "$repo" "${files[@]}" --revision "$commit" --local-dir "$dir"
    elif [ "$sub" = - ]; then
        run_hf "$log" "$repo" --revision "$commit" --local-dir "$dir" --exclude "config.json" --exclude "*.index.json"
        verify_download "$kind" "$dir" "$listing" weights
        run_hf "$log" "$repo" --revision "$commit" --local-dir "$dir" --include "config.json" --include "*.index.json"
    else
        # a subfolder source: hf writes SUBFOLDER/... under the stage, whose files then move to the top
        stage="$dir/.cache/higgs-download/stage"
        mapfile -t files < <(helper files "$listing" weights)
        [ "${#files[@]}" = 0 ] || run_hf "$log" "$repo" "${files[@]}" --revision "$commit" --local-dir "$stage"
        helper unstage "$dir" "$listing" weights
        verify_download "$kind" "$dir" "$listing" weights
        mapfile -t files < <(helper files "$listing" gates)
        [ "${#files[@]}" = 0 ] || run_hf "$log" "$repo" "${files[@]}" --revision "$commit" --local-dir "$stage"
        helper unstage "$dir" "$listing" gates
    fi
    verify_download "$kind" "$dir" "$listing" all
    if [ "$kind" = none ]; then
        echo "    verified: $nfiles files, sizes match the hub (commit ${commit:0:12})"
    else
        echo "    verified: $nfiles files, sizes match the hub, tensors match the checked source (commit ${commit:0:12})"
    fi
}

# convert_repo KIND REPO REV STAGING TARGET: original layout -> transformers-native
convert_repo() {
    local kind=$1 repo=$2 rev=$3 staging=$4 target=$5 listing info commit why weights
    listing="$WORK/$kind-original.json"
    echo "==> $kind (original layout): $repo@$rev -> $target"
    if [ -d "$target" ] && helper converted "$target" "$repo" "$rev" 2>/dev/null \
        && helper check "$kind" "$target" 2>/dev/null; then
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
    fetch_repo "$kind-original" none "$listing" "$staging"
    echo "    converting $staging -> $target"
    if [ -d "$target" ]; then helper ungate "$target"; fi
    if ! "$PYTHON" "$SCRIPT_DIR/convert_weights.py" --kind "$kind" --src "$staging" --dst "$target" --force 2>&1 \
        | tee "$WORK/$kind-convert.log"; then
        if [ -d "$target" ]; then helper ungate "$target"; fi
        die "convert_weights.py --kind $kind failed: $(grep -v '^\s*$' "$WORK/$kind-convert.log" | tail -n 1 | cut -c1-160)"
    fi
    if ! why=$(helper check "$kind" "$target" 2>&1); then
        helper ungate "$target"
        die "converted $kind in $target is not loadable: $(echo "$why" | tail -n 1)"
    fi
    helper snapshot "$target" "$WORK/$kind-converted.json"
    helper mark "$target" "$WORK/$kind-converted.json" \
        "{\"source_repo\": \"$repo\", \"source_commit\": \"$commit\", \"converted_by\": \"convert_weights.py\"}"
    echo "    converted and checked: $target"
    if [ "$KEEP_STAGING" = 1 ]; then
        echo "    kept the original download in $staging"
    else
        rm -rf "$staging"
        echo "    removed the original download $staging (keep it with --keep_staging)"
    fi
}

# fetch_kind KIND DIR: download (or convert) the source picked for KIND
fetch_kind() {
    local kind=$1 dir=$2 label repo commit original
    IFS=$'\t' read -r label repo commit _ original _ _ <<<"$(helper describe "$WORK/$kind.json")"
    if [ "$original" = original ]; then
        convert_repo "$kind" "$repo" "$commit" "$STAGING_DIR/$kind" "$dir"
    else
        fetch_repo "$kind" "$kind" "$WORK/$kind.json" "$dir"
    fi
}

echo "Hub: $ENDPOINT ($TRANSPORT; $HF_CLI)"
if [ "$EVAL_MODELS" = 1 ]; then
    # each folder is named after its repo: openai/whisper-small -> EVAL_DIR/whisper-small
    asr_dir="$EVAL_DIR/${ASR_MODEL_REPO##*/}" sv_dir="$EVAL_DIR/${SV_MODEL_REPO##*/}"
    echo "Checking sources (safetensors headers against what transformers builds from each config.json):"
    must pick "$WORK" whisper "$asr_dir" 1 "$ASR_MODEL_REPO" -- wavlm-sv "$sv_dir" 1 "$SV_MODEL_REPO"
    fetch_repo whisper whisper "$WORK/whisper.json" "$asr_dir"
    fetch_repo wavlm-sv wavlm-sv "$WORK/wavlm-sv.json" "$sv_dir"
    next="python3 eval_audio.py --mode quality"
    [ "$asr_dir" = ./eval_models/whisper-large-v3 ] || next+=" --asr_model $(printf %q "$asr_dir")"
    [ "$sv_dir" = ./eval_models/wavlm-base-plus-sv ] || next+=" --sv_model $(printf %q "$sv_dir")"
    echo
    echo "Done. Next:"
    echo "    $next"
    exit 0
fi
if [ "$ORIGINAL" = 1 ]; then
    [ "$ONLY" = tokenizer ] || convert_repo model "${MODEL_REPO:-$ORIGINAL_MODEL_REPO}" \
        "${MODEL_REVISION:-$PINNED_MODEL_REVISION}" "$STAGING_DIR/model" "$MODEL_DIR"
    [ "$ONLY" = model ] || convert_repo tokenizer "${TOKENIZER_REPO:-$ORIGINAL_TOKENIZER_REPO}" \
        "${TOKENIZER_REVISION:-$PINNED_TOKENIZER_REVISION}" "$STAGING_DIR/tokenizer" "$TOKENIZER_DIR"
else
    plan=()
    # shellcheck disable=SC2046  # word splitting of the source list is meant
    [ "$ONLY" = tokenizer ] || plan+=(model "$MODEL_DIR" $(sources model) --)
    # shellcheck disable=SC2046
    [ "$ONLY" = model ] || plan+=(tokenizer "$TOKENIZER_DIR" $(sources tokenizer) --)
    echo "Checking sources (safetensors headers against what transformers builds from each config.json):"
    must pick "$WORK" "${plan[@]}"
    [ "$ONLY" = tokenizer ] || fetch_kind model "$MODEL_DIR"
    [ "$ONLY" = model ] || fetch_kind tokenizer "$TOKENIZER_DIR"
fi
[ "$KEEP_STAGING" = 1 ] || rmdir "$STAGING_DIR" 2>/dev/null || true

next="python3 inference.py --text \"Hello there.\""
[ "$MODEL_DIR" = ./model_cache ] || next+=" --model_path $(printf %q "$MODEL_DIR")"
[ "$TOKENIZER_DIR" = ./tokenizer_cache ] || next+=" --tokenizer_path $(printf %q "$TOKENIZER_DIR")"
echo
echo "Done. Next:"
echo "    $next"
