"""A user's model, guide and hand-derived bound, checked and diagnosed: :func:`check_bound`, :func:`check_pair`.

**The bound's form** (one convention, said in the report's notes which form was met)::

    bound(batch, draws)   the NEGATIVE ELBO, K particles averaged, scaled as Pyro scales it (a
                          subsampled data plate's N/B on the sites inside it)
      * every latent in the data plate: one value per datapoint, shape (B,)
      * with global latents (sites outside the data plate, e.g. a weight, or component means in
        their own pyro.plate("components")): the batch total, shape (); or per-datapoint values
        (B,), which are summed (the global terms then belong in one of them, once)
      * either way, a dict of named terms instead: each per datapoint (B,) or, for a term that
        belongs to the whole batch (a global latent's KL), one number (); every term is checked
        against Pyro's term of the same site(s), and the likely mistake in it named
    iwae_bound(batch, draws)  the negative IWAE_K bound: (B,), or () with global latents (it is joint)
    draws[s]              K particles of latent site s, shape (K,) + the site's shape in one plain run
                          (a local z in the data plate: (K, B, ...); a global weight of shape (3,): (K, 3))
    exact_log_likelihood(batch)   log p(x) per datapoint (B,); with global latents the batch's total ()

A model-enumerated site (``infer={"enumerate": "parallel"}``, not in the guide) is summed out: the bound's
likelihood term is then log Σ_c p(c) p(x | c, ...) per datapoint, as TraceEnum_ELBO computes it.

**The loss** each bound is held against on the same sample, when the file names none: TraceEnum_ELBO
where the model enumerates; TraceMeanField_ELBO where the bound uses the closed-form KL (judged on the
bound's values: the one of the two references it matches, or whose residual a named mistake explains,
or varies least), Trace_ELBO otherwise; our IWAELoss for ``iwae_bound``. The choice is said.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import pyro
import torch
from pyro.infer import RenyiELBO, Trace_ELBO, TraceEnum_ELBO, TraceMeanField_ELBO
from torch import Tensor, nn

from ppl_vi.check.core import (Comparison, ExtraCheck, HandError, check, enumerates, error_row,
                               expected_gradient_check, statistical_row)
from ppl_vi.check.diagnose import HINTS, diagnose, match_terms, pyro_groups, residual_verdicts
from ppl_vi.check.formula import bound_formula
from ppl_vi.check.preflight import Setup, prepare, user_error
from ppl_vi.check.rows import CheckReport, Row, close_row, failure_row, not_run_row
from ppl_vi.check.terms import DrawSet, SiteTerms, draw_sets, total, view
from ppl_vi.check.truth import iwae_ladder_rows
from ppl_vi.errors import ConfigError
from ppl_vi.objectives.importance import IWAELoss
from ppl_vi.objectives.losses import target_of

#: draw sets the diagnosis holds a bound against (more columns of evidence; the first is the same-sample one)
DRAW_SETS = 4


@dataclasses.dataclass
class UserPair:
    """A user's model, guide and hand bound, with what the checker needs to know (see the module docstring)."""

    source: str  # how to name it in messages (FILE.py, FILE.py:NAME, check_bound)
    model: Callable
    guide: Callable
    bound: Callable
    batch: Dict[str, Tensor]
    iwae_bound: Optional[Callable] = None
    params: Optional[List[Tensor]] = None
    param_names: Optional[List[str]] = None
    exact_log_likelihood: Optional[Callable] = None
    losses: Dict[str, object] = dataclasses.field(default_factory=dict)
    max_plate_nesting: Optional[int] = None  # None: read off the traces
    module: object = None
    data_plate: str = "data"
    files: Tuple[str, ...] = ()  # the user's source files, to name the line that raised


def _arity_error(fn: Callable, n: int) -> Optional[str]:
    """Why ``fn`` cannot be called with ``n`` positional arguments (None if it can)."""
    try:
        inspect.signature(fn).bind(*range(n))
    except TypeError as exc:
        return str(exc)
    except ValueError:  # no signature (a builtin): let the call say
        return None
    return None


