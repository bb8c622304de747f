"""The render stage's own CPU per row: `render_block` in one process, no Ray, checkouts side by side.

Issue 11 point 4: render tasks are the largest host cost outside the engines (hostcpu_cpu.md), and
in a job their CPU mixes with worker start-up (imports, tokenizer load) and with the engines' load.
This times the per-row work alone: for each `--code LABEL=DIR` (a checkout; its turbo_batch is the
one imported) and each tokenizer, a child process renders the same rows (`bench_batch.py`'s synthetic
~1K-token rows, the cpu-tiny-1k prompt: 4 labels, one-pass classification, chat template) as one
block, --repeat times after a warm-up, and reports the least CPU time (process time: every thread);
every checkout's block must equal the first one's, column by column. TOKENIZERS_PARALLELISM is set
as a render task sets it since fb4296e (false), for every checkout alike.
Writes render_cpu.{json,md} (--name: another). Owns nothing of turbo_batch.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "benchmarks")]
from bench_widehost import git_head  # noqa: E402

LABELS = ["business", "politics", "sports", "technology"]
SYSTEM = (
    "Classify the news text into one of: business, politics, sports, technology. Answer with the label only."
)

CHILD = r"""
import json, sys, time
import pyarrow as pa, pyarrow.parquet as pq
import turbo_batch
from turbo_batch.batch.render import render_block
from turbo_batch.prompt import PromptConfig
a = json.loads(sys.argv[1])
assert turbo_batch.__file__.startswith(a["code"]), turbo_batch.__file__
rows = pq.read_table(a["rows"])
cfg = PromptConfig(task={"type": "classify", "labels": a["labels"], "label_descriptions": {}},
                   text_columns=("text",), template="{{ text }}", system=a["system"])
kw = dict(cfg=cfg, tokenizer_path=a["tok"], trust_remote_code=False, passthrough=["id"])
render_block(rows.slice(0, 16), **kw)  # tokenizer load and first calls: not timed
cpu = []
for _ in range(a["repeat"]):
    c0 = time.process_time()
    out = render_block(rows, **kw)
    cpu.append(time.process_time() - c0)
pq.write_table(out, a["out"])
print(json.dumps({"cpu_s": cpu, "prompt_tokens": sum(out.column("prompt_tokens").to_pylist())}))
"""


def tokenizers(names: list[str], workdir: Path) -> dict[str, str]:
    from turbo_batch.testing.assets import smollm2_dir
    from turbo_batch.testing.tiny import write_tiny_gemma4

    out = {}
    for name in names:
        if name == "tiny":
            out[name] = str(write_tiny_gemma4(workdir / "tiny-gemma4"))
        elif name == "smollm2":
            out[name] = str(smollm2_dir())
        else:
            out[name] = name  # a tokenizer folder
    return out


def run(args: argparse.Namespace) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from bench.common import machine, synthetic_rows

    from turbo_batch.prompt import load_tokenizer

    codes = [c.split("=", 1) for c in (args.code or [f"this={REPO}"])]
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    results: dict[str, dict] = {}
    for tname, tpath in tokenizers(args.tok, workdir).items():
        rows = synthetic_rows(args.rows, 1024, load_tokenizer(tpath), LABELS)
        rows = rows.append_column("row_id", pa.array(range(args.rows), pa.int64()))
        pq.write_table(rows, workdir / f"rows-{tname}.parquet")
        first = None
        for label, code in codes:
            code = str(Path(code).resolve())
            out = workdir / f"out-{tname}-{label}.parquet"
            a = {"code": code, "rows": str(workdir / f"rows-{tname}.parquet"), "tok": tpath, "out": str(out),
                 "repeat": args.repeat, "labels": LABELS, "system": SYSTEM}  # fmt: skip
            p = subprocess.run(
                [sys.executable, "-c", CHILD, json.dumps(a)],
                env={**env, "PYTHONPATH": code},
                cwd=code,
                capture_output=True,
                text=True,
                timeout=args.timeout,
            )
            if p.returncode:
                raise SystemExit(f"{label} on {tname} failed:\n{p.stderr[-3000:]}")
            r = json.loads(p.stdout.strip().splitlines()[-1])
            table = pq.read_table(out)
            same = None if first is None else table.equals(first)
            first = table if first is None else first
            results[f"{tname}/{label}"] = {
                "tokenizer": tname,
                "code": label,
                "git": git_head(Path(code)),
                "cpu_s_runs": [round(c, 4) for c in r["cpu_s"]],
                "cpu_s_per_1k_rows": round(min(r["cpu_s"]) * 1000 / args.rows, 3),
                "prompt_tokens": r["prompt_tokens"],
                "same_block_as_first": same,
            }
            print(f"[bench_render] {tname} {label}: {results[f'{tname}/{label}']}", flush=True)
    return {
        "what": "render_block CPU per 1,000 ~1K-token rows, one process, no Ray (least of --repeat)",
        "command": "python benchmarks/bench_render.py " + " ".join(sys.argv[1:]),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "settings": {
            "rows": args.rows,
            "repeat": args.repeat,
            "labels": LABELS,
            "system": SYSTEM,
            "template": "{{ text }}",
            "chat": True,
            "TOKENIZERS_PARALLELISM": "false",
        },
        "results": results,
        "note": args.note,
    }


def markdown(d: dict) -> str:
    m, s = d["machine"], d["settings"]
    lines = [
        "# The render stage's CPU per row (render_block in one process, no Ray), this machine",
        "",
        f"Measured {d['date']} on {m.get('cpu_count')} logical CPUs ({m.get('cpu', '?')}), "
        f"transformers {m['versions'].get('transformers')}: `{d['command']}`. {s['rows']} synthetic rows "
        f"of ~1K tokens as one block, the cpu-tiny-1k prompt (4 labels, one pass, chat template); "
        f"least CPU time of {s['repeat']} (every thread), TOKENIZERS_PARALLELISM=false.",
        "",
        "| tokenizer | code | git | CPU-s per 1,000 rows | runs, CPU-s | prompt tokens | block equal to the first code's |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in d["results"].values():
        same = "—" if r["same_block_as_first"] is None else ("yes" if r["same_block_as_first"] else "**no**")
        runs = ", ".join(f"{c:.2f}" for c in r["cpu_s_runs"])
        lines.append(
            f"| {r['tokenizer']} | {r['code']} | {r['git']} | **{r['cpu_s_per_1k_rows']}** | {runs} | "
            f"{r['prompt_tokens']} | {same} |"
        )
    if d.get("note"):
        lines += ["", d["note"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--code", action="append", default=None, help="LABEL=DIR (repeatable; default this=repo)")
    ap.add_argument(
        "--tok", default="tiny,smollm2", help="comma-separated: tiny, smollm2 or tokenizer folders"
    )
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--results-dir", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--name", default="render_cpu", help="results file name, without .json/.md")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--note", default=None)
    args = ap.parse_args()
    args.tok = [t for t in args.tok.split(",") if t]
    with tempfile.TemporaryDirectory() as tmp:
        args.workdir = args.workdir or tmp
        d = run(args)
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(d, indent=2) + "\n")
    (out / f"{args.name}.md").write_text(markdown(d))
    print(markdown(d))


if __name__ == "__main__":
    main()
