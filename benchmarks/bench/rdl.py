"""The ray.data.llm variant: vLLMEngineProcessorConfig + build_processor fed `tokenized_prompt`
(chat template / tokenize / detokenize stages off), batch_size 64, 8 concurrent batches.

Sampling: one pass for a classify preset, guided choice (the Ray library's way to get a label, the
baseline of issue 11) for a labels preset, the job's fixed-length sampling for a generate preset.
Engine start happens inside the pipeline, so rows/s runs from the first request's arrival in vLLM
(RequestOutput.metrics.arrival_time) to the last row out; the total wall is reported too."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .common import label_of, load_plan, read_rendered, write_outputs


def _sampling(plan: dict[str, Any], ids: list[int]) -> dict[str, Any]:
    if plan["kind"] == "generate":
        s = plan["sampling"]
        return {"max_tokens": s["max_tokens"], "temperature": 0.0, "top_p": 1.0, "seed": s["seed"],
                "ignore_eos": True}  # fmt: skip
    if plan["kind"] == "labels":
        return dict(plan["guided_sampling"])
    return {"max_tokens": 1, "temperature": 0.0, "logprobs": len(ids), "allowed_token_ids": ids,
            "detokenize": False}  # fmt: skip


def child_rdl(workdir: Path) -> None:
    import cloudpickle
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from turbo_batch.engine.tasks import match_label

    from . import common

    cloudpickle.register_pickle_by_value(common)  # Ray workers cannot import benchmarks/bench
    plan = load_plan(workdir)
    labels, kind = plan["labels"], plan.get("kind", "classify")
    eargs = dict(plan["engine_args"])
    model = eargs.pop("model")
    t0 = time.perf_counter()
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    kw: dict[str, Any] = {}
    if plan["rdl"]["placement"]:
        kw["placement_group_config"] = plan["rdl"]["placement"]
    cfg = vLLMEngineProcessorConfig(
        model_source=model,
        engine_kwargs=eargs,
        batch_size=plan["rdl"]["batch_size"],
        concurrency=1,
        max_concurrent_batches=plan["rdl"]["max_concurrent_batches"],
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,
        runtime_env={"env_vars": {"VLLM_USE_FLASHINFER_SAMPLER": "0", "TOKENIZERS_PARALLELISM": "false"}},
        **kw,
    )
    sampling = _sampling({**plan, "kind": kind}, [int(x) for x in (plan.get("label_first_token_ids") or [])])

    def pre(row: dict[str, Any]) -> dict[str, Any]:
        ids = [int(x) for x in (row.get("label_ids") or [])]
        return {
            "row_id": row["row_id"],
            "label_ids": ids,
            "tokenized_prompt": [int(x) for x in row["prompt_ids"]],
            "sampling_params": _sampling({**plan, "kind": kind}, ids)
            if kind == "classify"
            else dict(sampling),
        }

    def post(row: dict[str, Any]) -> dict[str, Any]:
        metrics = row.get("metrics") or {}
        out = {
            "row_id": row["row_id"],
            "prompt_tokens": int(row["num_input_tokens"]),
            "arrival": float(metrics.get("arrival_time") or 0.0),  # wall clock, when vLLM got the request
            "label": None,
            "probs": None,
            "text": None,
            "output_tokens": int(row.get("num_generated_tokens") or 0),
        }
        if kind == "generate":
            out["text"] = row.get("generated_text")
        elif kind == "labels":
            out["text"] = row.get("generated_text")
            out["label"] = match_label(out["text"] or "", labels)
        else:
            step = {}
            lps = row.get("logprobs")
            if lps is not None and len(lps):
                for k, v in (lps[0] or {}).items():
                    if v is not None:
                        step[int(k)] = v["logprob"] if isinstance(v, dict) else v
            out["label"], out["probs"] = label_of(labels, [int(x) for x in row["label_ids"]], step)
        return out

    proc = build_processor(cfg, preprocess=pre, postprocess=post)
    # Blocks of batch_size rows, so results stream out batch by batch.
    rows = read_rendered(workdir / "rendered.parquet")
    blocks = -(-len(rows) // plan["rdl"]["batch_size"])
    ds = proc(ray.data.from_items(rows, override_num_blocks=blocks))
    first = None
    n = n0 = 0
    out: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    for b in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        n += b.num_rows
        out += b.to_pylist()
        if first is None:
            first, n0 = time.perf_counter(), b.num_rows
    t_end = time.perf_counter()
    wall_end = time.time()
    ray.shutdown()
    arrivals = [r["arrival"] for r in out if r["arrival"] > 0]
    from_arrival = wall_end - min(arrivals) if len(arrivals) == n else None
    write_outputs(workdir, "ray_data_llm", out)
    one = first is None or n == n0  # everything came out in one batch: no first-to-last rate
    out_tok = sum(r["output_tokens"] for r in out)
    from .common import emit

    emit(
        {
            "variant": "ray_data_llm",
            "rows": n,
            "timed_s": from_arrival,
            "rows_per_s": n / from_arrival if from_arrival else None,
            "output_tokens_per_s": out_tok / from_arrival if from_arrival and out_tok else None,
            "sampling": sampling,
            "method": "rows / (first request reached vLLM [RequestOutput.metrics.arrival_time] -> last row out "
            "of the pipeline); engine start excluded",
            "first_to_last_batch_s": None if one else t_end - first,
            "first_to_last_batch_rows_per_s": None if one else (n - n0) / (t_end - first),
            "first_batch_rows": n0,
            "total_wall_s": t_end - t0,
            "total_rows_per_s": n / (t_end - t0),
            "pipeline_wall_s": t_end - t_start,
            "window": [wall_end - from_arrival, wall_end] if from_arrival else None,
        }
    )
