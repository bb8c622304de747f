"""The template sandbox with limits: no template may hang a worker, `validate`, or eat the memory.

Owns: `LimitedSandbox` (Jinja's ImmutableSandboxedEnvironment with no compile-time constant folding,
`range()` capped, `*`, `**`, `+`, `%` and the widening filters checked before they allocate), and
`render_limited()` (streams a template's output under a size cap and a wall-clock limit per call).
Every limit ends as `TemplateLimit`, a jinja2 `SecurityError`, so callers report it as a template
error of that row. Must not touch: rows, tokenizers, engines (prompt.py renders rows with this).

The wall-clock limit is enforced two ways: cheap deadline checks in every sandboxed call, attribute
access and intercepted operator, and a watchdog thread that raises `RenderTimeout` in the rendering
thread (`PyThreadState_SetAsyncExc`) for pure-Python loops that call nothing, e.g. a nested
`{% for %}` over a long string.
"""

from __future__ import annotations

import ctypes
import math
import operator
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from jinja2 import StrictUndefined
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_RANGE = 100_000  # items of one range()
MAX_SEQUENCE = 4_000_000  # length of a string or list made by *, +, % or a widening filter
MAX_POW_BITS = 100_000  # size of an integer made by **
MAX_OUTPUT_CHARS = 32 * 2**20  # rendered text of one template for one row
RENDER_SECONDS = 5.0  # wall clock for one template on one row


class TemplateLimit(SecurityError):
    """A template exceeded a rendering limit (time, size, range)."""


def check_output_size(chars: int, max_chars: int = MAX_OUTPUT_CHARS) -> None:
    """Raise TemplateLimit if a rendered text of `chars` characters is over the limit."""
    if chars > max_chars:
        raise TemplateLimit(f"rendered prompt is over the limit of {max_chars} characters")


class RenderTimeout(BaseException):
    """Raised asynchronously in a rendering thread by the watchdog (BaseException: not swallowed
    by `except Exception` inside Jinja helpers)."""


_local = threading.local()


def _check_deadline() -> None:
    deadline = getattr(_local, "deadline", None)
    if deadline is not None and time.monotonic() > deadline:
        raise TemplateLimit(f"rendering took longer than {getattr(_local, 'limit', RENDER_SECONDS):g} s")


def _size(value: Any) -> int:
    return len(value) if isinstance(value, str | bytes | list | tuple) else 0


def _limited_range(*args: int) -> Iterator[int]:
    rng = range(*args)
    if len(rng) > MAX_RANGE:
        raise TemplateLimit(f"range() of {len(rng)} items is over the limit of {MAX_RANGE}")

    def items() -> Iterator[int]:
        for i, v in enumerate(rng):
            if i % 1024 == 0:
                _check_deadline()
            yield v

    return items()


def _capped(name: str, filt: Callable[..., Any], width_arg: int) -> Callable[..., Any]:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        vals = [a for a in args[1 : width_arg + 1] if isinstance(a, int)] + [
            v for v in kwargs.values() if isinstance(v, int)
        ]
        base = _size(args[0]) if args else 0
        if any(abs(v) + base > MAX_SEQUENCE for v in vals):
            raise TemplateLimit(f"filter {name}: width over the limit of {MAX_SEQUENCE}")
        return filt(*args, **kwargs)

    return wrapped


def _limited_replace(s: Any, old: Any, new: Any, count: int | None = None) -> Any:
    if isinstance(s, str) and isinstance(old, str) and isinstance(new, str) and old:
        n = s.count(old) if count is None else min(count, s.count(old))
        if len(s) + n * (len(new) - len(old)) > MAX_SEQUENCE:
            raise TemplateLimit(f"filter replace: result over the limit of {MAX_SEQUENCE} characters")
    elif isinstance(s, str) and not old and isinstance(new, str) and len(s) * len(new) > MAX_SEQUENCE:
        raise TemplateLimit(f"filter replace: result over the limit of {MAX_SEQUENCE} characters")
    return s.replace(old, new) if count is None else s.replace(old, new, count)


