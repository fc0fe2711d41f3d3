#!/usr/bin/env python3
"""Mutation check: each rule below has a test aimed at it; a bug that looks real must make it fail.

For every mutation: copy the repo (tracked + untracked non-ignored files) into a temp dir, check the
original snippet occurs exactly once (else "stale": the code moved, update the entry), apply the
replacement, run `python3 -m pytest -q -x <tests>` there, and report caught / survived.

    python3 tests/mutation_check.py              # baseline run, then every mutation; exit 1 unless all caught
    python3 tests/mutation_check.py --list
    python3 tests/mutation_check.py --only top_k_off_by_one --only ras_window_frozen

Stdlib only; not collected by pytest (no test_ prefix). To add a rule: append an entry to MUTATIONS
with a short unique snippet and the test node id(s) aimed at it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RULES = "tests/test_rules.py"

MUTATIONS = [
    dict(name="top_p_boundary", file="inference.py",
         old="cumulative <= (1 - params.top_p)", new="cumulative < (1 - params.top_p)",
         tests=[f"{RULES}::test_top_p_keeps_a_tie_that_reaches_the_mass_exactly"]),
    dict(name="top_k_off_by_one", file="inference.py",
         old="torch.topk(scores, params.top_k, dim=-1)", new="torch.topk(scores, params.top_k - 1, dim=-1)",
         tests=[f"{RULES}::test_top_k_keeps_exactly_k_codes"]),
    dict(name="ras_window_frozen", file="inference.py",
         old="bufs.window.copy_(window)", new="pass",
         tests=[f"{RULES}::test_ras_window_holds_the_last_fed_frames",
                f"{RULES}::test_ras_breaks_a_model_that_repeats_one_code"]),
    dict(name="atomic_output_direct", file="inference.py",
         old="yield Path(tmp)", new="yield path",
         tests=[f"{RULES}::test_atomic_output_failure_half_way_keeps_the_old_file",
                f"{RULES}::test_wav_write_failing_half_way_keeps_the_old_wav"]),
    dict(name="weight_norm_fold_skipped", file="convert_weights.py",
         old="fold_weight_norm(state[g], state[v])", new="state[v]",
         tests=["tests/test_convert.py::test_tokenizer_weight_norm_folds_g_that_is_not_the_norm_of_v"]),
    dict(name="perf_finite_gate_always_true", file="eval_audio.py",
         old="fin = all(x.finite for x in runs[name])", new="fin = True",
         tests=["tests/test_eval.py::test_non_finite_audio_fails_the_performance_gate"]),
    dict(name="download_verify_skipped", file="download.sh",
         old='must verify-download "$@"', new="true",
         tests=["tests/test_download.py::test_hf_that_exits_0_but_truncates_a_shard_is_caught"]),
    dict(name="ref_audio_not_resampled", file="inference.py",
         old="if rate != SAMPLE_RATE:", new="if False:",
         tests=[f"{RULES}::test_reference_audio_is_resampled_to_24k"]),
    dict(name="captured_frame_not_run", file="inference.py",
         old="graph.replay()  # capture", new="pass  # capture",
         tests=[f"{RULES}::test_captured_frame_is_run_too",
                f"{RULES}::test_graph_replayed_decode_gives_the_eager_codes"]),
    dict(name="reencode_pad_480", file="inference.py",
         old="REENCODE_PAD = 320", new="REENCODE_PAD = 480",
         tests=[f"{RULES}::test_reencode_pads_320_zeros_per_side"]),
    dict(name="position_ids_frozen", file="inference.py",
         old="bufs.position_ids.add_(1)", new="pass",
         tests=[f"{RULES}::test_decode_steps_feed_the_next_position_per_row"]),
    # verified weights: a folder holding other tensors must never load with random weights
    dict(name="header_check_skipped", file="checkpoints.py",
         old="    check_tensors(kind, where, folder_tensors(folder, pickle_ok=kind in PICKLE_KINDS), expected)",
         new="    folder_tensors(folder, pickle_ok=kind in PICKLE_KINDS)",
         tests=["tests/test_weights.py::test_codec_folder_holding_the_generation_model_is_refused"]),
    dict(name="loading_report_ignored", file="inference.py",
         old='        checkpoints.check_loading_info("tokenizer", tokenizer_path, info)', new="        pass",
         tests=["tests/test_weights.py::test_loading_report_is_checked_after_the_header_check"]),
    # user text is data: special-token strings in it must not become prompt structure
    dict(name="user_text_parsed_as_control", file="inference.py",
         old="tokenize=True, sanitize_control_tokens=True,", new="tokenize=True, sanitize_control_tokens=False,",
         tests=["tests/test_prompt_text.py::test_special_token_strings_in_user_text_stay_text"]),
    # long texts and streaming
    dict(name="stream_context_0", file="inference.py", old="STREAM_CONTEXT = 10", new="STREAM_CONTEXT = 0",
         tests=["tests/test_longform.py::test_windowed_decode_matches_one_decode_only_with_context"]),
    dict(name="chunk_history_dropped", file="inference.py",
         old="history=[(chunks[i], kept_codes[i].T) for i in turns])", new="history=[])",
         tests=["tests/test_longform.py::test_chunk_prompt_holds_reference_and_previous_chunks_codes"]),
    dict(name="chunk_seed_stride_1", file="inference.py", old="CHUNK_SEED_STRIDE = 2**32",
         new="CHUNK_SEED_STRIDE = 1", tests=["tests/test_longform.py::test_chunk_seeds_never_collide_with_retries"]),
    dict(name="split_inside_quotes", file="inference.py", old="    for start, end in _quoted_spans(text):",
         new="    for start, end in []:", tests=["tests/test_longform.py::test_no_cut_inside_quotes_or_brackets_that_fit"]),
    dict(name="batch_row_over_its_budget", file="inference.py",
         old="gen = within_budget(gen, budgets[i])", new="pass",
         tests=["tests/test_longform.py::test_runaway_rows_of_a_batch_stop_at_their_own_budget_and_are_retried"]),
    dict(name="batch_without_frame_budget", file="inference.py",
         old="budgets = [chunk_frame_budget(r.text, params.max_new_tokens, num_cb) for r in requests]",
         new="budgets = [params.max_new_tokens for r in requests]",
         tests=["tests/test_longform.py::test_a_text_sounds_the_same_batched_alone_chunked_or_streamed"]),
    dict(name="range_ignored_not_noticed", file="hub.py",
         old="return response.status_code == 206  # closed unread otherwise", new="return True",
         tests=["tests/test_download.py::test_a_mirror_that_ignores_range_still_gets_the_header_check"]),
    dict(name="no_runaway_guard", file="inference.py",
         old="guard = runaway_guard(text, stats[:, 0], gen.finished)", new="guard = Guard(len(stats), None)",
         tests=["tests/test_longform.py::test_runaway_chunk_is_retried_with_the_next_seed",
                "tests/test_longform.py::test_runaway_rows_of_a_batch_stop_at_their_own_budget_and_are_retried"]),
]


def repo_files() -> list[str]:
    def git(*args):
        out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", *args], capture_output=True, check=True)
        return [p for p in out.stdout.decode().split("\0") if p]

    files = git() + git("--others", "--exclude-standard")
    return sorted({p for p in files if (ROOT / p).is_file()})  # a tracked file deleted in the tree is skipped


def copy_repo(dst: Path) -> None:
    for rel in repo_files():
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)


def run_pytest(tree: Path, tests: list[str], timeout: float) -> tuple[int | None, str]:
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    try:
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, ""
    return proc.returncode, proc.stdout + proc.stderr


def failed_line(output: str) -> str:
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line
    return ""


def check(m: dict, timeout: float) -> tuple[str, float, str]:
    """(result, seconds, detail); result: caught | survived | stale | error | timeout."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"mutant-{m['name']}-") as tmp:
        tree = Path(tmp)
        copy_repo(tree)
        path = tree / m["file"]
        text = path.read_text(encoding="utf-8") if path.is_file() else ""
        count = text.count(m["old"])
        if count != 1:
            return "stale", time.perf_counter() - t0, f"snippet found {count} times in {m['file']}"
        path.write_text(text.replace(m["old"], m["new"]), encoding="utf-8")
        rc, output = run_pytest(tree, m["tests"], timeout)
    seconds = time.perf_counter() - t0
    if rc is None:
        return "timeout", seconds, f"pytest ran over {timeout:.0f}s"
    if rc == 1:
        return "caught", seconds, failed_line(output)
    if rc == 0:
        return "survived", seconds, "every listed test passed with the bug in"
    tail = "\n".join(output.strip().splitlines()[-15:])
    return "error", seconds, f"pytest exit {rc} (not a test failure: collection or usage error)\n{tail}"


