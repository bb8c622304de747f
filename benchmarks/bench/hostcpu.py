"""Host CPU by process role while one process tree works (issue 11 point 4: where host CPU goes).

`HostCpu(root_pid)` polls the tree under `root_pid` (the `turbo-batch run` process: a local Ray
cluster's raylet, GCS and workers are its descendants, vLLM's engine core a child of its engine actor)
every `every` seconds from a thread: each process's user + system CPU seconds (/proc/<pid>/stat) and its
title (/proc/<pid>/cmdline, which Ray sets to `ray::<task or actor.method>` while a worker runs one).
`between(t0, t1)` splits the CPU used in [t0, t1] (time.time()) by role and by title, each interval
between two samples of a process going to the title seen at its end, cut in proportion at t0 and t1.

Roles: `engine` (the engine actor `ray::Engine*`, vLLM's `VLLM::EngineCore`/workers, Serve replicas),
`driver` (the root: read/order/render scheduling by Ray Data's executor, dispatch, parse, commit),
`ray_tasks` (other `ray::` workers: read, order keys, render, write tasks), `ray_system` (raylet, GCS,
dashboard, agents, monitors). A process is seen within `every` s of its start; the CPU it uses in its
last `every` s before it exits is lost (both small against a window of tens of seconds).

Every vLLM engine core in the tree also goes to a `CoreProbe` (coreprobe.py: its environment, its
threads' CPU, py-spy if asked for), whose window summary `between()` returns as `engine_core`.

Owns the sampling and the split; it must not stop or signal any process (py-spy, started by the
probe only when asked for, reads the engine core without pausing it).
"""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from pyspy import stat_cpu_s  # benchmarks/pyspy.py (benchmarks/ is on sys.path wherever bench is)

from .coreprobe import CoreProbe

Tree = dict[int, tuple[float, str]]  # pid → (CPU seconds so far, title), for the processes under the root
ENGINE_MARKS = ("ray::Engine", "VLLM::", "EngineCore", "ServeReplica", "EngineReplica")


def _proc(pid: int) -> tuple[int, float, str] | None:
    """(ppid, cpu seconds, title) of a live process, None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        title = (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        )
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1]), stat_cpu_s(stat), title


def _runq_wait_s(pid: int) -> float | None:
    """Seconds the process's main thread has waited on a run queue (/proc/<pid>/schedstat, field 2)."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


def role(title: str, is_root: bool) -> str:
    if is_root:
        return "driver"
    if any(m in title for m in ENGINE_MARKS):
        return "engine"
    if title.startswith("ray::"):
        return "ray_tasks"
    return "ray_system"


def short_title(title: str) -> str:
    """A worker's task as Ray titles it (`ray::MapBatches(render)`), else the program: its `-m` module
    or the first argument that is not an interpreter or a flag."""
    if title.startswith("ray::"):
        return title.split()[0][:80]
    parts = title.split()
    for i, part in enumerate(parts):
        if part == "-m" and i + 1 < len(parts):
            return parts[i + 1][:80]
        name = Path(part).name
        if name and not name.startswith(("python", "-")):
            return name[:80]
    return title[:80]


def excl_engine_per_1k(split: dict[str, dict[str, float]], rows: int) -> float:
    """CPU-s per 1,000 rows outside the engines of a `between()` split (= cores per 1,000 rows/s;
    issue 11 point 4's bar: <= 1)."""
    return round(1000 * sum(v for k, v in split["by_role"].items() if k != "engine") / rows, 3)


def timed_window(out_dir: Path, wall_s: float) -> tuple[float, float]:
    """A finished `turbo-batch run`'s timed window in time.time(): engines ready -> last commit (the
    manifest's last write), `wall_s` being its _summary.json wall_s."""
    from turbo_batch.batch.write import MANIFEST

    last_commit = (out_dir / MANIFEST).stat().st_mtime
    return last_commit - wall_s, last_commit


class HostCpu:
    def __init__(
        self,
        root_pid: int,
        every: float = 0.25,
        on_sample: Callable[[Tree], None] | None = None,
        workdir: Path | None = None,
    ):
        """`on_sample(tree)`, if given, sees each poll's {pid: (cpu s, title)} (from the polling thread);
        vLLM engine cores get a CoreProbe (coreprobe.py: py-spy files, if asked for, go to `workdir`)."""
        self.root, self.every, self.on_sample = root_pid, every, on_sample
        self.core = CoreProbe(workdir)
        self.samples: dict[int, list[tuple[float, float, str]]] = defaultdict(list)
        # vLLM engine cores: (t, seconds waited on a run queue so far)
        self.waits: dict[int, list[tuple[float, float]]] = defaultdict(list)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="hostcpu", daemon=True)

    def start(self) -> HostCpu:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.core.stop()

    def _tree(self) -> Tree:
        procs = {}
        for name in os.listdir("/proc"):
            if name.isdigit() and (p := _proc(int(name))):
                procs[int(name)] = p
        kids: dict[int, list[int]] = defaultdict(list)
        for pid, (ppid, _, _) in procs.items():
            kids[ppid].append(pid)
        out, todo = {}, [self.root]
        while todo:
            pid = todo.pop()
            if pid in procs:
                out[pid] = procs[pid][1:]
                todo += kids.get(pid, [])
        return out

    def sample(self) -> None:
        now, tree = time.time(), self._tree()
        for pid, (cpu, title) in tree.items():
            self.samples[pid].append((now, cpu, title))
            if "EngineCore" in title and (w := _runq_wait_s(pid)) is not None:
                self.waits[pid].append((now, w))
        self.core.on_sample(tree)
        if self.on_sample is not None:
            self.on_sample(tree)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.every)

    def between(self, t0: float, t1: float) -> dict[str, dict[str, float]]:
        """{"by_role": {role: cpu s}, "by_title": {title: cpu s}} for the CPU used in [t0, t1]. A process
        that is ever an engine counts as one all its life (vLLM's engine core runs as `python -c from
        multiprocessing.spawn ...` until it names itself)."""
        by_role: dict[str, float] = defaultdict(float)
        by_title: dict[str, float] = defaultdict(float)
        for pid, ss in self.samples.items():
            engine = next((x for _, _, x in ss if role(x, pid == self.root) == "engine"), None)
            prev_t, prev_c = ss[0][0] - self.every, 0.0  # seen within `every` of its start, at 0 s then
            if pid == self.root or ss[0][1] > self.every:  # older than the polling: its history is unknown
                prev_t, prev_c = ss[0][0], ss[0][1]
            for t, c, title in ss:
                used, span = c - prev_c, t - prev_t
                lo, hi = max(prev_t, t0), min(t, t1)
                if used > 0 and hi > lo and span > 0:
                    part = used * (hi - lo) / span
                    by_role["engine" if engine else role(title, pid == self.root)] += part
                    by_title[short_title(engine or title)] += part
                prev_t, prev_c = t, c
        top = dict(sorted(by_title.items(), key=lambda kv: -kv[1])[:12])
        # vLLM's engine core loop: seconds its main thread was ready to run but waited for a CPU (other
        # processes on its core); where a step is CPU-bound (short decode steps) this is lost time
        waits = [[w for t, w in ws if t0 <= t <= t1] for ws in self.waits.values()]
        wait = sum(w[-1] - w[0] for w in waits if len(w) > 1)
        return {
            "by_role": {k: round(v, 2) for k, v in sorted(by_role.items())},
            "by_title": {k: round(v, 2) for k, v in top.items()},
            "engine_core_runqueue_wait_s": round(wait, 3) if any(len(w) > 1 for w in waits) else None,
            "engine_core": self.core.between(t0, t1),
        }
