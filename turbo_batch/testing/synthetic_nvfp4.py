"""A tiny synthetic checkpoint shaped like nvidia/Gemma-4-31B-IT-NVFP4, the source `turbo-batch convert` expects.

Owns: `write_synthetic_nvidia_checkpoint` (multimodal Gemma 4 config, small vision/audio towers, text MLP in
ModelOpt NVFP4, attention BF16 and excluded, a word-level tokenizer) for the convert tests and the NVFP4
benchmarks (benchmarks/gpu_nvfp4_load.py). Test and demo data only: nothing in turbo_batch's commands
imports it.
Must not touch: the converter. It reuses the converter's NVFP4 quantizer, shard writer and config writer so
the synthetic source has exactly the layout ModelOpt exports, and changes none of them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from turbo_batch.convert import nvfp4
from turbo_batch.convert.io import DTYPES, ShardWriter, as_bytes
from turbo_batch.convert.modelopt import quant_config_files


def write_synthetic_nvidia_checkpoint(
    path: str | Path,
    *,
    hidden_size: int = 256,
    intermediate_size: int = 512,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    head_dim: int = 64,
    num_global_key_value_heads: int = 2,
    vocab_size: int = 512,
    attention_k_eq_v: bool = True,
    with_encoders: bool = True,
    mlp_nvfp4: bool = True,
    exclude_style: str = "per_layer",
    max_shard_bytes: int | None = None,
    seed: int = 0,
) -> Path:
    """Write a tiny checkpoint shaped like nvidia/Gemma-4-31B-IT-NVFP4: multimodal Gemma4ForConditionalGeneration
    config, small vision/audio towers, text MLP in ModelOpt NVFP4 (weight/weight_scale/weight_scale_2/
    input_scale, gate/up sharing their global scale), self-attention in BF16 and excluded from quantization,
    embed_tokens and norms BF16, tied lm_head, a word-level tokenizer. `global_head_dim == head_dim`; the
    defaults are multiples of 128 so Marlin FP4 (min thread n 64, k 128) and the 16-wide groups fit.

    exclude_style: "per_layer" (`model.language_model.layers.N.self_attn*`, ModelOpt's style) or "wildcard"
    (`*self_attn*`, which also covers the encoders' attention). mlp_nvfp4=False writes an all-BF16 model with
    no quantization config (a user's own fine-tune), for the "mlp" group.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    bf16 = torch.bfloat16

    def randn(*shape: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(bf16)

    def norm(dim: int) -> torch.Tensor:
        return (1.0 + 0.1 * torch.randn(dim, generator=gen)).to(bf16)

    layer_types = [
        "full_attention" if (i + 1) % 6 == 0 or i == num_hidden_layers - 1 else "sliding_attention"
        for i in range(num_hidden_layers)
    ]
    t: dict[str, torch.Tensor] = {}
    lm = "model.language_model"
    t[f"{lm}.embed_tokens.weight"] = randn(vocab_size, hidden_size, std=1.0)
    for i, kind in enumerate(layer_types):
        p = f"{lm}.layers.{i}"
        kv_heads = (
            num_global_key_value_heads
            if kind == "full_attention" and attention_k_eq_v
            else num_key_value_heads
        )
        t[f"{p}.layer_scalar"] = torch.ones(1, dtype=bf16)
        t[f"{p}.self_attn.q_proj.weight"] = randn(num_attention_heads * head_dim, hidden_size)
        t[f"{p}.self_attn.k_proj.weight"] = randn(kv_heads * head_dim, hidden_size)
        if not (kind == "full_attention" and attention_k_eq_v):
            t[f"{p}.self_attn.v_proj.weight"] = randn(kv_heads * head_dim, hidden_size)
        t[f"{p}.self_attn.o_proj.weight"] = randn(hidden_size, num_attention_heads * head_dim)
        t[f"{p}.self_attn.q_norm.weight"] = norm(head_dim)
        t[f"{p}.self_attn.k_norm.weight"] = norm(head_dim)
        mlp = {
            "gate": randn(intermediate_size, hidden_size),
            "up": randn(intermediate_size, hidden_size),
            "down": randn(hidden_size, intermediate_size),
        }
        gate_up_scale = nvfp4.global_scale_from_amax(max(nvfp4.amax(mlp["gate"]), nvfp4.amax(mlp["up"])))
        for proj, weight in mlp.items():
            if not mlp_nvfp4:
                t[f"{p}.mlp.{proj}_proj.weight"] = weight
                continue
            gs = gate_up_scale if proj != "down" else None
            q = nvfp4.quantize(weight, global_scale=gs)
            t[f"{p}.mlp.{proj}_proj.weight"] = q.weight
            t[f"{p}.mlp.{proj}_proj.weight_scale"] = q.weight_scale
            t[f"{p}.mlp.{proj}_proj.weight_scale_2"] = q.weight_scale_2
            # stand-in for calibrated activation amax / 2688
            t[f"{p}.mlp.{proj}_proj.input_scale"] = torch.tensor((12.0 if proj != "down" else 3.0) / 2688.0)
        for n in (
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        ):
            t[f"{p}.{n}.weight"] = norm(hidden_size)
    t[f"{lm}.norm.weight"] = norm(hidden_size)

    vision = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
              "num_key_value_heads": 2, "head_dim": 32, "patch_size": 16, "position_embedding_size": 64,
              "pooling_kernel_size": 3, "model_type": "gemma4_vision"}  # fmt: skip
    audio = {"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "output_proj_dims": 64,
             "subsampling_conv_channels": [16, 8], "conv_kernel_size": 3, "model_type": "gemma4_audio"}  # fmt: skip
    if with_encoders:
        vt = "model.vision_tower"
        t[f"{vt}.patch_embedder.position_embedding_table"] = randn(2, 64, 64)
        t[f"{vt}.patch_embedder.input_proj.weight"] = randn(64, 768)
        for proj in ("q", "k", "v", "o"):
            t[f"{vt}.encoder.layers.0.self_attn.{proj}_proj.linear.weight"] = randn(64, 64)
        for proj, shape in (("gate", (128, 64)), ("up", (128, 64)), ("down", (64, 128))):
            t[f"{vt}.encoder.layers.0.mlp.{proj}_proj.linear.weight"] = randn(*shape)
        for n in (
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        ):
            t[f"{vt}.encoder.layers.0.{n}.weight"] = norm(64)
        at = "model.audio_tower"
        t[f"{at}.subsample_conv_projection.layer0.conv.weight"] = randn(16, 1, 3, 3)
        t[f"{at}.subsample_conv_projection.input_proj_linear.weight"] = randn(64, 32)
        for proj in ("q", "k", "v"):
            t[f"{at}.layers.0.self_attn.{proj}_proj.linear.weight"] = randn(64, 64)
            t[f"{at}.layers.0.self_attn.{proj}_proj.input_max"] = torch.tensor(4.0)
        t[f"{at}.layers.0.self_attn.post.linear.weight"] = randn(64, 64)
        t[f"{at}.output_proj.weight"] = randn(64, 64)
        t[f"{at}.output_proj.bias"] = randn(64)
        t["model.embed_vision.embedding_projection.weight"] = randn(hidden_size, 64)
        t["model.embed_audio.embedding_projection.weight"] = randn(hidden_size, 64)

    if exclude_style == "per_layer":
        excludes = ["lm_head", *(f"{lm}.layers.{i}.self_attn*" for i in range(num_hidden_layers))]
    elif exclude_style == "wildcard":
        excludes = ["lm_head", "*self_attn*"]
    else:
        raise ValueError(f"exclude_style {exclude_style!r}")
    if with_encoders:
        excludes += ["model.audio_tower*", "model.embed_audio*", "model.embed_vision*", "model.vision_tower*"]
    hf_qc, cfg_qc = quant_config_files(
        group_size=16,
        exclude_modules=excludes,
        kv_cache_quant_algo=None,
        producer={"name": "modelopt", "version": "0.37.0"},
        recipe={"note": "synthetic NVIDIA-style test checkpoint"},
    )
    hf_qc.pop("turbo_batch")
    text_cfg = {
        "model_type": "gemma4_text",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "head_dim": head_dim,
        "global_head_dim": head_dim,
        "num_global_key_value_heads": num_global_key_value_heads,
        "attention_k_eq_v": attention_k_eq_v,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "sliding_window": 512,
        "layer_types": layer_types,
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {
                "rope_type": "proportional",
                "partial_rotary_factor": 0.25,
                "rope_theta": 1000000.0,
            },
        },
        "final_logit_softcapping": 30.0,
        "hidden_size_per_layer_input": 0,
        "vocab_size_per_layer_input": vocab_size,
        "num_kv_shared_layers": 0,
        "enable_moe_block": False,
        "tie_word_embeddings": True,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
        "dtype": "bfloat16",
    }
    cfg = {
        "architectures": ["Gemma4ForConditionalGeneration"],
        "model_type": "gemma4",
        "text_config": text_cfg,
        "tie_word_embeddings": True,
        "dtype": "bfloat16",
    }
    if mlp_nvfp4:
        cfg["quantization_config"] = cfg_qc
        (path / "hf_quant_config.json").write_text(json.dumps(hf_qc, indent=2) + "\n")
    if with_encoders:
        cfg |= {"vision_config": vision, "audio_config": audio, "boi_token_id": 255999, "eoi_token_id": 258882,
                "image_token_id": 258880, "audio_token_id": 258881, "boa_token_id": 256000}  # fmt: skip
    (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    _write_tensors(path, t, max_shard_bytes)
    _write_word_tokenizer(path, vocab_size)
    (path / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0})
    )
    if with_encoders:
        (path / "processor_config.json").write_text(json.dumps({"processor_class": "Gemma4Processor"}))
    return path


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int | None) -> None:
    """Write tensors (in memory) as safetensors shards + index, with the same writer the converter uses."""
    inv = {v[0]: k for k, v in DTYPES.items() if v[0] is not None}
    shards: list[list[str]] = [[]]
    size = 0
    for name, x in tensors.items():
        nbytes = x.numel() * x.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map = {}
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        entries = [
            (
                n,
                inv[tensors[n].dtype],
                tuple(tensors[n].shape),
                tensors[n].numel() * tensors[n].element_size(),
            )
            for n in names
        ]
        w = ShardWriter(path / fname, entries)
        for n in names:
            w.write(n, 0, as_bytes(tensors[n]))
        w.close()
        weight_map |= dict.fromkeys(names, fname)
    total = sum(x.numel() * x.element_size() for x in tensors.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )


def _write_word_tokenizer(path: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    words = [f"w{i}" for i in range(vocab_size - len(specials))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<bos>",
                "eos_token": "<eos>",
                "pad_token": "<pad>",
                "unk_token": "<unk>",
                "model_max_length": 4096,
            }
        )
    )
    (path / "chat_template.jinja").write_text(
        "{% for m in messages %}<start_of_turn>{{ m['role'] }} {{ m['content'] }}<end_of_turn> {% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model {% endif %}"
    )
