"""OpenAI wire format for the ingress: sampling parameters in, response bodies and SSE chunks out.

`sampling(req, max_tokens)` maps a validated request (http.py's models) to vLLM SamplingParams kwargs;
`Body` accumulates engine deltas into a non-streaming response; `Chunks` renders SSE events with the
constant part of each chunk serialised once per request (one small `json.dumps` per delta, not one
of the whole chunk). Logprobs follow the OpenAI API: chat `choices[].logprobs.content[]` with
token/logprob/bytes/top_logprobs, completions `tokens`/`token_logprobs`/`top_logprobs`/`text_offset`.
`chain` re-joins a stream's first item with the rest; `trace_row` turns a stream's stage stamps into
the per-stage timing trace (TURBO_BATCH_TRACE). Engine deltas are replica.py's dicts. No HTTP
handling, no engine calls.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator
from typing import Any

_dumps = json.JSONEncoder(ensure_ascii=False, allow_nan=True).encode


def sampling(req: Any, max_tokens: int) -> dict[str, Any]:
    """SamplingParams kwargs for one chat or completions request."""
    stop = [req.stop] if isinstance(req.stop, str) else req.stop
    params: dict[str, Any] = {
        "max_tokens": max_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "stop": stop or None,
        "seed": req.seed,
        "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty,
        "repetition_penalty": req.repetition_penalty,
        "ignore_eos": req.ignore_eos,
        "min_tokens": req.min_tokens,
    }
    if req.top_k is not None:
        params["top_k"] = req.top_k
    n = logprobs_count(req)
    if n is not None:
        params["logprobs"] = n
    return params


def logprobs_count(req: Any) -> int | None:
    """Top alternatives per token asked for (0: only the chosen token's), None: no logprobs."""
    if hasattr(req, "messages"):  # chat: logprobs is a bool, top_logprobs the count
        return (req.top_logprobs or 0) if req.logprobs else None
    return req.logprobs


def _bytes(token: str) -> list[int]:
    return list(token.encode("utf-8", "surrogatepass"))


def chat_logprobs(entries: list[list[Any]]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": tok,
                "logprob": lp,
                "bytes": _bytes(tok),
                "top_logprobs": [{"token": t, "logprob": v, "bytes": _bytes(t)} for t, v in top],
            }
            for tok, lp, top in entries
        ]
    }


def completion_logprobs(entries: list[list[Any]], offset: int) -> dict[str, Any]:
    offsets, pos = [], offset
    for tok, _, _ in entries:
        offsets.append(pos)
        pos += len(tok)
    return {
        "tokens": [e[0] for e in entries],
        "token_logprobs": [e[1] for e in entries],
        "top_logprobs": [dict(e[2]) for e in entries],
        "text_offset": offsets,
    }


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class Body:
    """A non-streaming response built from the engine's delta(s)."""

    def __init__(self, meta: dict[str, Any], chat: bool, want_logprobs: bool):
        self.meta, self.chat, self.want = meta, chat, want_logprobs
        self.text, self.tokens, self.finish = "", 0, None
        self.lps: list[list[Any]] = []

    def add(self, item: dict[str, Any]) -> None:
        self.text += item["text"]
        self.tokens += item["tokens"]
        self.finish = item["finish_reason"] or self.finish
        self.lps += item.get("logprobs") or []

    def json(self, prompt_len: int) -> dict[str, Any]:
        if self.chat:
            lp = chat_logprobs(self.lps) if self.want else None
            choice = {"index": 0, "message": {"role": "assistant", "content": self.text}, "logprobs": lp}
            obj = "chat.completion"
        else:
            lp = completion_logprobs(self.lps, 0) if self.want else None
            choice = {"index": 0, "text": self.text, "logprobs": lp}
            obj = "text_completion"
        return {
            **self.meta,
            "object": obj,
            "choices": [{**choice, "finish_reason": self.finish}],
            "usage": usage(prompt_len, self.tokens),
        }


