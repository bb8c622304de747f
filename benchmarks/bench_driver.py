"""The driver's own ceiling: dispatch + parse-free accept + commit of pre-rendered rows, fake engines.

Issue 11 (point 4) and issue 14: how many rows/s can ONE driver process feed to engines, leaving the
engines and Ray Data out? Pre-rendered blocks (~1K token ids per row, like the GPU benchmark's rows)
go through the real `Driver.consume` → `ResultBuffer` → `OutputDir.commit` (real parquet parts,
fsync, manifest) with N fake engines that answer instantly (an `asyncio.sleep(0)` then one result
per row, the shape `Engine.run_rows` returns). The rows/s measured is the most one driver can
dispatch and commit; `time.process_time()` gives its CPU seconds, so rows/s per core is reported too.

    python benchmarks/bench_driver.py --rows 50000 --engines 1 8 100 --json benchmarks/results/driver_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from turbo_batch.batch.driver import Driver  # noqa: E402
from turbo_batch.batch.plan import Plan  # noqa: E402
from turbo_batch.batch.pool import Slot  # noqa: E402
from turbo_batch.batch.write import OutputDir  # noqa: E402
from turbo_batch.spec import JobSpec  # noqa: E402

LABELS = ["business", "politics", "sports", "technology"]


class FakePool:
    """N engines that answer at once with a classify result per row (no Ray, no vLLM)."""

    def __init__(self, n: int, capacity: int):
        self.slots = [Slot(f"fake-{i}", self._call, {"max_model_len": 4096}, capacity) for i in range(n)]
        self.start_s = 0.0

    async def _call(self, rows, task, sampling, priority, tag):
        await asyncio.sleep(0)
        p = 1.0 / len(LABELS)
        return [
            {
                "row_id": r["row_id"],
                "label": LABELS[r["row_id"] % len(LABELS)],
                "probs": dict.fromkeys(LABELS, p),
                "prompt_tokens": len(r["prompt_ids"]),
                "output_tokens": 1,
            }
            for r in rows
        ]

    async def close(self, force: bool = False) -> None:
        pass


def rendered_blocks(rows: int, tokens: int, block_rows: int) -> list[pa.Table]:
    ids = list(range(1000, 1000 + tokens))
    blocks = []
    for start in range(0, rows, block_rows):
        n = min(block_rows, rows - start)
        blocks.append(
            pa.table(
                {
                    "row_id": pa.array(range(start, start + n), pa.int64()),
                    "prompt_ids": pa.array([ids] * n, pa.list_(pa.int32())),
                    "label_ids": pa.array([[1, 2, 3, 4]] * n, pa.list_(pa.int32())),
                    "budget": pa.array([1] * n, pa.int32()),
                    "prompt_tokens": pa.array([tokens] * n, pa.int32()),
                    "error_code": pa.array([None] * n, pa.string()),
                    "error_message": pa.array([None] * n, pa.string()),
                }
            )
        )
    return blocks


async def run_once(engines: int, rows: int, tokens: int, workdir: Path) -> dict[str, Any]:
    job = JobSpec.model_validate(
        {
            "name": "driver-bench",
            "input": {"path": "unused"},
            "task": {"type": "classify", "labels": LABELS},
            "model": {"path": "unused"},
            "output": {"dir": str(workdir / f"out-{engines}"), "part_rows": 10_000},
            "cluster": {"batch_rows": 32},
        }
    )
    out = OutputDir(workdir / f"out-{engines}", "bench", {}).open(restart=True)
    plan = Plan(job, [], [], [], [], workdir, rows, "bench")
    blocks = rendered_blocks(rows, tokens, 4096)
    queue: asyncio.Queue = asyncio.Queue()
    for b in blocks:
        queue.put_nowait(b)
    queue.put_nowait(None)
    driver = Driver(job, plan, FakePool(engines, 256), out)
    cpu0, t0 = time.process_time(), time.perf_counter()
    await driver.consume(queue)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    assert out.committed_rows == rows, (out.committed_rows, rows)
    return {
        "engines": engines,
        "rows": rows,
        "prompt_tokens": tokens,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "rows_s": round(rows / wall, 1),
        "rows_per_cpu_s": round(rows / cpu, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--tokens", type=int, default=1024, help="prompt token ids per row")
    ap.add_argument("--engines", type=int, nargs="+", default=[1, 8, 100])
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = [asyncio.run(run_once(n, args.rows, args.tokens, Path(tmp))) for n in args.engines]
    for r in results:
        print(json.dumps(r))
    if args.json:
        data = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "machine": {"host": platform.node(), "cpus": os.cpu_count(), "load_avg": os.getloadavg()},
            "what": "Driver.consume + ResultBuffer + OutputDir.commit with instant fake engines "
            "(pre-rendered rows; no Ray Data, no vLLM): the most one driver process dispatches and commits",
            "results": results,
        }
        args.json.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
