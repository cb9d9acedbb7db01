"""Per-particle, per-datapoint log-densities of a model/guide pair, read off Pyro traces.

The multi-sample objectives (:mod:`~ppl_vi.objectives.importance`, :mod:`~ppl_vi.objectives.vimco`,
:mod:`~ppl_vi.objectives.dreg`) all start from the same quantities. K particles are drawn in one
vectorised guide run, a particle plate left of the model's ``max_plate_nesting`` plates, and the model
is replayed against them. Then, for particle k and datapoint i (each (K, B) unless said)::

    log_lik_ki    = Σ_{observed sites}                 log p(x_i | z_ki)
    log_prior_ki  = Σ_{local latent sites}             log p(z_ki)
    log_guide_ki  = Σ_{local latent sites}             log q(z_ki | x_i)
    log_score_ki  = Σ_{guide sites without rsample}    log q(z_ki | x_i)   (what a score function differentiates)
    log w_ki      = log_lik_ki + log_prior_ki - log_guide_ki

**Model-only enumerated sites.** A latent site of the model that the guide does not sample and that
is marked ``infer={"enumerate": "parallel"}`` (the GMM's component c with the "marginal" guide) is
summed out exactly, as ``TraceEnum_ELBO`` would: the model runs under ``poutine.enum`` and

    log p(x_i, z_ki) = logsumexp_{c} [ log p(c) + log p(x_i | c, z_ki) + log p(z_ki) ]

so log w is a weight for the marginal, not for the joint with c. (Counting c as a latent with no
guide term would weigh each particle by p(c)·p(x|c) with c ~ p(c), a bound that converges to
log Σ_c π_c² p(x|c), not log p(x).) A model-only latent site that is *not* enumerated is refused:
its proposal would be its prior, which no objective here accounts for.

**Global latents.** A latent site outside the data plate (the plate at dim ``-max_plate_nesting``)
is global, θ: its log p(θ_k) - log q(θ_k), shape (K,), is kept apart in ``global_ratio``. The bound
is then joint over the batch, log (1/K) Σ_k exp(global_k + Σ_i local_ki), never per datapoint
(adding the global term to every datapoint would count it B times).

**Scales.** Pyro's site scales are split, as in :class:`~ppl_vi.objectives.importance.IWAELoss`,
into the minibatch scale c (shared by every observed site) and a latent weight β = (latent scale) / c
(:func:`ppl_vi.sites.split_scales`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Tuple

import pyro
import torch
from pyro import poutine
from torch import Tensor

from ppl_vi.errors import ConfigError
from ppl_vi.sites import (PARTICLE_PLATE, Scale, enumerate_dim, in_data_plate, is_latent, is_variable,
                          model_only_sites, split_scales, unscaled_log_prob)


@dataclasses.dataclass
class ParticleTerms:
    """The log-densities of K particles for B datapoints (see the module docstring)."""

    log_lik: Optional[Tensor]  # (K, B); None when model-only sites were summed out (entangled with the prior)
    log_joint: Tensor  # (K, B) log p(x, z) of the local part (marginal over model-enumerated sites)
    log_guide: Tensor  # (K, B)
    log_score: Tensor  # (K, B) or 0-dim 0. when every guide site is reparameterised
    global_ratio: Optional[Tensor]  # (K,) Σ_global [log p(θ) - log q(θ)], None without global latents
    c: Scale  # minibatch scale of the observed sites
    beta: Scale  # latent scale over c
    score_sites: Tuple[str, ...] = ()
    global_sites: Tuple[str, ...] = ()
    enumerated_sites: Tuple[str, ...] = ()

    @property
    def log_weights(self) -> Tensor:
        """log w_ki = log p(x_i, z_ki) - log q(z_ki | x_i), (K, B) (local sites only)."""
        return self.log_joint - self.log_guide


def run_particles(model: Callable, guide: Callable, k: int, batch: dict, max_plate_nesting: int,
                  guide_hook: Optional[Callable] = None):
    """Trace ``guide(**batch)`` inside a K-particle plate and replay ``model`` against it.

    Model sites the guide does not sample and that are marked for parallel enumeration are
    enumerated (on dims left of the particle plate). ``guide_hook(guide_trace)``, if given, may
    replace guide values before the model sees them (DReG re-routes their gradients). Returns
    ``(guide_trace, model_trace)``.
    """
    with pyro.plate(PARTICLE_PLATE, k, dim=-(max_plate_nesting + 1)):
        guide_trace = poutine.trace(guide).get_trace(**batch)
        if guide_hook is not None:
            guide_hook(guide_trace)
        enumerated = poutine.enum(model, first_available_dim=-(max_plate_nesting + 2))
        model_trace = poutine.trace(poutine.replay(enumerated, trace=guide_trace)).get_trace(**batch)
    return guide_trace, model_trace


def _local(lp: Tensor, k: int, max_plate_nesting: int, name: str, enum_dims: int = 0) -> Tensor:
    """Reshape a local site's log-density to (E..., k, B): plates right of the data plate summed,
    a missing particle dimension broadcast, ``enum_dims`` enumeration dims kept on the left."""
    rank = max_plate_nesting + 1  # particle dim + the model's plates
    if lp.dim() < rank:
        lp = lp.reshape((1,) * (rank - lp.dim()) + lp.shape)
    if lp.dim() > rank + enum_dims:
        raise ConfigError(f"site {name!r}: log_prob has shape {tuple(lp.shape)}; expected (K, batch) plate dims "
                          f"with max_plate_nesting={max_plate_nesting}")
    if max_plate_nesting > 1:  # sum the plates nested inside the data plate
        lp = lp.sum(tuple(range(-max_plate_nesting + 1, 0)))
    return lp.expand(lp.shape[:-2] + (k,) + lp.shape[-1:])


def _global(lp: Tensor, k: int, max_plate_nesting: int) -> Tensor:
    """A global site's log-density as (k,): plate dims right of the particle dim (size 1) summed."""
    rank = max_plate_nesting + 1
    if lp.dim() < rank:
        lp = lp.reshape((1,) * (rank - lp.dim()) + lp.shape)
    return lp.sum(tuple(range(-max_plate_nesting, 0))).expand(k)


