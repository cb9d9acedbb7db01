"""One epoch of SVI steps: which training images go into each step, and in which order.

A step is a :class:`~ppl_vi.distributed.Step`: a list of batches whose losses are summed, and
the step's datapoint count over all ranks. The order comes from the trainer's data generator
(seeded from ``config.seed``), so a resumed run, given the generator's state at the start of the
epoch, replays the same permutation and can skip the steps already done without building them.

* **plain** data (everything but semi-supervised): one batch per step, a permutation of the
  training set cut into ``batch_size`` slices;
* **semi-supervised** data (``labelled_idx`` set): every unlabelled batch is paired with a
  labelled batch, the labelled set cycled with a fresh permutation each time it runs out.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

from ppl_vi.data import mnist
from ppl_vi.data.sources import DataBundle
from ppl_vi.distributed import Step
from ppl_vi.models.base import Batch

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


def epoch_steps(data: DataBundle, batch_size: int, generator: torch.Generator, device: torch.device,
                images: Callable[[Tensor], Tensor], make_batch: MakeBatch, shard: Shard,
                skip: int = 0) -> Iterator[Step]:
    """The steps of one epoch, drawing the permutation(s) from ``generator``.

    The first ``skip`` steps are passed over without building their batches (so without drawing
    their binarisation noise): a mid-epoch resume continues at step ``skip`` of the same epoch.
    ``images(idx)`` builds the images (normally :func:`training_images`), ``shard(idx)`` takes
    this rank's share of a global batch (all of it unless distributed).
    """
    if data.labelled_idx is None:
        yield from _plain_steps(data, batch_size, generator, device, images, make_batch, shard, skip)
    else:
        yield from _semi_supervised_steps(data, batch_size, generator, device, images, make_batch, shard, skip)


def _plain_steps(data, batch_size, generator, device, images, make_batch, shard, skip) -> Iterator[Step]:
    y = data.train_y
    for i, idx in enumerate(mnist.minibatches(data.train_x.shape[0], batch_size, generator=generator, device=device)):
        if i < skip:
            continue
        own = shard(idx)
        yield Step([make_batch(images(own), None if y is None else y[own])], idx.numel())


def _semi_supervised_steps(data, batch_size, generator, device, images, make_batch, shard, skip) -> Iterator[Step]:
    """Every unlabelled batch paired with a labelled batch (the labelled set cycled)."""
    lab, unlab, y = data.labelled_idx, data.unlabelled_idx, data.train_y
    labelled = iter(())
    for i, uidx in enumerate(mnist.minibatches(unlab.numel(), batch_size, generator=generator, device=device)):
        try:
            lidx = next(labelled)
        except StopIteration:
            labelled = mnist.minibatches(lab.numel(), min(batch_size, lab.numel()), generator=generator, device=device)
            lidx = next(labelled)
        if i < skip:  # the labelled cycle above still advances, as it did in the interrupted run
            continue
        count = lidx.numel() + uidx.numel()
        lidx, uidx = shard(lidx), shard(uidx)
        yield Step([make_batch(images(lab[lidx]), y[lab[lidx]]), make_batch(images(unlab[uidx]), None)], count)
