"""Two local latents per datapoint with per-datapoint (non-amortised) guide parameters: slips at both sites
(tests/test_check_userfiles.py).

    a_i, b_i ~ N(0, 1),   x_i | a_i, b_i ~ N(a_i + b_i, 1);   q(a_i) = N(ma_i, sa_i²),   q(b_i) = N(mb_i, sb_i²)

Variants (FILE.py:NAME): kl_mean / kl_mean_named (both sites' log q - log p averaged over the batch, each
datapoint given the mean), noent2 (log q of both guide sites left out).
"""

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

DT = torch.float64
B = 6
torch.manual_seed(4)
batch = {"x": torch.randn(B, dtype=DT)}


def model(x):
    with pyro.plate("data", B):
        a = pyro.sample("a", dist.Normal(torch.zeros(B, dtype=DT), 1.))
        b = pyro.sample("b", dist.Normal(torch.zeros(B, dtype=DT), 1.))
        pyro.sample("x", dist.Normal(a + b, 1.), obs=x)


def guide(x):
    p = pyro.param
    with pyro.plate("data", B):
        pyro.sample("a", dist.Normal(p("ma", torch.linspace(-1, 1, B, dtype=DT)),
                                 p("sa", torch.full((B,), .6, dtype=DT), constraint=constraints.positive)))
        pyro.sample("b", dist.Normal(p("mb", torch.linspace(1, -.5, B, dtype=DT)),
                                 p("sb", torch.full((B,), .4, dtype=DT), constraint=constraints.positive)))


def parts(batch, draws):
    p = pyro.param
    a, b = draws["a"], draws["b"]
    nll = -dist.Normal(a + b, 1.).log_prob(batch["x"]).mean(0)
    ka = (dist.Normal(p("ma"), p("sa")).log_prob(a) - dist.Normal(0., 1.).log_prob(a)).mean(0)
    kb = (dist.Normal(p("mb"), p("sb")).log_prob(b) - dist.Normal(0., 1.).log_prob(b)).mean(0)
    return nll, ka, kb


def bound(batch, draws):
    nll, ka, kb = parts(batch, draws)
    return nll + ka + kb


def _kl_mean(batch, draws):
    nll, ka, kb = parts(batch, draws)
    return nll + (ka + kb).mean()


def _kl_mean_named(batch, draws):
    nll, ka, kb = parts(batch, draws)
    return {"lik": nll, "kl": (ka + kb).mean().expand(B)}


def _noent2(batch, draws):
    p = pyro.param
    nll, ka, kb = parts(batch, draws)
    a, b = draws["a"], draws["b"]
    log_qa = dist.Normal(p("ma"), p("sa")).log_prob(a).mean(0)
    log_qb = dist.Normal(p("mb"), p("sb")).log_prob(b).mean(0)
    return nll + ka + kb - log_qa - log_qb


kl_mean = {"bound": _kl_mean}
kl_mean_named = {"bound": _kl_mean_named}
noent2 = {"bound": _noent2}
