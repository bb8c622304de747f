"""How the ingress reaches an engine: through a Serve handle (split layout) or in-process (colocated).

`HandleEngine` wraps the Engine deployment's handle (the split layouts): every call goes through Serve's
router; a generate is submitted by one call and its deltas come on a token channel (channel.py): one
streaming call per Engine replica for all of this ingress's streams; leaving a stream aborts it in the
replica. `LocalEngine` wraps an `EngineReplica` in the same process (layout `colocated`: the Engine
deployment is itself the FastAPI ingress), so tokens never cross a process boundary before the HTTP
response. Both offer the same async methods, so the routes (ingress.py) don't know which layout runs.
No HTTP and no Serve options.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any, Protocol

from turbo_batch.serve.channel import OPEN_TIMEOUT_S, ChannelError
from turbo_batch.serve.replica import ONLINE_PRIORITY

log = logging.getLogger("turbo_batch.serve")


class EngineClient(Protocol):
    async def info(self) -> dict[str, Any]: ...
    async def check_health(self) -> None: ...
    async def classify(self, rows: list[dict[str, Any]], task: dict[str, Any]) -> list[dict[str, Any]]: ...
    def generate(
        self, ids: list[int], params: dict[str, Any], rid: str, *, stream: bool, trace: bool = False
    ) -> AsyncIterator[dict[str, Any]]: ...


class HandleEngine:
    """The Engine deployment through a Serve DeploymentHandle (priority 0 calls)."""

    def __init__(self, handle: Any):
        self.handle = handle
        self._stream = handle.options(stream=True)
        self.id = uuid.uuid4().hex  # this ingress's channel id
        self.pending: dict[str, tuple[asyncio.Queue, str | None]] = {}  # request → (its items, replica)
        self.readers: dict[str, asyncio.Task] = {}  # replica → the task reading its channel

    async def info(self) -> dict[str, Any]:
        return await self.handle.info.remote()

    async def check_health(self) -> None:
        await self.handle.check_health.remote()

    async def classify(self, rows: list[dict[str, Any]], task: dict[str, Any]) -> list[dict[str, Any]]:
        call = self.handle.classify.remote(rows, task, ONLINE_PRIORITY)
        try:
            return await call
        except asyncio.CancelledError:  # the client went away: the replica aborts the rows
            call.cancel()
            raise

    async def generate(
        self, ids: list[int], params: dict[str, Any], rid: str, *, stream: bool, trace: bool = False
    ) -> AsyncIterator[dict[str, Any]]:
        q: asyncio.Queue = asyncio.Queue()
        self.pending[rid] = (q, None)
        replica, done = None, False
        try:
            res = await self.handle.submit.remote(self.id, ids, params, rid, stream=stream, trace=trace)
            replica = res["replica"]
            self.pending[rid] = (q, replica)
            if res["first"] is not None:
                yield res["first"]
            if not res["more"]:
                done = True
                return
            self._reader(replica)
            while True:
                item = await q.get()
                if item is None:
                    done = True
                    return
                if "error" in item:
                    done = True
                    raise ChannelError(item["error"])
                yield item
        finally:
            self.pending.pop(rid, None)
            if not done and replica is not None:  # the client left mid-stream: stop the engine's work
                self.handle.abort.remote(rid, replica=replica)

    def _reader(self, replica: str) -> None:
        task = self.readers.get(replica)
        if task is None or task.done():
            self.readers[replica] = asyncio.get_running_loop().create_task(self._read(replica))

    async def _read(self, replica: str) -> None:
        why = "closed"
        try:
            gen = self._stream.channel.remote(self.id, replica=replica).__aiter__()
            await asyncio.wait_for(gen.__anext__(), OPEN_TIMEOUT_S)  # the opening []
            async for batch in gen:
                for rid, item in batch:
                    entry = self.pending.get(rid)
                    if entry is not None:
                        entry[0].put_nowait(item)
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            why = f"{type(e).__name__}: {e}"
            log.warning("token channel to engine replica %s failed: %s", replica, why)
        finally:
            self.readers.pop(replica, None)
            for q, r in list(self.pending.values()):  # its requests cannot get more tokens
                if r == replica:
                    q.put_nowait({"error": f"the channel to engine replica {replica} {why}"})


class LocalEngine:
    """An EngineReplica in this process (the colocated layout)."""

    def __init__(self, replica: Any):
        self.replica = replica

    async def info(self) -> dict[str, Any]:
        return self.replica.info()

    async def check_health(self) -> None:
        await self.replica.check_health()

    async def classify(self, rows: list[dict[str, Any]], task: dict[str, Any]) -> list[dict[str, Any]]:
        return await self.replica.classify(rows, task, ONLINE_PRIORITY)

    async def generate(
        self, ids: list[int], params: dict[str, Any], rid: str, *, stream: bool, trace: bool = False
    ) -> AsyncIterator[dict[str, Any]]:
        gen = self.replica.generate(ids, params, rid, stream=stream, priority=ONLINE_PRIORITY, trace=trace)
        try:
            async for item in gen:
                yield item
        finally:
            await gen.aclose()
