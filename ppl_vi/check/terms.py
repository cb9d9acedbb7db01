"""Pyro's estimate split by site and by datapoint, on the very draws the hand bound sees.

On K particles z_k ~ q(z|x_i) (one vectorised guide run under a particle plate, as in
:func:`~ppl_vi.objectives.traces.run_particles`), the negative ELBO that ``Trace_ELBO`` estimates
is a sum of one term per site, per datapoint i::

    observed site x:   -(s_x / K) Σ_k log p(x_i | z_ki)
    latent site z:      (s_z / K) Σ_k [ log q(z_ki | x_i) - log p(z_ki) ]       (or s_z KL(q || p) in closed form)

with s the site's Pyro scale (the minibatch scale N/B of a subsampled plate, times β on a latent
site under ``poutine.scale``). The importance-weighted loss is not a sum over sites; it is built
from the unscaled per-particle log-weight log w_ki = Σ_x log p(x_i|z_ki) + Σ_z [log p(z_ki) -
log q(z_ki|x_i)] as  -c [ log (1/K) Σ_k w_ki ]  (c: the observed sites' scale).

:func:`site_terms` reads these pieces off the traces (a built-in model: every latent local, the data
plate at dim -max_plate_nesting); :mod:`ppl_vi.check.diagnose` holds a hand bound against them, and
against the common ways of getting them wrong.

**A user's pair** (:func:`draw_sets`, :func:`view`) may have what :func:`site_terms` refuses: global
latents (outside the data plate, told by its *name*, so component means in their own plate are global
too), model-enumerated sites (summed out with every site their value reaches, as TraceEnum_ELBO does:
the observed group's term is -log Σ_c p(c) p(x | c, ...)), and models that draw their K particles one
plain run at a time. Each draw set (a seed) holds (K, B) local and (K,) global log-densities; :func:`view`
lays several draw sets side by side, a column per datapoint per draw set, or (with global latents) a
column per draw set holding the batch's total. Beside each site's terms it keeps what a derivation
may drop on its own: log-Jacobians of transformed distributions, data-only constants (-log x!), a
location-scale density's -log σ and whole normalising constant.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import pyro
import torch
from pyro import poutine
from pyro.distributions.kl import kl_divergence
from torch import Tensor
from torch.distributions.utils import _sum_rightmost  # torch's own helper (private): sums rightmost dims

from ppl_vi.errors import ConfigError
from ppl_vi.models.base import Batch, Draws, draws_from_trace
from ppl_vi.objectives.traces import local_log_prob, run_particles
from ppl_vi.sites import (PARTICLE_PLATE, FixValues, data_plate_dim, in_data_plate, is_deterministic, is_factor,
                          is_latent, is_variable, model_only_sites, unscaled_log_prob)


@dataclasses.dataclass
class SiteTerms:
    """Unscaled per-particle, per-datapoint log-densities of every site, (K, B) each, and the scales."""

    observed: Dict[str, Tensor]  # log p(x_s | z)
    prior: Dict[str, Tensor]  # log p(z_s)
    guide: Dict[str, Tensor]  # log q(z_s | x)
    analytic_kl: Dict[str, Tensor]  # KL(q(z_s|x) || p(z_s)) where torch has it in closed form, (K, B)
    scales: Dict[str, float]  # each site's Pyro scale (a latent site's: the model's)
    dims: Dict[str, int]  # numbers per datapoint at each site (event size times inner plates)
    draws: Draws
    num_particles: int
    guide_trace: object = None
    model_trace: object = None
    #: what a column is: a datapoint (of one or several draw sets, side by side) or, with ``totals``, a
    #: whole batch's total for one draw set (a model with global latents: no per-datapoint split)
    totals: bool = False
    batch_size: int = 0  # B of the checked batch (0: the number of columns)
    draw_sets: int = 1
    global_sites: Tuple[str, ...] = ()
    enumerated: Dict[str, Tuple[str, ...]] = dataclasses.field(default_factory=dict)  # group -> sites summed out
    #: log|dθ/du| of a latent site's transformed distribution (LogNormal...), keyed "q:site" or "p:site"
    jacobians: Dict[str, Tensor] = dataclasses.field(default_factory=dict)
    #: (values per column, what) of data-only normalising constants (log x! of a Poisson site...)
    data_constants: List[Tuple[Tensor, str]] = dataclasses.field(default_factory=list)
    #: Σ log σ of a location-scale site's scale (the -log σ in its density), keyed "q:site", "p:site"
    log_scales: Dict[str, Tensor] = dataclasses.field(default_factory=dict)
    #: a location-scale site's whole normalising constant -log p(μ) (½ log 2πσ², log 2b, log πσ...), same keys
    normalisers: Dict[str, Tensor] = dataclasses.field(default_factory=dict)
    factors: Tuple[str, ...] = ()  # observed sites that are pyro.factor calls

    @property
    def c(self) -> float:
        """The minibatch scale: that of the observed sites in the data plate (one value; :func:`site_terms`
        checks)."""
        local = [s for s in self.observed if s not in self.global_sites] or list(self.observed)
        return self.scales[local[0]]

    @property
    def log_weights(self) -> Tensor:
        """log w_ki, unscaled, (K, B)."""
        return (sum(self.observed.values()) + sum(self.prior.values()) - sum(self.guide.values()))

    def negative_elbo(self) -> Tensor:
        """What Trace_ELBO's loss is per datapoint on these draws, (B,): the sum of :meth:`components`."""
        return sum(self.components().values())

    def negative_iwae(self) -> Tensor:
        """What IWAELoss's loss is per datapoint on these draws, (B,): -c log (1/K) Σ_k w_k."""
        return -self.c * (torch.logsumexp(self.log_weights, 0) - math.log(self.num_particles))

    def components(self, analytic: bool = False) -> Dict[str, Tensor]:
        """The negative ELBO's term per site, per datapoint (B,), scaled as Pyro scales it; named by site.

        ``analytic``: the closed-form KL for latent sites that have one (TraceMeanField_ELBO)."""
        out = {}
        for name, lp in self.observed.items():
            out[name] = -self.scales[name] * lp.mean(0)
        for name in self.prior:
            if analytic and name in self.analytic_kl:
                out[name] = self.scales[name] * self.analytic_kl[name].mean(0)
            else:
                out[name] = self.scales[name] * (self.guide[name] - self.prior[name]).mean(0)
        return out

    def pieces(self) -> Dict[str, Tensor]:
        """Finer pieces, per column (B,), each a term a hand derivation may get wrong on its own:
        ``-log p(x|z) [x]``, ``-log p(z) [z]`` (the cross-entropy to the prior), ``log q(z|x) [z]``
        (minus the entropy) and the log-Jacobians of transformed distributions, scaled as Pyro scales them."""
        out = {f"{self.observed_desc(n)} [{n}]": -self.scales[n] * lp.mean(0) for n, lp in self.observed.items()}
        for key, jac in self.jacobians.items():  # first: an autoguide's Delta is all Jacobian, log q(θ) = -log|J|
            side, _, n = key.partition(":")
            sign = 1.0 if side == "q" else -1.0  # log q = log q_u - log|J|; -log p = -log p_u + log|J|
            out[f"log-Jacobian log|d{n}/du| of {'the guide' if side == 'q' else 'the prior'}'s transform [{n}]"] = \
                -sign * self.scales[n] * jac.mean(0)
        for n in self.prior:
            out[f"-log p({n}) [{n}]"] = -self.scales[n] * self.prior[n].mean(0)
            out[f"log q({n}|x) [{n}] (minus the entropy)"] = self.scales[n] * self.guide[n].mean(0)
        for prefix, found in (("normalising -log σ in", self.log_scales),
                              ("normalising constant (the density at its location) of", self.normalisers)):
            for key, value in found.items():
                side, _, n = key.partition(":")
                density = f"log q({n}|x)" if side == "q" else f"log p({n}|...)" if n in self.observed else f"log p({n})"
                sign = -1.0 if side == "q" else 1.0  # log q holds -log σ_q; -log p holds +log σ_p
                out[f"{prefix} {density} [{n}]"] = sign * self.scales[n] * value.mean(0)
        return out

    def is_global(self, name: str) -> bool:
        return name in self.global_sites

    def is_factor(self, name: str) -> bool:
        """Is observed site ``name`` a ``pyro.factor`` (its log-density is the factor's value)?"""
        return name in self.factors

    def observed_desc(self, name: str, given: str = "...") -> str:
        """Pyro's term of observed site ``name`` in words: ``-log p(name|given)``, or a factor's negative."""
        return f"-{name} (the pyro.factor's value)" if self.is_factor(name) else f"-log p({name}|{given})"


