"""Assertions for a user's own test suite: keep a hand-derived bound checked as the model changes.

    from ppl_vi.testing import assert_bound

    def test_my_elbo_is_what_pyro_optimises():
        assert_bound(model, guide, negative_elbo, {"x": x})

:func:`assert_bound` runs :func:`ppl_vi.check_bound` (seeded, deterministic; the caller's random
state left as it was) and passes silently, or raises ``AssertionError`` whose message is the
verdict, the diagnoses (which term, by how much, the likely slip) and the failing rows, as
``torch.testing.assert_close`` says which element, by how much, against which tolerance.
"""

from __future__ import annotations

import math
from typing import Callable, List

from ppl_vi.check.api import check_bound
from ppl_vi.check.rows import CheckReport, Row

MAX_ROWS = 12  # failing rows listed in the message (the rest counted)


def _number(value: float) -> str:
    return f"{value:.6g}" if isinstance(value, float) and math.isfinite(value) else "-"


def _row_line(row: Row) -> str:
    note = "; ".join(s for s in (row.note, row.tolerance) if s)
    numbers = ""
    if math.isfinite(row.reference) or math.isfinite(row.value):
        numbers = (f": Pyro/reference {_number(row.reference)}, yours {_number(row.value)}, "
                   f"abs diff {_number(row.abs_diff)}")
    return f"  [{row.kind}] {row.name}{numbers}" + (f" ({note})" if note else "")


def failure_message(report: CheckReport) -> str:
    """The verdict, one line per diagnosis, then the failing rows (at most ``MAX_ROWS``)."""
    failed = report.failures
    lines: List[str] = [f"the hand-derived bound does not match Pyro's: {len(failed)} of {len(report.rows)} "
                        "checks failed"]
    if report.diagnoses:
        lines += [f"diagnosis: {d}" for d in report.diagnoses]
    else:
        lines.append("diagnosis: none of the common slips matched; see the failing rows")
    lines.append("failing rows:")
    lines += [_row_line(r) for r in failed[:MAX_ROWS]]
    if len(failed) > MAX_ROWS:
        lines.append(f"  ... and {len(failed) - MAX_ROWS} more (print(check_bound(...)) shows the whole table)")
    if report.skipped:
        lines.append(f"not run: {'; '.join(report.skipped)}")
    return "\n".join(lines)


def assert_bound(model: Callable, guide: Callable, bound: Callable, batch, **options) -> None:
    """Raise ``AssertionError`` unless ``bound`` is the negative ELBO Pyro optimises for ``model`` and
    ``guide`` (and every optional bound, e.g. ``iwae_bound``, its own); ``options`` are
    :func:`~ppl_vi.check_bound`'s (``loss``, ``iwae_bound``, ``exact_log_likelihood``, ``params``,
    ``seed``, ...). Bad arguments raise its one-line ``ConfigError`` instead."""
    __tracebackhide__ = True  # pytest: the failure points at the caller's line
    report = check_bound(model, guide, bound, batch, **options)
    if not report.ok:
        raise AssertionError(failure_message(report))


__all__ = ["assert_bound", "failure_message"]
