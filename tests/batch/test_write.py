"""The output commit protocol on its own: atomic parts, manifest, adoption, refusal, disk errors."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from turbo_batch.batch.write import MANIFEST, SUCCESS, OutputDir, decode_ids, encode_ids, read_output
from turbo_batch.errors import OutputError


def _t(ids):
    return pa.table({"row_id": pa.array(ids, pa.int64()), "label": [f"l{i}" for i in ids]})


def test_commit_manifest_success(tmp_path):
    out = OutputDir(tmp_path / "o", "fp1", {}).open()
    out.commit(_t([0, 1, 2]))
    out.commit(_t([5, 3]))
    assert sorted(out.committed_ids().to_pylist()) == [0, 1, 2, 3, 5]
    assert not (tmp_path / "o" / SUCCESS).exists()
    out.finish({"ok": True})
    assert (tmp_path / "o" / SUCCESS).exists()
    assert not (tmp_path / "o" / "_tmp").exists()
    assert sorted(read_output(tmp_path / "o").column("row_id").to_pylist()) == [0, 1, 2, 3, 5]


def test_ids_roundtrip():
    assert decode_ids(encode_ids(pa.array([7, 1, 2, 3, 9], pa.int64()))) == [1, 2, 3, 7, 9]
    assert decode_ids(encode_ids(pa.array(["b", "a"]))) == ["b", "a"]


def test_resume_adopts_complete_part_missing_from_manifest(tmp_path):
    out = OutputDir(tmp_path, "fp", {}).open()
    out.commit(_t([0, 1]))
    out.commit(_t([2, 3]))
    # A crash after the rename of the second part but before its manifest line:
    lines = (tmp_path / MANIFEST).read_text().splitlines()
    (tmp_path / MANIFEST).write_text(lines[0] + "\n" + lines[1][:10])  # torn last line
    again = OutputDir(tmp_path, "fp", {}).open()
    assert again.adopted == 1
    assert sorted(again.committed_ids().to_pylist()) == [0, 1, 2, 3]
    assert again.run_no == 2
    again.commit(_t([4]))
    names = [json.loads(x)["part"] for x in (tmp_path / MANIFEST).read_text().splitlines()]
    assert len(names) == len(set(names)) == 3


def test_changed_job_is_refused_unless_forced_or_restarted(tmp_path):
    OutputDir(tmp_path, "fp-a", {}).open().commit(_t([0]))
    with pytest.raises(OutputError, match="different job"):
        OutputDir(tmp_path, "fp-b", {}).open()
    assert OutputDir(tmp_path, "fp-b", {}).open(force=True).committed_rows == 1
    fresh = OutputDir(tmp_path, "fp-b", {}).open(restart=True)
    assert fresh.committed_rows == 0 and not list(tmp_path.glob("part-*"))


def test_temp_files_never_visible_and_cleared(tmp_path):
    out = OutputDir(tmp_path, "fp", {}).open()
    (tmp_path / "_tmp" / "part-r001-00009.parquet.dead").write_bytes(b"partial")
    OutputDir(tmp_path, "fp", {}).open()
    assert list((tmp_path / "_tmp").iterdir()) == []
    del out


@pytest.mark.parametrize(("fault", "why"), [("enospc:2", "the disk is full"), ("erofs:1", "read-only")])
def test_disk_errors_are_clear_and_leave_nothing_partial(tmp_path, monkeypatch, fault, why):
    monkeypatch.setattr("turbo_batch.batch.write._fault_hits", __import__("collections").Counter())
    monkeypatch.setenv("TURBO_BATCH_FAULT", fault)
    out = OutputDir(tmp_path, "fp", {}).open()
    if fault.startswith("enospc"):
        out.commit(_t([0, 1]))
    with pytest.raises(OutputError, match=why):
        out.commit(_t([2, 3]))
    assert list((tmp_path / "_tmp").iterdir()) == []
    monkeypatch.delenv("TURBO_BATCH_FAULT")
    again = OutputDir(tmp_path, "fp", {}).open()
    assert again.committed_ids() is None or sorted(again.committed_ids().to_pylist()) == [0, 1]


def test_unwritable_output_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="cannot write output"):
        OutputDir(blocker / "sub", "fp", {}).open()