def particle_terms(guide_trace, model_trace, k: int, max_plate_nesting: int, *, check_scales: bool = True,
                   guide_log_prob: Callable = unscaled_log_prob) -> ParticleTerms:
    """:class:`ParticleTerms` from traces made by :func:`run_particles`.

    ``guide_log_prob(site)`` gives a guide site's log q (DReG passes one with q's parameters held fixed).
    """
    nest = max_plate_nesting
    enumerated, unguided = model_only_sites(guide_trace, model_trace)
    if unguided:
        raise ConfigError(f"the guide does not sample the model's latent site(s) {list(unguided)} and they are not "
                          "enumerated; sample them in the guide, or mark them infer={'enumerate': 'parallel'}")
    enum_dims = max((-enumerate_dim(model_trace.nodes[n]) - nest - 1 for n in enumerated), default=0)
    obs_scales, latent_scales = [], []
    log_lik, log_prior, global_ratio, enum_mask = 0.0, 0.0, None, None
    global_sites = []
    for name, site in model_trace.nodes.items():
        if not is_variable(site):
            continue
        if name in enumerated:  # summed out unmasked; a mask then drops the datapoint's whole marginal
            lp = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
            if site["mask"] is not None:
                enum_mask = site["mask"] if enum_mask is None else enum_mask & site["mask"]
        else:
            lp = unscaled_log_prob(site)
        if not in_data_plate(site, nest):
            if site["is_observed"] or name in enumerated:
                raise ConfigError(f"site {name!r} lies outside the data plate; only latent sites may be global")
            global_ratio = (0.0 if global_ratio is None else global_ratio) + _global(lp, k, nest)
            global_sites.append(name)
            latent_scales.append(site["scale"])
            continue
        lp = _local(lp, k, nest, name, enum_dims)
        if site["is_observed"]:
            log_lik = log_lik + lp
            obs_scales.append(site["scale"])
        else:
            log_prior = log_prior + lp
            latent_scales.append(site["scale"])
    log_guide, log_score = 0.0, torch.zeros(())
    score_sites = []
    for name, site in guide_trace.nodes.items():
        if not is_latent(site):
            continue
        lq = guide_log_prob(site)
        if not in_data_plate(site, nest):
            global_ratio = (0.0 if global_ratio is None else global_ratio) - _global(lq, k, nest)
            continue
        lq = _local(lq, k, nest, name)
        log_guide = log_guide + lq
        if not getattr(site["fn"], "has_rsample", False):
            log_score = log_score + lq
            score_sites.append(name)
    c, beta = split_scales(obs_scales, latent_scales, check_scales)
    joint = log_lik + log_prior
    if enumerated:  # sum the model-only sites out: logsumexp over the enumeration dims
        joint = torch.logsumexp(joint.reshape((-1,) + joint.shape[-2:]), dim=0) if joint.dim() > 2 else joint
        if enum_mask is not None:
            joint = joint * _local(enum_mask.to(joint.dtype), k, nest, "mask", enum_dims).reshape(
                (-1,) + joint.shape[-2:]).amax(0)
        log_lik = None
    if not torch.is_tensor(joint):
        raise ConfigError("the model has no sample sites in its data plate")
    log_guide = log_guide if torch.is_tensor(log_guide) else torch.zeros_like(joint)
    log_score = log_score if score_sites else torch.zeros((), dtype=joint.dtype, device=joint.device)
    return ParticleTerms(None if log_lik is None else log_lik.expand_as(joint), joint, log_guide, log_score,
                         global_ratio, c, beta, tuple(score_sites), tuple(global_sites), enumerated)


