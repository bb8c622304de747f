"""Charts of the HTML report: matplotlib (Agg, no display) figures as base64 PNG data URIs.

Each function takes plain data (lists, dicts, numpy arrays) and returns a `data:image/png;base64,...`
string, or None when there is nothing to draw, so the page never shows an empty frame. Owns nothing
on disk and reads no files: html_report.py gathers the data and lays the page out.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

W, H = 6.4, 3.4  # inches at 110 dpi: ~700 px wide, sharp on a laptop, scales down on a phone
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def _fig(h: float = H):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(W, h), dpi=110)
    ax.spines[["top", "right"]].set_visible(False)
    return fig, ax


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def throughput(series: Mapping[str, Mapping[str, np.ndarray]]) -> str | None:
    """rows/s (top) and tokens/s (bottom) over time, one line per engine.

    `series[engine]` holds arrays t (minutes since the job's first start), rows_s, tok_s."""
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(2, 1, figsize=(W, H * 1.5), dpi=110, sharex=True)
    for i, (eng, s) in enumerate(sorted(series.items())):
        c = COLORS[i % len(COLORS)]
        a1.plot(s["t"], s["rows_s"], color=c, lw=1.6, label=eng, drawstyle="steps-post")
        a2.plot(s["t"], s["tok_s"], color=c, lw=1.6, label=eng, drawstyle="steps-post")
    a1.set_ylabel("rows/s")
    a2.set_ylabel("tokens/s (in + out)")
    a2.set_xlabel("minutes since the job started")
    a1.legend(fontsize=8, loc="best")
    for a in (a1, a2):
        a.spines[["top", "right"]].set_visible(False)
        a.grid(alpha=0.3)
        a.set_ylim(bottom=0)
    return _png(fig)


def bars(counts: Mapping[str, float], xlabel: str, color: str = COLORS[0], top: int = 20) -> str | None:
    """Horizontal bars, largest first (engine shares, error codes, label mix, finish reasons)."""
    items = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
    if not items:
        return None
    fig, ax = _fig(max(1.6, 0.45 * len(items) + 0.9))
    names = [str(k) for k, _ in items][::-1]
    vals = [v for _, v in items][::-1]
    ax.barh(names, vals, color=color)
    total = sum(counts.values())
    for y, v in enumerate(vals):
        ax.text(v, y, f" {v:,.0f} ({v / total:.0%})", va="center", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_xlim(0, max(vals) * 1.3)
    return _png(fig)


def histogram(values: Sequence[float] | np.ndarray, xlabel: str, color: str = COLORS[0]) -> str | None:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return None
    fig, ax = _fig()
    bins = min(40, max(5, int(np.sqrt(v.size))))
    ax.hist(v, bins=bins, color=color, edgecolor="white")
    ax.axvline(np.median(v), color="#333", ls="--", lw=1)
    ax.text(np.median(v), ax.get_ylim()[1] * 0.95, f" median {np.median(v):,.0f}", fontsize=8, va="top")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("rows")
    return _png(fig)


def per_label(metrics: Mapping[str, Mapping[str, float]]) -> str | None:
    """Grouped bars: precision, recall and F1 of each label."""
    if not metrics:
        return None
    labels = list(metrics)
    fig, ax = _fig()
    x = np.arange(len(labels))
    for i, key in enumerate(("precision", "recall", "f1")):
        ax.bar(x + (i - 1) * 0.27, [metrics[lab][key] for lab in labels], 0.27, label=key, color=COLORS[i])
    ax.set_xticks(
        x, labels, rotation=30 if len(labels) > 4 else 0, ha="right" if len(labels) > 4 else "center"
    )
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8, ncols=3, loc="upper center", bbox_to_anchor=(0.5, 1.15), frameon=False)
    return _png(fig)


def confusion(labels: Sequence[str], matrix: Sequence[Sequence[int]]) -> str | None:
    """Heatmap, rows gold and columns predicted, each cell with its count."""
    m = np.asarray(matrix, dtype=float)
    if m.size == 0 or m.sum() == 0:
        return None
    n = len(labels)
    fig, ax = _fig(min(6.0, 1.6 + 0.5 * n))
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(n), labels, rotation=30 if n > 4 else 0, ha="right" if n > 4 else "center")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    hi = m.max()
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", fontsize=9,
                    color="white" if m[i, j] > hi / 2 else "black")  # fmt: skip
    return _png(fig)


