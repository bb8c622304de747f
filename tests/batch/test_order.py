"""The order stage (turbo_batch/batch/order.py): keys, the real pipeline's dispatch order, resume.

Unit tests check the key (shared prefixes sort adjacent, group_by, determinism, bounded size). The
pipeline tests run a shuffled many-prefix input (documents × questions) through real Ray + the tiny
vLLM engine with a pool that records the order in which the engine receives rows: with ordering on,
each document's rows reach the engine as one run; the outputs equal an `order: none` run; a driver
killed mid-job resumes to each row exactly once. With two fake engines (tests/batch/test_driver.py's),
affinity dispatch keeps a prefix group on one engine while it has room.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tests.helpers import job_dict
from turbo_batch.batch import order
from turbo_batch.batch import run as run_module
from turbo_batch.batch.order import (
    KEY_BYTES,
    SAMPLE_ROWS,
    common_prefix_bytes,
    group_key,
    order_keys,
    prefix_key,
    shared_levels,
    shared_prefix,
)
from turbo_batch.batch.pool import Slot
from turbo_batch.batch.run import run_job
from turbo_batch.batch.write import MANIFEST, SUCCESS, read_output
from turbo_batch.errors import SpecError
from turbo_batch.prompt import PromptConfig
from turbo_batch.spec import JobSpec, parse

DOCS, QUESTIONS = 12, 5
VOCAB = ["river", "stone", "lamp", "cloud", "market", "violin", "garden", "copper", "window", "harbor"]


def _doc(d: int, words: int = 40) -> str:
    r = random.Random(d)
    return " ".join(r.choice(VOCAB) for _ in range(words))


def _question(q: int) -> str:  # lengths differ, so a sort by length would group questions, not documents
    return "is it about " + " and ".join(VOCAB[: q + 1]) + "?"


def many_prefix_table(docs: int = DOCS, questions: int = QUESTIONS, seed: int = 0) -> pa.Table:
    rows = [
        {"doc_id": d, "doc": _doc(d), "question": _question(q)} for d in range(docs) for q in range(questions)
    ]
    random.Random(seed).shuffle(rows)
    return pa.Table.from_pylist(rows)


def runs(groups: list) -> int:
    """Number of maximal runs of equal neighbours (= number of groups when every group is contiguous)."""
    return sum(1 for i, g in enumerate(groups) if i == 0 or g != groups[i - 1])


# ---------------------------------------------------------------------------------------------- keys


def _texts(prefix: str = "System: answer yes or no.\n"):
    return [(i, prefix + _doc(i // QUESTIONS) + " Q: " + _question(i % QUESTIONS)) for i in range(60)]


@pytest.mark.parametrize("prefix", ["System: answer yes or no.\n", "x" * 10_000])
def test_rows_sharing_a_prefix_sort_adjacent(prefix):
    rows = _texts(prefix)
    random.Random(1).shuffle(rows)
    anchor = common_prefix_bytes([t for _, t in rows[:SAMPLE_ROWS]])  # what find_anchor computes
    assert len(prefix.encode()) - 64 < anchor <= len(prefix.encode())
    ordered = [i for _, i in sorted((prefix_key(t, i, anchor), i) for i, t in rows)]
    assert runs([i // QUESTIONS for i in ordered]) == DOCS  # each document's rows form one run
    assert runs([i // QUESTIONS for i, _ in rows]) > DOCS  # (the input was not already grouped)


def test_key_is_deterministic_total_and_bounded():
    rows = _texts()
    a = sorted(prefix_key(t, i) for i, t in rows)
    random.Random(2).shuffle(rows)
    b = sorted(prefix_key(t, i) for i, t in reversed(rows))
    assert a == b and len(set(a)) == len(a)  # same order from any input order, no ties
    for text in ("", "a", "é" * 3, "z" * 1_000_000):
        assert len(prefix_key(text, 7)) == KEY_BYTES
    assert len(group_key("some value " * 1000, "an id")) == KEY_BYTES
    # identical prompts are ordered by row id, numerically (negative ids too)
    same = sorted((prefix_key("same prompt", i), i) for i in (10, -3, 2, 0))
    assert [i for _, i in same] == [-3, 0, 2, 10]


def test_shared_levels_grow_with_the_shared_prefix():
    base = "p" * 5000
    assert shared_levels(prefix_key(base + "a", 1), prefix_key(base + "b", 2)) > shared_levels(
        prefix_key(base[:300] + "a" * 4700, 1), prefix_key(base + "b", 2)
    )
    assert shared_levels(prefix_key("abc", 1), prefix_key("xyz", 2)) == 0


def test_group_by_keys_group_by_value():
    vals = [("doc-" + str(i % 7), i) for i in range(70)] + [(None, 70), (None, 71)]
    random.Random(3).shuffle(vals)
    ordered = sorted((group_key(v, i), v) for v, i in vals)
    assert runs([v for _, v in ordered]) == 8


def test_shared_prefix_on_token_ids():
    import numpy as np

    assert shared_prefix(list(range(100)), [*list(range(40)), 999]) == 40
    assert shared_prefix(np.arange(50, dtype=np.int32), list(range(50))) == 50
    assert shared_prefix([], [1, 2]) == 0 and shared_prefix([5, 1], [6, 1]) == 0


def test_order_keys_stage_on_a_block(monkeypatch):
    # The key stage must not load a tokenizer (transformers imports torch: ~5 CPU-s per worker process).
    monkeypatch.setattr("turbo_batch.prompt.load_tokenizer", lambda *a, **k: pytest.fail("tokenizer loaded"))
    cfg = PromptConfig(
        task={"type": "generate"},
        text_columns=("doc", "question"),
        template="{{ doc }} {{ question }}",
        system="Answer briefly.",
        chat=False,
    )
    block = pa.table(
        {
            "row_id": pa.array([0, 1, 2, 3], pa.int64()),
            "doc": ["same doc", "same doc", "", "other"],
            "question": ["a", "b", "c", "d"],
            "_input_error": pa.array([None, None, None, "BAD_INPUT_LINE:x"], pa.string()),
        }
    )
    out = order_keys(block, cfg=cfg)
    keys = out.column("order_key").to_pylist()
    assert out.column_names == [*block.column_names, "order_key"] and out.num_rows == 4
    assert keys[0] == prefix_key("Answer briefly.\n\nsame doc a", 0)
    assert keys[1] == prefix_key("Answer briefly.\n\nsame doc b", 1)
    assert keys[2] == order.error_key(2) and keys[3] == order.error_key(3)  # empty text, bad input line
    # A chat job keys on the same message text: the chat template (and so the tokenizer) is not needed.
    assert order_keys(block, cfg=dataclasses.replace(cfg, chat=True)).column("order_key").to_pylist() == keys
    grouped = order_keys(block, cfg=cfg, group_by="doc")
    g = grouped.column("order_key").to_pylist()
    assert g[0][:4] == g[1][:4] != g[2][:4] and g[3] == order.error_key(3)


def test_spec_fields_and_errors(tmp_path, monkeypatch):
    from turbo_batch.batch.plan import preflight

    base = job_dict(tmp_path, tmp_path / "in.parquet", "out")
    assert parse(JobSpec, base).prompt.order == "auto"
    with pytest.raises(SpecError) as e:
        parse(JobSpec, {**base, "prompt": {"order": "sorted"}})
    assert "prompt.order" in str(e.value)
    with pytest.raises(SpecError) as e:
        parse(JobSpec, {**base, "prompt": {"order": "none", "group_by": "doc_id"}})
    assert "prompt.group_by" in str(e.value)
    # ordering changes no output: a job resumes across a change of prompt.order
    assert (
        parse(JobSpec, base).fingerprint()
        == parse(JobSpec, {**base, "prompt": {"order": "none"}}).fingerprint()
    )
    pq.write_table(pa.table({"text": ["a", "b"]}), tmp_path / "in.parquet")
    monkeypatch.setenv("TURBO_BATCH_OUTPUT_ROOT", str(tmp_path))
    with pytest.raises(SpecError) as e:
        preflight(parse(JobSpec, {**base, "prompt": {"group_by": "doc_id"}}))
    assert "prompt.group_by: column 'doc_id' is not in the input" in str(e.value)


# ------------------------------------------------------------------------------------ real pipeline


class RecordingPool:
    """The session's real engine pool, recording the row ids each engine call carries, in call order."""

    def __init__(self, pool):
        self.received: list = []
        self.start_s = 0.0
        self.slots = [Slot(s.name, self._wrap(s.call), s.info, s.capacity, ping=s.ping) for s in pool.slots]

    def _wrap(self, call):
        async def recorded(rows, *args, **kw):
            self.received.extend(r["row_id"] for r in rows)
            return await call(rows, *args, **kw)

        return recorded

    async def close(self, force: bool = False) -> None:
        return None


