"""One SVI step: the step's loss per datapoint, its gradient, and one Adam update.

For the batches B_1..B_m of a step (one, or a labelled and an unlabelled batch),

    loss = (Σ_j L(B_j)) / N_step,

where L(B) is the summed negative bound of ``loss.differentiable_loss(model, guide, **B)`` and
N_step the step's datapoints (over all ranks when distributed, so that the ranks' losses sum to
the single-process mean). The loss stays on the device; nothing here reads it back, except the
finiteness test that ``--nan-policy skip`` asks for (one host sync).

β (the KL weight) follows :func:`beta_at`: a linear ramp from 0 over ``kl_anneal`` steps.
"""

from __future__ import annotations

from typing import Iterable, List

import torch
from pyro import poutine
from torch import Tensor

from ppl_vi import distributed
from ppl_vi.config import TrainConfig
from ppl_vi.models.base import Batch


def beta_at(step: int, config: TrainConfig) -> float:
    """KL weight at ``step``: β·min(1, step / kl_anneal), or β without annealing."""
    if config.kl_anneal <= 0:
        return config.beta
    return config.beta * min(1.0, step / config.kl_anneal)


def step_loss(loss, model_fn, guide_fn, batches: List[Batch]):
    """Σ_j w_j L(B_j) / N_step: the step's batches' losses, weighted and summed, per datapoint.

    ``loss`` is anything with ``differentiable_loss(model, guide, **batch)`` (a Pyro ELBO, our
    IWAELoss, or the fast path). w_j is the step's ``scales[j]`` (1 unless the semi-supervised
    schedule weights a labelled batch, :mod:`ppl_vi.training.batches`), applied with
    ``poutine.scale`` to model and guide. Returns 0.0 (a float) when this rank's shards are all empty.
    """
    total, count = 0.0, 0
    scales = getattr(batches, "scales", None) or [1.0] * len(batches)
    for batch, scale in zip(batches, scales):
        if batch["x"].shape[0] == 0:  # an empty shard (distributed, global batch < world size)
            continue
        if scale == 1.0:
            total = total + loss.differentiable_loss(model_fn, guide_fn, **batch)
        else:
            total = total + loss.differentiable_loss(poutine.scale(model_fn, scale=scale),
                                                     poutine.scale(guide_fn, scale=scale), **batch)
        count += batch["x"].shape[0]
    return total / (getattr(batches, "global_count", None) or count)


def all_finite(loss: Tensor, parameters: Iterable[torch.nn.Parameter]) -> bool:
    """Loss and every gradient finite? One host sync."""
    flags = [torch.isfinite(loss).all()]
    flags += [torch.isfinite(p.grad).all() for p in parameters if p.grad is not None]
    return bool(torch.stack(flags).all())


def train_step(trainer, batches: List[Batch]) -> Tensor:
    """One update of ``trainer.optimizer`` on ``batches``; returns the detached step loss.

    The CUDA-graph step (``trainer.fast.graph_step``) runs the whole step where it applies;
    otherwise: zero the gradients, ``trainer.step_loss``, backward, all-reduce (a no-op unless
    distributed), and with ``nan_policy="skip"`` a non-finite step is dropped and counted in
    ``trainer.skipped_steps`` instead of applied.
    """
    if trainer.fast is not None:
        graphed = trainer.fast.graph_step(batches)  # the whole step replayed from a CUDA graph, where it can be
        if graphed is not None:
            return graphed
    trainer.optimizer.zero_grad(set_to_none=True)
    loss = trainer.step_loss(batches)
    if isinstance(loss, Tensor):
        loss.backward()
    else:  # nothing on this rank's shard
        loss = torch.zeros((), device=trainer.device)
    loss = distributed.all_reduce_gradients(trainer.model.parameters(), loss, trainer.dist)
    if trainer.config.nan_policy == "skip" and not all_finite(loss, trainer.model.parameters()):
        trainer.skipped_steps += 1
        trainer.optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    trainer.optimizer.step()
    return loss.detach()
