"""The report: cost lines, the bounded timeline, `turbo-batch report` on a partial dir, and a real job's
`_report.html` rendered in headless Chromium with its charts checked from the screenshot's pixels."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from tests.helpers import job_dict
from turbo_batch.batch import report, timeline
from turbo_batch.batch.html_report import REPORT, collect, dir_numbers
from turbo_batch.batch.write import OutputDir
from turbo_batch.cli import build_app
from turbo_batch.spec import DEFAULT_GPU_HOUR_USD, JobSpec


def test_cost_per_million_rows_and_tokens_with_engine_start_apart():
    engines = [{"device": {"kind": "cuda", "profile": "h200"}}, {"gpu": "h200"}]
    c = report.cost(engines, wall_s=1800, engine_start_s=360, rows=100_000, prompt_tokens=50_000_000,
                    prices={"h200": 3.0})  # fmt: skip
    assert c["usd_per_hour"] == 6.0 and c["run_usd"] == 3.0 and c["engine_start_usd"] == 0.6
    assert c["usd_per_1m_rows"] == 36.0 and c["usd_per_1m_rows_excl_start"] == 30.0
    assert c["usd_per_1m_input_tokens"] == 0.072
    unknown = report.cost([{"gpu": "tpu"}], wall_s=1, engine_start_s=0, rows=1, prompt_tokens=1, prices={})
    assert "usd_per_1m_rows" not in unknown and "report.gpu_hour_usd" in unknown["note"]


def test_job_prices_override_defaults(tmp_path):
    job = JobSpec.model_validate(job_dict(tmp_path, "x", "o", report={"gpu_hour_usd": {"H200": 2.0}}))
    assert job.report.gpu_hour_usd["h200"] == 2.0
    assert job.report.gpu_hour_usd["b200"] == DEFAULT_GPU_HOUR_USD["b200"]


def test_timeline_is_bounded_and_appends_across_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(timeline, "LINES_PER_WIDTH", 10)
    clock = [1000.0]
    monkeypatch.setattr(timeline.time, "time", lambda: clock[0])
    tl = timeline.Timeline(tmp_path, run=1)
    tl.start(5.0, [{"name": "engine-0", "gpu": "cpu"}])
    for _ in range(400):  # 400 s of one commit per second
        tl.observe([{"engine": "engine-0", "prompt_tokens": 10, "output_tokens": 1}] * 3)
        tl.flush()
        clock[0] += 1.0
    tl.flush(final=True)
    lines = timeline.read_timeline(tmp_path)
    assert sum(x["rows"] for x in lines if x["kind"] == "rows") == 1200
    assert len(lines) < 80 and tl.width >= 8  # 1 s buckets grew to 8 s+: O(log time) lines
    tl2 = timeline.Timeline(tmp_path, run=2)  # a resumed run keeps the earlier lines
    assert tl2.width == tl.width and tl2.lines == len(lines)


def _partial_dir(root: Path) -> Path:
    """An output dir as a crashed classify run leaves it: parts + manifest + timeline, no summary."""
    job = job_dict(
        root, "in.parquet", "out", task={"type": "classify", "labels": ["pos", "neg"], "gold_column": "gold"}
    )
    out = OutputDir(
        root / "out", "fp", JobSpec.model_validate(job).model_dump(mode="json", by_alias=True)
    ).open()
    tl = timeline.Timeline(out.path, out.run_no)
    tl.start(12.0, [{"name": "engine-0", "gpu": "cpu", "gpus": 1}])
    for k in range(3):
        rows = [
            {"row_id": i, "gold": "pos" if i % 3 else "neg", "label": "pos" if i % 2 else "neg",
             "probs": {"pos": 0.9 if i % 2 else 0.2, "neg": 0.1 if i % 2 else 0.8}, "prompt_tokens": 40 + i % 7,
             "output_tokens": 1, "error_code": None, "error_message": None, "engine": "engine-0"}
            for i in range(k * 20, k * 20 + 20)
        ]  # fmt: skip
        rows[0].update(label=None, probs=None, error_code="EMPTY_INPUT", engine=None)
        out.commit(pa.Table.from_pylist(rows))
        tl.observe(rows)
        tl.flush(final=True)
        time.sleep(0.01)
    return out.path


def test_report_command_on_a_crashed_dir(tmp_path):
    path = _partial_dir(tmp_path)
    res = CliRunner().invoke(build_app(), ["report", str(path)])
    assert res.exit_code == 0, res.output
    page = (path / REPORT).read_text()
    assert "incomplete" in page and "Confusion matrix" in page and "Reliability diagram" in page
    assert len(re.findall(r'src="data:image/png;base64,', page)) >= 7
    assert "http://" not in page and "https://" not in page  # self-contained
    nums = dir_numbers(collect(path))
    assert nums["rows"] == 60 and nums["errors"] == {"EMPTY_INPUT": 3} and nums["evaluation"]["rows"] == 57
    assert nums["cost"]["engine_start_usd"] == round(12 * 0.05 / 3600, 6)
    bad = CliRunner().invoke(build_app(), ["report", str(tmp_path / "nope")])
    assert bad.exit_code == 3


# --------------------------------------------------------------------------- headless Chromium


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def screenshot(page: Path, png: Path, width: int, height: int) -> None:
    profile = png.parent / f"chromium-profile-{width}"
    cmd = [
        chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--hide-scrollbars", f"--user-data-dir={profile}", f"--screenshot={png}",
        f"--window-size={width},{height}", page.as_uri(),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    assert png.is_file()


def colored_tiles(png: Path, tile: int = 100) -> tuple[int, int]:
    """(tiles holding chart colour, tiles holding anything but white): the page's own CSS is grey, so
    saturated pixels come only from the charts."""
    import numpy as np
    from PIL import Image

    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    sat = (img.max(axis=2) - img.min(axis=2)) > 60
    ink = img.min(axis=2) < 235
    h, w = sat.shape
    colour = any_ink = 0
    for y in range(0, h - tile + 1, tile):
        for x in range(0, w - tile + 1, tile):
            colour += sat[y : y + tile, x : x + tile].mean() > 0.01
            any_ink += ink[y : y + tile, x : x + tile].mean() > 0.01
    return colour, any_ink


@pytest.mark.slow
def test_real_job_report_renders_in_chromium(tiny_pool, tiny_model, out_root):
    if chromium() is None:
        pytest.skip("chromium is not installed (scripts/setup.sh installs it where it can)")
    from turbo_batch.batch.run import run_job

    n = 90
    words = ["good", "bad", "fine", "awful", "great", "dull"]
    pq.write_table(
        pa.table({"text": [f"it was {words[i % 6]} and {words[i * 5 % 6]} #{i}" if i % 30 else "" for i in range(n)],
                  "gold": ["positive" if i % 3 else "negative" for i in range(n)]}),
        out_root / "in.parquet",
    )  # fmt: skip
    job = job_dict(tiny_model, out_root / "in.parquet", "out",
                   task={"type": "classify", "labels": ["positive", "negative"], "gold_column": "gold"})  # fmt: skip
    summary = run_job(JobSpec.model_validate(job), pool=tiny_pool)
    out = out_root / "out"
    assert summary["cost"]["gpu_types"] == {"cpu": 1} and summary["cost"]["usd_per_1m_rows"] > 0
    assert json.loads((out / "_summary.json").read_text())["cost"] == summary["cost"]
    lines = timeline.read_timeline(out)
    assert lines[0]["kind"] == "start" and sum(x["rows"] for x in lines if x["kind"] == "rows") == n
    assert {x["engine"] for x in lines if x["kind"] == "rows"} == {"engine-0", "none"}  # 3 EMPTY_INPUT rows
    page = out / REPORT
    assert page.is_file()
    blank = out_root / "blank.html"  # the same page with every chart removed
    blank.write_text(re.sub(r"<img [^>]*>", "", page.read_text()))
    shots = out_root / "shots"
    shots.mkdir()
    screenshot(page, shots / "laptop.png", 1280, 3000)
    screenshot(blank, shots / "blank.png", 1280, 3000)
    screenshot(page, shots / "phone.png", 390, 6000)
    colour, ink = colored_tiles(shots / "laptop.png")
    blank_colour, blank_ink = colored_tiles(shots / "blank.png")
    assert blank_colour == 0  # the page alone has no chart colour
    assert colour >= 40 and ink > blank_ink + 60, (colour, ink, blank_ink)
    phone_colour, _ = colored_tiles(shots / "phone.png", tile=50)
    assert phone_colour >= 40  # the charts stack on a phone, still drawn
