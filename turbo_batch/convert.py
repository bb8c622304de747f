"""`turbo-batch convert`: the Turbo recipe — RTN-quantize a ModelOpt NVFP4 Gemma 4's BF16 layers to NVFP4.

What it does: streams a safetensors checkpoint tensor by tensor (row chunks, plain file reads, no mmap, so
memory stays within `memory_budget_bytes` whatever the model size) and writes a new checkpoint in which
  * the selected module groups ("attention" = q/k/v/o_proj of the text decoder, "mlp" = gate/up/down_proj)
    that are still BF16/F16/F32 are round-to-nearest quantized to NVFP4 (see `nvfp4.py` for the format);
  * everything else is copied byte for byte (NVIDIA's calibrated NVFP4 MLP, embed_tokens, norms, scalars);
  * vision/audio encoders are dropped and the config becomes text-only Gemma4ForCausalLM (unless
    `keep_encoders`), with `model.language_model.*` renamed `model.*`;
  * the ModelOpt quantization config is rewritten (exclude list without the newly quantized layers) into
    both places ModelOpt ≥ 0.31 writes it: config.json `quantization_config` (what vLLM reads first,
    `vllm/transformers_utils/config.py`) and `hf_quant_config.json` (its fallback, and what
    `ModelOptQuantConfigBase.get_config_filenames` names);
  * tokenizer / generation / chat-template files are copied; a report is returned and saved.
`check(dir)` verifies an existing checkpoint's layout the way vLLM's loader will see it.
What it does not do: calibration, GPTQ/AWQ-style error compensation, MoE experts, non-Gemma-4 models.

Layout decisions, each from the vLLM 0.32 source in `.venv/.../vllm/model_executor/layers/quantization/`:
  * Tensors per quantized linear (`modelopt.py`, `KNvfp4Static.create_weights` / `KNvfp4Dynamic`):
    `weight` uint8 [out, in/2], `weight_scale` float8_e4m3fn [out, in/16], `weight_scale_2` float32 [],
    `input_scale` float32 []. Scalars are 0-d like ModelOpt's exports (`PerTensorScaleParameter` accepts
    0-d and [1]).
  * Shared global scales: vLLM fuses q/k/v into `qkv_proj` and gate/up into `gate_up_proj` and keeps ONE
    `weight_scale_2` (`layer.weight_scale_2.max()`, warning "the global weight scale differs across parallel
    layers") — with different per-shard values the smaller shards would be dequantized with the wrong
    scale. So the shards of a fused layer get weight_scale_2 = max(amax over the shards) / 2688, exactly
    what ModelOpt's exporter does for fused layers. Same for `input_scale` (vLLM takes the max too).
  * Exclusions: `ModelOptQuantConfigBase.is_layer_excluded` (exact match with the fused-shard mapping,
    substring match, fnmatch wildcards; `module_path*` also expanded to `module_path`/`module_path.*` by
    `apply_vllm_mapper`). Any source pattern that would exclude a newly quantized layer is removed and the
    unquantized layers it covered are listed explicitly; `lm_head` stays excluded. A quantized layer that
    vLLM excluded would load uint8 into a BF16 param; an unquantized one it did not exclude would keep its
    NaN-sentinel `weight_scale` and fail with "NVFP4 weight_scale ... was never loaded".
  * input_scale (activation global scale): RTN has no calibration data. vLLM uses it only on the W4A4
    (Blackwell) kernels: `input_global_scale = input_scale`, activations are quantized per 16 with FP8 block
    scales `block_amax / 6 / input_scale` (`run_nvfp4_emulations` passes `input_global_scale_inv`), so
    `input_scale` must be ≥ amax(activation) / 2688 or the largest activations clip; overestimating it only
    pushes small blocks' FP8 scales down, and E4M3's range (448 down to 2^-6 normal, 2^-9 subnormal) leaves
    ~4 decades of head-room. On Hopper (Marlin W4A16, `prepare_fp4_layer_for_marlin`) input_scale is
    loaded (it must exist, or vLLM reports unloaded weights) and ignored. We therefore write a data-free
    UPPER BOUND of each layer's input amax, divided by 2688 as ModelOpt does for calibrated amax:
      - q/k/v_proj: input = input_layernorm(x) = x / rms(x) * γ, so |input_i| ≤ sqrt(hidden) · max|γ|;
      - o_proj: input = softmax-weighted average of V rows after Gemma 4's scale-free `v_norm`, each with
        L2 norm sqrt(head_dim), so |input_i| ≤ sqrt(head_dim);
      - gate/up_proj (mlp group only): sqrt(hidden) · max|γ_pre_feedforward_layernorm|;
      - down_proj (mlp group only): Cauchy–Schwarz, |gate_j| ≤ ‖W_gate[j]‖₂ · sqrt(hidden) · max|γ| (same
        for up), |gelu_tanh(z)| ≤ max(|z|, 0.1701), so |input_j| ≤ max_j max(G_j, 0.1701) · U_j (loose).
    These bounds never clip. Measured with vLLM's own activation quantizer (`ref_nvfp4_quant_dequant`, CPU):
    assuming a global amax 1x, 10x, 100x or 1000x the true one gives the same ~9.5% activation error; only
    ~10^4x and beyond degrades (tests/test_convert.py::test_overestimated_input_scale_costs_nothing). The
    report lists every bound so a user with calibration data can compare.
"""

from __future__ import annotations

import contextlib
import ctypes
import fnmatch
import json
import math
import re
import shutil
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from turbo_batch import nvfp4

# ---------------------------------------------------------------------------------------------- constants

_DTYPES: dict[str, tuple[torch.dtype | None, int]] = {
    "BF16": (torch.bfloat16, 2),
    "F16": (torch.float16, 2),
    "F32": (torch.float32, 4),
    "F64": (torch.float64, 8),
    "U8": (torch.uint8, 1),
    "I8": (torch.int8, 1),
    "I16": (torch.int16, 2),
    "I32": (torch.int32, 4),
    "I64": (torch.int64, 8),
    "BOOL": (torch.bool, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
    "U16": (getattr(torch, "uint16", None), 2),
    "U32": (getattr(torch, "uint32", None), 4),
    "U64": (getattr(torch, "uint64", None), 8),
    "F8_E8M0": (getattr(torch, "float8_e8m0fnu", None), 1),
}
_FLOAT_SOURCE_DTYPES = ("BF16", "F16", "F32")
GROUPS: dict[str, tuple[str, ...]] = {"attention": ("q", "k", "v", "o"), "mlp": ("gate", "up", "down")}
_FUSED = {
    "q": ("q", "k", "v"),
    "k": ("q", "k", "v"),
    "v": ("q", "k", "v"),
    "gate": ("gate", "up"),
    "up": ("gate", "up"),
}
_FUSED_VLLM = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
_LINEAR_RE = re.compile(
    r"^(?P<layer>(?:.*\.)?layers\.(?P<idx>\d+))\.(?P<block>self_attn|mlp)\.(?P<proj>q|k|v|o|gate|up|down)_proj$"
)
_ENCODER_RE = re.compile(
    r"(^|\.)(vision_tower|audio_tower|embed_vision|embed_audio|multi_modal_projector|vision_model|audio_model)(\.|\*|$)"
)
# Checkpoint prefixes of the text stack in multimodal checkpoints -> text-only (Gemma4ForCausalLM) names.
_TEXT_RENAMES = (
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
)
_COPY_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
)
_ENCODER_FILES = ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json")
_GELU_TANH_MIN_ABS = 0.1701  # |min_z gelu_tanh(z)| ≈ 0.17004
# Row chunks are sized so chunk elements x these factors <= the budget. The quantizer's live temporaries are
# ~20 bytes/element (bf16 read + float32 copies); the factors leave room for allocator slack, so the measured
# peak RSS growth stays under the budget (tests/test_convert.py measures it: ~0.5-0.7x at 24 MiB-200 MiB).
_QUANT_BYTES_PER_ELEM = 48
_READ_BYTES_PER_ELEM = 24  # pre-pass (amax / row norms) per element
DEFAULT_MEMORY_BUDGET = 1 << 30
MIN_MEMORY_BUDGET = 16 << 20  # below this, fixed overheads (buffers, report) dominate the chunked working set
DEFAULT_MAX_SHARD_BYTES = 5_000_000_000
REPORT_FILE = "turbo_convert_report.json"


