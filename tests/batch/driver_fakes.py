"""Fake engines and helpers for the driver tests (test_driver.py: dispatch; test_driver_hedge.py: the
tail's backup copies). `FakeEngine` is an in-process async engine that records every batch it gets, can
hold its calls until released (an asyncio.Event), dies (raises the exception Ray raises for a lost actor)
on poison rows or once on demand, and comes back when told; `PacedEngine` adds a speed, like vLLM's."""

from __future__ import annotations

import asyncio
import functools
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
from ray.exceptions import ActorUnavailableError

from tests.helpers import fake_classify_result, job_dict
from turbo_batch.batch.driver import Driver
from turbo_batch.batch.plan import Plan
from turbo_batch.batch.pool import Slot
from turbo_batch.batch.write import OutputDir, read_output
from turbo_batch.spec import JobSpec

LABELS = ["positive", "negative"]


class FakeEngine:
    def __init__(self, name: str, max_model_len: int, capacity: int, *, hold=False, poison=()):
        self.name = name
        self.info = {"max_model_len": max_model_len, "pid": 1000}
        self.gate = asyncio.Event()  # closed: calls wait until released
        if not hold:
            self.gate.set()
        self.poison = set(poison)
        self.fail_next = False  # the next call dies as if the actor was killed mid-call
        self.back = asyncio.Event()  # a lost engine answers its ping once this is set (Ray restarted it)
        self.back.set()
        self.batches: list[list] = []  # row ids of every call, in arrival order
        self.solo: list[bool] = []  # per call: it was the only call on this engine while it ran
        self.inflight = 0
        self.max_inflight = 0
        self.got = asyncio.Event()  # set on every call (tests clear it to await the next one)
        self.slot = Slot(name, self.call, dict(self.info), capacity, ping=self.ping)

    async def call(self, rows, task, sampling, priority, tag):
        ids = [r["row_id"] for r in rows]
        self.batches.append(ids)
        self.solo.append(self.inflight == 0)
        self.inflight += len(rows)
        self.max_inflight = max(self.max_inflight, self.inflight)
        self.got.set()
        try:
            if self.fail_next or self.poison & set(ids):
                self.fail_next = False
                raise ActorUnavailableError(f"{self.name} died", None)
            await self.gate.wait()
            return [fake_classify_result(r, engine=self.name) for r in rows]
        finally:
            self.inflight -= len(rows)

    async def ping(self):
        await self.back.wait()
        self.info["pid"] += 1  # a restarted actor is a new process
        return dict(self.info)

    def ids(self) -> list:
        return sorted(i for b in self.batches for i in b)


def row(row_id: int, prompt_tokens: int = 10, budget: int = 1) -> dict:
    return {
        "row_id": row_id,
        "prompt_ids": list(range(prompt_tokens)),
        "label_ids": [1, 2],
        "budget": budget,
        "prompt_tokens": prompt_tokens,
        "error_code": None,
        "error_message": None,
    }


def rows(ids, **kw) -> list[dict]:
    return [row(i, **kw) for i in ids]


RENDERED = pa.schema(
    [
        ("row_id", pa.int64()),
        ("prompt_ids", pa.list_(pa.int32())),
        ("label_ids", pa.list_(pa.int32())),
        ("budget", pa.int32()),
        ("prompt_tokens", pa.int32()),
        ("error_code", pa.string()),
        ("error_message", pa.string()),
    ]
)


def make_driver(tmp_path: Path, engines: list[FakeEngine], **cluster) -> Driver:
    job = JobSpec.model_validate(
        job_dict(
            tmp_path / "model",
            "unused",
            "out",
            task={"type": "classify", "labels": LABELS},
            cluster={"max_attempts": 1, **cluster},
            output={"part_rows": 1000},
        )
    )
    plan = Plan(job, [], [], ["text"], [], tmp_path / "out", 0, "fp")
    out = OutputDir(tmp_path / "out", "fp", {}).open()
    driver = Driver(job, plan, SimpleNamespace(slots=[e.slot for e in engines], start_s=0.0), out)
    driver.results.set_schema(RENDERED)
    return driver


