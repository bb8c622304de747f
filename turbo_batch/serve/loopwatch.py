"""How late this process's event loop runs, and what the garbage collector costs it (the serve trace).

A streaming server is as fast as its event loop: every token of every stream waits for its turn on
it. `LoopWatch` measures the two things that hold a loop up — callbacks that run long (a sleeper task
notes how late it wakes: the loop's lag) and garbage-collection pauses (gc.callbacks, per
generation) — and, when the loop has not ticked for STALL_S, a watchdog thread takes the loop
thread's Python stack (every STALL_S while the stall lasts), so a stall names its code. One summary
row per window goes to the trace file (ingress.py writes it when TURBO_BATCH_TRACE is set). It
changes nothing it measures. Must not touch: routes, the engine.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import threading
import time
from collections import Counter
from typing import Any

PERIOD_S = 0.005  # the sleeper's nap: lag is how much later than this it wakes
STALL_S = 0.1  # a loop silent this long is stalled: the watchdog samples its stack this often


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _stack(frame: Any, depth: int = 14) -> str:
    """'file:function:line < caller < ...' of the innermost `depth` frames ('idle' outside Python)."""
    parts = []
    while frame is not None and len(parts) < depth:
        code = frame.f_code
        parts.append(f"{code.co_filename.rsplit('/', 1)[-1]}:{code.co_name}:{frame.f_lineno}")
        frame = frame.f_back
    return " < ".join(parts) or "idle"


class LoopWatch:
    """Loop lag and GC pauses since the last `row()`; `start()` from inside the loop to watch."""

    def __init__(self) -> None:
        self.lags: list[float] = []
        self.pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self._gc_t0 = 0.0
        self._since = time.monotonic()
        self._task: asyncio.Task | None = None
        self.frozen = 0  # objects in gc's permanent generation (Ray Serve freezes a replica's start-up heap)
        self.stalls: Counter[str] = Counter()  # loop-thread stack → samples taken while stalled
        self._tick = time.perf_counter()
        self._loop_thread = 0
        self._stop = threading.Event()

    def start(self) -> None:
        if self._task is not None:
            return
        self.frozen = gc.get_freeze_count()  # walks the whole frozen list: once, not per window
        gc.callbacks.append(self._on_gc)
        self._task = asyncio.get_running_loop().create_task(self._sleeper())
        self._since = time.monotonic()
        self._loop_thread, self._tick = threading.get_ident(), time.perf_counter()
        self._stop.clear()
        threading.Thread(target=self._watchdog, name="turbo-batch-loopwatch", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
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
            self._tick = now = time.perf_counter()
            self.lags.append(now - t - PERIOD_S)

    def _watchdog(self) -> None:
        while not self._stop.wait(STALL_S):
            if time.perf_counter() - self._tick > STALL_S:
                frame = sys._current_frames().get(self._loop_thread)
                self.stalls[_stack(frame)] += 1

    def row(self) -> dict[str, Any]:
        """Summary of the window since the last call (milliseconds), then a fresh window."""
        ms = 1000.0
        now = time.monotonic()
        lags, pauses, stalls = self.lags, self.pauses, self.stalls
        self.lags, self.pauses, since, self._since = [], {0: [], 1: [], 2: []}, self._since, now
        self.stalls = Counter()
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
            "stall_samples": sum(stalls.values()),
            "stall_stacks": stalls.most_common(5),
        }
