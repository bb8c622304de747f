"""The `turbo-batch` command line: one table maps each command to the function that runs it.

No pipeline logic lives here: a command parses its arguments, calls one function of the package,
prints the result and maps errors to exit codes (2: bad job file, 3: output dir, 4: engine start,
1: anything else). Heavy imports (Ray, vLLM, torch) happen inside the commands that need them, so
`validate` and `plan` stay fast and work without them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from turbo_batch.errors import JobError, print_error
from turbo_batch.spec import JobSpec, load_job

console = Console(stderr=True)
DEMO_JOB = "demo_cpu.yaml"  # package data (turbo_batch/jobs/): `turbo-batch demo` works from any install


def _fail(e: JobError) -> None:
    print_error(e, "job file")
    raise typer.Exit(e.exit_code)


def demo_job_path() -> Path:
    return Path(str(resources.files("turbo_batch") / "jobs" / DEMO_JOB))


SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="override a job field: key.path=value (YAML value)")
]


def validate(job_file: Path, set_: SetOpt = None) -> None:
    """Check a job file without starting Ray or vLLM: exit 0, or 2 with every problem and its field."""
    try:
        job = load_job(job_file, set_ or [])
        note = _check_data(job)
    except JobError as e:
        _fail(e)
    console.print(
        f"[green]ok[/green] {job_file}: {job.task.type} job, model {job.model.path}{note}", highlight=False
    )


def _check_data(job: JobSpec) -> str:
    """What `validate` checks beyond the file when the input is here: the prompt rendered over sample
    rows (a template failing on all of them exits 2), sampling.extra against vLLM, max_tokens vs the
    context. No Ray, no engine."""
    from turbo_batch.batch.plan import check_context, check_sampling_extra
    from turbo_batch.batch.preflight_render import check_rendering, light_plan

    check_context(job)
    check_sampling_extra(job)
    try:
        plan = light_plan(job)
    except JobError as e:  # no input on this machine: the file itself is fine
        return f" (input not checked: {e})"
    done = check_rendering(plan)
    return f"; prompt rendered on {done['rows']} sample row(s)" if done.get("rows") else ""


def run(
    job_file: Path,
    restart: Annotated[bool, typer.Option(help="discard committed output and start over")] = False,
    force: Annotated[bool, typer.Option(help="resume even though the job file changed")] = False,
    via_serve: Annotated[bool, typer.Option(help="send rows to a running `turbo-batch serve` app")] = False,
    set_: SetOpt = None,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
) -> None:
    """Run a batch job: read, render, infer on vLLM engine actors, write parquet + a summary."""
    from turbo_batch.batch import report
    from turbo_batch.batch.run import run_job

    try:
        sets = list(set_ or []) + (["cluster.engine_source=serve"] if via_serve else [])
        job = load_job(job_file, sets)
        with _progress(quiet) as progress:

            def opened(plan: Any, out: Any) -> None:
                skipped = out.committed_rows
                if skipped:
                    console.print(
                        f"resuming: {skipped} of {plan.total_rows} rows already committed in {plan.output_dir}"
                        + (f" ({out.adopted} part(s) adopted)" if out.adopted else "")
                    )
                console.print(
                    f"starting Ray and {job.cluster.engines} engine(s) for {job.model.path} ...",
                    highlight=False,
                )
                progress.start(max(plan.total_rows - skipped, 0))

            summary = run_job(job, restart=restart, force=force, progress=progress.advance, on_open=opened)
    except JobError as e:
        _fail(e)
    print(report.render_text(summary))
    out_dir = Path(summary["output_dir"])
    print(f"output: {out_dir} (summary: {out_dir / '_summary.json'})")


class _progress:
    """A rich progress bar (rows, rows/s, ETA) on stderr, or nothing with --quiet."""

    def __init__(self, quiet: bool):
        self.quiet, self.bar, self.task = quiet, None, None

    def __enter__(self) -> _progress:
        return self

    def start(self, todo: int) -> None:
        if self.quiet or todo == 0:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.bar.start()
        self.task = self.bar.add_task("rows", total=todo, rate="0.0 rows/s")

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, n)
            speed = self.bar.tasks[0].speed or 0.0
            self.bar.update(self.task, rate=f"{speed:.1f} rows/s")

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()


def tiny_model(out_dir: Path, seed: int = 0) -> None:
    """Write a deterministic tiny random-weight Gemma4ForCausalLM checkpoint (for fast tests)."""
    from turbo_batch.testing.tiny import write_tiny_gemma4

    print(write_tiny_gemma4(out_dir, seed=seed))


def fetch_demo() -> None:
    """Fetch the demo's real model (SmolLM2-135M-Instruct) and data (Rotten Tomatoes) into the cache."""
    from turbo_batch.testing import assets

    def say(m: str) -> None:
        console.print(m, highlight=False)

    print(assets.smollm2_dir(progress=say))
    print(assets.demo_reviews(progress=say))


