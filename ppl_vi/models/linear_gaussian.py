"""Linear-Gaussian model (probabilistic PCA): the model where everything is exact.

Generative story::

    z ~ N(0, I_Z)
    x | z ~ N(W z + b, σ² I_D)

so that p(x) = N(x; b, W Wᵀ + σ² I) and the posterior is Gaussian,

    p(z | x) = N(μ, Σ),   Σ = (I + Wᵀ W / σ²)⁻¹,   μ = Σ Wᵀ (x - b) / σ².

Guides: ``"exact"`` uses that posterior (computed from the current W, b, σ, so the ELBO equals
log p(x) for every sample), ``"amortised"`` is a linear encoder q(z|x) = N(A x + c, diag s²).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn

from ppl_vi import bounds
from ppl_vi.errors import ConfigError
from ppl_vi.models.base import Batch, Draws, LatentModel, register

GUIDES = ("amortised", "exact")


@register(
    "linear-gaussian",
    description="probabilistic PCA: z ~ N(0, I), x|z ~ N(Wz + b, σ²I); exact log p(x) and posterior",
    data="linear-gaussian",
    defaults={"loss": "meanfield", "z_dim": 2, "epochs": 40, "batch_size": 250, "lr": 0.02},
)
class LinearGaussian(LatentModel):
    latent_sites = ("z",)
    exact_guide_kind = "exact"

    def __init__(self, x_dim: int, z_dim: int, guide: str = "amortised"):
        super().__init__()
        if guide not in GUIDES:
            raise ConfigError(f"unknown guide {guide!r} for linear-gaussian; expected one of {GUIDES}")
        self.x_dim, self.z_dim, self.guide_kind = x_dim, z_dim, guide
        self.has_analytic_kl = guide == "amortised"
        self.W = nn.Parameter(0.1 * torch.randn(x_dim, z_dim))
        self.b = nn.Parameter(torch.zeros(x_dim))
        self.log_sigma = nn.Parameter(torch.zeros(()))
        self.enc_A = nn.Parameter(0.1 * torch.randn(z_dim, x_dim))  # not 0: q(z|x) = p(z) makes β checks vacuous
        self.enc_c = nn.Parameter(torch.zeros(z_dim))
        self.enc_log_scale = nn.Parameter(torch.zeros(z_dim))

    @classmethod
    def from_config(cls, config, data_info) -> "LinearGaussian":
        return cls(data_info["x_dim"], config.z_dim, guide=config.guide or "amortised")

    # ---- the Pyro pair -------------------------------------------------------------------
    def model(self, x: Tensor, **_):
        if self.use_param_store:  # off in the trainer's hot path
            pyro.module("linear_gaussian", self)
        with pyro.plate("data", x.shape[0], dim=-1, device=x.device):
            zeros = x.new_zeros(self.z_dim)
            z = pyro.sample("z", dist.Normal(zeros, torch.ones_like(zeros)).to_event(1))
            loc = z @ self.W.T + self.b
            pyro.sample("x", dist.Normal(loc, self.sigma.expand_as(loc)).to_event(1), obs=x)

    def guide(self, x: Tensor, **_):
        if self.use_param_store:  # off in the trainer's hot path
            pyro.module("linear_gaussian", self)
        with pyro.plate("data", x.shape[0], dim=-1, device=x.device):
            if self.guide_kind == "exact":
                loc, tril = self.posterior(x)
                pyro.sample("z", dist.MultivariateNormal(loc, scale_tril=tril))
            else:
                loc, scale = self.encode(x)
                pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    # ---- closed forms ----------------------------------------------------------------------
    @property
    def sigma(self) -> Tensor:
        return self.log_sigma.exp()

    def encode(self, x: Tensor):
        """Amortised guide parameters: q(z|x) = N(A x + c, diag s²)."""
        loc = x @ self.enc_A.T + self.enc_c
        return loc, self.enc_log_scale.exp().expand_as(loc)

    def posterior(self, x: Tensor):
        """Exact p(z|x) = N(μ, L Lᵀ): Σ = (I + WᵀW/σ²)⁻¹, μ = Σ Wᵀ(x - b)/σ²."""
        eye = torch.eye(self.z_dim, dtype=x.dtype, device=x.device)
        precision = eye + self.W.T @ self.W / self.sigma**2
        cov = torch.cholesky_inverse(torch.linalg.cholesky(precision))
        loc = (x - self.b) @ self.W @ cov / self.sigma**2  # (B, Z); cov is symmetric
        return loc, torch.linalg.cholesky(cov)

    def marginal_scale_tril(self) -> Tensor:
        """Cholesky factor of the marginal covariance W Wᵀ + σ² I."""
        eye = torch.eye(self.x_dim, dtype=self.W.dtype, device=self.W.device)
        return torch.linalg.cholesky(self.W @ self.W.T + self.sigma**2 * eye)

    def exact_log_likelihood(self, batch: Batch) -> Tensor:
        """log p(x) = log N(x; b, W Wᵀ + σ² I), per datapoint."""
        return bounds.log_mvnormal(batch["x"], self.b, self.marginal_scale_tril())

    def posterior_kl(self, batch: Batch) -> Tensor:
        """KL(q(z|x) || p(z|x)) in closed form: the gap log p(x) - ELBO, per datapoint."""
        post_loc, post_tril = self.posterior(batch["x"])
        q_loc, q_tril = self._guide_gaussian(batch["x"])
        return bounds.kl_mvnormal(q_loc, q_tril, post_loc, post_tril)

    # ---- hand-derived bounds (hand_negative_elbo, hand_iwae_bound: LatentModel's) -----------
    def _guide_gaussian(self, x: Tensor):
        if self.guide_kind == "exact":
            return self.posterior(x)
        loc, scale = self.encode(x)
        return loc, torch.diag_embed(scale)

    def log_terms(self, batch: Batch, draws: Draws):
        """log p(x|z), log p(z), log q(z|x) at draws z of shape (K, B, Z); each (K, B)."""
        x, z = batch["x"], draws["z"]
        log_px_given_z = bounds.log_normal(x, z @ self.W.T + self.b, self.sigma.expand(self.x_dim))
        log_pz = bounds.log_normal(z, torch.zeros_like(z), torch.ones_like(z))
        q_loc, q_tril = self._guide_gaussian(x)
        log_qz = bounds.log_mvnormal(z, q_loc, q_tril)
        return log_px_given_z, log_pz, log_qz

    def kl_to_prior(self, batch: Batch) -> Tensor:
        """KL(q(z|x) || N(0, I)) in closed form, per datapoint."""
        x = batch["x"]
        q_loc, q_tril = self._guide_gaussian(x)
        eye = torch.eye(self.z_dim, dtype=x.dtype, device=x.device)
        return bounds.kl_mvnormal(q_loc, q_tril, torch.zeros_like(q_loc), eye)
