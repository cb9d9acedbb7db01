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

from ppl_vi.errors import ConfigError
from ppl_vi.objectives.importance import refuse_score_sites
from ppl_vi.objectives.particle_loss import ParticleLoss
from ppl_vi.objectives.traces import (particle_terms, path_only_log_prob, refuse_dependent_sites,
                                     run_particles)


class STLLoss(ParticleLoss):
    """The K-particle ELBO_β with the sticking-the-landing gradient."""

    target = "elbo"

    def _estimate(self, model, guide, batch):
        k, nest = self.num_particles, self.max_plate_nesting
        guide_trace, model_trace = run_particles(model, guide, k, batch, nest)
        refuse_dependent_sites(guide_trace, "stl", "loss 'trace' (the plain reparameterised gradient)")
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
