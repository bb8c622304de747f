"""bench_batch.py --merge and --join: one preset's runs from several processes (GPU halves, device
commands) into one results file: medians over every run, the headline from runs paired within a part,
each run's own host CPU and process wall, and the detail a summary-only median run shows named."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def test_batch_runs_from_several_processes_merge_into_medians():
    """bench_batch --merge: one preset's runs made in several processes (GPU halves, device commands)
    give medians over all of them; parts with other rows or engine args are refused."""
    import copy
    import json

    import pytest
    from bench.batch_merge import merge
    from bench.report_md import markdown

    d = json.loads((REPO / "benchmarks" / "results" / "batch_gpu-unique-15k.json").read_text())
    d.pop("merged_from", None)
    parts = []
    for i, (raw, turbo, cpu) in enumerate(((222.1, 226.4, 1.54), (220.0, 230.0, 0.9), (225.0, 221.0, 0.68))):
        p = copy.deepcopy(d)
        p["machine"]["cpu_count"] = (32, 32, 16)[i]  # a part from a smaller host
        for v, x in (("raw", raw), ("turbo", turbo)):
            p["results"][v]["rows_per_s"] = x
            # one run per part, as an older file has it: no per-run host CPU beside the run's record
            p["results"][v]["runs"] = [{"run": 1, "rows_per_s": x, "timed_s": 66.0}]
        p["results"]["turbo"]["host_cpu"]["cpu_s_per_1k_rows_excl_engine"] = cpu
        parts.append(p)
    m = merge(parts)
    assert [r["rows_per_s"] for r in m["results"]["raw"]["runs"]] == [222.1, 220.0, 225.0]
    assert m["results"]["raw"]["rows_per_s"] == 222.1 and m["results"]["turbo"]["rows_per_s"] == 226.4
    assert m["results"]["turbo"]["median_of"] == 3
    assert (
        m["results"]["turbo"]["host_cpu"]["cpu_s_per_1k_rows_excl_engine"] == 1.54
    )  # the median run's record
    # ... and every run keeps its own host CPU and its host's size, which the median's record would hide
    turbo_runs = m["results"]["turbo"]["runs"]
    assert [r["host_cpu_excl_engine"] for r in turbo_runs] == [1.54, 0.9, 0.68]
    assert [r["host_cores"] for r in turbo_runs] == [32, 32, 16]
    md = markdown(m)
    assert "Merged from 3 results files" in md and "16-core host" in md
    assert "1.54 (part 1, 226.40 rows/s), 0.90 (part 2, 230.00 rows/s), 0.68 (part 3, 221.00 rows/s)" in md
    assert m["headline"]["ratio"] == pytest.approx(226.4 / 222.1)
    other = copy.deepcopy(d)
    other["plan"]["rows"] = 5000
    with pytest.raises(SystemExit, match="part 2 ran different settings"):
        merge([d, other])


def test_batch_merge_headline_pairs_runs_of_one_part(tmp_path):
    """The merged headline is the median of turbo / raw of runs made back to back in one part, not the
    ratio of the medians (the GPU's pace moves between device commands); generate_gpu.json carries it
    and keeps what a person added to an entry."""
    import copy
    import json

    import pytest
    from bench.batch_merge import merge
    from bench.report import write_generate_summary
    from bench.report_md import markdown

    d = json.loads((REPO / "benchmarks" / "results" / "batch_gpu-gen-10.json").read_text())
    d.pop("merged_from", None)
    parts = []
    for raw, turbo in ((220.0, 210.0), (200.0, 230.0), (240.0, 250.0)):
        p = copy.deepcopy(d)
        for v, x in (("raw", raw), ("turbo", turbo)):
            p["results"][v]["rows_per_s"] = x
            p["results"][v]["runs"] = [{"run": 1, "rows_per_s": x, "timed_s": 66.0}]
        parts.append(p)
    only_raw = copy.deepcopy(parts[0])  # a part without turbo pairs with nothing
    del only_raw["results"]["turbo"]
    m = merge([*parts, only_raw])
    h = m["headline"]
    assert h["paired_ratios"] == pytest.approx([210 / 220, 230 / 200, 250 / 240])
    assert h["ratio"] == pytest.approx(250 / 240)  # the median pair
    assert h["ratio_of_medians"] == pytest.approx(230 / 220)
    assert "median of 3 ratios of runs made back to back" in markdown(m)
    # a merged file merged again keeps its parts apart: the same pairs, parts and sources
    again = merge([merge(parts[:2]), parts[2]])
    assert again["headline"]["paired_ratios"] == pytest.approx(h["paired_ratios"])
    assert [r["part"] for r in again["results"]["turbo"]["runs"]] == [1, 2, 3]
    assert len(again["merged_from"]) == 3 and again["results"]["turbo"]["rows_per_s"] == 230.0
    (tmp_path / "batch_gpu-gen-10.json").write_text(json.dumps(m))
    (tmp_path / "generate_gpu.json").write_text(json.dumps({"gen-10": {"session": "s.md", "ratio": 9}}))
    out = json.loads(write_generate_summary(tmp_path, "gpu").read_text())
    assert out["gen-10"]["ratio"] == pytest.approx(250 / 240) and out["gen-10"]["session"] == "s.md"
    assert out["gen-10"]["paired_ratios"] == pytest.approx(h["paired_ratios"])


def test_batch_join_makes_one_part_of_one_leases_commands():
    """bench_batch --join: ray.data.llm in one command and turbo-batch in the next (a pair that does not
    fit one command) become one part, so a later merge pairs them; a variant in two commands, another
    host or a merged file is refused."""
    import copy
    import json

    import pytest
    from bench.batch_merge import join, merge
    from bench.report_md import markdown

    d = json.loads((REPO / "benchmarks" / "results" / "batch_gpu-20labels-smollm2-24k.json").read_text())
    d.pop("merged_from", None)
    for v, x in (("ray_data_llm", 140.0), ("turbo", 280.0)):  # one whole pair in one command: 2.0
        d["results"][v] |= {"rows_per_s": x, "runs": [{"run": 1, "rows_per_s": x, "timed_s": 90.0}]}
    rdl, turbo = copy.deepcopy(d), copy.deepcopy(d)
    del rdl["results"]["turbo"], turbo["results"]["ray_data_llm"]
    rdl["results"]["ray_data_llm"]["rows_per_s"], turbo["results"]["turbo"]["rows_per_s"] = 100.0, 180.0
    for p, v in ((rdl, "ray_data_llm"), (turbo, "turbo")):
        p["results"][v]["runs"] = [{"run": 1, "rows_per_s": p["results"][v]["rows_per_s"], "timed_s": 90.0}]
    j = join([rdl, turbo])
    assert j["variants"] == ["ray_data_llm", "turbo"] and j["headline"]["ratio"] == pytest.approx(1.8)
    assert len(j["joined_commands"]) == 2 and "consecutive commands of one lease" in markdown(j)
    m = merge([d, j])  # an earlier whole pair + the joined one: two paired ratios
    assert m["headline"]["paired_ratios"] == pytest.approx([2.0, 1.8])
    assert "in 2 commands" in markdown(m)
    with pytest.raises(SystemExit, match="more than one file"):
        join([rdl, rdl])
    other = copy.deepcopy(turbo)
    other["machine"]["cpu_count"] = 999
    with pytest.raises(SystemExit, match="another host"):
        join([rdl, other])
    with pytest.raises(SystemExit, match="is a merge"):
        join([m, turbo])


def test_merging_a_merged_file_keeps_each_parts_host_cpu():
    """A part without host CPU figures stays without them when its merged file is merged again (the
    fallback to a record's own figure is for single-run files: in a merged file the record is another
    part's median run)."""
    import copy
    import json

    from bench.batch_merge import merge

    d = json.loads((REPO / "benchmarks" / "results" / "batch_gpu-gen-10.json").read_text())
    d.pop("merged_from", None)
    parts = []
    for x, cpu in ((200.0, None), (210.0, 2.5), (220.0, 2.0)):
        p = copy.deepcopy(d)
        for v in ("raw", "turbo"):
            p["results"][v]["rows_per_s"] = x
            p["results"][v]["host_cpu"] = {"cpu_s_per_1k_rows_excl_engine": cpu}
            p["results"][v]["runs"] = [{"run": 1, "rows_per_s": x, "host_cpu_excl_engine": cpu}]
        parts.append(p)
    once = merge(parts[:2])
    assert [r["host_cpu_excl_engine"] for r in once["results"]["turbo"]["runs"]] == [None, 2.5]
    again = merge([once, parts[2]])
    assert [r["host_cpu_excl_engine"] for r in again["results"]["turbo"]["runs"]] == [None, 2.5, 2.0]


def test_merge_names_the_run_whose_detail_a_summary_only_median_shows():
    """A median run that its part kept only as a summary (a merged file's non-median run) takes its
    host CPU and checks from another run's record: the merge names that run, the row's output tok/s
    and process wall are the median run's own, not the other run's."""
    import copy
    import json

    import pytest
    from bench.batch_merge import merge
    from bench.report_md import markdown

    d = json.loads((REPO / "benchmarks" / "results" / "batch_gpu-gen-10.json").read_text())
    d.pop("merged_from", None)
    parts = []
    for raw, turbo, wall in ((220.0, 210.0, 100.0), (200.0, 230.0, 110.0), (240.0, 250.0, 120.0)):
        p = copy.deepcopy(d)
        for v, x in (("raw", raw), ("turbo", turbo)):
            p["results"][v] |= {"rows_per_s": x, "process_wall_s": wall, "output_tokens_per_s": 1.0}
            p["results"][v]["check"]["output_tokens"] = {"mean": 10.0, "min": 10, "max": 10}
            p["results"][v]["runs"] = [{"run": 1, "rows_per_s": x, "timed_s": 66.0}]
        parts.append(p)
    # parts 1 and 2 merged first: raw's record there is part 1's (220); merged again with part 3, raw's
    # median is part 1's 220 again, but turbo's is part 2's 230, which the first merge kept whole too
    m = merge([merge(parts[:2]), parts[2]])
    raw = m["results"]["raw"]
    assert raw["rows_per_s"] == 220.0 and raw["process_wall_s"] == 100.0
    assert raw["output_tokens_per_s"] == pytest.approx(10.0 * 220.0)  # not the part's 1.0
    # three parts merged as one file, then a fourth whose raw run (230) makes part 2's run the median
    fourth = copy.deepcopy(parts[1])
    fourth["results"]["raw"] |= {"rows_per_s": 230.0, "process_wall_s": 130.0}
    fourth["results"]["raw"]["runs"] = [{"run": 1, "rows_per_s": 230.0, "timed_s": 66.0}]
    m2 = merge([merge(parts), fourth])
    raw = m2["results"]["raw"]
    assert raw["rows_per_s"] == 220.0  # lower median of 200, 220, 230, 240: 220 is part 1's, kept whole
    five = copy.deepcopy(fourth)
    five["results"]["raw"] |= {"rows_per_s": 235.0}
    five["results"]["raw"]["runs"] = [{"run": 1, "rows_per_s": 235.0, "timed_s": 66.0}]
    m3 = merge([merge(parts), fourth, five])  # median 230: part 4's own file, kept whole
    assert m3["results"]["raw"]["process_wall_s"] == 130.0 and "detail_from" not in m3["results"]["raw"]
    m4 = merge([merge([*parts, fourth]), five])  # median 230 now sits inside a merged file, as a summary
    raw = m4["results"]["raw"]
    assert raw["rows_per_s"] == 230.0 and raw["process_wall_s"] == 130.0
    assert raw["detail_from"] == {"part": 1, "rows_per_s": 220.0}
    assert raw["output_tokens_per_s"] == pytest.approx(10.0 * 230.0)
    assert "raw's median run (230.00 rows/s) was kept as a summary only" in markdown(m4)
    assert "part 1's run at 220.00 rows/s" in markdown(m4)
