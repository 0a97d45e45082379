"""The layering rule, checked on the import graph of the source tree.

* The library (every ``harmonia`` module outside ``harmonia.app``) never imports the application.
* No import cycles, counting every import (module level, inside functions, and under ``TYPE_CHECKING``).
* The library's module-level imports are the standard library, torch, numpy and harmonia itself: any other
  package (PyAV, scipy, matplotlib, ...) is imported where it is used, through ``harmonia.extras.require``,
  so that ``pip install harmonia`` stays lean.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
APP = "harmonia.app"
ENTRY_POINTS = {"harmonia.__main__"}  # ``python -m harmonia`` starts the application
LIBRARY_THIRD_PARTY = {"torch", "numpy"}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path) -> list[tuple[str, bool]]:
    """(imported module, at module level?) for every import statement in ``path``."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top_level = {id(node) for node in tree.body}
    found: list[tuple[str, bool]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.append((base, id(node) in top_level))
            found += [(f"{base}.{alias.name}", id(node) in top_level) for alias in node.names]
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    """harmonia module -> the harmonia modules it imports (submodule imports resolved to real modules)."""
    modules = {module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for imported, _ in imports_of(path, root):
            if imported in modules and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"{module} imports {target}"
        for module, targets in sorted(graph.items())
        if not (module == APP or module.startswith(APP + ".")) and module not in ENTRY_POINTS
        for target in sorted(targets)
        if target == APP or target.startswith(APP + ".")
    ]


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), i.e. the import cycles.

    A package's ``__init__`` importing its own submodules is not a cycle: the submodule importing the
    package would be, and is counted.
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))

    def edges(v: str) -> set[str]:  # a package initializer importing its own children is not an edge back
        return {w for w in graph.get(v, ()) if not w.startswith(v + ".")}

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges(v):
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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def heavy_library_imports(root: Path) -> list[str]:
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    found = []
    for path in sorted(root.rglob("*.py")):
        name = module_name(path, root)
        if name == APP or name.startswith(APP + ".") or name in ENTRY_POINTS:
            continue
        for imported, top_level in imports_of(path, root):
            top = imported.split(".")[0]
            if top_level and top and top not in stdlib | LIBRARY_THIRD_PARTY | {"harmonia"}:
                found.append(f"{name} imports {imported} at module level")
    return found


def test_the_library_never_imports_the_application() -> None:
    assert layer_violations(import_graph(SRC)) == []


def test_there_are_no_import_cycles() -> None:
    assert import_cycles(import_graph(SRC)) == []


def test_the_library_imports_only_torch_and_numpy_at_module_level() -> None:
    assert heavy_library_imports(SRC) == []


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


@pytest.mark.parametrize(
    "source",
    [
        "from harmonia.app.config import load_config\n",
        "def f():\n    from harmonia.app import cli\n",
        "from ..app import trainer\n",
    ],
)
def test_the_checks_catch_a_deliberate_violation(tmp_path: Path, source: str) -> None:
    root = _tree(
        tmp_path,
        {
            "harmonia/__init__.py": "",
            "harmonia/app/__init__.py": "",
            "harmonia/app/config.py": "from harmonia.balance import ogm\n",
            "harmonia/app/cli.py": "",
            "harmonia/app/trainer.py": "",
            "harmonia/balance/__init__.py": "",
            "harmonia/balance/ogm.py": source,
        },
    )
    graph = import_graph(root)
    assert layer_violations(graph), "an upward import went unnoticed"
    assert import_cycles(graph) if "config" in source else True


def test_the_checks_catch_a_cycle_and_a_heavy_import(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "harmonia/__init__.py": "",
            "harmonia/a.py": "import matplotlib.pyplot as plt\nfrom harmonia import b\n",
            "harmonia/b.py": "def f():\n    from harmonia.a import g\n",
        },
    )
    assert import_cycles(import_graph(root)) == [["harmonia.a", "harmonia.b"]]
    assert heavy_library_imports(root) == ["harmonia.a imports matplotlib.pyplot at module level"]


OPTIONAL = (
    *("yaml", "pydantic", "tqdm", "scipy", "sklearn"),
    *("av", "matplotlib", "tensorboard", "espeakng_loader", "webdataset", "braceexpand"),
)
_BLOCK_OPTIONAL = f"""
import importlib.abc, sys
class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {OPTIONAL!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, Missing())
"""


def _run_without_optional_packages(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run(
        [sys.executable, "-c", _BLOCK_OPTIONAL + code], capture_output=True, text=True, env=env, timeout=120
    )


@pytest.mark.integration  # a subprocess
def test_the_library_works_with_torch_and_numpy_only() -> None:
    """What ``pip install harmonia`` (no extras) gives: the public API imports and runs."""
    done = _run_without_optional_packages(
        "import torch\n"
        "from harmonia.balance import OGM, OPM\n"
        "from harmonia.losses import nce, mil_nce, FineGrainedNCE, VATTLoss\n"
        "from harmonia.gradients.harmonizer import GradientHarmonizer\n"
        "from harmonia.models import build_classifier\n"
        "import harmonia.data.sources, harmonia.data.trimodal, harmonia.data.shards, harmonia.metrics\n"
        "model = build_classifier(['a', 'b'], {'a': 1, 'b': 1}, 3, encoder_widths=[4], feature_dim=8)\n"
        "out = model({'a': torch.randn(4, 1, 8, 8), 'b': torch.randn(4, 1, 8, 8)})\n"
        "OGM(dict(model.encoders)).step(out.unimodal_logits, torch.tensor([0, 1, 2, 0]), epoch=0)\n"
        "print(float(nce(torch.randn(4, 8), torch.randn(4, 8))) > 0)\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"


@pytest.mark.integration  # subprocesses
def test_a_missing_extra_is_named() -> None:
    done = _run_without_optional_packages("import harmonia.app.train")
    assert done.returncode != 0
    assert "pip install 'harmonia[train]'" in done.stderr
    done = _run_without_optional_packages(
        "from harmonia.__main__ import main\nraise SystemExit(main(['--help']))"
    )
    assert done.returncode == 1
    assert "harmonia[train]" in done.stderr and "Traceback" not in done.stderr
