"""Build tiny Higgs Audio V2 checkpoints in the real on-disk formats.

Used by `inference.py --selftest`, by the tests and by the benchmarks: the real
checkpoints are ~11 GB and cannot be fetched everywhere, but every file that the
loader reads (sharded safetensors + index, config.json, generation_config.json,
tokenizer.json, chat template, processor and audio-tokenizer configs) is written
here by the real transformers classes, at a size that builds in seconds.

    python3 tiny_checkpoints.py --out /tmp/tiny      # writes /tmp/tiny/model, /tmp/tiny/tokenizer
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

# the on-disk contract lives in checkpoints.py; re-exported for the tests and benchmarks
from checkpoints import (  # noqa: F401
    AUDIO_STREAM_BOS_ID,
    AUDIO_STREAM_EOS_ID,
    CHAT_TEMPLATE_PATH,
    CODEBOOK_SIZE,
    NUM_CODEBOOKS,
    RAS_WIN_LEN,
    RAS_WIN_MAX_NUM_REPEAT,
    SPECIAL_TOKENS,
    feature_extractor_args,
    generation_config_for,
    write_processor_files,
)

# Small bilingual corpus: enough merges that English and Chinese both tokenize
# into multi-byte pieces, as with the real tokenizer.
_CORPUS = [
    "In the quiet of the morning, birds begin to sing as the first rays of sunlight paint the sky in shades of orange and pink.",
    "The sun rises in the east and sets in the west. This simple fact has been observed by humans for thousands of years.",
    "Generate audio following instruction. Audio is recorded from a quiet room.",
    "It was the night before my birthday. Hooray! It's almost here! It may not be a holiday, but it's the best day of the year.",
    "Hello world, this is a test of the text to speech system running on an Ascend NPU, a GPU or a CPU.",
    "清晨的宁静中，鸟儿开始歌唱，第一缕阳光把天空染成橙色和粉色。",
    "太阳从东方升起，从西方落下。这个简单的事实已经被人类观察了几千年。",
    "你好，世界！这是在昇腾处理器上运行的语音合成测试。今天天气很好，我们一起去公园散步吧。",
    "数字一二三四五六七八九十，标点符号：逗号、句号。问号？感叹号！",
]


def build_text_tokenizer(out_dir: Path, vocab_size: int = 1200):
    """Train a byte-level BPE on the corpus and save it as a fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    # Llama-3 prepends <|begin_of_text|> on encode; the chat template already has it,
    # so a loader that encodes with special tokens would double it (the test catches that).
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<|end_of_text|>",
        model_max_length=131072,
    )
    fast.save_pretrained(out_dir)
    return fast


def _text_model_config(tokenizer, **sizes):
    from transformers import HiggsAudioV2Config

    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in SPECIAL_TOKENS}
    return HiggsAudioV2Config(
        vocab_size=max(len(tokenizer), sizes.get("vocab_size", 0)),
        hidden_size=sizes.get("hidden_size", 64),
        intermediate_size=sizes.get("intermediate_size", 128),
        num_hidden_layers=sizes.get("num_hidden_layers", 2),
        num_attention_heads=sizes.get("num_attention_heads", 4),
        num_key_value_heads=sizes.get("num_key_value_heads", 2),
        head_dim=sizes.get("head_dim", 16),
        max_position_embeddings=sizes.get("max_position_embeddings", 131072),
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
        },
        num_codebooks=NUM_CODEBOOKS,
        codebook_size=CODEBOOK_SIZE,
        audio_token_id=ids["<|AUDIO_OUT|>"],
        audio_bos_token_id=ids["<|audio_out_bos|>"],
        audio_delay_token_id=ids["<|reserved_special_token_6|>"],
        audio_stream_bos_id=AUDIO_STREAM_BOS_ID,
        audio_stream_eos_id=AUDIO_STREAM_EOS_ID,
        bos_token_id=ids["<|begin_of_text|>"],
        eos_token_id=ids["<|eot_id|>"],
        pad_token_id=ids["<|end_of_text|>"],
        tie_word_embeddings=False,
    )


