"""The HTML report of an output dir: `_report.html`, one self-contained page (charts inline as PNG).

Owns `_report.html`: `collect()` reads what a dir holds — `_job.json`, the committed parts (through the
manifest, so a running or crashed dir shows what is committed so far), `_timeline.jsonl` and
`_summary.json` if there is one — and `render()` lays it out for a laptop or a phone; `write_report()`
writes it atomically and never fails the job (a report is a picture, not output). It is called at the
end of every run (run.py) and by `turbo-batch report OUT_DIR`. Must not touch: parts, the manifest,
the summary or the markers (write.py owns them); nothing here imports Ray or vLLM.
"""

from __future__ import annotations

import html
import json
import logging
import os
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from turbo_batch.batch import charts, report
from turbo_batch.batch.timeline import read_timeline

log = logging.getLogger("turbo_batch")
REPORT = "_report.html"
COLUMNS = (
    "row_id",
    "label",
    "probs",
    "finish_reason",
    "prompt_tokens",
    "output_tokens",
    "error_code",
    "engine",
)


@dataclass
class DirData:
    path: Path
    job: dict[str, Any]
    rows: dict[str, list[Any]]  # column → values over the committed rows
    timeline: list[dict[str, Any]]
    summary: dict[str, Any] | None
    complete: bool
    gold: str | None = None
    labels: list[str] = field(default_factory=list)


