"""The benchmark's presets. kind: classify (given labels), labels (n generated labels of ~k tokens:
one-pass vs guided choice) or generate (fixed output length: max_tokens with ignore_eos).

Row counts are sized so each timed window on an H200 is ~20 s (the `batch-all` GPU session must fit
its engine starts and all windows in one device command); pass --rows for longer windows."""

from __future__ import annotations

from typing import Any

RAW_MODES = ("raw", "raw_window", "raw_burst", "raw_guided")  # raw vLLM's, one engine (bench/raw.py)
VARIANTS = (*RAW_MODES, "turbo", "ray_data_llm")

_CPU_RT = {  # the demo's data and model section on the CPU box (Rotten Tomatoes)
    "kind": "classify",
    "data": "rotten_tomatoes",
    "labels": ["positive", "negative"],
    "system": "Is this movie review positive or negative? Answer with one word: positive or negative.",
    "template": "{{ text }}",
    "model_preset": "cpu",
    "engine": {},  # the `cpu` preset as turbo-batch resolves it, nothing overridden (like the demo)
    "rdl_placement": {"bundles": [{"CPU": 1}]},  # without it ray.data.llm waits for a GPU (DESIGN §2)
    "variants": ["raw", "turbo", "ray_data_llm"],
}
_GPU = {
    "model": "gemma4",
    "template": "{{ text }}",
    "model_preset": "batch",
    "engine": {
        "max_model_len": 4096,
        "max_num_seqs": 128,
        "max_num_batched_tokens": 8192,
        "enable_prefix_caching": True,
        "gpu_memory_utilization": 0.85,
    },
    "output": {"part_rows": 1000},
    "rdl_placement": None,
}
# The tiny random Gemma 4 (hidden 64): a fast engine on 2 cores, for dry runs and CPU twins.
_CPU_TINY = {
    "model": "tiny",
    "template": "{{ text }}",
    "model_preset": "cpu",
    "engine": {},
    "output": {"part_rows": 1000},
    "rdl_placement": {"bundles": [{"CPU": 1}]},
}
_GEN_SYSTEM = "Continue the text."
_LABELS_SYSTEM = "Which topic is this text about? Answer with the topic only."

PRESETS: dict[str, dict[str, Any]] = {
    "cpu-smollm2": {**_CPU_RT, "model": "smollm2", "rows": 500, "warmup_rows": 8,
                    "output": {"keep_columns": ["text"], "part_rows": 100}},
    # The same pipeline with a model ~25x faster than SmolLM2 here, so per-row overheads show.
    "cpu-tiny": {**_CPU_RT, "model": "tiny", "rows": 2000, "warmup_rows": 16,
                 "output": {"keep_columns": ["text"], "part_rows": 1000}},
    "gpu-gemma4": {
        **_GPU, "kind": "classify", "rows": 2000, "warmup_rows": 64, "prompt_tokens": 1024,
        "labels": ["business", "politics", "sports", "technology"],
        "system": "Classify the news text into one of: business, politics, sports, technology. "
        "Answer with the label only.",
        "variants": ["raw", "turbo", "ray_data_llm"],
    },
    # The seed's serve workloads as batch jobs: 1K in, a fixed 200 / 10 tokens out (ignore_eos).
    "gpu-gen-200": {**_GPU, "kind": "generate", "rows": 1200, "warmup_rows": 32, "prompt_tokens": 1024,
                    "max_tokens": 200, "system": _GEN_SYSTEM, "variants": ["raw", "turbo"]},
    "gpu-gen-10": {**_GPU, "kind": "generate", "rows": 4000, "warmup_rows": 64, "prompt_tokens": 1024,
                   "max_tokens": 10, "system": _GEN_SYSTEM, "variants": ["raw", "turbo"]},
    # 20 labels of ~6 tokens: turbo-batch's one pass vs guided choice (DESIGN §3: 1.23x on an H100).
    "gpu-20labels": {**_GPU, "kind": "labels", "rows": 3600, "warmup_rows": 64, "prompt_tokens": 1160,
                     "n_labels": 20, "label_tokens": 6, "system": _LABELS_SYSTEM,
                     "variants": ["raw", "raw_guided", "turbo", "ray_data_llm"]},
    # Issue 11 point 4: host CPU per ~1K-token row with a model fast enough that the pipeline shows.
    "cpu-tiny-1k": {**_CPU_TINY, "kind": "classify", "rows": 2000, "warmup_rows": 16, "prompt_tokens": 1024,
                    "labels": ["business", "politics", "sports", "technology"],
                    "system": "Classify the news text into one of: business, politics, sports, technology. "
                    "Answer with the label only.", "variants": ["raw", "turbo"]},
    # The same against a trained model (SmolLM2-135M-Instruct, carried to the GPU by stage_smollm2.sh):
    # a random model under guided choice rarely finishes a label, which voids that comparison.
    "gpu-20labels-smollm2": {**_GPU, "model": "smollm2", "kind": "labels", "rows": 15000, "warmup_rows": 64,
                             "prompt_tokens": 1160, "n_labels": 20, "label_tokens": 6, "system": _LABELS_SYSTEM,
                             "variants": ["raw", "raw_guided", "turbo", "ray_data_llm"]},
    "cpu-gen-200": {**_CPU_TINY, "kind": "generate", "rows": 64, "warmup_rows": 4, "prompt_tokens": 256,
                    "max_tokens": 200, "system": _GEN_SYSTEM, "variants": ["raw", "turbo"]},
    "cpu-gen-10": {**_CPU_TINY, "kind": "generate", "rows": 600, "warmup_rows": 8, "prompt_tokens": 256,
                   "max_tokens": 10, "system": _GEN_SYSTEM, "variants": ["raw", "turbo"]},
    "cpu-20labels": {**_CPU_TINY, "kind": "labels", "rows": 600, "warmup_rows": 8, "prompt_tokens": 290,
                     "n_labels": 20, "label_tokens": 6, "system": _LABELS_SYSTEM,
                     "variants": ["raw", "raw_guided", "turbo", "ray_data_llm"]},
}  # fmt: skip


def pick_variants(preset: str, asked: str | None) -> list[str]:
    """The variants to run for `preset`: those asked for (comma-separated), in the order asked, since
    raw vLLM's modes share one engine one after another and the order can matter; else the preset's.
    Guided choice only where there are labels to choose from. ValueError names an unknown variant."""
    if not asked:
        out = [v for v in VARIANTS if v in PRESETS[preset]["variants"]]
    else:
        out = list(dict.fromkeys(v.strip() for v in asked.split(",") if v.strip()))
        unknown = [v for v in out if v not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown variant(s) {unknown}; choose from {VARIANTS}")
    return [v for v in out if v != "raw_guided" or PRESETS[preset]["kind"] == "labels"]
