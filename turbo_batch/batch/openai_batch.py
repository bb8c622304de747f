"""OpenAI Batch API files in and out: request lines → rows, committed rows → response lines.

Input (`input.format: openai_batch`): one JSON object per line with `custom_id`, `method` (POST), `url`
(`/v1/chat/completions` or `/v1/completions`) and `body`. `custom_id` is the row id (preflight refuses
duplicates). Each body goes through the serve endpoint's own request models and limits
(`serve.http.validated`, `serve.spec.LimitsSpec` defaults: body size, message count, max_tokens), so a
line the endpoint would answer with a 400 becomes an error row here, never a failed job:
  BAD_INPUT_LINE   the line is not a JSON object (its row id is `_line<N>`, N counting from 1)
  INVALID_REQUEST  a wrong method or url, a missing custom_id, or a body the endpoint refuses
Chat bodies render with the model's chat template in the render stage (`render_ids`), as the endpoint
renders them. The job's `task` (generate) and `sampling` are the defaults; the sampling fields a body
sets (max_tokens, stop, temperature, top_p, top_k, seed, penalties, min_tokens, ignore_eos) apply to
that line alone (`line_sampling`; the engine merges them per row). stream and logprobs are refused.

Output (`output.format: openai_batch` or `both`): `write_output()` derives `openai_batch_output.jsonl`
from the committed parquet parts once every row is committed, and writes it atomically (temp file,
fsync, rename) before `_SUCCESS`; a rerun after a crash writes it again from the same parts, so every
custom_id appears exactly once. Must not touch: the commit protocol (write.py), dispatch (driver.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from turbo_batch.errors import RowError
from turbo_batch.prompt import chat_text

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
URL_COLUMN = "openai_url"
BODY_COLUMN = "openai_body"  # the validated request, normalised: {"messages": [...]} or {"prompt": ...}
ID_COLUMN = "custom_id"
OUTPUT_FILE = "openai_batch_output.jsonl"
_STATUS = {  # error rows → the HTTP status the endpoint would have answered with
    str(RowError.BAD_INPUT_LINE): 400,
    str(RowError.INVALID_REQUEST): 400,
    str(RowError.PROMPT_TOO_LONG): 400,
    str(RowError.EMPTY_INPUT): 400,
}


def _limits() -> Any:
    from turbo_batch.serve.spec import LimitsSpec

    return LimitsSpec()


def parse_line(raw: bytes, lineno: int, limits: Any) -> dict[str, Any]:
    """One input line → {custom_id, openai_url, openai_body, _input_error} (error as 'CODE:message')."""
    from turbo_batch.serve.http import ApiError, ChatRequest, CompletionRequest, validated

    row: dict[str, Any] = {ID_COLUMN: f"_line{lineno}", URL_COLUMN: None, BODY_COLUMN: None}

    def bad(code: RowError, message: str) -> dict[str, Any]:
        return {**row, "_input_error": f"{code}:{message}"}

    try:
        obj = json.loads(raw.decode("utf-8"))
        if not isinstance(obj, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        return bad(RowError.BAD_INPUT_LINE, f"line {lineno}: {e}")
    cid = obj.get("custom_id")
    if isinstance(cid, str) and cid:
        row[ID_COLUMN] = cid
    else:
        return bad(RowError.INVALID_REQUEST, f"line {lineno}: custom_id must be a non-empty string")
    url, method, body = obj.get("url"), obj.get("method", "POST"), obj.get("body")
    row[URL_COLUMN] = url if isinstance(url, str) else None
    if method != "POST":
        return bad(RowError.INVALID_REQUEST, f"method: {method!r}; only POST is supported")
    if url not in (CHAT_URL, COMPLETIONS_URL):
        return bad(RowError.INVALID_REQUEST, f"url: {url!r}; expected {CHAT_URL} or {COMPLETIONS_URL}")
    if len(json.dumps(body).encode()) > limits.max_body_bytes:
        return bad(RowError.INVALID_REQUEST, f"request body exceeds {limits.max_body_bytes} bytes")
    try:
        req = validated(ChatRequest if url == CHAT_URL else CompletionRequest, body)
        asked = getattr(req, "max_completion_tokens", None) or req.max_tokens
        if asked is not None and asked > limits.max_tokens:
            raise ApiError(400, f"max_tokens {asked} exceeds the limit {limits.max_tokens}")
        if url == CHAT_URL:
            if len(req.messages) > limits.max_messages:
                raise ApiError(
                    400, f"messages: {len(req.messages)} messages exceed the limit {limits.max_messages}"
                )
            norm = {
                "messages": [
                    {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages
                ]
            }
        else:
            prompt = req.prompt
            if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
                if len(prompt) != 1:
                    raise ApiError(400, "prompt: only one prompt per request is supported")
                prompt = prompt[0]
            if not prompt:
                raise ApiError(400, "prompt: must not be empty")
            norm = {"prompt": prompt}
        if req.stream or getattr(req, "logprobs", None) or getattr(req, "top_logprobs", None):
            raise ApiError(400, "stream and logprobs are not supported in batch files")
    except ApiError as e:
        return bad(RowError.INVALID_REQUEST, e.message)
    norm["model"] = req.model
    norm["sampling"] = line_sampling(req)
    return {**row, BODY_COLUMN: json.dumps(norm), "_input_error": None}


_SAMPLING = ("temperature", "top_p", "top_k", "seed")
_EXTRA = ("presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens", "ignore_eos")


def line_sampling(req: Any) -> dict[str, Any]:
    """The sampling fields a request line sets, as per-row overrides of the job's (Engine applies them):
    {max_tokens, stop, temperature, top_p, top_k, seed, extra: {penalties, min_tokens, ignore_eos}}."""
    given = req.model_fields_set
    out: dict[str, Any] = {k: getattr(req, k) for k in _SAMPLING if k in given}
    asked = getattr(req, "max_completion_tokens", None) or req.max_tokens
    if asked is not None:
        out["max_tokens"] = asked
    if "stop" in given and req.stop:
        out["stop"] = [req.stop] if isinstance(req.stop, str) else list(req.stop)
    extra = {k: getattr(req, k) for k in _EXTRA if k in given}
    if extra:
        out["extra"] = extra
    return out


def read_rows(path: str, columns: Sequence[str]) -> Iterator[dict[str, Any]]:
    """Rows of one OpenAI batch input file (other requested columns are null)."""
    limits = _limits()
    with open(path, "rb") as fh:
        for lineno, line in enumerate((ln for ln in fh if ln.strip()), 1):
            row = parse_line(line, lineno, limits)
            yield {**{c: None for c in columns}, **row}


def render_ids(tokenizer: Any, row: dict[str, Any]) -> list[int]:
    """Token ids of a validated request, rendered as the serve endpoint renders it; raises ValueError."""
    body = json.loads(row[BODY_COLUMN])
    if "prompt" in body:
        prompt = body["prompt"]
        if isinstance(prompt, str):
            return list(tokenizer.encode(prompt))
        vocab = len(tokenizer)
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt):
            raise ValueError("prompt: token ids must be a non-empty list of ids in the vocabulary")
        return list(prompt)
    text = chat_text(tokenizer, body["messages"])  # as the serve endpoint renders it
    return list(tokenizer.encode(text, add_special_tokens=False))


# ---------------------------------------------------------------------------------------------- output


def _requests(files: Sequence[str]) -> dict[str, tuple[str | None, str | None]]:
    """custom_id → (url, model) from the input files (the output's body shape depends on the url)."""
    out: dict[str, tuple[str | None, str | None]] = {}
    for path in files:
        for row in read_rows(path, ()):
            body = json.loads(row[BODY_COLUMN]) if row[BODY_COLUMN] else {}
            out[row[ID_COLUMN]] = (row[URL_COLUMN], body.get("model"))
    return out


def response_line(row: dict[str, Any], url: str | None, model: str | None, created: int) -> dict[str, Any]:
    """One OpenAI batch output line for a committed result row."""
    cid = str(row["row_id"])
    digest = hashlib.sha256(cid.encode()).hexdigest()[:24]  # stable ids: a rewrite gives the same file
    request_id = f"req_{digest}"
    line: dict[str, Any] = {"id": f"batch_req_{digest}", "custom_id": cid, "error": None}
    if row.get("error_code"):
        code = row["error_code"]
        status = _STATUS.get(code, 500)
        err = {
            "message": row.get("error_message") or code,
            "type": "invalid_request_error" if status == 400 else "server_error",
            "param": None,
            "code": code,
        }
        line["response"] = {"status_code": status, "request_id": request_id, "body": {"error": err}}
        return line
    prompt_tokens, completion_tokens = int(row.get("prompt_tokens") or 0), int(row.get("output_tokens") or 0)
    finish = row.get("finish_reason") if row.get("finish_reason") in ("stop", "length") else "stop"
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    text = row.get("text") or ""
    if url == COMPLETIONS_URL:
        body = {
            "id": f"cmpl-{digest}",
            "object": "text_completion",
            "created": created,
            "model": model or "",
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
            "usage": usage,
        }
    else:
        body = {
            "id": f"chatcmpl-{digest}",
            "object": "chat.completion",
            "created": created,
            "model": model or "",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": finish,
                    "logprobs": None,
                }
            ],
            "usage": usage,
        }
    line["response"] = {"status_code": 200, "request_id": request_id, "body": body}
    return line


