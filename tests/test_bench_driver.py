"""benchmarks/bench_driver.py runs the real Driver with instant fake engines: keep it runnable, and check
that the numpy prompt_ids path commits every row exactly once with the right token counts."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pyarrow as pa

from turbo_batch.batch.driver import rows_of
from turbo_batch.batch.write import read_output

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_driver


def test_driver_bench_commits_every_row_once(tmp_path):
    r = asyncio.run(bench_driver.run_once(3, 2500, 64, tmp_path))
    assert r["rows"] == 2500 and r["rows_s"] > 0
    out = read_output(tmp_path / "out-3")
    assert sorted(out.column("row_id").to_pylist()) == list(range(2500))
    assert set(out.column("prompt_tokens").to_pylist()) == {64}


def test_rows_of_keeps_ids_nulls_and_columns():
    block = pa.table(
        {
            "row_id": [0, 1, 2],
            "prompt_ids": pa.array([[5, 6, 7], None, []], pa.list_(pa.int32())),
            "error_code": [None, "TEMPLATE_ERROR", None],
        }
    )
    rows = rows_of(block.slice(0, 3))
    assert [r["row_id"] for r in rows] == [0, 1, 2]
    assert rows[0]["prompt_ids"].tolist() == [5, 6, 7]
    assert rows[1]["prompt_ids"] is None and rows[1]["error_code"] == "TEMPLATE_ERROR"
    assert rows[2]["prompt_ids"].tolist() == []
    # a slice that does not start at offset 0 still maps each row to its own ids
    other = pa.table(
        {"row_id": [0, 1, 2], "prompt_ids": pa.array([[5, 6, 7], [8, 9], [10]], pa.list_(pa.int32()))}
    )
    tail = rows_of(other.slice(1, 2))
    assert [r["prompt_ids"].tolist() for r in tail] == [[8, 9], [10]]
    chunked = pa.concat_tables([other.slice(0, 1), other.slice(1, 2)])
    assert [r["prompt_ids"].tolist() for r in rows_of(chunked)] == [[5, 6, 7], [8, 9], [10]]
