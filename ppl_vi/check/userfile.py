"""``ppl-vi check FILE.py``: a user's own model, guide and hand-derived bound, checked and diagnosed.

The file defines, at module level (no class, no registry entry needed)::

    model(**batch), guide(**batch)      the Pyro pair; data in pyro.plate("data", ...)
    bound(batch, draws)                 the per-datapoint NEGATIVE ELBO, written by hand, (B,): the K particles
                                        averaged, scaled as Pyro scales it (a subsampled plate's N/B included);
                                        or a dict of named terms ({"rec": ..., "kl": ...}, or one per site)
    batch                               a dict of tensors, or a function returning one
    iwae_bound(batch, draws)            optional: the per-datapoint negative IWAE_K bound, held against IWAELoss
    params                              optional: the tensors whose gradients to compare (default: every leaf
                                        tensor that requires grad and reaches the loss, the file's nn.Module
                                        parameters, Pyro's param store)
    exact_log_likelihood(batch)         optional: log p(x) per datapoint; adds the ground-truth rows
    loss / losses                       optional: Pyro loss object(s) to hold the bounds against instead of the
                                        defaults (Trace_ELBO; TraceMeanField_ELBO where every guide site is
                                        reparameterised; our IWAELoss when iwae_bound is given)
    max_plate_nesting                   optional (default 1)

``draws`` maps each latent site to its K particles, shape (K, B, ...). ``FILE.py:NAME`` picks
``NAME`` from the file instead: a ``LatentModel`` subclass (checked as ``ppl-vi check MODEL``), a
dict or object whose entries replace the module-level ones, or a function (then the ``bound``).

Every unusable file is a ConfigError (one line, exit 2); a failing check exits 1 with, under the
table, one verdict per likely mistake (:mod:`ppl_vi.check.diagnose`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import math
import sys
import types
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import pyro
import torch
from pyro.infer import RenyiELBO
from torch import Tensor, nn

from ppl_vi.check.core import Comparison, check, expected_gradient_check, statistical_row
from ppl_vi.check.diagnose import diagnose, match_terms, pyro_groups, residual_verdicts
from ppl_vi.check.formula import bound_formula
from ppl_vi.check.rows import CheckReport, Row, close_row, failure_row
from ppl_vi.check.terms import SiteTerms, hand_terms, site_terms, total
from ppl_vi.check.truth import iwae_ladder_rows
from ppl_vi.errors import ConfigError
from ppl_vi.models.base import LatentModel, is_latent
from ppl_vi.objectives.importance import IWAELoss
from ppl_vi.objectives.losses import make_loss

FIELDS = ("model", "guide", "bound", "iwae_bound", "batch", "params", "exact_log_likelihood", "loss", "losses",
          "max_plate_nesting")
REQUIRED = {"model": "model(**batch), the Pyro model", "guide": "guide(**batch), the Pyro guide",
            "bound": "bound(batch, draws), the per-datapoint negative bound written by hand",
            "batch": "batch, a dict of tensors (or a function returning one)"}


@dataclasses.dataclass
class UserPair:
    """What a user's file defines (see the module docstring)."""

    source: str
    model: Callable
    guide: Callable
    bound: Callable
    batch: Dict[str, Tensor]
    iwae_bound: Optional[Callable] = None
    params: Optional[List[Tensor]] = None
    param_names: Optional[List[str]] = None
    exact_log_likelihood: Optional[Callable] = None
    losses: Dict[str, object] = dataclasses.field(default_factory=dict)
    max_plate_nesting: int = 1
    module: Optional[types.ModuleType] = None


# ------------------------------------------------------------------------------------------------
# loading


def split_target(target: str) -> Tuple[Path, Optional[str]]:
    """``FILE.py`` or ``FILE.py:NAME`` -> (path, NAME)."""
    path, _, name = target.partition(".py:")
    path = Path(path + ".py") if name else Path(target)
    return path, (name or None)


