"""Shared test helpers (plain functions and constants; fixtures live in tests/conftest.py).

Import them as `from tests.helpers import job_dict, TINY_ENGINE, TEST_CLUSTER`: one import style for
every test package, so moving a test file never breaks its imports.
"""

from __future__ import annotations

from pathlib import Path

# vLLM settings of the tiny model's engine on a 2-core CPU box (small KV cache, short context).
TINY_ENGINE = {"max_model_len": 1024, "kv_cache_memory_bytes": 256 * 1024 * 1024, "max_num_seqs": 64}
# Fractional CPUs so the engine, the Serve app and Ray Data's render tasks fit on 2 logical CPUs together.
TEST_CLUSTER = {"engine_cpus": 0.5, "render_cpus": 0.25, "batch_rows": 16}


def job_dict(model: Path, inp: Path | str, out: Path | str, task: dict | None = None, **sections) -> dict:
    """A job mapping for the tiny model with the test cluster settings; sections override parts."""
    job = {
        "name": "test",
        "input": {"path": str(inp), "text_columns": ["text"]},
        "task": task or {"type": "classify", "labels": ["positive", "negative"]},
        "model": {"path": str(model), "engine": dict(TINY_ENGINE)},
        "output": {"dir": str(out), "part_rows": 25},
        "cluster": dict(TEST_CLUSTER),
    }
    for key, value in sections.items():
        job[key] = {**job.get(key, {}), **value} if isinstance(value, dict) else value
    return job
