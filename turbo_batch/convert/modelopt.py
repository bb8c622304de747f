"""ModelOpt NVFP4 quantization configs and vLLM's exclusion rules, as plain dicts and strings. Imports no torch.

Owns: reading either ModelOpt config layout into one canonical dict (`canonical_quant_config`), writing both
(`quant_config_files`), the mirror of vLLM's layer-exclusion test (`vllm_excluded`), which checkpoint modules
sit behind each vLLM (fused) linear (`vllm_linear_modules`), and the rewrite of a source exclude list for a
converted checkpoint (`rewrite_excludes`).
Must not touch: tensors or files (the callers read and write the JSON), quantization math (nvfp4.py).

Layout decisions, each from the vLLM 0.32 source in `.venv/.../vllm/model_executor/layers/quantization/`:
  * Two places: ModelOpt ≥ 0.31 writes its config into config.json `quantization_config` (what vLLM reads
    first, `vllm/transformers_utils/config.py`) and into `hf_quant_config.json` (its fallback, and what
    `ModelOptQuantConfigBase.get_config_filenames` names). The converter writes both, and they must agree.
  * Exclusions: `ModelOptQuantConfigBase.is_layer_excluded` (exact match with the fused-shard mapping,
    substring match, fnmatch wildcards; `module_path*` also expanded to `module_path`/`module_path.*` by
    `apply_vllm_mapper`). Any source pattern that would exclude a newly quantized layer is removed and the
    unquantized layers it covered are listed explicitly; `lm_head` stays excluded. A quantized layer that
    vLLM excluded would load uint8 into a BF16 param; an unquantized one it did not exclude would keep its
    NaN-sentinel `weight_scale` and fail with "NVFP4 weight_scale ... was never loaded".
"""

from __future__ import annotations

import fnmatch
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from turbo_batch.convert.gemma4 import ENCODER_RE, FUSED, LINEAR_RE, rename

# vLLM's fused linears -> the checkpoint shards behind them
FUSED_VLLM = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def canonical_quant_config(qc: dict[str, Any]) -> dict[str, Any]:
    """Either ModelOpt layout (hf_quant_config.json or config.json) -> one dict with the fields vLLM reads."""
    if isinstance(qc.get("quantization"), dict):  # legacy hf_quant_config.json layout
        q = qc["quantization"]
        algo, kv, gs, exclude = (
            q.get("quant_algo"),
            q.get("kv_cache_quant_algo"),
            q.get("group_size"),
            q.get("exclude_modules", []),
        )
    else:  # config.json (compressed-tensors-like) layout
        algo, gs, exclude = qc.get("quant_algo"), qc.get("group_size"), qc.get("ignore", [])
        scheme = qc.get("kv_cache_scheme")
        kv = (
            "FP8"
            if isinstance(scheme, dict) and scheme.get("type") == "float" and scheme.get("num_bits") == 8
            else None
        )
        if gs is None:
            for group in (qc.get("config_groups") or {}).values():
                gs = gs or (group.get("weights") or {}).get("group_size")
    if str(algo).upper() != "NVFP4":
        raise NotImplementedError(f"source quant_algo {algo!r}: convert handles NVFP4 or unquantized sources")
    return {
        "quant_algo": "NVFP4",
        "kv_cache_quant_algo": kv,
        "group_size": int(gs or 16),
        "exclude_modules": list(exclude or []),
        "producer": qc.get("producer"),
    }


