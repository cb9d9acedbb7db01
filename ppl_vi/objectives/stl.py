"""STL, "sticking the landing": the ELBO with the guide's score term dropped (Roeder, Wu & Duvenaud 2017).

Objective, as ``Trace_ELBO``: with K reparameterised particles z_k = z(ε_k, φ) ~ q_φ(z|x),

    ELBO_β(x) ≈ (1/K) Σ_k [ log p(x|z_k) + β (log p(z_k) - log q_φ(z_k|x)) ],   loss -c Σ_i ELBO_β(x_i).

The pathwise gradient of log q_φ(z(ε, φ)) has two parts, the path ∂log q/∂z ∂z/∂φ and the score
∂log q/∂φ|_z, whose expectation under q is zero. STL keeps the path only
(:func:`~ppl_vi.objectives.traces.path_only_log_prob`): the estimator stays unbiased for ∇ELBO_β,
and its variance vanishes as q approaches the posterior (the "landing"), where the score part
does not. Every guide site must be reparameterised; model-enumerated sites are refused.
Global latents enter as log p(θ_k) - log q(θ_k) once per particle.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ppl_vi.errors import ConfigError
from ppl_vi.objectives.importance import refuse_score_sites
from ppl_vi.objectives.traces import particle_terms, path_only_log_prob, run_particles


class STLLoss:
    """The K-particle ELBO with the sticking-the-landing gradient."""

    target = "elbo"

    def __init__(self, num_particles: int = 1, max_plate_nesting: int = 1):
        if num_particles < 1:
            raise ConfigError(f"the number of particles K must be >= 1, got {num_particles}")
        self.num_particles, self.max_plate_nesting = num_particles, max_plate_nesting

    def _elbo(self, model, guide, batch):
        k, nest = self.num_particles, self.max_plate_nesting
        guide_trace, model_trace = run_particles(model, guide, k, batch, nest)
        terms = particle_terms(guide_trace, model_trace, k, nest, check_scales=False,
                               guide_log_prob=path_only_log_prob)
        refuse_score_sites(terms, "stl", "loss 'trace' (score-function) or 'enum'")
        if terms.log_lik is None:
            raise ConfigError(f"stl does not sum out model-enumerated sites {list(terms.enumerated_sites)}; use 'enum'")
        log_ratio = terms.log_joint - terms.log_lik - terms.log_guide  # log p(z) - log q_⊥(z), (K, B)
        per_particle = terms.log_lik + terms.beta * log_ratio  # (K, B)
        total = per_particle.sum(-1)  # (K,)
        if terms.global_ratio is not None:
            total = total + terms.beta * terms.global_ratio
        return per_particle.mean(0), total.mean(0), terms.c

    def per_datapoint(self, model, guide, **batch) -> Tensor:
        """ELBO_β(x_i) per datapoint, (B,) (local latents only)."""
        return self._elbo(model, guide, batch)[0]

    def differentiable_loss(self, model, guide, *args, **batch) -> Tensor:
        """-c Σ_i ELBO_β(x_i), with the STL gradient."""
        if args:
            raise TypeError("STLLoss takes the batch as keyword arguments (model(**batch))")
        _, total, c = self._elbo(model, guide, batch)
        return -c * total

    def loss(self, model, guide, *args, **batch) -> float:
        with torch.no_grad():
            return self.differentiable_loss(model, guide, *args, **batch).item()

    def __repr__(self) -> str:
        return f"STLLoss(num_particles={self.num_particles})"
