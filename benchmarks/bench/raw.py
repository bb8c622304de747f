"""The raw vLLM variant: `LLM(...)` offline, one `llm.generate(all rows)` call timed per workload.

Presets whose engine args are equal share one engine (one start instead of one per preset); the
prefix cache is reset before every timed call, so no workload reuses another's (or its own warm-up's)
cached blocks. Modes: raw (one pass for classify, the job's sampling for generate), raw_window (raw's
sampling, fed as turbo-batch's dispatcher feeds an engine: a bounded window topped up in batches),
raw_burst (the same, a 4x larger window topped up in bursts of 256) and
raw_guided (guided choice over the labels, max_tokens = longest label in characters + 1: any spelling
fits).

child_prefix_raw is bench_prefix.py's raw child: one engine, alternating shuffled / grouped calls."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

from turbo_batch.batch.pool import IN_FLIGHT_PER_SEQ
from turbo_batch.engine.load import LoadMeter
from turbo_batch.engine.load import window as load_window
from turbo_batch.spec import ClusterSpec

from .common import emit, label_of, load_plan, log, read_rendered, same_niceness_as_ray, write_outputs


def _reset_cache(llm: Any) -> None:
    with contextlib.suppress(Exception):  # an engine without prefix caching has nothing to reset
        llm.reset_prefix_cache()


def _params(plan: dict[str, Any], mode: str, label_ids: list[int]):
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    if plan["kind"] == "generate":
        s = plan["sampling"]
        return SamplingParams(max_tokens=s["max_tokens"], temperature=0.0, top_p=1.0, seed=s["seed"],
                              ignore_eos=True)  # fmt: skip
    if mode == "raw_guided":
        g = plan["guided_sampling"]
        return SamplingParams(
            max_tokens=g["max_tokens"],
            temperature=0.0,
            structured_outputs=StructuredOutputsParams(choice=list(plan["labels"])),
        )
    return SamplingParams(
        max_tokens=1,
        temperature=0.0,
        logprobs=len(label_ids),
        allowed_token_ids=list(label_ids),
        detokenize=False,
    )


def _parse(plan: dict[str, Any], mode: str, label_ids: list[int], row_id: Any, o: Any) -> dict[str, Any]:
    from turbo_batch.engine.tasks import match_label

    comp = o.outputs[0]
    res: dict[str, Any] = {"row_id": row_id, "prompt_tokens": len(o.prompt_token_ids)}
    if plan["kind"] == "generate":
        return {**res, "text": comp.text, "output_tokens": len(comp.token_ids)}
    if mode == "raw_guided":
        return {**res, "label": match_label(comp.text, plan["labels"]), "text": comp.text,
                "output_tokens": len(comp.token_ids)}  # fmt: skip
    label, probs = label_of(plan["labels"], label_ids, comp.logprobs[0] if comp.logprobs else None)
    return {**res, "label": label, "probs": probs}


def _attach_load_meter(llm: Any) -> LoadMeter | None:
    """turbo-batch's engine load meter (turbo_batch/engine/load.py) on an `LLM`, whose constructor takes
    no stat loggers: every record vLLM's logger manager gets, the meter gets too. None where the
    engine keeps no stats."""
    mgr = getattr(llm.llm_engine, "logger_manager", None)
    if mgr is None:
        return None
    meter = LoadMeter(llm.llm_engine.vllm_config.scheduler_config.max_num_seqs)
    record = mgr.record

    def both(*args: Any, **kw: Any) -> Any:
        meter.record(
            kw.get("scheduler_stats", args[0] if args else None),
            kw.get("iteration_stats", args[1] if len(args) > 1 else None),
        )
        return record(*args, **kw)

    mgr.record = both
    return meter


# Windowed feeds: mode -> (requests in vLLM at most, in units of max_num_seqs; top-up size in rows).
# raw_window is turbo-batch's default dispatch (rows_in_flight 2 x max_num_seqs, batch_rows 32), read
# from turbo-batch itself; raw_burst keeps 4x as many and tops up in bursts of 256 (is vLLM cheaper fed
# that way?).
FEEDS = {
    "raw_window": (IN_FLIGHT_PER_SEQ, ClusterSpec.model_fields["batch_rows"].default),
    "raw_burst": (4 * IN_FLIGHT_PER_SEQ, 256),
}


def generate_windowed(llm: Any, prompts: list[Any], params: Any, window: int, batch: int) -> list[Any]:
    """`prompts` through `llm`'s engine with at most `window` requests in vLLM at once, topped up `batch`
    at a time as requests finish: the arrival pattern of turbo-batch's dispatcher (rows_in_flight =
    2 x max_num_seqs, batch_rows 32), with vLLM's own LLMEngine and nothing of turbo-batch. Outputs in
    prompt order."""
    eng = llm.llm_engine
    done: dict[int, Any] = {}
    nxt = inflight = 0

    def add(n: int) -> None:
        nonlocal nxt, inflight
        for _ in range(min(n, len(prompts) - nxt)):
            eng.add_request(f"w{nxt}", prompts[nxt], params)
            nxt, inflight = nxt + 1, inflight + 1

    add(window)
    while inflight:
        for o in eng.step():
            if o.finished:
                done[int(o.request_id.split("-", 1)[0][1:])] = o  # "w<i>", or "w<i>-<suffix>" if internal
                inflight -= 1
        free = window - inflight
        if free >= batch or (free and nxt + free >= len(prompts)):
            add(free - free % batch if free >= batch else free)
    return [done[i] for i in range(len(prompts))]


def child_raw(workdirs: dict[str, Path]) -> None:
    from vllm import LLM
    from vllm.inputs import TokensPrompt

    plans = {p: load_plan(w) for p, w in workdirs.items()}
    eargs = dict(next(iter(plans.values()))["engine_args"])
    assert all(pl["engine_args"] == eargs for pl in plans.values()), "one raw engine needs equal engine args"
    nice = same_niceness_as_ray()
    t0 = time.perf_counter()
    llm = LLM(**eargs)
    start_s = time.perf_counter() - t0
    meter = _attach_load_meter(llm)
    for name, workdir in workdirs.items():
        plan = plans[name]
        rows = read_rendered(workdir / "rendered.parquet")
        warm = read_rendered(workdir / "warmup.parquet")
        label_ids = rows[0]["label_ids"] or []
        assert all((r["label_ids"] or []) == label_ids for r in rows + warm), "label ids differ between rows"
        wp = [TokensPrompt(prompt_token_ids=r["prompt_ids"]) for r in warm]
        prompts = [TokensPrompt(prompt_token_ids=r["prompt_ids"]) for r in rows]
        for mode in plan.get("raw_modes") or ["raw"]:
            sp = _params(plan, mode, label_ids)
            # The first request of a kind is slow once per engine (logprobs: vLLM compiles the rank op;
            # guided choice: the grammar compiles): timed apart, on warm-up rows not in the timed set.
            t1 = time.perf_counter()
            llm.generate(wp[:1], sp, use_tqdm=False)
            first_s = time.perf_counter() - t1
            t1 = time.perf_counter()
            llm.generate(wp[1:], sp, use_tqdm=False)
            warm_s = time.perf_counter() - t1
            _reset_cache(llm)
            t1, w0, l0 = time.perf_counter(), time.time(), meter and meter.reading()
            if mode in FEEDS:
                per, top_up = FEEDS[mode]
                window = per * eargs.get("max_num_seqs", 128)
                outs = generate_windowed(llm, prompts, sp, window, top_up)
            else:
                outs = llm.generate(prompts, sp, use_tqdm=False)
            gen_s, w1, l1 = time.perf_counter() - t1, time.time(), meter and meter.reading()
            parsed = [_parse(plan, mode, label_ids, r["row_id"], o) for r, o in zip(rows, outs, strict=True)]
            write_outputs(workdir, mode, parsed)
            out_tok = sum(p.get("output_tokens") or 0 for p in parsed)
            emit(
                {
                    "preset": name,
                    "variant": mode,
                    "rows": len(rows),
                    "timed_s": gen_s,
                    "rows_per_s": len(rows) / gen_s,
                    "output_tokens_per_s": out_tok / gen_s if out_tok else None,
                    "method": (
                        f"rows / every row through LLMEngine add_request/step with at most {FEEDS[mode][0]} x "
                        f"max_num_seqs in vLLM, topped up {FEEDS[mode][1]} at a time"
                        + (" (as turbo-batch feeds an engine)" if mode == "raw_window" else "")
                        + ", after warm-up and a prefix-cache reset"
                        if mode in FEEDS
                        else "rows / one llm.generate(all rows) call, after warm-up on other rows and a "
                        "prefix-cache reset"
                    ),
                    "engine_start_s": start_s,
                    "engine_shared_by": list(workdirs),
                    "first_request_s": first_s,
                    "warmup_rest_s": warm_s,
                    "niceness": nice,
                    "since_engine_start_s": time.perf_counter() - t0,
                    "window": [w0, w1],  # run_child_all splits the host CPU of this timed call
                    "engine_load": load_window(l0, l1),  # the scheduler's, as turbo-batch's summary has it
                    "async_scheduling": getattr(
                        llm.llm_engine.vllm_config.scheduler_config, "async_scheduling", None
                    ),
                }
            )
            _reset_cache(llm)


def child_prefix_raw(workdir: Path, calls: list[str], deadline: float | None = None) -> None:
    """One engine: warm-up, then one generate call per entry of `calls` ("shuffled" or "grouped", in that
    order; bench_prefix.raw_calls), the prefix cache reset before each.
    A call that would end past `deadline` (epoch seconds; its length guessed from its last run) is skipped,
    so a budget-cut child still reports the runs it made."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    plan = load_plan(workdir)
    sets = {
        "shuffled": read_rendered(workdir / "rendered.parquet"),
        "grouped": read_rendered(workdir / "grouped.parquet"),
    }
    warm = read_rendered(workdir / "warmup.parquet")
    nice = same_niceness_as_ray()
    t0 = time.perf_counter()
    llm = LLM(**plan["engine_args"])
    start_s = time.perf_counter() - t0
    label_ids = list(sets["shuffled"][0]["label_ids"])
    sp = SamplingParams(max_tokens=1, temperature=0.0, logprobs=len(label_ids), allowed_token_ids=label_ids,
                        detokenize=False)  # fmt: skip
    llm.generate([TokensPrompt(prompt_token_ids=r["prompt_ids"]) for r in warm], sp, use_tqdm=False)
    cache = llm.llm_engine.vllm_config.cache_config
    runs: list[dict[str, Any]] = []
    last: dict[str, float] = {}
    skipped: list[str] = []
    seen: dict[str, int] = {}
    for name in calls:
        rows = sets[name]
        i = seen.get(name, 0)  # this call's index among the calls of its kind
        seen[name] = i + 1
        if deadline and name in last and time.time() + last[name] > deadline:
            skipped.append(f"raw_{name} (run {i + 1})")
            log(f"raw_{name} run {i + 1}: skipped, it would end past the budget")
            continue
        llm.reset_prefix_cache()
        prompts = [TokensPrompt(prompt_token_ids=r["prompt_ids"]) for r in rows]
        t1 = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        dt = time.perf_counter() - t1
        last[name] = dt
        cached = sum(o.num_cached_tokens or 0 for o in outs)
        total = sum(len(o.prompt_token_ids) for o in outs)
        runs.append({"variant": f"raw_{name}", "run": i + 1, "rows": len(rows), "timed_s": dt,
                     "rows_per_s": len(rows) / dt, "prefix_cache_hit_pct": round(100 * cached / total, 2)})  # fmt: skip
        log(f"raw_{name} run {i + 1}: {len(rows) / dt:.2f} rows/s, cache hits {100 * cached / total:.1f}%")
        if name == "shuffled":  # every run: a budget-cut child still leaves raw's labels
            scored = [label_of(plan["labels"], label_ids, o.outputs[0].logprobs[0] if o.outputs[0].logprobs else None) for o in outs]  # fmt: skip
            write_outputs(workdir, "raw", [
                {"row_id": r["row_id"], "prompt_tokens": len(o.prompt_token_ids), "label": x[0], "probs": x[1]}
                for r, o, x in zip(rows, outs, scored, strict=True)])  # fmt: skip
    emit({"variant": "raw", "engine_start_s": start_s, "niceness": nice, "runs": runs, "skipped": skipped,
             "kv_cache_tokens": (cache.num_gpu_blocks or 0) * cache.block_size})  # fmt: skip
