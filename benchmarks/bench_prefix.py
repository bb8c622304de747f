"""Many-prefix batch throughput: raw vLLM (shuffled and grouped rows) vs `turbo-batch run` vs Ray Data LLM.

Issue 11's benchmark. N documents × Q questions (every row = system + document + question; rows of
one document share its whole prefix), written to parquet in SHUFFLED order, classified yes/no in one
forward pass (max_tokens=1, label logprobs), with a KV cache too small to hold every document. The
rows are rendered once with turbo-batch's PromptBuilder, so every variant scores the same token ids
with the same engine arguments (`profiles.engine_args` of the job's model section). Variants:

  raw_shuffled / raw_grouped  one process, one `vllm.LLM`: warm-up on other documents, then `repeat`
                alternating pairs of `llm.generate(all rows)` on the shuffled rows and on the rows
                grouped by document, `llm.reset_prefix_cache()` before each; prefix-cache hit rate from
                RequestOutput.num_cached_tokens.
  turbo         `turbo-batch run` on the shuffled parquet (ordering on: the default), own engine each
                run; rows/s from `_summary.json` wall_s (engines ready → last commit). bench_batch.run_turbo.
  ray_data_llm  `ray.data.llm` on the shuffled token ids (bench_batch.child_rdl; timed from the first
                request reaching vLLM).

Runs alternate (turbo, raw pairs, turbo, ray_data_llm, turbo, ...); medians are reported. With
--budget-s a run that would not finish in the time left is skipped (recorded as skipped), so the GPU
session ends with a results file. --sequence gives the runs of this process in order instead (e.g.
"raw,turbo": a GPU half whose later run may be cut), --raw-runs raw's calls in its one engine (e.g.
"shuffled,grouped,grouped": the slow shuffled call once, the grouped ones to a median). Writes benchmarks/results/prefix_<preset>.{json,md}.

    python benchmarks/bench_prefix.py --preset cpu-smollm2
    python benchmarks/bench_prefix.py --preset gpu-gemma4 --results-dir $OUT --budget-s 500   # H200
    python benchmarks/bench_prefix.py --preset gpu-gemma4 --dry-run          # data + job file only
    python benchmarks/bench_prefix.py --merge raw/prefix_gpu-gemma4.json turbo/prefix_gpu-gemma4.json
        # a pair run's halves (--variants raw on one GPU, --variants turbo on the other) → one results file
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: the bench package
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # the repo: turbo_batch
from bench import common as bb  # helpers shared with bench_batch.py
from bench.prefix_data import LABELS, job_dict, prefix_tables
from bench.prefix_report import markdown, merge, results
from bench.raw import child_prefix_raw
from bench.rdl import child_rdl
from bench.report import agreement
from bench.turbo import run_turbo

REPO = bb.REPO
PRESETS: dict[str, dict[str, Any]] = {
    # SmolLM2 keeps 23 KB (bf16) or 46 KB (fp32) of KV per token: 32 MiB ≈ 1.4k or 0.7k tokens ≈ 6 or 3
    # of these 16 documents (the profile picks the dtype for the CPU it runs on).
    "cpu-smollm2": {
        "docs": 16, "doc_tokens": 192, "questions": 4, "question_tokens": 12, "warmup_docs": 2,
        "model_preset": "cpu",
        "engine": {"max_model_len": 512, "kv_cache_memory_bytes": 32 * 1024**2},
        "rdl_placement": {"bundles": [{"CPU": 1}]},
        "repeat": 3, "rdl_repeat": 1, "part_rows": 32,
    },
    # The table: 2 GiB of KV (≈43k tokens ≈ 52 documents) for 1,200 documents.
    "gpu-gemma4": {
        "docs": 1200, "doc_tokens": 800, "questions": 5, "question_tokens": 24, "warmup_docs": 16,
        "model_preset": "batch",
        "engine": {
            "max_model_len": 4096, "max_num_seqs": 128, "max_num_batched_tokens": 8192,
            "enable_prefix_caching": True, "gpu_memory_utilization": 0.85,
            "kv_cache_memory_bytes": 2 * 1024**3,
        },
        "rdl_placement": None,
        "repeat": 3, "rdl_repeat": 1, "part_rows": 1000,
    },
}  # fmt: skip


def prepare(args: argparse.Namespace, workdir: Path, info: dict[str, Any]) -> dict[str, Any]:
    """Rows, job file, token ids (shuffled + grouped + warm-up) and the order stage's own cost."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    from turbo_batch.batch.order import common_prefix_bytes, prefix_key
    from turbo_batch.engine import profiles
    from turbo_batch.prompt import PromptBuilder, PromptConfig, load_tokenizer
    from turbo_batch.spec import JobSpec

    p = {**PRESETS[args.preset], **({"docs": args.docs} if args.docs else {})}
    if args.kv_gib:  # a larger stand-in keeps more KV per token: size the cache in documents again
        p["engine"] = {**p["engine"], "kv_cache_memory_bytes": int(args.kv_gib * 1024**3)}
    workdir.mkdir(parents=True, exist_ok=True)
    if args.preset.startswith("cpu"):
        from turbo_batch.testing import assets

        model = assets.smollm2_dir(progress=bb.log)
    else:
        model = Path(args.model_dir).resolve() if args.model_dir else workdir / "gemma4-1.2b-random"
        bb.build_gemma4(model, Path(args.tok).resolve(), weights=False)
    tokenizer = load_tokenizer(str(model))
    shuffled, warm = prefix_tables(p, tokenizer)
    inp, out_dir = workdir / "rows.parquet", workdir / "turbo_out"
    pq.write_table(shuffled, inp)
    job = job_dict(p, model, inp, out_dir)
    spec = JobSpec.model_validate(job)
    (workdir / "job.yaml").write_text(yaml.safe_dump(job, sort_keys=False))

    builder = PromptBuilder(PromptConfig.from_job(spec), tokenizer)
    schema = pa.schema(
        [("row_id", pa.int64()), ("prompt_ids", pa.list_(pa.int32())), ("label_ids", pa.list_(pa.int32())),
         ("gold", pa.string()), ("doc_id", pa.int64())]
    )  # fmt: skip
    rows = shuffled.to_pylist()
    t0 = time.perf_counter()
    texts = [builder.message_text(r) for r in rows]  # what order.order_keys keys on
    anchor = common_prefix_bytes(texts[:32])
    keys = [prefix_key(t, r["id"], anchor) for t, r in zip(texts, rows, strict=True)]
    key_s = time.perf_counter() - t0  # what the order stage adds per row: message text + key
    t0 = time.perf_counter()
    rendered = []
    for r in rows:
        ids, label_ids = builder.build(r)
        if label_ids is None:
            raise SystemExit(f"labels {LABELS} share a first token with this tokenizer")
        rendered.append(
            {
                "row_id": r["id"],
                "prompt_ids": ids,
                "label_ids": label_ids,
                "gold": None,
                "doc_id": r["doc_id"],
            }
        )
    render_s = time.perf_counter() - t0  # the render stage: text + token ids
    by_key = [x for _, x in sorted(zip(keys, rendered, strict=True), key=lambda kx: kx[0])]
    grouped = sorted(rendered, key=lambda x: x["row_id"])  # ids run document by document
    pq.write_table(pa.Table.from_pylist(rendered, schema=schema), workdir / "rendered.parquet")
    pq.write_table(pa.Table.from_pylist(grouped, schema=schema), workdir / "grouped.parquet")
    warm_rows = [
        {"row_id": r["id"], "prompt_ids": builder.build(r)[0], "label_ids": rendered[0]["label_ids"], "gold": None,
         "doc_id": r["doc_id"]}
        for r in warm.to_pylist()
    ]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(warm_rows, schema=schema), workdir / "warmup.parquet")

    if info.get("gpu"):
        cap = tuple(info.get("gpu_capability") or (9, 0))
        device = profiles.Device("cuda", info["gpu"], info.get("gpu_mem_gib", 80.0), cap)  # type: ignore[arg-type]
    elif args.dry_run and args.preset.startswith("gpu"):
        device = profiles.Device("cuda", "NVIDIA H200", 139.8, (9, 0))  # what the lent GPU is
    else:
        device = profiles.detect_device()
    eargs = bb.shipped_engine_args(spec.model.model_dump(mode="json"), device, len(LABELS))
    lens = [len(r["prompt_ids"]) for r in rendered]
    doc_runs = sum(1 for i, x in enumerate(by_key) if i == 0 or x["doc_id"] != by_key[i - 1]["doc_id"])
    plan = {
        "preset": args.preset,
        "model": str(model),
        "job_file": str(workdir / "job.yaml"),
        "output_dir": str(out_dir),
        "rows": len(rendered),
        "shape": {k: p[k] for k in ("docs", "doc_tokens", "questions", "question_tokens")},
        "standin": None if args.preset.startswith("cpu") else bb.standin_size(),  # BENCH_STANDIN
        "labels": LABELS,
        "kind": "classify",
        "label_first_token_ids": rendered[0]["label_ids"],
        "engine_args": eargs,
        "device_profile": profiles.describe(device),
        "prompt_tokens": {"mean": round(sum(lens) / len(lens), 1), "min": min(lens), "max": max(lens)},
        "total_prompt_tokens": sum(lens),
        "order_stage": {
            "anchor_bytes": anchor,
            "doc_runs_in_key_order": doc_runs,  # == docs: the key groups every document
            "key_s_per_1k_rows": round(1000 * key_s / len(rows), 3),
            "render_s_per_1k_rows": round(1000 * render_s / len(rows), 3),
        },
        "rdl": {"batch_size": 64, "max_concurrent_batches": 8, "placement": p["rdl_placement"]},
        "repeat": args.repeat or p["repeat"],
        "rdl_repeat": p["rdl_repeat"] if args.rdl_repeat is None else args.rdl_repeat,
        "job": job,
    }
    (workdir / "plan.json").write_text(json.dumps(plan, indent=2, default=str))
    return plan