def _job(tiny_model, inp, out, **prompt):
    return JobSpec.model_validate(
        job_dict(
            tiny_model,
            inp,
            out,
            task={"type": "classify", "labels": ["yes", "no"]},
            input={"text_columns": ["doc", "question"]},
            prompt={"template": "Document: {{ doc }}\nQuestion: {{ question }}", **prompt},
            output={"keep_columns": ["doc_id"]},
        )
    )


def test_shuffled_many_prefix_input_runs_grouped_with_the_same_outputs(
    tiny_pool, tiny_model, out_root, monkeypatch
):
    table = many_prefix_table()
    pq.write_table(table, out_root / "in.parquet", row_group_size=25)  # 3 read blocks: a global sort
    doc_of = dict(enumerate(table.column("doc_id").to_pylist()))
    results, received, ids = {}, {}, {}
    modes = (
        ("none", {"order": "none"}, 0),
        ("auto", {}, 0),  # SMALL_INPUT_ROWS 0: a read task per row group and Ray Data's distributed sort
        ("group_by", {"group_by": "doc_id"}, 0),
        ("auto-one-task", {}, None),  # the small-input path: read, order and render in one task
        ("group_by-one-task", {"group_by": "doc_id"}, None),
    )
    default = run_module.SMALL_INPUT_ROWS
    for name, prompt, small_rows in modes:
        monkeypatch.setattr(run_module, "SMALL_INPUT_ROWS", default if small_rows is None else small_rows)
        pool = RecordingPool(tiny_pool)
        summary = run_job(_job(tiny_model, out_root / "in.parquet", name, **prompt), pool=pool)
        assert summary["rows_ok"] == len(doc_of)
        results[name] = {r["row_id"]: r for r in read_output(out_root / name).to_pylist()}
        received[name] = [doc_of[i] for i in pool.received]
        ids[name] = list(pool.received)
        assert sorted(pool.received) == sorted(doc_of)
    assert runs(received["none"]) > 2 * DOCS  # input order (blockwise length sort): documents interleave
    assert runs(received["auto"]) == DOCS  # prefix order: each document's rows reach the engine together
    assert runs(received["group_by"]) == DOCS
    # one task orders exactly as the distributed sort does: the same rows in the same sequence
    assert ids["auto-one-task"] == ids["auto"] and ids["group_by-one-task"] == ids["group_by"]
    for name in ("auto", "group_by", "auto-one-task", "group_by-one-task"):
        assert results[name].keys() == results["none"].keys()
        for rid, row in results["none"].items():
            other = results[name][rid]
            assert other["label"] == row["label"] and other["doc_id"] == row["doc_id"] == doc_of[rid]
            assert all(abs(other["probs"][k] - row["probs"][k]) < 1e-4 for k in row["probs"])


