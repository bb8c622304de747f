"""Mixed fleets: one engine per labelled GPU, each with its GPU type's settings, long rows only where
they fit (issue 12, point 3a). Fast tests of the placement rules; one real three-node Ray cluster."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tests.helpers import job_dict, run_cluster_script
from turbo_batch.batch.pool import engine_actor_options, gpu_slots
from turbo_batch.engine.profiles import KNOWN_DEVICES, Device, resolve
from turbo_batch.errors import EngineStartError
from turbo_batch.spec import JobSpec

MIXED = {"CPU": 120.0, "GPU": 9.0, "gpu-rtx-5090": 1.0, "gpu-b200": 8.0}


def _job(tmp_path: Path, **cluster) -> JobSpec:
    d = job_dict(tmp_path / "m", tmp_path / "in.parquet", tmp_path / "o")
    d["cluster"].update(cluster)
    return JobSpec.model_validate(d)


def test_auto_starts_one_engine_per_labelled_gpu_round_robin(tmp_path):
    slots = gpu_slots(_job(tmp_path, engines="auto"), MIXED)
    assert slots == ["rtx-5090", "b200"] + ["b200"] * 7
    # a small engines count still sees every type
    assert gpu_slots(_job(tmp_path, engines=2), MIXED) == ["rtx-5090", "b200"]
    # more engines than labelled GPUs: the rest unlabelled
    assert gpu_slots(_job(tmp_path, engines=3), {"GPU": 1.0, "gpu-b200": 1.0}) == ["b200", None, None]


def test_unlabelled_gpus_and_cpu_only_clusters(tmp_path):
    assert gpu_slots(_job(tmp_path, engines="auto"), {"CPU": 2.0}) == [None]
    assert gpu_slots(_job(tmp_path, engines="auto"), {"GPU": 2.0}) == [None, None]
    # one labelled node beside one unlabelled GPU
    assert gpu_slots(_job(tmp_path, engines="auto"), {"GPU": 2.0, "gpu-h200": 1.0}) == ["h200", None]


def test_engine_resources_pin_every_engine_to_one_type(tmp_path):
    job = _job(tmp_path, engines="auto", engine_resources={"gpu-b200": 1})
    assert gpu_slots(job, MIXED) == ["b200"] * 8
    other = _job(tmp_path, engines="auto", engine_resources={"spot": 1})  # not a GPU label: no types
    assert gpu_slots(other, MIXED) == [None] * 9


def test_a_labelled_engine_asks_for_one_unit_of_its_type(tmp_path):
    job = _job(tmp_path)
    opts = engine_actor_options(job, 0, True, "rtx-5090")
    assert opts["resources"] == {"gpu-rtx-5090": 1.0} and opts["num_gpus"] == 1
    assert "resources" not in engine_actor_options(job, 0, True, None)


def test_the_label_decides_which_engine_by_gpu_entry_applies():
    model = {
        "path": "/nonexistent/model",
        "engine": {"max_model_len": 1024},
        "engine_by_gpu": {"rtx-5090": {"max_model_len": 96}, "b200": {"max_model_len": 512}},
    }
    cpu = KNOWN_DEVICES[0]
    assert resolve(model, cpu).args["max_model_len"] == 1024  # the CPU profile: no entry
    assert resolve(model, cpu, gpu_type="rtx-5090").args["max_model_len"] == 96
    assert resolve(model, cpu, gpu_type="b200").args["max_model_len"] == 512
    # on a GPU the label picks the profile (its context limit), the device gives the memory
    h200 = Device("cuda", "NVIDIA H200", 139.8, (9, 0))
    turbo = {"path": "LilaRest/gemma-4-31B-it-NVFP4-turbo", "preset": "turbo"}  # sizing's built-in shape
    assert resolve(turbo, h200).args["max_model_len"] > 16_384
    assert resolve(turbo, h200, gpu_type="rtx-5090").args["max_model_len"] == 16_384  # the card's limit
    with pytest.raises(EngineStartError, match="unknown GPU type 'a100'"):
        resolve(turbo, h200, gpu_type="a100")


# ------------------------------------------------------------------- real three-node cluster (slow)

SHORT_MAX_LEN = 96


def test_labelled_nodes_get_their_engines_settings_and_long_rows(tiny_model, tmp_path):
    """Head + an `rtx-5090` node + a `b200` node (resources and labels as the cluster files set them):
    one engine lands on each labelled node with that type's engine_by_gpu settings; rows too long
    for the 5090's context run only on the B200; every id comes out exactly once."""
    long_text = " ".join(["the film was long and slow but the ending was good"] * 20)
    texts = [f"short review {i}: fine" for i in range(40)] + [f"{long_text} {i}" for i in range(12)]
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), tmp_path / "in.parquet")
    data = job_dict(tiny_model, tmp_path / "in.parquet", "o", input={"id_column": "id"})
    data["model"]["engine_by_gpu"] = {
        "rtx-5090": {"max_model_len": SHORT_MAX_LEN, "max_num_seqs": 8},
        "b200": {"max_model_len": 1024},
    }
    data["cluster"].update({"engines": "auto", "batch_rows": 8})
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(data))
    _, result = run_cluster_script(Path(__file__).with_name("fleet_run.py"), job, tmp_path)
    engines = {e["gpu_type"]: e for e in result["summary"]["engines"]}
    assert sorted(engines) == ["b200", "rtx-5090"]
    for t, e in engines.items():
        assert e["node"] in result["nodes"][t] and result["labels"][e["node"]] == t  # on its labelled node
    assert engines["rtx-5090"]["max_model_len"] == SHORT_MAX_LEN
    assert engines["rtx-5090"]["engine_args"]["max_num_seqs"] == 8
    assert engines["b200"]["max_model_len"] == 1024

    out = [
        row
        for part in sorted((tmp_path / "o").glob("part-*.parquet"))
        for row in pq.read_table(part).to_pylist()
    ]
    assert sorted(row["row_id"] for row in out) == list(range(len(texts)))  # exactly once
    assert all(row["error_code"] is None for row in out)
    long_rows = [row for row in out if row["prompt_tokens"] + 1 > SHORT_MAX_LEN]
    assert len(long_rows) == 12  # the long texts really exceed the 5090's context
    assert {row["engine"] for row in long_rows} == {engines["b200"]["name"]}
    assert engines["rtx-5090"]["rows"] > 0  # the small card took short rows
