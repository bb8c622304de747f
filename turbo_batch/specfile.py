"""Reading job and serve files: bounded YAML, and pydantic validation whose errors name their field.

Owns: `load_bounded(text, source)` (refuses files over `MAX_BYTES` and documents whose aliases would
expand to more than `MAX_NODES` nodes: a "billion laughs" file is a few hundred bytes of anchors),
`read_yaml(path)`, `parse(model, data, source)` and `format_errors()` (one 'field.path: message' line
per field, with the allowed keys of a misspelled one). Must not touch: what the fields mean (spec.py
and serve/spec.py do that); imports neither Ray nor vLLM.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

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


def _allowed_keys(model: type[BaseModel], data: Any, loc: tuple) -> list[str] | None:
    """Field names allowed where `loc` points (walking nested models and the task's union)."""
    current: Any = model
    for part in loc[:-1]:
        if (
            not (isinstance(current, type) and issubclass(current, BaseModel))
            or part not in current.model_fields
        ):
            return None
        data = data.get(part) if isinstance(data, dict) else None
        current = _pick_model(current.model_fields[part].annotation, data)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return sorted(f.alias or name for name, f in current.model_fields.items())
    return None


def _pick_model(ann: Any, data: Any) -> Any:
    if get_origin(ann) is Annotated:
        ann = get_args(ann)[0]
    options = [a for a in get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)] or [ann]
    if len(options) > 1 and isinstance(data, dict):
        for opt in options:
            literal = opt.model_fields.get("type")
            if literal is not None and data.get("type") in get_args(literal.annotation):
                return opt
    return options[0]


_UNION_TAGS = {"int", "str", "float", "bool", "dict", "list", "none", "classify", "generate", "extract"}


def _is_union_tag(part: Any) -> bool:
    return isinstance(part, str) and (part in _UNION_TAGS or "[" in part)


def format_errors(err: ValidationError, data: Any, root: type[BaseModel]) -> list[str]:
    """One 'field.path: message' line per field; union alternatives are merged into one line."""
    merged: dict[str, list[str]] = {}
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not _is_union_tag(p))
        path = ".".join(str(p) for p in loc) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(root, data, loc)
            msg = "unknown field" + (f"; allowed: {', '.join(allowed)}" if allowed else "")
        elif e["type"] == "missing":
            msg = "required field is missing"
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if msg not in merged.setdefault(path, []):
            merged[path].append(msg)
    return [f"{path}: {' or '.join(msgs)}" for path, msgs in merged.items()]


def read_yaml(path: str | Path) -> Any:
    p = Path(path)
    if not p.is_file():
        raise SpecError(str(path), ["(file): not found"])
    try:
        return load_bounded(p.read_text(encoding="utf-8"), str(path))  # size and alias bounds
    except yaml.YAMLError as e:
        raise SpecError(str(path), [f"(file): not valid YAML: {e}"]) from None
    except UnicodeDecodeError:
        raise SpecError(str(path), ["(file): not UTF-8 text"]) from None


def parse(model: type[BaseModel], data: Any, source: str = "<dict>") -> Any:
    if not isinstance(data, dict):
        raise SpecError(source, ["(top level): expected a mapping of fields"])
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise SpecError(source, format_errors(e, data, model)) from None
