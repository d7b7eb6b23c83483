"""Packages depend one way (docs/architecture.md): a module imports its own layer and the ones below.

The graph comes from the source (tests/test_import_graph.py), imports inside functions included.
"""

from __future__ import annotations

import ast
from pathlib import Path

import vembed
from tests.test_import_graph import import_graph

# Top to bottom. A layer holds vembed packages or modules; a module belongs to the longest name that
# contains it. models.base (the Embedder interface and the Item type, importing nothing from vembed) sits
# below data: data builds Items, and the model families load images through data.
LAYERS: list[set[str]] = [
    {"vembed", "vembed.cli", "vembed.registry_cli", "vembed.demo", "vembed.entrypoints"},
    {"vembed.pipeline"},
    {"vembed.training"},
    {"vembed.inference"},
    {"vembed.models"},
    {"vembed.data"},
    {"vembed.models.base"},
    {"vembed.artifacts"},
    {"vembed.config", "vembed.errors", "vembed.redaction", "vembed.retry", "vembed.endpoints"},
]

# The backward edges that remain, each with its reason. Remove entries; never add one to make a test pass.
ALLOWED: dict[tuple[str, str], str] = {
    ("vembed.data.mining", "vembed.inference.predictor"): "mining encodes the corpus with the Predictor",
    ("vembed.data.mining", "vembed.inference.evaluation"): "mining reads the corpus as evaluation does",
    ("vembed.artifacts.mlflow_model", "vembed.inference.predictor"): "the MLflow model wraps the Predictor",
    ("vembed.artifacts.mlflow_model", "vembed.inference.export"): "an adapter is merged before it is logged",
}


def layer(module: str) -> int:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        for i, members in enumerate(LAYERS):
            if ".".join(parts[:n]) in members:
                return i
    raise AssertionError(f"{module}: in no layer; add its package to LAYERS here and to docs/architecture.md")


def backward_edges(graph: dict[str, set[str]], allowed=()) -> list[str]:
    return sorted(
        f"{a} -> {b}" for a, deps in graph.items() for b in deps if layer(b) < layer(a) and (a, b) not in allowed
    )


def test_a_backward_edge_is_reported() -> None:
    graph = {"vembed.artifacts.registry": {"vembed.training.loop"}, "vembed.training.loop": {"vembed.data.records"}}
    assert backward_edges(graph) == ["vembed.artifacts.registry -> vembed.training.loop"]


def test_packages_depend_one_way() -> None:
    graph = import_graph()
    bad = backward_edges(graph, ALLOWED)
    assert not bad, "imports against the layering (docs/architecture.md):\n" + "\n".join(bad)
    gone = [f"{a} -> {b}" for a, b in ALLOWED if b not in graph.get(a, set())]
    assert not gone, "no longer imported, remove from ALLOWED in tests/test_layers.py: " + ", ".join(gone)


def test_library_imports_neither_kfp_nor_tests() -> None:
    root = Path(vembed.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            found += [f"{path.relative_to(root.parent)}: {n}" for n in names if n.split(".")[0] in ("kfp", "tests")]
    assert not found, "the library must not import kfp or tests: " + "; ".join(found)
