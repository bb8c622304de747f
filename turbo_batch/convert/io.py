"""safetensors I/O for `turbo-batch convert`: headers, row-chunk reads, and a writer with a known header.

Owns: the safetensors dtype table, `TensorInfo` (where a tensor's bytes are, no data loaded),
`read_safetensors_header`, `list_tensors` (index-listed shards or every *.safetensors), `Reader` (plain
`readinto` reads of byte / row ranges into fresh buffers: no mmap, so the page cache rather than RSS holds
the file and memory stays within the converter's budget), `ShardWriter` (header first, then tensor bytes at
their offsets, in any order and in pieces) and `copy_tensor` (a byte copy in bounded pieces).
Must not touch: tensor names and what they mean (Gemma 4, vLLM, ModelOpt), quantization math, configs. The
safetensors library is deliberately not used: it loads whole tensors, and the converter streams row chunks.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# safetensors dtype name -> (torch dtype or None where this torch lacks it, bytes per element)
DTYPES: dict[str, tuple[torch.dtype | None, int]] = {
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

# (name, safetensors dtype, shape, nbytes): one tensor of a shard to be written
Entry = tuple[str, str, tuple[int, ...], int]


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


class Reader:
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
        torch_dtype = DTYPES[info.dtype][0]
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


def as_bytes(t: torch.Tensor):
    """A tensor's raw bytes (numpy uint8 view of a contiguous copy), ready for `ShardWriter.write`."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()


class ShardWriter:
    """Writes a safetensors file whose header is known up front; tensor bytes are written at their offsets."""

    def __init__(self, path: Path, entries: Sequence[Entry]) -> None:
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


def copy_tensor(
    info: TensorInfo, name: str, w: ShardWriter, reader: Reader, budget: int, on_bytes: Callable[[int], Any]
) -> None:
    """Copy one tensor's bytes unchanged into `w` as `name`, in pieces of at most max(1 MiB, budget / 4)."""
    step = max(1 << 20, budget // 4)
    for off in range(0, info.nbytes, step):
        n = min(step, info.nbytes - off)
        w.write(name, off, reader.read_bytes(info.path, info.start + off, n))
        on_bytes(n)
