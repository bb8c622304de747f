"""Token channels between Api ingress replicas and Engine replicas (layouts split and split-direct).

Why: every item of a Ray streaming call costs ~0.2 ms of the Engine replica's one user-code thread
(measured on an H200, layout split-direct, 1K in / 200 out at concurrency 64: 20.95 s of that thread for
102,400 tokens, against 12.05 s for 153,600 in the direct layout; benchmarks/results/
serve_parity_gpu_2ingress_direct.md). With one streaming call per request there is one item per token
per stream, which capped an engine near 5.6k tokens/s. Here an ingress replica holds one streaming
call (a channel) per Engine replica it uses, and the Engine replica sends one item per event-loop turn
with every delta ready for that ingress — after an engine step, one token for each of its streams, so
streams still arrive token by token.

Protocol, per request (ids are the ingress's):
  1. `client.HandleEngine.generate` registers the request, then calls `EngineReplica.submit(channel, ...)` by
     handle (power-of-two routing picks the replica). The call returns once the first delta exists, with
     that delta, whether more follow, and the replica's id. Admission errors (InvalidRequest → 400,
     EngineOverloaded → 503) raise there, as in a plain call.
  2. The rest arrives on the ingress's channel to that replica, opened on first use by
     `EngineReplica.channel(channel, replica=...)`, which `ReplicaRouter` sends to that replica. It
     yields lists of (request id, item): item None ends the request, {"error": message} fails it.
  3. A request the client leaves is cancelled by `abort(request_id, replica=...)`. A channel that closes
     cancels that ingress's requests on the replica, and a channel that fails fails them at the ingress.

Owns: `ChannelHub` (the Engine replica's side) and `ReplicaRouter`; the ingress's side is
`client.HandleEngine`.
Must not touch: vLLM requests themselves (replica.py: `generate` runs them, with their admission and
abort), routes and SSE (ingress.py), Serve options (app.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

OPEN_TIMEOUT_S = 30.0  # a channel whose replica never answers fails its requests instead of hanging

try:  # Ray Serve's default router; the subclass only pins calls that name a replica
    from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter as _Pow2
except ImportError:  # pragma: no cover - a Ray without the request-router API
    _Pow2 = object  # type: ignore[assignment,misc]


class ReplicaRouter(_Pow2):  # type: ignore[misc,valid-type]
    """Power-of-two routing, except that a call with a `replica` keyword goes to that replica."""

    async def choose_replicas(self, candidate_replicas: list, pending_request: Any = None) -> list:
        want = (pending_request.kwargs or {}).get("replica") if pending_request is not None else None
        if want:
            return [[r for r in candidate_replicas if r.replica_id.unique_id == want]]
        return await super().choose_replicas(candidate_replicas, pending_request)


def replica_id() -> str:
    """This Serve replica's id (what `ReplicaRouter` matches)."""
    from ray import serve

    return serve.get_replica_context().replica_id.unique_id


class ChannelHub:
    """The Engine replica's side: a queue per channel, a pump task per streaming request."""

    def __init__(self) -> None:
        self.queues: dict[str, asyncio.Queue] = {}
        self.tasks: dict[str, tuple[str, asyncio.Task]] = {}  # request id → (channel, pump)

    def _queue(self, channel: str) -> asyncio.Queue:
        return self.queues.setdefault(channel, asyncio.Queue())

    async def submit(self, channel: str, gen: Any, request_id: str) -> dict[str, Any]:
        """Run `gen` (EngineReplica.generate) up to its first delta; the rest goes to `channel`."""
        try:
            first = await gen.__anext__()
        except StopAsyncIteration:
            return {"first": None, "more": False}
        except BaseException:
            await gen.aclose()
            raise
        if first.get("finish_reason") is not None:  # a one-item answer (non-streaming, or done)
            await gen.aclose()
            return {"first": first, "more": False}
        task = asyncio.get_running_loop().create_task(self._pump(channel, request_id, gen))
        self.tasks[request_id] = (channel, task)
        return {"first": first, "more": True}

    async def _pump(self, channel: str, request_id: str, gen: Any) -> None:
        q = self._queue(channel)
        try:
            async for item in gen:
                q.put_nowait((request_id, item))
            q.put_nowait((request_id, None))
        except asyncio.CancelledError:
            pass  # aborted by the ingress (or its channel closed): gen.aclose() aborts the vLLM request
        except Exception as e:
            q.put_nowait((request_id, {"error": f"{type(e).__name__}: {e}"}))
        finally:
            with contextlib.suppress(Exception):
                await gen.aclose()
            self.tasks.pop(request_id, None)

    def abort(self, request_id: str) -> bool:
        entry = self.tasks.get(request_id)
        if entry is None:
            return False
        entry[1].cancel()
        return True

    async def stream(self, channel: str) -> AsyncIterator[list]:
        """The channel's batches: [] at once (opened), then every (request id, item) ready per turn."""
        q = self._queue(channel)
        try:
            yield []
            while True:
                batch = [await q.get()]
                while not q.empty():
                    batch.append(q.get_nowait())
                yield batch
        finally:  # the ingress went away: nobody reads this channel's requests any more
            for rid, (ch, task) in list(self.tasks.items()):
                if ch == channel:
                    task.cancel()
                    self.tasks.pop(rid, None)
            self.queues.pop(channel, None)


class ChannelError(RuntimeError):
    """A request failed on the engine side after its first delta, or its channel broke."""