def baseline(mutations: list[dict], timeout: float) -> bool:
    """The listed tests must pass on the unmutated tree, or a "caught" means nothing."""
    tests = list(dict.fromkeys(t for m in mutations for t in m["tests"]))
    with tempfile.TemporaryDirectory(prefix="mutant-baseline-") as tmp:
        copy_repo(Path(tmp))
        t0 = time.perf_counter()
        rc, output = run_pytest(Path(tmp), tests, timeout)
    if rc == 0:
        print(f"baseline: {len(tests)} tests pass unmutated ({time.perf_counter() - t0:.0f}s)", flush=True)
        return True
    print(f"baseline FAILED (pytest exit {rc}): fix the tests before checking mutations", file=sys.stderr)
    print("\n".join(output.strip().splitlines()[-20:]), file=sys.stderr)
    return False


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Apply each listed one-line bug and check its tests catch it.")
    p.add_argument("--only", action="append", metavar="NAME", help="check only this mutation (repeatable)")
    p.add_argument("--list", action="store_true", help="list the mutations and their tests, run nothing")
    p.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the listed tests")
    p.add_argument("--timeout", type=float, default=600, help="seconds per pytest run")
    args = p.parse_args(argv)

    names = [m["name"] for m in MUTATIONS]
    if len(set(names)) != len(names):
        print("error: duplicate mutation names", file=sys.stderr)
        return 2
    unknown = sorted(set(args.only or []) - set(names))
    if unknown:
        print(f"error: --only {', '.join(unknown)}: unknown (see --list)", file=sys.stderr)
        return 2
    chosen = [m for m in MUTATIONS if not args.only or m["name"] in args.only]
    if args.list:
        for m in chosen:
            print(f"{m['name']:<30} {m['file']:<20} {m['old']!r} -> {m['new']!r}")
            for t in m["tests"]:
                print(f"{'':<30} {t}")
        return 0

    if not args.no_baseline and not baseline(chosen, args.timeout):
        return 1
    rows = []
    for m in chosen:
        print(f"checking {m['name']} ...", flush=True)
        result, seconds, detail = check(m, args.timeout)
        rows.append((m, result, seconds, detail))
        if result != "caught":
            print(f"  {result}: {detail}", flush=True)

    print()
    print(f"{'mutation':<30} {'file':<20} {'result':<9} {'time':>6}  caught by")
    for m, result, seconds, detail in rows:
        by = detail.split(" - ")[0].removeprefix("FAILED ").removeprefix("ERROR ") if result == "caught" else ""
        print(f"{m['name']:<30} {m['file']:<20} {result:<9} {seconds:5.0f}s  {by}")
    bad = [m["name"] for m, result, _, _ in rows if result != "caught"]
    print(f"\n{len(rows) - len(bad)}/{len(rows)} caught" + (f"; not caught: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