def make_pair(source: str, entries: dict, module=None, files: Sequence[str] = ()) -> UserPair:
    """A :class:`UserPair` from named entries (a file's or :func:`check_bound`'s), each validated: a
    ConfigError of one line naming what is wrong and what is expected."""
    for f in ("model", "guide", "bound", "iwae_bound", "exact_log_likelihood"):
        if entries.get(f) is not None and not callable(entries[f]):
            raise ConfigError(f"{source}: {f} must be a function, got {type(entries[f]).__name__}")
    for f, n, form in (("bound", 2, "bound(batch, draws)"), ("iwae_bound", 2, "iwae_bound(batch, draws)"),
                       ("exact_log_likelihood", 1, "exact_log_likelihood(batch)")):
        problem = _arity_error(entries[f], n) if entries.get(f) is not None else None
        if problem:
            raise ConfigError(f"{source}: {f} must take {form}; calling it so fails: {problem}")
    batch = entries["batch"]
    if callable(batch) and not isinstance(batch, dict):
        try:
            batch = batch()
        except Exception as exc:  # noqa: BLE001 - the user's code: one line
            raise user_error(source, files, "batch()", exc) from None
    if not isinstance(batch, dict) or not batch or not all(torch.is_tensor(v) for v in batch.values()):
        raise ConfigError(f"{source}: batch must be a non-empty dict of tensors (or a function returning one), "
                          f"got {type(batch).__name__}")
    sizes = {v.shape[0] if v.dim() else None for v in batch.values()}
    if len(sizes) != 1 or None in sizes:
        raise ConfigError(f"{source}: every tensor in batch needs the same leading (datapoint) dimension, got shapes "
                          f"{[tuple(v.shape) for v in batch.values()]}")
    losses = entries.get("losses") or {}
    if isinstance(losses, (list, tuple)):
        losses = {f"{type(v).__name__}[{i}]": v for i, v in enumerate(losses)}
    if entries.get("loss") is not None:
        losses = {**({type(entries["loss"]).__name__: entries["loss"]}), **losses}
    for label, loss in losses.items():
        if not (hasattr(loss, "differentiable_loss") or hasattr(loss, "loss_and_grads")):
            raise ConfigError(f"{source}: loss {label} is not a Pyro loss (an ELBO object such as "
                              "Trace_ELBO(num_particles=3, vectorize_particles=True))")
    params, names = entries.get("params"), None
    if params is not None:
        if isinstance(params, dict):
            names, params = list(params), list(params.values())
        params = list(params.parameters()) if isinstance(params, nn.Module) else list(params)
        if not all(torch.is_tensor(p) and p.requires_grad for p in params):
            raise ConfigError(f"{source}: params must be tensors that require grad")
    nest = entries.get("max_plate_nesting")
    if nest is not None and (isinstance(nest, bool) or not isinstance(nest, int) or nest < 0):
        raise ConfigError(f"{source}: max_plate_nesting must be an integer (the plate dims the pair uses), "
                          f"got {nest!r}; leave it out to have it read off the traces")
    plate = entries.get("data_plate") or "data"
    if not isinstance(plate, str):
        raise ConfigError(f"{source}: data_plate must be the data plate's name (a str), got {type(plate).__name__}")
    return UserPair(source, entries["model"], entries["guide"], entries["bound"], batch, entries.get("iwae_bound"),
                    params, names, entries.get("exact_log_likelihood"), dict(losses),
                    None if nest is None else int(nest), module, plate, tuple(files))


# ------------------------------------------------------------------------------------------------
# the user's code, called with its errors located


def guarded(pair: UserPair, fn: Callable, what: str) -> Callable:
    """``fn`` whose exceptions become :class:`HandError` naming the user's line (a failing row, not
    the checker's)."""
    def call(*args):
        try:
            return fn(*args)
        except HandError:
            raise
        except Exception as exc:  # noqa: BLE001 - re-raised, located
            raise HandError(str(user_error(pair.source, pair.files, what, exc))) from exc

    return call


def shaped(draws: Dict[str, Tensor], shapes: Dict[str, tuple]) -> Dict[str, Tensor]:
    """Each site's K particles as (K,) + its shape in a plain run (a global latent's plate dims dropped)."""
    out = {}
    for name, value in draws.items():
        shape = shapes.get(name)
        k = value.shape[0] if value.dim() else 1
        fits = shape is not None and value.dim() and value.numel() == k * math.prod(shape)
        out[name] = value.reshape((k,) + tuple(shape)) if fits and tuple(value.shape) != (k,) + tuple(shape) else value
    return out


def compared(value, setup: Setup, objective: str) -> Tensor:
    """The hand bound's output as the same-sample rows hold it against Pyro's: per datapoint (B,) without
    global latents; with them the batch total () (an ELBO's (B,) values and named terms summed)."""
    if isinstance(value, dict):
        if not value or not all(torch.is_tensor(v) for v in value.values()):
            raise HandError(f"{objective == 'iwae' and 'iwae_bound' or 'bound'} returned a dict whose values are not "
                            "all tensors; expected named terms, each (B,) or ()")
        if setup.global_sites and objective == "elbo" and all(v.shape in ((), (setup.size,)) for v in value.values()):
            return sum(v.sum() for v in value.values())
        return total(value)
    if not torch.is_tensor(value):
        raise HandError(f"the bound returned {type(value).__name__}; expected a tensor or a dict of named terms")
    if setup.global_sites and objective == "elbo" and value.shape == (setup.size,):
        return value.sum()
    return value


def form_note(value, setup: Setup) -> str:
    """How the bound's output was read (the module docstring's convention)."""
    shape = lambda v: tuple(v.shape)  # noqa: E731
    if isinstance(value, dict):
        parts = ", ".join(f"{n!r} {shape(v)}" for n, v in value.items())
        how = f"named terms {parts}"
    else:
        how = f"one tensor of shape {shape(value)}"
    if setup.global_sites:
        return (f"bound: {how}; with the global latent(s) {list(setup.global_sites)} it is compared as the batch "
                "total (per-datapoint (B,) values summed; a () term counted once)")
    return f"bound: {how}; compared per datapoint (B = {setup.size})"


# ------------------------------------------------------------------------------------------------
# which loss each bound is held against


@dataclasses.dataclass
class Planned:
    """One same-sample comparison, with what the diagnosis needs to know about its loss."""

    comparison: Comparison
    objective: str  # "elbo" or "iwae"
    analytic: bool  # closed-form KLs (TraceMeanField_ELBO)
    label: str


class MeanFieldValue(TraceMeanField_ELBO):
    """TraceMeanField_ELBO's value (closed-form KLs, the other terms sampled) for a guide with a site without
    rsample (a sampled discrete switch): Pyro refuses such a guide under validation, as the loss's gradient
    would miss that site's score-function term; the value is still an unbiased estimate of -ELBO, the one a
    hand bound with closed-form KLs computes. Only its value is compared (the comparison's ``value_only``)."""

    def loss(self, model, guide, *args, **kwargs):
        with pyro.validation_enabled(False):
            return super().loss(model, guide, *args, **kwargs)

    def differentiable_loss(self, model, guide, *args, **kwargs):
        with pyro.validation_enabled(False):
            return super().differentiable_loss(model, guide, *args, **kwargs)

    def loss_and_grads(self, model, guide, *args, **kwargs):
        with pyro.validation_enabled(False):
            return super().loss_and_grads(model, guide, *args, **kwargs)


