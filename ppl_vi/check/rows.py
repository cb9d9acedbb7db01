"""Rows of a check table and the report that holds them."""

from __future__ import annotations

import dataclasses
import math
from typing import List

import torch
from torch import Tensor


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


@dataclasses.dataclass
class CheckReport:
    rows: List[Row]
    #: checks that were asked for but did not run, each a short phrase (shown in the verdict)
    skipped: List[str] = dataclasses.field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(r.passed for r in self.rows)

    @property
    def failures(self) -> List[Row]:
        return [r for r in self.rows if not r.passed]

    def table(self) -> str:
        """A plain-text table of every row."""
        head = f"{'kind':<13} {'check':<64} {'reference':>14} {'value':>14} {'abs diff':>9} {'rel diff':>9}  ok  tolerance / note"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            note = "; ".join(s for s in (r.tolerance, r.note) if s)
            lines.append(
                f"{r.kind:<13} {r.name[:64]:<64} {r.reference:>14.6g} {r.value:>14.6g} {r.abs_diff:>9.2e}"
                f" {r.rel_diff:>9.2e}  {'ok' if r.passed else 'FAIL':<4} {note}"
            )
        verdict = "PASS" if self.passed else f"FAIL ({len(self.failures)} of {len(self.rows)} checks failed: " + \
            ", ".join(r.name for r in self.failures) + ")"
        if self.skipped:
            verdict += f" [not run: {'; '.join(self.skipped)}]"
        lines.append(f"verdict: {verdict}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"passed": self.passed, "skipped": list(self.skipped), "rows": [dataclasses.asdict(r) for r in self.rows]}


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-300)


def failure_row(kind: str, name: str, exc: BaseException) -> Row:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return Row(kind, name, passed=False, note=f"error: {type(exc).__name__}: {msg}"[:300])


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
