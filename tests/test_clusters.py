"""Every cluster file loads and keeps the security rules: dashboards on localhost, GPUs declared."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from turbo_batch.engine.profiles import Device, match_profile

CLUSTERS = sorted((Path(__file__).resolve().parent.parent / "clusters").glob("*.yaml"))


def test_there_are_cluster_files():
    assert len(CLUSTERS) >= 2


@pytest.mark.parametrize("path", CLUSTERS, ids=lambda p: p.name)
def test_cluster_file_loads_and_keeps_dashboard_local(path):
    doc = yaml.safe_load(path.read_text())
    text = path.read_text()
    assert isinstance(doc, dict)
    if doc.get("kind") == "RayCluster":
        assert doc["spec"]["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
        groups = doc["spec"]["workerGroupSpecs"]
        assert groups and all(int(g["rayStartParams"]["num-gpus"]) >= 1 for g in groups)
        for g in groups:
            product = g["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.product"].replace("-", " ")
            prof = match_profile(Device("cuda", product, 32, (12, 0)))
            assert not prof.name.startswith("gpu-"), f"{product} has no profile"
    else:
        assert doc["provider"]["type"] == "local"
        assert all("--dashboard-host=127.0.0.1" in c for c in doc["head_start_ray_commands"] if "--head" in c)
    assert "0.0.0.0" not in text
