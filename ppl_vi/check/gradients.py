"""Expected-gradient checks: is an estimator's gradient, on average over seeds, the objective's gradient?

Same-sample equality proves that a loss computes what a hand derivation computes; it cannot see a
gradient whose *expectation* is wrong (a missing score-function term, a baseline that depends on
the particle it corrects, a DReG weight squared once too often). This module averages an estimator's
gradient over N seeds and holds it against a reference gradient:

    ĝ = (1/N) Σ_n g_n,          se(ĝ)_e = sd(g_e) / √N          (per parameter element e)
    z_e = (ĝ_e - r_e) / √(se(ĝ)_e² + se(r)_e² + floor_e²)

where r is the reference (:mod:`ppl_vi.check.reference`): exact where the discrete part is
enumerated and nothing is continuous (se(r) = 0), else the mean over G groups of R pathwise
replicates each, with its own standard error. ``floor`` (1e-9 of the tensor's scale) stops an exact
estimator's rounding from counting as evidence.

**Discrete guides are enumerated on the estimator's side too.** A score-function estimator's
variance can hide in rare events: with a sharp q(c|x), 50 seeds may never draw the component of
probability 10⁻⁶ whose term carries the expectation's last digits, and the sample SE says "exact".
So when the guide has discrete sites (and the loss does not enumerate them itself), the
estimator's expectation is computed, not sampled: for each datapoint (a batch of one) and each of
its T particle tuples, the estimator runs with the guide's discrete draws *fixed* to the tuple
(:class:`FixSampled`, which also records the tuple's probability P(t) under the guide), and

    E[ĝ] = Σ_i Σ_t P_i(t) E_cont[ĝ(x_i; t)]

with only the continuous sites (if any) averaged over seeds. With no continuous site it is exact,
and held against the exact reference to rounding (the z floor).

The check passes when the worst |z| over all n elements stays under the Bonferroni limit
Φ⁻¹(1 - α / 2n) (family-wise α = 10⁻³): a correct estimator fails it once in a thousand runs. Rows
report, per parameter tensor, the cosine between ĝ and r, the relative norm error ‖ĝ - r‖ / ‖r‖
(beside the noise level ‖se‖ / ‖r‖ it should be compared with) and the worst z.
"""

from __future__ import annotations

import dataclasses
import math
from statistics import NormalDist
from typing import Callable, List, Sequence

import pyro
import torch
from pyro.poutine.messenger import Messenger
from torch import Tensor

from ppl_vi.check.reference import discrete_sites
from ppl_vi.check.rows import Row
from ppl_vi.errors import ConfigError

FAMILY_ALPHA = 1e-3


@dataclasses.dataclass
class GradientStats:
    """Per-element mean and standard error of a gradient over independent draws."""

    mean: List[Tensor]
    se: List[Tensor]
    draws: int
    how: str = ""  # how the expectation was formed, for the row's name
    sample_draws: float = math.inf  # samples behind each standard error (inf: exact, or no sampling noise)


def gradient_stats(loss_fn: Callable[[], Tensor], params: Sequence[Tensor], seeds: Sequence[int]) -> GradientStats:
    """Mean and standard error of ∇ ``loss_fn()`` over ``seeds`` (each seeds Pyro's RNG first)."""
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    square = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for seed in seeds:
        pyro.set_rng_seed(seed)
        with pyro.validation_enabled(False):  # the same-sample rows validate; these loops only average
            loss = loss_fn()
        grads = torch.autograd.grad(loss, list(params), allow_unused=True)
        for i, (p, g) in enumerate(zip(params, grads)):
            g = torch.zeros_like(p) if g is None else g.detach()
            total[i] += g.double()
            square[i] += g.double() ** 2
    n = len(seeds)
    mean = [t / n for t in total]
    if n > 1:
        se = [((s - n * m**2).clamp_min(0) / (n - 1) / n).sqrt() for s, m in zip(square, mean)]
    else:
        se = [torch.zeros_like(m) for m in mean]
    return GradientStats(mean, se, n, f"mean over {n} seeds" if n > 1 else "one evaluation (deterministic)",
                         n if n > 1 else math.inf)


class TooManyTuples(ConfigError):
    """Enumerating the estimator's discrete draws would take more evaluations than allowed."""