def _dims(site, max_plate_nesting: int) -> int:
    """Numbers per datapoint at a site: its value's size right of the data plate's dim."""
    value = site["value"]
    batch_rank = max_plate_nesting + site["fn"].event_dim
    return int(math.prod(value.shape[-batch_rank:][1:])) if value.dim() >= batch_rank else 1


def _scale(site) -> float:
    s = site["scale"]
    return float(s) if not torch.is_tensor(s) or s.numel() == 1 else math.nan


def site_terms(model: Callable, guide: Callable, batch: Batch, k: int, max_plate_nesting: int = 1,
               seed: Optional[int] = None) -> SiteTerms:
    """:class:`SiteTerms` of ``k`` particles (seeded with ``seed`` first: the draws the checker's
    same-sample rows use). Refuses (ConfigError) a global latent or a model-only latent site:
    neither splits into per-datapoint, per-site terms."""
    if seed is not None:
        pyro.set_rng_seed(seed)
    guide_trace, model_trace = run_particles(model, guide, k, batch, max_plate_nesting)
    guided = {n: s for n, s in guide_trace.nodes.items() if is_latent(s)}
    observed, prior, log_q, kl, scales, dims = {}, {}, {}, {}, {}, {}
    for name, site in model_trace.nodes.items():
        if not is_variable(site):
            continue
        if not in_data_plate(site, max_plate_nesting):
            raise ConfigError(f"site {name!r} lies outside the data plate (a global latent): no per-datapoint terms")
        if not site["is_observed"] and name not in guided:
            raise ConfigError(f"the model's latent site {name!r} is not sampled by the guide: no per-site terms")
        scales[name], dims[name] = _scale(site), _dims(site, max_plate_nesting)
        if site["is_observed"]:
            observed[name] = local_log_prob(site, k, max_plate_nesting)
            continue
        prior[name] = local_log_prob(site, k, max_plate_nesting)
        log_q[name] = local_log_prob(guided[name], k, max_plate_nesting)
        try:
            kl[name] = local_log_prob(site, k, max_plate_nesting,
                                      value=closed_kl(guided[name]["fn"], site["fn"]))
        except NotImplementedError:
            pass
    if not observed:
        raise ConfigError("the model has no observed site (obs=...) in its data plate")
    if len({scales[n] for n in observed}) != 1:
        raise ConfigError(f"the observed sites have different scales {sorted({scales[n] for n in observed})}")
    draws = draws_from_trace(guide_trace, k, max_plate_nesting)
    factors = tuple(n for n in observed if is_factor(model_trace.nodes[n]))
    return SiteTerms(observed, prior, log_q, kl, scales, dims, draws, k, guide_trace, model_trace, factors=factors)


