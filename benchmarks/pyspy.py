"""Where a serving process spends its Python time under load: py-spy, sampled while a benchmark runs.

`Recording.start(pid, seconds, out)` runs `py-spy record --threads --format raw` on a process
(non-blocking: the process is not paused; idle threads are not sampled), and `summary(out)` reads the
collapsed stacks back into what the benchmark results keep: how busy each thread was (its samples
per sampling tick: 1.0 is a thread that never waited), and the top functions by self and by
inclusive samples. (`--gil` gave ~1 sample a second on the H200 host's Python 3.12: not used.) Used by bench_serve.py (--profile); nothing here is turbo-batch code.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(?P<fn>.*?) \((?P<file>[^():]*)(?::\d+)?\)$")


def pyspy_binary() -> str | None:
    """py-spy from $PY_SPY, PATH, beside this Python, or the GPU kit's /root/site/bin."""
    for c in (
        os.environ.get("PY_SPY"),
        shutil.which("py-spy"),
        str(Path(sys.executable).parent / "py-spy"),
        "/root/site/bin/py-spy",
    ):
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    return None


def stat_cpu_s(stat: str) -> float:
    """User + system CPU seconds from the text of a /proc .../stat file (fields after the command)."""
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds a process has used so far (/proc/<pid>/stat), None if unknown."""
    try:
        return stat_cpu_s(Path(f"/proc/{pid}/stat").read_text())
    except (OSError, ValueError, IndexError, TypeError):
        return None


def thread_cpu_by_tid(pid: int | None) -> dict[int, tuple[str, float]]:
    """Per live thread of a process (/proc/<pid>/task): its name and the CPU seconds it has used so far."""
    out: dict[int, tuple[str, float]] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except (OSError, TypeError):
        return out
    for tid in tids:
        try:
            name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            out[int(tid)] = (name, stat_cpu_s(Path(f"/proc/{pid}/task/{tid}/stat").read_text()))
        except (OSError, ValueError, IndexError):  # the thread ended
            continue
    return out


def thread_cpu(pid: int | None) -> dict[str, float]:
    """CPU seconds each thread of a process has used so far, summed by thread name."""
    out: dict[str, float] = {}
    for name, cpu in thread_cpu_by_tid(pid).values():
        out[name] = out.get(name, 0.0) + cpu
    return out


def thread_cpu_delta(before: dict[str, float], after: dict[str, float], top: int = 6) -> dict[str, float]:
    """The `top` thread names by CPU seconds used between two `thread_cpu` snapshots."""
    d = {k: round(v - before.get(k, 0.0), 2) for k, v in after.items()}
    return dict(sorted(((k, v) for k, v in d.items() if v > 0), key=lambda kv: -kv[1])[:top])


def find_pid(pattern: str) -> int | None:
    """The oldest process whose command line matches `pattern` (pgrep -f)."""
    r = subprocess.run(["pgrep", "-o", "-f", pattern], capture_output=True, text=True, check=False)
    return int(r.stdout.split()[0]) if r.stdout.split() else None


class Recording:
    def __init__(self, proc: subprocess.Popen | None, out: Path, error: str | None = None, ticks: int = 0):
        self.proc, self.out, self.error, self.ticks = proc, out, error, ticks

    @classmethod
    def start(cls, pid: int | None, seconds: int, out: Path, rate: int = 200) -> Recording:
        exe = pyspy_binary()
        if exe is None or pid is None:
            return cls(None, out, "no py-spy binary" if exe is None else "process not found")
        cmd = [exe, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", str(rate)]
        cmd += ["--threads", "--format", "raw", "--output", str(out)]
        # PY_SPY_NATIVE=1: C/Rust frames too (uvloop, tokenizers); py-spy then pauses the process per sample
        cmd += ["--native"] if os.environ.get("PY_SPY_NATIVE") == "1" else ["--nonblocking"]
        log = out.with_suffix(".log").open("w")
        return cls(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), out, ticks=seconds * rate)

    def finish(self, timeout: float = 60) -> dict[str, Any]:
        if self.proc is not None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                self.proc.wait(10)
        if self.error:
            return {"error": self.error}
        if not self.out.exists():
            log = self.out.with_suffix(".log")
            text = log.read_text(errors="replace")[-500:] if log.exists() else ""
            return {"error": f"py-spy wrote nothing: {text.strip()}"}
        return summary(self.out, ticks=self.ticks)


def _frame(text: str) -> str:
    m = _FRAME.match(text.strip())
    if not m:
        return text.strip()
    return f"{m['fn']} ({Path(m['file']).name})"


def summary(path: Path, top: int = 25, ticks: int = 0) -> dict[str, Any]:
    """Per-thread busy shares and the top frames of a `py-spy record --format raw --threads` file.
    With `ticks` (seconds × rate) a thread's share is its samples per tick, else per sample."""
    threads: Counter[str] = Counter()
    self_: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        thread, frames = frames[0], [_frame(f) for f in frames[1:]]
        total += n
        threads[re.sub(r"\s*\((?:0x[0-9a-f]+|\d+)\)", "", thread).strip() or thread] += n
        if frames:
            self_[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    per = ticks or total
    share = {k: round(v / per, 4) for k, v in threads.most_common(10)} if per else {}
    return {
        "samples": total,
        "ticks": ticks or None,
        "thread_share": share,
        "top_self": [[f, round(n / total, 4)] for f, n in self_.most_common(top)] if total else [],
        "top_inclusive": [[f, round(n / total, 4)] for f, n in incl.most_common(top)] if total else [],
    }
