"""`turbo_batch.convert.check` finds the layouts vLLM would refuse or misload."""

from __future__ import annotations

import json
import shutil

from turbo_batch.convert import check


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
