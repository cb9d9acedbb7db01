"""VAE with a learned mixture-of-Gaussians prior (the "MoG prior" of Tomczak & Welling 2018).

Generative story::

    z ~ p(z) = (1/M) Σ_m N(μ_m, diag σ_m²)        (M learned Gaussians, uniform weights)
    x | z ~ Bernoulli(logits = decoder(z))

Guide: q(z | x) = N(μ(x), diag σ(x)²), the same encoder as :class:`~ppl_vi.models.vae.VAE`.

The component is *not* a latent site: the prior of the single site z is the mixture density
itself (``MixtureSameFamily``), so there is nothing to enumerate or to guide, and

    log p(z) = logsumexp_m [ -log M + log N(z; μ_m, σ_m²) ].

KL(q(z|x) || p(z)) has no closed form, so the KL is always the Monte Carlo estimate
(1/K) Σ_k [log q(z_k|x) - log p(z_k)] and ``TraceMeanField_ELBO`` does not apply.
"""

from __future__ import annotations

from typing import Sequence

import pyro.distributions as dist
import torch
from torch import Tensor, nn

from ppl_vi import bounds
from ppl_vi.errors import ConfigError
from ppl_vi.models.base import Batch, register
from ppl_vi.models.vae import VAE


@register(
    "gmvae",
    description="VAE with a learned mixture-of-Gaussians prior (1/M) Σ_m N(μ_m, σ_m²); MC KL",
    data="mnist",
    defaults={"loss": "trace", "z_dim": 10, "components": 500, "hidden": [500, 500], "epochs": 10,
              "batch_size": 128, "lr": 1e-3},
)
class GMVAE(VAE):
    """Model, guide, hand bounds and hooks are the VAE's; only the prior differs."""

    has_analytic_kl = False
    pyro_name = "gmvae"

    def __init__(self, x_dim: int = 784, z_dim: int = 10, hidden: Sequence[int] = (500, 500),
                 num_components: int = 500, init_spread: float = 1.0, activation: str = "softplus"):
        super().__init__(x_dim, z_dim, hidden, activation)
        if num_components < 1:
            raise ConfigError(f"num_components must be >= 1, got {num_components}")
        self.num_components = num_components
        self.locs = nn.Parameter(init_spread * torch.randn(num_components, z_dim))  # (M, Z)
        self.log_scales = nn.Parameter(torch.zeros(num_components, z_dim))  # (M, Z): σ_m = 1 at init

    @classmethod
    def from_config(cls, config, data_info) -> "GMVAE":
        return cls(data_info["x_dim"], config.z_dim, config.hidden, num_components=config.components,
                   activation=config.activation)

    # ---- the prior ---------------------------------------------------------------------------
    @property
    def scales(self) -> Tensor:
        return self.log_scales.exp()

    def log_weights(self) -> Tensor:
        """log (1/M) for every component: (M,)."""
        return torch.log_softmax(self.locs.new_zeros(self.num_components), dim=-1)

    def mixture(self):
        """p(z) = (1/M) Σ_m N(μ_m, diag σ_m²): batch shape (), event shape (Z,)."""
        weights = dist.Categorical(logits=self.locs.new_zeros(self.num_components))
        return dist.MixtureSameFamily(weights, dist.Normal(self.locs, self.scales).to_event(1))

    def prior(self, x: Tensor):
        """The mixture, expanded to one per datapoint of ``x``: batch shape (B,)."""
        return self.mixture().expand((x.shape[0],))

    def log_prior(self, z: Tensor) -> Tensor:
        """log p(z) = logsumexp_m [log π_m + log N(z; μ_m, σ_m²)]: (K, B, Z) -> (K, B)."""
        return bounds.log_normal_mixture(z, self.log_weights(), self.locs, self.scales)

    def sample_prior(self, n: int) -> Tensor:
        """n draws from the mixture: (n, Z)."""
        return self.mixture().sample((n,))

    def kl_to_prior(self, batch: Batch) -> Tensor:
        raise ConfigError("the GMVAE's KL(q(z|x) || mixture prior) has no closed form; use kl='mc'")
