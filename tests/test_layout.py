"""The house layout: four floors, each importing only from the floors below, no circles, imports at the top.

Read from the source with ``ast`` (nothing is imported), so a new upward import, a new import
circle or a new import hidden inside a function fails here with the module and line named.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1] / "ppl_vi"

#: module (or package prefix) -> floor; the longest matching prefix wins
FLOORS = {
    "ppl_vi": 1, "ppl_vi.bounds": 1, "ppl_vi.nets": 1, "ppl_vi.data": 1, "ppl_vi.config": 1, "ppl_vi.run": 1,
    "ppl_vi.runtime": 1, "ppl_vi.distributed": 1, "ppl_vi.errors": 1, "ppl_vi.sites": 1, "ppl_vi.loss_registry": 1,
    "ppl_vi.models": 2, "ppl_vi.objectives": 2, "ppl_vi.plots": 2, "ppl_vi.report": 2, "ppl_vi.metrics": 2,
    "ppl_vi.iwae_eval": 2, "ppl_vi.fields": 1, "ppl_vi.progress": 1, "ppl_vi.job": 4,
    "ppl_vi.training": 3, "ppl_vi.evaluate": 3, "ppl_vi.check": 3,
    "ppl_vi.cli": 4, "ppl_vi.__main__": 4, "ppl_vi.testing": 4, "ppl_vi.mathml": 1,
}
#: the package's own ``__init__`` is a face like the command line: it exports ``check_bound``
#: (``from ppl_vi import check_bound``, loaded on first use); the other modules without an entry are floor 1
ROOT_FLOOR = 4

#: optional dependencies that may be imported late (inside a function), where they are needed
LATE_OK = {"torch.utils.tensorboard", "yaml", "tomllib", "torchvision"}

#: known exceptions in files other issues own, to be removed there
KNOWN_UPWARD = {
    ("ppl_vi.run", "ppl_vi"),  # reads ppl_vi.__version__ (the root package, always loaded before its modules)
}
KNOWN_LATE = {
    "ppl_vi",  # exports check_bound on first use (PEP 562): `import ppl_vi.errors` does not load the checker
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def floor(module: str) -> int:
    if module == "ppl_vi":
        return ROOT_FLOOR
    best = max((p for p in FLOORS if module == p or module.startswith(p + ".")), key=len)
    return FLOORS[best]


def package(module: str) -> str:
    """The package a floor-2/3 module belongs to (ppl_vi.training.loop -> ppl_vi.training)."""
    parts = module.split(".")
    return ".".join(parts[:2])


def imports(path: Path) -> List[Tuple[str, int, bool]]:
    """(imported module, line, inside a function?) for every import in the file, TYPE_CHECKING blocks left out."""
    tree = ast.parse(path.read_text())
    found: List[Tuple[str, int, bool]] = []

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                if child.module == "__future__":
                    continue
                # `from ppl_vi.training import step` imports the submodule ppl_vi.training.step
                for alias in child.names:
                    sub = f"{child.module}.{alias.name}"
                    found.append((sub if (ROOT.parent / (sub.replace(".", "/") + ".py")).is_file()
                                  or (ROOT.parent / sub.replace(".", "/")).is_dir() else child.module,
                                  child.lineno, in_function))
            visit(child, inside)

    visit(tree, False)
    return found


MODULES: Dict[str, Path] = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def test_every_module_has_a_floor():
    assert "ppl_vi.training.loop" in MODULES and "ppl_vi.metrics" in MODULES
    for name in MODULES:
        assert floor(name) in (1, 2, 3, 4), name


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_only_from_below_and_at_the_top(name):
    problems = []
    for target, line, late in imports(MODULES[name]):
        if target.startswith("ppl_vi") and (name, target) not in KNOWN_UPWARD:
            # same floor: within one package, or among the building blocks of floors 1-2 (no circles: below);
            # on floor 3, training, evaluation and the checker never import one another
            same_package = package(target) == package(name)
            lower = floor(target) < floor(name) or (floor(target) == floor(name) and (same_package or floor(name) != 3))
            if not lower:
                problems.append(f"line {line}: {name} (floor {floor(name)}) imports {target} (floor {floor(target)})")
        if late and target not in LATE_OK and name not in KNOWN_LATE:
            problems.append(f"line {line}: {name} imports {target} inside a function")
    assert not problems, "; ".join(problems)


def test_no_import_circles():
    """Module-level imports among ppl_vi modules form no cycle (a package's __init__ counts as importing
    its submodules only through what it names)."""
    graph: Dict[str, Set[str]] = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for target, _, late in imports(path):
            if not late and target in MODULES and target != name and not name.startswith(target + "."):
                graph[name].add(target)
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(node: str):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_layout_test_catches_an_upward_import(tmp_path):
    """The checker itself: an upward and a late import in a scratch file are both reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("from ppl_vi.training import Trainer\n\ndef f():\n    import ppl_vi.cli\n")
    found = imports(bad)
    assert ("ppl_vi.training", 1, False) in found and ("ppl_vi.cli", 4, True) in found
    assert floor("ppl_vi.training.loop") == 3 and floor("ppl_vi.data.mnist") == 1 and floor("ppl_vi.cli") == 4
    assert floor("ppl_vi") == 4 and floor("ppl_vi.errors") == 1 and floor("ppl_vi.testing") == 4
