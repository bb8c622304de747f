"""Preflight rendering: the prompt rendered over a sample of real input rows before Ray or an engine.

Owns: `sample_rows(plan)` (the first `FIRST` rows and up to `SPREAD` more spread over the input) and
`check_rendering(plan)` (renders them with the job's templates under the sandbox's limits; a template
that fails on every sampled row is a SpecError naming the template, the error and a sample row id;
one that fails on some rows goes on, those rows become TEMPLATE_ERROR). The tokenizer is not loaded
here (seconds); the Jinja rendering, where hopeless jobs fail, is. Must not touch: Ray, engines, the
output dir.
"""

from __future__ import annotations

import time
from typing import Any

from turbo_batch.batch import hygiene
from turbo_batch.batch.read import INPUT_ERROR, attach_row_ids, clean_block, read_unit
from turbo_batch.errors import RowError, SpecError
from turbo_batch.prompt import PromptBuilder, PromptConfig, RowProblem, template_variables
from turbo_batch.spec import ClassifyTask

FIRST = 64
SPREAD = 64
ROW_SECONDS = 1.0  # per row here (the render stage allows sandbox.RENDER_SECONDS)
BUDGET_SECONDS = 20.0  # the whole check; `validate` never hangs
MAX_TIMEOUTS = 3  # timed-out rows with no success before the check gives up on the template


def needed_columns(job: Any) -> list[str]:
    """Every input column the pipeline reads: text, template variables, kept, id, gold, group_by."""
    cfg = PromptConfig.from_job(job)
    names = list(job.input.text_columns)
    for src in (cfg.user_template, cfg.system_template):
        if src:
            names += sorted(template_variables(src) - {"labels", "label_descriptions", "schema"})
    names += list(job.output.keep_columns)
    if job.input.id_column:
        names.append(job.input.id_column)
    if isinstance(job.task, ClassifyTask) and job.task.gold_column:
        names.append(job.task.gold_column)
    if job.prompt.group_by and job.prompt.order != "none":  # read for the order stage (order.py)
        names.append(job.prompt.group_by)
    return list(dict.fromkeys(names))


def _rows(plan: Any, unit: Any, limit: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    offset = unit.first_row
    id_type = plan.hygiene.id_type if getattr(plan, "hygiene", None) else None
    for block in read_unit(unit, plan.columns):
        n = block.num_rows
        block = attach_row_ids(clean_block(block, None), offset, plan.job.input.id_column, id_type)
        offset += n
        out += block.slice(0, limit - len(out)).to_pylist()
        if len(out) >= limit:
            break
    return out


def light_plan(job: Any) -> Any:
    """Enough of a plan to sample rows (for `validate`): files, units, columns; no ids, no model."""
    from types import SimpleNamespace

    from turbo_batch.batch.read import discover, plan_units

    files = discover(job.input.paths, job.input.format, job.input.split)
    units = plan_units(files, job.input.limit)
    return SimpleNamespace(job=job, units=units, columns=needed_columns(job), hygiene=None)


def sample_rows(plan: Any) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    units = list(plan.units)
    used = 0
    for u in units:
        if len(rows) >= FIRST:
            break
        rows += _rows(plan, u, FIRST - len(rows))
        used += 1
    rest = units[used:]
    if rest:  # a few rows from units spread over the rest of the input
        picks = sorted(
            {round(i * (len(rest) - 1) / max(1, min(16, len(rest)) - 1)) for i in range(min(16, len(rest)))}
        )
        per = max(1, SPREAD // len(picks))
        for i in picks:
            rows += _rows(plan, rest[i], per)
    return rows


def check_rendering(plan: Any) -> dict[str, Any]:
    """Render the sample; raise SpecError if the template fails on every sampled row it rendered."""
    job = plan.job
    if job.input.format == "openai_batch":
        return {"rows": 0}
    builder = PromptBuilder(PromptConfig.from_job(job), None)
    ok = failed = timeouts = 0
    first: tuple[Any, str] | None = None
    t0 = time.monotonic()
    used: set[str] = set()
    for src in (job.prompt.template, job.prompt.system):
        used |= template_variables(src) if src else set()
    for row in sample_rows(plan):
        if row.get(INPUT_ERROR) or any(row.get(v) is None for v in used if v in row):
            continue  # a bad or null cell is that row's problem, not evidence against the template
        try:
            builder.render_parts(hygiene.template_row(row), seconds=ROW_SECONDS)
            ok += 1
            break  # one good row is enough: the template can work
        except RowProblem as e:
            if e.code != RowError.TEMPLATE_ERROR:
                continue  # an empty or bad cell says nothing about the template
            failed += 1
            first = first or (row["row_id"], e.message)
            timeouts += "longer than" in e.message
        if timeouts >= MAX_TIMEOUTS or time.monotonic() - t0 > BUDGET_SECONDS:
            break
    if failed and not ok:
        rid, message = first  # type: ignore[misc]
        which = message.split(":", 1)[0]
        source = job.prompt.system if which == "prompt.system" else job.prompt.template
        shown = repr(source if source is None or len(source) <= 80 else source[:77] + "...")
        raise SpecError(
            "job",
            [
                f"{which}: the template failed on every sampled row ({failed} rendered), e.g. row "
                f"{rid!r}: {message.split(':', 1)[1].strip()} (template: {shown})"
            ],
        )
    return {"rows": ok + failed, "ok": ok, "failed": failed}
