"""The batch benchmark's preparation stays runnable: a dry run builds the rows, job file and token ids.

The benchmark itself (engines, timings) is not a test: its numbers live in benchmarks/results/.
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


def test_bench_batch_dry_run_builds_a_valid_job(tmp_path):
    from turbo_batch.cli import fetch_demo

    fetch_demo()
    r = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_batch.py"), "--preset", "cpu-smollm2",
         "--rows", "40", "--dry-run", "--workdir", str(tmp_path / "w"), "--results-dir", str(tmp_path / "r")],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "variants that would run: raw, turbo, ray_data_llm" in r.stdout
    job = JobSpec.model_validate(yaml.safe_load((tmp_path / "w" / "job.yaml").read_text()))
    assert job.task.type == "classify" and sorted(job.task.labels) == ["negative", "positive"]
    rendered = pq.read_table(tmp_path / "w" / "rendered.parquet")
    assert rendered.num_rows == 40
    assert not (tmp_path / "r").exists() or not list(
        (tmp_path / "r").glob("*.json")
    )  # a dry run records nothing


def test_bench_serve_dry_run_plans_both_servers(tmp_path):
    """bench_serve.py (serve parity): the tiny model, vllm serve's command line with turbo-batch's
    resolved engine args, and a serve file that the real loader accepts; no server starts."""
    from turbo_batch.serve.spec import ServeSpec

    r = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_serve.py"), "--preset", "cpu-tiny", "--dry-run",
         "--workdir", str(tmp_path / "w"), "--results-dir", str(tmp_path / "r")],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert "vllm.entrypoints.openai.api_server" in lines[0] and "--enforce-eager" in lines[0]
    assert "--scheduling-policy priority" in lines[0] and "--max-model-len 1024" in lines[0]
    ServeSpec.model_validate(json.loads(lines[1]))
    assert lines[2] == "variants that would run: vllm, turbo-direct, turbo, turbo-2ingress"
    assert not (tmp_path / "r").exists()


def test_bench_render_times_two_checkouts_and_compares_their_blocks(tmp_path):
    """bench_render.py for real on the tiny tokenizer, this checkout under two labels: per-row CPU
    for each, and the second's rendered block equal to the first's."""
    r = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_render.py"), "--code", f"a={REPO}", "--code",
         f"b={REPO}", "--tok", "tiny", "--rows", "40", "--repeat", "2", "--results-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads((tmp_path / "render_cpu.json").read_text())
    a, b = d["results"]["tiny/a"], d["results"]["tiny/b"]
    assert len(a["cpu_s_runs"]) == 2 and a["cpu_s_per_1k_rows"] > 0 and a["prompt_tokens"] > 40 * 900
    assert a["same_block_as_first"] is None and b["same_block_as_first"] is True
    assert "| tiny | b |" in (tmp_path / "render_cpu.md").read_text()