# --------------------------------------------------------------------------------------- variants


def child_probe(workdir: Path, args: argparse.Namespace) -> None:
    """Machine facts (+ the GPU model's random weights): torch/CUDA only ever initialise in a child."""
    info = bb.machine()
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu_capability"] = list(torch.cuda.get_device_capability(0))
    except Exception:
        pass
    if args.preset.startswith("gpu") and not args.dry_run:
        t0 = time.time()
        model = Path(args.model_dir).resolve() if args.model_dir else workdir / "gemma4-1.2b-random"
        bb.build_gemma4(model, Path(args.tok).resolve(), weights=True)
        info["build_model_s"] = round(time.time() - t0, 1)
    bb.emit(info)


def run_child(
    workdir: Path, what: str, args: argparse.Namespace, timeout: float, deadline: float | None = None
) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--preset", args.preset, "--workdir", str(workdir), "--child", what,
           "--tok", args.tok, "--repeat", str(args.repeat or PRESETS[args.preset]["repeat"])]  # fmt: skip
    if args.raw_runs:
        cmd += ["--raw-runs", args.raw_runs]
    if deadline:
        cmd += ["--deadline", str(deadline)]
    if args.model_dir:
        cmd += ["--model-dir", args.model_dir]
    if args.dry_run:
        cmd.append("--dry-run")
    logf = workdir / f"{what}.log"
    with open(logf, "w") as fh:
        p = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=fh, text=True, timeout=timeout)
        fh.write("\n--- stdout ---\n" + p.stdout)
    found = [json.loads(x[len(bb.MARK) :]) for x in p.stdout.splitlines() if x.startswith(bb.MARK)]
    if p.returncode != 0 or not found:
        raise RuntimeError(f"{what} exited {p.returncode}; see {logf}:\n" + bb.tail(logf))
    return found[-1]


