"""Engine sizing: from a model's shape and one GPU's memory to KV cache tokens, concurrency and context.

Owns: `ModelShape` (the attention layers that hold KV cache, read from config.json the way vLLM
builds its cache: Gemma 4's sliding layers keep a window, its global layers use `global_head_dim` and
`num_global_key_value_heads`, KV-shared layers hold none), the weight size of a checkpoint (safetensors
index, file sizes, or parameters x dtype), `BUILTIN` shapes for known hub checkpoints (so `plan` works
offline) and `size_engine()`, which turns memory into `max_model_len` / `max_num_seqs` /
`max_num_batched_tokens`. Pure functions: no vLLM, torch or Ray import. Must not touch: presets,
profiles or how the numbers are merged into engine arguments (profiles.py does that).

The model follows vLLM's own accounting (v1 KV cache manager): a full-attention layer holds every
token; a sliding layer holds at most `window - 1 + in-flight tokens` (in flight = 2 x
max_num_batched_tokens with async scheduling); vLLM starts only if one request of `max_model_len`
fits, and logs "KV cache size: N tokens" as (KV bytes / bytes of one max_model_len request) x
max_model_len — `Sizing.kv_cache_tokens` is that same number. The activation reserve is an estimate
(bf16 MLP + residual activations of one batch, sampler logits, 1 GiB for CUDA graphs and non-torch
memory); compare with vLLM's "Available KV cache memory" log line on a real card and correct it.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GIB = 1024**3
FIXED_RESERVE = 1 * GIB  # CUDA graphs, NCCL/cuBLAS workspaces, non-torch allocations
BATCH_TOKENS = (16384, 8192, 4096, 2048)  # max_num_batched_tokens candidates, largest first
ACTIVATION_SHARE = 0.15  # activations may take at most this share of the memory left after weights
MAX_SEQS = 512  # above this, scheduling cost and CUDA graph capture grow for little gain
ROW_TOKENS = 2048  # the row length (prompt + output) that max_num_seqs is sized for
KV_DTYPE_BYTES = {"fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "fp8_ds_mla": 1, "nvfp4": 0.5625}
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float": 4, "half": 2}


class SizingError(ValueError):
    """The GPU cannot run this model at all (weights or one minimal request do not fit)."""


@dataclass(frozen=True)
class LayerGroup:
    """Attention layers of one kind: how many, their KV heads and head size, sliding window or None."""

    count: int
    kv_heads: int
    head_size: int
    window: int | None = None

    def bytes_per_token(self, kv_bytes: float) -> float:
        return self.count * 2 * self.kv_heads * self.head_size * kv_bytes  # K and V


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    intermediate: int
    vocab: int
    max_position: int
    layers: tuple[LayerGroup, ...]
    params: int  # estimated from the shape (embeddings + attention + MLP)
    dtype_bytes: int = 2
    source: str = "config.json"

    def request_kv_bytes(self, length: int, kv_bytes: float, in_flight: int) -> float:
        """KV bytes one request of `length` tokens may hold (vLLM's admission bound)."""
        total = 0.0
        for g in self.layers:
            held = length if g.window is None else min(length, g.window - 1 + in_flight)
            total += held * g.bytes_per_token(kv_bytes)
        return total

    def linear_params(self) -> int:
        return self.params - self.vocab * self.hidden


@dataclass(frozen=True)
class Sizing:
    """What one GPU gets for one model (all byte counts are bytes; see `summary()` for GiB)."""

    gpu: str
    memory_bytes: float
    gpu_memory_utilization: float
    weight_bytes: float
    reserve_bytes: float
    kv_cache_bytes: float
    kv_cache_tokens: int
    max_model_len: int
    max_model_len_memory: int  # the longest one request memory allows, before card/model limits
    max_num_seqs: int
    max_num_batched_tokens: int
    limits: list[str] = field(default_factory=list)  # why max_model_len is what it is

    def summary(self) -> dict[str, Any]:
        g = lambda b: round(b / GIB, 2)  # noqa: E731
        return {
            "weights_gib": g(self.weight_bytes),
            "reserve_gib": g(self.reserve_bytes),
            "kv_cache_gib": g(self.kv_cache_bytes),
            "kv_cache_tokens": self.kv_cache_tokens,
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "max_model_len": self.max_model_len,
            "max_model_len_memory": self.max_model_len_memory,
        }


# ------------------------------------------------------------------------------------------ model shape


def _text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    return cfg.get("text_config") or cfg


def shape_from_config(cfg: dict[str, Any], name: str = "", source: str = "config.json") -> ModelShape:
    """The KV-holding attention layers and parameter count of a decoder, as vLLM would build them."""
    t = _text_config(cfg)
    hidden, n_layers = int(t["hidden_size"]), int(t["num_hidden_layers"])
    heads = int(t["num_attention_heads"])
    kv_heads = int(t.get("num_key_value_heads") or heads)
    head_dim = int(t.get("head_dim") or hidden // heads)
    gemma4 = str(t.get("model_type", cfg.get("model_type", ""))).startswith("gemma4")
    types = list(t.get("layer_types") or [])
    if not types:
        pattern = t.get("sliding_window_pattern") or (6 if gemma4 else 0)
        sliding = t.get("sliding_window") and pattern
        types = [
            "sliding_attention" if sliding and (i + 1) % pattern else "full_attention"
            for i in range(n_layers)
        ]
    window = t.get("sliding_window")
    # Global (full-attention) layers of Gemma 4: their own head size and, with attention_k_eq_v, KV heads.
    overrides: dict[int, dict[str, Any]] = {}
    if "per_layer_config" in t:
        overrides = {int(k): v for k, v in (t["per_layer_config"] or {}).items()}
    elif gemma4:
        glob: dict[str, Any] = {"head_dim": int(t.get("global_head_dim") or 512)}
        if t.get("attention_k_eq_v") and t.get("num_global_key_value_heads"):
            glob["num_key_value_heads"] = int(t["num_global_key_value_heads"])
        overrides = {i: glob for i, kind in enumerate(types) if kind == "full_attention"}
    first_shared = n_layers - int(t.get("num_kv_shared_layers") or 0)  # later layers reuse earlier KV
    inter = int(t.get("intermediate_size") or 4 * hidden)
    groups: dict[tuple[int, int, int | None], int] = {}
    params = 0
    for i, kind in enumerate(types[:n_layers]):
        o = overrides.get(i, {})
        kvh, hd = int(o.get("num_key_value_heads", kv_heads)), int(o.get("head_dim", head_dim))
        k_eq_v = gemma4 and kind == "full_attention" and bool(t.get("attention_k_eq_v"))
        params += hidden * heads * hd * 2 + hidden * kvh * hd * (1 if k_eq_v else 2) + 3 * hidden * inter
        if i < first_shared:
            key = (kvh, hd, int(window) if kind == "sliding_attention" and window else None)
            groups[key] = groups.get(key, 0) + 1
    vocab = int(t.get("vocab_size") or cfg.get("vocab_size") or 32000)
    tied = cfg.get("tie_word_embeddings", t.get("tie_word_embeddings", True))
    params += vocab * hidden * (1 if tied else 2)
    dtype = str(t.get("dtype") or t.get("torch_dtype") or cfg.get("torch_dtype") or "bfloat16")
    return ModelShape(
        name=name,
        hidden=hidden,
        intermediate=inter,
        vocab=vocab,
        max_position=int(t.get("max_position_embeddings") or 4096),
        layers=tuple(LayerGroup(n, kvh, hd, w) for (kvh, hd, w), n in groups.items()),
        params=params,
        dtype_bytes=DTYPE_BYTES.get(dtype.replace("torch.", ""), 2),
        source=source,
    )


# The released Gemma 4 31B IT text config (fields that matter for sizing). Checked against several
# public copies of config.json (text_config: hidden 5376, 60 layers, 32 heads, 16 KV heads, head_dim
# 256, global_head_dim 512, num_global_key_value_heads 4 with attention_k_eq_v, sliding_window 1024,
# 5:1 sliding:full, vocab 262144, max_position_embeddings 262144, intermediate 21504, tied embeddings).
GEMMA4_31B_CONFIG: dict[str, Any] = {
    "architectures": ["Gemma4ForConditionalGeneration"],
    "model_type": "gemma4",
    "text_config": {
        "model_type": "gemma4_text",
        "hidden_size": 5376,
        "intermediate_size": 21504,
        "num_hidden_layers": 60,
        "num_attention_heads": 32,
        "num_key_value_heads": 16,
        "head_dim": 256,
        "global_head_dim": 512,
        "num_global_key_value_heads": 4,
        "attention_k_eq_v": True,
        "sliding_window": 1024,
        "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 10,
        "num_kv_shared_layers": 0,
        "vocab_size": 262144,
        "max_position_embeddings": 262144,
        "tie_word_embeddings": True,
        "dtype": "bfloat16",
    },
}

# Hub checkpoints `plan` can size without a download: (config.json, weight bytes, where the size is from).
BUILTIN: dict[str, tuple[dict[str, Any], float, str]] = {
    "LilaRest/gemma-4-31B-it-NVFP4-turbo": (
        GEMMA4_31B_CONFIG,
        18.5e9,
        "built-in table: Gemma 4 31B config, ~18.5 GB NVFP4 weights (not read from the checkpoint)",
    ),
}


@dataclass(frozen=True)
class ModelInfo:
    shape: ModelShape
    weight_bytes: float
    source: str  # where the shape and weight size came from (printed by `plan`)


def _safetensors_bytes(path: Path) -> float | None:
    for index in sorted(path.glob("*.safetensors.index.json")):
        try:
            total = json.loads(index.read_text()).get("metadata", {}).get("total_size")
        except (OSError, ValueError):
            total = None
        if isinstance(total, (int, float)) and total > 0:
            return float(total)
    files = list(path.glob("*.safetensors"))
    return float(sum(f.stat().st_size for f in files)) if files else None


def _is_nvfp4(path: Path, cfg: dict[str, Any]) -> bool:
    blob = json.dumps(cfg.get("quantization_config") or {})
    hq = path / "hf_quant_config.json"
    if hq.is_file():
        with contextlib.suppress(OSError):
            blob += hq.read_text()
    return "NVFP4" in blob.upper()


def estimate_weight_bytes(shape: ModelShape, nvfp4: bool = False) -> float:
    """Parameters x dtype; NVFP4 linears take 4 bits + one FP8 scale per 16 weights (0.5625 B)."""
    if not nvfp4:
        return float(shape.params * shape.dtype_bytes)
    return shape.linear_params() * 0.5625 + shape.vocab * shape.hidden * shape.dtype_bytes


def model_info(model_path: str) -> ModelInfo | None:
    """Shape and weight size of a local checkpoint (config.json + safetensors), a built-in hub id, or
    None when neither is known (then engines are not sized: presets and card limits only)."""
    path = Path(model_path).expanduser()
    cfg_file = path / "config.json"
    if cfg_file.is_file():
        try:
            cfg = json.loads(cfg_file.read_text())
            shape = shape_from_config(cfg, model_path, f"{cfg_file}")
        except (OSError, ValueError, KeyError, TypeError):
            return None
        weights = _safetensors_bytes(path)
        if weights is not None:
            return ModelInfo(shape, weights, f"{cfg_file} + safetensors sizes")
        return ModelInfo(
            shape, estimate_weight_bytes(shape, _is_nvfp4(path, cfg)), f"{cfg_file} (weights: params x dtype)"
        )
    if model_path in BUILTIN:
        cfg, weights, note = BUILTIN[model_path]
        return ModelInfo(shape_from_config(cfg, model_path, note), weights, note)
    return None


# ------------------------------------------------------------------------------------------ sizing


def activation_bytes(shape: ModelShape, batch_tokens: int, max_num_seqs: int) -> float:
    """Peak activations of one batch (bf16 residual/attention + gate/up/act of the MLP) + sampler logits."""
    per_token = 2 * (4 * shape.hidden + 3 * shape.intermediate)
    return batch_tokens * per_token + max_num_seqs * shape.vocab * 4 * 2


def _longest(shape: ModelShape, kv: float, kv_b: float, in_flight: int, upper: int) -> int:
    """Largest length (multiple of 256) whose one request fits in `kv` bytes, at most `upper`."""
    lo, hi = 0, upper
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if shape.request_kv_bytes(mid, kv_b, in_flight) <= kv:
            lo = mid
        else:
            hi = mid - 1
    return lo if lo == upper else lo // 256 * 256


def size_engine(
    shape: ModelShape,
    weight_bytes: float,
    *,
    gpu: str,
    memory_gib: float,
    gpu_memory_utilization: float,
    kv_cache_dtype_bytes: float,
    max_context: int,
    batch_tokens: int | None = None,
    max_model_len: int | None = None,
    row_tokens: int = ROW_TOKENS,
) -> Sizing:
    """Size one engine. `max_context` is the card's stated limit; `batch_tokens` / `max_model_len`
    are fixed by the job when given (then only the rest is computed). Raises SizingError."""
    budget = memory_gib * GIB * gpu_memory_utilization
    left = budget - weight_bytes - FIXED_RESERVE
    if left <= 0:
        raise SizingError(
            f"{gpu} ({memory_gib:.1f} GiB): the weights need {weight_bytes / GIB:.1f} GiB + "
            f"{FIXED_RESERVE / GIB:.0f} GiB reserve, but {gpu_memory_utilization:g} x {memory_gib:.1f} = "
            f"{budget / GIB:.1f} GiB is usable: use a larger GPU"
        )
    if batch_tokens is None:
        fits = [b for b in BATCH_TOKENS if activation_bytes(shape, b, 0) <= ACTIVATION_SHARE * left]
        batch_tokens = fits[0] if fits else BATCH_TOKENS[-1]
    in_flight = 2 * batch_tokens
    kv_b = kv_cache_dtype_bytes
    # max_num_seqs for rows of `row_tokens` while decoding (sliding layers: window + one block); the
    # sampler's logits grow with it, so size it once without them and once with them.
    row = min(row_tokens, shape.max_position, max_context, max_model_len or max_context)
    steady = shape.request_kv_bytes(row, kv_b, 16)
    seqs = MAX_SEQS
    for _ in range(2):
        reserve = FIXED_RESERVE + activation_bytes(shape, batch_tokens, seqs)
        kv = budget - weight_bytes - reserve
        seqs = max(1, min(MAX_SEQS, int(max(kv, 0) // steady)))
    memory_len = _longest(shape, max(kv, 0), kv_b, in_flight, shape.max_position)
    if kv <= 0 or memory_len < row:
        raise SizingError(
            f"{gpu} ({memory_gib:.1f} GiB): after {weight_bytes / GIB:.1f} GiB of weights and "
            f"{reserve / GIB:.1f} GiB of activations there is room for {max(memory_len, 0)} tokens of "
            f"KV cache, fewer than one {row}-token request: use a larger GPU"
        )
    limits = {"memory": memory_len, "card": max_context, "model": shape.max_position}
    if max_model_len:
        limits["job"] = max_model_len
    length = min(limits.values())
    why = [f"{k} {v}" for k, v in sorted(limits.items(), key=lambda kv_: kv_[1])]
    one = shape.request_kv_bytes(length, kv_b, in_flight)
    return Sizing(
        gpu=gpu,
        memory_bytes=memory_gib * GIB,
        gpu_memory_utilization=gpu_memory_utilization,
        weight_bytes=weight_bytes,
        reserve_bytes=reserve,
        kv_cache_bytes=kv,
        kv_cache_tokens=int(kv / one * length),
        max_model_len=length,
        max_model_len_memory=memory_len,
        max_num_seqs=seqs,
        max_num_batched_tokens=batch_tokens,
        limits=why,
    )


def kv_dtype_bytes(kv_cache_dtype: str | None, shape: ModelShape) -> float:
    """Bytes per KV element: fp8 variants 1, `auto` / None the model's dtype."""
    if not kv_cache_dtype or kv_cache_dtype == "auto":
        return shape.dtype_bytes
    return KV_DTYPE_BYTES.get(kv_cache_dtype, DTYPE_BYTES.get(kv_cache_dtype, shape.dtype_bytes))
