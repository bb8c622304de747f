"""The order stage: rows that share a prompt prefix travel together, across the whole input.

    order_keys      map_batches UDF: each row's message TEXT (the job's Jinja templates: system, then
                    user; not the chat template, so no tokenizer and no transformers in a key task)
                    → a bounded binary `order_key` column, or with `prompt.group_by` a hash of
                    that column's value. Rows whose prompts share a long prefix share the key's leading
                    bytes, so sorting by the key lays the rows out like a trie walk.
    add_order       ds.map_batches(order_keys).sort("order_key"): Ray Data's own distributed sort (it
                    spills to disk, so a 10M-row input needs bounded memory; the driver never holds keys).
    order_whole     the same keys and order inside one read task, for an input small enough to be one
                    block (run.py): no shuffle tasks.
    shared_prefix   common prefix of two token-id prompts, for the driver's affinity dispatch.

The key = LEVELS hashes of successive chunks of the prompt's UTF-8 bytes, 4 bytes each, then 8 bytes
of row_id. The first chunk is the job's common prefix (the `anchor`: the bytes that sample rows of
the input all share — system prompt, few-shot block, the template's head); after it, chunk
boundaries grow slowly (every 64 bytes up to 512, then ×1.125 up to 128 KiB). A chunk past the end
of the text hashes to zeros. So two prompts that share N bytes share the hashes of every chunk that
ends before N, and after the common part, documents of D bytes split into one run each where D is
at least 1/8 of their offset past the anchor. The row_id tail makes the order total and the
same on every run: resume and exactly-once (both by row_id) need nothing more. Rows that cannot be
rendered get an all-zero prefix (they sort first) and become error rows in the render stage.

Why message text and not the chat template's output: the template adds the same text around every
row's messages, so it changes no grouping, while loading it means loading the model's tokenizer
through transformers, which imports torch: ~5 CPU-s in every worker process that runs a key task. On
a 32-core GPU host, Ray Data ran the key tasks in dozens of processes, and that import cost 742 CPU-s
for a 15,000-row job (benchmarks/results/gpu_session_2026-11-30f.md).

This module owns the key format and the stage. It must not tokenize, talk to engines, or change a
row's columns other than adding `order_key` (the render stage does not pass that column on).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from turbo_batch.prompt import PromptBuilder, PromptConfig

KEY_COLUMN = "order_key"
HASH_BYTES = 4
ROW_ID_BYTES = 8
INPUT_ERROR = "_input_error"  # turbo_batch.batch.read.INPUT_ERROR (not imported: keeps this module pure)


def _boundaries(first: int = 64, linear_until: int = 512, growth: float = 1.125, last: int = 1 << 17):
    out, b = [], first
    while b < last:
        out.append(b)
        b = b + first if b < linear_until else int(b * growth)
    out.append(last)
    return tuple(out)


BOUNDARIES: tuple[int, ...] = _boundaries()  # end offset (bytes past the anchor) of each chunk
LEVELS = 1 + len(BOUNDARIES)  # the anchor chunk, then the growing ones
SAMPLE_ROWS = 32  # rows rendered on the driver to find the anchor
KEY_BYTES = LEVELS * HASH_BYTES + ROW_ID_BYTES
_ZERO = bytes(HASH_BYTES)


def _row_id_bytes(row_id: Any) -> bytes:
    """8 bytes that sort integer ids numerically (sign bit flipped) and give other ids a stable hash."""
    if isinstance(row_id, int) and not isinstance(row_id, bool):
        return struct.pack(">Q", (row_id + (1 << 63)) & ((1 << 64) - 1))
    raw = row_id if isinstance(row_id, bytes) else str(row_id).encode("utf-8", "surrogatepass")
    return struct.pack(">II", zlib.crc32(raw), zlib.adler32(raw))


def _chunk_hash(chunk: bytes) -> bytes:
    return struct.pack(">I", (zlib.crc32(chunk) % 0xFFFFFFFF) + 1)  # never the zero "no chunk" marker


def prefix_key(text: str | bytes, row_id: Any, anchor: int = 0) -> bytes:
    """The order key of one rendered prompt: chunk hashes (a trie path), then the row id."""
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    parts, start = [_ZERO], anchor  # no anchor: an empty first chunk, the same for every row
    if anchor:
        parts = [_chunk_hash(data[:anchor])]
    for end in (anchor + b for b in BOUNDARIES):
        if start >= len(data):
            parts.append(_ZERO * (LEVELS - len(parts)))
            break
        parts.append(_chunk_hash(data[start:end]))
        start = end
    return b"".join(parts) + _row_id_bytes(row_id)


def group_key(value: Any, row_id: Any) -> bytes:
    """The order key with `prompt.group_by`: a hash of the column's value, then the row id."""
    if value is None:
        head = _ZERO
    else:
        raw = value if isinstance(value, bytes) else repr(value).encode("utf-8", "surrogatepass")
        head = _chunk_hash(raw)
    return head + _ZERO * (LEVELS - 1) + _row_id_bytes(row_id)


def error_key(row_id: Any) -> bytes:
    return _ZERO * LEVELS + _row_id_bytes(row_id)


def common_prefix_bytes(texts: Sequence[str], round_to: int = 64) -> int:
    """Bytes all `texts` share at the start, rounded down to `round_to` (0 for fewer than 2 texts)."""
    if len(texts) < 2:
        return 0
    data = [t.encode("utf-8", "surrogatepass") for t in texts]
    lo, hi = min(data), max(data)  # the common prefix of all = that of the smallest and the largest
    n = next((i for i, (x, y) in enumerate(zip(lo, hi, strict=False)) if x != y), min(len(lo), len(hi)))
    return n - n % round_to


