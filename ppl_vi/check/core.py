"""The consistency checker: a hand-derived bound against Pyro's loss, datapoint by datapoint, and on average.

For any model/guide pair (ours or a user's) and a hand-written bound, four kinds of check:

* **same sample**: with the RNG seeded, Pyro's loss is evaluated (and differentiated) while the
  guide's draws are recorded; the RNG is re-seeded, the guide is re-run under a particle plate to
  reproduce those draws (verified equal), and the hand bound is evaluated on them. Compared: the
  loss (mean per datapoint), every datapoint's own value, and the gradient of every parameter.
  Pyro's value for datapoint i is its loss with every other datapoint masked out of the data plate
  (``poutine.mask``-style, draws unchanged), so any Pyro loss decomposes, enumerated ones included.
* **statistical**: Pyro's estimator and the hand one over many seeds, paired (each seed's draws
  serve both: common random numbers), so the standard error is that of their difference; its
  mean must be zero within 4 standard errors (and rounding).
* **expected gradient** (:mod:`ppl_vi.check.gradients`): the estimator's gradient averaged over
  seeds against the gradient of the objective it targets, exact over discrete sites.
* **ground truth** (:mod:`ppl_vi.check.truth`, where log p(x) is exact).

**The hand bound's form.** ``hand(batch, draws)`` returns the *negative* bound per datapoint, shape
(B,), averaged over the K particles, when every latent is local (in the data plate). When the guide
has a global latent (a site outside the data plate) no per-datapoint split exists: ``hand`` returns
the batch total, shape (), and totals are compared (a user's file may also give (B,) values or named
terms: :mod:`ppl_vi.check.usercheck` sums them first). Any other shape is a failing row that says the
expected shape (a (K, B) result is named: one value per particle instead of per datapoint).

**The data plate** is the plate at dim ``-max_plate_nesting`` (built-in models), or the plate of a given
name (``data_plate``: a user's file), so a global latent in its own plate (``pyro.plate("components")``)
is told apart from the datapoints even at the same dim.

**Particles** are drawn in one vectorised guide run (a particle plate left of the model's plates), or
one guide run after another (``Comparison.vectorized=False``) for models that do not broadcast over
a particle dim; the draws are then stacked, (K,) + the site's shape.

Every check becomes a :class:`~ppl_vi.check.rows.Row`. A check that raises becomes a failing row
naming the error where the checked code is at fault (the hand bound raised, or the structure row
failed: a guide that misses a site or has the wrong shape); otherwise the checker could not run it,
and it is a row marked "not run" with the reason, which counts neither way.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, List, Optional, Sequence

import pyro
import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO
from pyro.poutine.messenger import Messenger
from torch import Tensor

from ppl_vi.check.gradients import (GradientStats, TooManyTuples, enumerated_gradient_stats, exact_stats,
                                    expected_gradient_rows, gradient_stats)
from ppl_vi.check.reference import discrete_sites, has_continuous_sites, reference_loss
from ppl_vi.check.rows import CheckReport, Row, failure_row, not_run_row, one_line, rel_diff
from ppl_vi.models.base import Batch, Draws, draws_from_trace, sample_draws
from ppl_vi.objectives.losses import target_of
from ppl_vi.sites import guide_sites, in_data_plate, is_latent

HandBound = Callable[[Batch, Draws], Tensor]  # (batch, draws) -> per-datapoint loss (B,), or () with global latents


@dataclasses.dataclass
class Comparison:
    """One Pyro loss held against one hand-written per-datapoint loss (a negative bound).

    ``loss`` is a Pyro ELBO object (``Trace_ELBO(num_particles=K, vectorize_particles=True,
    max_plate_nesting=...)``, ``RenyiELBO(alpha=0, ...)``, our ``IWAELoss``...). ``hand(batch,
    draws)`` returns the per-datapoint loss at the guide's draws (see the module docstring for its
    shape). ``model``/``guide`` override the pair's defaults (a ``poutine.scale``-d model for β,
    another guide). ``same_sample=False`` where the hand bound needs no draws (enumeration);
    ``draws`` re-creates the draws after re-seeding where the default particle-plate run would not
    (e.g. the SSVAE's enumerated guide). ``compare_grads=False`` where only the value is comparable.
    ``target`` ("elbo" or "iwae"; default the loss's own: :func:`~ppl_vi.objectives.losses.target_of`) names
    the objective whose gradient the loss's expected gradient must equal; None skips the expected-gradient rows.
    """

    name: str
    loss: object
    hand: HandBound
    num_particles: int = 1
    model: Optional[Callable] = None
    guide: Optional[Callable] = None
    same_sample: bool = True
    compare_grads: bool = True
    statistical: bool = True
    draws: Optional[Callable[[Batch], Draws]] = None
    target: Optional[str] = "auto"
    vectorized: bool = True  # False: the loss draws its K particles one guide run at a time
    #: why the same-sample gradients are not comparable though the expected gradient is ("": they are):
    #: a value's gradient lacks the score-function term Pyro adds for a guide site without rsample
    value_only: str = ""
    gradient_name: Optional[str] = None  # the expected-gradient rows' name (default ``name``)

    def objective(self) -> Optional[str]:
        return target_of(self.loss) if self.target == "auto" else self.target


class HandError(Exception):
    """The hand bound raised: a failure of the checked code, not of the checker."""


def call_hand(c: "Comparison", batch: Batch, draws: Draws) -> Tensor:
    """``c.hand(batch, draws)``, its exceptions marked as the hand bound's (:class:`HandError`)."""
    try:
        return c.hand(batch, draws)
    except HandError:
        raise
    except Exception as exc:  # noqa: BLE001 - re-raised, marked
        raise HandError(f"the hand bound raised {one_line(exc)}") from exc


def sequential_draws(guide: Callable, batch: Batch, num_particles: int) -> Draws:
    """K guide runs, one after another (as ``Trace_ELBO(vectorize_particles=False)`` draws them): each
    latent site's values stacked, (K,) + the site's shape."""
    runs = [poutine.trace(guide).get_trace(**batch) for _ in range(num_particles)]
    return {n: torch.stack([t.nodes[n]["value"] for t in runs]) for n, s in runs[0].nodes.items() if is_latent(s)}


def comparison_draws(c: "Comparison", guide, batch: Batch, max_plate_nesting: int) -> Draws:
    """The draws of comparison ``c`` after seeding: its own ``draws``, one vectorised run, or K runs."""
    if c.draws is not None:
        return c.draws(batch)
    if not c.vectorized:
        return sequential_draws(guide, batch, c.num_particles)
    return sample_draws(guide, batch, c.num_particles, max_plate_nesting)


# ----------------------------------------------------------------------------------------------
# Pyro's side


def pyro_loss_and_grads(loss, model, guide, batch: Batch, params: Sequence[Tensor]):
    """Pyro's loss value and its gradient for each of ``params`` (zeros where unused).

    Uses ``differentiable_loss`` where the loss has one, else ``loss_and_grads`` (RenyiELBO).
    """
    if hasattr(loss, "differentiable_loss"):
        value = loss.differentiable_loss(model, guide, **batch)
        grads = torch.autograd.grad(value, params, allow_unused=True)
        value = value.item()
    else:
        for p in params:
            p.grad = None
        value = loss.loss_and_grads(model, guide, **batch)
        grads = [p.grad for p in params]
    grads = [torch.zeros_like(p) if g is None else g.detach().clone() for p, g in zip(params, grads)]
    return float(value), grads


def loss_value(loss, model, guide, batch: Batch) -> float:
    """The loss's value without a gradient."""
    with torch.no_grad():
        return float(loss.loss(model, guide, **batch))


def recording(guide: Callable, traces: list) -> Callable:
    """``guide`` that appends the trace of each of its runs to ``traces``."""

    def recorded(*args, **kwargs):
        with poutine.trace() as tracer:
            out = guide(*args, **kwargs)
        traces.append(tracer.trace)
        return out

    return recorded


class KeepDatapoint(Messenger):
    """Mask every sample site of the data plate (the plate of ``size`` named ``data_plate``, else at dim
    ``-max_plate_nesting``) down to datapoint ``index``: the loss of the masked pair is that datapoint's
    own term."""

    def __init__(self, index: int, size: int, max_plate_nesting: int, device=None, data_plate: Optional[str] = None):
        super().__init__()
        self.index, self.size, self.nest, self.device, self.plate = index, size, max_plate_nesting, device, data_plate

    def _process_message(self, msg):
        if msg["type"] != "sample":
            return
        frame = next((f for f in msg["cond_indep_stack"] if f.size == self.size and (
            f.name == self.plate if self.plate is not None else f.dim == -self.nest)), None)
        if frame is None:
            return
        device = msg["value"].device if torch.is_tensor(msg["value"]) else self.device
        keep = torch.zeros((self.size,) + (1,) * (-frame.dim - 1), dtype=torch.bool, device=device)
        keep[self.index] = True
        msg["mask"] = keep if msg["mask"] is None else msg["mask"] & keep.to(getattr(msg["mask"], "device", device))


def batch_size(batch: Batch) -> int:
    return next(v for v in batch.values() if torch.is_tensor(v)).shape[0]


def batch_device(batch: Batch) -> torch.device:
    return next(v for v in batch.values() if torch.is_tensor(v)).device


def pyro_per_datapoint(loss, model, guide, batch: Batch, seed: int, max_plate_nesting: int,
                       data_plate: Optional[str] = None) -> Tensor:
    """Pyro's loss split into datapoints, (B,): datapoint i's value is the loss with the others masked
    out, on the same draws (re-seeded each time; masks do not change what the guide samples)."""
    size = batch_size(batch)
    values = []
    for i in range(size):
        pyro.set_rng_seed(seed)
        keep = KeepDatapoint(i, size, max_plate_nesting, batch_device(batch), data_plate)
        values.append(loss_value(loss, keep(model), keep(guide), batch))
    return torch.tensor(values, dtype=torch.float64)


def global_sites(trace, max_plate_nesting: int, data_plate: Optional[str] = None) -> List[str]:
    """Latent sites of a guide trace that lie outside the data plate."""
    return [n for n, s in trace.nodes.items() if is_latent(s) and not in_data_plate(s, max_plate_nesting, data_plate)]


def hand_shape_error(shape, size: int, num_particles: int, is_global: bool) -> Optional[str]:
    """None when the hand bound's shape is the documented one, else a one-line error."""
    expected = () if is_global else (size,)
    if tuple(shape) == expected:
        return None
    if is_global:
        return (f"the hand bound returned shape {tuple(shape)}; with a global latent it must be the batch total, "
                "shape () (no per-datapoint split exists)")
    if tuple(shape) == (num_particles, size) and num_particles > 1:
        return (f"the hand bound returned shape (K, B) = {tuple(shape)}: one value per particle, not per datapoint; "
                f"average over the K = {num_particles} particles to return shape ({size},)")
    return f"the hand bound returned shape {tuple(shape)}; expected ({size},): one value per datapoint"


# ----------------------------------------------------------------------------------------------
# The kinds of check


def reproduce_draws(c: Comparison, guide, batch, traces, max_plate_nesting, seed) -> Optional[Draws]:
    """The guide's draws re-created after re-seeding, checked identical to the recorded ones (None if not)."""
    pyro.set_rng_seed(seed)
    draws = comparison_draws(c, guide, batch, max_plate_nesting)
    if c.draws is None and not c.vectorized:  # the last K guide runs, one per particle
        runs = traces[-c.num_particles:]
        same = len(runs) == c.num_particles and all(
            torch.equal(torch.stack([t.nodes[n]["value"] for t in runs]).detach(), v.detach())
            for n, v in draws.items())
        return draws if same else None
    if c.draws is not None:  # another layout (e.g. enumerated): compare values, not shapes
        recorded = {n: s["value"] for n, s in traces[-1].nodes.items() if is_latent(s)}
        same = set(draws) <= set(recorded) and all(
            recorded[k].numel() == draws[k].numel() and torch.equal(recorded[k].detach().reshape(draws[k].shape),
                                                                     draws[k].detach())
            for k in draws if torch.is_floating_point(draws[k]))
    else:
        recorded = draws_from_trace(traces[-1], c.num_particles, max_plate_nesting)
        same = set(recorded) == set(draws) and all(torch.equal(recorded[k].detach(), draws[k].detach()) for k in draws)
    return draws if same else None


def same_sample_rows(c: Comparison, model, guide, batch, params, names, max_plate_nesting, seed, rtol,
                     data_plate: Optional[str] = None) -> List[Row]:
    """Pyro's loss and the hand bound on the very same draws: mean value, each datapoint, every gradient.
    Draws that cannot be re-created raise (the checker cannot hold the bound against them)."""
    model, guide = c.model or model, c.guide or guide
    traces: list = []
    pyro.set_rng_seed(seed)
    if c.compare_grads and params and not c.value_only:
        pyro_value, pyro_grads = pyro_loss_and_grads(c.loss, model, recording(guide, traces), batch, params)
    else:  # values only (e.g. IWAE-k of a discrete guide, which has no pathwise gradient)
        pyro_value, pyro_grads = loss_value(c.loss, model, recording(guide, traces), batch), []
    size = batch_size(batch)
    is_global = bool(traces) and bool(global_sites(traces[-1], max_plate_nesting, data_plate))
    note = ""
    if c.same_sample:
        draws = reproduce_draws(c, guide, batch, traces, max_plate_nesting, seed)
        if draws is None:
            raise RuntimeError("could not reproduce the guide's draws by re-seeding (does the guide use another "
                               "random number generator than torch's?)")
        note = f"K={c.num_particles}, draws verified identical" + ("" if c.vectorized else ", drawn one run at a time")
    else:
        draws = {}
    hand = call_hand(c, batch, draws)
    problem = hand_shape_error(hand.shape, size, c.num_particles, is_global)
    if problem:
        return [Row("same sample", f"{c.name}: per datapoint", passed=False, note=f"error: {problem}",
                    details={"hand_shape": list(hand.shape), "expected_shape": [] if is_global else [size],
                             "num_particles": c.num_particles})]
    hand_total = hand.sum()
    grads = c.compare_grads and params and not c.value_only
    hand_grads = torch.autograd.grad(hand_total, params, allow_unused=True) if grads else []
    hand_grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, hand_grads)]
    hand_value = hand_total.item()
    tol = f"rel <= {rtol:g}"
    unit = "batch total (global latent)" if is_global else f"mean per datapoint over {size}"
    div = 1 if is_global else size
    rows = [Row("same sample", f"{c.name}: loss", pyro_value / div, hand_value / div, abs(pyro_value - hand_value) / div,
                rel_diff(pyro_value, hand_value), tol, rel_diff(pyro_value, hand_value) <= rtol, f"{unit}; {note}")]
    if not is_global:
        rows.append(per_datapoint_row(c, model, guide, batch, hand.detach(), max_plate_nesting, seed, rtol, pyro_value,
                                      data_plate))
    if c.compare_grads and params and c.value_only:
        rows.append(not_run_row("same sample", f"{c.name}: gradients of {len(params)} tensors", c.value_only))
    elif c.compare_grads and params:
        worst, worst_name, worst_abs = 0.0, "", 0.0
        for name, gp, gh in zip(names, pyro_grads, hand_grads):
            scale = max(gp.abs().max().item(), gh.abs().max().item(), 1e-300)
            diff = (gp - gh).abs().max().item()
            if diff / scale >= worst:
                worst, worst_name, worst_abs = diff / scale, name, diff
        rows.append(Row("same sample", f"{c.name}: gradients of {len(params)} tensors", math.nan, math.nan, worst_abs,
                        worst, tol + " (worst tensor)", worst <= rtol, f"worst: {worst_name}"))
    return rows


