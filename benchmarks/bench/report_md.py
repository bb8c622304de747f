"""The markdown results file of one preset."""

from __future__ import annotations

import json
from typing import Any

from .common import fmt

KIND_TITLE = {
    "classify": "classification in one forward pass",
    "generate": "generation with a fixed output length",
    "labels": "one-pass classification vs guided choice",
}


def _machine(d: dict[str, Any]) -> str:
    m = d["machine"]
    hw = f"{m['gpu_count']}× {m['gpu']}" if m.get("gpu") else "CPU only (no GPU)"
    return (
        f"Measured {d['date']} with `benchmarks/bench_batch.py --preset {d.get('invocation') or d['preset']}` on "
        f"{hw} ({m.get('cpu', '?')}, {m.get('cpu_count')} logical CPUs, {m.get('ram_gib')} GiB RAM"
        + (f", {m.get('gpu_mem_gib')} GiB per GPU" if m.get("gpu") else "")
        + f"); vLLM {m['versions'].get('vllm')}, Ray {m['versions'].get('ray')}, torch {m['versions'].get('torch')}, "
        f"transformers {m['versions'].get('transformers')}, Python {m.get('python')}; turbo-batch "
        f"{d.get('git') or '?'}. Load average (1/5/15 min) before: {' / '.join(f'{x:.2f}' for x in d['loadavg_start'])}; "
        f"after: {' / '.join(f'{x:.2f}' for x in d['loadavg_end'])}."
    )


def _sampling(d: dict[str, Any]) -> list[str]:
    p = d["plan"]
    if p["kind"] == "generate":
        s = p["sampling"]
        return [f"- Sampling (every variant): max_tokens={s['max_tokens']}, ignore_eos=True, temperature=0, "
                "top_p=1, seed=0; turbo-batch's job: `task: {type: generate, max_tokens: "
                f"{s['max_tokens']}}}`, `sampling: {json.dumps(p['job'].get('sampling'))}`."]  # fmt: skip
    out = [f"- Labels ({len(p['labels'])}): {', '.join(repr(x) for x in p['labels'])}; first tokens "
           f"{p['label_first_token_ids']}."]  # fmt: skip
    if p.get("label_tokens"):
        lt = p["label_tokens"]
        out.append(f"- Label lengths in tokens: mean {sum(lt) / len(lt):.1f}, min {min(lt)}, max {max(lt)}.")
    out.append(
        f"- One pass (raw, turbo{', ray_data_llm' if p['kind'] == 'classify' else ''}): max_tokens=1, "
        f"temperature=0, logprobs={len(p['labels'])}, allowed_token_ids=label first tokens, detokenize=False; "
        "label = argmax."
    )
    if p.get("guided_sampling"):
        g = p["guided_sampling"]
        out.append(f"- Guided choice (raw_guided, ray_data_llm): StructuredOutputsParams(choice=labels), "
                   f"max_tokens={g['max_tokens']} (longest label in characters + 1), temperature=0.")  # fmt: skip
    return out


def _check(v: str, r: dict[str, Any]) -> str:
    c = r.get("check") or {}
    if "same_text_as_raw_pct" in c or "output_tokens" in c:
        ot = c.get("output_tokens") or {}
        same = c.get("same_text_as_raw_pct", 100.0 if v == "raw" else None)
        return f"same text as raw {fmt(same)}%; output tokens {ot.get('min')}–{ot.get('max')}"
    parts = [
        f"{k[len('agree_with_') : -4]} {fmt(c[k])}%"
        for k in ("agree_with_raw_pct", "agree_with_raw_guided_pct")
        if k in c
    ]
    if c.get("accuracy_pct") is not None:
        parts.append(f"accuracy {fmt(c['accuracy_pct'])}%")
    if c.get("unparsed_labels"):
        parts.append(f"{c['unparsed_labels']} unparsed")
    return "same label as " + ", ".join(parts) if parts else "—"


