"""Two global scales with LogNormal guides beside a local z with per-datapoint guide parameters: the slips
that touch two or more sites at once (tests/test_check_userfiles.py).

    s1, s2 ~ HalfNormal(3),   z_i ~ N(0, 1),   x_i | z_i, s1 ~ N(z_i, s1²),   y_i | s2 ~ N(0, s2²)
    q(s1) = LogNormal(m1, v1²),   q(s2) = LogNormal(m2, v2²),   q(z_i) = N(mz_i, sz_i²)

Variants (FILE.py:NAME): nojac / nojac_total (the log-Jacobian of both LogNormal guides left out), noent /
noent_total (log q of every guide site left out), lik_mean (both observed sites averaged over the batch),
both_mean (every per-datapoint term averaged over the batch).
"""

import math

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

DT = torch.float64
B = 6
torch.manual_seed(3)
batch = {"x": torch.randn(B, dtype=DT) * 2, "y": torch.randn(B, dtype=DT)}


def model(x, y):
    s1 = pyro.sample("s1", dist.HalfNormal(torch.tensor(3.0, dtype=DT)))
    s2 = pyro.sample("s2", dist.HalfNormal(torch.tensor(3.0, dtype=DT)))
    with pyro.plate("data", B):
        z = pyro.sample("z", dist.Normal(torch.zeros(B, dtype=DT), 1.0))
        pyro.sample("x", dist.Normal(z, s1), obs=x)
        pyro.sample("y", dist.Normal(0.0, s2).expand([B]), obs=y)  # does not broadcast a particle dim


def guide(x, y):
    p = pyro.param
    pos = constraints.positive
    m1, v1 = p("m1", torch.tensor(0.3, dtype=DT)), p("v1", torch.tensor(0.2, dtype=DT), constraint=pos)
    m2, v2 = p("m2", torch.tensor(-0.1, dtype=DT)), p("v2", torch.tensor(0.3, dtype=DT), constraint=pos)
    mz, sz = p("mz", torch.full((B,), 0.1, dtype=DT)), p("sz", torch.full((B,), 0.5, dtype=DT), constraint=pos)
    pyro.sample("s1", dist.LogNormal(m1, v1))
    pyro.sample("s2", dist.LogNormal(m2, v2))
    with pyro.plate("data", B):
        pyro.sample("z", dist.Normal(mz, sz))


def ln(v, m, s):
    return -0.5 * ((v - m) / s) ** 2 - torch.log(torch.as_tensor(s, dtype=DT)) - 0.5 * math.log(2 * math.pi)


def pieces(batch, draws, jac=True, ent=True):
    """-log p(x, y | ...) (B,), z's log q - log p (B,), the global latents' log q - log p ()."""
    p = pyro.param
    s1, s2, z = draws["s1"], draws["s2"], draws["z"]
    lik = ln(batch["x"], z, s1.unsqueeze(-1)) + ln(batch["y"], 0.0, s2.unsqueeze(-1))  # (K, B)
    kz = (ln(z, p("mz"), p("sz")) if ent else 0.0) - ln(z, 0.0, 1.0)
    half_normal = lambda v: math.log(2.0) + ln(v, 0.0, 3.0)  # noqa: E731
    lq1 = ln(torch.log(s1), p("m1"), p("v1")) - (torch.log(s1) if jac else 0.0)
    lq2 = ln(torch.log(s2), p("m2"), p("v2")) - (torch.log(s2) if jac else 0.0)
    g = (lq1 if ent else 0.0) - half_normal(s1) + (lq2 if ent else 0.0) - half_normal(s2)
    return -lik.mean(0), kz.mean(0), g.mean(0)


def bound(batch, draws):
    lik, kz, g = pieces(batch, draws)
    return {"lik": lik, "local": kz, "global": g}


def _named(**kw):
    def bound(batch, draws):
        lik, kz, g = pieces(batch, draws, **kw)
        return {"lik": lik, "local": kz, "global": g}
    return bound


def _total(**kw):
    def bound(batch, draws):
        lik, kz, g = pieces(batch, draws, **kw)
        return lik.sum() + kz.sum() + g
    return bound


def _lik_mean(batch, draws):
    lik, kz, g = pieces(batch, draws)
    return lik.mean() + kz.sum() + g


def _both_mean(batch, draws):
    lik, kz, g = pieces(batch, draws)
    return lik.mean() + kz.mean() + g


nojac = {"bound": _named(jac=False)}
noent = {"bound": _named(ent=False)}
nojac_total = {"bound": _total(jac=False)}
noent_total = {"bound": _total(ent=False)}
lik_mean = {"bound": _lik_mean}
both_mean = {"bound": _both_mean}
