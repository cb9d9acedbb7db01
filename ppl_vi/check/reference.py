"""The reference objective for expected-gradient checks: exact in what is discrete, many draws in what is not.

An estimator's gradient is right when its mean over seeds equals the gradient of the objective it
targets. This module computes that objective by brute force. Its independence of the estimators lies in
its final formula only: the traces are read with the same helpers the losses use (:mod:`ppl_vi.sites`:
plate membership, the guide's sites, fixed values, particle tuples, the (c, β) scale split), while the
objective built from them (the tuple-weighted sum, the log-mean-exp over particles, the β-weighted bound)
is written here again, apart from :mod:`ppl_vi.objectives`:

* **discrete guide sites** (no ``rsample``) are not sampled but *enumerated*: for K particles and
  discrete sites with supports C_1, ..., C_m, all T = Π_s C_s^K particle tuples at once, each
  weighted by its probability under the guide, P(t) = Π_k Π_s q(h_ks = t_ks | x). Every datapoint
  sees every tuple (its own local draws), so the sum over tuples is its exact expectation;
* **continuous guide sites** are drawn pathwise (``rsample``), R replicates at once;
* **model-only sites** marked for enumeration are summed out (log Σ_c p(x, c, z)), as TraceEnum_ELBO does.

The objective, per datapoint i, for a replicate r (every log-density scaled by its site's scale):

    target "elbo":  ELBO(x_i)  = Σ_t P(t) [ Σ_observed log p + Σ_latent (log p - log q) ]         (K = 1)
    target "iwae":  E[L_K,β(x_i)] = Σ_t P(t) [ β L̂_K + (1-β) (1/K) Σ_k log p(x_i|h_k) ] · c,
                    L̂_K = log (1/K) Σ_k w_k   (c the observed sites' common scale, β the latent one's over c)

averaged over the R replicates. :func:`reference_loss` returns minus its sum over the batch, a
scalar to differentiate; with no continuous site it is exact (one group suffices, standard error 0),
otherwise the caller averages groups of replicates and takes their standard error.

Global latents (outside the data plate) are supported for continuous sites: the ELBO adds
log p(θ) - log q(θ) once per particle, the IWAE target is the joint bound over the batch.
Discrete sites together with global latents are refused (the tuples would span the whole batch).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Tuple

import pyro
import torch
from pyro import poutine
from torch import Tensor

from ppl_vi.errors import ConfigError
from ppl_vi.sites import (PARTICLE_PLATE, FixValues, enumerate_dim, guide_sites, in_data_plate, is_deterministic,
                          is_latent, is_variable, split_scales, tuple_digits, unscaled_log_prob)

TUPLES_PLATE, REPLICATES_PLATE = "_reference_tuples", "_reference_replicates"


def discrete_sites(guide: Callable, batch: dict, max_plate_nesting: int) -> Tuple[Tuple[str, int], ...]:
    """(name, support size) of the guide's sites without ``rsample``."""
    sites = guide_sites(guide, batch)
    out = []
    for name, site in sites.items():
        if getattr(site["fn"], "has_rsample", False):
            continue
        if not getattr(site["fn"], "has_enumerate_support", False):
            raise ConfigError(f"guide site {name!r} is neither reparameterised nor enumerable; the reference "
                              "objective needs one or the other")
        out.append((name, int(site["fn"].enumerate_support(expand=False).shape[0])))
    return tuple(out)


def has_continuous_sites(guide: Callable, batch: dict, max_plate_nesting: int) -> bool:
    return any(getattr(s["fn"], "has_rsample", False) for s in guide_sites(guide, batch).values())


def _tuple_values(guide, batch, nest: int, k: int, discrete) -> Tuple[int, Dict[str, Tensor]]:
    """All T particle tuples: {site: values broadcastable to (T, R, K, batch...)} and T."""
    t = math.prod(size for _, size in discrete) ** k if discrete else 1
    sites = guide_sites(guide, batch)
    digits = tuple_digits([size for _, size in discrete], k, torch.arange(t))  # per site (T, K)
    values = {}
    for (name, size), chosen in zip(discrete, digits):
        support = sites[name]["fn"].enumerate_support(expand=False)  # (C, 1..., event)
        event = support.shape[1 + len(sites[name]["fn"].batch_shape):]
        flat = support.reshape((size,) + event)
        values[name] = flat[chosen].reshape((t, 1, k) + (1,) * nest + event)  # (T, K, event...) placed
    return t, values


def _fold(lp: Tensor, nest: int, local: bool) -> Tensor:
    """(E..., T, R, K, B) for a local site (plates inside the data plate summed); (E..., T, R, K, 1) global."""
    rank = nest + 3  # T, R, K and the model's plates
    if lp.dim() < rank:
        lp = lp.reshape((1,) * (rank - lp.dim()) + lp.shape)
    inner = tuple(range(-nest + 1, 0)) if local else tuple(range(-nest, 0))
    lp = lp.sum(inner) if inner else lp
    return lp if local else lp.unsqueeze(-1)


