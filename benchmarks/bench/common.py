"""Helpers shared by the benchmark's parent and child processes: logging, machine facts, load sampling,
synthetic data, the random-weight Gemma 4 model, and running a variant in its own child process."""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .hostcpu import HostCpu

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "bench_batch.py"  # the children run this file with --child
MARK = "BENCH_RESULT "


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def emit(result: dict[str, Any]) -> None:
    print(MARK + json.dumps(result), flush=True)


def load_plan(workdir: Path) -> dict[str, Any]:
    return json.loads((workdir / "plan.json").read_text())


def read_rendered(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def label_of(labels: list[str], label_ids: list[int], step: Any) -> tuple[str, list[float]]:
    """turbo-batch's own rule: argmax of the softmax over the labels' first-token logprobs (+ the probs)."""
    from turbo_batch.engine.tasks import label_probabilities

    probs = label_probabilities(labels, label_ids, step or {})
    return max(probs, key=probs.__getitem__), [probs[lab] for lab in labels]


def machine() -> dict[str, Any]:
    """CPU model, cores, RAM and (if any) the GPU; imports torch, so call it in a child process."""
    info: dict[str, Any] = {"host": platform.node(), "python": platform.python_version()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info["cpu_count"] = os.cpu_count()
    info["ram_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1)
    versions = {}
    for mod in ("vllm", "ray", "torch", "transformers"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception as e:
            versions[mod] = f"unavailable ({type(e).__name__})"
    info["versions"] = versions
    try:
        import torch

        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info["gpu"] = p.name
            info["gpu_count"] = torch.cuda.device_count()
            info["gpu_mem_gib"] = round(p.total_memory / 1024**3, 1)
    except Exception:
        pass
    return info


class LoadSampler:
    """1-minute load average every 5 s while a variant runs (other people's jobs share this box)."""

    def __init__(self, every: float = 5.0):
        import threading

        self.every, self.samples, self.stop = every, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.every):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> LoadSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    def stats(self) -> dict[str, float] | None:
        if not self.samples:
            return None
        return {"mean": round(sum(self.samples) / len(self.samples), 2), "max": round(max(self.samples), 2)}


def git_rev() -> str | None:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "turbo_batch"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        return rev + ("+dirty(turbo_batch)" if dirty else "")
    except Exception:
        return None


def same_niceness_as_ray() -> int:
    """Ray starts its workers (so turbo-batch's and Ray Data LLM's engines) at niceness 15
    (RAY_worker_niceness); raw vLLM runs at the same, so on a shared box no variant has a higher CPU priority."""
    target = int(os.environ.get("RAY_worker_niceness", 15))  # noqa: SIM112 (Ray's own spelling)
    now = os.getpriority(os.PRIO_PROCESS, 0)
    if now < target:
        os.setpriority(os.PRIO_PROCESS, 0, target)
    return os.getpriority(os.PRIO_PROCESS, 0)


def lower_median(items: list[Any], key: Any) -> Any:
    """The median item by `key` (the lower of the middle two if their number is even): a real run's
    record, not an average of two."""
    return sorted(items, key=key)[(len(items) - 1) // 2]


def fmt(x: Any, nd: int = 2) -> str:
    return "—" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# ------------------------------------------------------------------------------------------- data


def words(seed: int, n: int = 3000) -> list[str]:
    r = random.Random(seed)
    return ["".join(r.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(r.randint(2, 9))) for _ in range(n)]


def synthetic_rows(n: int, target_tokens: int, tokenizer: Any, labels: list[str], seed: int = 0):
    """n rows of random words, each tokenizing to ~target_tokens (calibrated on this tokenizer)."""
    import pyarrow as pa

    vocab = words(seed)
    r = random.Random(seed + 1)
    sample = " ".join(r.choice(vocab) for _ in range(400))
    per_word = len(tokenizer.encode(sample, add_special_tokens=False)) / 400
    k = max(1, round(target_tokens / per_word))
    texts = [" ".join(r.choice(vocab) for _ in range(k)) + "." for _ in range(n)]
    return pa.table(
        {
            "id": pa.array(range(n), pa.int64()),
            "text": texts,
            "topic": [labels[i % len(labels)] for i in range(n)] if labels else [None] * n,
        }
    )


# 20 topics with different first letters, so their first tokens differ in any BPE vocabulary.
LABEL_HEADS = [
    "agriculture",
    "banking",
    "chemistry",
    "diplomacy",
    "education",
    "fashion",
    "geology",
    "healthcare",
    "insurance",
    "journalism",
    "kinship",
    "literature",
    "maritime",
    "nutrition",
    "oceanography",
    "philosophy",
    "quantum",
    "robotics",
    "sociology",
    "transport",
]
LABEL_FILL = ["policy", "and", "regional", "development", "affairs", "news", "reports"]


def make_labels(tokenizer: Any, n: int, target_tokens: int) -> list[str]:
    """n labels of about target_tokens tokens each (as the model writes them after the prompt): the
    shortest run of whole words of "<topic> <filler words>" that reaches that many tokens. Whole
    words: a label cut mid-word ("... and regi") is not one a model would write."""
    out = []
    for head in LABEL_HEADS[:n]:
        words = [head, *LABEL_FILL]
        label = " ".join(words)
        for k in range(1, len(words) + 1):
            if len(tokenizer.encode(" ".join(words[:k]), add_special_tokens=False)) >= target_tokens:
                label = " ".join(words[:k])
                break
        out.append(label)
    return out


def label_token_counts(tokenizer: Any, labels: list[str]) -> list[int]:
    """Tokens of each label as the model writes it after the prompt (chat: no leading space)."""
    return [len(tokenizer.encode(lab, add_special_tokens=False)) for lab in labels]


# ------------------------------------------------------------------------------------------ model


STANDIN_VOCAB = 32768  # the stand-in's vocabulary unless its tokenizer has more tokens


def tokenizer_vocab(tok: Path) -> int:
    """How many ids `tok`'s tokenizer.json knows (base vocabulary + added tokens)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tok / "tokenizer.json")).get_vocab_size(with_added_tokens=True)


# The stand-in's shape (env BENCH_STANDIN, default 1.2b). The 1.2B is cheap to build and start, but
# per-row overheads weigh more beside its prefill than beside a 31B's; 9b (~9.2B, 18 GB in bf16, fits one
# H200) is for ratios that depend on prefill cost, such as how much grouping rows by prefix gains.
STANDINS: dict[str, dict[str, int]] = {
    "1.2b": {"hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 12,
             "num_attention_heads": 8, "num_key_value_heads": 4},
    "9b": {"hidden_size": 3840, "intermediate_size": 15360, "num_hidden_layers": 40,
           "num_attention_heads": 16, "num_key_value_heads": 8},
}  # fmt: skip


def standin_size() -> str:
    size = os.environ.get("BENCH_STANDIN", "1.2b")
    if size not in STANDINS:
        raise SystemExit(f"BENCH_STANDIN={size!r}: one of {', '.join(STANDINS)}")
    return size


def gemma4_config(vocab_size: int = STANDIN_VOCAB, size: str = "1.2b"):
    """probe_ray_vllm.py's build(): random Gemma4ForCausalLM ~1.2B, global_head_dim == head_dim.

    With `benchmarks/tok` (355 tokens) the model's 32,768 logits are mostly ids that tokenizer does not
    know: a generated id past 355 decodes to "" — fine for one-token classification, but a long
    generation then never yields text and vLLM's incremental detokenizer re-decodes the whole prompt at
    every step (251 us per step at 1K prompt tokens, against 13 us with make_tok.py's tokenizer). `benchmarks/make_tok.py`
    writes a 49,152-token BPE tokenizer (SmolLM2's) for which every id the model can emit is a token."""
    from transformers import Gemma4TextConfig

    cfg = Gemma4TextConfig(
        vocab_size=vocab_size,
        **STANDINS[size],
        head_dim=256,
        global_head_dim=256,
        vocab_size_per_layer_input=vocab_size,
        hidden_size_per_layer_input=0,
        max_position_embeddings=8192,
        sliding_window=1024,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    cfg.architectures = ["Gemma4ForCausalLM"]
    return cfg


def build_gemma4(path: Path, tok: Path, weights: bool) -> None:
    """Write the model folder: config + tokenizer files, and (on a GPU) the random bf16 weights, in the
    shape BENCH_STANDIN names (one folder per shape: an existing model is reused as it is)."""
    if (path / "model.safetensors").exists() or (path / "model.safetensors.index.json").exists():
        return
    path.mkdir(parents=True, exist_ok=True)
    vocab = tokenizer_vocab(tok)
    cfg = gemma4_config(max(STANDIN_VOCAB, -(-vocab // 128) * 128), standin_size())
    gen = tok / "generation_config.json"  # the tokenizer's special ids, so EOS/BOS/pad agree with it
    if gen.is_file():
        ids = json.loads(gen.read_text())
        for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if isinstance(ids.get(k), int):
                setattr(cfg, k, ids[k])
    if weights:
        import torch
        from transformers import Gemma4ForCausalLM

        torch.manual_seed(0)
        with torch.device("cuda"):
            m = Gemma4ForCausalLM(cfg).to(torch.bfloat16)
        m.save_pretrained(path)
        del m
    else:
        cfg.save_pretrained(path)
    for f in tok.iterdir():
        shutil.copy(f, path / f.name)


# --------------------------------------------------------------------------------- child processes


def preset_dirs(root: Path, presets: list[str]) -> dict[str, Path]:
    """One preset runs in the work dir itself; several each in a sub-folder named after the preset."""
    return {presets[0]: root} if len(presets) == 1 else {p: root / p for p in presets}


def write_outputs(workdir: Path, variant: str, rows: list[dict[str, Any]]) -> None:
    """A variant's per-row outputs: row_id, prompt_tokens, label + probs (classify) or text + tokens."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {
        "row_id": [r["row_id"] for r in rows],
        "prompt_tokens": [r.get("prompt_tokens") for r in rows],
        "label": pa.array([r.get("label") for r in rows], pa.string()),
        "probs": pa.array([r.get("probs") for r in rows], pa.list_(pa.float64())),
        "text": pa.array([r.get("text") for r in rows], pa.string()),
        "output_tokens": pa.array([r.get("output_tokens") for r in rows], pa.int64()),
    }
    pq.write_table(pa.table(cols), workdir / f"labels_{variant}.parquet")


def run_child_all(
    workdir: Path, what: str, args: argparse.Namespace, timeout: float
) -> tuple[list[dict[str, Any]], float]:
    """`bench_batch.py --child what` in its own process: every result it emitted, and its wall time."""
    cmd = [sys.executable, str(SCRIPT), "--preset", args.preset, "--workdir", str(workdir), "--child", what]
    if args.tok:
        cmd += ["--tok", args.tok]
    if args.model_dir:
        cmd += ["--model-dir", args.model_dir]
    if args.dry_run:
        cmd.append("--dry-run")
    logf = workdir / f"{what}.log"
    # BENCH_RAW_ENV='{"OMP_NUM_THREADS": "1"}': raw vLLM's process (and its engine core) started with
    # what a Ray actor's would have, to tell the actor's environment from the rest of turbo-batch
    extra = json.loads(os.environ.get("BENCH_RAW_ENV") or "{}") if what == "raw" else {}
    t0 = time.perf_counter()
    with open(logf, "w") as fh:
        p = subprocess.Popen(
            cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=fh, text=True, env={**os.environ, **extra}
        )
        meter = HostCpu(
            p.pid, workdir=workdir
        ).start()  # the child's process tree: its own loop, vLLM's engine core, ...
        try:
            stdout, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            raise
        finally:
            meter.stop()
    wall = time.perf_counter() - t0
    with open(logf, "a") as fh:
        fh.write("\n--- stdout ---\n" + stdout)
    results = [json.loads(line[len(MARK) :]) for line in stdout.splitlines() if line.startswith(MARK)]
    if p.returncode != 0 or not results:
        raise RuntimeError(f"{what} exited {p.returncode}; see {logf}:\n" + tail(logf))
    for r in results:
        if extra:
            r["env_override"] = extra
    for r in results:  # a child that names its timed window [start, end] (epoch s) gets its CPU split there
        if r.get("window") and r.get("rows"):
            cpu = meter.between(*r["window"])
            total = sum(cpu["by_role"].values())
            r["host_cpu"] = {**cpu, "cpu_s_per_1k_rows": round(1000 * total / r["rows"], 3)}
    return results, wall


def run_child(workdir: Path, what: str, args: argparse.Namespace, timeout: float) -> dict[str, Any]:
    """`bench_batch.py --child what` in its own process; returns its last result."""
    results, wall = run_child_all(workdir, what, args, timeout)
    return {**results[-1], "process_wall_s": results[-1].get("process_wall_s", wall)}


def shipped_engine_args(model: dict[str, Any], device: Any, n_labels: int) -> dict[str, Any]:
    """The engine args turbo-batch's profiles resolve for a job's model section on `device`, as every
    variant runs them: raw vLLM and ray.data.llm run vLLM as it ships, so turbo-batch's CPU executor
    (profiles.CPU_EXECUTOR: the worker forked, which shortens the engine start only, outside every
    timed window) is left out."""
    from turbo_batch.engine import profiles

    args = profiles.engine_args(
        model, device, max_labels=n_labels, model_max_len=profiles.model_context_len(str(model["path"]))
    )
    return {k: v for k, v in args.items() if v != profiles.CPU_EXECUTOR}
