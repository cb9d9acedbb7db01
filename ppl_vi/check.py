"""The consistency checker: a hand-derived bound against Pyro's loss against the truth.

For any model/guide pair (ours or a user's) and a hand-written bound, three kinds of check:

* **same sample**: with the RNG seeded, Pyro's loss is evaluated (and differentiated) while the
  guide's draws are recorded; the RNG is re-seeded, the guide is re-run under a particle plate to
  reproduce those draws (verified equal), and the hand bound is evaluated on them. Loss values
  and the gradient of every parameter are compared: absolute and relative difference.
* **statistical**: Pyro's estimator and the hand one on *independent* draws over many seeds;
  their means must agree within 4 standard errors.
* **ground truth** (where log p(x) is exact): ELBO with the exact posterior as guide equals
  log p(x); log p(x) - ELBO equals KL(q || p(z|x)); ELBO ≤ IWAE_k ≤ log p(x) within their SE.

Every check becomes a :class:`Row`; a check that raises becomes a failing row naming the error,
so a guide that misses a site or has the wrong shape is reported, not crashed on.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict, List, Optional, Sequence

import pyro
import torch
from pyro import poutine
from torch import Tensor

from ppl_vi.models.base import Batch, Draws, draws_from_trace, is_latent, sample_draws

HandBound = Callable[[Batch, Draws], Tensor]  # (batch, draws) -> per-datapoint loss, shape (B,)


@dataclasses.dataclass
class Comparison:
    """One Pyro loss held against one hand-written per-datapoint loss (a negative bound).

    ``loss`` is a Pyro ELBO object (``Trace_ELBO(num_particles=K, vectorize_particles=True,
    max_plate_nesting=...)``, ``RenyiELBO(alpha=0, ...)``, our ``IWAELoss``...). ``hand(batch,
    draws)`` returns the per-datapoint loss at the guide's draws; the checker sums it over the
    batch, as Pyro does. ``model``/``guide`` override the pair's defaults (a ``poutine.scale``-d
    model for β, another guide). ``same_sample=False`` where the hand bound needs no draws
    (enumeration). ``compare_grads=False`` where only the value is comparable.
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


@dataclasses.dataclass
class CheckReport:
    rows: List[Row]

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
        lines.append(f"verdict: {verdict}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"passed": self.passed, "rows": [dataclasses.asdict(r) for r in self.rows]}


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-300)


def _failure(kind: str, name: str, exc: BaseException) -> Row:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return Row(kind, name, passed=False, note=f"error: {type(exc).__name__}: {msg}"[:300])


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


def _recording(guide: Callable, traces: list) -> Callable:
    """``guide`` that appends the trace of each of its runs to ``traces``."""

    def recorded(*args, **kwargs):
        with poutine.trace() as tracer:
            out = guide(*args, **kwargs)
        traces.append(tracer.trace)
        return out

    return recorded


# ----------------------------------------------------------------------------------------------
# The three kinds of check


def same_sample_rows(c: Comparison, model, guide, batch, params, names, max_plate_nesting, seed, rtol) -> List[Row]:
    """Pyro's loss and the hand bound on the very same draws: value and every gradient."""
    model, guide = c.model or model, c.guide or guide
    traces: list = []
    pyro.set_rng_seed(seed)
    pyro_value, pyro_grads = pyro_loss_and_grads(c.loss, model, _recording(guide, traces), batch, params)
    note = ""
    if c.same_sample:
        pyro.set_rng_seed(seed)
        draws = sample_draws(guide, batch, c.num_particles, max_plate_nesting)
        recorded = draws_from_trace(traces[-1], c.num_particles, max_plate_nesting)
        if set(recorded) != set(draws) or any(not torch.equal(recorded[k].detach(), draws[k].detach()) for k in draws):
            return [Row("same sample", c.name, pyro_value, passed=False,
                        note="could not reproduce the guide's draws by re-seeding (does the guide use other RNG?)")]
        note = f"K={c.num_particles}, draws verified identical"
    else:
        draws = {}
    hand_total = c.hand(batch, draws).sum()
    hand_grads = torch.autograd.grad(hand_total, params, allow_unused=True)
    hand_grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, hand_grads)]
    hand_value = hand_total.item()
    tol = f"rel <= {rtol:g}"
    rows = [Row("same sample", f"{c.name}: loss", pyro_value, hand_value, abs(pyro_value - hand_value),
                _rel(pyro_value, hand_value), tol, _rel(pyro_value, hand_value) <= rtol, note)]
    if c.compare_grads:
        worst, worst_name, worst_abs = 0.0, "", 0.0
        for name, gp, gh in zip(names, pyro_grads, hand_grads):
            scale = max(gp.abs().max().item(), gh.abs().max().item(), 1e-300)
            diff = (gp - gh).abs().max().item()
            if diff / scale >= worst:
                worst, worst_name, worst_abs = diff / scale, name, diff
        rows.append(Row("same sample", f"{c.name}: grads ({len(params)} tensors)", math.nan, math.nan, worst_abs,
                        worst, tol + " (max over tensors)", worst <= rtol, f"worst: {worst_name}"))
    return rows


