"""Pool: the engines a batch job dispatches to, as `Slot`s behind one `Pool` protocol.

Owns: `Slot` (one engine as the dispatcher sees it: an async call, its info, capacity and load),
the `Pool` protocol, `EnginePool` (engine actors owned by the job, or detached ones reused across
jobs), `ServePool` (the Engine deployment of a running `turbo-batch serve` app) and
`is_engine_loss()`. A slot's call that is cancelled cancels the engine's work too (Ray cancels the
actor task, Serve the request), so the engine aborts those rows' vLLM requests. Must not touch: what
rows go where (driver.py, tail.py), rendering, the output dir.
Payloads crossing Ray here are plain dicts of one documented shape: rows `{row_id, prompt_ids,
label_ids}` in (prompt_ids an int32 numpy array or a list of ints; label_ids a list or None), result
rows (`Engine.run_rows`) out.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from turbo_batch.engine.profiles import GPU_TYPES, node_resource
from turbo_batch.errors import EngineStartError, JobError
from turbo_batch.paths import same_path
from turbo_batch.runtime import ENGINE_ENV
from turbo_batch.serve.spec import ENGINE_DEPLOYMENT
from turbo_batch.spec import ClassifyTask, JobSpec

log = logging.getLogger("turbo_batch")
BACKPRESSURE_WAIT_S = 600.0  # give up on a Serve call that keeps being refused (the rows are redone)

EngineCall = Callable[..., Awaitable[list[dict[str, Any]]]]  # (rows, task, sampling, priority, tag)


@dataclass
class Slot:
    """One engine as the dispatcher sees it."""

    name: str
    call: EngineCall
    info: dict[str, Any]
    capacity: int
    inflight: int = 0
    done: int = 0
    reserved: bool = False  # running quarantined rows alone
    ping: Callable[[], Awaitable[dict[str, Any]]] | None = None  # returns once the engine answers again
    down: bool = False  # lost; waiting for Ray to restart it
    load: Callable[[], Awaitable[dict[str, Any]]] | None = None  # a reading of the scheduler's load

    @property
    def max_model_len(self) -> int:
        return int(self.info.get("max_model_len") or 0)


# Rows kept in one engine at once, per vLLM sequence slot, where cluster.rows_in_flight is not set: a
# full batch running and as many waiting, so a finished request is replaced without a round trip.
IN_FLIGHT_PER_SEQ = 2


def rows_in_flight(job: JobSpec, max_num_seqs: int) -> int:
    return job.cluster.rows_in_flight or IN_FLIGHT_PER_SEQ * max_num_seqs


class Pool(Protocol):
    """What the driver needs of a set of engines."""

    slots: list[Slot]
    start_s: float

    async def close(self, force: bool = False) -> None: ...


def engine_actor_options(
    job: JobSpec, index: int, use_gpu: bool, gpu_type: str | None = None
) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "num_cpus": job.cluster.engine_cpus,
        "num_gpus": 1 if use_gpu else 0,
        "max_restarts": -1,
        "max_task_retries": 0,
        "max_concurrency": 1000,
        "scheduling_strategy": "SPREAD",
        "runtime_env": {"env_vars": dict(ENGINE_ENV)},
    }
    resources = dict(job.cluster.engine_resources)
    if gpu_type:  # one unit of the node's `gpu-<type>` resource: the engine lands on a GPU of that type
        resources[node_resource(gpu_type)] = max(resources.get(node_resource(gpu_type), 0.0), 1.0)
    if resources:
        opts["resources"] = resources
    if job.cluster.reuse_engines:
        key = hashlib.sha256(repr((job.model.model_dump(mode="json"), max_labels(job))).encode()).hexdigest()[
            :10
        ]
        opts.update(
            name=f"tb-engine-{key}-{gpu_type or 'any'}-{index}",
            namespace="turbo-batch",
            lifetime="detached",
            get_if_exists=True,
        )
    return opts


def gpu_slots(job: JobSpec, total: dict[str, float]) -> list[str | None]:
    """One entry per engine to start: the GPU type of the labelled slot it takes, or None (unlabelled:
    the engine goes wherever Ray puts it and its own device decides its settings).

    Nodes of a mixed cluster offer `gpu-<type>` resources, one unit per GPU (cluster files,
    `python -m turbo_batch.engine.profiles`). `engines: auto` starts one engine per labelled unit, plus
    one per unlabelled GPU; `engines: N` takes N of them, round-robin over the types so a small N still
    sees every type; `engine_resources: {gpu-b200: 1}` keeps every engine on that type."""
    labelled = {t: int(total.get(node_resource(t), 0)) for t in (*GPU_TYPES, "cpu")}
    labelled = {t: n for t, n in labelled.items() if n > 0}
    pinned = [t for t in labelled if node_resource(t) in job.cluster.engine_resources]
    if pinned:
        labelled = {t: labelled[t] for t in pinned}
    elif job.cluster.engine_resources:  # pinned to something else: the job's own placement, no labels
        labelled = {}
    units: list[str | None] = []
    queues = {t: n for t, n in labelled.items()}
    while any(queues.values()):  # round-robin: rtx-5090, b200, rtx-5090, b200, ...
        for t in list(queues):
            if queues[t]:
                units.append(t)
                queues[t] -= 1
    gpus = int(total.get("GPU", 0))
    if not pinned:
        units += [None] * max(gpus - len(units), 0)
    if job.cluster.engines == "auto":
        return units or [None]
    count = int(job.cluster.engines)
    return (units + [None] * count)[:count]


ENGINE_START_S = 1800.0  # placement + model load; a 31B checkpoint on a cold disk takes minutes


def engine_needs(job: JobSpec, use_gpu: bool) -> dict[str, float]:
    return {"CPU": job.cluster.engine_cpus, "GPU": 1.0 if use_gpu else 0.0, **job.cluster.engine_resources}


def check_capacity(job: JobSpec, count: int, use_gpu: bool, total: dict[str, float]) -> None:
    """Refuse at once when the whole cluster has fewer resources than `count` engines need."""
    short = [
        f"{count} x {need:g} {name} > {total.get(name, 0):g} in the cluster"
        for name, need in engine_needs(job, use_gpu).items()
        if need and count * need > total.get(name, 0) + 1e-9
    ]
    if short:
        raise EngineStartError(
            f"the cluster cannot host {count} engine(s): {'; '.join(short)} (cluster.engines, "
            "cluster.engine_cpus, cluster.engine_resources)"
        )


def max_labels(job: JobSpec) -> int:
    return len(job.task.labels) if isinstance(job.task, ClassifyTask) else 0


class EnginePool:
    """Engine actors owned by a job (or reused across jobs with cluster.reuse_engines)."""

    def __init__(self, slots: list[Slot], actors: list[Any], owned: bool):
        self.slots = slots
        self.actors = actors
        self.owned = owned
        self.start_s = 0.0

    @classmethod
    async def start(cls, job: JobSpec) -> EnginePool:
        import ray

        from turbo_batch.engine.engine import Engine

        total = ray.cluster_resources()
        types = gpu_slots(job, total)
        count = len(types)
        use_gpu = int(total.get("GPU", 0)) > 0
        check_capacity(job, count, use_gpu, total)
        actor_cls = ray.remote(Engine)
        t0 = time.monotonic()
        actors = [
            actor_cls.options(**engine_actor_options(job, i, use_gpu, t)).remote(
                job.model.model_dump(mode="json"), max_labels=max_labels(job), gpu_type=t
            )
            for i, t in enumerate(types)
        ]
        try:  # an engine Ray cannot place waits forever: bound it (env TURBO_BATCH_ENGINE_START_S)
            infos = await asyncio.wait_for(
                asyncio.gather(*(a.info.remote() for a in actors)),
                timeout=float(os.environ.get("TURBO_BATCH_ENGINE_START_S", ENGINE_START_S)),
            )
        except TimeoutError:
            for a in actors:
                ray.kill(a)
            raise EngineStartError(
                f"{count} engine(s) did not start within {ENGINE_START_S:.0f} s: the cluster may not have the "
                f"resources for them (each needs {engine_needs(job, use_gpu)})"
            ) from None
        pool = cls([], actors, owned=not job.cluster.reuse_engines)
        failed = [i for i in infos if i["error"]]
        if failed:
            await pool.close(force=True)
            raise EngineStartError(failed[0]["error"])
        await asyncio.gather(*(a.warmup.remote() for a in actors))
        infos = await asyncio.gather(*(a.info.remote() for a in actors))
        pool.start_s = time.monotonic() - t0
        for i, (actor, info, t) in enumerate(zip(actors, infos, types, strict=True)):
            cap = rows_in_flight(job, int(info.get("max_num_seqs") or 64))
            name = f"engine-{i}-{t}" if t else f"engine-{i}"
            pool.slots.append(
                Slot(name, _actor_call(actor), info, cap, ping=_actor_ping(actor), load=_remote_load(actor))
            )
        return pool

    async def close(self, force: bool = False) -> None:
        if not self.owned and not force:
            return
        import ray

        for a in self.actors:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(a.shutdown.remote(), timeout=30)
            ray.kill(a, no_restart=True)


def _actor_call(actor: Any) -> EngineCall:
    async def call(rows, task, sampling, priority, tag):
        ref = actor.run_rows.remote(rows, task, sampling, priority=priority, tag=tag)
        try:
            return await ref
        except asyncio.CancelledError:  # a backup copy lost its race: stop the engine's work too
            _cancel(ref)
            raise

    return call


def _cancel(ref: Any) -> None:
    """Cancel an engine actor's task: the engine is an async actor, so Ray cancels the asyncio task
    of `run_rows`, whose rows abort their vLLM requests (engine.py)."""
    import ray

    with contextlib.suppress(Exception):  # it may have finished meanwhile: nothing to cancel
        ray.cancel(ref)


def _actor_ping(actor: Any) -> Callable[[], Awaitable[dict[str, Any]]]:
    async def ping():  # only after a loss: the actor Ray restarted is a fresh engine
        info = await actor.info.remote()
        if info.get("error"):
            raise EngineStartError(f"a restarted engine failed to start: {info['error']}")
        await actor.warmup.remote()
        return await actor.info.remote()

    return ping


def _remote_load(remote: Any) -> Callable[[], Awaitable[dict[str, Any]]]:
    """An engine's load reading through its actor handle or its Serve deployment handle."""

    async def load():  # looked up per call: a reused engine started by an older turbo-batch has none
        return await remote.load.remote()

    return load


