"""Resume identity: what the input files are and every setting that changes results, as one hash.

Owns: `input_identity(files)` (per file: name and size, plus a content hash for files up to
`HASH_BYTES`, else mtime and the parquet footer, so an in-place edit of the same size is caught) and
`result_settings(job)` (preset, engine arguments that change outputs, the resolved max_model_len,
quantization and dtype on this machine, the model's config.json). Must not touch: the output dir
(write.py compares fingerprints), Ray, engines.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from turbo_batch.spec import SPEED_ENGINE_KEYS

HASH_BYTES = 64 * 2**20  # files up to this size are identified by their content
# engine arguments that change only speed or memory, never a row's result (spec's list, plus two that
# are also left out of this part of the fingerprint)
PERF_KEYS = SPEED_ENGINE_KEYS | {"disable_log_stats", "tensor_parallel_size"}
RESULT_KEYS = ("max_model_len", "quantization", "dtype", "kv_cache_dtype", "max_logprobs", "logprobs_mode")


def _footer(path: str) -> str:
    """Hash of a parquet footer (schema, row groups, column statistics): cheap, even for huge files."""
    with open(path, "rb") as fh:
        fh.seek(-8, os.SEEK_END)
        size = int.from_bytes(fh.read(4), "little")
        fh.seek(-(8 + size), os.SEEK_END)
        return hashlib.sha256(fh.read(size)).hexdigest()[:16]


def _content(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()[:16]


def input_identity(files: Sequence[tuple[str, str]]) -> list[list[Any]]:
    out = []
    for f, fmt in files:
        st = os.stat(f)
        if st.st_size <= HASH_BYTES:
            out.append([Path(f).name, st.st_size, "sha256", _content(f)])
        else:
            ident = [Path(f).name, st.st_size, "mtime", st.st_mtime_ns]
            if fmt == "parquet":
                ident += ["footer", _footer(f)]
            out.append(ident)
    return out


def result_settings(job: Any) -> dict[str, Any]:
    model = job.model.model_dump(mode="json")
    engine = {k: v for k, v in sorted((model.get("engine") or {}).items()) if k not in PERF_KEYS}
    out: dict[str, Any] = {
        "preset": model.get("preset"),
        "engine": engine,
        "engine_by_gpu": model.get("engine_by_gpu"),
        "trust_remote_code": model.get("trust_remote_code"),
    }
    cfg = Path(os.path.expanduser(job.model.path)) / "config.json"
    if cfg.is_file():
        out["config"] = hashlib.sha256(cfg.read_bytes()).hexdigest()[:16]
    try:  # what this machine resolves (max_model_len from preset, GPU and model; quantization; dtype)
        from turbo_batch.engine import profiles

        labels = len(getattr(job.task, "labels", None) or [])
        args = profiles.engine_args(
            model,
            profiles.detect_device(),
            max_labels=labels,
            model_max_len=profiles.model_context_len(job.model.path),
        )
        out["resolved"] = {k: args.get(k) for k in RESULT_KEYS}
    except Exception as e:  # an unsized model: the engine reports the problem when it starts
        out["resolved"] = f"unresolved: {type(e).__name__}"
    return out


def fingerprint(job: Any, files: Sequence[tuple[str, str]]) -> str:
    blob = json.dumps(
        [job.fingerprint(), input_identity(files), result_settings(job)], sort_keys=True, default=str
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
