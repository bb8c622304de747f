"""bench_prefix.py's results: medians and ratios of the runs, the merge of a pair run's halves, and the
markdown table. Owns the results file's shape (prefix_<preset>.json / .md); must not run engines."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from . import common as bb

SETTINGS = ("shape", "rows", "total_prompt_tokens", "prompt_tokens", "labels", "engine_args", "order_stage",
            "rdl", "repeat", "rdl_repeat", "sequence", "raw_runs", "job", "standin", "model")  # fmt: skip


def _median(runs: list[dict[str, Any]], variant: str) -> float | None:
    xs = [r["rows_per_s"] for r in runs if r["variant"] == variant and r.get("rows_per_s")]
    return statistics.median(xs) if xs else None


def results(
    plan: dict[str, Any], info: dict[str, Any], runs: list, checks: dict, skipped: list, t_all: float
):
    med = {v: _median(runs, v) for v in ("turbo", "raw_shuffled", "raw_grouped", "ray_data_llm")}
    hits = {
        v: [r["prefix_cache_hit_pct"] for r in runs if r["variant"] == v]
        for v in ("raw_shuffled", "raw_grouped")
    }
    ratio = lambda a, b: round(a / b, 3) if a and b else None  # noqa: E731
    return {
        "preset": plan["preset"],
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": info,
        "git": bb.git_rev(),
        "turbo_rows_s": med["turbo"],
        "raw_shuffled_rows_s": med["raw_shuffled"],
        "raw_grouped_rows_s": med["raw_grouped"],
        "ray_data_llm_rows_s": med["ray_data_llm"],
        "turbo_over_raw_shuffled": ratio(med["turbo"], med["raw_shuffled"]),
        "turbo_over_raw_grouped": ratio(med["turbo"], med["raw_grouped"]),
        "raw_prefix_cache_hit_pct": {k: statistics.median(v) for k, v in hits.items() if v},
        "settings": {k: plan.get(k) for k in SETTINGS},
        "checks": checks,
        "runs": runs,
        "skipped": skipped,
        "bench_wall_s": round(time.perf_counter() - t_all, 1),
    }


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One results file from the halves of a pair run (`--variants` per GPU, the same rows, seeds and
    engine args on two GPUs of one host at the same time); refuses halves whose settings differ."""

    def same(d: dict[str, Any]) -> dict[str, Any]:  # the rows and engine; not model folders or run counts
        engine = {k: v for k, v in d["settings"]["engine_args"].items() if k != "model"}
        keep = ("shape", "rows", "total_prompt_tokens", "prompt_tokens", "labels", "standin")
        return {k: d["settings"].get(k) for k in keep} | {"engine_args": engine}

    if any(same(d) != same(parts[0]) for d in parts[1:]):
        raise SystemExit("--merge: the halves ran different settings")
    plan = {"preset": parts[0]["preset"], **parts[0]["settings"]}
    runs = [r | {"half": i} for i, d in enumerate(parts) for r in d["runs"]]
    checks: dict[str, Any] = {}
    # earlier halves win; later ones fill in what they lack (a half without raw vLLM has no agreement)
    for d in parts:
        for k, v in d["checks"].items():
            both = isinstance(v, dict) and isinstance(checks.get(k), dict)
            checks[k] = v | checks[k] if both else checks.get(k, v)
    data = results(plan, parts[0]["machine"], runs, checks, [x for d in parts for x in d["skipped"]], 0.0)
    data |= {
        "date": parts[0]["date"],
        "git": parts[0]["git"],
        "bench_wall_s": max(d["bench_wall_s"] for d in parts),
    }
    data["note"] = " ".join(filter(None, [d.get("note") for d in parts])) or None
    data["pair"] = [sorted({r["variant"] for r in d["runs"]}) for d in parts]
    for k in ("sequence", "raw_runs"):  # per half, as each was run
        data["settings"][k] = [d["settings"].get(k) for d in parts]
    return data


def _model(s: dict[str, Any]) -> str:
    if s.get("standin"):
        return f"random-weight Gemma 4 stand-in `{s['standin']}` (BENCH_STANDIN), not the Turbo checkpoint"
    return f"`{Path(str(s.get('model', '?'))).name}`"


