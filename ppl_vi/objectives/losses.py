"""Loss names -> Pyro ELBO objects or ours: the factory of :data:`ppl_vi.loss_registry.LOSSES`.

Every loss here exposes ``differentiable_loss(model, guide, **batch)`` returning the summed
negative bound over the batch (RenyiELBO gets a thin wrapper for that: Pyro gives it only
``loss_and_grads``). :func:`target_of` gives the objective ("elbo" or "iwae") whose gradient its
expected gradient must equal: the registry's target for a loss made here, else the ``target`` its
class declares. Which model each loss can train (``refusal``, ``check_config`` ...) is the registry's.
"""

from __future__ import annotations

import math
import weakref
from typing import Callable, Dict, Optional

import torch
from pyro.infer import RenyiELBO, Trace_ELBO, TraceEnum_ELBO, TraceMeanField_ELBO

from ppl_vi.errors import ConfigError
from ppl_vi.loss_registry import (LOSSES, check_combination, check_config, refusal,  # noqa: F401 (re-exported:
                                  supported_losses)  # the registry's rules, for callers that build losses)
from ppl_vi.objectives.dreg import DReGLoss
from ppl_vi.objectives.importance import IWAELoss
from ppl_vi.objectives.stl import STLLoss
from ppl_vi.objectives.vimco import VIMCOLoss


class RenyiLoss(RenyiELBO):
    """``RenyiELBO`` with a ``differentiable_loss`` (Pyro gives it only ``loss_and_grads``).

    Same definition as Pyro's: per-datapoint log-weights from the *scaled* site log-densities,
    -Σ_i logsumexp_k((1-α) log w_ik)/(1-α) + log K. Pathwise gradients only: a discrete, sampled
    guide site would need a score-function term this omits, so such a guide is refused.
    """

    target = "iwae"

    def differentiable_loss(self, model, guide, *args, **kwargs):
        vectorized = self.vectorize_particles and self.num_particles > 1
        particles = []
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            for site in guide_trace.nodes.values():
                if site["type"] == "sample" and not site["is_observed"] and not getattr(site["fn"], "has_rsample", True):
                    if torch.is_grad_enabled():
                        raise ConfigError(f"RenyiELBO has no score-function term for the discrete guide site "
                                          f"{site['name']!r}; use loss 'vimco'")
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


#: how each registered loss is built from (K, max_plate_nesting, chunk_size); K particles vectorised
BUILDERS: Dict[str, Callable] = {
    "trace": lambda k, nest, chunk: Trace_ELBO(num_particles=k, vectorize_particles=True, max_plate_nesting=nest),
    "meanfield": lambda k, nest, chunk: TraceMeanField_ELBO(num_particles=k, vectorize_particles=True,
                                                            max_plate_nesting=nest),
    "enum": lambda k, nest, chunk: TraceEnum_ELBO(num_particles=k, vectorize_particles=True, max_plate_nesting=nest),
    "stl": lambda k, nest, chunk: STLLoss(k, nest),
    "renyi": lambda k, nest, chunk: RenyiLoss(alpha=0, num_particles=k, vectorize_particles=True,
                                              max_plate_nesting=nest),
    "iwae": lambda k, nest, chunk: IWAELoss(k, nest, chunk),
    "vimco": lambda k, nest, chunk: VIMCOLoss(k, nest),
    "dreg": lambda k, nest, chunk: DReGLoss(k, nest),
}

#: the registry's target of every loss object :func:`make_loss` made (Pyro's ELBOs declare none)
_MADE: "weakref.WeakKeyDictionary[object, str]" = weakref.WeakKeyDictionary()


def make_loss(name: str, num_particles: int = 1, max_plate_nesting: int = 1, chunk_size=None):
    """The loss object for ``name`` with K = ``num_particles`` vectorised particles."""
    if num_particles < 1:
        raise ConfigError(f"the number of particles K must be >= 1, got {num_particles}")
    if name not in BUILDERS:
        raise ConfigError(f"unknown loss {name!r}; expected one of: {', '.join(LOSSES)}")
    loss = BUILDERS[name](num_particles, max_plate_nesting, chunk_size)
    _MADE[loss] = LOSSES[name].target
    return loss


def target_of(loss) -> Optional[str]:
    """"elbo" or "iwae": the objective ``loss`` estimates (the registry's, for a loss :func:`make_loss`
    made; else the ``target`` its class or wrapper declares); None where unknown (a Pyro ELBO made elsewhere)."""
    try:
        found = _MADE.get(loss)
    except TypeError:  # not weak-referenceable (or unhashable): not made here
        found = None
    return found if found is not None else getattr(loss, "target", None)