def raw_calls(repeat: int, raw_runs: str | None) -> list[str]:
    """The raw child's generate calls in order: `raw_runs` ("shuffled,grouped,..."), else `repeat` pairs."""
    calls = [c.strip() for c in raw_runs.split(",")] if raw_runs else ["shuffled", "grouped"] * repeat
    bad = [c for c in calls if c not in ("shuffled", "grouped")]
    if bad or not calls:
        raise SystemExit(f"--raw-runs: shuffled or grouped, comma-separated (got {raw_runs!r})")
    return calls


def sequence(text: str) -> list[str]:
    """--sequence: this process's runs in the order given (a variant may repeat)."""
    runs = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in runs if v not in ("turbo", "raw", "ray_data_llm")]
    if bad or not runs:
        raise SystemExit(f"--sequence: turbo, raw or ray_data_llm, comma-separated (got {text!r})")
    return runs


def schedule(repeat: int, rdl_repeat: int) -> list[str]:
    """turbo, raw (all its pairs), turbo, ray_data_llm, turbo, ...: the variants alternate."""
    out, others = [], ["raw"] + ["ray_data_llm"] * rdl_repeat
    for i in range(max(repeat, len(others))):
        if i < repeat:
            out.append("turbo")
        if i < len(others):
            out.append(others[i])
    return out


