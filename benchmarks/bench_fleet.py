"""Fleet benchmark (issue 12, point 3b): one engine vs two on one host, and two engines with different
settings (one capped like an RTX 5090) on a mixed-length job. Also issue 11's unique-prompt check.

On an nvidia-h200-x2 (two H200s, one host), the benchmark's random-weight 1.2B Gemma 4, unique ~1K-token
classify rows (bench/presets.py `gpu-gemma4`), every turbo-batch run a real `turbo-batch run job.yaml`:

  1. one     turbo-batch with `cluster.engines: 1` on GPU 0, and at the same time raw vLLM (one
             `llm.generate(all rows)`, bench/raw.py) on GPU 1: the same rows, one GPU each.
  2. two     turbo-batch with `cluster.engines: 2` on both GPUs: goal ≥ 1.9× `one`.
  3. mixed   a Ray head started with `ray start` offering `gpu-rtx-5090: 1` and `gpu-h200: 1` (the
             labels the cluster files set); `engines: auto` starts one engine per label, and
             `model.engine_by_gpu` caps the rtx-5090 one (short context, small KV cache). Rows: the
             unique rows plus long rows that only the uncapped engine can hold. Checks: every long row
             ran on the h200-labelled engine, every id exactly once, no error rows.

rows/s = rows / `_summary.json` wall_s (engines ready → last row committed; engine start excluded).
Writes benchmarks/results/fleet_<gpu|cpu>.{json,md} after every phase (a cut-off run keeps what it has).

    python benchmarks/bench_fleet.py --results-dir $OUT                  # on nvidia-h200-x2
    python benchmarks/bench_fleet.py --preset cpu-tiny --rows 400        # CPU twin (tiny model)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
from bench import common as bb
from bench.prepare import prepare

REPO = bb.REPO
LONG_TOKENS = {"gpu": 3000, "cpu": 300}  # long rows: over the capped engine's context, under the other's
CAPS = {  # engine_by_gpu of the mixed job: rtx-5090 capped (short context, small KV cache)
    "gpu": {"rtx-5090": {"max_model_len": 2048, "kv_cache_memory_bytes": 4 * 1024**3},
            "h200": {"max_model_len": 8192}},
    "cpu": {"rtx-5090": {"max_model_len": 256, "max_num_seqs": 8}, "h200": {"max_model_len": 2048}},
}  # fmt: skip


def turbo(job: dict[str, Any], workdir: Path, name: str, env: dict[str, str]) -> dict[str, Any]:
    """`turbo-batch run` of `job` in its own process; its summary plus rows/s and per-engine rows."""
    import yaml

    from turbo_batch.batch.write import SUMMARY, read_output

    job = json.loads(json.dumps(job))
    job["output"]["dir"] = str(workdir / f"out_{name}")
    path = workdir / f"job_{name}.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    logf = workdir / f"turbo_{name}.log"
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "turbo_batch.cli", "run", str(path), "--quiet", "--restart"]
    with open(logf, "w") as fh:
        rc = subprocess.run(
            cmd,
            cwd=REPO,
            env={**os.environ, "TURBO_BATCH_OUTPUT_ROOT": str(workdir), **env},
            stdout=fh,
            stderr=subprocess.STDOUT,
        ).returncode
    if rc != 0:
        raise RuntimeError(f"turbo-batch run ({name}) exited {rc}:\n{bb.tail(logf)}")
    s = json.loads((Path(job["output"]["dir"]) / SUMMARY).read_text())
    table = read_output(Path(job["output"]["dir"]))
    return {
        "variant": name,
        "rows": s["rows_this_run"],
        "rows_error": s["rows_error"],
        "timed_s": s["wall_s"],
        "rows_per_s": s["rows_this_run"] / s["wall_s"],
        "engine_start_s": s["engine_start_s"],
        "process_wall_s": time.perf_counter() - t0,
        "engines": [
            {
                k: e.get(k)
                for k in ("name", "gpu_type", "rows", "max_model_len", "max_num_seqs", "kv_cache_tokens")
            }
            for e in s["engines"]
        ],
        "_table": table,
    }


def raw(args: argparse.Namespace, workdir: Path, env: dict[str, str]) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(bb.SCRIPT),
        "--preset",
        args.bench_preset,
        "--workdir",
        str(workdir),
        "--child",
        "raw",
    ]
    cmd += ["--tok", args.tok] + (["--model-dir", args.model_dir] if args.model_dir else [])
    logf = workdir / "raw.log"
    with open(logf, "w") as fh:
        p = subprocess.run(
            cmd, cwd=REPO, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=fh, text=True
        )
    res = [json.loads(x[len(bb.MARK) :]) for x in p.stdout.splitlines() if x.startswith(bb.MARK)]
    if p.returncode or not res:
        raise RuntimeError(f"raw vLLM exited {p.returncode}:\n{bb.tail(logf)}")
    return {
        k: v
        for k, v in res[-1].items()
        if k in ("variant", "rows", "timed_s", "rows_per_s", "engine_start_s")
    }


def mixed_rows(plan: dict[str, Any], kind: str, workdir: Path) -> tuple[Path, int]:
    """The unique rows plus long rows (several texts joined): (parquet, number of long rows)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    base = pq.read_table(plan["job"]["input"]["path"]).to_pylist()
    k = max(2, math.ceil(LONG_TOKENS[kind] / plan["prompt_tokens"]["min"]))  # every long row over the cap
    n_long = max(8, len(base) // 10)
    rows = [{"id": i, "text": r["text"]} for i, r in enumerate(base)]
    for j in range(n_long):
        texts = [base[(j * k + m) % len(base)]["text"] for m in range(k)]
        rows.append({"id": len(base) + j, "text": "\n\n".join(texts)})
    path = workdir / "mixed.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path, n_long


def ray_head(kind: str, resources: dict[str, int], gpus: int) -> tuple[subprocess.Popen, dict[str, str]]:
    """`ray start --head --block` as a child: terminating it stops this head's processes and no other
    Ray on the machine (`ray stop` would stop every Ray here, a test suite's too)."""
    port = "6391"
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={port}",
           f"--num-gpus={gpus}", "--include-dashboard=false", "--disable-usage-stats",
           f"--resources={json.dumps(resources)}"] + (["--num-cpus=2"] if kind == "cpu" else [])  # fmt: skip
    # Ray >= 2.60 drains a `--block` node for up to 30 s on SIGTERM: a benchmark's head has nothing to drain
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / "bench_fleet_head.log", "w")  # noqa: SIM115 (the head lives on)
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    addr = f"127.0.0.1:{port}"
    for _ in range(120):  # the head is up once its GCS port accepts connections
        if head.poll() is not None:
            raise RuntimeError(f"ray start --head exited {head.returncode}; see {log.name}")
        with socket.socket() as sock:
            sock.settimeout(1)
            if sock.connect_ex(("127.0.0.1", int(port))) == 0:
                time.sleep(3)  # the raylet registers right after the GCS
                return head, {"RAY_ADDRESS": addr}
        time.sleep(1)
    head.terminate()
    raise RuntimeError("ray start --head did not come up in 120 s")


