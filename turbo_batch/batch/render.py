"""Render: the Ray Data stage that turns input rows into token ids (CPU tasks, many in parallel).

Owns: `render_block(block) -> block` — sandboxed Jinja + chat template per row, then one tokenizer call
for the block's prompt texts (via prompt.py), the labels' first token ids and each row's output
budget, or an error code per row; one tokenizer per worker process and job. Must not touch: engines,
the output dir, the order of rows within a block.
The rendered block's columns are the contract with the driver: row_id, the passthrough columns,
prompt_ids, label_ids, budget, prompt_tokens, error_code, error_message.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from turbo_batch.batch import hygiene, openai_batch
from turbo_batch.batch.read import INPUT_ERROR
from turbo_batch.errors import RowError
from turbo_batch.prompt import PromptBuilder, PromptConfig, RowProblem, load_tokenizer

RENDERED_COLUMNS = (
    "prompt_ids",
    "label_ids",
    "budget",
    "prompt_tokens",
    "error_code",
    "error_message",
    "sampling",
)

_BUILDERS: dict[str, tuple[PromptBuilder, Any]] = {}


def _builder(cfg: PromptConfig, tokenizer_path: str, trust_remote_code: bool) -> tuple[PromptBuilder, Any]:
    """One builder per worker process and job (Ray reuses workers, so the tokenizer loads once)."""
    from turbo_batch.engine.tasks import TaskRunner

    key = json.dumps(
        [dataclasses.asdict(cfg), tokenizer_path, trust_remote_code], sort_keys=True, default=str
    )
    if key not in _BUILDERS:
        # A render task holds cluster.render_cpus (0.5 by default) of a CPU, and the rows of its block
        # are tokenized in one call: the tokenizer's Rust thread pool would spread that call over every
        # core of the node, beside the engines. Ray Data runs render tasks side by side instead.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        tok = load_tokenizer(tokenizer_path, trust_remote_code)
        _BUILDERS[key] = (PromptBuilder(cfg, tok), TaskRunner(cfg.task, {}, tok))
    return _BUILDERS[key]


def _internal(e: BaseException) -> tuple[str, str]:
    """A row's error code and message for an unexpected failure while rendering it."""
    return str(RowError.INTERNAL_ERROR), f"render: {type(e).__name__}: {e}"


def render_block(
    block: pa.Table,
    *,
    cfg: PromptConfig,
    tokenizer_path: str,
    trust_remote_code: bool,
    passthrough: Sequence[str],
) -> pa.Table:
    """Ray Data stage: input rows → token ids (+ label first tokens) or an error code per row."""
    builder, runner = _builder(cfg, tokenizer_path, trust_remote_code)
    # Text columns go through bytes so invalid UTF-8 is caught per row, not for the whole block.
    for col in cfg.text_columns:
        if col in block.column_names and pa.types.is_string(block.schema.field(col).type):
            idx = block.column_names.index(col)
            block = block.set_column(idx, col, block.column(col).cast(pa.binary()))
    rows = block.to_pylist()
    n = len(rows)
    prompt_ids: list[list[int] | None] = [None] * n
    label_ids: list[list[int] | None] = [None] * n
    codes: list[str | None] = [None] * n
    messages: list[str | None] = [None] * n
    overrides: list[dict[str, Any] | None] = [None] * n
    texts: dict[int, str] = {}  # row index -> prompt text, tokenized below in one call
    for i, row in enumerate(rows):
        if row.get(INPUT_ERROR):
            codes[i], _, messages[i] = row[INPUT_ERROR].partition(":")
        elif row.get(openai_batch.BODY_COLUMN):  # an OpenAI batch request line (openai_batch.py)
            try:
                prompt_ids[i] = openai_batch.render_ids(builder.tokenizer, row)
                overrides[i] = json.loads(row[openai_batch.BODY_COLUMN]).get("sampling") or None
            except ValueError as e:
                codes[i], messages[i] = str(RowError.INVALID_REQUEST), str(e)
        else:
            try:
                texts[i] = builder.render_text(hygiene.template_row(row))  # input's own names
            except RowProblem as e:
                codes[i], messages[i] = str(e.code), e.message
            except Exception as e:  # a chat template's failure on odd input must not stop the job
                codes[i], messages[i] = _internal(e)
    classify = cfg.task["type"] == "classify"
    for i, ids in zip(texts, builder.encode_many(list(texts.values())), strict=True):
        if isinstance(ids, Exception):  # a tokenizer failure on odd input must not stop the job
            codes[i], messages[i] = _internal(ids)
            continue
        try:
            label_ids[i] = builder.label_token_ids(texts[i]) if classify else None
        except Exception as e:
            codes[i], messages[i] = _internal(e)
            continue
        prompt_ids[i] = ids
    budgets: list[int | None] = []
    for ids, labels, override in zip(prompt_ids, label_ids, overrides, strict=True):
        if ids is None:
            budgets.append(None)
        elif override and override.get("max_tokens"):  # a request line's own max_tokens
            budgets.append(int(override["max_tokens"]))
        else:
            budgets.append(runner.output_budget(labels))
    ntok = [len(ids) if ids is not None else None for ids in prompt_ids]
    cols = {"row_id": block.column("row_id")}
    for c in passthrough:
        cols[c] = block.column(c)
    cols.update(
        {
            "prompt_ids": pa.array(prompt_ids, pa.list_(pa.int32())),
            "label_ids": pa.array(label_ids, pa.list_(pa.int32())),
            "budget": pa.array(budgets, pa.int32()),
            "prompt_tokens": pa.array(ntok, pa.int32()),
            "error_code": pa.array(codes, pa.string()),
            "error_message": pa.array(messages, pa.string()),
            # per-row overrides (JSON) or null
            "sampling": pa.array([json.dumps(o) if o else None for o in overrides], pa.string()),
        }
    )
    return pa.table(cols)