def quant_config_files(
    *,
    group_size: int,
    exclude_modules: list[str],
    kv_cache_quant_algo: str | None,
    producer: dict | None,
    recipe: dict,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(hf_quant_config.json, config.json quantization_config) in ModelOpt's two layouts (NVFP4 W4A4)."""
    hf = {
        "producer": producer or {"name": "turbo-batch", "version": "0.1.0"},
        "quantization": {
            "quant_algo": "NVFP4",
            "kv_cache_quant_algo": kv_cache_quant_algo,
            "group_size": group_size,
            "exclude_modules": exclude_modules,
        },
        "turbo_batch": recipe,
    }
    fmt = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": group_size}
    cj: dict[str, Any] = {
        "config_groups": {
            "group_0": {"input_activations": dict(fmt), "weights": dict(fmt), "targets": ["Linear"]}
        },
        "ignore": exclude_modules,
        "quant_algo": "NVFP4",
        "producer": hf["producer"],
        "quant_method": "modelopt",
    }
    if group_size != 16:
        cj["group_size"] = group_size
    if kv_cache_quant_algo == "FP8":
        cj["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "float"}
    elif kv_cache_quant_algo:
        cj["kv_cache_scheme"] = kv_cache_quant_algo
    return hf, cj


# ------------------------------------------------------------------------------------ vLLM exclusion rules


def expand_patterns(patterns: Iterable[str]) -> list[str]:
    """`module_path*` -> `module_path`, `module_path.*` (vLLM's apply_vllm_mapper workaround)."""
    out: list[str] = []
    for p in patterns:
        if len(p) >= 2 and p[-1] == "*" and p[-2] != ".":
            out += [p[:-1], p[:-1] + ".*"]
        else:
            out.append(p)
    return out


def pattern_hits(prefix: str, pattern: str) -> bool:
    """One pattern against one (unfused or fused) module name, by vLLM's three rules."""
    return prefix == pattern or (pattern != prefix and pattern in prefix) or fnmatch.fnmatch(prefix, pattern)


def vllm_excluded(prefix: str, patterns: Iterable[str]) -> bool:
    """Mirror of `ModelOptQuantConfigBase.is_layer_excluded` (vLLM 0.32) for a vLLM-side module prefix."""
    patterns = expand_patterns(patterns)
    if not patterns:
        return False
    proj = prefix.rsplit(".", 1)[-1]
    if proj in FUSED_VLLM and prefix not in patterns:
        shard_hits = {prefix.replace(proj, shard) in patterns for shard in FUSED_VLLM[proj]}
        if len(shard_hits) > 1:
            raise ValueError(f"some but not all shards of {prefix} are excluded")
        if shard_hits == {True}:
            return True
    return any(pattern_hits(prefix, p) for p in patterns)


def vllm_linear_modules(names: Iterable[str]) -> dict[str, list[str]]:
    """vLLM module prefix (fused) -> the checkpoint modules behind it, for text decoder linears + lm_head."""
    modules: dict[str, list[str]] = defaultdict(list)
    for name in names:
        module = name.rsplit(".", 1)[0]
        if not name.endswith(".weight") or ENCODER_RE.search(name):
            continue
        m = LINEAR_RE.match(module)
        if m:
            proj = m["proj"]
            vllm = module
            if proj in ("q", "k", "v"):
                vllm = f"{m['layer']}.self_attn.qkv_proj"
            elif proj in ("gate", "up"):
                vllm = f"{m['layer']}.mlp.gate_up_proj"
            modules[vllm].append(module)
        elif module.endswith("lm_head") or module.endswith("per_layer_model_projection"):
            modules[module].append(module)
    # kv-shared layers only have q_proj: vLLM builds a plain q_proj there.
    for vllm in [v for v, mods in modules.items() if v.endswith("qkv_proj") and len(mods) == 1]:
        (only,) = modules[vllm]
        if only.endswith("q_proj"):
            modules[only] = modules.pop(vllm)
    return dict(modules)


def rewrite_excludes(
    src_patterns: list[str],
    *,
    strip: bool,
    quantized: set[str],
    unquantized: set[str],
    encoder_roots: set[str],
) -> list[str]:
    """Drop encoder patterns (if stripped) and any pattern that would hit a quantized module; keep the rest and
    list explicitly the unquantized linears a dropped pattern used to cover, lm_head, and kept encoders."""
    out: list[str] = []
    explicit: set[str] = set()

    def add(p: str) -> None:
        if p not in out:
            out.append(p)

    def hits(module: str, pattern: str) -> bool:
        m = LINEAR_RE.match(module)
        fused = []
        if m and m["proj"] in ("q", "k", "v"):
            fused = [f"{m['layer']}.self_attn.qkv_proj"]
        elif m and m["proj"] in ("gate", "up"):
            fused = [f"{m['layer']}.mlp.gate_up_proj"]
        return any(pattern_hits(x, q) for x in (module, *fused) for q in expand_patterns([pattern]))

    for pattern in src_patterns:
        if strip and ENCODER_RE.search(pattern):
            continue
        renamed = rename(pattern, strip)
        if renamed.startswith("language_model.") and strip:
            renamed = "model." + renamed[len("language_model.") :]
        if any(hits(q, renamed) for q in quantized):
            explicit |= {u for u in unquantized if hits(u, renamed)}
            continue
        add(renamed)
    for module in sorted(explicit):
        m = LINEAR_RE.match(module)
        if m and m["proj"] in FUSED:
            for shard in FUSED[m["proj"]]:
                add(f"{m['layer']}.{m['block']}.{shard}_proj")
        else:
            add(module)
    for module in sorted(unquantized):
        if not vllm_excluded(module, out):
            add(module)
    if not any(pattern_hits("lm_head", p) for p in expand_patterns(out)):
        add("lm_head")
    for root in sorted(encoder_roots):  # encoders are never quantized here
        if not any(pattern_hits(root, p) for p in expand_patterns(out)):
            add(f"{root}*")
    return out
