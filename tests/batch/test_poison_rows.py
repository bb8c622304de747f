"""Rows that kill every engine they reach become ENGINE_ERROR rows after a bounded number of tries.

A real Ray actor stands in for the engine (its process exits whenever a batch holds a poison row) so
the driver's quarantine and bisection meet real actor deaths and restarts; the real engine is not
needed.
"""

from __future__ import annotations

import asyncio
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.batch.test_reliability import _texts, assert_exactly_once
from tests.helpers import fake_classify_result, job_dict
from turbo_batch.batch.pool import Slot
from turbo_batch.batch.run import run_job
from turbo_batch.spec import JobSpec

pytestmark = pytest.mark.slow


class PoisonEngine:
    """Answers like an engine, but its process dies whenever a batch holds a poison row."""

    def __init__(self, poison: list[int], deaths: str):
        self.poison = set(poison)
        self.deaths = deaths

    def ping(self):
        return {}

    async def run_rows(self, rows, task, sampling, priority=0, tag=""):
        if any(r["row_id"] in self.poison for r in rows):
            with open(self.deaths, "a") as fh:
                fh.write("x")
            os._exit(1)
        await asyncio.sleep(0.01)
        return [fake_classify_result(r) for r in rows]


class FakePool:
    def __init__(self, actor):
        async def call(rows, task, sampling, priority, tag):
            return await actor.run_rows.remote(rows, task, sampling, priority=priority, tag=tag)

        async def ping():
            return await actor.ping.remote()

        self.slots = [Slot("fake", call, {"max_model_len": 1024}, capacity=64, ping=ping)]

    async def close(self):
        pass


def test_rows_that_keep_killing_engines_become_error_rows(ray_session, tiny_model, out_root):
    poison = [7, 130]
    deaths = out_root / "deaths"
    ray_session.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    actor = (
        ray_session.remote(PoisonEngine)
        .options(max_restarts=-1, max_task_retries=0, num_cpus=0)
        .remote(poison, str(deaths))
    )
    n = 200
    pq.write_table(pa.table({"text": _texts(n)}), out_root / "in.parquet")
    job = JobSpec.model_validate(
        job_dict(tiny_model, out_root / "in.parquet", "o", cluster={"batch_rows": 16, "max_attempts": 3})
    )
    summary = run_job(job, pool=FakePool(actor))
    rows = {r["row_id"]: r for r in pq.read_table(out_root / "o").to_pylist()}
    assert_exactly_once(out_root / "o", n)
    assert sorted(i for i, r in rows.items() if r["error_code"] == "ENGINE_ERROR") == poison
    assert all(rows[i]["label"] == "positive" for i in rows if i not in poison)
    assert summary["rows_error"] == 2
    # Bisection isolates each poison row; then it gets max_attempts tries alone. Bounded, not forever.
    assert len(deaths.read_text()) <= len(poison) * (4 + 3) + 4
    ray_session.kill(actor)
