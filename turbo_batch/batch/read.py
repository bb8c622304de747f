"""Reading job input as a Ray Data dataset with a stable `row_id`.

Inputs: parquet files/dirs/globs, JSONL files, or a Hugging Face dataset saved with `save_to_disk`
(its Arrow files are read directly, memory-mapped). `RowSource` is a Ray Data `Datasource`: the
driver plans read units (a parquet row group, or a whole JSONL/Arrow file) from metadata alone, and
read tasks run across the cluster: one per unit, or one for every unit of a small input (run.py).
Every row gets `row_id` = its position in the input (files in sorted order), or the value of the
job's id column; rows already committed by an earlier run are dropped inside the read tasks, so a
resumed job never re-reads them into the pipeline. This module does not render prompts or talk to
engines.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from turbo_batch.batch import hygiene
from turbo_batch.errors import JobError, RowError

INPUT_ERROR = "_input_error"  # column carrying a per-row read problem (e.g. a bad JSONL line)
BLOCK_ROWS = 4096
ROW_BYTES = 512  # a guess of one input row in memory, for Ray Data's size estimates
JSONL_EXT = (".jsonl", ".ndjson", ".json")


@dataclass(frozen=True)
class Unit:
    """One read task's share of the input."""

    path: str
    fmt: str  # parquet | jsonl | hf
    first_row: int  # position of the unit's first row in the whole input
    num_rows: int
    row_group: int | None = None


# ------------------------------------------------------------------------------------------ discovery


def _hf_arrow_files(path: Path, split: str | None) -> list[str]:
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        if split is None:
            if len(splits) != 1:
                raise JobError(f"input.split: {path} is a DatasetDict with splits {splits}; name one")
            split = splits[0]
        if split not in splits:
            raise JobError(f"input.split: {split!r} not in {path} (splits: {', '.join(splits)})")
        path = path / split
    state = json.loads((path / "state.json").read_text())
    return [str(path / f["filename"]) for f in state["_data_files"]]


def discover(paths: Sequence[str], fmt: str = "auto", split: str | None = None) -> list[tuple[str, str]]:
    """Expand the job's input paths into a sorted list of (file, format)."""
    out: list[tuple[str, str]] = []
    for raw in paths:
        p = Path(os.path.expanduser(raw))
        if p.is_dir() and (
            fmt == "hf"
            or (fmt == "auto" and ((p / "state.json").is_file() or (p / "dataset_dict.json").is_file()))
        ):
            out += [(f, "hf") for f in _hf_arrow_files(p, split)]
            continue
        if p.is_dir():
            found = sorted(
                str(f)
                for f in p.rglob("*")
                if f.is_file() and not f.name.startswith(("_", ".")) and f.suffix in (".parquet", *JSONL_EXT)
            )
        elif any(ch in raw for ch in "*?["):
            found = sorted(glob.glob(os.path.expanduser(raw), recursive=True))
        elif p.is_file():
            found = [str(p)]
        else:
            raise JobError(f"input.path: {raw} does not exist")
        for f in found:
            kind = fmt if fmt != "auto" else ("jsonl" if f.endswith(JSONL_EXT) else "parquet")
            out.append((f, kind))
    if not out:
        raise JobError(f"input.path: no input files found under {', '.join(paths)}")
    return out


def _count_jsonl(path: str) -> int:
    with open(path, "rb") as fh:
        return sum(1 for line in fh if line.strip())


def _hf_table(path: str) -> pa.Table:
    with pa.memory_map(path) as src:
        try:
            return pa.ipc.open_stream(src).read_all()
        except pa.ArrowInvalid:
            return pa.ipc.open_file(src).read_all()


def plan_units(files: Sequence[tuple[str, str]], limit: int | None = None) -> list[Unit]:
    """Read units in input order, with global row offsets, truncated at `limit` rows."""
    units: list[Unit] = []
    offset = 0
    for path, fmt in files:
        if fmt == "parquet":
            try:
                md = pq.ParquetFile(path).metadata
            except (pa.ArrowInvalid, OSError) as e:
                raise JobError(f"input.path: {path} is not a readable parquet file: {e}") from None
            parts = [(md.row_group(i).num_rows, i) for i in range(md.num_row_groups)]
        elif fmt in ("jsonl", "openai_batch"):
            parts = [(_count_jsonl(path), None)]
        else:
            parts = [(_hf_table(path).num_rows, None)]
        for n, rg in parts:
            if limit is not None:
                n = min(n, limit - offset)
            if n <= 0:
                continue
            units.append(Unit(path, fmt, offset, n, rg))
            offset += n
        if limit is not None and offset >= limit:
            break
    return units