# ----------------------------------------------------------------------------------------- safetensors I/O


@dataclass(frozen=True)
class TensorInfo:
    """One tensor in a safetensors file: where its bytes are, no data loaded."""

    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """(header dict, absolute offset of the data section)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return header, 8 + n


def list_tensors(model_dir: str | Path) -> list[TensorInfo]:
    """All tensors of a checkpoint dir (index-listed shards, or every *.safetensors), file then offset order."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted({model_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    out: list[TensorInfo] = []
    for path in files:
        header, data_start = read_safetensors_header(path)
        entries = [(k, v) for k, v in header.items() if k != "__metadata__"]
        for name, meta in sorted(entries, key=lambda kv: kv[1]["data_offsets"][0]):
            begin, end = meta["data_offsets"]
            out.append(
                TensorInfo(name, path, meta["dtype"], tuple(meta["shape"]), data_start + begin, end - begin)
            )
    return out


class _Reader:
    """Reads byte ranges / row ranges with readinto into fresh buffers (page cache, not RSS, holds the file)."""

    def __init__(self) -> None:
        self._files: dict[Path, Any] = {}

    def _f(self, path: Path):
        if path not in self._files:
            self._files[path] = open(path, "rb")  # noqa: SIM115 - closed in close()
        return self._files[path]

    def read_bytes(self, path: Path, offset: int, n: int) -> bytearray:
        buf = bytearray(n)
        f = self._f(path)
        f.seek(offset)
        got = f.readinto(buf)
        if got != n:
            raise OSError(f"short read from {path} at {offset}: {got} of {n} bytes")
        return buf

    def read_rows(self, info: TensorInfo, r0: int, r1: int) -> torch.Tensor:
        torch_dtype = _DTYPES[info.dtype][0]
        if not info.shape:
            buf = self.read_bytes(info.path, info.start, info.nbytes)
            return torch.frombuffer(buf, dtype=torch_dtype).reshape(())
        row_bytes = info.nbytes // info.shape[0] if info.shape[0] else 0
        buf = self.read_bytes(info.path, info.start + r0 * row_bytes, (r1 - r0) * row_bytes)
        if not buf:
            return torch.empty((0, *info.shape[1:]), dtype=torch_dtype)
        return torch.frombuffer(buf, dtype=torch_dtype).reshape(r1 - r0, *info.shape[1:])

    def read(self, info: TensorInfo) -> torch.Tensor:
        return self.read_rows(info, 0, info.shape[0] if info.shape else 1)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def _as_bytes(t: torch.Tensor):
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()


class _ShardWriter:
    """Writes a safetensors file whose header is known up front; tensor bytes are written at their offsets."""

    def __init__(self, path: Path, entries: Sequence[tuple[str, str, tuple[int, ...], int]]) -> None:
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, dtype, shape, nbytes in entries:
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        data_start = 8 + len(raw)
        self.offsets = {name: data_start + header[name]["data_offsets"][0] for name, *_ in entries}
        self.path = path
        self._f = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._f.write(len(raw).to_bytes(8, "little"))
        self._f.write(raw)
        self._f.truncate(data_start + offset)

    def write(self, name: str, rel_offset: int, data) -> None:
        self._f.seek(self.offsets[name] + rel_offset)
        self._f.write(data)

    def close(self) -> None:
        self._f.close()


# ----------------------------------------------------------------------------------------------- planning


