"""A global pyro.factor (a soft penalty on a global latent, outside the data plate) beside the data's likelihood
(tests/test_check_userfiles.py).

    μ ~ N(0, 3²),   factor "soft" = -½ μ²,   x_i | μ ~ N(μ, 1)           q(μ) = N(m, s²)

    -ELBO = Σ_i (1/K) Σ_k -log N(x_i; μ_k, 1)  +  (1/K) Σ_k [½ μ_k² + log q(μ_k) - log p(μ_k)]

The factor belongs to the batch, once, like a global latent's term. Variants (FILE.py:NAME): flipped_factor
(its sign flipped), factor_per_datapoint (counted once per datapoint), no_factor (left out).
"""

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

DT = torch.float64
torch.manual_seed(5)
batch = {"x": torch.randn(6, dtype=DT) + 0.5}
PRIOR = dist.Normal(torch.tensor(0.0, dtype=DT), torch.tensor(3.0, dtype=DT))


def model(x):
    mu = pyro.sample("mu", PRIOR)
    pyro.factor("soft", -0.5 * mu ** 2)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("obs", dist.Normal(mu, 1.0), obs=x)


def guide(x):
    m = pyro.param("m", torch.tensor(0.2, dtype=DT))
    s = pyro.param("s", torch.tensor(0.5, dtype=DT), constraint=constraints.positive)
    pyro.sample("mu", dist.Normal(m, s))


def terms(batch, draws, soft=1.0):
    mu = draws["mu"]  # (K,)
    nll = -dist.Normal(mu.unsqueeze(-1), 1.0).log_prob(batch["x"]).mean(0)  # (B,)
    kl = (dist.Normal(pyro.param("m"), pyro.param("s")).log_prob(mu) - PRIOR.log_prob(mu)).mean(0)  # ()
    return {"lik": nll, "kl": kl, "soft": soft * (0.5 * mu ** 2).mean(0)}


def bound(batch, draws):
    return terms(batch, draws)

flipped_factor = {"bound": lambda batch, draws: terms(batch, draws, soft=-1.0)}
factor_per_datapoint = {"bound": lambda batch, draws: (terms(batch, draws)["lik"] + terms(batch, draws)["soft"]).sum()
                        + terms(batch, draws)["kl"]}  # the factor added to every datapoint's term
no_factor = {"bound": lambda batch, draws: terms(batch, draws, soft=0.0)}
