"""Benchmark helpers: bench_serve.py's py-spy summary reads py-spy's raw (collapsed) stacks correctly
(thread shares, busy share per thread, top self and inclusive frames); the per-thread CPU of the
serving process; bench_prefix.py's merge of a pair run's halves; bench_prefix's --sequence and --raw-runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

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


def test_prefix_run_sequence_and_raw_calls():
    """bench_prefix --sequence / --raw-runs: a GPU half's runs in the order given; anything else is refused
    before an engine starts."""
    import pytest
    from bench_prefix import raw_calls, sequence

    assert raw_calls(2, None) == ["shuffled", "grouped", "shuffled", "grouped"]
    assert raw_calls(3, "shuffled, grouped,grouped") == ["shuffled", "grouped", "grouped"]
    assert sequence("raw,turbo,turbo") == ["raw", "turbo", "turbo"]
    for bad in ("shuffled,sorted", " , "):
        with pytest.raises(SystemExit, match="--raw-runs"):
            raw_calls(1, bad)
    with pytest.raises(SystemExit, match="--sequence"):
        sequence("raw,vllm")


def test_prefix_pair_halves_merge_into_one_result():
    """bench_prefix --merge: a pair run's halves (raw on one GPU, turbo on the other) give the medians of
    the whole run; halves with different settings are refused."""
    import copy
    import json

    import pytest
    from bench_prefix import markdown, merge

    d = json.loads((REPO / "benchmarks" / "results" / "prefix_gpu-gemma4-9b.json").read_text())
    raw, turbo = copy.deepcopy(d), copy.deepcopy(d)
    raw["runs"], raw["checks"] = [r for r in d["runs"] if r["variant"] != "turbo"], {}
    turbo["runs"] = [r for r in d["runs"] if r["variant"] == "turbo"]
    turbo["settings"]["engine_args"]["model"] = "/root/bb-model-1"  # one model folder per GPU
    raw["checks"] = {"ray_data_llm": {"rows_out": 10, "agree_with_raw_pct": 99.9}}  # raw beside it here
    turbo["checks"] = {**turbo["checks"], "ray_data_llm": {"rows_out": 10, "unparsed_labels": 0}}  # not here
    m = merge([raw, turbo])
    for k in ("turbo_rows_s", "raw_shuffled_rows_s", "raw_grouped_rows_s", "turbo_over_raw_grouped"):
        assert m[k] == d[k]
    # a half without raw vLLM has no agreement figure: the one from the half that had it is kept
    assert m["checks"]["ray_data_llm"] == {"rows_out": 10, "agree_with_raw_pct": 99.9, "unparsed_labels": 0}
    others = sorted({r["variant"] for r in d["runs"]} - {"turbo"})
    assert m["pair"] == [others, ["turbo"]] and "| " in markdown(m)
    turbo["settings"]["rows"] += 1
    with pytest.raises(SystemExit):
        merge([raw, turbo])
    turbo["settings"]["rows"] -= 1
    turbo["settings"]["standin"] = "1.2b"  # the same rows and engine args on another model shape
    with pytest.raises(SystemExit):
        merge([raw, turbo])


def test_ttft_after_first_wave_splits_the_closed_loop_burst_from_the_rest():
    """vllm bench serve's per-request start times (--save-detailed) split the first `conc` requests,
    sent at once, from the steady state; the markdown carries both medians."""
    from bench_serve import ttft_after_first_wave
    from serve_procs import markdown

    # 4 requests sent at once (slow first tokens: 0.4 s), then 6 as slots free (0.05 s); listed out of
    # order, as the bench's list is by completion
    starts = [0.0, 0.0, 0.0, 0.0, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5]
    ttfts = [0.4, 0.41, 0.42, 0.43, 0.05, 0.06, 0.05, 0.07, 0.05, 0.0]  # the last one failed (0)
    order = [5, 0, 9, 1, 6, 2, 7, 3, 8, 4]
    d = {"start_times": [starts[i] for i in order], "ttfts": [ttfts[i] for i in order]}
    m = ttft_after_first_wave(d, conc=4)
    assert m == {
        "median_ttft_first_wave_ms": 420.0,
        "median_ttft_after_first_wave_ms": 50.0,
        "p99_ttft_after_first_wave_ms": 70.0,
    }
    assert ttft_after_first_wave({"ttfts": ttfts}, conc=4) == {}  # no start times (an older vLLM)
    assert ttft_after_first_wave(d, conc=10) == {}  # no steady state
    doc = {"preset": "p", "date": "d", "machine": {}, "engine_args": {}, "concurrency": 4, "workloads": [],
           "variants": {"vllm": {"workloads": {"1K": {"req_s": 1.0, **m}}}}}  # fmt: skip
    assert "of the rest: vllm 1K 420.0 / 50.0." in markdown(doc)


def test_host_cpu_splits_a_window_by_role_and_title():
    """bench/hostcpu.py: an interval's CPU is cut in proportion at the window's edges and goes to the
    title seen at its end; roles come from Ray's process titles."""
    from bench.hostcpu import HostCpu, role, short_title

    assert role("ray::Engine.run_rows", False) == "engine"
    assert role("VLLM::EngineCore", False) == "engine"
    assert role("ray::MapBatches(render)", False) == "ray_tasks"
    assert role("/usr/bin/raylet --foo", False) == "ray_system"
    assert role("python -m turbo_batch.cli run job.yaml", True) == "driver"
    assert short_title("ray::MapBatches(render) x") == "ray::MapBatches(render)"
    assert short_title("/venv/bin/python3 /venv/lib/ray/gcs_server --x") == "gcs_server"
    assert short_title("/venv/bin/python3 -u -m turbo_batch.cli run j.yaml") == "turbo_batch.cli"
    m = HostCpu(root_pid=1, every=1.0)
    m.samples[1] = [(10.0, 5.0, "python cli"), (12.0, 6.0, "python cli")]  # root: history before polling
    m.samples[7] = [
        (10.0, 0.2, "ray::IDLE"),
        (12.0, 2.2, "ray::MapBatches(render)"),
        (14.0, 2.2, "ray::IDLE"),
    ]
    m.samples[9] = [
        (11.0, 3.0, "/x/raylet")
    ]  # first seen already busy: older than the polling, nothing counted
    # vLLM's engine core before it names itself: all its life is the engine's
    m.samples[11] = [(12.0, 0.1, "python -c from multiprocessing.spawn"), (13.0, 1.1, "VLLM::EngineCore")]
    got = m.between(11.0, 13.0)
    # pid 7: born at ~9.0 (one `every` before its first sample): 0.2 s over 9..10 is outside; 2.0 s over
    # 10..12, half inside, to the render task; nothing over 12..14. Root: 1.0 s over 10..12, half inside.
    # pid 11: 0.1 s over 11..12 and 1.0 over 12..13, all inside.
    assert got["by_role"] == {"driver": 0.5, "engine": 1.1, "ray_tasks": 1.0}
    assert got["by_title"] == {"VLLM::EngineCore": 1.1, "ray::MapBatches(render)": 1.0, "cli": 0.5}
    assert m.between(0.0, 100.0)["by_role"] == {"driver": 1.0, "engine": 1.1, "ray_tasks": 2.2}


