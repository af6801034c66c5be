"""The package's layering, read from its import statements (every ``import`` and ``from ... import``,
function-level ones included): a lower layer never imports a higher one, and no import circle crosses a
package boundary (a package's ``__init__`` importing its own modules for registration is the one circle
allowed)."""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "modelpress"

#: errors / console -> model, kernels -> registries and data -> methods -> artifact -> export, evaluate ->
#: recipe, pipeline -> cli and the package's lazy entry points
LAYERS: list[set[str]] = [
    {"errors", "console", "_version", "registry"},
    {"model", "kernels", "sampling", "devices", "distributed", "shards", "diffusers_pipeline"},
    {"passes", "modules", "zoo", "sources", "data"},
    {"quant", "codecs", "prune", "search", "builtin", "activations"},
    {"artifact", "stream"},
    {"exporters", "metrics", "stream_eval"},
    {"recipe", "pipeline", "api"},
    {"cli", ""},  # "" is modelpress/__init__.py
]


def _modules() -> dict[str, Path]:
    mods = {}
    for f in ROOT.rglob("*.py"):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    return mods


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the modelpress modules it imports (names relative to the package, "" for the package)."""
    edges: dict[str, set[str]] = defaultdict(set)
    for mod, f in mods.items():
        package = mod.split(".") if f.name == "__init__.py" else mod.split(".")[:-1]
        package = [p for p in package if p]
        for node in ast.walk(ast.parse(f.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name.removeprefix("modelpress").lstrip(".") for a in node.names
                           if a.name.split(".")[0] == "modelpress"]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[:len(package) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                elif (node.module or "").split(".")[0] == "modelpress":
                    target = node.module.removeprefix("modelpress").lstrip(".")
                else:
                    continue
                targets = [f"{target}.{a.name}".lstrip(".") if f"{target}.{a.name}".lstrip(".") in mods else target
                           for a in node.names]
            for t in targets:
                while t not in mods and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in mods and t != mod:
                    edges[mod].add(t)
    return edges


def _layer(mod: str) -> int:
    top = mod.split(".")[0]
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"modelpress.{mod} is in no layer: add it to LAYERS")


def _cycles(nodes: list[str], edges: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in nodes:
        if v not in index:
            visit(v)
    return out


def test_no_lower_layer_imports_a_higher_one() -> None:
    mods = _modules()
    edges = _imports(mods)
    wrong = [f"modelpress.{a} imports modelpress.{b}" for a, targets in sorted(edges.items()) for b in sorted(targets)
             if _layer(b) > _layer(a)]
    assert not wrong, "\n".join(wrong)


def test_no_import_circle_crosses_a_package() -> None:
    mods = _modules()
    for comp in _cycles(sorted(mods), _imports(mods)):
        packages = {m.split(".")[0] for m in comp}
        assert len(packages) == 1 and packages.pop() in comp, f"import circle: {sorted(comp)}"


def test_the_checker_sees_function_level_imports() -> None:
    edges = _imports(_modules())
    assert "sources" in edges["artifact"]  # `from .sources import load_model` inside a function
    assert "search.space" in edges["search.baselines"] and "search.evopress" not in edges["search.baselines"]
