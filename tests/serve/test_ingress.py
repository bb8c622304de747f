"""The ingress without an engine start: the real Api (FastAPI routes, Guard, wire format) over a fake
engine client. /health answers probes without the key (ready 200 / not ready 503, nothing else), every
other route keeps the key; SSE chunks and logprobs are OpenAI-shaped; bad requests are 400s that never
reach the engine. The real Serve app is covered in test_serve.py and test_openai_params.py."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient


class FakeEngine:
    def __init__(self):
        self.healthy = True
        self.calls = 0

    async def info(self):
        return {"max_model_len": 1024, "unfinished": 0, "online": 0}

    async def check_health(self):
        if not self.healthy:
            raise RuntimeError("engine core died: secret details")

    async def classify(self, rows, task):
        return []

    async def generate(self, ids, params, rid, *, stream, trace=False):
        self.calls += 1
        lp = [["h", -0.5, [["h", -0.5], ["x", -1.5]]]] if "logprobs" in params else None
        yield {"text": "h", "tokens": 1, "finish_reason": None, **({"logprobs": lp} if lp else {})}
        lp = [["i", -0.25, [["i", -0.25], ["y", -2.0]]]] if lp else None
        yield {"text": "i", "tokens": 1, "finish_reason": "stop", **({"logprobs": lp} if lp else {})}


def api_config(model, key):
    """The routes' config (what serve.app.api_config builds from a serve file), small limits."""
    limits = {
        "max_body_bytes": 1 << 20, "max_messages": 8, "max_tokens": 64, "default_max_tokens": 8,
        "max_inputs": 4, "max_concurrent": 4, "max_online_per_engine": 8, "engine_max_queued": 8,
    }  # fmt: skip
    return {"model_name": "tiny", "model": {"path": str(model)}, "limits": limits, "classifiers": {},
            "api_key": key}  # fmt: skip


@pytest.fixture()
def client(tiny_model):
    from turbo_batch.serve.ingress import Api

    config = api_config(tiny_model, key="k")
    engine = FakeEngine()
    api = Api(engine, config)
    return TestClient(api.__serve_build_asgi_app__()), engine