def test_host_cpu_follows_a_real_process_tree():
    """Polling a real tree: a busy grandchild titled like Ray's engine actor and one like a render task
    are found under the root and their CPU lands on the right roles; nothing after the window."""
    import shlex
    import subprocess
    import time

    from bench.hostcpu import HostCpu

    py = shlex.quote(str(Path(sys.executable).resolve()))  # the binary itself: a pyenv shim would re-exec

    busy = "import time; t=time.process_time(); exec('while time.process_time()-t<0.4: pass')"
    script = (f'(exec -a "ray::Engine.run_rows" {py} -c "{busy}") & '
              f'(exec -a "ray::MapBatches(render)" {py} -c "{busy}") & wait')  # fmt: skip
    t0 = time.time()
    p = subprocess.Popen(["bash", "-c", script])
    m = HostCpu(p.pid, every=0.05).start()
    p.wait()
    m.stop()
    t1 = time.time()
    got = m.between(t0, t1)
    assert 0.25 <= got["by_role"].get("engine", 0) <= 0.6, got
    assert 0.25 <= got["by_role"].get("ray_tasks", 0) <= 0.6, got
    assert got["by_role"].get("driver", 0) < 0.2, got
    assert {"ray::Engine.run_rows", "ray::MapBatches(render)"} <= set(got["by_title"]), got
    assert m.between(t1 + 1, t1 + 10)["by_role"] == {}


