"""Never speak noise: a folder that does not hold exactly the weights its config asks for is
refused in one line before anything is written (checkpoints.py, inference.load_engine)."""

import json
import re
import shutil
import struct
import warnings

import pytest
from safetensors.torch import load_file, save_file

import checkpoints
import inference


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _model_tensors(model_dir):
    tensors = {}
    for shard in sorted(model_dir.glob("model-*.safetensors")):
        tensors.update(load_file(str(shard)))
    return tensors


def _cli(tiny_ckpt, out_dir, model_dir=None, tok_dir=None):
    return inference.main(["--model_path", str(model_dir or tiny_ckpt[0]), "--tokenizer_path",
                           str(tok_dir or tiny_ckpt[1]), "--device", "cpu", "--output_dir", str(out_dir),
                           "--text", "Hello world.", "--max_new_tokens", "40"])


def _refused(tiny_ckpt, tmp_path, capsys, match, model_dir=None, tok_dir=None):
    """The CLI exits 2 with one error line matching `match`, and writes no WAV or JSON."""
    out = tmp_path / "out"
    assert _cli(tiny_ckpt, out, model_dir, tok_dir) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "Traceback" not in err[0]
    assert re.search(match, err[0]), err[0]
    assert not list(out.glob("*.wav")) and not list(out.glob("*.json"))
    return err[0]


def test_codec_folder_holding_the_generation_model_is_refused(tiny_ckpt, tmp_path, capsys):
    tok_dir = _copy(tiny_ckpt[1], tmp_path / "tok")
    save_file(_model_tensors(tiny_ckpt[0]), str(tok_dir / "model.safetensors"), metadata={"format": "pt"})
    line = _refused(tiny_ckpt, tmp_path, capsys, r"tok/model\.safetensors holds 32 tensors of a generation model "
                    r"\(model\.layers\.\*\), not the audio tokenizer's acoustic_encoder\.\* / quantizer\.\*",
                    tok_dir=tok_dir)
    assert "0 of 367 expected tensors match" in line


def test_codec_with_one_tensor_removed_is_refused(tiny_ckpt, tmp_path, capsys):
    tok_dir = _copy(tiny_ckpt[1], tmp_path / "tok")
    tensors = load_file(str(tok_dir / "model.safetensors"))
    del tensors["quantizer.quantizers.3.codebook.embed"]
    save_file(tensors, str(tok_dir / "model.safetensors"), metadata={"format": "pt"})
    _refused(tiny_ckpt, tmp_path, capsys,
             r"does not hold a complete audio tokenizer: 366 of 367 .* 1 missing \(quantizer\.quantizers\.3\.codebook",
             tok_dir=tok_dir)


def test_model_with_one_shards_tensors_renamed_is_refused(tiny_ckpt, tmp_path, capsys):
    model_dir = _copy(tiny_ckpt[0], tmp_path / "model")
    shard = model_dir / "model-00002-of-00003.safetensors"
    renamed = {f"renamed.{k}": v for k, v in load_file(str(shard)).items()}
    save_file(renamed, str(shard), metadata={"format": "pt"})
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    index["weight_map"] = {(f"renamed.{k}" if v == shard.name else k): v for k, v in index["weight_map"].items()}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    _refused(tiny_ckpt, tmp_path, capsys, r"does not hold a complete generation model: .* missing .* unexpected "
             r"\(renamed\.", model_dir=model_dir)


def test_index_listing_a_tensor_no_shard_holds_is_refused(tiny_ckpt, tmp_path, capsys):
    model_dir = _copy(tiny_ckpt[0], tmp_path / "model")
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = "model-00001-of-00003.safetensors"
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    _refused(tiny_ckpt, tmp_path, capsys, r"lists model\.layers\.9\.mlp\.up_proj\.weight in "
             r"model-00001-of-00003\.safetensors, but no shard holds it", model_dir=model_dir)


