"""vLLM-CPU's model worker: forked from the engine core, not spawned; on a small host, given every core.

In a Ray actor vLLM must spawn its engine-core process, and the spawn setting, inherited through the
environment, makes the engine core spawn its CPU worker too: a third interpreter that imports torch and
vLLM again (~16 s of a ~55 s engine start on a 2-core box). The engine core itself is no Ray actor and
has touched no accelerator, so forking the worker from it is vLLM's own default outside Ray. What spawn
gave the worker on CPU, OpenMP's thread count and cores from the environment that
`OMPProcessManager.configure_omp_envs` sets around each worker's start, a forked child cannot read (its
libgomp already read its environment in the parent), so the child applies them itself: the same cores by
`sched_setaffinity`, the same count sized in the parent before the fork (the parent runs no parallel
region first, which is what makes this fork-safe for libgomp).

On x86 vLLM holds one core per worker back for the engine core's loop, which waits on the worker
rather than spinning (measured: ~0% CPU while the worker computes). On a host of at most
`SMALL_HOST_CPUS` cores that is a quarter to a half of the machine, so there the worker gets every core
(`VLLM_CPU_NUM_OF_RESERVED_CPU=0`, unless the user set it): on the 2-core box raw vLLM ran 128 short
SmolLM2 prompts in 17-20 s instead of 31 s, and the demo went 3.66 -> 6.87 rows/s (201 -> 378 prompt
tokens/s) with the same labels. vLLM logs that the reserve is below its minimum; that is this choice.

Used only on CPU devices (`profiles.engine_args` names it as `distributed_executor_backend`); GPU engines
of one GPU run vLLM's in-process executor and never reach this. Owns the worker's start method and
binding; must not change what the worker computes.
"""

from __future__ import annotations

import contextlib
import os
import re

from vllm.v1.executor.multiproc_executor import MultiprocExecutor

from turbo_batch.engine.profiles import SMALL_HOST_CPUS

_METHOD = "VLLM_WORKER_MULTIPROC_METHOD"
_RESERVED = "VLLM_CPU_NUM_OF_RESERVED_CPU"
_forking = False  # true only while this process starts its workers


def omp_cpus(env: dict[str, str]) -> set[int] | None:
    """The cores `configure_omp_envs` gave a worker, from whichever OpenMP's variables it set:
    OMP_PLACES '{0,1}', GOMP_CPU_AFFINITY '0 1' or KMP_AFFINITY '...,proclist=[0,1]'."""
    kmp = re.search(r"proclist=\[([^\]]*)\]", env.get("KMP_AFFINITY", ""))
    for value in (env.get("OMP_PLACES"), env.get("GOMP_CPU_AFFINITY"), kmp.group(1) if kmp else None):
        cpus = {int(x) for x in re.findall(r"\d+", value or "")}
        if cpus:
            return cpus
    return None


def _bind_forked_worker() -> None:
    if not _forking:
        return
    cpus = omp_cpus(dict(os.environ))
    if cpus:
        with contextlib.suppress(OSError):  # a core outside this container's set: keep the inherited mask
            os.sched_setaffinity(0, cpus)


os.register_at_fork(after_in_child=_bind_forked_worker)


class ForkedCpuExecutor(MultiprocExecutor):
    """vLLM's multiprocess executor, its workers forked (see the module docstring)."""

    def _init_executor(self) -> None:
        global _forking
        import torch

        before = os.environ.get(_METHOD)
        threads_before = torch.get_num_threads()
        os.environ[_METHOD] = "fork"
        reserve_none = _RESERVED not in os.environ and len(os.sched_getaffinity(0)) <= SMALL_HOST_CPUS
        if reserve_none:
            os.environ[_RESERVED] = "0"
        workers = self.parallel_config.world_size
        n = os.environ.get("OMP_NUM_THREADS")
        _forking = True
        try:
            if workers == 1:  # one worker: its thread count is known before configure_omp_envs runs
                cpus = _cpu_list(self.vllm_config)
                if cpus:
                    torch.set_num_threads(len(cpus))
                elif n:
                    torch.set_num_threads(int(n))
            super()._init_executor()
        finally:
            _forking = False
            if reserve_none:
                os.environ.pop(_RESERVED, None)
            torch.set_num_threads(threads_before)
            if before is None:
                os.environ.pop(_METHOD, None)
            else:
                os.environ[_METHOD] = before


def _cpu_list(vllm_config) -> list[int] | None:
    """The cores vLLM's OMP manager will give the first worker (None: no binding)."""
    from vllm.utils.ompmultiprocessing import OMPProcessManager

    mgr = OMPProcessManager(vllm_config)
    if getattr(mgr, "skip_setup", True) or not getattr(mgr, "cpu_lists", None):
        return None
    return list(mgr.cpu_lists[0])
