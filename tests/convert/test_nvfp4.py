"""turbo_batch.convert.nvfp4 against an independent float64 reference and vLLM's own dequantizer."""

from __future__ import annotations

import pytest
import torch

from tests.convert.helpers import assert_matches_reference, half_gap, reference_quantize
from turbo_batch.convert import nvfp4


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
    assert_matches_reference(q.weight, q.weight_scale, ref)
    assert float(q.weight_scale.float()[3, 0]) == 1.0
    deq = q.dequantize().double()
    # every element is a nearest grid point for the group scale it got (up to float32 rounding)
    denom = q.weight_scale.double().repeat_interleave(16, dim=1) * gs
    x = torch.where(denom == 0, torch.zeros_like(denom), w.double() / denom)
    bound = torch.where(denom == 0, 6 * gs * 2.0**-10, (half_gap(x) + 1e-6) * denom)
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
