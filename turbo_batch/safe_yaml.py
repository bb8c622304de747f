"""Bounded YAML for job and serve files: a hostile file cannot exhaust memory or time.

Owns: `load_bounded(text, source)`: refuses files over `MAX_BYTES` and documents whose aliases would
expand to more than `MAX_NODES` nodes (a "billion laughs" file is a few hundred bytes of anchors),
then loads with `yaml.safe_load`. Must not touch: what the fields mean (spec.py does that).
"""

from __future__ import annotations

from typing import Any

import yaml

from turbo_batch.errors import SpecError

MAX_BYTES = 1 << 20  # 1 MiB: a job file is a few KB
MAX_NODES = 100_000  # nodes after alias expansion


def _expanded(node: yaml.Node, memo: dict[int, int]) -> int:
    key = id(node)
    if key in memo:
        return memo[key]
    memo[key] = 1  # a cycle counts once (safe_load refuses recursive aliases later anyway)
    n = 1
    if isinstance(node, yaml.SequenceNode):
        n += sum(_expanded(c, memo) for c in node.value)
    elif isinstance(node, yaml.MappingNode):
        n += sum(_expanded(k, memo) + _expanded(v, memo) for k, v in node.value)
    memo[key] = n
    return n


def load_bounded(text: str, source: str) -> Any:
    if len(text.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        raise SpecError(source, [f"(file): larger than {MAX_BYTES // 1024} KiB; a job file is a few KB"])
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    if node is not None and _expanded(node, {}) > MAX_NODES:
        raise SpecError(source, [f"(file): YAML aliases expand to more than {MAX_NODES} nodes"])
    return yaml.safe_load(text)