def import_file(path: Path) -> types.ModuleType:
    """Import a user's file as a module (its directory first on sys.path, for its own imports)."""
    if path.suffix != ".py":
        raise ConfigError(f"{path}: expected a Python file (FILE.py or FILE.py:NAME)")
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    name = f"ppl_vi_user_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    sys.path.insert(0, str(path.resolve().parent))
    try:
        spec.loader.exec_module(module)
    except SystemExit as exc:
        raise ConfigError(f"{path}: importing it called sys.exit({exc.code}); guard its script part with "
                          "if __name__ == '__main__'") from None
    except Exception as exc:  # noqa: BLE001 - the user's code: one line, exit 2
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ConfigError(f"{path}: importing it raised {type(exc).__name__}: {msg}") from None
    finally:
        sys.path.remove(str(path.resolve().parent))
    return module


def latent_model_classes(module: types.ModuleType) -> List[type]:
    """The LatentModel subclasses a file defines itself."""
    return [v for v in vars(module).values() if inspect.isclass(v) and issubclass(v, LatentModel)
            and v is not LatentModel and v.__module__ == module.__name__]


def load_target(target: str):
    """A :class:`UserPair`, or a LatentModel subclass to check as a built-in model."""
    path, name = split_target(target)
    module = import_file(path)
    entries = {f: getattr(module, f) for f in FIELDS if hasattr(module, f)}
    if name is not None:
        if not hasattr(module, name):
            found = sorted(n for n, v in vars(module).items() if not n.startswith("_") and not inspect.ismodule(v))
            raise ConfigError(f"{path} defines no {name!r}; it defines: {', '.join(found[:20])}")
        chosen = getattr(module, name)
        if inspect.isclass(chosen) and issubclass(chosen, LatentModel):
            return chosen
        if isinstance(chosen, dict):
            entries.update({k: v for k, v in chosen.items() if k in FIELDS})
        elif inspect.isfunction(chosen):
            entries["bound"] = chosen
        else:
            entries.update({k: getattr(chosen, k) for k in FIELDS if hasattr(chosen, k)})
    missing = [f for f in REQUIRED if f not in entries]
    if missing and name is None:
        classes = latent_model_classes(module)
        if len(classes) == 1 and not ({"model", "guide", "bound"} & set(entries)):
            return classes[0]
    if missing:
        raise ConfigError(f"{path}{':' + name if name else ''} is missing {', '.join(REQUIRED[m] for m in missing)}"
                          " (define them at module level; see `ppl-vi check --help`)")
    return make_pair(str(path) + (f":{name}" if name else ""), entries, module)


def make_pair(source: str, entries: dict, module=None) -> UserPair:
    """A :class:`UserPair` from the file's entries, validated (ConfigError naming what is wrong)."""
    for f in ("model", "guide", "bound", "iwae_bound", "exact_log_likelihood"):
        if f in entries and not callable(entries[f]):
            raise ConfigError(f"{source}: {f} must be a function, got {type(entries[f]).__name__}")
    batch = entries["batch"]
    if callable(batch):
        batch = batch()
    if not isinstance(batch, dict) or not batch or not all(torch.is_tensor(v) for v in batch.values()):
        raise ConfigError(f"{source}: batch must be a non-empty dict of tensors (or a function returning one), "
                          f"got {type(batch).__name__}")
    sizes = {v.shape[0] if v.dim() else None for v in batch.values()}
    if len(sizes) != 1 or None in sizes:
        raise ConfigError(f"{source}: every tensor in batch needs the same leading (datapoint) dimension")
    losses = entries.get("losses") or {}
    if "loss" in entries:
        losses = {**({type(entries["loss"]).__name__: entries["loss"]}), **losses}
    if isinstance(losses, (list, tuple)):
        losses = {f"{type(v).__name__}[{i}]": v for i, v in enumerate(losses)}
    params, names = entries.get("params"), None
    if params is not None:
        if isinstance(params, dict):
            names, params = list(params), list(params.values())
        params = list(params.parameters()) if isinstance(params, nn.Module) else list(params)
        if not all(torch.is_tensor(p) and p.requires_grad for p in params):
            raise ConfigError(f"{source}: params must be tensors that require grad")
    nest = int(entries.get("max_plate_nesting", 1))
    return UserPair(source, entries["model"], entries["guide"], entries["bound"], batch, entries.get("iwae_bound"),
                    params, names, entries.get("exact_log_likelihood"), dict(losses), nest, module)


