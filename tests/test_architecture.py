"""The import rules of docs/architecture.md, read from the source: imports run one way, no cycles,
and the core stays NumPy only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src" / "qdq"
# A unit may import the units of its own layer and of the layers before it, never after (cycles
# are caught below). A unit is a top-level module of qdq or one of its packages; the core modules
# form one unit.
LAYERS = [
    {"core"},
    {"onnx", "data", "images", "arrayfile", "outputs", "config", "workers"},
    {"plan"},
    {"passes"},
    {"report", "engine"},
    {"pipeline", "ptq", "zoo", "qat"},
    {"cli"},
]
CORE = {
    *("__init__", "errors", "scheme", "qparams", "affine", "fixedpoint", "metrics", "observers"),
    "lowbit",
}
FOREIGN = {"onnx", "onnxruntime", "torch"}  # what the core must not import
TORCH_ALLOWED = {"qdq.passes.adaround"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _unit(module: str) -> str:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    return "core" if top in CORE else top


def _imports(path: Path) -> list[tuple[str, int]]:
    """Every module `path` imports (module level or not), with the line it does it on."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node.lineno))
    return found


MODULES = {_module_name(p): p for p in sorted(SOURCE.rglob("*.py"))}


def test_every_unit_has_a_layer():
    layered = set().union(*LAYERS)
    assert {_unit(m) for m in MODULES} <= layered


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_run_one_way(module):
    rank = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}
    mine = _unit(module)
    wrong = [
        f"line {line}: {name}"
        for name, line in _imports(MODULES[module])
        if name.startswith("qdq.") and rank[_unit(name)] > rank[mine]
    ]
    assert not wrong, f"{module} ({mine}) imports from a later layer: {wrong}"


def test_no_import_cycles():
    graph = {m: {n for n, _ in _imports(p) if n in MODULES} - {m} for m, p in MODULES.items()}
    finished: set[str] = set()

    def visit(m: str, path: list[str]) -> None:
        if m in path:
            pytest.fail("import cycle: " + " -> ".join([*path[path.index(m) :], m]))
        if m not in finished:
            for n in sorted(graph[m]):
                visit(n, [*path, m])
            finished.add(m)

    for m in sorted(graph):
        visit(m, [])


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _unit(m) == "core"))
def test_the_core_imports_neither_onnx_onnxruntime_nor_torch(module):
    foreign = [n for n, _ in _imports(MODULES[module]) if n.split(".")[0] in FOREIGN]
    assert not foreign, f"{module} imports {foreign}"


def test_torch_is_imported_only_where_it_is_an_optional_extra():
    users = {m for m, p in MODULES.items() for n, _ in _imports(p) if n.split(".")[0] == "torch"}
    assert users <= TORCH_ALLOWED | {m for m in MODULES if m.startswith("qdq.qat")}