def reference_objective(model: Callable, guide: Callable, batch: dict, *, target: str, k: int = 1,
                        replicates: int = 1, max_plate_nesting: int = 1, max_evaluations: int = 4_000_000,
                        data_plate=None) -> Tensor:
    """The target objective per datapoint (B,), or the joint one (0-dim) with global latents.

    Exact over discrete guide sites, ``replicates`` pathwise draws of the continuous ones (averaged).
    ``data_plate`` names the data plate (default: the plate at dim -max_plate_nesting).
    """
    if target not in ("elbo", "iwae"):
        raise ConfigError(f"unknown target {target!r}; expected 'elbo' or 'iwae'")
    nest = max_plate_nesting
    k = 1 if target == "elbo" else k  # the ELBO's expectation does not depend on K
    discrete = discrete_sites(guide, batch, nest)
    t, values = _tuple_values(guide, batch, nest, k, discrete)
    b = next(v for v in batch.values() if torch.is_tensor(v)).shape[0]
    if t * replicates * k * b > max_evaluations:
        raise ConfigError(f"the reference needs {t} tuples x {replicates} replicates x K={k} x B={b} evaluations, "
                          f"over the limit {max_evaluations}; use a smaller K, batch or replicate count")
    with pyro.plate(TUPLES_PLATE, t, dim=-(nest + 3)), pyro.plate(REPLICATES_PLATE, replicates, dim=-(nest + 2)), \
            pyro.plate(PARTICLE_PLATE, k, dim=-(nest + 1)):
        guide_trace = poutine.trace(FixValues(values)(guide)).get_trace(**batch)
        enumerated = poutine.enum(model, first_available_dim=-(nest + 4))
        model_trace = poutine.trace(poutine.replay(enumerated, trace=guide_trace)).get_trace(**batch)

    guided = {n for n, s in guide_trace.nodes.items() if is_latent(s)}
    # scaled log-densities, local (E..., T, R, K, B) and global (T, R, K, 1) kept apart
    local_w, global_w, log_q_discrete, obs, latent, enum_names = 0.0, 0.0, 0.0, [], [], []
    for name, site in guide_trace.nodes.items():
        if not is_latent(site):
            continue
        local = in_data_plate(site, nest, data_plate)
        lq = _fold(unscaled_log_prob(site), nest, local)
        if local:
            local_w = local_w - float(site["scale"]) * lq
        else:
            global_w = global_w - float(site["scale"]) * lq
        if name in values:
            log_q_discrete = log_q_discrete + lq  # unscaled: the tuple's probability
    global_sites = torch.is_tensor(global_w)
    if global_sites and discrete:
        raise ConfigError("the reference cannot enumerate discrete sites together with global latents")
    for name, site in model_trace.nodes.items():
        if not is_variable(site) or is_deterministic(site):
            continue
        if is_latent(site) and name not in guided:
            if enumerate_dim(site) is None:
                raise ConfigError(f"the model's latent site {name!r} is neither in the guide nor enumerated")
            enum_names.append(name)
        local = in_data_plate(site, nest, data_plate)
        lp = _fold(unscaled_log_prob(site), nest, local)
        scale = float(site["scale"])
        if site["is_observed"]:
            if not local and not global_sites:
                raise ConfigError(f"observed site {name!r} lies outside the data plate")
            if local:  # a global factor (pyro.factor outside the data plate) joins the global terms
                obs.append((scale, lp))
        else:
            latent.append((scale, lp))
        if local:
            local_w = local_w + scale * lp
        else:
            global_w = global_w + scale * lp
    if enum_names:  # sum the model-only sites out over their enumeration dims (left of T)
        if any(s != 1.0 for s, _ in obs + latent) or (global_sites and target != "elbo"):
            raise ConfigError("the reference sums out model-enumerated sites only with unscaled sites (and local "
                              "ones for the IWAE target)")
        local_w = torch.logsumexp(local_w.reshape((-1,) + local_w.shape[-4:]), dim=0) if local_w.dim() > 4 \
            else local_w
    prob = log_q_discrete.sum(-2, keepdim=True).exp() if torch.is_tensor(log_q_discrete) else 1.0  # (T, R, 1, B)

    if target == "elbo":  # local_w (T, R, 1, B) is the scaled ELBO integrand; global terms once per particle
        if global_sites:
            return (local_w.sum(-1) + global_w.squeeze(-1)).mean((0, 1, 2))
        return (prob * local_w).sum(0).mean((0, 1))  # Σ_t P(t) f_t, mean over R (and K = 1)
    c, beta = split_scales([s for s, _ in obs], [s for s, _ in latent])
    log_w = local_w / c  # Σ log p(x|h) + β (log p(h) - log q(h)): unscaled weights need β split off
    if beta != 1.0:
        if enum_names or global_sites:
            raise ConfigError("the IWAE target with β != 1 needs local latents and no model-enumerated sites")
        log_lik = sum(lp for _, lp in obs)
        log_w = log_lik + (log_w - log_lik) / beta
    if global_sites:
        if c != 1.0 or beta != 1.0:
            raise ConfigError("the joint IWAE target with global latents needs unscaled sites")
        joint = log_w.sum(-1) + global_w.squeeze(-1)  # (T, R, K)
        return (torch.logsumexp(joint, dim=-1) - math.log(k)).mean((0, 1))
    bound = torch.logsumexp(log_w, dim=-2, keepdim=True) - math.log(k)  # (T, R, 1, B)
    if beta != 1.0:
        bound = beta * bound + (1 - beta) * log_lik.mean(-2, keepdim=True)
    return c * (prob * bound).sum(0).mean((0, 1))  # (B,)


def reference_loss(model: Callable, guide: Callable, batch: dict, **kwargs) -> Tensor:
    """Minus the reference objective summed over the batch: a scalar whose gradient is the reference."""
    return -reference_objective(model, guide, batch, **kwargs).sum()
