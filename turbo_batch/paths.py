"""Paths, in one place: the project cache, `~`/`${VAR}` expansion, and "is this a local model dir".

Owns: `cache_dir()` ($TURBO_BATCH_CACHE or ~/.cache/turbo-batch) and `write_cached()` (a small file
in it, written whole or not at all), `expand()`, `is_local_path()`, `check_local_model()`,
`same_path()`. Must not touch: the network, Ray, vLLM, or the contents of any file outside the cache.
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


def write_cached(path: Path, text: str) -> None:
    """Write a small cache file whole or not at all (a reader never sees half of it: a temporary file,
    then a rename); best effort: a cache that cannot be written is skipped, never an error."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError:
        pass


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
