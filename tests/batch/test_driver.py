"""batch/driver.py with fake engines (fast, no Ray cluster, no vLLM): dispatch over two slots.

In addition to, never instead of, the real-engine tests (tests/batch/test_batch.py, test_reliability.py).
`FakeEngine` is an in-process async engine that records every batch it gets, can hold its calls until
released (an asyncio.Event), dies (raises the exception Ray raises for a lost actor) on poison rows or
once on demand, and comes back when told. Every test checks exact row ids in the committed output.
"""

from __future__ import annotations

import asyncio
import functools
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
from ray.exceptions import ActorUnavailableError

from tests.helpers import fake_classify_result, job_dict
from turbo_batch.batch.driver import Driver, Work
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


# ------------------------------------------------------------------------------------------ dispatch


@run_async
async def test_least_loaded_dispatch_by_load_fraction(tmp_path):
    a = FakeEngine("a", 1000, capacity=8, hold=True)
    b = FakeEngine("b", 1000, capacity=32, hold=True)
    d = make_driver(tmp_path, [a, b])
    for k in range(5):
        await d.submit(Work(rows(range(4 * k, 4 * k + 4))))
    await settle()
    # 1st: both idle, tie -> first slot; then a is at 4/8 while b is at 0/32, 4/32, 8/32, 12/32
    assert a.batches == [[0, 1, 2, 3]]
    assert b.batches == [[4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15], [16, 17, 18, 19]]
    assert (a.slot.inflight, b.slot.inflight) == (4, 16)
    a.gate.set()
    b.gate.set()
    got = await finish(d)
    assert sorted(got) == list(range(20)) and (a.slot.inflight, b.slot.inflight) == (0, 0)
    assert {i: got[i]["engine"] for i in got} == {i: "a" if i < 4 else "b" for i in range(20)}
    assert (a.slot.done, b.slot.done) == (4, 16)


@run_async
async def test_equal_engines_alternate(tmp_path):
    a = FakeEngine("a", 1000, capacity=16, hold=True)
    b = FakeEngine("b", 1000, capacity=16, hold=True)
    d = make_driver(tmp_path, [a, b])
    for k in range(4):
        await d.submit(Work(rows(range(4 * k, 4 * k + 4))))
    await settle()
    assert a.batches == [[0, 1, 2, 3], [8, 9, 10, 11]] and b.batches == [[4, 5, 6, 7], [12, 13, 14, 15]]
    a.gate.set()
    b.gate.set()
    assert sorted(await finish(d)) == list(range(16))


@run_async
async def test_routing_by_max_model_len_and_too_long_rows_alone_become_errors(tmp_path):
    big = FakeEngine("big", 1000, capacity=64)
    small = FakeEngine("small", 100, capacity=64)
    d = make_driver(tmp_path, [big, small])  # big listed first: the tie goes to the smaller engine
    need = {0: 50, 1: 500, 2: 5000, 3: 60, 4: 1000, 5: 1001, 6: 100, 7: 99}  # prompt + budget
    await d.submit(Work([row(i, prompt_tokens=n - 1) for i, n in need.items()]))
    got = await finish(d)
    assert sorted(got) == list(range(8))
    assert sorted(i for i, r in got.items() if r["error_code"] == "PROMPT_TOO_LONG") == [2, 5]
    assert small.batches == [[0, 3, 6, 7]]  # fits both: the smaller (idle) engine
    assert big.batches == [[1, 4]]  # fits only the big one
    for i in (0, 1, 3, 4, 6, 7):  # the rows beside the too-long ones are unaffected
        assert got[i]["error_code"] is None and got[i]["label"] == "positive"
    assert (
        got[2]["error_message"]
        == "prompt has 4999 tokens + 1 to generate > max_model_len 1000 of every engine"
    )
    assert got[5]["prompt_tokens"] == 1000 and got[5]["label"] is None


