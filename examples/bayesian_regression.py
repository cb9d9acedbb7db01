"""Bayesian linear regression as Pyro's "Bayesian Regression" tutorial writes it: a PyroModule[nn.Linear]
with PyroSample priors on its weight and bias, checked against a hand-derived bound.

    ppl-vi check examples/bayesian_regression.py                     # the right bound: PASS
    ppl-vi check examples/bayesian_regression.py:missing_jacobian    # FAIL, "missing log-Jacobian" of q(σ)
    ppl-vi check examples/bayesian_regression.py:dropped_constant    # FAIL, "constant": -½ log 2π dropped
    ppl-vi check examples/bayesian_regression.py:missing_entropy     # FAIL, "missing entropy" of q(w)

The model, for B = 20 pairs (x_i ∈ R³, y_i)::

    w ~ N(0, I) (shape (1, 3)),   b ~ N(0, 10²) (shape (1,)),   σ ~ Uniform(0, 10)
    y_i | x_i, w, b, σ ~ N(w x_i + b, σ²)

and a mean-field guide: q(w) = N(μ_w, s_w²), q(b) = N(μ_b, s_b²), q(σ) = LogNormal(μ_σ, s_σ²).
w, b and σ are *global* latents (outside the data plate). ``nn.Linear`` does not take a weight
with a particle dim, so the checker draws the K particles one guide run at a time (and says so); the
draws are (K,) + each site's shape: w (K, 1, 3), b (K, 1), σ (K,). The hand bound, the batch total::

    -ELBO = (1/K) Σ_k [ -Σ_i log N(y_i; w_k x_i + b_k, σ_k²)
                        + log q(w_k) - log p(w_k) + log q(b_k) - log p(b_k) + log q(σ_k) - log p(σ_k) ]

with log q(σ) = log N(log σ; μ_σ, s_σ²) - log σ: the LogNormal density in σ carries the Jacobian
1/σ of σ = exp(u).
"""

import math

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroSample
from torch import nn
from torch.distributions import constraints

DT = torch.float64
LOG_2PI = math.log(2 * math.pi)


class BayesianRegression(PyroModule):
    """The tutorial's model: y = w x + b + σ ε, priors on w and b through PyroSample."""

    def __init__(self, in_features: int = 3, out_features: int = 1):
        super().__init__()
        self.linear = PyroModule[nn.Linear](in_features, out_features).to(DT)
        self.linear.weight = PyroSample(dist.Normal(torch.tensor(0.0, dtype=DT), 1.0)
                                        .expand([out_features, in_features]).to_event(2))
        self.linear.bias = PyroSample(dist.Normal(torch.tensor(0.0, dtype=DT), 10.0).expand([out_features]).to_event(1))

    def forward(self, x, y=None):
        sigma = pyro.sample("sigma", dist.Uniform(torch.tensor(0.0, dtype=DT), 10.0))
        mean = self.linear(x).squeeze(-1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(mean, sigma), obs=y)
        return mean


model = BayesianRegression()

torch.manual_seed(0)
_x = torch.randn(20, 3, dtype=DT)
batch = {"x": _x, "y": _x @ torch.tensor([1.0, -2.0, 0.5], dtype=DT) + 0.3 + 0.5 * torch.randn(20, dtype=DT)}


def guide(x, y=None):
    w_loc = pyro.param("w_loc", torch.zeros(1, 3, dtype=DT))
    w_scale = pyro.param("w_scale", torch.full((1, 3), 0.1, dtype=DT), constraint=constraints.positive)
    b_loc = pyro.param("b_loc", torch.zeros(1, dtype=DT))
    b_scale = pyro.param("b_scale", torch.full((1,), 0.1, dtype=DT), constraint=constraints.positive)
    s_loc = pyro.param("s_loc", torch.tensor(0.0, dtype=DT))
    s_scale = pyro.param("s_scale", torch.tensor(0.1, dtype=DT), constraint=constraints.positive)
    pyro.sample("linear.weight", dist.Normal(w_loc, w_scale).to_event(2))
    pyro.sample("linear.bias", dist.Normal(b_loc, b_scale).to_event(1))
    pyro.sample("sigma", dist.LogNormal(s_loc, s_scale))


def log_normal(v, loc, scale):
    """log N(v; loc, scale²) elementwise, every constant kept."""
    return -0.5 * ((v - loc) / scale) ** 2 - torch.log(torch.as_tensor(scale, dtype=DT)) - 0.5 * LOG_2PI


def pieces(batch, draws):
    """Each piece of the negative ELBO at the K draws, (K,) each."""
    p = pyro.param
    w, b, sigma = draws["linear.weight"], draws["linear.bias"], draws["sigma"]  # (K, 1, 3), (K, 1), (K,)
    mean = (batch["x"] * w).sum(-1) + b  # (K, B)
    log_lik = log_normal(batch["y"], mean, sigma.unsqueeze(-1)).sum(-1)
    log_prior = log_normal(w, 0.0, 1.0).sum((-1, -2)) + log_normal(b, 0.0, 10.0).sum(-1) - math.log(10.0)
    log_q_w = log_normal(w, p("w_loc"), p("w_scale")).sum((-1, -2))
    log_q_b = log_normal(b, p("b_loc"), p("b_scale")).sum(-1)
    log_q_sigma_u = log_normal(torch.log(sigma), p("s_loc"), p("s_scale"))  # the density of u = log σ
    return dict(log_lik=log_lik, log_prior=log_prior, log_q_w=log_q_w, log_q_b=log_q_b,
                log_q_sigma_u=log_q_sigma_u, log_jacobian=torch.log(sigma))


def bound(batch, draws):
    """The batch total: the global latents make it one number (the checker's convention)."""
    t = pieces(batch, draws)
    log_q = t["log_q_w"] + t["log_q_b"] + t["log_q_sigma_u"] - t["log_jacobian"]
    return (-t["log_lik"] - t["log_prior"] + log_q).mean(0)


# ---- classic slips: ppl-vi check examples/bayesian_regression.py:NAME ------------------------------------


def _missing_jacobian(batch, draws):
    """log q(σ) taken as the density of log σ: the -log σ of the change of variables forgotten."""
    t = pieces(batch, draws)
    log_q = t["log_q_w"] + t["log_q_b"] + t["log_q_sigma_u"]
    return (-t["log_lik"] - t["log_prior"] + log_q).mean(0)


def _dropped_constant(batch, draws):
    """The likelihood without its -½ log 2π per datapoint."""
    t = pieces(batch, draws)
    log_q = t["log_q_w"] + t["log_q_b"] + t["log_q_sigma_u"] - t["log_jacobian"]
    return (-(t["log_lik"] + 0.5 * LOG_2PI * batch["y"].shape[0]) - t["log_prior"] + log_q).mean(0)


def _missing_entropy(batch, draws):
    """log q(w) left out of the bound (the guide's entropy of w)."""
    t = pieces(batch, draws)
    log_q = t["log_q_b"] + t["log_q_sigma_u"] - t["log_jacobian"]
    return (-t["log_lik"] - t["log_prior"] + log_q).mean(0)


missing_jacobian = {"bound": _missing_jacobian}
dropped_constant = {"bound": _dropped_constant}
missing_entropy = {"bound": _missing_entropy}
