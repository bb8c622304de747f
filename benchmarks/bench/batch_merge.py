"""bench_batch.py --merge: one results file from runs of one preset made in several processes.

A GPU half holds a 10-minute command: three alternating runs of every variant rarely fit one, so the
runs of one preset are spread over halves and device commands (the same rows, token ids, sampling and
engine args; pair runs at the same time on two GPUs of one host) and merged here into medians. The
headline is the median of the turbo / baseline ratios of runs made back to back within one part (the
GPU's pace moves between device commands); the ratio of the medians is kept beside it. `join`: the
commands of one lease that each ran other variants of one preset (a pair that does not fit one
command, e.g. ray.data.llm then turbo-batch on 24,000 label rows) -> one part, whose runs pair. Owns
nothing else; refuses parts whose preset, rows or engine differ.
"""

from __future__ import annotations

from typing import Any

from .common import lower_median
from .report import baseline, headline, run_summary


def _same(d: dict[str, Any]) -> dict[str, Any]:
    """What must be equal across parts: the preset, its rows and prompts, the engine (not its folder)."""
    p = d["plan"]
    engine = {k: v for k, v in (p.get("engine_args") or {}).items() if k != "model"}
    keep = ("kind", "rows", "prompt_tokens", "labels", "max_tokens", "turbo_job_override")
    return {"preset": d["preset"], "engine_args": engine} | {k: p.get(k) for k in keep}


def _source(d: dict[str, Any]) -> dict[str, Any]:
    return {
        "date": d["date"],
        "git": d["git"],
        "variants": sorted(d["results"]),
        "host_cores": (d.get("machine") or {}).get("cpu_count"),
    } | ({"commands": d["joined_commands"]} if d.get("joined_commands") else {})


def _host(d: dict[str, Any]) -> tuple[Any, ...]:
    m = d.get("machine") or {}
    return m.get("gpu"), m.get("gpu_count"), m.get("cpu"), m.get("cpu_count")


def join(cmds: list[dict[str, Any]]) -> dict[str, Any]:
    """Results of consecutive commands of one lease (one host, the same rows, other variants in each)
    as one results file: one part, so its turbo and baseline runs pair in a later merge. Refuses
    merged files, other settings, other hosts and a variant in two commands."""
    if len(cmds) < 2:
        raise SystemExit("--join: two or more results files of one lease")
    first = cmds[0]
    for i, d in enumerate(cmds, start=1):
        if d.get("merged_from"):
            raise SystemExit(f"--join: file {i} is a merge; join the commands' own files")
        if _same(d) != _same(first):
            raise SystemExit(f"--join: file {i} ran different settings")
        if _host(d) != _host(first):
            raise SystemExit(f"--join: file {i} ran on another host ({_host(d)} vs {_host(first)})")
    results: dict[str, Any] = {}
    for i, d in enumerate(cmds, start=1):
        for v, rec in d["results"].items():
            if v in results:
                raise SystemExit(
                    f"--join: {v} ran in more than one file (file {i}); --merge keeps runs apart"
                )
            results[v] = rec
    data = {**first, "results": results, "variants": sorted(results)}
    data["errors"] = {k: v for d in cmds for k, v in (d.get("errors") or {}).items()}
    data["complete"] = all(d.get("complete") for d in cmds)
    data["loadavg_end"] = cmds[-1].get("loadavg_end")
    data["bench_wall_s"] = sum(d.get("bench_wall_s") or 0 for d in cmds)
    data["joined_commands"] = [
        {"date": d["date"], "git": d["git"], "variants": sorted(d["results"])} for d in cmds
    ]
    runs = {v: rec.get("runs") or [rec] for v, rec in results.items()}
    data["headline"] = headline(first["plan"]["kind"], results, runs)
    return data


