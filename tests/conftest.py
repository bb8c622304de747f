"""Shared fixtures: one real Ray (2 CPUs), one tiny Gemma 4 checkpoint, one real vLLM engine pool.

Engines take ~35 s to start on a 2-core CPU, so the batch tests share one session-wide pool of
engine actors (`tiny_pool`) and pass it to `run_job(..., pool=...)`. Jobs here use fractional CPUs
so the engine, the Serve app and Ray Data's render tasks fit on 2 logical CPUs together.
Plain helpers (`job_dict`, `TINY_ENGINE`, `TEST_CLUSTER`) live in tests/helpers.py.

Fast lane (`make test-fast`, `pytest -m "not slow"`): every test whose fixtures reach a real engine
or Ray (`HEAVY_FIXTURES`, directly or through another fixture) is marked `slow` at collection, so a
new test that asks for `tiny_pool` is in the slow lane without anyone remembering a marker. A test
that starts Ray by itself in the fast lane fails (`TB_FAST_LANE=1`, set by `make test-fast`).
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from tests.helpers import job_dict

# Fixtures that start (or exist only for) a real Ray cluster or vLLM engine.
HEAVY_FIXTURES = frozenset({"ray_session", "tiny_model", "tiny_pool", "served"})
# Tests that start no engine but take over ~20 s on this 2-core box: slow lane too, to keep
# `make test-fast` under 2 minutes (their owners may move a `slow` marker into the file instead).
SLOW_NODEIDS = frozenset(
    {
        "tests/convert/test_memory.py::test_memory_stays_bounded",
        "tests/test_bench_batch.py::test_dry_run_of_the_generate_and_20_label_presets",
    }
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        # fixturenames is the whole closure: a fixture built on tiny_pool counts too
        if HEAVY_FIXTURES & set(getattr(item, "fixturenames", ())) or item.nodeid in SLOW_NODEIDS:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _fast_lane_starts_no_ray(request):
    yield
    if os.environ.get("TB_FAST_LANE") and "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
            pytest.fail(f"{request.node.nodeid} started Ray in the fast lane: mark it slow", pytrace=False)


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


@pytest.fixture(scope="session")
def tiny_pool(ray_session, tiny_model):
    """A started pool of one real vLLM engine actor on the tiny model, shared by the batch tests.

    Tests that disturb it (kill its actor) must leave it as they found it: up, with fresh `info`."""
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
