"""Spec bounds (issue 9, point 5): numeric fields bounded, remote code through one switch only,
hostile YAML refused, sampling.extra checked against vLLM, engines the cluster cannot host refused."""

from __future__ import annotations

import pytest
import yaml

from turbo_batch.errors import EngineStartError, SpecError
from turbo_batch.spec import JobSpec, load_job, parse

BASE = {
    "input": {"path": "in.parquet"},
    "task": {"type": "generate", "max_tokens": 8},
    "model": {"path": "org/model"},
    "output": {"dir": "o"},
}


def _with(section, **fields):
    return {**BASE, section: {**BASE.get(section, {}), **fields}}


@pytest.mark.parametrize(
    "section,field,value",
    [
        ("task", "max_tokens", 10**12),
        ("sampling", "seed", 2**64),
        ("sampling", "seed", -(2**63) - 1),
        ("cluster", "engines", 0),
        ("cluster", "engines", 10**6),
        ("cluster", "batch_rows", 10**9),
        ("cluster", "max_attempts", 10**6),
        ("output", "part_rows", 10**12),
        ("sampling", "temperature", 1e9),
    ],
)
def test_numeric_bounds(section, field, value):
    with pytest.raises(SpecError) as exc:
        parse(JobSpec, _with(section, **{field: value}))
    assert any(p.startswith(f"{section}.{field}") for p in exc.value.problems), exc.value.problems


def test_seed_in_int64_is_fine():
    assert parse(JobSpec, _with("sampling", seed=2**63 - 1)).sampling.seed == 2**63 - 1


def test_remote_code_only_through_model_trust_remote_code():
    with pytest.raises(SpecError, match=r"model.engine: .*model.trust_remote_code"):
        parse(JobSpec, _with("model", engine={"trust_remote_code": True}))
    assert parse(JobSpec, _with("model", trust_remote_code=True)).model.trust_remote_code


def test_yaml_bombs_and_huge_files_are_refused(tmp_path):
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdefg", "bcdefgh", strict=True)
    )
    (tmp_path / "bomb.yaml").write_text(bomb)
    with pytest.raises(SpecError, match="aliases expand"):
        load_job(tmp_path / "bomb.yaml")
    (tmp_path / "big.yaml").write_text(yaml.safe_dump({**BASE, "name": "x" * (2 << 20)}))
    with pytest.raises(SpecError, match="larger than"):
        load_job(tmp_path / "big.yaml")


def test_max_tokens_must_leave_room_for_a_prompt(tmp_path):
    from turbo_batch.batch.plan import check_context

    job = parse(
        JobSpec, {**_with("task", max_tokens=2048), "model": {"path": "m", "engine": {"max_model_len": 1024}}}
    )
    with pytest.raises(SpecError, match=r"task.max_tokens: 2048 leaves no room"):
        check_context(job)


def test_sampling_extra_checked_against_vllm():
    pytest.importorskip("vllm")
    from turbo_batch.batch.plan import check_sampling_extra

    with pytest.raises(SpecError, match=r"sampling.extra.no_such_field"):
        check_sampling_extra(parse(JobSpec, _with("sampling", extra={"no_such_field": 1})))
    with pytest.raises(SpecError, match=r"sampling.extra: vLLM refuses it"):
        check_sampling_extra(parse(JobSpec, _with("sampling", extra={"n": -3})))
    check_sampling_extra(parse(JobSpec, _with("sampling", extra={"repetition_penalty": 1.1})))


def test_engines_the_cluster_cannot_host_are_refused_at_once():
    from turbo_batch.batch.pool import check_capacity

    job = parse(JobSpec, _with("cluster", engines=8, engine_cpus=1.0))
    with pytest.raises(EngineStartError, match=r"cannot host 8 engine\(s\): 8 x 1 CPU > 2"):
        check_capacity(job, 8, False, {"CPU": 2.0})
    with pytest.raises(EngineStartError, match="GPU"):
        check_capacity(job, 8, True, {"CPU": 64.0, "GPU": 4.0})
    check_capacity(job, 2, False, {"CPU": 2.0})
