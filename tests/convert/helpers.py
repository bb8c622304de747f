"""Shared by the convert tests: an independent float64 NVFP4 reference quantizer and checkpoint readers.

The reference has its own E2M1 and FP8-E4M3 grids (no torch float8 casts), so it checks turbo_batch.convert.nvfp4
rather than restating it. `load` reads checkpoints through the safetensors library, independent of the
converter's own reader.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from turbo_batch.convert import nvfp4

# ------------------------------------------------------------------------ independent float64 reference

E2M1_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)


def _fp8_e4m3_grid() -> torch.Tensor:
    """All finite non-negative float8 E4M3 (fn) values, by code (exponent bias 7, 3 mantissa bits)."""
    values = []
    for code in range(0x7F):  # 0x7F is NaN
        e, m = code >> 3, code & 7
        values.append(m / 8 * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))
    return torch.tensor(values, dtype=torch.float64)


FP8_GRID = _fp8_e4m3_grid()


def _round_to_grid(x: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest grid point of |x| (grid sorted, index parity = mantissa parity), ties to the even index,
    saturating at the top. Returns (rounded magnitude, index)."""
    mag = x.abs().clamp(max=float(grid[-1]))
    hi = torch.searchsorted(grid, mag).clamp(1, len(grid) - 1)
    lo = hi - 1
    d_lo, d_hi = mag - grid[lo], grid[hi] - mag
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))
    idx = torch.where(pick_hi, hi, lo)
    return grid[idx], idx


def reference_quantize(w: torch.Tensor, global_scale: float, group_size: int = 16) -> dict:
    """Float64 RTN NVFP4 of a 2-D weight with a given weight_scale_2; mirrors the ModelOpt formulas."""
    rows, cols = w.shape
    blocks = w.double().reshape(rows, cols // group_size, group_size)
    block_amax = blocks.abs().amax(-1)
    scale = torch.where(block_amax == 0, torch.ones_like(block_amax), block_amax / (6.0 * global_scale))
    scale8, _ = _round_to_grid(scale, FP8_GRID)
    denom = (scale8 * global_scale).unsqueeze(-1)
    x = torch.where(denom == 0, torch.zeros_like(blocks), blocks / denom)
    mag, _ = _round_to_grid(x, E2M1_GRID)
    values = torch.where(x < 0, -mag, mag)
    return {
        "scale_exact": scale,
        "scale": scale8,
        "x": x.reshape(rows, cols),
        "values": values.reshape(rows, cols),
        "deq": (values * denom).reshape(rows, cols),
        "denom": denom.expand_as(blocks).reshape(rows, cols),
    }


E2M1_TIES = (E2M1_GRID[1:] + E2M1_GRID[:-1]) / 2
FP8_TIES = (FP8_GRID[1:] + FP8_GRID[:-1]) / 2


def assert_differ_only_at_ties(got: torch.Tensor, want: torch.Tensor, exact: torch.Tensor, ties) -> None:
    """got == want (both on a grid) except where the exact pre-rounding value lies within float32 rounding
    (1e-6 relative) of a rounding tie: ModelOpt's float32 arithmetic may land exactly on the tie there."""
    differ = got != want
    x = exact[differ].abs().unsqueeze(-1)
    near_tie = ((x - ties).abs() <= 1e-6 * x).any(-1)
    assert near_tie.all(), f"{int((~near_tie).sum())} of {got.numel()} values differ away from a tie"
    assert differ.float().mean() < 0.05


def assert_matches_reference(weight: torch.Tensor, weight_scale: torch.Tensor, ref: dict) -> None:
    """Per-group FP8 scales and FP4 codes equal the float64 reference up to float32 near-ties."""
    assert_differ_only_at_ties(weight_scale.double(), ref["scale"], ref["scale_exact"], FP8_TIES)
    values = nvfp4.decode_e2m1(nvfp4.unpack_fp4(weight)).double()
    same_scale = (weight_scale.double() == ref["scale"]).repeat_interleave(16, dim=1)
    assert_differ_only_at_ties(values[same_scale], ref["values"][same_scale], ref["x"][same_scale], E2M1_TIES)


def half_gap(x: torch.Tensor) -> torch.Tensor:
    """Largest RTN error (in units of the group scale) for a scaled magnitude |x| on the E2M1 grid."""
    a = x.abs()
    return torch.where(a <= 2, 0.25, torch.where(a <= 4, 0.5, torch.where(a <= 6, 1.0, a - 6.0)))


def load(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint via the safetensors library (independent of the converter's reader)."""
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 - safe_open is not a dict
                out[name] = st.get_tensor(name)
    return out


def text_name(name: str) -> str:
    return name.replace("model.language_model.", "model.", 1)


def attention_modules(src_tensors: dict) -> list[str]:
    return sorted(
        n[: -len(".weight")]
        for n in src_tensors
        if n.startswith("model.language_model.layers.") and ".self_attn." in n and n.endswith("_proj.weight")
    )