def check_mixed(r: dict[str, Any], n_base: int, n_long: int) -> dict[str, Any]:
    table = r.pop("_table").to_pylist()
    ids = sorted(x["row_id"] for x in table)
    by_type = {e["gpu_type"]: e for e in r["engines"]}
    cap = (by_type.get("rtx-5090") or {}).get("max_model_len") or 0
    over = [x for x in table if (x["prompt_tokens"] or 0) + 1 > cap]  # rows the capped engine cannot hold
    long_engine = (by_type.get("h200") or {}).get("name")
    return {
        "exactly_once": ids == list(range(n_base + n_long)),
        "errors": sum(1 for x in table if x["error_code"]),
        "long_rows_made": n_long,
        "rows_over_capped_context": len(over),
        "rows_over_capped_context_on_other_engines": sum(1 for x in over if x["engine"] != long_engine),
        "rows_by_engine": {e["name"]: e["rows"] for e in r["engines"]},
    }


def markdown(d: dict[str, Any]) -> str:
    m = d["machine"]
    lines = [f"# Fleet: one engine vs two, and a capped engine beside a full one ({d['kind']})", "",
             f"Measured {d['date']} with `benchmarks/bench_fleet.py` on {m.get('gpu_count', 0)}× {m.get('gpu') or 'no GPU'} "
             f"({m.get('cpu_count')} CPUs, {m.get('cpu')}); versions {json.dumps(m.get('versions'))}. Model: the benchmark's random-weight "
             f"stand-in ({d['model']}), not the Turbo checkpoint. Rows: {d['rows']} unique, prompt tokens {d['prompt_tokens']}.",
             "", "| run | engines | rows | timed s | rows/s | engine start s | rows per engine |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in d["runs"].items():
        if "rows_per_s" not in r:
            lines.append(f"| {name} | failed: {r.get('error', '')[:200]} | | | | | |")
            continue
        eng = r.get("engines") or []
        per = ", ".join(f"{e['name']} {e['rows']} (len {e['max_model_len']})" for e in eng) or "—"
        lines.append(f"| {name} | {len(eng) or 1} | {r['rows']} | {r['timed_s']:.2f} | **{r['rows_per_s']:.1f}** | "
                     f"{r.get('engine_start_s') or 0:.1f} | {per} |")  # fmt: skip
    lines += ["", "## Ratios", ""] + [f"- {k}: **{v}**" for k, v in d["ratios"].items()]
    if d.get("mixed_checks"):
        lines += ["", "## Mixed job checks", ""] + [f"- {k}: {v}" for k, v in d["mixed_checks"].items()]
    lines += ["", "## Settings", "", f"- mixed job engine_by_gpu: `{json.dumps(d['caps'])}`",
              f"- base engine args (model.engine): `{json.dumps(d['engine'])}`",
              "- `one` and `raw` ran at the same time, one GPU each (CUDA_VISIBLE_DEVICES); the other runs alone."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=["gpu-gemma4", "cpu-tiny"], default="gpu-gemma4")
    ap.add_argument("--rows", default=None, help="unique rows (default: 6000 on GPU)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--results-dir", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--tok", default=str(REPO / "benchmarks" / "tok"))
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--runs", default="one,two,mixed")
    args = ap.parse_args()
    kind = "gpu" if args.preset.startswith("gpu") else "cpu"
    args.rows = args.rows or ("6000" if kind == "gpu" else "400")
    args.bench_preset, args.dry_run = args.preset, False
    root = Path(args.workdir or REPO / "out" / "bench_fleet" / args.preset).resolve()
    root.mkdir(parents=True, exist_ok=True)
    if kind == "gpu" and not args.model_dir:
        args.model_dir = str(root / "gemma4-1.2b-random")
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    bb.log("probing the machine" + (" and building the model" if kind == "gpu" else ""))
    info = bb.run_child(root, "probe", argparse.Namespace(**{**vars(args), "preset": args.preset}), 900)
    args.root = root
    plan = prepare(argparse.Namespace(**vars(args)), root, info, args.preset)
    job = dict(plan["job"])
    if kind == "cpu":  # two engines and the render tasks on 2 logical CPUs
        job["cluster"] = {**job["cluster"], "engine_cpus": 0.5, "render_cpus": 0.25}
    out = Path(args.results_dir) / f"fleet_{kind}.json"
    data: dict[str, Any] = {"kind": kind, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": info,
                            "git": bb.git_rev(), "model": plan["model"], "rows": plan["rows"],
                            "prompt_tokens": plan["prompt_tokens"], "engine": job["model"]["engine"],
                            "caps": CAPS[kind], "runs": {}, "ratios": {}}  # fmt: skip
    runs = data["runs"]

    def save() -> None:
        r = data["runs"]
        if r.get("one", {}).get("rows_per_s") and r.get("raw", {}).get("rows_per_s"):
            data["ratios"]["one turbo-batch engine / raw vLLM (unique rows; goal ≥ 1.0)"] = round(
                r["one"]["rows_per_s"] / r["raw"]["rows_per_s"], 3)  # fmt: skip
        if r.get("two", {}).get("rows_per_s") and r.get("one", {}).get("rows_per_s"):
            data["ratios"]["two engines / one engine (goal ≥ 1.9)"] = round(
                r["two"]["rows_per_s"] / r["one"]["rows_per_s"], 3)  # fmt: skip
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=2, default=str) + "\n")
        out.with_suffix(".md").write_text(markdown(data))

    wanted = args.runs.split(",")
    if "one" in wanted:
        gpu = kind == "gpu"
        one_job = {**job, "cluster": {**job["cluster"], "engines": 1}}
        result: dict[str, Any] = {}

        def run_raw() -> None:
            try:
                result["raw"] = raw(args, root, {"CUDA_VISIBLE_DEVICES": "1"} if gpu else {})
            except Exception as e:
                result["raw"] = {"error": str(e)[-1500:]}

        t = threading.Thread(target=run_raw)
        t.start()
        if not gpu:  # one CPU box: raw first, then turbo (two engines on 2 cores would share them)
            t.join()
        try:
            r = turbo(one_job, root, "one", {"CUDA_VISIBLE_DEVICES": "0"} if gpu else {})
            r.pop("_table")
            runs["one"] = r
        except Exception as e:
            runs["one"] = {"error": str(e)[-1500:]}
        t.join()
        runs["raw"] = result["raw"]
        bb.log(f"one: {runs['one'].get('rows_per_s')}, raw: {runs['raw'].get('rows_per_s')}")
        save()
    if "two" in wanted:
        try:
            r = turbo({**job, "cluster": {**job["cluster"], "engines": 2}}, root, "two", {})
            r.pop("_table")
            runs["two"] = r
        except Exception as e:
            runs["two"] = {"error": str(e)[-1500:]}
        bb.log(f"two: {runs['two'].get('rows_per_s')}")
        save()
    if "mixed" in wanted:
        path, n_long = mixed_rows(plan, kind, root)
        mjob = json.loads(json.dumps(job))
        mjob["input"] = {**mjob["input"], "path": str(path), "id_column": "id"}
        mjob["model"]["engine_by_gpu"] = CAPS[kind]
        for k in ("gold_column", "gold_map"):  # the long rows have no gold label
            mjob["task"].pop(k, None)
        mjob["cluster"] = {**mjob["cluster"], "address": "auto", "engines": "auto"}
        head = None
        try:
            head, env = ray_head(kind, {"gpu-rtx-5090": 1, "gpu-h200": 1}, 2 if kind == "gpu" else 0)
            r = turbo(mjob, root, "mixed", env)
            data["mixed_checks"] = check_mixed(r, plan["rows"], n_long)
            runs["mixed"] = r
        except Exception as e:
            runs["mixed"] = {"error": str(e)[-1500:]}
        finally:
            if head is not None:
                head.terminate()
                head.wait(timeout=60)
        bb.log(f"mixed: {runs['mixed'].get('rows_per_s')} {data.get('mixed_checks')}")
        save()
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
