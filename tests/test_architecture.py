"""The house rules, checked from the source: no import circles, no upward imports, no huge modules.

The import graph is read with `ast` (function-level imports included: a lazy import is still a
dependency), so a new module must be placed in LAYERS before it can land. A module may import
from its own layer and the layers below it, never from one above.
"""

from __future__ import annotations

import ast
from pathlib import Path

import unetdist

PACKAGE_DIR = Path(unetdist.__file__).parent
MAX_MODULE_LINES = 450

# Lowest first. A name matches a module and everything under it ("unetdist" only the package's
# __init__); the longest match wins.
LAYERS: list[tuple[str, list[str]]] = [
    ("foundation", ["unetdist", "unetdist.logs", "unetdist.geometry", "unetdist.seeding", "unetdist.precision",
                    "unetdist.config", "unetdist.batch_layout", "unetdist.distributed", "unetdist.preemption",
                    "unetdist.watchdog",
                    # URLs as they may be written or logged: config, checkpoints and tracking all use it
                    "unetdist.redaction",
                    # tile-size arithmetic: config validates tile sizes with it
                    "unetdist.model.sizes"]),
    ("domain", ["unetdist.data", "unetdist.model", "unetdist.losses", "unetdist.weight_map", "unetdist.metrics",
                "unetdist.instances", "unetdist.optim", "unetdist.reports", "unetdist.flops",
                # instance segmentation: targets, decoding and its tuning, AP, validation's scoring
                "unetdist.instance_targets", "unetdist.decoding", "unetdist.instance_metrics",
                "unetdist.instance_validation",
                # the fingerprint -> plan rules (pure arithmetic)
                "unetdist.planning"]),
    ("checkpoint", ["unetdist.checkpoint"]),
    ("inference", ["unetdist.inference"]),
    ("tracking", ["unetdist.tracking"]),
    ("trainer", ["unetdist.trainer"]),
    ("entry points", ["unetdist.train", "unetdist.predict", "unetdist.prepare", "unetdist.evaluate",
                      "unetdist.plan", "unetdist.bench"]),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE_DIR.rglob("*.py"))}


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `name` imports, anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            # `from unetdist import distributed` imports the module unetdist.distributed
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import unetdist.data.x.y` style or an attribute
                target = target.rpartition(".")[0]
            if target.startswith("unetdist") and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _layer(name: str) -> int | None:
    best: tuple[int, int] | None = None  # (match length, layer index)
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            covers = name == prefix or (name.startswith(prefix + ".") and prefix != "unetdist")
            if covers and (best is None or len(prefix) > best[0]):
                best = (len(prefix), index)
    return None if best is None else best[1]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_is_read():
    """Guards the checks below against a reader that sees nothing."""
    graph = _graph()
    assert "unetdist.trainer" in graph["unetdist.train"]
    assert "unetdist.config" in graph["unetdist.trainer"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circles():
    cycles = _cycles(_graph())
    assert not cycles, "import circles: " + "; ".join(" <-> ".join(cycle) for cycle in cycles)


def test_every_module_has_a_layer():
    unplaced = [name for name in _modules() if _layer(name) is None]
    assert not unplaced, f"place these modules in LAYERS of {Path(__file__).name}: {unplaced}"


def test_no_module_imports_from_a_layer_above_it():
    upward = []
    for name, targets in _graph().items():
        own = _layer(name)
        for target in sorted(targets):
            theirs = _layer(target)
            if own is not None and theirs is not None and theirs > own:
                upward.append(f"{name} ({LAYERS[own][0]}) imports {target} ({LAYERS[theirs][0]})")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_module_is_over_the_size_limit():
    sizes = {name: len(path.read_text().splitlines()) for name, path in _modules().items()}
    over = {name: lines for name, lines in sizes.items() if lines > MAX_MODULE_LINES}
    assert not over, f"split these by concern (at most {MAX_MODULE_LINES} lines): {over}"
