"""Who may change an object: in the training path, only its own class.

Read from the source with ``ast``: every ``x.attr = ...`` (plain, augmented, annotated, or inside a
tuple target) and every ``setattr(...)`` in ``ppl_vi/training/``, ``run.py``, ``job.py`` and
``distributed.py`` where ``x`` is not ``self``. A module that assigns another object's attributes
shares state it does not own (the Trainer once had 19 of its attributes assigned by five other
modules); such a change belongs in a method of the owner.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import List, Tuple

ROOT = Path(__file__).resolve().parents[1] / "ppl_vi"
TRAINING_PATH = sorted((ROOT / "training").glob("*.py")) + [ROOT / "run.py", ROOT / "job.py", ROOT / "distributed.py"]

#: (file, "object.attribute") assignments that are another library's public way to set a value
ALLOWED = {
    ("training/graph_step.py", "p.grad"),  # torch: a parameter's gradient is set by assigning .grad
    ("distributed.py", "p.grad"),  # the same, after the all-reduce
    ("training/graph_step.py", "module.use_param_store"),  # LatentModel's switch, restored on exit (hot_path)
}


def _targets(node) -> List[ast.expr]:
    if isinstance(node, ast.Assign):
        found = list(node.targets)
    elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
        found = [node.target]
    else:
        return []
    flat = []
    while found:
        target = found.pop()
        if isinstance(target, (ast.Tuple, ast.List)):
            found.extend(target.elts)
        else:
            flat.append(target)
    return flat


def foreign_assignments(path: Path) -> List[Tuple[int, str]]:
    """(line, "object.attribute") for each assignment to an attribute of something other than ``self``,
    and (line, "setattr") for each ``setattr`` call."""
    sites = []
    for node in ast.walk(ast.parse(path.read_text())):
        for target in _targets(node):
            if isinstance(target, ast.Attribute) and not (isinstance(target.value, ast.Name)
                                                          and target.value.id in ("self", "cls")):
                sites.append((node.lineno, ast.unparse(target)))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr":
            sites.append((node.lineno, "setattr"))
    return sites


def test_no_module_assigns_another_objects_attributes():
    found = []
    for path in TRAINING_PATH:
        name = path.relative_to(ROOT).as_posix()
        found += [f"{name}:{line}: {what}" for line, what in foreign_assignments(path) if (name, what) not in ALLOWED]
    assert not found, "attributes assigned from outside their class:\n" + "\n".join(found)


def test_the_scan_finds_each_kind_of_assignment(tmp_path):
    """The scanner itself: plain, tuple, augmented and annotated assignments and setattr are found;
    ``self.x`` is not."""
    source = tmp_path / "scratch.py"
    source.write_text("trainer.epoch = 1\na.b, c.d = 1, 2\nstate.step += 1\nx.y: int = 3\nsetattr(t, 'z', 4)\n"
                      "class K:\n    def f(self):\n        self.ok = 1\n")
    assert foreign_assignments(source) == [(1, "trainer.epoch"), (2, "c.d"), (2, "a.b"), (3, "state.step"),
                                           (4, "x.y"), (5, "setattr")]
