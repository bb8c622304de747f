"""Input hygiene: bad input poisons only its own row, and input names never clash with ours.

Owns: the rename rule for input columns named like the pipeline's own block columns (`row_id`,
`budget`, `prompt_ids`, ... → `input_<name>`, like result columns in the output), per-row checks of
read blocks (invalid UTF-8 in string columns, lone surrogates in parsed JSON values → `INVALID_UTF8`
in the INPUT_ERROR column, the bad cell nulled), ids for rows whose id could not be read (a bad JSONL
line: `-(position + 1)` for integer ids, `#row-<position>` for string ids), and the preflight checks
of ids (one type: integer or string) and kept columns (one type across files, or an error naming the
column and both types). `Hygiene` carries the plan's decisions to the read tasks.
Must not touch: rendering, engines, the output dir (read.py calls this; plan.py runs the checks).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from turbo_batch.errors import JobError, RowError, SpecError

# Columns of the blocks between read, render and the driver (read.INPUT_ERROR, render.RENDERED_COLUMNS).
BLOCK_COLUMNS = frozenset(
    {
        "row_id",
        "_input_error",
        "prompt_ids",
        "label_ids",
        "budget",
        "prompt_tokens",
        "error_code",
        "error_message",
    }
)
INPUT_ERROR = "_input_error"


def block_name(column: str) -> str:
    """The name an input column has inside the pipeline's blocks."""
    return f"input_{column}" if column in BLOCK_COLUMNS else column


def template_name(column: str) -> str:
    """The name a block column has for the prompt template (the input's own name)."""
    if column.startswith("input_") and column[6:] in BLOCK_COLUMNS:
        return column[6:]
    return column


def template_row(row: dict[str, Any]) -> dict[str, Any]:
    """A block row as the template sees it: the input's own column names, no internal columns."""
    return {template_name(k): v for k, v in row.items() if k not in ("row_id", INPUT_ERROR)}


def rename_block(block: pa.Table) -> pa.Table:
    names = [block_name(c) if c != INPUT_ERROR else c for c in block.column_names]
    return block.rename_columns(names) if names != block.column_names else block


@dataclass(frozen=True)
class Hygiene:
    """What the plan decided about the input, for the read tasks."""

    id_type: str | None = None  # "int" | "string" when the job has an id column
    kept_types: dict[str, pa.DataType] = field(default_factory=dict)  # block column -> output type


def _mark(errors: list[str | None], i: int, message: str) -> None:
    if errors[i] is None:
        errors[i] = message


def check_utf8(block: pa.Table) -> pa.Table:
    """Rows with invalid UTF-8 in a string column get INVALID_UTF8 and that cell nulled."""
    errors: list[str | None] | None = None
    for idx, name in enumerate(block.column_names):
        if name == INPUT_ERROR:
            continue
        col = block.column(idx)
        if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
            continue
        try:
            col.validate(full=True)
            continue
        except pa.ArrowInvalid:
            pass
        raw = col.cast(pa.large_binary() if pa.types.is_large_string(col.type) else pa.binary(), safe=False)
        values: list[str | None] = []
        if errors is None:
            errors = block.column(INPUT_ERROR).to_pylist()
        for i, v in enumerate(raw.to_pylist()):
            try:
                values.append(None if v is None else v.decode("utf-8"))
            except UnicodeDecodeError as e:
                values.append(None)
                _mark(
                    errors,
                    i,
                    f"{RowError.INVALID_UTF8}:column {template_name(name)!r} is not valid UTF-8: {e}",
                )
        block = block.set_column(idx, name, pa.array(values, col.type))
    if errors is not None:
        i = block.column_names.index(INPUT_ERROR)
        block = block.set_column(i, INPUT_ERROR, pa.array(errors, pa.string()))
    return block


def _bad_text(value: Any, depth: int = 0) -> bool:
    """A parsed JSON value holding a string that is not valid UTF-8 (lone surrogates)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
            return False
        except UnicodeEncodeError:
            return True
    if depth > 64:
        return False
    if isinstance(value, dict):
        return any(_bad_text(k, depth + 1) or _bad_text(v, depth + 1) for k, v in value.items())
    if isinstance(value, list):
        return any(_bad_text(v, depth + 1) for v in value)
    return False


def jsonl_row(obj: dict[str, Any], columns: Sequence[str], where: str) -> dict[str, Any]:
    """The needed columns of a parsed JSONL object, or an INVALID_UTF8 row (with its id if readable)."""
    row = {c: obj.get(c) for c in columns}
    bad = [c for c in columns if _bad_text(row[c])]
    if bad:
        for c in bad:
            row[c] = None
        row[INPUT_ERROR] = f"{RowError.INVALID_UTF8}:{where}: column {bad[0]!r} is not valid UTF-8"
    return row


def json_text(value: Any) -> str | None:
    """A JSONL value as text for a kept column (JSONL has no schema: kept columns are strings)."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


