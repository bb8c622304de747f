"""NVFP4 (ModelOpt layout) round-to-nearest quantization math, one tensor at a time, pure torch on CPU.

What it does: the numbers behind `turbo-batch convert` — quantize a 2-D weight to NVIDIA's NVFP4 the way
ModelOpt exports it and vLLM's `--quantization modelopt` path reads it, dequantize it back, and measure the
error. What it does not do: file I/O, calibration, activation quantization (see `rtn.py` for the
activation `input_scale` choice), or any GPU kernel. Must not import anything but torch: benchmarks and the
tests use it on its own.

Format (one linear layer, weight W of shape [out, in], group size g = 16):
  weight          uint8            [out, in/2]   two FP4 E2M1 codes per byte, element 2j in the LOW nibble,
                                                 element 2j+1 in the HIGH nibble
  weight_scale    float8_e4m3fn    [out, in/g]   per-group scale
  weight_scale_2  float32          []            per-tensor global scale = amax(W) / (6 * 448)
  W ≈ e2m1(code) * float(weight_scale[r, j // g]) * weight_scale_2

An E2M1 code is 4 bits: bit 3 is the sign, bits 0-2 index the magnitudes (0, 0.5, 1, 1.5, 2, 3, 4, 6).

Sources this follows, all read in the installed vLLM 0.32 (`.venv/.../vllm/`):
  * nibble order and code table: `model_executor/layers/quantization/utils/nvfp4_emulation_utils.py`,
    `break_fp4_bytes` (``low = a & 0x0F``, ``high = (a & 0xF0) >> 4``, ``stack((low, high))`` — so the low
    nibble is the even element; ``kE2M1ToFloat = [0, .5, 1, 1.5, 2, 3, 4, 6]``, sign = ``code & 0x08``);
    `dequantize_to_dtype`: ``out = fp4 * (weight_scale.float() * global_scale)`` per group of 16.
  * global scale: `model_executor/layers/quantization/modelopt.py`, `KNvfp4Static.process`:
    "Raw max, no reciprocation — Marlin/cutlass want ModelOpt's amax/2688" (2688 = 6 * 448), and
    ``weight_global_scale = layer.weight_scale_2.max()`` — for fused layers (qkv_proj, gate_up_proj) vLLM
    keeps ONE global scale, the max over the shards, so the shards must share it (rtn.py does).
  * rounding: `cast_to_fp4` in the same utils file (ties: 0.25→0, 0.75→1, 1.25→1, 1.75→2, 2.5→2, 3.5→4,
    5→4, i.e. ties to the even mantissa; |x| > 6 saturates to 6). ModelOpt's exporter
    (`NVFP4QTensor.quantize` / `_cast_fp4`: searchsorted over the bounds plus a +1 at the odd bounds, and
    ``packed = (q[..., 1::2] << 4) | q[..., 0::2]``) produces the same codes and the same packing.
  * per-group scale as ModelOpt computes it: ``block_amax / (6 * weight_scale_2)`` in float32, all-zero groups
    get scale 1.0, then cast to float8_e4m3fn (round to nearest even; the max is 448 by construction).
    A group whose amax is below ~2^-10/448 of the tensor's amax gets FP8 scale 0 and dequantizes to 0.
  * the FP4 codes come from float32 ``w / (scale * weight_scale_2)`` exactly as ModelOpt divides, so a value
    within float32 rounding of a rounding tie may land on the tie (ModelOpt's own export does the same).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP4_MAX = 6.0
FP8_E4M3_MAX = 448.0
GLOBAL_SCALE_DIVISOR = FP4_MAX * FP8_E4M3_MAX  # 2688, ModelOpt's amax -> weight_scale_2 divisor

# Magnitudes of the 8 non-negative E2M1 codes; codes 8..15 are the same magnitudes, negated.
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_VALUES = torch.tensor([*E2M1_MAGNITUDES, *(-m for m in E2M1_MAGNITUDES)], dtype=torch.float32)
# Decision bounds between neighbouring magnitudes; a value exactly on a bound goes to the even mantissa:
# down at 0.25, 1.25, 2.5, 5.0 and up at 0.75, 1.75, 3.5 (ModelOpt's `_cast_fp4`, vLLM's `cast_to_fp4`).
_E2M1_BOUNDS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=torch.float32)


@dataclass(frozen=True)
class NVFP4Tensor:
    """One quantized 2-D weight in ModelOpt NVFP4 layout (see the module docstring)."""

    weight: torch.Tensor  # uint8 [out, in/2]
    weight_scale: torch.Tensor  # float8_e4m3fn [out, in/group_size]
    weight_scale_2: torch.Tensor  # float32 scalar (shape [])
    group_size: int = 16

    @property
    def shape(self) -> tuple[int, int]:
        return (self.weight.shape[0], self.weight.shape[1] * 2)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.weight, self.weight_scale, self.weight_scale_2, self.group_size, dtype)


def global_scale_from_amax(amax: float | torch.Tensor) -> torch.Tensor:
    """weight_scale_2 (float32 scalar) for a tensor, or a fused group of tensors, whose max |w| is `amax`."""
    amax_t = torch.as_tensor(amax, dtype=torch.float32).reshape(())
    scale = amax_t / GLOBAL_SCALE_DIVISOR
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def amax(w: torch.Tensor) -> float:
    """max |w| as a Python float (0.0 for an empty tensor)."""
    return float(w.abs().max()) if w.numel() else 0.0


def encode_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round float values (already divided by their scale) to the nearest E2M1 code, ties to even.

    Returns uint8 codes in 0..15 (bit 3 = sign). |x| > 6 saturates to 6. NaN maps to code 0.
    """
    return _encode_e2m1_(x.to(torch.float32, copy=True))