def _pyro_loss(cls, k: int, setup: Setup):
    return cls(num_particles=k, vectorize_particles=setup.vectorized, max_plate_nesting=setup.nest)


def _objective(loss) -> str:
    return target_of(loss) or ("iwae" if isinstance(loss, RenyiELBO) else "elbo")


def _comparison(label: str, loss, hand: Callable, k: int, setup: Setup, vectorized: bool, what: str) -> Comparison:
    """A comparison; no expected-gradient rows where the reference objective cannot run (they are said);
    no same-sample gradients where a guide site has no rsample (Pyro's gradient then holds a score-function
    term that no value's gradient has: said, and the expected-gradient rows hold the gradient instead)."""
    value_only = "" if not setup.score_sites else (
        f"the guide's site(s) {list(setup.score_sites)} have no rsample: Pyro's gradient adds a score-function term "
        "that the bound's value does not carry; the expected-gradient rows check the gradient instead")
    return Comparison(f"{label} vs {what}", loss, hand, k, target=_objective(loss) if setup.vectorized else None,
                      vectorized=vectorized, gradient_name=f"{label}: expected gradient", value_only=value_only)


def no_reference_rows(comparisons: Sequence[Comparison], setup: Setup, params, gradient_seeds: int) -> List[Row]:
    """The expected-gradient rows that cannot run for a model without vectorised particles, said."""
    if setup.vectorized or not params or gradient_seeds < 2:
        return []
    return [not_run_row("expected gradient", c.gradient_name, "the reference gradient runs the model on tuples, "
                        "replicates and particles in vectorised plates, which this model does not allow "
                        f"({setup.why_sequential})") for c in comparisons]


def whole_values(hands: list, sets: List[DrawSet], setup: Setup, objective: str) -> Optional[Tensor]:
    """The hand bound over the draw sets as the diagnosis's columns: per datapoint side by side (m·B,), or
    one batch total per draw set (m,) with global latents; None where its shape is not the expected one."""
    values = [compared(h, setup, objective).detach().double() for h in hands]
    expected = () if setup.global_sites else (setup.size,)
    if any(tuple(v.shape) != expected for v in values):
        return None
    return torch.stack(values) if setup.global_sites else torch.cat(values)


def choose_kl(hands: list, sets: List[DrawSet], setup: Setup, rtol: float) -> Tuple[bool, str]:
    """(closed form?, why): does the bound use the closed-form KL (TraceMeanField_ELBO) or a sampled one?"""
    terms = view(sets, totals=bool(setup.global_sites))
    sites = sorted(terms.analytic_kl)
    if not sites:
        return False, "no latent site has a closed-form KL"
    value = whole_values(hands, sets, setup, "elbo")
    k = sets[0].num_particles
    if value is None and not setup.global_sites and all(total(h).shape == (k, setup.size) for h in hands):
        value = torch.cat([total(h).detach().double().mean(0) for h in hands])  # per particle: their mean
    if value is None:  # another shape: the nearer of the two, on the first draw set, reduced as the bound is
        first = view(sets[:1], totals=bool(setup.global_sites))
        hand = compared(hands[0], setup, "elbo").detach().double()
        if hand.dim() == 2:
            hand = hand.mean(0)
        gap = {}
        for analytic in (False, True):
            ref = sum(first.components(analytic).values()).detach().double()
            options = [ref] if hand.shape == ref.shape else [ref.sum(), ref.mean()] if hand.dim() == 0 else []
            gap[analytic] = min([(hand - o).abs().max().item() for o in options] + [math.inf])
        analytic = gap[True] < gap[False]
        return analytic, (f"the bound's shape is not the documented one; it is nearer the "
                          f"{'closed-form' if analytic else 'sampled'} KL of {sites}")
    sampled = terms.negative_elbo().detach().double()
    closed = sum(terms.components(analytic=True).values()).detach().double()
    close = lambda a, b: bool(((a - b).abs() <= rtol * torch.maximum(a.abs(), b.abs()).clamp_min(1)).all())  # noqa
    if close(value, closed) and not close(value, sampled):
        return True, f"your bound's KL of {sites} is the closed form"
    if close(value, sampled):
        return False, f"your bound's KL of {sites} is the sampled one, log q(z) - log p(z) at the draws"
    if isinstance(hands[0], dict):  # named terms: judged by the terms' verdicts (per particle: their mean)
        hands = [{n: (v.mean(0) if v.shape == (k, setup.size) else v) for n, v in h.items()} for h in hands]
        score = {a: _explanation_score(term_rows("x", hands, sets, setup, a, rtol)[1]) for a in (False, True)}
    else:
        score = {a: _explanation_score(diagnose("x", value, terms, "elbo", analytic=a, rtol=rtol)) for a in (False, True)}
    if score[True] != score[False]:
        analytic = score[True] < score[False]
        return analytic, (f"your bound's residual against the {'closed-form' if analytic else 'sampled'} KL of "
                          f"{sites} is explained by fewer, named mistakes than against the other")
    spread = {a: (value - (closed if a else sampled)).std().item() for a in (False, True)}
    analytic = spread[True] < spread[False]
    return analytic, (f"your bound differs from both; it varies less around the {'closed-form' if analytic else 'sampled'}"
                      f" KL of {sites}")


def _explanation_score(verdicts: List[str]) -> Tuple[int, int, int]:
    """How well verdicts explain a residual, lower is better: unexplained last, then more mistakes, then
    more of them unnamed."""
    return (sum(v.startswith("unexplained") for v in verdicts), len(verdicts),
            sum("no known" in v for v in verdicts))