class FixSampled(Messenger):
    """Fix the guide's draws of the named discrete sites to ``values[name]`` (k,) (one per particle),
    wherever they would be sampled (sites an inner handler replays or enumerates are left alone),
    and record Σ log q of the fixed draws in ``log_prob``."""

    def __init__(self, values: dict):
        super().__init__()
        self.values, self.log_prob = values, {}

    def _pyro_sample(self, msg):
        if msg["name"] not in self.values or msg["is_observed"] or msg["done"]:
            return
        shape = msg["fn"].batch_shape
        value = self.values[msg["name"]]
        if value.numel() > 1 and (not shape or shape[0] != value.numel()):
            raise ConfigError(f"cannot place {value.numel()} particle draws at site {msg['name']!r} of batch shape "
                              f"{tuple(shape)}")
        msg["value"] = value.reshape(value.shape + (1,) * (len(shape) - 1)) if shape else value.reshape(())
        msg["done"] = True
        self.log_prob[msg["name"]] = msg["fn"].log_prob(msg["value"]).sum().detach()


def slice_batch(batch: dict, index: int) -> dict:
    """Datapoint ``index`` of a batch, as a batch of one."""
    return {k: (v[index:index + 1] if torch.is_tensor(v) and v.dim() else v) for k, v in batch.items()}


def tuple_values(sizes: Sequence[int], names: Sequence[str], k: int, index: int) -> dict:
    """The ``index``-th particle tuple: {site: (k,) long values}, mixed radix over (site, particle)."""
    out = {}
    for name, size in zip(names, sizes):
        digits = []
        for _ in range(k):
            digits.append(index % size)
            index //= size
        out[name] = torch.tensor(digits)
    return out


def enumerated_gradient_stats(loss_fn: Callable[[dict], Tensor], params: Sequence[Tensor], batch: dict, guide,
                              max_plate_nesting: int, k: int, seeds: Sequence[int], max_evaluations: int = 1_500
                              ) -> GradientStats:
    """E[∇ loss_fn(batch)] with the guide's discrete sites enumerated per datapoint (see the module
    docstring); ``seeds`` average the continuous sites (one seed suffices without any)."""
    found = discrete_sites(guide, batch, max_plate_nesting)
    names, sizes = [n for n, _ in found], [c for _, c in found]
    tuples = math.prod(sizes) ** k
    size = next(v for v in batch.values() if torch.is_tensor(v)).shape[0]
    if size * tuples * len(seeds) > max_evaluations:
        raise TooManyTuples(f"{size} datapoints x {tuples} tuples x {len(seeds)} seeds > {max_evaluations} evaluations")
    # per seed, the datapoints' tuple-weighted gradients summed: the seeds' spread is the standard
    # error (the same seed serves every tuple, so the tuples' terms are correlated and do not add
    # independently)
    combined = [[torch.zeros_like(p, dtype=torch.float64) for p in params] for _ in seeds]
    for i in range(size):
        sub = slice_batch(batch, i)
        for t in range(tuples):
            fix = FixSampled({n: v.to(next(iter(params)).device) for n, v in tuple_values(sizes, names, k, t).items()})
            for s, seed in enumerate(seeds):
                pyro.set_rng_seed(seed)
                with fix, pyro.validation_enabled(False):
                    loss = loss_fn(sub)
                if set(fix.log_prob) != set(names):
                    raise ConfigError(f"the estimator did not sample the guide's discrete site(s) "
                                      f"{sorted(set(names) - set(fix.log_prob))} (does it enumerate them itself?); "
                                      "pass enumerate_discrete=False")
                weight = math.exp(sum(v.item() for v in fix.log_prob.values()))
                fix.log_prob.clear()
                g = torch.autograd.grad(loss, list(params), allow_unused=True)
                for j, (p, gi) in enumerate(zip(params, g)):
                    if gi is not None:
                        combined[s][j] += weight * gi.detach().double()
    n = len(seeds)
    mean = [torch.stack([c[j] for c in combined]).mean(0) for j in range(len(params))]
    se = [torch.stack([c[j] for c in combined]).std(0) / math.sqrt(n) if n > 1 else torch.zeros_like(m)
          for j, m in enumerate(mean)]
    how = f"expectation over {tuples} tuples x {size} datapoints" + (f" x {len(seeds)} seeds" if len(seeds) > 1 else
                                                                       ", exact")
    return GradientStats(mean, se, n * tuples * size, how, n if n > 1 else math.inf)


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
    """P(T > t) for Student's t with ``df`` degrees of freedom (t >= 0):
    ½ I_{df/(df+t²)}(df/2, ½), the regularised incomplete beta by its continued fraction."""
    x, a, b = df / (df + t * t), df / 2, 0.5
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return 0.5 * front * _beta_continued_fraction(a, b, x) / a
    return 0.5 * (1.0 - front * _beta_continued_fraction(b, a, 1.0 - x) / b)