def per_datapoint_row(c: Comparison, model, guide, batch, hand: Tensor, max_plate_nesting, seed, rtol,
                      pyro_total: float, data_plate: Optional[str] = None) -> Row:
    """Pyro's value for each datapoint (masked loss) against the hand bound's, worst datapoint."""
    name = f"{c.name}: each datapoint"
    pyro_values = pyro_per_datapoint(c.loss, model, guide, batch, seed, max_plate_nesting, data_plate)
    hand = hand.double().cpu()
    diff = (pyro_values - hand).abs()
    rel = diff / torch.maximum(pyro_values.abs(), hand.abs()).clamp_min(1e-300)
    worst = int(rel.argmax())
    bad = (rel > rtol).nonzero().flatten().tolist()
    decomposed = rel_diff(pyro_values.sum().item(), pyro_total)
    note = f"worst datapoint {worst}" + (f"; differ at datapoints {bad[:8]}{' ...' if len(bad) > 8 else ''}"
                                         if bad else "")
    if decomposed > max(rtol, 1e-9):
        note += f"; Pyro's per-datapoint values sum to its total only within {decomposed:.1e}"
    return Row("same sample", name, pyro_values[worst].item(), hand[worst].item(), diff[worst].item(),
               rel[worst].item(), f"rel <= {rtol:g} at every datapoint", not bad, note,
               details={"pyro": pyro_values.tolist(), "hand": hand.tolist(), "differing": bad})


