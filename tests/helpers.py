"""Shared test helpers (plain functions and constants; fixtures live in tests/conftest.py).

Import them as `from tests.helpers import job_dict, TINY_ENGINE, TEST_CLUSTER`: one import style for
every test package, so moving a test file never breaks its imports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# vLLM settings of the tiny model's engine on a 2-core CPU box (small KV cache, short context).
TINY_ENGINE = {"max_model_len": 1024, "kv_cache_memory_bytes": 256 * 1024 * 1024, "max_num_seqs": 64}
# Fractional CPUs so the engine, the Serve app and Ray Data's render tasks fit on 2 logical CPUs together.
TEST_CLUSTER = {"engine_cpus": 0.5, "render_cpus": 0.25, "batch_rows": 16}


def fake_classify_result(row: dict, **extra) -> dict:
    """What a fake engine answers for one classify row (positive at 0.75); `extra` adds fields."""
    return {"row_id": row["row_id"], "label": "positive", "probs": {"positive": 0.75, "negative": 0.25},
            "prompt_tokens": len(row["prompt_ids"]), "output_tokens": 1, **extra}  # fmt: skip


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


def run_cluster_script(script: Path, job: Path, root: Path) -> tuple[subprocess.CompletedProcess, dict]:
    """Run `script JOB` (a job on a Ray cluster the script builds itself) with outputs under `root`;
    returns the process and its last stdout line that is a JSON object (the script's result)."""
    env = {**os.environ, "TURBO_BATCH_OUTPUT_ROOT": str(root)}
    env.pop("RAY_ADDRESS", None)  # its own cluster, never the session's
    r = subprocess.run(
        [sys.executable, str(script), str(job)],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    # the script's result is its last JSON line: Ray may print a dead raylet's log tail after it
    return r, json.loads(next(ln for ln in reversed(r.stdout.splitlines()) if ln.startswith("{")))