def test_engine_reports_its_kv_cache_size(tiny_pool):
    info = tiny_pool.slots[0].info
    # TINY_ENGINE: kv_cache_memory_bytes 256 MiB over the tiny model's small KV → a large token count
    assert isinstance(info["kv_cache_tokens"], int) and info["kv_cache_tokens"] >= 1024


def _cli(root: Path, job: Path, fault: str | None = None):
    env = {**os.environ, "TURBO_BATCH_OUTPUT_ROOT": str(root)}
    env.pop("TURBO_BATCH_FAULT", None)
    if fault:
        env["TURBO_BATCH_FAULT"] = fault
    cmd = [sys.executable, "-m", "turbo_batch.cli", "run", str(job), "--quiet"]
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)


def test_ordered_job_killed_mid_way_resumes_exactly_once(ray_session, tiny_model, tmp_path):
    """SIGKILL of the driver after its 2nd committed part (ordering on), rerun: every row once, and
    the texts equal those of an unordered run on the same engine."""
    table = many_prefix_table(seed=5)
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=20)
    base = job_dict(
        tiny_model,
        tmp_path / "in.parquet",
        "x",
        task={"type": "generate", "max_tokens": 4},
        input={"text_columns": ["doc", "question"]},
        prompt={"template": "Document: {{ doc }}\nQuestion: {{ question }}"},
        output={"part_rows": 10},
        cluster={
            "address": ray_session.get_runtime_context().gcs_address,
            "reuse_engines": True,
            "engines": 1,
        },
    )
    jobs = {}
    for name, prompt in (("plain", {"order": "none"}), ("killed", {})):
        data = {**base, "prompt": {**base["prompt"], **prompt}, "output": {**base["output"], "dir": name}}
        jobs[name] = tmp_path / f"{name}.yaml"
        jobs[name].write_text(yaml.safe_dump(data))
    try:
        r = _cli(tmp_path, jobs["plain"])
        assert r.returncode == 0, r.stderr[-2000:]
        r = _cli(tmp_path, jobs["killed"], fault="after_rename:2")
        assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-2000:])
        out = tmp_path / "killed"
        before = [
            i for p in out.glob("part-*.parquet") for i in pq.read_table(p).column("row_id").to_pylist()
        ]
        assert 0 < len(before) < table.num_rows and not (out / SUCCESS).exists()
        r = _cli(tmp_path, jobs["killed"])
        assert r.returncode == 0, r.stderr[-2000:]
    finally:
        for actor in ray_session.util.list_named_actors(all_namespaces=True):
            if actor["name"].startswith("tb-engine-"):
                ray_session.kill(ray_session.get_actor(actor["name"], namespace=actor["namespace"]))
    parts = sorted(p.name for p in out.glob("part-*.parquet"))
    listed = [json.loads(x)["part"] for x in (out / MANIFEST).read_text().splitlines() if x.strip()]
    assert sorted(listed) == parts
    got = read_output(out).to_pylist()
    ids = [r["row_id"] for r in got]
    assert len(ids) == len(set(ids)) and sorted(ids) == list(range(table.num_rows))
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["rows_skipped_already_committed"] == len(before)
    plain = {r["row_id"]: r["text"] for r in read_output(tmp_path / "plain").to_pylist()}
    assert {r["row_id"]: r["text"] for r in got} == plain


