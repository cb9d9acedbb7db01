"""A guide that samples a discrete switch c_i (no rsample) beside a Normal z_i, per-datapoint parameters, and a
hand bound with both KLs in closed form (torch's kl_divergence): the right bound passes, held against
TraceMeanField_ELBO's value (tests/test_check_userfiles.py).

    c_i ~ Bernoulli(0.3),   z_i ~ N(0, 1),   x_i | z_i, c_i ~ N(z_i + 2 c_i, 1)
    q(c_i) = Bernoulli(pc_i),   q(z_i) = N(m_i, s_i²)

    -ELBO(x_i) = (1/K) Σ_k -log N(x_i; z_ik + 2 c_ik, 1) + KL(q(c_i) || p(c_i)) + KL(q(z_i) || p(z_i))

Variants (FILE.py:NAME): whole (one tensor, right), flip_c (the KL of c with its sign flipped), no_kl_c (the
KL of c left out), dropped_constant (the likelihood's ½ log 2π dropped).
"""

import math

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints, kl_divergence

DT = torch.float64
B = 6
torch.manual_seed(2)
batch = {"x": torch.randn(B, dtype=DT) + 1.0}
PRIOR_C = torch.full((B,), 0.3, dtype=DT)


def model(x):
    with pyro.plate("data", x.shape[0]):
        c = pyro.sample("c", dist.Bernoulli(PRIOR_C))
        z = pyro.sample("z", dist.Normal(torch.zeros(B, dtype=DT), 1.0))
        pyro.sample("x", dist.Normal(z + 2 * c, 1.0), obs=x)


def guide(x):
    pc = pyro.param("pc", torch.full((B,), 0.4, dtype=DT), constraint=constraints.unit_interval)
    m = pyro.param("m", torch.full((B,), 0.2, dtype=DT))
    s = pyro.param("s", torch.full((B,), 0.7, dtype=DT), constraint=constraints.positive)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("c", dist.Bernoulli(pc))
        pyro.sample("z", dist.Normal(m, s))


def parts(batch, draws):
    p = pyro.param
    c, z = draws["c"], draws["z"]
    nll = -dist.Normal(z + 2 * c, 1.0).log_prob(batch["x"]).mean(0)
    kl_c = kl_divergence(dist.Bernoulli(p("pc")), dist.Bernoulli(PRIOR_C))
    kl_z = kl_divergence(dist.Normal(p("m"), p("s")), dist.Normal(0.0, 1.0))
    return nll, kl_c, kl_z


def bound(batch, draws):
    nll, kl_c, kl_z = parts(batch, draws)
    return {"lik": nll, "kl_c": kl_c, "kl_z": kl_z}


def _whole(batch, draws):
    nll, kl_c, kl_z = parts(batch, draws)
    return nll + kl_c + kl_z


def _flip_c(batch, draws):
    nll, kl_c, kl_z = parts(batch, draws)
    return {"lik": nll, "kl_c": -kl_c, "kl_z": kl_z}


def _no_kl_c(batch, draws):
    nll, kl_c, kl_z = parts(batch, draws)
    return nll + kl_z


def _dropped_constant(batch, draws):
    nll, kl_c, kl_z = parts(batch, draws)
    return nll - 0.5 * math.log(2 * math.pi) + kl_c + kl_z


whole = {"bound": _whole}
flip_c = {"bound": _flip_c}
no_kl_c = {"bound": _no_kl_c}
dropped_constant = {"bound": _dropped_constant}