def _encode_e2m1_(x: torch.Tensor) -> torch.Tensor:
    """`encode_e2m1` that overwrites its float32 argument (saves one full-size temporary)."""
    sign = (x < 0).to(torch.uint8)
    mag = x.abs_().nan_to_num_(nan=0.0)
    ordinal = torch.searchsorted(_E2M1_BOUNDS, mag, out_int32=True)
    # searchsorted(right=False) rounds values that sit exactly on a bound down; bump the odd bounds up.
    ordinal += (mag == 0.75) | (mag == 1.75) | (mag == 3.5)
    return sign.bitwise_left_shift_(3).bitwise_or_(ordinal.to(torch.uint8))


def decode_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 -> float32 values."""
    return E2M1_VALUES.index_select(0, codes.reshape(-1).to(torch.int32)).reshape(codes.shape)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """[..., n] uint8 codes -> [..., n/2] bytes; element 2j in the low nibble, 2j+1 in the high nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"last dimension must be even to pack FP4 pairs, got {codes.shape[-1]}")
    codes = codes.to(torch.uint8)
    return (codes[..., 1::2] << 4) | (codes[..., 0::2] & 0x0F)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """[..., m] bytes -> [..., 2m] uint8 codes (inverse of `pack_fp4`)."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def quantize(
    w: torch.Tensor,
    *,
    group_size: int = 16,
    global_scale: torch.Tensor | float | None = None,
) -> NVFP4Tensor:
    """RTN-quantize a 2-D weight [out, in] to NVFP4.

    `global_scale` is weight_scale_2; pass a shared one (from `global_scale_from_amax` over the group's amax)
    for the shards of a fused layer. Rows are independent, so callers may quantize a big tensor in row chunks
    with the same `global_scale` and concatenate the results.
    """
    if w.dim() != 2:
        raise ValueError(f"NVFP4 quantization takes a 2-D weight, got shape {tuple(w.shape)}")
    rows, cols = w.shape
    if cols % group_size or group_size % 2:
        raise ValueError(f"input dim {cols} must be a multiple of an even group_size ({group_size})")
    gs = global_scale_from_amax(amax(w)) if global_scale is None else torch.as_tensor(global_scale)
    gs = gs.to(torch.float32).reshape(())

    groups = w.reshape(rows, cols // group_size, group_size)
    block_amax = groups.abs().amax(dim=-1).float()
    block_scale = block_amax / (FP4_MAX * gs)
    block_scale = torch.where(block_amax == 0, torch.ones_like(block_scale), block_scale)
    block_scale_fp8 = block_scale.to(torch.float8_e4m3fn)
    del block_amax, block_scale

    denom = block_scale_fp8.float() * gs  # [rows, n_groups]
    # ModelOpt: w / (float(weight_scale) * weight_scale_2), in float32. Work on our own float32 copy in place
    # to keep the per-element working set small (the converter sizes its row chunks on it).
    scaled = groups.to(torch.float32, copy=True).div_(denom.unsqueeze(-1))
    underflow = denom == 0
    if bool(underflow.any()):
        # The group's FP8 scale underflowed to 0: it dequantizes to 0 whatever its codes; write ±0, not 0/0.
        scaled[underflow] = torch.zeros_like(scaled[underflow]).copysign(groups[underflow].float())
    codes = _encode_e2m1_(scaled).reshape(rows, cols)
    del scaled
    return NVFP4Tensor(pack_fp4(codes), block_scale_fp8, gs.clone(), group_size)


def dequantize(
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_scale_2: torch.Tensor | float,
    group_size: int = 16,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Packed NVFP4 -> dense [out, in] tensor: value * float(weight_scale) * weight_scale_2 (vLLM's order)."""
    rows = weight.shape[0]
    cols = weight.shape[1] * 2
    values = decode_e2m1(unpack_fp4(weight)).reshape(rows, cols // group_size, group_size)
    scale = weight_scale.view(torch.float8_e4m3fn).float() * torch.as_tensor(
        weight_scale_2, dtype=torch.float32
    )
    return (values * scale.unsqueeze(-1)).reshape(rows, cols).to(dtype)


def quant_dequant(
    w: torch.Tensor, *, group_size: int = 16, global_scale: torch.Tensor | float | None = None
) -> torch.Tensor:
    """Fake-quantize: RTN NVFP4 round trip, returned in w's dtype."""
    return quantize(w, group_size=group_size, global_scale=global_scale).dequantize(torch.float32).to(w.dtype)


@dataclass
class ErrorStats:
    """Accumulates ||W - Q(W)|| over row chunks of one tensor (or several)."""

    sq_err: float = 0.0
    sq_ref: float = 0.0
    max_abs_err: float = 0.0
    numel: int = 0

    def update(self, ref: torch.Tensor, approx: torch.Tensor) -> None:
        """Add one chunk; float32 differences, float64 sums."""
        ref32 = ref.float()
        self.sq_ref += float(ref32.square().sum(dtype=torch.float64))
        diff = approx.float() - ref32
        del ref32
        if diff.numel():
            self.max_abs_err = max(self.max_abs_err, float(diff.abs().max()))
        self.sq_err += float(diff.square_().sum(dtype=torch.float64))
        self.numel += ref.numel()

    @property
    def relative_error(self) -> float:
        """||W - Q(W)||_F / ||W||_F (0.0 for an all-zero W quantized exactly)."""
        if self.sq_ref == 0.0:
            return 0.0 if self.sq_err == 0.0 else float("inf")
        return (self.sq_err / self.sq_ref) ** 0.5


def relative_error(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """||ref - approx||_F / ||ref||_F (float32 differences, float64 sums)."""
    stats = ErrorStats()
    stats.update(ref, approx)
    return stats.relative_error
