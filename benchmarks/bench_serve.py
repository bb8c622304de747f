"""Serve parity: `turbo-batch serve` against `vllm serve` on the same model and engine arguments.

Each server runs in its own process group on 127.0.0.1 and is measured with streaming /v1/completions
requests (random token-id prompts of a fixed length, `ignore_eos`, a fixed output length) at a fixed
concurrency: `vllm bench serve` where it exists (`--loadgen vllm`), else a small built-in async load
generator with the same metrics (request throughput, TTFT, ITL, TPOT; benchmarks/bench_serve_load.py).
Variants: vllm (`python -m vllm.entrypoints.openai.api_server`), turbo (Api ingress + Engine
deployment), turbo-2ingress (two ingress replicas behind Serve's proxy), turbo-2ingress-direct (two
ingress replicas serving HTTP themselves on one shared port, layout split-direct), turbo-colocated (the Engine is the ingress behind
Serve's proxy), turbo-direct (the default layout: each Engine replica serves HTTP on its own port),
turbo-plain (serve_plain.py: turbo-direct's code in a plain process without Ray, a control).
Results are written after every variant, so one failing variant never loses the others'.

    python benchmarks/bench_serve.py --preset cpu-tiny             # this CPU: tiny random Gemma 4
    python benchmarks/bench_serve.py --preset gpu-gemma4 --results-dir $OUT   # an H200 (~9 min)
    python benchmarks/bench_serve.py --preset cpu-tiny --dry-run   # CI: plan + serve file + args only
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_serve_load import run_load, summarize  # noqa: E402
from pyspy import Recording, cpu_s, find_pid, thread_cpu, thread_cpu_delta  # noqa: E402
from serve_procs import Server, free_port, machine, markdown  # noqa: E402

CPU_ENGINE = {"max_model_len": 1024, "kv_cache_memory_bytes": 256 * 1024 * 1024, "max_num_seqs": 64}
PRESETS: dict[str, dict[str, Any]] = {
    "cpu-tiny": {  # tiny random Gemma 4 (hidden 64): the engine is cheap, so serving overhead shows
        "model": "tiny",
        "engine": CPU_ENGINE,
        "concurrency": 8,
        "workloads": [{"name": "64in-32out", "input": 64, "output": 32, "prompts": 96}],
        "start_timeout": 300,
        "num_cpus": 2,
    },
    # the GPU workload's shape (concurrency 64, a long stream) on the tiny engine: the serving process
    # turns thousands of deltas a second into SSE events, as on an H200
    "cpu-tiny-64": {
        "model": "tiny",
        "engine": {**CPU_ENGINE, "max_num_seqs": 128},
        "concurrency": 64,
        "workloads": [{"name": "64in-200-out", "input": 64, "output": 200, "prompts": 192}],
        "start_timeout": 300,
        "num_cpus": 2,
    },
    "cpu-smollm2": {
        "model": "smollm2",
        "engine": CPU_ENGINE,
        "concurrency": 8,
        "workloads": [{"name": "64in-32out", "input": 64, "output": 32, "prompts": 48}],
        "start_timeout": 300,
        "num_cpus": 2,
    },
    # bench_batch.py's random-weight 1.2B Gemma 4; the engine arguments. Prompt counts trimmed
    # from the 400 / 1,000 to fit ~9 min for 3 variants (engine start ~65 s each).
    "gpu-gemma4": {
        "model": "gpu-gemma4",
        "engine": {
            "max_model_len": 2048,
            "max_num_seqs": 128,
            "max_num_batched_tokens": 8192,
            "enable_prefix_caching": True,
            "gpu_memory_utilization": 0.85,
        },
        "concurrency": 64,
        "workloads": [
            {"name": "1K-in-200-out", "input": 1024, "output": 200, "prompts": 256},
            {"name": "1K-in-10-out", "input": 1024, "output": 10, "prompts": 640},
        ],
        "start_timeout": 240,
        "num_cpus": 16,
    },
}
TOK = REPO / "benchmarks" / "tok"  # gpu-gemma4's tokenizer unless --tok (see benchmarks/make_tok.py)
VARIANTS = ("vllm", "turbo-direct", "turbo-plain", "turbo", "turbo-2ingress", "turbo-2ingress-direct",
            "turbo-colocated")  # fmt: skip
LAYOUTS = {
    "turbo-direct": "direct",
    "turbo-plain": "direct",  # serve_plain.py: the direct layout's code in a plain process, no Ray
    "turbo-colocated": "colocated",
    "turbo": "split",
    "turbo-2ingress": "split",
    "turbo-2ingress-direct": "split-direct",
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def model_dir(preset: dict[str, Any], workdir: Path, where: str | None = None, tok: Path = TOK) -> Path:
    kind = preset["model"]
    if kind == "tiny":
        from turbo_batch.testing.tiny import write_tiny_gemma4

        path = workdir / "tiny-gemma4"
        return path if (path / "config.json").exists() else write_tiny_gemma4(path)
    if kind == "smollm2":
        from turbo_batch.testing.assets import smollm2_dir

        return smollm2_dir()
    from bench_batch import build_gemma4  # the batch benchmark's random 1.2B Gemma 4

    path = Path(where) if where else workdir / "gemma4-1b2"
    build_gemma4(path, tok, weights=True)
    import torch

    torch.cuda.empty_cache()  # the builder's tensors: give the memory back before the engines start
    return path


def tokenizer_info(path: Path) -> dict[str, Any]:
    """The served model's tokenizer: how many ids it knows, and how many logits the model has."""
    from bench.common import tokenizer_vocab

    if not (path / "config.json").is_file() or not (path / "tokenizer.json").is_file():
        return {}  # a dry run of a GPU preset: no model built
    cfg = json.loads((path / "config.json").read_text())
    return {
        "tokenizer_ids": tokenizer_vocab(path),
        "model_vocab": cfg.get("vocab_size") or cfg.get("text_config", {}).get("vocab_size"),
    }