def hand_terms(hand: Callable, batch: Batch, draws: Draws):
    """The hand bound at ``draws``: a tensor, or a dict of named terms (summed for the total)."""
    value = hand(batch, draws)
    if isinstance(value, dict):
        if not value or not all(torch.is_tensor(v) for v in value.values()):
            raise ConfigError("a bound that returns a dict must map term names to tensors")
        return value
    if not torch.is_tensor(value):
        raise ConfigError(f"the bound returned {type(value).__name__}; expected a tensor (per datapoint) "
                          "or a dict of named per-datapoint terms")
    return value


def total(value) -> Tensor:
    """The hand bound's total: the tensor itself, or the sum of its named terms."""
    return sum(value.values()) if isinstance(value, dict) else value


def names(value) -> List[str]:
    return list(value) if isinstance(value, dict) else []


# ------------------------------------------------------------------------------------------------
# a user's pair: the data plate by name, global latents, model-enumerated sites, particles one at a time


def closed_kl(q, p) -> Tensor:
    """KL(q || p) in closed form (NotImplementedError where none is registered), the two distributions first
    broadcast to one batch shape: some of torch's closed forms (Bernoulli-Bernoulli) index one by the
    other's mask and raise on a particle dim only one of them has. A guide's Delta (an autoguide's site, a
    MAP guide) has none: Pyro's KL of a Delta is its sampled log q - log p, no closed form of q's KL."""
    if type(q).__name__ == "Delta":
        raise NotImplementedError("a Delta's KL is no closed form")
    shape = torch.broadcast_shapes(q.batch_shape, p.batch_shape)
    q = q if q.batch_shape == shape else q.expand(shape)
    p = p if p.batch_shape == shape else p.expand(shape)
    return kl_divergence(q, p)