def statistical_row(c: Comparison, model, guide, batch, params, max_plate_nesting, repeats, seed,
                    rtol: float = 1e-9, data_plate: Optional[str] = None) -> Row:
    """Pyro's estimator and the hand one over ``repeats`` seeds, paired: seed s draws for both (the same
    draws where they draw alike, common random numbers otherwise), so the standard error is that of
    the difference d_s = pyro_s - hand_s. Passes when |mean d| <= 4 SE(d) + rtol·|mean| (rounding)."""
    model, guide = c.model or model, c.guide or guide
    traces: list = []
    pyro.set_rng_seed(seed)
    loss_value(c.loss, model, recording(guide, traces), batch)
    is_global = bool(traces) and bool(global_sites(traces[-1], max_plate_nesting, data_plate))
    size = 1 if is_global else batch_size(batch)
    pyro_values, hand_values = [], []
    for r in range(repeats):
        pyro.set_rng_seed(seed + 1 + r)
        pyro_values.append(loss_value(c.loss, model, guide, batch) / size)
        pyro.set_rng_seed(seed + 1 + r)
        with torch.no_grad():
            draws = comparison_draws(c, guide, batch, max_plate_nesting) if c.same_sample else {}
            hand_values.append(call_hand(c, batch, draws).sum().item() / size)
    p, h = torch.tensor(pyro_values, dtype=torch.float64), torch.tensor(hand_values, dtype=torch.float64)
    d = p - h
    se = d.std().item() / math.sqrt(repeats)
    diff = abs(d.mean().item())
    ok = diff <= 4 * se + max(rtol, 1e-12) * max(abs(p.mean().item()), abs(h.mean().item()), 1.0)
    return Row("statistical", f"{c.name}: mean over {repeats} seeds", p.mean().item(), h.mean().item(), diff,
               rel_diff(p.mean().item(), h.mean().item()), "within 4 SE", ok,
               f"{'batch total (global latent)' if is_global else 'per datapoint'}; paired seeds, SE of the "
               f"difference {se:.3g} (a bias above ~{4 * se:.2g} fails)")


