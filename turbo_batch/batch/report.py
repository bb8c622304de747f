"""Job summary: throughput, token rates, error counts, label mix, and evaluation against gold labels.

`Stats` accumulates per-row results as they are committed (no second pass over the output);
`summary()` turns it into the JSON written beside the output and the table printed at the end.
Evaluation (accuracy, majority-class rate, per-label precision/recall/F1, confusion matrix) is
computed when a classify job names a gold column. `cost()` prices a run from each engine's GPU type
(`report.gpu_hour_usd`): $ per 1M rows and per 1M input tokens, with engine start shown apart.
The HTML report lives in html_report.py and charts.py. Nothing here imports Ray or vLLM.
"""

from __future__ import annotations

import platform
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any


class Stats:
    def __init__(
        self,
        labels: Sequence[str] = (),
        gold_column: str | None = None,
        gold_map: Mapping[str, str] | None = None,
    ):
        self.labels = list(labels)
        self.gold_column = gold_column
        self.gold_map = dict(gold_map or {})
        self.ok = 0
        self.errors: Counter[str] = Counter()
        self.prompt_tokens = 0
        self.output_tokens = 0
        self.label_counts: Counter[str] = Counter()
        self.pairs: Counter[tuple[str, str]] = Counter()  # (gold, predicted)
        self.gold_unknown = 0
        self.t0 = time.monotonic()

    def add(self, row: Mapping[str, Any]) -> None:
        self.prompt_tokens += int(row.get("prompt_tokens") or 0)
        self.output_tokens += int(row.get("output_tokens") or 0)
        if row.get("error_code"):
            self.errors[row["error_code"]] += 1
            return
        self.ok += 1
        label = row.get("label")
        if label is None:
            return
        self.label_counts[label] += 1
        if self.gold_column:
            gold = row.get(self.gold_column)
            gold = self.gold_map.get(str(gold), gold) if gold is not None else None
            if gold is None or str(gold) not in self.labels:
                self.gold_unknown += 1
            else:
                self.pairs[(str(gold), label)] += 1

    @property
    def rows(self) -> int:
        return self.ok + sum(self.errors.values())


def evaluate(labels: Sequence[str], pairs: Mapping[tuple[str, str], int]) -> dict[str, Any]:
    """Accuracy, majority-class rate, per-label precision/recall/F1 and the confusion matrix."""
    n = sum(pairs.values())
    if n == 0:
        return {"rows": 0}
    gold_counts = Counter()
    pred_counts = Counter()
    for (g, p), c in pairs.items():
        gold_counts[g] += c
        pred_counts[p] += c
    correct = sum(c for (g, p), c in pairs.items() if g == p)
    per_label = {}
    for lab in labels:
        tp = pairs.get((lab, lab), 0)
        precision = tp / pred_counts[lab] if pred_counts[lab] else 0.0
        recall = tp / gold_counts[lab] if gold_counts[lab] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_label[lab] = {
            "precision": round(precision, 4),
            "recall": round(recall, 4),
            "f1": round(f1, 4),
            "support": gold_counts[lab],
        }
    majority_label, majority_n = gold_counts.most_common(1)[0]
    return {
        "rows": n,
        "accuracy": round(correct / n, 4),
        "majority_label": majority_label,
        "majority_rate": round(majority_n / n, 4),
        "macro_f1": round(sum(v["f1"] for v in per_label.values()) / len(labels), 4),
        "per_label": per_label,
        "confusion": {
            "labels": list(labels),
            "matrix": [[pairs.get((g, p), 0) for p in labels] for g in labels],
        },  # rows gold, cols predicted
    }


def gpu_type(info: Mapping[str, Any]) -> str:
    """The price key of an engine: its GPU profile (rtx-5090, h200, ...), or cpu."""
    if info.get("gpu"):
        return str(info["gpu"])
    device = info.get("device") or {}
    if device.get("kind") == "cpu":
        return "cpu"
    return str(device.get("profile") or device.get("name") or "unknown").lower()


def engine_rows(slots: Sequence[Any], with_rows: bool = True) -> list[dict[str, Any]]:
    """Name, GPU type, device and count of each engine slot (a Serve slot counts its replicas)."""
    out = []
    for s in slots:
        e = {
            "name": s.name,
            "gpu": gpu_type(s.info),
            "device": (s.info.get("device") or {}).get("name"),
            "gpus": int(s.info.get("replicas") or 1),
        }
        if with_rows:
            e["rows"] = s.done
        out.append(e)
    return out


def cost(
    engines: Sequence[Mapping[str, Any]],
    *,
    wall_s: float,
    engine_start_s: float,
    rows: int,
    prompt_tokens: int,
    prices: Mapping[str, float],
) -> dict[str, Any]:
    """What the run cost at `prices` (USD per GPU-hour by GPU type), per 1M rows and input tokens.

    Engines are paid while they start (`engine_start_usd`) and while they run rows (`run_usd`);
    the per-1M figures are given with and without the start."""
    types = Counter()
    for e in engines:
        types[gpu_type(e)] += int(e.get("gpus") or 1)
    unknown = sorted(t for t in types if t not in prices)
    if unknown or not types:
        return {
            "gpu_types": dict(types),
            "note": f"no price for {unknown or 'no engines'}: set report.gpu_hour_usd",
        }
    hourly = sum(prices[t] * n for t, n in types.items())
    run_usd, start_usd = hourly * wall_s / 3600, hourly * engine_start_s / 3600

    def per_million(usd: float, n: int) -> float | None:
        return round(usd / n * 1e6, 4) if n else None

    return {
        "gpu_types": dict(types),
        "usd_per_hour": round(hourly, 4),
        "run_usd": round(run_usd, 6),
        "engine_start_usd": round(start_usd, 6),
        "total_usd": round(run_usd + start_usd, 6),
        "usd_per_1m_rows": per_million(run_usd + start_usd, rows),
        "usd_per_1m_rows_excl_start": per_million(run_usd, rows),
        "usd_per_1m_input_tokens": per_million(run_usd + start_usd, prompt_tokens),
        "usd_per_1m_input_tokens_excl_start": per_million(run_usd, prompt_tokens),
    }


