"""bench_batch.py's generation and 20-label presets stay runnable: a dry run builds the rows, job files
and token ids (no engine), and generate_<family>.json gathers the generate presets' figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from turbo_batch.spec import JobSpec

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


OVER = {"cluster": {"rows_in_flight": 1024, "batch_rows": 256}}


def test_dry_run_of_the_generate_and_20_label_presets(tmp_path):
    from bench.common import LABEL_FILL, LABEL_HEADS

    presets = ["cpu-gen-200", "cpu-gen-10", "cpu-20labels", "gpu-gen-200", "gpu-gen-10", "gpu-20labels",
               "gpu-20labels-smollm2"]  # fmt: skip
    r = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_batch.py"), "--preset", ",".join(presets),
         "--rows", "12", "--dry-run", "--workdir", str(tmp_path / "w"), "--results-dir", str(tmp_path / "r"),
         "--turbo-job", json.dumps(OVER)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("variants that would run: raw, turbo\n") == 4
    assert r.stdout.count("variants that would run: raw, raw_guided, turbo, ray_data_llm") == 3
    for p in presets:
        w = tmp_path / "w" / p
        job = JobSpec.model_validate(yaml.safe_load((w / "job.yaml").read_text()))
        plan = json.loads((w / "plan.json").read_text())
        # --turbo-job reaches turbo-batch's job only, and the plan says so (a merge keeps such runs apart)
        assert job.cluster.rows_in_flight == 1024 and job.cluster.batch_rows == 256
        assert plan["turbo_job_override"] == OVER
        assert pq.read_table(w / "rendered.parquet").num_rows == 12
        if "gen" in p:
            assert job.task.type == "generate" and job.task.max_tokens == int(p.rsplit("-", 1)[1])
            assert job.sampling.extra == {"ignore_eos": True} and job.sampling.temperature == 0.0
        else:
            ids = plan["label_first_token_ids"]
            assert job.task.type == "classify" and len(job.task.labels) == 20 and len(set(ids)) == 20
            labels = list(job.task.labels)
            assert all(n >= 6 for n in plan["label_tokens"])  # whole words up to >= 6 tokens
            if p == "gpu-20labels-smollm2":  # the trained model's tokenizer: exactly 6 each
                assert plan["label_tokens"] == [6] * 20
            assert all(lab.split(" ")[-1] in (*LABEL_HEADS, *LABEL_FILL) for lab in labels)  # whole words
            # guided choice can finish any spelling of the longest label (one token per character) + the end
            assert plan["guided_sampling"]["max_tokens"] == max(len(lab) for lab in labels) + 1
    gpu = [json.loads((tmp_path / "w" / p / "plan.json").read_text())["engine_args"] for p in presets[3:]]
    assert gpu[0] == gpu[1] == gpu[2]  # so one raw vLLM engine serves every GPU preset
    assert not (tmp_path / "r").exists()  # a dry run records nothing


def test_generate_summary_gathers_both_presets(tmp_path):
    from bench.report import write_generate_summary

    for n, (raw, turbo) in {"200": (60.0, 59.0), "10": (200.0, 210.0)}.items():
        d = {
            "preset": f"gpu-gen-{n}", "date": "today", "machine": {"gpu": "H200"},
            "plan": {"rows": 10, "prompt_tokens": {"mean": 1024.0}, "sampling": {"max_tokens": int(n)}},
            "results": {"raw": {"rows_per_s": raw, "timed_s": 20.0}, "turbo": {"rows_per_s": turbo, "timed_s": 20.0}},
        }  # fmt: skip
        (tmp_path / f"batch_gpu-gen-{n}.json").write_text(json.dumps(d))
    out = json.loads(write_generate_summary(tmp_path, "gpu").read_text())
    assert out["gen-200"]["raw_rows_s"] == 60.0 and out["gen-200"]["turbo_rows_s"] == 59.0
    assert abs(out["gen-200"]["ratio"] - 59 / 60) < 1e-9 and abs(out["gen-10"]["ratio"] - 1.05) < 1e-9


def test_first_sets_which_variant_runs_first(tmp_path, monkeypatch):
    """--first raw | turbo | alternate: the order of raw vLLM and turbo-batch within each repeat (the
    GPU's pace drifts within a lease, so commands alternate which goes first); every run gets the GPU
    samples of its own window."""
    import argparse

    import bench.turbo
    import bench_batch

    order: list[str] = []

    def fake_raw(root, what, args, timeout):
        order.append("raw")
        return [
            {"preset": "p", "variant": "raw", "rows_per_s": 1.0, "timed_s": 1.0, "window": [1.0, 2.0]}
        ], 1.0

    def fake_turbo(workdir, plan):
        order.append("turbo")
        return {"variant": "turbo", "rows_per_s": 1.0, "timed_s": 1.0, "window": [3.0, 4.0]}

    class Gpu:
        def between(self, t0, t1):
            return {"window": [t0, t1]}

    monkeypatch.setattr(bench_batch, "run_child_all", fake_raw)
    monkeypatch.setattr(bench.turbo, "run_turbo", fake_turbo)
    monkeypatch.setattr(bench_batch, "agreement", lambda *a: {})
    monkeypatch.setattr(bench_batch, "log", lambda *a: None)
    dirs, plans = {"p": tmp_path}, {"p": {"engine_args": {}}}
    for first, want in (("raw", ["raw", "turbo"] * 2), ("turbo", ["turbo", "raw"] * 2),
                        ("alternate", ["raw", "turbo", "turbo", "raw"])):  # fmt: skip
        order.clear()
        args = argparse.Namespace(repeat=2, first=first, workdir_root=str(tmp_path), timeout=1, gpu=Gpu())
        runs = bench_batch.run_all(args, ["p"], dirs, plans, {"p": ["raw", "turbo"]}, {})
        assert order == want, first
        assert [r["gpu"]["window"] for r in runs["p"]["turbo"]] == [[3.0, 4.0]] * 2


def test_rendered_rows_are_reused_only_for_the_same_job_rows_and_tokenizer(tmp_path):
    """bench/prepare.py keeps a workdir's rendered token ids for the next device command of the same
    job (20,000 SmolLM2 rows took ~50 s to render on the H200 host, in each of two commands); another
    job, other rows or a changed tokenizer file renders again, and files a render left behind without
    finishing are never taken."""
    import pyarrow as pa
    from bench.prepare import _cached_render, _render_id, _render_key

    def cached(job, rows, warm, model):
        return _cached_render(tmp_path, _render_id(job, rows, warm, model))

    def key(job, rows, warm, model, took):
        return _render_key(tmp_path, _render_id(job, rows, warm, model), took)

    model = tmp_path / "m"
    model.mkdir()
    (model / "tokenizer.json").write_text("{}")
    job, rows, warm = {"prompt": {"system": "a"}}, pa.table({"id": [1, 2], "text": ["x", "y"]}), pa.table({"id": [3], "text": ["z"]})  # fmt: skip
    made = {"rendered": [{"row_id": 1, "prompt_ids": [5, 6]}, {"row_id": 2, "prompt_ids": [7]}],
            "warmup": [{"row_id": 3, "prompt_ids": [8]}]}  # fmt: skip
    assert cached(job, rows, warm, model) is None
    for part, rs in made.items():
        pq.write_table(pa.Table.from_pylist(rs), tmp_path / f"{part}.parquet")
    assert key(job, rows, warm, model, 1.5) == 1.5
    assert cached(job, rows, warm, model) == made
    assert key(job, rows, warm, model, 0.01) == 1.5  # a reuse reports the render's time
    assert cached(job, pa.table({"id": [1, 2], "text": ["x", "Y"]}), warm, model) is None
    assert not (tmp_path / "rendered.key").exists()  # a miss drops the key: half-written files are no one's
    key(job, rows, warm, model, 1.5)
    assert cached({"prompt": {"system": "b"}}, rows, warm, model) is None
    key(job, rows, warm, model, 1.5)
    (model / "tokenizer.json").write_text('{"changed": 1}')
    assert cached(job, rows, warm, model) is None


def test_turbo_job_override_takes_cluster_settings_only():
    """--turbo-job: settings that would change what raw vLLM runs are refused (the dry run above shows
    cluster settings reaching turbo-batch's job)."""
    from bench.prepare import turbo_job_override

    for bad in ('{"model": {"engine": {"max_num_seqs": 8}}}', '{"cluster": {}, "sampling": {}}', "[1]"):
        with pytest.raises(SystemExit, match="only 'cluster' settings"):
            turbo_job_override(bad)
    assert turbo_job_override(None) == {}