def trace_pairs(model: Callable, guide: Callable, batch: Batch, k: int, nest: int, vectorized: bool,
                values: Optional[Dict[str, Tensor]] = None) -> list:
    """[(guide_trace, model_trace)]: one pair with the K particles in a plate left of the model's plates,
    or K pairs of plain runs; the model replayed against the guide, its marked sites enumerated (left of
    the particle dim). ``values`` (K,) + shape fix the guide's draws instead of sampling them."""
    def one(fixed):
        guide_run = FixValues(fixed)(guide) if fixed else guide
        guide_trace = poutine.trace(guide_run).get_trace(**batch)
        first = -(nest + 2) if vectorized else -(nest + 1)
        enumerated = poutine.enum(model, first_available_dim=first)
        return guide_trace, poutine.trace(poutine.replay(enumerated, trace=guide_trace)).get_trace(**batch)

    if vectorized:
        with pyro.plate(PARTICLE_PLATE, k, dim=-(nest + 1)):
            return [one(values)]
    return [one(None if values is None else {n: v[i] for n, v in values.items()}) for i in range(k)]


def arrange(lp: Tensor, nest: int, vectorized: bool, dim: Optional[int], k: int, size: int) -> Tensor:
    """A site's batch-shaped tensor (log-density, KL, constant) as (E..., K, B) for a site in the data plate
    at ``dim``, (E..., K) for a global one (dim None): every other plate summed, enumeration dims E kept."""
    if not vectorized:  # a plain run: add the particle dim
        lp = lp.reshape((1,) * max(0, nest - lp.dim()) + lp.shape).unsqueeze(-(nest + 1))
    lp = lp.reshape((1,) * max(0, nest + 1 - lp.dim()) + lp.shape)
    other = tuple(d for d in range(-nest, 0) if d != dim)
    lp = lp.sum(other) if other else lp
    if dim is None:
        return lp.expand(lp.shape[:-1] + (k if vectorized else 1,))
    return lp.expand(lp.shape[:-2] + (k if vectorized else 1, size))