# ------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu-smollm2")
    ap.add_argument("--docs", type=int, default=None, help="documents (default: the preset's)")
    ap.add_argument("--repeat", type=int, default=None, help="turbo runs and raw pairs (default: preset's)")
    ap.add_argument("--rdl-repeat", type=int, default=None, help="ray.data.llm runs (default: preset's)")
    ap.add_argument("--kv-gib", type=float, default=None, help="KV cache GiB (default: the preset's)")
    ap.add_argument("--budget-s", type=float, default=None, help="skip runs that would end past this")
    ap.add_argument(
        "--variants",
        default="turbo,raw,ray_data_llm",
        help="which to run (one half per GPU of a pair: the same rows, seeds and engine args)",
    )
    ap.add_argument(
        "--sequence", default=None, help="this process's runs in order, e.g. raw,turbo (not --variants)"
    )
    ap.add_argument("--raw-runs", default=None, help="raw's calls in order, e.g. shuffled,grouped,grouped")
    ap.add_argument("--workdir", default=None, help="scratch dir (default: out/bench_prefix/<preset>)")
    ap.add_argument("--results-dir", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--tok", default=str(REPO / "benchmarks" / "tok"), help="gpu-gemma4: tokenizer files")
    ap.add_argument("--model-dir", default=None, help="gpu-gemma4: where to build the random model")
    ap.add_argument("--dry-run", action="store_true", help="build rows, job and prompts; run no engine")
    ap.add_argument("--note", default=None, help="a reading of the numbers, stored in the results")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per variant run")
    ap.add_argument("--merge", nargs="+", default=None, help="results JSONs of a pair run's halves → one")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.merge:
        data = merge([json.loads(Path(f).read_text()) for f in args.merge])
        # a merge is read anew: the halves' notes describe the halves
        data["note"] = args.note or data["note"]
        out = Path(args.results_dir) / f"prefix_{data['preset']}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=2, default=str) + "\n")
        out.with_suffix(".md").write_text(markdown(data))
        print(out.with_suffix(".md").read_text())
        return
    workdir = Path(args.workdir or REPO / "out" / "bench_prefix" / args.preset).resolve()
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    if args.child:
        {"probe": lambda: child_probe(workdir, args), "raw": lambda: child_prefix_raw(workdir, raw_calls(args.repeat or 1, args.raw_runs), args.deadline),
         "ray_data_llm": lambda: child_rdl(workdir)}[args.child]()  # fmt: skip
        return

    # a bad --raw-runs or --sequence fails here, before the probe child builds a GPU model (~1 min)
    raw_calls(1, args.raw_runs)
    ran = sequence(args.sequence) if args.sequence else None
    t_all = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    bb.log(
        "probing the machine"
        + (" and building the model" if args.preset.startswith("gpu") and not args.dry_run else "")
    )
    info = run_child(workdir, "probe", args, args.timeout)
    plan = prepare(args, workdir, info)
    bb.log(f"{plan['rows']} rows, prompt tokens {plan['prompt_tokens']}, order stage {plan['order_stage']}")
    plan.update(sequence=args.sequence, raw_runs=args.raw_runs)
    order = ran or [v for v in schedule(plan["repeat"], plan["rdl_repeat"]) if v in args.variants.split(",")]
    if args.dry_run:
        from turbo_batch.batch.plan import preflight
        from turbo_batch.spec import load_job

        os.environ["TURBO_BATCH_OUTPUT_ROOT"] = str(workdir)
        pl = preflight(load_job(plan["job_file"]))
        print(
            f"dry run ok: job {plan['job_file']} ({pl.total_rows} rows), rendered {workdir / 'rendered.parquet'}"
        )
        print("runs that would run:", ", ".join(order))
        return

    runs: list[dict[str, Any]] = []
    checks: dict[str, Any] = {}
    skipped: list[str] = []
    took: dict[str, float] = {}
    out = Path(args.results_dir) / f"prefix_{args.preset}.json"

    def save() -> None:  # after every run: a cut-off session keeps its numbers
        data = results(plan, info, runs, checks, skipped, t_all)
        data["note"] = args.note
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=2, default=str) + "\n")
        out.with_suffix(".md").write_text(markdown(data))

    for i, v in enumerate(order):
        elapsed = time.perf_counter() - t_all
        if args.budget_s and elapsed + took.get(v, 0.0) > args.budget_s:
            skipped.append(f"{v} (run {i + 1})")
            bb.log(f"{v}: skipped, {elapsed:.0f} s of the {args.budget_s:.0f} s budget gone")
            continue
        t0 = time.perf_counter()
        la = os.getloadavg()[0]
        try:
            if v == "turbo":
                r = run_turbo(workdir, plan)
                runs.append({**r, "load1_before": la})
            elif v == "raw":
                end = time.time() + args.budget_s - elapsed if args.budget_s else None
                r = run_child(workdir, "raw", args, args.timeout, end)
                skipped += r.get("skipped") or []
                runs += [{**x, "engine_start_s": r["engine_start_s"], "load1_before": la} for x in r["runs"]]
                checks["raw_kv_cache_tokens"] = r["kv_cache_tokens"]
            else:
                r = run_child(workdir, v, args, args.timeout)
                runs.append({**r, "load1_before": la})
        except Exception as e:  # keep the other variants' numbers
            skipped.append(f"{v} (run {i + 1}) FAILED: {type(e).__name__}: {str(e)[:300]}")
            bb.log(f"{v}: FAILED: {e}")
            continue
        took[v] = time.perf_counter() - t0
        for done in {x["variant"] for x in runs} & {"turbo", "ray_data_llm"}:  # labels vs raw shuffled
            checks[done] = agreement(workdir, done, plan)
        bb.log(f"{v}: done in {took[v]:.0f} s: {r.get('rows_per_s') or [x['rows_per_s'] for x in r['runs']]}")
        save()
    if skipped and runs:
        save()  # the runs skipped after the last one that ran are on record too
    print(out.with_suffix(".md").read_text() if out.exists() else "no results")


if __name__ == "__main__":
    main()