def plan(pair: UserPair, setup: Setup, k: int, hands: list, sets: List[DrawSet], rtol: float
         ) -> Tuple[List[Planned], List[Comparison], List[str]]:
    """(same-sample comparisons, comparisons held on average only, notes): the file's own losses, or the
    module docstring's choice."""
    elbo_hand = lambda b, d: compared(guarded(pair, pair.bound, "bound(batch, draws)")(  # noqa: E731
        b, shaped(d, setup.shapes)), setup, "elbo")
    iwae_hand = (lambda b, d: compared(guarded(pair, pair.iwae_bound, "iwae_bound(batch, draws)")(  # noqa: E731
        b, shaped(d, setup.shapes)), setup, "iwae")) if pair.iwae_bound else None
    notes: List[str] = []
    exact: List[Planned] = []
    averaged: List[Comparison] = []
    if pair.losses:
        for label, loss in pair.losses.items():
            objective = _objective(loss)
            hand = iwae_hand if objective == "iwae" else elbo_hand
            if hand is None:
                raise ConfigError(f"{pair.source}: the loss {label} estimates the IWAE bound; define "
                                  "iwae_bound(batch, draws)")
            kk = getattr(loss, "num_particles", k)
            vectorized = bool(getattr(loss, "vectorize_particles", True))
            name = f"{label} (K={kk})"
            exact.append(Planned(_comparison(name, loss, hand, kk, setup, vectorized,
                                             "iwae_bound" if objective == "iwae" else "bound"),
                                 objective, isinstance(loss, TraceMeanField_ELBO), name))
        notes.append(f"loss: {', '.join(p.label for p in exact)}, as the file names")
        return exact, averaged, notes
    if setup.enumerated:
        name = f"TraceEnum_ELBO (K={k})"
        exact.append(Planned(_comparison(name, _pyro_loss(TraceEnum_ELBO, k, setup), elbo_hand, k, setup,
                                         setup.vectorized, "bound"), "elbo", False, name))
        notes.append(f"loss: {name}, chosen: the model enumerates {list(setup.enumerated)} and the file names no loss")
    else:
        analytic, why = choose_kl(hands, sets, setup, rtol)
        chosen, other = (TraceMeanField_ELBO, Trace_ELBO) if analytic else (Trace_ELBO, TraceMeanField_ELBO)
        value_only = analytic and bool(setup.score_sites)
        name = f"{chosen.__name__} (K={k})"
        comparison = _comparison(name, _pyro_loss(MeanFieldValue if value_only else chosen, k, setup), elbo_hand, k,
                                 setup, setup.vectorized, "bound")
        if value_only:  # its gradient misses the score-function term: Trace_ELBO holds the expected gradient
            comparison.target = None
            why += (f"; the guide's site(s) {list(setup.score_sites)} have no rsample, which Pyro's TraceMeanField_ELBO "
                    "refuses to train (its gradient would miss their score-function term): its value is held against "
                    "your bound (Pyro's validation off), Trace_ELBO holds the gradient on average")
        exact.append(Planned(comparison, "elbo", analytic, name))
        notes.append(f"loss: {name}, chosen: the file names no loss; {why}")
        if sets[0].analytic_kl and (value_only or not setup.score_sites):  # another estimator: on average
            averaged.append(_comparison(f"{other.__name__} (K={k})", _pyro_loss(other, k, setup), elbo_hand, k,
                                        setup, setup.vectorized, "bound"))
    if iwae_hand is not None:
        name = f"IWAELoss (K={k})"
        exact.append(Planned(_comparison(name, IWAELoss(k, setup.nest), iwae_hand, k, setup, True, "iwae_bound"),
                             "iwae", False, name))
    return exact, averaged, notes


# ------------------------------------------------------------------------------------------------
# parameters


def default_params(pair: UserPair, setup: Setup) -> Tuple[List[Tensor], List[str]]:
    """Every leaf tensor that requires grad (module-level tensors, nn.Module parameters, Pyro's param
    store after one run) and reaches the loss of one plain particle."""
    found: Dict[int, Tuple[str, Tensor]] = {}
    if pair.module is not None:
        for name, value in vars(pair.module).items():
            if torch.is_tensor(value) and value.requires_grad and value.is_leaf:
                found.setdefault(id(value), (name, value))
            elif isinstance(value, nn.Module):
                for pname, p in value.named_parameters():
                    found.setdefault(id(p), (f"{name}.{pname}", p))
    loss = (TraceEnum_ELBO if setup.enumerated else Trace_ELBO)(num_particles=1, max_plate_nesting=setup.nest)
    state = torch.get_rng_state()
    try:
        value = loss.differentiable_loss(pair.model, pair.guide, **pair.batch)
    except Exception as exc:  # noqa: BLE001 - the user's code: one line
        raise user_error(pair.source, pair.files, "the pair, under " + type(loss).__name__ + ",", exc) from None
    finally:
        torch.set_rng_state(state)
    for name, p in pyro.get_param_store().named_parameters():
        found.setdefault(id(p), (name, p))
    candidates = [(n, p) for n, p in found.values() if p.requires_grad]
    grads = torch.autograd.grad(value, [p for _, p in candidates], allow_unused=True) if candidates and \
        value.requires_grad else [None] * len(candidates)
    used = [(n, p) for (n, p), g in zip(candidates, grads) if g is not None]
    return [p for _, p in used], [n for n, _ in used]


# ------------------------------------------------------------------------------------------------
# term by term, and the diagnosis