async def finish(driver: Driver) -> dict:
    """What consume() does after the last block: wait for every call, commit, return rows by id."""
    while driver.tasks:
        await asyncio.gather(*list(driver.tasks))
    await driver.results.flush()
    table = read_output(driver.plan.output_dir)
    ids = table.column("row_id").to_pylist()
    assert len(ids) == len(set(ids)), "a row was committed twice"
    return {r["row_id"]: r for r in table.to_pylist()}


def run_async(fn):
    """Run an async test on a fresh event loop (no pytest-asyncio here)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(fn(*args, **kwargs))

    return wrapper


async def settle() -> None:
    for _ in range(20):  # let every ready task run (nothing else can happen: the fakes are held)
        await asyncio.sleep(0)


class PacedEngine(FakeEngine):
    """A FakeEngine with a speed, like a vLLM engine: up to `seqs` rows at once, each taking
    `seqs / rate` seconds, in arrival order (rate rows/s when full). Records the row ids of calls that
    returned (`finished`) and of calls cancelled mid-way (`cancelled`), and how long each row really
    took (`took`: a busy event loop oversleeps). `watch(engine, ids)` runs beside each call's rows:
    if it raises (the lost-actor error), the call dies with it."""

    def __init__(self, name: str, rate: float, *, seqs: int = 8, capacity: int = 64, watch=None, deaf=False):
        super().__init__(name, 1000, capacity)
        self.rate = rate
        self.row_s = seqs / rate
        self.sem = asyncio.Semaphore(seqs)
        self.watch = watch
        self.deaf = deaf  # ignores a cancel: finishes its rows and returns them anyway
        self.seqs = seqs
        self.finished: list[list] = []
        self.cancelled: list[list] = []
        self.took: list[float] = []

    def real_rate(self) -> float:
        """Rows per second this engine could really do when full, at the row times it really had."""
        return self.seqs / (sum(self.took) / len(self.took))

    async def _row(self, r) -> dict:
        async with self.sem:
            t0 = time.monotonic()
            await asyncio.sleep(self.row_s)
            self.took.append(time.monotonic() - t0)
        return fake_classify_result(r)

    async def call(self, rows, task, sampling, priority, tag):
        ids = [r["row_id"] for r in rows]
        self.batches.append(ids)
        self.solo.append(self.inflight == 0)
        self.inflight += 1
        try:
            return await self._call(ids, rows)
        finally:
            self.inflight -= 1

    async def _call(self, ids, rows):
        work = asyncio.ensure_future(asyncio.gather(*(self._row(r) for r in rows)))
        watch = asyncio.ensure_future(self.watch(self, ids) if self.watch else asyncio.Event().wait())
        try:
            await asyncio.wait([work, watch], return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            self.cancelled.append(ids)
            if not self.deaf:
                work.cancel()
                work.add_done_callback(lambda f: f.cancelled() or f.exception())
                raise
        finally:
            watch.cancel()
        if not work.done() and watch.done() and not watch.cancelled():
            work.cancel()
            work.add_done_callback(lambda f: f.cancelled() or f.exception())
            watch.result()  # raises the engine's death
        out = await work
        self.finished.append(ids)
        return out


def blocks_of(n: int, block_rows: int = 100) -> asyncio.Queue:
    q: asyncio.Queue = asyncio.Queue()
    for start in range(0, n, block_rows):
        q.put_nowait(pa.Table.from_pylist(rows(range(start, min(start + block_rows, n))), schema=RENDERED))
    q.put_nowait(None)
    return q


async def timed_run(tmp_path, engines, n, *, hedge=True, batch_rows=8) -> tuple[float, dict, Driver]:
    """consume() n rows; wall: from the start to the last row accepted (the commit's fsync is not
    dispatch, and this busy box's disk makes it vary)."""
    d = make_driver(tmp_path, engines, batch_rows=batch_rows)
    d.hedge = hedge
    accept, ends = d._accept, []

    async def timed_accept(results):
        await accept(results)
        if d.stats.rows == n:
            ends.append(time.monotonic())

    d._accept = timed_accept
    blocks = blocks_of(n)
    t0 = time.monotonic()
    await d.consume(blocks)
    wall = ends[0] - t0
    table = read_output(tmp_path / "out")
    ids = table.column("row_id").to_pylist()
    assert sorted(ids) == list(range(n)), "every row exactly once"
    assert all(e.slot.inflight == 0 for e in engines)
    return wall, {r["row_id"]: r for r in table.to_pylist()}, d
