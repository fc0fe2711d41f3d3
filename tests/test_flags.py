"""One flag spelling across the scripts (--snake_case), the old --kebab-case kept as a hidden alias,
and a --help that lists each flag once with its default (none for flags that are off by default)."""

import re
import subprocess

import pytest

import convert_weights
import eval_audio
import inference
import serve
from conftest import ROOT

PARSERS = {"inference.py": inference.build_parser, "eval_audio.py": eval_audio.build_parser,
           "convert_weights.py": convert_weights.build_parser, "serve.py": serve.build_parser}


def long_flags(parser):
    return [o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"]


@pytest.mark.parametrize("script", sorted(PARSERS))
def test_flags_are_snake_case_with_a_hidden_kebab_alias(script):
    parser = PARSERS[script]()
    help_text = parser.format_help()
    for action in parser._actions:
        names = [o for o in action.option_strings if o.startswith("--") and o != "--help"]
        if not names:
            continue
        canonical = names[0]
        assert "-" not in canonical[2:], f"{script}: {canonical} is not snake_case"
        assert re.search(rf"{re.escape(canonical)}\b", help_text)
        if "_" in canonical:
            alias = "--" + canonical[2:].replace("_", "-")
            assert alias in names, f"{script}: {canonical} has no {alias} alias"
            assert alias not in help_text, f"{script}: --help shows the alias {alias}"


def test_old_spellings_still_parse():
    args = inference.build_parser().parse_args(["--max-new-tokens", "5", "--ref-text", "hi", "--dtype", "bf16"])
    assert (args.max_new_tokens, args.ref_text, args.dtype) == (5, "hi", "bfloat16")
    args = convert_weights.build_parser().parse_args(["--src", "a", "--dst", "b", "--dry-run", "--keep-text-head"])
    assert args.dry_run and args.keep_text_head
    args = eval_audio.build_parser().parse_args(["--output-dir", "x", "--medium-layers", "3"])
    assert (args.output_dir, args.medium_layers) == ("x", 3)


def test_dtype_is_a_closed_choice():
    with pytest.raises(SystemExit):
        inference.build_parser().parse_args(["--dtype", "int8"])


def test_help_shows_defaults_but_not_none_or_false():
    help_text = " ".join(inference.build_parser().format_help().split())
    assert "(default: None)" not in help_text and "(default: False)" not in help_text
    assert "(default: 2048)" in help_text  # --max_new_tokens: from SamplingParams, the one copy of the defaults


def test_sampling_defaults_have_one_source():
    args = inference.build_parser().parse_args([])
    params = inference.sampling_params(args)
    assert params == inference.SamplingParams()


def test_download_sh_shows_snake_case_and_takes_both(tmp_path):
    help_text = subprocess.run(["bash", str(ROOT / "download.sh"), "--help"], capture_output=True, text=True).stdout
    assert "--model_dir DIR" in help_text and "--model-dir DIR" not in help_text
    for spelling in ("--staging_dirr", "--staging-dirr"):  # both reach the same option parser
        proc = subprocess.run(["bash", str(ROOT / "download.sh"), spelling, "x"], capture_output=True, text=True,
                              cwd=tmp_path)
        assert proc.returncode != 0 and "unknown option --staging-dirr" in proc.stderr
