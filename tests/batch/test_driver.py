"""batch/driver.py with fake engines (fast, no Ray cluster, no vLLM): dispatch over two slots.

In addition to, never instead of, the real-engine tests (tests/batch/test_batch.py, test_reliability.py).
`FakeEngine` is an in-process async engine that records every batch it gets, can hold its calls until
released (an asyncio.Event), dies (raises the exception Ray raises for a lost actor) on poison rows or
once on demand, and comes back when told. Every test checks exact row ids in the committed output.
"""

from __future__ import annotations

import asyncio

import pyarrow as pa

from tests.batch.driver_fakes import (
    RENDERED,
    FakeEngine,
    finish,
    make_driver,
    row,
    rows,
    run_async,
    settle,
)
from turbo_batch.batch.driver import Work
from turbo_batch.batch.write import read_output

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
