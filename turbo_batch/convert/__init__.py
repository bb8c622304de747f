"""`turbo-batch convert`: the Turbo recipe (RTN NVFP4 of a ModelOpt NVFP4 Gemma 4) and its layout check.

Modules, each importing only those above it (no circles):
  nvfp4     the NVFP4 number format: quantize / dequantize / error, one tensor, pure torch
  io        safetensors headers, row-chunk reader, shard writer
  gemma4    Gemma 4 tensor names: module groups, fused shards, encoders, text-only renames
  modelopt  ModelOpt quantization configs and vLLM's exclusion rules (plain dicts)
  rtn       streamed RTN quantization of whole linears: shared scales, input_scale bounds
  verify    check(): a checkpoint's layout as vLLM's loader sees it
  report    the conversion report
  recipe    convert(): the orchestration
  cli       the typer command
Owns: the public names below, loaded on first use so that `from turbo_batch.convert import convert_command`
(what turbo_batch/cli.py does) imports neither torch nor the converter.
Must not touch: anything; it only re-exports. Test helpers (a synthetic NVIDIA-style source checkpoint)
live in turbo_batch/testing/synthetic_nvfp4.py, not here.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from turbo_batch.convert.cli import convert_app, convert_command, parse_bytes
    from turbo_batch.convert.gemma4 import GROUPS
    from turbo_batch.convert.io import TensorInfo, list_tensors, read_safetensors_header
    from turbo_batch.convert.modelopt import quant_config_files, vllm_excluded
    from turbo_batch.convert.recipe import REPORT_FILE, convert
    from turbo_batch.convert.verify import check

_EXPORTS = {
    "convert_app": "cli",
    "convert_command": "cli",
    "parse_bytes": "cli",
    "GROUPS": "gemma4",
    "TensorInfo": "io",
    "list_tensors": "io",
    "read_safetensors_header": "io",
    "quant_config_files": "modelopt",
    "vllm_excluded": "modelopt",
    "REPORT_FILE": "recipe",
    "convert": "recipe",
    "check": "verify",
}
__all__ = [
    "GROUPS",
    "REPORT_FILE",
    "TensorInfo",
    "check",
    "convert",
    "convert_app",
    "convert_command",
    "list_tensors",
    "parse_bytes",
    "quant_config_files",
    "read_safetensors_header",
    "vllm_excluded",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value
