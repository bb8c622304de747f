"""Exactly-once output under real failures: killed engine actors, killed drivers, full disks.

The driver-kill tests run `turbo-batch run` as a separate process against this session's Ray cluster
with `cluster.reuse_engines: true`, so every rerun attaches to the same detached engine actor instead
of paying an engine start. Faults are injected with TURBO_BATCH_FAULT (SIGKILL of the driver at a
named point of the commit protocol) or by killing processes from outside. Every test checks exact
row ids: each input row exactly once, no duplicates, no orphan temp files.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tests.helpers import job_dict, run_cluster_script
from turbo_batch.batch.run import run_job
from turbo_batch.batch.write import MANIFEST, SUCCESS
from turbo_batch.spec import JobSpec

pytestmark = pytest.mark.slow
N = 400


def _texts(n):
    return [f"review {i}: the plot was {'thin' if i % 2 else 'rich'} and the cast {i % 7}" for i in range(n)]


def assert_exactly_once(out: Path, n: int) -> list[int]:
    """Every visible part together holds rows 0..n-1 exactly once, and the manifest lists exactly those parts."""
    parts = sorted(p.name for p in out.glob("part-*.parquet"))
    listed = [json.loads(x)["part"] for x in (out / MANIFEST).read_text().splitlines() if x.strip()]
    assert sorted(listed) == parts, "manifest and visible parts differ"
    ids = [i for p in parts for i in pq.read_table(out / p, columns=["row_id"]).column("row_id").to_pylist()]
    assert len(ids) == len(set(ids)), "duplicate rows"
    assert sorted(ids) == list(range(n))
    assert not list((out / "_tmp").glob("*")) if (out / "_tmp").exists() else True
    return ids


def visible_ids(out: Path) -> list[int]:
    return [
        i
        for p in out.glob("part-*.parquet")
        for i in pq.read_table(p, columns=["row_id"]).column("row_id").to_pylist()
    ]


@pytest.fixture(scope="module")
def cluster_job(ray_session, tiny_model, tmp_path_factory):
    """A job file on the session's Ray cluster that reuses one detached engine across driver processes."""
    root = tmp_path_factory.mktemp("reliability")
    pq.write_table(pa.table({"text": _texts(N)}), root / "in.parquet", row_group_size=100)
    address = ray_session.get_runtime_context().gcs_address
    data = job_dict(
        tiny_model,
        root / "in.parquet",
        "out",
        task={"type": "generate", "max_tokens": 4},
        output={"part_rows": 40},
        cluster={"address": address, "reuse_engines": True, "engines": 1},
    )
    yield root, data
    for actor in ray_session.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith("tb-engine-"):
            ray_session.kill(ray_session.get_actor(actor["name"], namespace=actor["namespace"]))


def _write_job(root: Path, data: dict, out: str) -> Path:
    path = root / f"{out}.yaml"
    path.write_text(yaml.safe_dump({**data, "output": {**data["output"], "dir": out}}))
    return path


def _run_cli(
    root: Path, job: Path, *args: str, fault: str | None = None, timeout: int = 400, wait: bool = True
):
    env = {**os.environ, "TURBO_BATCH_OUTPUT_ROOT": str(root)}
    env.pop("TURBO_BATCH_FAULT", None)
    if fault:
        env["TURBO_BATCH_FAULT"] = fault
    cmd = [sys.executable, "-m", "turbo_batch.cli", "run", str(job), "--quiet", *args]
    if not wait:
        return subprocess.Popen(
            cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)


def test_first_run_completes_and_rerun_skips_everything(cluster_job):
    root, data = cluster_job
    job = _write_job(root, data, "clean")
    r = _run_cli(root, job)
    assert r.returncode == 0, r.stderr[-2000:]
    assert_exactly_once(root / "clean", N)
    assert (root / "clean" / SUCCESS).exists()
    r = _run_cli(root, job)  # nothing left to do
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((root / "clean" / "_summary.json").read_text())
    assert summary["rows_skipped_already_committed"] == N and summary["rows_this_run"] == 0
    assert_exactly_once(root / "clean", N)


# Each fault point of the commit protocol, and the parts the killed run leaves visible (a part holds at
# most 40 rows; None: every row). The kills are chained on one output dir: each run resumes what the
# kill before it left and is killed at the next point, so each run proves both a resume and a fault.
KILLS = [
    ("before_rename:2", 1),
    ("after_rename:3", 3),
    ("after_manifest:2", 2),
    ("after_rename:1,before_rename:9", 1),  # the first point reached kills
    ("before_success:1", None),
]


