"""Our importance-weighted objective on Pyro traces.

For each datapoint x_i, K particles z_k ~ q(z|x_i) drawn in one vectorised guide run,

    log w_k = Σ_{observed sites} log p(x|z_k) + Σ_{latent sites} [log p(z_k) - log q(z_k|x)]
    L_K(x)  = log (1/K) Σ_k w_k = logsumexp_k log w_k - log K          (Burda et al. 2016)

What Pyro's ``RenyiELBO(alpha=0)`` does not give, this does:

* per-datapoint bounds (:meth:`IWAELoss.per_datapoint`), not only the batch sum;
* a differentiable torch loss (:meth:`IWAELoss.differentiable_loss`);
* scaling *outside* the log-mean-exp. A site's Pyro scale is split into the minibatch scale c
  (that of the observed sites, e.g. N/B from a subsampled plate) and a latent weight β
  (``poutine.scale`` on the latent sites). The loss is

      -c Σ_i [ β L_K(x_i) + (1 - β) (1/K) Σ_k log p(x_i|z_k) ]

  which is c times the IWAE bound at β = 1 and the β-ELBO at K = 1; Pyro instead puts c and β
  inside the logsumexp, which bounds nothing;
* large K in chunks with a running logsumexp (:meth:`IWAELoss.per_datapoint` with
  ``chunk_size``), so IWAE-5000 over a test set fits in memory.

Assumption (checked): every sample site lies in the data plate, the rightmost plate dimension.
"""

from __future__ import annotations

import math

import pyro
import torch
from pyro import poutine
from torch import Tensor

from ppl_vi.errors import ConfigError
from ppl_vi.models.base import PARTICLE_PLATE, is_latent


class IWAELoss:
    """Importance-weighted loss over ``num_particles`` vectorised particles.

    ``chunk_size`` splits K into chunks (running logsumexp); ``None`` evaluates all K at once.
    """

    def __init__(self, num_particles: int = 1, max_plate_nesting: int = 1, chunk_size: int | None = None):
        if num_particles < 1:
            raise ConfigError(f"the number of particles K must be >= 1, got {num_particles}")
        if chunk_size is not None and chunk_size < 1:
            raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
        self.num_particles, self.max_plate_nesting, self.chunk_size = num_particles, max_plate_nesting, chunk_size

    # ---- one chunk of particles --------------------------------------------------------------
    def log_terms(self, model, guide, k: int, **batch):
        """Unscaled log p(x|z_k) and log p(z_k) - log q(z_k|x), each (k, B), and (c, β)."""
        with pyro.plate(PARTICLE_PLATE, k, dim=-(self.max_plate_nesting + 1)):
            guide_trace = poutine.trace(guide).get_trace(**batch)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(**batch)
        log_lik, log_ratio = 0.0, 0.0
        obs_scales, latent_scales = set(), set()
        for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
            for name, site in trace.nodes.items():
                if site["type"] != "sample" or not (site["is_observed"] or is_latent(site)):
                    continue
                lp = self._to_particles_by_batch(site, k)
                if site["is_observed"]:
                    log_lik = log_lik + lp
                    obs_scales.add(float(site["scale"]))
                else:
                    log_ratio = log_ratio + sign * lp
                    latent_scales.add(float(site["scale"]))
        if len(obs_scales) != 1:
            raise ConfigError(f"IWAELoss needs the observed sites to share one scale, found {sorted(obs_scales)}")
        c = obs_scales.pop()
        beta = {s / c for s in latent_scales} if c else {1.0}
        beta = {round(b, 12) for b in beta} or {1.0}
        if len(beta) != 1:
            raise ConfigError(f"IWAELoss needs one scale β on all latent sites, found {sorted(beta)}")
        return log_lik, log_ratio, c, beta.pop()

    def _to_particles_by_batch(self, site, k: int) -> Tensor:
        """A site's unscaled log-density, reshaped to (k, B) (other plate dims summed)."""
        lp = site["fn"].log_prob(site["value"])
        if site["mask"] is not None:
            lp = lp * site["mask"]
        lp = lp.reshape((1,) * (self.max_plate_nesting + 1 - lp.dim()) + lp.shape) if lp.dim() <= self.max_plate_nesting else lp
        if lp.dim() != self.max_plate_nesting + 1:
            raise ConfigError(f"site {site['name']!r}: log_prob has shape {tuple(lp.shape)}; IWAELoss expects "
                              f"(K, batch) plate dims with max_plate_nesting={self.max_plate_nesting}")
        lp = lp.expand((k,) + lp.shape[1:])
        return lp.reshape(k, -1, *lp.shape[-1:]).sum(1) if self.max_plate_nesting > 1 else lp

    # ---- the bound -------------------------------------------------------------------------
    def per_datapoint(self, model, guide, **batch) -> Tensor:
        """β-weighted L_K(x_i) per datapoint, shape (B,), unscaled by the minibatch scale."""
        bound, _ = self._bound_and_scale(model, guide, **batch)
        return bound

    def _bound_and_scale(self, model, guide, **batch):
        chunk = self.chunk_size or self.num_particles
        running, mean_log_lik, done, c, beta = None, 0.0, 0, 1.0, 1.0
        while done < self.num_particles:
            k = min(chunk, self.num_particles - done)
            log_lik, log_ratio, c, beta = self.log_terms(model, guide, k, **batch)
            lse = torch.logsumexp(log_lik + log_ratio, dim=0)  # (B,)
            running = lse if running is None else torch.logaddexp(running, lse)
            mean_log_lik = mean_log_lik + log_lik.sum(0)
            done += k
        iwae = running - math.log(self.num_particles)
        if beta == 1.0:
            return iwae, c
        return beta * iwae + (1 - beta) * mean_log_lik / self.num_particles, c

    def differentiable_loss(self, model, guide, *args, **batch) -> Tensor:
        """-c Σ_i L_K,β(x_i): a torch scalar to call ``backward`` on."""
        if args:
            raise TypeError("IWAELoss takes the batch as keyword arguments (model(**batch))")
        bound, c = self._bound_and_scale(model, guide, **batch)
        return -c * bound.sum()

    def loss(self, model, guide, *args, **batch) -> float:
        with torch.no_grad():
            return self.differentiable_loss(model, guide, *args, **batch).item()

    def __repr__(self) -> str:
        return f"IWAELoss(num_particles={self.num_particles}, chunk_size={self.chunk_size})"