def shared_levels(a: bytes, b: bytes) -> int:
    """How many leading chunk hashes two keys share (a trie depth; for tests and diagnostics)."""
    n = 0
    for i in range(LEVELS):
        s = slice(i * HASH_BYTES, (i + 1) * HASH_BYTES)
        if a[s] != b[s] or (a[s] == _ZERO and i > 0):  # level 0 is zero when there is no anchor
            break
        n += a[s] != _ZERO
    return n


def shared_prefix(a: Sequence[int] | np.ndarray, b: Sequence[int] | np.ndarray) -> int:
    """Length of the common prefix of two token-id prompts (lists or numpy arrays; one vector compare)."""
    x, y = np.asarray(a), np.asarray(b)
    n = min(len(x), len(y))
    diff = np.flatnonzero(x[:n] != y[:n])
    return int(diff[0]) if len(diff) else n


# ------------------------------------------------------------------------------------------- the stage


_BUILDERS: dict[str, PromptBuilder] = {}


def _builder(cfg: PromptConfig) -> PromptBuilder:
    """One builder per worker process and job, without a tokenizer (its templates compile once)."""
    key = repr(cfg)
    if key not in _BUILDERS:
        _BUILDERS[key] = PromptBuilder(cfg, None)
    return _BUILDERS[key]


def order_keys(
    block: pa.Table,
    *,
    cfg: PromptConfig,
    group_by: str | None = None,
    anchor: int = 0,
) -> pa.Table:
    """Ray Data stage: append the `order_key` binary column to a block of input rows."""
    ids = block.column("row_id").to_pylist()
    bad = block.column(INPUT_ERROR).to_pylist() if INPUT_ERROR in block.column_names else [None] * len(ids)
    if group_by is not None:
        values = block.column(group_by).to_pylist()
        keys = [error_key(i) if e else group_key(v, i) for i, v, e in zip(ids, values, bad, strict=True)]
        return block.append_column(KEY_COLUMN, pa.array(keys, pa.binary()))
    builder = _builder(cfg)
    # Text columns go through bytes so invalid UTF-8 is caught per row (as the render stage does).
    for col in cfg.text_columns:
        if col in block.column_names and pa.types.is_string(block.schema.field(col).type):
            i = block.column_names.index(col)
            block = block.set_column(i, col, block.column(col).cast(pa.binary()))
    keys = []
    for row, row_id, err in zip(block.to_pylist(), ids, bad, strict=True):
        if err:
            keys.append(error_key(row_id))
            continue
        try:
            keys.append(prefix_key(builder.message_text(row), row_id, anchor))
        except Exception:  # a RowProblem: the render stage turns it into an error row with its code
            keys.append(error_key(row_id))
    return block.append_column(KEY_COLUMN, pa.array(keys, pa.binary()))


def order_mode(job: Any) -> str:
    """'prefix', 'group' or 'none' for a JobSpec (auto = prefix grouping)."""
    order = getattr(job.prompt, "order", "auto")
    if order == "none":
        return "none"
    return "group" if getattr(job.prompt, "group_by", None) else "prefix"


def find_anchor(job: Any, sample: pa.Table) -> int:
    """The common prefix (bytes) of the message texts of up to SAMPLE_ROWS rows spread over `sample`
    (the input's first block: the same on every run, resumed or not, so keys stay deterministic)."""
    builder = _builder(PromptConfig.from_job(job))
    step = max(1, sample.num_rows // SAMPLE_ROWS)
    texts = []
    for i in range(0, min(sample.num_rows, step * SAMPLE_ROWS), step):
        try:  # row by row: a cell with invalid UTF-8 (an INVALID_UTF8 row later) must not stop the job
            texts.append(builder.message_text(sample.slice(i, 1).to_pylist()[0]))
        except Exception:  # an unrenderable sample row says nothing about the others
            continue
    return common_prefix_bytes(texts)


def _stage_kwargs(job: Any, anchor: int) -> dict[str, Any]:
    return {
        "cfg": PromptConfig.from_job(job),
        "group_by": getattr(job.prompt, "group_by", None),
        "anchor": anchor,
    }


def order_whole(table: pa.Table, *, job: Any, sample: pa.Table | None) -> pa.Table:
    """The order stage for an input one task holds whole (run.py's small inputs): the same keys and
    the same order as add_order's distributed sort, without its shuffle tasks; the anchor is found
    here, in the task."""
    group_by = getattr(job.prompt, "group_by", None)
    anchor = find_anchor(job, sample) if sample is not None and not group_by else 0
    return order_keys(table, **_stage_kwargs(job, anchor)).sort_by(KEY_COLUMN)


def add_order(ds: Any, job: Any, *, num_cpus: float, sample: pa.Table | None = None) -> Any:
    """The order stage on a Ray Data dataset of input rows (with row_id); returns the sorted dataset.
    `sample`: the input's first rows, to find the job's common prompt prefix (prefix mode only)."""
    group_by = getattr(job.prompt, "group_by", None)
    anchor = find_anchor(job, sample) if sample is not None and not group_by else 0
    ds = ds.map_batches(
        order_keys,
        batch_format="pyarrow",
        batch_size=None,
        num_cpus=num_cpus,
        fn_kwargs=_stage_kwargs(job, anchor),
    )
    return ds.sort(KEY_COLUMN)