def write_output(out_dir: Path, input_files: Sequence[str], model_path: str) -> Path:
    """Write `openai_batch_output.jsonl` from the committed parts, atomically; returns its path.
    `input_files`: the job's input files (the plan's), read again for each line's url and model."""
    import pyarrow.parquet as pq

    out_dir = Path(out_dir)
    requests = _requests(input_files)
    created = int(time.time())
    target = out_dir / OUTPUT_FILE
    tmp = out_dir / f".{OUTPUT_FILE}.{uuid.uuid4().hex[:8]}"
    manifest = out_dir / "_manifest.jsonl"
    parts = [json.loads(x)["part"] for x in manifest.read_text().splitlines() if x.strip()]
    cols = [
        "row_id",
        "text",
        "finish_reason",
        "prompt_tokens",
        "output_tokens",
        "error_code",
        "error_message",
    ]
    with open(tmp, "wb") as fh:
        for part in parts:
            table = pq.read_table(out_dir / part)
            table = table.select([c for c in cols if c in table.column_names])
            for row in table.to_pylist():
                url, model = requests.get(str(row["row_id"]), (CHAT_URL, None))
                line = response_line(row, url, model or Path(model_path).name, created)
                fh.write((json.dumps(line, ensure_ascii=False) + "\n").encode())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, target)
    return target
