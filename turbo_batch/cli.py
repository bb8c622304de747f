"""The `turbo-batch` command line (typer). No pipeline logic lives here: each command parses its
arguments, calls one function of the package, prints the result and maps errors to exit codes
(2: bad job file, 3: output dir, 4: engine start, 1: anything else)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console

from turbo_batch.errors import JobError, SpecError, print_error

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Ray Data + vLLM batch inference.")
console = Console(stderr=True)
REPO_JOBS = Path(__file__).resolve().parent.parent / "jobs"


def _fail(e: JobError) -> None:
    print_error(e, "job file")
    raise typer.Exit(e.exit_code)


def _apply_sets(data: Any, sets: list[str]) -> Any:
    for item in sets:
        key, eq, raw = item.partition("=")
        if not eq:
            raise SpecError("--set", [f"{item}: expected key.path=value"])
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def load_job_with_sets(path: Path, sets: list[str]):
    from turbo_batch import spec

    os.environ.setdefault("TURBO_BATCH_CACHE", str(_cache_dir()))
    data = spec.expand_paths(spec._read_yaml(path))
    job = spec.parse(spec.JobSpec, _apply_sets(data, sets or []), str(path))
    spec.resolve_output_dir(job)  # refuses output paths that escape the output root
    return job


def _cache_dir() -> Path:
    return Path(os.environ.get("TURBO_BATCH_CACHE", Path.home() / ".cache" / "turbo-batch"))


SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="override a job field: key.path=value (YAML value)")
]


@app.command()
def validate(job_file: Path, set_: SetOpt = None) -> None:
    """Check a job file without starting Ray or vLLM: exit 0, or 2 with every problem and its field."""
    try:
        job = load_job_with_sets(job_file, set_ or [])
    except JobError as e:
        _fail(e)
    console.print(
        f"[green]ok[/green] {job_file}: {job.task.type} job, model {job.model.path}", highlight=False
    )


@app.command()
def run(
    job_file: Path,
    restart: Annotated[bool, typer.Option(help="discard committed output and start over")] = False,
    force: Annotated[bool, typer.Option(help="resume even though the job file changed")] = False,
    via_serve: Annotated[bool, typer.Option(help="send rows to a running `turbo-batch serve` app")] = False,
    set_: SetOpt = None,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
) -> None:
    """Run a batch job: read, render, infer on vLLM engine actors, write parquet + a summary."""
    from turbo_batch import batch, report

    try:
        sets = list(set_ or []) + (["cluster.engine_source=serve"] if via_serve else [])
        job = load_job_with_sets(job_file, sets)
        plan = batch.preflight(job)
        out = batch.open_output(plan, restart=restart, force=force)
        skipped = out.committed_rows
        if skipped:
            console.print(
                f"resuming: {skipped} of {plan.total_rows} rows already committed in {plan.output_dir}"
                + (f" ({out.adopted} part(s) adopted)" if out.adopted else "")
            )
        console.print(
            f"starting Ray and {job.cluster.engines} engine(s) for {job.model.path} ...", highlight=False
        )
        started = batch.init_ray(job)
        try:
            summary = _run_with_progress(plan, out, max(plan.total_rows - skipped, 0), quiet)
        finally:
            if started:
                import ray

                ray.shutdown()
    except JobError as e:
        _fail(e)
    print(report.render_text(summary))
    print(f"output: {plan.output_dir} (summary: {plan.output_dir / '_summary.json'})")


def _run_with_progress(plan: Any, out: Any, todo: int, quiet: bool) -> dict[str, Any]:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    from turbo_batch import batch

    class Rate(ProgressColumn):
        def render(self, task: Any) -> Text:
            return Text(f"{task.speed or 0:.1f} rows/s")

    if quiet or todo == 0:
        return asyncio.run(batch.run_plan(plan, out))
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        Rate(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    ) as bar:
        task = bar.add_task("rows", total=todo)
        return asyncio.run(batch.run_plan(plan, out, progress=lambda n: bar.advance(task, n)))


@app.command("tiny-model")
def tiny_model(out_dir: Path, seed: int = 0) -> None:
    """Write a deterministic tiny random-weight Gemma4ForCausalLM checkpoint (for fast tests)."""
    from turbo_batch.tiny import write_tiny_gemma4

    path = write_tiny_gemma4(out_dir, seed=seed)
    print(path)


@app.command()
def fetch_demo() -> None:
    """Fetch the demo's real model (SmolLM2-135M-Instruct) and data (Rotten Tomatoes) into the cache."""
    from turbo_batch import assets

    def say(m: str) -> None:
        console.print(m, highlight=False)

    print(assets.smollm2_dir(progress=say))
    full = assets.rotten_tomatoes(progress=say)
    shuffled = full.with_name("rotten_tomatoes_shuffled.parquet")
    if (
        not shuffled.is_file()
    ):  # the demo's `--rows N` takes the first N rows: a seeded, label-stratified shuffle
        import pyarrow.parquet as pq

        assets.sample_rotten_tomatoes(pq.read_metadata(full).num_rows, seed=0, out=shuffled, progress=say)
    print(shuffled)


@app.command()
def demo(
    rows: Annotated[int, typer.Option(help="how many reviews to classify")] = 300,
    job_file: Annotated[Path, typer.Option(help="the demo job")] = REPO_JOBS / "demo_cpu.yaml",
    restart: bool = True,
) -> None:
    """Fetch the demo assets if needed, then classify Rotten Tomatoes reviews with SmolLM2 on CPU."""
    fetch_demo()
    run(job_file, restart=restart, force=False, via_serve=False, set_=[f"input.limit={rows}"], quiet=False)


@app.command()
def plan(job_file: Path, set_: SetOpt = None) -> None:
    """Show the engine arguments each known device would get for this job (no Ray, no vLLM)."""
    from turbo_batch import profiles

    try:
        job = load_job_with_sets(job_file, set_ or [])
    except JobError as e:
        _fail(e)
    model = job.model.model_dump(mode="json")
    labels = len(getattr(job.task, "labels", []) or [])
    devices = [profiles.Device("cpu", "cpu", 24, None, False)] + [
        profiles.Device("cuda", name, mem, cap)
        for name, mem, cap in [
            ("NVIDIA GeForce RTX 5090", 31.4, (12, 0)),
            ("NVIDIA RTX PRO 6000 Blackwell", 95.6, (12, 0)),
            ("NVIDIA B200", 178.4, (10, 0)),
            ("NVIDIA H100 80GB HBM3", 79.1, (9, 0)),
            ("NVIDIA GeForce RTX 5080", 15.9, (12, 0)),
        ]
    ]
    for dev in devices:
        try:
            args = profiles.engine_args(
                model, dev, max_labels=labels, model_max_len=profiles.model_context_len(job.model.path)
            )
            print(f"{dev.name} ({profiles.match_profile(dev).name}): {json.dumps(args, sort_keys=True)}")
        except JobError as e:
            print(f"{dev.name}: refused: {e}")


def main() -> None:
    from turbo_batch.convert import convert_command
    from turbo_batch.serve import serve_command

    app.command("convert")(convert_command)
    app.command("serve")(serve_command)
    app()


if __name__ == "__main__":
    sys.exit(main())
