"""sparsefl.nn imports in one direction (issue #25: the powerprop <-> sparse_compute <->
recompute circle is gone): every import between its modules, lazy ones inside functions
included, goes down this order, so each module reads without the ones above it."""

from __future__ import annotations

import ast
from pathlib import Path

NN = Path(__file__).resolve().parents[1] / "sparsefl" / "nn"
# bottom first: a module may import only modules before it
ORDER = ["batch_norm_act", "powerprop", "recompute", "sparsify", "sparse_compute", "fused_sgd",
         "__init__"]


def _imports(path: Path) -> set[str]:
    """The sparsefl.nn modules `path` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith("sparsefl.nn."):
                found.add(node.module.split(".")[2])
            elif node.module == "sparsefl.nn":
                found.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[2] for a in node.names
                         if a.name.startswith("sparsefl.nn."))
    return found & set(ORDER)


def test_every_module_is_placed():
    assert {p.stem for p in NN.glob("*.py")} == set(ORDER)


def test_imports_go_down_only():
    upward = {}
    for i, name in enumerate(ORDER):
        above = _imports(NN / f"{name}.py") - set(ORDER[:i])
        if above:
            upward[name] = sorted(above)
    assert not upward, f"imports of a module above: {upward}"
