"""The report `turbo-batch convert` returns and saves as turbo_convert_report.json.

Owns: the report's shape — settings, bytes and elements per dtype before/after, tensor counts, the exclude
lists before/after, per-tensor RTN error and scales (weight amax, weight_scale_2, input bound, input_scale),
and the per-group error summary.
Must not touch: files (recipe.py saves it), tensors (it only reads the stats the quantizer gathered).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from turbo_batch.convert import nvfp4


def build_report(
    *, src, dst, tensors, units, jobs, dropped, kept_nvfp4, excludes, settings, extra
) -> dict[str, Any]:
    before: dict[str, int] = defaultdict(int)
    after: dict[str, int] = defaultdict(int)
    for t in tensors:
        before[t.dtype] += t.numel
    for u in units:
        for _, dtype, shape, _ in u.entries:
            after[dtype] += math.prod(shape)
    logical_fp4 = sum(
        2 * math.prod(shape)
        for u in units
        for name, dtype, shape, _ in u.entries
        if dtype == "U8" and name.endswith(".weight")
    )
    per_tensor = [
        {
            "name": f"{j.module}.weight",
            "source": j.src.name,
            "group": j.group,
            "shape": list(j.src.shape),
            "source_dtype": j.src.dtype,
            "relative_error": j.stats.relative_error,
            "max_abs_error": j.stats.max_abs_err,
            "weight_amax": j.amax,
            "weight_scale_2": j.global_scale,
            "input_amax_bound": j.input_amax_bound,
            "input_scale": j.input_amax_bound / nvfp4.GLOBAL_SCALE_DIVISOR,
        }
        for j in jobs
    ]
    summary: dict[str, dict[str, float]] = {}
    for group in sorted({j.group for j in jobs}):
        errs = [r["relative_error"] for r in per_tensor if r["group"] == group]
        summary[group] = {
            "tensors": len(errs),
            "mean": sum(errs) / len(errs),
            "max": max(errs),
            "min": min(errs),
        }
    return {
        "src": str(src),
        "dst": str(dst),
        **settings,
        **extra,
        "bytes": {
            "before": sum(t.nbytes for t in tensors),
            "after": sum(u.nbytes for u in units),
            "dropped": sum(t.nbytes for t in dropped),
        },
        "elements_per_dtype": {"before": dict(sorted(before.items())), "after": dict(sorted(after.items()))},
        "nvfp4_weight_params_after": logical_fp4,
        "tensors": {
            "source": len(tensors),
            "dropped": len(dropped),
            "quantized": len(jobs),
            "copied": sum(1 for u in units if u.copy_src is not None),
            "kept_nvfp4_modules": len(kept_nvfp4),
        },
        "exclude_modules": {"before": excludes[0], "after": excludes[1]},
        "error_summary": summary,
        "per_tensor": per_tensor,
    }
