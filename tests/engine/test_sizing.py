"""Engine sizing with the real Gemma 4 31B config: KV bytes per layer kind, weights, per-GPU numbers.

The config fields below are those of google/gemma-4-31B-it's config.json (text_config), as found in
several public copies (hidden 5376, 60 layers, 5:1 sliding:full, sliding window 1024, 16 KV heads of
256, global layers 4 KV heads of 512 with attention_k_eq_v, vocab 262144, 262144 positions).
"""

from __future__ import annotations

import json

import pytest

from turbo_batch.engine import sizing
from turbo_batch.engine.sizing import GIB, LayerGroup, SizingError, model_info, shape_from_config, size_engine

GEMMA4_31B = {
    "architectures": ["Gemma4ForConditionalGeneration"],
    "model_type": "gemma4",
    "tie_word_embeddings": True,
    "text_config": {
        "model_type": "gemma4_text",
        "hidden_size": 5376,
        "intermediate_size": 21504,
        "num_hidden_layers": 60,
        "num_attention_heads": 32,
        "num_key_value_heads": 16,
        "head_dim": 256,
        "global_head_dim": 512,
        "num_global_key_value_heads": 4,
        "attention_k_eq_v": True,
        "sliding_window": 1024,
        "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 10,
        "num_kv_shared_layers": 0,
        "vocab_size": 262144,
        "max_position_embeddings": 262144,
        "dtype": "bfloat16",
    },
}
NVFP4_BYTES = 18.5e9  # the Turbo NVFP4 checkpoint, ~18.5 GB
CARDS = {  # (memory as torch reports it, the Turbo card's context limit)
    "rtx-5090": (31.4, 16_384),
    "rtx-pro-6000": (95.6, 131_072),
    "b200": (178.4, 262_144),
}


@pytest.fixture
def checkpoint(tmp_path):
    """A Gemma 4 31B NVFP4 checkpoint's metadata: config.json and a safetensors index, no weights."""
    (tmp_path / "config.json").write_text(json.dumps(GEMMA4_31B))
    index = {"metadata": {"total_size": int(NVFP4_BYTES)}, "weight_map": {}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    return tmp_path


def size(gpu: str, **kw):
    mem, ctx = CARDS[gpu]
    shape = shape_from_config(GEMMA4_31B)
    return size_engine(
        shape, NVFP4_BYTES, gpu=gpu, memory_gib=mem, gpu_memory_utilization=0.95,
        kv_cache_dtype_bytes=1, max_context=ctx, **kw,
    )  # fmt: skip


def test_layers_as_vllm_builds_the_cache():
    shape = shape_from_config(GEMMA4_31B)
    assert set(shape.layers) == {LayerGroup(50, 16, 256, 1024), LayerGroup(10, 4, 512, None)}
    # fp8: a sliding layer holds 2 x 16 x 256 = 8 KiB per token, a global layer 2 x 4 x 512 = 4 KiB
    assert shape.request_kv_bytes(1, 1, 0) == 50 * 8192 + 10 * 4096
    # past the window (+ in-flight tokens) only the 10 global layers grow
    grow = shape.request_kv_bytes(20_000, 1, 0) - shape.request_kv_bytes(10_000, 1, 0)
    assert grow == 10_000 * 10 * 4096
    assert 30.0e9 < shape.params < 31.5e9  # "31B"
    assert shape.max_position == 262_144


def test_weights_from_the_index_and_the_builtin_table(checkpoint):
    info = model_info(str(checkpoint))
    assert info.weight_bytes == NVFP4_BYTES and "safetensors" in info.source
    assert info.shape.layers == shape_from_config(GEMMA4_31B).layers
    built_in = model_info("LilaRest/gemma-4-31B-it-NVFP4-turbo")
    assert built_in.shape.layers == info.shape.layers and "built-in" in built_in.source
    assert model_info("someone/unknown-model") is None
    # configs only: parameters x dtype, NVFP4 linears at 4.5 bits: close to the real checkpoint
    (checkpoint / "model.safetensors.index.json").unlink()
    bf16 = model_info(str(checkpoint)).weight_bytes
    assert 60e9 < bf16 < 63e9
    nvfp4 = sizing.estimate_weight_bytes(info.shape, nvfp4=True)
    assert abs(nvfp4 - NVFP4_BYTES) / NVFP4_BYTES < 0.1


def test_each_card_gets_its_own_computed_settings():
    small, pro, big = size("rtx-5090"), size("rtx-pro-6000"), size("b200")
    # memory after weights and reserve: 29.8 GiB usable on the 5090, 17.2 GiB of it weights
    assert 9 * GIB < small.kv_cache_bytes < 12 * GIB
    assert small.kv_cache_bytes < pro.kv_cache_bytes < big.kv_cache_bytes
    # context: the card's limits (memory would allow more on every one of them)
    assert (small.max_model_len, pro.max_model_len, big.max_model_len) == (16_384, 131_072, 262_144)
    assert small.max_model_len_memory > 16_384
    # concurrency for 2K-token rows: ~0.47 GiB each (sliding layers dominate) -> ~20 on a 5090
    assert 15 <= small.max_num_seqs <= 30
    assert small.max_num_seqs < pro.max_num_seqs < big.max_num_seqs <= sizing.MAX_SEQS
    assert small.max_num_batched_tokens == 8192 and big.max_num_batched_tokens == 16384
    # vLLM's "KV cache size: N tokens" measure: about 24K on a 5090 (the card's "~25k")
    assert 20_000 < small.kv_cache_tokens < 30_000 < pro.kv_cache_tokens < big.kv_cache_tokens


def test_job_values_are_taken_as_given():
    s = size("b200", batch_tokens=4096, max_model_len=32_768)
    assert s.max_num_batched_tokens == 4096 and s.max_model_len == 32_768
    assert "job 32768" in s.limits[0]


def test_a_16_gb_card_is_refused():
    shape = shape_from_config(GEMMA4_31B)
    with pytest.raises(SizingError, match=r"weights need 17\.2 GiB.*use a larger GPU"):
        size_engine(
            shape, NVFP4_BYTES, gpu="NVIDIA GeForce RTX 5080", memory_gib=15.9,
            gpu_memory_utilization=0.95, kv_cache_dtype_bytes=1, max_context=16_384,
        )  # fmt: skip
    # weights fit, but not one request: refused too
    with pytest.raises(SizingError, match="fewer than one"):
        size_engine(
            shape, NVFP4_BYTES, gpu="tight", memory_gib=19.6, gpu_memory_utilization=0.95,
            kv_cache_dtype_bytes=1, max_context=16_384,
        )  # fmt: skip


def test_other_shapes():
    # a plain decoder: no sliding layers, head_dim from hidden / heads, KV "auto" = model dtype
    llama = {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
             "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072}  # fmt: skip
    shape = shape_from_config(llama)
    assert shape.layers == (LayerGroup(16, 8, 64, None),)
    assert sizing.kv_dtype_bytes("auto", shape) == 2 and sizing.kv_dtype_bytes("fp8", shape) == 1
    # KV-shared layers hold no cache of their own
    shared = json.loads(json.dumps(GEMMA4_31B))
    shared["text_config"]["num_kv_shared_layers"] = 12
    assert sum(g.count for g in shape_from_config(shared).layers) == 48
