"""convert_weights.py on the Boson fixture (tests/fixtures/boson): variants, refusals, CLI contract."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "boson"
sys.path.insert(0, str(ROOT))

import convert_weights  # noqa: E402


def run(argv, capsys):
    rc = convert_weights.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def run_cli(*argv):
    return subprocess.run([sys.executable, str(ROOT / "convert_weights.py"), *map(str, argv)],
                          capture_output=True, text=True, timeout=300)


def load_folder(path: Path) -> dict:
    tensors = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def assert_nothing_written(dst: Path):
    assert not dst.exists()
    assert not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")], "temp folder left behind"


def copy_model(tmp_path: Path, name="src") -> Path:
    dst = tmp_path / name
    shutil.copytree(FIXTURE / "model", dst)
    return dst


def edit_config(src: Path, **changes):
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (src / "config.json").write_text(json.dumps(cfg))


def add_tensor(src: Path, name: str, tensor: torch.Tensor):
    """Add a tensor to the last shard and to the index, as a checkpoint with extra weights has it."""
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    tensors = load_file(src / shard)
    tensors[name] = tensor
    save_file(tensors, src / shard, metadata={"format": "pt"})
    index["weight_map"][name] = shard
    (src / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("converted")
    for kind in ("model", "tokenizer"):
        assert convert_weights.main(["--src", str(FIXTURE / kind), "--dst", str(out / kind), "--no-verify"]) == 0
    return out / "model", out / "tokenizer"


# --------------------------------------------------------------------------- generation model


def test_model_folder_is_a_complete_model_path(converted):
    import inference
    import tiny_checkpoints

    model, _ = converted
    inference.check_model_dir(model)
    cfg = json.loads((model / "config.json").read_text())
    boson = json.loads((FIXTURE / "model" / "config.json").read_text())
    tokens = {t["content"]: t["id"] for t in json.loads((model / "tokenizer.json").read_text())["added_tokens"]}
    assert cfg["model_type"] == "higgs_audio_v2" and cfg["dtype"] == "bfloat16"
    assert cfg["num_codebooks"] == 8 and cfg["codebook_size"] == 1026
    assert cfg["audio_token_id"] == boson["audio_out_token_idx"] == tokens["<|AUDIO_OUT|>"]
    assert cfg["audio_bos_token_id"] == boson["audio_out_bos_token_id"] == tokens["<|audio_out_bos|>"]
    assert cfg["audio_delay_token_id"] == tokens["<|reserved_special_token_6|>"]
    rope = boson["text_config"]["rope_scaling"]
    assert cfg["rope_parameters"] == {**rope, "rope_theta": boson["text_config"]["rope_theta"]}
    gen = json.loads((model / "generation_config.json").read_text())
    assert (gen["eos_token_id"], gen["pad_token_id"]) == (tokens["<|eot_id|>"], tokens["<|end_of_text|>"])
    assert (gen["ras_win_len"], gen["ras_win_max_num_repeat"]) == (7, 2)
    assert (model / "chat_template.jinja").read_text() == tiny_checkpoints.CHAT_TEMPLATE_PATH.read_text()
    assert json.loads((model / "processor_config.json").read_text())["audio_token"] == "<|AUDIO_OUT|>"
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (model / name).read_bytes() == (FIXTURE / "model" / name).read_bytes()


def test_model_tensors_are_the_originals(converted):
    ours = load_folder(converted[0])
    boson = load_folder(FIXTURE / "model")
    assert "text_lm_head.weight" not in ours  # dropped by default
    assert torch.equal(ours["model.embed_tokens.weight"], boson["embed_tokens.weight"])
    assert torch.equal(ours["audio_lm_head.weight"], boson["audio_decoder_proj.audio_lm_head.weight"])
    assert torch.equal(ours["model.embed_audio_tokens.embed_audio_tokens.weight"], boson["audio_codebook_embeddings.weight"])
    for key, value in boson.items():
        if key.startswith("layers."):
            assert torch.equal(ours[f"model.{key}"], value), key
    assert len(ours) == len(boson) - 1


def test_split_partially_frozen_variant_converts_to_identical_tensors(converted, tmp_path, capsys):
    """A fine-tune with PartiallyFrozenEmbedding / PartiallyFrozenLinear, in one model.safetensors."""
    src = copy_model(tmp_path)
    tensors = load_folder(src)
    for f in src.glob("model*.safetensors*"):
        f.unlink()
    emb = tensors.pop("embed_tokens.weight")
    tensors["embed_tokens.embedding_frozen.weight"], tensors["embed_tokens.embedding_trainable.weight"] = emb[:700], emb[700:]
    for head in ("audio_lm_head", "text_lm_head"):
        w = tensors.pop(f"audio_decoder_proj.{head}.weight")
        tensors[f"audio_decoder_proj.{head}.linear_frozen.weight"] = w[:100].clone()
        tensors[f"audio_decoder_proj.{head}.linear_trainable.weight"] = w[100:].clone()
    save_file({k: v.contiguous() for k, v in tensors.items()}, src / "model.safetensors", metadata={"format": "pt"})
    rc, out, err = run(["--src", src, "--dst", tmp_path / "split", "--no-verify", "--keep-text-head"], capsys)
    assert rc == 0, err
    split, plain = load_folder(tmp_path / "split"), load_folder(converted[0])
    assert set(split) == set(plain) | {"text_lm_head.weight"}
    for key in plain:
        assert torch.equal(split[key], plain[key]), key
    assert torch.equal(split["text_lm_head.weight"], load_folder(FIXTURE / "model")["audio_decoder_proj.text_lm_head.weight"])


def test_keep_text_head_loads(tmp_path, capsys):
    rc, out, err = run(["--src", FIXTURE / "model", "--dst", tmp_path / "m", "--keep-text-head"], capsys)
    assert rc == 0, err
    assert "verified" in out and "text_lm_head.weight" in load_folder(tmp_path / "m")


def test_fast_forward_config_refused_through_cli(tmp_path):
    src = copy_model(tmp_path)
    edit_config(src, audio_adapter_type="dual_ffn_fast_forward", audio_dual_ffn_layers=[1])
    dst = tmp_path / "out"
    proc = run_cli("--src", src, "--dst", dst)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "fast-forward" in proc.stderr and "1 of 2 layers" in proc.stderr
    assert_nothing_written(dst)


@pytest.mark.parametrize("changes, words", [
    ({"use_audio_out_self_attention": True}, "audio self-attention"),
    ({"use_rq_transformer": True}, "RQ-transformer"),
    ({"use_delay_pattern": False}, "delay pattern"),
    ({"audio_adapter_type": "stack"}, "dual FFN"),
    ({"audio_decoder_proj_num_layers": 2}, "audio head"),
])
def test_inexpressible_configs_refused(tmp_path, capsys, changes, words):
    src = copy_model(tmp_path)
    edit_config(src, **changes)
    rc, out, err = run(["--src", src, "--dst", tmp_path / "out"], capsys)
    assert rc == 2 and words in err
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("name, words", [
    ("some_adapter.proj.weight", "unknown tensor name(s) in the generation checkpoint: some_adapter.proj.weight"),
    ("audio_tower.layers.0.fc1.weight", "audio tower"),
    ("layers.0.audio_attn.q_proj.weight", "audio self-attention"),
])
def test_unknown_or_inexpressible_keys_named(tmp_path, capsys, name, words):
    src = copy_model(tmp_path)
    add_tensor(src, name, torch.zeros(4, 4, dtype=torch.bfloat16))
    rc, out, err = run(["--src", src, "--dst", tmp_path / "out"], capsys)
    assert rc == 2 and words in err and name in err
    assert_nothing_written(tmp_path / "out")


def test_truncated_shard(tmp_path, capsys):
    src = copy_model(tmp_path)
    shard = src / "model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    rc, out, err = run(["--src", src, "--dst", tmp_path / "out"], capsys)
    assert rc == 2 and "model-00002-of-00003.safetensors is truncated" in err
    assert_nothing_written(tmp_path / "out")


def test_missing_shard(tmp_path, capsys):
    src = copy_model(tmp_path)
    (src / "model-00003-of-00003.safetensors").unlink()
    rc, out, err = run(["--src", src, "--dst", tmp_path / "out"], capsys)
    assert rc == 2 and "missing shard(s) model-00003-of-00003.safetensors" in err
    assert_nothing_written(tmp_path / "out")


def test_existing_dst_needs_force(tmp_path, capsys):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    rc, out, err = run(["--src", FIXTURE / "model", "--dst", dst, "--no-verify"], capsys)
    assert rc == 2 and "--force" in err and (dst / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    rc, out, err = run(["--src", FIXTURE / "model", "--dst", dst, "--no-verify", "--force"], capsys)
    assert rc == 0, err
    assert not (dst / "keep.txt").exists() and (dst / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_empty_existing_dst_is_fine(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    rc, out, err = run(["--src", FIXTURE / "model", "--dst", tmp_path / "out", "--no-verify"], capsys)
    assert rc == 0, err


def test_dry_run_writes_nothing(tmp_path, capsys):
    rc, out, err = run(["--src", FIXTURE / "model", "--dst", tmp_path / "out", "--dry-run"], capsys)
    assert rc == 0, err
    assert "layers.0.audio_mlp.up_proj.weight -> model.layers.0.audio_mlp.up_proj.weight" in out
    assert "audio_decoder_proj.text_lm_head.weight: text head" in out and "nothing written" in out
    assert list(tmp_path.iterdir()) == []
    rc, out, err = run(["--src", FIXTURE / "tokenizer", "--dst", tmp_path / "out", "--dry-run"], capsys)
    assert rc == 0, err
    assert "quantizer.vq.layers.0._codebook.embed -> quantizer.quantizers.0.codebook.embed" in out
    assert "semantic_model.masked_spec_embed: HuBERT" in out and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["model", "tokenizer"])
def test_native_folder_is_validated_not_rewritten(converted, tmp_path, capsys, kind):
    src = converted[0] if kind == "model" else converted[1]
    before = {p.name: p.stat().st_mtime_ns for p in src.iterdir()}
    rc, out, err = run(["--src", src, "--dst", tmp_path / "out"], capsys)
    assert rc == 0, err
    assert "already a transformers-native" in out and "verified" in out and "not rewritten" in out
    assert list(tmp_path.iterdir()) == []
    assert {p.name: p.stat().st_mtime_ns for p in src.iterdir()} == before


def test_kind_mismatch_and_bad_src(tmp_path, capsys):
    rc, out, err = run(["--src", FIXTURE / "model", "--dst", tmp_path / "o", "--kind", "tokenizer"], capsys)
    assert rc == 2 and "--kind tokenizer" in err
    rc, out, err = run(["--src", tmp_path / "nowhere", "--dst", tmp_path / "o"], capsys)
    assert rc == 2 and "not a folder" in err


def test_help_lists_every_flag():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for flag in ("--src", "--dst", "--kind", "--dry_run", "--force", "--no_verify", "--keep_text_head"):
        assert flag in proc.stdout


# --------------------------------------------------------------------------- audio tokenizer


def test_tokenizer_config_pitfalls(converted):
    import inference

    tok = converted[1]
    inference.check_tokenizer_dir(tok)
    cfg = json.loads((tok / "config.json").read_text())
    assert cfg["target_bandwidths"] == [0.5, 1, 1.5, 2]  # 8 quantizers at hop 960, not 16
    acoustic = cfg["acoustic_model_config"]
    assert acoustic["downsampling_ratios"] == acoustic["upsampling_ratios"] == [8, 5, 4, 2, 3]
    assert (acoustic["encoder_hidden_size"], acoustic["decoder_hidden_size"], acoustic["hidden_size"]) == (4, 32, 16)
    assert cfg["semantic_model_config"]["hidden_size"] == 64 and cfg["codebook_dim"] == 8
    assert (tok / "preprocessor_config.json").is_file()
    from transformers import HiggsAudioV2TokenizerConfig

    assert HiggsAudioV2TokenizerConfig.from_pretrained(tok).num_quantizers == 8


def test_tokenizer_weight_norm_folded(converted):
    ours = load_file(converted[1] / "model.safetensors")
    boson = torch.load(FIXTURE / "tokenizer" / "model.pth", weights_only=True)
    g, v = boson["encoder.block.0.weight_g"], boson["encoder.block.0.weight_v"]
    torch.testing.assert_close(ours["acoustic_encoder.conv1.weight"], torch._weight_norm(v, g, 0))
    g, v = boson["decoder_2.model.1.block.1.weight_g"], boson["decoder_2.model.1.block.1.weight_v"]  # ConvTranspose
    assert g.shape == (v.shape[0], 1, 1)
    torch.testing.assert_close(ours["acoustic_decoder.block.0.conv_t1.weight"], torch._weight_norm(v, g, 0))
    assert torch.equal(ours["quantizer.quantizers.3.codebook.embed"], boson["quantizer.vq.layers.3._codebook.embed"])
    pos = "semantic_model.encoder.pos_conv_embed.conv.parametrizations.weight"
    assert torch.equal(ours[f"{pos}.original0"], boson[f"{pos}.original0"])
    assert "semantic_model.masked_spec_embed" not in ours


def test_tokenizer_hubert_weight_g_v_variant(converted, tmp_path, capsys):
    """HuBERT's positional conv saved with old-style weight_g / weight_v (norm over dim 2)."""
    src = tmp_path / "src"
    shutil.copytree(FIXTURE / "tokenizer", src)
    state = torch.load(src / "model.pth", weights_only=True)
    pos = "semantic_model.encoder.pos_conv_embed.conv"
    state[f"{pos}.weight_g"] = state.pop(f"{pos}.parametrizations.weight.original0")
    state[f"{pos}.weight_v"] = state.pop(f"{pos}.parametrizations.weight.original1")
    torch.save(state, src / "model.pth")
    rc, out, err = run(["--src", src, "--dst", tmp_path / "out", "--no-verify"], capsys)
    assert rc == 0, err
    ours, plain = load_file(tmp_path / "out" / "model.safetensors"), load_file(converted[1] / "model.safetensors")
    assert set(ours) == set(plain) and all(torch.equal(ours[k], plain[k]) for k in plain)


