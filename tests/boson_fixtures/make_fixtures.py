"""Record Boson's own outputs for the parity tests (issues 3 and 4).

Runs in a side env with Boson's original package, NOT in the project env:

    python3 -m venv --system-site-packages /tmp/boson-venv     # reuses torch/torchaudio 2.9.1
    /tmp/boson-venv/bin/pip install "transformers==4.46.3" "tokenizers>=0.20,<0.21" "huggingface_hub>=0.23.2,<1.0"
    /tmp/boson-venv/bin/pip install --no-deps boson_multimodal==0.1.1 descript-audiotools descript-audio-codec
    /tmp/boson-venv/bin/pip install einops vector_quantize_pytorch librosa loguru dacite pandas omegaconf \
        flatten-dict julius ffmpy importlib_resources tensorboard randomname argbind
    /tmp/boson-venv/bin/python tests/boson_fixtures/make_fixtures.py

It writes, under tests/fixtures/boson/:
  model/      a tiny generation model in Boson's ORIGINAL layout (model_type higgs_audio,
              HiggsAudioModel, bf16, 3 safetensors shards + index, tokenizer files), built
              and saved by boson_multimodal itself;
  tokenizer/  a tiny ORIGINAL audio tokenizer (config.json + model.pth, weight norm) built
              with Boson's HiggsAudioTokenizer class;
  ref.wav     the reference clip of the voice-cloning prompt;
  records.pt  what Boson's code produced: prompt ids, prefill / decode logits, greedy codes
              (RAS off) through HiggsAudioServeEngine, and encode / decode of fixed waveforms.

The text tokenizer is the project's tiny BPE (tiny_checkpoints.build_text_tokenizer, run in
the base interpreter, which has transformers 5), saved with a transformers-4 style
tokenizer_config.json as Boson's repos have it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "boson"
MODEL_DIR = OUT / "model"
TOKENIZER_DIR = OUT / "tokenizer"

SYSTEM = "Generate audio following instruction."
SCENE = "Audio is recorded from a quiet room."

# Tiny sizes. HuBERT keeps head_dim 64 (hidden 64, 1 head), as HuBERT base does (768, 12).
HUBERT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=1, intermediate_size=128,
              conv_dim=[16] * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
ACOUSTIC_ENCODER_WIDTH = 4  # Boson hard-codes 64
ACOUSTIC_DECODER_WIDTH = 32  # Boson hard-codes 1024
TOKENIZER_CONFIG = {  # the real file's keys; D / codebook_dim shrunk
    "n_filters": 32, "D": 16, "codebook_dim": 8, "target_bandwidths": [0.5, 1, 1.5, 2, 4],
    "ratios": [8, 5, 4, 2, 3], "sample_rate": 24000, "bins": 1024, "n_q": 8,
    "semantic_techer": "hubert_base_general",
}
EOS_FRAME, EOS_CODEBOOK = 12, 3  # the EOS prompt's first stream EOS: frame 12, codebook 3


def log(msg):
    print(msg, flush=True)


# --------------------------------------------------------------------------- text tokenizer


def write_text_tokenizer(dst: Path) -> None:
    """tokenizer.json from tiny_checkpoints (base interpreter, transformers 5) + 4.x-style configs."""
    with tempfile.TemporaryDirectory() as tmp:
        code = ("import sys; from pathlib import Path; sys.path.insert(0, %r); import tiny_checkpoints; "
                "tiny_checkpoints.build_text_tokenizer(Path(%r))" % (str(ROOT), tmp))
        subprocess.run([sys._base_executable, "-c", code], check=True)
        shutil.copyfile(Path(tmp) / "tokenizer.json", dst / "tokenizer.json")
    specials = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "pad_token": "<|end_of_text|>"}
    (dst / "tokenizer_config.json").write_text(json.dumps(
        {**specials, "model_max_length": 131072, "tokenizer_class": "PreTrainedTokenizerFast",
         "clean_up_tokenization_spaces": True}, indent=2) + "\n")
    (dst / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")


# --------------------------------------------------------------------------- audio tokenizer


def patch_boson_tokenizer_module():
    """Tiny widths and a tiny HuBERT teacher for Boson's HiggsAudioTokenizer.

    Its constructor downloads `bosonai/hubert_base` and hard-codes the widths (64, 1024,
    768); the class, its encode / decode and its state-dict layout stay Boson's own.
    """
    import boson_multimodal.audio_processing.higgs_audio_tokenizer as bt
    from transformers import HubertConfig, HubertModel

    if getattr(bt, "_tiny_patched", False):
        return bt

    def tiny_hubert(*args, **kwargs):
        torch.manual_seed(1)
        return HubertModel(HubertConfig(**HUBERT))  # mask_time_prob 0.05: has masked_spec_embed

    bt.AutoModel = types.SimpleNamespace(from_pretrained=tiny_hubert)
    dac = bt.dac2
    bt.dac2 = types.SimpleNamespace(
        Encoder=lambda d_model, strides, d_latent: dac.Encoder(ACOUSTIC_ENCODER_WIDTH, strides, d_latent),
        Decoder=lambda input_channel, channels, rates: dac.Decoder(input_channel, ACOUSTIC_DECODER_WIDTH, rates),
    )
    width = HUBERT["hidden_size"]
    ignore = lambda self, value: None  # noqa: E731  (the constructor assigns 768)

    class TinyHiggsAudioTokenizer(bt.HiggsAudioTokenizer):
        semantic_dim = property(lambda self: width, ignore)
        encoder_semantic_dim = property(lambda self: width, ignore)

    bt.HiggsAudioTokenizer = TinyHiggsAudioTokenizer  # load_higgs_audio_tokenizer builds this one
    bt._tiny_patched = True
    return bt


def build_audio_tokenizer(dst: Path) -> None:
    bt = patch_boson_tokenizer_module()
    torch.manual_seed(0)
    model = bt.HiggsAudioTokenizer(**TOKENIZER_CONFIG, device="cpu")
    with torch.no_grad():
        for layer in model.quantizer.vq.layers:  # kmeans init would rewrite untrained codebooks
            layer._codebook.embed.normal_()
            layer._codebook.embed_avg.copy_(layer._codebook.embed)
            layer._codebook.inited.fill_(1.0)
    dst.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), dst / "model.pth")
    (dst / "config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")


def waveform(seconds: float, seed: int) -> np.ndarray:
    n = int(round(seconds * 24000))
    t = np.arange(n) / 24000
    rng = np.random.default_rng(seed)
    x = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.2 * np.sin(2 * np.pi * 523 * t + 1.0) + 0.05 * rng.standard_normal(n)
    return x.astype(np.float32)


# --------------------------------------------------------------------------- generation model


def token_ids(tokenizer) -> dict:
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|audio_bos|>", "<|audio_eos|>",
             "<|audio_out_bos|>", "<|AUDIO|>", "<|AUDIO_OUT|>", "<|reserved_special_token_6|>"]
    return {n: tokenizer.convert_tokens_to_ids(n) for n in names}


def boson_config(ids: dict, vocab_size: int):
    from boson_multimodal.model.higgs_audio import HiggsAudioConfig

    text_config = dict(
        model_type="llama", vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=131072, rms_norm_eps=1e-5, hidden_act="silu",
        # not the native defaults, so a converter that forgets to copy them fails parity
        rope_theta=10000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        bos_token_id=ids["<|begin_of_text|>"], eos_token_id=ids["<|end_of_text|>"],
        pad_token_id=ids["<|end_of_text|>"], tie_word_embeddings=False,
    )
    return HiggsAudioConfig(
        text_config=text_config,
        audio_adapter_type="dual_ffn",
        audio_dual_ffn_layers=[0, 1],
        audio_ffn_hidden_size=64,
        audio_ffn_intermediate_size=128,
        use_delay_pattern=True,
        skip_audio_tower=True,
        encode_whisper_embed=False,
        encode_audio_in_tokens=False,
        audio_num_codebooks=8,
        audio_codebook_size=1024,
        audio_in_token_idx=ids["<|AUDIO|>"],
        audio_out_token_idx=ids["<|AUDIO_OUT|>"],
        audio_out_bos_token_id=ids["<|audio_out_bos|>"],
        audio_eos_token_id=ids["<|audio_eos|>"],
        pad_token_id=ids["<|end_of_text|>"],
    )


def randomize(model) -> None:
    """Lively weights: N(0, 0.2) everywhere, norms 1 + N(0, 0.1) so swapped norms show."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
        for p in model.parameters():  # what bf16 on disk will hold
            p.copy_(p.to(torch.bfloat16).float())