def default_params(pair: UserPair) -> Tuple[List[Tensor], List[str]]:
    """Every leaf tensor that requires grad (module-level tensors, nn.Module parameters, Pyro's param
    store after one run) and reaches Trace_ELBO's loss."""
    found: Dict[int, Tuple[str, Tensor]] = {}
    if pair.module is not None:
        for name, value in vars(pair.module).items():
            if torch.is_tensor(value) and value.requires_grad and value.is_leaf:
                found.setdefault(id(value), (name, value))
            elif isinstance(value, nn.Module):
                for pname, p in value.named_parameters():
                    found.setdefault(id(p), (f"{name}.{pname}", p))
    loss = make_loss("trace", 1, pair.max_plate_nesting)
    value = loss.differentiable_loss(pair.model, pair.guide, **pair.batch)
    for name, p in pyro.get_param_store().named_parameters():
        found.setdefault(id(p), (name, p))
    candidates = list(found.values())
    grads = torch.autograd.grad(value, [p for _, p in candidates], allow_unused=True) if candidates else []
    used = [(n, p) for (n, p), g in zip(candidates, grads) if g is not None]
    return [p for _, p in used], [n for n, _ in used]


# ------------------------------------------------------------------------------------------------
# checking


def _objective(loss) -> str:
    return getattr(loss, "target", "iwae" if isinstance(loss, RenyiELBO) else "elbo")


def reparameterised(pair: UserPair) -> bool:
    """Every guide site has rsample (TraceMeanField_ELBO applies)."""
    with torch.no_grad(), pyro.poutine.block():
        trace = pyro.poutine.trace(pair.guide).get_trace(**pair.batch)
    return all(getattr(s["fn"], "has_rsample", False) for s in trace.nodes.values() if is_latent(s))


@dataclasses.dataclass
class Plan:
    """Which loss each bound is held against on the same sample, and which only on average."""

    exact: List[Tuple[Comparison, str, bool]]  # (comparison, objective, analytic KL)
    averaged: List[Comparison]


def plan(pair: UserPair, k: int, terms: Optional[SiteTerms], rtol: float) -> Plan:
    """Default comparisons: the ELBO bound against Trace_ELBO on the same sample, or against
    TraceMeanField_ELBO where it matches the closed-form KL instead (the other one then on average
    only); the IWAE bound against IWAELoss. A file's own ``loss``/``losses`` replace them."""
    nest = pair.max_plate_nesting
    elbo_hand = lambda b, d: total(pair.bound(b, d))  # noqa: E731
    iwae_hand = (lambda b, d: total(pair.iwae_bound(b, d))) if pair.iwae_bound else None  # noqa: E731
    if pair.losses:
        exact = []
        for label, loss in pair.losses.items():
            objective = _objective(loss)
            hand = iwae_hand if objective == "iwae" else elbo_hand
            if hand is None:
                raise ConfigError(f"{pair.source}: the loss {label} estimates the IWAE bound; define iwae_bound(batch, draws)")
            analytic = type(loss).__name__ == "TraceMeanField_ELBO"
            exact.append((Comparison(f"{label} (K={getattr(loss, 'num_particles', k)}) vs "
                                     f"{'iwae_bound' if objective == 'iwae' else 'bound'}", loss, hand,
                                     getattr(loss, "num_particles", k)), objective, analytic))
        return Plan(exact, [])
    trace = Comparison(f"Trace_ELBO (K={k}) vs bound", make_loss("trace", k, nest), elbo_hand, k)
    exact, averaged = [], []
    if reparameterised(pair):
        meanfield = Comparison(f"TraceMeanField_ELBO (K={k}) vs bound", make_loss("meanfield", k, nest), elbo_hand, k)
        analytic = False
        if terms is not None and terms.analytic_kl:
            hand = total(hand_terms(pair.bound, pair.batch, terms.draws)).detach().double()
            closed = sum(terms.components(analytic=True).values()).detach().double()
            mc = terms.negative_elbo().detach().double()
            analytic = hand.shape == closed.shape and bool(((hand - closed).abs() <= rtol * closed.abs().clamp_min(1)).all()) \
                and not bool(((hand - mc).abs() <= rtol * mc.abs().clamp_min(1)).all())
        exact.append((meanfield, "elbo", True) if analytic else (trace, "elbo", False))
        averaged.append(trace if analytic else meanfield)
    else:
        exact.append((trace, "elbo", False))
    if iwae_hand is not None:
        exact.append((Comparison(f"IWAELoss (K={k}) vs iwae_bound", IWAELoss(k, nest), iwae_hand, k), "iwae", False))
    return Plan(exact, averaged)


