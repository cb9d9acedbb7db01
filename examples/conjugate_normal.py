"""Check a bound you derived by hand: a conjugate Normal model, written as a plain file (no class, no registry).

    ppl-vi check examples/conjugate_normal.py                      # the right bounds: PASS
    ppl-vi check examples/conjugate_normal.py --formula            # the objective Pyro optimises, spelled out
    ppl-vi check examples/conjugate_normal.py:dropped_constant     # four classic mistakes, each diagnosed:
    ppl-vi check examples/conjugate_normal.py:flipped_kl           #   "constant", "sign", "scale",
    ppl-vi check examples/conjugate_normal.py:scale_inside         #   "per datapoint"
    ppl-vi check examples/conjugate_normal.py:per_particle
    ppl-vi check examples/conjugate_normal.py:all_four           # all four at once, each named

The model, for N = 1000 datapoints x_i in R^D of which a minibatch of B = 16 is checked (Pyro scales
every site of the subsampled plate by N/B)::

    μ_i ~ N(0, τ² I_D),      x_i | μ_i ~ N(μ_i, σ² I_D)          so  p(x_i) = N(0, (τ² + σ²) I_D) exactly

and the guide q(μ_i | x_i) = N(a x_i + b, s² I_D) with learnable a, b, log s. The hand derivation,
per datapoint, for K draws μ_k ~ q(μ | x)::

    -ELBO(x)  = N/B · (1/K) Σ_k [ -log N(x; μ_k, σ²) + log N(μ_k; a x + b, s²) - log N(μ_k; 0, τ²) ]
    -IWAE_K(x) = -N/B · log (1/K) Σ_k N(x; μ_k, σ²) N(μ_k; 0, τ²) / N(μ_k; a x + b, s²)
"""

import math

import pyro
import pyro.distributions as dist
import torch

N, B, D = 1000, 16, 5  # data set size, minibatch size, dimension
TAU, SIGMA = 1.5, 0.5  # prior and noise scales (fixed)
C = N / B  # the minibatch scale Pyro applies to a subsampled plate

# a minibatch of data from the model itself
torch.manual_seed(0)
batch = {"x": math.sqrt(TAU**2 + SIGMA**2) * torch.randn(B, D, dtype=torch.float64)}

# the guide's parameters, plain leaf tensors (ppl-vi check finds every tensor that requires grad)
a = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
b = torch.full((D,), 0.1, dtype=torch.float64, requires_grad=True)
log_s = torch.tensor(-0.6, dtype=torch.float64, requires_grad=True)


def model(x):
    with pyro.plate("data", N, subsample=torch.arange(x.shape[0])):
        mu = pyro.sample("mu", dist.Normal(x.new_zeros(D), TAU).to_event(1))
        pyro.sample("x", dist.Normal(mu, SIGMA).to_event(1), obs=x)


def guide(x):
    with pyro.plate("data", N, subsample=torch.arange(x.shape[0])):
        pyro.sample("mu", dist.Normal(a * x + b, log_s.exp()).to_event(1))


def log_normal(v, loc, scale):
    """Σ_d log N(v_d; loc_d, scale²), every constant kept."""
    scale = torch.as_tensor(scale, dtype=v.dtype)
    return (-0.5 * ((v - loc) / scale) ** 2 - torch.log(scale) - 0.5 * math.log(2 * math.pi)).sum(-1)


def log_terms(x, mu):
    """log p(x|μ), log p(μ), log q(μ|x) at the draws μ (K, B, D); each (K, B)."""
    return log_normal(x, mu, SIGMA), log_normal(mu, 0.0, TAU), log_normal(mu, a * x + b, log_s.exp())


def bound(batch, draws):
    """The negative ELBO per datapoint, as two named terms (checked one by one against Pyro's)."""
    log_lik, log_prior, log_q = log_terms(batch["x"], draws["mu"])
    return {"rec": C * (-log_lik).mean(0), "kl": C * (log_q - log_prior).mean(0)}


def iwae_bound(batch, draws):
    """The negative IWAE_K bound per datapoint: the minibatch scale outside the log-mean-exp."""
    log_lik, log_prior, log_q = log_terms(batch["x"], draws["mu"])
    log_w = log_lik + log_prior - log_q
    k = log_w.shape[0]
    return -C * (torch.logsumexp(log_w, 0) - math.log(k))


def exact_log_likelihood(batch):
    """log p(x) per datapoint: x ~ N(0, (τ² + σ²) I)."""
    return log_normal(batch["x"], 0.0, math.sqrt(TAU**2 + SIGMA**2))


# ---- four classic mistakes, each a variant: ppl-vi check examples/conjugate_normal.py:NAME ------------


def _bound_without_constant(batch, draws):
    """log p(x|μ) written without its -½ log 2π per dimension."""
    log_lik, log_prior, log_q = log_terms(batch["x"], draws["mu"])
    log_lik = log_lik + 0.5 * D * math.log(2 * math.pi)
    return {"rec": C * (-log_lik).mean(0), "kl": C * (log_q - log_prior).mean(0)}


def _bound_flipped_kl(batch, draws):
    """The KL term with its sign flipped: -E log p(x|μ) - KL."""
    log_lik, log_prior, log_q = log_terms(batch["x"], draws["mu"])
    return {"rec": C * (-log_lik).mean(0), "kl": C * (log_prior - log_q).mean(0)}


def _iwae_scale_inside(batch, draws):
    """The minibatch scale N/B put inside the log-mean-exp."""
    log_lik, log_prior, log_q = log_terms(batch["x"], draws["mu"])
    log_w = log_lik + log_prior - log_q
    return -(torch.logsumexp(C * log_w, 0) - math.log(log_w.shape[0]))


def _bound_per_particle(batch, draws):
    """One value per particle, (K, B): the mean over the K draws forgotten."""
    log_lik, log_prior, log_q = log_terms(batch["x"], draws["mu"])
    return C * (log_q - log_prior - log_lik)


dropped_constant = {"bound": _bound_without_constant}
flipped_kl = {"bound": _bound_flipped_kl}
scale_inside = {"iwae_bound": _iwae_scale_inside}
per_particle = {"bound": _bound_per_particle}


def _bound_all_wrong(batch, draws):
    """Three mistakes at once: per particle, the constant dropped from log p(x|μ), the KL's sign flipped."""
    log_lik, log_prior, log_q = log_terms(batch["x"], draws["mu"])
    log_lik = log_lik + 0.5 * D * math.log(2 * math.pi)
    return {"rec": C * -log_lik, "kl": C * (log_prior - log_q)}


all_four = {"bound": _bound_all_wrong, "iwae_bound": _iwae_scale_inside}  # the fourth: N/B inside the log-mean-exp
