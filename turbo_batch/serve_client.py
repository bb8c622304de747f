"""Batch jobs on a running `turbo-batch serve` app: the engines of the Serve app as one dispatcher slot.

`ServePool.connect(job)` finds the Engine deployment of the app named `job.cluster.serve_app` on the
connected Ray cluster and returns a pool the batch driver uses like its own engine actors: one
`batch.Slot` whose calls go through a Serve handle to `run_rows`, with the job's (lower) priority, so
online requests are scheduled first and batch rows backfill. Serve balances the calls over the
replicas; the slot's capacity is replicas × rows per replica. Serve's backpressure (the engine queue
is full, e.g. during an online burst) is waited out here rather than failing rows. It does not start
or stop anything: closing the pool leaves the app running.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

from turbo_batch.batch import Slot
from turbo_batch.errors import JobError
from turbo_batch.serve import ENGINE_DEPLOYMENT

log = logging.getLogger("turbo_batch")
BACKPRESSURE_WAIT_S = 600.0  # give up on a call that Serve keeps refusing (the rows are then redone)


class ServePool:
    """A handle to the Engine deployment of a running Serve app, as the batch driver's pool."""

    def __init__(self, app: str, handle: Any, slots: list[Slot]):
        self.app = app
        self.handle = handle
        self.slots = slots
        self.start_s = 0.0

    @classmethod
    async def connect(cls, job: Any) -> ServePool:
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
        per_replica = job.cluster.rows_in_flight or 2 * int(info.get("max_num_seqs") or 64)
        info = {**info, "serve_app": app, "replicas": replicas}
        slot = Slot(f"serve:{app}", _serve_call(handle), info, capacity=replicas * per_replica)
        return cls(app, handle, [slot])

    async def close(self, force: bool = False) -> None:
        """Nothing to stop: the engines belong to the Serve app."""


def _same_model(a: str | None, b: str | None) -> bool:
    if not a or not b:
        return False
    if a == b:
        return True
    try:
        return Path(os.path.expanduser(a)).resolve() == Path(os.path.expanduser(b)).resolve()
    except OSError:
        return False


def _check_model(job: Any, info: dict[str, Any], app: str) -> None:
    # Rows are tokenized with the job's tokenizer: another model's engine would read garbage.
    if not _same_model(job.model.path, info.get("model")):
        raise JobError(
            f"model.path {job.model.path!r} differs from the model of Serve app {app!r} ({info.get('model')!r})"
        )


def _serve_call(handle: Any):
    from ray.serve.exceptions import BackPressureError

    async def call(rows, task, sampling, priority, tag):
        delay, waited = 0.2, 0.0
        while True:
            try:
                return await handle.run_rows.remote(rows, task, sampling, priority=priority, tag=tag)
            except BackPressureError:
                if waited >= BACKPRESSURE_WAIT_S:
                    raise
                await asyncio.sleep(delay)
                waited += delay
                delay = min(delay * 2, 5.0)

    return call
