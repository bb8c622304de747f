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


# -- names, manifest encoding and adoption, exactly -----------------------------------------------------


def _manifest(path):
    return [json.loads(x) for x in (path / MANIFEST).read_text().splitlines()]


def test_part_names_count_up_within_a_run_and_runs_count_up_across_opens(tmp_path):
    out = OutputDir(tmp_path, "fp", {}).open()
    assert out.run_no == 1
    assert [out.commit(_t([0])), out.commit(_t([1])), out.commit(_t([]))] == [
        "part-r001-00001.parquet",
        "part-r001-00002.parquet",
        "",  # nothing to commit, no part
    ]
    again = OutputDir(tmp_path, "fp", {}).open()
    assert again.run_no == 2 and again.commit(_t([2])) == "part-r002-00001.parquet"
    assert _manifest(tmp_path) == [
        {"part": "part-r001-00001.parquet", "rows": 1, "run": 1, "int_ranges": [[0, 1]]},
        {"part": "part-r001-00002.parquet", "rows": 1, "run": 1, "int_ranges": [[1, 2]]},
        {"part": "part-r002-00001.parquet", "rows": 1, "run": 2, "int_ranges": [[2, 3]]},
    ]
    assert sorted(p.name for p in tmp_path.glob("part-*")) == [e["part"] for e in _manifest(tmp_path)]


def test_encode_ids_exact():
    assert encode_ids(pa.array([7, 1, 2, 3, 9, 10], pa.int64())) == {"int_ranges": [[1, 4], [7, 8], [9, 11]]}
    assert encode_ids(pa.array([], pa.int64())) == {"int_ranges": []}
    assert encode_ids(pa.array(["b", "a", "b2"])) == {"ids": ["b", "a", "b2"]}  # strings kept as given
    assert decode_ids({"int_ranges": [[1, 4], [7, 8]]}) == [1, 2, 3, 7]
    assert decode_ids({"ids": ["z", "y"]}) == ["z", "y"]


def test_adopted_orphan_gets_its_run_number_and_ids(tmp_path):
    out = OutputDir(tmp_path, "fp", {}).open()
    out.commit(_t([0, 1]))
    out.commit(_t([4, 2, 3]))
    (tmp_path / MANIFEST).write_text(json.dumps(_manifest(tmp_path)[0]) + "\n")  # second line never written
    again = OutputDir(tmp_path, "fp", {}).open()
    assert again.adopted == 1 and again.committed_rows == 5 and again.run_no == 2
    assert _manifest(tmp_path)[1] == {
        "part": "part-r001-00002.parquet",
        "rows": 3,
        "run": 1,
        "int_ranges": [[2, 5]],
    }
    # adopted once: a third open has nothing left to adopt
    assert OutputDir(tmp_path, "fp", {}).open().adopted == 0 and len(_manifest(tmp_path)) == 2


def test_manifest_line_of_a_deleted_part_no_longer_counts_and_duplicates_collapse(tmp_path):
    out = OutputDir(tmp_path, "fp", {}).open()
    out.commit(_t([0, 1]))
    out.commit(_t([2]))
    lines = (tmp_path / MANIFEST).read_text().splitlines()
    (tmp_path / MANIFEST).write_text("\n".join([lines[0], lines[0], lines[1]]) + "\n")
    (tmp_path / "part-r001-00002.parquet").unlink()
    again = OutputDir(tmp_path, "fp", {}).open()
    assert again.committed_ids().to_pylist() == [0, 1] and again.adopted == 0
    assert [e["part"] for e in _manifest(tmp_path)] == ["part-r001-00001.parquet"]


def test_parts_without_a_job_file_are_refused(tmp_path):
    (tmp_path / "part-r001-00001.parquet").write_bytes(b"x")
    with pytest.raises(OutputError, match="not a turbo-batch output dir"):
        OutputDir(tmp_path, "fp", {}).open()


def test_reopen_clears_success_and_keeps_the_first_parts_schema(tmp_path):
    out = OutputDir(tmp_path, "fp", {"name": "j"}).open()
    out.commit(_t([0]))
    out.finish({"rows": 1})
    again = OutputDir(tmp_path, "fp", {}).open()
    assert not (tmp_path / SUCCESS).exists() and not (tmp_path / "_summary.json").exists()
    # a later part with another column order and a narrower type is written in the first part's schema
    again.commit(pa.table({"label": ["l1"], "row_id": pa.array([1], pa.int32())}))
    assert read_output(tmp_path).schema == _t([0]).schema
    assert json.loads((tmp_path / "_job.json").read_text())["fingerprint"] == "fp"


def test_string_ids_roundtrip_through_the_manifest(tmp_path):
    out = OutputDir(tmp_path, "fp", {}).open()
    out.commit(pa.table({"row_id": ["u2", "u1"], "label": ["a", "b"]}))
    again = OutputDir(tmp_path, "fp", {}).open()
    assert again.committed_ids().to_pylist() == ["u2", "u1"] and again.committed_ids().type == pa.string()
