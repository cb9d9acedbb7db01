"""One SVI step: the step's loss per datapoint, its gradient, and one Adam update.

For the batches B_1..B_m of a step (one, or a labelled and an unlabelled batch),

    loss = (Σ_j L(B_j)) / N_step,

where L(B) is the summed negative bound of ``loss.differentiable_loss(model, guide, **B)`` and
N_step the step's datapoints (over all ranks when distributed, so that the ranks' losses sum to
the single-process mean). The loss stays on the device; nothing here reads it back, except the
finiteness test that ``--nan-policy skip`` asks for (one host sync).

β (the KL weight) follows :func:`beta_at`: a linear ramp from 0 over ``kl_anneal`` steps.

A :class:`Stepper` takes one step; :class:`EagerStep` is the plain one, and
:class:`ppl_vi.training.graph_step.GraphStep` replays a captured CUDA graph beside it. Both are built
from the step's loss function, the parameters and the optimiser, and know nothing of the trainer.
"""

from __future__ import annotations

from typing import Callable, Iterable, List, Protocol, Tuple, Union

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


class Stepper(Protocol):
    """One training step on a step's batches; the loop (:func:`ppl_vi.training.loop.fit`) only calls these."""

    def step(self, batches: List[Batch]) -> Tuple[Tensor, bool]:
        """Update the parameters on ``batches``; returns the detached step loss and whether it was applied
        (False: a non-finite step skipped under ``nan_policy="skip"``)."""

    def reset(self) -> None:
        """Forget anything tied to the parameters' history (a checkpoint was loaded)."""

    def announce(self) -> None:
        """Training starts: say what runs (the fast path's notes)."""

    def record(self) -> dict:
        """What ran, for metrics.json (``fast_path``): {"mode", "notes"}."""


LossFn = Callable[[List[Batch]], Union[Tensor, float]]


class EagerStep:
    """The plain step: zero the gradients, ``loss_fn(batches)``, backward, all-reduce (a no-op unless
    distributed), and one ``optimizer`` step; with ``nan_policy="skip"`` a non-finite step is dropped
    (gradients zeroed, no update) and reported as not applied."""

    def __init__(self, loss_fn: LossFn, parameters: Iterable[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                 device, dist=None, nan_policy: str = "stop"):
        self.loss_fn, self.parameters, self.optimizer = loss_fn, list(parameters), optimizer
        self.device, self.dist, self.nan_policy = torch.device(device), dist, nan_policy

    def step(self, batches: List[Batch]) -> Tuple[Tensor, bool]:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(batches)
        if isinstance(loss, Tensor):
            loss.backward()
        else:  # nothing on this rank's shard
            loss = torch.zeros((), device=self.device)
        if self.dist is not None:
            loss = distributed.all_reduce_gradients(self.parameters, loss, self.dist)
        if self.nan_policy == "skip" and not all_finite(loss, self.parameters):
            self.optimizer.zero_grad(set_to_none=True)
            return loss.detach(), False
        self.optimizer.step()
        return loss.detach(), True

    def reset(self) -> None:
        pass

    def announce(self) -> None:
        pass

    def record(self) -> dict:
        return {"mode": "off", "flush_denormal": False,
                "notes": ["config.fast is False: the plain loss, validation as configured"]}
