"""Tail: each engine's measured throughput, and backup copies of the batches that would end the job late.

Owns: `Meter` (one engine's rows per busy second in this job, and its quickest call), `Flight` (one
batch of rows in flight and the engine calls running copies of it), `Tail` (a job's meters, flights
and backup counts, and the per-engine numbers for the summary) and `hedges()`, the choice, once
the input is exhausted, of which batches to copy to which engines with room (backup tasks, as in
MapReduce): a batch is copied when an engine with room would finish it clearly sooner than the
engine it is on, judged by measured rates. Must not touch: engine calls, capacity accounting and
results (driver.py runs the copies and settles a flight exactly once: the first copy to return wins,
the others are cancelled), how engines start (pool.py). Nothing here awaits or imports Ray.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from turbo_batch.batch.pool import Slot

log = logging.getLogger("turbo_batch")
# Copy a batch only if the engine with room is estimated to finish it in under this share of the time
# its own engine still needs: the estimates are rough, and a copy that barely wins wastes an engine.
HEDGE_GAIN = 0.75


@dataclass
class Meter:
    """One engine's throughput as the driver measures it: rows returned per second while busy (busy:
    at least one call running), so idle time waiting for input does not make an engine look slow."""

    calls: int = 0  # calls running now
    rows: int = 0  # rows of calls that returned results
    busy_s: float = 0.0  # closed busy stretches
    since: float = 0.0  # start of the current busy stretch
    last: float = 0.0  # when a call last returned (or the current busy stretch began)
    quickest: float | None = None  # the shortest call that returned: a floor on any call's time

    def start(self, now: float) -> None:
        if self.calls == 0:
            self.since = self.last = now
        self.calls += 1

    def end(self, now: float, started: float, rows: int) -> None:
        """A call ended; `rows` is 0 if it failed or was cancelled."""
        self.calls -= 1
        if rows:
            self.rows += rows
            self.last = now
            took = now - started
            self.quickest = took if self.quickest is None else min(self.quickest, took)
        if self.calls == 0:
            self.busy_s += now - self.since

    def busy(self, now: float) -> float:
        return self.busy_s + (now - self.since if self.calls else 0.0)

    def rate(self, now: float) -> float | None:
        busy = self.busy(now)
        return self.rows / busy if self.rows and busy > 0 else None


@dataclass(eq=False)
class Flight:
    """One batch of rows in flight: `calls` maps an engine's name to the call running a copy there."""

    work: Any  # driver.Work
    calls: dict[str, asyncio.Future] = field(default_factory=dict)
    started: dict[str, float] = field(default_factory=dict)
    settled: bool = False  # a copy returned its results (or every copy was lost)
    hedged: bool = False  # a backup copy was made (at most one per batch)

    @property
    def rows(self) -> int:
        return len(self.work.rows)


def _queue_time(meter: Meter, rate: float, rows: int, now: float, own: int) -> float:
    """Seconds until `rows` more rows are through an engine whose calls finish in arrival order at
    `rate`, less what it did since it last returned a call; never less than the time of the batch's
    `own` rows (a batch past its estimate is late, not nearly done)."""
    done_since = rate * max(now - meter.last, 0.0) if meter.calls else 0.0
    return max(rows - done_since, own) / rate