def collect(
    out_dir: Path | str, summary: dict[str, Any] | None = None, complete: bool | None = None
) -> DirData:
    """What the dir holds; `complete` (the run's own verdict, before `_SUCCESS` is written) overrides
    the check for `_SUCCESS`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(out_dir)
    job_file = path / "_job.json"
    if not job_file.is_file():
        raise FileNotFoundError(f"{path} is not a turbo-batch output dir (no _job.json)")
    job = json.loads(job_file.read_text()).get("job") or {}
    task = job.get("task") or {}
    gold = task.get("gold_column")
    result_cols = {"label", "probs", "text", "json", "finish_reason", "row_id"}
    gold_out = (f"input_{gold}" if gold in result_cols | set(COLUMNS) else gold) if gold else None
    manifest = path / "_manifest.jsonl"
    parts = []
    if manifest.is_file():
        for line in manifest.read_text().splitlines():
            try:
                parts.append(json.loads(line)["part"])
            except (ValueError, KeyError):
                continue  # a torn last line: that part is adopted by the next run
    tables = []
    want = [*COLUMNS, *([gold_out] if gold_out else [])]
    for name in parts:
        if (path / name).is_file():
            pf = pq.ParquetFile(path / name)
            tables.append(pf.read(columns=[c for c in want if c in pf.schema_arrow.names]))
    table = pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})
    rows = {c: table.column(c).to_pylist() for c in table.column_names}
    if summary is None and (path / "_summary.json").is_file():
        try:
            summary = json.loads((path / "_summary.json").read_text())
        except ValueError:
            summary = None
    return DirData(
        path=path,
        job=job,
        rows=rows,
        timeline=read_timeline(path),
        summary=summary,
        complete=(path / "_SUCCESS").is_file() if complete is None else complete,
        gold=gold_out,
        labels=list(task.get("labels") or []),
    )


def dir_numbers(d: DirData) -> dict[str, Any]:
    """Numbers over every committed row and every recorded run (a summary covers one run only)."""
    task = d.job.get("task") or {}
    stats = report.Stats(d.labels, d.gold, task.get("gold_map"))
    cols = list(d.rows)
    n = len(d.rows.get("row_id", []))
    for i in range(n):
        stats.add({c: d.rows[c][i] for c in cols})
    starts = [x for x in d.timeline if x["kind"] == "start"]
    buckets = [x for x in d.timeline if x["kind"] == "rows"]
    prices = {**(d.job.get("report") or {}).get("gpu_hour_usd", {})} or report_defaults()
    wall = start_s = 0.0
    engines: list[dict[str, Any]] = []
    cost_total: dict[str, float] = Counter()
    for s in starts:
        mine = [b for b in buckets if b["run"] == s["run"]]
        run_wall = max((b["t"] + b.get("w", 1) for b in mine), default=s["t"]) - s["t"]
        c = report.cost(
            s["engines"], wall_s=max(run_wall, 0), engine_start_s=s["engine_start_s"], rows=1, prompt_tokens=1, prices=prices
        )  # fmt: skip
        for k in ("run_usd", "engine_start_usd", "total_usd"):
            cost_total[k] += c.get(k) or 0.0
        wall += max(run_wall, 0)
        start_s += s["engine_start_s"]
        engines = s["engines"]
    out: dict[str, Any] = {
        "rows": stats.rows,
        "ok": stats.ok,
        "errors": dict(stats.errors),
        "prompt_tokens": stats.prompt_tokens,
        "output_tokens": stats.output_tokens,
        "runs": len(starts),
        "wall_s": wall,
        "engine_start_s": start_s,
        "engines": engines,
        "label_counts": dict(stats.label_counts),
    }
    if starts and cost_total.get("total_usd") is not None and engines:
        rows, toks = stats.rows, stats.prompt_tokens
        total, run = cost_total["total_usd"], cost_total["run_usd"]
        out["cost"] = {
            "total_usd": round(total, 6),
            "engine_start_usd": round(cost_total["engine_start_usd"], 6),
            "usd_per_1m_rows": round(total / rows * 1e6, 4) if rows else None,
            "usd_per_1m_rows_excl_start": round(run / rows * 1e6, 4) if rows else None,
            "usd_per_1m_input_tokens": round(total / toks * 1e6, 4) if toks else None,
            "gpu_types": dict(Counter(report.gpu_type(e) for e in engines)),
        }
    if d.gold:
        out["evaluation"] = report.evaluate(d.labels, stats.pairs)
    return out


def report_defaults() -> dict[str, float]:
    from turbo_batch.spec import DEFAULT_GPU_HOUR_USD

    return dict(DEFAULT_GPU_HOUR_USD)


def _figures(d: DirData, nums: dict[str, Any]) -> list[tuple[str, str | None, str]]:
    """(title, data URI or None, note) for every chart of this job's kind."""
    r = d.rows
    figs: list[tuple[str, str | None, str]] = [
        ("Throughput over time, per engine", charts.throughput(charts.as_series(d.timeline)),
         "from _timeline.jsonl (counted as engines return rows, written at each commit)"),
        ("Each engine's share of rows", charts.bars(Counter(e for e in r.get("engine", []) if e), "rows"),
         "rows that never reached an engine (render errors) are not counted"),
        ("Error rows by code", charts.bars(nums["errors"], "rows", charts.COLORS[3]), "no error rows"
         if not nums["errors"] else "codes: see README, error codes"),
        ("Prompt length", charts.histogram([x for x in r.get("prompt_tokens", []) if x], "prompt tokens"), ""),
    ]  # fmt: skip
    kind = (d.job.get("task") or {}).get("type")
    if kind == "classify":
        ev = nums.get("evaluation") or {}
        gold_counts = None
        if ev.get("rows"):
            m = ev["confusion"]["matrix"]
            gold_counts = {lab: int(sum(m[i])) for i, lab in enumerate(ev["confusion"]["labels"])}
        figs.append(("Label mix", charts.label_mix(nums["label_counts"], gold_counts, d.labels), ""))
        if ev.get("rows"):
            figs.append(("Precision, recall and F1 per label", charts.per_label(ev["per_label"]),
                         f"accuracy {ev['accuracy']:.1%} on {ev['rows']} rows · majority class "
                         f"{ev['majority_rate']:.1%} · macro F1 {ev['macro_f1']:.3f}"))  # fmt: skip
            figs.append(
                (
                    "Confusion matrix",
                    charts.confusion(ev["confusion"]["labels"], m),
                    "rows gold, columns predicted",
                )
            )
        conf, right = _calibration(d)
        if right is not None:
            figs.append(("Reliability diagram", charts.reliability(conf, right),
                         "are rows given probability 0.9 right 90% of the time?"))  # fmt: skip
        else:
            figs.append(("Probability of the predicted label", charts.histogram(conf, "probability"),
                         "no gold labels: a reliability diagram needs task.gold_column"))  # fmt: skip
    elif kind in ("generate", "extract"):
        out_len = [
            x for x, e in zip(r.get("output_tokens", []), r.get("error_code", []), strict=False) if not e
        ]
        figs.append(("Output length", charts.histogram(out_len, "output tokens", charts.COLORS[2]), ""))
        reasons = Counter(x for x in r.get("finish_reason", []) if x)
        figs.append(
            ("Finish reasons", charts.bars(reasons, "rows", charts.COLORS[4]), "length: hit max_tokens")
        )
    return figs


def _calibration(d: DirData) -> tuple[np.ndarray, np.ndarray | None]:
    r = d.rows
    probs, labels = r.get("probs", []), r.get("label", [])
    gold = r.get(d.gold, []) if d.gold else []
    gmap = (d.job.get("task") or {}).get("gold_map") or {}
    conf, right = [], []
    for i, p in enumerate(probs):
        if not p or labels[i] is None:
            continue
        c = max(v for v in p.values() if v is not None)
        if d.gold:
            g = gold[i]
            g = gmap.get(str(g), g) if g is not None else None
            if g is None or str(g) not in d.labels:
                continue
            right.append(float(str(g) == labels[i]))
        conf.append(c)
    return np.asarray(conf), (np.asarray(right) if d.gold else None)


def _fmt_usd(x: float | None) -> str:
    return "–" if x is None else (f"${x:,.4f}" if x < 1 else f"${x:,.2f}")


