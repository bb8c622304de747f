"""runtime.connect_ray: the private local Ray it starts keeps at most IDLE_WORKERS idle worker processes.

Real Ray, in a subprocess each (a fresh Ray per case): six tasks run at once on six worker processes;
once they are idle, a turbo-batch Ray ends all but IDLE_WORKERS of them, while Ray's own rule (the
RAY_num_workers_soft_limit override, set to the CPU count as Ray's default is) keeps all six.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from turbo_batch.runtime import IDLE_WORKERS

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, os, sys, time
import ray
from turbo_batch.runtime import connect_ray

connect_ray("local", num_cpus=6)

@ray.remote(num_cpus=1)
def hold(barrier_s):
    time.sleep(barrier_s)
    return os.getpid()

pids = set(ray.get([hold.remote(3.0) for _ in range(6)]))

def alive():
    n = 0
    for p in pids:
        try:
            os.kill(p, 0)
            n += 1
        except OSError:
            pass
    return n

seen, end = [], time.time() + float(sys.argv[1])
while time.time() < end:
    seen.append(alive())
    time.sleep(0.25)
print(json.dumps({"workers": len(pids), "alive_last": seen[-1], "alive_min": min(seen)}))
ray.shutdown()
"""


def _run(wait_s: float, env: dict[str, str]) -> dict:
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(wait_s)],
        capture_output=True, text=True, timeout=240, cwd=REPO, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_local_ray_ends_idle_workers_beyond_the_limit():
    env = {k: v for k, v in os.environ.items() if k != "RAY_num_workers_soft_limit"}
    got = _run(8.0, env)
    assert got["workers"] == 6  # six tasks at once: six worker processes
    assert got["alive_last"] <= IDLE_WORKERS < 6


def test_the_environment_override_keeps_rays_own_rule():
    got = _run(5.0, {**os.environ, "RAY_num_workers_soft_limit": "6"})
    assert got["workers"] == 6
    assert got["alive_min"] == 6  # none ended: the limit is the CPU count, as in Ray's default
