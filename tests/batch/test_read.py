"""batch/read.py without Ray: which files a job reads, in what order, and the row_id every row gets.

The read tasks are called as Ray Data would call them (`_read_fn(...)()`), so the ids checked here are
the ids the pipeline attaches.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from turbo_batch.batch.read import (
    INPUT_ERROR,
    Unit,
    _read_fn,
    discover,
    drop_committed,
    input_columns,
    plan_units,
    read_ids,
)
from turbo_batch.errors import JobError


def _parquet(path, texts, row_group_size=None):
    pq.write_table(
        pa.table({"text": texts, "n": list(range(len(texts)))}), path, row_group_size=row_group_size
    )


def _jsonl(path, texts, blank_lines=False):
    lines = [json.dumps({"text": t}) for t in texts]
    sep = "\n\n" if blank_lines else "\n"
    path.write_text(sep.join(lines) + "\n")


def read_all(units, columns=("text",), id_column=None, committed=None):
    """(row_id, text) of every row, in the order the read tasks yield them."""
    out = []
    for u in units:
        for block in _read_fn(u, tuple(columns), id_column, None)():
            block = drop_committed(block, committed)
            out += list(
                zip(block.column("row_id").to_pylist(), block.column("text").to_pylist(), strict=True)
            )
    return out


@pytest.fixture()
def tree(tmp_path):
    """d/a.parquet (5 rows, row groups 2+2+1), d/b.jsonl (3 rows), d/sub/c.parquet (2 rows), and noise."""
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    _parquet(d / "a.parquet", ["a0", "a1", "a2", "a3", "a4"], row_group_size=2)
    _jsonl(d / "b.jsonl", ["b0", "b1", "b2"], blank_lines=True)
    _parquet(d / "sub" / "c.parquet", ["c0", "c1"])
    _parquet(d / "_hidden.parquet", ["x"])
    _jsonl(d / ".dot.jsonl", ["x"])
    (d / "notes.txt").write_text("not input")
    return d


def test_directory_is_read_recursively_in_sorted_order(tree):
    files = discover([str(tree)])
    assert files == [
        (str(tree / "a.parquet"), "parquet"),
        (str(tree / "b.jsonl"), "jsonl"),
        (str(tree / "sub" / "c.parquet"), "parquet"),
    ]
    units = plan_units(files)
    assert [(u.path.rsplit("/", 1)[1], u.first_row, u.num_rows, u.row_group) for u in units] == [
        ("a.parquet", 0, 2, 0),
        ("a.parquet", 2, 2, 1),
        ("a.parquet", 4, 1, 2),
        ("b.jsonl", 5, 3, None),
        ("c.parquet", 8, 2, 0),
    ]
    assert read_all(units) == [
        (0, "a0"), (1, "a1"), (2, "a2"), (3, "a3"), (4, "a4"),
        (5, "b0"), (6, "b1"), (7, "b2"),
        (8, "c0"), (9, "c1"),
    ]  # fmt: skip


def test_ids_do_not_depend_on_file_creation_order(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    for name in ("z.jsonl", "m.jsonl", "a.jsonl"):  # created in reverse order
        _jsonl(d / name, [f"{name[0]}0", f"{name[0]}1"])
    assert read_all(plan_units(discover([str(d)]))) == [
        (0, "a0"), (1, "a1"), (2, "m0"), (3, "m1"), (4, "z0"), (5, "z1"),
    ]  # fmt: skip


def test_globs_and_several_paths_keep_the_order_they_are_listed_in(tree):
    # each path expands to sorted files; the paths themselves are taken in the order given. A glob takes
    # what it matches (a `_` file too); only directory listings skip `_`/`.` files.
    files = discover([str(tree / "sub" / "*.parquet"), str(tree / "*.parquet"), str(tree / "b.jsonl")])
    assert [f.rsplit("/", 1)[1] for f, _ in files] == ["c.parquet", "_hidden.parquet", "a.parquet", "b.jsonl"]
    ids = read_all(plan_units(files))
    assert [t for _, t in ids] == ["c0", "c1", "x", "a0", "a1", "a2", "a3", "a4", "b0", "b1", "b2"]
    assert [i for i, _ in ids] == list(range(11))
    recursive = discover([str(tree / "**" / "*.parquet")])
    assert [f.rsplit("/", 1)[1] for f, _ in recursive] == ["_hidden.parquet", "a.parquet", "c.parquet"]


def test_limit_cuts_inside_a_row_group_and_skips_later_files(tree):
    units = plan_units(discover([str(tree)]), limit=6)
    assert [(u.first_row, u.num_rows) for u in units] == [(0, 2), (2, 2), (4, 1), (5, 1)]
    assert read_all(units) == [(0, "a0"), (1, "a1"), (2, "a2"), (3, "a3"), (4, "a4"), (5, "b0")]
    assert [(u.first_row, u.num_rows) for u in plan_units(discover([str(tree)]), limit=3)] == [(0, 2), (2, 1)]
    assert read_all(plan_units(discover([str(tree)]), limit=3))[-1] == (2, "a2")


def test_committed_rows_are_dropped_but_keep_their_ids(tree):
    units = plan_units(discover([str(tree)]))
    left = read_all(units, committed=pa.array([0, 1, 5, 9], pa.int64()))
    assert left == [(2, "a2"), (3, "a3"), (4, "a4"), (6, "b1"), (7, "b2"), (8, "c0")]


def test_id_column_gives_the_row_ids(tmp_path):
    _jsonl(tmp_path / "in.jsonl", ["x", "y"])
    lines = [json.dumps({"uid": u, "text": t}) for u, t in (("k9", "x"), ("k1", "y"))]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    units = plan_units(discover([str(tmp_path / "in.jsonl")]))
    assert read_all(units, columns=("uid", "text"), id_column="uid") == [("k9", "x"), ("k1", "y")]
    assert read_ids(units, "uid").to_pylist() == ["k9", "k1"]
    pq.write_table(
        pa.table({"uid": pa.array([7, 3], pa.int32()), "text": ["p", "q"]}), tmp_path / "i.parquet"
    )
    units = plan_units(discover([str(tmp_path / "i.parquet")]))
    assert read_all(units, columns=("uid", "text"), id_column="uid") == [(7, "p"), (3, "q")]
    assert read_ids(units, "uid").type == pa.int64()


def test_bad_jsonl_line_is_a_row_with_an_input_error(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"text": "a"}\nnot json\n\n["list"]\n{"text": "b"}\n')
    units = plan_units(discover([str(tmp_path / "in.jsonl")]))
    assert units == [Unit(str(tmp_path / "in.jsonl"), "jsonl", 0, 4)]
    (block,) = list(_read_fn(units[0], ("text",), None, None)())
    rows = block.to_pylist()
    assert [r["row_id"] for r in rows] == [0, 1, 2, 3]
    assert [r["text"] for r in rows] == ["a", None, None, "b"]
    assert rows[0][INPUT_ERROR] is None and rows[3][INPUT_ERROR] is None
    assert rows[1][INPUT_ERROR].startswith(f"BAD_INPUT_LINE:{tmp_path / 'in.jsonl'} line 2: ")
    assert rows[2][INPUT_ERROR].endswith("line 3: not a JSON object")


def test_input_columns_is_the_intersection_and_none_with_jsonl(tree, tmp_path):
    pq.write_table(pa.table({"text": ["x"], "other": [1]}), tmp_path / "o.parquet")
    both = discover([str(tree / "a.parquet"), str(tmp_path / "o.parquet")])
    assert input_columns(both) == {"text"}
    assert input_columns(discover([str(tree)])) is None


def test_missing_inputs_are_clear_errors(tmp_path):
    with pytest.raises(JobError, match="does not exist"):
        discover([str(tmp_path / "nope.parquet")])
    with pytest.raises(JobError, match="no input files found"):
        discover([str(tmp_path / "*.parquet")])
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(JobError, match="not a readable parquet file"):
        plan_units(discover([str(tmp_path / "bad.parquet")]))
