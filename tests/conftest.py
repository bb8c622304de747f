"""Shared fixtures: one real Ray (2 CPUs), one tiny Gemma 4 checkpoint, one real vLLM engine pool.

Engines take ~35 s to start on a 2-core CPU, so the batch tests share one session-wide pool of
engine actors (`tiny_pool`) and pass it to `run_job(..., pool=...)`. Jobs here use fractional CPUs
so the engine, the Serve app and Ray Data's render tasks fit on 2 logical CPUs together.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

TINY_ENGINE = {"max_model_len": 1024, "kv_cache_memory_bytes": 256 * 1024 * 1024, "max_num_seqs": 64}
TEST_CLUSTER = {"engine_cpus": 0.5, "render_cpus": 0.25, "batch_rows": 16}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from turbo_batch.testing.tiny import write_tiny_gemma4

    return write_tiny_gemma4(tmp_path_factory.mktemp("tiny") / "tiny-gemma4")


@pytest.fixture(scope="session")
def ray_session():
    import ray

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


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


@pytest.fixture(scope="session")
def tiny_pool(ray_session, tiny_model):
    """A started pool of one real vLLM engine actor on the tiny model, shared by the batch tests."""
    from turbo_batch.batch.pool import EnginePool
    from turbo_batch.spec import JobSpec

    job = JobSpec.model_validate(
        job_dict(
            tiny_model, "unused", "unused", task={"type": "classify", "labels": [f"l{i}" for i in range(20)]}
        )
    )  # max_logprobs for 20 labels
    pool = asyncio.run(EnginePool.start(job))
    yield pool
    asyncio.run(pool.close(force=True))


@pytest.fixture()
def out_root(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TURBO_BATCH_OUTPUT_ROOT", str(tmp_path))
    return tmp_path
