"""Driver: streams rendered blocks to the engines and their results to the output, exactly once.

Owns: dispatch (each batch of rows to the least loaded engine whose max_model_len fits it, waiting
while all are full), engine loss (a lost engine is waited for while Ray restarts it; its rows in
flight are quarantined and rerun alone, bisecting any batch that still kills an engine until the row
that does stands alone and becomes an ENGINE_ERROR row after `cluster.max_attempts` tries), and
the job's tail: once the input is exhausted, a batch that would end late on a slow engine gets a
backup copy on an engine with room (tail.py chooses it); the first copy back wins, the other is
cancelled, and each row is accepted exactly once. Must not touch: how engines start (pool.py), how
rows render (render.py), output files (results.py and write.py). Rows in flight are `Work` items of
rendered rows (dicts of the rendered block's columns, see render.py).
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from turbo_batch.batch.order import order_mode, shared_prefix
from turbo_batch.batch.plan import Plan
from turbo_batch.batch.pool import Pool, Slot, is_engine_loss
from turbo_batch.batch.results import ResultBuffer
from turbo_batch.batch.tail import Flight, Tail
from turbo_batch.batch.write import OutputDir
from turbo_batch.errors import EngineStartError, JobError, RowError
from turbo_batch.spec import JobSpec

log = logging.getLogger("turbo_batch")
REVIVE_TIMEOUT_S = 1800.0
PREFIX_BLOCK_TOKENS = 16  # a KV cache block: sharing less than one more block is not worth a stick
TAIL_TICK_S = 0.25  # the tail re-judges backup copies at least this often (and whenever a call ends)


@dataclass
class Work:
    rows: list[dict[str, Any]]
    attempts: int = 0
    prefer: str | None = None  # the engine that has this batch's prompt prefix (affinity dispatch)


@dataclass
class Driver:
    job: JobSpec
    plan: Plan
    pool: Pool
    out: OutputDir
    priority: int = 0
    on_progress: Callable[[int], None] = lambda n: None
    hedge: bool = True  # backup copies of late batches at the tail (off: the tests' baseline)
    results: ResultBuffer = field(init=False)

    def __post_init__(self) -> None:
        self.results = ResultBuffer(self.job, self.plan.passthrough, self.out, self.on_progress)
        self.task = self.job.task.model_dump(mode="json")
        self.sampling = self.job.sampling.model_dump(mode="json")
        self.cond = asyncio.Condition()
        self.quarantine = asyncio.Lock()
        self.tasks: set[asyncio.Task] = set()
        self.tail = Tail(self.pool.slots)  # this job's measured engine rates and backup copies
        self.tag = (self.job.name or "job").replace(" ", "_")[:24]
        # Prefix order (order.py): rows arrive sorted by prompt prefix; a batch that continues the
        # previous batch's prefix group goes to the same engine while it has room.
        self.ordered = order_mode(self.job) != "none"
        self._prev_ids: Any = None  # prompt ids of the last row dispatched
        self._common: int | None = None  # shortest prefix seen between neighbours (the job's shared part)
        self._last_slot: str | None = None

    @property
    def stats(self):
        return self.results.stats

    async def _accept(self, results: list[dict[str, Any]]) -> None:
        await self.results.add(results)

    def _spawn(self, coro: Any) -> None:
        t = asyncio.create_task(coro)
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    def _launch(self, slot: Slot, flight: Flight) -> None:
        """Run a copy of a flight's rows on `slot` (its inflight already counts them)."""
        call = asyncio.ensure_future(self._call(slot, flight.work))
        flight.calls[slot.name] = call
        flight.started[slot.name] = time.monotonic()
        self.tail.flights.add(flight)
        self._spawn(self._run(slot, flight, call))

    # -- dispatch ------------------------------------------------------------------------------------
    def _eligible(self, work: Work) -> list[Slot]:
        need = max(r["prompt_tokens"] + r["budget"] for r in work.rows)
        return [s for s in self.pool.slots if s.max_model_len >= need]

    async def _too_long(self, work: Work) -> None:
        longest = max(s.max_model_len for s in self.pool.slots)
        await self._accept(
            [
                {
                    "row_id": r["row_id"],
                    "prompt_tokens": r["prompt_tokens"],
                    "error_code": str(RowError.PROMPT_TOO_LONG),
                    "error_message": f"prompt has {r['prompt_tokens']} tokens + {r['budget']} to generate > "
                    f"max_model_len {longest} of every engine",
                }
                for r in work.rows
            ]
        )

    async def submit(self, work: Work) -> None:
        """Send rows to the least loaded engine that fits them, waiting while all are full.

        A row's verdict depends on that row alone: rows too long for every engine become
        PROMPT_TOO_LONG rows, and the others go on in groups that fit the same engines."""
        lens = sorted(s.max_model_len for s in self.pool.slots)
        longest = lens[-1] if lens else 0
        fits: dict[int, list[dict[str, Any]]] = {}
        too_long: list[dict[str, Any]] = []
        for r in work.rows:
            need = r["prompt_tokens"] + r["budget"]
            if need > longest:
                too_long.append(r)
            else:  # rows fitting the same engines travel together (mixed clusters: several groups)
                fits.setdefault(bisect.bisect_left(lens, need), []).append(r)
        if too_long:
            await self._too_long(Work(too_long))
        for rows in fits.values():
            await self._dispatch(Work(rows, work.attempts, work.prefer))

    async def _dispatch(self, work: Work) -> None:
        eligible = self._eligible(work)
        async with self.cond:
            while True:
                free = [
                    s
                    for s in eligible
                    if not s.reserved
                    and not s.down  # a lost engine gets no rows until it is back (Ray would queue them)
                    and (s.inflight + len(work.rows) <= s.capacity or s.inflight == 0)
                ]
                if free:
                    sticky = [s for s in free if s.name == work.prefer]
                    slot = (
                        sticky[0]
                        if sticky
                        else min(free, key=lambda s: (s.inflight / s.capacity, s.max_model_len))
                    )
                    break
                await self.cond.wait()
            slot.inflight += len(work.rows)
            self._last_slot = slot.name
        self._launch(slot, Flight(work))

    def _group_starts(self, ok: list[dict[str, Any]]) -> list[bool]:
        """Per row (in prefix order): does it share no more than the job-wide common prefix (+ one KV
        block) with the row before it, i.e. start a new prefix group? The common prefix is the shortest
        one between neighbours so far, this block included (a block holds many groups)."""
        shared = []
        for r in ok:
            shared.append(-1 if self._prev_ids is None else shared_prefix(self._prev_ids, r["prompt_ids"]))
            self._prev_ids = r["prompt_ids"]
        seen = [n for n in shared if n >= 0]
        if seen:
            self._common = min(seen) if self._common is None else min(self._common, *seen)
        common = self._common or 0
        return [n < 0 or n <= common + PREFIX_BLOCK_TOKENS for n in shared]

    async def _call(self, slot: Slot, work: Work) -> list[dict[str, Any]] | None:
        """One engine call; None if the engine was lost (actor died, node lost, replica gone)."""
        payload = [
            {"row_id": r["row_id"], "prompt_ids": r["prompt_ids"], "label_ids": r["label_ids"]}
            | ({"sampling": r["sampling"]} if r.get("sampling") else {})
            for r in work.rows
        ]
        meter, t0, got = self.tail.meters[slot.name], time.monotonic(), 0
        meter.start(t0)
        try:
            results = await slot.call(payload, self.task, self.sampling, self.priority, self.tag)
            got = len(results)
            return results
        except Exception as e:
            if not is_engine_loss(e):
                raise
            if not slot.down:  # one line per loss, not one per call that was in flight
                log.warning(
                    "%s lost (%s): its %d rows in flight will be redone once it is back",
                    slot.name,
                    type(e).__name__,
                    slot.inflight,
                )
                slot.down = True
                self._spawn(self._revive(slot))
            return None
        finally:
            meter.end(time.monotonic(), t0, got)

    async def _revive(self, slot: Slot) -> None:
        """Wait for Ray to restart a lost engine (a vLLM start can take minutes), then use it again."""
        deadline = time.monotonic() + REVIVE_TIMEOUT_S
        delay = 0.5
        while True:
            try:
                if slot.ping is None:
                    await asyncio.sleep(5)
                else:
                    slot.info.update(await slot.ping())
                break
            except EngineStartError:
                raise
            except Exception as e:
                if not is_engine_loss(e) or time.monotonic() > deadline:
                    raise JobError(f"{slot.name} did not come back after it was lost: {e}") from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        log.warning("%s is back", slot.name)
        async with self.cond:
            slot.down = False
            self.cond.notify_all()

    async def _run(self, slot: Slot, flight: Flight, call: asyncio.Future) -> None:
        """Wait for one copy of a flight; the first copy to return settles it, exactly once."""
        try:
            try:
                results = await call
            except asyncio.CancelledError:
                if not (call.cancelled() and flight.settled):
                    raise  # the job itself is being cancelled
                results = None  # the loser of a backup race: cancelled by the winner
        finally:
            flight.calls.pop(slot.name, None)
            async with self.cond:
                slot.inflight -= flight.rows
                self.cond.notify_all()
        if flight.settled:  # another copy won: nothing of this one is kept
            return
        if results is not None:
            flight.settled = True
            self.tail.won(flight, slot)
            for other in flight.calls.values():
                other.cancel()  # the engine aborts its requests (pool.py's calls cancel remote work)
            slot.done += len(results)
            await self._accept([{**r, "engine": slot.name} for r in results])  # per-engine report charts
            return
        if flight.calls:  # lost, but a copy still runs elsewhere: that one answers for these rows
            return
        flight.settled = True
        self.tail.flights.discard(flight)
        # Every row that was on a lost engine is a suspect: most were innocent bystanders of a kill or
        # of one bad row. Suspects run in quarantine, one batch at a time on an engine of their own.
        async with self.quarantine:
            await self._isolate(flight.work)

    async def _drain(self) -> None:
        """After the last batch: wait for every call, copying late batches to engines with room."""
        while self.tasks:
            for flight, slot in self.tail.hedges() if self.hedge else []:
                slot.inflight += flight.rows
                self._launch(slot, flight)
            done, _ = await asyncio.wait(
                list(self.tasks), timeout=TAIL_TICK_S, return_when=asyncio.FIRST_COMPLETED
            )
            for t in done:
                t.result()  # an engine call's error ends the job, as it always did

    async def _reserve(self, work: Work) -> Slot | None:
        eligible = self._eligible(work)
        if not eligible:
            return None
        async with self.cond:
            while True:
                free = [s for s in eligible if not s.reserved and not s.down]
                if free:
                    slot = min(free, key=lambda s: s.inflight)
                    slot.reserved = True
                    break
                await self.cond.wait()
            while slot.inflight:  # let its other rows finish first
                await self.cond.wait()
        return slot

    async def _isolate(self, work: Work) -> None:
        """Run suspect rows alone: a batch that still kills its engine is bisected until the row that
        does it stands alone; that row gets max_attempts tries, then becomes an ENGINE_ERROR row."""
        queue = [work]
        while queue:
            w = queue.pop(0)
            slot = await self._reserve(w)
            if slot is None:
                await self._too_long(w)
                continue
            try:
                results = await self._call(slot, w)
            finally:
                async with self.cond:
                    slot.reserved = False
                    self.cond.notify_all()
            if results is not None:
                slot.done += len(results)
                await self._accept([{**r, "engine": slot.name} for r in results])
            elif len(w.rows) > 1:
                mid = len(w.rows) // 2
                queue[:0] = [Work(w.rows[:mid], w.attempts), Work(w.rows[mid:], w.attempts)]
            elif w.attempts + 1 >= self.job.cluster.max_attempts:
                r = w.rows[0]
                await self._accept(
                    [
                        {
                            "row_id": r["row_id"],
                            "prompt_tokens": r["prompt_tokens"],
                            "error_code": str(RowError.ENGINE_ERROR),
                            "error_message": f"the engine died each of the {w.attempts + 1} times it ran this row alone",
                        }
                    ]
                )
            else:
                await asyncio.sleep(min(2.0 * (w.attempts + 1), 10))
                queue.insert(0, Work(w.rows, w.attempts + 1))

    async def consume(self, blocks: asyncio.Queue) -> None:
        """Dispatch rendered blocks from `blocks` (None ends the stream; an exception is re-raised)."""
        batch_rows = self.job.cluster.batch_rows
        while True:
            block = await blocks.get()
            if block is None:
                break
            if isinstance(block, BaseException):
                raise block
            self.results.set_schema(block.schema)
            errors, ok = [], []
            for row in rows_of(block):
                self.results.keep(row)
                if row["error_code"]:
                    errors.append(
                        {k: row[k] for k in ("row_id", "prompt_tokens", "error_code", "error_message")}
                    )
                else:
                    ok.append(row)
            if errors:
                await self._accept(errors)
            if not self.ordered:  # similar lengths travel together; prefix order keeps the sorted order
                ok.sort(key=lambda r: r["prompt_tokens"] + r["budget"])
            starts = self._group_starts(ok) if self.ordered else [True] * len(ok)
            for i in range(0, len(ok), batch_rows):  # a batch continuing a group: its engine, if it has room
                await self.submit(Work(ok[i : i + batch_rows], prefer=None if starts[i] else self._last_slot))
        await self._drain()
        await self.results.flush()
        self.tail.log()


def rows_of(block: pa.Table) -> list[dict[str, Any]]:
    """A rendered block's rows as dicts, with `prompt_ids` as numpy views of the block's buffer (no
    per-token Python ints: converting ~1K ids per row was most of the driver's CPU; Ray ships the
    arrays as buffers and the engine turns them into lists in its own process)."""
    names = [c for c in block.column_names if c != "prompt_ids"]
    cols = {c: block.column(c).to_pylist() for c in names}
    ids = block.column("prompt_ids").combine_chunks()
    if isinstance(ids, pa.ChunkedArray):  # an empty block
        ids = pa.array([], ids.type)
    valid = ids.is_valid().to_numpy(zero_copy_only=False)
    offsets = ids.offsets.to_numpy()
    values = ids.values.to_numpy(zero_copy_only=False) if len(ids.values) else np.zeros(0, np.int32)
    rows = []
    for i in range(block.num_rows):
        row = {c: cols[c][i] for c in names}
        row["prompt_ids"] = values[offsets[i] : offsets[i + 1]] if valid[i] else None
        rows.append(row)
    return rows