def engine_args(path: Path, engine: dict[str, Any]) -> dict[str, Any]:
    """The engine arguments turbo-batch resolves for this model here: vllm serve gets the same."""
    from turbo_batch.engine.profiles import detect_device
    from turbo_batch.engine.profiles import engine_args as resolve

    return resolve({"path": str(path), "engine": engine}, detect_device())


def vllm_cli(args: dict[str, Any], port: int, name: str) -> list[str]:
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--port", str(port)]
    cmd += ["--host", "127.0.0.1", "--served-model-name", name, "--model", str(args["model"])]
    for k, v in args.items():
        if k == "model" or v is None:
            continue
        flag = "--" + k.replace("_", "-")
        if v is True:
            cmd.append(flag)
        elif v is False:
            if k != "disable_log_stats":  # vLLM's own default (stats logged), as in turbo's engine
                cmd.append("--no-" + k.replace("_", "-"))
        else:
            cmd += [flag, json.dumps(v) if isinstance(v, dict | list) else str(v)]
    return cmd


def serve_file(path: Path, engine: dict[str, Any], port: int, variant: str, num_cpus: int) -> dict:
    gpu = engine.get("gpu_memory_utilization") is not None
    return {
        "name": "parity",
        "model": {"path": str(path), "engine": engine},
        "served_model_name": "bench",
        "engines": 1,
        "http": {
            "host": "127.0.0.1",
            "port": port,
            "ingress_replicas": 2 if variant.startswith("turbo-2ingress") else 1,
            "layout": LAYOUTS[variant.removesuffix("-tp")],
        },
        "cluster": {"num_cpus": num_cpus, "engine_cpus": 1.0 if gpu else 0.5},
        "limits": {
            "max_tokens": 2048,
            "max_concurrent": 512,
            "max_online_per_engine": 512,
            "engine_max_queued": 512,
        },
    }