def log_jacobian(fn, value: Tensor) -> Optional[Tensor]:
    """log|dθ/du| at θ = ``value`` of a transformed distribution θ = T(u) (LogNormal: log θ), batch-shaped;
    None for another distribution (or a zero Jacobian, as |u| has)."""
    reinterpreted = 0
    while isinstance(fn, (torch.distributions.Independent,)) or type(fn).__name__ == "MaskedDistribution":
        reinterpreted += getattr(fn, "reinterpreted_batch_ndims", 0)
        fn = fn.base_dist
    if type(fn).__name__ == "Delta" and torch.is_tensor(fn.log_density) and bool(fn.log_density.abs().max() > 0):
        return -fn.log_density.expand(fn.batch_shape)  # an autoguide's site: its log_density is -log|dθ/du|
    if not isinstance(fn, torch.distributions.TransformedDistribution):
        return None
    event_dim, y, total_jac = len(fn.event_shape), value, 0.0
    for t in reversed(fn.transforms):
        x = t.inv(y)
        event_dim += t.domain.event_dim - t.codomain.event_dim
        try:
            jac = t.log_abs_det_jacobian(x, y)
        except NotImplementedError:  # |u| (HalfCauchy, HalfNormal): the density is folded, no Jacobian to forget
            return None
        total_jac = total_jac + _sum_rightmost(jac, event_dim - t.domain.event_dim)
        y = x
    if not torch.is_tensor(total_jac) or not bool(total_jac.detach().abs().max() > 0):
        return None
    return _sum_rightmost(total_jac, reinterpreted)


def log_scale(fn) -> Optional[Tensor]:
    """Σ log σ (over the event) of a location-scale distribution's scale, batch-shaped: the -log σ its
    density holds (Normal, LogNormal, Laplace, Cauchy, StudentT, their half versions); None otherwise or
    where σ = 1 (no term to forget)."""
    reinterpreted = 0
    while isinstance(fn, torch.distributions.Independent) or type(fn).__name__ == "MaskedDistribution":
        reinterpreted += getattr(fn, "reinterpreted_batch_ndims", 0)
        fn = fn.base_dist
    if type(fn).__name__ not in ("Normal", "LogNormal", "Laplace", "Cauchy", "StudentT", "HalfNormal", "HalfCauchy"):
        return None
    scale = getattr(fn, "scale", None)
    if not torch.is_tensor(scale) or not bool((scale.detach() != 1).any()):
        return None
    return _sum_rightmost(torch.log(scale).expand(fn.batch_shape), reinterpreted)


def normaliser(fn) -> Optional[Tensor]:
    """-log p(μ) of a location-scale site (Normal, Laplace, Cauchy, StudentT), batch-shaped: its whole
    normalising constant (½ log 2πσ², log 2b, log πσ, ...), which a hand derivation may drop at once."""
    reinterpreted = 0
    while isinstance(fn, torch.distributions.Independent) or type(fn).__name__ == "MaskedDistribution":
        reinterpreted += getattr(fn, "reinterpreted_batch_ndims", 0)
        fn = fn.base_dist
    if type(fn).__name__ not in ("Normal", "Laplace", "Cauchy", "StudentT"):
        return None
    return _sum_rightmost(-fn.log_prob(fn.loc.expand(fn.batch_shape)), reinterpreted)


def data_constant(fn, value: Tensor) -> Optional[Tuple[Tensor, str]]:
    """(batch-shaped values, what) of the part of an observed site's log p(x|·) that depends on the data
    only, where a hand derivation often drops it: -log x! (Poisson), log C(n, x) (Binomial), -log x (LogNormal),
    log n!/Π x_j! (Multinomial)."""
    reinterpreted, base = 0, fn
    while isinstance(base, torch.distributions.Independent) or type(base).__name__ == "MaskedDistribution":
        reinterpreted += getattr(base, "reinterpreted_batch_ndims", 0)
        base = base.base_dist
    name = type(base).__name__
    if name == "Poisson":
        const, what = -torch.lgamma(value + 1), "-Σ log x! (the Poisson's normalising constant)"
    elif name == "Binomial":
        n = base.total_count
        const = torch.lgamma(n + 1) - torch.lgamma(value + 1) - torch.lgamma(n - value + 1)
        what = "Σ log C(n, x) (the binomial coefficient)"
    elif name == "LogNormal":
        const, what = -torch.log(value), "-Σ log x (the LogNormal's Jacobian of the data)"
    elif name == "Multinomial":  # event dim 1: the coefficient per draw of counts
        n = value.sum(-1)
        return torch.lgamma(n + 1) - torch.lgamma(value + 1).sum(-1), "log n!/Π x_j! (the multinomial coefficient)"
    else:
        return None
    return _sum_rightmost(const, reinterpreted + len(base.event_shape)), what