def reliability(confidence: np.ndarray, correct: np.ndarray, bins: int = 10) -> str | None:
    """Accuracy of the rows in each confidence bin against the diagonal (perfect calibration)."""
    conf = np.asarray(confidence, dtype=float)
    ok = np.asarray(correct, dtype=float)
    if conf.size == 0:
        return None
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(conf, edges) - 1, 0, bins - 1)
    fig, ax = _fig(H * 1.1)
    centers, accs, sizes = [], [], []
    for b in range(bins):
        sel = idx == b
        if sel.any():
            centers.append(conf[sel].mean())
            accs.append(ok[sel].mean())
            sizes.append(int(sel.sum()))
    ax.plot([0, 1], [0, 1], color="#999", ls="--", lw=1, label="perfectly calibrated")
    ax.plot(centers, accs, marker="o", color=COLORS[3], label="this job")
    for x, y, n in zip(centers, accs, sizes, strict=True):
        ax.annotate(f"{n}", (x, y), textcoords="offset points", xytext=(0, 6), fontsize=7, ha="center")
    ece = sum(n * abs(a - c) for c, a, n in zip(centers, accs, sizes, strict=True)) / conf.size
    ax.set_title(f"expected calibration error {ece:.3f} (numbers: rows per bin)", fontsize=9)
    ax.set_xlabel("probability of the predicted label")
    ax.set_ylabel("fraction right")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8, loc="upper left")
    return _png(fig)


def label_mix(
    predicted: Mapping[str, int], gold: Mapping[str, int] | None, labels: Sequence[str]
) -> str | None:
    """Predicted label counts, next to the gold counts when the job has gold labels."""
    if not predicted:
        return None
    fig, ax = _fig()
    x = np.arange(len(labels))
    wid = 0.4 if gold else 0.7
    ax.bar(x - (wid / 2 if gold else 0), [predicted.get(lab, 0) for lab in labels], wid, label="predicted")
    if gold:
        ax.bar(x + wid / 2, [gold.get(lab, 0) for lab in labels], wid, label="gold", color=COLORS[1])
        ax.legend(fontsize=8)
    ax.set_xticks(
        x, labels, rotation=30 if len(labels) > 4 else 0, ha="right" if len(labels) > 4 else "center"
    )
    ax.set_ylabel("rows")
    return _png(fig)


def as_series(lines: Sequence[Mapping[str, Any]], points: int = 150) -> dict[str, dict[str, np.ndarray]]:
    """Timeline 'rows' lines → per-engine rates on a common grid of at most `points` buckets."""
    rows = [x for x in lines if x.get("kind") == "rows"]
    if not rows:
        return {}
    starts = [x["t"] for x in lines]
    t0 = min(starts)
    t1 = max(x["t"] + x.get("w", 1) for x in rows)
    width = max(max(x.get("w", 1) for x in rows), (t1 - t0) / points, 1.0)
    n = int(np.ceil((t1 - t0) / width)) or 1
    out: dict[str, dict[str, np.ndarray]] = {}
    for x in rows:
        s = out.setdefault(x["engine"], {"rows": np.zeros(n), "tok": np.zeros(n)})
        i = min(int((x["t"] - t0) // width), n - 1)
        s["rows"][i] += x["rows"]
        s["tok"][i] += x["prompt_tokens"] + x["output_tokens"]
    # Engines answer in batches, so 1 s buckets alternate bursts and zeros: average each series over the
    # typical gap between replies (the median distance between non-empty buckets).
    busy = np.flatnonzero(sum(v["rows"] for v in out.values()))
    k = int(np.median(np.diff(busy))) if busy.size > 2 else 1
    if k > 1:
        for v in out.values():
            for key in ("rows", "tok"):
                v[key] = np.convolve(v[key], np.ones(k) / k, mode="same")
    grid = np.arange(n + 1) * width / 60.0  # bucket edges: the last step is drawn to its end
    return {
        ("no engine (error rows)" if e == "none" else e): {
            "t": grid,
            "rows_s": np.append(s["rows"], s["rows"][-1]) / width,
            "tok_s": np.append(s["tok"], s["tok"][-1]) / width,
        }
        for e, s in out.items()
        if e != "none" or s["rows"].sum()
    }
