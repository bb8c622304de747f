"""The turbo variant: `python -m turbo_batch.cli run job.yaml --quiet --restart`, as a user runs it;
rows/s = rows / `_summary.json` wall_s (engines ready -> last row committed: read, render, dispatch,
parse and write included; engine start excluded). Process wall (Ray + engine start) is reported too."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from .common import REPO, tail, write_outputs
from .hostcpu import HostCpu, excl_engine_per_1k, timed_window


def run_turbo(workdir: Path, plan: dict[str, Any]) -> dict[str, Any]:
    import time

    from turbo_batch.batch.write import MANIFEST, SUMMARY, read_output

    out_dir = Path(plan["output_dir"])
    shutil.rmtree(out_dir, ignore_errors=True)
    env = {**os.environ, "TURBO_BATCH_OUTPUT_ROOT": str(workdir)}
    cmd = [sys.executable, "-m", "turbo_batch.cli", "run", plan["job_file"], "--quiet", "--restart"]
    logf = workdir / "turbo.log"
    t0, started = time.perf_counter(), time.time()
    with open(logf, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
        meter = HostCpu(proc.pid, workdir=workdir).start()
        rc = proc.wait()
        meter.stop()
    proc_wall = time.perf_counter() - t0
    _keep_engine_log(started, workdir / "turbo_engine.log")
    if rc != 0:
        raise RuntimeError(f"turbo-batch run exited {rc}; see {logf}:\n" + tail(logf))
    s = json.loads((out_dir / SUMMARY).read_text())
    # From the last commit (the manifest's last write) to the summary file: engine shutdown, mostly.
    after_s = (out_dir / SUMMARY).stat().st_mtime - (out_dir / MANIFEST).stat().st_mtime
    table = read_output(out_dir)
    cols = [
        c
        for c in ("row_id", "label", "probs", "prompt_tokens", "text", "output_tokens")
        if c in table.column_names
    ]
    rows = table.select(cols).to_pylist()
    for r in rows:
        if "probs" in r:
            r["probs"] = [(r["probs"] or {}).get(lab) for lab in plan["labels"]]
    write_outputs(workdir, "turbo", rows)
    wall = s["wall_s"]
    window = timed_window(out_dir, wall)
    host = meter.between(*window)
    whole = meter.between(started, time.time())  # + Ray and engine start, work done before engines are ready
    out_tok = sum(r.get("output_tokens") or 0 for r in rows) if plan.get("kind") == "generate" else 0
    return {
        "variant": "turbo",
        "rows": s["rows_this_run"],
        "rows_ok": s["rows_ok"],
        "rows_error": s["rows_error"],
        "timed_s": wall,
        "rows_per_s": s["rows_this_run"] / wall,
        "output_tokens_per_s": out_tok / wall if out_tok else None,
        "method": "rows / _summary.json wall_s (engines ready -> last row committed: read, render, "
        "dispatch, parse and write included; engine start excluded)",
        "engine_start_s": s["engine_start_s"],
        "process_wall_s": proc_wall,
        "process_rows_per_s": s["rows_this_run"] / proc_wall,
        "last_commit_to_summary_s": after_s,
        "summary_accuracy": (s.get("evaluation") or {}).get("accuracy"),
        "window": list(window),  # bench_batch samples the GPU there
        # the scheduler's load in the window, from the job's summary (turbo_batch/engine/load.py)
        "engine_load": next((e.get("load") for e in s.get("engines") or []), None),
        "async_scheduling": next((e.get("async_scheduling") for e in s.get("engines") or []), None),
        # CPU seconds per 1,000 rows = cores per 1,000 rows/s (issue 11 point 4's bar: <= 1, engines excluded)
        "host_cpu": {
            **host,
            "window_s": wall,
            "rows": s["rows_this_run"],
            "cpu_s_per_1k_rows_excl_engine": excl_engine_per_1k(host, s["rows_this_run"]),
            "whole_run": {
                **whole,
                "cpu_s_per_1k_rows_excl_engine": excl_engine_per_1k(whole, s["rows_this_run"]),
            },
        },
    }


def _keep_engine_log(since: float, dest: Path, ray_tmp: Path = Path("/tmp/ray")) -> Path | None:
    """Copy the engine actor's log out of the job's private Ray session (its config lines: async
    scheduling, CUDA graphs, KV cache size; and vLLM's stats line every 10 s), which Ray deletes with
    the next sessions: compared with raw vLLM's log, it shows whether both engines ran alike."""
    marker = "Initializing a V1 LLM engine"
    sessions = sorted((d for d in ray_tmp.glob("session_2*") if d.is_dir() and d.stat().st_mtime >= since - 5),
                      key=lambda d: d.stat().st_mtime, reverse=True)  # fmt: skip
    for d in sessions:
        for f in sorted((d / "logs").glob("worker-*")):
            try:
                text = f.read_text(errors="replace")
            except OSError:
                continue
            if marker in text:
                dest.write_text(text)
                return dest
    return None


def child_probe(workdir: Path, args: Any) -> None:
    """Machine facts (+ the GPU model's weights): torch/CUDA only ever initialise in a child."""
    import time

    from .common import build_gemma4, emit, machine
    from .presets import PRESETS

    info = machine()
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu_capability"] = list(torch.cuda.get_device_capability(0))
    except Exception:
        pass
    names = args.preset.split(",")
    if any(PRESETS[p].get("model") == "gemma4" for p in names) and not args.dry_run:
        model = Path(args.model_dir).resolve() if args.model_dir else workdir / "gemma4-1.2b-random"
        t0 = time.time()
        build_gemma4(model, Path(args.tok).resolve(), weights=True)
        info["build_model_s"] = round(time.time() - t0, 1)
    emit(info)