REFERENCE_GROUPS = 60  # the reference's SE from 60 groups of replicates: 59 degrees of freedom (30 + 30 split)


def reference_stats(model, guide, batch, params, *, target: str, k: int, max_plate_nesting: int, seed: int,
                    draws: int, data_plate: Optional[str] = None) -> GradientStats:
    """The reference gradient: exact (one evaluation) without continuous guide sites, else the mean of
    ``REFERENCE_GROUPS`` groups of pathwise replicates (``draws`` replicates in all) with its standard
    error; its direction from the first half of the groups, the second half projected on it."""
    kw = dict(target=target, k=k, max_plate_nesting=max_plate_nesting)
    if data_plate is not None:
        kw["data_plate"] = data_plate
    if not has_continuous_sites(guide, batch, max_plate_nesting):
        return exact_stats(lambda: reference_loss(model, guide, batch, replicates=1, **kw), params, seed)
    replicates = max(1, math.ceil(draws / REFERENCE_GROUPS))
    return gradient_stats(lambda: reference_loss(model, guide, batch, replicates=replicates, **kw), params,
                          [seed + 7919 * (g + 1) for g in range(REFERENCE_GROUPS)], split=True)


def expected_gradient_check(name: str, loss_fn: Callable[[Batch], Tensor], model, guide, batch, params, names, *,
                            target: str, k: int, max_plate_nesting: int = 1, seeds: int = 200, seed: int = 0,
                            enumerate_discrete: bool = True, reference_draws: Optional[int] = None,
                            note: str = "", data_plate: Optional[str] = None) -> List[Row]:
    """Rows holding the expectation of ∇``loss_fn(batch)`` against the ``target`` objective's gradient
    for ``model``/``guide`` (:mod:`ppl_vi.check.reference`). ``loss_fn`` is any estimator of minus the
    objective summed over the batch (a Pyro loss, ours, the trainer's fast path).

    With discrete guide sites and ``enumerate_discrete`` (False for losses that enumerate them
    themselves), the estimator's expectation is taken exactly over them, datapoint by datapoint
    (:func:`~ppl_vi.check.gradients.enumerated_gradient_stats`; ``seeds`` then only average the
    continuous sites, 1 seed without any); otherwise it is averaged over ``seeds`` seeds."""
    discrete = enumerate_discrete and bool(discrete_sites(guide, batch, max_plate_nesting))
    continuous = has_continuous_sites(guide, batch, max_plate_nesting)
    reference = reference_stats(model, guide, batch, params, target=target, k=k, max_plate_nesting=max_plate_nesting,
                                seed=seed, draws=reference_draws or 10 * seeds, data_plate=data_plate)
    if discrete:
        draws = [seed + 100_003 + s for s in range(seeds if continuous else 1)]
        try:
            estimate = enumerated_gradient_stats(loss_fn, params, batch, guide, max_plate_nesting, k, draws,
                                                 directions=reference.directions)
            note = "; ".join(x for x in (note, "discrete sites enumerated" + (", continuous averaged" if continuous
                                                                              else ": exact")) if x)
        except TooManyTuples as exc:  # sample the discrete sites too, and say so
            discrete = False
            note = "; ".join(x for x in (note, f"discrete sites sampled, not enumerated ({exc})") if x)
        except Exception as exc:  # noqa: BLE001 - e.g. per-datapoint guide parameters: no batch of one
            discrete = False
            note = "; ".join(x for x in (note, "discrete sites sampled, not enumerated (the pair does not run on "
                                         f"one datapoint at a time: {one_line(exc)})") if x)
    if not discrete:  # nothing random when the loss enumerates every discrete site and nothing is continuous
        random = continuous or any(not s["infer"].get("enumerate") for s in guide_sites(guide, batch).values()
                                   if not getattr(s["fn"], "has_rsample", False))
        estimate = gradient_stats(lambda: loss_fn(batch), params,
                                  [seed + 100_003 + s for s in range(seeds if random else 1)],
                                  directions=reference.directions)
    return expected_gradient_rows(name, estimate, reference, names, note=note)


