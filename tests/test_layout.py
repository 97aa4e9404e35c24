"""The package's shape holds: no import circles, and imports go downward only —
core (and the public registry, contracts, errors) ← families ← run ← distillation / evaluation / analysis ← commands.
Read statically from the source (function-local imports included), so it costs no import."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "diffuse"
COMMANDS = ("train", "sample", "evaluate", "compare", "export", "prepare", "distill", "report", "lm_eval", "demo")
FAMILIES = ("models", "objectives", "schedules", "regularizers", "sampling", "data")
LAYERS = {"core": 0, "registry": 0, "contracts": 0, "errors": 0, **{f: 1 for f in FAMILIES}, "run": 2,
          "distillation": 3, "evaluation": 3, "analysis": 3, **{c: 4 for c in COMMANDS}}


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: dict) -> set[str]:
    """The diffuse modules `name` imports (the longest known prefix of each target)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
            targets |= {base} | {f"{base}.{a.name}" for a in node.names}
    found = set()
    for target in targets:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target.startswith("diffuse") and target not in ("diffuse", name):
            found.add(target)
    return found


def layer(name: str) -> int | None:
    parts = name.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


GRAPH = {name: imports(name, path, modules()) for name, path in modules().items()}


def test_every_top_level_name_has_a_layer():
    top = {name.split(".")[1] for name in GRAPH if "." in name}
    assert top - set(LAYERS) == set(), "a new top-level module or package: give it a layer in this test"


def test_imports_go_downward_only():
    upward = [f"{a} → {b}" for a, targets in GRAPH.items() for b in targets
              if layer(a) is not None and layer(b) is not None and layer(b) > layer(a)]
    assert upward == []


def test_commands_import_no_other_command():
    commands = {f"diffuse.{c}" for c in COMMANDS}
    assert [f"{a} → {b}" for a in commands for b in GRAPH[a] if b in commands] == []


def test_no_import_circles():
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert circles == []
