"""Every cluster file parses and matches the code: GPU types with profiles, the `gpu-<type>` resources
and `turbo-batch.io/gpu` labels that engine placement reads, images, start commands, dashboards on
localhost."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from turbo_batch.engine.profiles import GPU_TYPES, NODE_LABEL, Device, match_profile, node_resource

CLUSTERS = sorted((Path(__file__).resolve().parent.parent / "clusters").glob("*.yaml"))
IMAGE_PREFIX = "ghcr.io/example/turbo-batch:"


def test_there_are_cluster_files():
    kinds = {yaml.safe_load(p.read_text()).get("kind", "launcher") for p in CLUSTERS}
    assert {"RayCluster", "RayJob", "launcher"} <= kinds


def _ray_cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def _check_group(g: dict) -> str:
    """One KubeRay worker group: its GPU type from the node selector, and everything that must agree."""
    params = g["rayStartParams"]
    pod = g["template"]["spec"]
    product = pod["nodeSelector"]["nvidia.com/gpu.product"].replace("-", " ")
    gpu_type = match_profile(Device("cuda", product, 32, (12, 0))).name
    assert gpu_type in GPU_TYPES, f"{product} has no profile"
    assert g["groupName"] == gpu_type
    gpus = int(params["num-gpus"])
    (container,) = pod["containers"]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == gpus >= 1
    assert container["image"].startswith(IMAGE_PREFIX)
    # KubeRay passes the value to `ray start --resources=...`: a quoted JSON object
    resources = json.loads(json.loads(params["resources"]))
    assert resources == {node_resource(gpu_type): gpus}
    assert params["labels"] == f"{NODE_LABEL}={gpu_type}"
    return gpu_type


@pytest.mark.parametrize("path", CLUSTERS, ids=lambda p: p.name)
def test_cluster_file_matches_the_code(path):
    text = path.read_text()
    doc = yaml.safe_load(text)
    assert isinstance(doc, dict)
    assert "0.0.0.0" not in text
    if doc.get("kind") in ("RayCluster", "RayJob"):
        spec = _ray_cluster_spec(doc)
        assert spec["rayVersion"] == "2.60.0"
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"
        assert head["rayStartParams"]["num-cpus"] == "0"
        assert head["template"]["spec"]["containers"][0]["image"].startswith(IMAGE_PREFIX)
        types = [_check_group(g) for g in spec["workerGroupSpecs"]]
        assert {"rtx-5090", "b200"} <= set(types) and len(types) == len(set(types))
        if doc["kind"] == "RayJob":
            entry = doc["spec"]["entrypoint"].split()
            assert entry[:4] == ["python", "-m", "turbo_batch.cli", "run"]
            assert "cluster.address=auto" in entry
    else:
        assert doc["provider"]["type"] == "local"
        heads = [c for c in doc["head_start_ray_commands"] if "ray start" in c]
        assert heads and all("--head" in c and "--dashboard-host=127.0.0.1" in c for c in heads)
        workers = " ".join(c for c in doc["worker_start_ray_commands"] if "ray start" in c)
        assert '--resources="$(~/tb/bin/python -m turbo_batch.engine.profiles)"' in workers
        assert f'--labels="{NODE_LABEL}=$(~/tb/bin/python -m turbo_batch.engine.profiles --type)"' in workers
        assert any("turbo-batch" in c for c in doc["setup_commands"])


def test_node_resources_follow_the_profiles():
    from turbo_batch.engine.profiles import KNOWN_DEVICES, node_resources

    by_name = {d.name: d for d in KNOWN_DEVICES}
    assert node_resources(by_name["NVIDIA B200"], 8) == {"gpu-b200": 8.0}
    assert node_resources(by_name["NVIDIA GeForce RTX 5090"]) == {"gpu-rtx-5090": 1.0}
    assert node_resources(by_name["cpu"]) == {}
