"""One progress bar for a whole job (training, then evaluation, then the report) with an honest ETA.

The job is a sequence of phases, each a number of units (training steps, evaluation rows, ...)
with a cost in seconds per unit. A phase's cost is *measured* once it is under way (its elapsed
time over its units done) and *estimated* before (from a short probe, or a budget), so

    ETA = Σ_{phases} remaining units × seconds per unit

(a phase given a time budget before its units are known counts the budget's remaining seconds)
and the bar shows elapsed / (elapsed + ETA): its unit is the second. Drawn with tqdm; with
``enabled=False`` nothing is drawn, but :meth:`RunProgress.write` still prints.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Dict, List, Optional

from tqdm.auto import tqdm


@dataclasses.dataclass
class Phase:
    name: str
    units: float  # work in the phase (steps, rows, ...)
    seconds_per_unit: float  # the estimate until measured
    done: float = 0.0
    started: Optional[float] = None
    finished: bool = False
    budget: Optional[float] = None  # seconds the phase is given, until its units are known (set_units)

    def cost_per_unit(self, now: float) -> float:
        """Measured seconds per unit once enough of the phase has run, else the estimate."""
        if self.started is not None and self.done > 0 and now - self.started > 1.0:
            return (now - self.started) / self.done
        return self.seconds_per_unit

    def remaining(self, now: float) -> float:
        if self.finished:
            return 0.0
        if self.budget is not None:
            return max(self.budget - (now - self.started if self.started is not None else 0.0), 0.0)
        return max(self.units - self.done, 0.0) * self.cost_per_unit(now)


class RunProgress:
    """The bar: phases in order, :meth:`advance` as work is done, ETA from measured and estimated costs."""

    def __init__(self, phases: List[Phase], desc: str = "", enabled: bool = True):
        self.phases: Dict[str, Phase] = {p.name: p for p in phases}
        self.start = time.perf_counter()
        self.current: Optional[str] = None
        self._last = 0.0
        self.bar = tqdm(total=max(self.eta(), 1.0), desc=desc, unit="s", disable=not enabled, dynamic_ncols=True,
                        smoothing=0, bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}")

    def eta(self) -> float:
        now = time.perf_counter()
        return sum(p.remaining(now) for p in self.phases.values())

    def begin(self, name: str) -> None:
        """Start phase ``name`` (and close the previous one)."""
        if self.current is not None:
            self.phases[self.current].finished = True
        self.current = name
        self.phases[name].started = time.perf_counter()
        self.status(name)
        self._refresh(force=True)

    def advance(self, name: str, n: float = 1.0) -> None:
        if self.current != name:
            self.begin(name)
        self.phases[name].done += n
        self._refresh()

    def set_units(self, name: str, units: float) -> None:
        """Change a phase's amount of work (e.g. once the epochs that fit a budget are known)."""
        self.phases[name].units, self.phases[name].budget = units, None
        self._refresh(force=True)

    def set_estimate(self, name: str, seconds_per_unit: float) -> None:
        self.phases[name].seconds_per_unit = seconds_per_unit
        self._refresh(force=True)

    def status(self, text: str) -> None:
        """Short text after the bar (the phase, the latest loss)."""
        self.bar.set_postfix_str(text, refresh=False)

    def _refresh(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self._last < 0.25:  # at most four redraws a second
            return
        self._last = now
        elapsed = now - self.start
        self.bar.total = elapsed + max(self.eta(), 0.0)
        self.bar.n = elapsed  # rate 1 s/s: tqdm's remaining is then exactly the ETA above
        self.bar.refresh()

    def write(self, message: str) -> None:
        """A line above the bar (printed even when the bar is disabled)."""
        tqdm.write(message)

    def close(self) -> None:
        if self.current is not None:
            self.phases[self.current].finished = True
        self._refresh(force=True)
        self.bar.close()
