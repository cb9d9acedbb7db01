"""The coin of Pyro's SVI tutorial with an autoguide, AutoNormal (a Normal on logit f, mapped back by a sigmoid:
an auxiliary site "f_unconstrained" and a Delta at f), as the tutorials write guides (tests/test_check_userfiles.py).

    f ~ Beta(10, 10),   x_i | f ~ Bernoulli(f);   q: u ~ N(loc, scale²), f = sigmoid(u)

    log q(f) = log N(logit f; loc, scale²) - log|df/du|,   log|df/du| = log f + log(1 - f)

Variants (FILE.py:NAME): nojac (the log-Jacobian of the autoguide's transform left out).
"""

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.autoguide import AutoNormal
from pyro.infer.autoguide.initialization import init_to_value

DT = torch.float64
batch = {"data": torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0], dtype=DT)}
PRIOR = dist.Beta(torch.tensor(10.0, dtype=DT), torch.tensor(10.0, dtype=DT))


def model(data):
    f = pyro.sample("f", PRIOR)
    with pyro.plate("data", len(data)):
        pyro.sample("obs", dist.Bernoulli(f), obs=data)


guide = AutoNormal(model, init_loc_fn=init_to_value(values={"f": torch.tensor(0.55, dtype=DT)}), init_scale=0.3)
guide(batch["data"])  # its parameters exist before the bound reads them


def parts(batch, draws, jacobian=True):
    f = draws["f"]  # (K,)
    log_q = dist.Normal(guide.locs.f, guide.scales.f).log_prob(torch.logit(f))
    if jacobian:
        log_q = log_q - (torch.log(f) + torch.log1p(-f))
    nll = -dist.Bernoulli(f.unsqueeze(-1)).log_prob(batch["data"]).mean(0)  # (B,)
    return nll, (log_q - PRIOR.log_prob(f)).mean(0)


def bound(batch, draws):
    nll, kl = parts(batch, draws)
    return {"lik": nll, "kl": kl}


def _nojac(batch, draws):
    nll, kl = parts(batch, draws, jacobian=False)
    return {"lik": nll, "kl": kl}


nojac = {"bound": _nojac}