def input_columns(files: Sequence[tuple[str, str]]) -> set[str] | None:
    """Columns every file has (None for JSONL, whose rows may differ)."""
    cols: set[str] | None = None
    for path, fmt in files:
        if fmt in ("jsonl", "openai_batch"):
            return None
        names = set(pq.read_schema(path).names) if fmt == "parquet" else set(_hf_table(path).schema.names)
        cols = names if cols is None else cols & names
    return cols


# ---------------------------------------------------------------------------------------------- reading


def _jsonl_rows(path: str, columns: Sequence[str]) -> Iterator[dict[str, Any]]:
    with open(path, "rb") as fh:
        for lineno, line in enumerate((ln for ln in fh if ln.strip()), 1):
            text = line.decode("utf-8", errors="surrogateescape")
            try:
                obj = json.loads(text)
                if not isinstance(obj, dict):
                    raise ValueError("not a JSON object")
            except (ValueError, RecursionError) as e:  # RecursionError: JSON nested too deep
                why = "nested too deep" if isinstance(e, RecursionError) else e
                yield {INPUT_ERROR: f"{RowError.BAD_INPUT_LINE}:{path} line {lineno}: {why}"}
                continue
            yield hygiene.jsonl_row(obj, columns, f"{path} line {lineno}")


def _column(values: list[Any]) -> pa.Array:
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array(
            [None if v is None else (v if isinstance(v, str) else json.dumps(v, default=str)) for v in values]
        )


def _to_table(rows: list[dict[str, Any]], columns: Sequence[str]) -> pa.Table:
    data = {c: _column([r.get(c) for r in rows]) for c in columns}
    data[INPUT_ERROR] = pa.array([r.get(INPUT_ERROR) for r in rows], pa.string())
    return pa.table(data)


def read_unit(unit: Unit, columns: Sequence[str]) -> Iterator[pa.Table]:
    """Blocks of `columns` + INPUT_ERROR for one unit (row_id not yet attached)."""
    if unit.fmt == "parquet":
        pf = pq.ParquetFile(unit.path)
        table = pf.read_row_group(unit.row_group, columns=list(columns)).slice(0, unit.num_rows)
        for start in range(0, table.num_rows, BLOCK_ROWS):
            part = table.slice(start, BLOCK_ROWS)
            yield part.append_column(INPUT_ERROR, pa.nulls(part.num_rows, pa.string()))
    elif unit.fmt == "hf":
        table = _hf_table(unit.path).select(list(columns)).slice(0, unit.num_rows)
        for start in range(0, table.num_rows, BLOCK_ROWS):
            part = table.slice(start, BLOCK_ROWS)
            yield part.append_column(INPUT_ERROR, pa.nulls(part.num_rows, pa.string()))
    else:
        rows: list[dict[str, Any]] = []
        lines = _jsonl_rows(unit.path, columns)
        if unit.fmt == "openai_batch":  # request lines → custom_id, url, validated body (openai_batch.py)
            from turbo_batch.batch import openai_batch

            columns = list(dict.fromkeys([*columns, openai_batch.URL_COLUMN, openai_batch.BODY_COLUMN]))
            lines = openai_batch.read_rows(unit.path, columns)
        for i, row in enumerate(lines):
            if i >= unit.num_rows:
                break
            rows.append(row)
            if len(rows) == BLOCK_ROWS:
                yield _to_table(rows, columns)
                rows = []
        if rows:
            yield _to_table(rows, columns)


def attach_row_ids(
    block: pa.Table, first_row: int, id_column: str | None, id_type: str | None = None
) -> pa.Table:
    if id_column is None:
        ids = pa.array(range(first_row, first_row + block.num_rows), pa.int64())
    else:  # a row with a read problem and no readable id gets one from its position (hygiene.py)
        ids = hygiene.fill_ids(block, first_row, id_column, id_type)
    return block.add_column(0, "row_id", ids)


