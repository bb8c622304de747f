"""`turbo-batch convert`: the Turbo recipe — RTN-quantize a ModelOpt NVFP4 Gemma 4's BF16 layers to NVFP4.

What it does: streams a safetensors checkpoint tensor by tensor (row chunks, plain file reads, no mmap, so
memory stays within `memory_budget_bytes` whatever the model size) and writes a new checkpoint in which
  * the selected module groups ("attention" = q/k/v/o_proj of the text decoder, "mlp" = gate/up/down_proj)
    that are still BF16/F16/F32 are round-to-nearest quantized to NVFP4 (rtn.py; nvfp4.py for the format);
  * everything else is copied byte for byte (NVIDIA's calibrated NVFP4 MLP, embed_tokens, norms, scalars);
  * vision/audio encoders are dropped and the config becomes text-only Gemma4ForCausalLM (unless
    `keep_encoders`), with `model.language_model.*` renamed `model.*` (gemma4.py);
  * the ModelOpt quantization config is rewritten (exclude list without the newly quantized layers) into
    both places ModelOpt ≥ 0.31 writes it: config.json `quantization_config` and `hf_quant_config.json`
    (modelopt.py);
  * tokenizer / generation / chat-template files are copied; a report is returned and saved (report.py),
    with the problems `check` (verify.py) finds in the result.
What it does not do: calibration, GPTQ/AWQ-style error compensation, MoE experts, non-Gemma-4 models.
The layout decisions, each traced to the vLLM 0.32 source, are written down where they are implemented:
the four tensors per quantized linear, the scales shared across fused shards and the data-free
`input_scale` bounds in rtn.py; the two config files and vLLM's exclusion rules in modelopt.py.

Owns: `convert()` — argument checks, the destination guard (`--overwrite` never deletes a destination that is,
contains or sits inside the source), the plan (which tensor is copied, quantized or dropped), shard
assignment and streaming writes, the output config.json / hf_quant_config.json, copied side files.
Must not touch: the NVFP4 math, the scale and bound formulas, the exclusion rules, safetensors byte layout
(all in their own modules); the CLI's printing (cli.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from turbo_batch.convert.gemma4 import ENCODER_RE, FUSED, GROUPS, LINEAR_RE, rename
from turbo_batch.convert.io import Entry, Reader, ShardWriter, TensorInfo, copy_tensor, list_tensors
from turbo_batch.convert.modelopt import (
    canonical_quant_config,
    quant_config_files,
    rewrite_excludes,
    vllm_linear_modules,
)
from turbo_batch.convert.report import build_report
from turbo_batch.convert.rtn import QuantJob, quantize_job, set_scales
from turbo_batch.convert.verify import check

_FLOAT_SOURCE_DTYPES = ("BF16", "F16", "F32")
_COPY_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
)
_ENCODER_FILES = ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json")
DEFAULT_MEMORY_BUDGET = 1 << 30
MIN_MEMORY_BUDGET = 16 << 20  # below this, fixed overheads (buffers, report) dominate the chunked working set
DEFAULT_MAX_SHARD_BYTES = 5_000_000_000
REPORT_FILE = "turbo_convert_report.json"


@dataclass
class _Unit:
    """A set of output tensors written together into one shard: a byte copy or a quantization job."""

    entries: list[Entry]
    copy_src: TensorInfo | None = None
    job: QuantJob | None = None

    @property
    def nbytes(self) -> int:
        return sum(e[3] for e in self.entries)


def _source_configs(src: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """(full config.json, text config, canonical source quant config or None)."""
    cfg = json.loads((src / "config.json").read_text())
    text = cfg.get("text_config") or cfg
    model_type = str(text.get("model_type", cfg.get("model_type", "")))
    if not model_type.startswith("gemma4"):
        raise ValueError(f"convert supports Gemma 4 checkpoints only; {src} has model_type {model_type!r}")
    qc = cfg.get("quantization_config") or text.get("quantization_config")
    hf_path = src / "hf_quant_config.json"
    hf = json.loads(hf_path.read_text()) if hf_path.exists() else None
    if qc is None and hf is None:
        return cfg, text, None
    return cfg, text, canonical_quant_config(qc if qc is not None else hf)


def _clear_destination(src: Path, dst: Path, overwrite: bool) -> None:
    """Leave `dst` new or empty. A non-empty `dst` is deleted only with `overwrite`, and never when it is, contains
    or sits inside `src` (symlinks resolved): that would delete (part of) the checkpoint being converted."""
    if not (dst.exists() and any(dst.iterdir())):
        return  # an empty or new dst is never deleted, so it may even sit inside src
    s, d = src.resolve(), dst.resolve()
    overlap = (
        "is the source directory"
        if d == s
        else "contains the source directory"
        if d in s.parents
        else "is inside the source directory"
        if s in d.parents
        else None
    )
    if overlap:
        raise ValueError(
            f"destination {dst} {overlap} {src}; refusing to replace it (choose a destination outside the source)"
        )
    if not overwrite:
        raise FileExistsError(f"{dst} exists and is not empty (pass overwrite=True / --overwrite)")
    shutil.rmtree(dst)


def _plan(
    tensors: list[TensorInfo], selected: set[str], strip: bool, group_size: int
) -> tuple[list[_Unit], list[QuantJob], list[TensorInfo], set[str]]:
    """(units to write in order, quantization jobs, dropped encoder tensors, kept NVFP4 modules)."""
    by_name = {t.name: t for t in tensors}
    units: list[_Unit] = []
    jobs: list[QuantJob] = []
    dropped: list[TensorInfo] = []
    kept_nvfp4: set[str] = set()
    for t in tensors:
        if strip and ENCODER_RE.search(t.name):
            dropped.append(t)
            continue
        module, leaf = t.name.rsplit(".", 1) if "." in t.name else ("", t.name)
        m = LINEAR_RE.match(module)
        if (
            m
            and leaf == "weight"
            and m["proj"] in selected
            and t.dtype in _FLOAT_SOURCE_DTYPES
            and len(t.shape) == 2
        ):
            if f"{module}.weight_scale" in by_name:
                raise ValueError(f"{t.name} is {t.dtype} but {module}.weight_scale exists")
            if t.shape[1] % group_size:
                raise ValueError(
                    f"{t.name}: input dim {t.shape[1]} is not a multiple of group_size {group_size}"
                )
            fused = FUSED.get(m["proj"], (m["proj"],))
            job = QuantJob(
                src=t,
                module=rename(module, strip),
                src_module=module,
                group="attention" if m["block"] == "self_attn" else "mlp",
                proj=m["proj"],
                layer_prefix=m["layer"],
                fused_key=f"{m['layer']}.{m['block']}.{'+'.join(fused)}",
            )
            jobs.append(job)
            units.append(_Unit(job.outputs(group_size), job=job))
            continue
        if m and leaf == "weight" and t.dtype == "U8":
            kept_nvfp4.add(rename(module, strip))
        units.append(_Unit([(rename(t.name, strip), t.dtype, t.shape, t.nbytes)], copy_src=t))

    # fused shards must agree on precision, as vLLM requires
    job_modules = {j.src_module for j in jobs}
    for j in jobs:
        for shard in FUSED.get(j.proj, ()):
            other = f"{j.layer_prefix}.{'self_attn' if j.group == 'attention' else 'mlp'}.{shard}_proj"
            if f"{other}.weight" in by_name and other not in job_modules:
                raise ValueError(f"{j.src_module} would be NVFP4 but its fused sibling {other} would not")
    return units, jobs, dropped, kept_nvfp4


def _write_shards(
    units: list[_Unit],
    dst: Path,
    reader: Reader,
    budget: int,
    group_size: int,
    max_shard_bytes: int,
    on_bytes,
) -> tuple[dict[str, str], list[str], int]:
    """Assign units to shards of at most `max_shard_bytes` (a larger unit gets its own), then stream them.
    Returns (weight map, shard file names, estimated peak working bytes)."""
    shards: list[list[_Unit]] = [[]]
    size = 0
    for u in units:
        if shards[-1] and size + u.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(u)
        size += u.nbytes
    dst.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    peak = 0
    shard_names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for shard_name, shard_units in zip(shard_names, shards, strict=True):
        entries = [e for u in shard_units for e in u.entries]
        writer = ShardWriter(dst / shard_name, entries)
        try:
            for u in shard_units:
                if u.job is not None:
                    peak = max(peak, quantize_job(u.job, writer, reader, budget, group_size, on_bytes))
                else:
                    assert u.copy_src is not None
                    copy_tensor(u.copy_src, u.entries[0][0], writer, reader, budget, on_bytes)
        finally:
            writer.close()
        weight_map.update({e[0]: shard_name for e in entries})
    return weight_map, shard_names, peak


def _output_config(cfg: dict, text_cfg: dict, keep_encoders: bool, quantization_config: dict) -> dict:
    """config.json of the result: text-only Gemma4ForCausalLM, or the multimodal config when keeping encoders."""
    if keep_encoders:
        out_cfg = json.loads(json.dumps(cfg))
        out_cfg.pop("quantization_config", None)
        (out_cfg.get("text_config") or {}).pop("quantization_config", None)
    else:
        out_cfg = {k: v for k, v in text_cfg.items() if k != "quantization_config"}
        out_cfg["architectures"] = ["Gemma4ForCausalLM"]
        out_cfg["model_type"] = "gemma4_text"
        for key in ("dtype", "torch_dtype", "transformers_version", "tie_word_embeddings"):
            if key in cfg and key not in out_cfg:
                out_cfg[key] = cfg[key]
    out_cfg["quantization_config"] = quantization_config
    return out_cfg


def _pin_malloc_mmap_threshold(nbytes: int = 1 << 20) -> None:
    """glibc raises its mmap threshold after the first large free and then keeps freed chunk buffers in the
    heap, which roughly doubled RSS over the working set in tests; pinning it (mallopt M_MMAP_THRESHOLD)
    makes buffers over 1 MiB come from mmap and go back to the OS when freed. No-op off glibc."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, nbytes)  # -3 = M_MMAP_THRESHOLD


