"""A small amortised VAE as Pyro's examples/vae/vae.py writes it (Encoder / Decoder modules, pyro.module,
pyro.plate("data"), a Bernoulli image likelihood), checked against a hand-derived bound.

    ppl-vi check examples/vae.py                             # the right bounds: PASS (TraceMeanField_ELBO chosen)
    ppl-vi check examples/vae.py:bce_mean_over_pixels        # FAIL, "scale": the likelihood averaged over D pixels
    ppl-vi check examples/vae.py:batch_mean                  # FAIL, "per datapoint": one number, the batch mean
    ppl-vi check examples/vae.py:iwae_mean_of_log            # FAIL, "log-mean-exp": the IWAE bound as a mean of log w

The model, for B = 12 binary images x_i of D = 16 pixels and a latent z_i ∈ R²::

    z_i ~ N(0, I),   x_i | z_i ~ Bernoulli(decoder(z_i)),      q(z_i | x_i) = N(μ(x_i), diag σ(x_i)²)

The hand bounds, per datapoint, for K draws z_k ~ q(z | x) (the KL in closed form)::

    -ELBO(x)   = (1/K) Σ_k -Σ_d log Bernoulli(x_d | p_d(z_k))  +  KL(N(μ, σ²) || N(0, I))
    -IWAE_K(x) = -log (1/K) Σ_k p(x | z_k) p(z_k) / q(z_k | x)
"""

import math

import pyro
import pyro.distributions as dist
import torch
from torch import nn

D, Z, H, B = 16, 2, 8, 12  # pixels, latent size, hidden units, batch size
DT = torch.float64


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc21 = nn.Linear(Z, H), nn.Linear(H, D)

    def forward(self, z):
        return torch.sigmoid(self.fc21(nn.functional.softplus(self.fc1(z))))


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc21, self.fc22 = nn.Linear(D, H), nn.Linear(H, Z), nn.Linear(H, Z)

    def forward(self, x):
        hidden = nn.functional.softplus(self.fc1(x))
        return self.fc21(hidden), torch.exp(self.fc22(hidden))


torch.manual_seed(0)
encoder, decoder = Encoder().to(DT), Decoder().to(DT)
batch = {"x": torch.bernoulli(torch.full((B, D), 0.3, dtype=DT))}


def model(x):
    pyro.module("decoder", decoder)
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("latent", dist.Normal(x.new_zeros(Z), x.new_ones(Z)).to_event(1))
        pyro.sample("obs", dist.Bernoulli(decoder(z), validate_args=False).to_event(1), obs=x)


def guide(x):
    pyro.module("encoder", encoder)
    with pyro.plate("data", x.shape[0]):
        loc, scale = encoder(x)
        pyro.sample("latent", dist.Normal(loc, scale).to_event(1))


def log_terms(x, z):
    """log p(x|z) (K, B) summed over pixels, the closed-form KL (B,), and log p(z) - log q(z|x) (K, B)."""
    p = decoder(z)
    log_lik = (x * torch.log(p) + (1 - x) * torch.log1p(-p)).sum(-1)
    loc, scale = encoder(x)
    kl = (0.5 * (scale**2 + loc**2 - 1) - torch.log(scale)).sum(-1)
    log_ratio = (-0.5 * z**2 + 0.5 * ((z - loc) / scale) ** 2 + torch.log(scale)).sum(-1)
    return log_lik, kl, log_ratio


def bound(batch, draws):
    log_lik, kl, _ = log_terms(batch["x"], draws["latent"])
    return {"rec": -log_lik.mean(0), "kl": kl}


def iwae_bound(batch, draws):
    log_lik, _, log_ratio = log_terms(batch["x"], draws["latent"])
    log_w = log_lik + log_ratio  # (K, B)
    return -(torch.logsumexp(log_w, 0) - math.log(log_w.shape[0]))


# ---- classic slips: ppl-vi check examples/vae.py:NAME -----------------------------------------------------


def _bce_mean_over_pixels(batch, draws):
    """The reconstruction as a binary cross-entropy averaged over the D pixels (as F.binary_cross_entropy does)."""
    log_lik, kl, _ = log_terms(batch["x"], draws["latent"])
    return {"rec": -log_lik.mean(0) / D, "kl": kl}


def _batch_mean(batch, draws):
    """One number: the mean over the batch, where the loss sums the datapoints' values."""
    log_lik, kl, _ = log_terms(batch["x"], draws["latent"])
    return (-log_lik.mean(0) + kl).mean()


def _iwae_mean_of_log(batch, draws):
    """The IWAE bound written as the mean of log w over the particles (that is the ELBO)."""
    log_lik, _, log_ratio = log_terms(batch["x"], draws["latent"])
    return -(log_lik + log_ratio).mean(0)


bce_mean_over_pixels = {"bound": _bce_mean_over_pixels}
batch_mean = {"bound": _batch_mean}
iwae_mean_of_log = {"iwae_bound": _iwae_mean_of_log}
