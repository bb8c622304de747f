"""Run a batch job on a real two-node Ray cluster (one machine) and lose the engine's node mid-job.

Used by tests/test_reliability.py::test_engine_node_lost_mid_job as a separate process (a Ray cluster of
its own). The engine actor is pinned to the worker node with a custom resource; after the first part is
committed that node is removed (its raylet and every process on it killed), and a fresh node with the
same resource joins, as a replacement cloud instance would. Prints one JSON line with the summary.

usage: python tests/node_loss_run.py JOB_YAML
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import ray
import yaml
from ray.cluster_utils import Cluster

from turbo_batch.batch.run import run_job
from turbo_batch.batch.write import MANIFEST
from turbo_batch.spec import JobSpec, resolve_output_dir

NODE = {"num_cpus": 1, "resources": {"engine_node": 1}}


def main(job_path: str) -> None:
    job = JobSpec.model_validate(yaml.safe_load(Path(job_path).read_text()))
    # The GCS marks a node dead after `failure_threshold` missed health checks: 1 s x 2 here instead of
    # Ray's 3 s x 5, so the test waits ~2 s, not ~15 s, before the engine can restart elsewhere.
    fast_death = {
        "health_check_period_ms": 1000,
        "health_check_timeout_ms": 1000,
        "health_check_failure_threshold": 2,
    }
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "include_dashboard": False, "_system_config": fast_death},
    )
    worker = cluster.add_node(**NODE)
    ray.init(address=cluster.address, log_to_driver=False)

    # the engine goes to the node that will be lost (cluster.engine_resources, as a cluster file would)
    job = job.model_copy(
        update={"cluster": job.cluster.model_copy(update={"engine_resources": {"engine_node": 1}})}
    )
    result: dict = {}

    def run():
        try:
            result["summary"] = run_job(job)
        except BaseException as e:  # reported, not swallowed
            result["error"] = repr(e)

    thread = threading.Thread(target=run)
    thread.start()
    out = resolve_output_dir(job)
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and thread.is_alive() and not (out / MANIFEST).exists():
        time.sleep(0.05)
    lost_while_running = thread.is_alive()
    engine_node = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and "engine_node" in n["Resources"])
    cluster.remove_node(worker, allow_graceful=False)
    cluster.add_node(**NODE)
    thread.join(timeout=600)
    new_node = [n["NodeID"] for n in ray.nodes() if n["Alive"] and "engine_node" in n["Resources"]]
    print(
        json.dumps(
            {
                **result,
                "lost_while_running": lost_while_running,
                "lost_node": engine_node,
                "engine_nodes_after": new_node,
            },
            default=str,
        ),
        flush=True,
    )
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
