"""One epoch of SVI steps: which training images go into each step, and in which order.

A step is a :class:`Step`: a list of batches whose losses are summed, and
the step's datapoint count over all ranks. The order comes from the trainer's data generator
(seeded from ``config.seed``), so a resumed run, given the generator's state at the start of the
epoch, replays the same permutation and can skip the steps already done without building them.

* **plain** data (everything but semi-supervised): one batch per step, a permutation of the
  training set cut into ``batch_size`` slices;
* **semi-supervised** data (``labelled_idx`` set): one step per unlabelled batch; a labelled
  batch joins every ``labelled_every``-th step (:class:`LabelledSchedule`), weighted so that one
  epoch's expected loss is the objective of Kingma et al. 2014 whatever the schedule.

**The semi-supervised objective per epoch** (N_u unlabelled images x_u, N_l labelled (x_l, y_l);
U and L the unlabelled and labelled bounds of :mod:`ppl_vi.models.ssvae`, α' the classifier weight)::

    J = Σ_u -U(x_u) + Σ_l [-L(x_l, y_l) - α' log q(y_l|x_l)]

(objective ``kingma``) every labelled image counted once per pass over the unlabelled set, as in Kingma et al.'s J^α
(α' = α N / N_l is their α = 0.1 N spread over the labelled images). An epoch has S = ⌈N_u/B⌉
steps; the labelled batches (b_l images each, from consecutive random permutations of the
labelled set) come at steps i with i mod k = 0 (k = ``labelled_every``; k = 0: step 0 only), so
there are m = ⌈S/k⌉ (or 1) of them and each labelled image is drawn m b_l / N_l times per epoch in
expectation. The labelled batch's loss is therefore scaled by ``poutine.scale`` on model and guide
with

    w = N_l / (m b_l)

and every step's loss is divided by the same B (not by the step's datapoints), so that

    E[Σ_steps B · step loss] = Σ_u -U(x_u) + w (m b_l / N_l) Σ_l [-L - α' log q] = J

exactly, for any k and b_l (``tests/test_schedule.py`` holds the gradients equal). Where
m b_l is a multiple of N_l every epoch uses each labelled image exactly m b_l / N_l times, and
the equality holds for every draw, not only in expectation. The old schedule (all labels at
every step, weight 1) counted each labelled image ⌈N_u/B⌉ ≈ 430 times per epoch.

**Objective ``cs236``** (the SSVAE's default) asks instead for a labelled batch's mean
cross-entropy in every step, J_cs236 = Σ_u -U(x_u) + S α (B / N_l) Σ_l -log q(y_l|x_l) per epoch,
with α' = α B / b_l per labelled image (:mod:`ppl_vi.models.ssvae`); its labelled batches are
weighted w = S / m (1 with a labelled batch every step), so that

    E[Σ_steps B · step loss] = Σ_u -U(x_u) + (S/m) (m b_l / N_l) (α B / b_l) Σ_l -log q = J_cs236.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

from ppl_vi.data import mnist
from ppl_vi.data.sources import DataBundle
from ppl_vi.errors import ConfigError
from ppl_vi.models.base import Batch


class Step(list):
    """The batches of one SVI step (their losses are summed), and ``global_count``: the datapoints
    of the whole step over all ranks, the divisor that makes per-rank losses sum to the global mean.

    ``scales`` (one per batch, default all 1) multiply each batch's loss through ``poutine.scale``
    on model and guide: the weight of a labelled batch in the semi-supervised schedule."""

    def __init__(self, batches=(), global_count: Optional[int] = None, scales: Optional[list] = None):
        super().__init__(batches)
        self.global_count = global_count
        self.scales = list(scales) if scales is not None else [1.0] * len(self)


Shard = Callable[[Tensor], Tensor]  # global batch indices -> this rank's share
MakeBatch = Callable[[Tensor, Optional[Tensor]], Batch]


def training_images(data: DataBundle, idx: Tensor) -> Tensor:
    """The training images at ``idx``, freshly binarised when the data are Bernoulli."""
    x = data.train_x[idx]
    return mnist.binarize(x) if data.binary else x


def steps_per_epoch(data: DataBundle, batch_size: int) -> int:
    """Steps in one epoch: one per (unlabelled, when semi-supervised) batch."""
    n = data.train_x.shape[0] if data.unlabelled_idx is None else data.unlabelled_idx.numel()
    return math.ceil(n / batch_size)


@dataclasses.dataclass(frozen=True)
class LabelledSchedule:
    """Where the labelled batches go in an epoch of ``steps`` unlabelled steps, and their weight.

    ``every`` = k: a labelled batch at steps i with i mod k = 0 (k = 0: at step 0 only, once per
    epoch, as Pyro's ``examples/vae/ss_vae_M2.py`` does); ``batch_size`` = b_l images each.
    """

    n_labelled: int  # N_l
    batch_size: int  # b_l
    every: int  # k (0: once per epoch)
    steps: int  # S, steps per epoch
    objective: str = "kingma"  # kingma: each labelled image once per epoch; cs236: a labelled batch per step

    @classmethod
    def from_config(cls, config, n_labelled: int, steps: int) -> "LabelledSchedule":
        """``labelled_every``, ``labelled_batch_size`` (0: all labels, at most ``batch_size``), ``objective``."""
        size = config.labelled_batch_size or min(config.batch_size, n_labelled)
        if size > n_labelled:
            raise ConfigError(f"labelled_batch_size {size} exceeds the {n_labelled} labelled images; "
                              f"use at most {n_labelled} (0: all of them, at most batch_size)")
        return cls(n_labelled, size, config.labelled_every, steps, config.objective)

    @property
    def batches_per_epoch(self) -> int:
        """m = ⌈S / k⌉ (k ≥ 1), or 1 (k = 0)."""
        return math.ceil(self.steps / self.every) if self.every else 1

    @property
    def weight(self) -> float:
        """kingma: w = N_l / (m b_l), each labelled image's loss counts once per epoch in expectation;
        cs236: w = S / m, one labelled batch's worth per step in expectation (1 when k = 1)."""
        if self.objective == "cs236":
            return self.steps / self.batches_per_epoch
        return self.n_labelled / (self.batches_per_epoch * self.batch_size)

    def has_labelled(self, step: int) -> bool:
        """Whether step ``step`` (0-based, within the epoch) carries a labelled batch."""
        return step % self.every == 0 if self.every else step == 0


def labelled_stream(n: int, size: int, generator: torch.Generator, device) -> Iterator[Tensor]:
    """Endless batches of ``size`` indices into range(n), cut from consecutive random permutations
    (drawn on CPU from ``generator``); a batch continues into the next permutation where one runs
    out, so every index appears exactly once in each n consecutive slots and each slot is uniform."""
    pending = torch.zeros(0, dtype=torch.long)
    while True:
        while pending.numel() < size:
            pending = torch.cat([pending, torch.randperm(n, generator=generator)])
        yield pending[:size].to(device)
        pending = pending[size:]


def epoch_steps(data: DataBundle, batch_size: int, generator: torch.Generator, device: torch.device,
                images: Callable[[Tensor], Tensor], make_batch: MakeBatch, shard: Shard,
                skip: int = 0, schedule: Optional[LabelledSchedule] = None) -> Iterator[Step]:
    """The steps of one epoch, drawing the permutation(s) from ``generator``.

    The first ``skip`` steps are passed over without building their batches (so without drawing
    their binarisation noise): a mid-epoch resume continues at step ``skip`` of the same epoch.
    ``images(idx)`` builds the images (normally :func:`training_images`), ``shard(idx)`` takes
    this rank's share of a global batch (all of it unless distributed). Semi-supervised data need
    the ``schedule`` of their labelled batches.
    """
    if data.labelled_idx is None:
        yield from _plain_steps(data, batch_size, generator, device, images, make_batch, shard, skip)
    else:
        if schedule is None:
            raise ConfigError("semi-supervised data need a LabelledSchedule for their labelled batches")
        yield from _semi_supervised_steps(data, batch_size, generator, device, images, make_batch, shard, skip,
                                          schedule)


def _plain_steps(data, batch_size, generator, device, images, make_batch, shard, skip) -> Iterator[Step]:
    y = data.train_y
    for i, idx in enumerate(mnist.minibatches(data.train_x.shape[0], batch_size, generator=generator, device=device)):
        if i < skip:
            continue
        own = shard(idx)
        yield Step([make_batch(images(own), None if y is None else y[own])], idx.numel())


def _semi_supervised_steps(data, batch_size, generator, device, images, make_batch, shard, skip,
                           schedule: LabelledSchedule) -> Iterator[Step]:
    """One step per unlabelled batch; a labelled batch, weighted by ``schedule.weight``, at the
    schedule's steps. Every step's loss is divided by ``batch_size`` (its ``global_count``)."""
    lab, unlab, y = data.labelled_idx, data.unlabelled_idx, data.train_y
    labelled = labelled_stream(lab.numel(), schedule.batch_size, generator, device)  # a fresh stream per epoch
    for i, uidx in enumerate(mnist.minibatches(unlab.numel(), batch_size, generator=generator, device=device)):
        lidx = next(labelled) if schedule.has_labelled(i) else None
        if i < skip:  # the labelled stream above still advances, as it did in the interrupted run
            continue
        uidx = shard(uidx)
        batches, scales = [make_batch(images(unlab[uidx]), None)], [1.0]
        if lidx is not None:
            lidx = shard(lidx)
            batches.append(make_batch(images(lab[lidx]), y[lab[lidx]]))
            scales.append(schedule.weight)
        yield Step(batches, batch_size, scales)
