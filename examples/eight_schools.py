"""Eight schools, non-centred, as Pyro's and NumPyro's examples write it: global μ and τ, a local θ̃ per
school, checked against a hand-derived bound given as named terms (per school, and once for the batch).

    ppl-vi check examples/eight_schools.py                        # the right bound: PASS
    ppl-vi check examples/eight_schools.py:missing_jacobian       # FAIL, "missing log-Jacobian" of q(τ)
    ppl-vi check examples/eight_schools.py:global_per_school      # FAIL, "scale": the global term counted 8 times
    ppl-vi check examples/eight_schools.py:flipped_local_kl       # FAIL, "sign": the schools' KL term flipped

The model, for J = 8 schools with effects y_j and known standard errors σ_j::

    μ ~ N(0, 5²),   τ ~ HalfCauchy(5),   θ̃_j ~ N(0, 1),   y_j | μ, τ, θ̃_j ~ N(μ + τ θ̃_j, σ_j²)

The schools sit in pyro.plate("J", 8), as NumPyro's example names it: the file says so with
``data_plate = "J"``. The guide is mean field, with per-school (non-amortised) parameters for θ̃:
q(μ) = N(m_μ, s_μ²), q(τ) = LogNormal(m_τ, s_τ²), q(θ̃_j) = N(m_j, s_j²). μ and τ are global latents,
θ̃ local. The hand bound as named terms: per school (B,) the likelihood and θ̃'s log q - log p; once
for the batch () the global latents' log q - log p::

    "lik"    (1/K) Σ_k -log N(y_j; μ_k + τ_k θ̃_jk, σ_j²)                               (8,)
    "local"  (1/K) Σ_k [log q(θ̃_jk) - log N(θ̃_jk; 0, 1)]                               (8,)
    "global" (1/K) Σ_k [log q(μ_k) - log p(μ_k) + log q(τ_k) - log p(τ_k)]              ()

with log q(τ) = log N(log τ; m_τ, s_τ²) - log τ (the LogNormal's Jacobian) and
log p(τ) = log 2 - log(π · 5 · (1 + (τ/5)²)) (the half-Cauchy).
"""

import math

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

DT = torch.float64
LOG_2PI = math.log(2 * math.pi)
J = 8

batch = {"y": torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0], dtype=DT),
         "sigma": torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0], dtype=DT)}
data_plate = "J"  # the plate of the schools (the checker's default name is "data")


def model(y, sigma):
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=DT), 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(torch.tensor(5.0, dtype=DT)))
    with pyro.plate("J", y.shape[0]):
        theta_tilde = pyro.sample("theta_tilde", dist.Normal(torch.tensor(0.0, dtype=DT), 1.0))
        pyro.sample("obs", dist.Normal(mu + tau * theta_tilde, sigma), obs=y)


def guide(y, sigma):
    m_mu = pyro.param("m_mu", torch.tensor(5.0, dtype=DT))
    s_mu = pyro.param("s_mu", torch.tensor(2.0, dtype=DT), constraint=constraints.positive)
    m_tau = pyro.param("m_tau", torch.tensor(1.0, dtype=DT))
    s_tau = pyro.param("s_tau", torch.tensor(0.5, dtype=DT), constraint=constraints.positive)
    m_theta = pyro.param("m_theta", torch.linspace(-0.5, 0.5, J, dtype=DT))
    s_theta = pyro.param("s_theta", torch.full((J,), 0.8, dtype=DT), constraint=constraints.positive)
    pyro.sample("mu", dist.Normal(m_mu, s_mu))
    pyro.sample("tau", dist.LogNormal(m_tau, s_tau))
    with pyro.plate("J", y.shape[0]):
        pyro.sample("theta_tilde", dist.Normal(m_theta, s_theta))


def log_normal(v, loc, scale):
    """log N(v; loc, scale²), every constant kept."""
    return -0.5 * ((v - loc) / scale) ** 2 - torch.log(torch.as_tensor(scale, dtype=DT)) - 0.5 * LOG_2PI


def log_half_cauchy(v, scale):
    """log HalfCauchy(v; scale) = log 2 - log(π scale (1 + (v / scale)²))."""
    return math.log(2.0) - torch.log(math.pi * scale * (1 + (v / scale) ** 2))


def pieces(batch, draws, jacobian=True):
    """The three named terms at the K draws: mu, tau (K,), theta_tilde (K, 8)."""
    p = pyro.param
    mu, tau, theta = draws["mu"], draws["tau"], draws["theta_tilde"]
    log_lik = log_normal(batch["y"], mu.unsqueeze(-1) + tau.unsqueeze(-1) * theta, batch["sigma"])  # (K, 8)
    local = log_normal(theta, p("m_theta"), p("s_theta")) - log_normal(theta, 0.0, 1.0)  # (K, 8)
    log_q_tau = log_normal(torch.log(tau), p("m_tau"), p("s_tau")) - (torch.log(tau) if jacobian else 0.0)
    glob = (log_normal(mu, p("m_mu"), p("s_mu")) - log_normal(mu, 0.0, 5.0)
            + log_q_tau - log_half_cauchy(tau, 5.0))  # (K,)
    return -log_lik.mean(0), local.mean(0), glob.mean(0)


def bound(batch, draws):
    lik, local, glob = pieces(batch, draws)
    return {"lik": lik, "local": local, "global": glob}


# ---- classic slips: ppl-vi check examples/eight_schools.py:NAME -----------------------------------------


def _missing_jacobian(batch, draws):
    lik, local, glob = pieces(batch, draws, jacobian=False)
    return {"lik": lik, "local": local, "global": glob}


def _global_per_school(batch, draws):
    """The global term added to every school's value: counted J times."""
    lik, local, glob = pieces(batch, draws)
    return lik + local + glob


def _flipped_local_kl(batch, draws):
    lik, local, glob = pieces(batch, draws)
    return {"lik": lik, "local": -local, "global": glob}


missing_jacobian = {"bound": _missing_jacobian}
global_per_school = {"bound": _global_per_school}
flipped_local_kl = {"bound": _flipped_local_kl}
