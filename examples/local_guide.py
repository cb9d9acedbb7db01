"""A guide with per-datapoint (non-amortised) parameters, the classic local guide of Pyro's tutorials, on a
Normal-Normal model with a subsampled data plate, checked against a hand-derived bound.

    ppl-vi check examples/local_guide.py                       # the right bounds: PASS
    ppl-vi check examples/local_guide.py:flipped_kl            # FAIL, "sign": the KL's sign flipped
    ppl-vi check examples/local_guide.py:dropped_constant      # FAIL, "constant": -½ log 2π dropped
    ppl-vi check examples/local_guide.py:per_particle          # FAIL, "per datapoint": (K, B), not (B,)
    ppl-vi check examples/local_guide.py:scale_left_out        # FAIL, "scale": the minibatch scale N/B left out

The model, for a minibatch of B = 16 of N = 400 datapoints (Pyro scales every site of the subsampled
plate by N/B = 25)::

    z_i ~ N(0, 1),   x_i | z_i ~ N(z_i, 1)            so  p(x_i) = N(0, 2) exactly

and the guide q(z_i) = N(m_i, s_i²), with one (m_i, log s_i) per datapoint of the minibatch: plain
tensors of width 16, not a network of x. The checker never slices such a batch: every row runs on the
whole batch. The hand bounds, per datapoint, for K draws z_k ~ q::

    -ELBO(x_i)   = N/B · (1/K) Σ_k [ -log N(x_i; z_ik, 1) + log N(z_ik; m_i, s_i²) - log N(z_ik; 0, 1) ]
    -IWAE_K(x_i) = -N/B · log (1/K) Σ_k N(x_i; z_ik, 1) N(z_ik; 0, 1) / N(z_ik; m_i, s_i²)
"""

import math

import pyro
import pyro.distributions as dist
import torch

N, B = 400, 16
C = N / B  # the minibatch scale
DT = torch.float64
LOG_2PI = math.log(2 * math.pi)

torch.manual_seed(0)
batch = {"x": math.sqrt(2.0) * torch.randn(B, dtype=DT)}
m = torch.zeros(B, dtype=DT).add_(0.3).requires_grad_(True)  # one location per datapoint of the minibatch
log_s = torch.full((B,), -0.5, dtype=DT, requires_grad=True)


def model(x):
    with pyro.plate("data", N, subsample=torch.arange(x.shape[0])):
        z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def guide(x):
    with pyro.plate("data", N, subsample=torch.arange(x.shape[0])):
        pyro.sample("z", dist.Normal(m, log_s.exp()))


def log_normal(v, loc, scale):
    scale = torch.as_tensor(scale, dtype=DT)
    return -0.5 * ((v - loc) / scale) ** 2 - torch.log(scale) - 0.5 * LOG_2PI


def log_terms(x, z):
    """log p(x|z), log p(z), log q(z), each (K, B)."""
    return log_normal(x, z, 1.0), log_normal(z, 0.0, 1.0), log_normal(z, m, log_s.exp())


def bound(batch, draws):
    log_lik, log_prior, log_q = log_terms(batch["x"], draws["z"])
    return {"rec": C * -log_lik.mean(0), "kl": C * (log_q - log_prior).mean(0)}


def iwae_bound(batch, draws):
    log_lik, log_prior, log_q = log_terms(batch["x"], draws["z"])
    log_w = log_lik + log_prior - log_q
    return -C * (torch.logsumexp(log_w, 0) - math.log(log_w.shape[0]))


def exact_log_likelihood(batch):
    """log p(x_i) = log N(x_i; 0, 2), per datapoint."""
    return log_normal(batch["x"], 0.0, math.sqrt(2.0))


# ---- classic slips: ppl-vi check examples/local_guide.py:NAME -------------------------------------------


def _flipped_kl(batch, draws):
    log_lik, log_prior, log_q = log_terms(batch["x"], draws["z"])
    return {"rec": C * -log_lik.mean(0), "kl": C * (log_prior - log_q).mean(0)}


def _dropped_constant(batch, draws):
    log_lik, log_prior, log_q = log_terms(batch["x"], draws["z"])
    return {"rec": C * -(log_lik + 0.5 * LOG_2PI).mean(0), "kl": C * (log_q - log_prior).mean(0)}


def _per_particle(batch, draws):
    log_lik, log_prior, log_q = log_terms(batch["x"], draws["z"])
    return C * (log_q - log_prior - log_lik)


def _scale_left_out(batch, draws):
    log_lik, log_prior, log_q = log_terms(batch["x"], draws["z"])
    return (log_q - log_prior - log_lik).mean(0)


flipped_kl = {"bound": _flipped_kl}
dropped_constant = {"bound": _dropped_constant}
per_particle = {"bound": _per_particle}
scale_left_out = {"bound": _scale_left_out}