def _grads_agree(hand: Tensor, reference: Tensor, params: List[Tensor], rtol: float) -> Optional[bool]:
    """Do the hand value and Pyro's decomposed estimate have the same gradient (same draws)?"""
    if not params or not hand.requires_grad or not reference.requires_grad:
        return None if not params else (hand.requires_grad == reference.requires_grad)
    gh = torch.autograd.grad(hand.sum(), params, allow_unused=True, retain_graph=True)
    gr = torch.autograd.grad(reference.sum(), params, allow_unused=True, retain_graph=True)
    for p, a, b in zip(params, gh, gr):
        a = torch.zeros_like(p) if a is None else a
        b = torch.zeros_like(p) if b is None else b
        scale = max(a.abs().max().item(), b.abs().max().item(), 1e-300)
        if (a - b).abs().max().item() > max(rtol, 1e-9) * scale:
            return False
    return True


def _term_row(label: str, name: str, desc: str, reference: Tensor, value: Tensor, rtol: float, where: str,
              atol: float) -> Row:
    """One named term against Pyro's: relative to the term, or absolute to the whole bound's scale (a term
    that rounding moves by less than the loss rows can see is not held against the user)."""
    row = close_row("term", f"{label}: term {name!r} = Pyro's {desc}", reference, value, rtol, note=where, atol=atol)
    if not row.passed:
        diff = value.detach().double() - reference.detach().double()
        tol = rtol * max(value.abs().max().item(), reference.abs().max().item(), 1.0)
        bad = (diff.abs() > tol).nonzero().flatten().tolist()
        row.note = (f"{where}; differs at columns {bad[:8]}{' ...' if len(bad) > 8 else ''} by "
                    f"{diff[bad].min().item():.6g} .. {diff[bad].max().item():.6g}")
        row.details = {"pyro": reference.detach().double().tolist(), "hand": value.detach().double().tolist(),
                       "differing": bad}
    return row


def term_rows(label: str, hands: List[dict], sets: List[DrawSet], setup: Setup, analytic: bool, rtol: float,
              params=()) -> Tuple[List[Row], List[str]]:
    """One row per named hand term against its Pyro counterpart, a verdict per differing term, and one per
    Pyro site no term covers. Per-datapoint terms (B,) are held against the local sites' terms, datapoint
    by datapoint over the draw sets; one-number terms () against the batch totals of the sites left."""
    local, totals = view(sets, totals=False), view(sets, totals=True)
    m, size = len(sets), setup.size
    where_local = f"{m} draw sets × {size} datapoints"
    where_total = f"the batch total at each of {m} draw sets"
    rows, verdicts, covered = [], [], set()
    atol = rtol * max(sum(totals.components(analytic).values()).detach().abs().max().item(), 1.0)
    names = list(hands[0])
    per_point = {n: torch.cat([h[n] for h in hands]) for n in names if all(h[n].shape == (size,) for h in hands)}
    local_sites = [s for s in list(local.observed) + list(local.prior)]
    matched = match_terms(per_point, local, analytic, sites=local_sites,
                          nearest=not setup.global_sites) if local_sites else {}
    groups = pyro_groups(local, analytic, sites=local_sites)
    for name, key in matched.items():
        desc, ref = groups[key]
        row = _term_row(label, name, desc, ref, per_point[name], rtol, where_local, atol)
        rows.append(row)
        covered |= set(_sites_of(key, local, local_sites))
        if not row.passed:
            verdicts += residual_verdicts(label, per_point[name], ref, local, local.pieces(), rtol,
                                          _grads_agree(per_point[name], ref, list(params), rtol), what=f"the term {name!r}")
    rest = [n for n in names if n not in matched]
    if rest:
        left = [s for s in list(totals.observed) + list(totals.prior) if s not in covered]
        one = {n: torch.stack([h[n].sum() if h[n].shape == (size,) else h[n] for h in hands]) for n in rest
               if all(h[n].shape in ((), (size,)) for h in hands)}
        for name in sorted(rest, key=lambda n: _priority(n, totals, left)):
            key = match_terms({name: one[name]}, totals, analytic, sites=left).get(name) if left and name in one \
                else None
            if key is None:
                shape = tuple(hands[0][name].shape)
                rows.append(Row("term", f"{label}: term {name!r}", passed=False,
                                note=f"error: term {name!r} has shape {shape}; expected ({size},), one value per "
                                     "datapoint" + (", or (), one for the batch (a global term)" if setup.global_sites
                                                    else "")))
                continue
            desc, ref = pyro_groups(totals, analytic, sites=left)[key]
            row = _term_row(label, name, desc, ref, one[name], rtol, where_total, atol)
            rows.append(row)
            covered |= set(_sites_of(key, totals, left))
            left = [s for s in left if s not in covered]
            if not row.passed:
                verdicts += residual_verdicts(label, one[name], ref, totals, totals.pieces(), rtol,
                                              _grads_agree(one[name], ref, list(params), rtol),
                                              what=f"the term {name!r}")
    for site in [s for s in list(totals.observed) + list(totals.prior) if s not in covered]:
        desc, ref = pyro_groups(totals, analytic, sites=[site])[site]
        rows.append(Row("term", f"{label}: Pyro's term of site {site!r}", ref.mean().item(), passed=False,
                        note="no hand term matches it"))
        verdicts.append(f"missing term: {label}: Pyro's loss has a term for site {site!r} ({desc}) that no hand "
                        "term matches")
    return rows, verdicts


def _sites_of(key: str, terms: SiteTerms, sites: Sequence[str]) -> List[str]:
    """The sites a group key of :func:`pyro_groups` stands for."""
    if key == "observed":
        return [s for s in terms.observed if s in sites]
    if key in ("latent", "global", "local"):
        return [s for s in terms.prior if s in sites and (key == "latent" or terms.is_global(s) == (key == "global"))]
    return [key]


