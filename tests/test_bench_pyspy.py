"""bench_serve.py's py-spy summary reads py-spy's raw (collapsed) stacks correctly: thread shares, the
busy share per thread, top self and inclusive frames."""

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