def hedges(
    flights: Sequence[Flight], slots: Sequence[Slot], meters: Mapping[str, Meter], now: float
) -> list[tuple[Flight, Slot]]:
    """The backup copies to make now: (batch, engine with room) pairs, latest-ending batch first.

    A batch's time left on its engine is the rows ahead of it there, itself included, over that
    engine's measured rate (an engine that returned nothing yet: as if its oldest batch returned now),
    and at least the engine's quickest call less the time the batch has run. A candidate engine's time is its own rows in flight plus the batch over
    its rate, and never less than its quickest call. A batch is copied at most once, never to or from
    a reserved (quarantine) or lost engine; quarantined rows are not flights at all."""
    up = [s for s in slots if not s.reserved and not s.down]
    load = {s.name: s.inflight for s in slots}
    on: dict[str, list[Flight]] = {s.name: [] for s in up}
    for f in flights:
        for name in f.calls:
            if not f.settled and name in on:
                on[name].append(f)
    late: list[tuple[float, Flight, Slot]] = []
    for s in up:
        mine = sorted(on[s.name], key=lambda f: f.started[s.name])
        if not mine:
            continue
        m = meters[s.name]
        busy = m.busy(now)
        rate = m.rate(now) or (mine[0].rows / busy if busy > 0 else None)
        if not rate:
            continue
        ahead = 0
        for f in mine:
            ahead += f.rows
            if len(f.calls) == 1 and not f.hedged:
                # a call takes at least the engine's quickest call: rows that run together (vLLM's
                # batch of max_num_seqs) return together, later than their place in the queue says
                first_wave = (m.quickest or 0.0) - (now - f.started[s.name])
                late.append((max(_queue_time(m, rate, ahead, now, f.rows), first_wave), f, s))
    out: list[tuple[Flight, Slot]] = []
    room = [g for g in up if g.inflight < g.capacity]  # at the tail, few engines have room
    for left, f, s in sorted(late, key=lambda x: -x[0]) if room else []:
        need = max(r["prompt_tokens"] + r["budget"] for r in f.work.rows)
        best: tuple[float, Slot] | None = None
        for g in room:
            if g is s or g.max_model_len < need or (load[g.name] and load[g.name] + f.rows > g.capacity):
                continue
            mg = meters[g.name]
            rate = mg.rate(now) or meters[s.name].rate(now)  # never measured: as fast as the other
            if not rate:
                continue
            t = max(_queue_time(mg, rate, load[g.name] + f.rows, now, f.rows), mg.quickest or 0.0)
            if t < HEDGE_GAIN * left and (best is None or t < best[0]):
                best = (t, g)
        if best is not None:
            load[best[1].name] += f.rows
            out.append((f, best[1]))
    return out


class Tail:
    """One job's view of its engines' speed: a `Meter` per engine, the flights, and backup counts."""

    def __init__(self, slots: Sequence[Slot]):
        self.slots = list(slots)
        self.meters = {s.name: Meter() for s in self.slots}
        self.flights: set[Flight] = set()  # batches in flight outside quarantine
        self.backups: Counter[str] = Counter()  # backup copies run per engine
        self.wins: Counter[str] = Counter()  # ... and those that returned first

    def hedges(self) -> list[tuple[Flight, Slot]]:
        """The backup copies to make now (see `hedges()`), each batch marked as copied and counted."""
        picks = hedges(list(self.flights), self.slots, self.meters, time.monotonic())
        for f, s in picks:
            f.hedged = True
            self.backups[s.name] += 1
        return picks

    def won(self, flight: Flight, slot: Slot) -> None:
        self.flights.discard(flight)
        if next(iter(flight.started)) != slot.name:  # the first key is the original copy's engine
            self.wins[slot.name] += 1

    def stats(self, slot: Slot) -> dict[str, Any]:
        """What this job measured of one engine (for the summary's engines)."""
        m, now = self.meters[slot.name], time.monotonic()
        rate = m.rate(now)
        return {
            "rows_per_s": round(rate, 3) if rate else None,
            "busy_s": round(m.busy(now), 3),
            "backup_calls": self.backups[slot.name],
            "backup_wins": self.wins[slot.name],
        }

    def log(self) -> None:
        for s in self.slots:
            e = self.stats(s)
            log.info(
                "%s: %d rows, %s rows/s over %.1f s busy; %d backup copies ran here, %d of them won",
                s.name, s.done, e["rows_per_s"], e["busy_s"], e["backup_calls"], e["backup_wins"],
            )  # fmt: skip
