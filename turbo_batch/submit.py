"""`turbo-batch submit | status | logs | stop`: run a job on a running Ray cluster via the Ray Jobs API.

Owns: packing a job for the cluster (the job file goes in the runtime_env `working_dir`, this
turbo_batch package in `py_modules`, the entrypoint is `python -m turbo_batch.cli run job.yaml`
with `cluster.address=auto`), and the four commands that talk to the Jobs API
(`ray.job_submission.JobSubmissionClient`, Ray 2.60 token auth from ~/.ray/auth_token). The job is
validated here first (exit 2 before anything is contacted). Must not touch: what `run` does on the
cluster. Input paths and output.dir are read on the cluster: use storage the cluster nodes see.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from turbo_batch.errors import JobError, print_error
from turbo_batch.spec import load_job

JOB_FILE = "job.yaml"  # the job's name inside the working_dir
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
Address = Annotated[
    str,
    typer.Option(
        "--address",
        envvar="RAY_API_SERVER_ADDRESS",
        help="the cluster's dashboard / Jobs API, e.g. http://127.0.0.1:8265 (kubectl port-forward)",
    ),
]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="override a job field: key.path=value (YAML value)")
]
EnvOpt = Annotated[list[str] | None, typer.Option("--env", help="KEY=VALUE for the job's environment")]


def client(address: str) -> Any:
    """A JobSubmissionClient for `address`, sending ~/.ray/auth_token when there is one (Ray 2.60)."""
    from ray.job_submission import JobSubmissionClient

    if "RAY_AUTH_MODE" not in os.environ:
        from ray._private.authentication import authentication_token_setup as auth

        auth.maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    try:
        return JobSubmissionClient(address)
    except Exception as e:  # ConnectionError, auth errors, a bad address
        raise JobError(f"cannot reach the Ray Jobs API at {address!r}: {str(e).splitlines()[0]}") from None


def package_dir() -> Path:
    return Path(__file__).resolve().parent


def build_submission(
    job_file: Path, sets: list[str], env: dict[str, str], staging: Path, command: str = "run"
) -> dict[str, Any]:
    """Keyword arguments for `JobSubmissionClient.submit_job` (the job file is copied to `staging`).
    `command` is `run`, or `validate` to check the job with the cluster's own environment."""
    job = load_job(job_file, sets)  # SpecError (exit 2) before anything is contacted
    shutil.copyfile(job_file, staging / JOB_FILE)
    remote_sets = [*sets, "cluster.address=auto"]  # the job runs on the cluster it was sent to
    cmd = ["python", "-m", "turbo_batch.cli", command, JOB_FILE, *(["--quiet"] if command == "run" else [])]
    cmd += [a for s in remote_sets for a in ("--set", s)]
    env_vars = {"PYTHONUNBUFFERED": "1", **env}
    return {
        "entrypoint": shlex.join(cmd),
        "runtime_env": {
            "working_dir": str(staging),
            "py_modules": [str(package_dir())],
            "env_vars": env_vars,
        },
        "metadata": {"turbo_batch_job": job.name or job_file.stem},
    }


def _fail(e: JobError) -> None:
    print_error(e, "job file")
    raise typer.Exit(e.exit_code)


def _env(items: list[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq or not key:
            print(f"error: --env {item}: expected KEY=VALUE", file=sys.stderr)
            raise typer.Exit(2)
        out[key] = value
    return out


def submit_command(
    job_file: Path,
    address: Address = "http://127.0.0.1:8265",
    set_: SetOpt = None,
    env: EnvOpt = None,
    submission_id: Annotated[str | None, typer.Option(help="job id to use (default: Ray picks)")] = None,
    command: Annotated[
        str, typer.Option(help="run, or validate: check the job file on the cluster, run nothing")
    ] = "run",
) -> None:
    """Send a job to a running Ray cluster (Ray Jobs API); prints the job id."""
    env_vars = _env(env)
    if command not in {"run", "validate"}:
        print(f"error: --command {command}: expected run or validate", file=sys.stderr)
        raise typer.Exit(2)
    with tempfile.TemporaryDirectory(prefix="tb-submit-") as tmp:
        try:
            kwargs = build_submission(job_file, list(set_ or []), env_vars, Path(tmp), command)
            job_id = client(address).submit_job(submission_id=submission_id, **kwargs)
        except JobError as e:
            _fail(e)
        except Exception as e:  # the Jobs API refused it (auth, runtime_env upload, duplicate id)
            print(f"error: submit to {address} failed: {str(e).strip().splitlines()[0]}", file=sys.stderr)
            raise typer.Exit(1) from None
    print(job_id)
    print(
        f"follow it: turbo-batch status {job_id} --address {address} · logs {job_id} · stop {job_id}",
        file=sys.stderr,
    )


def _call(address: str, what: str, fn: Any) -> Any:
    try:
        return fn(client(address))
    except JobError as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(1) from None
    except Exception as e:  # unknown job id, cluster gone
        print(f"error: {what}: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        raise typer.Exit(1) from None


def status_command(
    job_id: str,
    address: Address = "http://127.0.0.1:8265",
    wait: Annotated[float, typer.Option(help="seconds to wait for the job to finish (0: do not wait)")] = 0,
) -> None:
    """Print a submitted job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED); exit 1 if it failed."""

    def get(c: Any) -> Any:
        deadline = time.monotonic() + wait
        while True:
            info = c.get_job_info(job_id)
            if str(info.status) in TERMINAL or time.monotonic() >= deadline:
                return info
            time.sleep(1.0)

    info = _call(address, f"status of {job_id}", get)
    status = str(info.status)
    print(status + (f": {info.message}" if info.message else ""))
    if status in {"FAILED", "STOPPED"}:
        raise typer.Exit(1)


def logs_command(
    job_id: str,
    address: Address = "http://127.0.0.1:8265",
    follow: Annotated[bool, typer.Option("--follow", "-f", help="stream until the job ends")] = False,
) -> None:
    """Print a submitted job's output (stdout and stderr of `turbo-batch run` on the cluster)."""
    if not follow:
        print(_call(address, f"logs of {job_id}", lambda c: c.get_job_logs(job_id)), end="")
        return
    import asyncio

    async def tail(c: Any) -> None:
        async for chunk in c.tail_job_logs(job_id):
            print(chunk, end="", flush=True)

    _call(address, f"logs of {job_id}", lambda c: asyncio.run(tail(c)))


def stop_command(job_id: str, address: Address = "http://127.0.0.1:8265") -> None:
    """Stop a submitted job (Ray sends SIGTERM, then SIGKILL)."""
    stopped = _call(address, f"stop {job_id}", lambda c: c.stop_job(job_id))
    print(f"{job_id}: {'stop requested' if stopped else 'already finished'}")