def _grads_agree(hand: Tensor, reference: Tensor, params: List[Tensor], rtol: float) -> Optional[bool]:
    """Do the hand bound and Pyro's decomposed estimate have the same gradient (same draws)?"""
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


def term_rows(label: str, hand: Dict[str, Tensor], terms: SiteTerms, analytic: bool,
              rtol: float, params=()) -> Tuple[List[Row], List[str]]:
    """One row per named hand term against its Pyro counterpart, and a verdict per differing term."""
    groups = pyro_groups(terms, analytic)
    matched = match_terms(hand, terms, analytic)
    rows, verdicts = [], []
    pieces = terms.pieces()
    for name, value in hand.items():
        if name not in matched or value.shape != next(iter(groups.values()))[1].shape:
            rows.append(Row("term", f"{label}: term {name!r}", passed=False,
                            note=f"error: term {name!r} has shape {tuple(value.shape)}; expected one value per datapoint"))
            continue
        desc, ref = groups[matched[name]]
        row = close_row("term", f"{label}: term {name!r} = Pyro's {desc}", ref, value, rtol)
        if not row.passed:
            diff = (value.detach().double() - ref.detach().double())
            tol = rtol * max(value.abs().max().item(), ref.abs().max().item(), 1.0)
            bad = (diff.abs() > tol).nonzero().flatten().tolist()
            row.note = (f"differs at datapoints {bad[:8]}{' ...' if len(bad) > 8 else ''} by "
                        f"{diff[bad].min().item():.6g} .. {diff[bad].max().item():.6g}")
            row.details = {"pyro": ref.detach().double().tolist(), "hand": value.detach().double().tolist(),
                           "differing": bad}
            verdicts += residual_verdicts(label, value, ref, terms, pieces, rtol,
                                          _grads_agree(value, ref, list(params), rtol), what=f"the term {name!r}")
        rows.append(row)
    covered = set()
    for key in matched.values():
        covered |= set(terms.observed) if key == "observed" else set(terms.prior) if key == "latent" else {key}
    for site in [s for s in list(terms.observed) + list(terms.prior) if s not in covered]:
        rows.append(Row("term", f"{label}: Pyro's term of site {site!r}", groups[site][1].mean().item(), passed=False,
                        note="no hand term matches it"))
        verdicts.append(f"missing term: {label}: Pyro's loss has a term for site {site!r} "
                        f"({groups[site][0]}) that no hand term matches")
    return rows, verdicts


def decomposition_row(label: str, pyro_values: List[float], terms: SiteTerms, objective: str, analytic: bool,
                      rtol: float) -> Row:
    """Pyro's per-datapoint loss (masked) equals the sum of its site terms read off the traces."""
    reference = terms.negative_iwae() if objective == "iwae" else sum(terms.components(analytic).values())
    return close_row("same sample", f"{label}: Pyro's loss = the sum of its site terms (decomposition)",
                     torch.tensor(pyro_values, dtype=torch.float64), reference, rtol,
                     note="what the diagnosis holds the hand bound against")


