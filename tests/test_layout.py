"""The package's shape: no import circle, no import from a higher layer, small modules with docstrings.

Layers, lowest first (a module may import its own layer and those below, never above):
    core     errors, paths, prompt, spec, runtime   (shared by every command; no cycle among them)
    engine   engine/*            (one vLLM engine, tasks, device profiles)
    serve    serve/*             (the online app; batch jobs may use its engines)
    batch    batch/*             (the batch pipeline)
    cli      cli
testing/ and convert/ stand apart: they may use the core and the engine layer, and nothing above
imports them except cli (commands) and testing's demo assets.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "turbo_batch"
LAYERS = {"core": 0, "engine": 2, "convert": 2, "testing": 2, "serve": 3, "batch": 4, "cli": 5}
CORE = {"errors", "paths", "prompt", "spec", "runtime", "__init__"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _layer(module: str) -> str:
    parts = module.split(".")[1:]
    if not parts or parts[0] in CORE:
        return "core"
    return parts[0] if parts[0] in LAYERS else "core"


def _imports(path: Path) -> set[str]:
    """turbo_batch modules imported anywhere in the file (function-level imports too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("turbo_batch"):
            for alias in node.names:  # `from turbo_batch.batch import report` names a module
                sub = f"{node.module}.{alias.name}"
                found.add(sub if _exists(sub) else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("turbo_batch")}
    return found


def _exists(module: str) -> bool:
    rel = Path(*module.split("."))
    return (PKG.parent / rel).with_suffix(".py").is_file() or (PKG.parent / rel / "__init__.py").is_file()


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PKG.rglob("*.py")}


def test_no_import_from_a_higher_layer():
    bad = []
    for mod, deps in _graph().items():
        for dep in deps:
            if LAYERS[_layer(dep)] > LAYERS[_layer(mod)]:
                bad.append(f"{mod} ({_layer(mod)}) imports {dep} ({_layer(dep)})")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_circle():
    graph = {m: {d for d in deps if d != m and not m.startswith(d + ".")} for m, deps in _graph().items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in graph.get(node, ()):
            if state.get(dep) == 1:
                cycles.append([*stack[stack.index(dep) :], dep] if dep in stack else [node, dep])
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_modules_are_small_and_say_what_they_own():
    too_long, undocumented = [], []
    for path in PKG.rglob("*.py"):
        text = path.read_text()
        if len(text.splitlines()) > 420:
            too_long.append(f"{path.relative_to(PKG)}: {len(text.splitlines())} lines")
        doc = ast.get_docstring(ast.parse(text))
        if path.name != "__init__.py" and (not doc or len(doc) < 40):
            undocumented.append(str(path.relative_to(PKG)))
    assert not too_long, too_long
    assert not undocumented, undocumented


def test_the_checker_sees_a_violation(tmp_path):
    """The import walk really finds function-level imports (else the tests above prove nothing)."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from turbo_batch.batch import run\n    import turbo_batch.cli\n")
    assert _imports(f) == {"turbo_batch.batch.run", "turbo_batch.cli"}
