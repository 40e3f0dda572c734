"""Builds a tiny random-weight Qwen3-TTS Base model on disk, laid out like the real checkpoint.

The real weights cannot be downloaded here, so tests load this directory through the same
`Qwen3TTSModel.from_pretrained` path production uses. Import it from any test file by path:
``timbre_common.testing.load_module("timbre_qwen_tiny", GPU_WORKER / "tests" / "qwen_tiny.py")``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Codec layout of the real model shrunk: codebook entries first, then 1024 control ids (the talker
# suppresses the top 1024 ids when sampling, so specials must live there).
CODEBOOK_SIZE = 256
TALKER_VOCAB = CODEBOOK_SIZE + 1024
NUM_CODE_GROUPS = 16
TALKER_HIDDEN = 64
TEXT_HIDDEN = 32
SEED = 1234

LANGUAGES = ["chinese", "english", "german", "italian", "portuguese", "spanish", "japanese", "korean",
             "french", "russian"]

_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|tts_pad|>", "<|tts_bos|>", "<|tts_eos|>"]

_CORPUS = [
    "assistant", "assistant\n", "<|im_start|>assistant\nHello world.<|im_end|>\n",
    "The quick brown fox jumps over the lazy dog.",
    "Timbre clones a voice from a short reference recording.",
    "Speech synthesis turns written text into natural sounding audio.",
    "Numbers like 42 and 1999 are read aloud, one by one.",
    "Bonjour, hola, hallo, ciao, ola, privet.",
]


def _tokenizer_files(target: Path) -> dict[str, int]:
    """Trains a byte-level BPE offline and saves it as Qwen2 slow-tokenizer files; returns special ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # Qwen2's split rule, so "assistant" and "\n" stay separate tokens as the prompt slicing in
    # qwen-tts (input_id[:, 3:-5]) expects.
    pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    from tokenizers import Regex

    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    specials: dict[str, int] = {}
    for token in _SPECIAL_TOKENS:
        specials[token] = len(vocab) + len(specials)
    (target / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (target / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    added = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                 "special": True}
        for t, i in specials.items()
    }
    (target / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": added,
        "additional_special_tokens": _SPECIAL_TOKENS[1:],
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        "model_max_length": 32768,
        "split_special_tokens": False,
    }))
    specials["__vocab_size__"] = len(vocab) + len(specials)
    return specials


def _main_config(specials: dict[str, int]) -> dict[str, Any]:
    codec = {"pad": 1100, "bos": 1101, "eos": 1102, "think": 1103, "nothink": 1104, "think_bos": 1105,
             "think_eos": 1106}
    return {
        "architectures": ["Qwen3TTSForConditionalGeneration"],
        "model_type": "qwen3_tts",
        "tokenizer_type": "qwen3_tts_tokenizer_12hz",
        "tts_model_size": "tiny",
        "tts_model_type": "base",
        "im_start_token_id": specials["<|im_start|>"],
        "im_end_token_id": specials["<|im_end|>"],
        "tts_pad_token_id": specials["<|tts_pad|>"],
        "tts_bos_token_id": specials["<|tts_bos|>"],
        "tts_eos_token_id": specials["<|tts_eos|>"],
        "talker_config": {
            "vocab_size": TALKER_VOCAB,
            "hidden_size": TALKER_HIDDEN,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "rope_theta": 1000000,
            # Interleaved multimodal RoPE as in the real talker; sections sum to head_dim / 2.
            "rope_scaling": {"interleaved": True, "mrope_section": [4, 2, 2], "rope_type": "default",
                             "type": "default"},
            "max_position_embeddings": 4096,
            "num_code_groups": NUM_CODE_GROUPS,
            "text_hidden_size": TEXT_HIDDEN,
            "text_vocab_size": specials["__vocab_size__"],
            "codec_eos_token_id": codec["eos"],
            "codec_think_id": codec["think"],
            "codec_nothink_id": codec["nothink"],
            "codec_think_bos_id": codec["think_bos"],
            "codec_think_eos_id": codec["think_eos"],
            "codec_pad_id": codec["pad"],
            "codec_bos_id": codec["bos"],
            "codec_language_id": {lang: 1110 + i for i, lang in enumerate(LANGUAGES)},
            "spk_id": {},
            "spk_is_dialect": {},
            "code_predictor_config": {
                "vocab_size": CODEBOOK_SIZE,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
                "head_dim": 16,
                "max_position_embeddings": 64,
                "num_code_groups": NUM_CODE_GROUPS,
            },
        },
        # The ECAPA encoder's output is spliced into the talker's input, so enc_dim == talker hidden.
        "speaker_encoder_config": {
            "mel_dim": 128,
            "enc_dim": TALKER_HIDDEN,
            "enc_channels": [32, 32, 32, 32, 96],
            "enc_kernel_sizes": [5, 3, 3, 3, 1],
            "enc_dilations": [1, 2, 3, 4, 1],
            "enc_attention_channels": 16,
            "enc_res2net_scale": 4,
            "enc_se_channels": 16,
            "sample_rate": 24000,
        },
    }


