"""MLP blocks shared by the VAE-family models."""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import Tensor, nn


def mlp(sizes: Sequence[int], activation=nn.Softplus) -> nn.Sequential:
    """Linear layers of the given sizes with ``activation`` between them (none after the last)."""
    layers = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


class GaussianEncoder(nn.Module):
    """x (and optional extra inputs, concatenated) -> (loc, scale) of a diagonal Gaussian.

    ``scale = softplus(raw) + min_scale`` keeps the scale positive and bounded away from 0.
    """

    def __init__(self, in_dim: int, hidden: Sequence[int], z_dim: int, min_scale: float = 1e-4):
        super().__init__()
        self.body = mlp([in_dim, *hidden], activation=nn.Softplus)
        self.act = nn.Softplus()
        self.loc = nn.Linear(hidden[-1], z_dim)
        self.raw_scale = nn.Linear(hidden[-1], z_dim)
        self.min_scale = min_scale

    def forward(self, *inputs: Tensor):
        h = self.act(self.body(torch.cat(inputs, dim=-1) if len(inputs) > 1 else inputs[0]))
        return self.loc(h), nn.functional.softplus(self.raw_scale(h)) + self.min_scale


class BernoulliDecoder(nn.Module):
    """z (and optional extra inputs, concatenated) -> Bernoulli logits over the pixels."""

    def __init__(self, in_dim: int, hidden: Sequence[int], x_dim: int):
        super().__init__()
        self.net = mlp([in_dim, *hidden, x_dim], activation=nn.Softplus)

    def forward(self, *inputs: Tensor) -> Tensor:
        return self.net(torch.cat(inputs, dim=-1) if len(inputs) > 1 else inputs[0])


def fresh_copy(net: nn.Module) -> nn.Module:
    """A new network of ``net``'s architecture with freshly initialised parameters (``net`` untouched)."""
    clone = copy.deepcopy(net)
    for module in clone.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return clone
