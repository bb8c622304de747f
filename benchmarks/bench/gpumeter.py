"""The GPU's own pace while a variant runs: SM clock, power, temperature and throttle reasons.

One `nvidia-smi --query-gpu ... -lms` process samples the bench's GPU (the first of
CUDA_VISIBLE_DEVICES) for the whole bench; `between(t0, t1)` (time.time()) summarises the samples in a
variant's timed window. On 2026-12-01 raw vLLM's rate moved 14% between two identical device commands
while the GPU sat at its software power cap: variants that run one after the other can meet a
different GPU, and these samples show whether they did. Owns the sampling process only; without
nvidia-smi (CPU runs) it is a no-op and `between` returns None.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from typing import Any

QUERY = "clocks.sm,power.draw,temperature.gpu,utilization.gpu,clocks_event_reasons.active"
SW_POWER_CAP = 0x4  # nvidia-smi's clocks_event_reasons bits
THERMAL = 0x20 | 0x40  # SW thermal slowdown, HW thermal slowdown
HW_SLOWDOWN = 0x8 | 0x80  # HW slowdown, HW power brake


def _gpu_index() -> str:
    first = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0].strip()
    return first or "0"


def parse_line(line: str) -> tuple[float, float, float, float, int] | None:
    """(sm MHz, power W, temperature C, utilization %, throttle bits) of one sample, None if unreadable."""
    parts = [p.strip() for p in line.split(",")]
    if len(parts) != 5:
        return None
    try:
        return float(parts[0]), float(parts[1]), float(parts[2]), float(parts[3]), int(parts[4], 16)
    except ValueError:  # "[N/A]" and the like
        return None


def summarise(samples: list[tuple[float, tuple[float, float, float, float, int]]]) -> dict[str, Any] | None:
    if not samples:
        return None
    vals = [v for _, v in samples]
    n = len(vals)

    def share(bits: int) -> float:
        return round(100 * sum(1 for v in vals if v[4] & bits) / n, 1)

    return {
        "samples": n,
        "sm_mhz_mean": round(sum(v[0] for v in vals) / n),
        "sm_mhz_min": round(min(v[0] for v in vals)),
        "power_w_mean": round(sum(v[1] for v in vals) / n, 1),
        "temp_c_mean": round(sum(v[2] for v in vals) / n, 1),
        "temp_c_max": round(max(v[2] for v in vals)),
        "util_pct_mean": round(sum(v[3] for v in vals) / n, 1),
        "power_capped_pct": share(SW_POWER_CAP),
        "thermal_pct": share(THERMAL),
        "hw_slowdown_pct": share(HW_SLOWDOWN),
    }


class GpuMeter:
    def __init__(self, every_ms: int = 500):
        self.every_ms = every_ms
        self.samples: list[tuple[float, tuple[float, float, float, float, int]]] = []
        self.proc: subprocess.Popen | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> GpuMeter:
        exe = shutil.which("nvidia-smi")
        if exe is None:
            return self
        cmd = [exe, "-i", _gpu_index(), f"--query-gpu={QUERY}", "--format=csv,noheader,nounits",
               f"--loop-ms={self.every_ms}"]  # fmt: skip
        try:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            return self
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            v = parse_line(line)
            if v is not None:
                self.samples.append((time.time(), v))

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None

    def between(self, t0: float, t1: float) -> dict[str, Any] | None:
        return summarise([s for s in list(self.samples) if t0 <= s[0] <= t1])
