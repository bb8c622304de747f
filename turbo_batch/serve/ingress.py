"""The HTTP side of `turbo-batch serve`: OpenAI-compatible routes on a FastAPI ingress deployment.

Routes: /v1/models, /v1/completions, /v1/chat/completions (JSON or SSE streaming, usage counts),
/v1/classify (a classifier named in the serve file: label + probabilities from one forward pass),
/health and /metrics (Prometheus text); every route sits behind `serve_http.Guard` (API key, body
size, 429 past `limits.max_concurrent`). Prompts are rendered here: the chat template is the
tokenizer's (the model's own files), classifier templates come from the serve file, and a request that
carries a template is refused. Token ids go to the Engine deployment at priority 0. When a client
disconnects, Serve cancels this request; the handle call to the engine is cancelled with it and the
engine aborts the vLLM request. Engine overload (its online queue or Serve's queue to it is full)
becomes a 503 with an OpenAI-style error body. No Serve deployment options here (serve.py sets them).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from turbo_batch.prompt import PromptBuilder, PromptConfig, RowProblem, chat_text, load_tokenizer
from turbo_batch.serve.client import EngineClient, HandleEngine
from turbo_batch.serve.http import (
    ARRIVED,
    ApiError,
    ChatRequest,
    ClassifyRequest,
    CompletionRequest,
    Guard,
    Message,
    OpenAIRequest,
    error_body,
    make_metrics,
    read_json,
    until_disconnect,
    validated,
)
from turbo_batch.serve.loopwatch import LoopWatch
from turbo_batch.serve.wire import Body, Chunks, logprobs_count, sampling, trace_row
from turbo_batch.serve.wire import chain as _chain

LONG_TEXT = 4096  # characters: longer prompts are tokenized in a thread, off the event loop

log = logging.getLogger("turbo_batch.serve")

# -------------------------------------------------------------------------------------------- the ingress


class Api:
    """The ingress deployment's class (wrapped by serve.ingress() in serve.build_app)."""

    def __init__(self, engine: Any, config: dict[str, Any]):
        # a Serve handle to the Engine deployment (split layout) or an EngineClient (colocated)
        self.engine: EngineClient = (
            engine if hasattr(engine, "generate") and not hasattr(engine, "options") else HandleEngine(engine)
        )
        trace = os.environ.get("TURBO_BATCH_TRACE")  # a JSONL file: one line of stage times per stream
        self.trace = open(trace, "a", buffering=1) if trace else None  # noqa: SIM115
        self.model_name: str = config["model_name"]
        self.model: dict[str, Any] = config["model"]
        self.limits: dict[str, Any] = config["limits"]
        self.key: str | None = config["api_key"]
        self.tokenizer = load_tokenizer(
            self.model.get("tokenizer") or self.model["path"], bool(self.model.get("trust_remote_code"))
        )
        self.classifiers = {
            name: (
                c["task"],
                PromptBuilder(
                    PromptConfig(
                        c["task"],
                        ("text",),
                        c["prompt"]["template"],
                        c["prompt"]["system"],
                        c["prompt"]["chat"],
                    ),
                    self.tokenizer,
                ),
            )
            for name, c in config["classifiers"].items()
        }
        self.inflight = 0
        self.registry, self.metrics = make_metrics()
        self._info: dict[str, Any] | None = None
        self.watch = LoopWatch() if self.trace else None  # loop lag + GC pauses, into the trace
        self._watch_at = time.monotonic()

    def __serve_build_asgi_app__(self) -> Any:
        app = FastAPI(title="turbo-batch", docs_url=None, redoc_url=None, openapi_url=None)

        @app.exception_handler(ApiError)
        async def _api_error(_: Request, e: ApiError) -> JSONResponse:
            return e.response()

        @app.exception_handler(Exception)
        async def _internal(_: Request, e: Exception) -> JSONResponse:
            log.exception("unhandled error in a request")
            return ApiError(500, f"internal error: {type(e).__name__}", "server_error").response()

        @app.exception_handler(404)
        async def _not_found(request: Request, _: Exception) -> JSONResponse:
            return ApiError(404, f"no route {request.url.path}", code="not_found").response()

        @app.exception_handler(405)
        async def _bad_method(request: Request, _: Exception) -> JSONResponse:
            return ApiError(405, f"{request.method} not allowed on {request.url.path}").response()

        app.get("/health")(self.health)
        app.get("/metrics")(self.prometheus)
        app.get("/v1/models")(self.models)
        app.post("/v1/completions")(self.completions)
        app.post("/v1/chat/completions")(self.chat)
        app.post("/v1/classify")(self.classify)
        app.add_middleware(Guard, api=self)
        return app

    # -- helpers ------------------------------------------------------------------------------------
    async def engine_info(self) -> dict[str, Any]:
        if self._info is None:
            try:
                self._info = await self.engine.info()
            except Exception as e:
                raise self._engine_error(e) from None
        return self._info

    def _check_model(self, name: str | None) -> None:
        if name is not None and name not in (self.model_name, self.model["path"]):
            raise ApiError(
                404,
                f"model {name!r} does not exist; this server serves {self.model_name!r}",
                code="model_not_found",
            )

    async def _budget(self, prompt_len: int, asked: int | None) -> int:
        lim = self.limits
        if asked is not None and asked > lim["max_tokens"]:
            raise ApiError(
                400, f"max_tokens {asked} exceeds the limit {lim['max_tokens']}", code="invalid_value"
            )
        room = int((await self.engine_info())["max_model_len"]) - prompt_len
        want = asked if asked is not None else min(lim["default_max_tokens"], room)
        if want > room or room < 1:
            raise ApiError(
                400,
                f"prompt has {prompt_len} tokens; with max_tokens {want} that exceeds the context of "
                f"{room + prompt_len} tokens",
                code="context_length_exceeded",
            )
        return want

    async def _encode(self, text: str, *, special: bool) -> list[int]:
        if len(text) < LONG_TEXT:  # short: a thread hop costs more than the encode
            return list(self.tokenizer.encode(text, add_special_tokens=special))
        return list(await asyncio.to_thread(self.tokenizer.encode, text, add_special_tokens=special))

    def _chat_text(self, messages: list[Message]) -> str:
        if len(messages) > self.limits["max_messages"]:
            raise ApiError(
                400, f"messages: {len(messages)} messages exceed the limit {self.limits['max_messages']}"
            )
        msgs = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages
        ]
        try:
            return chat_text(self.tokenizer, msgs)
        except ValueError as e:
            raise ApiError(400, str(e)) from None

    async def _render_prompt(self, prompt: str | list[int] | list[str]) -> list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ApiError(400, "prompt: only one prompt per request is supported")
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt:
                raise ApiError(400, "prompt: must not be empty")
            return await self._encode(prompt, special=True)
        vocab = len(self.tokenizer)
        if not prompt or any(not 0 <= t < vocab for t in prompt):
            raise ApiError(400, "prompt: token ids must be a non-empty list of ids in the vocabulary")
        return list(prompt)

    def _engine_error(self, e: BaseException) -> ApiError:
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        name = type(e).__name__
        if "InvalidRequest" in name or "InvalidRequest" in str(e)[:300]:  # vLLM refused this request
            text = str(e).strip().splitlines()
            msg = next((ln.split("InvalidRequest: ")[-1] for ln in text if "InvalidRequest" in ln), text[-1])
            return ApiError(400, msg.strip(), code="invalid_value")
        if (
            isinstance(e, BackPressureError)
            or "EngineOverloaded" in name
            or "EngineOverloaded" in str(e)[:500]
        ):
            self.metrics["rejected"].labels("engine_overloaded").inc()
            return ApiError(503, "the engines are at capacity; retry later", "server_error", "overloaded")
        if isinstance(e, DeploymentUnavailableError):
            return ApiError(503, "no engine is available", "server_error", "engine_unavailable")
        log.error("engine call failed: %s", e)
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        return ApiError(500, f"engine error: {lines[-1] if lines else name}", "server_error", "engine_error")

    # -- routes ---------------------------------------------------------------------------------------
    async def health(self) -> JSONResponse:
        """Open to probes (no key): ready (200) or not (503), nothing else."""
        try:
            await asyncio.wait_for(self.engine.check_health(), timeout=10)
        except Exception as e:
            log.warning("health check failed: %s", type(e).__name__)
            return JSONResponse({"status": "not ready"}, 503, headers={"Retry-After": "1"})
        return JSONResponse({"status": "ready"})

    async def prometheus(self) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        try:
            info = await asyncio.wait_for(self.engine.info(), timeout=2)
            self.metrics["engine"].labels("unfinished").set(info["unfinished"])
            self.metrics["engine"].labels("online").set(info["online"])
        except Exception:  # metrics must answer even when the engines are busy
            pass
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    async def models(self) -> JSONResponse:
        info = await self.engine_info()
        card = {
            "id": self.model_name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "turbo-batch",
            "root": self.model["path"],
            "max_model_len": info["max_model_len"],
        }
        return JSONResponse({"object": "list", "data": [card]})

    async def completions(self, request: Request) -> Response:
        req = validated(CompletionRequest, await read_json(request, self.limits["max_body_bytes"]))
        return await until_disconnect(request, self._completions(req))

    async def _completions(self, req: CompletionRequest) -> Response:
        self._check_model(req.model)
        ids = await self._render_prompt(req.prompt)
        return await self._generate(req, ids, await self._budget(len(ids), req.max_tokens), chat=False)

    async def chat(self, request: Request) -> Response:
        req = validated(ChatRequest, await read_json(request, self.limits["max_body_bytes"]))
        return await until_disconnect(request, self._chat(req))

    async def _chat(self, req: ChatRequest) -> Response:
        self._check_model(req.model)
        ids = await self._encode(self._chat_text(req.messages), special=False)
        asked = req.max_completion_tokens or req.max_tokens
        return await self._generate(req, ids, await self._budget(len(ids), asked), chat=True)

    async def classify(self, request: Request) -> JSONResponse:
        req = validated(ClassifyRequest, await read_json(request, self.limits["max_body_bytes"]))
        return await until_disconnect(request, self._classify(req))

    async def _classify(self, req: ClassifyRequest) -> JSONResponse:
        self._check_model(req.model)
        name = req.classifier or (next(iter(self.classifiers)) if len(self.classifiers) == 1 else None)
        if name is None or name not in self.classifiers:
            known = ", ".join(sorted(self.classifiers)) or "none"
            raise ApiError(
                404 if name else 400,
                f"classifier {name!r} is not defined (defined: {known})",
                code="not_found",
            )
        task, builder = self.classifiers[name]
        texts = [req.input] if isinstance(req.input, str) else req.input
        if not 1 <= len(texts) <= self.limits["max_inputs"]:
            raise ApiError(400, f"input: 1 to {self.limits['max_inputs']} texts per request")
        rows = []
        for i, text in enumerate(texts):
            try:
                ids, label_ids = builder.build({"text": text})
            except RowProblem as e:
                raise ApiError(400, f"input[{i}]: {e.message}", code=str(e.code)) from None
            await self._budget(len(ids), 1)
            rows.append({"row_id": i, "prompt_ids": ids, "label_ids": label_ids})
        try:  # a cancelled call (the client went away) aborts the rows in the engine
            results = await self.engine.classify(rows, task)
        except Exception as e:
            raise self._engine_error(e) from None
        failed = [r for r in results if r.get("error_code")]
        if failed:
            raise ApiError(500, f"input[{failed[0]['row_id']}]: {failed[0]['error_message']}", "server_error")
        used = sum(r["prompt_tokens"] for r in results)
        self.metrics["tokens"].labels("prompt").inc(used)
        return JSONResponse(
            {
                "id": f"clf-{uuid.uuid4().hex}",
                "object": "classification",
                "created": int(time.time()),
                "model": self.model_name,
                "classifier": name,
                "data": [{"index": r["row_id"], "label": r["label"], "probs": r["probs"]} for r in results],
                "usage": {
                    "prompt_tokens": used,
                    "completion_tokens": len(results),
                    "total_tokens": used + len(results),
                },
            }
        )

    # -- generation -------------------------------------------------------------------------------------
    async def _generate(self, req: OpenAIRequest, ids: list[int], max_tokens: int, *, chat: bool) -> Response:
        t_req = time.time()
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        trace = self.trace is not None and req.stream
        if self.watch is not None:
            self.watch.start()
        gen = self.engine.generate(ids, sampling(req, max_tokens), rid, stream=req.stream, trace=trace)
        try:  # the first item (or error) decides the status code, before any byte is sent
            first = await gen.__anext__()
        except StopAsyncIteration:
            first = None
        except BaseException as e:
            await gen.aclose()
            if isinstance(e, Exception):
                raise self._engine_error(e) from None
            raise
        t_first = time.time()
        self.metrics["tokens"].labels("prompt").inc(len(ids))
        meta = {"id": rid, "created": int(t_req), "model": self.model_name}
        want_lp = logprobs_count(req) is not None
        if not req.stream:
            body = Body(meta, chat, want_lp)
            try:
                async for item in _chain(first, gen):
                    body.add(item)
            except Exception as e:
                raise self._engine_error(e) from None
            finally:  # also on cancellation (the client went away): the engine aborts the request
                await gen.aclose()
            self.metrics["tokens"].labels("completion").inc(body.tokens)
            return JSONResponse(body.json(len(ids)))
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        stamps = {"t_arrive": ARRIVED.get() or t_req, "t_req": t_req, "t_first": t_first} if trace else None
        return StreamingResponse(
            self._sse(first, gen, Chunks(meta, chat, want_lp), len(ids), include_usage, stamps),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _sse(
        self,
        first: Any,
        gen: Any,
        chunks: Chunks,
        prompt_len: int,
        include_usage: bool,
        stamps: dict[str, float] | None,
    ) -> AsyncIterator[str]:
        n = items = 0
        hops: list[float] = []
        sent: list[float] = []  # when each SSE event was handed to the server (trace only)
        try:
            if chunks.chat:
                yield chunks.role()
            async for item in _chain(first, gen):
                n += item["tokens"]
                items += 1
                if stamps is not None:
                    hops.append(time.time() - item["t"])
                    if items == 1:
                        stamps.update(t_in=item.get("t_in", item["t"]), t_engine=item["t"])
                # every engine delta that carries tokens is an event, also when its text is still
                # empty (the detokenizer holds back an incomplete UTF-8 sequence, a skipped special
                # token): the client sees progress per token as from `vllm serve`
                if item["tokens"] or item["text"] or item["finish_reason"] or item.get("logprobs"):
                    yield chunks.delta(item)
                    if stamps is not None:
                        sent.append(time.time())
            if include_usage:
                yield chunks.usage(prompt_len, n)
            yield "data: [DONE]\n\n"
        except Exception as e:  # mid-stream failure: an error event, then the end of the stream
            err = self._engine_error(e)
            yield f"data: {json.dumps(error_body(err.message, err.type, err.code))}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # a disconnect cancels this generator: close the engine call, which aborts the request
            await gen.aclose()
            self.metrics["tokens"].labels("completion").inc(n)
            if stamps is not None and self.trace is not None:
                self.trace.write(json.dumps(trace_row(stamps, hops, items, n, sent)) + "\n")
                if self.watch is not None and time.monotonic() - self._watch_at > 2.0:
                    self._watch_at = time.monotonic()
                    self.trace.write(json.dumps(self.watch.row()) + "\n")
