"""A model's tokenizer, loaded as transformers' AutoTokenizer loads it, without AutoTokenizer's imports.

`from transformers import AutoTokenizer` imports torch (transformers' generation config does): 5-7 s
of CPU in every process that loads a tokenizer, and a job's render stage loads one in each Ray worker
process it runs in. For a local folder without remote code, AutoTokenizer ends in
`<its class>.from_pretrained(path, _from_auto=True)`. The first process to load a folder's tokenizer
asks AutoTokenizer and writes down which class it gave (under cache_dir()/tokenizer-classes, keyed by
the folder, its tokenizer files' sizes and times, and the transformers version); every later process,
in this job or the next, calls that class directly, which imports no torch (~2 CPU-s instead of ~8 on
this 2-core box). Hub ids, remote code and classes from outside transformers always go through
AutoTokenizer.

Owns: loading a tokenizer and that cache. Must not touch: prompts, Ray, engines.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.metadata as md
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from turbo_batch.paths import cache_dir, expand, write_cached

CACHE = "tokenizer-classes"
# what AutoTokenizer reads to pick a class (tokenizer_config.json, config.json) and to build it
_FILES = (
    "tokenizer_config.json",
    "config.json",
    "tokenizer.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
)


@dataclass(frozen=True)
class TokenizerClass:
    """AutoTokenizer's choice for one folder: a class of transformers, by module and name."""

    module: str
    name: str


def _transformers_version() -> str | None:
    try:
        return md.version("transformers")
    except md.PackageNotFoundError:
        return None


def cache_file(path: str, trust_remote_code: bool = False) -> Path | None:
    """Where AutoTokenizer's choice for the local folder `path` is kept; None where the direct load
    does not apply (a hub id, remote code, no transformers, no tokenizer files in the folder)."""
    version = _transformers_version()
    folder = Path(expand(path))
    if trust_remote_code or version is None or not folder.is_dir():
        return None
    folder = folder.resolve()
    stats = {name: _stat(folder / name) for name in _FILES}
    if stats["tokenizer.json"] is None and stats["tokenizer_config.json"] is None:
        return None
    key = json.dumps([version, str(folder), sorted(stats.items())])
    return cache_dir() / CACHE / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


def _stat(f: Path) -> list[int] | None:
    try:
        st = f.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def cached_class(path: str, trust_remote_code: bool = False) -> TokenizerClass | None:
    """The class AutoTokenizer gave this folder (as it is now, under this transformers), if recorded."""
    return _read(cache_file(path, trust_remote_code))


def _read(f: Path | None) -> TokenizerClass | None:
    try:
        return TokenizerClass(**json.loads(f.read_text())) if f is not None else None
    except (OSError, ValueError, TypeError):
        return None


def _remember(f: Path, cls: type) -> None:
    if not cls.__module__.startswith("transformers."):
        return  # a class from remote code or a plugin: AutoTokenizer every time
    write_cached(f, json.dumps(asdict(TokenizerClass(cls.__module__, cls.__qualname__))))


def auto_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


@functools.lru_cache(maxsize=8)
def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    """The tokenizer AutoTokenizer gives `path`: through the class it gave before, where recorded."""
    f = cache_file(path, trust_remote_code)  # stats the folder's files: once per load
    known = _read(f)
    if known is not None:
        try:
            klass = getattr(importlib.import_module(known.module), known.name)
        except (ImportError, AttributeError):
            klass = None
        if klass is not None:
            return klass.from_pretrained(path, _from_auto=True)  # what AutoTokenizer ends in
    tok = auto_tokenizer(path, trust_remote_code)
    if f is not None:
        _remember(f, type(tok))
    return tok
