"""The built-in load generator of bench_serve.py, and the summary of turbo-batch serve's timing trace.

`run_load` sends streaming /v1/completions requests (random token-id prompts of `input_len` tokens,
`ignore_eos`, `max_tokens=output_len`, `stream_options.include_usage`) with at most `concurrency` in
flight, and records per request what `vllm bench serve` records: TTFT (first chunk with choices), the
gaps between later chunks (ITL), the end-to-end latency and the completion tokens from usage.
`summarize` turns that into vllm bench's metric names. `trace_summary` reads the JSONL trace that the
ingress writes when TURBO_BATCH_TRACE names a file (turbo_batch/serve/ingress.py) and gives the median
of each stage. Nothing here starts servers (bench_serve.py does).
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any


def pct(xs: list[float], q: float) -> float | None:
    xs = sorted(xs)
    if not xs:
        return None
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def run_load(
    base: str,
    model: str,
    input_len: int,
    output_len: int,
    prompts: int,
    concurrency: int,
    *,
    key: str | None = None,
    vocab: tuple[int, int] = (16, 500),
    seed: int = 0,
) -> tuple[list[dict[str, Any]], float]:
    import httpx

    rng = random.Random(seed)
    bodies = [
        {
            "model": model,
            "prompt": [rng.randrange(*vocab) for _ in range(input_len)],
            "max_tokens": output_len,
            "temperature": 0.0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        for _ in range(prompts)
    ]
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=600, limits=limits) as http:

        async def one(body: dict[str, Any]) -> dict[str, Any]:
            async with sem:
                rec: dict[str, Any] = {"ok": False, "itl": [], "ttft": None, "tokens": 0, "chunks": 0}
                t0 = last = time.perf_counter()
                try:
                    async with http.stream("POST", "/v1/completions", json=body) as r:
                        if r.status_code != 200:
                            rec["error"] = f"{r.status_code} {(await r.aread())[:200]!r}"
                            return rec
                        async for line in r.aiter_lines():
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                continue
                            data = json.loads(line[6:])
                            if data.get("choices"):
                                now = time.perf_counter()
                                if rec["ttft"] is None:
                                    rec["ttft"] = now - t0
                                else:
                                    rec["itl"].append(now - last)
                                last = now
                                rec["chunks"] += 1
                            elif data.get("usage"):
                                rec["tokens"] = data["usage"]["completion_tokens"]
                            elif data.get("error"):
                                rec["error"] = data["error"].get("message")
                    rec["latency"] = time.perf_counter() - t0
                    rec["ok"] = rec["ttft"] is not None and "error" not in rec
                except Exception as e:
                    rec["error"] = f"{type(e).__name__}: {e}"
                return rec

        t0 = time.perf_counter()
        recs = await asyncio.gather(*(one(b) for b in bodies))
        return list(recs), time.perf_counter() - t0


def summarize(recs: list[dict[str, Any]], took: float) -> dict[str, Any]:
    ok = [r for r in recs if r["ok"]]
    ms = 1000.0
    ttft = [r["ttft"] * ms for r in ok]
    itl = [x * ms for r in ok for x in r["itl"]]
    tpot = [(r["latency"] - r["ttft"]) * ms / (r["tokens"] - 1) for r in ok if r["tokens"] > 1]
    errors = [r.get("error") for r in recs if not r["ok"]]

    def rnd(x: float | None) -> float | None:
        return None if x is None else round(x, 2)

    return {
        "completed": len(ok),
        "failed": len(recs) - len(ok),
        "first_error": errors[0] if errors else None,
        "duration_s": round(took, 2),
        "req_s": round(len(ok) / took, 3),
        "output_tok_s": round(sum(r["tokens"] for r in ok) / took, 1),
        "median_ttft_ms": rnd(pct(ttft, 0.5)),
        "p99_ttft_ms": rnd(pct(ttft, 0.99)),
        "median_itl_ms": rnd(pct(itl, 0.5)),
        "p99_itl_ms": rnd(pct(itl, 0.99)),
        "mean_itl_ms": rnd(statistics.fmean(itl)) if itl else None,
        "median_tpot_ms": rnd(pct(tpot, 0.5)),
        "tokens_per_chunk": round(sum(r["tokens"] for r in ok) / max(sum(r["chunks"] for r in ok), 1), 2),
    }


def trace_summary(path: Path) -> dict[str, float] | None:
    """Median milliseconds of each traced stage (keys as the ingress writes them), plus the serving
    process's event loop (loopwatch.py rows): lag percentiles and garbage-collection pauses."""
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except OSError:
        return None
    loops = [r for r in rows if r.get("kind") == "loop"]
    rows = [r for r in rows if r.get("kind") != "loop"]
    if not rows:
        return None
    keys = sorted({k for r in rows for k in r if k.endswith("_ms")})
    out = {k: round(pct([r[k] for r in rows if k in r], 0.5) or 0.0, 2) for k in keys}
    out["requests"] = len(rows)
    if loops:
        window = sum(r["window_s"] for r in loops) or 1.0
        out["loop_lag_p50_ms"] = round(pct([r["loop_lag_p50_ms"] for r in loops], 0.5) or 0.0, 2)
        out["loop_lag_p99_ms"] = round(max(r["loop_lag_p99_ms"] for r in loops), 2)
        out["loop_lag_max_ms"] = round(max(r["loop_lag_max_ms"] for r in loops), 2)
        out["gc_pause_share"] = round(sum(r["gc_pause_total_ms"] for r in loops) / 1000.0 / window, 4)
        out["gc_pause_max_ms"] = round(max(r["gc_pause_max_ms"] for r in loops), 2)
        out["gc_oldest_n"] = sum(r["gc_oldest_n"] for r in loops)
        out["gc_frozen"] = max(r["gc_frozen"] for r in loops)
        stalls: dict[str, int] = {}
        for r in loops:
            for stack, n in r.get("stall_stacks", []):
                stalls[stack] = stalls.get(stack, 0) + n
        out["stall_samples"] = sum(r.get("stall_samples", 0) for r in loops)
        out["stall_stacks"] = sorted(stalls.items(), key=lambda kv: -kv[1])[:6]
    return out