@dataclasses.dataclass
class DrawSet:
    """One set of K particles: each site's unscaled log-density, (K, B) for a site in the data plate,
    (K,) for a global one. Model-enumerated sites are summed out together with every site their value
    reaches (log Σ_c p(c) p(x | c, ...)), as TraceEnum_ELBO does: that marginal is the observed group's term."""

    observed: Dict[str, Tensor]
    prior: Dict[str, Tensor]
    guide: Dict[str, Tensor]
    analytic_kl: Dict[str, Tensor]
    scales: Dict[str, float]
    dims: Dict[str, int]  # numbers per datapoint (a local site) or in all (a global one)
    global_sites: Tuple[str, ...]
    enumerated: Dict[str, Tuple[str, ...]]
    jacobians: Dict[str, Tensor]
    data_constants: List[Tuple[Tensor, str]]  # (K, B) each
    log_scales: Dict[str, Tensor]  # "q:site" / "p:site" -> Σ log σ, (K, B) or (K,)
    normalisers: Dict[str, Tensor]  # "q:site" / "p:site" -> -log p(μ), (K, B) or (K,)
    draws: Draws  # (K,) + the site's shape
    traces: list
    num_particles: int
    batch_size: int
    factors: Tuple[str, ...] = ()  # observed sites that are pyro.factor calls


