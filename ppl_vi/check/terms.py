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

:func:`site_terms` reads these pieces off the traces; :mod:`ppl_vi.check.diagnose` holds a hand
bound against them, and against the common ways of getting them wrong.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict, List, Optional

import pyro
from pyro.distributions.kl import kl_divergence
import torch
from torch import Tensor

from ppl_vi.errors import ConfigError
from ppl_vi.models.base import Batch, Draws, draws_from_trace, is_latent
from ppl_vi.objectives.traces import local_log_prob, run_particles


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

    @property
    def c(self) -> float:
        """The minibatch scale: that of the observed sites (one value; :func:`site_terms` checks)."""
        return next(iter(self.scales[s] for s in self.observed))

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
        """Finer pieces, per datapoint (B,), each a term a hand derivation may get wrong on its own:
        ``-log p(x|z) [x]``, ``-log p(z) [z]`` (the cross-entropy to the prior) and ``log q(z|x) [z]``
        (minus the entropy), scaled as Pyro scales them."""
        out = {f"-log p({n}|...) [{n}]": -self.scales[n] * lp.mean(0) for n, lp in self.observed.items()}
        for n in self.prior:
            out[f"-log p({n}) [{n}]"] = -self.scales[n] * self.prior[n].mean(0)
            out[f"log q({n}|x) [{n}] (minus the entropy)"] = self.scales[n] * self.guide[n].mean(0)
        return out


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
        if site["type"] != "sample" or not (site["is_observed"] or is_latent(site)):
            continue
        if not any(f.dim == -max_plate_nesting for f in site["cond_indep_stack"]):
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
                                      value=kl_divergence(guided[name]["fn"], site["fn"]))
        except NotImplementedError:
            pass
    if not observed:
        raise ConfigError("the model has no observed site (obs=...) in its data plate")
    if len({scales[n] for n in observed}) != 1:
        raise ConfigError(f"the observed sites have different scales {sorted({scales[n] for n in observed})}")
    draws = draws_from_trace(guide_trace, k, max_plate_nesting)
    return SiteTerms(observed, prior, log_q, kl, scales, dims, draws, k, guide_trace, model_trace)


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
