"""How the ingress reaches an engine: through a Serve handle (split layout) or in-process (colocated).

`HandleEngine` wraps the Engine deployment's handle: every call goes through Serve's router, a streamed
generate is one streaming handle call whose items are the replica's deltas, and closing or cancelling
a call cancels it in the replica (which aborts the vLLM request). `LocalEngine` wraps an
`EngineReplica` in the same process (layout `colocated`: the Engine deployment is itself the FastAPI
ingress), so tokens never cross a process boundary before the HTTP response. Both offer the same
async methods, so the routes (ingress.py) don't know which layout runs. No HTTP and no Serve options.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, Protocol

from turbo_batch.serve.replica import ONLINE_PRIORITY


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
        gen = self._stream.generate.remote(
            ids, params, rid, stream=stream, priority=ONLINE_PRIORITY, trace=trace
        )
        try:
            async for item in gen:
                yield item
        finally:  # closed early (disconnect, error): cancel the call, the replica aborts the request
            gen.cancel()


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