def save_sharded(model, out_dir: Path, num_shards: int = 3) -> None:
    """save_pretrained with a shard size that yields exactly `num_shards` files."""
    total = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    largest = max(p.numel() * p.element_size() for p in model.state_dict().values())
    shard = max(largest, total // num_shards + 1)
    for _ in range(20):
        tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=".shards-"))
        model.save_pretrained(tmp, max_shard_size=shard)
        n = len(list(tmp.glob("model-*-of-*.safetensors")))
        if n == num_shards:
            for f in tmp.iterdir():
                shutil.move(str(f), out_dir / f.name)
            tmp.rmdir()
            return
        shutil.rmtree(tmp)
        shard = int(shard * (1.1 if n > num_shards else 0.9))
    raise RuntimeError(f"could not split the model into {num_shards} shards")


def build_generation_model(out_dir: Path, seed: int = 0, dtype: str = "bfloat16", **sizes) -> Path:
    import torch
    from transformers import HiggsAudioV2ForConditionalGeneration

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_text_tokenizer(out_dir)
    config = _text_model_config(tokenizer, **sizes)
    torch.manual_seed(seed)
    model = HiggsAudioV2ForConditionalGeneration(config).to(getattr(torch, dtype))
    model.generation_config = generation_config_for(config)
    save_sharded(model, out_dir)
    write_processor_files(out_dir)
    return out_dir


def tiny_audio_tokenizer_config():
    from transformers import HiggsAudioV2TokenizerConfig

    ratios = [8, 5, 4, 2, 3]  # real ratios: hop 960, 25 frames/s at 24 kHz
    config = HiggsAudioV2TokenizerConfig(
        # the last bandwidth decides the quantizer count: 2 kbps / (25 Hz * 10 bit) = 8
        target_bandwidths=[0.5, 1, 1.5, 2],
        sample_rate=24000,
        codebook_size=1024,
        codebook_dim=8,
        acoustic_model_config={
            "encoder_hidden_size": 4,
            "decoder_hidden_size": 32,
            "hidden_size": 16,
            "downsampling_ratios": ratios,
            "upsampling_ratios": ratios,
        },
        semantic_model_config={
            "hidden_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 32,
            "conv_dim": [16] * 7,
            "num_conv_pos_embeddings": 16,
            "num_conv_pos_embedding_groups": 4,
        },
    )
    return config


def build_audio_tokenizer(out_dir: Path, seed: int = 0) -> Path:
    import torch
    from transformers import DacFeatureExtractor, HiggsAudioV2TokenizerModel

    out_dir.mkdir(parents=True, exist_ok=True)
    config = tiny_audio_tokenizer_config()
    if config.num_quantizers != NUM_CODEBOOKS or config.hop_length != 960:
        raise AssertionError(f"tiny audio tokenizer: {config.num_quantizers} quantizers, hop {config.hop_length}")
    torch.manual_seed(seed)
    model = HiggsAudioV2TokenizerModel(config)
    with torch.no_grad():
        # default init leaves the codebooks at zero: every frame would get code 0
        for quantizer in model.quantizer.quantizers:
            quantizer.codebook.embed.normal_()
    model.save_pretrained(out_dir)
    DacFeatureExtractor(**feature_extractor_args(24000)).save_pretrained(out_dir)
    return out_dir


def build_tiny_checkpoints(root: str | os.PathLike, seed: int = 0) -> tuple[Path, Path]:
    """Write `root/model` and `root/tokenizer`; returns both paths."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" bars are noise here
    try:
        root = Path(root)
        model_dir = build_generation_model(root / "model", seed=seed)
        tokenizer_dir = build_audio_tokenizer(root / "tokenizer", seed=seed)
    finally:
        hf_logging.enable_progress_bar()
    return model_dir, tokenizer_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write model/ and tokenizer/ into")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args()
    model_dir, tokenizer_dir = build_tiny_checkpoints(args.out, seed=args.seed)
    print(f"model:     {model_dir}\ntokenizer: {tokenizer_dir}")


if __name__ == "__main__":
    main()
