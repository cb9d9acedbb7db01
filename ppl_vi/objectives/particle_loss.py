"""The loss interface shared by the estimators built on :mod:`ppl_vi.objectives.traces`.

A subclass computes, from ``K`` particles of the model and guide, one value per datapoint, the
batch total (the two differ only with global latents) and Pyro's scale ``c``; its gradient is the
subclass's estimator. This class turns that into Pyro's loss interface::

    differentiable_loss = -c · total        loss = its float        per_datapoint = (B,) values
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from ppl_vi.errors import ConfigError


class ParticleLoss:
    """Base of STLLoss, DReGLoss and VIMCOLoss: ``_estimate(model, guide, batch)`` -> (per datapoint, total, c)."""

    #: the fewest particles the estimator is defined for, and what to say below it
    min_particles = 1
    too_few = "the number of particles K must be >= 1"

    def __init__(self, num_particles: int = 1, max_plate_nesting: int = 1):
        if num_particles < self.min_particles:
            raise ConfigError(f"{self.too_few}, got {num_particles}")
        self.num_particles, self.max_plate_nesting = num_particles, max_plate_nesting

    def _estimate(self, model, guide, batch) -> Tuple[Tensor, Tensor, float]:
        raise NotImplementedError

    def per_datapoint(self, model, guide, **batch) -> Tensor:
        """The bound per datapoint, (B,) (local latents; the value, its gradient the estimator's)."""
        return self._estimate(model, guide, batch)[0]

    def differentiable_loss(self, model, guide, *args, **batch) -> Tensor:
        """-c · (the batch's bound): a torch scalar to call ``backward`` on."""
        if args:
            raise TypeError(f"{type(self).__name__} takes the batch as keyword arguments (model(**batch))")
        _, total, c = self._estimate(model, guide, batch)
        return -c * total

    def loss(self, model, guide, *args, **batch) -> float:
        with torch.no_grad():
            return self.differentiable_loss(model, guide, *args, **batch).item()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_particles={self.num_particles})"
