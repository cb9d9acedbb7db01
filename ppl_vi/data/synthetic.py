"""Synthetic data whose true parameters, likelihood and posterior are known exactly.

* A Gaussian mixture with diagonal components: ``p(x) = sum_k w_k N(x; mu_k, diag(s_k^2))``.
* A linear-Gaussian latent model: ``z ~ N(0, I_Z)``, ``x | z ~ N(W z + b, sigma^2 I_D)``, so
  ``p(x) = N(x; b, W W^T + sigma^2 I)`` and ``p(z | x)`` is Gaussian in closed form.

Samples are drawn on CPU from a seeded ``torch.Generator`` and moved to the parameters' device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.distributions import MultivariateNormal, Normal


@dataclass
class GMMParams:
    """Mixture weights ``(K,)``, component means ``(K, D)`` and standard deviations ``(K, D)``."""

    weights: Tensor
    means: Tensor
    scales: Tensor

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact ``log p(x) = logsumexp_k [log w_k + sum_d log N(x_d; mu_kd, s_kd^2)]``, (N,)."""
        component = Normal(self.means, self.scales).log_prob(x.unsqueeze(-2)).sum(-1)  # (N, K)
        return torch.logsumexp(self.weights.log() + component, dim=-1)


def default_gmm_params(dtype: torch.dtype = torch.float64) -> GMMParams:
    """Three well-separated components in 2-D with unequal weights and scales."""
    return GMMParams(
        weights=torch.tensor([0.5, 0.3, 0.2], dtype=dtype),
        means=torch.tensor([[-4.0, 0.0], [0.0, 4.0], [4.0, -1.0]], dtype=dtype),
        scales=torch.tensor([[0.6, 0.8], [1.0, 0.7], [0.8, 0.9]], dtype=dtype),
    )


def sample_gmm(params: GMMParams, n: int, seed: int) -> tuple[Tensor, Tensor]:
    """``n`` draws ``c ~ Cat(w)``, ``x = mu_c + s_c * eps``; returns ``x (n, D)`` and ``c (n,)``."""
    g = torch.Generator().manual_seed(seed)
    weights, means, scales = (
        t.detach().cpu() for t in (params.weights, params.means, params.scales)
    )
    c = torch.multinomial(weights, n, replacement=True, generator=g)
    eps = torch.randn(n, means.shape[1], generator=g, dtype=means.dtype)
    x = means[c] + scales[c] * eps
    device = params.means.device
    return x.to(device), c.to(device)


@dataclass
class LinearGaussianParams:
    """Loading matrix ``W (D, Z)``, offset ``b (D,)`` and observation noise std ``sigma``."""

    W: Tensor
    b: Tensor
    sigma: float

    def marginal_cov(self) -> Tensor:
        """``Cov[x] = W W^T + sigma^2 I_D``."""
        eye = torch.eye(self.W.shape[0], dtype=self.W.dtype, device=self.W.device)
        return self.W @ self.W.T + self.sigma**2 * eye

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact ``log N(x; b, W W^T + sigma^2 I)``, shape (N,)."""
        return MultivariateNormal(self.b, covariance_matrix=self.marginal_cov()).log_prob(x)

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Exact ``p(z | x) = N(mean, cov)``: ``cov = (I + W^T W / sigma^2)^-1``,
        ``mean = cov W^T (x - b) / sigma^2``; returns ``mean (N, Z)`` and ``cov (Z, Z)``."""
        eye = torch.eye(self.W.shape[1], dtype=self.W.dtype, device=self.W.device)
        cov = torch.linalg.inv(eye + self.W.T @ self.W / self.sigma**2)
        mean = (x - self.b) @ self.W @ cov / self.sigma**2  # cov is symmetric
        return mean, cov


def default_linear_gaussian_params(
    x_dim: int = 5, z_dim: int = 2, seed: int = 0, dtype: torch.dtype = torch.float64
) -> LinearGaussianParams:
    """Standard-normal ``W`` and ``b`` drawn from ``seed``, with ``sigma = 0.5``."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(x_dim, z_dim, generator=g, dtype=dtype)
    b = torch.randn(x_dim, generator=g, dtype=dtype)
    return LinearGaussianParams(W=W, b=b, sigma=0.5)


def sample_linear_gaussian(
    params: LinearGaussianParams, n: int, seed: int
) -> tuple[Tensor, Tensor]:
    """``n`` draws ``z ~ N(0, I)``, ``x = W z + b + sigma * eps``; returns ``x (n, D)``, ``z``."""
    g = torch.Generator().manual_seed(seed)
    W, b = params.W.detach().cpu(), params.b.detach().cpu()
    z = torch.randn(n, W.shape[1], generator=g, dtype=W.dtype)
    eps = torch.randn(n, W.shape[0], generator=g, dtype=W.dtype)
    x = z @ W.T + b + params.sigma * eps
    return x.to(params.W.device), z.to(params.W.device)
