"""Timeline: the time series a job's report draws, recorded while the job runs.

Owns `_timeline.jsonl` in the output dir. Two kinds of lines, both appended (never rewritten), so a
resumed run adds to what earlier runs recorded:
    {"kind": "start", "run": 2, "t": <unix s>, "engine_start_s": 41.2, "engines": [{"name", "gpu", ...}]}
    {"kind": "rows", "run": 2, "t": <bucket start, unix s>, "w": <bucket width s>, "engine": "engine-0",
     "rows": 96, "errors": 0, "prompt_tokens": 11520, "output_tokens": 96}
Rows are counted when an engine returns them; a bucket is written after the first commit that follows
its end (and the last one when the run ends), so a crash loses at most one bucket of counts. Size is bounded: buckets start
at 1 s and double in width each time another `LINES_PER_WIDTH` lines were written, so a day-long job
writes a few thousand lines. Must not touch: parts, the manifest or the commit protocol (write.py).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

TIMELINE = "_timeline.jsonl"
LINES_PER_WIDTH = 600
NO_ENGINE = "none"  # rows that never reached an engine (render errors, too long for every engine)


class Timeline:
    def __init__(self, out_dir: Path | str, run: int):
        self.path = Path(out_dir) / TIMELINE
        self.run = run
        self.lines = 0
        if self.path.is_file():
            with open(self.path, "rb") as fh:
                self.lines = sum(1 for _ in fh)
        self.width = 1.0
        self._grow()
        self.pending: dict[tuple[float, str], list[int]] = {}

    def _grow(self) -> None:
        while self.lines >= LINES_PER_WIDTH * (math.log2(self.width) + 1):
            self.width *= 2

    def _append(self, lines: Sequence[Mapping[str, Any]]) -> None:
        if not lines:
            return
        data = "".join(json.dumps(x, separators=(",", ":")) + "\n" for x in lines).encode()
        try:
            with open(self.path, "ab") as fh:
                fh.write(data)
        except OSError:  # the timeline is for pictures: a full disk fails the commit, not this
            return
        self.lines += len(lines)
        self._grow()

    def start(self, engine_start_s: float, engines: Iterable[Mapping[str, Any]]) -> None:
        """One line when a run's engines are ready (the report's cost of engine start and GPU types)."""
        self._append(
            [
                {
                    "kind": "start",
                    "run": self.run,
                    "t": round(time.time(), 3),
                    "engine_start_s": round(engine_start_s, 3),
                    "engines": [dict(e) for e in engines],
                }
            ]
        )

    def observe(self, results: Iterable[Mapping[str, Any]]) -> None:
        """Count result rows into the current bucket of their engine."""
        now = time.time()
        bucket = math.floor(now / self.width) * self.width
        for r in results:
            acc = self.pending.setdefault((bucket, r.get("engine") or NO_ENGINE), [0, 0, 0, 0])
            acc[0] += 1
            acc[1] += 1 if r.get("error_code") else 0
            acc[2] += int(r.get("prompt_tokens") or 0)
            acc[3] += int(r.get("output_tokens") or 0)

    def flush(self, final: bool = False) -> None:
        """Append the finished buckets counted so far (called right after each commit); `final` also
        appends the bucket still filling (at the end of a run)."""
        now = time.time()
        done = {k: v for k, v in self.pending.items() if final or k[0] + self.width <= now}
        self.pending = {k: v for k, v in self.pending.items() if k not in done}
        self._append(
            [
                {
                    "kind": "rows",
                    "run": self.run,
                    "t": t,
                    "w": self.width,
                    "engine": eng,
                    "rows": n,
                    "errors": err,
                    "prompt_tokens": pt,
                    "output_tokens": ot,
                }
                for (t, eng), (n, err, pt, ot) in sorted(done.items())
            ]
        )


def read_timeline(out_dir: Path | str) -> list[dict[str, Any]]:
    """Every readable line of an output dir's timeline (a torn last line from a crash is skipped)."""
    path = Path(out_dir) / TIMELINE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and obj.get("kind") in ("start", "rows"):
            out.append(obj)
    return out
