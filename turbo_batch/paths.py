"""Paths, in one place: the project cache, `~`/`${VAR}` expansion, and "is this a local model dir".

Owns: `cache_dir()` ($TURBO_BATCH_CACHE or ~/.cache/turbo-batch), `expand()`, `is_local_path()`,
`check_local_model()`, `same_path()`. Must not touch: the network, Ray, vLLM, or any file's contents.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

LOCAL_PREFIXES = ("/", "./", "../", "~")


def cache_dir() -> Path:
    """The cache root for demo assets and test models: `$TURBO_BATCH_CACHE`, else ~/.cache/turbo-batch."""
    env = os.environ.get("TURBO_BATCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "turbo-batch"


def expand(value: Any) -> Any:
    """`~` and `${VAR}` expanded in a string (or in each string of a list); other values unchanged."""
    if isinstance(value, str):
        return os.path.expanduser(os.path.expandvars(value))
    if isinstance(value, list):
        return [expand(v) for v in value]
    return value


def is_local_path(path: str) -> bool:
    """A model reference that names a directory on disk rather than a hub id (`org/name`)."""
    return path.startswith(LOCAL_PREFIXES) or Path(path).expanduser().exists()


def check_local_model(path: str) -> str | None:
    """None if `path` is a hub id or an existing directory, else the message naming what is missing."""
    if path.startswith(LOCAL_PREFIXES) and not Path(path).expanduser().is_dir():
        return f"{path} does not exist"
    return None


def same_path(a: str | None, b: str | None) -> bool:
    """Two model references that name the same thing (equal ids, or paths resolving to one dir)."""
    if not a or not b:
        return False
    if a == b:
        return True
    try:
        return Path(os.path.expanduser(a)).resolve() == Path(os.path.expanduser(b)).resolve()
    except OSError:
        return False