def structure_row(model, guide, batch, max_plate_nesting) -> Row:
    """The guide samples every latent site of the model, with matching shapes."""
    try:
        guide_trace = poutine.trace(guide).get_trace(**batch)
        model_trace = poutine.trace(poutine.block(model, hide_types=["param"])).get_trace(**batch)
        latent = {n: s for n, s in model_trace.nodes.items() if is_latent(s)}
        guided = {n: s for n, s in guide_trace.nodes.items() if is_latent(s)}
        missing = sorted(set(latent) - set(guided))
        extra = sorted(n for n in set(guided) - set(latent)
                       if not guided[n]["infer"].get("is_auxiliary"))  # an autoguide's auxiliary site: log q only
        bad_shape = [n for n in set(latent) & set(guided) if latent[n]["value"].shape != guided[n]["value"].shape]
        problems = []
        if missing:
            problems.append(f"guide misses latent site(s) {missing} (allowed only where the model enumerates them)")
        if extra:
            problems.append(f"guide has site(s) {extra} the model does not sample")
        if bad_shape:
            problems.append("shape mismatch at " + ", ".join(
                f"{n}: model {tuple(latent[n]['value'].shape)} vs guide {tuple(guided[n]['value'].shape)}" for n in bad_shape))
        enumerated = [n for n in missing if latent[n]["infer"].get("enumerate") == "parallel"]
        problems = [p for p in problems if not (p.startswith("guide misses") and enumerated == missing)]
        return Row("structure", "guide covers the model's latent sites", passed=not problems,
                   note="; ".join(problems) or f"model latents {sorted(latent)}, guide {sorted(guided)}")
    except Exception as exc:  # noqa: BLE001 - reported as a failing row
        return failure_row("structure", "guide covers the model's latent sites", exc)


