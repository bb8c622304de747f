"""Round-to-nearest NVFP4 of whole linear layers, streamed in row chunks within a memory budget.

Owns: `QuantJob` (one BF16/F16/F32 linear weight -> the four ModelOpt NVFP4 tensors), the per-element memory
factors that size the row chunks, the pre-pass (weight amax, gate/up row norms), the scales shared across
fused shards, the data-free `input_scale` bounds, and `quantize_job` (stream one weight through
`nvfp4.quantize` into a shard).
Must not touch: which tensors get quantized or renamed (recipe.py), configs (modelopt.py), the NVFP4 number
format itself (nvfp4.py), file layout (io.py).

Layout decisions, each from the vLLM 0.32 source in `.venv/.../vllm/model_executor/layers/quantization/`:
  * Tensors per quantized linear (`modelopt.py`, `KNvfp4Static.create_weights` / `KNvfp4Dynamic`):
    `weight` uint8 [out, in/2], `weight_scale` float8_e4m3fn [out, in/16], `weight_scale_2` float32 [],
    `input_scale` float32 []. Scalars are 0-d like ModelOpt's exports (`PerTensorScaleParameter` accepts
    0-d and [1]).
  * Shared global scales: vLLM fuses q/k/v into `qkv_proj` and gate/up into `gate_up_proj` and keeps ONE
    `weight_scale_2` (`layer.weight_scale_2.max()`, warning "the global weight scale differs across parallel
    layers") — with different per-shard values the smaller shards would be dequantized with the wrong
    scale. So the shards of a fused layer get weight_scale_2 = max(amax over the shards) / 2688, exactly
    what ModelOpt's exporter does for fused layers. Same for `input_scale` (vLLM takes the max too).
  * input_scale (activation global scale): RTN has no calibration data. vLLM uses it only on the W4A4
    (Blackwell) kernels: `input_global_scale = input_scale`, activations are quantized per 16 with FP8 block
    scales `block_amax / 6 / input_scale` (`run_nvfp4_emulations` passes `input_global_scale_inv`), so
    `input_scale` must be ≥ amax(activation) / 2688 or the largest activations clip; overestimating it only
    pushes small blocks' FP8 scales down, and E4M3's range (448 down to 2^-6 normal, 2^-9 subnormal) leaves
    ~4 decades of head-room. On Hopper (Marlin W4A16, `prepare_fp4_layer_for_marlin`) input_scale is
    loaded (it must exist, or vLLM reports unloaded weights) and ignored. We therefore write a data-free
    UPPER BOUND of each layer's input amax, divided by 2688 as ModelOpt does for calibrated amax:
      - q/k/v_proj: input = input_layernorm(x) = x / rms(x) * γ, so |input_i| ≤ sqrt(hidden) · max|γ|;
      - o_proj: input = softmax-weighted average of V rows after Gemma 4's scale-free `v_norm`, each with
        L2 norm sqrt(head_dim), so |input_i| ≤ sqrt(head_dim);
      - gate/up_proj (mlp group only): sqrt(hidden) · max|γ_pre_feedforward_layernorm|;
      - down_proj (mlp group only): Cauchy–Schwarz, |gate_j| ≤ ‖W_gate[j]‖₂ · sqrt(hidden) · max|γ| (same
        for up), |gelu_tanh(z)| ≤ max(|z|, 0.1701), so |input_j| ≤ max_j max(G_j, 0.1701) · U_j (loose).
    These bounds never clip. Measured with vLLM's own activation quantizer (`ref_nvfp4_quant_dequant`, CPU):
    assuming a global amax 1x, 10x, 100x or 1000x the true one gives the same ~9.5% activation error; only
    ~10^4x and beyond degrades (tests/convert/test_recipe.py::test_overestimated_input_scale_costs_nothing).
    The report lists every bound so a user with calibration data can compare.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from turbo_batch.convert import nvfp4
from turbo_batch.convert.io import DTYPES, Entry, Reader, ShardWriter, TensorInfo, as_bytes

_GELU_TANH_MIN_ABS = 0.1701  # |min_z gelu_tanh(z)| ≈ 0.17004
# Row chunks are sized so chunk elements x these factors <= the budget. The quantizer's live temporaries are
# ~20 bytes/element (bf16 read + float32 copies); the factors leave room for allocator slack, so the measured
# peak RSS growth stays under the budget (tests/convert/test_memory.py measures it: ~0.5-0.7x at
# 24 MiB-200 MiB).
_QUANT_BYTES_PER_ELEM = 48
_READ_BYTES_PER_ELEM = 24  # pre-pass (amax / row norms) per element


@dataclass
class QuantJob:
    """One BF16 linear weight to RTN-quantize into the four ModelOpt NVFP4 tensors."""

    src: TensorInfo
    module: str  # output module name, e.g. model.layers.3.self_attn.q_proj
    src_module: str
    group: str  # attention | mlp
    proj: str  # q k v o gate up down
    layer_prefix: str  # source name of the decoder layer, e.g. model.language_model.layers.3
    fused_key: str  # shards sharing weight_scale_2 / input_scale
    amax: float = 0.0
    global_scale: float = 1.0
    input_amax_bound: float = 0.0
    row_norms: torch.Tensor | None = None
    stats: nvfp4.ErrorStats = field(default_factory=nvfp4.ErrorStats)

    def outputs(self, group_size: int) -> list[Entry]:
        out_dim, in_dim = self.src.shape
        return [
            (f"{self.module}.weight", "U8", (out_dim, in_dim // 2), out_dim * in_dim // 2),
            (
                f"{self.module}.weight_scale",
                "F8_E4M3",
                (out_dim, in_dim // group_size),
                out_dim * in_dim // group_size,
            ),
            (f"{self.module}.weight_scale_2", "F32", (), 4),
            (f"{self.module}.input_scale", "F32", (), 4),
        ]


def _rows_per_chunk(info: TensorInfo, budget: int, bytes_per_elem: int) -> int:
    per_row = max(1, math.prod(info.shape[1:]) if len(info.shape) > 1 else 1) * bytes_per_elem
    return max(1, budget // per_row)


def set_scales(
    jobs: list[QuantJob], reader: Reader, by_name: dict[str, TensorInfo], text_cfg: dict, budget: int
) -> None:
    """Fill every job's amax, global scale and input bound; fused shards share the max of both."""
    _prepass(jobs, reader, budget)
    fused_amax: dict[str, float] = defaultdict(float)
    for j in jobs:
        fused_amax[j.fused_key] = max(fused_amax[j.fused_key], j.amax)
    for j in jobs:
        j.global_scale = float(nvfp4.global_scale_from_amax(fused_amax[j.fused_key]))
    _input_bounds(jobs, reader, by_name, text_cfg)
    fused_bound: dict[str, float] = defaultdict(float)
    for j in jobs:
        fused_bound[j.fused_key] = max(fused_bound[j.fused_key], j.input_amax_bound)
    for j in jobs:
        j.input_amax_bound = fused_bound[j.fused_key]


