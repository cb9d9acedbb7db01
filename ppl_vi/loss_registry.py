"""The losses by name: what each estimates, what it refuses, and why; one table for config, CLI and factory.

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

The *target* ("elbo" or "iwae") is the objective whose gradient a loss's expected gradient must equal
(``ppl_vi.check``'s expected-gradient rows prove it). The loss objects themselves are built by
:func:`ppl_vi.objectives.losses.make_loss`, one builder per name of :data:`LOSSES`.

:func:`refusal` says, from a model's :class:`ModelTraits` and the run's K and β, why a loss cannot
train a model (None when it can); :func:`check_combination` turns that into the one-line error the CLI
prints, naming the losses that do work. Plain data and rules: this module imports no loss.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional

from ppl_vi.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class ModelTraits:
    """What decides which losses can train a model (:func:`refusal`).

    ``discrete_guide``: the guide samples a site without ``rsample`` (a score-function term is needed);
    ``enumerable``: TraceEnum_ELBO has a discrete site to sum out (in the guide or the model);
    ``model_enumerated``: a model site the guide does not sample is summed out by enumeration;
    ``guide_latents``: the guide samples at least one latent site;
    ``auxiliary_observed``: an observed site carries its own scale (a classifier term α'), so the
    observed sites do not share the one minibatch scale the importance-weighted losses need.
    """

    discrete_guide: bool = False
    enumerable: bool = False
    model_enumerated: bool = False
    guide_latents: bool = True
    auxiliary_observed: bool = False


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """What a loss estimates and what it needs from a model."""

    description: str  # the help line (``ppl-vi list``)
    target: str  # "elbo" or "iwae"
    discrete: str  # how it treats a discrete guide site: "score" (unbiased), "enumerate" or "refuse"
    beta_ok: bool = True  # works with --beta / --kl-anneal
    min_k: int = 1
    sums_model_sites: bool = False  # sums out a model-only enumerated site itself (needs no guide latent)
    beta_why: str = ""  # why β != 1 is refused, where there is more to say than "it needs β = 1"


LOSSES: Dict[str, LossSpec] = {
    "trace": LossSpec("Trace_ELBO: Monte Carlo ELBO, K particles averaged, score function for discrete sites",
                      "elbo", "score"),
    "meanfield": LossSpec("TraceMeanField_ELBO: closed-form KL where available (reparameterised guides)",
                          "elbo", "refuse"),
    "enum": LossSpec("TraceEnum_ELBO: exact sums over enumerated discrete sites", "elbo", "enumerate"),
    "stl": LossSpec("ppl_vi STLLoss: ELBO with the sticking-the-landing gradient (reparameterised guides)",
                    "elbo", "refuse"),
    "renyi": LossSpec("RenyiELBO(alpha=0): Pyro's IWAE (scales inside the log-mean-exp, no per-datapoint values)",
                      "iwae", "refuse", beta_ok=False,
                      beta_why="RenyiELBO puts β inside the log-mean-exp, which bounds nothing"),
    "iwae": LossSpec("ppl_vi IWAELoss: per-datapoint IWAE, differentiable, scales outside, chunked K",
                     "iwae", "refuse", sums_model_sites=True),
    "vimco": LossSpec("ppl_vi VIMCOLoss: IWAE bound, VIMCO score-function gradient for discrete sites (K >= 2)",
                      "iwae", "score", beta_ok=False, min_k=2, sums_model_sites=True),
    "dreg": LossSpec("ppl_vi DReGLoss: IWAE bound with doubly reparameterised gradients (Tucker et al. 2019)",
                     "iwae", "refuse", beta_ok=False),
}
NAMES = tuple(LOSSES)
DESCRIPTIONS = {name: spec.description for name, spec in LOSSES.items()}


def refusal(name: str, traits: ModelTraits, k: int = 1, beta: float = 1.0, kl_anneal: int = 0) -> Optional[str]:
    """Why loss ``name`` cannot train a model with ``traits`` (None if it can)."""
    spec = LOSSES.get(name)
    if spec is None:
        return f"unknown loss {name!r}"
    if spec.discrete == "enumerate" and not traits.enumerable:
        return f"nothing to enumerate ({name} sums out discrete sites; this model has none)"
    if not traits.guide_latents and spec.discrete != "enumerate" and not (spec.sums_model_sites
                                                                         and traits.model_enumerated):
        return "the guide samples no latent site; the model's discrete site must be summed out by enumeration"
    if traits.discrete_guide and spec.discrete == "refuse":
        return "the guide samples a discrete site, and this loss has no score-function term for it"
    if traits.auxiliary_observed and spec.target == "iwae":
        return "an observed site carries its own scale (the classifier term), which the importance weights cannot hold"
    if not spec.beta_ok and (beta != 1.0 or kl_anneal > 0):
        return "it needs β = 1 (no --beta / --kl-anneal)" + (f": {spec.beta_why}" if spec.beta_why else "")
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
