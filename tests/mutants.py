"""Plausible wrong estimators ("mutants"), each a context manager that patches the real code.

Used by ``tests/test_mutants.py`` (each must FAIL the check as the tests and the CLI run it) and by
``benchmarks/mutant_power.py`` (the table of how far each one fails). A mutant changes one thing:

* ``dreg-wtilde``: DReG's path gradient weighted by w̃_k instead of w̃_k² (the gate set to 1);
* ``vimco-no-baseline``: VIMCO's score term Σ_j L̂ ∇log q(h_j) with no leave-one-out baseline
  (unbiased: only its variance and its baselines' values can tell);
* ``score-dropped`` / ``score-half``: the score-function term of Trace_ELBO (Pyro's log r) and of
  VIMCO multiplied by 0 or ½;
* ``scale-5pct``: every loss's gradient 5 % too long (the loss times 1.05);
* ``per-particle-lme``: IWAELoss's log-mean-exp taken over the datapoints of each particle instead of
  over the particles of each datapoint.
"""

from __future__ import annotations

import contextlib
import math
import types

import pyro.infer.trace_elbo as trace_elbo
import torch
from pyro.infer.util import MultiFrameTensor

from ppl_vi import bounds, sites
from ppl_vi.objectives import dreg, importance, vimco
from ppl_vi.objectives.particle_loss import ParticleLoss


@contextlib.contextmanager
def patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def _gate_ones(self, normalised_weights):
    """DReG's gate passing the gradient unchanged: the path term weighted by w̃, not w̃²."""
    self.weight = torch.ones_like(normalised_weights).reshape(normalised_weights.shape + (1,) * self.event_dim)


RIGHT_VIMCO = bounds.vimco_surrogate


def _vimco_surrogate(score_weight: float, baseline: bool):
    """``bounds.vimco_surrogate`` with its score term scaled, or its baseline removed."""
    def surrogate(log_weights, log_q_score):
        if baseline:
            right = RIGHT_VIMCO(log_weights, log_q_score)
            pathwise = RIGHT_VIMCO(log_weights, log_q_score.detach())  # the score term removed
            return pathwise + score_weight * (right - pathwise)
        lw = log_weights.detach()
        bound = torch.logsumexp(lw, 0) - math.log(lw.shape[0])
        pathwise = torch.logsumexp(log_weights, 0) - math.log(lw.shape[0])
        score = (bound * log_q_score).sum(0)  # Σ_j L̂ log q(h_j): no baseline
        return bound + (pathwise - pathwise.detach()) + (score - score.detach())
    return surrogate


def _log_r(weight: float):
    """Pyro's log r (the reward of Trace_ELBO's score-function term) scaled by ``weight``."""
    original = trace_elbo._compute_log_r

    def compute(model_trace, guide_trace):
        out = MultiFrameTensor()
        for key, value in original(model_trace, guide_trace).items():
            out.add((key, weight * value))
        return out
    return compute


def _scaled_loss(cls, factor: float):
    """``cls.differentiable_loss`` times ``factor``."""
    original = cls.differentiable_loss

    def differentiable_loss(self, model, guide, *args, **batch):
        return factor * original(self, model, guide, *args, **batch)
    return differentiable_loss


def _per_particle_torch():
    """``torch`` for sites.py (the chunked log-mean-exp IWAELoss uses) with logsumexp over the particles replaced by one over the
    datapoints of each particle (averaged over particles, the same value for every datapoint)."""
    def logsumexp(x, dim=0, keepdim=False):
        if dim != 0 or x.dim() != 2:
            return torch.logsumexp(x, dim, keepdim)
        k, b = x.shape
        per_particle = torch.logsumexp(x, -1) - math.log(b) + math.log(k)  # (K,): LME over datapoints
        return per_particle.mean(0).expand(b)
    proxy = types.SimpleNamespace(**{n: getattr(torch, n) for n in dir(torch) if not n.startswith("__")})
    proxy.logsumexp = logsumexp
    return proxy


@contextlib.contextmanager
def mutant(name: str):
    """Run the body with mutant ``name`` in place (``"right"``: nothing changed)."""
    with contextlib.ExitStack() as stack:
        if name == "dreg-wtilde":
            stack.enter_context(patched(dreg._Gate, "set", _gate_ones))
        elif name == "vimco-no-baseline":
            stack.enter_context(patched(vimco.bounds, "vimco_surrogate", _vimco_surrogate(1.0, baseline=False)))
        elif name in ("score-dropped", "score-half"):
            weight = 0.0 if name == "score-dropped" else 0.5
            stack.enter_context(patched(trace_elbo, "_compute_log_r", _log_r(weight)))
            stack.enter_context(patched(vimco.bounds, "vimco_surrogate", _vimco_surrogate(weight, baseline=True)))
        elif name == "scale-5pct":
            for cls in (ParticleLoss, importance.IWAELoss):
                stack.enter_context(patched(cls, "differentiable_loss", _scaled_loss(cls, 1.05)))
        elif name == "per-particle-lme":
            stack.enter_context(patched(sites, "torch", _per_particle_torch()))  # IWAELoss's LogMeanExp
        elif name != "right":
            raise KeyError(name)
        yield


MUTANTS = ("dreg-wtilde", "vimco-no-baseline", "score-dropped", "score-half", "scale-5pct", "per-particle-lme")