@run_async
async def test_short_rows_spill_to_the_big_engine_when_the_small_one_is_full(tmp_path):
    big = FakeEngine("big", 1000, capacity=8, hold=True)
    small = FakeEngine("small", 100, capacity=4, hold=True)
    d = make_driver(tmp_path, [big, small])
    await d.submit(Work(rows(range(4))))  # -> small (tie on load, smaller max_model_len)
    await d.submit(Work(rows(range(4, 8))))  # small is full -> big
    await d.submit(Work(rows([8], prompt_tokens=500)))  # only big fits it
    await settle()
    assert small.batches == [[0, 1, 2, 3]] and big.batches == [[4, 5, 6, 7], [8]]
    big.gate.set()
    small.gate.set()
    assert sorted(await finish(d)) == list(range(9))


@run_async
async def test_dispatch_waits_for_capacity_and_never_overfills(tmp_path):
    a = FakeEngine("a", 1000, capacity=4, hold=True)
    b = FakeEngine("b", 1000, capacity=4, hold=True)
    d = make_driver(tmp_path, [a, b])
    await d.submit(Work(rows(range(4))))
    await d.submit(Work(rows(range(4, 8))))
    third = asyncio.create_task(d.submit(Work(rows(range(8, 12)))))
    await settle()
    assert not third.done(), "dispatched beyond every engine's capacity"
    assert (a.batches, b.batches) == ([[0, 1, 2, 3]], [[4, 5, 6, 7]])
    b.got.clear()
    b.gate.set()  # b finishes its rows: the waiting batch goes to b, the engine that has room
    await asyncio.wait_for(third, 5)
    await asyncio.wait_for(b.got.wait(), 5)
    assert b.batches == [[4, 5, 6, 7], [8, 9, 10, 11]] and a.batches == [[0, 1, 2, 3]]
    a.gate.set()
    got = await finish(d)
    assert sorted(got) == list(range(12)) and (a.max_inflight, b.max_inflight) == (4, 4)


@run_async
async def test_batch_larger_than_capacity_runs_alone_on_an_idle_engine(tmp_path):
    a = FakeEngine("a", 1000, capacity=4, hold=True)
    b = FakeEngine("b", 1000, capacity=4, hold=True)
    d = make_driver(tmp_path, [a, b])
    await d.submit(Work(rows(range(2))))  # a: 2 of 4
    await d.submit(Work(rows(range(2, 12))))  # 10 rows: fits no capacity; b is idle
    await settle()
    assert a.batches == [[0, 1]] and b.batches == [list(range(2, 12))] and b.solo == [True]
    a.gate.set()
    b.gate.set()
    assert sorted(await finish(d)) == list(range(12))


# ------------------------------------------------------------------------- engine loss and quarantine


@run_async
async def test_poison_row_is_bisected_out_beside_a_healthy_engine(tmp_path):
    a = FakeEngine("a", 1000, capacity=64, poison=[5])
    b = FakeEngine("b", 1000, capacity=64, poison=[5])  # the row kills any engine, like a real bad row
    d = make_driver(tmp_path, [a, b], max_attempts=1)
    await d.submit(Work(rows(range(8))))  # -> a, which dies
    await d.submit(Work(rows(range(8, 16))))  # healthy rows, served meanwhile
    got = await finish(d)
    assert sorted(got) == list(range(16))
    assert sorted(i for i, r in got.items() if r["error_code"]) == [5]
    assert got[5]["error_code"] == "ENGINE_ERROR"
    assert got[5]["error_message"] == "the engine died each of the 1 times it ran this row alone"
    assert all(got[i]["label"] == "positive" for i in got if i != 5)
    calls = a.batches + b.batches
    # the original batch, then quarantine: the whole batch alone, then halves until row 5 stands alone
    quarantined = [[0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 3], [4, 5, 6, 7], [4, 5], [4], [5], [6, 7]]
    assert sorted(map(tuple, calls)) == sorted(
        map(tuple, [[0, 1, 2, 3, 4, 5, 6, 7], *quarantined, list(range(8, 16))])
    )
    assert sum(5 in c for c in calls) == 5  # deaths are bounded: 2 whole-batch runs, 2 halves, 1 alone
    for eng in (a, b):  # a quarantined batch runs alone on its engine
        for ids, alone in zip(eng.batches, eng.solo, strict=True):
            if 5 in ids or ids in quarantined:
                assert alone, (eng.name, ids)


