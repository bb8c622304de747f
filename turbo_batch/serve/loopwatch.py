"""How late this process's event loop runs, and what the garbage collector costs it (the serve trace).

A streaming server is as fast as its event loop: every token of every stream waits for its turn on
it. `LoopWatch` measures the two things that hold a loop up — callbacks that run long (a sleeper task
notes how late it wakes: the loop's lag) and garbage-collection pauses (gc.callbacks, per
generation) — and hands back one summary row per window for the trace file (ingress.py writes it
when TURBO_BATCH_TRACE is set). It changes nothing it measures. Must not touch: routes, the engine.
"""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any

PERIOD_S = 0.005  # the sleeper's nap: lag is how much later than this it wakes


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


class LoopWatch:
    """Loop lag and GC pauses since the last `row()`; `start()` from inside the loop to watch."""

    def __init__(self) -> None:
        self.lags: list[float] = []
        self.pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self._gc_t0 = 0.0
        self._since = time.monotonic()
        self._task: asyncio.Task | None = None
        self.frozen = 0  # objects in gc's permanent generation (Ray Serve freezes a replica's start-up heap)

    def start(self) -> None:
        if self._task is not None:
            return
        self.frozen = gc.get_freeze_count()  # walks the whole frozen list: once, not per window
        gc.callbacks.append(self._on_gc)
        self._task = asyncio.get_running_loop().create_task(self._sleeper())
        self._since = time.monotonic()

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_t0 = time.perf_counter()
        else:
            self.pauses.setdefault(info.get("generation", 2), []).append(time.perf_counter() - self._gc_t0)

    async def _sleeper(self) -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(PERIOD_S)
            self.lags.append(time.perf_counter() - t - PERIOD_S)

    def row(self) -> dict[str, Any]:
        """Summary of the window since the last call (milliseconds), then a fresh window."""
        ms = 1000.0
        now = time.monotonic()
        lags, pauses = self.lags, self.pauses
        self.lags, self.pauses, since, self._since = [], {0: [], 1: [], 2: []}, self._since, now
        all_pauses = [p for ps in pauses.values() for p in ps]
        return {
            "kind": "loop",
            "window_s": round(now - since, 3),
            "loop_lag_p50_ms": _pct(lags, 0.5) * ms,
            "loop_lag_p99_ms": _pct(lags, 0.99) * ms,
            "loop_lag_max_ms": max(lags, default=0.0) * ms,
            "gc_pause_total_ms": sum(all_pauses) * ms,
            "gc_pause_max_ms": max(all_pauses, default=0.0) * ms,
            "gc_oldest_n": len(pauses.get(2, [])),
            "gc_oldest_max_ms": max(pauses.get(2, []), default=0.0) * ms,
            "gc_frozen": self.frozen,
        }
