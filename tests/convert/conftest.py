"""The convert tests' shared fixture: one synthetic NVIDIA-style source, converted once per test package."""

from __future__ import annotations

import pytest

from turbo_batch.convert import convert
from turbo_batch.testing.synthetic_nvfp4 import write_synthetic_nvidia_checkpoint


@pytest.fixture(scope="package")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    src = write_synthetic_nvidia_checkpoint(root / "src", num_hidden_layers=2, max_shard_bytes=400_000)
    report = convert(src, root / "dst", progress=False, max_shard_bytes=300_000)
    return src, root / "dst", report