def markdown(d: dict[str, Any]) -> str:
    p = d["plan"]
    lines = [
        f"# Batch throughput, {KIND_TITLE[p['kind']]}: raw vLLM vs turbo-batch ({d['preset']})",
        "",
        _machine(d),
        "",
    ]
    h = d.get("headline")
    if h:
        base = {"raw": "raw vLLM", "ray_data_llm": "ray.data.llm (guided choice)",
                "raw_guided": "raw vLLM (guided choice)"}[h["baseline"]]  # fmt: skip
        others = "; ".join(
            f"over {k[len('turbo_over_') :]} {v:.3f}" for k, v in h.items() if k.startswith("turbo_over_")
        )
        if h.get("paired_ratios"):
            how = (f"median of {len(h['paired_ratios'])} ratios of runs made back to back: "
                   f"{', '.join(f'{x:.3f}' for x in h['paired_ratios'])}; the medians, "
                   f"{h['turbo_rows_per_s']:.2f} vs {h[h['baseline'] + '_rows_per_s']:.2f} rows/s, give "
                   f"{h['ratio_of_medians']:.3f}")  # fmt: skip
        else:
            how = f"{h['turbo_rows_per_s']:.2f} vs {h[h['baseline'] + '_rows_per_s']:.2f} rows/s"
        lines += [f"**Headline: turbo-batch / {base} = {h['ratio']:.3f}** ({how}; engine start excluded; "
                  f"target ≥ {h['target']})" + (f"; turbo-batch {others}" if others else "") + ".", ""]  # fmt: skip
    lines += [
        "| variant | rows | timed s | rows/s | output tok/s | method of rows/s | engine start s | process wall s | "
        "agreement | load avg (1 min) during: mean / max |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in d["variants"]:
        r = d["results"].get(v)
        if not r:
            continue
        start = r.get("engine_start_s")
        load = r.get("load1_during") or {}
        shared = r.get("engine_shared_by") or []
        lines.append(
            f"| {v} | {r['rows']} | {fmt(r['timed_s'])} | **{fmt(r['rows_per_s'])}** | {fmt(r.get('output_tokens_per_s'), 1)} | "
            f"{r['method']} | {fmt(start) if start is not None else 'inside the pipeline'}"
            f"{' (one engine for ' + ', '.join(shared) + ')' if len(shared) > 1 else ''} | "
            f"{fmt(r.get('process_wall_s'), 1)} | {_check(v, r)} | {fmt(load.get('mean'))} / {fmt(load.get('max'))} |"
        )
    if d.get("repeat", 1) > 1:
        how = "in several processes (below)" if d.get("merged_from") else "alternating"
        lines += ["", f"Each variant ran up to {d['repeat']} times, {how}; the table shows the (lower) median run. "
                  "All runs, rows/s: " + "; ".join(f"{v} " + ", ".join(fmt(x.get("rows_per_s")) for x in d["results"][v]["runs"])
                                                   for v in d["variants"] if v in d["results"]) + "."]  # fmt: skip
    lines += _merged_lines(d)
    lines += window_lines(d)
    lines += core_lines(d)
    for v, msg in (d.get("errors") or {}).items():
        lines += ["", f"**{v} failed**: `{msg.splitlines()[0][:300]}` (its log is in the work dir)."]
    raw = d["results"].get("raw")
    if raw:
        lines += ["", f"raw vLLM: engine start {fmt(raw.get('engine_start_s'), 1)} s; the first request took "
                  f"{raw['first_request_s']:.2f} s and the other {p['warmup_rows'] - 1} warm-up rows "
                  f"{raw['warmup_rest_s']:.2f} s, outside the timed call; prefix cache reset before it; "
                  f"niceness {raw.get('niceness')}."]  # fmt: skip
        if raw.get("host_cpu"):
            h = raw["host_cpu"]
            roles = ", ".join(
                f"{'LLM front' if k == 'driver' else k} {v:.2f}" for k, v in h["by_role"].items()
            )
            lines += [f"Host CPU of raw vLLM's timed call, CPU seconds: {roles}; "
                      f"**{h['cpu_s_per_1k_rows']:.2f} CPU-s per 1,000 rows** in all."]  # fmt: skip
    t = d["results"].get("turbo")
    if t:
        lines += ["", f"turbo-batch: wall_s {fmt(t['timed_s'])} s; process wall {fmt(t.get('process_wall_s'), 1)} s (Python + "
                  f"Ray start + engine start {fmt(t.get('engine_start_s'), 1)} s + run + shutdown). Rows written: "
                  f"{t['rows_ok']} ok, {t['rows_error']} errors; prompt token counts equal to the pre-rendered "
                  f"ones: {t['check'].get('same_prompt_tokens')} of {t['rows']}."]  # fmt: skip
        lines += host_cpu_lines(t.get("host_cpu"))
    r = d["results"].get("ray_data_llm")
    if r:
        lines += ["", f"Ray Data LLM: total wall {r['total_wall_s']:.1f} s (ray.init + pipeline with engine start) → "
                  f"{r['total_rows_per_s']:.2f} rows/s over everything; first-to-last-batch rate "
                  f"{fmt(r.get('first_to_last_batch_rows_per_s'))} rows/s (first batch {r['first_batch_rows']} rows)."]  # fmt: skip
    ea = p["engine_args"]
    rows_kind = (
        "Rotten Tomatoes `sample_rotten_tomatoes(n, seed=0)`"
        if p["job"]["input"]["id_column"] == "review_id"
        else "synthetic random-word texts"
    )
    lines += [
        "", "## Settings (the same for every variant)", "",
        f"- Rows: {p['rows']} ({rows_kind}); prompt tokens mean {p['prompt_tokens']['mean']} (min "
        f"{p['prompt_tokens']['min']}, max {p['prompt_tokens']['max']}), {p['total_prompt_tokens']} in all; "
        f"warm-up: {p['warmup_rows']} other rows.",
        f"- Model: `{p['model']}`. Prompt: system {json.dumps(p['job']['prompt']['system'])}, user "
        f"`{p['job']['prompt']['template']}`, the model's chat template; rendered once with "
        "`turbo_batch.prompt.PromptBuilder`.",
        *_sampling(d),
        f"- Engine args (`turbo_batch.engine.profiles.engine_args`, profile `{p['device_profile']['profile']}`): "
        f"`{json.dumps({k: v for k, v in ea.items() if k != 'model'}, sort_keys=True)}`.",
        f"- turbo-batch job: `{json.dumps({k: p['job'][k] for k in ('output', 'cluster')})}` (cluster defaults: "
        "one engine, batch_rows 32, rows_in_flight 2 × max_num_seqs).",
        f"- Ray Data LLM: batch_size {p['rdl']['batch_size']}, max_concurrent_batches "
        f"{p['rdl']['max_concurrent_batches']}, concurrency 1, `tokenized_prompt` input, chat_template/tokenize/"
        f"detokenize stages off; placement_group_config {json.dumps(p['rdl']['placement'])}.",
        "- Each variant ran in its own process, one after the other (no overlapping engines); Ray workers run at "
        "niceness 15, and raw vLLM at the same.",
    ]  # fmt: skip
    if d.get("note"):
        lines += ["", "## Reading", "", d["note"]]
    return "\n".join(lines) + "\n"


def _merged_lines(d: dict[str, Any]) -> list[str]:
    """A joined file (bench_batch.py --join): its commands. A merged file (--merge): its parts, and
    turbo-batch's host CPU run by run (the detail below is the median run's only, which may be an older
    part's)."""
    parts = d.get("merged_from") or []
    if d.get("joined_commands"):
        return ["", f"One part from {len(d['joined_commands'])} consecutive commands of one lease on one host "
                "(`bench_batch.py --join`): " + "; ".join(_command(c) for c in d["joined_commands"]) + "."]  # fmt: skip
    if not parts:
        return []
    out = ["", f"Merged from {len(parts)} results files (`bench_batch.py --merge`): " + "; ".join(
        f"part {i} {p['date']}, turbo-batch {p['git']}, {p.get('host_cores') or '?'}-core host, "
        f"{', '.join(p['variants'])}"
        + (f" (in {len(p['commands'])} commands: " + ", then ".join(_command(c) for c in p["commands"]) + ")"
           if p.get("commands") else "") for i, p in enumerate(parts, start=1)) + "."]  # fmt: skip
    for v, r in (d.get("results") or {}).items():
        src = r.get("detail_from")
        if not src:
            continue
        whose = (f"part {src.get('part')}'s run at {fmt(src.get('rows_per_s'))} rows/s" if isinstance(src, dict)
                 else "another run's (an older merge did not record which)")  # fmt: skip
        out.append(f"{v}'s median run ({fmt(r.get('rows_per_s'))} rows/s) was kept as a summary only: its "
                   f"host CPU, engine-core and check detail below are {whose}.")  # fmt: skip
    runs = ((d.get("results") or {}).get("turbo") or {}).get("runs") or []
    if any(r.get("host_cpu_excl_engine") is not None for r in runs):
        out.append("turbo-batch's host CPU in each run's timed window, engines excluded, CPU-s per 1,000 rows: "
                   + ", ".join(f"{fmt(r.get('host_cpu_excl_engine'))} (part {r.get('part', '?')}, "
                               f"{fmt(r.get('rows_per_s'))} rows/s)" for r in runs) + ".")  # fmt: skip
    return out


def _command(c: dict[str, Any]) -> str:
    return f"{', '.join(c['variants'])} at {c['date']} ({c['git']})"


def window_lines(d: dict[str, Any]) -> list[str]:
    """Run by run: the engine's scheduler (requests running of max_num_seqs, waiting, the share of steps
    that were full and of steps with free seats and nothing waiting), the seconds vLLM's engine-core
    loop waited for a CPU (bench/hostcpu.py), and the GPU (SM clock, power, temperature, time at the
    power cap) in the timed window, where the run recorded them."""
    rows = []
    for v in d["variants"]:
        for r in (d["results"].get(v) or {}).get("runs") or []:
            e, g = r.get("engine_load") or {}, r.get("gpu") or {}
            wait = r.get("engine_core_runqueue_wait_s")
            if not e and not g:
                continue
            run = f"{r.get('run')}" + (f" (part {r['part']})" if r.get("part") else "")
            eng = (f"{e['running_mean']:g} of {e['max_num_seqs']} | {e['waiting_mean']:g} | {e['full_steps_pct']:g}% / "
                   f"{e['starved_steps_pct']:g}% | {fmt(e.get('steps_per_s'), 1)}") if e else "— | — | — | —"  # fmt: skip
            gpu = (f"{g['sm_mhz_mean']} ({g['sm_mhz_min']}) | {g['power_w_mean']:g} | {g['temp_c_max']} | "
                   f"{g['power_capped_pct']:g}%") if g else "— | — | — | —"  # fmt: skip
            asy = {True: "on", False: "off"}.get(r.get("async_scheduling"), "—")
            rows.append(f"| {v} | {run} | {fmt(r.get('rows_per_s'))} | {asy} | {eng} | {fmt(wait)} | {gpu} |")
    if not rows:
        return []
    return ["", "Each run's timed window: vLLM's scheduler, step by step (`turbo_batch/engine/load.py`), and the GPU "
            "sampled every 0.5 s (`bench/gpumeter.py`).", "",
            "| variant | run | rows/s | async scheduling | requests running | waiting | steps full / free seats, "
            "none waiting | steps/s "
            "| engine core's wait for a CPU, s | SM MHz mean (min) | power W | temp °C max | at power cap |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|", *rows]  # fmt: skip


def core_lines(d: dict[str, Any]) -> list[str]:
    """Per variant's median run: vLLM's engine-core process as bench/coreprobe.py saw it in the timed
    window (environment settings, its threads' CPU, top py-spy frames) and any environment override."""
    out = []
    for v in d["variants"]:
        r = d["results"].get(v) or {}
        cores = ((r.get("host_cpu") or {}).get("engine_core") or {}).get("cores") or []
        for c in cores:
            env = ", ".join(
                f"{k}={x}" for k, x in (c.get("env") or {}).items() if not k.startswith("TORCHINDUCTOR")
            )
            threads = ", ".join(f"{k} {x:.1f}" for k, x in (c.get("thread_cpu_s") or {}).items())
            line = (f"- {v}: engine core pid {c.get('pid')}, {c.get('cpus_allowed')} CPUs allowed, nice "
                    f"{c.get('nice')}; env {env or '—'}; CPU s by thread over {c.get('span_s')} s: {threads}")  # fmt: skip
            prof = c.get("pyspy") or {}
            if prof.get("top_self"):
                top = ", ".join(f"`{f}` {100 * x:.0f}%" for f, x in prof["top_self"][:6])
                line += f"; py-spy ({prof['seconds']} s in the window), top frames by own time: {top}"
            elif prof.get("error"):
                line += f"; no py-spy profile ({prof['error']})"
            out.append(line)
        if r.get("env_override"):
            out.append(f"- {v} ran with {json.dumps(r['env_override'])} added to its environment.")
    if not out:
        return []
    return [
        "",
        "vLLM's engine-core process in each median run's timed window (`bench/coreprobe.py`):",
        "",
        *out,
    ]


def host_cpu_lines(h: dict[str, Any] | None) -> list[str]:
    """turbo-batch's host CPU in its timed window, by process role (bench/hostcpu.py)."""
    if not h:
        return []
    roles = ", ".join(f"{k} {v:.2f}" for k, v in h["by_role"].items())
    titles = ", ".join(f"`{k}` {v:.2f}" for k, v in list(h["by_title"].items())[:8])
    w = h.get("whole_run") or {}
    whole = ", ".join(f"{k} {v:.2f}" for k, v in (w.get("by_role") or {}).items())
    eng = 1000 * h["by_role"].get("engine", 0.0) / h["rows"] if h.get("rows") else None
    return ["", f"Host CPU in turbo-batch's timed window ({h['window_s']:.1f} s), CPU seconds by role: {roles}"
            f"{f' (engines {eng:.2f} CPU-s per 1,000 rows)' if eng is not None else ''}. "
            f"Engines excluded: **{h['cpu_s_per_1k_rows_excl_engine']:.2f} CPU-s per 1,000 rows** (= cores per "
            f"1,000 rows/s; issue 11's bar ≤ 1). By process title: {titles}. The whole process (Ray and engine "
            f"start, and the reading, ordering and rendering done before the engines were ready, included): "
            f"{whole}; engines excluded {fmt(w.get('cpu_s_per_1k_rows_excl_engine'))} CPU-s per 1,000 rows."]  # fmt: skip
