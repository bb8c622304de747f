"""Issue 9 on the real pipeline (tiny Gemma 4, real Ray): bad input poisons only its own row, a job
that cannot work fails before any engine starts, one writer per output dir. Exact ids everywhere."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tests.helpers import job_dict
from turbo_batch.batch.run import run_job
from turbo_batch.batch.write import read_output
from turbo_batch.errors import OutputError, SpecError
from turbo_batch.spec import JobSpec

pytestmark = pytest.mark.slow
GEN = {"type": "generate", "max_tokens": 2}


def _run(pool, data, **kw):
    return run_job(JobSpec.model_validate(data), pool=pool, **kw)


def _rows(path):
    table = read_output(path)
    ids = table.column("row_id").to_pylist()
    assert len(ids) == len(set(ids)), "duplicate row ids"
    return {r["row_id"]: r for r in table.to_pylist()}


def test_too_long_rows_fail_alone_within_one_dispatch_batch(tiny_pool, tiny_model, out_root):
    # 24 rows in one dispatch batch (batch_rows 32): rows 3 and 17 are too long for every engine.
    texts = [("long " * 1500) if i in (3, 17) else f"short row {i}" for i in range(24)]
    pq.write_table(pa.table({"text": texts}), out_root / "in.parquet")
    data = job_dict(tiny_model, out_root / "in.parquet", "o", task=GEN, cluster={"batch_rows": 32})
    _run(tiny_pool, data)
    codes = {i: r["error_code"] for i, r in _rows(out_root / "o").items()}
    assert codes == {i: ("PROMPT_TOO_LONG" if i in (3, 17) else None) for i in range(24)}


def test_template_failing_on_every_row_stops_before_ray(tiny_model, out_root):
    pq.write_table(pa.table({"text": ["a", "b"]}), out_root / "in.parquet")
    for template, words in (
        ("{{ ''.__class__.__mro__ }}", "unsafe"),
        ("{% for i in range(10**12) %}x{% endfor %}", "range()"),
        ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "longer than"),
        ("{{ 'a' * 10**12 }}", "repetition"),
    ):
        data = job_dict(tiny_model, out_root / "in.parquet", "o", task=GEN, prompt={"template": template})
        t0 = time.monotonic()
        with pytest.raises(SpecError) as exc:
            run_job(JobSpec.model_validate(data))  # no pool: it would start Ray and an engine
        msg = str(exc.value)
        assert exc.value.exit_code == 2 and "prompt.template" in msg and "row 0" in msg and words in msg
        assert time.monotonic() - t0 < 20 and not (out_root / "o").exists()
    # `validate` renders too and never hangs
    job = out_root / "job.yaml"
    bad = job_dict(
        tiny_model, out_root / "in.parquet", "o", task=GEN, prompt={"template": "{{ 10 ** (10 ** 10) }}"}
    )
    job.write_text(yaml.safe_dump(bad))
    r = subprocess.run(
        [sys.executable, "-m", "turbo_batch.cli", "validate", str(job)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=out_root,
    )
    assert r.returncode == 2 and "prompt.template" in r.stderr and "row 0" in r.stderr, r.stderr


def test_template_failing_on_some_rows_makes_template_errors(tiny_pool, tiny_model, out_root):
    n = [1, 0, 2, 0, 5]
    pq.write_table(pa.table({"text": [f"t{i}" for i in range(5)], "n": n}), out_root / "in.parquet")
    tpl = "{{ text }} {{ 10 // n }}{% if n == 2 %}{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{% endif %}"
    _run(tiny_pool, job_dict(tiny_model, out_root / "in.parquet", "o", task=GEN, prompt={"template": tpl}))
    rows = _rows(out_root / "o")
    assert {i: r["error_code"] for i, r in rows.items()} == {
        0: None,
        1: "TEMPLATE_ERROR",
        2: "TEMPLATE_ERROR",
        3: "TEMPLATE_ERROR",
        4: None,
    }
    assert "ZeroDivisionError" in rows[1]["error_message"] and "longer than" in rows[2]["error_message"]


def test_one_writer_per_output_dir(tiny_pool, tiny_model, out_root):
    n = 300
    pq.write_table(pa.table({"text": [f"row {i} text" for i in range(n)]}), out_root / "in.parquet")
    data = job_dict(tiny_model, out_root / "in.parquet", "o", task=GEN)
    first: dict = {}

    def a():
        try:
            first["summary"] = _run(tiny_pool, data)
        except BaseException as e:
            first["error"] = e

    t = threading.Thread(target=a)
    t.start()
    deadline = time.monotonic() + 60
    while not (out_root / "o" / "_lock").exists() or not (out_root / "o" / "_lock").read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with pytest.raises(OutputError) as exc:  # a second run on the same dir, while the first writes
        _run(tiny_pool, data)
    assert f"pid {os.getpid()}" in str(exc.value) and "being written by another run" in str(exc.value)
    t.join(300)
    assert "error" not in first, first.get("error")
    # a resume on the finished dir: nothing redone, exact ids, no duplicates
    summary = _run(tiny_pool, data)
    assert summary["rows_ok"] + summary["rows_error"] == 0
    assert sorted(_rows(out_root / "o")) == list(range(n))
    # a lock left by a SIGKILLed holder is taken over
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys,time; from turbo_batch.batch.lock import OutputLock; "
            f"OutputLock({str(out_root / 'o2')!r}).acquire(); print('held', flush=True); time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    data2 = job_dict(tiny_model, out_root / "in.parquet", "o2", task=GEN, input={"limit": 40})
    with pytest.raises(OutputError, match=f"pid {holder.pid}"):
        _run(tiny_pool, data2)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    _run(tiny_pool, data2)
    assert sorted(_rows(out_root / "o2")) == list(range(40))


def test_bad_jsonl_lines_surrogates_and_reserved_names(tiny_pool, tiny_model, out_root):
    lines = [
        b'{"uid": "a", "text": "fine one", "row_id": 5, "budget": "keep me"}',
        b"not json at all",
        b"[" * 50000,
        b'{"uid": "d", "text": "lone \\ud800 surrogate", "row_id": 6, "budget": "b"}',
        b'{"uid": "e", "text": "raw \xff\xfe bytes", "row_id": 7, "budget": "c"}',
        b'{"uid": "f", "text": "fine", "row_id": 8, "budget": "\\udc80"}',
        b'{"uid": "g", "text": "also fine", "row_id": {"nested": [1, 2]}, "budget": 3}',
    ]
    (out_root / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    data = job_dict(
        tiny_model,
        out_root / "in.jsonl",
        "o",
        task=GEN,
        input={"id_column": "uid"},
        prompt={"template": "{{ text }} / {{ budget }}"},
        output={"keep_columns": ["row_id", "budget"]},
    )
    _run(tiny_pool, data)
    rows = _rows(out_root / "o")
    assert {i: r["error_code"] for i, r in rows.items()} == {
        "a": None,
        "#row-1": "BAD_INPUT_LINE",
        "#row-2": "BAD_INPUT_LINE",
        "d": "INVALID_UTF8",
        "e": "INVALID_UTF8",
        "f": "INVALID_UTF8",
        "g": None,
    }
    assert "nested too deep" in rows["#row-2"]["error_message"]
    # input columns named like internal ones come out renamed, never overwritten
    assert rows["a"]["input_row_id"] == "5" and rows["a"]["input_budget"] == "keep me"
    assert rows["g"]["input_row_id"] == '{"nested": [1, 2]}' and rows["g"]["input_budget"] == "3"


def test_invalid_utf8_in_parquet_string_large_string_binary(tiny_pool, tiny_model, out_root):
    bad = [b"good one", b"\xed\xa0\x80 surrogate", b"fine", b"\xff bytes", b"ok"]
    table = pa.table(
        {
            "text": pa.array(bad, pa.binary()).view(pa.string()),
            "big": pa.array([b"x", b"y", b"\xc3", b"z", b"w"], pa.large_binary()).view(pa.large_string()),
            "blob": pa.array([b"1", b"2", b"3", b"4", b"\xfe"], pa.binary()),
            "budget": [1, 2, 3, 4, 5],
        }
    )
    pq.write_table(table, out_root / "in.parquet")
    data = job_dict(
        tiny_model,
        out_root / "in.parquet",
        "o",
        task=GEN,
        input={"text_columns": ["text", "blob"]},
        prompt={"template": "{{ text }} {{ big }} {{ blob }}"},
        output={"keep_columns": ["big", "budget"]},
    )
    _run(tiny_pool, data)
    rows = _rows(out_root / "o")
    assert {i: r["error_code"] for i, r in rows.items()} == {
        0: None,
        1: "INVALID_UTF8",
        2: "INVALID_UTF8",
        3: "INVALID_UTF8",
        4: "INVALID_UTF8",
    }
    assert (
        rows[0]["big"] == "x"
        and rows[2]["big"] is None
        and [rows[i]["input_budget"] for i in range(5)] == [1, 2, 3, 4, 5]
    )


def test_type_drift_and_mixed_ids_are_clear_preflight_errors(tiny_model, out_root):
    (out_root / "d").mkdir()
    pq.write_table(pa.table({"text": ["a"], "k": ["s"], "uid": [1]}), out_root / "d" / "1.parquet")
    pq.write_table(pa.table({"text": ["b"], "k": [2], "uid": ["x"]}), out_root / "d" / "2.parquet")
    data = job_dict(tiny_model, out_root / "d", "o", task=GEN, output={"keep_columns": ["k"]})
    with pytest.raises(SpecError, match=r"column 'k' is string in .*1.parquet but int64 in .*2.parquet"):
        run_job(JobSpec.model_validate(data))
    data = job_dict(tiny_model, out_root / "d", "o", task=GEN, input={"id_column": "uid"})
    with pytest.raises(SpecError, match=r"integer in .*1.parquet and string in .*2.parquet"):
        run_job(JobSpec.model_validate(data))
    (out_root / "m.jsonl").write_text('{"uid": 1, "text": "a"}\n{"uid": "1", "text": "b"}\n')
    data = job_dict(tiny_model, out_root / "m.jsonl", "o", task=GEN, input={"id_column": "uid"})
    with pytest.raises(SpecError, match="mixes integer and string ids"):
        run_job(JobSpec.model_validate(data))
    assert not (out_root / "o").exists()


def test_kept_columns_widen_across_files_and_in_place_edit_is_caught(tiny_pool, tiny_model, out_root):
    (out_root / "w").mkdir()
    pq.write_table(
        pa.table({"text": ["a", "b"], "k": pa.array([1, 2], pa.int32())}), out_root / "w" / "1.parquet"
    )
    pq.write_table(pa.table({"text": ["c"], "k": [2.5]}), out_root / "w" / "2.parquet")
    data = job_dict(tiny_model, out_root / "w", "o", task=GEN, output={"keep_columns": ["k"]})
    _run(tiny_pool, data)
    rows = _rows(out_root / "o")
    assert {i: r["k"] for i, r in rows.items()} == {0: 1.0, 1: 2.0, 2: 2.5}
    # an in-place edit of the same size (and mtime put back) changes the identity: no stale resume
    f = out_root / "w" / "1.parquet"
    st = f.stat()
    pq.write_table(pa.table({"text": ["x", "y"], "k": pa.array([1, 2], pa.int32())}), f)
    assert f.stat().st_size == st.st_size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(OutputError, match="different job"):
        _run(tiny_pool, data)
