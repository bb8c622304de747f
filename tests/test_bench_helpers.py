"""Benchmark helpers: bench_serve.py's py-spy summary reads py-spy's raw (collapsed) stacks correctly
(thread shares, busy share per thread, top self and inclusive frames); the per-thread CPU of the
serving process; bench_prefix.py's merge of a pair run's halves."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

RAW = """\
thread (0x7f01): MainThread;run (base.py:10);send (httptools_impl.py:420) 30
thread (0x7f01): MainThread;run (base.py:10);step (detokenizer.py:88) 50
thread (31652): Worker;poll (zmq.py:5) 20
"""


def test_summary_of_collapsed_stacks(tmp_path):
    from pyspy import summary

    path = tmp_path / "raw.txt"
    path.write_text(RAW)
    s = summary(path, ticks=400)
    assert s["samples"] == 100 and s["ticks"] == 400
    assert s["thread_share"] == {"thread: MainThread": 0.2, "thread: Worker": 0.05}  # samples per tick
    assert summary(path)["thread_share"] == {"thread: MainThread": 0.8, "thread: Worker": 0.2}
    assert s["top_self"][0] == ["step (detokenizer.py)", 0.5]
    assert ["run (base.py)", 0.8] in s["top_inclusive"]


def test_thread_cpu_names_the_busy_thread():
    import os
    import threading
    import time

    from pyspy import thread_cpu, thread_cpu_delta

    spun, stop = threading.Event(), threading.Event()

    def spin():  # 0.2 s of its own CPU however long a loaded box takes to give it that, then on
        while not stop.is_set():
            if time.thread_time() >= 0.2:
                spun.set()

    before = thread_cpu(os.getpid())
    t = threading.Thread(target=spin, name="tb-spinner")
    t.start()
    try:
        assert spun.wait(60)
        during = thread_cpu(os.getpid())  # while the spinner runs: its CPU is the largest increase
    finally:
        stop.set()
        t.join()
    assert thread_cpu(-1) == {}
    busiest = thread_cpu_delta(before, during, top=1)
    assert len(busiest) == 1 and next(iter(busiest.values())) >= 0.15
    assert list(thread_cpu_delta({"a": 1.0, "b": 1.0}, {"a": 1.5, "b": 3.0, "c": 0.0})) == ["b", "a"]


def test_prefix_pair_halves_merge_into_one_result():
    """bench_prefix --merge: a pair run's halves (raw on one GPU, turbo on the other) give the medians of
    the whole run; halves with different settings are refused."""
    import copy
    import json

    import pytest
    from bench_prefix import markdown, merge

    d = json.loads((REPO / "benchmarks" / "results" / "prefix_gpu-gemma4.json").read_text())
    raw, turbo = copy.deepcopy(d), copy.deepcopy(d)
    raw["runs"], raw["checks"] = [r for r in d["runs"] if r["variant"] != "turbo"], {}
    turbo["runs"] = [r for r in d["runs"] if r["variant"] == "turbo"]
    turbo["settings"]["engine_args"]["model"] = "/root/bb-model-1"  # one model folder per GPU
    m = merge([raw, turbo])
    for k in ("turbo_rows_s", "raw_shuffled_rows_s", "raw_grouped_rows_s", "turbo_over_raw_grouped"):
        assert m[k] == d[k]
    others = sorted({r["variant"] for r in d["runs"]} - {"turbo"})
    assert m["pair"] == [others, ["turbo"]] and "| " in markdown(m)
    turbo["settings"]["rows"] += 1
    with pytest.raises(SystemExit):
        merge([raw, turbo])
