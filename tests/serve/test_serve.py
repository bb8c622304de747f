"""The online endpoint, for real: one Serve app on the tiny model (one engine start for the module),
the official `openai` client unchanged, raw HTTP for auth/limit edge cases. Batch jobs on the same
engines (the online-first gate, --via-serve): test_via_serve.py."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from turbo_batch.errors import SpecError

REPO = Path(__file__).resolve().parents[2]
LABELS = ["positive", "negative"]


# ------------------------------------------------------------------------------------- serve files (fast)


def test_serve_files_in_jobs_load(monkeypatch):
    from turbo_batch.serve.spec import load_serve

    monkeypatch.setenv("TURBO_BATCH_CACHE", "/tmp/cache")
    files = sorted((REPO / "jobs").glob("*serve*.yaml"))
    assert {f.name for f in files} >= {"serve_cpu.yaml", "serve_turbo.yaml"}
    for f in files:
        spec = load_serve(f)
        assert spec.model.path and "${" not in spec.model.path
        assert spec.http.host == "127.0.0.1" and spec.auth.api_key_env
    turbo = load_serve(REPO / "jobs" / "serve_turbo.yaml")
    assert turbo.model.path == "LilaRest/gemma-4-31B-it-NVFP4-turbo"
    assert turbo.model.trust_remote_code is True
    assert turbo.model.engine == {
        "quantization": "modelopt",
        "kv_cache_dtype": "fp8",
        "enable_prefix_caching": True,
        "max_num_seqs": 128,
        "max_num_batched_tokens": 8192,
        "max_model_len": 16384,
        "gpu_memory_utilization": 0.95,
    }


def test_serve_file_errors_name_the_field(tmp_path):
    from turbo_batch.serve.spec import load_serve

    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "model: {path: /m}\nlimitz: {}\nclassifiers:\n  c: {labels: [a, a]}\n"
        "  d: {labels: [a, b], prompt: {template: '{{ row.x }}'}}\n"
    )
    with pytest.raises(SpecError) as e:
        load_serve(bad)
    text = "\n".join(e.value.problems)
    assert "limitz: unknown field" in text
    assert "classifiers.c" in text and "unique" in text
    assert "classifiers.d" in text and "only `text`" in text


def test_api_key_env_must_be_set(tmp_path, monkeypatch):
    from turbo_batch.serve.spec import api_key, load_serve

    f = tmp_path / "s.yaml"
    f.write_text("model: {path: /m}\nauth: {api_key_env: TB_NOT_SET_KEY}\n")
    monkeypatch.delenv("TB_NOT_SET_KEY", raising=False)
    with pytest.raises(SpecError, match="TB_NOT_SET_KEY"):
        api_key(load_serve(f))


# --------------------------------------------------------------------------------------- OpenAI routes


@pytest.mark.slow
def test_models(served):
    models = served.client().models.list()
    assert [m.id for m in models.data] == ["tiny"]


@pytest.mark.slow
def test_completions(served):
    r = served.client().completions.create(model="tiny", prompt="the movie was", max_tokens=5, temperature=0)
    assert r.object == "text_completion" and r.model == "tiny"
    assert isinstance(r.choices[0].text, str) and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and 1 <= r.usage.completion_tokens <= 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


@pytest.mark.slow
def test_chat(served):
    r = served.client().chat.completions.create(
        model="tiny",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}],
        max_tokens=6,
        temperature=0,
    )
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant" and isinstance(r.choices[0].message.content, str)
    assert r.usage.completion_tokens <= 6 and r.usage.prompt_tokens > 5
    again = served.client().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hello there"}], max_tokens=6, temperature=0
    )
    assert (
        again.choices[0].message.content
        == served.client()
        .chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hello there"}], max_tokens=6, temperature=0
        )
        .choices[0]
        .message.content
    )


@pytest.mark.slow
def test_streaming_chat(served):
    client = served.client()
    kw = {"model": "tiny", "messages": [{"role": "user", "content": "Count to ten"}], "temperature": 0}
    chunks = list(
        client.chat.completions.create(
            **kw, max_tokens=12, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"] or finals == ["stop"]
    assert chunks[-1].usage.completion_tokens <= 12 and chunks[-1].choices == []
    full = client.chat.completions.create(**kw, max_tokens=12)
    assert text == full.choices[0].message.content  # same text streamed or not (temperature 0)


@pytest.mark.slow
def test_classify(served):
    for name, text in (("sentiment", "a great film"), ("review", "dull and long")):
        r = httpx.post(
            f"{served.url}/classify",
            json={"classifier": name, "input": text},
            headers=served.auth,
            timeout=60,
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["classifier"] == name and len(body["data"]) == 1
        item = body["data"][0]
        assert item["label"] in LABELS
        assert set(item["probs"]) == set(LABELS)
        assert abs(sum(item["probs"].values()) - 1.0) < 1e-6
        assert item["label"] == max(item["probs"], key=item["probs"].get)
    many = httpx.post(
        f"{served.url}/classify",
        json={"classifier": "sentiment", "input": ["good", "bad", "fine"]},
        headers=served.auth,
        timeout=60,
    ).json()
    assert [d["index"] for d in many["data"]] == [0, 1, 2]
    assert many["usage"]["prompt_tokens"] > 0


@pytest.mark.slow
def test_health_and_metrics(served):
    for headers in ({}, served.auth, {"Authorization": "Bearer wrong"}):  # probes carry no key
        r = httpx.get(f"{served.base}/health", headers=headers)
        assert r.status_code == 200 and r.json() == {"status": "ready"}
    text = httpx.get(f"{served.base}/metrics", headers=served.auth).text
    assert "turbo_batch_http_requests_total" in text and "turbo_batch_http_request_seconds_bucket" in text


# ---------------------------------------------------------------------------------------- safety


ROUTES = [
    ("GET", "/v1/models"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/classify"),
    ("GET", "/metrics"),
    ("GET", "/no/such/route"),
]


@pytest.mark.slow
def test_every_route_needs_the_key(served):
    import openai

    body = {"model": "tiny", "prompt": "x", "messages": [{"role": "user", "content": "x"}], "input": "x"}
    for method, path in ROUTES:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {served.key}"}):
            r = httpx.request(
                method, served.base + path, json=body if method == "POST" else None, headers=headers
            )
            assert r.status_code == 401, (method, path, headers, r.text)
            assert r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=served.url, api_key="wrong", max_retries=0).models.list()


@pytest.mark.slow
def test_request_limits(served):
    import openai

    client = served.client()
    msg = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="tiny", messages=msg, max_tokens=5000)
    with pytest.raises(openai.BadRequestError, match="exceed the limit"):
        client.chat.completions.create(model="tiny", messages=msg * 9, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="templates come from the serve file"):
        client.chat.completions.create(
            model="tiny", messages=msg, max_tokens=2, extra_body={"chat_template": "{{ 7*7 }}"}
        )
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=msg, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="tiny", prompt="word " * 1100, max_tokens=1)
    big = httpx.post(
        f"{served.url}/chat/completions",
        content=json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x" * 600_000}]}),
        headers={**served.auth, "Content-Type": "application/json"},
    )
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    bad = httpx.post(f"{served.url}/completions", content=b"{not json", headers=served.auth)
    assert bad.status_code == 400 and "error" in bad.json()


@pytest.mark.slow
def test_overload_burst_gives_429_or_503_then_recovers(served):
    async def burst() -> list[int]:
        async with httpx.AsyncClient(timeout=120, headers=served.auth) as http:

            async def chat(i: int) -> int:
                r = await http.post(
                    f"{served.url}/chat/completions",
                    json={
                        "model": "tiny",
                        "messages": [{"role": "user", "content": f"hi {i}"}],
                        "max_tokens": 32,
                    },
                )
                if r.status_code != 200:
                    assert r.json()["error"]["message"], (r.status_code, r.text)
                return r.status_code

            async def classify(i: int) -> int:
                r = await http.post(
                    f"{served.url}/classify", json={"classifier": "sentiment", "input": [f"text {i}"] * 6}
                )
                if r.status_code != 200:
                    assert r.headers["content-type"] == "application/json", (r.status_code, r.text)
                    assert r.json()["error"]["message"], (r.status_code, r.text)
                return r.status_code

            return await asyncio.gather(*(chat(i) if i % 2 else classify(i) for i in range(60)))

    codes = asyncio.run(burst())
    print("burst status codes:", sorted(Counter(codes).items()))
    assert set(codes) <= {200, 429, 503}, codes
    assert 200 in codes and (429 in codes or 503 in codes), codes
    # the service answers normally afterwards, with nothing left running in the engine
    r = served.client().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert r.usage.completion_tokens >= 1
    deadline = time.monotonic() + 10
    while served.engine_info()["unfinished"] and time.monotonic() < deadline:
        time.sleep(0.2)
    info = served.engine_info()
    assert info["unfinished"] == 0 and info["online"] == 0


@pytest.mark.slow
def test_disconnected_stream_aborts_engine_request(served):
    before = served.engine_info()["aborted"]
    stream = served.client().chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Write a long story"}],
        max_tokens=900,
        temperature=0,
        stream=True,
    )
    for i, _ in enumerate(stream):
        if i >= 3:
            break
    assert served.engine_info()["unfinished"] == 1  # still generating
    stream.close()  # the client goes away mid-stream
    info = _wait_idle(served)
    assert info["unfinished"] == 0 and info["online"] == 0
    assert info["aborted"] == before + 1


@pytest.mark.slow
def test_disconnected_plain_request_aborts_engine_request(served):
    before = served.engine_info()["aborted"]
    with pytest.raises(httpx.ReadTimeout):  # the client gives up on a long non-streaming completion
        httpx.post(
            f"{served.url}/completions",
            json={"model": "tiny", "prompt": "once upon a time", "max_tokens": 900, "temperature": 0},
            headers=served.auth,
            timeout=httpx.Timeout(10, read=0.5),
        )
    info = _wait_idle(served)
    assert info["unfinished"] == 0 and info["aborted"] == before + 1


def _wait_idle(served, timeout_s: float = 10) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        info = served.engine_info()
        if info["unfinished"] == 0 or time.monotonic() > deadline:
            return info
        time.sleep(0.1)
