"""`turbo-batch convert --check`: verify a checkpoint's layout the way vLLM's ModelOpt NVFP4 loader sees it.

Owns: `check(dir)` -> a list of problems (empty = fine): shards vs index and headers, dtype sizes, the two
quantization config files and their agreement, the text-only config, every NVFP4 module's four tensors
(dtypes, shapes, finite positive scalars), fused shards that mix precisions or differ in shared scalars, and
exclusions that contradict the tensors. It reads checkpoints converted here and NVIDIA's own alike.
Must not touch: the files it checks (read only), the conversion (recipe.py calls `check` on its output).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from turbo_batch.convert.gemma4 import ENCODER_RE
from turbo_batch.convert.io import DTYPES, Reader, list_tensors, read_safetensors_header
from turbo_batch.convert.modelopt import canonical_quant_config, vllm_excluded, vllm_linear_modules


def check(dst: str | Path) -> list[str]:
    """Problems (empty list = fine) with a converted checkpoint's layout, as vLLM's ModelOpt loader sees it."""
    dst = Path(dst)
    problems: list[str] = []
    cfg_path = dst / "config.json"
    if not cfg_path.exists():
        return [f"{cfg_path} missing"]
    cfg = json.loads(cfg_path.read_text())
    try:
        tensors = list_tensors(dst)
    except (FileNotFoundError, OSError, ValueError) as e:
        return [f"cannot read tensors: {e}"]
    by_name = {t.name: t for t in tensors}
    if len(by_name) != len(tensors):
        problems.append("duplicate tensor names across shards")

    index_path = dst / "model.safetensors.index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
        wm = index.get("weight_map", {})
        for t in tensors:
            if wm.get(t.name) != t.path.name:
                problems.append(f"index: {t.name} -> {wm.get(t.name)!r}, found in {t.path.name}")
        problems += [f"index names {n} but no shard holds it" for n in wm if n not in by_name]
        total = index.get("metadata", {}).get("total_size")
        if total is not None and total != sum(t.nbytes for t in tensors):
            problems.append(f"index total_size {total} != {sum(t.nbytes for t in tensors)}")
    for path in {t.path for t in tensors}:
        header, data_start = read_safetensors_header(path)
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if path.stat().st_size != data_start + end:
            problems.append(f"{path.name}: size {path.stat().st_size} != header end {data_start + end}")
    for t in tensors:
        if t.dtype not in DTYPES:
            problems.append(f"{t.name}: unknown dtype {t.dtype}")
        elif t.nbytes != t.numel * DTYPES[t.dtype][1]:
            problems.append(f"{t.name}: {t.nbytes} bytes for {t.dtype}{list(t.shape)}")

    # config
    arch = (cfg.get("architectures") or [None])[0]
    qc_raw = cfg.get("quantization_config")
    hf_path = dst / "hf_quant_config.json"
    hf_raw = json.loads(hf_path.read_text()) if hf_path.exists() else None
    if qc_raw is None and hf_raw is None:
        problems.append("no quantization config (config.json quantization_config / hf_quant_config.json)")
        return problems
    qc = canonical_quant_config(qc_raw if qc_raw is not None else hf_raw)
    if qc_raw is not None and hf_raw is not None:
        other = canonical_quant_config(hf_raw)
        for key in ("quant_algo", "kv_cache_quant_algo", "group_size", "exclude_modules"):
            if qc[key] != other[key]:
                problems.append(
                    f"config.json and hf_quant_config.json disagree on {key}: {qc[key]!r} vs {other[key]!r}"
                )
    if qc_raw is not None and str(qc_raw.get("quant_method", "")).lower() != "modelopt":
        problems.append(
            f"config.json quantization_config.quant_method is {qc_raw.get('quant_method')!r}, not 'modelopt'"
        )
    group_size = qc["group_size"]
    if group_size != 16:
        problems.append(
            f"group_size {group_size}: vLLM's NVFP4 kernels (cutlass, Marlin, emulation) assume 16"
        )
    if arch == "Gemma4ForCausalLM":
        for key in ("vision_config", "audio_config", "text_config"):
            if key in cfg:
                problems.append(f"text-only Gemma4ForCausalLM config still has {key}")
        if cfg.get("model_type") != "gemma4_text":
            problems.append(
                f"model_type {cfg.get('model_type')!r} for Gemma4ForCausalLM (expected 'gemma4_text')"
            )
        problems += [
            f"encoder tensor left in a text-only checkpoint: {t.name}"
            for t in tensors
            if ENCODER_RE.search(t.name)
        ]
        problems += [
            f"{t.name}: text-only names start with model. or lm_head."
            for t in tensors
            if not t.name.startswith(("model.", "lm_head."))
        ]
    text_cfg = cfg.get("text_config") or cfg
    tied = text_cfg.get("tie_word_embeddings", cfg.get("tie_word_embeddings", True))
    if not tied and not any(n.endswith("lm_head.weight") for n in by_name):
        problems.append("tie_word_embeddings is false but there is no lm_head.weight")

    # NVFP4 tensors
    reader = Reader()
    try:
        modules = {n.rsplit(".", 1)[0] for n in by_name if n.endswith((".weight_scale", ".weight_scale_2"))}
        scalars: dict[str, float] = {}
        for module in sorted(modules):
            problems += _check_nvfp4_module(module, by_name, group_size, qc["quant_algo"], reader, scalars)
        for vllm, mods in vllm_linear_modules(by_name).items():
            quantized = [m in modules for m in mods]
            if any(quantized) and not all(quantized):
                problems.append(f"{vllm}: mixes NVFP4 and unquantized shards {mods}")
                continue
            try:
                excluded = vllm_excluded(vllm, qc["exclude_modules"])
            except ValueError as e:
                problems.append(str(e))
                continue
            if all(quantized) and excluded:
                problems.append(f"{vllm} is NVFP4 but the exclude list excludes it")
            if not any(quantized) and not excluded and not vllm.endswith("lm_head"):
                problems.append(f"{vllm} is not NVFP4 but is not excluded: vLLM would expect NVFP4 tensors")
            if len(mods) > 1 and all(quantized):
                for leaf in ("weight_scale_2", "input_scale"):
                    vals = {scalars.get(f"{m}.{leaf}") for m in mods}
                    if len(vals) > 1:
                        problems.append(f"{vllm}: {leaf} differs across fused shards {sorted(vals)}")
        if not vllm_excluded("lm_head", qc["exclude_modules"]) and "lm_head.weight_scale" not in by_name:
            problems.append("lm_head is not excluded: vLLM would build it as NVFP4")
    finally:
        reader.close()
    return problems


def _check_nvfp4_module(module, by_name, group_size, algo, reader, scalars) -> list[str]:
    problems = []
    w = by_name.get(f"{module}.weight")
    ws = by_name.get(f"{module}.weight_scale")
    ws2 = by_name.get(f"{module}.weight_scale_2")
    ins = by_name.get(f"{module}.input_scale")
    if w is None or ws is None or ws2 is None:
        return [f"{module}: NVFP4 needs weight, weight_scale and weight_scale_2"]
    if w.dtype != "U8" or len(w.shape) != 2:
        problems.append(f"{module}.weight: {w.dtype}{list(w.shape)}, expected U8 [out, in/2]")
    out_dim, in_dim = (w.shape[0], w.shape[1] * 2) if len(w.shape) == 2 else (0, 0)
    if in_dim % group_size:
        problems.append(f"{module}: input dim {in_dim} not a multiple of group_size {group_size}")
    if ws.dtype != "F8_E4M3" or ws.shape != (out_dim, in_dim // group_size):
        problems.append(
            f"{module}.weight_scale: {ws.dtype}{list(ws.shape)}, expected F8_E4M3 {[out_dim, in_dim // group_size]}"
        )
    scalar_infos = [("weight_scale_2", ws2)] + ([("input_scale", ins)] if ins is not None else [])
    if ins is None and algo == "NVFP4":
        problems.append(
            f"{module}.input_scale missing (quant_algo NVFP4 is W4A4; vLLM would report it unloaded)"
        )
    for leaf, info in scalar_infos:
        if info.dtype != "F32" or info.numel != 1 or len(info.shape) > 1:
            problems.append(f"{module}.{leaf}: {info.dtype}{list(info.shape)}, expected F32 scalar")
            continue
        value = float(reader.read(info).reshape(-1)[0])
        scalars[f"{module}.{leaf}"] = value
        if not math.isfinite(value) or value <= 0:
            problems.append(f"{module}.{leaf} = {value}")
    if ws.dtype == "F8_E4M3" and ws.numel:
        scales = reader.read(ws).float()
        if not torch.isfinite(scales).all():
            problems.append(f"{module}.weight_scale has NaN/inf")
    return problems
