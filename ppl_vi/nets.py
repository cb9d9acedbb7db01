"""MLP blocks shared by the VAE-family models."""

from __future__ import annotations

import copy
from typing import Sequence

from torch import Tensor, nn


#: the hidden-layer nonlinearities a config can name (``activation``)
ACTIVATIONS = {"softplus": nn.Softplus, "relu": nn.ReLU, "elu": nn.ELU}


def mlp(sizes: Sequence[int], activation=nn.Softplus) -> nn.Sequential:
    """Linear layers of the given sizes with ``activation`` between them (none after the last)."""
    layers = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


def linear_of_concat(layer: nn.Linear, parts: Sequence[Tensor]) -> Tensor:
    """``layer(cat(parts, -1))`` without building the concatenation, the parts' leading dimensions
    broadcast against each other:

        cat(p_1, ..., p_n) W^T + b = Σ_j p_j W_j^T + b,    W = [W_1 | ... | W_n] split by the parts' widths.

    For x (B, D) beside a one-hot label enumerated over C classes, (C, 1, 1, C), the result is
    (C, 1, B, H) and x W_x^T is computed once, not once per class (what makes the enumerated
    encoder of the semi-supervised VAE about C times cheaper in its first layer)."""
    widths = [part.shape[-1] for part in parts]
    if sum(widths) != layer.in_features:
        raise ValueError(f"inputs of widths {widths} (sum {sum(widths)}) for a layer of {layer.in_features} inputs")
    out, start = layer.bias, 0
    for part, width in zip(parts, widths):
        out = out + part @ layer.weight[:, start:start + width].T
        start += width
    return out


def mlp_of_parts(net: nn.Sequential, parts: Sequence[Tensor]) -> Tensor:
    """``net(cat(parts, -1))`` for an :func:`mlp` (first module a Linear), through :func:`linear_of_concat`."""
    if len(parts) == 1:
        return net(parts[0])
    return net[1:](linear_of_concat(net[0], parts))


class GaussianEncoder(nn.Module):
    """x (and optional extra inputs, as if concatenated) -> (loc, scale) of a diagonal Gaussian.

    ``scale = softplus(raw) + min_scale`` keeps the scale positive and bounded away from 0;
    ``activation`` is the hidden layers' nonlinearity. Several inputs broadcast against each other
    (:func:`linear_of_concat`).
    """

    def __init__(self, in_dim: int, hidden: Sequence[int], z_dim: int, min_scale: float = 1e-4,
                 activation=nn.Softplus):
        super().__init__()
        self.body = mlp([in_dim, *hidden], activation=activation)
        self.act = activation()
        self.loc = nn.Linear(hidden[-1], z_dim)
        self.raw_scale = nn.Linear(hidden[-1], z_dim)
        self.min_scale = min_scale

    def forward(self, *inputs: Tensor):
        h = self.act(mlp_of_parts(self.body, inputs))
        return self.loc(h), nn.functional.softplus(self.raw_scale(h)) + self.min_scale


class BernoulliDecoder(nn.Module):
    """z (and optional extra inputs, as if concatenated, broadcast) -> Bernoulli logits over the pixels."""

    def __init__(self, in_dim: int, hidden: Sequence[int], x_dim: int, activation=nn.Softplus):
        super().__init__()
        self.net = mlp([in_dim, *hidden, x_dim], activation=activation)

    def forward(self, *inputs: Tensor) -> Tensor:
        return mlp_of_parts(self.net, inputs)


def fresh_copy(net: nn.Module) -> nn.Module:
    """A new network of ``net``'s architecture with freshly initialised parameters (``net`` untouched)."""
    clone = copy.deepcopy(net)
    for module in clone.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return clone