def save_model(model, dst: Path) -> None:
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=".model-"))
    bf16 = model.to(torch.bfloat16)
    total = sum(p.numel() * 2 for p in bf16.state_dict().values())
    bf16.save_pretrained(tmp, max_shard_size=f"{total // 3 // 1000 + 1}KB", safe_serialization=True)
    model.float()
    for f in dst.glob("model*.safetensors*"):
        f.unlink()
    for f in tmp.iterdir():
        shutil.move(str(f), dst / f.name)
    tmp.rmdir()


# --------------------------------------------------------------------------- recording


def chatml(text, scene=SCENE, ref_text=None, ref_wav=None):
    from boson_multimodal.data_types import AudioContent, ChatMLSample, Message

    system = SYSTEM if not scene else f"{SYSTEM}\n\n<|scene_desc_start|>\n{scene}\n<|scene_desc_end|>"
    messages = [Message(role="system", content=system)]
    if ref_wav is not None:
        messages.append(Message(role="user", content=ref_text))
        messages.append(Message(role="assistant", content=AudioContent(audio_url=str(ref_wav))))
    messages.append(Message(role="user", content=text))
    return ChatMLSample(messages=messages)


def serve_engine():
    patch_boson_tokenizer_module()
    from boson_multimodal.serve.serve_engine import HiggsAudioServeEngine

    return HiggsAudioServeEngine(str(MODEL_DIR), str(TOKENIZER_DIR), device="cpu",
                                 torch_dtype=torch.float32, kv_cache_lengths=[512])


