"""The standard check of a built-in :class:`~ppl_vi.models.base.LatentModel`: every loss it trains with.

For each loss that :func:`ppl_vi.objectives.losses.supported_losses` accepts for the model, the
loss object the trainer would build is held against the hand bound that the model protocol
derives from ``log_terms`` (same sample: value, each datapoint, every gradient; statistical),
also with β on the latent sites where the loss allows it, and its expected gradient against the
reference objective. Discrete models add IWAELoss's *values* (what ``ppl-vi eval`` reports), with
no gradient. Then the ground truth where log p(x) is exact.
"""

from __future__ import annotations

from typing import List

import torch

from ppl_vi.check.core import Comparison, ExtraCheck, check
from ppl_vi.check.diagnose import explain_failures
from ppl_vi.check.rows import CheckReport
from ppl_vi.check.truth import ground_truth_rows
from ppl_vi.models.base import Batch, scale_sites
from ppl_vi.objectives.importance import IWAELoss
from ppl_vi.objectives.losses import LOSSES, make_loss, supported_losses


def model_traits(model):
    """The traits of a built model instance (its guide choice included)."""
    return model.own_traits()


def loss_comparisons(model, name: str, num_particles: int = 3, beta: float = 2.0) -> List[Comparison]:
    """The comparisons for loss ``name``: unscaled, and with β on the latent sites where it applies."""
    nest = model.max_plate_nesting
    spec = LOSSES[name]
    k = num_particles if spec.target == "elbo" else max(num_particles, 2)
    loss = make_loss(name, k, nest)
    label = f"{name} (K={k})"
    if name == "enum":
        if not model.latent_sites:  # everything enumerated in the model: the loss is -log p(x)
            return [Comparison(f"{label} vs hand -log p(x)", loss, lambda b, d: -model.exact_log_likelihood(b),
                               same_sample=False, statistical=False)]
        return [Comparison(f"{label}, guide enumerated, vs hand exact ELBO", loss,
                           lambda b, d: model.hand_negative_elbo(b, d, kl="analytic"), same_sample=False,
                           statistical=False)]
    if spec.target == "elbo":
        if name == "stl":
            def hand(b, d, beta=1.0):
                return -model.hand_stl_elbo(b, d, beta)
        else:
            kl = "analytic" if name == "meanfield" and model.has_analytic_kl else "mc"

            def hand(b, d, beta=1.0):
                return model.hand_negative_elbo(b, d, kl=kl, beta=beta)
    else:
        hand_bound = {"vimco": model.hand_vimco_bound, "dreg": model.hand_dreg_bound}.get(name, model.hand_iwae_bound)

        def hand(b, d, beta=1.0):
            return -(hand_bound(b, d) if beta == 1.0 else model.hand_iwae_bound(b, d, beta))
    out = [Comparison(f"{label} vs hand", loss, hand, k if model.latent_sites else 1,
                      same_sample=bool(model.latent_sites))]
    if spec.beta_ok and model.latent_sites:
        sites = model.beta_sites
        out.append(Comparison(f"{label}, beta={beta:g} vs hand", loss, lambda b, d: hand(b, d, beta), k,
                              model=scale_sites(model.model, sites, beta), guide=scale_sites(model.guide, sites, beta),
                              statistical=False))
    return out


def standard_comparisons(model, num_particles: int = 3, beta: float = 2.0) -> List[Comparison]:
    """Every supported loss's comparisons, then IWAELoss values for discrete guides (evaluation)."""
    traits = model_traits(model)
    out = []
    for name in supported_losses(traits, k=max(num_particles, 2)):
        out += loss_comparisons(model, name, num_particles, beta)
    if traits.discrete_guide:  # ppl-vi eval's IWAE-k: values only (no gradient exists for it)
        k = max(num_particles, 2)
        out.append(Comparison(f"IWAELoss (K={k}) values, for eval, vs hand IWAE",
                              IWAELoss(k, model.max_plate_nesting), lambda b, d: -model.hand_iwae_bound(b, d), k,
                              compare_grads=False, target=None))
    return out


def check_model(model, batch: Batch, *, num_particles: int = 3, beta: float = 2.0, seed: int = 0,
                rtol: float = 1e-6, repeats: int = 50, gradient_seeds: int = 100, gradient_batch: int = 8,
                ks=(1, 10, 100, 1000),
                ladder_repeats: int = 20, dtype=torch.float64) -> CheckReport:
    """The full check of a built-in ``LatentModel`` on ``batch``, in ``dtype`` (float64 by default)."""
    model = model.to(dtype)
    batch = {k: (v.to(dtype) if v is not None and v.is_floating_point() else v) for k, v in batch.items()}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    comparisons = standard_comparisons(model, num_particles, beta)
    report = check(model.model, model.guide, batch, comparisons,
                   [p for _, p in named], param_names=[n for n, _ in named],
                   max_plate_nesting=model.max_plate_nesting, seed=seed, rtol=rtol, repeats=repeats,
                   gradient_seeds=gradient_seeds, gradient_batch=gradient_batch,
                   extra_rows=[ExtraCheck("ground truth: log p(x) and the IWAE ladder", "ground truth",
                                          lambda: ground_truth_rows(model, batch, ks, ladder_repeats, seed, rtol))])
    explain_failures(report, model.model, model.guide, batch, comparisons, model.max_plate_nesting, seed, rtol)
    return report