def ground_truth(pair: UserPair, seed: int, ks=(1, 10, 100), repeats: int = 10) -> List[Row]:
    """The file's exact log p(x): the IWAE ladder ELBO ≈ L_1 ≤ L_10 ≤ L_100 ≤ log p(x), within SE."""
    log_px = pair.exact_log_likelihood(pair.batch).detach()
    if log_px.shape != (next(iter(pair.batch.values())).shape[0],):
        raise ConfigError(f"exact_log_likelihood(batch) returned shape {tuple(log_px.shape)}; expected one value "
                          "per datapoint")
    nest = pair.max_plate_nesting
    with torch.no_grad():
        elbo = site_terms(pair.model, pair.guide, pair.batch, 1000, nest, seed).log_weights.mean(0)
    rows = iwae_ladder_rows(lambda k: IWAELoss(k, nest).per_datapoint(pair.model, pair.guide, **pair.batch),
                            elbo, log_px, ks, repeats, seed)
    for r in rows:  # these are bounds on log p(x), not losses: said, since the rows above are losses
        r.note = "; ".join(x for x in ("the bound (not the loss), without the minibatch scale", r.note) if x)
    return rows


def check_pair(pair: UserPair, *, num_particles: int = 3, seed: int = 0, repeats: int = 50, gradient_seeds: int = 50,
               gradient_batch: int = 8, rtol: Optional[float] = None) -> CheckReport:
    """Every check of a user's pair, the term-by-term rows, and the diagnoses of what differs."""
    k, nest, batch = num_particles, pair.max_plate_nesting, pair.batch
    floating = [v for v in batch.values() if v.is_floating_point()]
    if rtol is None:
        rtol = 1e-6 if all(v.dtype == torch.float64 for v in floating) else 1e-4
    params, names = (pair.params, pair.param_names) if pair.params is not None else default_params(pair)
    names = names or [f"params[{i}]" for i in range(len(params))]
    try:
        terms = site_terms(pair.model, pair.guide, batch, k, nest, seed)
    except ConfigError:
        terms = None  # global latents and the like: no per-site terms; the checks still run
    p = plan(pair, k, terms, rtol)
    extra = []
    for c in p.averaged:
        extra.append(lambda c=c: [statistical_row(c, pair.model, pair.guide, batch, params, nest, repeats, seed)]
                     if repeats >= 2 else [])
        if gradient_seeds >= 2 and params:
            head = {n: v[:gradient_batch] for n, v in batch.items()}
            extra.append(lambda c=c, head=head: expected_gradient_check(
                c.name, lambda b: c.loss.differentiable_loss(pair.model, pair.guide, **b), pair.model, pair.guide,
                head, params, names, target="elbo", k=k, max_plate_nesting=nest, seeds=gradient_seeds, seed=seed))
    if pair.exact_log_likelihood is not None:
        extra.append(lambda: ground_truth(pair, seed))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"pyro\..*")  # the checker runs Pyro's losses on purpose
        report = check(pair.model, pair.guide, batch, [c for c, _, _ in p.exact], params, param_names=names,
                       max_plate_nesting=nest, seed=seed, rtol=rtol, repeats=repeats, gradient_seeds=gradient_seeds,
                       gradient_batch=gradient_batch, extra_rows=extra)
        if terms is not None:
            add_diagnosis(report, pair, p, terms, params, rtol)
        report.formula = bound_formula(pair.model, pair.guide, batch, nest, terms)
    return report