def z_limit(elements: int, alpha: float = FAMILY_ALPHA, draws: float = math.inf) -> float:
    """Bonferroni limit on the worst |z| of ``elements`` z-scores at family-wise ``alpha``.

    With a standard error estimated from ``draws`` samples, z follows Student's t with draws - 1
    degrees of freedom (heavier tails: 12 seeds need |z| <= ~12 where the normal says 5.6), so the
    limit is t's quantile, found by bisection; with exact or many draws it is the normal one."""
    tail = alpha / (2 * max(elements, 1))
    normal = NormalDist().inv_cdf(1 - tail)
    if not math.isfinite(draws) or draws > 10_000:
        return normal
    df = max(draws - 1, 1)
    lo, hi = normal, normal
    while student_t_tail(hi, df) > tail:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if student_t_tail(mid, df) > tail else (lo, mid)
    return hi


def _cosine(a: Tensor, b: Tensor) -> float:
    na, nb = a.norm().item(), b.norm().item()
    if na == 0 and nb == 0:
        return 1.0
    return (a * b).sum().item() / max(na * nb, 1e-300)


def effective_draws(estimate: GradientStats, reference: GradientStats) -> float:
    """Draws behind the combined standard error √(se_est² + se_ref²), taken conservatively: the
    fewer of the two sides' sample draws (exact sides do not count). Welch–Satterthwaite's ν lies
    between min(ν_e, ν_r) and ν_e + ν_r for every element, so min is safe element by element; a
    ν pooled over all elements is not (with 2 seeds, one element of a million whose two draws
    happen to agree gets a tiny SE and a huge z, which only df = 1 tails allow for)."""
    v_e = sum((s**2).sum().item() for s in estimate.se)
    v_r = sum((s**2).sum().item() for s in reference.se)
    draws = [n for v, n in ((v_e, estimate.sample_draws), (v_r, reference.sample_draws))
             if v > 0 and math.isfinite(n)]
    return min(draws) if draws else math.inf


def expected_gradient_rows(name: str, estimate: GradientStats, reference: GradientStats, names: Sequence[str],
                           alpha: float = FAMILY_ALPHA, note: str = "") -> List[Row]:
    """A summary row and one row per parameter tensor (see the module docstring)."""
    elements = sum(m.numel() for m in estimate.mean)
    limit = z_limit(elements, alpha, effective_draws(estimate, reference))
    rows, worst_all, worst_name, min_cos = [], 0.0, "", 1.0
    for pname, m, s, r, sr in zip(names, estimate.mean, estimate.se, reference.mean, reference.se):
        scale = max(m.abs().max().item(), r.abs().max().item(), 1e-300) if m.numel() else 1.0
        floor = 1e-9 * scale
        z = (m - r).abs() / (s**2 + sr**2 + floor**2).sqrt().clamp_min(1e-300)  # 0 where both are exactly 0
        worst = z.max().item() if z.numel() else 0.0
        r_norm = r.norm().item()
        err = (m - r).norm().item()
        noise = (s**2 + sr**2).sum().sqrt().item()
        cos = _cosine(m, r)
        if worst >= worst_all:
            worst_all, worst_name = worst, pname
        if r_norm > 0 and noise < 0.5 * r_norm:  # a cosine only means something where the signal shows
            min_cos = min(min_cos, cos)
        rows.append(Row("expected gradient", f"{name}: {pname}", r_norm, m.norm().item(), err,
                        err / r_norm if r_norm else math.nan, f"|z| <= {limit:.2f}", worst <= limit,
                        f"cos {cos:+.4f}, worst z {worst:.2f}, noise {noise / r_norm:.2g}" if r_norm else
                        f"both zero within {m.abs().max().item() if m.numel() else 0:.1e}; worst z {worst:.2f}",
                        details={"cosine": cos, "worst_z": worst, "relative_error": err / r_norm if r_norm else None,
                                 "relative_noise": noise / r_norm if r_norm else None}))
    passed = worst_all <= limit
    summary = Row("expected gradient", f"{name}: {estimate.how} vs reference", math.nan, math.nan,
                  math.nan, math.nan, f"worst |z| <= {limit:.2f} over {elements} elements (alpha {alpha:g})", passed,
                  f"worst z {worst_all:.2f} at {worst_name}; min cosine {min_cos:+.4f}" + (f"; {note}" if note else ""),
                  details={"worst_z": worst_all, "limit": limit, "min_cosine": min_cos, "seeds": estimate.draws})
    return [summary] + rows
