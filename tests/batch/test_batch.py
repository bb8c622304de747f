"""The whole batch pipeline on real Ray + the real vLLM engine (CPU, tiny Gemma 4)."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers import job_dict
from turbo_batch.batch.run import run_job
from turbo_batch.batch.write import SUCCESS, read_output
from turbo_batch.spec import JobSpec

pytestmark = pytest.mark.slow
WORDS = ["good", "bad", "fine", "awful", "great", "boring", "lovely", "dull", "superb", "weak"]


def _texts(n):
    return [
        f"the movie was {WORDS[i % len(WORDS)]} and {WORDS[(i * 7) % len(WORDS)]}, take {i}" for i in range(n)
    ]


def _run(pool, data, **kw):
    return run_job(JobSpec.model_validate(data), pool=pool, **kw)


def test_cpu_engine_forks_its_worker_on_the_cores_vllm_picks(tiny_pool):
    """On CPU the engine core forks its model worker (engine/cpu_executor.py) instead of spawning a third
    interpreter that imports vLLM again; the worker gets the cores vLLM's OpenMP manager picks, every
    core on a small host."""
    import os

    import psutil

    from turbo_batch.engine.profiles import CPU_EXECUTOR, SMALL_HOST_CPUS

    info = tiny_pool.slots[0].info
    assert info["engine_args"]["distributed_executor_backend"] == CPU_EXECUTOR
    procs = psutil.Process(info["pid"]).children(recursive=True)
    core = [p for p in procs if "EngineCore" in p.name()]
    worker = [p for p in procs if "Worker" in p.name()]
    assert len(core) == 1 and len(worker) == 1, [p.name() for p in procs]
    assert worker[0].ppid() == core[0].pid
    # forked: the worker runs on the engine core's exec-time environment; a spawned worker is a new
    # interpreter exec'ed with the OMP_PLACES / OMP_NUM_THREADS its cores were given
    assert worker[0].environ() == core[0].environ() and "OMP_PLACES" not in worker[0].environ()
    cpus = os.sched_getaffinity(0)
    if len(cpus) <= SMALL_HOST_CPUS:  # a small host: no core held back for the engine core's loop
        assert set(worker[0].cpu_affinity()) == cpus
    else:  # vLLM keeps a core for the engine core's loop and binds the worker to the others
        assert 0 < len(worker[0].cpu_affinity()) < len(cpus)


def test_classify_end_to_end(tiny_pool, tiny_model, out_root):
    n = 120
    pq.write_table(
        pa.table(
            {
                "text": _texts(n),
                "gold": ["positive" if i % 3 else "negative" for i in range(n)],
                "extra": list(range(n)),
            }
        ),
        out_root / "in.parquet",
        row_group_size=50,
    )
    data = job_dict(
        tiny_model,
        out_root / "in.parquet",
        "out",
        task={"type": "classify", "labels": ["positive", "negative"], "gold_column": "gold"},
        output={"keep_columns": ["extra"]},
    )
    summary = _run(tiny_pool, data)
    table = read_output(out_root / "out")
    assert sorted(table.column("row_id").to_pylist()) == list(range(n))
    assert summary["rows_ok"] == n and summary["rows_error"] == 0
    for row in table.to_pylist():
        assert row["label"] in ("positive", "negative")
        assert math.isclose(sum(row["probs"].values()), 1.0, abs_tol=1e-6)
        assert row["label"] == max(row["probs"], key=row["probs"].get)
        assert row["extra"] == row["row_id"] and row["gold"] in ("positive", "negative")
        assert row["prompt_tokens"] > 10 and row["output_tokens"] == 1 and row["error_code"] is None
    ev = summary["evaluation"]
    assert ev["rows"] == n and 0 <= ev["accuracy"] <= 1
    assert sum(map(sum, ev["confusion"]["matrix"])) == n
    assert (out_root / "out" / SUCCESS).exists()
    assert json.loads((out_root / "out" / "_summary.json").read_text())["rows_ok"] == n


def test_many_labels_one_pass(tiny_pool, tiny_model, out_root):
    labels = ["positive", "negative", "neutral", "spam", "ham", "sports", "business", "world", "science"]
    pq.write_table(pa.table({"text": _texts(30)}), out_root / "in.parquet")
    # A plain prompt ending in "Answer:": labels follow with a space, one distinct token each.
    prompt = {"chat": False, "template": "{{ text }}\nAnswer:", "system": "Topics: {{ labels | join(', ') }}"}
    _run(
        tiny_pool,
        job_dict(
            tiny_model,
            out_root / "in.parquet",
            "o",
            task={"type": "classify", "labels": labels},
            prompt=prompt,
        ),
    )
    rows = read_output(out_root / "o").to_pylist()
    assert len(rows) == 30
    for r in rows:
        assert r["label"] in labels and set(r["probs"]) == set(labels) and r["output_tokens"] == 1
        assert math.isclose(sum(r["probs"].values()), 1.0, abs_tol=1e-6)


def test_guided_choice_when_first_tokens_collide(tiny_pool, tiny_model, out_root):
    pq.write_table(pa.table({"text": _texts(6)}), out_root / "in.parquet")
    labels = ["negative", "neutral"]  # in a chat prompt both start with the token "ne" → guided choice
    _run(
        tiny_pool,
        job_dict(tiny_model, out_root / "in.parquet", "o", task={"type": "classify", "labels": labels}),
    )
    rows = read_output(out_root / "o").to_pylist()
    assert [r["label"] in labels for r in rows] == [True] * 6
    assert all(sorted(r["probs"].values()) == [0.0, 1.0] for r in rows)


def test_generate_is_deterministic_at_temperature_zero(tiny_pool, tiny_model, out_root):
    pq.write_table(pa.table({"text": _texts(40)}), out_root / "in.parquet")
    task = {"type": "generate", "max_tokens": 6}
    summaries = [
        _run(tiny_pool, job_dict(tiny_model, out_root / "in.parquet", out, task=task)) for out in "ab"
    ]
    a = {r["row_id"]: r for r in read_output(out_root / "a").to_pylist()}
    b = {r["row_id"]: r for r in read_output(out_root / "b").to_pylist()}
    assert set(a) == set(b) == set(range(40))
    assert all(a[i]["text"] == b[i]["text"] and a[i]["output_tokens"] == 6 for i in a)
    assert {r["finish_reason"] for r in a.values()} == {"length"}
    # each run's summary has the engine's scheduler load over that run alone (engine/load.py), read
    # from the real vLLM engine: this job's tokens, not the warm-up's or the other run's
    for s in summaries:
        (engine,) = s["engines"]
        load = engine["load"]
        assert load["output_tokens"] == 40 * 6
        assert load["prompt_tokens"] == sum(r["prompt_tokens"] for r in a.values())
        assert load["steps"] >= 6 and 0 < load["running_mean"] <= load["max_num_seqs"]
        assert engine["load"]["max_num_seqs"] == engine["max_num_seqs"]
        assert isinstance(engine["async_scheduling"], bool)  # as vLLM resolved it at start


def test_bad_rows_become_error_rows_and_the_job_goes_on(tiny_pool, tiny_model, out_root):
    texts = [
        b"fine movie",
        None,
        b"   ",
        b"\xff\xfe not utf-8",
        ("long " * 2000).encode(),
        b"ok again",
        b"also ok",
    ]
    authors = ["a", "b", "c", "d", "e", None, "g"]
    pq.write_table(
        pa.table({"text": pa.array(texts, pa.binary()), "author": authors}), out_root / "in.parquet"
    )
    data = job_dict(
        tiny_model, out_root / "in.parquet", "o", prompt={"template": "{{ text }} (by {{ author }})"}
    )
    summary = _run(tiny_pool, data)
    rows = {r["row_id"]: r for r in read_output(out_root / "o").to_pylist()}
    codes = {i: rows[i]["error_code"] for i in rows}
    assert codes == {
        0: None,
        1: "EMPTY_INPUT",
        2: "EMPTY_INPUT",
        3: "INVALID_UTF8",
        4: "PROMPT_TOO_LONG",
        5: "TEMPLATE_ERROR",
        6: None,
    }
    assert rows[0]["label"] in ("positive", "negative") and rows[3]["label"] is None
    assert all(rows[i]["error_message"] for i in (1, 2, 3, 4, 5))
    assert summary["rows_error"] == 5 and summary["errors_by_code"]["EMPTY_INPUT"] == 2


def test_jsonl_input_with_a_bad_line_and_extract_task(tiny_pool, tiny_model, out_root):
    lines = ['{"text": "Ann is 31"}', "not json at all", '{"text": "Bob is 40"}', '["a list"]']
    (out_root / "in.jsonl").write_text("\n".join(lines) + "\n")
    schema = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}
    _run(
        tiny_pool,
        job_dict(
            tiny_model,
            out_root / "in.jsonl",
            "o",
            task={"type": "extract", "schema": schema, "max_tokens": 12},
        ),
    )
    rows = {r["row_id"]: r for r in read_output(out_root / "o").to_pylist()}
    assert set(rows) == {0, 1, 2, 3}
    assert rows[1]["error_code"] == rows[3]["error_code"] == "BAD_INPUT_LINE"
    for i in (0, 2):  # random weights: valid JSON that fits the schema, or a clear extract error
        r = rows[i]
        if r["error_code"] is None:
            assert isinstance(json.loads(r["json"])["age"], int)
        else:
            assert r["error_code"] in ("INVALID_JSON", "SCHEMA_MISMATCH") and r["text"] is not None


def test_hf_dataset_input_with_id_column(tiny_pool, tiny_model, out_root):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"uid": [f"u{i}" for i in range(25)], "text": _texts(25)})
    ds.save_to_disk(str(out_root / "hf"))
    data = job_dict(tiny_model, out_root / "hf", "o", input={"id_column": "uid", "limit": 20})
    summary = _run(tiny_pool, data)
    ids = read_output(out_root / "o").column("row_id").to_pylist()
    assert sorted(ids) == sorted(f"u{i}" for i in range(20)) and summary["rows_ok"] == 20


def test_duplicate_ids_fail_before_any_engine_work(tiny_pool, tiny_model, out_root):
    from turbo_batch.errors import JobError

    pq.write_table(pa.table({"uid": [1, 2, 2], "text": _texts(3)}), out_root / "in.parquet")
    with pytest.raises(JobError, match="duplicate"):
        _run(tiny_pool, job_dict(tiny_model, out_root / "in.parquet", "o", input={"id_column": "uid"}))
    assert not (out_root / "o").exists()


def test_engine_that_cannot_start_is_one_clear_line(ray_session, tmp_path):
    import asyncio

    from turbo_batch.batch.pool import EnginePool
    from turbo_batch.errors import EngineStartError

    bad = tmp_path / "broken-model"
    bad.mkdir()
    (bad / "config.json").write_text(
        '{"architectures": ["NoSuchModelForCausalLM"], "model_type": "nonsense"}'
    )
    job = JobSpec.model_validate(job_dict(bad, "x", "y", cluster={"engine_cpus": 0.25}))
    with pytest.raises(EngineStartError) as exc:
        asyncio.run(EnginePool.start(job))
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(f"cannot start vLLM engine for {bad}")


def test_explicit_guided_method(tiny_pool, tiny_model, out_root):
    """method: guided on labels whose first tokens differ (auto would score them in one pass)."""
    pq.write_table(pa.table({"text": _texts(8)}), out_root / "in.parquet")
    task = {"type": "classify", "labels": ["positive", "negative"], "method": "guided"}
    summary = _run(tiny_pool, job_dict(tiny_model, out_root / "in.parquet", "o", task=task))
    rows = {r["row_id"]: r for r in read_output(out_root / "o").to_pylist()}
    assert sorted(rows) == list(range(8)) and summary["rows_ok"] == 8
    for r in rows.values():  # guided: a generated label (more than one token: the label, then its end)
        assert r["label"] in ("positive", "negative") and r["output_tokens"] > 1
        assert r["probs"] == {lab: float(lab == r["label"]) for lab in ("positive", "negative")}