def _detail_for(
    v: str, mid: dict[str, Any], full: dict[tuple[int, str, int], dict[str, Any]]
) -> dict[str, Any]:
    """The record of `v`'s median run `mid` when its part kept only a summary of it: the run's own
    summary fields over the whole record of another run (its part's, else any), whose host CPU,
    engine-core and check detail it then shows; `detail_from` names that run (an older merge's string
    is kept as it was)."""
    keys = [k for k in full if k[1] == v]
    key = next((k for k in keys if k[0] == mid["part"]), keys[0])
    src = full[key]
    rec = {**src, **mid, "process_wall_s": mid.get("process_wall_s")}
    rec["detail_from"] = src.get("detail_from") or {"part": key[0], "rows_per_s": src.get("rows_per_s")}
    return rec


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    if not parts:
        raise SystemExit("--merge: no results files")
    first = _same(parts[0])
    for i, d in enumerate(parts[1:], start=2):
        if _same(d) != first:
            diff = sorted(k for k, v in _same(d).items() if first.get(k) != v)
            raise SystemExit(f"--merge: part {i} ran different settings ({', '.join(diff)})")
    runs: dict[str, list[dict[str, Any]]] = {}
    full: dict[tuple[int, str, int], dict[str, Any]] = {}  # (part, variant, run) -> the part's whole record
    sources: list[dict[str, Any]] = []  # one per part; a merged file brings its own parts
    for d in parts:
        cores = (d.get("machine") or {}).get("cpu_count")  # parts may come from hosts of other sizes
        offset, merged = len(sources), bool(d.get("merged_from"))
        sources += d.get("merged_from") or [_source(d)]

        def part_of(r: dict[str, Any], offset: int = offset, merged: bool = merged) -> int:
            """A run's part in the merge: a merged file's runs keep their own parts, after those before."""
            return offset + ((r.get("part") or 1) if merged else 1)

        for v, rec in d["results"].items():
            rs = rec.get("runs") or [rec]
            own_summary = run_summary(rec)
            for r in rs:
                one = run_summary(r)
                older = not merged and (len(rs) == 1 or r.get("run") == rec.get("run"))
                if older:  # the file's own record is this run's: older files kept these there only
                    for k in ("host_cpu_excl_engine", "process_wall_s"):
                        if one[k] is None:
                            one[k] = own_summary[k]
                runs.setdefault(v, []).append(
                    {**one, "part": part_of(r), "host_cores": r.get("host_cores") or cores}
                )
            # the record is its file's median run: in a merged file, that of the part whose run it is
            own = next((r for r in rs if r.get("rows_per_s") == rec.get("rows_per_s")), {})
            full[(part_of(own), v, own.get("run") or rec.get("run") or 1)] = rec
    results: dict[str, Any] = {}
    for v, rs in runs.items():
        ok = [r for r in rs if r.get("rows_per_s")]
        mid = lower_median(ok, key=lambda r: r["rows_per_s"]) if ok else rs[-1]
        rec = full.get((mid["part"], v, mid.get("run") or 1))
        if rec is None:  # a part's non-median run: only its summary fields were kept
            rec = _detail_for(v, mid, full)
        results[v] = {**rec, "rows_per_s": mid["rows_per_s"], "timed_s": mid.get("timed_s"), "runs": rs}
        out_tokens = ((rec.get("check") or {}).get("output_tokens") or {}).get("mean")
        if out_tokens and mid.get("rows_per_s"):  # every part made the same outputs of the same rows
            results[v]["output_tokens_per_s"] = out_tokens * mid["rows_per_s"]
        results[v]["median_of"] = len(ok)
    d0 = parts[0]
    data = {k: d0[k] for k in ("preset", "invocation", "machine", "plan") if k in d0}
    data |= {
        "date": d0["date"],
        "git": d0["git"],
        "merged_from": sources,
        "bench_wall_s": max(d.get("bench_wall_s") or 0 for d in parts),
        "loadavg_start": d0.get("loadavg_start"),
        "loadavg_end": parts[-1].get("loadavg_end"),
        "repeat": max(len(rs) for rs in runs.values()) if runs else 0,
        "results": results,
        "errors": {k: v for d in parts for k, v in (d.get("errors") or {}).items()},
        "complete": all(d.get("complete") for d in parts),
        "note": " ".join(filter(None, (d.get("note") for d in parts))) or None,
        "variants": sorted(results),
    }
    # pairs only within a part: runs of one part ran back to back on one machine, other parts' did not
    kind = d0["plan"]["kind"]
    base = baseline(kind, results)
    pairs = []
    for i in range(1, len(sources) + 1):
        mine = {
            v: [r for r in runs.get(v, []) if r["part"] == i and r.get("rows_per_s")] for v in ("turbo", base)
        }
        pairs += [a["rows_per_s"] / b["rows_per_s"] for a, b in zip(mine["turbo"], mine[base], strict=False)]
    data["headline"] = headline(kind, results, {}, pairs=pairs)
    return data