def test_widehost_finds_the_processes_that_loaded_the_tokenizer():
    """bench_widehost.py's count, through HostCpu's poll of a real tree: of two Ray-titled children,
    the one that imported `tokenizers` is counted as having it loaded, the other only as a worker;
    the bash parent is neither."""
    import os
    import shlex
    import subprocess

    from bench.hostcpu import HostCpu
    from bench_widehost import TokenizerWatch, tokenizer_loaded

    py = shlex.quote(str(Path(sys.executable).resolve()))
    ready = "import sys; sys.stdout.write('ok'); sys.stdout.flush(); sys.stdin.read()"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}  # the base binary, this venv's packages
    # `0<&0`: without job control bash gives a background command /dev/null as stdin, and the children
    # would exit at once (read() at EOF) and be gone, or half gone, when the tree is sampled
    script = " & ".join(f'(exec -a "ray::MapBatches(render)" {py} -c "{imp}{ready}") 0<&0'
                        for imp in ("import tokenizers; ", "")) + " & wait"  # fmt: skip
    p = subprocess.Popen(["bash", "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    watch = TokenizerWatch()
    meter = HostCpu(p.pid, every=3600, on_sample=watch)  # polled by hand below
    try:
        assert p.stdout.read(4) == b"okok"  # both imported and waiting
        meter.sample()
    finally:
        p.stdin.close()
        p.wait(timeout=10)
    assert len(watch.workers) == 2 and p.pid not in watch.workers
    assert len(watch.with_tokenizer) == 1 and watch.with_tokenizer <= watch.workers
    assert not tokenizer_loaded(next(iter(watch.with_tokenizer)))  # gone: no maps to read


def test_benchmarks_run_vllm_as_it_ships_beside_turbo_batch(tiny_model):
    """bench's engine args (raw vLLM, ray.data.llm, the plan) are profiles' for the job, without the
    CPU executor turbo-batch's own engines use (engine/cpu_executor.py)."""
    from bench.common import shipped_engine_args

    from turbo_batch.engine import profiles

    model = {"path": str(tiny_model), "preset": "auto"}
    cpu = profiles.Device("cpu", "cpu", 24, None, False)
    own = profiles.engine_args(
        model, cpu, max_labels=2, model_max_len=profiles.model_context_len(str(tiny_model))
    )
    assert own["distributed_executor_backend"] == profiles.CPU_EXECUTOR
    assert shipped_engine_args(model, cpu, 2) == {
        k: v for k, v in own.items() if k != "distributed_executor_backend"
    }


def test_gpu_samples_summarise_a_window():
    """bench/gpumeter.py: nvidia-smi's csv lines -> clock, power and time at the power cap in a window;
    unreadable lines are skipped; without nvidia-smi the meter is a no-op."""
    from bench.gpumeter import GpuMeter, parse_line, summarise

    assert parse_line("1980, 612.5, 55, 97, 0x0000000000000004") == (1980.0, 612.5, 55.0, 97.0, 4)
    assert parse_line("[N/A], 612.5, 55, 97, 0x0") is None and parse_line("garbage") is None
    samples = [(t, parse_line(x)) for t, x in enumerate(
        ["1980, 600, 50, 99, 0x0", "1700, 700, 60, 99, 0x4", "1500, 700, 70, 99, 0x24", "345, 80, 40, 0, 0x1"])]  # fmt: skip
    s = summarise(samples[:3])
    assert s["samples"] == 3 and s["sm_mhz_mean"] == 1727 and s["sm_mhz_min"] == 1500
    assert s["power_capped_pct"] == 66.7 and s["thermal_pct"] == 33.3 and s["temp_c_max"] == 70
    m = GpuMeter()
    m.samples = samples
    assert m.between(1, 2)["samples"] == 2 and m.between(10, 20) is None


def test_results_show_each_runs_engine_load_and_gpu():
    """report_md.window_lines: a run's scheduler load and GPU samples, where it has them."""
    from bench.report_md import window_lines

    load = {"running_mean": 121.3, "max_num_seqs": 128, "waiting_mean": 80.5, "full_steps_pct": 90.1,
            "starved_steps_pct": 2.0, "steps_per_s": 95.2}  # fmt: skip
    gpu = {
        "sm_mhz_mean": 1700,
        "sm_mhz_min": 1400,
        "power_w_mean": 690.0,
        "temp_c_max": 71,
        "power_capped_pct": 88.0,
    }
    d = {"variants": ["raw", "turbo"], "results": {
        "raw": {"runs": [{"run": 1, "rows_per_s": 60.2, "engine_load": load, "gpu": gpu,
                          "engine_core_runqueue_wait_s": 0.42, "async_scheduling": True}]},
        "turbo": {"runs": [{"run": 1, "rows_per_s": 51.8, "part": 2}]}}}  # fmt: skip
    lines = window_lines(d)
    assert any(
        "| raw | 1 | 60.20 | on | 121.3 of 128 | 80.5 | 90.1% / 2% | 95.2 | 0.42 | 1700 (1400) | 690 | 71 | 88% |"
        in x
        for x in lines
    )
    assert not any("| turbo |" in x for x in lines)  # nothing recorded: no row
    assert window_lines({"variants": ["raw"], "results": {"raw": {"runs": [{"run": 1}]}}}) == []


def test_the_engine_log_is_kept_from_the_jobs_own_ray_session(tmp_path):
    """bench/turbo._keep_engine_log: the engine actor's log from a Ray session made since the run began
    (an older session's engine log is not it); nothing to keep gives None."""
    import os
    import time

    from bench.turbo import _keep_engine_log

    old, new = tmp_path / "session_2026_old" / "logs", tmp_path / "session_2026_new" / "logs"
    for d, text in ((old, "old engine"), (new, "new engine")):
        d.mkdir(parents=True)
        (d / "worker-a-1.out").write_text("a render task\n")
        (d / "worker-b-2.out").write_text(
            f"Initializing a V1 LLM engine ... {text}\nAsynchronous scheduling is enabled.\n"
        )
    t = time.time()
    os.utime(old.parent, (t - 3600, t - 3600))
    dest = tmp_path / "turbo_engine.log"
    assert _keep_engine_log(t - 60, dest, ray_tmp=tmp_path) == dest and "new engine" in dest.read_text()
    assert _keep_engine_log(t + 3600, tmp_path / "none.log", ray_tmp=tmp_path) is None


def test_batch_variant_order_follows_first(monkeypatch, tmp_path):
    """bench_batch --first: raw vLLM, turbo-batch and ray.data.llm run in the order asked for (so a
    lease can alternate them), and a variant that ran before raw vLLM is compared with it afterwards."""
    import argparse

    import bench.turbo
    import bench_batch

    order: list[str] = []
    compared: list[tuple[str, bool]] = []

    def result(v: str) -> dict:
        order.append(v)
        return {"variant": v, "rows_per_s": 1.0, "timed_s": 1.0}

    monkeypatch.setattr(bench.turbo, "run_turbo", lambda d, p: result("turbo"))
    monkeypatch.setattr(bench_batch, "run_child", lambda d, v, a, t: result(v))
    monkeypatch.setattr(
        bench_batch, "run_child_all", lambda r, w, a, t: ([{**result("raw"), "preset": "p"}], 1.0)
    )

    def agreement(d, v, p) -> dict:
        compared.append((v, "raw" in order))
        return {"same_text_as_raw_pct": 100.0} if "raw" in order and v != "raw" else {}

    monkeypatch.setattr(bench_batch, "agreement", agreement)

    def run(first: str, repeat: int = 1) -> list[str]:
        order.clear()
        compared.clear()
        args = argparse.Namespace(
            repeat=repeat, first=first, workdir_root=str(tmp_path), timeout=9, preset="p"
        )
        variants = {"p": ["raw", "turbo", "ray_data_llm"]}
        bench_batch.run_all(args, ["p"], {"p": tmp_path}, {"p": {"engine_args": {}}}, variants, {})
        return list(order)

    assert run("raw") == ["raw", "turbo", "ray_data_llm"]
    assert run("turbo") == ["turbo", "ray_data_llm", "raw"]
    # turbo-batch and ray.data.llm ran before raw vLLM: their checks are made again once it has run
    assert compared[-2:] == [("turbo", True), ("ray_data_llm", True)]
    assert run("ray_data_llm") == ["ray_data_llm", "turbo", "raw"]
    assert run("alternate", repeat=2) == ["raw", "turbo", "ray_data_llm", "ray_data_llm", "turbo", "raw"]


@pytest.mark.parametrize("spy", ["found", "missing"])
def test_core_probe_reads_a_real_engine_core(tmp_path, monkeypatch, spy):
    """bench/coreprobe.py through HostCpu's poll: a process titled like vLLM's engine core gets its
    settings (an OMP_NUM_THREADS it was started with), and its threads' CPU in the window tells the
    busy side thread from the idle main thread; with py-spy, the window's segments are merged, and
    without one the results say so rather than leaving the profile out silently."""
    import os
    import shlex
    import subprocess
    import time

    import pyspy
    from bench.hostcpu import HostCpu

    if spy == "missing":
        monkeypatch.setattr(pyspy, "pyspy_binary", lambda: None)
    pyspy_binary = pyspy.pyspy_binary

    py = shlex.quote(str(Path(sys.executable).resolve()))
    code = (
        "import threading, time\n"
        "def spin():\n"
        "    t = time.process_time()\n"
        "    while time.process_time() - t < 2.5: pass\n"
        "th = threading.Thread(target=spin); th.start(); th.join()\n"
    )
    (tmp_path / "core.py").write_text(code)
    env = {**os.environ, "OMP_NUM_THREADS": "3", "RAY_SECRET_TOKEN": "x"}
    p = subprocess.Popen(["bash", "-c", f'exec -a "VLLM::EngineCore" {py} {tmp_path / "core.py"}'], env=env)
    m = HostCpu(p.pid, every=0.1, workdir=tmp_path)
    m.core.segment_s = 1
    m.start()
    t0 = time.time()
    p.wait()
    t1 = time.time()
    m.stop()
    core = m.between(t0, t1)["engine_core"]["cores"][0]
    assert core["pid"] == p.pid and core["env"]["OMP_NUM_THREADS"] == "3"
    assert not any(k.startswith("RAY_") for k in core["env"])
    threads = core["thread_cpu_s"]
    side = [v for k, v in threads.items() if k != "main"]
    assert side and max(side) > 1.0 and threads.get("main", 0) < 0.5, threads
    if pyspy_binary():
        prof = core.get("pyspy")
        assert prof and prof["segments"] >= 1, core
        assert any("spin" in f for f, _ in prof["top_self"]), prof["top_self"]
    else:
        assert core["pyspy"] == {"error": "no py-spy binary"}, core


def test_raw_window_feeds_vllm_as_the_dispatcher_does():
    """bench/raw.py generate_windowed: never more than the window in the engine, top-ups in whole
    batches (the last one short), every output back in prompt order whatever order they finish in."""
    from types import SimpleNamespace as NS

    from bench.raw import generate_windowed

    class Engine:
        def __init__(self):
            self.live: list[str] = []
            self.adds: list[int] = []  # requests added per top-up
            self.peak = 0
            self._added = 0

        def add_request(self, rid, prompt, params):
            self.live.append(rid)
            self._added += 1

        def step(self):
            if self._added:
                self.adds.append(self._added)
                self._added = 0
            self.peak = max(self.peak, len(self.live))
            done, self.live = self.live[-3:][::-1], self.live[:-3]  # the newest finish first
            return [NS(request_id=f"{r}-abcd1234", finished=True, prompt=r) for r in done]

    from bench.presets import RAW_MODES
    from bench.raw import FEEDS

    # every windowed feed is a raw mode bench_batch.py runs, and its top-up fits in its window
    assert set(FEEDS) <= set(RAW_MODES) and all(per * 128 >= top for per, top in FEEDS.values())
    assert FEEDS["raw_window"] == (2, 32)  # turbo-batch's defaults: rows_in_flight 2 x seqs, batch_rows 32

    eng = Engine()
    outs = generate_windowed(NS(llm_engine=eng), [f"p{i}" for i in range(50)], None, window=8, batch=4)
    assert [o.prompt for o in outs] == [f"w{i}" for i in range(50)]
    assert eng.peak <= 8 and eng.adds[0] == 8
    assert all(n % 4 == 0 for n in eng.adds[:-1]) and sum(eng.adds) == 50


def test_variants_run_in_the_order_asked():
    """bench/presets.pick_variants: --variants keeps its order (raw vLLM's modes share one engine, one
    after another), drops repeats and guided choice where there are no labels, names unknown ones;
    without --variants, the preset's own."""
    from bench.presets import PRESETS, pick_variants

    assert pick_variants("gpu-gen-200", "raw_window,raw,turbo,raw") == ["raw_window", "raw", "turbo"]
    assert pick_variants("gpu-gen-200", "raw_guided,raw") == ["raw"]
    assert pick_variants("gpu-20labels-smollm2", "raw_guided,raw") == ["raw_guided", "raw"]
    assert set(pick_variants("gpu-gen-200", None)) == set(PRESETS["gpu-gen-200"]["variants"])
    with pytest.raises(ValueError, match="raw_fast"):
        pick_variants("gpu-gen-200", "raw,raw_fast")