def render(d: DirData) -> str:
    nums = dir_numbers(d)
    s = d.summary or {}
    name = d.job.get("name") or d.path.name
    status = (
        "complete"
        if d.complete
        else "incomplete: no _SUCCESS (running, stopped or crashed); committed rows only"
    )
    rate = nums["rows"] / nums["wall_s"] if nums["wall_s"] else None
    facts = [
        ("status", status),
        ("rows committed", f"{nums['rows']:,} ({nums['ok']:,} ok, {sum(nums['errors'].values()):,} errors)"),
        (
            "task · model",
            f"{(d.job.get('task') or {}).get('type')} · {(d.job.get('model') or {}).get('path')}",
        ),
        ("runs", f"{nums['runs']} (engine start {nums['engine_start_s']:.1f} s in all)"),
        ("time running rows", f"{nums['wall_s']:.1f} s" + (f" · {rate:,.2f} rows/s" if rate else "")),
        ("tokens", f"{nums['prompt_tokens']:,} in · {nums['output_tokens']:,} out"),
        ("engines", ", ".join(f"{e['name']} ({e.get('gpu')})" for e in nums["engines"]) or "–"),
    ]
    c = nums.get("cost")
    if c:
        facts += [
            ("cost", f"{_fmt_usd(c['total_usd'])} ({_fmt_usd(c['engine_start_usd'])} of it engine start) · "
             f"GPU types {c['gpu_types']}"),
            ("$ per 1M rows", f"{_fmt_usd(c['usd_per_1m_rows'])} ({_fmt_usd(c['usd_per_1m_rows_excl_start'])} "
             "without engine start)"),
            ("$ per 1M input tokens", _fmt_usd(c["usd_per_1m_input_tokens"])),
        ]  # fmt: skip
    if s.get("rows_per_s") is not None:
        facts.append(
            ("last run's summary", f"{s.get('rows_this_run', 0):,} rows at {s['rows_per_s']:.2f} rows/s")
        )
    loads = [x for x in (report.load_text(e) for e in s.get("engines") or []) if x]
    if loads:
        facts.append(("engine load, last run", " · ".join(loads)))
    table = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts)
    cards = []
    for title, uri, note in _figures(d, nums):
        body = (
            f'<img alt="{html.escape(title)}" src="{uri}">' if uri else '<p class="empty">nothing to draw</p>'
        )
        cap = f"<figcaption>{html.escape(note)}</figcaption>" if note else ""
        cards.append(f"<figure><h2>{html.escape(title)}</h2>{body}{cap}</figure>")
    return PAGE.format(
        title=html.escape(f"turbo-batch report: {name}"),
        name=html.escape(name),
        when=time.strftime("%Y-%m-%d %H:%M:%S"),
        path=html.escape(str(d.path)),
        table=table,
        cards="\n".join(cards),
    )


def write_report(
    out_dir: Path | str, summary: dict[str, Any] | None = None, complete: bool | None = None
) -> Path | None:
    """Write `_report.html` atomically; on any problem log it and return None (never fails a job)."""
    path = Path(out_dir) / REPORT
    try:
        page = render(collect(out_dir, summary, complete)).encode()
        tmp = path.with_name(f".{REPORT}.{uuid.uuid4().hex[:8]}")
        tmp.write_bytes(page)
        os.replace(tmp, path)
        return path
    except Exception as e:
        log.warning("report: could not write %s: %s: %s", path, type(e).__name__, e)
        return None


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; color: #222;
       background: #fff; }}
header, main {{ max-width: 1500px; margin: 0 auto; padding: 12px 16px; }}
h1 {{ font-size: 1.35em; margin: 0.3em 0; }} h2 {{ font-size: 1em; margin: 0 0 6px; }}
.meta {{ color: #666; font-size: 0.85em; overflow-wrap: anywhere; }}
table {{ border-collapse: collapse; width: 100%; max-width: 900px; }}
th, td {{ text-align: left; vertical-align: top; padding: 4px 8px; border-bottom: 1px solid #e4e4e4;
          overflow-wrap: anywhere; }}
th {{ width: 11em; color: #555; font-weight: 600; }}
.grid {{ display: grid; gap: 14px; grid-template-columns: repeat(auto-fill, minmax(min(100%, 560px), 1fr)); }}
figure {{ margin: 0; padding: 10px; border: 1px solid #e4e4e4; border-radius: 8px; }}
figure img {{ width: 100%; height: auto; display: block; }}
figcaption, .empty {{ color: #666; font-size: 0.85em; margin-top: 4px; }}
@media (max-width: 600px) {{ th {{ width: 7em; }} body {{ font-size: 14px; }} }}
</style></head>
<body><header><h1>{name}</h1>
<div class="meta">turbo-batch report · {path} · written {when}</div>
<table>{table}</table></header>
<main class="grid">
{cards}
</main></body></html>
"""