def read_draw_set(pairs: list, k: int, nest: int, data_plate: str, vectorized: bool, size: int,
                  shapes: Dict[str, tuple]) -> DrawSet:
    """:class:`DrawSet` from :func:`trace_pairs`'s traces; ``shapes``: each site's shape in a plain run."""
    cat = lambda xs, glob: xs[0] if len(xs) == 1 else torch.cat(xs, dim=-1 if glob else -2)  # noqa: E731
    guide_trace, model_trace = pairs[0]
    guided = {n for n, s in guide_trace.nodes.items() if is_latent(s)}
    enumerated_sites, unguided = model_only_sites(guide_trace, model_trace)
    enum_sites = set(enumerated_sites)
    if unguided:
        raise ConfigError(f"the model's latent site(s) {list(unguided)} are neither sampled by the guide nor "
                          "enumerated")

    def stacked(name: str, fn_value) -> Optional[Tensor]:
        """``fn_value(guide_site, model_site)`` of every run, arranged and side by side; None if it is None."""
        parts = []
        for g, m in pairs:
            value = fn_value(g.nodes.get(name), m.nodes[name])
            if value is None:
                return None
            parts.append(arrange(value, nest, vectorized, data_plate_dim(m.nodes[name], nest, data_plate), k, size))
        return cat(parts, data_plate_dim(model_trace.nodes[name], nest, data_plate) is None)

    model_lp = lambda g, m: unscaled_log_prob(m)  # noqa: E731
    guide_lp = lambda g, m: unscaled_log_prob(g)  # noqa: E731
    observed, prior, log_q, kl, scales, dims, jac, consts, scale_terms, norms = {}, {}, {}, {}, {}, {}, {}, [], {}, {}
    globals_, entangled = [], {}
    for name, site in model_trace.nodes.items():
        if not is_variable(site) or is_deterministic(site):
            continue
        local = in_data_plate(site, nest, data_plate)
        value = stacked(name, model_lp)
        base_rank = 2 if local else 1
        scales[name] = _scale(site)
        numel = math.prod(shapes.get(name, site["value"].shape))
        dims[name] = max(1, numel // size) if local else numel
        if not local:
            globals_.append(name)
        if site["is_observed"] and local:  # a data-only constant: additive even inside an enumerated marginal
            found = data_constant(site["fn"], site["value"])
            if found is not None:
                const = stacked(name, lambda g, m: data_constant(m["fn"], m["value"])[0])
                if const.dim() == 2:
                    consts.append((const, f"{found[1]} of site {name!r}"))
        if name in enum_sites or value.dim() > base_rank:
            entangled[name] = value
            if name in guided:
                log_q[name] = stacked(name, guide_lp)
            continue
        for side in ("q", "p"):
            if side == "q" and name not in guided:
                continue
            found = stacked(name, lambda g, m: log_scale((g if side == "q" else m)["fn"]))
            if found is not None:
                scale_terms[f"{side}:{name}"] = found
            found = stacked(name, lambda g, m: normaliser((g if side == "q" else m)["fn"]))
            if found is not None:
                norms[f"{side}:{name}"] = found
        if site["is_observed"]:
            observed[name] = value
            continue
        prior[name] = value
        log_q[name] = stacked(name, guide_lp)
        try:
            kl[name] = stacked(name, lambda g, m: closed_kl(g["fn"], m["fn"]))
        except NotImplementedError:
            pass
        for side in ("q", "p"):
            found = stacked(name, lambda g, m: log_jacobian((g if side == "q" else m)["fn"], m["value"]))
            if found is not None:
                jac[f"{side}:{name}"] = found
    for name, site in guide_trace.nodes.items():  # an autoguide's auxiliary site (AutoNormal's "z_unconstrained"):
        if is_latent(site) and name not in model_trace.nodes:  # its log q is a term of Pyro's loss, no log p
            parts = [arrange(unscaled_log_prob(g.nodes[name]), nest, vectorized,
                             data_plate_dim(g.nodes[name], nest, data_plate), k, size) for g, _ in pairs]
            is_global = data_plate_dim(site, nest, data_plate) is None
            log_q[name] = cat(parts, is_global)
            prior[name] = torch.zeros_like(log_q[name])
            scales[name] = _scale(site)
            dims[name] = math.prod(shapes.get(name, site["value"].shape))
            if is_global:
                globals_.append(name)
            else:
                dims[name] = max(1, dims[name] // size)
    enumerated = {}
    if entangled:
        obs = [n for n in entangled if model_trace.nodes[n]["is_observed"]]
        latent = [n for n in entangled if n in guided]
        key = "+".join(obs or latent) or "+".join(entangled)
        all_local = all(n not in globals_ for n in entangled)
        parts = [v if all_local or n in globals_ else v.sum(-1) for n, v in entangled.items()]
        joint = sum(parts)
        rank = 2 if all_local else 1
        joint = torch.logsumexp(joint.reshape((-1,) + joint.shape[-rank:]), dim=0)
        (observed if obs else prior)[key] = joint
        enumerated[key] = tuple(n for n in entangled if n in enum_sites)
        scales[key] = scales[(obs or latent or list(entangled))[0]]
        dims[key] = sum(dims[n] for n in (obs or latent))
        if not all_local:
            globals_.append(key)
        for n in latent:  # a guided site inside the marginal: its log q stands alone
            if n != key:
                prior[n] = torch.zeros_like(log_q[n])
        if not obs and key not in log_q:
            log_q[key] = sum(log_q[n] for n in latent) if latent else torch.zeros_like(joint)
    draws = {}
    for name, site in guide_trace.nodes.items():
        if is_latent(site):
            values = [pair[0].nodes[name]["value"] for pair in pairs]
            value = values[0] if vectorized else torch.stack(values)
            shape = shapes.get(name)
            draws[name] = value.reshape((k,) + tuple(shape)) if shape is not None and \
                value.numel() == k * math.prod(shape) else value
    scale_terms = {key: v for key, v in scale_terms.items() if key.split(":", 1)[1] not in entangled}
    factors = tuple(n for n in observed if n in model_trace.nodes and is_factor(model_trace.nodes[n]))
    return DrawSet(observed, prior, log_q, kl, scales, dims, tuple(globals_), enumerated, jac, consts, scale_terms,
                   norms, draws, pairs, k, size, factors)


def draw_sets(model: Callable, guide: Callable, batch: Batch, k: int, nest: int, data_plate: str, vectorized: bool,
              seeds: Sequence[int], shapes: Dict[str, tuple]) -> List[DrawSet]:
    """One :class:`DrawSet` per seed (Pyro's RNG seeded first: the first seed's draws are those the
    checker's same-sample rows use)."""
    size = next(v for v in batch.values() if torch.is_tensor(v)).shape[0]
    out = []
    for seed in seeds:
        pyro.set_rng_seed(seed)
        pairs = trace_pairs(model, guide, batch, k, nest, vectorized)
        out.append(read_draw_set(pairs, k, nest, data_plate, vectorized, size, shapes))
    return out


def _select(sets: List[DrawSet], field: str, names, totals: bool) -> Dict[str, Tensor]:
    """One field of every draw set, side by side: (K, m·B) for local sites, or (K, m) batch totals."""
    out = {}
    for name in names:
        parts = []
        for d in sets:
            v = getattr(d, field)[name]
            parts.append(v if not totals else (v if name in d.global_sites else v.sum(-1)).unsqueeze(-1))
        out[name] = torch.cat(parts, dim=-1)
    return out


def view(sets: List[DrawSet], totals: bool) -> SiteTerms:
    """The draw sets as one :class:`SiteTerms` for the diagnosis: the local sites, a column per datapoint
    per draw set (``totals=False``), or every site, a column per draw set holding the batch's total."""
    first, size = sets[0], sets[0].batch_size
    keep = (lambda n: True) if totals else (lambda n: n not in first.global_sites)  # noqa: E731

    def columns(tensor: Tensor, is_global: bool) -> Tensor:  # (K, B) or (K,) -> (K, B) or (K, 1)
        return (tensor if is_global else tensor.sum(-1)).unsqueeze(-1) if totals else tensor

    def side_by_side(field: str, names) -> Dict[str, Tensor]:
        return {n: torch.cat([columns(getattr(d, field)[n], n in d.global_sites) for d in sets], dim=-1)
                for n in names}

    observed = [n for n in first.observed if keep(n)]
    latent = [n for n in first.prior if keep(n)]
    consts = [(torch.cat([columns(d.data_constants[i][0][0], False) if totals else d.data_constants[i][0][0]
                          for d in sets], dim=-1), what) for i, (_, what) in enumerate(first.data_constants)]
    dims = {n: first.dims[n] * (size if totals and n not in first.global_sites else 1) for n in observed + latent}

    def per_site(field: str) -> Dict[str, Tensor]:
        found = getattr(first, field)
        return {key: torch.cat([columns(getattr(d, field)[key], key.split(":", 1)[1] in d.global_sites) for d in sets],
                               -1) for key in found if keep(key.split(":", 1)[1])}

    return SiteTerms(side_by_side("observed", observed), side_by_side("prior", latent), side_by_side("guide", latent),
                     side_by_side("analytic_kl", [n for n in latent if n in first.analytic_kl]),
                     {n: first.scales[n] for n in observed + latent}, dims, first.draws, first.num_particles,
                     totals=totals, batch_size=size, draw_sets=len(sets),
                     global_sites=tuple(n for n in first.global_sites if keep(n)),
                     enumerated={n: v for n, v in first.enumerated.items() if keep(n)}, jacobians=per_site("jacobians"),
                     data_constants=consts, log_scales=per_site("log_scales"), normalisers=per_site("normalisers"),
                     factors=tuple(n for n in first.factors if keep(n)))