def test_driver_killed_at_each_commit_point_then_resumed(cluster_job):
    root, data = cluster_job
    job = _write_job(root, data, "kill")
    out = root / "kill"
    before: list[int] = []
    for fault, new_parts in KILLS:
        parts_before = len(list(out.glob("part-*.parquet")))
        r = _run_cli(root, job, fault=fault)
        assert r.returncode == -signal.SIGKILL, (fault, r.returncode, r.stderr[-2000:])
        if before:  # it resumed from exactly what the previous kill left visible
            assert f"resuming: {len(before)} of {N} rows already committed" in r.stderr, (
                fault,
                r.stderr[-2000:],
            )
        else:
            assert "resuming:" not in r.stderr
        assert not (out / SUCCESS).exists()
        ids = visible_ids(out)
        assert len(ids) == len(set(ids)) and set(before) <= set(ids), fault
        parts = len(list(out.glob("part-*.parquet"))) - parts_before
        if new_parts is None:
            assert sorted(ids) == list(range(N))
        else:
            assert parts == new_parts and 0 < len(ids) - len(before) <= 40 * parts and len(ids) < N, (
                fault,
                parts,
            )
        before = ids
    r = _run_cli(root, job)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resuming: {N} of {N} rows already committed" in r.stderr
    assert_exactly_once(out, N)
    assert (out / SUCCESS).exists()
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["rows_skipped_already_committed"] == len(before) == N
    assert summary["rows_this_run"] == 0


def test_driver_killed_from_outside_twice_then_resumed(cluster_job):
    root, data = cluster_job
    job = _write_job(root, data, "sigkill")
    out = root / "sigkill"
    for parts_before_kill in (2, 5):
        proc = _run_cli(root, job, wait=False)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            manifest = out / MANIFEST
            if manifest.exists() and len(manifest.read_text().splitlines()) >= parts_before_kill:
                break
            time.sleep(0.05)
        proc.kill()
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, "the driver finished before the kill: make the job longer"
        assert not (out / SUCCESS).exists()
        ids = visible_ids(out)
        assert len(ids) == len(set(ids)) and 0 < len(ids) < N
    r = _run_cli(root, job)
    assert r.returncode == 0, r.stderr[-2000:]
    assert_exactly_once(out, N)


def test_disk_full_is_a_clear_error_and_rerun_resumes(cluster_job):
    root, data = cluster_job
    job = _write_job(root, data, "diskfull")
    r = _run_cli(root, job, fault="enospc:3")
    assert r.returncode == 3, r.stderr[-2000:]
    assert "the disk is full" in r.stderr and "rerun to resume" in r.stderr
    # the first two commits made it, the third hit ENOSPC (parts hold <= 40 rows: a slow machine can
    # also commit a part early on the time-based flush)
    parts = list((root / "diskfull").glob("part-*.parquet"))
    ids = visible_ids(root / "diskfull")
    assert len(parts) == 2 and 0 < len(ids) <= 80 and len(ids) == len(set(ids))
    r = _run_cli(root, job)
    assert r.returncode == 0, r.stderr[-2000:]
    assert_exactly_once(root / "diskfull", N)


def test_changed_job_file_is_refused_before_ray_starts(cluster_job):
    root, data = cluster_job
    job = _write_job(root, data, "changed")
    assert _run_cli(root, job, fault="after_manifest:1").returncode == -signal.SIGKILL
    changed = {
        **data,
        "task": {"type": "generate", "max_tokens": 5},
        "output": {**data["output"], "dir": "changed"},
    }
    job.write_text(yaml.safe_dump(changed))
    r = _run_cli(root, job)
    assert r.returncode == 3 and "different job" in r.stderr and "--restart" in r.stderr
    assert "starting Ray" not in r.stderr
    r = _run_cli(root, job, "--restart")
    assert r.returncode == 0, r.stderr[-2000:]
    assert_exactly_once(root / "changed", N)


