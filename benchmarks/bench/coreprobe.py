"""vLLM's engine-core process under a benchmark: what its threads did in a timed window, what it was
started with, and (opt-in) where its Python time went.

Why: on the H200 the 1.2B stand-in's decode steps are CPU-bound (GPU ~50% busy) and turbo-batch's
engine core made fewer steps per second than raw vLLM's at the same load (87 vs 95, 2026-12-01c).
The same vLLM runs in both; what differs is how the process was started (a Ray actor's spawned child
vs a plain process's child) and what it is fed. This probe records, for every `VLLM::EngineCore`
process that `HostCpu` sees:
- `facts` once: thread-count settings and other environment variables that change CPU code paths
  (OMP/MKL threads, malloc, CUDA, vLLM and torch switches; no RAY_ variables, which can hold tokens),
  CPU affinity, niceness, scheduling policy;
- each thread's CPU seconds (/proc/<pid>/task), so `between(t0, t1)` tells the main loop's CPU from
  the input and output threads' (tid == pid is the main thread);
- with `BENCH_CORE_PYSPY=<seconds per segment>`: back-to-back `py-spy record --threads` segments
  (benchmarks/pyspy.py), of which `between` merges those inside the window into top frames.

Owns nothing but its own files under `workdir`; it never signals or slows the engine (py-spy runs
--nonblocking).
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from pyspy import Recording, summary, thread_cpu_by_tid  # benchmarks/pyspy.py

ENV_KEYS = re.compile(
    r"^(OMP_|MKL_|OPENBLAS_|GOTO|MALLOC_|LD_PRELOAD|PYTHONMALLOC|PYTHONOPTIMIZE|CUDA_|NCCL_|"
    r"PYTORCH_|TORCH|VLLM_|TOKENIZERS_|TRITON_)"
)


def core_facts(pid: int) -> dict[str, Any]:
    """The settings of a running engine core that can change its CPU cost per step."""
    facts: dict[str, Any] = {"pid": pid}
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        pairs = (e.decode(errors="replace").partition("=") for e in env if e)
        facts["env"] = {k: v[:200] for k, _, v in sorted(pairs) if ENV_KEYS.match(k)}
    except OSError as e:
        facts["env_error"] = str(e)
    with contextlib.suppress(OSError):
        facts["cpus_allowed"] = len(os.sched_getaffinity(pid))
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        facts["nice"], facts["threads"] = int(fields[16]), int(fields[17])
        facts["policy"] = int(fields[38])
    except (OSError, ValueError, IndexError):
        pass
    return facts


class CoreProbe:
    def __init__(self, workdir: Path | None = None, segment_s: int | None = None):
        seg = segment_s if segment_s is not None else int(os.environ.get("BENCH_CORE_PYSPY", "0") or 0)
        self.segment_s = seg if seg > 0 and workdir is not None else 0
        self.workdir = workdir
        self.facts: dict[int, dict[str, Any]] = {}
        self.samples: dict[int, list[tuple[float, dict[int, tuple[str, float]]]]] = defaultdict(list)
        self.segments: dict[int, list[tuple[float, float, Path, int]]] = defaultdict(list)
        self.pyspy_error: dict[int, str] = {}  # asked for py-spy, got none: why (e.g. "no py-spy binary")
        self._stop = threading.Event()
        self._profilers: list[threading.Thread] = []

    def on_sample(self, tree: dict[int, tuple[float, str]]) -> None:
        """HostCpu's per-poll hook: thread CPU of every engine core in the tree."""
        now = time.time()
        for pid, (_, title) in tree.items():
            if "EngineCore" not in title:
                continue
            if pid not in self.facts:
                self.facts[pid] = core_facts(pid)
                if self.segment_s:
                    t = threading.Thread(target=self._profile, args=(pid,), name="coreprobe", daemon=True)
                    t.start()
                    self._profilers.append(t)
            self.samples[pid].append((now, thread_cpu_by_tid(pid)))

    def _profile(self, pid: int) -> None:
        assert self.workdir is not None
        k = 0
        while not self._stop.is_set() and Path(f"/proc/{pid}").exists():
            out = self.workdir / f"pyspy-core-{pid}-{k}.txt"
            t0 = time.time()
            rec = Recording.start(pid, self.segment_s, out, rate=100)
            if rec.proc is None:
                self.pyspy_error[pid] = rec.error or "py-spy did not start"
                return
            rec.proc.wait()
            self.segments[pid].append((t0, time.time(), out, self.segment_s * 100))
            k += 1

    def stop(self) -> None:
        self._stop.set()
        for t in self._profilers:
            t.join(timeout=self.segment_s + 15)

    def between(self, t0: float, t1: float) -> dict[str, Any] | None:
        """Per engine core: facts, each thread's CPU seconds in [t0, t1] (main = tid == pid), and the
        py-spy segments that lie inside the window merged (None where no core was seen)."""
        cores = []
        for pid, ss in self.samples.items():
            inside = [(t, th) for t, th in ss if t0 <= t <= t1]
            if len(inside) < 2:
                continue
            ta, tb = inside[0][0], inside[-1][0]
            first: dict[int, tuple[str, float]] = {}
            last: dict[int, tuple[str, float]] = {}  # a thread that ended in the window: its last sample
            for _, th in inside:
                for tid, v in th.items():
                    first.setdefault(tid, v)
                    last[tid] = v
            used = {
                ("main" if tid == pid else f"{comm}:{tid}"): round(cpu - first[tid][1], 2)
                for tid, (comm, cpu) in last.items()
                if cpu - first[tid][1] > 0.05
            }
            core: dict[str, Any] = {
                **self.facts.get(pid, {}),
                "span_s": round(tb - ta, 2),
                "thread_cpu_s": dict(sorted(used.items(), key=lambda kv: -kv[1])[:8]),
            }
            segs = [s for s in self.segments.get(pid, []) if s[0] >= t0 and s[1] <= t1]
            if segs:
                merged = segs[0][2].with_name(f"pyspy-core-{pid}-window.txt")
                merged.write_text("".join(p.read_text(errors="replace") for _, _, p, _ in segs if p.exists()))
                core["pyspy"] = {
                    "segments": len(segs),
                    "seconds": round(sum(e - s for s, e, _, _ in segs), 1),
                    **summary(merged, top=20, ticks=sum(n for *_, n in segs)),
                }
            elif pid in self.pyspy_error:  # asked for a profile: say why there is none
                core["pyspy"] = {"error": self.pyspy_error[pid]}
            cores.append(core)
        return {"cores": cores} if cores else None