class Chunks:
    """SSE events of one streamed response; `head` (id, object, created, model) is serialised once."""

    def __init__(self, meta: dict[str, Any], chat: bool, want_logprobs: bool):
        self.chat, self.want = chat, want_logprobs
        obj = "chat.completion.chunk" if chat else "text_completion"
        self.head = _dumps({**meta, "object": obj})[:-1]  # '{"id": ..., "object": ...' without '}'
        self.offset = 0  # completions' text_offset across chunks

    def role(self) -> str:
        choice = '{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}'
        return f'data: {self.head},"choices":[{choice}]}}\n\n'

    def delta(self, item: dict[str, Any]) -> str:
        text, finish = item["text"], item["finish_reason"]
        lp = "null"
        if self.want:
            entries = item.get("logprobs") or []
            lp = _dumps(chat_logprobs(entries) if self.chat else completion_logprobs(entries, self.offset))
        self.offset += len(text)
        fin = "null" if finish is None else _dumps(finish)
        if self.chat:
            # a token whose text is still held back is `"content": ""` (clients concatenate strings);
            # the closing chunk without text is `{}`, as OpenAI sends it
            held = not text and item.get("tokens") and finish is None
            delta = f'{{"content":{_dumps(text)}}}' if text or held else "{}"
            choice = f'{{"index":0,"delta":{delta},"logprobs":{lp},"finish_reason":{fin}}}'
        else:
            choice = f'{{"index":0,"text":{_dumps(text)},"logprobs":{lp},"finish_reason":{fin}}}'
        return f'data: {self.head},"choices":[{choice}]}}\n\n'

    def usage(self, prompt: int, completion: int) -> str:
        return f'data: {self.head},"choices":[],"usage":{_dumps(usage(prompt, completion))}}}\n\n'


async def chain(first: Any, gen: Any) -> AsyncIterator[Any]:
    """The first item (already awaited to pick the status code), then the rest of the stream."""
    if first is not None:
        yield first
    async for item in gen:
        yield item


def trace_row(
    s: dict[str, float], hops: list[float], items: int, tokens: int, sent: list[float]
) -> dict[str, float]:
    """Stage times of one stream (ms): arrival → handler (body, validation, tokenization) → handle call
    → replica → first engine output → back at the ingress → first SSE event; the mean replica→ingress
    hop over all items; and how the events left: the gaps between consecutive SSE events (median and
    largest) and first → last event. The client's inter-token gaps against these say whether tokens
    were held up before the server wrote them or after."""
    ms = 1000.0
    gaps = sorted(b - a for a, b in itertools.pairwise(sent))
    t_sse = sent[0] if sent else s["t_first"]  # no event sent: the stream ended at its first item
    return {
        "items": items,
        "tokens": tokens,
        "events": len(sent),
        "arrive_to_handler_ms": (s["t_req"] - s.get("t_arrive", s["t_req"])) * ms,
        "ingress_to_replica_ms": (s.get("t_in", s["t_req"]) - s["t_req"]) * ms,
        "engine_first_output_ms": (s.get("t_engine", s["t_req"]) - s.get("t_in", s["t_req"])) * ms,
        "replica_to_ingress_first_ms": (s["t_first"] - s.get("t_engine", s["t_first"])) * ms,
        "ingress_first_sse_ms": (t_sse - s["t_first"]) * ms,
        "server_ttft_ms": (t_sse - s.get("t_arrive", s["t_req"])) * ms,
        "hop_mean_ms": (sum(hops) / len(hops) * ms) if hops else 0.0,
        "tokens_per_item": tokens / max(items, 1),
        "sse_gap_p50_ms": (gaps[len(gaps) // 2] * ms) if gaps else 0.0,
        "sse_gap_max_ms": (gaps[-1] * ms) if gaps else 0.0,
        "sse_stream_ms": ((sent[-1] - sent[0]) * ms) if sent else 0.0,
    }