@run_async
async def test_poison_row_gets_max_attempts_tries_alone(tmp_path):
    a = FakeEngine("a", 1000, capacity=64, poison=[1])
    b = FakeEngine("b", 1000, capacity=64, poison=[1])
    d = make_driver(tmp_path, [a, b], max_attempts=2)
    await d.submit(Work(rows(range(2))))
    got = await finish(d)
    assert [got[0]["error_code"], got[1]["error_code"]] == [None, "ENGINE_ERROR"]
    assert (a.batches + b.batches).count([1]) == 2
    assert got[1]["error_message"] == "the engine died each of the 2 times it ran this row alone"


@run_async
async def test_lost_engine_gets_no_rows_while_down_and_rows_again_once_back(tmp_path):
    a = FakeEngine("a", 1000, capacity=8)
    b = FakeEngine("b", 1000, capacity=8)
    d = make_driver(tmp_path, [a, b], max_attempts=1)
    a.fail_next = True  # a's first call dies ...
    a.back.clear()  # ... and a restarts until the test sets a.back
    await d.submit(Work(rows(range(4))))
    await settle()
    assert a.slot.down and not a.back.is_set()
    for k in range(1, 4):  # rows while a is down: all on b, none queued behind the dead engine
        await d.submit(Work(rows(range(4 * k, 4 * k + 4))))
        await settle()
    assert a.batches == [[0, 1, 2, 3]]
    assert sorted(b.batches) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    a.back.set()  # Ray restarted the actor: the driver's ping answers, the slot is up again
    for _ in range(100):
        if not a.slot.down:
            break
        await asyncio.sleep(0.01)
    assert not a.slot.down and a.slot.info["pid"] == 1001  # info refreshed from the restarted engine
    await d.submit(Work(rows(range(16, 20))))  # both idle: the tie goes to a, which is back
    got = await finish(d)
    assert a.batches == [[0, 1, 2, 3], [16, 17, 18, 19]]
    assert sorted(got) == list(range(20)) and not any(r["error_code"] for r in got.values())
    assert {got[i]["engine"] for i in range(4)} == {"b"}  # the lost rows were redone, once


@run_async
async def test_consume_end_to_end_with_render_errors(tmp_path):
    """consume(): rendered blocks in, render errors passed through, every row committed exactly once."""
    a = FakeEngine("a", 1000, capacity=16)
    b = FakeEngine("b", 100, capacity=16)
    d = make_driver(tmp_path, [a, b], batch_rows=4)
    blocks: asyncio.Queue = asyncio.Queue()
    block_rows = [row(i, prompt_tokens=10 + (i % 3) * 100) for i in range(10)]
    block_rows[3] = {**row(3), "prompt_ids": None, "budget": None, "prompt_tokens": None,
                     "error_code": "EMPTY_INPUT", "error_message": "text column 'text' is empty"}  # fmt: skip
    await blocks.put(pa.Table.from_pylist(block_rows, schema=RENDERED))
    await blocks.put(pa.Table.from_pylist([row(i) for i in range(10, 13)], schema=RENDERED))
    await blocks.put(None)
    await d.consume(blocks)
    got = {r["row_id"]: r for r in read_output(tmp_path / "out").to_pylist()}
    assert sorted(got) == list(range(13))
    assert got[3]["error_code"] == "EMPTY_INPUT" and 3 not in a.ids() + b.ids()
    assert sorted(a.ids() + b.ids()) == [i for i in range(13) if i != 3]
    assert all(len(x) <= 4 for x in a.batches + b.batches)
    assert set(b.ids()).isdisjoint({1, 2, 4, 5, 7, 8})  # rows of 110+ tokens never go to the 100-token engine
    assert d.stats.ok == 12 and d.stats.errors == {"EMPTY_INPUT": 1}


