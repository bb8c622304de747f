"""Run a batch job on a real three-node Ray cluster (one machine) whose two worker nodes are labelled
as an RTX 5090 node and a B200 node, the way the cluster files label them.

Used by tests/batch/test_fleet.py as a separate process (a Ray cluster of its own). Each worker node
offers one unit of its `gpu-<type>` resource and the node label `turbo-batch.io/gpu=<type>`; the job
leaves `cluster.engines` at auto. Prints one JSON line: the summary and each labelled node's id.

usage: python tests/batch/fleet_run.py JOB_YAML
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import ray
import yaml
from ray.cluster_utils import Cluster

from turbo_batch.batch.run import run_job
from turbo_batch.engine.profiles import NODE_LABEL, node_resource
from turbo_batch.spec import JobSpec

TYPES = ("rtx-5090", "b200")


def main(job_path: str) -> None:
    job = JobSpec.model_validate(yaml.safe_load(Path(job_path).read_text()))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    for t in TYPES:
        cluster.add_node(num_cpus=1, resources={node_resource(t): 1}, labels={NODE_LABEL: t})
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        summary = run_job(job)
        nodes = {
            t: [n["NodeID"] for n in ray.nodes() if n["Alive"] and node_resource(t) in n["Resources"]]
            for t in TYPES
        }
        labels = {n["NodeID"]: (n.get("Labels") or {}).get(NODE_LABEL) for n in ray.nodes() if n["Alive"]}
        print(json.dumps({"summary": summary, "nodes": nodes, "labels": labels}, default=str))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
