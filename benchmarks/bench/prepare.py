"""Rows, model, job file and the token ids every variant runs (rendered once, with turbo-batch's own
PromptBuilder); writes plan.json, rendered.parquet and warmup.parquet into the preset's work dir."""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

from .common import build_gemma4, label_token_counts, log, make_labels, shipped_engine_args, synthetic_rows
from .presets import PRESETS


def job_dict(preset: dict[str, Any], model: Path, inp: Path, out: Path, id_col: str, gold: dict | None):
    kind = preset.get("kind", "classify")
    sampling: dict[str, Any] = {}
    if kind == "generate":  # a fixed output length, as the seed's 1K/200 and 1K/10 serve benchmarks
        task: dict[str, Any] = {"type": "generate", "max_tokens": preset["max_tokens"]}
        sampling = {"temperature": 0.0, "extra": {"ignore_eos": True}}
    else:
        task = {"type": "classify", "labels": list(preset["labels"])}
    if gold:
        task.update(gold)
    job = {
        "name": "bench-batch",
        "input": {"path": str(inp), "text_columns": ["text"], "id_column": id_col},
        "task": task,
        "prompt": {"system": preset["system"], "template": preset["template"]},
        "model": {"path": str(model), "preset": preset["model_preset"], "engine": dict(preset["engine"])},
        "output": {"dir": str(out), **preset["output"]},
        "cluster": {"address": "local"},
    }
    if sampling:
        job["sampling"] = sampling
    return job


def _model(name: str, args: argparse.Namespace, workdir: Path) -> Path:
    if name == "smollm2":
        from turbo_batch.testing import assets

        return Path(assets.smollm2_dir(progress=log))
    if name == "tiny":
        from turbo_batch.testing.tiny import write_tiny_gemma4

        return Path(
            write_tiny_gemma4(Path(getattr(args, "root", workdir)) / "tiny-gemma4")
        )  # one for all presets
    model = Path(args.model_dir).resolve() if args.model_dir else workdir / "gemma4-1.2b-random"
    build_gemma4(model, Path(args.tok).resolve(), weights=False)  # config + tokenizer; weights in a child
    return model


def _rotten_tomatoes(n: int, warm_n: int):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from turbo_batch.testing import assets

    table = assets.sample_rotten_tomatoes(n, seed=0, progress=log).select(["review_id", "text", "label"])
    full = pq.read_table(assets.rotten_tomatoes(progress=log))
    taken = set(table["review_id"].to_pylist())
    rest = [i for i, rid in enumerate(full["review_id"].to_pylist()) if rid not in taken]
    warm = full.take(pa.array(random.Random(1).sample(rest, warm_n))).select(table.column_names)
    return table, warm


