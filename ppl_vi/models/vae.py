"""Variational autoencoder on binarised images (Kingma & Welling 2014).

Generative story::

    z ~ N(0, I_Z)
    x | z ~ Bernoulli(logits = decoder(z))        (D independent pixels)

Guide (amortised, mean-field)::

    q(z | x) = N(μ(x), diag σ(x)²),   (μ, σ) = encoder(x)

The KL to the standard-normal prior is closed form,

    KL(q(z|x) || N(0, I)) = Σ_z [ -log σ_z + (σ_z² + μ_z²) / 2 - ½ ],

so ``TraceMeanField_ELBO`` applies. Every distribution parameter is a tensor built from the data or
the module (no Python floats), and every network broadcasts over a leading particle dimension,
so the pair runs unchanged under a vectorised particle plate: z is (K, B, Z), logits (K, B, D).
"""

from __future__ import annotations

from typing import Dict, Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

from ppl_vi import bounds
from ppl_vi.models.base import Batch, Draws, LatentModel, register
from ppl_vi.nets import ACTIVATIONS, BernoulliDecoder, GaussianEncoder


@register(
    "vae",
    description="VAE: z ~ N(0, I), x|z ~ Bernoulli(decoder(z)), q(z|x) = N(encoder(x)); closed-form KL",
    data="mnist",
    defaults={"loss": "trace", "z_dim": 50, "hidden": [500, 500], "epochs": 10, "batch_size": 128, "lr": 1e-3},
)
class VAE(LatentModel):
    latent_sites = ("z",)
    has_analytic_kl = True
    #: the name under which ``pyro.module`` registers the networks in the param store.
    pyro_name = "vae"

    def __init__(self, x_dim: int = 784, z_dim: int = 50, hidden: Sequence[int] = (500, 500),
                 activation: str = "softplus"):
        super().__init__()
        self.x_dim, self.z_dim, self.hidden = x_dim, z_dim, list(hidden)
        self.encoder = GaussianEncoder(x_dim, self.hidden, z_dim, activation=ACTIVATIONS[activation])
        self.decoder = BernoulliDecoder(z_dim, self.hidden[::-1], x_dim, activation=ACTIVATIONS[activation])

    @classmethod
    def from_config(cls, config, data_info) -> "VAE":
        return cls(data_info["x_dim"], config.z_dim, config.hidden, config.activation)

    # ---- the Pyro pair -------------------------------------------------------------------
    def model(self, x: Tensor, **_):
        if self.use_param_store:  # off in the trainer's hot path
            pyro.module(self.pyro_name, self)
        with pyro.plate("data", x.shape[0], dim=-1, device=x.device):
            z = pyro.sample("z", self.prior(x))  # (..., B, Z)
            logits = self.decoder(z)  # (..., B, D)
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)

    def guide(self, x: Tensor, **_):
        if self.use_param_store:  # off in the trainer's hot path
            pyro.module(self.pyro_name, self)
        with pyro.plate("data", x.shape[0], dim=-1, device=x.device):
            loc, scale = self.encoder(x)  # (B, Z) each
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    # ---- the prior ---------------------------------------------------------------------------
    def prior(self, x: Tensor):
        """p(z) = N(0, I), one per datapoint of ``x``: batch shape (B,), event shape (Z,)."""
        loc = x.new_zeros(x.shape[0], self.z_dim)
        return dist.Normal(loc, x.new_ones(x.shape[0], self.z_dim)).to_event(1)

    def log_prior(self, z: Tensor) -> Tensor:
        """log N(z; 0, I), summed over Z: (K, B, Z) -> (K, B)."""
        return bounds.log_normal(z, torch.zeros_like(z), torch.ones_like(z))

    def sample_prior(self, n: int) -> Tensor:
        """n draws of z ~ N(0, I) on the module's device and dtype: (n, Z)."""
        ref = next(self.parameters())
        return torch.randn(n, self.z_dim, device=ref.device, dtype=ref.dtype)

    # ---- hand-derived bounds (hand_negative_elbo, hand_iwae_bound: LatentModel's) -----------
    def log_terms(self, batch: Batch, draws: Draws):
        """log p(x|z), log p(z), log q(z|x) at draws z of shape (K, B, Z); each (K, B)."""
        x, z = batch["x"], draws["z"]
        log_px_given_z = bounds.log_bernoulli_with_logits(x, self.decoder(z))
        log_pz = self.log_prior(z)
        q_loc, q_scale = self.encoder(x)  # (B, Z) each, broadcast over K
        log_qz = bounds.log_normal(z, q_loc, q_scale)
        return log_px_given_z, log_pz, log_qz

    def kl_to_prior(self, batch: Batch) -> Tensor:
        """KL(q(z|x) || N(0, I)) in closed form, per datapoint: (B,)."""
        q_loc, q_scale = self.encoder(batch["x"])
        return bounds.kl_normal(q_loc, q_scale, torch.zeros_like(q_loc), torch.ones_like(q_scale))

    # ---- hooks for the trainer, evaluator and plots (see base.py) ------------------------------
    def elbo_terms(self, batch: Batch, draws: Draws) -> Dict[str, Tensor]:
        """E_q log p(x|z) ≈ (1/K) Σ_k log p(x|z_k), and KL(q || p): closed form where it exists,
        else (1/K) Σ_k [log q(z_k|x) - log p(z_k)]. Each (B,); ELBO = rec - kl."""
        log_px_given_z, log_pz, log_qz = self.log_terms(batch, draws)
        kl = self.kl_to_prior(batch) if self.has_analytic_kl else (log_qz - log_pz).mean(0)
        return {"rec": log_px_given_z.mean(0), "kl": kl}

    @torch.no_grad()
    def generate(self, n: int) -> Tensor:
        """Pixel probabilities sigmoid(decoder(z)), z ~ p(z): (n, D)."""
        return torch.sigmoid(self.decoder(self.sample_prior(n)))

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Pixel probabilities of the decoder at the guide's mean: (B, D)."""
        return torch.sigmoid(self.decoder(self.encoder(x)[0]))

    @torch.no_grad()
    def encode_mean(self, x: Tensor) -> Tensor:
        """The guide's mean μ(x): (B, Z)."""
        return self.encoder(x)[0]
