"""No import cycle among `vembed` modules, counting the imports placed inside functions too.

A function-level import hides a cycle from Python but not from a reader: the modules still depend on
each other. The graph is built from the source with `ast`, so the test needs no import side effects.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import vembed

ROOT = Path(vembed.__file__).parent


def module_name(path: Path) -> str:
    parts = ["vembed", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: vembed modules it imports}, every import in the file (top level or in functions)."""
    modules = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{anchor}.{base}" if base else anchor
                # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            deps.update(t for t in targets if t in modules and t != name)
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_find_cycle_sees_a_cycle_and_its_absence() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_graph_counts_imports_inside_functions() -> None:
    graph = import_graph()
    # Predictor imports the model download only inside `materialize` (to keep `import vembed` light).
    assert "vembed.artifacts.mlflow_store" in graph["vembed.inference.predictor"]
    # `from vembed.training import fsdp` (in the Checkpointer's methods): the module, not only the package.
    assert "vembed.training.fsdp" in graph["vembed.training.checkpoint"]
    assert "vembed.artifacts.mlflow_model" in graph["vembed.artifacts.registry"]  # `from vembed.artifacts.mlflow_model import ...`, in a method


def test_no_import_cycle_among_vembed_modules() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_evaluation_and_inference_do_not_depend_on_training() -> None:
    """Dependencies point one way: data -> training, and data -> evaluation / inference; nothing that
    evaluation, the Predictor or the data package imports, directly or not, leads into vembed.training."""
    graph = import_graph()
    for start in ("vembed.inference.evaluation", "vembed.inference.predictor", "vembed.data", "vembed.data.items"):
        seen, todo = set(), [start]
        while todo:
            todo += [d for d in graph[todo.pop()] if d not in seen and not seen.add(d)]
        assert not {m for m in seen if m.startswith("vembed.training")}, f"{start} leads into vembed.training"


def test_registry_imports_no_torch() -> None:
    # A fresh interpreter: this test process has imported torch long ago.
    code = (
        "import sys, vembed.artifacts.registry, vembed.registry_cli\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'vembed.inference.predictor') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "", f"import vembed.artifacts.registry pulled in: {out.strip()}"
