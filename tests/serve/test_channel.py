"""Token channels (serve/channel.py) without Ray: the engine side's hub and the ingress side's client,
joined by a fake handle that calls the hub the way Serve would. The real path (Serve, vLLM, two
ingress replicas) is tests/serve/test_cli.py's split-direct test."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from turbo_batch.serve.channel import ChannelError, ChannelHub
from turbo_batch.serve.client import HandleEngine


async def deltas(n: int, log: list, name: str, fail_after: int | None = None, step: float = 0.0):
    """An engine stream: n one-token deltas (the last with a finish_reason); `log` records its close."""
    try:
        for i in range(n):
            if step:
                await asyncio.sleep(step)
            if fail_after is not None and i == fail_after:
                raise ValueError("engine died")
            yield {"text": f"{name}{i} ", "tokens": 1, "finish_reason": "length" if i == n - 1 else None}
    finally:
        log.append(name)


class _Call:
    def __init__(self, fn, *a, **kw):
        self.fn, self.a, self.kw = fn, a, kw

    def __await__(self):
        return self.fn(*self.a, **self.kw).__await__()

    def __aiter__(self):
        return self.fn(*self.a, **self.kw).__aiter__()


class FakeHandle:
    """What HandleEngine calls: submit / channel (streaming) / abort, served by one ChannelHub."""

    def __init__(self, streams: dict[str, Any], replica: str = "r1"):
        self.hub, self.streams, self.replica, self.aborts = ChannelHub(), streams, replica, []
        outer = self

        class Method:
            def __init__(self, name):
                self.name = name

            def remote(self, *a, **kw):
                call = _Call(getattr(outer, "_" + self.name), *a, **kw)
                if self.name == "abort":  # Serve sends a call at .remote(), awaited or not
                    return asyncio.ensure_future(call.fn(*a, **kw))
                return call

        self.submit, self.channel, self.abort = Method("submit"), Method("channel"), Method("abort")

    def options(self, **_: Any) -> FakeHandle:
        return self

    async def _submit(self, channel, ids, params, rid, *, stream, trace):
        return {**(await self.hub.submit(channel, self.streams[rid], rid)), "replica": self.replica}

    def _channel(self, channel, replica):
        assert replica == self.replica
        return self.hub.stream(channel)

    async def _abort(self, rid, replica):
        self.aborts.append(rid)
        return self.hub.abort(rid)


async def collect(engine: HandleEngine, rid: str) -> list[str]:
    return [d["text"] async for d in engine.generate([1, 2], {}, rid, stream=True)]


def test_concurrent_streams_share_one_channel_and_get_their_own_deltas():
    async def main():
        log: list = []
        handle = FakeHandle({f"q{i}": deltas(5 + i, log, f"q{i}-", step=0.001) for i in range(4)})
        engine = HandleEngine(handle)
        batches: list[int] = []
        stream = handle.hub.stream  # count the batches the engine side sends

        async def counted(channel):
            async for batch in stream(channel):
                batches.append(len(batch))
                yield batch

        handle.hub.stream = counted
        got = await asyncio.gather(*(collect(engine, f"q{i}") for i in range(4)))
        for i, texts in enumerate(got):
            assert texts == [f"q{i}-{k} " for k in range(5 + i)]
        assert len(engine.readers) == 1  # one channel for the four streams
        assert max(batches) > 1  # deltas of several streams travel in one item
        assert sorted(log) == [f"q{i}-" for i in range(4)] and not handle.hub.tasks

    asyncio.run(main())


def test_leaving_a_stream_aborts_it_on_the_engine_and_an_engine_error_reaches_the_client():
    async def main():
        log: list = []
        handle = FakeHandle(
            {"long": deltas(1000, log, "long", step=0.002), "bad": deltas(9, log, "bad", fail_after=3)}
        )
        engine = HandleEngine(handle)
        gen = engine.generate([1], {}, "long", stream=True)
        assert (await gen.__anext__())["text"] == "long0 "
        assert (await gen.__anext__())["text"] == "long1 "
        await gen.aclose()  # the client went away
        for _ in range(50):
            if "long" in log:
                break
            await asyncio.sleep(0.01)
        assert handle.aborts == ["long"] and "long" in log and "long" not in handle.hub.tasks
        with pytest.raises(ChannelError, match="ValueError: engine died"):
            await collect(engine, "bad")
        assert "bad" in log

    asyncio.run(main())


def test_a_one_item_answer_needs_no_channel_and_a_broken_channel_fails_its_requests():
    async def main():
        log: list = []
        one = {"text": "all", "tokens": 3, "finish_reason": "stop"}

        async def single():
            yield one

        handle = FakeHandle({"one": single(), "s": deltas(1000, log, "s", step=0.005)})
        engine = HandleEngine(handle)
        assert [d async for d in engine.generate([1], {}, "one", stream=False)] == [one]
        assert not engine.readers

        def broken(channel, replica):
            async def gen():
                yield []
                raise ConnectionError("replica died")

            return gen()

        handle._channel = broken
        with pytest.raises(ChannelError, match="channel to engine replica r1 ConnectionError: replica died"):
            await collect(engine, "s")

    asyncio.run(main())


def test_closing_a_channel_cancels_that_ingress_s_requests_on_the_engine():
    async def main():
        log: list = []
        hub = ChannelHub()
        res = await hub.submit("c1", deltas(1000, log, "a", step=0.002), "a")
        assert res["more"] and res["first"]["text"] == "a0 "
        stream = hub.stream("c1")
        assert await stream.__anext__() == []
        assert (await stream.__anext__())[0][0] == "a"
        await stream.aclose()  # the ingress is gone
        await asyncio.sleep(0.05)
        assert log == ["a"] and not hub.tasks and "c1" not in hub.queues

    asyncio.run(main())
