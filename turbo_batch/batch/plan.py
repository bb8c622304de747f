"""Plan: every check that needs the data or the machine, before Ray or any engine starts.

Owns: `preflight(job) -> Plan` (input files and read units, the columns the pipeline reads and copies,
id uniqueness, the model path, vLLM engine keys, the resume fingerprint) and `Plan` itself.
Must not touch: Ray, engines, the output dir's contents (run.py opens it), rendering of rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from turbo_batch.batch.read import Unit, discover, input_columns, plan_units, read_ids
from turbo_batch.errors import JobError, SpecError
from turbo_batch.paths import check_local_model
from turbo_batch.prompt import PromptConfig, template_variables
from turbo_batch.spec import ClassifyTask, JobSpec, resolve_output_dir


@dataclass
class Plan:
    job: JobSpec
    files: list[tuple[str, str]]
    units: list[Unit]
    columns: list[str]  # input columns the pipeline reads
    passthrough: list[str]  # input columns copied to the output
    output_dir: Path
    total_rows: int
    fingerprint: str


def _needed_columns(job: JobSpec) -> list[str]:
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


def _check_engine_keys(job: JobSpec) -> None:
    if not job.model.engine or importlib.util.find_spec("vllm") is None:
        return
    from vllm.engine.arg_utils import AsyncEngineArgs

    known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    bad = sorted(set(job.model.engine) - known)
    if bad:
        raise SpecError("job", [f"model.engine.{k}: not a vLLM engine argument" for k in bad])


def preflight(job: JobSpec) -> Plan:
    """Every check that needs the data or the machine, before Ray or an engine starts."""
    out_dir = resolve_output_dir(job)
    files = discover(job.input.paths, job.input.format, job.input.split)
    units = plan_units(files, job.input.limit)
    needed = _needed_columns(job)
    have = input_columns(files)
    if have is not None:
        missing = [c for c in needed if c not in have]
        if missing:
            where = {c: _field_of(job, c) for c in missing}
            raise SpecError(
                "job",
                [
                    f"{where[c]}: column {c!r} is not in the input (columns: {', '.join(sorted(have))})"
                    for c in missing
                ],
            )
    if job.input.id_column:
        ids = read_ids(units, job.input.id_column)
        if ids.null_count:
            raise JobError(f"input.id_column: {job.input.id_column!r} has {ids.null_count} null values")
        if len(ids) != len(ids.unique()):
            raise JobError(
                f"input.id_column: {job.input.id_column!r} has duplicate values; ids must be unique"
            )
    missing = check_local_model(job.model.path)
    if missing:
        raise JobError(f"model.path: {missing}")
    _check_engine_keys(job)
    signature = [(Path(f).name, os.path.getsize(f)) for f, _ in files]
    fp = hashlib.sha256((job.fingerprint() + repr(signature)).encode()).hexdigest()[:16]
    passthrough = list(
        dict.fromkeys(
            list(job.output.keep_columns)
            + ([job.task.gold_column] if isinstance(job.task, ClassifyTask) and job.task.gold_column else [])
        )
    )
    return Plan(job, files, units, needed, passthrough, out_dir, sum(u.num_rows for u in units), fp)


def _field_of(job: JobSpec, column: str) -> str:
    if column in job.input.text_columns:
        return "input.text_columns"
    if column == job.input.id_column:
        return "input.id_column"
    if column in job.output.keep_columns:
        return "output.keep_columns"
    if isinstance(job.task, ClassifyTask) and column == job.task.gold_column:
        return "task.gold_column"
    if column == job.prompt.group_by:
        return "prompt.group_by"
    return "prompt.template"
