"""The Engine deployment of `turbo-batch serve`: one vLLM engine per replica, online first.

`EngineReplica` wraps `turbo_batch.engine.Engine` (the class batch jobs run as Ray actors) for Ray Serve.
The ingress calls `generate` (token ids in, text deltas out) and `classify` at priority 0; batch jobs
with `cluster.engine_source: serve` call `run_rows` with their lower priority (higher value). Online
requests go first twice: vLLM's priority scheduler orders its queue by priority, and this replica's
gate lets only a few batch rows into vLLM while online requests are in it (see `EngineReplica`).
A cancelled call (client disconnect) aborts its vLLM request. Over `max_online` online requests it
refuses with `EngineOverloaded` (the ingress answers 503). No HTTP here, and no Serve options
(serve.py sets those).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from turbo_batch.errors import EngineStartError

ONLINE_PRIORITY = 0


class EngineOverloaded(RuntimeError):
    """An engine replica refused an online request: its online queue is full (→ HTTP 503)."""


class InvalidRequest(ValueError):
    """vLLM refused one request's parameters or prompt (→ HTTP 400); other requests are untouched."""


def sampling_params(params: dict[str, Any], stream: bool) -> Any:
    """vLLM SamplingParams for one online request (raises InvalidRequest naming the problem)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    kind = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY
    try:
        return SamplingParams(**params, output_kind=kind)
    except (ValueError, TypeError) as e:
        raise InvalidRequest(str(e).strip().splitlines()[0]) from None


def _logprobs(token_ids: Any, logprobs: Any, k: int) -> list[list[Any]]:
    """[token, logprob, [[token, logprob], ...top]] per generated token (vLLM's decoded tokens)."""
    out = []
    for tid, lps in zip(token_ids, logprobs or (), strict=False):
        chosen = lps.get(tid)
        top = sorted(lps.values(), key=lambda lp: lp.rank or 0)[:k]  # the sampled token may be extra
        out.append(
            [
                chosen.decoded_token if chosen and chosen.decoded_token is not None else "",
                float(chosen.logprob) if chosen else float("-inf"),
                [[lp.decoded_token or "", float(lp.logprob)] for lp in top],
            ]
        )
    return out


class EngineReplica:
    """A Serve replica around `Engine`: online generate/classify at priority 0 and batch `run_rows`.

    Online first, twice over. Inside vLLM, batch rows carry a higher priority value, so waiting online
    requests are scheduled before waiting batch rows. But vLLM serves its RUNNING requests before any
    waiting one and never preempts a running request for priority alone (only when KV blocks run
    out), and every batch row in a step makes that step — so each online token — slower (on CPU,
    linearly). So this replica also gates batch rows (priority > 0) before they reach vLLM: at most
    `batch_rows_max` in vLLM at any time, at most `batch_rows_while_online` while an online request is
    in the engine or less than `batch_resume_after_s` has passed since the last one. The rest wait
    here, cheaply, and fill the engine when online traffic pauses.
    """

    async def __init__(self, model: dict[str, Any], max_labels: int = 0, max_online: int = 256):
        # async: Serve awaits it, so the warm-up runs before the replica is marked ready
        from turbo_batch.engine.engine import Engine

        engine = Engine(model, max_labels=max_labels, exit_on_dead=True)
        if engine.error:  # Serve retries the constructor, then marks the app DEPLOY_FAILED
            raise EngineStartError(engine.error)
        # one-time costs (the first logprobs request pays ~2 s on CPU) are paid here, not by a user
        await engine.warmup()
        self._setup(engine, max_online)

    @classmethod
    def with_engine(cls, engine: Any, max_online: int = 256) -> EngineReplica:
        """A replica around an existing engine-like object (tests, embedding without Serve)."""
        self = cls.__new__(cls)
        self._setup(engine, max_online)
        return self

    def _setup(self, engine: Any, max_online: int) -> None:
        self.engine = engine
        self.max_online = max_online
        self.batch_cap: int | None = 0  # batch rows in vLLM while online traffic; None: no cap
        self.batch_max: int | None = None  # batch rows in vLLM at any time; None: no cap
        self.resume_after_s = 0.5
        self._quiet_at = 0.0
        self.online = 0
        self.batch_inflight = 0
        self.aborted = 0
        self._wake = asyncio.Event()
        from turbo_batch.serve.channel import ChannelHub  # (channel.py imports this module)

        self.hub = ChannelHub()  # token channels to the ingress replicas (split layouts, channel.py)
        self._replica_id: str | None = None

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Serve's user_config: updated in place on a redeploy, without restarting the engine."""
        self.batch_cap = config.get("batch_rows_while_online", self.batch_cap)
        self.batch_max = config.get("batch_rows_max", self.batch_max)
        self.resume_after_s = float(config.get("batch_resume_after_s", self.resume_after_s))
        self._notify()

    def info(self) -> dict[str, Any]:
        return {
            **self.engine.info(),
            "unfinished": self.engine.num_unfinished(),
            "online": self.online,
            "batch_inflight": self.batch_inflight,
            "batch_rows_while_online": self.batch_cap,
            "batch_rows_max": self.batch_max,
            "batch_resume_after_s": self.resume_after_s,
            "aborted": self.aborted,
        }

    def num_unfinished(self) -> int:
        return self.engine.num_unfinished()

    def load(self) -> dict[str, Any]:
        """The engine's scheduler load so far (engine/load.py): online and batch requests together."""
        return self.engine.load()

    async def check_health(self) -> None:
        await self.engine.check_health()

    # -- the online-first gate --------------------------------------------------------------------------
    def _notify(self) -> None:
        wake, self._wake = self._wake, type(self._wake)()
        wake.set()

    def _admit(self, n: int) -> None:
        if self.online + n > self.max_online:
            raise EngineOverloaded(f"engine has {self.online} online requests (limit {self.max_online})")
        self.online += n

    def _release(self, n: int) -> None:
        self.online -= n
        if self.online == 0:  # batch rows flood back in only after a quiet period
            self._quiet_at = time.monotonic() + self.resume_after_s
            self._notify()

    def _online_active(self) -> bool:
        return self.online > 0 or time.monotonic() < self._quiet_at

    def _batch_limit(self) -> tuple[int | None, float | None]:
        """Batch rows allowed in vLLM now, and how long that answer holds (None: until a notify)."""
        online = self._online_active()
        caps = [c for c in (self.batch_max, self.batch_cap if online else None) if c is not None]
        until = max(self._quiet_at - time.monotonic(), 0.001) if online and not self.online else None
        return (min(caps) if caps else None), until

    async def _batch_row(self, row: dict[str, Any], task: dict, sampling: dict, priority: int, tag: str):
        while True:
            limit, until = self._batch_limit()
            if limit is None or self.batch_inflight < limit:
                break
            with contextlib.suppress(TimeoutError):  # on timeout: the quiet period is over
                await asyncio.wait_for(self._wake.wait(), until)
        self.batch_inflight += 1
        try:
            return (await self.engine.run_rows([row], task, sampling, priority=priority, tag=tag))[0]
        finally:
            self.batch_inflight -= 1
            self._notify()

    # -- calls ------------------------------------------------------------------------------------------
    async def run_rows(
        self,
        rows: list[dict[str, Any]],
        task: dict[str, Any],
        sampling: dict[str, Any],
        *,
        priority: int = 10,
        tag: str = "batch",
    ) -> list[dict[str, Any]]:
        """Batch rows (the same call as an engine actor's); a cancelled call aborts its rows."""
        if priority <= ONLINE_PRIORITY or (self.batch_cap is None and self.batch_max is None):
            return await self.engine.run_rows(rows, task, sampling, priority=priority, tag=tag)
        return list(await asyncio.gather(*(self._batch_row(r, task, sampling, priority, tag) for r in rows)))

    async def classify(
        self, rows: list[dict[str, Any]], task: dict[str, Any], priority: int = ONLINE_PRIORITY
    ) -> list[dict[str, Any]]:
        self._admit(len(rows))
        try:
            return await self.engine.run_rows(rows, task, {}, priority=priority, tag="classify")
        finally:
            self._release(len(rows))

    async def generate(
        self,
        prompt_ids: list[int],
        params: dict[str, Any],
        request_id: str,
        *,
        stream: bool = False,
        priority: int = ONLINE_PRIORITY,
        trace: bool = False,
    ):
        """Yield deltas {text, tokens, finish_reason[, logprobs][, t]} (stream) or one final dict.

        Streaming sends each vLLM delta as it comes and never waits to fill a batch: when the consumer
        falls behind, vLLM's output collector (RequestOutputKind.DELTA) merges the deltas that piled
        up, so the next item carries all of them — per-token when the consumer keeps up, fewer and
        larger items under load. `logprobs` entries: [token, logprob, [[token, logprob], ...]].
        A request that vLLM refuses (bad parameters or prompt) raises `InvalidRequest` (→ 400)."""
        sp = sampling_params(params, stream)
        want_lp = sp.logprobs is not None
        self._admit(1)
        finished = started = False
        t_in = time.time() if trace else 0.0
        try:
            async for out in self.engine.stream(prompt_ids, sp, request_id, priority=priority):
                started = True
                comp = out.outputs[0]
                finished = out.finished
                item: dict[str, Any] = {
                    "text": comp.text,
                    "tokens": len(comp.token_ids),
                    "finish_reason": comp.finish_reason,
                }
                if want_lp:
                    item["logprobs"] = _logprobs(comp.token_ids, comp.logprobs, sp.logprobs)
                if trace:
                    item["t"] = time.time()
                    if t_in:
                        item["t_in"], t_in = t_in, 0.0
                yield item
        except (ValueError, TypeError) as e:
            if started:
                raise
            raise InvalidRequest(
                str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            ) from None
        finally:
            self._release(1)
            if not finished:  # the caller went away (client disconnect): Engine.stream aborted it
                self.aborted += 1

    # -- token channels (channel.py): what client.HandleEngine calls by handle in the split layouts ----------
    def _me(self, replica: str | None = None) -> str:
        if self._replica_id is None:
            from turbo_batch.serve.channel import replica_id

            self._replica_id = replica_id()
        if replica is not None and replica != self._replica_id:  # the router did not pin the call
            raise RuntimeError(f"a call for engine replica {replica} reached {self._replica_id}")
        return self._replica_id

    async def submit(
        self,
        channel: str,
        prompt_ids: list[int],
        params: dict[str, Any],
        request_id: str,
        *,
        stream: bool = False,
        trace: bool = False,
    ) -> dict[str, Any]:
        """Start an online request; returns its first delta, whether more follow on `channel`, and this
        replica's id (where the ingress opens the channel and sends an abort)."""
        me = self._me()
        gen = self.generate(prompt_ids, params, request_id, stream=stream, trace=trace)
        return {**(await self.hub.submit(channel, gen, request_id)), "replica": me}

    async def channel(self, channel: str, replica: str | None = None):
        """One ingress's deltas from this replica: lists of (request id, item) (see ChannelHub)."""
        self._me(replica)
        async for batch in self.hub.stream(channel):
            yield batch

    def abort(self, request_id: str, replica: str | None = None) -> bool:
        self._me(replica)
        return self.hub.abort(request_id)

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