def host_cpu_lines(runs: list[dict[str, Any]]) -> list[str]:
    """turbo-batch's host CPU in its timed windows (bench/turbo.py's meter), engines excluded."""
    hc = [r["host_cpu"] for r in runs if r["variant"] == "turbo" and r.get("host_cpu")]
    if not hc:
        return []
    per = [h["cpu_s_per_1k_rows_excl_engine"] for h in hc]
    mid = bb.lower_median(hc, key=lambda h: h["cpu_s_per_1k_rows_excl_engine"])
    top = sorted(((k, v) for k, v in mid["by_title"].items()), key=lambda kv: -kv[1])[:6]
    return [
        f"Host CPU in turbo-batch's timed windows, engines excluded: {', '.join(f'{x:g}' for x in per)} CPU-s per "
        f"1,000 rows (= cores per 1,000 rows/s; median {statistics.median(per):g}; issue 11's bar ≤ 1). The median "
        f"run by process title, CPU-s: {', '.join(f'`{k}` {v}' for k, v in top)}."
    ]


def markdown(d: dict[str, Any]) -> str:
    m, s = d["machine"], d["settings"]
    where = (
        f"{m.get('gpu')} ×{m.get('gpu_count')}"
        if m.get("gpu")
        else f"CPU only ({m.get('cpu')}, {m.get('cpu_count')} logical CPUs)"
    )
    rows = [("raw vLLM, shuffled rows", "raw_shuffled"), ("raw vLLM, grouped by document", "raw_grouped"),
            ("turbo-batch run, shuffled parquet (order: auto)", "turbo"), ("ray.data.llm, shuffled rows", "ray_data_llm")]  # fmt: skip
    lines = [
        f"# Many-prefix batch throughput ({d['preset']})",
        "",
        f"Measured {d['date']} with `benchmarks/bench_prefix.py --preset {d['preset']}` on {where}; "
        f"vLLM {m.get('versions', {}).get('vllm')}, Ray {m.get('versions', {}).get('ray')}; turbo-batch {d['git']}.",
        f"{s['shape']['docs']} documents × {s['shape']['questions']} questions = {s['rows']} rows, prompt tokens "
        f"mean {s['prompt_tokens']['mean']} ({s['total_prompt_tokens']} in all), classify yes/no in one forward pass; "
        f"engine args `{json.dumps({k: v for k, v in s['engine_args'].items() if k != 'model'}, sort_keys=True)}`.",
        "",
        f"Model: {_model(s)}; KV cache {s['engine_args'].get('kv_cache_memory_bytes', 0) / 1024**3:g} GiB"
        f"{f' = {kv:,} tokens by vLLM' if (kv := d['checks'].get('raw_kv_cache_tokens')) else ''}.",
        "",
        "| variant | rows/s (median) | runs, rows/s | timed windows, s | × raw shuffled | prefix-cache hits |",
        "|---|---|---|---|---|---|",
    ]
    for label, v in rows:
        xs = [r["rows_per_s"] for r in d["runs"] if r["variant"] == v]
        ts = [r["timed_s"] for r in d["runs"] if r["variant"] == v and r.get("timed_s")]
        win = f"{min(ts):.0f}–{max(ts):.0f}" if ts else "—"
        med = d[f"{v}_rows_s"]
        x = round(med / d["raw_shuffled_rows_s"], 3) if med and d["raw_shuffled_rows_s"] else None
        hit = d["raw_prefix_cache_hit_pct"].get(v)
        lines.append(f"| {label} | {bb.fmt(med)} | {', '.join(f'{y:.2f}' for y in xs) or '—'} | {win} | {bb.fmt(x, 3)} | "
                     f"{'—' if hit is None else f'{hit}%'} |")  # fmt: skip
    o = s["order_stage"]
    lines += [
        "",
        f"turbo / raw shuffled = **{bb.fmt(d['turbo_over_raw_shuffled'], 3)}**, turbo / raw grouped = "
        f"**{bb.fmt(d['turbo_over_raw_grouped'], 3)}** (issue 11's targets on the H200: ≥ 2.5 and ≥ 0.9).",
        f"Order stage cost on this machine's CPU (one core): rendering the message text + key "
        f"{o['key_s_per_1k_rows']} s per 1,000 rows vs the render stage (text + token ids) "
        f"{o['render_s_per_1k_rows']} s; the key order puts each document's rows in one run "
        f"({o['doc_runs_in_key_order']} runs for {s['shape']['docs']} documents; anchor {o['anchor_bytes']} bytes).",
        f"Checks (labels vs raw shuffled, per row): `{json.dumps(d['checks'])}`.",
    ]
    lines += host_cpu_lines(d["runs"])
    if d["skipped"]:
        lines.append(f"Skipped to stay within the time budget: {', '.join(d['skipped'])}.")
    if d.get("note"):
        lines += ["", d["note"]]
    return "\n".join(lines) + "\n"