class LimitedSandbox(ImmutableSandboxedEnvironment):
    """ImmutableSandboxedEnvironment + limits; `optimized=False`: nothing is evaluated at compile time
    (Jinja would otherwise fold `'a' * 10**12` or a filter over constants while compiling)."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, **kwargs: Any):
        kwargs.setdefault("undefined", StrictUndefined)
        super().__init__(optimized=False, **kwargs)
        self.globals["range"] = _limited_range
        self.globals.pop("lipsum", None)
        for name, width_arg in (("center", 1), ("indent", 1), ("wordwrap", 1), ("truncate", 1)):
            if name in self.filters:
                self.filters[name] = _capped(name, self.filters[name], width_arg)
        self.filters["replace"] = _limited_replace

    def call_binop(self, context: Any, op: str, left: Any, right: Any) -> Any:
        _check_deadline()
        if op == "**" and isinstance(left, int | float) and isinstance(right, int | float):
            if abs(left) > 1 and right > 0 and right * math.log2(abs(left)) > MAX_POW_BITS:
                raise TemplateLimit(f"{left!r} ** {right!r} is over the size limit")
        elif op == "*":
            for seq, n in ((left, right), (right, left)):
                if _size(seq) and isinstance(n, int) and _size(seq) * n > MAX_SEQUENCE:
                    raise TemplateLimit(f"repetition of {_size(seq)} items x {n} is over the limit")
        elif op == "+" and _size(left) + _size(right) > MAX_SEQUENCE:
            raise TemplateLimit(f"concatenation over the limit of {MAX_SEQUENCE} items")
        elif op == "%" and isinstance(left, str):
            args = right if isinstance(right, tuple) else (right,)
            if any(isinstance(a, int) and abs(a) > MAX_SEQUENCE for a in args):
                raise TemplateLimit("string formatting with a width over the limit")
        return {"*": operator.mul, "**": operator.pow, "+": operator.add, "%": operator.mod}[op](left, right)

    def format_string(self, s: str, args: Any, kwargs: Any, format_func: Any = None) -> str:
        if re.search(r"\d{7,}", s):  # a width or precision of millions: refuse before allocating
            raise TemplateLimit("str.format with a width over the limit")
        return super().format_string(s, args, kwargs, format_func)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        _check_deadline()
        return super().call(__context, __obj, *args, **kwargs)

    def getattr(self, obj: Any, attribute: str) -> Any:
        _check_deadline()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _check_deadline()
        return super().getitem(obj, argument)


# ------------------------------------------------------------------------------------------ watchdog

_watch_lock = threading.Lock()
_watch_cond = threading.Condition(_watch_lock)
_active: dict[int, float] = {}  # thread id -> deadline of its render in progress
_watchdog: threading.Thread | None = None


def _inject(thread_id: int) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(RenderTimeout))


def _watch() -> None:
    with _watch_cond:
        while True:
            now = time.monotonic()
            late = [tid for tid, dl in _active.items() if dl + 0.5 < now]  # the cheap checks go first
            for tid in late:
                del _active[tid]
                _inject(tid)
            wait = min((dl + 0.5 - now for dl in _active.values()), default=None)
            _watch_cond.wait(timeout=None if wait is None else max(wait, 0.01))


def _ensure_watchdog() -> None:
    global _watchdog
    if _watchdog is None or not _watchdog.is_alive():
        _watchdog = threading.Thread(target=_watch, name="template-watchdog", daemon=True)
        _watchdog.start()


def render_limited(
    template: Any,
    context: dict[str, Any],
    *,
    seconds: float = RENDER_SECONDS,
    max_chars: int = MAX_OUTPUT_CHARS,
) -> str:
    """Render `template` with `context`, or raise TemplateLimit (too slow, too big) / the template's
    own error. Safe to call from any thread; calls do not nest."""
    tid = threading.get_ident()
    _local.deadline, _local.limit = time.monotonic() + seconds, seconds
    with _watch_cond:
        _ensure_watchdog()
        _active[tid] = _local.deadline
        _watch_cond.notify()
    parts: list[str] = []
    total = 0
    try:
        for chunk in template.generate(context):
            total += len(chunk)
            check_output_size(total, max_chars)
            parts.append(chunk)
        out = "".join(parts)
    except RenderTimeout:
        raise TemplateLimit(f"rendering took longer than {seconds:g} s") from None
    finally:
        _local.deadline = None
        while True:  # a timeout delivered while we leave is absorbed here
            try:
                with _watch_cond:
                    _active.pop(tid, None)
                break
            except RenderTimeout:
                continue
    return out