def _speech_tokenizer_config() -> dict[str, Any]:
    codebook_dim = 16
    return {
        "architectures": ["Qwen3TTSTokenizerV2Model"],
        "model_type": "qwen3_tts_tokenizer_12hz",
        "encoder_valid_num_quantizers": NUM_CODE_GROUPS,
        "input_sample_rate": 24000,
        "output_sample_rate": 24000,
        "decode_upsample_rate": 1920,
        "encode_downsample_rate": 1920,
        # Mimi encoder with the real strides (24 kHz -> 12.5 Hz) and narrow channels.
        "encoder_config": {
            "sampling_rate": 24000,
            "frame_rate": 12.5,
            "hidden_size": 32,
            "num_filters": 4,
            "upsampling_ratios": [8, 6, 5, 4],
            "num_hidden_layers": 1,
            "intermediate_size": 64,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "codebook_size": CODEBOOK_SIZE,
            "codebook_dim": codebook_dim,
            "vector_quantization_hidden_dimension": codebook_dim,
            "num_quantizers": NUM_CODE_GROUPS,
            "num_semantic_quantizers": 1,
            "upsample_groups": 32,
            "use_cache": False,
        },
        "decoder_config": {
            "codebook_size": CODEBOOK_SIZE,
            "codebook_dim": codebook_dim,
            "hidden_size": 32,
            "latent_dim": 32,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_quantizers": NUM_CODE_GROUPS,
            "upsample_rates": [8, 5, 4, 3],
            "upsampling_ratios": [2, 2],
            "decoder_dim": 64,
            "sliding_window": 72,
        },
    }


def _sanitize_speaker_encoder(config_path: Path, own: dict[str, Any]) -> None:
    # save_pretrained serialises the speaker-encoder config with every PretrainedConfig key, which its
    # __init__ (no **kwargs) then rejects on load.
    data = json.loads(config_path.read_text())
    data["speaker_encoder_config"] = own
    config_path.write_text(json.dumps(data, indent=2))


def _probe_rms(codec: Any, codebook_size: int) -> float:
    import torch

    device = next(codec.parameters()).device
    codes = torch.randint(0, codebook_size, (1, NUM_CODE_GROUPS, 8), device=device)
    with torch.no_grad():
        hidden = codec.decoder.quantizer.decode(codes)
        hidden = codec.decoder.pre_conv(hidden).transpose(1, 2)
        hidden = codec.decoder.pre_transformer(inputs_embeds=hidden).last_hidden_state.permute(0, 2, 1)
        for blocks in codec.decoder.upsample:
            for block in blocks:
                hidden = block(hidden)
        for block in codec.decoder.decoder:
            hidden = block(hidden)
    return float(hidden.pow(2).mean().sqrt())


def _randomize_codebooks(codec: Any, codebook_size: int) -> None:
    # Untrained decoder codebooks start at zero, which would decode every code to silence; random
    # entries give audible, code-dependent output so tests can tell audio from an empty buffer.
    import torch

    with torch.no_grad():
        for name, param in codec.decoder.named_parameters():
            if name.endswith("embedding_sum"):
                param.normal_(0.0, 1.0)
        # std 0.02 everywhere shrinks the signal ~1e-8 through the conv stack; fan-in scaling keeps
        # the waveform in a normal range.
        for module in codec.decoder.modules():
            if isinstance(module, (torch.nn.Conv1d, torch.nn.ConvTranspose1d)):
                fan_in = module.weight.shape[1] * module.weight.shape[2]
                if isinstance(module, torch.nn.ConvTranspose1d):
                    fan_in = module.weight.shape[0] * module.weight.shape[2] // max(module.stride[0], 1)
                module.weight.normal_(0.0, fan_in ** -0.5)
        last_conv = [m for m in codec.decoder.decoder[-1].modules() if isinstance(m, torch.nn.Conv1d)][-1]
        rms = _probe_rms(codec, codebook_size)
        last_conv.weight.mul_(0.2 / max(rms, 1e-6))


# Public architecture figures (NOTES.md) for random-weight benchmarks of the real sizes on a GPU.
_REAL_TALKER = {"num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
                "vocab_size": 3072, "text_hidden_size": 2048, "text_vocab_size": 151936,
                "rope_scaling": {"interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default",
                                 "type": "default"}}
_REAL_PREDICTOR = {"vocab_size": 2048, "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 5,
                   "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128}
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {},
    "0.6b": {"talker": {**_REAL_TALKER, "hidden_size": 1024, "intermediate_size": 3072},
             "predictor": _REAL_PREDICTOR, "codebook": 2048, "real_codec": True},
    "1.7b": {"talker": {**_REAL_TALKER, "hidden_size": 2048, "intermediate_size": 8192},
             "predictor": _REAL_PREDICTOR, "codebook": 2048, "real_codec": True},
}


