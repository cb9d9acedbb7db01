"""Rows of a check table and the report that holds them."""

from __future__ import annotations

import dataclasses
import math
from typing import List

import torch
from torch import Tensor

from ppl_vi.report import render_check_fragment


@dataclasses.dataclass
class Row:
    """One line of the check table."""

    kind: str  # "structure", "same sample", "statistical", "ground truth"
    name: str
    reference: float = math.nan
    value: float = math.nan
    abs_diff: float = math.nan
    rel_diff: float = math.nan
    tolerance: str = ""
    passed: bool = False
    note: str = ""
    details: dict = dataclasses.field(default_factory=dict)  # machine-readable extras (cosines, z-scores...)
    #: why the row could not run, for the checker's own reasons ("" when it ran); such a row is neither
    #: passed nor failed: it does not make the verdict FAIL, and the verdict counts the rows that ran
    not_run: str = ""

    @property
    def ran(self) -> bool:
        return not self.not_run


@dataclasses.dataclass
class CheckReport:
    rows: List[Row]
    #: checks that were asked for but did not run, each a short phrase (shown in the verdict)
    skipped: List[str] = dataclasses.field(default_factory=list)
    #: one line per likely mistake found (ppl_vi.check.diagnose), shown under the table
    verdicts: List[str] = dataclasses.field(default_factory=list)
    #: the objective Pyro optimises, as {"text": ..., "latex": ...} (ppl_vi.check.formula), when known
    formula: dict = dataclasses.field(default_factory=dict)

    #: lines said before the table: which loss was chosen and why, how particles are drawn, the bound's form
    notes: List[str] = dataclasses.field(default_factory=list)

    @property
    def ran(self) -> List[Row]:
        return [r for r in self.rows if r.ran]

    @property
    def not_run(self) -> List[Row]:
        return [r for r in self.rows if not r.ran]

    @property
    def passed(self) -> bool:
        """Every row that ran passed, and some did (rows that could not run count neither way)."""
        return bool(self.ran) and all(r.passed for r in self.ran)

    @property
    def failures(self) -> List[Row]:
        return [r for r in self.ran if not r.passed]

    def table(self) -> str:
        """A plain-text table of every row, full names, values per datapoint; the verdict and diagnoses under it."""
        title = "check (values per datapoint, the batch mean, unless the note says otherwise)"
        width = max([len(title)] + [len(r.name) for r in self.rows])
        head = (f"{'kind':<17} {title:<{width}} {'reference':>14} {'value':>14} {'abs diff':>9} {'rel diff':>9}"
                "  ok    tolerance / note")
        lines = [f"note: {n}" for n in self.notes] + [head, "-" * len(head)]
        for r in self.rows:
            note = "; ".join(s for s in (r.tolerance, r.note) if s) if r.ran else f"not run: {r.not_run}"
            status = "n/a" if not r.ran else "ok" if r.passed else "FAIL"
            lines.append(
                f"{r.kind:<17} {r.name:<{width}} {_cell(r.reference, '14.6g')} {_cell(r.value, '14.6g')}"
                f" {_cell(r.abs_diff, '9.2e')} {_cell(r.rel_diff if shows_rel(r) else math.nan, '9.2e')}"
                f"  {status:<5} {note}"
            )
        lines.append(f"verdict: {self.verdict()}")
        lines += [f"diagnosis: {v}" for v in self.verdicts]
        return "\n".join(lines)

    def verdict(self) -> str:
        """PASS or FAIL (naming the failing rows); what did not run and why, and how many rows ran, where
        some did not."""
        ran, failures = len(self.ran), self.failures
        if not ran:
            text = "NOT CHECKED (no row could run)"
        elif self.passed:
            text = "PASS"
        else:
            text = f"FAIL ({len(failures)} of {ran} checks failed: " + ", ".join(r.name for r in failures) + ")"
        skipped = list(self.skipped) + [f"{r.name} ({r.not_run})" for r in self.not_run]
        if skipped:
            text += f" [not run: {'; '.join(skipped)}]"
        return text + (f"; {ran} of {len(self.rows)} rows ran" if ran < len(self.rows) else "")

    # a notebook, a terminal and a test: the same report, shown where it is asked for
    @property
    def ok(self) -> bool:
        """Every row passed (``passed``)."""
        return self.passed

    @property
    def diagnoses(self) -> List[str]:
        """One line per likely mistake (``verdicts``), each starting with its keyword (constant, sign, scale...)."""
        return self.verdicts

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return f"<CheckReport {'PASS' if self.passed else 'FAIL'}: {len(self.rows)} rows, {len(self.failures)} failed; " \
               f"{len(self.verdicts)} diagnoses>"

    def _repr_pretty_(self, printer, cycle: bool) -> None:  # IPython in a terminal: the table
        printer.text(repr(self) if cycle else self.table())

    def _repr_html_(self) -> str:  # Jupyter: verdict, diagnoses, typeset objective, failing rows highlighted
        return render_check_fragment(self.to_dict())

    def to_dict(self) -> dict:
        out = {"passed": self.passed, "skipped": list(self.skipped), "rows": [dataclasses.asdict(r) for r in self.rows],
               "rows_run": len(self.ran)}
        if self.notes:
            out["notes"] = list(self.notes)
        if self.verdicts:
            out["verdicts"] = list(self.verdicts)
        if self.formula:
            out["formula"] = dict(self.formula)
        return out


def shows_rel(row: Row) -> bool:
    """The relative difference means something only where the tolerance is relative (equalities);
    not on inequalities, ladders or within-SE rows."""
    return row.tolerance.startswith("rel")


def _cell(value: float, spec: str) -> str:
    width = int(spec.split(".")[0])
    return f"{value:{spec}}" if isinstance(value, (int, float)) and math.isfinite(value) else " " * (width - 1) + "-"


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-300)


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message`` of an exception."""
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {msg}"


def failure_row(kind: str, name: str, exc: BaseException) -> Row:
    """A check that failed because of the checked code (a hand bound that raised, a broken pair)."""
    return Row(kind, name, passed=False, note=f"error: {one_line(exc)}"[:300])


def not_run_row(kind: str, name: str, reason) -> Row:
    """A check that could not run for the checker's own reasons (an exception of its machinery, or a
    stated limit): said, and counted neither as passed nor as failed."""
    text = one_line(reason) if isinstance(reason, BaseException) else str(reason)
    return Row(kind, name, passed=False, not_run=text[:300])


def close_row(kind: str, name: str, reference: Tensor, value: Tensor, rtol: float, note: str = "",
              atol: float = 1e-12) -> Row:
    """Two per-datapoint quantities equal to ``rtol`` (relative, worst datapoint), or within ``atol``
    where both are near zero (a gap that should vanish); shown as means per datapoint."""
    reference, value = reference.detach().double(), value.detach().double()
    diff = (reference - value).abs()
    rel = diff / torch.maximum(reference.abs(), value.abs()).clamp_min(1e-300)
    worst = rel.max().item()
    passed = bool(((rel <= rtol) | (diff <= atol)).all())
    return Row(kind, name, reference.mean().item(), value.mean().item(), diff.max().item(), worst,
               f"rel <= {rtol:g} (or abs <= {atol:g}) at every datapoint", passed, note)
