"""GPU-only: the whole batch pipeline with an engine actor on a real CUDA GPU (skipped without one).

Run on the lent H100/H200 with vLLM 0.26 (see benchmarks/gpu_session.sh): a tiny Gemma 4 with
64-wide heads (GPU attention kernels want >= 64), one engine actor holding the GPU, real Ray.
"""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers import job_dict


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA GPU")]


def test_classify_job_on_gpu(tmp_path, monkeypatch):
    from turbo_batch.batch.run import run_job
    from turbo_batch.batch.write import read_output
    from turbo_batch.spec import JobSpec
    from turbo_batch.testing.tiny import write_tiny_gemma4

    monkeypatch.setenv("TURBO_BATCH_OUTPUT_ROOT", str(tmp_path))
    model = write_tiny_gemma4(tmp_path / "tiny", hidden_size=256, head_dim=64)
    n = 600
    pq.write_table(
        pa.table({"text": [f"review {i}: {'good' if i % 2 else 'bad'} film" for i in range(n)]}),
        tmp_path / "in.parquet",
    )
    data = job_dict(model, tmp_path / "in.parquet", "out")
    data["model"]["engine"] = {"max_model_len": 1024, "gpu_memory_utilization": 0.3, "enforce_eager": True}
    data["cluster"] = {"address": "local", "engines": "auto"}
    summary = run_job(JobSpec.model_validate(data))
    rows = read_output(tmp_path / "out").to_pylist()
    assert sorted(r["row_id"] for r in rows) == list(range(n))
    assert all(r["label"] in ("positive", "negative") for r in rows)
    assert all(math.isclose(sum(r["probs"].values()), 1.0, abs_tol=1e-5) for r in rows)
    (engine,) = summary["engines"]
    assert engine["device"]["kind"] == "cuda"
    assert engine["device"]["profile"] in ("h100", "h200", "b200", "rtx-5090", "rtx-pro-6000")
    assert engine["rows"] == n
    print(
        f"GPU {engine['device']['name']}: {summary['rows_per_s']} rows/s, engine start {summary['engine_start_s']} s"
    )
