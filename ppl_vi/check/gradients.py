"""Expected-gradient checks: is an estimator's gradient, on average over seeds, the objective's gradient?

Same-sample equality proves that a loss computes what a hand derivation computes; it cannot see a
gradient whose *expectation* is wrong (a missing score-function term, a baseline that depends on
the particle it corrects, a DReG weight squared once too often). This module averages an estimator's
gradient over N seeds and holds it against a reference gradient r (:mod:`ppl_vi.check.reference`:
exact where the discrete part is enumerated and nothing is continuous, else the mean over G groups
of pathwise replicates, with its own standard error). Three tests, for each parameter tensor j:

* **element-wise**:  z_e = (ĝ_e - r_e) / √(se(ĝ)_e² + se(r)_e² + floor_e²),  ĝ = (1/N) Σ_n g_n,
  se(ĝ)_e = sd(g_e) / √N; passes when max |z| stays under the Bonferroni limit over all elements;
* **along the reference** (the aggregate test): the per-seed projections p_n = g_n · u_j on the
  unit reference direction u_j, t_j = (mean p - r·u_j) / se, Bonferroni over the tensors and one
  more test along the whole gradient's direction. A scale error, a half-weight term or a missing
  term that shortens or lengthens the gradient moves every element a little: invisible element by
  element, it adds up along u. u is estimated from the first half of the reference groups and the
  reference's own projection from the second half (cross-fitting: r̂ · û is biased upward by
  ‖se(r)‖²/‖r‖, an independent half is not);
* **cosine**, where the reference is clearly non-zero: the error d = ĝ - r has noise radius
  ρ = ‖(se(ĝ), se(r))‖ (its expected norm); a right estimator keeps ‖d‖ <= c ρ, c the two-sided t
  quantile at the row's share of α, Bonferroni over the tensors, at the tensor's degrees of
  freedom (‖d‖²/ρ² is a weighted mean of squared t's, whose tail is largest when one element
  carries all the weight). Every ĝ within c ρ of r has

      cos(ĝ, r) >= √(1 - (c ρ / ‖r‖)²),

  the test's limit (no test where c ρ >= ‖r‖: the noise could point anywhere). A fixed number of
  radii instead (four, formerly) fails a right estimator far more often than α at 10 seeds, where
  the radius is itself read off 10 draws.

**Honest tails.** A heavy-tailed estimator (DReG's w̃² weights at a poor guide: per-element
kurtosis up to ~16, skew ~3) makes the sample SE itself signal, and a t limit with N - 1 degrees of
freedom fails a right estimator 30 times too often at N = 30 (measured by resampling 4,000 seeds
of DReG on the test matrix's VAE). So each side's degrees of freedom are Satterthwaite's for a
variance estimated from draws of kurtosis κ: ν = 2 / (2/(N-1) + (κ-3)⁺/N), κ the largest sample
kurtosis among the tensor's elements (for the projections, their own). A heavy-tailed estimator
thus gets wide element-wise limits at few seeds, and the row says how large a bias it could see:
the **smallest detectable bias** along r, (t_limit + 1.645) se / ‖r‖ (95 % power), per tensor and
overall, is in the note. The element-wise limit uses the fewer of the two sides' ν per element
(Welch–Satterthwaite's ν lies between min(ν_e, ν_r) and ν_e + ν_r); the projection, a single
number, uses the fewer of the two sides' ν too. ``floor`` (1e-9 of the tensor's scale) stops an
exact estimator's rounding from counting as evidence. Family-wise α = 10⁻³, split evenly between
the three tests (element-wise, along r, cosine), each Bonferroni within its share.

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

Rows report, per parameter tensor, the cosine, the relative norm error ‖ĝ - r‖ / ‖r‖ (beside the
noise level), the worst z, the error along r and the smallest bias the row could detect.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, List, Optional, Sequence

import pyro
import torch
from pyro.poutine.messenger import Messenger
from torch import Tensor

from ppl_vi.check.reference import discrete_sites
from ppl_vi.check.rows import Row
from ppl_vi.check.tails import student_t_tail, t_quantile, variance_df, welch_df  # noqa: F401 (re-exported)
from ppl_vi.errors import ConfigError
from ppl_vi.sites import tuple_digits

FAMILY_ALPHA = 1e-3
POWER_Z = 1.645  # the smallest detectable bias is stated at 95 % power
CLEAR_SIGNAL = 0.25  # a reference is "clearly non-zero" where the noise is at most this fraction of its norm
TESTS = 3  # element-wise, along r, cosine: each gets alpha / TESTS


@dataclasses.dataclass
class GradientStats:
    """Per-element mean and standard error of a gradient over independent draws."""

    mean: List[Tensor]
    se: List[Tensor]
    draws: int
    how: str = ""  # how the expectation was formed, for the row's name
    sample_draws: float = math.inf  # samples behind each standard error (inf: exact, or no sampling noise)
    #: per tensor, the largest sample kurtosis among its elements (3: normal, or not estimated)
    kurtosis: Optional[List[float]] = None
    #: (draws, tensors) float64: each draw's projection on ``directions`` (None: not recorded)
    projections: Optional[Tensor] = None
    #: per tensor, the unit direction projected on (the reference's), and the norm it was taken from
    directions: Optional[List[Tensor]] = None
    direction_norms: Optional[List[float]] = None


def unit_directions(tensors: Sequence[Tensor]) -> tuple:
    """(each tensor / its norm, or zeros where it is zero; the norms)."""
    norms = [t.norm().item() for t in tensors]
    return [t / n if n > 0 else torch.zeros_like(t) for t, n in zip(tensors, norms)], norms


class Moments:
    """Running per-element moments of gradient draws, and each draw's projection on unit directions.

    Power sums Σ (g - g_1)^m, m = 1..4, are taken about the first draw g_1 (against cancellation when
    the mean dwarfs the spread); mean, unbiased variance and kurtosis m4 / m2² follow from them."""

    def __init__(self, directions: Optional[Sequence[Tensor]] = None):
        self.n, self.shift, self.sums, self.directions, self.projected = 0, None, None, directions, []

    def add(self, grads: Sequence[Tensor]) -> None:
        grads = [g.double() for g in grads]
        if self.shift is None:
            self.shift = [g.clone() for g in grads]
            self.sums = [[torch.zeros_like(g) for g in grads] for _ in range(4)]
        for j, g in enumerate(grads):
            d = g - self.shift[j]
            power = d
            for m in range(4):
                self.sums[m][j] += power
                power = power * d
        if self.directions is not None:
            self.projected.append(torch.stack([(g * u.double()).sum() for g, u in zip(grads, self.directions)]))
        self.n += 1

    def mean(self) -> List[Tensor]:
        return [s + t / self.n for s, t in zip(self.shift, self.sums[0])]

    def stats(self, how: str, sample_draws: float) -> GradientStats:
        n = self.n
        mean = self.mean()
        se, kurtosis = [], []
        for j, m in enumerate(mean):
            a, b, c, d = (self.sums[i][j] / n for i in range(4))
            m2 = (b - a * a).clamp_min(0)
            m4 = (d - 4 * a * c + 6 * a * a * b - 3 * a ** 4).clamp_min(0)
            se.append((m2 * n / (n - 1) / n).sqrt() if n > 1 else torch.zeros_like(m))
            kurtosis.append(_largest_kurtosis(m2, m4, m, n))
        projections = torch.stack(self.projected) if self.projected else None
        return GradientStats(mean, se, n, how, sample_draws, kurtosis, projections)


def _largest_kurtosis(m2: Tensor, m4: Tensor, mean: Tensor, n: int) -> float:
    """max_e m4_e / m2_e² over the elements whose spread is above rounding (1e-9 of the tensor's
    scale), clamped to the sample bound n; 3 (normal) below 4 draws or without such an element."""
    if n < 4 or not m2.numel():
        return 3.0
    scale = max(mean.abs().max().item(), m2.sqrt().max().item())
    spread = m2 > (1e-9 * scale) ** 2
    if not spread.any():
        return 3.0
    return min(float(n), (m4[spread] / m2[spread] ** 2).max().item())


def _column_kurtosis(x: Tensor) -> List[float]:
    """Sample kurtosis of each column of (n, T) draws (3 where undefined or n < 4)."""
    n = x.shape[0]
    c = x - x.mean(0)
    m2, m4 = (c ** 2).mean(0), (c ** 4).mean(0)
    return [min(float(n), (q / v ** 2).item()) if n >= 4 and v > 0 else 3.0 for v, q in zip(m2, m4)]


def _draw_gradient(loss_fn: Callable[[], Tensor], params: Sequence[Tensor], seed: int) -> List[Tensor]:
    pyro.set_rng_seed(seed)
    with pyro.validation_enabled(False):  # the same-sample rows validate; these loops only average
        loss = loss_fn()
    grads = torch.autograd.grad(loss, list(params), allow_unused=True)
    return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]


def gradient_stats(loss_fn: Callable[[], Tensor], params: Sequence[Tensor], seeds: Sequence[int],
                   directions: Optional[Sequence[Tensor]] = None, split: bool = False) -> GradientStats:
    """Mean, standard error and kurtosis of ∇ ``loss_fn()`` over ``seeds`` (each seeds Pyro's RNG first),
    with each draw's projection on ``directions`` (unit tensors, one per parameter).

    ``split``: the directions are the mean of the first half of the draws, and the second half's
    projections on them are recorded (the reference's cross-fitting, see the module docstring)."""
    seeds = list(seeds)
    moments = Moments(directions)
    half = len(seeds) // 2 if split else 0
    for i, seed in enumerate(seeds):
        if split and i == half:
            directions, norms = unit_directions(moments.mean())
            moments.directions = directions
        moments.add(_draw_gradient(loss_fn, params, seed))
    n = len(seeds)
    stats = moments.stats(f"mean over {n} seeds" if n > 1 else "one evaluation (deterministic)",
                          n if n > 1 else math.inf)
    if split:
        stats.directions, stats.direction_norms = directions, norms
    return stats


def exact_stats(loss_fn: Callable[[], Tensor], params: Sequence[Tensor], seed: int) -> GradientStats:
    """∇ ``loss_fn()`` evaluated once (an exact quantity): standard error 0, its own direction, and
    its projection on that direction (its norm)."""
    stats = gradient_stats(loss_fn, params, [seed])
    stats.directions, stats.direction_norms = unit_directions(stats.mean)
    stats.projections = torch.tensor([stats.direction_norms], dtype=torch.float64)
    return stats


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
    return dict(zip(names, tuple_digits(sizes, k, index)))


def enumerated_gradient_stats(loss_fn: Callable[[dict], Tensor], params: Sequence[Tensor], batch: dict, guide,
                              max_plate_nesting: int, k: int, seeds: Sequence[int], max_evaluations: int = 1_500,
                              directions: Optional[Sequence[Tensor]] = None) -> GradientStats:
    """E[∇ loss_fn(batch)] with the guide's discrete sites enumerated per datapoint (see the module
    docstring); ``seeds`` average the continuous sites (one seed suffices without any); each seed's
    expectation projected on ``directions``."""
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
    moments = Moments(directions)
    for draw in combined:
        moments.add(draw)
    n = len(seeds)
    how = f"expectation over {tuples} tuples x {size} datapoints" + (f" x {len(seeds)} seeds" if len(seeds) > 1 else
                                                                       ", exact")
    stats = moments.stats(how, n if n > 1 else math.inf)
    stats.draws = n * tuples * size
    return stats


def z_limit(elements: int, alpha: float = FAMILY_ALPHA, draws: float = math.inf, kurtosis: float = 3.0) -> float:
    """Bonferroni limit on the worst |z| of ``elements`` z-scores at family-wise ``alpha``.

    With a standard error estimated from ``draws`` samples, z follows Student's t with
    :func:`~ppl_vi.check.tails.variance_df` degrees of freedom (draws - 1 for normal draws, fewer
    for heavy tails: 12 normal seeds need |z| <= ~12 where the normal says 5.6)."""
    return t_quantile(alpha / (2 * max(elements, 1)), variance_df(draws, kurtosis))


def _clear(r: Tensor, se: Tensor, se_r: Tensor) -> bool:
    """Is the reference clearly non-zero: the noise radius at most CLEAR_SIGNAL of its norm?"""
    r_norm = r.norm().item()
    return r_norm > 0 and (se**2 + se_r**2).sum().sqrt().item() <= CLEAR_SIGNAL * r_norm


def _cosine(a: Tensor, b: Tensor) -> float:
    na, nb = a.norm().item(), b.norm().item()
    if na == 0 and nb == 0:
        return 1.0
    return (a * b).sum().item() / max(na * nb, 1e-300)


def _side_df(stats: GradientStats, j: int) -> float:
    """A side's degrees of freedom for tensor j's element-wise standard errors (infinite: exact)."""
    kurtosis = stats.kurtosis[j] if stats.kurtosis else 3.0
    return variance_df(stats.sample_draws, kurtosis)


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


@dataclasses.dataclass
class _Along:
    """The test along one direction: error of the estimator's projection, its SE, df, t and limit."""

    error: float
    se: float
    df: float
    t: float
    limit: float = math.inf
    detectable: float = math.nan  # smallest detectable bias, relative to the reference's norm

    @property
    def passed(self) -> bool:
        return abs(self.t) <= self.limit


def _along(est: Tensor, ref: Tensor, est_draws: float, ref_draws: float, scale: float) -> _Along:
    """Mean projection of the estimator's draws ``est`` (n,) against the reference's ``ref`` (m,)."""
    parts = []
    for x, draws in ((est, est_draws), (ref, ref_draws)):
        n = x.numel()
        var = x.var().item() / n if n > 1 and math.isfinite(draws) else 0.0
        parts.append((var, variance_df(n, _column_kurtosis(x.reshape(-1, 1))[0]) if var > 0 else math.inf))
    error = est.mean().item() - ref.mean().item()
    se = math.sqrt(sum(v for v, _ in parts) + (1e-9 * scale) ** 2)
    # the fewer of the two sides' df (as the element-wise limit takes): Welch's df trusts a variance read off
    # 2 seeds whenever that side looks small, which by chance it often is (a false alarm on a right estimator)
    df = min([nu for v, nu in parts if v > 0] + [math.inf])
    return _Along(error, se, df, error / se)


def expected_gradient_rows(name: str, estimate: GradientStats, reference: GradientStats, names: Sequence[str],
                           alpha: float = FAMILY_ALPHA, note: str = "") -> List[Row]:
    """A summary row and one row per parameter tensor (see the module docstring)."""
    elements = sum(m.numel() for m in estimate.mean)
    along = _along_tests(estimate, reference, alpha / TESTS)
    signal = [j for j, (r, s, sr) in enumerate(zip(reference.mean, estimate.se, reference.se))
             if _clear(r, s, sr)]  # the tensors a cosine is tested on share alpha / TESTS
    rows, worst_all, worst_name, worst_limit, worst_ratio, min_cos = [], 0.0, "", math.inf, -1.0, 1.0
    failed = []
    for j, (pname, m, s, r, sr) in enumerate(zip(names, estimate.mean, estimate.se, reference.mean, reference.se)):
        df = min(_side_df(estimate, j) if (s > 0).any() else math.inf, _side_df(reference, j) if (sr > 0).any()
                 else math.inf)
        limit = t_quantile(alpha / TESTS / (2 * max(elements, 1)), df)
        scale = max(m.abs().max().item(), r.abs().max().item(), 1e-300) if m.numel() else 1.0
        floor = 1e-9 * scale
        z = (m - r).abs() / (s**2 + sr**2 + floor**2).sqrt().clamp_min(1e-300)  # 0 where both are exactly 0
        worst = z.max().item() if z.numel() else 0.0
        r_norm = r.norm().item()
        err = (m - r).norm().item()
        noise = (s**2 + sr**2).sum().sqrt().item()
        cos = _cosine(m, r)
        clear = j in signal  # a cosine only means something where the signal shows
        radius = math.hypot(noise, floor * math.sqrt(r.numel()))  # rounding counts as noise too
        radii = t_quantile(alpha / TESTS / (2 * len(signal)), df) if clear else math.inf
        cos_min = math.sqrt(1 - (radii * radius / r_norm) ** 2) if radii * radius < r_norm else None
        if clear:
            min_cos = min(min_cos, cos)
        test = along.get(j)
        ok = worst <= limit and (cos_min is None or cos >= cos_min - 1e-12) and (test is None or test.passed)
        if worst / limit > worst_ratio:  # the element nearest its limit
            worst_all, worst_name, worst_limit, worst_ratio = worst, pname, limit, worst / limit
        if not ok:
            failed.append(pname)
        tolerance = f"|z| <= {limit:.2f}" + (f", |t along r| <= {test.limit:.2f}" if test else "") + \
            (f", cos >= {cos_min:.4f}" if cos_min is not None else "")
        detail = {"cosine": cos, "cosine_min": cos_min, "worst_z": worst, "z_limit": limit,
                  "relative_error": err / r_norm if r_norm else None,
                  "relative_noise": noise / r_norm if r_norm else None}
        if test:
            detail.update(along_error=test.error, along_t=test.t, along_limit=test.limit,
                          detectable=test.detectable)
        rows.append(Row("expected gradient", f"{name}: {pname}", r_norm, m.norm().item(), err,
                        err / r_norm if r_norm else math.nan, tolerance, ok,
                        (f"cos {cos:+.4f}, worst z {worst:.2f}, noise {noise / r_norm:.2g}"
                         + (f", along r {test.error:+.2%} (t {test.t:+.2f}; detects >= {test.detectable:.1%})"
                            if test else "")) if r_norm else
                        f"both zero within {m.abs().max().item() if m.numel() else 0:.1e}; worst z {worst:.2f}",
                        details=detail))
    whole = along.get("all")
    if whole is not None and not whole.passed:
        failed.append("the whole gradient along r")
    passed = not failed
    clear_tests = [along[j] for j in along if j != "all" and j in signal]
    detect = max((t.detectable for t in clear_tests), default=math.nan)
    summary_note = (f"worst z {worst_all:.2f} at {worst_name} (limit {worst_limit:.2f}); min cosine {min_cos:+.4f}"
                    + (f"; whole gradient along r {whole.error:+.2%} (t {whole.t:+.2f}, limit {whole.limit:.2f})"
                       if whole else "")
                    + (f"; detects a bias along r >= {detect:.1%} per tensor, >= {whole.detectable:.2%} overall "
                       "(95% power)" if whole and clear_tests else "")
                    + (f"; failed: {', '.join(failed)}" if failed else "") + (f"; {note}" if note else ""))
    summary = Row("expected gradient", f"{name}: {estimate.how} vs reference", math.nan, math.nan,
                  math.nan, math.nan, f"per tensor: |z|, |t along r| and cosine (alpha {alpha:g} in all)", passed,
                  summary_note,
                  details={"worst_z": worst_all, "limit": worst_limit, "min_cosine": min_cos, "seeds": estimate.draws,
                           "detectable": detect, "detectable_overall": whole.detectable if whole else None,
                           "along_error": whole.error if whole else None, "along_t": whole.t if whole else None,
                           "failed": failed})
    return [summary] + rows


def _along_tests(estimate: GradientStats, reference: GradientStats, alpha: float) -> dict:
    """{tensor index: _Along} for each tensor with a non-zero reference, and "all" for the whole
    gradient (per draw Σ_j p_j ‖r_j‖ / ‖r‖, the projection on the whole reference direction);
    errors relative to the reference norms; {} where either side recorded no projections."""
    if estimate.projections is None or reference.projections is None or reference.direction_norms is None:
        return {}
    norms = reference.direction_norms
    total = math.sqrt(sum(n * n for n in norms))
    out = {}
    for j, norm in enumerate(norms):
        if norm > 0:
            out[j] = _along(estimate.projections[:, j], reference.projections[:, j], estimate.sample_draws,
                            reference.sample_draws, norm)
    if not out:
        return {}
    weights = torch.tensor(norms, dtype=torch.float64) / total
    out["all"] = _along(estimate.projections @ weights, reference.projections @ weights, estimate.sample_draws,
                        reference.sample_draws, total)
    tests = len(out)
    for key, test in out.items():
        norm = total if key == "all" else norms[key]
        test.limit = t_quantile(alpha / (2 * tests), test.df)
        test.detectable = (test.limit + POWER_Z) * test.se / norm
        test.error /= norm
    return out
