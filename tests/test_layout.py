"""The project's structure, as docs/architecture.md draws it: no import cycles among the
modules of harvestd/, lender/, client/ and protos/, and no import that runs back down
the layers. Every import counts: top-level, inside functions, and under TYPE_CHECKING."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("protos", "harvestd", "lender", "client")

# Lowest first: a module may import modules of its own layer or of a lower one.
# A module's own name wins; else the first layer with a prefix of it, so the narrow
# prefixes come first.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("wire", ("protos",)),
    (
        "common",
        (
            "harvestd.errors",
            "harvestd.sizes",
            "harvestd.paths",
            "harvestd.logs",
            "harvestd.signals",
            "harvestd.metrics",
            "harvestd.channel",
        ),
    ),
    ("lender", ("lender",)),
    (
        "broker",
        (
            "harvestd.model",
            "harvestd.store",
            "harvestd.policy",
            "harvestd.table",
            "harvestd.invariants",
            "harvestd.service",
            "harvestd.broker",
            "harvestd.broker_metrics",
            "harvestd.config",
            "harvestd.top",
            "harvestd.simulation",
        ),
    ),
    ("daemon", ("harvestd",)),  # the node, the doctor, the CLI: they start lenders
    ("client", ("client",)),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            if path.name.startswith("harvest_pb2"):
                continue  # generated
            found[_module_name(path)] = path
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules that ``name`` imports (a package's own __init__ is not
    counted when a submodule of it is named: Python runs it, but it only hands names
    on, and its own imports are checked as its own)."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from pkg import sub` imports the submodule when there is one.
            targets = [f"{module}.{alias.name}" for alias in node.names] + [module]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
                break
    return out


@functools.cache
def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


# Modules placed by their own name alone (not as a prefix of others).
EXACT = {"harvestd": "common"}  # the package itself: it holds only the version


def _layer(module: str) -> int:
    names = [name for name, _ in LAYERS]
    if module in EXACT:
        return names.index(EXACT[module])
    for i, (_, prefixes) in enumerate(LAYERS):
        if module in prefixes:
            return i
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _without_package_faces(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """A package's __init__ that re-exports its submodules is a face, not a room: a
    submodule importing a sibling through it would tie the two, so the face's own
    arrows to its submodules are left out of the cycle search (and only those)."""
    out = {}
    for name, targets in graph.items():
        out[name] = {t for t in targets if not t.startswith(name + ".")}
    return out


def test_the_graph_sees_the_known_imports():
    graph = _graph()
    # A check that finds nothing must be able to find something.
    assert "client.lease" in graph["client.connection"]
    assert "lender.config" in graph["lender.lender"]
    assert "harvestd.errors" in graph["lender.pickup"]
    # Imports inside functions count too.
    assert "lender.gpus" in graph["harvestd.doctor"]


def test_no_import_cycles():
    cycles = _cycles(_without_package_faces(_graph()))
    assert cycles == [], f"import cycles: {cycles}"


def test_the_cycle_search_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("module", sorted(_modules()))
def test_imports_run_down_the_layers(module: str):
    graph = _graph()
    mine = _layer(module)
    upward = sorted(t for t in graph[module] if _layer(t) > mine)
    assert upward == [], f"{module} ({LAYERS[mine][0]}) imports a higher layer: " + ", ".join(
        f"{t} ({LAYERS[_layer(t)][0]})" for t in upward
    )


def test_layers_place_the_parts_where_the_map_says():
    order = [
        _layer(m)
        for m in (
            "protos",
            "harvestd.errors",
            "lender.pool",
            "harvestd.table",
            "harvestd.node",
            "client.lease",
        )
    ]
    assert order == sorted(order) and len(set(order)) == len(order)
    assert _layer("harvestd") == _layer("harvestd.sizes")