def test_engine_actor_killed_mid_job(tiny_pool, tiny_model, out_root):
    """SIGKILL the real engine actor's process mid-job: Ray restarts it, its rows are redone, output exactly
    once. The driver is held in its progress callback while the kill happens, so the job cannot finish
    first: rows committed at the kill are > 0 and < n. The pool is left up, with fresh info."""
    n = 1500
    pq.write_table(pa.table({"text": _texts(n)}), out_root / "in.parquet")
    job = JobSpec.model_validate(
        job_dict(
            tiny_model,
            out_root / "in.parquet",
            "o",
            task={"type": "generate", "max_tokens": 8},
            output={"part_rows": 50},
        )
    )
    slot = tiny_pool.slots[0]
    pid = asyncio.run(_pid(tiny_pool))  # the actor's process now (an earlier test may have restarted it)
    seen = {"rows": 0}
    at_kill: dict = {}
    killed = threading.Event()
    reached = threading.Event()

    def progress(k: int) -> None:  # runs on the driver's event loop: blocking here holds the job
        seen["rows"] += k
        if seen["rows"] >= 200 and not reached.is_set():
            reached.set()
            assert killed.wait(120), "the test thread never killed the engine"

    result: dict = {}

    def run() -> None:
        try:
            result["summary"] = run_job(job, pool=tiny_pool, progress=progress)
        except BaseException as e:
            result["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    assert reached.wait(300), result.get("error")
    committed = out_root / "o" / MANIFEST
    at_kill["rows"] = (
        sum(json.loads(x)["rows"] for x in committed.read_text().splitlines()) if committed.exists() else 0
    )
    os.kill(pid, signal.SIGKILL)
    killed.set()
    thread.join(timeout=600)
    assert "summary" in result, result.get("error")
    assert 0 < at_kill["rows"] < n, at_kill
    assert_exactly_once(out_root / "o", n)
    summary = result["summary"]
    assert summary["rows_error"] == 0 and summary["rows_this_run"] == n
    new_pid = asyncio.run(_pid(tiny_pool))
    assert new_pid != pid
    assert slot.info["pid"] == new_pid and not slot.down  # the driver refreshed the slot: others find it up


def test_engine_node_lost_mid_job(tiny_model, tmp_path):
    """A real two-node Ray cluster loses the engine's node mid-job; a replacement node joins; the engine
    actor restarts there (a fresh vLLM engine), in-flight rows are redone, output exactly once."""
    n = 600
    pq.write_table(pa.table({"text": _texts(n)}), tmp_path / "in.parquet", row_group_size=100)
    job = tmp_path / "job.yaml"
    data = job_dict(
        tiny_model,
        tmp_path / "in.parquet",
        "o",
        task={"type": "generate", "max_tokens": 8},
        output={"part_rows": 40},
        cluster={"engines": 1},
    )
    job.write_text(yaml.safe_dump(data))
    r, result = run_cluster_script(Path(__file__).with_name("node_loss_run.py"), job, tmp_path)
    assert "error" not in result, result
    assert result["lost_while_running"], "job finished before the node was lost: make it longer"
    assert result["engine_nodes_after"] and result["lost_node"] not in result["engine_nodes_after"]
    assert result["summary"]["rows_error"] == 0
    assert r.stderr.count("engine-0 lost (") == 1 and "engine-0 is back" in r.stderr
    assert_exactly_once(tmp_path / "o", n)


async def _pid(pool) -> int:
    return (await pool.actors[0].info.remote())["pid"]


# ------------------------------------------------------------------------------------ CLI paths


def test_force_resumes_a_changed_job_and_keeps_the_committed_rows(cluster_job):
    root, data = cluster_job
    job = _write_job(root, data, "forced")
    out = root / "forced"
    assert _run_cli(root, job, fault="after_manifest:2").returncode == -signal.SIGKILL
    before = visible_ids(out)
    assert 0 < len(before) < N
    old_fp = json.loads((out / "_job.json").read_text())["fingerprint"]
    changed = {
        **data,
        "task": {"type": "generate", "max_tokens": 5},
        "output": {**data["output"], "dir": "forced"},
    }
    job.write_text(yaml.safe_dump(changed))
    assert _run_cli(root, job).returncode == 3  # refused without --force
    r = _run_cli(root, job, "--force")
    assert r.returncode == 0, r.stderr[-2000:]
    assert_exactly_once(out, N)
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["rows_skipped_already_committed"] == len(before) and summary["rows_this_run"] == N - len(
        before
    )
    assert json.loads((out / "_job.json").read_text())["fingerprint"] not in (old_fp, None)
    rows = {}
    for p in out.glob("part-*.parquet"):
        rows.update({r["row_id"]: r for r in pq.read_table(p).to_pylist()})
    new = [i for i in range(N) if i not in set(before)]
    assert {rows[i]["output_tokens"] for i in before} == {4}  # committed under the old job
    assert {rows[i]["output_tokens"] for i in new} <= {5} | {None}  # the rest under the new one
    assert any(rows[i]["output_tokens"] == 5 for i in new)


def test_reuse_engines_really_reuses_the_engine_process(cluster_job):
    root, data = cluster_job
    pids = []
    for name in ("reuse-a", "reuse-b"):
        r = _run_cli(root, _write_job(root, data, name))
        assert r.returncode == 0, r.stderr[-2000:]
        summary = json.loads((root / name / "_summary.json").read_text())
        pids.append([e["pid"] for e in summary["engines"]])
    assert len(pids[0]) == 1 and pids[0] == pids[1], pids  # the same detached actor, not a fresh engine
    assert json.loads((root / "reuse-b" / "_summary.json").read_text())["engine_start_s"] < 30


def test_engine_that_cannot_start_exits_4(cluster_job, tmp_path):
    root, data = cluster_job
    bad = tmp_path / "broken-model"
    bad.mkdir()
    (bad / "config.json").write_text(
        '{"architectures": ["NoSuchModelForCausalLM"], "model_type": "nonsense"}'
    )
    broken = {
        **data,
        "model": {**data["model"], "path": str(bad)},
        "cluster": {**data["cluster"], "reuse_engines": False, "engine_cpus": 0.25},
    }
    r = _run_cli(root, _write_job(root, broken, "broken"))
    assert r.returncode == 4, (r.returncode, r.stderr[-2000:])
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: cannot start vLLM engine for {bad}")