def statistical_row(c: Comparison, model, guide, batch, params, max_plate_nesting, repeats, seed) -> Row:
    """Means over independent draws of Pyro's estimator and the hand one agree within 4 SE."""
    model, guide = c.model or model, c.guide or guide
    pyro_values, hand_values = [], []
    with torch.no_grad():
        for r in range(repeats):
            pyro.set_rng_seed(seed + 1 + r)
            pyro_values.append(float(c.loss.loss(model, guide, **batch)))
            pyro.set_rng_seed(seed + 1 + repeats + r)
            draws = sample_draws(guide, batch, c.num_particles, max_plate_nesting) if c.same_sample else {}
            hand_values.append(c.hand(batch, draws).sum().item())
    p, h = torch.tensor(pyro_values, dtype=torch.float64), torch.tensor(hand_values, dtype=torch.float64)
    se = math.sqrt(p.var().item() / repeats + h.var().item() / repeats)
    diff = abs(p.mean().item() - h.mean().item())
    ok = diff <= 4 * se if se > 0 else diff <= 1e-9 * max(abs(p.mean().item()), 1.0)
    return Row("statistical", f"{c.name}: mean over {repeats} seeds", p.mean().item(), h.mean().item(), diff,
               _rel(p.mean().item(), h.mean().item()), "within 4 SE", ok, f"SE {se:.3g}")


def close_row(kind: str, name: str, reference: Tensor, value: Tensor, rtol: float, note: str = "") -> Row:
    """Two per-datapoint quantities equal to ``rtol`` (relative, worst datapoint)."""
    reference, value = reference.detach().double(), value.detach().double()
    worst = ((reference - value).abs() / torch.maximum(reference.abs(), value.abs()).clamp_min(1e-300)).max().item()
    return Row(kind, name, reference.sum().item(), value.sum().item(), (reference - value).abs().max().item(),
               worst, f"rel <= {rtol:g} per datapoint", worst <= rtol, note)


def iwae_ladder_rows(iwae_bound, elbo: Tensor, log_px: Optional[Tensor], ks: Sequence[int], repeats: int,
                     seed: int) -> List[Row]:
    """ELBO ≈ L_1 ≤ L_k ≤ L_k' ≤ log p(x) for the ks given, each within 4 standard errors.

    ``iwae_bound(k)`` returns per-datapoint L_k (B,) for fresh draws. The mean over datapoints and
    ``repeats`` independent draws, with its standard error, is compared in order.
    """
    rows, previous = [], None
    for k in ks:
        values = []
        with torch.no_grad():
            for r in range(repeats):
                pyro.set_rng_seed(seed + 1000 * k + r)
                values.append(iwae_bound(k).double())
        per_point = torch.stack(values).mean(0)  # (B,): average over repeats
        mean, se = per_point.mean().item(), (torch.stack(values).sum(-1).std().item() / math.sqrt(repeats)) / per_point.numel()
        if previous is None:
            ref = elbo.double().mean().item()
            rows.append(Row("ground truth", f"IWAE_{k} equals ELBO (mean per datapoint)", ref, mean, abs(ref - mean),
                            _rel(ref, mean), "within 4 SE", abs(ref - mean) <= 4 * se + 1e-12, f"SE {se:.3g}"))
        else:
            pk, pmean, pse = previous
            slack = 4 * math.sqrt(se**2 + pse**2)
            rows.append(Row("ground truth", f"IWAE_{pk} <= IWAE_{k}", pmean, mean, mean - pmean, _rel(pmean, mean),
                            "within 4 SE", mean >= pmean - slack, f"SE {se:.3g}"))
        if log_px is not None:
            ref = log_px.double().mean().item()
            rows.append(Row("ground truth", f"IWAE_{k} <= log p(x)", ref, mean, ref - mean, _rel(ref, mean),
                            "within 4 SE", mean <= ref + 4 * se + 1e-12, f"SE {se:.3g}"))
        previous = (k, mean, se)
    return rows


