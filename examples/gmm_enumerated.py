"""A mixture of Gaussians as Pyro's GMM tutorial writes it: the assignment enumerated in the model
(@config_enumerate), the component means in their own pyro.plate("components"), checked against a
hand-derived bound.

    ppl-vi check examples/gmm_enumerated.py                     # the right bound: PASS (TraceEnum_ELBO chosen)
    ppl-vi check examples/gmm_enumerated.py:dropped_constant    # FAIL, "constant": ½ log 2π per datapoint
    ppl-vi check examples/gmm_enumerated.py:flipped_kl          # FAIL, "sign": the global KL term flipped
    ppl-vi check examples/gmm_enumerated.py:missing_entropy     # FAIL, "missing entropy" of q(scale)

The model, for B = 12 points x_i ∈ R and C = 2 components::

    w ~ Dirichlet(0.5, 0.5),   σ ~ LogNormal(0, 2),   μ_c ~ N(0, 10²) in plate "components",
    a_i ~ Categorical(w) (enumerated: summed out, never sampled),   x_i | a_i ~ N(μ_{a_i}, σ²)

and a guide over the global latents: q(w) = Dirichlet(α), q(σ) = LogNormal(m, s²), q(μ_c) = N(m_c, s_c²).
The component means μ are global latents even though they sit in a plate: the checker tells them
apart from the datapoints by the data plate's name. The hand bound, as named terms::

    "lik"    (1/K) Σ_k -log Σ_c w_kc N(x_i; μ_kc, σ_k²)                                   (B,)
    "kl"     (1/K) Σ_k [log q(w_k, σ_k, μ_k) - log p(w_k, σ_k, μ_k)]                          ()

Indexing ``locs[assignment]`` does not broadcast over a particle dim, so the checker draws the K
particles one guide run at a time (and says so).
"""

import math

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import config_enumerate
from torch.distributions import constraints

DT = torch.float64
C = 2
LOG_2PI = math.log(2 * math.pi)

batch = {"data": torch.tensor([0.0, 1.0, 10.0, 11.0, 12.0, -0.5, 0.4, 10.5, 9.2, 1.3, 11.6, -1.1], dtype=DT)}


@config_enumerate
def model(data):
    weights = pyro.sample("weights", dist.Dirichlet(torch.full((C,), 0.5, dtype=DT)))
    scale = pyro.sample("scale", dist.LogNormal(torch.tensor(0.0, dtype=DT), 2.0))
    with pyro.plate("components", C):
        locs = pyro.sample("locs", dist.Normal(torch.tensor(0.0, dtype=DT), 10.0))
    with pyro.plate("data", len(data)):
        assignment = pyro.sample("assignment", dist.Categorical(weights))
        pyro.sample("obs", dist.Normal(locs[assignment], scale), obs=data)


def guide(data):
    alpha = pyro.param("alpha", torch.tensor([2.0, 3.0], dtype=DT), constraint=constraints.positive)
    m, s = pyro.param("m", torch.tensor(0.3, dtype=DT)), pyro.param("s", torch.tensor(0.2, dtype=DT),
                                                                    constraint=constraints.positive)
    m_locs = pyro.param("m_locs", torch.tensor([0.5, 10.0], dtype=DT))
    s_locs = pyro.param("s_locs", torch.tensor([0.4, 0.6], dtype=DT), constraint=constraints.positive)
    pyro.sample("weights", dist.Dirichlet(alpha))
    pyro.sample("scale", dist.LogNormal(m, s))
    with pyro.plate("components", C):
        pyro.sample("locs", dist.Normal(m_locs, s_locs))


def log_normal(v, loc, scale):
    return -0.5 * ((v - loc) / scale) ** 2 - torch.log(torch.as_tensor(scale, dtype=DT)) - 0.5 * LOG_2PI


def pieces(batch, draws):
    """-log Σ_c w_c N(x_i; μ_c, σ²) (B,), and the global latents' log q - log p, split (K,) each."""
    p = pyro.param
    w, sigma, locs = draws["weights"], draws["scale"], draws["locs"]  # (K, C), (K,), (K, C)
    x = batch["data"]
    per_component = torch.log(w).unsqueeze(1) + log_normal(x.unsqueeze(-1), locs.unsqueeze(1),
                                                           sigma.reshape(-1, 1, 1))  # (K, B, C)
    nll = -torch.logsumexp(per_component, -1).mean(0)
    log_q = {"weights": dist.Dirichlet(p("alpha")).log_prob(w),
             "scale": log_normal(torch.log(sigma), p("m"), p("s")) - torch.log(sigma),
             "locs": log_normal(locs, p("m_locs"), p("s_locs")).sum(-1)}
    log_p = {"weights": dist.Dirichlet(torch.full((C,), 0.5, dtype=DT)).log_prob(w),
             "scale": log_normal(torch.log(sigma), 0.0, 2.0) - torch.log(sigma),
             "locs": log_normal(locs, 0.0, 10.0).sum(-1)}
    return nll, log_q, log_p


def bound(batch, draws):
    nll, log_q, log_p = pieces(batch, draws)
    return {"lik": nll, "kl": sum(log_q[n] - log_p[n] for n in log_q).mean(0)}


# ---- classic slips: ppl-vi check examples/gmm_enumerated.py:NAME ----------------------------------------


def _dropped_constant(batch, draws):
    """The mixture's Gaussian without its ½ log 2π: a constant at every datapoint."""
    nll, log_q, log_p = pieces(batch, draws)
    return {"lik": nll - 0.5 * LOG_2PI, "kl": sum(log_q[n] - log_p[n] for n in log_q).mean(0)}


def _flipped_kl(batch, draws):
    nll, log_q, log_p = pieces(batch, draws)
    return {"lik": nll, "kl": -sum(log_q[n] - log_p[n] for n in log_q).mean(0)}


def _missing_entropy(batch, draws):
    """log q(σ) left out."""
    nll, log_q, log_p = pieces(batch, draws)
    return {"lik": nll, "kl": sum(log_q[n] * (n != "scale") - log_p[n] for n in log_q).mean(0)}


dropped_constant = {"bound": _dropped_constant}
flipped_kl = {"bound": _flipped_kl}
missing_entropy = {"bound": _missing_entropy}