# ------------------------------------------------------------------------- the tail: backup copies


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


@run_async
async def test_a_3x_slower_engine_does_not_hold_up_the_tail(tmp_path):
    """Two engines, one 3x slower; each may hold 64 rows (8 at once) in flight. Without backup copies
    the job waits at the end for the slow engine's 64 rows (~1 s at 67 rows/s, of a 1.9 s job); with
    them it ends within 10% of the ideal time, N / (sum of rates), and the fast engine did ~3/4. The
    ideal uses the rates the fakes really had: on a busy box a 40 ms sleep takes a few ms more."""
    n = 500

    async def attempt(hedge: bool, k: int) -> tuple[float, float, Driver, PacedEngine, PacedEngine]:
        fast, slow = PacedEngine("fast", 200.0), PacedEngine("slow", 200.0 / 3)
        wall, got, d = await timed_run(tmp_path / f"{hedge}{k}", [fast, slow], n, hedge=hedge)
        on_fast = sum(r["engine"] == "fast" for r in got.values())
        # pull-based dispatch: each engine's share follows its speed (the rates the fakes really had:
        # under load the fast one's short sleeps overshoot more, so its share is below the nominal 3/4)
        share = fast.real_rate() / (fast.real_rate() + slow.real_rate())
        assert abs(on_fast / n - share) <= 0.1, (hedge, on_fast, round(share, 3))
        assert (fast.slot.done, slow.slot.done) == (on_fast, n - on_fast)
        return wall, n / (fast.real_rate() + slow.real_rate()), d, fast, slow

    wall, ideal, *_ = await attempt(False, 0)
    assert wall > 1.10 * ideal, f"the baseline had no tail to cut: {wall:.2f} s vs {ideal:.2f}"  # can fail
    runs = []
    for k in range(3):  # this 2-core box is shared: a load spike stalls the event loop, so best of 3
        runs.append(await attempt(True, k))
        if runs[-1][0] <= 1.10 * runs[-1][1]:
            break
    print(f"ideal {ideal:.3f} s, wall without backups {wall:.3f} s; with: {[(r[0], r[1]) for r in runs]}")
    hedged, ideal, d, fast, slow = runs[-1]
    assert hedged <= 1.10 * ideal, f"wall {hedged:.2f} s vs ideal {ideal:.2f} s in each of 3 tries"
    stats = {e.slot.name: d.tail.stats(e.slot) for e in (fast, slow)}
    assert stats["fast"]["backup_calls"] > 0 and stats["fast"]["backup_wins"] > 0, stats
    assert abs(stats["fast"]["rows_per_s"] / fast.real_rate() - 1) < 0.1, stats  # measured while busy
    assert abs(stats["slow"]["rows_per_s"] / slow.real_rate() - 1) < 0.2, stats  # (lost races: busy too)


@run_async
async def test_the_losing_copy_is_cancelled_and_its_rows_never_reach_the_output(tmp_path):
    fast, slow = PacedEngine("fast", 400.0), PacedEngine("slow", 40.0, capacity=32)
    _, got, d = await timed_run(tmp_path, [fast, slow], 96)
    assert slow.cancelled, "no copy on the slow engine was cancelled"
    for ids in slow.cancelled:  # each was copied to the fast engine, which won the race
        assert ids in fast.finished and {got[i]["engine"] for i in ids} == {"fast"}
        assert ids not in slow.finished
    won = {i for ids in slow.finished for i in ids}
    assert {i for i, r in got.items() if r["engine"] == "slow"} == won
    assert slow.slot.done == len(won) and fast.slot.done == 96 - len(won)
    assert not d.tail.flights and d.tail.stats(fast.slot)["backup_wins"] == len(slow.cancelled)


