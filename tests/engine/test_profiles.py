"""Engine arguments per GPU: preset defaults < computed sizing < model.engine < model.engine_by_gpu;
refusal of a card that cannot hold the weights; `turbo-batch plan` on the Turbo job, offline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from turbo_batch.engine import profiles
from turbo_batch.engine.profiles import KNOWN_DEVICES, Device, engine_args, resolve
from turbo_batch.errors import EngineStartError, SpecError
from turbo_batch.spec import load_job

from .test_sizing import GEMMA4_31B, NVFP4_BYTES

REPO = Path(__file__).resolve().parents[2]
TURBO = "LilaRest/gemma-4-31B-it-NVFP4-turbo"
DEV = {d.name: d for d in KNOWN_DEVICES}
RTX5090, PRO6000, B200 = (
    DEV["NVIDIA GeForce RTX 5090"],
    DEV["NVIDIA RTX PRO 6000 Blackwell"],
    DEV["NVIDIA B200"],
)
SIZED = ("max_model_len", "max_num_seqs", "max_num_batched_tokens")


@pytest.fixture
def local_turbo(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(GEMMA4_31B))
    (tmp_path / "hf_quant_config.json").write_text('{"quantization": {"quant_algo": "NVFP4"}}')
    index = {"metadata": {"total_size": int(NVFP4_BYTES)}, "weight_map": {}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    return str(tmp_path)


def sized(args):
    return tuple(args[k] for k in SIZED)


def test_turbo_preset_cards_get_different_computed_settings(local_turbo):
    for path in (TURBO, local_turbo):  # the built-in table and a local checkpoint agree
        model = {"path": path, "preset": "turbo"}
        a, b, c = (engine_args(model, d) for d in (RTX5090, PRO6000, B200))
        assert len({sized(a), sized(b), sized(c)}) == 3
        assert (
            a["max_model_len"] == 16_384 and b["max_model_len"] == 131_072 and c["max_model_len"] == 262_144
        )
        assert a["max_num_seqs"] < 128 < b["max_num_seqs"] < c["max_num_seqs"]
        for args in (a, b, c):  # the card's other flags are the preset's defaults
            assert args["quantization"] == "modelopt" and args["kv_cache_dtype"] == "fp8"
            assert args["enable_prefix_caching"] and args["gpu_memory_utilization"] == 0.95
    # preset auto picks turbo for an NVFP4 checkpoint on a GPU
    assert resolve({"path": local_turbo}, RTX5090).preset == "turbo"


def test_job_engine_applies_to_all_and_engine_by_gpu_last():
    model = {
        "path": TURBO,
        "preset": "turbo",
        "engine": {"max_num_seqs": 64, "enforce_eager": True},
        "engine_by_gpu": {"b200": {"max_num_seqs": 256, "max_model_len": 65_536}},
    }
    a, c = engine_args(model, RTX5090), engine_args(model, B200)
    assert a["max_num_seqs"] == 64 and a["enforce_eager"] and a["max_model_len"] == 16_384
    assert c["max_num_seqs"] == 256 and c["enforce_eager"] and c["max_model_len"] == 65_536
    # a job value sizes the rest around it: B200's context fixed by the job
    r = resolve(model, B200)
    assert r.sizing.max_model_len == 65_536 and "job 65536" in r.sizing.limits
    # a job value beyond what memory allows is kept but reported
    too_long = {"path": TURBO, "preset": "turbo", "engine_by_gpu": {"rtx-5090": {"max_model_len": 200_000}}}
    assert any("exceeds" in n for n in resolve(too_long, RTX5090).notes)


def test_presets_keep_their_intent():
    lat = engine_args({"path": TURBO, "preset": "latency"}, B200)
    assert lat["max_num_seqs"] == 16 and lat["max_model_len"] == 262_144
    cls = engine_args({"path": TURBO, "preset": "classification"}, B200)
    assert cls["max_model_len"] == 4096 and cls["max_num_seqs"] > 128  # bf16 KV: no fp8 here


def test_a_card_that_cannot_hold_the_weights_is_refused():
    small = Device("cuda", "NVIDIA GeForce RTX 5080", 15.9, (12, 0))
    with pytest.raises(EngineStartError, match=r"weights need 17\.2 GiB"):
        engine_args({"path": TURBO, "preset": "turbo"}, small)


def test_unknown_model_is_not_sized_but_capped_by_the_card():
    r = resolve({"path": "someone/unknown", "preset": "turbo"}, RTX5090)
    assert r.sizing is None and r.args["max_model_len"] == 16_384 and "not sized" in r.notes[0]


def test_cpu_unchanged():
    cpu = Device("cpu", "cpu", 24, None, False)
    args = engine_args({"path": TURBO, "preset": "auto"}, cpu)
    assert args["enforce_eager"] and args["dtype"] == "float32" and "kv_cache_dtype" not in args
    assert args["distributed_executor_backend"] == profiles.CPU_EXECUTOR  # the forked CPU worker


def test_engine_by_gpu_names_are_validated(tmp_path):
    job = (REPO / "jobs" / "turbo_classify.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(job.replace("rtx-5090: {max_model_len", "rtx5090: {max_model_len"))
    with pytest.raises(SpecError) as e:
        load_job(bad)
    assert "model.engine_by_gpu" in str(e.value.problems) and "rtx5090" in str(e.value.problems)


def test_plan_on_the_turbo_job_offline():
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-m", "turbo_batch.cli", "plan", "jobs/turbo_classify.yaml"],
        cwd=REPO, capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "built-in table" in text
    lines = {ln.split(" (")[0]: ln for ln in text.splitlines() if "GiB):" in ln}
    for gpu, ctx in (("RTX 5090", 16384), ("RTX PRO 6000", 131072), ("B200", 262144)):
        line = next(v for k, v in lines.items() if gpu in k)
        assert f"max_model_len {ctx}" in line and "KV cache" in line and "tokens" in line
    assert "RTX 5080" in text and "refused" in text
    assert profiles.GPU_TYPES[:3] == ("rtx-5090", "rtx-pro-6000", "b200")