def summary(
    stats: Stats,
    *,
    wall_s: float,
    engine_start_s: float,
    skipped: int,
    engines: list[dict[str, Any]],
    job_name: str | None,
    output_dir: str,
    prices: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    rows = stats.rows
    out: dict[str, Any] = {
        "job": job_name,
        "output_dir": output_dir,
        "rows_total": rows + skipped,
        "rows_this_run": rows,
        "rows_ok": stats.ok,
        "rows_error": sum(stats.errors.values()),
        "rows_skipped_already_committed": skipped,
        "errors_by_code": dict(stats.errors),
        "wall_s": round(wall_s, 3),
        "engine_start_s": round(engine_start_s, 3),
        "rows_per_s": round(rows / wall_s, 3) if wall_s > 0 else None,
        "prompt_tokens": stats.prompt_tokens,
        "output_tokens": stats.output_tokens,
        "prompt_tok_per_s": round(stats.prompt_tokens / wall_s, 1) if wall_s > 0 else None,
        "output_tok_per_s": round(stats.output_tokens / wall_s, 1) if wall_s > 0 else None,
        "engines": engines,
        "host": platform.node(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if prices is not None:
        out["cost"] = cost(
            engines,
            wall_s=wall_s,
            engine_start_s=engine_start_s,
            rows=rows,
            prompt_tokens=stats.prompt_tokens,
            prices=prices,
        )
    if stats.label_counts:
        out["label_counts"] = dict(stats.label_counts)
    if stats.gold_column:
        out["evaluation"] = evaluate(stats.labels, stats.pairs)
        out["evaluation"]["gold_not_a_label"] = stats.gold_unknown
        out["evaluation"]["note"] = "this run's rows only" if skipped else "all rows"
    return out


def load_text(engine: Mapping[str, Any]) -> str | None:
    """One engine's scheduler load over the run (engine/load.py), in a few words; None without one."""
    w = engine.get("load")
    if not w:
        return None
    return (
        f"{engine.get('name')} {w['running_mean']:g} of {w['max_num_seqs']} sequences running, "
        f"{w['waiting_mean']:g} waiting; {w['starved_steps_pct']:g}% of steps with free seats and none waiting"
    )


def render_text(s: Mapping[str, Any]) -> str:
    lines = [
        f"rows: {s['rows_ok']} ok, {s['rows_error']} errored"
        + (
            f", {s['rows_skipped_already_committed']} already committed (skipped)"
            if s["rows_skipped_already_committed"]
            else ""
        ),
        f"wall: {s['wall_s']:.1f} s (+ {s['engine_start_s']:.1f} s engine start) · {s['rows_per_s'] or 0:.2f} rows/s · "
        f"{s['prompt_tok_per_s'] or 0:.0f} prompt tok/s · {s['output_tok_per_s'] or 0:.0f} output tok/s",
    ]
    c = s.get("cost") or {}
    if c.get("usd_per_1m_rows") is not None:
        lines.append(
            f"cost: ${c['total_usd']:.4f} (${c['engine_start_usd']:.4f} of it engine start) at "
            f"${c['usd_per_hour']:.2f}/h · ${c['usd_per_1m_rows']:.2f} per 1M rows "
            f"(${c['usd_per_1m_rows_excl_start']:.2f} without start) · "
            f"${c['usd_per_1m_input_tokens'] or 0:.3f} per 1M input tokens"
        )
    loads = [load_text(e) for e in s.get("engines") or []]
    if any(loads):
        lines.append("engine load: " + " · ".join(x for x in loads if x))
    if s["errors_by_code"]:
        lines.append("errors: " + ", ".join(f"{k}={v}" for k, v in sorted(s["errors_by_code"].items())))
    ev = s.get("evaluation")
    if ev and ev.get("rows"):
        lines.append(
            f"accuracy: {ev['accuracy']:.1%} on {ev['rows']} rows (majority class '{ev['majority_label']}': "
            f"{ev['majority_rate']:.1%}) · macro F1 {ev['macro_f1']:.3f}"
        )
        for lab, m in ev["per_label"].items():
            lines.append(
                f"  {lab:>12}: precision {m['precision']:.3f} recall {m['recall']:.3f} (n={m['support']})"
            )
        labs = ev["confusion"]["labels"]
        lines.append("  confusion (rows gold, cols predicted): " + " ".join(labs))
        for lab, row in zip(labs, ev["confusion"]["matrix"], strict=True):
            lines.append(f"  {lab:>12}: " + " ".join(f"{v:>6}" for v in row))
    return "\n".join(lines)