def structure_row(model, guide, batch, max_plate_nesting) -> Row:
    """The guide samples every latent site of the model, with matching shapes."""
    try:
        guide_trace = poutine.trace(guide).get_trace(**batch)
        model_trace = poutine.trace(poutine.block(model, hide_types=["param"])).get_trace(**batch)
        latent = {n: s for n, s in model_trace.nodes.items() if is_latent(s)}
        guided = {n: s for n, s in guide_trace.nodes.items() if is_latent(s)}
        missing = sorted(set(latent) - set(guided))
        extra = sorted(set(guided) - set(latent))
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
        return _failure("structure", "guide covers the model's latent sites", exc)


def check(model: Callable, guide: Callable, batch: Batch, comparisons: Sequence[Comparison],
          params: Sequence[Tensor], *, param_names: Optional[Sequence[str]] = None, max_plate_nesting: int = 1,
          seed: int = 0, rtol: float = 1e-6, repeats: int = 50, extra_rows: Sequence[Callable[[], List[Row]]] = ()
          ) -> CheckReport:
    """Run every comparison (same sample, statistical) and any extra ground-truth checks.

    ``model``/``guide`` are plain Pyro callables taking ``**batch``; ``params`` the tensors whose
    gradients are compared (float64 recommended: the default tolerance is 1e-6 relative).
    ``extra_rows`` are callables returning more rows (ground truth); an exception in any check
    becomes a failing row.
    """
    params = list(params)
    names = list(param_names) if param_names is not None else [f"param[{i}]" for i in range(len(params))]
    rows = [structure_row(model, guide, batch, max_plate_nesting)]
    for c in comparisons:
        try:
            rows += same_sample_rows(c, model, guide, batch, params, names, max_plate_nesting, seed, rtol)
        except Exception as exc:  # noqa: BLE001
            rows.append(_failure("same sample", c.name, exc))
    for c in comparisons:
        if not c.statistical or repeats < 2:
            continue
        try:
            rows.append(statistical_row(c, model, guide, batch, params, max_plate_nesting, repeats, seed))
        except Exception as exc:  # noqa: BLE001
            rows.append(_failure("statistical", c.name, exc))
    for extra in extra_rows:
        try:
            rows += extra()
        except Exception as exc:  # noqa: BLE001
            rows.append(_failure("ground truth", getattr(extra, "__name__", "extra check"), exc))
    return CheckReport(rows)


# ----------------------------------------------------------------------------------------------
# The built-in models: the standard suite from the model/guide protocol


def standard_comparisons(model, num_particles: int = 3, beta: float = 2.0) -> List[Comparison]:
    """Pyro's losses against a ``LatentModel``'s hand bounds, unscaled and with β on the latents."""
    from pyro.infer import RenyiELBO, Trace_ELBO, TraceEnum_ELBO, TraceMeanField_ELBO

    from ppl_vi.models.base import scale_sites
    from ppl_vi.objectives.importance import IWAELoss

    k, nest = num_particles, model.max_plate_nesting
    kw = dict(num_particles=k, vectorize_particles=True, max_plate_nesting=nest)
    reparam = model.latent_reparameterized
    out = []
    if not model.latent_sites:  # everything enumerated in the model: the loss is -log p(x)
        return [Comparison("TraceEnum_ELBO vs hand -log p(x)", TraceEnum_ELBO(max_plate_nesting=nest),
                           lambda b, d: -model.exact_log_likelihood(b), same_sample=False, statistical=False)]
    out.append(Comparison(f"Trace_ELBO(K={k}) vs hand NELBO (MC KL)", Trace_ELBO(**kw),
                          lambda b, d: model.hand_negative_elbo(b, d, kl="mc"), k))
    scaled_model = scale_sites(model.model, model.latent_sites, beta)
    scaled_guide = scale_sites(model.guide, model.latent_sites, beta)
    out.append(Comparison(f"Trace_ELBO(K={k}), beta={beta:g} vs hand", Trace_ELBO(**kw),
                          lambda b, d: model.hand_negative_elbo(b, d, kl="mc", beta=beta), k,
                          model=scaled_model, guide=scaled_guide, statistical=False))
    if model.has_analytic_kl:
        out.append(Comparison(f"TraceMeanField_ELBO(K={k}) vs hand NELBO (closed-form KL)", TraceMeanField_ELBO(**kw),
                              lambda b, d: model.hand_negative_elbo(b, d, kl="analytic"), k))
        out.append(Comparison(f"TraceMeanField_ELBO(K={k}), beta={beta:g} vs hand", TraceMeanField_ELBO(**kw),
                              lambda b, d: model.hand_negative_elbo(b, d, kl="analytic", beta=beta), k,
                              model=scaled_model, guide=scaled_guide, statistical=False))
    if model.enumerable_guide:
        out.append(Comparison("TraceEnum_ELBO (guide enumerated) vs hand exact ELBO",
                              TraceEnum_ELBO(max_plate_nesting=nest),
                              lambda b, d: model.hand_negative_elbo(b, d, kl="analytic"), same_sample=False,
                              statistical=False))
    iw_k = max(k, 2)
    out.append(Comparison(f"RenyiELBO(alpha=0, K={iw_k}) vs hand IWAE", RenyiELBO(alpha=0, **{**kw, "num_particles": iw_k}),
                          lambda b, d: -model.hand_iwae_bound(b, d), iw_k, compare_grads=reparam))
    out.append(Comparison(f"ppl_vi IWAELoss(K={iw_k}) vs hand IWAE", IWAELoss(num_particles=iw_k, max_plate_nesting=nest),
                          lambda b, d: -model.hand_iwae_bound(b, d), iw_k, compare_grads=reparam))
    return out


