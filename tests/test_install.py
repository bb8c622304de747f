"""The package installs non-editable and works from outside the checkout (issue 8).

Builds a throwaway venv on top of the test venv's site-packages (`--system-site-packages`, so nothing is
downloaded), installs this checkout into it with `pip install --no-deps --no-build-isolation .` (a real
wheel build: only what the wheel ships is there), and runs `turbo-batch validate` on the demo job that
ships as package data, from a directory outside the checkout. No Ray, no engine: this is fast-lane.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("install")
    venv = root / "venv"
    # The test venv's packages (pip and setuptools included) are reused through a .pth line. The venv
    # module's --system-site-packages would give the *base* interpreter's packages, not the test venv's;
    # a plain path line (not site.addsitedir) also keeps the checkout's editable-install hook out.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    purelib = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(purelib, "_test_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    src = root / "src"  # a copy: building in the checkout would leave build/ and *.egg-info behind
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(".venv", ".git", ".cache", "__pycache__", "*.egg-info", "build", ".*"),
    )
    r = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--disable-pip-version-check",
            "--no-index",
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return venv


def _outside(root: Path, *cmd: str) -> subprocess.CompletedProcess:
    """Run a command of the installed venv from `root`, outside the checkout and its PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["TURBO_BATCH_CACHE"] = str(root / "cache")
    env["COLUMNS"] = "1000"  # rich wraps long paths at the terminal width
    return subprocess.run(list(cmd), cwd=root, env=env, capture_output=True, text=True, timeout=60)


def test_installed_package_is_not_the_checkout(installed, tmp_path):
    code = "import turbo_batch, turbo_batch.cli as c; print(turbo_batch.__file__); print(c.demo_job_path())"
    r = _outside(tmp_path, str(installed / "bin" / "python"), "-c", code)
    assert r.returncode == 0, r.stderr[-3000:]
    pkg, demo = r.stdout.split()
    assert Path(pkg).is_relative_to(installed) and not Path(pkg).is_relative_to(ROOT)
    assert Path(demo).is_relative_to(installed) and Path(demo).is_file()


def test_validate_the_shipped_demo_job_from_outside_the_checkout(installed, tmp_path):
    demo = _outside(
        tmp_path,
        str(installed / "bin" / "python"),
        "-c",
        "import turbo_batch.cli as c; print(c.demo_job_path())",
    ).stdout.strip()
    r = _outside(tmp_path, str(installed / "bin" / "turbo-batch"), "validate", demo)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.startswith(f"ok {demo}: classify job")
    # every subpackage the CLI's command table imports is in the wheel
    r = _outside(tmp_path, str(installed / "bin" / "turbo-batch"), "--help")
    assert r.returncode == 0, r.stderr[-3000:]
    for command in ("validate", "run", "serve", "convert", "demo"):
        assert command in r.stdout