def vllm_bench(
    base: str, tok: Path, wl: dict[str, Any], conc: int, out: Path, rate: float | None = None
) -> dict[str, Any]:
    """`vllm bench serve` (random dataset, streaming completions); its result JSON in our metric names.
    `rate`: Poisson arrivals at that many requests/s (still at most `conc` in flight), so both servers
    get the same offered load and their first-token times compare at equal throughput."""
    res = out / f"vb-{wl['name']}-{time.time_ns()}.json"
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", "serve", "--backend", "openai", "--base-url", base, "--endpoint",
           "/v1/completions", "--model", "bench", "--tokenizer", str(tok), "--dataset-name", "random",
           "--random-input-len", str(wl["input"]), "--random-output-len", str(wl["output"]),
           "--num-prompts", str(wl["prompts"]), "--max-concurrency", str(conc), "--ignore-eos",
           "--save-result", "--save-detailed", "--result-dir", str(out), "--result-filename", res.name,
           "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99"]  # fmt: skip
    if rate:
        cmd += ["--request-rate", str(rate), "--seed", "0"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed: {r.stderr[-1500:]}")
    d = json.loads(res.read_text())
    return {
        "loadgen": "vllm bench serve",
        "completed": d.get("completed"),
        "failed": d.get("failed", 0),
        "req_s": d.get("request_throughput"),
        "output_tok_s": d.get("output_throughput"),
        "output_tokens": d.get("total_output_tokens"),
        "duration_s": d.get("duration"),
        **{f"{k}_ms": d.get(f"{k}_ms") for k in ("median_ttft", "p99_ttft", "median_itl", "p99_itl")},
        **{f"{k}_ms": d.get(f"{k}_ms") for k in ("median_tpot", "p99_tpot", "mean_itl")},
        **ttft_after_first_wave(d, conc),
    }


def ttft_after_first_wave(d: dict[str, Any], conc: int) -> dict[str, Any]:
    """Median TTFT of the requests sent after the first `conc` (from --save-detailed's per-request
    start times): in a closed loop the first `conc` requests arrive at once and prefill together, a
    burst the median over a few hundred requests still carries; the rest is the loop's steady state.
    A diagnostic beside vllm bench serve's own median, not a replacement for it."""
    starts, ttfts = d.get("start_times") or [], d.get("ttfts") or []
    if len(starts) != len(ttfts) or len(starts) <= conc:
        return {}
    order = sorted(range(len(starts)), key=starts.__getitem__)
    rest = sorted(ttfts[i] for i in order[conc:] if ttfts[i] and ttfts[i] > 0)
    first = sorted(ttfts[i] for i in order[:conc] if ttfts[i] and ttfts[i] > 0)
    if not rest or not first:
        return {}
    return {
        "median_ttft_first_wave_ms": round(1000 * first[len(first) // 2], 2),
        "median_ttft_after_first_wave_ms": round(1000 * rest[len(rest) // 2], 2),
        "p99_ttft_after_first_wave_ms": round(1000 * rest[min(len(rest) - 1, int(0.99 * len(rest)))], 2),
    }


def measure(
    base: str,
    tok: Path,
    preset: dict,
    loadgen: str,
    workdir: Path,
    key: str | None,
    profile: Any = None,
    front: int | None = None,
) -> dict:
    """Each workload's figures; `profile(name)` (if given) starts a py-spy Recording of the serving
    process for the first workload, whose summary lands in that workload's entry. `front` is the pid
    of the process that serves HTTP and runs vLLM's output processing (detokenization): its CPU
    seconds per 1,000 output tokens are what a saturated front shows."""
    out: dict[str, Any] = {}
    conc = preset["concurrency"]
    asyncio.run(run_load(base, "bench", 16, conc, min(conc, 16), 4, key=key))  # warm-up
    for i, wl in enumerate(preset["workloads"]):
        log(f"  {wl['name']}: {wl['prompts']} prompts at concurrency {conc} ({loadgen})")
        rec = profile(wl["name"]) if profile is not None and i == 0 else None
        cpu0, threads0 = cpu_s(front), thread_cpu(front)
        if loadgen == "vllm":
            out[wl["name"]] = vllm_bench(base, tok, wl, conc, workdir, wl.get("rate"))
        else:
            recs, took = asyncio.run(
                run_load(base, "bench", wl["input"], wl["output"], wl["prompts"], conc, key=key)
            )
            out[wl["name"]] = {"loadgen": "builtin", **summarize(recs, took)}
        cpu1 = cpu_s(front)
        m = out[wl["name"]]
        tokens = m.get("output_tokens") or (m.get("output_tok_s") or 0) * (m.get("duration_s") or 0)
        if cpu0 is not None and cpu1 is not None and tokens:
            m["front_cpu_s"] = round(cpu1 - cpu0, 2)
            m["front_cpu_ms_per_1k_tokens"] = round((cpu1 - cpu0) * 1e6 / tokens, 1)
            m["front_threads_cpu_s"] = thread_cpu_delta(threads0, thread_cpu(front))
        if rec is not None:
            out[wl["name"]]["profile"] = rec.finish()
            log(f"    py-spy: {json.dumps(out[wl['name']]['profile'])[:600]}")
        log(f"    {json.dumps(out[wl['name']])}")
    return out


def run_variant(name: str, path: Path, args: dict, preset: dict, a: argparse.Namespace, save: Any) -> dict:
    """One server variant; a `-tp` suffix runs it with RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (Ray Serve's
    own fast path: user code on the replica's loop, gRPC between replicas, direct ingress)."""
    flag = "tp" if name.endswith("-tp") else ""
    variant = name.removesuffix("-tp")
    workdir = Path(a.workdir)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "VLLM_USE_FLASHINFER_SAMPLER": "0"}
    if flag == "tp":
        env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
    if variant == "vllm":
        cmd, ready = vllm_cli(args, port, "bench"), f"{base}/v1/models"
    else:
        import yaml

        f = workdir / f"serve-{name}.yaml"
        f.write_text(yaml.safe_dump(serve_file(path, preset["engine"], port, variant, preset["num_cpus"])))
        cmd, ready = [sys.executable, "-m", "turbo_batch.cli", "serve", str(f)], f"{base}/health"
        if variant == "turbo-plain":
            cmd = [sys.executable, str(REPO / "benchmarks" / "serve_plain.py"), str(f), "--port", str(port)]
        if a.trace:
            env["TURBO_BATCH_TRACE"] = str(workdir / f"trace-{name}.jsonl")
            (workdir / f"trace-{name}.jsonl").unlink(missing_ok=True)
    log(f"{name}: starting ({' '.join(cmd[:6])} ...)")
    t0 = time.monotonic()
    server = Server(cmd, workdir / f"{name}.log", env)
    try:
        server.wait_ready(ready, preset["start_timeout"])
        result: dict[str, Any] = {"start_s": round(time.monotonic() - t0, 1)}
        # the process that serves HTTP: vllm's API server, turbo's Engine replica (or serve_plain.py)
        plain = variant in ("vllm", "turbo-plain")
        front = server.proc.pid if plain else find_pid(r"ServeReplica:.*:Engine")
        profile = None
        if a.profile:

            def profile(wl: str) -> Recording:
                return Recording.start(front, a.profile, workdir / f"pyspy-{name}-{wl}.txt")

        result["workloads"] = measure(base, path, preset, a.loadgen, workdir, None, profile, front)
        if a.trace and variant != "vllm":
            from bench_serve_load import trace_summary

            result["trace"] = trace_summary(workdir / f"trace-{name}.jsonl")
        save(result)  # before the (slow) shutdown: a timeout there must not lose the numbers
        return result
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu-tiny")
    ap.add_argument(
        "--variants",
        default="vllm,turbo-direct,turbo,turbo-2ingress",
        help="comma-separated; a -tp suffix adds RAY_SERVE_THROUGHPUT_OPTIMIZED=1",
    )
    ap.add_argument("--loadgen", choices=("auto", "vllm", "builtin"), default="auto")
    ap.add_argument("--workdir", default="/tmp/tb-bench-serve")
    ap.add_argument("--results-dir", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--model-dir", default=None, help="gpu-gemma4: where to build the random model")
    ap.add_argument("--tok", default=str(TOK), help="gpu-gemma4: tokenizer files (benchmarks/make_tok.py)")
    ap.add_argument("--prompts-scale", type=float, default=1.0, help="scale every workload's prompt count")
    ap.add_argument("--workloads", default="", help="comma-separated workload names (default: all)")
    ap.add_argument(
        "--request-rate",
        default="",
        help="workload=R,...: Poisson arrivals at R req/s for those workloads (vllm loadgen), not a closed loop",
    )
    ap.add_argument("--trace", action="store_true", help="per-stage timing trace of turbo's variants")
    ap.add_argument("--tag", default="", help="suffix of the results file name")
    ap.add_argument(
        "--profile", type=int, default=0, help="py-spy the serving process for N s of the first workload"
    )
    ap.add_argument(
        "--dry-run", action="store_true", help="build the model, serve files and args; no servers"
    )
    a = ap.parse_args()
    preset = json.loads(json.dumps(PRESETS[a.preset]))
    if a.workloads:
        preset["workloads"] = [w for w in preset["workloads"] if w["name"] in a.workloads.split(",")]
    rates = dict(kv.split("=") for kv in a.request_rate.split(",") if kv)
    for wl in preset["workloads"]:
        wl["prompts"] = max(8, int(wl["prompts"] * a.prompts_scale))
        if wl["name"] in rates:
            wl["rate"] = float(rates[wl["name"]])
    if a.loadgen == "auto":
        has_bench = importlib.util.find_spec("vllm.benchmarks.serve") is not None
        a.loadgen = "vllm" if has_bench and a.preset.startswith("gpu") else "builtin"
    variants = [v for v in a.variants.split(",") if v]
    bad = [v for v in variants if v.removesuffix("-tp") not in VARIANTS]
    if bad:
        ap.error(f"unknown variants {bad}; known: {', '.join(VARIANTS)}")
    workdir = Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = (
        model_dir(preset, workdir, a.model_dir, Path(a.tok).resolve())
        if not (a.dry_run and preset["model"] == "gpu-gemma4")
        else workdir
    )
    args = engine_args(path, preset["engine"]) if not a.dry_run or preset["model"] != "gpu-gemma4" else {}
    data: dict[str, Any] = {"preset": a.preset, "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(),
                            "engine_args": args, "concurrency": preset["concurrency"],
                            "tokenizer": tokenizer_info(path),
                            "workloads": preset["workloads"], "loadgen": a.loadgen, "variants": {}}  # fmt: skip
    if a.dry_run:
        print(" ".join(vllm_cli(args or {"model": "M"}, 8000, "bench")))
        print(json.dumps(serve_file(path, preset["engine"], 8000, "turbo", preset["num_cpus"])))
        print(f"variants that would run: {', '.join(variants)}")
        return
    # `timeout` (gpu_session.sh) sends SIGTERM: unwind so the running server is stopped (finally)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    name = f"serve_parity_{a.preset.split('-')[0]}{a.tag}"
    results = Path(a.results_dir)
    results.mkdir(parents=True, exist_ok=True)

    def save(v: str, result: dict[str, Any]) -> None:
        data["variants"][v] = result
        data["turbo"] = data["variants"].get("turbo")
        data["vllm"] = data["variants"].get("vllm")
        (results / f"{name}.json").write_text(json.dumps(data, indent=1, default=str))
        (results / f"{name}.md").write_text(markdown(data))

    for v in variants:
        try:
            run_variant(v, path, args, preset, a, lambda r, v=v: save(v, r))
        except Exception as e:  # recorded, the other variants still run
            log(f"{v} failed: {e}")
            if v not in data["variants"]:
                save(v, {"error": f"{type(e).__name__}: {e}"[:2000]})
    print(markdown(data))


if __name__ == "__main__":
    main()