def prepare(
    args: argparse.Namespace, workdir: Path, info: dict[str, Any], name: str | None = None
) -> dict[str, Any]:
    """Rows, model, job file and the rendered token ids every variant runs; returns the plan."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    from turbo_batch.engine import profiles
    from turbo_batch.prompt import PromptBuilder, PromptConfig, load_tokenizer
    from turbo_batch.spec import JobSpec

    name = name or args.preset
    preset = dict(PRESETS[name])
    kind = preset.get("kind", "classify")
    n = _rows_for(args.rows, name) or preset["rows"]
    warm_n = preset["warmup_rows"]
    workdir.mkdir(parents=True, exist_ok=True)
    model = _model(preset["model"], args, workdir)
    tokenizer = load_tokenizer(str(model))
    if kind == "labels":
        preset["labels"] = make_labels(tokenizer, preset["n_labels"], preset["label_tokens"])
    labels = list(preset.get("labels") or [])
    gold = gold_map = None
    if preset.get("data") == "rotten_tomatoes":
        table, warm = _rotten_tomatoes(n, warm_n)
        id_col = "review_id"
        gold = {"gold_column": "label", "gold_map": {"fresh": "positive", "rotten": "negative"}}
        gold_map = gold["gold_map"]
    else:
        probe = JobSpec.model_validate(job_dict(preset, model, workdir / "x", workdir / "y", "id", None))
        overhead = len(PromptBuilder(PromptConfig.from_job(probe), tokenizer).build({"text": "x"})[0]) - 1
        both = synthetic_rows(n + warm_n, preset["prompt_tokens"] - overhead, tokenizer, labels)
        table, warm = both.slice(0, n), both.slice(n)
        id_col = "id"
    inp = workdir / "rows.parquet"
    pq.write_table(table, inp)
    out_dir = workdir / "turbo_out"
    job = job_dict(preset, model, inp, out_dir, id_col, gold)
    override = turbo_job_override(getattr(args, "turbo_job", None))
    job["cluster"] = {**job["cluster"], **override.get("cluster", {})}
    spec = JobSpec.model_validate(job)
    job_file = workdir / "job.yaml"
    job_file.write_text(yaml.safe_dump(job, sort_keys=False))

    # Render once, the way turbo-batch's render stage does (PromptBuilder over each row's columns).
    builder = PromptBuilder(PromptConfig.from_job(spec), tokenizer)
    schema = pa.schema(
        [("row_id", pa.int64()), ("prompt_ids", pa.list_(pa.int32())), ("label_ids", pa.list_(pa.int32())),
         ("gold", pa.string())]
    )  # fmt: skip
    t0 = time.perf_counter()
    rid = _render_id(job, table, warm, model)
    rendered = _cached_render(workdir, rid)
    for part, tab in (("rendered", table), ("warmup", warm)) if rendered is None else ():
        rows = []
        for row in tab.to_pylist():
            ids, label_ids = builder.build(row)
            if kind != "generate" and label_ids is None:
                raise SystemExit(f"labels {labels} share a first token: pick other labels")
            gold_label = gold_map.get(row["label"]) if gold_map else None
            rows.append(
                {"row_id": row[id_col], "prompt_ids": ids, "label_ids": label_ids, "gold": gold_label}
            )
        rendered = rendered or {}
        rendered[part] = rows
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), workdir / f"{part}.parquet")
    render_s = time.perf_counter() - t0
    render_s = _render_key(workdir, rid, render_s)
    lens = [len(r["prompt_ids"]) for r in rendered["rendered"]]

    # Engine args as turbo-batch resolves them on this machine's device (the child detected it).
    if info.get("gpu"):
        cap = tuple(info.get("gpu_capability") or (9, 0))
        device = profiles.Device("cuda", info["gpu"], info.get("gpu_mem_gib", 80.0), cap)  # type: ignore[arg-type]
    elif args.dry_run and name.startswith("gpu"):
        device = profiles.Device("cuda", "NVIDIA H100 80GB HBM3", 79.1, (9, 0))  # what the lent GPU is
    else:
        device = profiles.detect_device()
    eargs = shipped_engine_args(spec.model.model_dump(mode="json"), device, len(labels))
    label_ids = rendered["rendered"][0]["label_ids"] or []
    plan: dict[str, Any] = {
        "preset": name,
        "kind": kind,
        "workdir": str(workdir),
        "model": str(model),
        "job_file": str(job_file),
        "output_dir": str(out_dir),
        "rows": n,
        "warmup_rows": warm_n,
        "labels": labels,
        "label_first_token_ids": label_ids,
        "label_first_tokens": [tokenizer.decode([t]) for t in label_ids],
        "engine_args": eargs,
        "device_profile": profiles.describe(device),
        "prompt_tokens": {"mean": round(sum(lens) / len(lens), 1), "min": min(lens), "max": max(lens)},
        "total_prompt_tokens": sum(lens),
        "render_once_s": round(render_s, 2),
        "rdl": {"batch_size": 64, "max_concurrent_batches": 8, "placement": preset["rdl_placement"]},
        "job": job,
        "turbo_job_override": override or None,
    }
    if kind == "generate":
        plan["sampling"] = {"max_tokens": preset["max_tokens"], "temperature": 0.0, "ignore_eos": True,
                            "seed": 0, "top_p": 1.0, "detokenize": True}  # fmt: skip
    else:
        plan["sampling"] = {
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": len(labels),
            "allowed_token_ids": "the row's label first-token ids (the same for every row here)",
            "detokenize": False,
        }
    if kind == "labels":
        counts = label_token_counts(tokenizer, labels)
        plan["label_tokens"] = counts
        # Guided choice must be able to finish every label. DESIGN §3 says the longest label in tokens
        # + 1, but under the choice grammar a model may spell a label in more tokens than its own
        # tokenization (SmolLM2: 12-15 tokens for a 6-token label, so every row hit a budget of 7;
        # gpu_session_2026-11-30f.md). Characters + 1 bounds any spelling of an ASCII label + the end.
        plan["guided_sampling"] = {"max_tokens": max(len(lab) for lab in labels) + 1, "temperature": 0.0,
                                   "structured_outputs": {"choice": labels}}  # fmt: skip
    (workdir / "plan.json").write_text(json.dumps(plan, indent=2, default=str))
    return plan


def turbo_job_override(text: str | None) -> dict[str, Any]:
    """--turbo-job's JSON: cluster settings only (the dispatcher's, turbo-batch's own); anything that
    would change what raw vLLM runs (model, engine, sampling, prompt) is refused."""
    override = json.loads(text or "{}")
    if not isinstance(override, dict) or set(override) - {"cluster"}:
        raise SystemExit(f"--turbo-job: only 'cluster' settings (turbo-batch's own), not {override!r}")
    return override


def _render_id(job: dict[str, Any], table: Any, warm: Any, model: Path) -> str:
    """What the rendered token ids depend on: the job (prompt, task), the rows, the tokenizer files."""
    import hashlib

    prompt_side = {k: v for k, v in job.items() if k != "cluster"}  # dispatch settings change no token
    h = hashlib.sha256(json.dumps(prompt_side, sort_keys=True, default=str).encode())
    for t in (table, warm):
        for col in t.columns:
            h.update(json.dumps(col.to_pylist(), default=str).encode())
    for f in sorted(Path(model).glob("tokenizer*")) + sorted(Path(model).glob("*.jinja")):
        h.update(f.name.encode() + f.read_bytes())  # contents: a GPU call rebuilds the stand-in's folder
    return h.hexdigest()


def _cached_render(workdir: Path, rid: str) -> dict | None:
    """The rendered rows of an earlier run of the same job, rows and tokenizer in this workdir (a GPU
    lease runs one preset in several device commands: rendering 20,000 SmolLM2 rows took ~50 s each)."""
    import pyarrow.parquet as pq

    path = workdir / "rendered.key"
    try:
        key = json.loads(path.read_text())
        if key["id"] != rid:
            raise KeyError("another job")
        out = {
            part: pq.read_table(workdir / f"{part}.parquet").to_pylist() for part in ("rendered", "warmup")
        }
    except (OSError, ValueError, KeyError):
        path.unlink(missing_ok=True)  # rendered again below: until then the files are no one's
        return None
    log(f"{workdir.name}: rendered rows reused from an earlier run of this job (rendered in {key['s']} s)")
    return out


def _render_key(workdir: Path, rid: str, took: float) -> float:
    """Record what the rendered files were made from; returns the render's own seconds (a reuse reports
    the original render's)."""
    path = workdir / "rendered.key"
    try:
        key = json.loads(path.read_text())
        if key.get("id") == rid:
            return float(key["s"])
    except (OSError, ValueError, KeyError):
        pass
    path.write_text(json.dumps({"id": rid, "s": round(took, 2)}))
    return took


def _rows_for(spec: str | None, name: str) -> int | None:
    """--rows N (every preset) or --rows preset=N,preset=N."""
    if not spec:
        return None
    if "=" not in spec:
        return int(spec)
    pairs = dict(kv.split("=", 1) for kv in spec.split(","))
    return int(pairs[name]) if name in pairs else None
