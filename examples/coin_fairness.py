"""Is the coin fair? Pyro's SVI tutorial (part I) model, one global Beta latent, checked against a hand bound.

    ppl-vi check examples/coin_fairness.py                       # the right bound: PASS (TraceMeanField_ELBO chosen),
                                                                 # and the exact log p(x), a total, for the ground truth
    ppl-vi check examples/coin_fairness.py:flipped_kl            # FAIL, "sign": the KL's sign flipped
    ppl-vi check examples/coin_fairness.py:kl_per_datapoint      # FAIL, "scale": the global KL counted B times
    ppl-vi check examples/coin_fairness.py:mean_likelihood       # FAIL, "scale": the likelihood averaged over the batch

The model, for B = 10 tosses x_i ∈ {0, 1}::

    f ~ Beta(10, 10),    x_i | f ~ Bernoulli(f)          and the guide    q(f) = Beta(α_q, β_q)

f lies outside the data plate: it is a *global* latent, one value for the whole batch, so the bound is
not a sum over datapoints of per-datapoint terms. The convention for such a model: return the batch
total, or named terms, each per datapoint (B,) or one number for the batch (): here the likelihood per
toss and the KL once. For K draws f_k ~ q::

    -ELBO = Σ_i (1/K) Σ_k -log Bernoulli(x_i | f_k)  +  KL(Beta(α_q, β_q) || Beta(10, 10))

with the Beta-Beta KL in closed form (so the checker holds it against TraceMeanField_ELBO, which uses
the same closed form, and says so). The draws of a global site are (K,) + its shape: draws["f"] is (K,).
"""

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

ALPHA0, BETA0 = 10.0, 10.0  # the prior: a fair-ish coin
DT = torch.float64

batch = {"data": torch.tensor([1.0] * 6 + [0.0] * 4, dtype=DT)}  # 6 heads, 4 tails


def model(data):
    f = pyro.sample("latent_fairness", dist.Beta(torch.tensor(ALPHA0, dtype=DT), torch.tensor(BETA0, dtype=DT)))
    with pyro.plate("data", data.shape[0]):
        pyro.sample("obs", dist.Bernoulli(f), obs=data)


def guide(data):
    alpha_q = pyro.param("alpha_q", torch.tensor(15.0, dtype=DT), constraint=constraints.positive)
    beta_q = pyro.param("beta_q", torch.tensor(15.0, dtype=DT), constraint=constraints.positive)
    pyro.sample("latent_fairness", dist.Beta(alpha_q, beta_q))


def kl_beta(a, b, a0, b0):
    """KL(Beta(a, b) || Beta(a0, b0)) = log B(a0, b0) - log B(a, b) + (a - a0) ψ(a) + (b - b0) ψ(b)
    + (a0 - a + b0 - b) ψ(a + b), with log B(a, b) = lgamma(a) + lgamma(b) - lgamma(a + b)."""
    log_beta = lambda u, v: torch.lgamma(u) + torch.lgamma(v) - torch.lgamma(u + v)  # noqa: E731
    a0, b0 = torch.as_tensor(a0, dtype=a.dtype), torch.as_tensor(b0, dtype=a.dtype)
    return (log_beta(a0, b0) - log_beta(a, b) + (a - a0) * torch.digamma(a) + (b - b0) * torch.digamma(b)
            + (a0 - a + b0 - b) * torch.digamma(a + b))


def terms(batch, draws):
    """-log p(x_i | f) per toss (K averaged), (B,); the closed-form KL, ()."""
    f = draws["latent_fairness"].unsqueeze(-1)  # (K, 1)
    x = batch["data"]
    log_lik = x * torch.log(f) + (1 - x) * torch.log1p(-f)  # (K, B)
    kl = kl_beta(pyro.param("alpha_q"), pyro.param("beta_q"), ALPHA0, BETA0)
    return -log_lik.mean(0), kl


def bound(batch, draws):
    """The negative ELBO as named terms: the likelihood per toss, the global KL once."""
    nll, kl = terms(batch, draws)
    return {"lik": nll, "kl": kl}


def exact_log_likelihood(batch):
    """log p(x_1..B) = log B(10 + heads, 10 + tails) - log B(10, 10): one number for the batch (the global
    latent makes the datapoints dependent; there is no per-datapoint split)."""
    x = batch["data"]
    heads, tails = x.sum(), (1 - x).sum()
    log_beta = lambda u, v: torch.lgamma(u) + torch.lgamma(v) - torch.lgamma(u + v)  # noqa: E731
    return log_beta(ALPHA0 + heads, BETA0 + tails) - log_beta(torch.tensor(ALPHA0, dtype=DT),
                                                              torch.tensor(BETA0, dtype=DT))


# ---- classic slips, each a variant: ppl-vi check examples/coin_fairness.py:NAME -----------------------


def _flipped_kl(batch, draws):
    nll, kl = terms(batch, draws)
    return {"lik": nll, "kl": -kl}


def _kl_per_datapoint(batch, draws):
    """The global KL added to every toss's term: counted B times."""
    nll, kl = terms(batch, draws)
    return nll + kl


def _mean_likelihood(batch, draws):
    """The likelihood averaged over the batch where the ELBO sums it."""
    nll, kl = terms(batch, draws)
    return nll.mean() + kl


flipped_kl = {"bound": _flipped_kl}
kl_per_datapoint = {"bound": _kl_per_datapoint}
mean_likelihood = {"bound": _mean_likelihood}
