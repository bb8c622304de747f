"""The `turbo-batch convert` command: arguments, progress and the printed summary. Imports no torch.

Owns: `convert_app` / `convert_command` (typer; turbo_batch/cli.py registers `convert_command` as a command),
`parse_bytes` for the size options, the exit codes (0 fine, 1 layout problems, 2 refused input).
Must not touch: the conversion or the checks themselves — it calls `recipe.convert` and `verify.check`, and
imports them (and torch with them) only when the command runs, so `turbo-batch --help` stays fast.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer


def parse_bytes(text: str | int) -> int:
    """'512MiB', '2GB', '1e9', 1024 -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.e+]+)\s*([kmgt]?i?b?)\s*", str(text).lower())
    if not m:
        raise ValueError(f"not a byte size: {text!r}")
    unit = m[2].rstrip("b")
    mult = {
        "": 1,
        "k": 10**3,
        "m": 10**6,
        "g": 10**9,
        "t": 10**12,
        "ki": 2**10,
        "mi": 2**20,
        "gi": 2**30,
        "ti": 2**40,
    }
    return int(float(m[1]) * mult[unit])


convert_app = typer.Typer(
    help="Rebuild a Turbo checkpoint from a ModelOpt NVFP4 Gemma 4 (RTN NVFP4 attention, text-only).",
    add_completion=False,
    context_settings={"allow_interspersed_args": True},
)


@convert_app.callback(invoke_without_command=True)
def convert_command(
    src: Annotated[Path, typer.Argument(help="Source checkpoint dir (with --check: the dir to verify).")],
    dst: Annotated[Path | None, typer.Argument(help="Output dir (new or empty).")] = None,
    check_only: Annotated[
        bool, typer.Option("--check", help="Only verify SRC's layout; exit 1 on problems.")
    ] = False,
    quantize: Annotated[
        list[str] | None,
        typer.Option("--quantize", "-q", help="Module group to RTN-quantize: attention, mlp."),
    ] = None,
    group_size: Annotated[int, typer.Option(help="NVFP4 group size (vLLM kernels need 16).")] = 16,
    keep_encoders: Annotated[
        bool, typer.Option(help="Keep vision/audio encoders and the multimodal config.")
    ] = False,
    memory_budget: Annotated[str, typer.Option(help="Working-memory budget, e.g. 512MiB, 2GiB.")] = "1GiB",
    max_shard_size: Annotated[str, typer.Option(help="Max bytes per output shard.")] = "5GB",
    overwrite: Annotated[
        bool, typer.Option(help="Replace a non-empty DST (never SRC, nor a dir inside or around it).")
    ] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """turbo-batch convert SRC DST | turbo-batch convert --check DIR"""
    from rich.console import Console
    from rich.table import Table

    from turbo_batch.convert.recipe import REPORT_FILE, convert
    from turbo_batch.convert.verify import check

    console = Console()
    if check_only:
        problems = check(src)
        for p in problems:
            console.print(f"[red]✗[/red] {p}")
        if problems:
            raise typer.Exit(1)
        console.print(f"[green]✓[/green] {src}: layout OK")
        return
    if dst is None:
        raise typer.BadParameter("DST is required unless --check is given")
    try:
        report = convert(
            src,
            dst,
            quantize_groups=tuple(quantize or ["attention"]),
            group_size=group_size,
            keep_encoders=keep_encoders,
            memory_budget_bytes=parse_bytes(memory_budget),
            progress=not quiet,
            max_shard_bytes=parse_bytes(max_shard_size),
            overwrite=overwrite,
        )
    except (ValueError, OSError, NotImplementedError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    table = Table(title=f"RTN NVFP4 relative error ({report['tensors']['quantized']} tensors)")
    for col in ("group", "tensors", "mean", "max"):
        table.add_column(col)
    for group, s in report["error_summary"].items():
        table.add_row(group, str(s["tensors"]), f"{s['mean']:.4f}", f"{s['max']:.4f}")
    console.print(table)
    b = report["bytes"]
    console.print(
        f"bytes {b['before']:,} → {b['after']:,} (dropped {b['dropped']:,}); "
        f"elements per dtype {report['elements_per_dtype']['after']}; report: {Path(dst) / REPORT_FILE}"
    )
    for p in report["problems"]:
        console.print(f"[red]✗[/red] {p}")
    if report["problems"]:
        raise typer.Exit(1)
