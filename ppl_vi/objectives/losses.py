"""Loss names -> Pyro ELBO objects, or our importance-weighted loss.

=========  ====================================================================================
name       objective
=========  ====================================================================================
trace      ``Trace_ELBO``: Monte Carlo ELBO, K particles averaged (vectorised)
meanfield  ``TraceMeanField_ELBO``: the same with the KL in closed form where it exists
enum       ``TraceEnum_ELBO``: discrete sites marked for enumeration are summed out exactly
renyi      ``RenyiELBO(alpha=0)``: Pyro's importance-weighted bound (scales inside the log-mean-exp)
iwae       ``IWAELoss``: ours, per datapoint, differentiable, scales outside, chunked K
=========  ====================================================================================

Every loss here exposes ``differentiable_loss(model, guide, **batch)`` returning the summed
negative bound over the batch; RenyiELBO gets a thin wrapper for that (it only has
``loss_and_grads`` in Pyro).
"""

from __future__ import annotations

import math

import torch
from pyro.infer import RenyiELBO, Trace_ELBO, TraceEnum_ELBO, TraceMeanField_ELBO

from ppl_vi.errors import ConfigError
from ppl_vi.objectives.importance import IWAELoss

DESCRIPTIONS = {
    "trace": "Trace_ELBO: Monte Carlo ELBO, K particles averaged",
    "meanfield": "TraceMeanField_ELBO: closed-form KL where available",
    "enum": "TraceEnum_ELBO: exact sums over enumerated discrete sites",
    "renyi": "RenyiELBO(alpha=0): Pyro's IWAE (scales inside the log-mean-exp, no per-datapoint values)",
    "iwae": "ppl_vi IWAELoss: per-datapoint IWAE, differentiable, scales outside, chunked K",
}


class RenyiLoss(RenyiELBO):
    """``RenyiELBO`` with a ``differentiable_loss`` (Pyro gives it only ``loss_and_grads``).

    Same definition as Pyro's: per-datapoint log-weights from the *scaled* site log-densities,
    -Σ_i logsumexp_k((1-α) log w_ik)/(1-α) + log K. Pathwise gradients only: for reparameterised
    guides; a discrete, sampled guide site would need a score-function term this omits.
    """

    def differentiable_loss(self, model, guide, *args, **kwargs):
        vectorized = self.vectorize_particles and self.num_particles > 1
        particles = []
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            log_w = 0.0
            for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
                for site in trace.nodes.values():
                    if site["type"] == "sample" and "log_prob" in site:
                        log_w = log_w + sign * site["log_prob"]  # (K, B) vectorised, else (B,)
            particles.append(log_w)
        log_w = particles[0] if vectorized else torch.stack(particles)  # (K, B)
        scaled = (1.0 - self.alpha) * log_w
        bound = (torch.logsumexp(scaled, dim=0) - math.log(self.num_particles)) / (1.0 - self.alpha)
        return -bound.sum()


def make_loss(name: str, num_particles: int = 1, max_plate_nesting: int = 1, chunk_size=None):
    """The loss object for ``name`` with K = ``num_particles`` vectorised particles."""
    if num_particles < 1:
        raise ConfigError(f"the number of particles K must be >= 1, got {num_particles}")
    kw = dict(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=max_plate_nesting)
    if name == "trace":
        return Trace_ELBO(**kw)
    if name == "meanfield":
        return TraceMeanField_ELBO(**kw)
    if name == "enum":
        return TraceEnum_ELBO(**kw)
    if name == "renyi":
        return RenyiLoss(alpha=0, **kw)
    if name == "iwae":
        return IWAELoss(num_particles, max_plate_nesting, chunk_size)
    raise ConfigError(f"unknown loss {name!r}; expected one of: {', '.join(DESCRIPTIONS)}")