def ground_truth_rows(model, batch: Batch, ks=(1, 10, 100, 1000), repeats: int = 20, seed: int = 0,
                      rtol: float = 1e-6) -> List[Row]:
    """Checks against exact log p(x) and the exact posterior, for models that have them."""
    import copy

    from pyro.infer import Trace_ELBO

    rows: List[Row] = []
    log_px = model.exact_log_likelihood(batch).detach() if model.has_exact_log_likelihood else None
    nest = model.max_plate_nesting
    if log_px is not None and getattr(model, "exact_guide_kind", None):
        exact = copy.copy(model)  # shares parameters; only the guide differs
        exact.guide_kind = model.exact_guide_kind
        exact.latent_sites = type(model).latent_sites
        pyro.set_rng_seed(seed)
        pyro_elbo = -Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=nest).loss(
            exact.model, exact.guide, **batch)
        rows.append(Row("ground truth", "Trace_ELBO with exact posterior guide = log p(x)", log_px.sum().item(),
                        pyro_elbo, abs(pyro_elbo - log_px.sum().item()), _rel(pyro_elbo, log_px.sum().item()),
                        f"rel <= {rtol:g}", _rel(pyro_elbo, log_px.sum().item()) <= rtol, "every draw: log w = log p(x)"))
        pyro.set_rng_seed(seed)
        draws = exact.sample_draws(batch, 4)
        rows.append(close_row("ground truth", "hand ELBO with exact posterior guide = log p(x)", log_px,
                              -exact.hand_negative_elbo(batch, draws, kl="mc"), rtol))
    if log_px is not None and hasattr(model, "posterior_kl") and model.latent_sites:
        kl_post = model.posterior_kl(batch).detach()
        with torch.no_grad():
            pyro.set_rng_seed(seed)
            if model.enumerable_guide:
                elbo = -model.hand_negative_elbo(batch, {}, kl="analytic")
                rows.append(close_row("ground truth", "log p(x) - ELBO = KL(q || p(z|x)) (exact ELBO)",
                                      log_px - elbo, kl_post, rtol))
            else:
                m = 2000
                elbo = -model.hand_negative_elbo(batch, model.sample_draws(batch, m), kl="analytic")
                gap = (log_px - elbo - kl_post).double()  # (B,), each an average over m draws
                se = gap.std().item() / math.sqrt(gap.numel())
                rows.append(Row("ground truth", f"log p(x) - ELBO = KL(q || p(z|x)) ({m} draws)", 0.0, gap.mean().item(),
                                abs(gap.mean().item()), math.nan, "within 4 SE",
                                abs(gap.mean().item()) <= 4 * se + 1e-12, f"SE {se:.3g}"))
    if model.latent_sites:
        with torch.no_grad():
            pyro.set_rng_seed(seed)
            elbo = -model.hand_negative_elbo(batch, model.sample_draws(batch, 2000), kl="mc")
        rows += iwae_ladder_rows(lambda k: model.hand_iwae_bound(batch, model.sample_draws(batch, k)),
                                 elbo, log_px, ks, repeats, seed)
    return rows


def check_model(model, batch: Batch, *, num_particles: int = 3, beta: float = 2.0, seed: int = 0,
                rtol: float = 1e-6, repeats: int = 50, ks=(1, 10, 100, 1000), ladder_repeats: int = 20,
                dtype=torch.float64) -> CheckReport:
    """The full check of a built-in ``LatentModel`` on ``batch``, in ``dtype`` (float64 by default)."""
    model = model.to(dtype)
    batch = {k: (v.to(dtype) if v is not None and v.is_floating_point() else v) for k, v in batch.items()}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    report = check(model.model, model.guide, batch, standard_comparisons(model, num_particles, beta),
                   [p for _, p in named], param_names=[n for n, _ in named],
                   max_plate_nesting=model.max_plate_nesting, seed=seed, rtol=rtol, repeats=repeats,
                   extra_rows=[lambda: ground_truth_rows(model, batch, ks, ladder_repeats, seed, rtol)])
    return report
