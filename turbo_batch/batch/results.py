"""Results: the output schema, the rows waiting to be committed, and when a part is written.

Owns: `RESULT_COLUMNS`, `output_schema()` (row_id, kept input columns, the task's result columns, token
counts, error code/message), `ResultBuffer` (joins each result with its kept input columns, feeds the
summary's `Stats`, and commits a part when it is full or its oldest row has waited `FLUSH_SECONDS`;
one commit at a time). Must not touch: dispatch or engines (driver.py), the commit protocol's files
(write.py does that; this module only calls `OutputDir.commit`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

import pyarrow as pa

from turbo_batch.batch import report
from turbo_batch.batch.hygiene import block_name
from turbo_batch.batch.timeline import Timeline
from turbo_batch.batch.write import OutputDir
from turbo_batch.spec import ClassifyTask, ExtractTask, JobSpec

RESULT_COLUMNS = frozenset(
    {
        "row_id",
        "label",
        "probs",
        "text",
        "json",
        "finish_reason",
        "prompt_tokens",
        "output_tokens",
        "error_code",
        "error_message",
        "engine",
    }
)
FLUSH_SECONDS = 20.0


def output_names(passthrough: Sequence[str]) -> dict[str, str]:
    """Input columns copied to the output keep their names unless a result column has that name."""
    return {c: (f"input_{c}" if c in RESULT_COLUMNS else c) for c in passthrough}


def output_schema(job: JobSpec, rendered: pa.Schema, passthrough: Sequence[str]) -> pa.Schema:
    names = output_names(passthrough)
    fields = [rendered.field("row_id")]
    for c in passthrough:
        f = rendered.field(c)
        fields.append(pa.field(names[c], pa.string() if pa.types.is_null(f.type) else f.type))
    if isinstance(job.task, ClassifyTask):
        fields += [
            pa.field("label", pa.string()),
            pa.field("probs", pa.struct([pa.field(lab, pa.float64()) for lab in job.task.labels])),
        ]
    elif isinstance(job.task, ExtractTask):
        fields += [
            pa.field("json", pa.string()),
            pa.field("text", pa.string()),
            pa.field("finish_reason", pa.string()),
        ]
    else:
        fields += [pa.field("text", pa.string()), pa.field("finish_reason", pa.string())]
    fields += [
        pa.field("prompt_tokens", pa.int32()),
        pa.field("output_tokens", pa.int32()),
        pa.field("error_code", pa.string()),
        pa.field("error_message", pa.string()),
        pa.field("engine", pa.string()),  # the slot that ran the row (null: it never reached one)
    ]
    return pa.schema(fields)


class ResultBuffer:
    """Result rows on their way to a committed part."""

    def __init__(
        self,
        job: JobSpec,
        passthrough: Sequence[str],
        out: OutputDir,
        on_progress: Callable[[int], None] = lambda n: None,
    ):
        self.job = job
        self.out = out
        self.passthrough_columns = list(passthrough)
        self.out_names = output_names(passthrough)
        self.on_progress = on_progress
        task = job.task
        gold = task.gold_column if isinstance(task, ClassifyTask) else None
        self.stats = report.Stats(
            task.labels if isinstance(task, ClassifyTask) else (),
            self.out_names[block_name(gold)] if gold else None,
            task.gold_map if isinstance(task, ClassifyTask) else None,
        )
        self.schema: pa.Schema | None = None
        self.kept: dict[Any, dict[str, Any]] = {}  # row_id -> kept input columns, until its result
        self.rows: list[dict[str, Any]] = []
        self.oldest: float | None = None  # when the oldest row still in the buffer arrived
        self._commit = asyncio.Lock()  # one part at a time: parts get distinct names, in order
        self.timeline = Timeline(out.path, out.run_no)  # the report's time series (timeline.py)

    def keep(self, row: dict[str, Any]) -> None:
        """Remember a rendered row's kept input columns (joined with its result in `add`)."""
        self.kept[row["row_id"]] = {self.out_names[c]: row[c] for c in self.passthrough_columns}

    def set_schema(self, rendered: pa.Schema) -> None:
        if self.schema is None:
            self.schema = output_schema(self.job, rendered, self.passthrough_columns)

    async def add(self, results: Sequence[dict[str, Any]]) -> None:
        if results and self.oldest is None:
            self.oldest = time.monotonic()
        for r in results:
            row = {**self.kept.pop(r["row_id"], {}), **r}
            self.stats.add(row)
            self.rows.append(row)
        self.timeline.observe(results)
        self.on_progress(len(results))
        # a part is full, or a row has waited FLUSH_SECONDS (a slow job still commits often, so a crash
        # loses little; the clock starts at the first buffered row, not at driver start)
        if len(self.rows) >= self.job.output.part_rows or (
            self.oldest is not None and time.monotonic() - self.oldest > FLUSH_SECONDS
        ):
            await self.flush()

    async def flush(self) -> None:
        async with self._commit:
            part_rows = self.job.output.part_rows
            while self.rows:
                rows, self.rows = self.rows[:part_rows], self.rows[part_rows:]
                table = pa.Table.from_pylist(rows, schema=self.schema)
                await asyncio.to_thread(self.out.commit, table)
            self.oldest = None
            self.timeline.flush()
