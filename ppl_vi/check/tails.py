"""Student's t tails and the degrees of freedom an estimated variance really has.

    P(T > t) = ½ I_{ν/(ν+t²)}(ν/2, ½)          (T ~ Student's t with ν degrees of freedom)

the regularised incomplete beta I by its continued fraction (modified Lentz), its quantile by
bisection. A variance estimated from n draws of kurtosis κ has the spread of a χ²_ν / ν with
(Satterthwaite, matching Var(s²)/σ⁴ = 2/(n-1) + (κ-3)/n)

    ν = 2 / (2/(n-1) + (κ-3)⁺/n),

n - 1 for normal draws, fewer for heavy-tailed ones (κ = 6.6 at n = 30: ν ≈ 11).
"""

from __future__ import annotations

import math
from statistics import NormalDist


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def student_t_tail(t: float, df: float) -> float:
    """P(T > t) for Student's t with ``df`` degrees of freedom (t >= 0)."""
    x, a, b = df / (df + t * t), df / 2, 0.5
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return 0.5 * front * _beta_continued_fraction(a, b, x) / a
    return 0.5 * (1.0 - front * _beta_continued_fraction(b, a, 1.0 - x) / b)


def t_quantile(tail: float, df: float) -> float:
    """q with P(T > q) = ``tail``: Student's t with ``df`` degrees of freedom (normal for df infinite or > 10⁴)."""
    normal = NormalDist().inv_cdf(1 - tail)
    if not math.isfinite(df) or df > 10_000:
        return normal
    df = max(df, 1.0)
    lo, hi = normal, normal
    while student_t_tail(hi, df) > tail:
        hi *= 2
    while hi - lo > 1e-12 * hi:  # bisection to 12 digits (about 40 halvings from the doubling's bracket)
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if student_t_tail(mid, df) > tail else (lo, mid)
    return hi


def variance_df(draws: float, kurtosis: float = 3.0) -> float:
    """Degrees of freedom of a variance estimated from ``draws`` samples of ``kurtosis`` (see above);
    infinite for exact values (infinite draws)."""
    if not math.isfinite(draws):
        return math.inf
    if draws < 2:
        return 1.0
    return max(1.0, 2.0 / (2.0 / (draws - 1) + max(kurtosis - 3.0, 0.0) / draws))


def welch_df(parts) -> float:
    """Welch–Satterthwaite: the df of Σ v_i from (v_i, ν_i) pairs (exact parts, ν infinite, add none)."""
    total = sum(v for v, _ in parts)
    denominator = sum(v * v / nu for v, nu in parts if v > 0 and math.isfinite(nu))
    return total * total / denominator if denominator > 0 else math.inf
