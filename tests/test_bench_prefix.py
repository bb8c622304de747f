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


def test_gpu_dry_run_with_the_9b_stand_in_and_a_larger_kv_cache(tmp_path):
    """BENCH_STANDIN=9b writes the larger stand-in's config (40 layers, hidden 3840) and --kv-gib sizes
    the cache every variant gets (raw, turbo's job file, ray.data.llm take plan/job engine args)."""
    import os

    r = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_prefix.py"), "--preset", "gpu-gemma4", "--docs", "4",
         "--kv-gib", "16", "--dry-run", "--workdir", str(tmp_path / "w"), "--results-dir", str(tmp_path / "r"),
         "--model-dir", str(tmp_path / "m"), "--tok", str(REPO / "benchmarks" / "tok"),
         "--sequence", "raw,turbo", "--raw-runs", "shuffled,grouped,grouped"],
        capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, "BENCH_STANDIN": "9b"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "runs that would run: raw, turbo" in r.stdout
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_key_value_heads"]) == (40, 3840, 8)
    plan = json.loads((tmp_path / "w" / "plan.json").read_text())
    assert plan["standin"] == "9b" and plan["engine_args"]["kv_cache_memory_bytes"] == 16 * 1024**3
    job = yaml.safe_load((tmp_path / "w" / "job.yaml").read_text())
    assert job["model"]["engine"]["kv_cache_memory_bytes"] == 16 * 1024**3
    bad = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_prefix.py"), "--preset", "gpu-gemma4", "--docs", "4",
         "--dry-run", "--workdir", str(tmp_path / "w2"), "--model-dir", str(tmp_path / "m2"),
         "--tok", str(REPO / "benchmarks" / "tok")],
        capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, "BENCH_STANDIN": "31b"},
    )  # fmt: skip
    assert bad.returncode != 0 and "BENCH_STANDIN='31b': one of 1.2b, 9b" in bad.stderr
