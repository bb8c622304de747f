"""Batch throughput: raw vLLM vs `turbo-batch run` vs Ray Data LLM, on the same token ids, in one run.

The prompts are rendered ONCE with turbo-batch's own PromptBuilder (the job's PromptConfig + the model's
tokenizer), so every variant runs the same token ids with the same sampling and the engine arguments
turbo-batch's profiles resolve for the job. Variants run one after another, each in its own process, so
engines never overlap (benchmarks/bench/: common helpers, presets, prepare, one module per variant, report):

  raw           vLLM `LLM(...)` offline: warm up on rows not in the timed set, reset the prefix cache, time
                one `llm.generate(all rows)` call. Presets with equal engine args share one raw engine.
  raw_guided    the same engine, guided choice over the labels (labels presets).
  raw_window    the same engine and sampling as raw, fed as turbo-batch feeds an engine: at most
                2 x max_num_seqs requests in vLLM, topped up 32 at a time as they finish (LLMEngine
                add_request/step); tells vLLM's own cost of rows arriving through a run from the
                rest of turbo-batch's difference (opt-in: --variants raw,raw_window,turbo).
  raw_burst     as raw_window, with 8 x max_num_seqs in vLLM topped up 256 at a time: whether vLLM
                itself runs faster fed in larger, rarer bursts (turbo-batch's rows_in_flight 1024,
                batch_rows 256); opt-in.
  turbo         the product: `python -m turbo_batch.cli run job.yaml --quiet --restart`; rows/s = rows /
                `_summary.json` wall_s (engines ready -> last row committed; engine start excluded).
  ray_data_llm  `ray.data.llm` fed `tokenized_prompt`; rows/s from the first request's arrival in vLLM to
                the last row out (engine start excluded); total wall reported too.

Kinds of preset (bench/presets.py): classify (one pass; headline turbo / raw, target 0.97, 1.0 on unique
prompts), generate (fixed output length via ignore_eos; turbo / raw, target 0.97; also writes
generate_<gpu|cpu>.json), labels (20 labels of ~6 tokens: turbo's one pass / ray.data.llm's guided choice,
target 1.2). Writes benchmarks/results/batch_<preset>.{json,md}.

    python benchmarks/bench_batch.py --preset cpu-smollm2
    python benchmarks/bench_batch.py --preset gpu-gemma4,gpu-gen-200 --results-dir $OUT   # on the GPU
    python benchmarks/bench_batch.py --preset gpu-20labels --dry-run      # anywhere: data + job only
    python benchmarks/bench_batch.py --merge a/batch_gpu-gen-10.json b/batch_gpu-gen-10.json  # one preset's
        # runs from several processes (GPU halves, device commands) -> medians in one results file
    python benchmarks/bench_batch.py --join a/batch_gpu-20labels.json b/batch_gpu-20labels.json --results-dir j
        # one lease's commands that each ran other variants (rdl, then turbo) -> one part for --merge
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: the bench package
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # the repo: turbo_batch

# Importable from here (bench_prefix.py and serve_priority.py use them).
from bench.common import (  # noqa: F401
    MARK,
    REPO,
    LoadSampler,
    build_gemma4,
    emit,
    fmt,
    gemma4_config,
    git_rev,
    label_of,
    load_plan,
    log,
    machine,
    preset_dirs,
    read_rendered,
    run_child,
    run_child_all,
    same_niceness_as_ray,
    synthetic_rows,
    words,
)
from bench.gpumeter import GpuMeter
from bench.prepare import job_dict, prepare  # noqa: F401
from bench.presets import PRESETS, RAW_MODES, VARIANTS, pick_variants
from bench.report import agreement, headline, median_result, table, write_generate_summary, write_results


def _for(args: argparse.Namespace, preset: str) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), "preset": preset})


def run_all(
    args, presets, dirs, plans, variants, info, on_run=lambda runs: None
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Every variant of every preset, `repeat` times: raw engines first (one per group of presets with
    equal engine args), then turbo-batch per preset, then ray.data.llm per preset (`--first turbo`:
    those two before the raw engines; `ray_data_llm`: also ray.data.llm before turbo-batch;
    `alternate`: both orders swap every other repeat)."""
    runs: dict[str, dict[str, list]] = {p: {v: [] for v in variants[p]} for p in presets}
    errors: dict[str, dict[str, str]] = {p: {} for p in presets}
    groups: dict[str, list[str]] = {}
    for p in presets:
        modes = [v for v in variants[p] if v in RAW_MODES]
        if modes:
            plans[p]["raw_modes"] = modes
            (dirs[p] / "plan.json").write_text(json.dumps(plans[p], indent=2, default=str))
            groups.setdefault(json.dumps(plans[p]["engine_args"], sort_keys=True), []).append(p)
    root = Path(args.workdir_root)
    gpu = getattr(args, "gpu", None)

    def record(p: str, v: str, r: dict[str, Any], la, load, i: int) -> None:
        r.update(
            loadavg_before=la, load1_during=load.stats(), run=i + 1, check=agreement(dirs[p], v, plans[p])
        )
        if gpu is not None and r.get("window"):
            r["gpu"] = gpu.between(*r["window"])
        runs[p][v].append(r)
        log(f"{p} {v}: {fmt(r['rows_per_s'])} rows/s over {fmt(r['timed_s'])} s")
        args.errors = errors
        on_run(runs)

    def run_raw(i: int) -> None:
        for group in groups.values():
            la = os.getloadavg()
            log(f"raw ({', '.join(group)}): run {i + 1}/{args.repeat} (load {la[0]:.2f})")
            try:
                with LoadSampler() as load:
                    results, wall = run_child_all(root, "raw", _for(args, ",".join(group)), args.timeout)
            except Exception as e:
                for p in group:
                    for v in plans[p]["raw_modes"]:
                        errors[p][v] = f"{type(e).__name__}: {e}"
                log(f"raw: FAILED: {e}")
                continue
            for r in results:
                record(r.pop("preset"), r["variant"], {**r, "process_wall_s": wall}, la, load, i)

    def run_others(i: int) -> None:
        # --first ray_data_llm: ray.data.llm before turbo-batch (alternate: every other repeat too)
        rdl_first = args.first == "ray_data_llm" or (args.first == "alternate" and i % 2 == 1)
        for v in ("ray_data_llm", "turbo") if rdl_first else ("turbo", "ray_data_llm"):
            for p in presets:
                if v not in variants[p]:
                    continue
                la = os.getloadavg()
                log(f"{p} {v}: run {i + 1}/{args.repeat} (load {la[0]:.2f})")
                try:
                    with LoadSampler() as load:
                        if v == "turbo":
                            from bench.turbo import run_turbo

                            r = run_turbo(dirs[p], plans[p])
                        else:
                            r = run_child(dirs[p], v, _for(args, p), args.timeout)
                except Exception as e:  # keep the other variants' numbers
                    errors[p][v] = f"{type(e).__name__}: {e}"
                    log(f"{p} {v}: FAILED: {errors[p][v]}")
                    continue
                record(p, v, r, la, load, i)

    for i in range(args.repeat):
        # --first turbo: turbo-batch (and ray.data.llm) before raw vLLM; alternate: swap every repeat
        turbo_first = args.first in ("turbo", "ray_data_llm") or (args.first == "alternate" and i % 2 == 1)
        for step in (run_others, run_raw) if turbo_first else (run_raw, run_others):
            step(i)
    for p in presets:  # a variant that ran before raw vLLM (--first turbo) is compared with it now
        for v, rs in runs[p].items():
            if v != "raw" and rs and not any(k.endswith("_raw_pct") for k in rs[-1].get("check") or {}):
                rs[-1]["check"] = agreement(dirs[p], v, plans[p])
    args.errors = errors
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--preset", default="cpu-smollm2", help=f"one or several, comma-separated: {sorted(PRESETS)}"
    )
    ap.add_argument(
        "--variants",
        default=None,
        help=f"comma-separated, from {VARIANTS} (default: the preset's); raw vLLM's modes run in this order",
    )
    ap.add_argument(
        "--rows", default=None, help="rows per preset: N, or preset=N,preset=N (default: the preset's)"
    )
    ap.add_argument("--workdir", default=None, help="scratch dir (default: out/bench_batch/<preset>)")
    ap.add_argument("--results-dir", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--tok", default=str(REPO / "benchmarks" / "tok"), help="gpu presets: tokenizer files")
    ap.add_argument("--model-dir", default=None, help="gpu presets: where to build the random model")
    ap.add_argument("--dry-run", action="store_true", help="build rows, job and prompts; run no engine")
    ap.add_argument("--repeat", type=int, default=1, help="run the variant sequence N times; report medians")
    ap.add_argument(
        "--first",
        choices=("raw", "turbo", "ray_data_llm", "alternate"),
        default="raw",
        help="which runs first in each repeat: raw vLLM, turbo-batch (then ray.data.llm), ray.data.llm "
        "(then turbo-batch), or alternate (both orders swap every repeat)",
    )
    ap.add_argument("--copy-logs", action="store_true", help="copy the variants' logs next to the results")
    ap.add_argument("--note", default=None, help="a reading of the numbers, stored in the results files")
    ap.add_argument(
        "--turbo-job",
        default=None,
        help='JSON merged into turbo-batch\'s job, cluster settings only (e.g. \'{"cluster": {"rows_in_flight": '
        '1024, "batch_rows": 256}}\'); use with --tag',
    )
    ap.add_argument(
        "--tag", default=None, help="results file names batch_<preset>_<tag>.* (no generate_*.json)"
    )
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per variant")
    ap.add_argument("--merge", nargs="+", default=None, help="results JSONs of one preset's runs -> one file")
    ap.add_argument(
        "--join", nargs="+", default=None,
        help="results JSONs of consecutive commands of one lease, other variants in each -> one part",
    )  # fmt: skip
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.merge or args.join:
        from bench.batch_merge import join, merge

        files = [json.loads(Path(f).read_text()) for f in (args.merge or args.join)]
        data = merge(files) if args.merge else join(files)
        # a merge is read anew: the parts' notes describe the parts
        data["note"] = args.note or data["note"]
        out = Path(args.results_dir) / f"batch_{data['preset']}.json"
        write_results(out, data)
        if PRESETS.get(data["preset"], {}).get("kind") == "generate":
            write_generate_summary(out.parent, data["preset"].split("-", 1)[0])
        print(table(data))
        return
    presets = [p.strip() for p in args.preset.split(",") if p.strip()]
    bad = [p for p in presets if p not in PRESETS]
    if bad:
        ap.error(f"unknown preset(s) {bad}; choose from {sorted(PRESETS)}")
    root = Path(args.workdir or REPO / "out" / "bench_batch" / "+".join(presets)).resolve()
    args.workdir_root = str(root)
    if not args.model_dir and any(PRESETS[p].get("model") == "gemma4" for p in presets):
        args.model_dir = str(root / "gemma4-1.2b-random")  # one model for every preset of the run
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")

    if args.child:
        if args.child == "probe":
            from bench.turbo import child_probe

            child_probe(root, args)
        elif args.child == "raw":
            from bench.raw import child_raw

            child_raw({p: root / p if (root / p / "plan.json").exists() else root for p in presets})
        else:
            from bench.rdl import child_rdl

            child_rdl(root)
        return

    try:
        variants = {p: pick_variants(p, args.variants) for p in presets}
    except ValueError as e:
        ap.error(str(e))
    load0 = os.getloadavg()
    t_all = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    log(
        f"load average {load0}; probing the machine"
        + (" and building the model" if args.model_dir and not args.dry_run else "")
    )
    info = run_child(root, "probe", args, args.timeout)
    dirs = preset_dirs(root, presets)
    plans = {}
    for p in presets:
        log(f"{p}: preparing rows and prompts in {dirs[p]}")
        args.root = root
        plans[p] = prepare(args, dirs[p], info, p)
        pl = plans[p]
        log(f"{p}: {pl['rows']} rows, prompt tokens {pl['prompt_tokens']}, {len(pl['labels'])} labels; "
            f"rendered in {pl['render_once_s']} s")  # fmt: skip
    if args.dry_run:
        from turbo_batch.batch.plan import preflight
        from turbo_batch.spec import load_job

        for p in presets:
            os.environ["TURBO_BATCH_OUTPUT_ROOT"] = str(dirs[p])
            pl = preflight(load_job(plans[p]["job_file"]))
            print(f"dry run ok: {p}: job {plans[p]['job_file']} ({pl.total_rows} rows), rendered "
                  f"{dirs[p] / 'rendered.parquet'}")  # fmt: skip
            print("engine args:", json.dumps(plans[p]["engine_args"], sort_keys=True))
            print("variants that would run:", ", ".join(variants[p]))
        return

    def write_all(runs: dict[str, dict[str, list[dict[str, Any]]]], final: bool) -> list[Path]:
        """Results files of every preset; also after each run, so a cut-off GPU session keeps its numbers."""
        outs = []
        for p in presets:
            results = {v: median_result(rs) for v, rs in runs[p].items() if rs}
            data: dict[str, Any] = {
                "preset": p,
                "invocation": ",".join(presets),
                "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                "machine": info,
                "git": git_rev(),
                "loadavg_start": load0,
                "loadavg_end": os.getloadavg(),
                "bench_wall_s": round(time.perf_counter() - t_all, 1),
                "variants": variants[p],
                "repeat": args.repeat,
                "plan": {k: v for k, v in plans[p].items() if k != "workdir"},
                "results": results,
                "errors": getattr(args, "errors", {}).get(p, {}),
                "complete": final,
                "note": args.note,
                "headline": headline(plans[p]["kind"], results, runs[p]),
            }
            out = results_dir / f"batch_{p}{'_' + args.tag if args.tag else ''}.json"
            write_results(out, data)
            outs.append(out)
            if final and args.copy_logs:
                logs = out.with_name(f"batch_{p}_logs")
                logs.mkdir(parents=True, exist_ok=True)
                for f in [
                    *dirs[p].glob("*.log"),
                    *root.glob("*.log"),
                    dirs[p] / "plan.json",
                    dirs[p] / "job.yaml",
                ]:
                    if f.is_file():
                        shutil.copy(f, logs / f.name)
            if final:
                print(table(data))
        for family in sorted(
            {p.split("-", 1)[0] for p in presets if PRESETS[p]["kind"] == "generate"} if not args.tag else ()
        ):
            g = write_generate_summary(results_dir, family)
            if g:
                outs.append(g)
        return outs

    results_dir = Path(args.results_dir)
    args.gpu = GpuMeter().start() if info.get("gpu") else None  # the GPU's clock and power per window
    try:
        runs = run_all(args, presets, dirs, plans, variants, info, on_run=lambda r: write_all(r, final=False))
    finally:
        if args.gpu is not None:
            args.gpu.stop()
    outs = write_all(runs, final=True)
    print(f"bench wall {time.perf_counter() - t_all:.1f} s; results: " + ", ".join(str(o) for o in outs))


if __name__ == "__main__":
    main()
