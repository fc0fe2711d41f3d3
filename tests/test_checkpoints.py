"""Tiny checkpoints: real on-disk formats, loaded by the CLI's own loader."""

import json
import shutil
import subprocess
import sys

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import inference
import tiny_checkpoints
from conftest import ROOT


def test_generation_model_files(tiny_ckpt):
    model_dir, _ = tiny_ckpt
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    for shard in shards:
        with safe_open(str(model_dir / shard), "pt") as f:
            for key in f.keys():
                assert f.get_slice(key).get_dtype() == "BF16", key
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "higgs_audio_v2"
    assert (config["num_codebooks"], config["codebook_size"]) == (8, 1026)
    assert (config["audio_stream_bos_id"], config["audio_stream_eos_id"]) == (1024, 1025)
    assert not any("text_lm_head" in k for k in index["weight_map"])
    gen = json.loads((model_dir / "generation_config.json").read_text())
    assert (gen["ras_win_len"], gen["ras_win_max_num_repeat"]) == (7, 2)
    assert gen["eos_token_id"] == config["eos_token_id"]
    assert (model_dir / "chat_template.jinja").read_text() == tiny_checkpoints.CHAT_TEMPLATE_PATH.read_text()
    processor_config = json.loads((model_dir / "processor_config.json").read_text())
    assert processor_config["audio_token"] == "<|AUDIO_OUT|>"


def test_text_tokenizer_ids_match_config(tiny_engine):
    tok, cfg = tiny_engine.tokenizer, tiny_engine.config
    assert tok.convert_tokens_to_ids("<|AUDIO_OUT|>") == cfg.audio_token_id
    assert tok.convert_tokens_to_ids("<|audio_out_bos|>") == cfg.audio_bos_token_id
    assert tok.convert_tokens_to_ids("<|reserved_special_token_6|>") == cfg.audio_delay_token_id
    assert tok.convert_tokens_to_ids("<|eot_id|>") == cfg.eos_token_id
    for name in tiny_checkpoints.SPECIAL_TOKENS:
        assert tok.convert_tokens_to_ids(name) != tok.unk_token_id
        assert len(tok(name, add_special_tokens=False).input_ids) == 1, name
    for text in ("The sun rises in the east.", "太阳从东方升起。", "Mixed 混合 text"):
        ids = tok(text, add_special_tokens=False).input_ids
        assert len(ids) < len(text.encode("utf-8")), "BPE merges should compress"
        assert tok.decode(ids) == text


def test_audio_tokenizer_files(tiny_ckpt):
    from transformers import HiggsAudioV2TokenizerConfig

    _, tok_dir = tiny_ckpt
    config = HiggsAudioV2TokenizerConfig.from_pretrained(tok_dir)
    assert config.num_quantizers == 8
    assert config.hop_length == 960 and config.frame_rate == 25
    assert config.acoustic_model_config.upsampling_ratios == [8, 5, 4, 2, 3]
    weights = load_file(str(tok_dir / "model.safetensors"))
    codebooks = [v for k, v in weights.items() if k.endswith("codebook.embed")]
    assert len(codebooks) == 8 and all(c.abs().sum() > 0 for c in codebooks)
    assert (tok_dir / "preprocessor_config.json").is_file()


def test_prompt_follows_chat_template(tiny_engine):
    prompt = tiny_engine.build_prompt("Hello there.", scene="A quiet room.")
    text = tiny_engine.tokenizer.decode(prompt.input_ids)
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Generate audio following instruction.\n\n<|scene_desc_start|>\nA quiet room.\n<|scene_desc_end|><|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHello there.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n<|audio_out_bos|>"
    )


def test_prompt_with_reference_audio(tiny_engine):
    import torch

    ref = torch.randint(0, 1024, (8, 5))
    prompt = tiny_engine.build_prompt("Next.", ref_codes=ref, ref_text="Reference words.")
    cfg = tiny_engine.config
    n_audio = int(((prompt.input_ids == cfg.audio_token_id) | (prompt.input_ids == cfg.audio_delay_token_id)).sum())
    assert prompt.audio_input_ids.shape == (5 + 2 + 7, 8)  # BOS + codes + EOS, delayed by 7
    assert n_audio == prompt.audio_input_ids.shape[0]
    assert (prompt.audio_input_ids[0] == torch.tensor([1024] * 8)).all()
    assert prompt.audio_input_ids[1, 0] == ref[0, 0] and prompt.audio_input_ids[8, 7] == ref[7, 0]
    text = tiny_engine.tokenizer.decode(prompt.input_ids)
    assert "user<|end_header_id|>\n\nReference words.<|eot_id|><|start_header_id|>assistant" in text


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("missing,message", [
    ("model-00002-of-00003.safetensors", "missing model-00002-of-00003.safetensors"),
    ("tokenizer.json", "no tokenizer.json"),
])
def test_loader_refuses_missing_model_file(tiny_ckpt, tmp_path, missing, message):
    model_dir = _copy(tiny_ckpt[0], tmp_path / "model")
    (model_dir / missing).unlink()
    with pytest.raises(inference.UserError, match=message):
        inference.load_engine(model_dir, tiny_ckpt[1], "cpu", "float32")


def test_loader_refuses_wrong_shape(tiny_ckpt, tmp_path):
    model_dir = _copy(tiny_ckpt[0], tmp_path / "model")
    shard = model_dir / "model-00001-of-00003.safetensors"
    tensors = load_file(str(shard))
    key = next(iter(tensors))
    tensors[key] = tensors[key][..., :-1].contiguous()
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(inference.UserError, match=r"31 of 32 expected tensors match; 1 with another shape \(model\.embed_tokens"):
        inference.load_engine(model_dir, tiny_ckpt[1], "cpu", "float32")


def test_loader_refuses_wrong_quantizer_count(tiny_ckpt, tmp_path):
    tok_dir = _copy(tiny_ckpt[1], tmp_path / "tokenizer")
    config = json.loads((tok_dir / "config.json").read_text())
    config["target_bandwidths"] = [0.5, 1, 1.5, 2, 4]  # the default list: 16 quantizers
    (tok_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(inference.UserError):
        inference.load_engine(tiny_ckpt[0], tok_dir, "cpu", "float32")


def test_loader_names_the_convert_command_for_original_layout(tiny_ckpt, tmp_path):
    model_dir = _copy(tiny_ckpt[0], tmp_path / "orig")
    config = json.loads((model_dir / "config.json").read_text())
    config["model_type"] = "higgs_audio"
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(inference.UserError, match=r"convert_weights\.py --kind model --src .*orig --dst"):
        inference.check_model_dir(model_dir)


def test_selftest_cli_passes():
    proc = subprocess.run([sys.executable, "inference.py", "--selftest", "--device", "cpu"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "PASS: selftest on cpu" in proc.stdout
    for step in ("build tiny checkpoints", "load on cpu", "chat prompt", "prefill + 60 frames", "decode", "WAV"):
        assert step in proc.stdout