def boson_generate(engine, sample, max_new_tokens):
    """HiggsAudioServeEngine.generate's own calls, greedy, RAS off, plus the step logits."""
    inputs = engine._prepare_inputs(sample, force_audio_gen=True)
    engine._prepare_kv_caches()
    with torch.no_grad():
        out = engine.model.generate(
            **inputs, max_new_tokens=max_new_tokens, use_cache=True,
            stop_strings=["<|end_of_text|>", "<|eot_id|>"], tokenizer=engine.tokenizer,
            do_sample=False, temperature=0.0, top_k=None, top_p=0.95,
            past_key_values_buckets=engine.kv_caches, ras_win_len=None, ras_win_max_num_repeat=2,
            seed=None, output_logits=True, return_dict_in_generate=True,
        )
    return inputs, out


def prefill(engine, inputs):
    """Boson's forward over the prompt: expanded ids and audio-head logits at every position."""
    from transformers.cache_utils import DynamicCache

    with torch.no_grad():
        ret = engine.model(**inputs, use_cache=True, past_key_values=DynamicCache(),
                           output_hidden_states=True, return_dict=True)
        hidden = ret.hidden_states[-1][0]  # after the final norm
        logits = engine.model.audio_decoder_proj.audio_lm_head(hidden).float()
    num_cb = engine.model.config.audio_num_codebooks
    logits = logits.reshape(hidden.shape[0], num_cb, -1)
    if ret.audio_logits is not None and ret.audio_logits.shape[0]:  # Boson's own audio rows agree
        assert torch.allclose(logits[ret.audio_out_mask[0]], ret.audio_logits, atol=1e-5)
    return ret.expanded_input_ids[0], logits


def bias_eos(engine, sample, frame, codebook, margin=3.0):
    """Rewrite one EOS row of audio_lm_head so that the first stream EOS of `sample` lands in
    `codebook` at `frame`: the row is orthogonal to the hidden states of the earlier frames."""
    rows, seen = [], []
    head = engine.model.audio_decoder_proj.audio_lm_head
    hook = head.register_forward_hook(lambda m, args, out: rows.append(args[0].detach().clone())
                                      if args[0].shape[0] == 1 else None)
    try:
        _, out = boson_generate(engine, sample, frame + 2)
    finally:
        hook.remove()
    seen = torch.cat(rows[:frame], dim=0)  # row j-1 -> frame j
    target = seen[frame - 1]
    earlier = seen[: frame - 1]
    q, _ = torch.linalg.qr(earlier.T)
    residual = target - q @ (q.T @ target)
    step_logits = out.logits[frame - 1]  # [C, V] that chose frame `frame`
    size = engine.model.config.audio_codebook_size + 2
    eos = engine.model.config.audio_stream_eos_id
    best_other = step_logits[codebook].clone()
    best_other[eos] = -float("inf")
    beta = (best_other.max() + margin) / residual.norm()
    with torch.no_grad():
        head.weight[codebook * size + eos] = (beta * residual / residual.norm()).to(torch.bfloat16).float()


