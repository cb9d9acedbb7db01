"""Our importance-weighted objective on Pyro traces (pathwise gradients).

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
* large K in chunks with a running logsumexp (``chunk_size``), so IWAE-5000 fits in memory;
* model-only sites marked for enumeration summed out exactly (:mod:`ppl_vi.objectives.traces`):
  the GMM with its "marginal" guide gives L_K = log p(x) for every K;
* global latents θ (outside the data plate) in the joint form

      L_K = log (1/K) Σ_k exp( log p(θ_k) - log q(θ_k) + Σ_i log w_ik ),

  one bound for the whole batch: :meth:`IWAELoss.per_datapoint` refuses it (a per-datapoint split
  does not exist), :meth:`IWAELoss.total_bound` and the loss use it. It needs the whole data set in
  the batch (c = 1) and β = 1.

**Gradients are pathwise only.** With a guide site that has no ``rsample`` (a discrete c) the
gradient of log w through the sampled value does not exist and a score-function term would be
needed: :meth:`IWAELoss.differentiable_loss` refuses such a guide (use
:class:`~ppl_vi.objectives.vimco.VIMCOLoss`). Values without gradients (evaluation) are fine.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ppl_vi.errors import ConfigError
from ppl_vi.objectives.traces import ParticleTerms, particle_terms, run_particles
from ppl_vi.sites import LogMeanExp, chunk_sizes


def refuse_score_sites(terms: ParticleTerms, loss_name: str, instead: str) -> None:
    """ConfigError if a gradient is being taken through a guide with score-function sites."""
    if terms.score_sites and torch.is_grad_enabled() and terms.log_score.requires_grad:
        raise ConfigError(f"{loss_name} has no score-function term for the guide's non-reparameterised site(s) "
                          f"{list(terms.score_sites)}, so its gradient would be biased; use {instead}")


class IWAELoss:
    """Importance-weighted loss over ``num_particles`` vectorised particles.

    ``chunk_size`` splits K into chunks (running logsumexp); ``None`` evaluates all K at once.
    """

    #: what the estimator's expectation targets (the checker's reference objective)
    target = "iwae"

    def __init__(self, num_particles: int = 1, max_plate_nesting: int = 1, chunk_size: int | None = None):
        if num_particles < 1:
            raise ConfigError(f"the number of particles K must be >= 1, got {num_particles}")
        if chunk_size is not None and chunk_size < 1:
            raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
        self.num_particles, self.max_plate_nesting, self.chunk_size = num_particles, max_plate_nesting, chunk_size

    # ---- one chunk of particles --------------------------------------------------------------
    def terms(self, model, guide, k: int, **batch) -> ParticleTerms:
        """The log-densities of ``k`` fresh particles (:class:`~ppl_vi.objectives.traces.ParticleTerms`)."""
        guide_trace, model_trace = run_particles(model, guide, k, batch, self.max_plate_nesting)
        return particle_terms(guide_trace, model_trace, k, self.max_plate_nesting)

    # ---- the bound -------------------------------------------------------------------------
    def _bound(self, model, guide, batch, check_grad: bool):
        """(bound, c, joint): β-weighted L_K per datapoint (B,), or the joint bound (scalar) with global latents."""
        log_mean_w, mean_log_lik, terms = LogMeanExp(), 0.0, None
        for k in chunk_sizes(self.num_particles, self.chunk_size):
            terms = self.terms(model, guide, k, **batch)
            if check_grad:
                refuse_score_sites(terms, "IWAELoss", "loss 'vimco' (VIMCO's score-function estimator for the "
                                   "IWAE bound), or 'enum'/'trace' for the ELBO")
            log_w = terms.log_weights  # (k, B)
            if terms.global_ratio is not None:  # joint over the batch: (k,)
                log_w = terms.global_ratio + log_w.sum(-1)
            log_mean_w.add(log_w)
            if terms.beta != 1.0:
                if terms.log_lik is None or terms.global_ratio is not None:
                    raise ConfigError("a latent scale β != 1 needs local latents and no model-enumerated sites")
                mean_log_lik = mean_log_lik + terms.log_lik.sum(0)
        iwae = log_mean_w.value()
        joint = terms.global_ratio is not None
        if joint and terms.c != 1.0:
            raise ConfigError(f"global latents {list(terms.global_sites)} need the whole data set in one batch "
                              f"(minibatch scale 1), found scale {float(terms.c)}")
        if terms.beta != 1.0:
            iwae = terms.beta * iwae + (1 - terms.beta) * mean_log_lik / self.num_particles
        return iwae, terms.c, joint

    def per_datapoint(self, model, guide, **batch) -> Tensor:
        """β-weighted L_K(x_i) per datapoint, shape (B,), unscaled by the minibatch scale."""
        bound, _, joint = self._bound(model, guide, batch, check_grad=False)
        if joint:
            raise ConfigError("with a global latent the IWAE bound is joint over the batch and has no per-datapoint "
                              "values; use IWAELoss.total_bound")
        return bound

    def total_bound(self, model, guide, **batch) -> Tensor:
        """The bound for the whole batch: Σ_i L_K(x_i) with local latents, the joint L_K with global ones."""
        bound, _, _ = self._bound(model, guide, batch, check_grad=False)
        return bound.sum()

    def differentiable_loss(self, model, guide, *args, **batch) -> Tensor:
        """-c Σ_i L_K,β(x_i) (or -L_K joint): a torch scalar to call ``backward`` on."""
        if args:
            raise TypeError("IWAELoss takes the batch as keyword arguments (model(**batch))")
        bound, c, _ = self._bound(model, guide, batch, check_grad=True)
        return -c * bound.sum()

    def loss(self, model, guide, *args, **batch) -> float:
        with torch.no_grad():
            return self.differentiable_loss(model, guide, *args, **batch).item()

    def __repr__(self) -> str:
        return f"IWAELoss(num_particles={self.num_particles}, chunk_size={self.chunk_size})"
