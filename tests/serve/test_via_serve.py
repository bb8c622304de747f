"""Batch work on the online engines: the engine replica's online-first gate (a fake engine), and a batch
job sent through the package's Serve app (`--via-serve`) compared with the same job on its own engine
actor, or refused with one clear error when no app runs."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
from pathlib import Path

import pytest

from tests.helpers import job_dict
from turbo_batch.errors import JobError

LABELS = ["positive", "negative"]


def test_online_first_gate_caps_batch_rows_while_online():
    """The engine replica lets at most batch_rows_while_online batch rows into vLLM during online traffic."""
    from turbo_batch.serve.replica import EngineReplica

    class FakeEngine:  # run_rows like Engine's: each row takes a while; records batch rows in flight
        def __init__(self):
            self.batch = 0
            self.peak_online = 0  # most batch rows in flight while an online request was in
            self.peak = 0

        async def run_rows(self, rows, task, sampling, *, priority=0, tag="row"):
            if tag == "classify":
                await asyncio.sleep(0.3)
            else:
                self.batch += len(rows)
                self.peak = max(self.peak, self.batch)
                await asyncio.sleep(0.05)
                if rep.online:
                    self.peak_online = max(self.peak_online, self.batch)
                self.batch -= len(rows)
            return [{"row_id": r["row_id"], "label": "a"} for r in rows]

        def shutdown(self):
            pass

    fake = FakeEngine()
    rep = EngineReplica.with_engine(fake, max_online=8)
    rep.reconfigure({"batch_rows_while_online": 3, "batch_resume_after_s": 0.05})
    rows = [{"row_id": i, "prompt_ids": [1], "label_ids": None} for i in range(40)]

    async def scenario():
        online = asyncio.create_task(rep.classify([{"row_id": 0}], {"type": "classify"}))
        await asyncio.sleep(0.01)
        batch = await rep.run_rows(rows, {}, {}, priority=10, tag="b")
        await online
        return batch

    out = asyncio.run(scenario())
    assert [r["row_id"] for r in out] == list(range(40))
    assert 1 <= fake.peak_online <= 3
    assert fake.peak > 3  # after the online request (and the quiet period) the batch floods in
    # rows as urgent as online ones (priority 0) are not held back
    fake.peak = fake.peak_online = 0
    asyncio.run(rep.run_rows(rows, {}, {}, priority=0, tag="b"))
    assert fake.peak == 40
    with pytest.raises(Exception, match="online requests"):  # over max_online: refused (→ 503)
        asyncio.run(rep.classify([{"row_id": i} for i in range(9)], {"type": "classify"}))


# ------------------------------------------------------------------------------------------ batch via Serve


def _write_input(path: Path, n: int) -> Path:
    words = ["great", "awful", "fine", "boring", "lovely", "bad", "superb", "meh"]
    with path.open("w") as f:
        for i in range(n):
            f.write(
                json.dumps({"id": f"r{i}", "text": f"{words[i % 8]} movie number {i} " * (1 + i % 3)}) + "\n"
            )
    return path


@pytest.mark.slow
def test_batch_via_serve_matches_own_engines(served, tiny_pool, tiny_model, out_root):
    from turbo_batch.batch.run import run_job
    from turbo_batch.batch.write import read_output
    from turbo_batch.spec import JobSpec

    inp = _write_input(out_root / "in.jsonl", 48)
    task = {"type": "classify", "labels": LABELS}
    own = JobSpec.model_validate(
        job_dict(tiny_model, inp, out_root / "own", task=task, input={"id_column": "id"})
    )
    via = JobSpec.model_validate(
        job_dict(
            tiny_model,
            inp,
            out_root / "via",
            task=task,
            input={"id_column": "id"},
            cluster={"engine_source": "serve", "serve_app": served.spec.name},
        )
    )
    s_own = run_job(own, pool=tiny_pool)
    with concurrent.futures.ThreadPoolExecutor(1) as ex:  # online traffic while the batch runs
        online = ex.submit(
            lambda: [
                served.client().chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4
                )
                for _ in range(5)
            ]
        )
        s_via = run_job(via)
        assert len(online.result()) == 5
    assert s_own["rows_ok"] == s_via["rows_ok"] == 48
    a = {r["row_id"]: r for r in read_output(out_root / "own").to_pylist()}
    b = {r["row_id"]: r for r in read_output(out_root / "via").to_pylist()}
    assert sorted(a) == sorted(b) == sorted(f"r{i}" for i in range(48))
    assert {k: v["label"] for k, v in a.items()} == {k: v["label"] for k, v in b.items()}
    assert all(v["error_code"] is None for v in b.values())
    for k in a:
        assert a[k]["probs"]["positive"] == pytest.approx(b[k]["probs"]["positive"], abs=1e-4)
    assert s_via["engines"][0]["serve_app"] == served.spec.name
    # the one replica's scheduler load over the job's window: these rows and the online requests beside them
    load = s_via["engines"][0]["load"]
    assert load["steps"] >= 1 and load["prompt_tokens"] >= sum(v["prompt_tokens"] for v in b.values())


@pytest.mark.slow
def test_batch_via_serve_without_app_is_one_clear_error(served, tiny_model, out_root):
    from turbo_batch.batch.pool import ServePool
    from turbo_batch.spec import JobSpec

    job = JobSpec.model_validate(
        job_dict(
            tiny_model, "x.jsonl", out_root / "o", cluster={"engine_source": "serve", "serve_app": "nope"}
        )
    )
    with pytest.raises(JobError, match="no Serve app named 'nope'"):
        asyncio.run(ServePool.connect(job))
