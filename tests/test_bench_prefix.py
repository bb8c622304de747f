"""The many-prefix benchmark's preparation stays runnable: a dry run builds the rows, job file and token ids.

The benchmark itself (engines, timings) is not a test: its numbers live in benchmarks/results/prefix_*.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from turbo_batch.spec import JobSpec

pytestmark = pytest.mark.demo
REPO = Path(__file__).resolve().parents[1]


def test_bench_prefix_dry_run_builds_a_shuffled_many_prefix_job(tmp_path):
    from turbo_batch.testing.assets import smollm2_dir

    smollm2_dir()
    r = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_prefix.py"), "--preset", "cpu-smollm2", "--docs", "6",
         "--dry-run", "--workdir", str(tmp_path / "w"), "--results-dir", str(tmp_path / "r")],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "runs that would run: turbo, raw, turbo, ray_data_llm, turbo" in r.stdout
    job = JobSpec.model_validate(yaml.safe_load((tmp_path / "w" / "job.yaml").read_text()))
    assert job.prompt.order == "auto" and job.input.text_columns == ["doc", "question"]
    plan = json.loads((tmp_path / "w" / "plan.json").read_text())
    assert plan["rows"] == 6 * plan["shape"]["questions"]
    assert plan["order_stage"]["doc_runs_in_key_order"] == 6  # the order key groups every document
    shuffled = pq.read_table(tmp_path / "w" / "rendered.parquet").column("doc_id").to_pylist()
    grouped = pq.read_table(tmp_path / "w" / "grouped.parquet").column("doc_id").to_pylist()
    assert sorted(shuffled) == grouped and shuffled != grouped
    assert pq.read_table(tmp_path / "w" / "rows.parquet").num_rows == plan["rows"]
    assert not (tmp_path / "r").exists()  # a dry run records nothing