@run_async
async def test_a_loser_that_ignores_the_cancel_is_dropped(tmp_path):
    """An engine that finishes and returns rows after the other copy won: those rows are not accepted
    a second time (the output holds each row once, from the winner)."""
    fast, slow = PacedEngine("fast", 400.0), PacedEngine("slow", 40.0, capacity=32, deaf=True)
    _, got, d = await timed_run(tmp_path, [fast, slow], 96)
    late = [ids for ids in slow.cancelled if ids in slow.finished]
    assert late, "no loser returned after the winner"
    for ids in late:
        assert {got[i]["engine"] for i in ids} == {"fast"}
    assert slow.slot.done + fast.slot.done == 96 and d.stats.ok == 96


@run_async
async def test_backup_copy_lost_with_its_engine_the_original_still_answers(tmp_path):
    died: dict = {}

    async def die_on_the_first_copy(eng, ids):
        if "fast" not in died and ids in slow.batches:
            died["fast"] = ids
            raise ActorUnavailableError("fast died", None)
        await asyncio.Event().wait()

    slow = PacedEngine("slow", 40.0, capacity=32)
    fast = PacedEngine("fast", 400.0, watch=die_on_the_first_copy)
    _, got, d = await timed_run(tmp_path, [fast, slow], 96)
    lost = died["fast"]
    assert lost in slow.finished and {got[i]["engine"] for i in lost} == {"slow"}  # the original answered
    assert [b for b in fast.batches + slow.batches if set(b) & set(lost)] == [lost, lost], "quarantined"
    assert not any(r["error_code"] for r in got.values()) and d.stats.ok == 96
    assert fast.slot.done + slow.slot.done == 96 and not fast.slot.down  # the lost engine came back


@run_async
async def test_original_lost_while_its_backup_runs(tmp_path):
    died: dict = {}

    async def die_once_copied(eng, ids):
        while "slow" not in died:
            if ids in fast.batches:
                died["slow"] = ids
                raise ActorUnavailableError("slow died", None)
            await asyncio.sleep(0.005)
        await asyncio.Event().wait()

    fast = PacedEngine("fast", 400.0)
    slow = PacedEngine("slow", 40.0, capacity=32, watch=die_once_copied)
    _, got, d = await timed_run(tmp_path, [fast, slow], 96)
    lost = died["slow"]
    assert lost in fast.finished and {got[i]["engine"] for i in lost} == {"fast"}  # the backup answered
    assert [b for b in fast.batches + slow.batches if set(b) & set(lost)] == [lost, lost], "quarantined"
    assert not any(r["error_code"] for r in got.values()) and d.stats.ok == 96


@run_async
async def test_both_copies_lost_then_the_rows_are_quarantined_once(tmp_path):
    died: dict = {}

    async def fast_dies_on_the_first_copy(eng, ids):
        if "fast" not in died and ids in slow.batches:
            died["fast"] = ids
            raise ActorUnavailableError("fast died", None)
        await asyncio.Event().wait()

    async def slow_dies_once_its_copy_died(eng, ids):
        while "slow" not in died:
            if died.get("fast") == ids:
                died["slow"] = ids
                raise ActorUnavailableError("slow died", None)
            await asyncio.sleep(0.005)
        await asyncio.Event().wait()

    fast = PacedEngine("fast", 400.0, watch=fast_dies_on_the_first_copy)
    slow = PacedEngine("slow", 40.0, capacity=32, watch=slow_dies_once_its_copy_died)
    _, got, d = await timed_run(tmp_path, [fast, slow], 96)
    lost = died["slow"]
    assert died["fast"] == lost
    runs = [b for b in fast.batches + slow.batches if set(b) & set(lost)]
    assert runs == [lost, lost, lost], runs  # the original, its copy, then once in quarantine (alone)
    alone = [solo for e in (fast, slow) for b, solo in zip(e.batches, e.solo, strict=True) if b == lost]
    assert alone.count(True) >= 1, alone  # the quarantine run had its engine to itself
    assert not any(r["error_code"] for r in got.values()) and d.stats.ok == 96
