"""HTTP plumbing for the serve ingress: OpenAI-style errors, request schemas, the guard, metrics.

`Guard` is a pure-ASGI middleware in front of every route (no BaseHTTPMiddleware, so streaming and
client-disconnect cancellation pass through untouched): it checks the API key with a constant-time
compare (every route but /health, which probes call without a key and which says only ready or not),
refuses a Content-Length over the limit (413), answers 429 once `max_concurrent` generation
requests are in flight, and counts every request for /metrics. The request models accept the OpenAI
fields this server implements, ignore harmless unknown ones, and refuse templates and unsupported
features with a 400. `until_disconnect` runs a route's work until the client goes away (then cancels
it, which aborts the engine request). Routes live in ingress.py.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import time
from contextvars import ContextVar
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

GENERATION_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/classify")
KNOWN_ROUTES = (*GENERATION_ROUTES, "/v1/models", "/health", "/metrics")
TEMPLATE_FIELDS = ("chat_template", "chat_template_kwargs", "template", "prompt_template")
UNSUPPORTED_FIELDS = (  # OpenAI fields and vLLM sampling extras that would change results: refused
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "response_format",
    "logit_bias",
    "best_of",
    "suffix",
    "min_p",
    "use_beam_search",
    "length_penalty",
    "stop_token_ids",
    "include_stop_str_in_output",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "prompt_logprobs",
    "allowed_token_ids",
    "bad_words",
    "truncate_prompt_tokens",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "structured_outputs",
    "logits_processors",
    "priority",
    "echo",
)
INT64 = 2**63
ASGI_24 = os.environ.get("TB_SERVE_ASGI_SPEC_24") == "1"
# When the server first saw the request (Guard), for the serve trace's arrival → handler stage
ARRIVED: ContextVar[float] = ContextVar("turbo_batch_arrived", default=0.0)


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status in (429, 503) else None
        body = error_body(self.message, self.type, self.code, self.param)
        return JSONResponse(body, self.status, headers=headers)


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# ---------------------------------------------------------------------------------------------- requests


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown OpenAI fields are ignored, templates are refused
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: Literal[1] = 1
    stop: str | list[str] | None = Field(default=None, max_length=16)
    seed: int | None = Field(default=None, ge=-INT64, lt=INT64)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM's sampling extras (honoured, not ignored)
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
    top_k: int | None = Field(default=None, ge=-1)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=2.0)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        for s in [v] if isinstance(v, str) else v or []:
            if not s:
                raise ValueError("stop strings must not be empty")
            if len(s) > 256:
                raise ValueError("stop strings must be at most 256 characters")
        return v

    @model_validator(mode="after")
    def _cross(self) -> OpenAIRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError("min_tokens must not exceed max_tokens")
        return self


class _Part(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_Part] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatRequest(OpenAIRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    @model_validator(mode="after")
    def _top(self) -> ChatRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs: true")
        return self


class CompletionRequest(OpenAIRequest):
    prompt: str | list[int] | list[str]
    logprobs: int | None = Field(default=None, ge=0, le=20)


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    classifier: str | None = None
    input: str | list[str]
    model: str | None = None


def validated(cls: type[BaseModel], data: Any) -> Any:
    """The request model, or an ApiError(400) naming the first bad field."""
    if isinstance(data, dict):
        bad = [k for k in TEMPLATE_FIELDS if k in data]
        if bad:
            raise ApiError(400, f"{bad[0]}: templates come from the serve file, not from requests")
        unsupported = [k for k in UNSUPPORTED_FIELDS if data.get(k) not in (None, [], {}, False)]
        if unsupported:
            raise ApiError(
                400,
                f"{unsupported[0]}: not supported by this server",
                code="unsupported",
                param=unsupported[0],
            )
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "body"
        msg = str(err["msg"]).removeprefix("Value error, ")
        raise ApiError(400, f"{where}: {msg}", code="invalid_value", param=where) from None


async def read_json(request: Request, limit: int) -> Any:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"request body exceeds {limit} bytes", code="request_too_large")
    try:
        return json.loads(body)
    except ValueError:
        raise ApiError(400, "request body is not valid JSON", code="invalid_json") from None
    except RecursionError:  # e.g. 200,000 nested arrays: refused, never a 500
        raise ApiError(400, "request body is nested too deeply", code="invalid_json") from None


# ------------------------------------------------------------------------------------------------ guard


class Guard:
    """Pure ASGI middleware: API key, Content-Length, in-flight limit (429), request metrics.

    `api` holds `key`, `limits`, `inflight` and `metrics` (the ingress object, one per replica)."""

    def __init__(self, app: Any, api: Any):
        self.app, self.api = app, api

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if ASGI_24:  # experiment: Starlette streams without its disconnect-listener task (ASGI 2.4)
            scope = {**scope, "asgi": {**scope.get("asgi", {}), "spec_version": "2.4"}}
        ARRIVED.set(time.time())
        api, path = self.api, scope.get("path", "")
        route = path if path in KNOWN_ROUTES else "other"
        headers = dict(scope.get("headers") or [])
        status = {"code": 500}
        t0 = time.monotonic()

        async def reply(err: ApiError) -> None:
            status["code"] = err.status
            await err.response()(scope, receive, send)

        async def send_counted(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                status["code"] = msg["status"]
            await send(msg)

        try:
            if path == "/health":  # probes carry no key; the route says only ready or not
                return await self.app(scope, receive, send_counted)
            if api.key is not None and not _authorized(headers.get(b"authorization", b""), api.key):
                return await reply(ApiError(401, "invalid or missing API key", code="invalid_api_key"))
            length = headers.get(b"content-length", b"0")
            if not length.isdigit():
                return await reply(ApiError(400, "invalid Content-Length header"))
            if int(length) > api.limits["max_body_bytes"]:
                return await reply(
                    ApiError(
                        413,
                        f"request body exceeds {api.limits['max_body_bytes']} bytes",
                        code="request_too_large",
                    )
                )
            if route not in GENERATION_ROUTES:
                return await self.app(scope, receive, send_counted)
            if api.inflight >= api.limits["max_concurrent"]:
                api.metrics["rejected"].labels("too_many_requests").inc()
                return await reply(
                    ApiError(
                        429,
                        f"too many requests in flight ({api.inflight}, limit {api.limits['max_concurrent']}); retry later",
                        "rate_limit_error",
                        "too_many_requests",
                    )
                )
            api.inflight += 1
            api.metrics["inflight"].inc()
            try:
                await self.app(scope, receive, send_counted)
            finally:
                api.inflight -= 1
                api.metrics["inflight"].dec()
        except asyncio.CancelledError:  # the client went away (Serve cancels the request)
            status["code"] = 499
            raise
        finally:
            api.metrics["requests"].labels(route, str(status["code"])).inc()
            api.metrics["latency"].labels(route).observe(time.monotonic() - t0)


def _authorized(header: bytes, key: str) -> bool:
    scheme, _, given = header.decode("latin-1").partition(" ")
    ok = hmac.compare_digest(given.strip().encode(), key.encode())
    return ok and scheme.lower() == "bearer"


def make_metrics() -> tuple[Any, dict[str, Any]]:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    reg = CollectorRegistry()
    buckets = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
    return reg, {
        "requests": Counter("turbo_batch_http_requests", "HTTP requests", ["route", "code"], registry=reg),
        "latency": Histogram(
            "turbo_batch_http_request_seconds",
            "request time (whole stream)",
            ["route"],
            buckets=buckets,
            registry=reg,
        ),
        "inflight": Gauge(
            "turbo_batch_http_inflight_requests", "generation requests in flight", registry=reg
        ),
        "tokens": Counter("turbo_batch_tokens", "tokens processed online", ["kind"], registry=reg),
        "rejected": Counter(
            "turbo_batch_rejected_requests", "requests refused for load", ["reason"], registry=reg
        ),
        "engine": Gauge(
            "turbo_batch_engine_requests", "requests in one engine replica", ["kind"], registry=reg
        ),
    }


async def until_disconnect(request: Request, work: Any) -> Any:
    """Run a route's work (after its body was read) until it ends or the client disconnects; then the
    work is cancelled, which aborts its engine request. Ray Serve's proxy cancels requests on a
    disconnect itself; a replica serving HTTP directly (layout direct) learns it only from ASGI's
    http.disconnect, as `vllm serve` does. A streamed response is returned early and watches on its own.

    The work runs in the request's own task and only the watcher is a new one: a task for the work
    and a wait on both would cost two more turns of an event loop that, under load, is busy with every
    other stream's tokens (each turn several ms at 64 streams), all of it before the first token."""
    me = asyncio.current_task()
    gone = False

    async def disconnected() -> None:
        nonlocal gone
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone = True
        if me is not None:
            me.cancel()

    watcher = asyncio.ensure_future(disconnected())
    try:
        return await work
    except asyncio.CancelledError:
        if not gone or me is None:
            raise  # cancelled from outside (shutdown): not ours to swallow
        me.uncancel()
        return Response(status_code=499)  # nobody reads it: the client is gone
    finally:
        watcher.cancel()
