"""Loss names -> Pyro ELBO objects or ours, and which model can train with which.

=========  ======  ====================================================================================
name       target  objective and gradient
=========  ======  ====================================================================================
trace      ELBO    ``Trace_ELBO``: K particles averaged; pathwise, score function for discrete sites
meanfield  ELBO    ``TraceMeanField_ELBO``: closed-form KL where it exists; reparameterised guides only
enum       ELBO    ``TraceEnum_ELBO``: discrete sites marked for enumeration summed out exactly
stl        ELBO    ``STLLoss``: sticking the landing, the guide's zero-mean score term dropped
renyi      IWAE    ``RenyiELBO(alpha=0)``: Pyro's IWAE (scales inside the log-mean-exp); pathwise only
iwae       IWAE    ``IWAELoss``: ours, per datapoint, scales outside, chunked K; pathwise only
vimco      IWAE    ``VIMCOLoss``: the IWAE bound with VIMCO's score-function estimator for discrete sites
dreg       IWAE    ``DReGLoss``: the IWAE bound with doubly reparameterised gradients
=========  ======  ====================================================================================

Every loss here exposes ``differentiable_loss(model, guide, **batch)`` returning the summed
negative bound over the batch (RenyiELBO gets a thin wrapper for that: Pyro gives it only
``loss_and_grads``), and a ``target`` ("elbo" or "iwae"): the objective whose gradient its
expected gradient must equal (``ppl_vi.check``'s expected-gradient rows prove it).

:func:`refusal` says, from a model's :class:`~ppl_vi.models.base.ModelTraits` and the run's K and β,
why a loss cannot train a model (None when it can); :func:`check_combination` turns that into the
one-line error the CLI prints, naming the losses that do work.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional

import torch
from pyro.infer import RenyiELBO, Trace_ELBO, TraceEnum_ELBO, TraceMeanField_ELBO

from ppl_vi.errors import ConfigError
from ppl_vi.models.base import ModelTraits
from ppl_vi.objectives.dreg import DReGLoss
from ppl_vi.objectives.importance import IWAELoss
from ppl_vi.objectives.stl import STLLoss
from ppl_vi.objectives.vimco import VIMCOLoss


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """What a loss estimates and what it needs from a model."""

    description: str
    target: str  # "elbo" or "iwae"
    discrete: str  # how it treats a discrete guide site: "score" (unbiased), "enumerate" or "refuse"
    beta_ok: bool = True  # works with --beta / --kl-anneal
    min_k: int = 1


LOSSES: Dict[str, LossSpec] = {
    "trace": LossSpec("Trace_ELBO: Monte Carlo ELBO, K particles averaged, score function for discrete sites",
                      "elbo", "score"),
    "meanfield": LossSpec("TraceMeanField_ELBO: closed-form KL where available (reparameterised guides)",
                          "elbo", "refuse"),
    "enum": LossSpec("TraceEnum_ELBO: exact sums over enumerated discrete sites", "elbo", "enumerate"),
    "stl": LossSpec("ppl_vi STLLoss: ELBO with the sticking-the-landing gradient (reparameterised guides)",
                    "elbo", "refuse"),
    "renyi": LossSpec("RenyiELBO(alpha=0): Pyro's IWAE (scales inside the log-mean-exp, no per-datapoint values)",
                      "iwae", "refuse", beta_ok=False),
    "iwae": LossSpec("ppl_vi IWAELoss: per-datapoint IWAE, differentiable, scales outside, chunked K",
                     "iwae", "refuse"),
    "vimco": LossSpec("ppl_vi VIMCOLoss: IWAE bound, VIMCO score-function gradient for discrete sites (K >= 2)",
                      "iwae", "score", beta_ok=False, min_k=2),
    "dreg": LossSpec("ppl_vi DReGLoss: IWAE bound with doubly reparameterised gradients (Tucker et al. 2019)",
                     "iwae", "refuse", beta_ok=False),
}
DESCRIPTIONS = {name: spec.description for name, spec in LOSSES.items()}


def refusal(name: str, traits: ModelTraits, k: int = 1, beta: float = 1.0, kl_anneal: int = 0) -> Optional[str]:
    """Why loss ``name`` cannot train a model with ``traits`` (None if it can)."""
    spec = LOSSES.get(name)
    if spec is None:
        return f"unknown loss {name!r}"
    if name == "enum" and not traits.enumerable:
        return "nothing to enumerate (enum sums out discrete sites; this model has none)"
    if not traits.guide_latents and name != "enum" and not (spec.target == "iwae" and traits.model_enumerated
                                                              and name in ("iwae", "vimco")):
        return "the guide samples no latent site; the model's discrete site must be summed out by enumeration"
    if traits.discrete_guide and spec.discrete == "refuse":
        return "the guide samples a discrete site, and this loss has no score-function term for it"
    if traits.auxiliary_observed and spec.target == "iwae":
        return "an observed site carries its own scale (the classifier term), which the importance weights cannot hold"
    if not spec.beta_ok and (beta != 1.0 or kl_anneal > 0):
        return "it needs β = 1 (no --beta / --kl-anneal)" + (
            ": RenyiELBO puts β inside the log-mean-exp, which bounds nothing" if name == "renyi" else "")
    if k < spec.min_k:
        return f"it needs K >= {spec.min_k} particles (--k {spec.min_k})"
    return None


def supported_losses(traits: ModelTraits, k: int = 1, beta: float = 1.0, kl_anneal: int = 0) -> List[str]:
    """The losses that can train a model with ``traits`` under K, β and annealing."""
    return [name for name in LOSSES if refusal(name, traits, k, beta, kl_anneal) is None]


def check_combination(model_name: str, traits: ModelTraits, loss: str, k: int = 1, beta: float = 1.0,
                      kl_anneal: int = 0) -> None:
    """ConfigError (one line, naming what works) unless ``loss`` can train the model."""
    reason = refusal(loss, traits, k, beta, kl_anneal)
    if reason is None:
        return
    works = supported_losses(traits, k, beta, kl_anneal)
    hint = f"losses that work for {model_name}: {', '.join(works)}" if works else \
        f"no loss works for {model_name} with these settings"
    raise ConfigError(f"--loss {loss} cannot train {model_name}: {reason}; {hint}")


def check_config(config, spec) -> None:
    """:func:`check_combination` for a run's config and its model's registry entry."""
    check_combination(config.model, spec.cls.traits(config), config.loss, config.k, config.beta, config.kl_anneal)


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


def _tag(loss, target: str):
    loss.target = target
    return loss


def make_loss(name: str, num_particles: int = 1, max_plate_nesting: int = 1, chunk_size=None):
    """The loss object for ``name`` with K = ``num_particles`` vectorised particles."""
    if num_particles < 1:
        raise ConfigError(f"the number of particles K must be >= 1, got {num_particles}")
    kw = dict(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=max_plate_nesting)
    if name == "trace":
        return _tag(Trace_ELBO(**kw), "elbo")
    if name == "meanfield":
        return _tag(TraceMeanField_ELBO(**kw), "elbo")
    if name == "enum":
        return _tag(TraceEnum_ELBO(**kw), "elbo")
    if name == "stl":
        return STLLoss(num_particles, max_plate_nesting)
    if name == "renyi":
        return RenyiLoss(alpha=0, **kw)
    if name == "iwae":
        return IWAELoss(num_particles, max_plate_nesting, chunk_size)
    if name == "vimco":
        return VIMCOLoss(num_particles, max_plate_nesting)
    if name == "dreg":
        return DReGLoss(num_particles, max_plate_nesting)
    raise ConfigError(f"unknown loss {name!r}; expected one of: {', '.join(LOSSES)}")