def _priority(name: str, terms: SiteTerms, sites: Sequence[str]) -> int:
    """Match order: a term named after a site, then one whose name hints at a group, then the rest."""
    if name in sites:
        return 0
    return 1 if any(rx.search(name) for rx, _ in HINTS) else 2


def decomposition_row(label: str, pyro_values: Tensor, terms: SiteTerms, objective: str, analytic: bool,
                      rtol: float) -> Row:
    """Pyro's loss (per datapoint, or the batch total) equals the sum of its site terms read off the traces."""
    reference = terms.negative_iwae() if objective == "iwae" else sum(terms.components(analytic).values())
    return close_row("same sample", f"{label}: Pyro's loss = the sum of its site terms (decomposition)",
                     pyro_values, reference, rtol, note="what the diagnosis holds the hand bound against")


def loss_verdict(label: str, loss, setup: Setup, pyro_values: Tensor, terms: SiteTerms, objective: str,
                 rtol: float) -> str:
    """Why Pyro's own loss differs from the bound it is meant to estimate (per datapoint or in total)."""
    if setup.enumerated and not enumerates(loss):
        return (f"loss: {label} does not sum out the model-enumerated site(s) {list(setup.enumerated)} (it samples "
                "them from the prior); TraceEnum_ELBO does: drop the file's loss line to have it chosen")
    log_w, c, k = terms.log_weights.detach().double(), terms.c, terms.num_particles
    if objective == "iwae" and c != 1.0:
        inside = -(torch.logsumexp(c * log_w, 0) - math.log(k))
        if bool(((pyro_values - inside).abs() <= rtol * inside.abs().clamp_min(1.0)).all()):
            return (f"scale: {label} itself puts the minibatch scale N/B = {c:g} inside the log-mean-exp, "
                    "-log (1/K) Σ_k exp(c log w_k), which bounds nothing; the IWAE bound is -c log (1/K) Σ_k w_k "
                    "(our IWAELoss, loss 'iwae')")
    return (f"unexplained: {label}'s values are not the sum of its site terms "
            f"({'-c log (1/K) Σ_k w_k' if objective == 'iwae' else 'the ELBO'}); any verdict below is against that")


def diagnose_comparison(report: CheckReport, pair: UserPair, setup: Setup, planned: Planned, sets: List[DrawSet],
                        params, rtol: float) -> None:
    """The term rows (after the comparison's rows) and verdicts of one same-sample comparison."""
    c, objective, analytic, label = planned.comparison, planned.objective, planned.analytic, planned.label
    same = [r for r in report.rows if r.name.startswith(c.name + ":") and r.kind == "same sample"]
    values_ran = [r for r in same if not r.name.endswith("tensors")]  # the gradients may be value-only
    if not values_ran or not all(r.ran for r in values_ran) or c.num_particles != sets[0].num_particles:
        return
    bound = guarded(pair, pair.iwae_bound if objective == "iwae" else pair.bound,
                    "iwae_bound(batch, draws)" if objective == "iwae" else "bound(batch, draws)")
    extra: List[Row] = []
    verdicts: List[str] = []
    try:
        hands = [bound(pair.batch, shaped(d.draws, setup.shapes)) for d in sets]
        is_global = bool(setup.global_sites)
        first = view(sets[:1], totals=is_global)
        terms = view(sets, totals=is_global)
        if is_global:  # the batch total; none where the bound's shape was refused (no row holds Pyro's value)
            total_row = next((r for r in same if r.reference is not None and r.name.endswith(": loss")), None)
            pyro_values = None if total_row is None else torch.tensor([total_row.reference], dtype=torch.float64)
        else:
            per_point = next((r for r in same if r.name.endswith(": each datapoint")), None)
            pyro_values = torch.tensor(per_point.details["pyro"], dtype=torch.float64) if per_point else None
        if pyro_values is not None:
            extra.append(decomposition_row(label, pyro_values, first, objective, analytic, rtol))
            if not extra[-1].passed:
                verdicts.append(loss_verdict(label, c.loss, setup, pyro_values, first, objective, rtol))
        k, size = sets[0].num_particles, setup.size
        values = [total(h) if not isinstance(h, dict) else h for h in hands]
        if not is_global and k > 1 and k != size and all(total(h).shape == (k, size) for h in hands):
            verdicts += diagnose(label, total(hands[0]), view(sets[:1], False), objective, analytic=analytic, rtol=rtol)
            values = [({n: (v.mean(0) if v.shape == (k, size) else v) for n, v in h.items()}
                       if isinstance(h, dict) else h.mean(0)) for h in hands]
        term_verdicts: List[str] = []
        if isinstance(values[0], dict) and objective == "elbo":
            rows, term_verdicts = term_rows(label, values, sets, setup, analytic, rtol, params)
            extra += rows
        whole = whole_values(values, sets, setup, objective)
        if term_verdicts:
            verdicts += term_verdicts
        elif whole is None:  # the shape is off: named from the first draw set
            verdicts += diagnose(label, compared(values[0], setup, objective), first, objective, analytic=analytic,
                                 rtol=rtol)
        else:
            reference = terms.negative_iwae() if objective == "iwae" else sum(terms.components(analytic).values())
            agree = _grads_agree(compared(values[0], setup, objective), first.negative_iwae() if objective == "iwae"
                                 else sum(first.components(analytic).values()), params, rtol) \
                if reference.shape == whole.shape else None
            verdicts += diagnose(label, whole, terms, objective, analytic=analytic, rtol=rtol, grads_agree=agree)
    except HandError as exc:
        extra, verdicts = [failure_row("term", f"{label}: term by term", exc)], []
    except Exception as exc:  # noqa: BLE001 - the checker's own limit: said, not held against the bound
        extra, verdicts = [not_run_row("term", f"{label}: term by term", exc)], []
    last = max((i for i, r in enumerate(report.rows) if r.name.startswith(c.name) and r.kind == "same sample"),
               default=len(report.rows) - 1)
    report.rows[last + 1:last + 1] = extra
    report.verdicts += verdicts


