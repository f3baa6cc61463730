"""The package's layers hold: every module imports only from layers below it, and there is no import cycle.

Imports are read with ``ast`` from the source (module-level, inside functions and under TYPE_CHECKING, and
``importlib.import_module("nvila....")`` calls), so a lazy import counts like any other. The table below is
the architecture: bottom to top, each layer a list of rooms (packages or modules). A module may import
from any lower layer and from its own room; rooms of one layer never import each other (media processing
and the model sit side by side). A module that no room claims fails the test, so new code has to be placed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# (layer, rooms): bottom to top. docs/architecture.md shows the same table with what each module does.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("nvila.base", "nvila.hf_remote")),
    ("formats", ("nvila.formats",)),
    ("media and processing | model", ("nvila.processing", "nvila.model")),
    ("generation", ("nvila.generate", "nvila.grammar")),
    ("checkpoint", ("nvila.checkpoint",)),
    ("api", ("nvila.api", "nvila", "nvila.hf")),
    ("builders", ("nvila.builders",)),
    ("training", ("nvila.train",)),
    ("tools", ("nvila.quant", "nvila.prune", "nvila.eval", "nvila.bench", "nvila.serve")),
    ("cli", ("nvila.cli",)),
    ("entry point", ("nvila.__main__",)),
]


def modules(root: Path = SRC) -> dict[str, Path]:
    """Dotted name -> file of every module of the package (packages by their __init__)."""
    out = {}
    for path in sorted((root / "nvila").rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports_of(name: str, source: str, known: set[str], is_package: bool) -> set[str]:
    """The package's modules that ``name`` imports (resolving relative imports and ``from pkg import mod``)."""
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"):
            targets = [node.args[0].value]
        for target in targets:
            while target and target not in known:          # `import nvila.a.b.C` style: the deepest module
                target = target.rpartition(".")[0]
            if target.startswith("nvila") and target != name:
                found.add(target)
    return found


def graph(root: Path = SRC) -> dict[str, set[str]]:
    """Module -> the package's modules it imports."""
    mods = modules(root)
    return {name: imports_of(name, path.read_text(encoding="utf-8"), set(mods), path.name == "__init__.py")
            for name, path in mods.items()}


def room_of(name: str) -> tuple[int, str] | None:
    """(layer index, room) of a module: the longest room prefix (``nvila`` itself only matches exactly)."""
    best = None
    for i, (_, rooms) in enumerate(LAYERS):
        for room in rooms:
            if name == room or (room != "nvila" and name.startswith(room + ".")):
                if best is None or len(room) > len(best[1]):
                    best = (i, room)
    return best


def violations(edges: dict[str, set[str]]) -> list[str]:
    """Every import that goes up or sideways, and every module without a room, as readable lines."""
    problems = []
    for name in sorted(edges):
        here = room_of(name)
        if here is None:
            problems.append(f"{name} belongs to no layer: add it to LAYERS (tests/test_layering.py)")
            continue
        for target in sorted(edges[name]):
            there = room_of(target)
            if there is None or there == here or there[0] < here[0]:
                continue
            where = "a higher layer" if there[0] > here[0] else "a sibling room of the same layer"
            problems.append(f"{name} ({LAYERS[here[0]][0]}) imports {target} ({LAYERS[there[0]][0]}): {where}")
    return problems


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
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
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_every_import_points_down() -> None:
    assert violations(graph()) == []


def test_no_import_cycles() -> None:
    assert cycles(graph()) == []


def test_the_checker_catches_bad_imports() -> None:
    """Negative control: the real graph plus synthetic bad edges is rejected, naming both modules."""
    edges = {k: set(v) for k, v in graph().items()}
    edges["nvila.model.vision"].add("nvila.api")                        # up: model -> api
    edges["nvila.processing.tiling"].add("nvila.model.projector")       # sideways: processing -> model
    edges["nvila.made.up"] = set()                                      # a module outside every layer
    found = violations(edges)
    assert any(line.startswith("nvila.model.vision (") and "imports nvila.api (api): a higher layer" in line
               for line in found)
    assert any("nvila.processing.tiling" in line and "sibling room" in line for line in found)
    assert any(line.startswith("nvila.made.up belongs to no layer") for line in found)
    edges["nvila.base.errors"].add("nvila.base.files")                  # base.files imports base.errors
    assert ["nvila.base.errors", "nvila.base.files"] in cycles(edges)


def test_import_forms_are_all_read(tmp_path: Path) -> None:
    """Function-level, relative, ``from pkg import module`` and importlib imports are all edges."""
    pkg = tmp_path / "nvila"
    (pkg / "sub").mkdir(parents=True)
    for f in ("__init__.py", "a.py", "sub/__init__.py", "sub/b.py", "sub/c.py"):
        (pkg / f).write_text("")
    (pkg / "sub" / "b.py").write_text(
        "from . import c\n"
        "def f():\n    from nvila import a\n"
        "def g():\n    import importlib\n    importlib.import_module('nvila.sub.c')\n")
    assert graph(tmp_path)["nvila.sub.b"] == {"nvila.sub.c", "nvila.a"}


@pytest.mark.parametrize("name, layer", [("nvila.base.errors", "base"), ("nvila.formats.config", "formats"),
                                         ("nvila", "api"), ("nvila.cli.main", "cli"), ("nvila.quant", "tools")])
def test_rooms(name: str, layer: str) -> None:
    assert LAYERS[room_of(name)[0]][0] == layer