def demo(
    rows: Annotated[int, typer.Option(help="how many reviews to classify")] = 300,
    job_file: Annotated[Path | None, typer.Option(help="the demo job (default: the packaged one)")] = None,
    restart: bool = True,
) -> None:
    """Fetch the demo assets if needed, then classify Rotten Tomatoes reviews with SmolLM2 on CPU."""
    fetch_demo()
    run(job_file or demo_job_path(), restart=restart, set_=[f"input.limit={rows}"])


def plan(job_file: Path, set_: SetOpt = None) -> None:
    """Per known GPU: weights, KV cache tokens, computed max_num_seqs / max_model_len and the engine
    arguments this job's engines would get (no Ray, no vLLM, no network)."""
    try:
        job = load_job(job_file, set_ or [])
    except JobError as e:
        _fail(e)
    for line in plan_lines(job):
        print(line)


def plan_lines(job: JobSpec) -> list[str]:
    from turbo_batch.engine import profiles

    return profiles.plan_lines(
        job.model.model_dump(mode="json"),
        max_labels=len(getattr(job.task, "labels", []) or []),
        model_max_len=profiles.model_context_len(job.model.path),
    )


def report_cmd(out_dir: Path) -> None:
    """Write OUT_DIR/_report.html from what the dir holds (complete, running or crashed) and print its path."""
    from turbo_batch.batch.html_report import REPORT, collect, render

    try:
        page = render(collect(out_dir))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(3) from None
    target = out_dir / REPORT
    tmp = target.with_name(f".{REPORT}.tmp")
    tmp.write_text(page)
    tmp.replace(target)
    print(target)


# name -> function, or "module:function" for commands whose modules are imported at start (none of
# them imports Ray, vLLM or torch at module level, so `validate` stays fast).
COMMANDS: dict[str, Callable[..., Any] | str] = {
    "validate": validate,
    "run": run,
    "plan": plan,
    "report": report_cmd,
    "demo": demo,
    "fetch-demo": fetch_demo,
    "tiny-model": tiny_model,
    "serve": "turbo_batch.serve.app:serve_command",
    "convert": "turbo_batch.convert:convert_command",
    "submit": "turbo_batch.submit:submit_command",
    "status": "turbo_batch.submit:status_command",
    "logs": "turbo_batch.submit:logs_command",
    "stop": "turbo_batch.submit:stop_command",
}


def build_app() -> typer.Typer:
    import importlib

    app = typer.Typer(add_completion=False, no_args_is_help=True, help="Ray Data + vLLM batch inference.")
    for name, target in COMMANDS.items():
        if isinstance(target, str):
            module, _, attr = target.partition(":")
            target = getattr(importlib.import_module(module), attr)
        app.command(name)(target)
    return app


def main() -> None:
    build_app()()


if __name__ == "__main__":
    sys.exit(main())