# ------------------------------------------------------------------------------------------------
# ground truth


def ground_truth(pair: UserPair, setup: Setup, seed: int, ks=(1, 10, 100), repeats: int = 10) -> List[Row]:
    """The file's exact log p(x) (per datapoint; with global latents the batch's total): the IWAE ladder
    ELBO ≈ L_1 ≤ L_10 ≤ L_100 ≤ log p(x), each within 4 SE, on the unscaled pair (no minibatch scale)."""
    log_px = guarded(pair, pair.exact_log_likelihood, "exact_log_likelihood(batch)")(pair.batch)
    log_px = exact_shape(log_px, setup, pair.source)
    totals = bool(setup.global_sites)

    def bound(k: int) -> Tensor:
        sets = draw_sets(pair.model, pair.guide, pair.batch, k, setup.nest, setup.data_plate, setup.vectorized,
                         [torch.randint(0, 2**31 - 1, ()).item()], setup.shapes)
        log_w = view(sets, totals).log_weights.detach().double()
        return torch.logsumexp(log_w, 0) - math.log(k)

    with torch.no_grad():
        pyro.set_rng_seed(seed)
        sets = draw_sets(pair.model, pair.guide, pair.batch, 1000 if setup.vectorized else 100, setup.nest,
                         setup.data_plate, setup.vectorized, [seed], setup.shapes)
        elbo = view(sets, totals).log_weights.detach().double().mean(0)
        rows = iwae_ladder_rows(bound, elbo, log_px, ks, repeats, seed,
                                unit="the batch total" if totals else "mean per datapoint")
    for r in rows:  # these are bounds on log p(x), not losses: said, since the rows above are losses
        r.note = "; ".join(x for x in ("the bound (not the loss), without the minibatch scale", r.note) if x)
    return rows


def exact_shape(log_px, setup: Setup, source: str) -> Tensor:
    """exact_log_likelihood's value as the ladder compares it: (B,), or (1,) (the total) with global latents."""
    if not torch.is_tensor(log_px):
        raise ConfigError(f"{source}: exact_log_likelihood(batch) returned {type(log_px).__name__}; expected a tensor")
    log_px = log_px.detach()
    if setup.global_sites:
        if log_px.shape not in ((), (setup.size,)):
            raise ConfigError(f"{source}: exact_log_likelihood(batch) returned shape {tuple(log_px.shape)}; with the "
                              f"global latent(s) {list(setup.global_sites)} expected the batch's log p(x), shape ()")
        return log_px.sum().reshape(1)
    if log_px.shape != (setup.size,):
        raise ConfigError(f"{source}: exact_log_likelihood(batch) returned shape {tuple(log_px.shape)}; expected one "
                          f"value per datapoint, ({setup.size},)")
    return log_px


# ------------------------------------------------------------------------------------------------
# the check


def check_pair(pair: UserPair, *, num_particles: int = 3, seed: int = 0, repeats: int = 50, gradient_seeds: int = 50,
               rtol: Optional[float] = None, ground_truth_ks=(1, 10, 100)) -> CheckReport:
    """Every check of a user's pair, the term-by-term rows, the diagnoses of what differs, the formula.

    A file that cannot be used (its code raises, no data plate, a bound that raises on the draws) is a
    ConfigError of one line; a row the checker cannot run is said, not failed; if no same-sample row can
    run, the check as a whole cannot: ConfigError with the reason."""
    k, batch = num_particles, pair.batch
    if k < 1:
        raise ConfigError(f"num_particles must be >= 1, got {k}")
    floating = [v for v in batch.values() if v.is_floating_point()]
    if rtol is None:
        rtol = 1e-6 if all(v.dtype == torch.float64 for v in floating) else 1e-4
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"pyro(\..*)?$")  # the checker runs Pyro's losses on purpose
        return _check_pair(pair, k, seed, repeats, gradient_seeds, rtol, ground_truth_ks)


def usable_hand(source: str, hand) -> None:
    """HandError unless the bound's value is a tensor, or a non-empty dict of tensors, all finite."""
    if isinstance(hand, dict):
        if not hand or not all(torch.is_tensor(v) for v in hand.values()):
            raise HandError(f"{source}: bound(batch, draws) returned a dict "
                            f"{'with no terms' if not hand else 'whose values are not all tensors'}; expected named "
                            "terms, each a tensor (B,) or ()")
        for name, value in hand.items():
            if not bool(torch.isfinite(value.detach()).all()):
                raise HandError(f"{source}: bound(batch, draws)'s term {name!r} is not finite (nan or inf) at the "
                                "guide's draws")
    elif not bool(torch.isfinite(hand.detach()).all()):
        raise HandError(f"{source}: bound(batch, draws) is not finite (nan or inf) at the guide's draws")


