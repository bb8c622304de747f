"""`turbo-batch submit | status | logs | stop` against a real `ray start --head` cluster (Jobs API).

The cluster is started by this module with its own ports and temp dir, and `--block`, so teardown
ends exactly the processes it started (SIGTERM to its process group) instead of `ray stop`, which
would stop every Ray on a shared machine. Run it under `flock /tmp/tb-heavy.lock`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from turbo_batch.submit import JOB_FILE, build_submission

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args: str, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "turbo_batch.cli", *args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )  # fmt: skip


@pytest.fixture(scope="module")
def head():
    """A one-CPU Ray head with the dashboard (Jobs API) on localhost; stopped after the module."""
    temp = tempfile.mkdtemp(prefix="tbsub", dir="/tmp")  # short: Ray's socket paths must stay < 108
    dash = free_port()
    cmd = [
        str(VENV_BIN / "ray"), "start", "--head", "--block", "--num-cpus", "1",
        "--port", str(free_port()), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
        "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
        "--temp-dir", temp, "--include-dashboard", "true", "--disable-usage-stats",
    ]  # fmt: skip
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    # Ray >= 2.60 drains a `--block` node for up to 30 s on SIGTERM; the group's SIGTERM below has already
    # stopped the GCS it would drain through, so teardown sat out the whole 30 s. Nothing here to drain.
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    proc = subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:
            r = cli("status", "no-such-job", "--address", address, timeout=60)
            if "cannot reach" not in r.stderr:
                break  # the Jobs API answers (with "no such job")
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"ray start failed: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}"
                )
            time.sleep(2)
        yield address
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # --block: ray start stops its own processes
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        time.sleep(2)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # anything of that group left behind
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def job_file(tmp_path, tiny_model, monkeypatch):
    root = tmp_path / "out"
    root.mkdir()
    monkeypatch.setenv("TURBO_BATCH_OUTPUT_ROOT", str(root))
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"id": i, "text": f"row {i}"}) + "\n" for i in range(8)))
    job = {
        "name": "submit-test",
        "input": {"path": str(data), "id_column": "id"},
        "task": {"type": "classify", "labels": ["yes", "no"]},
        "model": {"path": str(tiny_model), "preset": "cpu"},
        "output": {"dir": str(root / "job")},
        "cluster": {"address": "local", "engine_cpus": 0.1, "render_cpus": 0.1},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path, root


def test_submission_packs_the_job_and_the_package(tmp_path, job_file):
    path, _ = job_file
    staging = tmp_path / "staging"
    staging.mkdir()
    kw = build_submission(path, ["input.limit=4"], {"A": "1"}, staging)
    assert (staging / JOB_FILE).read_text() == path.read_text()
    assert kw["runtime_env"]["py_modules"] == [str(REPO / "turbo_batch")]
    assert kw["runtime_env"]["working_dir"] == str(staging) and kw["runtime_env"]["env_vars"]["A"] == "1"
    assert kw["entrypoint"].startswith("python -m turbo_batch.cli run job.yaml --quiet")
    assert "--set input.limit=4 --set cluster.address=auto" in kw["entrypoint"]


def test_bad_job_exits_2_before_contacting_anything(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("input: {path: x}\ntask: {type: classify, labels: [a]}\n")
    r = cli("submit", str(bad), "--address", "http://127.0.0.1:9")  # nothing listens on port 9
    assert r.returncode == 2 and "task.labels" in r.stderr and "cannot reach" not in r.stderr


def submit(address: str, path: Path, *extra: str) -> str:
    r = cli("submit", str(path), "--address", address, *extra)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()[-1]


def test_round_trip_succeeded_failed_logs_and_stop(head, job_file):
    path, root = job_file
    # 1. validate on the cluster: SUCCEEDED, and the logs hold the job's own output
    here = f"TURBO_BATCH_OUTPUT_ROOT={root}"  # output paths are checked on the cluster, against its root
    ok = submit(head, path, "--command", "validate", "--env", here)
    r = cli("status", ok, "--address", head, "--wait", "120")
    assert r.returncode == 0 and r.stdout.startswith("SUCCEEDED"), r.stdout + r.stderr
    logs = cli("logs", ok, "--address", head).stdout
    assert "ok job.yaml: classify job" in logs
    # 2. a job that is valid here but not on the cluster (its output root differs): FAILED, exit 1
    bad = submit(
        head, path, "--command", "validate", "--env", f"TURBO_BATCH_OUTPUT_ROOT={root / 'elsewhere'}"
    )
    r = cli("status", bad, "--address", head, "--wait", "120")
    assert r.returncode == 1 and r.stdout.startswith("FAILED"), r.stdout + r.stderr
    assert "outside the output root" in cli("logs", bad, "--address", head).stdout
    # 3. a long job (a real run: its vLLM engine alone takes over 30 s to start here) is RUNNING until
    # stopped. (An engine pinned to a resource no node has is refused at once since check_capacity: exit 4.)
    long = submit(head, path, "--env", here)
    deadline = time.monotonic() + 120
    while (state := cli("status", long, "--address", head).stdout) and not state.startswith("RUNNING"):
        assert time.monotonic() < deadline and not state.startswith(("FAILED", "SUCCEEDED")), state
        time.sleep(2)
    r = cli("stop", long, "--address", head)
    assert r.returncode == 0 and "stop requested" in r.stdout
    r = cli("status", long, "--address", head, "--wait", "60")
    assert r.stdout.startswith("STOPPED") and r.returncode == 1
    # an unknown id is a clear error
    r = cli("status", "raysubmit_nope", "--address", head)
    assert r.returncode == 1 and "raysubmit_nope" in r.stderr
