"""Exactly-once output: parquet parts committed atomically, a manifest, a success marker last.

Layout of an output dir:
    _job.json                the job's fingerprint and spec (a rerun with another meaning is refused)
    _tmp/                    parts being written (never read; emptied when a run opens the dir)
    part-r003-00012.parquet  committed parts: written under _tmp/, fsynced, renamed into place
    _manifest.jsonl          one line per committed part: its name, row count and row_ids
    _summary.json, _SUCCESS  written last, only when every input row is committed

The commit point of a part is its rename: a part is complete once visible. The manifest line follows
the rename; a run killed between the two leaves a complete part without a manifest line, which the
next run adopts (reads its row_ids and appends the line) before it computes what is left to do. So
readers never see a partial part, a crash costs only the rows in flight, and no row is written twice.
`TURBO_BATCH_FAULT=<point>:<n>` kills the process (SIGKILL) the n-th time it reaches a point, or
raises a disk error, for the tests that prove this. This module knows nothing of Ray or vLLM.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from turbo_batch.errors import OutputError

MANIFEST = "_manifest.jsonl"
JOB = "_job.json"
SUCCESS = "_SUCCESS"
SUMMARY = "_summary.json"
TMP = "_tmp"
# Files derived from the parts (timeline, report, OpenAI batch output): removed by --restart.
DERIVED = ("_timeline.jsonl", "_report.html", "openai_batch_output.jsonl")
FAULT_POINTS = ("before_rename", "after_rename", "after_manifest", "before_success", "enospc", "erofs")

_fault_hits: Counter[str] = Counter()


def fault(point: str) -> None:
    """Fault injection for tests: TURBO_BATCH_FAULT='after_rename:3' (comma-separated allowed)."""
    spec = os.environ.get("TURBO_BATCH_FAULT")
    if not spec:
        return
    for item in spec.split(","):
        name, _, nth = item.partition(":")
        if name != point:
            continue
        _fault_hits[point] += 1
        if _fault_hits[point] >= int(nth or 1):
            if point == "enospc":
                raise OSError(errno.ENOSPC, "No space left on device (injected)")
            if point == "erofs":
                raise OSError(errno.EROFS, "Read-only file system (injected)")
            os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def encode_ids(ids: pa.Array) -> dict[str, Any]:
    """Compact row_id list for the manifest: sorted int ranges, or the string ids as they are."""
    if pa.types.is_integer(ids.type):
        values = sorted(ids.to_pylist())
        ranges: list[list[int]] = []
        for v in values:
            if ranges and ranges[-1][1] == v:
                ranges[-1][1] = v + 1
            else:
                ranges.append([v, v + 1])
        return {"int_ranges": ranges}
    return {"ids": ids.to_pylist()}


def decode_ids(entry: dict[str, Any]) -> list[Any]:
    if "int_ranges" in entry:
        return [i for a, b in entry["int_ranges"] for i in range(a, b)]
    return list(entry["ids"])


def _describe_oserror(e: OSError, where: Path) -> str:
    why = {
        errno.ENOSPC: "the disk is full",
        errno.EROFS: "the file system is read-only",
        errno.EACCES: "permission denied",
        errno.EDQUOT: "disk quota exceeded",
    }.get(e.errno or 0, str(e))
    return f"cannot write output to {where}: {why}. Nothing partial is visible; fix it and rerun to resume."


class OutputDir:
    """One job's output directory, opened for a run (resume, restart, or fresh)."""

    def __init__(self, path: Path, fingerprint: str, job: dict[str, Any]):
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.job = job
        self.run_no = 0
        self.seq = 0
        self.schema: pa.Schema | None = None
        self.entries: list[dict[str, Any]] = []
        self.adopted = 0

    # -- opening ------------------------------------------------------------------------------------
    def open(self, *, restart: bool = False, force: bool = False) -> OutputDir:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            job_file = self.path / JOB
            if restart:
                self._clear()
            elif job_file.is_file():
                old = json.loads(job_file.read_text())
                if old.get("fingerprint") != self.fingerprint and not force:
                    raise OutputError(
                        f"{self.path} holds output of a different job (fingerprint {old.get('fingerprint')}, "
                        f"this job {self.fingerprint}): its input, task, prompt, model or sampling changed. "
                        "Use --restart to start over or --force to resume anyway."
                    )
            elif any(self.path.glob("part-*.parquet")):
                raise OutputError(
                    f"{self.path} has parts but no {JOB}: not a turbo-batch output dir; use --restart"
                )
            shutil.rmtree(self.path / TMP, ignore_errors=True)
            (self.path / TMP).mkdir()
            self.entries = self._read_manifest()
            self._adopt_orphans()
            self.run_no = 1 + max((e.get("run", 0) for e in self.entries), default=0)
            if self.entries:  # later parts keep the schema of the first, so the dir reads as one table
                self.schema = pq.read_schema(self.path / self.entries[0]["part"])
            for name in (SUCCESS, SUMMARY):  # a resumed run is not complete until it says so again
                (self.path / name).unlink(missing_ok=True)
            self._write_atomic(
                job_file,
                json.dumps(
                    {"fingerprint": self.fingerprint, "job": self.job, "updated": time.time()},
                    indent=2,
                    default=str,
                ).encode(),
            )
        except OSError as e:
            raise OutputError(_describe_oserror(e, self.path)) from None
        return self

    def _clear(self) -> None:
        for p in self.path.glob("part-*.parquet"):
            p.unlink()
        for name in (MANIFEST, JOB, SUCCESS, SUMMARY, *DERIVED):
            (self.path / name).unlink(missing_ok=True)
        shutil.rmtree(self.path / TMP, ignore_errors=True)

    def _read_manifest(self) -> list[dict[str, Any]]:
        path = self.path / MANIFEST
        if not path.is_file():
            return []
        entries = []
        torn = False
        for line in path.read_text().splitlines():
            try:
                entries.append(json.loads(line))
            except ValueError:  # a torn last line from a crash mid-append: its part gets adopted
                torn = True
        listed = {e["part"] for e in entries}
        # A manifest line whose file is gone (deleted by hand) no longer counts as committed.
        kept = list({e["part"]: e for e in entries if (self.path / e["part"]).is_file()}.values())
        if torn or len(kept) != len(entries) or len(listed) != len(entries):
            self._rewrite_manifest(kept)
        return kept

    def _rewrite_manifest(self, entries: list[dict[str, Any]]) -> None:
        data = "".join(json.dumps(e) + "\n" for e in entries).encode()
        self._write_atomic(self.path / MANIFEST, data)

    def _adopt_orphans(self) -> None:
        listed = {e["part"] for e in self.entries}
        for part in sorted(self.path.glob("part-*.parquet")):
            if part.name in listed:
                continue
            ids = pq.read_table(part, columns=["row_id"]).column("row_id").combine_chunks()
            entry = {"part": part.name, "rows": len(ids), "run": _run_of(part.name), **encode_ids(ids)}
            self._append_manifest(entry)
            self.entries.append(entry)
            self.adopted += 1

    # -- state ----------------------------------------------------------------------------------------
    def committed_ids(self) -> pa.Array | None:
        ids = [i for e in self.entries for i in decode_ids(e)]
        if not ids:
            return None
        return pa.array(ids, pa.int64() if isinstance(ids[0], int) else pa.string())

    @property
    def committed_rows(self) -> int:
        return sum(e["rows"] for e in self.entries)

    # -- writing --------------------------------------------------------------------------------------
    def commit(self, table: pa.Table) -> str:
        """Write one part atomically and record it; returns the part's name."""
        if table.num_rows == 0:
            return ""
        if self.schema is None:
            self.schema = table.schema
        else:
            table = table.select(self.schema.names).cast(self.schema)
        self.seq += 1
        name = f"part-r{self.run_no:03d}-{self.seq:05d}.parquet"
        tmp = self.path / TMP / f"{name}.{uuid.uuid4().hex[:8]}"
        try:
            fault("enospc")
            fault("erofs")
            with open(tmp, "wb") as fh:
                pq.write_table(table, fh, compression="zstd")
                fh.flush()
                os.fsync(fh.fileno())
            fault("before_rename")
            os.replace(tmp, self.path / name)
            _fsync_dir(self.path)
            fault("after_rename")
            entry = {
                "part": name,
                "rows": table.num_rows,
                "run": self.run_no,
                **encode_ids(table.column("row_id").combine_chunks()),
            }
            self._append_manifest(entry)
            self.entries.append(entry)
            fault("after_manifest")
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise OutputError(_describe_oserror(e, self.path)) from None
        return name

    def _append_manifest(self, entry: dict[str, Any]) -> None:
        with open(self.path / MANIFEST, "ab") as fh:
            fh.write((json.dumps(entry) + "\n").encode())
            fh.flush()
            os.fsync(fh.fileno())

    def _write_atomic(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)

    def finish(self, summary: dict[str, Any]) -> None:
        """Write the summary, then the success marker: the last file of a complete job."""
        try:
            self._write_atomic(self.path / SUMMARY, json.dumps(summary, indent=2, default=str).encode())
            fault("before_success")
            self._write_atomic(self.path / SUCCESS, json.dumps({"fingerprint": self.fingerprint}).encode())
            shutil.rmtree(self.path / TMP, ignore_errors=True)
        except OSError as e:
            raise OutputError(_describe_oserror(e, self.path)) from None

    def write_summary(self, summary: dict[str, Any]) -> None:
        """Summary of an incomplete run (no success marker)."""
        with contextlib.suppress(OSError):
            self._write_atomic(self.path / SUMMARY, json.dumps(summary, indent=2, default=str).encode())


def _run_of(name: str) -> int:
    try:
        return int(name.split("-")[1][1:])
    except (IndexError, ValueError):
        return 0


def read_output(path: str | Path) -> pa.Table:
    """All committed parts of an output dir (the manifest's parts only), as one table."""
    path = Path(path)
    names = [json.loads(line)["part"] for line in (path / MANIFEST).read_text().splitlines() if line.strip()]
    tables = [pq.read_table(path / n) for n in names]
    return pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})
