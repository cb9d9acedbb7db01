"""The tutorial notebook, executed top to bottom in a real Jupyter kernel (nbclient + ipykernel).

The kernel is this interpreter (a kernelspec written to a temporary directory, nothing installed),
with this checkout first on its path; a cell that raises fails the test with the cell named. The
outputs are then read as a reader would: the check passing, the slips diagnosed, the figures drawn.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "check_bound_tutorial.ipynb"
KERNEL = "ppl-vi-test-python"


def test_the_notebook_is_stored_without_outputs():
    """Outputs stripped in git (diffs stay readable, nothing stale is shown): catches a committed run."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert len(code) >= 10
    assert all(c.outputs == [] and c.execution_count is None for c in code)


def _kernel_manager(tmp_path: Path) -> KernelManager:
    """A kernel running this interpreter (sys.executable), whatever kernelspecs the machine has."""
    spec_dir = tmp_path / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "ppl_vi test kernel", "language": "python", "env": env}))
    specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
    return KernelManager(kernel_name=KERNEL, kernel_spec_manager=specs)


def _outputs(cell, kind):
    """The text of every output of ``kind`` (a MIME type, or "stream") in a cell."""
    if kind == "stream":
        return "".join(o.text for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")
    return "".join(o.data[kind] for o in cell.outputs if kind in o.get("data", {}))


def _cell(nb, text):
    return next(c for c in nb.cells if c.cell_type == "code" and text in c.source)


def test_the_tutorial_runs_in_a_kernel(tmp_path, capsys):
    """Every cell runs (nbclient raises CellExecutionError on the first error), and the outputs say
    what the text says: the right bound passes, the dropped constant and the flipped KL are named,
    the trained model's IWAE-k sits between its ELBO and the exact log p(x), three figures inline.
    Catches a notebook that no longer runs against the library, and one whose story no longer holds."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, timeout=600, km=_kernel_manager(tmp_path), allow_errors=False,
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    with capsys.disabled():
        print(f"\n[notebook] {NOTEBOOK.relative_to(ROOT)}: {len(nb.cells)} cells executed in a kernel "
              f"({sys.executable}) in {seconds:.0f} s wall")

    checked = _outputs(_cell(nb, "report = check_bound(model, guide, negative_elbo"), "text/html")
    assert "check passed" in checked and "<math " in checked and "<tr class='bad'>" not in checked
    slipped = _outputs(_cell(nb, "slipped = check_bound("), "text/html")
    assert "check FAILED" in slipped and "<tr class='bad'>" in slipped
    diagnosis = _outputs(_cell(nb, "print(slipped.ok)"), "stream")  # the slip: which term, how much, what
    assert diagnosis.startswith("False\nconstant: ") and len(diagnosis.splitlines()) == 2, diagnosis
    for text in ("the term 'rec'", "-1.83788", "½·log 2π·D, D = 2", "the gradients agree"):
        assert text in diagnosis and text.replace("'", "&#x27;") in slipped, text
    flipped = _outputs(_cell(nb, "except AssertionError as error"), "stream")
    assert flipped.startswith("AssertionError: the hand-derived bound does not match Pyro's")
    assert "diagnosis: sign:" in flipped and "the term 'kl'" in flipped and "sign is flipped" in flipped

    table = _outputs(_cell(nb, "ks = [1, 2, 5, 10"), "stream").splitlines()
    value = {line.split()[0]: float(line.split()[1 if "±" in line else -1]) for line in table[1:]}  # the bounds
    assert value["ELBO"] < value["IWAE-10"] < value["log"], table  # "log p(x) (exact)"
    assert value["log"] - value["IWAE-1000"] < 0.25 * (value["log"] - value["ELBO"]), table

    figures = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert figures == 3
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert errors == []


if __name__ == "__main__":  # pragma: no cover - run by hand: python tests/test_notebook.py
    sys.exit(pytest.main([__file__, "-q", "-s"]))