def _input_bounds(
    jobs: list[QuantJob], reader: Reader, by_name: dict[str, TensorInfo], text_cfg: dict
) -> None:
    """Fill `input_amax_bound` of every job (see the module docstring for the bounds)."""
    heads = int(text_cfg["num_attention_heads"])
    norm_max: dict[str, float] = {}

    def gamma_max(layer_prefix: str, norm: str) -> float:
        name = f"{layer_prefix}.{norm}.weight"
        if name not in by_name:
            raise ValueError(f"cannot bound the input of {layer_prefix} without {name}")
        if name not in norm_max:
            norm_max[name] = nvfp4.amax(reader.read(by_name[name]).float())
        return norm_max[name]

    by_layer: dict[str, dict[str, QuantJob]] = defaultdict(dict)
    for job in jobs:
        by_layer[job.layer_prefix][job.proj] = job
    for job in jobs:
        hidden = job.src.shape[1]
        if job.proj in ("q", "k", "v"):
            job.input_amax_bound = math.sqrt(hidden) * gamma_max(job.layer_prefix, "input_layernorm")
        elif job.proj == "o":
            job.input_amax_bound = math.sqrt(job.src.shape[1] / heads)
        elif job.proj in ("gate", "up"):
            job.input_amax_bound = math.sqrt(hidden) * gamma_max(
                job.layer_prefix, "pre_feedforward_layernorm"
            )
        else:  # down
            layer = by_layer[job.layer_prefix]
            if "gate" not in layer or "up" not in layer or layer["gate"].row_norms is None:
                raise ValueError(
                    f"down_proj of {job.layer_prefix}: RTN needs gate/up_proj in BF16 to bound its input"
                )
            x_norm = math.sqrt(layer["gate"].src.shape[1]) * gamma_max(
                job.layer_prefix, "pre_feedforward_layernorm"
            )
            gate = (layer["gate"].row_norms * x_norm).clamp_min(_GELU_TANH_MIN_ABS)
            up = layer["up"].row_norms * x_norm
            job.input_amax_bound = float((gate * up).max())


def _prepass(jobs: list[QuantJob], reader: Reader, budget: int) -> None:
    """amax of every weight to quantize (and row L2 norms of gate/up, for the down_proj bound)."""
    for job in jobs:
        rows = _rows_per_chunk(job.src, budget, _READ_BYTES_PER_ELEM)
        want_norms = job.proj in ("gate", "up")
        norms = []
        for r0 in range(0, job.src.shape[0], rows):
            chunk = reader.read_rows(job.src, r0, min(job.src.shape[0], r0 + rows))
            job.amax = max(job.amax, nvfp4.amax(chunk))
            if want_norms:
                norms.append(torch.linalg.vector_norm(chunk.float(), dim=1))
            del chunk
        if want_norms:
            job.row_norms = torch.cat(norms)


def quantize_job(
    job: QuantJob,
    w: ShardWriter,
    reader: Reader,
    budget: int,
    group_size: int,
    on_bytes: Callable[[int], Any],
) -> int:
    """Stream one weight through the quantizer; returns the estimated peak working bytes."""
    rows, cols = job.src.shape
    step = _rows_per_chunk(job.src, budget, _QUANT_BYTES_PER_ELEM)
    gs = torch.tensor(job.global_scale, dtype=torch.float32)
    peak = 0
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        chunk = reader.read_rows(job.src, r0, r1)
        q = nvfp4.quantize(chunk, group_size=group_size, global_scale=gs)
        w.write(f"{job.module}.weight", r0 * cols // 2, as_bytes(q.weight))
        w.write(f"{job.module}.weight_scale", r0 * cols // group_size, as_bytes(q.weight_scale))
        job.stats.update(chunk, q.dequantize(torch.float32))
        peak = max(peak, (r1 - r0) * cols * _QUANT_BYTES_PER_ELEM)
        on_bytes((r1 - r0) * cols * DTYPES[job.src.dtype][1])
        del chunk, q
    w.write(f"{job.module}.weight_scale_2", 0, as_bytes(gs))
    input_scale = torch.tensor(job.input_amax_bound / nvfp4.GLOBAL_SCALE_DIVISOR, dtype=torch.float32)
    w.write(f"{job.module}.input_scale", 0, as_bytes(input_scale))
    return peak
