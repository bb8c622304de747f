"""The Turbo recipe (`turbo_batch.convert.convert`) on a tiny synthetic NVIDIA-style checkpoint.

A multimodal Gemma 4 config, small vision/audio towers, MLP in ModelOpt NVFP4, attention BF16: converted and
checked against the ModelOpt NVFP4 tensor convention, the float64 reference quantizer (helpers.py), vLLM's own
dequantizer, byte-identity of everything not quantized, the config rewrite, and the destination guard.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.convert.helpers import (
    assert_matches_reference,
    attention_modules,
    half_gap,
    load,
    reference_quantize,
    text_name,
)
from turbo_batch.convert import check, convert, list_tensors, nvfp4, vllm_excluded
from turbo_batch.testing.synthetic_nvfp4 import write_synthetic_nvidia_checkpoint

# -------------------------------------------------------------------------------------- converted layout


def test_layout_names_dtypes_shapes(converted):
    src, dst, report = converted
    s, d = load(src), load(dst)
    assert report["problems"] == [] and check(dst) == []
    modules = attention_modules(s)
    assert len(modules) == 7  # layer 0: q k v o; layer 1 (full attention, k_eq_v): q k o
    for m in modules:
        out_dim, in_dim = s[f"{m}.weight"].shape
        t = text_name(m)
        assert d[f"{t}.weight"].dtype == torch.uint8 and d[f"{t}.weight"].shape == (out_dim, in_dim // 2)
        assert d[f"{t}.weight_scale"].dtype == torch.float8_e4m3fn
        assert d[f"{t}.weight_scale"].shape == (out_dim, in_dim // 16)
        for leaf in ("weight_scale_2", "input_scale"):
            assert d[f"{t}.{leaf}"].dtype == torch.float32 and d[f"{t}.{leaf}"].shape == ()
    expected = {text_name(n) for n in s if n.startswith("model.language_model.")}
    expected -= {f"{text_name(m)}.weight" for m in modules}
    expected |= {
        f"{text_name(m)}.{leaf}"
        for m in modules
        for leaf in ("weight", "weight_scale", "weight_scale_2", "input_scale")
    }
    assert set(d) == expected
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == expected and len(report["shards"]) > 1
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in list_tensors(dst))


def test_config_and_files(converted):
    src, dst, _ = converted
    cfg = json.loads((dst / "config.json").read_text())
    src_cfg = json.loads((src / "config.json").read_text())
    assert cfg["architectures"] == ["Gemma4ForCausalLM"] and cfg["model_type"] == "gemma4_text"
    assert not {"vision_config", "audio_config", "text_config"} & set(cfg)
    for key in (
        "hidden_size",
        "num_hidden_layers",
        "head_dim",
        "global_head_dim",
        "layer_types",
        "attention_k_eq_v",
    ):
        assert cfg[key] == src_cfg["text_config"][key]
    qc = cfg["quantization_config"]
    hf = json.loads((dst / "hf_quant_config.json").read_text())
    assert qc["quant_method"] == "modelopt" and qc["quant_algo"] == "NVFP4"
    assert qc["ignore"] == hf["quantization"]["exclude_modules"] == ["lm_head"]
    assert hf["quantization"]["group_size"] == 16 and "kv_cache_quant_algo" in hf["quantization"]
    group = qc["config_groups"]["group_0"]
    assert group["input_activations"]["num_bits"] == 4 and group["weights"]["group_size"] == 16
    for prefix in (
        "model.layers.0.self_attn.qkv_proj",
        "model.layers.1.self_attn.o_proj",
        "model.layers.0.mlp.gate_up_proj",
    ):
        assert not vllm_excluded(prefix, qc["ignore"])
    assert vllm_excluded("lm_head", qc["ignore"])
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        assert (dst / f).read_bytes() == (src / f).read_bytes()
    assert not (dst / "processor_config.json").exists()
    assert json.loads((dst / "turbo_convert_report.json").read_text())["problems"] == []


def test_encoders_and_their_config_gone(converted):
    src, dst, report = converted
    assert any("vision_tower" in n for n in load(src)) and any("audio_tower" in n for n in load(src))
    names = load(dst)
    assert not [n for n in names if any(k in n for k in ("vision", "audio", "embed_vision", "embed_audio"))]
    assert report["tensors"]["dropped"] > 0 and report["bytes"]["dropped"] > 0
    ignore = json.loads((dst / "config.json").read_text())["quantization_config"]["ignore"]
    assert not [p for p in ignore if "tower" in p or "embed_" in p]


def test_everything_not_quantized_is_byte_identical(converted):
    src, dst, _ = converted
    s, d = load(src), load(dst)
    attention = {f"{m}.weight" for m in attention_modules(s)}
    kept = [n for n in s if n.startswith("model.language_model.") and n not in attention]
    assert any(".mlp." in n for n in kept) and any("embed_tokens" in n for n in kept)
    for n in kept:
        a, b = s[n], d[text_name(n)]
        assert a.dtype == b.dtype and a.shape == b.shape, n
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), n


def test_dequantized_attention_within_rtn_bound_and_matches_reference(converted):
    src, dst, report = converted
    s, d = load(src), load(dst)
    utils = pytest.importorskip("vllm.model_executor.layers.quantization.utils.nvfp4_emulation_utils")
    modules = attention_modules(s)
    fused: dict[str, list[str]] = {}
    for m in modules:
        layer, proj = m.rsplit(".", 1)
        fused.setdefault(layer + ("/o" if proj == "o_proj" else "/qkv"), []).append(m)
    for group in fused.values():
        amax = max(float(s[f"{m}.weight"].abs().max()) for m in group)
        gs = float(torch.tensor(amax / 2688.0, dtype=torch.float32))
        for m in group:
            t = text_name(m)
            w = s[f"{m}.weight"]
            assert float(d[f"{t}.weight_scale_2"]) == gs  # shared across the fused q/k/v shards
            ours = nvfp4.dequantize(
                d[f"{t}.weight"], d[f"{t}.weight_scale"], d[f"{t}.weight_scale_2"]
            ).double()
            vllm = utils.dequantize_to_dtype(
                d[f"{t}.weight"],
                d[f"{t}.weight_scale"],
                d[f"{t}.weight_scale_2"],
                torch.float32,
                16,
                swizzle=False,
            )
            assert torch.equal(vllm.double(), ours)
            ref = reference_quantize(w, gs)
            assert_matches_reference(d[f"{t}.weight"], d[f"{t}.weight_scale"], ref)
            denom = d[f"{t}.weight_scale"].double().repeat_interleave(16, dim=1) * gs
            x = w.double() / denom
            assert ((w.double() - ours).abs() <= (half_gap(x) + 1e-6) * denom).all(), m
            rel = float((w.double() - ours).norm() / w.double().norm())
            entry = next(r for r in report["per_tensor"] if r["source"] == f"{m}.weight")
            assert math.isclose(entry["relative_error"], rel, rel_tol=1e-4) and rel < 0.12


def test_input_scales_are_the_documented_bounds(converted):
    src, dst, _ = converted
    s, d = load(src), load(dst)
    cfg = json.loads((src / "config.json").read_text())["text_config"]
    for i in range(cfg["num_hidden_layers"]):
        gamma = float(s[f"model.language_model.layers.{i}.input_layernorm.weight"].float().abs().max())
        qkv = [f"model.layers.{i}.self_attn.{p}_proj.input_scale" for p in "qkv"]
        values = {float(d[n]) for n in qkv if n in d}
        assert values == {
            float(torch.tensor(math.sqrt(cfg["hidden_size"]) * gamma / 2688, dtype=torch.float32))
        }
        o = float(d[f"model.layers.{i}.self_attn.o_proj.input_scale"])
        assert o == float(torch.tensor(math.sqrt(cfg["head_dim"]) / 2688, dtype=torch.float32))


def test_overestimated_input_scale_costs_nothing():
    """Why a data-free upper bound is a safe input_scale: vLLM's W4A4 activation quantizer (its CPU reference)
    gives the same error for a global amax 1x..1000x the true one; only ~10^4x starves the FP8 group scales."""
    utils = pytest.importorskip("vllm.model_executor.layers.quantization.utils.nvfp4_emulation_utils")
    x = torch.randn(64, 1024, generator=torch.Generator().manual_seed(3))
    x[:, :4] *= 20  # outlier channels
    x = x / x.pow(2).mean(-1, keepdim=True).sqrt()  # post-RMSNorm: |x_i| <= sqrt(d)
    amax = float(x.abs().max())

    def err(assumed_amax: float) -> float:
        xq = utils.ref_nvfp4_quant_dequant(x, torch.tensor(2688.0 / assumed_amax), 16)  # = 1 / input_scale
        return float((xq - x).norm() / x.norm())

    exact = err(amax)
    assert exact < 0.11
    for factor in (math.sqrt(1024) / amax, 10.0, 100.0, 1000.0):
        assert abs(err(amax * max(factor, 1.0)) - exact) < 0.005
    assert err(amax * 1e5) > 2 * exact


# ---------------------------------------------------------------------------------- other source shapes


def test_wildcard_excludes_and_keep_encoders(tmp_path):
    src = write_synthetic_nvidia_checkpoint(
        tmp_path / "src", exclude_style="wildcard", attention_k_eq_v=False
    )
    report = convert(src, tmp_path / "dst", keep_encoders=True, progress=False)
    assert report["problems"] == []
    cfg = json.loads((tmp_path / "dst" / "config.json").read_text())
    assert cfg["architectures"] == ["Gemma4ForConditionalGeneration"] and "vision_config" in cfg
    ignore = cfg["quantization_config"]["ignore"]
    assert "*self_attn*" not in ignore and "model.audio_tower*" in ignore and "lm_head" in ignore
    names = load(tmp_path / "dst")
    assert "model.language_model.layers.0.self_attn.v_proj.weight_scale" in names
    assert names["model.vision_tower.patch_embedder.input_proj.weight"].dtype == torch.bfloat16
    assert (tmp_path / "dst" / "processor_config.json").exists()


def test_bf16_finetune_attention_and_mlp(tmp_path):
    src = write_synthetic_nvidia_checkpoint(tmp_path / "src", mlp_nvfp4=False, with_encoders=False)
    assert "quantization_config" not in json.loads((src / "config.json").read_text())
    report = convert(src, tmp_path / "dst", quantize_groups=("attention", "mlp"), progress=False)
    assert report["problems"] == [] and set(report["error_summary"]) == {"attention", "mlp"}
    d = load(tmp_path / "dst")
    assert float(d["model.layers.0.mlp.gate_proj.weight_scale_2"]) == float(
        d["model.layers.0.mlp.up_proj.weight_scale_2"]
    )
    assert float(d["model.layers.0.mlp.down_proj.input_scale"]) > 0
    assert not [n for n, t in d.items() if n.endswith("_proj.weight") and t.dtype != torch.uint8]


def test_refuses_mismatched_group_size_and_unknown_groups(converted, tmp_path):
    src, _, _ = converted
    with pytest.raises(ValueError, match="group_size"):
        convert(src, tmp_path / "a", group_size=32, progress=False)
    with pytest.raises(ValueError, match="unknown module groups"):
        convert(src, tmp_path / "b", quantize_groups=("embeddings",), progress=False)


# ------------------------------------------------------------------------ destination guard (--overwrite)


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _overlapping(tmp_path: Path, case: str) -> tuple[Path, Path, Path]:
    """(root holding the source, source, destination that overlaps it) for one overlap case."""
    root = tmp_path / "root"
    src = write_synthetic_nvidia_checkpoint(root / "src", with_encoders=False)
    if case == "equal":
        dst = src
    elif case == "contains":
        dst = root
    elif case == "inside":  # e.g. an earlier conversion written into the source dir
        dst = src / "turbo"
        dst.mkdir()
        (dst / "notes.txt").write_text("an earlier output, but still under the source")
    else:  # "symlink": another path to the source, through a symlinked parent (rmtree follows it)
        (tmp_path / "alias").symlink_to(root, target_is_directory=True)
        dst = tmp_path / "alias" / "src"
    return root, src, dst


@pytest.mark.parametrize("case", ["equal", "contains", "inside", "symlink"])
def test_overwrite_refuses_a_destination_overlapping_the_source(tmp_path, case):
    root, src, dst = _overlapping(tmp_path, case)
    before = _snapshot(root)
    with pytest.raises(ValueError, match="source directory") as e:
        convert(src, dst, overwrite=True, progress=False)
    assert "refusing" in str(e.value)
    assert _snapshot(root) == before  # nothing deleted, nothing written
    if case == "inside":  # an empty dir inside the source is still a fine destination (nothing to delete)
        (dst / "notes.txt").unlink()
        assert convert(src, dst, overwrite=True, progress=False)["problems"] == []