@dataclasses.dataclass
class ExtraCheck:
    """More rows for a report (ground truth): ``run()`` returns them; ``name`` and ``kind`` label the
    row that says why they could not run, if ``run`` raises."""

    name: str
    kind: str
    run: Callable[[], List[Row]]


def error_row(kind: str, name: str, exc: BaseException, structure_ok: bool) -> Row:
    """A check that raised: failed where the checked code is at fault (the hand bound raised, or the
    guide does not cover the model), else not run for the checker's own reasons."""
    if isinstance(exc, HandError) or not structure_ok:
        return failure_row(kind, name, exc)
    return not_run_row(kind, name, exc)


def check(model: Callable, guide: Callable, batch: Batch, comparisons: Sequence[Comparison],
          params: Sequence[Tensor], *, param_names: Optional[Sequence[str]] = None, max_plate_nesting: int = 1,
          seed: int = 0, rtol: float = 1e-6, repeats: int = 50, gradient_seeds: int = 0,
          gradient_batch: Optional[int] = 8, extra_rows: Sequence = (), data_plate: Optional[str] = None
          ) -> CheckReport:
    """Run every comparison (same sample, statistical, expected gradient) and any extra checks.

    ``model``/``guide`` are plain Pyro callables taking ``**batch``; ``params`` the tensors whose
    gradients are compared (float64 recommended: the default tolerance is 1e-6 relative).
    ``repeats`` seeds for the statistical rows (fewer than 2: skipped, and the verdict says so);
    ``gradient_seeds`` seeds for the expected-gradient rows of each comparison that compares
    gradients and names a target (0: skipped, and the verdict says so), on the first
    ``gradient_batch`` datapoints (None: the whole batch; always the whole batch with a global
    latent). ``extra_rows`` are :class:`ExtraCheck` (or callables) returning more rows (ground truth).
    ``data_plate`` names the data plate (default: the plate at dim -max_plate_nesting). A check that
    raises is a failing row where the checked code is at fault, else a row that did not run (the
    module docstring).
    """
    params = list(params)
    names = list(param_names) if param_names is not None else [f"param[{i}]" for i in range(len(params))]
    nest = max_plate_nesting
    rows = [structure_row(model, guide, batch, nest)]
    structure_ok = rows[0].passed
    skipped = []
    for c in comparisons:
        try:
            rows += same_sample_rows(c, model, guide, batch, params, names, nest, seed, rtol, data_plate)
        except Exception as exc:  # noqa: BLE001
            rows.append(error_row("same sample", c.name, exc, structure_ok))
    statistical = [c for c in comparisons if c.statistical]
    if statistical and repeats < 2:
        skipped.append(f"{len(statistical)} statistical row(s) (repeats={repeats} < 2)")
    for c in statistical if repeats >= 2 else []:
        try:
            rows.append(statistical_row(c, model, guide, batch, params, nest, repeats, seed, rtol, data_plate))
        except Exception as exc:  # noqa: BLE001
            rows.append(error_row("statistical", f"{c.name}: mean over {repeats} seeds", exc, structure_ok))
    graded = [c for c in comparisons if c.compare_grads and c.objective() and params]
    if graded and gradient_seeds < 2:
        skipped.append(f"{len(graded)} expected-gradient check(s) (gradient_seeds={gradient_seeds} < 2)")
    for c in graded if gradient_seeds >= 2 else []:
        m, g = c.model or model, c.guide or guide
        name = c.gradient_name or c.name
        try:
            local = not global_sites(poutine.trace(poutine.block(g)).get_trace(**batch), nest, data_plate)
            cut = gradient_batch if local else None
            head = {k: (v[:cut] if torch.is_tensor(v) and v.dim() and cut else v) for k, v in batch.items()}
            rows += expected_gradient_check(name, lambda b, c=c, m=m, g=g: _differentiable(c.loss, m, g, b), m, g,
                                            head, params, names, target=c.objective(), k=c.num_particles,
                                            max_plate_nesting=nest, seeds=gradient_seeds, seed=seed,
                                            enumerate_discrete=not enumerates(c.loss), data_plate=data_plate)
        except Exception as exc:  # noqa: BLE001
            rows.append(error_row("expected gradient", name, exc, structure_ok))
    for extra in extra_rows:
        if not isinstance(extra, ExtraCheck):
            name = getattr(extra, "__name__", "")
            extra = ExtraCheck("ground truth" if name.startswith("<") or not name else name.replace("_", " "),
                               "ground truth", extra)
        try:
            rows += extra.run()
        except Exception as exc:  # noqa: BLE001
            rows.append(error_row(extra.kind, extra.name, exc, structure_ok))
    return CheckReport(rows, skipped)


def enumerates(loss) -> bool:
    """Does the loss sum out the discrete sites marked for enumeration itself (TraceEnum_ELBO)?
    A wrapper says so with an ``enumerates`` attribute."""
    return bool(getattr(loss, "enumerates", isinstance(loss, TraceEnum_ELBO)))


def _differentiable(loss, model, guide, batch) -> Tensor:
    """The loss as a differentiable scalar (``loss_and_grads`` losses are not supported here)."""
    if not hasattr(loss, "differentiable_loss"):
        raise TypeError(f"{type(loss).__name__} has no differentiable_loss; wrap it (see RenyiLoss)")
    return loss.differentiable_loss(model, guide, **batch)
