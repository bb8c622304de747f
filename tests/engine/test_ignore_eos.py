"""Fixed-length generation (the seed's 1K-in/200-out and 1K-in/10-out workloads as batch jobs): a job's
`sampling.extra.ignore_eos: true` reaches vLLM's SamplingParams. No engine starts here."""

from __future__ import annotations

import pytest

from turbo_batch.engine.tasks import TaskRunner
from turbo_batch.spec import JobSpec

pytest.importorskip("vllm")


def _job(sampling):
    return {
        "input": {"path": "rows.parquet", "text_columns": ["text"]},
        "task": {"type": "generate", "max_tokens": 200},
        "model": {"path": "/models/x"},
        "output": {"dir": "out"},
        "sampling": sampling,
    }


def test_ignore_eos_in_sampling_extra_reaches_sampling_params():
    spec = JobSpec.model_validate(_job({"temperature": 0.0, "extra": {"ignore_eos": True}}))
    runner = TaskRunner(spec.task.model_dump(), spec.sampling.model_dump())
    sp = runner.sampling_params()
    assert sp.ignore_eos is True and sp.max_tokens == 200 and sp.temperature == 0.0
    assert TaskRunner(spec.task.model_dump(), {}).sampling_params().ignore_eos is False  # the default
