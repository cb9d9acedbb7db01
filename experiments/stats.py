"""The statistics the experiment scripts report over seeds or test images: one mean, one sample
standard deviation, one standard error of the mean (Python's ``statistics`` module).

    mean = (1/n) Σ_i v_i,   sd = sqrt( Σ_i (v_i - mean)² / (n - 1) ),   SE = sd / sqrt(n)

``sd`` and ``SE`` are NaN for a single value (nothing measures the spread of one draw).
"""

from __future__ import annotations

import math
import statistics
from typing import Dict, Iterable, Tuple


def mean_sd(values: Iterable[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; NaN for one value)."""
    values = [float(v) for v in values]
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def mean_se(values: Iterable[float]) -> Dict[str, float]:
    """``{"mean": ..., "se": ...}``: the mean and its standard error sd / sqrt(n) (NaN for one value)."""
    values = [float(v) for v in values]
    mean, sd = mean_sd(values)
    return {"mean": mean, "se": sd / math.sqrt(len(values))}
