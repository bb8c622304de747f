"""Job files: every shipped file loads; bad files fail before Ray/vLLM load, naming the field."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from turbo_batch.errors import SpecError
from turbo_batch.spec import JobSpec, load_job, parse, resolve_output_dir

ROOT = Path(__file__).resolve().parent.parent
JOB_FILES = sorted((ROOT / "jobs").glob("*.yaml"))


def _is_serve_file(path: Path) -> bool:
    return "serve" in path.stem


@pytest.mark.parametrize("path", [p for p in JOB_FILES if not _is_serve_file(p)], ids=lambda p: p.name)
def test_every_job_file_loads(path, monkeypatch):
    monkeypatch.setenv("TURBO_BATCH_CACHE", "/tmp/cache")
    job = load_job(path)
    assert job.model.path and job.output.dir
    assert "${" not in job.model.path


def test_there_are_job_files():
    names = {p.name for p in JOB_FILES}
    assert {"demo_cpu.yaml", "turbo_classify.yaml", "short_generation.yaml"} <= names


def test_turbo_job_has_the_cards_flags():
    # the card's flags are the turbo preset's defaults (issue 12); the job leaves sized keys to each GPU
    from turbo_batch.engine.profiles import PRESETS

    job = load_job(ROOT / "jobs" / "turbo_classify.yaml")
    e = PRESETS[job.model.preset]
    assert job.model.path == "LilaRest/gemma-4-31B-it-NVFP4-turbo" and job.model.preset == "turbo"
    assert (
        e["quantization"] == "modelopt"
        and e["kv_cache_dtype"] == "fp8"
        and e["enable_prefix_caching"] is True
    )
    assert (e["max_num_seqs"], e["max_num_batched_tokens"], e["max_model_len"]) == (128, 8192, 16384)
    assert e["gpu_memory_utilization"] == 0.95
    assert not {"max_num_seqs", "max_num_batched_tokens", "max_model_len"} & set(job.model.engine)


BASE = {
    "input": {"path": "in.parquet"},
    "task": {"type": "classify", "labels": ["a", "b"]},
    "model": {"path": "m"},
    "output": {"dir": "out"},
}


def _problems(data) -> list[str]:
    with pytest.raises(SpecError) as exc:
        parse(JobSpec, data)
    return exc.value.problems


def test_unknown_key_names_field_and_allowed_keys():
    (p,) = _problems({**BASE, "model": {"path": "m", "temprature": 0.1}})
    assert p.startswith("model.temprature: unknown field")
    assert "allowed:" in p and "trust_remote_code" in p


def test_unknown_key_inside_task_union_lists_that_tasks_fields():
    (p,) = _problems({**BASE, "task": {"type": "generate", "labels": ["x"]}})
    assert p.startswith("task.labels: unknown field") and "max_tokens" in p


def test_bad_task_type_lists_allowed_values():
    (p,) = _problems({**BASE, "task": {"type": "clasify", "labels": ["a", "b"]}})
    assert p.startswith("task:") and "'classify'" in p and "'generate'" in p and "'extract'" in p


def test_every_problem_is_reported():
    probs = _problems(
        {
            **BASE,
            "input": {"path": "x", "limit": 0},
            "model": {"path": "m", "preset": "fast"},
            "prompt": {"template": "{{ text "},
        }
    )
    fields = {p.split(":")[0] for p in probs}
    assert fields == {"input.limit", "model.preset", "prompt.template"}
    assert any("'turbo'" in p for p in probs)


def test_labels_must_be_unique_and_descriptions_must_match():
    assert any("unique" in p for p in _problems({**BASE, "task": {"type": "classify", "labels": ["a", "a"]}}))
    probs = _problems(
        {**BASE, "task": {"type": "classify", "labels": ["a", "b"], "label_descriptions": {"c": "x"}}}
    )
    assert probs[0].startswith("task:") and "'c'" in probs[0]


def test_extract_schema_is_checked():
    (p,) = _problems({**BASE, "task": {"type": "extract", "schema": {"type": "nonsense"}}})
    assert p.startswith("task.schema") and "JSON schema" in p


def test_output_dir_may_not_escape_root(tmp_path, monkeypatch):
    monkeypatch.setenv("TURBO_BATCH_OUTPUT_ROOT", str(tmp_path))
    job = parse(JobSpec, {**BASE, "output": {"dir": "../escape"}})
    with pytest.raises(SpecError) as exc:
        resolve_output_dir(job)
    assert exc.value.problems[0].startswith("output.dir:")
    ok = parse(JobSpec, {**BASE, "output": {"dir": "sub/dir"}})
    assert resolve_output_dir(ok) == tmp_path / "sub" / "dir"


def test_fingerprint_tracks_meaning_not_performance():
    a = parse(JobSpec, BASE)
    b = parse(
        JobSpec, {**BASE, "cluster": {"engines": 4}, "model": {"path": "m", "engine": {"max_num_seqs": 8}}}
    )
    c = parse(JobSpec, {**BASE, "task": {"type": "classify", "labels": ["a", "c"]}})
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def _cli(*args, cwd=None, env=None):
    return subprocess.run(
        [sys.executable, "-m", "turbo_batch.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
    )


def test_validate_cli_exit_codes_and_no_ray_or_vllm(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump({**BASE, "task": {"type": "classify", "labels": ["a"]}, "cluster": {"engines": "x"}})
    )
    r = _cli("validate", str(bad), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "task.labels:" in r.stderr and "cluster.engines:" in r.stderr
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(BASE))
    assert _cli("validate", str(good), cwd=tmp_path).returncode == 0
    # Validation must not import Ray or vLLM (it runs before either starts).
    code = (
        "import sys, json; import turbo_batch.cli; from turbo_batch.spec import load_job; from pathlib import Path; "
        f"load_job(Path({str(good)!r}), []); "
        "print(json.dumps([m for m in ('ray', 'vllm', 'torch') if m in sys.modules]))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []


def test_run_cli_rejects_bad_job_before_ray(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "input: {path: x}\ntask: {type: generate, max_tokens: 0}\nmodel: {path: m}\noutput: {dir: o}\n"
    )
    r = _cli("run", str(bad), cwd=tmp_path)
    assert r.returncode == 2 and "task.max_tokens:" in r.stderr
    assert f"invalid job file {bad}:" in r.stderr
    assert "Ray" not in r.stderr


def test_serve_cli_rejects_bad_serve_file_before_ray(tmp_path):
    bad = tmp_path / "serve.yaml"
    bad.write_text("name: x\nbogus: 1\n")
    r = _cli("serve", str(bad), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert f"invalid serve file {bad}:" in r.stderr
    assert "model: required field is missing" in r.stderr and "bogus: unknown field" in r.stderr
    assert "Ray" not in r.stderr


def test_missing_model_path_is_one_clear_line(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"text": "hi"}\n')
    job = tmp_path / "job.yaml"
    job.write_text(
        yaml.safe_dump(
            {
                **BASE,
                "input": {"path": str(tmp_path / "in.jsonl")},
                "model": {"path": str(tmp_path / "no-such-model")},
            }
        )
    )
    r = _cli("run", str(job), cwd=tmp_path)
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert lines == [f"error: model.path: {tmp_path / 'no-such-model'} does not exist"]


def test_set_overrides(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(BASE))
    r = _cli("validate", str(good), "--set", "input.limit=0", cwd=tmp_path)
    assert r.returncode == 2 and "input.limit:" in r.stderr