def _progress(enabled: bool, total: int):
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    progress = Progress(
        TextColumn("[bold]convert"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
    )
    task = progress.add_task("convert", total=total)
    return progress, lambda n: progress.advance(task, n)


def convert(
    src: str | Path,
    dst: str | Path,
    *,
    quantize_groups: Sequence[str] = ("attention",),
    group_size: int = 16,
    keep_encoders: bool = False,
    memory_budget_bytes: int | None = None,
    progress: bool = True,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Apply the Turbo recipe to the checkpoint in `src`, writing `dst`; returns (and saves) the report."""
    t0 = time.time()
    src, dst = Path(src), Path(dst)
    unknown = set(quantize_groups) - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown module groups {sorted(unknown)}; choose from {sorted(GROUPS)}")
    if group_size <= 0 or group_size % 2:
        raise ValueError(f"group_size must be a positive even number, got {group_size}")
    budget = memory_budget_bytes or DEFAULT_MEMORY_BUDGET
    if budget < MIN_MEMORY_BUDGET:
        raise ValueError(f"memory_budget_bytes must be at least {MIN_MEMORY_BUDGET} (16 MiB), got {budget}")
    _pin_malloc_mmap_threshold()
    _clear_destination(src, dst, overwrite)
    cfg, text_cfg, src_qc = _source_configs(src)
    if src_qc and src_qc["group_size"] != group_size:
        raise ValueError(
            f"group_size {group_size} differs from the source's NVFP4 group_size {src_qc['group_size']}; "
            "ModelOpt configs have one group_size for every layer"
        )
    strip = not keep_encoders
    tensors = list_tensors(src)
    by_name = {t.name: t for t in tensors}
    selected = {p for g in quantize_groups for p in GROUPS[g]}
    units, jobs, dropped, kept_nvfp4 = _plan(tensors, selected, strip, group_size)

    reader = Reader()
    progress_bar, on_bytes = _progress(
        progress, sum(u.copy_src.nbytes if u.copy_src else u.job.src.nbytes for u in units)
    )
    with progress_bar:
        set_scales(jobs, reader, by_name, text_cfg, budget)
        weight_map, shard_names, peak = _write_shards(
            units, dst, reader, budget, group_size, max_shard_bytes, on_bytes
        )
    reader.close()
    total_size = sum(e[3] for u in units for e in u.entries)
    (dst / "model.safetensors.index.json").write_text(
        json.dumps(
            {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}, indent=2
        )
    )

    # configs
    out_names = list(weight_map)
    linear = vllm_linear_modules(out_names)
    quantized = {m for mods in linear.values() for m in mods if f"{m}.weight_scale" in weight_map}
    unquantized = {m for mods in linear.values() for m in mods if m not in quantized} | {"lm_head"}
    src_excludes = src_qc["exclude_modules"] if src_qc else []
    encoder_roots = {n[: m.end(2)] for n in out_names if (m := ENCODER_RE.search(n))}
    excludes = rewrite_excludes(
        src_excludes, strip=strip, quantized=quantized, unquantized=unquantized, encoder_roots=encoder_roots
    )
    recipe = {
        "recipe": "RTN NVFP4 (turbo-batch convert)",
        "rtn_groups": sorted(set(quantize_groups)),
        "group_size": group_size,
        "global_scale": "amax/2688, shared across fused shards (q/k/v, gate/up)",
        "input_scale": "data-free upper bound of the input amax / 2688 (see turbo_batch/convert/rtn.py)",
        "encoders": "kept" if keep_encoders else "stripped",
    }
    hf_qc, cfg_qc = quant_config_files(
        group_size=group_size,
        exclude_modules=excludes,
        kv_cache_quant_algo=src_qc["kv_cache_quant_algo"] if src_qc else None,
        producer=src_qc["producer"] if src_qc else None,
        recipe=recipe,
    )
    out_cfg = _output_config(cfg, text_cfg, keep_encoders, cfg_qc)
    (dst / "config.json").write_text(json.dumps(out_cfg, indent=2) + "\n")
    (dst / "hf_quant_config.json").write_text(json.dumps(hf_qc, indent=2) + "\n")
    copied_files = []
    for fname in (*_COPY_FILES, *(_ENCODER_FILES if keep_encoders else ())):
        if (src / fname).exists():
            shutil.copy2(src / fname, dst / fname)
            copied_files.append(fname)

    report = build_report(
        src=src,
        dst=dst,
        tensors=tensors,
        units=units,
        jobs=jobs,
        dropped=dropped,
        kept_nvfp4=kept_nvfp4,
        excludes=(src_excludes, excludes),
        settings={
            "quantize_groups": sorted(set(quantize_groups)),
            "group_size": group_size,
            "keep_encoders": keep_encoders,
            "memory_budget_bytes": budget,
            "max_shard_bytes": max_shard_bytes,
        },
        extra={
            "architectures": {"before": cfg.get("architectures"), "after": out_cfg.get("architectures")},
            "shards": shard_names,
            "copied_files": copied_files,
            "estimated_peak_working_bytes": peak,
            "seconds": round(time.time() - t0, 3),
        },
    )
    report["problems"] = check(dst)
    (dst / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report