def _apply_preset(main: dict[str, Any], codec: dict[str, Any], preset: str) -> None:
    p = PRESETS[preset]
    if not p:
        return
    talker = main["talker_config"]
    codebook = p["codebook"]
    shift = codebook + 1024 - TALKER_VOCAB  # keep control ids in the top 1024 of the larger vocab
    for key in ("codec_eos_token_id", "codec_think_id", "codec_nothink_id", "codec_think_bos_id",
                "codec_think_eos_id", "codec_pad_id", "codec_bos_id"):
        talker[key] += shift
    talker["codec_language_id"] = {k: v + shift for k, v in talker["codec_language_id"].items()}
    talker.update(p["talker"])
    talker["code_predictor_config"].update(p["predictor"])
    main["speaker_encoder_config"].update(enc_dim=talker["hidden_size"], enc_channels=[512, 512, 512, 512, 1536],
                                          enc_attention_channels=128, enc_res2net_scale=8, enc_se_channels=128)
    if p.get("real_codec"):
        for key in ("encoder_config", "decoder_config"):
            codec[key]["codebook_size"] = codebook
        codec["encoder_config"].update(hidden_size=512, num_filters=64, num_hidden_layers=8, intermediate_size=2048,
                                       num_attention_heads=8, num_key_value_heads=8, head_dim=64,
                                       codebook_dim=256, vector_quantization_hidden_dimension=256,
                                       upsample_groups=512)
        codec["decoder_config"].update(codebook_dim=512, hidden_size=512, latent_dim=1024, num_attention_heads=16,
                                       num_key_value_heads=16, head_dim=64, intermediate_size=1024,
                                       num_hidden_layers=8, decoder_dim=1536)


def build_tiny_model(target: Path) -> Path:
    """Write a deterministic tiny Qwen3-TTS Base checkpoint into `target`; returns the directory."""
    return build_random_model(target, "tiny")


def build_random_model(target: Path, preset: str = "tiny", device: str = "cpu") -> Path:
    """Write a random-weight Qwen3-TTS Base checkpoint of a preset size ("tiny", "0.6b", "1.7b")."""
    import torch

    from timbre_gpu_worker.backends.torchaudio_shim import ensure_torchaudio_importable

    ensure_torchaudio_importable()
    from qwen_tts.core.models import Qwen3TTSConfig, Qwen3TTSForConditionalGeneration
    from qwen_tts.core.tokenizer_12hz.configuration_qwen3_tts_tokenizer_v2 import Qwen3TTSTokenizerV2Config
    from qwen_tts.core.tokenizer_12hz.modeling_qwen3_tts_tokenizer_v2 import Qwen3TTSTokenizerV2Model

    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    if (target / "model.safetensors").exists() and (target / "speech_tokenizer" / "model.safetensors").exists():
        return target

    specials = _tokenizer_files(target)
    main = _main_config(specials)
    codec_config = _speech_tokenizer_config()
    _apply_preset(main, codec_config, preset)
    cpu_rng = torch.random.get_rng_state()
    torch.manual_seed(SEED)
    try:
        # Real sizes are built on the GPU (a 1.7B fp32 init on 2 CPU cores takes minutes).
        with torch.device(device):
            model = Qwen3TTSForConditionalGeneration(Qwen3TTSConfig(**main)).to(torch.float32)
        model.save_pretrained(target, safe_serialization=True, max_shard_size="100GB")  # one file, as shipped
        _sanitize_speaker_encoder(target / "config.json", main["speaker_encoder_config"])

        st_dir = target / "speech_tokenizer"
        st_dir.mkdir(exist_ok=True)
        with torch.device(device):
            codec = Qwen3TTSTokenizerV2Model(Qwen3TTSTokenizerV2Config(**codec_config))
        _randomize_codebooks(codec, codec_config["decoder_config"]["codebook_size"])
        codec.save_pretrained(st_dir, safe_serialization=True)
    finally:
        torch.random.set_rng_state(cpu_rng)
    (st_dir / "preprocessor_config.json").write_text(json.dumps({
        "feature_extractor_type": "EncodecFeatureExtractor",
        "feature_size": 1,
        "sampling_rate": 24000,
        "padding_side": "right",
        "padding_value": 0.0,
        "return_attention_mask": True,
        "chunk_length_s": None,
        "overlap": None,
    }))
    (target / "generation_config.json").write_text(json.dumps({
        "do_sample": True, "top_k": 50, "top_p": 1.0, "temperature": 0.9, "repetition_penalty": 1.05,
        "subtalker_dosample": True, "subtalker_top_k": 50, "subtalker_top_p": 1.0,
        "subtalker_temperature": 0.9, "max_new_tokens": 64,
    }))
    return target
