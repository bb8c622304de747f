"""Engine load: how busy vLLM's scheduler was, step by step, over a window a caller chooses.

Owns `LoadMeter`, a vLLM stat logger (passed to AsyncLLM as one of its `stat_loggers`; vLLM's own
loggers keep running beside it) that adds up, over the engine's steps, the requests running and
waiting and the tokens scheduled; `window()`, the difference of two readings as one summary. A batch
job reads each engine at the start and the end of its timed window (batch/run.py) and puts the summary
in `_summary.json`: mean requests running against `max_num_seqs`, and the share of steps that had free
seats and nothing waiting (the dispatcher kept the engine short of rows). Must not touch: requests,
sampling, vLLM's own logging.

vLLM calls `record` once per engine step, from AsyncLLM's output handler (one thread: no locks). Its
`SchedulerStats` and `IterationStats` are not stable interfaces (vLLM says so), so every field is read
with a default and a missing one counts as 0.
"""

from __future__ import annotations

import time
from typing import Any

FIELDS = (
    "steps",
    "running",
    "waiting",
    "full_steps",
    "starved_steps",
    "prompt_tokens",
    "output_tokens",
    "kv_usage",
)


class LoadMeter:
    """Running totals over the engine's steps; `reading()` is a snapshot, `window(a, b)` their difference."""

    def __init__(self, max_num_seqs: int = 1):
        self.max_num_seqs = max(int(max_num_seqs or 0), 1)  # an engine sets it once vLLM has resolved it
        self.totals = dict.fromkeys(FIELDS, 0)
        self.kv_usage_max = 0.0

    def factory(self):
        """What AsyncLLM's `stat_loggers` takes: a callable (vllm_config, engine_index) -> logger."""
        from vllm.v1.metrics.loggers import StatLoggerBase

        meter = self

        class _Logger(StatLoggerBase):
            def __init__(self, vllm_config: Any = None, engine_index: int = 0):
                pass

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
                meter.record(scheduler_stats, iteration_stats)

            def log_engine_initialized(self) -> None:
                pass

        return _Logger

    def record(self, scheduler_stats: Any, iteration_stats: Any) -> None:
        t = self.totals
        if scheduler_stats is not None:
            running = int(getattr(scheduler_stats, "num_running_reqs", 0) or 0)
            waiting = int(getattr(scheduler_stats, "num_waiting_reqs", 0) or 0)
            t["steps"] += 1
            t["running"] += running
            t["waiting"] += waiting
            if running >= self.max_num_seqs:
                t["full_steps"] += 1
            elif waiting == 0:
                t["starved_steps"] += 1
            kv = float(getattr(scheduler_stats, "kv_cache_usage", 0) or 0)
            t["kv_usage"] += kv
            self.kv_usage_max = max(self.kv_usage_max, kv)
        if iteration_stats is not None:
            t["prompt_tokens"] += int(getattr(iteration_stats, "num_prompt_tokens", 0) or 0)
            t["output_tokens"] += int(getattr(iteration_stats, "num_generation_tokens", 0) or 0)

    def reading(self) -> dict[str, Any]:
        return {
            **self.totals,
            "t": time.time(),
            "max_num_seqs": self.max_num_seqs,
            "kv_usage_max": self.kv_usage_max,
        }


def window(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any] | None:
    """The load between two readings of one engine: steps, mean requests running and waiting per step,
    the share of steps that were full (running = max_num_seqs) and of steps with free seats and nothing
    waiting, tokens, and the KV cache's mean use (its peak only since the engine started: a maximum of
    running totals cannot be split at a reading). None if either reading is missing or nothing ran."""
    if not a or not b:
        return None
    d = {k: b[k] - a[k] for k in FIELDS}
    steps = d["steps"]
    if steps <= 0:
        return None
    wall = b["t"] - a["t"]
    return {
        "window_s": round(wall, 2),
        "steps": steps,
        "steps_per_s": round(steps / wall, 1) if wall > 0 else None,
        "max_num_seqs": b["max_num_seqs"],
        "running_mean": round(d["running"] / steps, 2),
        "waiting_mean": round(d["waiting"] / steps, 2),
        "full_steps_pct": round(100 * d["full_steps"] / steps, 1),
        "starved_steps_pct": round(100 * d["starved_steps"] / steps, 1),
        "prompt_tokens": d["prompt_tokens"],
        "output_tokens": d["output_tokens"],
        "kv_usage_mean": round(d["kv_usage"] / steps, 4),  # KV cache in use per step, in the window
        "kv_usage_max_since_start": round(b["kv_usage_max"], 4),  # a peak cannot be differenced
    }