def test_correct_folder_loads_without_warning_and_reports_parameters(tiny_ckpt, capsys):
    lines = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine = inference.load_engine(*tiny_ckpt, device="cpu", dtype="float32", log=lines.append)
    captured = capsys.readouterr()
    assert captured.err == ""
    verified = next(line for line in lines if line.startswith("Weights verified"))
    assert f"{engine.num_params / 1e9:.3f} B parameters" in verified
    codec_params = sum(p.numel() for p in engine.audio_tokenizer.parameters())
    assert f"{codec_params / 1e6:.1f} M parameters" in verified


def test_expected_parameter_count_is_the_architectures(tiny_engine):
    config = json.loads((checkpoints.Path(tiny_engine.model.name_or_path) / "config.json").read_text())
    assert checkpoints.Expected("model", config).parameter_count() == tiny_engine.num_params


def test_legacy_weight_norm_names_are_accepted(tiny_ckpt, tmp_path):
    """Hub copies saved before transformers 5 store weight_g / weight_v; transformers renames
    them on load, so the header check must too (else a good source would be refused)."""
    tok_dir = _copy(tiny_ckpt[1], tmp_path / "tok")
    tensors = load_file(str(tok_dir / "model.safetensors"))
    legacy = {k.replace(".parametrizations.weight.original0", ".weight_g")
              .replace(".parametrizations.weight.original1", ".weight_v"): v for k, v in tensors.items()}
    assert legacy.keys() != tensors.keys()
    save_file(legacy, str(tok_dir / "model.safetensors"), metadata={"format": "pt"})
    checkpoints.verify_folder("tokenizer", tok_dir)


def test_loading_report_is_checked_after_the_header_check(tiny_ckpt, tmp_path, monkeypatch):
    """Second line of defence: what transformers had to initialise at random is an error even
    when the header check is bypassed."""
    tok_dir = _copy(tiny_ckpt[1], tmp_path / "tok")
    tensors = load_file(str(tok_dir / "model.safetensors"))
    del tensors["fc.weight"]
    save_file(tensors, str(tok_dir / "model.safetensors"), metadata={"format": "pt"})
    monkeypatch.setattr(checkpoints, "check_tensors", lambda *a, **k: None)
    with pytest.raises(inference.UserError, match=r"does not load cleanly \(missing keys: fc\.weight\)"):
        inference.load_engine(tiny_ckpt[0], tok_dir, "cpu", "float32")


# --------------------------------------------------------------------------- corrupt files


def _truncate_header(path):
    path.write_bytes(path.read_bytes()[:40])


def _tiny_file(path):
    path.write_bytes(b"\x01\x02\x03")


def _huge_header(path):
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 2**40) + data[8:])


def _garbled_header(path):
    data = bytearray(path.read_bytes())
    data[8:20] = b"not json!!!!"
    path.write_bytes(bytes(data))


def _json_edit(name, edit):
    def apply(folder):
        path = folder / name
        path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    return apply


def _set(key, value):
    def edit(d):
        d[key] = value
        return d
    return edit


MODEL_CORRUPTIONS = {
    "config is a list": (lambda d: (d / "config.json").write_text("[1, 2]"), r"config\.json holds a JSON list"),
    "config is null": (lambda d: (d / "config.json").write_text("null"), r"config\.json holds a JSON NoneType"),
    "config not JSON": (lambda d: (d / "config.json").write_text("{oops"), r"config\.json cannot be read as JSON"),
    "weight_map is a list": (_json_edit("model.safetensors.index.json", _set("weight_map", [1])),
                             r"weight_map must map tensor names to shard files"),
    "total_size not a number": (_json_edit("model.safetensors.index.json",
                                           _set("metadata", {"total_size": "big"})), r"total_size is 'big'"),
    "shard header truncated": (lambda d: _truncate_header(d / "model-00001-of-00003.safetensors"),
                               r"model-00001-of-00003\.safetensors is truncated"),
    "shard too small": (lambda d: _tiny_file(d / "model-00002-of-00003.safetensors"),
                        r"truncated or not a safetensors file \(3 bytes"),
    "shard header too large": (lambda d: _huge_header(d / "model-00003-of-00003.safetensors"),
                               r"over the format's 100 MB limit"),
    "shard header garbled": (lambda d: _garbled_header(d / "model-00003-of-00003.safetensors"),
                             r"not a safetensors file \(header is not JSON"),
    "hidden_size is a string": (_json_edit("config.json", _set("hidden_size", "64")),
                                r"config\.json does not describe a valid generation model"),
    "sizes do not fit the weights": (_json_edit("config.json", _set("intermediate_size", 96)),
                                     r"with another shape \(.*config\.json says"),
    "chat template syntax error": (lambda d: (d / "chat_template.jinja").write_text("{% if %}"),
                                   r"chat_template\.jinja: TemplateSyntaxError"),
    "tokenizer.json garbled": (lambda d: (d / "tokenizer.json").write_text('{"version": 3}'),
                               r"tokenizer\.json cannot be loaded"),
    "processor token unknown": (_json_edit("processor_config.json", _set("audio_token", "<|nope|>")),
                                r"audio_token '<\|nope\|>' is not a token"),
}