# ------------------------------------------------------------------------------------------------ ids


def fill_ids(block: pa.Table, first_row: int, id_column: str, id_type: str | None) -> pa.Array:
    """The block's id column as the job's id type; a row with a read problem and no id gets one."""
    col = block.column(block_name(id_column)).combine_chunks()
    if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
        col = pa.array([None if v is None else v.decode("utf-8", "replace") for v in col.to_pylist()])
    kind = id_type or ("int" if pa.types.is_integer(col.type) else "string")
    target = pa.int64() if kind == "int" else pa.string()
    problems = block.column(INPUT_ERROR).to_pylist()
    if col.null_count and any(p for p in problems):
        values = col.to_pylist()
        for i, p in enumerate(problems):
            if values[i] is None and p:
                values[i] = -(first_row + i + 1) if kind == "int" else f"#row-{first_row + i}"
        return pa.array(values, target) if kind == "int" else pa.array([_str_id(v) for v in values], target)
    if pa.types.is_null(col.type):
        return pa.nulls(len(col), target)
    if kind == "int":
        return col.cast(pa.int64())
    return col if col.type == pa.string() else col.cast(pa.string())


def _str_id(v: Any) -> str | None:
    return v if v is None or isinstance(v, str) else str(v)


def id_kind(values: Sequence[Any], where: str, column: str) -> str | None:
    """'int' or 'string' for raw id values (bools and floats refused); a mix is a clear error."""
    seen: dict[str, Any] = {}
    for v in values:
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int | str):
            raise SpecError(
                "job",
                [
                    f"input.id_column: {column!r} has a {type(v).__name__} value {v!r} in {where}; ids "
                    "must be integers or strings"
                ],
            )
        seen.setdefault("int" if isinstance(v, int) else "string", v)
        if len(seen) > 1:
            raise SpecError(
                "job",
                [
                    f"input.id_column: {column!r} mixes integer and string ids (e.g. {seen['int']!r} and "
                    f"{seen['string']!r}) in {where}; ids must all be one type"
                ],
            )
    return next(iter(seen), None)


def arrow_id_kind(t: pa.DataType, where: str, column: str) -> str | None:
    if pa.types.is_integer(t):
        return "int"
    if (
        pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
    ):
        return "string"
    if pa.types.is_null(t):
        return None
    raise SpecError(
        "job", [f"input.id_column: {column!r} is {t} in {where}; ids must be integers or strings"]
    )


def one_id_kind(kinds: dict[str, str | None], column: str) -> str | None:
    found = {k: w for w, k in kinds.items() if k}
    if len(found) > 1:
        raise SpecError(
            "job",
            [
                f"input.id_column: {column!r} is integer in {found['int']} and string in {found['string']}; "
                "ids must all be one type"
            ],
        )
    return next(iter(found), None)


# ------------------------------------------------------------------------------------------ kept types


def unify_kept(schemas: Sequence[tuple[str, pa.Schema]], columns: Sequence[str]) -> dict[str, pa.DataType]:
    """One output type per kept column across files (numbers widen), or an error naming both types."""
    out: dict[str, pa.DataType] = {}
    problems = []
    for c in columns:
        typed = [(w, s.field(c).type) for w, s in schemas if c in s.names]
        if not typed:
            continue
        cur_where, cur = typed[0]
        for where, t in typed[1:]:
            if t == cur or pa.types.is_null(t):
                continue
            if pa.types.is_null(cur):
                cur, cur_where = t, where
                continue
            try:
                cur = (
                    pa.unify_schemas(
                        [pa.schema([pa.field(c, cur)]), pa.schema([pa.field(c, t)])],
                        promote_options="permissive",
                    )
                    .field(c)
                    .type
                )
            except (pa.ArrowTypeError, pa.ArrowInvalid, pa.ArrowNotImplementedError):
                problems.append(
                    f"output.keep_columns: column {c!r} is {cur} in {cur_where} but {t} in {where}; "
                    "make the input files agree"
                )
                break
        out[block_name(c)] = cur
    if problems:
        raise SpecError("job", problems)
    return out


def cast_kept(block: pa.Table, kept_types: dict[str, pa.DataType]) -> pa.Table:
    for name, t in kept_types.items():
        if name in block.column_names and block.schema.field(name).type != t:
            idx = block.column_names.index(name)
            try:
                block = block.set_column(idx, name, block.column(idx).cast(t))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise JobError(f"output.keep_columns: column {name!r} cannot be read as {t}: {e}") from None
    return block
