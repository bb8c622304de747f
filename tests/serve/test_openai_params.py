"""Streaming, logprobs and sampling parameters with the official `openai` client, and requests that must
answer 400 (never a 500, never an engine restart), on the package's shared Serve app (conftest.py)."""

from __future__ import annotations

import concurrent.futures
import math

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow
MSG = [{"role": "user", "content": "Tell me a story"}]


def test_a_32_token_answer_streams_in_at_least_16_chunks(served):
    stream = served.client().completions.create(
        model="tiny",
        prompt="once upon a time",
        max_tokens=32,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert chunks[-1].usage.completion_tokens == 32 and chunks[-1].choices == []
    assert len([t for t in texts if t]) >= 16, texts


def test_chat_logprobs_round_trip(served):
    client = served.client()
    r = client.chat.completions.create(
        model="tiny", messages=MSG, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    content = r.choices[0].logprobs.content
    assert len(content) == 5 and "".join(c.token for c in content) == r.choices[0].message.content
    for c in content:
        assert c.logprob <= 0 and c.bytes == list(c.token.encode())
        assert len(c.top_logprobs) == 2
        assert c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob
        assert c.logprob == pytest.approx(c.top_logprobs[0].logprob, abs=1e-4)  # greedy: the top token
    plain = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=5, temperature=0)
    assert plain.choices[0].logprobs is None
    assert plain.choices[0].message.content == r.choices[0].message.content
    # streamed: each chunk carries the logprobs of its own tokens
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=MSG, max_tokens=5, temperature=0, logprobs=True, top_logprobs=1,
            stream=True, extra_body={"ignore_eos": True},
        )
    )  # fmt: skip
    streamed = [
        c for ch in chunks if ch.choices and ch.choices[0].logprobs for c in ch.choices[0].logprobs.content
    ]
    assert [c.token for c in streamed] == [c.token for c in content]
    assert [c.logprob for c in streamed] == pytest.approx([c.logprob for c in content], abs=1e-4)


def test_completions_logprobs_round_trip(served):
    r = served.client().completions.create(
        model="tiny", prompt="the movie was", max_tokens=4, temperature=0, logprobs=3,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(4)]
    for tok, val, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 3 and val <= 0 and math.isclose(max(top.values()), val, abs_tol=1e-4)
        assert tok in top


def test_vllm_sampling_extras_are_honoured(served):
    client = served.client()
    base = {"model": "tiny", "prompt": "the movie was", "temperature": 0}
    eos = client.completions.create(**base, max_tokens=40, extra_body={"ignore_eos": True})
    assert eos.usage.completion_tokens == 40 and eos.choices[0].finish_reason == "length"
    low = client.completions.create(**base, max_tokens=12, extra_body={"min_tokens": 12})
    assert low.usage.completion_tokens == 12
    greedy = client.completions.create(**base, max_tokens=8, extra_body={"ignore_eos": True})
    top1 = client.completions.create(
        **{**base, "temperature": 1.0}, max_tokens=8, seed=3, extra_body={"top_k": 1, "ignore_eos": True}
    )
    assert top1.choices[0].text == greedy.choices[0].text  # top_k=1 is greedy whatever the temperature
    rep = client.completions.create(
        **base, max_tokens=24, extra_body={"repetition_penalty": 1.9, "ignore_eos": True}
    )
    plain = client.completions.create(**base, max_tokens=24, extra_body={"ignore_eos": True})
    assert rep.choices[0].text != plain.choices[0].text  # the penalty changed the greedy path
    seeded = [
        client.completions.create(**{**base, "temperature": 1.0}, max_tokens=8, seed=7).choices[0].text
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"seed": 2**64}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"min_p": 0.1}, "min_p"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"stream": True, "stream_options": {"bogus": 1}}, "stream_options"),
        ({"top_k": -5}, "top_k"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"min_tokens": 9, "max_tokens": 4}, "min_tokens"),
        ({"logprobs": 50}, "logprobs"),
        ({"echo": True}, "echo"),
    ],
)
def test_bad_parameters_answer_400_naming_the_field(served, body, field):
    r = httpx.post(
        f"{served.url}/completions",
        json={"model": "tiny", "prompt": "hi", "max_tokens": 4, **body},
        headers=served.auth,
        timeout=30,
    )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert field in err["message"] and err["type"] == "invalid_request_error"


def test_chat_top_logprobs_needs_logprobs(served):
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        served.client().chat.completions.create(model="tiny", messages=MSG, max_tokens=2, top_logprobs=2)


def test_deep_json_body_is_a_400_and_the_engine_lives_on(served):
    pid = served.engine_info()["pid"]
    deep = b"[" * 200_000 + b"]" * 200_000
    r = httpx.post(
        f"{served.url}/chat/completions",
        content=deep,
        headers={**served.auth, "Content-Type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", r.text
    ok = served.client().completions.create(model="tiny", prompt="hi", max_tokens=2)
    assert ok.usage.completion_tokens >= 1 and served.engine_info()["pid"] == pid


def test_an_engine_error_in_one_request_spares_the_others(served):
    """vLLM refuses one request (a token id outside the vocabulary, sent past the ingress's checks):
    that call fails with InvalidRequest while three streams in flight finish normally."""
    from ray import serve

    pid = served.engine_info()["pid"]
    handle = serve.get_deployment_handle("Engine", app_name=served.spec.name).options(stream=True)

    def stream(i: int) -> int:
        chunks = served.client().completions.create(
            model="tiny", prompt=f"story {i}", max_tokens=48, stream=True, extra_body={"ignore_eos": True},
            stream_options={"include_usage": True},
        )  # fmt: skip
        return list(chunks)[-1].usage.completion_tokens

    with concurrent.futures.ThreadPoolExecutor(3) as ex:
        futures = [ex.submit(stream, i) for i in range(3)]
        bad = handle.generate.remote([1, 2, 10**7], {"max_tokens": 4}, "bad-ids", stream=True)
        with pytest.raises(Exception, match=r"InvalidRequest|vocab"):
            for _ in bad:
                pass
        assert [f.result(timeout=120) for f in futures] == [48, 48, 48]
    assert served.engine_info()["pid"] == pid and served.engine_info()["online"] == 0


def test_classify_error_cases(served):
    def post(body: dict) -> httpx.Response:
        return httpx.post(f"{served.url}/classify", json=body, headers=served.auth, timeout=30)

    cases = [
        ({"input": "x"}, 400, "not defined"),  # two classifiers: one must be named
        ({"classifier": "nope", "input": "x"}, 404, "'nope' is not defined"),
        ({"classifier": "sentiment", "input": []}, 400, "1 to 8 texts"),
        ({"classifier": "sentiment", "input": ["x"] * 9}, 400, "1 to 8 texts"),
        ({"classifier": "sentiment", "input": 5}, 400, "input"),
        ({"classifier": "sentiment", "input": "x", "extra": 1}, 400, "extra"),
        ({"classifier": "sentiment", "input": "word " * 1100}, 400, "context"),
        ({"classifier": "sentiment", "input": "x", "model": "other"}, 404, "does not exist"),
    ]
    for body, status, text in cases:
        r = post(body)
        assert r.status_code == status and text in r.json()["error"]["message"], (body, r.text)
    assert post({"classifier": "sentiment", "input": "fine"}).status_code == 200