@dataclass
class _QuantJob:
    """One BF16 linear weight to RTN-quantize into the four ModelOpt NVFP4 tensors."""

    src: TensorInfo
    module: str  # output module name, e.g. model.layers.3.self_attn.q_proj
    src_module: str
    group: str  # attention | mlp
    proj: str  # q k v o gate up down
    layer_prefix: str  # source name of the decoder layer, e.g. model.language_model.layers.3
    fused_key: str  # shards sharing weight_scale_2 / input_scale
    amax: float = 0.0
    global_scale: float = 1.0
    input_amax_bound: float = 0.0
    row_norms: torch.Tensor | None = None
    stats: nvfp4.ErrorStats = field(default_factory=nvfp4.ErrorStats)

    def outputs(self, group_size: int) -> list[tuple[str, str, tuple[int, ...], int]]:
        out_dim, in_dim = self.src.shape
        return [
            (f"{self.module}.weight", "U8", (out_dim, in_dim // 2), out_dim * in_dim // 2),
            (
                f"{self.module}.weight_scale",
                "F8_E4M3",
                (out_dim, in_dim // group_size),
                out_dim * in_dim // group_size,
            ),
            (f"{self.module}.weight_scale_2", "F32", (), 4),
            (f"{self.module}.input_scale", "F32", (), 4),
        ]


@dataclass
class _Unit:
    """A set of output tensors written together into one shard: a byte copy or a quantization job."""

    entries: list[tuple[str, str, tuple[int, ...], int]]
    copy_src: TensorInfo | None = None
    job: _QuantJob | None = None

    @property
    def nbytes(self) -> int:
        return sum(e[3] for e in self.entries)


def _rename(name: str, strip: bool) -> str:
    if strip:
        for old, new in _TEXT_RENAMES:
            if name.startswith(old):
                return new + name[len(old) :]
    return name


def _source_configs(src: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """(full config.json, text config, canonical source quant config or None)."""
    cfg = json.loads((src / "config.json").read_text())
    text = cfg.get("text_config") or cfg
    model_type = str(text.get("model_type", cfg.get("model_type", "")))
    if not model_type.startswith("gemma4"):
        raise ValueError(f"convert supports Gemma 4 checkpoints only; {src} has model_type {model_type!r}")
    qc = cfg.get("quantization_config") or text.get("quantization_config")
    hf_path = src / "hf_quant_config.json"
    hf = json.loads(hf_path.read_text()) if hf_path.exists() else None
    if qc is None and hf is None:
        return cfg, text, None
    return cfg, text, _canonical_quant_config(qc if qc is not None else hf)


def _canonical_quant_config(qc: dict[str, Any]) -> dict[str, Any]:
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


def _expand_patterns(patterns: Iterable[str]) -> list[str]:
    """`module_path*` -> `module_path`, `module_path.*` (vLLM's apply_vllm_mapper workaround)."""
    out: list[str] = []
    for p in patterns:
        if len(p) >= 2 and p[-1] == "*" and p[-2] != ".":
            out += [p[:-1], p[:-1] + ".*"]
        else:
            out.append(p)
    return out


def _pattern_hits(prefix: str, pattern: str) -> bool:
    """One pattern against one (unfused or fused) module name, by vLLM's three rules."""
    return prefix == pattern or (pattern != prefix and pattern in prefix) or fnmatch.fnmatch(prefix, pattern)


def vllm_excluded(prefix: str, patterns: Iterable[str]) -> bool:
    """Mirror of `ModelOptQuantConfigBase.is_layer_excluded` (vLLM 0.32) for a vLLM-side module prefix."""
    patterns = _expand_patterns(patterns)
    if not patterns:
        return False
    proj = prefix.rsplit(".", 1)[-1]
    if proj in _FUSED_VLLM and prefix not in patterns:
        shard_hits = {prefix.replace(proj, shard) in patterns for shard in _FUSED_VLLM[proj]}
        if len(shard_hits) > 1:
            raise ValueError(f"some but not all shards of {prefix} are excluded")
        if shard_hits == {True}:
            return True
    return any(_pattern_hits(prefix, p) for p in patterns)


def _vllm_linear_modules(names: Iterable[str]) -> dict[str, list[str]]:
    """vLLM module prefix (fused) -> the checkpoint modules behind it, for text decoder linears + lm_head."""
    modules: dict[str, list[str]] = defaultdict(list)
    for name in names:
        module = name.rsplit(".", 1)[0]
        if not name.endswith(".weight") or _ENCODER_RE.search(name):
            continue
        m = _LINEAR_RE.match(module)
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


def _rewrite_excludes(
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
        m = _LINEAR_RE.match(module)
        fused = []
        if m and m["proj"] in ("q", "k", "v"):
            fused = [f"{m['layer']}.self_attn.qkv_proj"]
        elif m and m["proj"] in ("gate", "up"):
            fused = [f"{m['layer']}.mlp.gate_up_proj"]
        return any(_pattern_hits(x, q) for x in (module, *fused) for q in _expand_patterns([pattern]))

    for pattern in src_patterns:
        if strip and _ENCODER_RE.search(pattern):
            continue
        renamed = _rename(pattern, strip)
        if renamed.startswith("language_model.") and strip:
            renamed = "model." + renamed[len("language_model.") :]
        if any(hits(q, renamed) for q in quantized):
            explicit |= {u for u in unquantized if hits(u, renamed)}
            continue
        add(renamed)
    for module in sorted(explicit):
        m = _LINEAR_RE.match(module)
        if m and m["proj"] in _FUSED:
            for shard in _FUSED[m["proj"]]:
                add(f"{m['layer']}.{m['block']}.{shard}_proj")
        else:
            add(module)
    for module in sorted(unquantized):
        if not vllm_excluded(module, out):
            add(module)
    if not any(_pattern_hits("lm_head", p) for p in _expand_patterns(out)):
        add("lm_head")
    for root in sorted(encoder_roots):  # encoders are never quantized here
        if not any(_pattern_hits(root, p) for p in _expand_patterns(out)):
            add(f"{root}*")
    return out


# ---------------------------------------------------------------------------------------------- converting


def parse_bytes(text: str | int) -> int:
    """'512MiB', '2GB', '1e9', 1024 -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.e+]+)\s*([kmgt]?i?b?)\s*", str(text).lower())
    if not m:
        raise ValueError(f"not a byte size: {text!r}")
    unit = m[2].rstrip("b")
    mult = {
        "": 1,
        "k": 10**3,
        "m": 10**6,
        "g": 10**9,
        "t": 10**12,
        "ki": 2**10,
        "mi": 2**20,
        "gi": 2**30,
        "ti": 2**40,
    }
    return int(float(m[1]) * mult[unit])


def _rows_per_chunk(info: TensorInfo, budget: int, bytes_per_elem: int) -> int:
    per_row = max(1, math.prod(info.shape[1:]) if len(info.shape) > 1 else 1) * bytes_per_elem
    return max(1, budget // per_row)


def _input_bounds(
    jobs: list[_QuantJob], reader: _Reader, by_name: dict[str, TensorInfo], text_cfg: dict
) -> None:
    """Fill `input_amax_bound` of every job (see the module docstring for the bounds)."""
    heads = int(text_cfg["num_attention_heads"])
    norm_max: dict[str, float] = {}

    def gamma_max(layer_prefix: str, norm: str) -> float:
        name = f"{layer_prefix}.{norm}.weight"
        if name not in by_name:
            raise ValueError(f"cannot bound the input of {layer_prefix} without {name}")
        if name not in norm_max:
            norm_max[name] = nvfp4.amax(reader.read(by_name[name]).float())
        return norm_max[name]

    by_layer: dict[str, dict[str, _QuantJob]] = defaultdict(dict)
    for job in jobs:
        by_layer[job.layer_prefix][job.proj] = job
    for job in jobs:
        hidden = job.src.shape[1]
        if job.proj in ("q", "k", "v"):
            job.input_amax_bound = math.sqrt(hidden) * gamma_max(job.layer_prefix, "input_layernorm")
        elif job.proj == "o":
            job.input_amax_bound = math.sqrt(job.src.shape[1] / heads)
        elif job.proj in ("gate", "up"):
            job.input_amax_bound = math.sqrt(hidden) * gamma_max(
                job.layer_prefix, "pre_feedforward_layernorm"
            )
        else:  # down
            layer = by_layer[job.layer_prefix]
            if "gate" not in layer or "up" not in layer or layer["gate"].row_norms is None:
                raise ValueError(
                    f"down_proj of {job.layer_prefix}: RTN needs gate/up_proj in BF16 to bound its input"
                )
            x_norm = math.sqrt(layer["gate"].src.shape[1]) * gamma_max(
                job.layer_prefix, "pre_feedforward_layernorm"
            )
            gate = (layer["gate"].row_norms * x_norm).clamp_min(_GELU_TANH_MIN_ABS)
            up = layer["up"].row_norms * x_norm
            job.input_amax_bound = float((gate * up).max())


def _prepass(jobs: list[_QuantJob], reader: _Reader, budget: int) -> None:
    """amax of every weight to quantize (and row L2 norms of gate/up, for the down_proj bound)."""
    for job in jobs:
        rows = _rows_per_chunk(job.src, budget, _READ_BYTES_PER_ELEM)
        want_norms = job.proj in ("gate", "up")
        norms = []
        for r0 in range(0, job.src.shape[0], rows):
            chunk = reader.read_rows(job.src, r0, min(job.src.shape[0], r0 + rows))
            job.amax = max(job.amax, nvfp4.amax(chunk))
            if want_norms:
                norms.append(torch.linalg.vector_norm(chunk.float(), dim=1))
            del chunk
        if want_norms:
            job.row_norms = torch.cat(norms)


def _quantize_job(
    job: _QuantJob, w: _ShardWriter, reader: _Reader, budget: int, group_size: int, on_bytes
) -> int:
    """Stream one weight through the quantizer; returns the estimated peak working bytes."""
    rows, cols = job.src.shape
    step = _rows_per_chunk(job.src, budget, _QUANT_BYTES_PER_ELEM)
    gs = torch.tensor(job.global_scale, dtype=torch.float32)
    peak = 0
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        chunk = reader.read_rows(job.src, r0, r1)
        q = nvfp4.quantize(chunk, group_size=group_size, global_scale=gs)
        w.write(f"{job.module}.weight", r0 * cols // 2, _as_bytes(q.weight))
        w.write(f"{job.module}.weight_scale", r0 * cols // group_size, _as_bytes(q.weight_scale))
        job.stats.update(chunk, q.dequantize(torch.float32))
        peak = max(peak, (r1 - r0) * cols * _QUANT_BYTES_PER_ELEM)
        on_bytes((r1 - r0) * cols * _DTYPES[job.src.dtype][1])
        del chunk, q
    w.write(f"{job.module}.weight_scale_2", 0, _as_bytes(gs))
    input_scale = torch.tensor(job.input_amax_bound / nvfp4.GLOBAL_SCALE_DIVISOR, dtype=torch.float32)
    w.write(f"{job.module}.input_scale", 0, _as_bytes(input_scale))
    return peak


def _copy_tensor(
    info: TensorInfo, name: str, w: _ShardWriter, reader: _Reader, budget: int, on_bytes
) -> None:
    step = max(1 << 20, budget // 4)
    for off in range(0, info.nbytes, step):
        n = min(step, info.nbytes - off)
        w.write(name, off, reader.read_bytes(info.path, info.start + off, n))
        on_bytes(n)


def _pin_malloc_mmap_threshold(nbytes: int = 1 << 20) -> None:
    """glibc raises its mmap threshold after the first large free and then keeps freed chunk buffers in the
    heap, which roughly doubled RSS over the working set in tests; pinning it (mallopt M_MMAP_THRESHOLD)
    makes buffers over 1 MiB come from mmap and go back to the OS when freed. No-op off glibc."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, nbytes)  # -3 = M_MMAP_THRESHOLD


def _progress(enabled: bool, total: int):
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    progress = Progress(
        TextColumn("[bold]convert"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
    )
    task = progress.add_task("convert", total=total)
    return progress, lambda n: progress.advance(task, n)


def convert(
    src: str | Path,
    dst: str | Path,
    *,
    quantize_groups: Sequence[str] = ("attention",),
    group_size: int = 16,
    keep_encoders: bool = False,
    memory_budget_bytes: int | None = None,
    progress: bool = True,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Apply the Turbo recipe to the checkpoint in `src`, writing `dst`; returns (and saves) the report."""
    t0 = time.time()
    src, dst = Path(src), Path(dst)
    unknown = set(quantize_groups) - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown module groups {sorted(unknown)}; choose from {sorted(GROUPS)}")
    if group_size <= 0 or group_size % 2:
        raise ValueError(f"group_size must be a positive even number, got {group_size}")
    budget = memory_budget_bytes or DEFAULT_MEMORY_BUDGET
    if budget < MIN_MEMORY_BUDGET:
        raise ValueError(f"memory_budget_bytes must be at least {MIN_MEMORY_BUDGET} (16 MiB), got {budget}")
    _pin_malloc_mmap_threshold()
    if dst.exists() and any(dst.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{dst} exists and is not empty (pass overwrite=True / --overwrite)")
        shutil.rmtree(dst)
    cfg, text_cfg, src_qc = _source_configs(src)
    if src_qc and src_qc["group_size"] != group_size:
        raise ValueError(
            f"group_size {group_size} differs from the source's NVFP4 group_size {src_qc['group_size']}; "
            "ModelOpt configs have one group_size for every layer"
        )
    strip = not keep_encoders
    tensors = list_tensors(src)
    by_name = {t.name: t for t in tensors}
    reader = _Reader()
    selected = {p for g in quantize_groups for p in GROUPS[g]}

    units: list[_Unit] = []
    jobs: list[_QuantJob] = []
    dropped: list[TensorInfo] = []
    kept_nvfp4: set[str] = set()
    for t in tensors:
        if strip and _ENCODER_RE.search(t.name):
            dropped.append(t)
            continue
        module, leaf = t.name.rsplit(".", 1) if "." in t.name else ("", t.name)
        m = _LINEAR_RE.match(module)
        if (
            m
            and leaf == "weight"
            and m["proj"] in selected
            and t.dtype in _FLOAT_SOURCE_DTYPES
            and len(t.shape) == 2
        ):
            if f"{module}.weight_scale" in by_name:
                raise ValueError(f"{t.name} is {t.dtype} but {module}.weight_scale exists")
            if t.shape[1] % group_size:
                raise ValueError(
                    f"{t.name}: input dim {t.shape[1]} is not a multiple of group_size {group_size}"
                )
            fused = _FUSED.get(m["proj"], (m["proj"],))
            job = _QuantJob(
                src=t,
                module=_rename(module, strip),
                src_module=module,
                group="attention" if m["block"] == "self_attn" else "mlp",
                proj=m["proj"],
                layer_prefix=m["layer"],
                fused_key=f"{m['layer']}.{m['block']}.{'+'.join(fused)}",
            )
            jobs.append(job)
            units.append(_Unit(job.outputs(group_size), job=job))
            continue
        if m and leaf == "weight" and t.dtype == "U8":
            kept_nvfp4.add(_rename(module, strip))
        units.append(_Unit([(_rename(t.name, strip), t.dtype, t.shape, t.nbytes)], copy_src=t))

    # fused shards must agree on precision, as vLLM requires
    job_modules = {j.src_module for j in jobs}
    for j in jobs:
        for shard in _FUSED.get(j.proj, ()):
            other = f"{j.layer_prefix}.{'self_attn' if j.group == 'attention' else 'mlp'}.{shard}_proj"
            if f"{other}.weight" in by_name and other not in job_modules:
                raise ValueError(f"{j.src_module} would be NVFP4 but its fused sibling {other} would not")

    progress_bar, on_bytes = _progress(
        progress, sum(u.copy_src.nbytes if u.copy_src else u.job.src.nbytes for u in units)
    )
    with progress_bar:
        _prepass(jobs, reader, budget)
        fused_amax: dict[str, float] = defaultdict(float)
        for j in jobs:
            fused_amax[j.fused_key] = max(fused_amax[j.fused_key], j.amax)
        for j in jobs:
            j.global_scale = float(nvfp4.global_scale_from_amax(fused_amax[j.fused_key]))
        _input_bounds(jobs, reader, by_name, text_cfg)
        fused_bound: dict[str, float] = defaultdict(float)
        for j in jobs:
            fused_bound[j.fused_key] = max(fused_bound[j.fused_key], j.input_amax_bound)
        for j in jobs:
            j.input_amax_bound = fused_bound[j.fused_key]

        # shard assignment, then streaming writes
        shards: list[list[_Unit]] = [[]]
        size = 0
        for u in units:
            if shards[-1] and size + u.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(u)
            size += u.nbytes
        dst.mkdir(parents=True, exist_ok=True)
        weight_map: dict[str, str] = {}
        peak = 0
        shard_names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for shard_name, shard_units in zip(shard_names, shards, strict=True):
            entries = [e for u in shard_units for e in u.entries]
            writer = _ShardWriter(dst / shard_name, entries)
            try:
                for u in shard_units:
                    if u.job is not None:
                        peak = max(peak, _quantize_job(u.job, writer, reader, budget, group_size, on_bytes))
                    else:
                        assert u.copy_src is not None
                        _copy_tensor(u.copy_src, u.entries[0][0], writer, reader, budget, on_bytes)
            finally:
                writer.close()
            weight_map.update({e[0]: shard_name for e in entries})
    reader.close()
    total_size = sum(e[3] for u in units for e in u.entries)
    (dst / "model.safetensors.index.json").write_text(
        json.dumps(
            {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}, indent=2
        )
    )

    # configs
    out_names = list(weight_map)
    linear = _vllm_linear_modules(out_names)
    quantized = {m for mods in linear.values() for m in mods if f"{m}.weight_scale" in weight_map}
    unquantized = {m for mods in linear.values() for m in mods if m not in quantized} | {"lm_head"}
    src_excludes = src_qc["exclude_modules"] if src_qc else []
    encoder_roots = {n[: m.end(2)] for n in out_names if (m := _ENCODER_RE.search(n))}
    excludes = _rewrite_excludes(
        src_excludes, strip=strip, quantized=quantized, unquantized=unquantized, encoder_roots=encoder_roots
    )
    recipe = {
        "recipe": "RTN NVFP4 (turbo-batch convert)",
        "rtn_groups": sorted(set(quantize_groups)),
        "group_size": group_size,
        "global_scale": "amax/2688, shared across fused shards (q/k/v, gate/up)",
        "input_scale": "data-free upper bound of the input amax / 2688 (see turbo_batch/convert.py)",
        "encoders": "kept" if keep_encoders else "stripped",
    }
    hf_qc, cfg_qc = quant_config_files(
        group_size=group_size,
        exclude_modules=excludes,
        kv_cache_quant_algo=src_qc["kv_cache_quant_algo"] if src_qc else None,
        producer=src_qc["producer"] if src_qc else None,
        recipe=recipe,
    )
    if keep_encoders:
        out_cfg = json.loads(json.dumps(cfg))
        out_cfg.pop("quantization_config", None)
        (out_cfg.get("text_config") or {}).pop("quantization_config", None)
    else:
        out_cfg = {k: v for k, v in text_cfg.items() if k != "quantization_config"}
        out_cfg["architectures"] = ["Gemma4ForCausalLM"]
        out_cfg["model_type"] = "gemma4_text"
        for key in ("dtype", "torch_dtype", "transformers_version", "tie_word_embeddings"):
            if key in cfg and key not in out_cfg:
                out_cfg[key] = cfg[key]
    out_cfg["quantization_config"] = cfg_qc
    (dst / "config.json").write_text(json.dumps(out_cfg, indent=2) + "\n")
    (dst / "hf_quant_config.json").write_text(json.dumps(hf_qc, indent=2) + "\n")
    copied_files = []
    for fname in (*_COPY_FILES, *(_ENCODER_FILES if keep_encoders else ())):
        if (src / fname).exists():
            shutil.copy2(src / fname, dst / fname)
            copied_files.append(fname)

    report = _report(
        src=src,
        dst=dst,
        tensors=tensors,
        units=units,
        jobs=jobs,
        dropped=dropped,
        kept_nvfp4=kept_nvfp4,
        excludes=(src_excludes, excludes),
        settings={
            "quantize_groups": sorted(set(quantize_groups)),
            "group_size": group_size,
            "keep_encoders": keep_encoders,
            "memory_budget_bytes": budget,
            "max_shard_bytes": max_shard_bytes,
        },
        extra={
            "architectures": {"before": cfg.get("architectures"), "after": out_cfg.get("architectures")},
            "shards": shard_names,
            "copied_files": copied_files,
            "estimated_peak_working_bytes": peak,
            "seconds": round(time.time() - t0, 3),
        },
    )
    report["problems"] = check(dst)
    (dst / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _report(
    *, src, dst, tensors, units, jobs, dropped, kept_nvfp4, excludes, settings, extra
) -> dict[str, Any]:
    before: dict[str, int] = defaultdict(int)
    after: dict[str, int] = defaultdict(int)
    for t in tensors:
        before[t.dtype] += t.numel
    for u in units:
        for _, dtype, shape, _ in u.entries:
            after[dtype] += math.prod(shape)
    logical_fp4 = sum(
        2 * math.prod(shape)
        for u in units
        for name, dtype, shape, _ in u.entries
        if dtype == "U8" and name.endswith(".weight")
    )
    per_tensor = [
        {
            "name": f"{j.module}.weight",
            "source": j.src.name,
            "group": j.group,
            "shape": list(j.src.shape),
            "source_dtype": j.src.dtype,
            "relative_error": j.stats.relative_error,
            "max_abs_error": j.stats.max_abs_err,
            "weight_amax": j.amax,
            "weight_scale_2": j.global_scale,
            "input_amax_bound": j.input_amax_bound,
            "input_scale": j.input_amax_bound / nvfp4.GLOBAL_SCALE_DIVISOR,
        }
        for j in jobs
    ]
    summary: dict[str, dict[str, float]] = {}
    for group in sorted({j.group for j in jobs}):
        errs = [r["relative_error"] for r in per_tensor if r["group"] == group]
        summary[group] = {
            "tensors": len(errs),
            "mean": sum(errs) / len(errs),
            "max": max(errs),
            "min": min(errs),
        }
    return {
        "src": str(src),
        "dst": str(dst),
        **settings,
        **extra,
        "bytes": {
            "before": sum(t.nbytes for t in tensors),
            "after": sum(u.nbytes for u in units),
            "dropped": sum(t.nbytes for t in dropped),
        },
        "elements_per_dtype": {"before": dict(sorted(before.items())), "after": dict(sorted(after.items()))},
        "nvfp4_weight_params_after": logical_fp4,
        "tensors": {
            "source": len(tensors),
            "dropped": len(dropped),
            "quantized": len(jobs),
            "copied": sum(1 for u in units if u.copy_src is not None),
            "kept_nvfp4_modules": len(kept_nvfp4),
        },
        "exclude_modules": {"before": excludes[0], "after": excludes[1]},
        "error_summary": summary,
        "per_tensor": per_tensor,
    }


# ------------------------------------------------------------------------------------------------ checking


def check(dst: str | Path) -> list[str]:
    """Problems (empty list = fine) with a converted checkpoint's layout, as vLLM's ModelOpt loader sees it."""
    dst = Path(dst)
    problems: list[str] = []
    cfg_path = dst / "config.json"
    if not cfg_path.exists():
        return [f"{cfg_path} missing"]
    cfg = json.loads(cfg_path.read_text())
    try:
        tensors = list_tensors(dst)
    except (FileNotFoundError, OSError, ValueError) as e:
        return [f"cannot read tensors: {e}"]
    by_name = {t.name: t for t in tensors}
    if len(by_name) != len(tensors):
        problems.append("duplicate tensor names across shards")

    index_path = dst / "model.safetensors.index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
        wm = index.get("weight_map", {})
        for t in tensors:
            if wm.get(t.name) != t.path.name:
                problems.append(f"index: {t.name} -> {wm.get(t.name)!r}, found in {t.path.name}")
        problems += [f"index names {n} but no shard holds it" for n in wm if n not in by_name]
        total = index.get("metadata", {}).get("total_size")
        if total is not None and total != sum(t.nbytes for t in tensors):
            problems.append(f"index total_size {total} != {sum(t.nbytes for t in tensors)}")
    for path in {t.path for t in tensors}:
        header, data_start = read_safetensors_header(path)
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if path.stat().st_size != data_start + end:
            problems.append(f"{path.name}: size {path.stat().st_size} != header end {data_start + end}")
    for t in tensors:
        if t.dtype not in _DTYPES:
            problems.append(f"{t.name}: unknown dtype {t.dtype}")
        elif t.nbytes != t.numel * _DTYPES[t.dtype][1]:
            problems.append(f"{t.name}: {t.nbytes} bytes for {t.dtype}{list(t.shape)}")

    # config
    arch = (cfg.get("architectures") or [None])[0]
    qc_raw = cfg.get("quantization_config")
    hf_path = dst / "hf_quant_config.json"
    hf_raw = json.loads(hf_path.read_text()) if hf_path.exists() else None
    if qc_raw is None and hf_raw is None:
        problems.append("no quantization config (config.json quantization_config / hf_quant_config.json)")
        return problems
    qc = _canonical_quant_config(qc_raw if qc_raw is not None else hf_raw)
    if qc_raw is not None and hf_raw is not None:
        other = _canonical_quant_config(hf_raw)
        for key in ("quant_algo", "kv_cache_quant_algo", "group_size", "exclude_modules"):
            if qc[key] != other[key]:
                problems.append(
                    f"config.json and hf_quant_config.json disagree on {key}: {qc[key]!r} vs {other[key]!r}"
                )
    if qc_raw is not None and str(qc_raw.get("quant_method", "")).lower() != "modelopt":
        problems.append(
            f"config.json quantization_config.quant_method is {qc_raw.get('quant_method')!r}, not 'modelopt'"
        )
    group_size = qc["group_size"]
    if group_size != 16:
        problems.append(
            f"group_size {group_size}: vLLM's NVFP4 kernels (cutlass, Marlin, emulation) assume 16"
        )
    if arch == "Gemma4ForCausalLM":
        for key in ("vision_config", "audio_config", "text_config"):
            if key in cfg:
                problems.append(f"text-only Gemma4ForCausalLM config still has {key}")
        if cfg.get("model_type") != "gemma4_text":
            problems.append(
                f"model_type {cfg.get('model_type')!r} for Gemma4ForCausalLM (expected 'gemma4_text')"
            )
        problems += [
            f"encoder tensor left in a text-only checkpoint: {t.name}"
            for t in tensors
            if _ENCODER_RE.search(t.name)
        ]
        problems += [
            f"{t.name}: text-only names start with model. or lm_head."
            for t in tensors
            if not t.name.startswith(("model.", "lm_head."))
        ]
    text_cfg = cfg.get("text_config") or cfg
    tied = text_cfg.get("tie_word_embeddings", cfg.get("tie_word_embeddings", True))
    if not tied and not any(n.endswith("lm_head.weight") for n in by_name):
        problems.append("tie_word_embeddings is false but there is no lm_head.weight")

    # NVFP4 tensors
    reader = _Reader()
    try:
        modules = {n.rsplit(".", 1)[0] for n in by_name if n.endswith((".weight_scale", ".weight_scale_2"))}
        scalars: dict[str, float] = {}
        for module in sorted(modules):
            problems += _check_nvfp4_module(module, by_name, group_size, qc["quant_algo"], reader, scalars)
        for vllm, mods in _vllm_linear_modules(by_name).items():
            quantized = [m in modules for m in mods]
            if any(quantized) and not all(quantized):
                problems.append(f"{vllm}: mixes NVFP4 and unquantized shards {mods}")
                continue
            try:
                excluded = vllm_excluded(vllm, qc["exclude_modules"])
            except ValueError as e:
                problems.append(str(e))
                continue
            if all(quantized) and excluded:
                problems.append(f"{vllm} is NVFP4 but the exclude list excludes it")
            if not any(quantized) and not excluded and not vllm.endswith("lm_head"):
                problems.append(f"{vllm} is not NVFP4 but is not excluded: vLLM would expect NVFP4 tensors")
            if len(mods) > 1 and all(quantized):
                for leaf in ("weight_scale_2", "input_scale"):
                    vals = {scalars.get(f"{m}.{leaf}") for m in mods}
                    if len(vals) > 1:
                        problems.append(f"{vllm}: {leaf} differs across fused shards {sorted(vals)}")
        if not vllm_excluded("lm_head", qc["exclude_modules"]) and "lm_head.weight_scale" not in by_name:
            problems.append("lm_head is not excluded: vLLM would build it as NVFP4")
    finally:
        reader.close()
    return problems


def _check_nvfp4_module(module, by_name, group_size, algo, reader, scalars) -> list[str]:
    problems = []
    w = by_name.get(f"{module}.weight")
    ws = by_name.get(f"{module}.weight_scale")
    ws2 = by_name.get(f"{module}.weight_scale_2")
    ins = by_name.get(f"{module}.input_scale")
    if w is None or ws is None or ws2 is None:
        return [f"{module}: NVFP4 needs weight, weight_scale and weight_scale_2"]
    if w.dtype != "U8" or len(w.shape) != 2:
        problems.append(f"{module}.weight: {w.dtype}{list(w.shape)}, expected U8 [out, in/2]")
    out_dim, in_dim = (w.shape[0], w.shape[1] * 2) if len(w.shape) == 2 else (0, 0)
    if in_dim % group_size:
        problems.append(f"{module}: input dim {in_dim} not a multiple of group_size {group_size}")
    if ws.dtype != "F8_E4M3" or ws.shape != (out_dim, in_dim // group_size):
        problems.append(
            f"{module}.weight_scale: {ws.dtype}{list(ws.shape)}, expected F8_E4M3 {[out_dim, in_dim // group_size]}"
        )
    scalar_infos = [("weight_scale_2", ws2)] + ([("input_scale", ins)] if ins is not None else [])
    if ins is None and algo == "NVFP4":
        problems.append(
            f"{module}.input_scale missing (quant_algo NVFP4 is W4A4; vLLM would report it unloaded)"
        )
    for leaf, info in scalar_infos:
        if info.dtype != "F32" or info.numel != 1 or len(info.shape) > 1:
            problems.append(f"{module}.{leaf}: {info.dtype}{list(info.shape)}, expected F32 scalar")
            continue
        value = float(reader.read(info).reshape(-1)[0])
        scalars[f"{module}.{leaf}"] = value
        if not math.isfinite(value) or value <= 0:
            problems.append(f"{module}.{leaf} = {value}")
    if ws.dtype == "F8_E4M3" and ws.numel:
        scales = reader.read(ws).float()
        if not torch.isfinite(scales).all():
            problems.append(f"{module}.weight_scale has NaN/inf")
    return problems


# ------------------------------------------------------------------------------------ synthetic source


def write_synthetic_nvidia_checkpoint(
    path: str | Path,
    *,
    hidden_size: int = 256,
    intermediate_size: int = 512,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    head_dim: int = 64,
    num_global_key_value_heads: int = 2,
    vocab_size: int = 512,
    attention_k_eq_v: bool = True,
    with_encoders: bool = True,
    mlp_nvfp4: bool = True,
    exclude_style: str = "per_layer",
    max_shard_bytes: int | None = None,
    seed: int = 0,
) -> Path:
    """Write a tiny checkpoint shaped like nvidia/Gemma-4-31B-IT-NVFP4: multimodal Gemma4ForConditionalGeneration
    config, small vision/audio towers, text MLP in ModelOpt NVFP4 (weight/weight_scale/weight_scale_2/
    input_scale, gate/up sharing their global scale), self-attention in BF16 and excluded from quantization,
    embed_tokens and norms BF16, tied lm_head, a word-level tokenizer. `global_head_dim == head_dim`; the
    defaults are multiples of 128 so Marlin FP4 (min thread n 64, k 128) and the 16-wide groups fit.

    exclude_style: "per_layer" (`model.language_model.layers.N.self_attn*`, ModelOpt's style) or "wildcard"
    (`*self_attn*`, which also covers the encoders' attention). mlp_nvfp4=False writes an all-BF16 model with
    no quantization config (a user's own fine-tune), for the "mlp" group.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    bf16 = torch.bfloat16

    def randn(*shape: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(bf16)

    def norm(dim: int) -> torch.Tensor:
        return (1.0 + 0.1 * torch.randn(dim, generator=gen)).to(bf16)

    layer_types = [
        "full_attention" if (i + 1) % 6 == 0 or i == num_hidden_layers - 1 else "sliding_attention"
        for i in range(num_hidden_layers)
    ]
    t: dict[str, torch.Tensor] = {}
    lm = "model.language_model"
    t[f"{lm}.embed_tokens.weight"] = randn(vocab_size, hidden_size, std=1.0)
    for i, kind in enumerate(layer_types):
        p = f"{lm}.layers.{i}"
        kv_heads = (
            num_global_key_value_heads
            if kind == "full_attention" and attention_k_eq_v
            else num_key_value_heads
        )
        t[f"{p}.layer_scalar"] = torch.ones(1, dtype=bf16)
        t[f"{p}.self_attn.q_proj.weight"] = randn(num_attention_heads * head_dim, hidden_size)
        t[f"{p}.self_attn.k_proj.weight"] = randn(kv_heads * head_dim, hidden_size)
        if not (kind == "full_attention" and attention_k_eq_v):
            t[f"{p}.self_attn.v_proj.weight"] = randn(kv_heads * head_dim, hidden_size)
        t[f"{p}.self_attn.o_proj.weight"] = randn(hidden_size, num_attention_heads * head_dim)
        t[f"{p}.self_attn.q_norm.weight"] = norm(head_dim)
        t[f"{p}.self_attn.k_norm.weight"] = norm(head_dim)
        mlp = {
            "gate": randn(intermediate_size, hidden_size),
            "up": randn(intermediate_size, hidden_size),
            "down": randn(hidden_size, intermediate_size),
        }
        gate_up_scale = nvfp4.global_scale_from_amax(max(nvfp4.amax(mlp["gate"]), nvfp4.amax(mlp["up"])))
        for proj, weight in mlp.items():
            if not mlp_nvfp4:
                t[f"{p}.mlp.{proj}_proj.weight"] = weight
                continue
            gs = gate_up_scale if proj != "down" else None
            q = nvfp4.quantize(weight, global_scale=gs)
            t[f"{p}.mlp.{proj}_proj.weight"] = q.weight
            t[f"{p}.mlp.{proj}_proj.weight_scale"] = q.weight_scale
            t[f"{p}.mlp.{proj}_proj.weight_scale_2"] = q.weight_scale_2
            # stand-in for calibrated activation amax / 2688
            t[f"{p}.mlp.{proj}_proj.input_scale"] = torch.tensor((12.0 if proj != "down" else 3.0) / 2688.0)
        for n in (
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        ):
            t[f"{p}.{n}.weight"] = norm(hidden_size)
    t[f"{lm}.norm.weight"] = norm(hidden_size)

    vision = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
              "num_key_value_heads": 2, "head_dim": 32, "patch_size": 16, "position_embedding_size": 64,
              "pooling_kernel_size": 3, "model_type": "gemma4_vision"}  # fmt: skip
    audio = {"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "output_proj_dims": 64,
             "subsampling_conv_channels": [16, 8], "conv_kernel_size": 3, "model_type": "gemma4_audio"}  # fmt: skip
    if with_encoders:
        vt = "model.vision_tower"
        t[f"{vt}.patch_embedder.position_embedding_table"] = randn(2, 64, 64)
        t[f"{vt}.patch_embedder.input_proj.weight"] = randn(64, 768)
        for proj in ("q", "k", "v", "o"):
            t[f"{vt}.encoder.layers.0.self_attn.{proj}_proj.linear.weight"] = randn(64, 64)
        for proj, shape in (("gate", (128, 64)), ("up", (128, 64)), ("down", (64, 128))):
            t[f"{vt}.encoder.layers.0.mlp.{proj}_proj.linear.weight"] = randn(*shape)
        for n in (
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        ):
            t[f"{vt}.encoder.layers.0.{n}.weight"] = norm(64)
        at = "model.audio_tower"
        t[f"{at}.subsample_conv_projection.layer0.conv.weight"] = randn(16, 1, 3, 3)
        t[f"{at}.subsample_conv_projection.input_proj_linear.weight"] = randn(64, 32)
        for proj in ("q", "k", "v"):
            t[f"{at}.layers.0.self_attn.{proj}_proj.linear.weight"] = randn(64, 64)
            t[f"{at}.layers.0.self_attn.{proj}_proj.input_max"] = torch.tensor(4.0)
        t[f"{at}.layers.0.self_attn.post.linear.weight"] = randn(64, 64)
        t[f"{at}.output_proj.weight"] = randn(64, 64)
        t[f"{at}.output_proj.bias"] = randn(64)
        t["model.embed_vision.embedding_projection.weight"] = randn(hidden_size, 64)
        t["model.embed_audio.embedding_projection.weight"] = randn(hidden_size, 64)

    if exclude_style == "per_layer":
        excludes = ["lm_head", *(f"{lm}.layers.{i}.self_attn*" for i in range(num_hidden_layers))]
    elif exclude_style == "wildcard":
        excludes = ["lm_head", "*self_attn*"]
    else:
        raise ValueError(f"exclude_style {exclude_style!r}")
    if with_encoders:
        excludes += ["model.audio_tower*", "model.embed_audio*", "model.embed_vision*", "model.vision_tower*"]
    hf_qc, cfg_qc = quant_config_files(
        group_size=16,
        exclude_modules=excludes,
        kv_cache_quant_algo=None,
        producer={"name": "modelopt", "version": "0.37.0"},
        recipe={"note": "synthetic NVIDIA-style test checkpoint"},
    )
    hf_qc.pop("turbo_batch")
    text_cfg = {
        "model_type": "gemma4_text",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "head_dim": head_dim,
        "global_head_dim": head_dim,
        "num_global_key_value_heads": num_global_key_value_heads,
        "attention_k_eq_v": attention_k_eq_v,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "sliding_window": 512,
        "layer_types": layer_types,
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {
                "rope_type": "proportional",
                "partial_rotary_factor": 0.25,
                "rope_theta": 1000000.0,
            },
        },
        "final_logit_softcapping": 30.0,
        "hidden_size_per_layer_input": 0,
        "vocab_size_per_layer_input": vocab_size,
        "num_kv_shared_layers": 0,
        "enable_moe_block": False,
        "tie_word_embeddings": True,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
        "dtype": "bfloat16",
    }
    cfg = {
        "architectures": ["Gemma4ForConditionalGeneration"],
        "model_type": "gemma4",
        "text_config": text_cfg,
        "tie_word_embeddings": True,
        "dtype": "bfloat16",
    }
    if mlp_nvfp4:
        cfg["quantization_config"] = cfg_qc
        (path / "hf_quant_config.json").write_text(json.dumps(hf_qc, indent=2) + "\n")
    if with_encoders:
        cfg |= {"vision_config": vision, "audio_config": audio, "boi_token_id": 255999, "eoi_token_id": 258882,
                "image_token_id": 258880, "audio_token_id": 258881, "boa_token_id": 256000}  # fmt: skip
    (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    _write_tensors(path, t, max_shard_bytes)
    _write_word_tokenizer(path, vocab_size)
    (path / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0})
    )
    if with_encoders:
        (path / "processor_config.json").write_text(json.dumps({"processor_class": "Gemma4Processor"}))
    return path


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int | None) -> None:
    """Write tensors (in memory) as safetensors shards + index, with the same writer the converter uses."""
    inv = {v[0]: k for k, v in _DTYPES.items() if v[0] is not None}
    shards: list[list[str]] = [[]]
    size = 0
    for name, x in tensors.items():
        nbytes = x.numel() * x.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map = {}
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        entries = [
            (
                n,
                inv[tensors[n].dtype],
                tuple(tensors[n].shape),
                tensors[n].numel() * tensors[n].element_size(),
            )
            for n in names
        ]
        w = _ShardWriter(path / fname, entries)
        for n in names:
            w.write(n, 0, _as_bytes(tensors[n]))
        w.close()
        weight_map |= dict.fromkeys(names, fname)
    total = sum(x.numel() * x.element_size() for x in tensors.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )


def _write_word_tokenizer(path: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    words = [f"w{i}" for i in range(vocab_size - len(specials))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<bos>",
                "eos_token": "<eos>",
                "pad_token": "<pad>",
                "unk_token": "<unk>",
                "model_max_length": 4096,
            }
        )
    )
    (path / "chat_template.jinja").write_text(
        "{% for m in messages %}<start_of_turn>{{ m['role'] }} {{ m['content'] }}<end_of_turn> {% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model {% endif %}"
    )


# ------------------------------------------------------------------------------------------------------ CLI

convert_app = typer.Typer(
    help="Rebuild a Turbo checkpoint from a ModelOpt NVFP4 Gemma 4 (RTN NVFP4 attention, text-only).",
    add_completion=False,
    context_settings={"allow_interspersed_args": True},
)


@convert_app.callback(invoke_without_command=True)
def convert_command(
    src: Annotated[Path, typer.Argument(help="Source checkpoint dir (with --check: the dir to verify).")],
    dst: Annotated[Path | None, typer.Argument(help="Output dir (new or empty).")] = None,
    check_only: Annotated[
        bool, typer.Option("--check", help="Only verify SRC's layout; exit 1 on problems.")
    ] = False,
    quantize: Annotated[
        list[str] | None,
        typer.Option("--quantize", "-q", help="Module group to RTN-quantize: attention, mlp."),
    ] = None,
    group_size: Annotated[int, typer.Option(help="NVFP4 group size (vLLM kernels need 16).")] = 16,
    keep_encoders: Annotated[
        bool, typer.Option(help="Keep vision/audio encoders and the multimodal config.")
    ] = False,
    memory_budget: Annotated[str, typer.Option(help="Working-memory budget, e.g. 512MiB, 2GiB.")] = "1GiB",
    max_shard_size: Annotated[str, typer.Option(help="Max bytes per output shard.")] = "5GB",
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty DST.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """turbo-batch convert SRC DST | turbo-batch convert --check DIR"""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if check_only:
        problems = check(src)
        for p in problems:
            console.print(f"[red]✗[/red] {p}")
        if problems:
            raise typer.Exit(1)
        console.print(f"[green]✓[/green] {src}: layout OK")
        return
    if dst is None:
        raise typer.BadParameter("DST is required unless --check is given")
    try:
        report = convert(
            src,
            dst,
            quantize_groups=tuple(quantize or ["attention"]),
            group_size=group_size,
            keep_encoders=keep_encoders,
            memory_budget_bytes=parse_bytes(memory_budget),
            progress=not quiet,
            max_shard_bytes=parse_bytes(max_shard_size),
            overwrite=overwrite,
        )
    except (ValueError, OSError, NotImplementedError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    table = Table(title=f"RTN NVFP4 relative error ({report['tensors']['quantized']} tensors)")
    for col in ("group", "tensors", "mean", "max"):
        table.add_column(col)
    for group, s in report["error_summary"].items():
        table.add_row(group, str(s["tensors"]), f"{s['mean']:.4f}", f"{s['max']:.4f}")
    console.print(table)
    b = report["bytes"]
    console.print(
        f"bytes {b['before']:,} → {b['after']:,} (dropped {b['dropped']:,}); "
        f"elements per dtype {report['elements_per_dtype']['after']}; report: {Path(dst) / REPORT_FILE}"
    )
    for p in report["problems"]:
        console.print(f"[red]✗[/red] {p}")
    if report["problems"]:
        raise typer.Exit(1)