# ------------------------------------------------------------------------ affinity dispatch (fake engines)


def _grouped_block(groups: int, per_group: int) -> pa.Table:
    """Rendered rows in prefix order: a 20-token common head, a 200-token prefix per group, a unique tail."""
    rows = []
    for g in range(groups):
        for k in range(per_group):
            ids = list(range(20)) + [1000 + g] * 200 + [5000 + k] * 5
            rows.append({"row_id": g * per_group + k, "prompt_ids": ids, "label_ids": [1, 2], "budget": 1,
                         "prompt_tokens": len(ids), "error_code": None, "error_message": None})  # fmt: skip
    return pa.Table.from_pylist(rows)


@pytest.mark.parametrize("order_setting", ["auto", "none"])
def test_a_prefix_group_sticks_to_one_engine_while_it_has_room(tmp_path, order_setting):
    import asyncio
    from types import SimpleNamespace

    from tests.batch.test_driver import RENDERED, FakeEngine, finish
    from turbo_batch.batch.driver import Driver
    from turbo_batch.batch.plan import Plan
    from turbo_batch.batch.write import OutputDir

    groups, per_group = 6, 40

    async def run():
        a, b = FakeEngine("a", 1000, capacity=64), FakeEngine("b", 1000, capacity=64)
        data = job_dict(
            tmp_path / "m", "unused", "out", cluster={"batch_rows": 8}, prompt={"order": order_setting}
        )
        job = JobSpec.model_validate(data)
        plan = Plan(job, [], [], ["text"], [], tmp_path / "out", 0, "fp")
        d = Driver(
            job,
            plan,
            SimpleNamespace(slots=[a.slot, b.slot], start_s=0.0),
            OutputDir(tmp_path / "out", "fp", {}).open(),
        )
        d.results.set_schema(RENDERED)
        q: asyncio.Queue = asyncio.Queue()
        for blk in (_grouped_block(groups, per_group), None):
            q.put_nowait(blk)
        await d.consume(q)
        got = await finish(d)
        return a, b, got

    a, b, got = asyncio.run(run())
    assert sorted(got) == list(range(groups * per_group))
    placed = {(i // per_group, e.name) for e in (a, b) for batch in e.batches for i in batch}
    assert a.batches and b.batches  # both engines work
    if order_setting == "none":
        assert len(placed) == 2 * groups  # least loaded alternates: every group is split over both
    else:
        assert len(placed) <= groups + 2  # a group stays on one engine, but for a spill when it is full