def loss_verdict(label: str, pyro_values: Tensor, terms: SiteTerms, objective: str, rtol: float) -> str:
    """Why Pyro's own loss differs from the bound it is meant to estimate (RenyiELBO: the scale inside)."""
    log_w, c, k = terms.log_weights.detach().double(), terms.c, terms.num_particles
    if objective == "iwae" and c != 1.0:
        inside = -(torch.logsumexp(c * log_w, 0) - math.log(k))
        if bool(((pyro_values - inside).abs() <= rtol * inside.abs().clamp_min(1.0)).all()):
            return (f"scale: {label} itself puts the minibatch scale N/B = {c:g} inside the log-mean-exp, "
                    "-log (1/K) Σ_k exp(c log w_k), which bounds nothing; the IWAE bound is -c log (1/K) Σ_k w_k "
                    "(our IWAELoss, loss 'iwae')")
    return (f"unexplained: {label}'s per-datapoint values are not the sum of its site terms "
            f"({'-c log (1/K) Σ_k w_k' if objective == 'iwae' else 'the ELBO'}); any verdict below is against that")


def add_diagnosis(report: CheckReport, pair: UserPair, p: Plan, terms: SiteTerms, params, rtol: float) -> None:
    """Term rows (inserted after each comparison's rows) and verdicts for each same-sample comparison."""
    for c, objective, analytic in p.exact:
        if getattr(c.loss, "num_particles", terms.num_particles) != terms.num_particles:
            continue
        label = c.name.split(" vs ")[0]
        try:
            hand = hand_terms(pair.iwae_bound if objective == "iwae" else pair.bound, pair.batch, terms.draws)
            reference = terms.negative_iwae() if objective == "iwae" else sum(terms.components(analytic).values())
            extra_rows: List[Row] = []
            verdicts: List[str] = []
            per_point = next((r for r in report.rows if r.name == f"{c.name}: each datapoint"), None)
            if per_point is not None and per_point.details.get("pyro"):
                extra_rows.append(decomposition_row(label, per_point.details["pyro"], terms, objective, analytic, rtol))
                if not extra_rows[-1].passed:  # the loss is not what it targets: say how, then diagnose the bound
                    verdicts.append(loss_verdict(label, torch.tensor(per_point.details["pyro"], dtype=torch.float64),
                                                 terms, objective, rtol))
            k, size = terms.num_particles, reference.shape[0]
            value = total(hand)
            if objective == "elbo" and k > 1 and k != size and value.shape == (k, size):  # per particle: say so,
                verdicts += diagnose(label, value, terms, objective, analytic=analytic, rtol=rtol)  # then look on
                hand = ({n: (v.mean(0) if v.shape == (k, size) else v) for n, v in hand.items()}
                        if isinstance(hand, dict) else value.mean(0))
            term_verdicts: List[str] = []
            if isinstance(hand, dict) and objective == "elbo":
                rows, term_verdicts = term_rows(label, hand, terms, analytic, rtol, params)
                extra_rows += rows
            value = total(hand)
            agree = _grads_agree(value, reference, params, rtol) if value.shape == reference.shape else None
            verdicts += term_verdicts or diagnose(label, value, terms, objective, analytic=analytic, rtol=rtol,
                                                  grads_agree=agree)
        except Exception as exc:  # noqa: BLE001 - the bound itself raised: the same-sample rows say so
            extra_rows, verdicts = [failure_row("term", f"{label}: term by term", exc)], []
        last = max((i for i, r in enumerate(report.rows) if r.name.startswith(c.name) and r.kind == "same sample"),
                   default=len(report.rows) - 1)
        report.rows[last + 1:last + 1] = extra_rows
        report.verdicts += verdicts


def check_target(target: str, **kwargs) -> CheckReport:
    """:func:`check_pair` for ``FILE.py`` or ``FILE.py:NAME`` (a LatentModel subclass: ConfigError, the
    CLI checks those as built-in models)."""
    loaded = load_target(target)
    if inspect.isclass(loaded):
        raise ConfigError(f"{target} names the LatentModel {loaded.__name__}; check it with ppl-vi check")
    return check_pair(loaded, **kwargs)


__all__ = ["UserPair", "check_pair", "check_target", "load_target", "make_pair", "split_target"]
