"""Layout `colocated`: the Engine deployment is itself the FastAPI ingress (one process per engine).

`EngineApi` is an `Api` (ingress.py: the same routes, auth and limits) whose engine client is a
`LocalEngine` over an `EngineReplica` in the same process, so the tokens of a stream go from vLLM to
the HTTP response without a Serve handle hop (each hop item is a Ray object: thousands a second at
high concurrency). The deployment keeps the Engine deployment's name and handle methods (`info`,
`load`, `run_rows`, `check_health`, `reconfigure`), so batch jobs with `--via-serve` and the online-first gate
work as in the split layout. Serve's proxy routes HTTP requests to these replicas; with layout `direct`
each replica also serves the app on its own port (direct.py) and clients skip the proxy.
No Serve options here (app.py sets them); no routes here (ingress.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from turbo_batch.serve.client import LocalEngine
from turbo_batch.serve.direct import DirectServer
from turbo_batch.serve.ingress import Api
from turbo_batch.serve.replica import EngineReplica


class EngineApi(Api):
    """One engine replica plus the HTTP routes, in one Serve replica."""

    async def __init__(self, model: dict[str, Any], max_labels: int, max_online: int, config: dict[str, Any]):
        replica = EngineReplica.__new__(EngineReplica)
        await replica.__init__(model, max_labels, max_online)  # starts and warms the engine
        self.replica = replica
        Api.__init__(self, LocalEngine(replica), config)
        self.direct: DirectServer | None = None
        if config.get("direct"):  # layout direct: this replica's own HTTP server, no Serve proxy
            self.direct = await DirectServer.start(self.__serve_build_asgi_app__(), **config["direct"])

    # -- what batch jobs (ServePool), tools and Serve call on the Engine deployment ---------------------
    def info(self) -> dict[str, Any]:
        return {**self.replica.info(), "http_url": self.direct.url if self.direct else None}

    def num_unfinished(self) -> int:
        return self.replica.num_unfinished()

    def load(self) -> dict[str, Any]:
        return self.replica.load()

    def reconfigure(self, config: dict[str, Any]) -> None:
        self.replica.reconfigure(config)

    async def check_health(self) -> None:
        await self.replica.check_health()

    async def generate(self, *args: Any, **kwargs: Any) -> AsyncIterator[dict[str, Any]]:
        """The Engine deployment's streaming generate, for handle callers (as in the split layout)."""
        gen = self.replica.generate(*args, **kwargs)
        try:
            async for item in gen:
                yield item
        finally:  # a cancelled handle call aborts the vLLM request
            await gen.aclose()

    async def run_rows(
        self, rows: list[dict[str, Any]], task: dict[str, Any], sampling: dict[str, Any], **kw: Any
    ):
        return await self.replica.run_rows(rows, task, sampling, **kw)

    def __del__(self) -> None:
        direct = getattr(self, "direct", None)
        if direct is not None:
            direct.stop()
        replica = getattr(self, "replica", None)
        if replica is not None:
            replica.__del__()