CODEC_CORRUPTIONS = {
    "preprocessor config not JSON": (lambda d: (d / "preprocessor_config.json").write_text("{]"),
                                     r"preprocessor_config\.json cannot be read as JSON"),
    "preprocessor at 16 kHz": (_json_edit("preprocessor_config.json", _set("sampling_rate", 16000)),
                               r"sampling_rate 16000, expected 24000"),
    "codec config is a list": (lambda d: (d / "config.json").write_text("[]"), r"config\.json holds a JSON list"),
    "codec header garbled": (lambda d: _garbled_header(d / "model.safetensors"), r"not a safetensors file"),
}


@pytest.mark.parametrize("name", sorted(MODEL_CORRUPTIONS))
def test_corrupt_model_folder_is_one_line(tiny_ckpt, tmp_path, capsys, name):
    corrupt, match = MODEL_CORRUPTIONS[name]
    model_dir = _copy(tiny_ckpt[0], tmp_path / "model")
    corrupt(model_dir)
    _refused(tiny_ckpt, tmp_path, capsys, match, model_dir=model_dir)


@pytest.mark.parametrize("name", sorted(CODEC_CORRUPTIONS))
def test_corrupt_codec_folder_is_one_line(tiny_ckpt, tmp_path, capsys, name):
    corrupt, match = CODEC_CORRUPTIONS[name]
    tok_dir = _copy(tiny_ckpt[1], tmp_path / "tok")
    corrupt(tok_dir)
    _refused(tiny_ckpt, tmp_path, capsys, match, tok_dir=tok_dir)


def test_real_architectures_have_the_published_sizes():
    """The counts printed at load come from the class built on the config: for the real configs
    that is about 5.4 B (generation model) and about 201 M (codec) parameters."""
    from transformers import HiggsAudioV2Config

    model = checkpoints.Expected("model", HiggsAudioV2Config().to_dict())  # transformers' defaults: the 3B release
    # Boson's tokenizer config.json (n_q 8, D 256, codebook_dim 64, ratios [8,5,4,2,3], HuBERT base) in native form
    codec_config = {
        "model_type": "higgs_audio_v2_tokenizer", "target_bandwidths": [0.5, 1, 1.5, 2], "sample_rate": 24000,
        "codebook_size": 1024, "codebook_dim": 64,
        "acoustic_model_config": {"encoder_hidden_size": 64, "downsampling_ratios": [8, 5, 4, 2, 3],
                                  "decoder_hidden_size": 1024, "upsampling_ratios": [8, 5, 4, 2, 3],
                                  "hidden_size": 256, "sampling_rate": 24000},
        "semantic_model_config": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                                  "intermediate_size": 3072, "conv_dim": [512] * 7,
                                  "conv_kernel": [10, 3, 3, 3, 3, 2, 2], "conv_stride": [5, 2, 2, 2, 2, 2, 2],
                                  "conv_bias": False, "feat_extract_norm": "group", "do_stable_layer_norm": False,
                                  "feat_proj_layer_norm": True, "num_conv_pos_embeddings": 128,
                                  "num_conv_pos_embedding_groups": 16},
    }
    codec = checkpoints.Expected("tokenizer", codec_config)
    assert 5.3e9 < model.parameter_count() < 5.5e9
    assert 195e6 < codec.parameter_count() < 205e6
    assert codec.model.config.num_quantizers == model.model.config.num_codebooks == 8