def _check_pair(pair: UserPair, k: int, seed: int, repeats: int, gradient_seeds: int, rtol: float,
                ground_truth_ks) -> CheckReport:
    batch = pair.batch
    vectorize = next((bool(getattr(x, "vectorize_particles", True)) for x in pair.losses.values()), None)
    with pyro.validation_enabled(True), torch.random.fork_rng():
        setup = prepare(pair.model, pair.guide, batch, source=pair.source, files=pair.files, data_plate=pair.data_plate,
                        max_plate_nesting=pair.max_plate_nesting, num_particles=k, vectorize=vectorize)
        params, names = (pair.params, pair.param_names) if pair.params is not None else default_params(pair, setup)
    names = names or [f"params[{i}]" for i in range(len(params))]
    try:
        sets = draw_sets(pair.model, pair.guide, batch, k, setup.nest, setup.data_plate, setup.vectorized,
                         [seed + 7 * i for i in range(DRAW_SETS)], setup.shapes)
    except ConfigError as exc:
        raise ConfigError(f"{pair.source}: {exc}") from None
    except Exception as exc:  # noqa: BLE001
        raise user_error(pair.source, pair.files, "the pair, drawing particles", exc) from None
    try:
        hands = [guarded(pair, pair.bound, "bound(batch, draws)")(batch, shaped(d.draws, setup.shapes)) for d in sets]
        if not (torch.is_tensor(hands[0]) or isinstance(hands[0], dict)):
            raise HandError(f"{pair.source}: bound(batch, draws) returned {type(hands[0]).__name__}; expected a tensor "
                            "or a dict of named terms")
        for hand in hands:
            usable_hand(pair.source, hand)
        if pair.iwae_bound is not None:
            guarded(pair, pair.iwae_bound, "iwae_bound(batch, draws)")(batch, shaped(sets[0].draws, setup.shapes))
        if pair.exact_log_likelihood is not None:
            exact_shape(guarded(pair, pair.exact_log_likelihood, "exact_log_likelihood(batch)")(batch), setup,
                        pair.source)
    except HandError as exc:
        raise ConfigError(str(exc)) from None
    exact, averaged, notes = plan(pair, setup, k, hands, sets, rtol)
    notes += [setup.particles_note(k), form_note(hands[0], setup)]
    extra: List[ExtraCheck] = []
    if pair.exact_log_likelihood is not None:
        extra.append(ExtraCheck("ground truth: exact_log_likelihood and the IWAE ladder", "ground truth",
                                lambda: ground_truth(pair, setup, seed, ground_truth_ks)))
    blocked = [p.comparison for p in exact if isinstance(p.comparison.loss, IWAELoss) and not setup.vectorized]
    runnable = [p.comparison for p in exact if p.comparison not in blocked]
    with pyro.validation_enabled(True):
        report = check(pair.model, pair.guide, batch, runnable, params, param_names=names, max_plate_nesting=setup.nest,
                       seed=seed, rtol=rtol, repeats=repeats, gradient_seeds=gradient_seeds, gradient_batch=None,
                       extra_rows=extra, data_plate=setup.data_plate)
        report.rows += no_reference_rows(runnable, setup, params, gradient_seeds)
        if averaged:  # held on average only: statistical and expected-gradient rows
            report.rows += averaged_rows(pair, setup, averaged, params, names, seed, rtol, repeats, gradient_seeds)
            report.rows += no_reference_rows(averaged, setup, params, gradient_seeds)
        report.rows += [not_run_row("same sample", c.name, "our IWAELoss draws its particles in one vectorised run, "
                                    f"which this model does not allow ({setup.why_sequential})") for c in blocked]
        same = [r for r in report.rows if r.kind == "same sample"]
        if same and not any(r.ran for r in same):
            raise ConfigError(f"{pair.source}: the check could not run: {same[0].not_run}")
        for planned in exact:
            diagnose_comparison(report, pair, setup, planned, sets, params, rtol)
    report.notes = notes
    report.formula = bound_formula(pair.model, pair.guide, batch, setup.nest, data_plate=setup.data_plate,
                                   vectorized=setup.vectorized, shapes=setup.shapes)
    return report


def averaged_rows(pair: UserPair, setup: Setup, averaged: List[Comparison], params, names, seed: int, rtol: float,
                  repeats: int, gradient_seeds: int) -> List[Row]:
    """The statistical and expected-gradient rows of comparisons held on average only (their same-sample
    values differ from the bound's by design: another estimator of the same ELBO)."""
    rows: List[Row] = []
    nest, plate = setup.nest, setup.data_plate
    for c in averaged:
        if repeats >= 2:
            try:
                rows.append(statistical_row(c, pair.model, pair.guide, pair.batch, params, nest, repeats, seed, rtol,
                                            plate))
            except Exception as exc:  # noqa: BLE001
                rows.append(error_row("statistical", f"{c.name}: mean over {repeats} seeds", exc, True))
        if gradient_seeds >= 2 and params and setup.vectorized:
            try:
                rows += expected_gradient_check(
                    c.gradient_name, lambda b, c=c: c.loss.differentiable_loss(pair.model, pair.guide, **b), pair.model,
                    pair.guide, pair.batch, params, names, target="elbo", k=c.num_particles, max_plate_nesting=nest,
                    seeds=gradient_seeds, seed=seed, data_plate=plate)
            except Exception as exc:  # noqa: BLE001
                rows.append(error_row("expected gradient", c.gradient_name, exc, True))
    return rows


def pair_formula(pair: UserPair) -> Dict[str, str]:
    """The objective Pyro optimises for a user's pair (``ppl-vi check FILE.py --formula``)."""
    with torch.random.fork_rng():
        setup = prepare(pair.model, pair.guide, pair.batch, source=pair.source, files=pair.files,
                        data_plate=pair.data_plate, max_plate_nesting=pair.max_plate_nesting)
    formula = bound_formula(pair.model, pair.guide, pair.batch, setup.nest, data_plate=setup.data_plate,
                            vectorized=setup.vectorized, shapes=setup.shapes)
    if not formula:
        raise ConfigError(f"{pair.source}: no formula: the pair does not run once as written")
    return formula