def test_health_needs_no_key_and_says_only_ready_or_not(client):
    http, engine = client
    r = http.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ready"}
    engine.healthy = False
    r = http.get("/health", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 503 and r.json() == {"status": "not ready"}
    assert "secret" not in r.text and r.headers["retry-after"] == "1"
    engine.healthy = True
    assert http.get("/health").status_code == 200


def test_other_routes_keep_the_key(client):
    http, _ = client
    for path in ("/metrics", "/v1/models"):
        assert http.get(path).status_code == 401
        assert http.get(path, headers={"Authorization": "Bearer k"}).status_code == 200
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    assert http.post("/v1/completions", json=body).status_code == 401
    r = http.post("/v1/completions", json=body, headers={"Authorization": "Bearer k"})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "hi"


KEY = {"Authorization": "Bearer k"}


def test_streamed_chat_chunks_and_logprobs_are_openai_shaped(client):
    import json

    http, _ = client
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "stream": True,
            "stream_options": {"include_usage": True}, "logprobs": True, "top_logprobs": 2}  # fmt: skip
    r = http.post("/v1/chat/completions", json=body, headers=KEY)
    events = [e[6:] for e in r.text.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"]["content"] for c in chunks[1:3]] == ["h", "i"]
    lp = chunks[1]["choices"][0]["logprobs"]["content"][0]
    assert lp == {"token": "h", "logprob": -0.5, "bytes": [104],
                  "top_logprobs": [{"token": "h", "logprob": -0.5, "bytes": [104]},
                                   {"token": "x", "logprob": -1.5, "bytes": [120]}]}  # fmt: skip
    assert chunks[2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[3]["choices"] == [] and chunks[3]["usage"] == {"prompt_tokens": chunks[3]["usage"]["prompt_tokens"],
                                                                "completion_tokens": 2,
                                                                "total_tokens": chunks[3]["usage"]["total_tokens"]}  # fmt: skip
    assert all(c["id"] == chunks[0]["id"] and c["object"] == "chat.completion.chunk" for c in chunks)


def test_completion_logprobs_shape(client):
    http, _ = client
    r = http.post(
        "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2, "logprobs": 2}, headers=KEY
    )
    lp = r.json()["choices"][0]["logprobs"]
    assert lp == {"tokens": ["h", "i"], "token_logprobs": [-0.5, -0.25],
                  "top_logprobs": [{"h": -0.5, "x": -1.5}, {"i": -0.25, "y": -2.0}], "text_offset": [0, 1]}  # fmt: skip


def test_bad_requests_are_400_and_never_reach_the_engine(client):
    http, engine = client
    cases = [
        {"seed": 2**64},
        {"stop": [""]},
        {"top_k": -3},
        {"min_p": 0.5},
        {"stream_options": {"include_usage": True}},
        {"logit_bias": {"1": 5}},
    ]
    for extra in cases:
        r = http.post(
            "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2, **extra}, headers=KEY
        )
        assert r.status_code == 400, (extra, r.text)
        assert next(iter(extra)) in r.json()["error"]["message"]
    deep = b"[" * 200_000 + b"]" * 200_000
    r = http.post("/v1/completions", content=deep, headers={**KEY, "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert engine.calls == 0


class TracedEngine(FakeEngine):
    async def generate(self, ids, params, rid, *, stream, trace=False):
        import time

        assert trace, "the ingress asks for engine timestamps when it traces"
        t_in = time.time()
        async for item in super().generate(ids, params, rid, stream=stream):
            yield {**item, "t": time.time(), "t_in": t_in}


def test_trace_file_has_stage_times_event_gaps_and_loop_rows(tiny_model, tmp_path, monkeypatch):
    import json
    import time

    from turbo_batch.serve.ingress import Api

    trace = tmp_path / "trace.jsonl"
    monkeypatch.setenv("TURBO_BATCH_TRACE", str(trace))
    config = api_config(tiny_model, key=None)
    api = Api(TracedEngine(), config)
    api._watch_at = time.monotonic() - 10  # the next traced stream also writes a loop row
    http = TestClient(api.__serve_build_asgi_app__())
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2, "stream": True}
    for _ in range(2):
        assert http.post("/v1/completions", json=body).status_code == 200
    rows = [json.loads(line) for line in trace.read_text().splitlines()]
    streams = [r for r in rows if r.get("kind") != "loop"]
    loops = [r for r in rows if r.get("kind") == "loop"]
    assert len(streams) == 2 and len(loops) == 1
    for r in streams:
        assert r["events"] == 2 and r["tokens"] == 2  # "h" and "i": one SSE event each
        assert 0 <= r["sse_gap_p50_ms"] <= r["sse_gap_max_ms"] <= r["sse_stream_ms"] + 1e-6
        assert r["arrive_to_handler_ms"] >= 0 and r["server_ttft_ms"] >= r["ingress_first_sse_ms"]
    assert loops[0]["window_s"] > 0 and loops[0]["loop_lag_max_ms"] >= loops[0]["loop_lag_p50_ms"] >= 0


def test_loop_watch_sees_a_blocked_loop_and_a_full_collection():
    import asyncio
    import gc
    import time

    from turbo_batch.serve.loopwatch import LoopWatch

    async def main():
        watch = LoopWatch()
        watch.start()
        await asyncio.sleep(0.02)
        time.sleep(0.25)  # a callback that holds the loop for 250 ms
        await asyncio.sleep(0.02)
        gc.collect(2)
        row = watch.row()
        watch.stop()
        return row, watch.row()

    row, fresh = asyncio.run(main())
    assert row["loop_lag_max_ms"] >= 200, row
    assert row["stall_samples"] >= 1 and "test_ingress.py:main" in row["stall_stacks"][0][0], row
    assert row["gc_oldest_n"] >= 1 and row["gc_pause_max_ms"] > 0
    assert fresh["gc_oldest_n"] == 0 and fresh["loop_lag_max_ms"] < 100  # row() starts a new window
    assert fresh["stall_samples"] == 0


class HeldBackEngine(FakeEngine):
    """Deltas as vLLM gives them for bytes of a multi-byte character: tokens whose text is still empty."""

    async def generate(self, ids, params, rid, *, stream, trace=False):
        yield {"text": "", "tokens": 0, "finish_reason": None}  # nothing new: no event
        yield {"text": "", "tokens": 1, "finish_reason": None}  # a token, its text held back
        yield {"text": "", "tokens": 1, "finish_reason": None}
        yield {"text": "é", "tokens": 1, "finish_reason": "length"}


def test_every_delta_with_tokens_is_an_event_even_before_its_text(tiny_model):
    import json

    from turbo_batch.serve.ingress import Api

    config = api_config(tiny_model, key=None)
    http = TestClient(Api(HeldBackEngine(), config).__serve_build_asgi_app__())
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 3, "stream": True}
    lines = [
        ln for ln in http.post("/v1/completions", json=body).text.splitlines() if ln.startswith("data: ")
    ]
    assert lines[-1] == "data: [DONE]"
    choices = [json.loads(ln[6:])["choices"][0] for ln in lines[:-1]]
    assert [c["text"] for c in choices] == ["", "", "é"]  # one event per token, as vllm serve sends
    assert [c["finish_reason"] for c in choices] == [None, None, "length"]
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "stream": True}
    lines = [
        ln for ln in http.post("/v1/chat/completions", json=chat).text.splitlines() if ln.startswith("data: ")
    ]
    deltas = [json.loads(ln[6:])["choices"][0]["delta"] for ln in lines[:-1]]
    assert deltas == [
        {"role": "assistant", "content": ""},
        {"content": ""},
        {"content": ""},
        {"content": "é"},
    ]


def test_until_disconnect_runs_the_work_in_the_request_task_and_cancels_it_on_disconnect():
    """A route's work runs in the request's own task (no extra loop turns before the first token); a
    client that goes away cancels it (its finally runs: the engine request is aborted) and the route
    answers 499; a cancellation from outside (shutdown) is not swallowed."""
    import asyncio

    from turbo_batch.serve.http import until_disconnect

    class Req:
        def __init__(self):
            self.gone = asyncio.Event()

        async def receive(self):
            await self.gone.wait()
            return {"type": "http.disconnect"}

    async def main():
        seen = {}

        async def quick():
            seen["task"] = asyncio.current_task()
            return "done"

        me = asyncio.current_task()
        assert await until_disconnect(Req(), quick()) == "done" and seen["task"] is me

        req, aborted = Req(), asyncio.Event()

        async def slow():
            try:
                await asyncio.sleep(30)
            finally:
                aborted.set()

        asyncio.get_running_loop().call_later(0.05, req.gone.set)
        r = await asyncio.wait_for(until_disconnect(req, slow()), 5)
        assert r.status_code == 499 and aborted.is_set() and me.cancelling() == 0

        outer = asyncio.ensure_future(until_disconnect(Req(), asyncio.sleep(30)))
        await asyncio.sleep(0.05)
        outer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await outer

    asyncio.run(main())


def test_two_servers_share_one_port_and_close_it_on_stop():
    """DirectServer(shared=True) (layout split-direct's ingress replicas): two servers listen on the one
    port, each keeps its listening socket while it runs, and the port is closed once both stop."""
    import asyncio
    import socket

    import httpx
    from fastapi import FastAPI

    from turbo_batch.serve.direct import DirectServer

    app = FastAPI()
    app.get("/ping")(lambda: {"ok": True})

    async def main():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        a = await DirectServer.start(app, "127.0.0.1", port, shared=True)
        b = await DirectServer.start(app, "127.0.0.1", port, shared=True)
        assert (a.port, b.port) == (port, port)
        async with httpx.AsyncClient() as c:  # a new connection each: the kernel picks a server
            for _ in range(8):
                r = await c.get(f"http://127.0.0.1:{port}/ping", headers={"Connection": "close"})
                assert r.json() == {"ok": True}
        for srv in (a, b):
            srv.stop()
            await asyncio.wait_for(srv.task, 10)
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0

    asyncio.run(main())