def clean_block(block: pa.Table, hyg: hygiene.Hygiene | None) -> pa.Table:
    """Input names clashing with the pipeline's renamed, bad UTF-8 per row, kept columns one type."""
    block = hygiene.check_utf8(hygiene.rename_block(block))
    return hygiene.cast_kept(block, hyg.kept_types) if hyg is not None else block


def drop_committed(block: pa.Table, committed: pa.Array | None) -> pa.Table:
    if committed is None or len(committed) == 0:
        return block
    keep = pc.invert(pc.is_in(block.column("row_id"), value_set=committed.cast(block.column("row_id").type)))
    return block.filter(keep)


def _read_fn(
    unit: Unit,
    columns: tuple[str, ...],
    id_column: str | None,
    committed_ref: Any,
    hyg: hygiene.Hygiene | None = None,
):
    def read() -> Iterator[pa.Table]:
        import ray

        committed = ray.get(committed_ref) if committed_ref is not None else None
        offset = unit.first_row
        id_type = hyg.id_type if hyg is not None else None
        for block in read_unit(unit, columns):
            n = block.num_rows
            block = clean_block(block, hyg)
            block = drop_committed(attach_row_ids(block, offset, id_column, id_type), committed)
            offset += n
            if block.num_rows:
                yield block

    return read


def _one_task_fn(
    reads: list[Callable[[], Iterator[pa.Table]]], arrange: Callable[[pa.Table], pa.Table] | None
):
    """Every unit in one read task; `arrange` (the order stage, order.py) sees the whole input at once."""

    def read() -> Iterator[pa.Table]:
        blocks = (block for fn in reads for block in fn())
        if arrange is None:
            yield from blocks
            return
        got = list(blocks)
        if not got:
            return
        table = arrange(pa.concat_tables(got, promote_options="permissive"))
        for start in range(0, table.num_rows, BLOCK_ROWS):
            yield table.slice(start, BLOCK_ROWS)

    return read


def make_datasource(
    units: Sequence[Unit],
    columns: Sequence[str],
    id_column: str | None,
    committed: pa.Array | None,
    hyg: hygiene.Hygiene | None = None,
    *,
    one_task: bool = False,
    arrange: Callable[[pa.Table], pa.Table] | None = None,
):
    """A Ray Data Datasource over the planned units (imports Ray): one read task per unit, or with
    `one_task` (a small input) one task for all of them, whose blocks `arrange` may reorder whole."""
    import ray
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    committed_ref = ray.put(committed) if committed is not None and len(committed) else None
    cols = tuple(dict.fromkeys(columns))

    class RowSource(Datasource):
        def estimate_inmemory_data_size(self) -> int | None:
            return sum(u.num_rows for u in units) * ROW_BYTES

        def get_read_tasks(
            self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None
        ):
            if one_task and units:
                reads = [_read_fn(u, cols, id_column, committed_ref, hyg) for u in units]
                files = list(dict.fromkeys(u.path for u in units))
                size = self.estimate_inmemory_data_size()
                meta = BlockMetadata(num_rows=None, size_bytes=size, exec_stats=None, input_files=files)
                return [ReadTask(_one_task_fn(reads, arrange), meta)]
            return [
                ReadTask(
                    _read_fn(u, cols, id_column, committed_ref, hyg),
                    BlockMetadata(
                        num_rows=None,
                        size_bytes=u.num_rows * ROW_BYTES,
                        exec_stats=None,
                        input_files=[u.path],
                    ),
                )
                for u in units
            ]

        def get_name(self) -> str:
            return "TurboBatchInput"

    return RowSource()


def read_ids(units: Sequence[Unit], id_column: str, id_type: str | None = None) -> pa.ChunkedArray:
    """All ids of the input in order (to check uniqueness before a job starts)."""
    chunks = []
    for u in units:
        offset = u.first_row
        for block in read_unit(u, [id_column]):
            n = block.num_rows
            block = clean_block(block, None)
            chunks.append(attach_row_ids(block, offset, id_column, id_type).column("row_id"))
            offset += n
    return pa.chunked_array(chunks) if chunks else pa.chunked_array([], pa.int64())
