"""The `turbo-batch convert` command (typer), and that importing it stays cheap."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from turbo_batch.convert import convert_app
from turbo_batch.testing.synthetic_nvfp4 import write_synthetic_nvidia_checkpoint

REPO = Path(__file__).resolve().parents[2]


def test_cli(converted, tmp_path):
    from typer.testing import CliRunner

    src, _, _ = converted
    runner = CliRunner()
    result = runner.invoke(
        convert_app, [str(src), str(tmp_path / "out"), "--quiet", "--memory-budget", "16MiB"]
    )
    assert result.exit_code == 0, result.output
    assert "attention" in result.output
    assert runner.invoke(convert_app, ["--check", str(tmp_path / "out")]).exit_code == 0
    assert runner.invoke(convert_app, ["--check", str(src)]).exit_code == 0  # NVIDIA's layout is valid too
    again = runner.invoke(convert_app, [str(src), str(tmp_path / "out"), "--quiet"])
    assert again.exit_code == 2 and "not empty" in again.output
    (tmp_path / "empty").mkdir()
    bad = runner.invoke(convert_app, ["--check", str(tmp_path / "empty")])
    assert bad.exit_code == 1 and "config.json missing" in bad.output


def test_cli_overwrite_refuses_the_source_and_its_parent(tmp_path):
    from typer.testing import CliRunner

    src = write_synthetic_nvidia_checkpoint(tmp_path / "root" / "src", with_encoders=False)
    before = sorted((p.name, p.stat().st_size) for p in src.iterdir())
    runner = CliRunner()
    for dst in (src, src.parent):
        result = runner.invoke(convert_app, [str(src), str(dst), "--overwrite", "--quiet"])
        assert result.exit_code == 2 and "source directory" in result.output, result.output
    assert sorted((p.name, p.stat().st_size) for p in src.iterdir()) == before


def test_importing_the_command_does_not_import_torch():
    """turbo_batch/cli.py imports convert_command for every command; the converter loads only when it runs."""
    code = "import sys; from turbo_batch.convert import convert_command; assert 'torch' not in sys.modules"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
