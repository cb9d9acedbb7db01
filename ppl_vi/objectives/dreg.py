"""DReG: doubly reparameterised gradients for the IWAE bound (Tucker, Lawson, Gu & Maddison 2019).

Objective, as :class:`~ppl_vi.objectives.importance.IWAELoss`: L_K(x) = log (1/K) Σ_k w_k with
z_k = z(ε_k, φ) ~ q_φ(z|x) reparameterised and log w_k = log p_θ(x, z_k) - log q_φ(z_k|x); the loss
is -c Σ_i L_K(x_i). Only the gradient differs. With normalised weights w̃_k = w_k / Σ_j w_j:

    model parameters θ:    ∇_θ L_K = Σ_k w̃_k ∇_θ log p_θ(x, z_k)                          (as IWAE)
    guide parameters φ:    ∇_φ L_K = E[ Σ_k w̃_k² (∂log w_k/∂z_k) (∂z_k/∂φ) ]              (DReG)

IWAE's own φ-gradient, Σ_k w̃_k (∂log w_k/∂z_k ∂z_k/∂φ - ∂log q_φ(z_k)/∂φ), has a
signal-to-noise ratio that falls like 1/√K (Rainforth et al. 2018); DReG's rises with K. Both are
unbiased for the same ∇L_K (checked by ``ppl_vi.check``'s expected-gradient rows).

How it is computed on Pyro traces, in one backward pass: each guide value z_k enters the model
through a gradient gate that multiplies the gradient flowing back into z_k by w̃_k (filled in
once the weights are known), and log q is evaluated with its parameters held fixed
(:func:`~ppl_vi.objectives.traces.path_only_log_prob`). The surrogate Σ_k ⊥(w̃_k) log w_k then has
the θ-gradient above, and its path gradient w̃_k · w̃_k ∂log w_k/∂z_k ∂z_k/∂φ. A parameter shared by
model and guide gets the sum of both parts, which is still the DReG estimator.

Requirements, refused otherwise with one line: every guide site reparameterised (``rsample``);
guide sites mean-field given x (a site's distribution may not depend on another sampled site);
latent scale β = 1; local latents only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ppl_vi.errors import ConfigError
from ppl_vi.objectives.importance import refuse_score_sites
from ppl_vi.objectives.particle_loss import ParticleLoss
from ppl_vi.objectives.traces import (particle_terms, path_only_log_prob, refuse_dependent_sites,
                                     run_particles)
from ppl_vi.sites import is_latent


class _GradientGate(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by ``gate.weight`` (set later)."""

    @staticmethod
    def forward(ctx, value, gate):
        ctx.gate = gate
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.gate.weight, None


class _Gate:
    """Holds the per-particle factor of one site's gate, (K, B, 1...) to broadcast over event dims."""

    def __init__(self, event_dim: int):
        self.event_dim, self.weight = event_dim, None

    def set(self, normalised_weights: Tensor) -> None:
        self.weight = normalised_weights.reshape(normalised_weights.shape + (1,) * self.event_dim)


class DReGLoss(ParticleLoss):
    """The IWAE bound over ``num_particles`` reparameterised particles with DReG gradients."""

    target = "iwae"

    def __init__(self, num_particles: int = 2, max_plate_nesting: int = 1):
        super().__init__(num_particles, max_plate_nesting)

    def _estimate(self, model, guide, batch):
        k, nest = self.num_particles, self.max_plate_nesting
        gates = []

        def gate_values(guide_trace):
            refuse_dependent_sites(guide_trace, "dreg", "loss 'iwae' (the plain reparameterised gradient)")
            for site in guide_trace.nodes.values():
                if is_latent(site) and getattr(site["fn"], "has_rsample", False):
                    gate = _Gate(site["fn"].event_dim)
                    site["value"] = _GradientGate.apply(site["value"], gate)
                    gates.append(gate)

        guide_trace, model_trace = run_particles(model, guide, k, batch, nest, guide_hook=gate_values)
        terms = particle_terms(guide_trace, model_trace, k, nest, guide_log_prob=path_only_log_prob)
        refuse_score_sites(terms, "dreg", "loss 'vimco' for discrete sites, or 'iwae' values")
        if terms.global_ratio is not None:
            raise ConfigError(f"dreg handles local latents only; {list(terms.global_sites)} lie outside the data plate")
        if torch.is_tensor(terms.beta) or terms.beta != 1.0:
            raise ConfigError("dreg needs the latent scale β = 1 (no --beta or --kl-anneal); use 'iwae' for a "
                              "β-weighted bound")
        log_w = terms.log_weights  # (K, B)
        normalised = torch.softmax(log_w.detach(), dim=0)
        for gate in gates:
            gate.set(normalised)
        bound = torch.logsumexp(log_w.detach(), dim=0) - math.log(k)  # (B,)
        surrogate = (normalised * log_w).sum(0)  # θ: Σ w̃ ∇log p; path: gated to Σ w̃² ∂log w/∂z ∂z/∂φ
        per_datapoint = bound + (surrogate - surrogate.detach())
        return per_datapoint, per_datapoint.sum(), terms.c