def path_only_log_prob(site) -> Tensor:
    """log q(z|x) whose gradient flows only through the value z, not through q's parameters.

        log q_⊥(z) = log q(z) - log q(⊥z) + ⊥log q(⊥z)          (⊥ = stop-gradient)

    Same value as log q(z); gradient ∂log q/∂z · ∂z/∂φ (the "path" part), without the score
    ∂log q/∂φ|_z, whose expectation under q is zero. Used by DReG and STL."""
    full = unscaled_log_prob(site)
    fixed_value = dict(site, value=site["value"].detach())
    at_fixed = unscaled_log_prob(fixed_value)
    return full - at_fixed + at_fixed.detach()



def refuse_dependent_sites(guide_trace, loss_name: str, instead: str) -> None:
    """ConfigError if a guide latent's distribution depends on another guide latent's value.

    :func:`path_only_log_prob` keeps, per site, the gradient through that site's own value. With
    q(z1, z2) = q(z1) q(z2|z1), the path term of log q also holds ∂log q(z2|z1)/∂z1 · ∂z1/∂φ (through
    q(z2|·)'s parameters), which it drops, so STL's and DReG's gradients would be biased. Found by
    autograd: does log q(z2) at a detached z2 reach an earlier latent's value?"""
    if not torch.is_grad_enabled():
        return
    latents = [(name, site) for name, site in guide_trace.nodes.items() if is_latent(site)]
    earlier = []
    for name, site in latents:
        sources = [(n, v) for n, v in earlier if v.requires_grad]
        if sources:
            at_fixed = unscaled_log_prob(dict(site, value=site["value"].detach()))
            if at_fixed.requires_grad:
                grads = torch.autograd.grad(at_fixed.sum(), [v for _, v in sources], allow_unused=True,
                                            retain_graph=True)
                hit = [n for (n, _), g in zip(sources, grads) if g is not None]
                if hit:
                    raise ConfigError(f"{loss_name} takes the path gradient site by site, but the guide's site "
                                      f"{name!r} depends on the value of {hit}, so its gradient would be biased; "
                                      f"use {instead}")
        earlier.append((name, site["value"]))


def local_log_prob(site, k: int, max_plate_nesting: int, value: Optional[Tensor] = None) -> Tensor:
    """A local site's unscaled log-density (or ``value``, a tensor of the site's batch shape) as (K, B):
    plates inside the data plate summed, a missing particle dimension broadcast. The per-site pieces
    of :func:`particle_terms`, for the checker's term-by-term comparison."""
    return _local(unscaled_log_prob(site) if value is None else value, k, max_plate_nesting, site["name"])