def test_tokenizer_unknown_key_named(tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(FIXTURE / "tokenizer", src)
    state = torch.load(src / "model.pth", weights_only=True)
    state["discriminator.conv.weight"] = torch.zeros(2)
    torch.save(state, src / "model.pth")
    rc, out, err = run(["--src", src, "--dst", tmp_path / "out"], capsys)
    assert rc == 2 and "discriminator.conv.weight" in err
    assert_nothing_written(tmp_path / "out")


def test_peak_rss_is_reported(tmp_path, capsys):
    rc, out, err = run(["--src", FIXTURE / "tokenizer", "--dst", tmp_path / "t", "--no-verify"], capsys)
    assert rc == 0 and "Peak RSS while converting:" in out


def test_tokenizer_weight_norm_folds_g_that_is_not_the_norm_of_v(tmp_path, capsys):
    """The Boson fixture has weight_g == ||weight_v|| (freshly initialised), where folding changes nothing.
    A trained checkpoint has g != ||v||: `scaled` rescales every g (per channel); `baked` holds the same
    effective weights g * v / ||v|| as its v, with g == ||v|| again. Both must convert to the same tensors."""
    state = torch.load(FIXTURE / "tokenizer" / "model.pth", weights_only=True)
    gen = torch.Generator().manual_seed(0)
    scaled, baked = dict(state), dict(state)
    pairs = [(k, k[: -len("weight_g")] + "weight_v") for k in state if k.endswith(".weight_g")]
    pairs += [(k, k[: -len("original0")] + "original1") for k in state if k.endswith(".parametrizations.weight.original0")]
    for g_key, v_key in pairs:
        g, v = state[g_key], state[v_key]
        dim = 2 if g_key.startswith("semantic_model.") else 0  # weight_norm's dim: 0, HuBERT's pos conv 2
        g2 = g * (0.5 + torch.rand(g.shape, generator=gen))
        scaled[g_key] = g2
        baked[v_key] = torch._weight_norm(v, g2, dim)  # the weight the original module computes
        baked[g_key] = g2
    kinds = {k.split(".")[0] for k, _ in pairs}
    assert kinds == {"encoder", "decoder_2", "semantic_model"}  # Conv1d, ConvTranspose1d, HuBERT's pos conv
    out = {}
    for name, tensors in (("scaled", scaled), ("baked", baked)):
        src = tmp_path / name
        shutil.copytree(FIXTURE / "tokenizer", src)
        torch.save(tensors, src / "model.pth")
        rc, _, err = run(["--src", src, "--dst", tmp_path / f"{name}-out", "--no-verify"], capsys)
        assert rc == 0, err
        out[name] = load_file(tmp_path / f"{name}-out" / "model.safetensors")
    assert set(out["scaled"]) == set(out["baked"])
    pos = "semantic_model.encoder.pos_conv_embed.conv.parametrizations.weight"
    for key in out["baked"]:
        if not key.startswith(pos):  # the native pos conv keeps its (g, v) pair: compared below
            torch.testing.assert_close(out["scaled"][key], out["baked"][key], msg=key)
    effective = {n: torch._weight_norm(o[f"{pos}.original1"], o[f"{pos}.original0"], 2) for n, o in out.items()}
    torch.testing.assert_close(effective["scaled"], effective["baked"])
    boson_v = state["encoder.block.0.weight_v"]
    assert not torch.allclose(out["scaled"]["acoustic_encoder.conv1.weight"], boson_v)  # the fold did something


# --------------------------------------------------------------------------- odd input files


def one_error_line(err: str, *needles):
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("kind", ["model", "tokenizer"])
@pytest.mark.parametrize("content", ["[1, 2]", "null", "\"text\""])
def test_config_json_that_is_not_an_object(tmp_path, capsys, kind, content):
    src = tmp_path / "src"
    shutil.copytree(FIXTURE / kind, src)
    (src / "config.json").write_text(content)
    rc, out, err = run(["--src", src, "--dst", tmp_path / "out"], capsys)
    assert rc == 2
    one_error_line(err, "config.json", "expected")
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("kind, where, changes, words", [
    ("tokenizer", None, {"ratios": 5}, "ratios is 5"),
    ("tokenizer", None, {"n_q": "8"}, "n_q is '8'"),
    ("tokenizer", None, {"target_bandwidths": []}, "target_bandwidths is []"),
    ("model", None, {"text_config": [1]}, "text_config is [1]"),
    ("model", None, {"audio_num_codebooks": 8.5}, "audio_num_codebooks is 8.5"),
    ("model", "text_config", {"num_hidden_layers": "x"}, "text_config.num_hidden_layers is 'x'"),
    ("model", "text_config", {"rope_theta": None}, "text_config.rope_theta is None"),
])
def test_config_fields_of_the_wrong_type(tmp_path, capsys, kind, where, changes, words):
    src = tmp_path / "src"
    shutil.copytree(FIXTURE / kind, src)
    cfg = json.loads((src / "config.json").read_text())
    (cfg[where] if where else cfg).update(changes)
    (src / "config.json").write_text(json.dumps(cfg))
    rc, out, err = run(["--src", src, "--dst", tmp_path / "out"], capsys)
    assert rc == 2
    one_error_line(err, words)
    assert_nothing_written(tmp_path / "out")


PTH_VARIANTS = {  # bytes of model.pth (None: legacy format cut short, made by the test), words of the error
    "empty": (b"", "not a PyTorch checkpoint"),
    "text": (b"hello", "not a PyTorch checkpoint"),
    "random bytes": (bytes(range(256)) * 4, "not a PyTorch checkpoint"),
    "truncated zip": ((FIXTURE / "tokenizer" / "model.pth").read_bytes()[:1000], "is truncated"),
    "truncated legacy pickle": (None, "is truncated or not a PyTorch checkpoint"),
    "pickle of other objects": (b"\x80\x02cos\nsystem\nq\x00.", "cannot be loaded safely"),
}


@pytest.mark.parametrize("variant", list(PTH_VARIANTS))
def test_model_pth_that_is_not_a_checkpoint(tmp_path, capsys, variant):
    src = tmp_path / "src"
    shutil.copytree(FIXTURE / "tokenizer", src)
    data, words = PTH_VARIANTS[variant]
    if data is None:
        torch.save({"a": torch.zeros(3)}, src / "model.pth", _use_new_zipfile_serialization=False)
        data = (src / "model.pth").read_bytes()[:40]
    (src / "model.pth").write_bytes(data)
    rc, out, err = run(["--src", src, "--dst", tmp_path / "out"], capsys)
    assert rc == 2
    one_error_line(err, "model.pth", words)
    assert_nothing_written(tmp_path / "out")


def test_model_pth_with_a_dotless_key_is_one_line(tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(FIXTURE / "tokenizer", src)
    state = torch.load(src / "model.pth", weights_only=True)
    state["stray"] = torch.zeros(2)
    torch.save(state, src / "model.pth")
    rc, out, err = run(["--src", src, "--dst", tmp_path / "out"], capsys)
    assert rc == 2
    one_error_line(err, "unknown tensor name", "stray")
    assert_nothing_written(tmp_path / "out")


def test_model_without_embed_tokens_is_one_line(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    shutil.copytree(FIXTURE / "model", src)
    for shard in sorted(src.glob("*.safetensors")):
        tensors = load_file(str(shard))
        if "embed_tokens.weight" in tensors:
            del tensors["embed_tokens.weight"]
            save_file(tensors, str(shard), metadata={"format": "pt"})
    index = src / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"].pop("embed_tokens.weight", None)
        index.write_text(json.dumps(data))
    rc, out, err = run(["--src", src, "--dst", tmp_path / "out"], capsys)
    assert rc == 2
    one_error_line(err, "embed_tokens")
    assert_nothing_written(tmp_path / "out")