def main() -> None:
    from transformers import AutoTokenizer

    OUT.mkdir(parents=True, exist_ok=True)
    MODEL_DIR.mkdir(parents=True, exist_ok=True)
    log("text tokenizer (tiny_checkpoints, base interpreter)")
    write_text_tokenizer(MODEL_DIR)
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    ids = token_ids(tokenizer)

    log("audio tokenizer: Boson HiggsAudioTokenizer, tiny HuBERT teacher")
    build_audio_tokenizer(TOKENIZER_DIR)
    bt = patch_boson_tokenizer_module()
    audio_tok = bt.load_higgs_audio_tokenizer(str(TOKENIZER_DIR), device="cpu")
    codec = {}
    for seconds, seed in ((1.5, 1), (2.0, 2)):
        wave = waveform(seconds, seed)
        codes = audio_tok.encode(wave, 24000)  # [n_q, T]
        audio = audio_tok.decode(codes.unsqueeze(0))[0, 0]
        codec[str(seconds)] = {"waveform": torch.from_numpy(wave), "codes": codes.to(torch.int16),
                               "audio": torch.from_numpy(audio.copy())}
        log(f"  {seconds}s: codes {tuple(codes.shape)}, distinct {codes.unique().numel()}, audio {audio.shape}")

    import soundfile as sf

    ref_wav = OUT / "ref.wav"
    sf.write(ref_wav, waveform(1.0, 3), 24000, subtype="FLOAT")

    log("generation model: Boson HiggsAudioModel, ORIGINAL layout")
    from boson_multimodal.model.higgs_audio import HiggsAudioModel

    config = boson_config(ids, len(tokenizer))
    model = HiggsAudioModel(config)
    randomize(model)
    save_model(model, MODEL_DIR)

    prompts = [
        dict(name="english", text="Hello world, this is a test of the speech system.", frames=40),
        dict(name="chinese", text="你好，世界！今天天气很好，我们一起去公园散步吧。", frames=40),
        dict(name="eos_in_codebook_3", text="The sun rises in the east and sets in the west.", frames=40),
        dict(name="reference_audio", text="Hooray! It's almost here!", frames=30,
             ref_text="It was the night before my birthday."),
        dict(name="no_scene", text="Numbers one two three.", frames=20, scene=""),
    ]
    engine = serve_engine()
    eos_prompt = prompts[2]
    bias_eos(engine, chatml(eos_prompt["text"]), EOS_FRAME, EOS_CODEBOOK)
    save_model(engine.model, MODEL_DIR)
    engine = serve_engine()  # record from the files on disk

    records = {"ids": ids, "system": SYSTEM, "default_scene": SCENE, "prompts": [], "codec": codec,
               "eos_frame": EOS_FRAME, "eos_codebook": EOS_CODEBOOK}
    for p in prompts:
        scene = p.get("scene", SCENE)
        ref = ref_wav if p.get("ref_text") else None
        sample = chatml(p["text"], scene, p.get("ref_text"), ref)
        inputs, out = boson_generate(engine, sample, p["frames"])
        codes = out.audio_sequences[0]  # [C, n]: column 0 = all stream BOS
        expanded, logits = prefill(engine, inputs)
        # out.logits[0] is the text step at <|audio_out_bos|> (frame 0 = BOS, not sampled);
        # out.logits[j] chose frame j; text steps may follow the closing frame
        step_logits = torch.stack(out.logits[1 : codes.shape[1]]).float()
        keep_steps = sorted({0, 1, 7, 8, codes.shape[1] - 2} & set(range(step_logits.shape[0])))
        audio_rows = (expanded == ids["<|AUDIO_OUT|>"]).nonzero().flatten().tolist()
        keep_rows = sorted({len(expanded) - 2, len(expanded) - 1, *audio_rows[:2], *audio_rows[-2:]})
        rec = {
            "name": p["name"], "text": p["text"], "scene": scene, "ref_text": p.get("ref_text"),
            "max_new_tokens": p["frames"],
            "input_ids": inputs["input_ids"][0].clone(),  # Boson's prompt, one <|AUDIO_OUT|> per audio
            "expanded_input_ids": expanded.clone(),
            "prefill_rows": torch.tensor(keep_rows), "prefill_logits": logits[keep_rows].clone(),
            "step_index": torch.tensor(keep_steps), "step_logits": step_logits[keep_steps].clone(),
            "codes": codes.T.to(torch.int16).clone(),  # [n, C], as our Generation.codes
            "finished": codes.shape[1] < p["frames"],
        }
        if ref is not None:
            rec["ref_codes"] = audio_tok.encode(str(ref)).to(torch.int16)  # [C, T], Boson's encode of ref.wav
            rec["audio_out_ids"] = inputs["audio_out_ids"].to(torch.int16).clone()
        records["prompts"].append(rec)
        first_eos = (codes == 1025).any(dim=0).nonzero()
        log(f"  {p['name']}: prompt {len(rec['input_ids'])} ids ({len(expanded)} expanded), "
            f"{codes.shape[1]} frames, first EOS frame {first_eos[0].item() if len(first_eos) else None}")
    torch.save(records, OUT / "records.pt")
    sizes = {f.relative_to(OUT): f.stat().st_size for f in OUT.rglob("*") if f.is_file()}
    log("written: " + ", ".join(f"{k} {v / 1e3:.0f} kB" for k, v in sorted(sizes.items())))


if __name__ == "__main__":
    main()