def is_engine_loss(e: BaseException) -> bool:
    import ray.exceptions as rex

    lost = (rex.RayActorError, rex.ActorUnavailableError, rex.WorkerCrashedError, rex.NodeDiedError)
    if isinstance(e, lost):
        return True
    try:  # Serve: a replica that died mid-request
        from ray.serve.exceptions import BackPressureError, RequestCancelledError

        return isinstance(e, BackPressureError | RequestCancelledError)
    except ImportError:
        return False


# ------------------------------------------------------------------------ engines of a Serve app


class ServePool:
    """A handle to the Engine deployment of a running Serve app, as the batch driver's pool."""

    def __init__(self, app: str, handle: Any, slots: list[Slot]):
        self.app = app
        self.handle = handle
        self.slots = slots
        self.start_s = 0.0

    @classmethod
    async def connect(cls, job: JobSpec) -> ServePool:
        from ray import serve

        app = job.cluster.serve_app
        status = await asyncio.to_thread(serve.status)
        state = status.applications.get(app)
        if state is None:
            raise JobError(
                f"no Serve app named {app!r} is running on this Ray cluster: start it with `turbo-batch serve "
                "<serve.yaml>` and point cluster.address at its cluster (e.g. auto)"
            )
        if not str(state.status).endswith("RUNNING"):
            raise JobError(
                f"Serve app {app!r} is {state.status}, not RUNNING: {state.message or 'see serve status'}"
            )
        dep = state.deployments.get(ENGINE_DEPLOYMENT)
        if dep is None:
            raise JobError(
                f"Serve app {app!r} has no {ENGINE_DEPLOYMENT} deployment: not a turbo-batch serve app"
            )
        replicas = max(int(sum(n for s, n in dep.replica_states.items() if str(s).endswith("RUNNING"))), 1)
        handle = serve.get_deployment_handle(ENGINE_DEPLOYMENT, app_name=app)
        info = await handle.info.remote()
        _check_model(job, info, app)
        per_replica = rows_in_flight(job, int(info.get("max_num_seqs") or 64))
        info = {**info, "serve_app": app, "replicas": replicas}
        # A handle call lands on any replica: a load reading describes the app's engine only when it has one.
        load = _remote_load(handle) if replicas == 1 else None
        slot = Slot(f"serve:{app}", _serve_call(handle), info, capacity=replicas * per_replica, load=load)
        return cls(app, handle, [slot])

    async def close(self, force: bool = False) -> None:
        """Nothing to stop: the engines belong to the Serve app."""


def _check_model(job: JobSpec, info: dict[str, Any], app: str) -> None:
    # Rows are tokenized with the job's tokenizer: another model's engine would read garbage.
    if not same_path(job.model.path, info.get("model")):
        raise JobError(
            f"model.path {job.model.path!r} differs from the model of Serve app {app!r} ({info.get('model')!r})"
        )


def _serve_call(handle: Any) -> EngineCall:
    from ray.serve.exceptions import BackPressureError

    async def call(rows, task, sampling, priority, tag):
        delay, waited = 0.2, 0.0
        while True:
            response = handle.run_rows.remote(rows, task, sampling, priority=priority, tag=tag)
            try:
                return await response
            except asyncio.CancelledError:  # awaiting stops; cancel() stops the replica's work too
                response.cancel()
                raise
            except BackPressureError:
                if waited >= BACKPRESSURE_WAIT_S:
                    raise
                await asyncio.sleep(delay)
                waited += delay
                delay = min(delay * 2, 5.0)

    return call
