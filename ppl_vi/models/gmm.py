"""Gaussian mixture model with a discrete latent assignment.

Generative story::

    c ~ Categorical(π),            π = softmax(logits)
    x | c ~ N(μ_c, diag σ_c²)

so log p(x) = logsumexp_c [log π_c + log N(x; μ_c, σ_c²)] is exact, and so is the posterior
p(c|x) ∝ π_c N(x; μ_c, σ_c²) (the responsibilities).

The model marks ``c`` for parallel enumeration: with ``TraceEnum_ELBO`` and the ``"marginal"``
guide (no latent site) the loss is exactly -log p(x). Guides:

* ``"amortised"``: q(c|x) = Categorical(softmax(MLP(x))). Trace_ELBO samples c (score-function
  gradient); TraceEnum_ELBO sums over c, which gives the ELBO exactly;
* ``"posterior"``: q(c|x) = p(c|x) from the current parameters, so ELBO = log p(x);
* ``"prior"``: q(c|x) = p(c), the naive objective ELBO = E_p(c)[log p(x|c)];
* ``"marginal"``: no latent site at all (the model enumerates c).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn

from ppl_vi import bounds
from ppl_vi.errors import ConfigError
from ppl_vi.loss_registry import ModelTraits
from ppl_vi.models.base import Batch, Draws, LatentModel, register

GUIDES = ("amortised", "posterior", "prior", "marginal")


@register(
    "gmm",
    description="Gaussian mixture, c enumerated in the model (exact log p(x)), amortised q(c|x)",
    data="gmm",
    defaults={"loss": "enum", "k": 1, "epochs": 50, "batch_size": 500, "lr": 0.05, "hidden": [32]},
)
class GMM(LatentModel):
    latent_sites = ("c",)
    #: c is discrete: sampled by the guide (score function), enumerable; :meth:`traits` for the "marginal" guide
    model_traits = ModelTraits(discrete_guide=True, enumerable=True)
    exact_guide_kind = "posterior"

    def __init__(self, num_components: int, x_dim: int, hidden: int = 32, guide: str = "amortised",
                 init_locs: Tensor | None = None):
        super().__init__()
        if guide not in GUIDES:
            raise ConfigError(f"unknown guide {guide!r} for gmm; expected one of {GUIDES}")
        if num_components < 1:
            raise ConfigError(f"num_components must be >= 1, got {num_components}")
        self.num_components, self.x_dim, self.guide_kind = num_components, x_dim, guide
        self.latent_sites = () if guide == "marginal" else ("c",)
        self.logits = nn.Parameter(torch.zeros(num_components))
        self.locs = nn.Parameter(init_locs.clone() if init_locs is not None else torch.randn(num_components, x_dim))
        self.log_scales = nn.Parameter(torch.zeros(num_components, x_dim))
        self.encoder = nn.Sequential(nn.Linear(x_dim, hidden), nn.Tanh(), nn.Linear(hidden, num_components))

    @classmethod
    def traits(cls, config=None) -> ModelTraits:
        """:attr:`model_traits`; with the "marginal" guide, c is summed out in the model only."""
        if getattr(config, "guide", None) == "marginal":
            return ModelTraits(enumerable=True, model_enumerated=True, guide_latents=False)
        return cls.model_traits

    @classmethod
    def from_config(cls, config, data_info) -> "GMM":
        generator = torch.Generator().manual_seed(config.seed)
        x = data_info["train_x"]
        if x.shape[0] < config.components:
            raise ConfigError(f"n_train={x.shape[0]} is fewer than components={config.components}: the means start at "
                              "distinct training points; expected n_train >= components")
        init = x[torch.randperm(x.shape[0], generator=generator)[: config.components]].float()
        return cls(config.components, data_info["x_dim"], config.hidden[0], config.guide or "amortised", init_locs=init)

    # ---- the Pyro pair -------------------------------------------------------------------
    def model(self, x: Tensor, **_):
        if self.use_param_store:  # off in the trainer's hot path
            pyro.module("gmm", self)
        with pyro.plate("data", x.shape[0], dim=-1, device=x.device):
            c = pyro.sample("c", dist.Categorical(logits=self.logits), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(self.locs[c], self.scales[c]).to_event(1), obs=x)

    def guide(self, x: Tensor, **_):
        if self.use_param_store:  # off in the trainer's hot path
            pyro.module("gmm", self)
        if self.guide_kind == "marginal":
            return
        with pyro.plate("data", x.shape[0], dim=-1, device=x.device):
            pyro.sample("c", dist.Categorical(logits=self.guide_logits(x)), infer={"enumerate": "parallel"})

    # ---- closed forms ----------------------------------------------------------------------
    @property
    def scales(self) -> Tensor:
        return self.log_scales.exp()

    def log_weights(self) -> Tensor:
        """log π, normalised."""
        return torch.log_softmax(self.logits, dim=-1)

    def log_joint_all(self, x: Tensor) -> Tensor:
        """log p(x, c) for every c: (..., C)."""
        return self.log_weights() + bounds.log_normal(x.unsqueeze(-2), self.locs, self.scales)

    def guide_logits(self, x: Tensor) -> Tensor:
        """Logits of q(c|x), shape (B, C)."""
        if self.guide_kind == "amortised":
            return self.encoder(x)
        if self.guide_kind == "posterior":
            return self.log_joint_all(x)
        return self.logits.expand(x.shape[0], self.num_components)

    def fitted_parameters(self) -> dict:
        """Weights, means and scales of the fit, as lists (for metrics.json)."""
        return {"weights": self.log_weights().exp().tolist(), "means": self.locs.tolist(), "scales": self.scales.tolist()}

    def exact_log_likelihood(self, batch: Batch) -> Tensor:
        """log p(x) = log Σ_c π_c N(x; μ_c, σ_c²), per datapoint."""
        return bounds.log_normal_mixture(batch["x"], self.log_weights(), self.locs, self.scales)

    def posterior_kl(self, batch: Batch) -> Tensor:
        """KL(q(c|x) || p(c|x)), the gap log p(x) - ELBO, per datapoint."""
        x = batch["x"]
        return bounds.kl_categorical(self.guide_logits(x), self.log_joint_all(x))

    # ---- hand-derived bounds ----------------------------------------------------------------
    def log_terms(self, batch: Batch, draws: Draws):
        """log p(x|c), log p(c), log q(c|x) at draws c of shape (K, B); each (K, B)."""
        x, c = batch["x"], draws["c"]
        log_px_given_c = bounds.log_normal(x, self.locs[c], self.scales[c])
        log_pc = self.log_weights()[c]
        log_qc = bounds.log_categorical(c, self.guide_logits(x).expand(c.shape + (self.num_components,)))
        return log_px_given_c, log_pc, log_qc

    def hand_negative_elbo(self, batch: Batch, draws: Draws, kl: str = "mc", beta: float = 1.0) -> Tensor:
        """-ELBO per datapoint.

        ``kl="mc"``: at sampled c, with the score-function surrogate that Trace_ELBO uses for a
        discrete guide: the value is -(1/K) Σ_k [log p(x|c_k) + β (log p(c_k) - log q(c_k|x))] and
        its gradient is that of -(1/K) Σ_k [log p(x|c_k) + β log p(c_k) + log q(c_k|x) · stop_grad(w_k)],
        w_k the β-weighted ELBO term (Pyro scales log_r by β but not the score function).
        ``kl="analytic"``: the expectation over c in closed form,
        -Σ_c q(c|x) log p(x|c) + β KL(q(c|x) || π).
        """
        x = batch["x"]
        if self.guide_kind == "marginal":
            return -self.exact_log_likelihood(batch)
        if kl == "analytic":
            q_logits = self.guide_logits(x)
            expected_log_lik = (q_logits.softmax(-1) * (self.log_joint_all(x) - self.log_weights())).sum(-1)
            return -expected_log_lik + beta * bounds.kl_categorical(q_logits, self.logits.expand_as(q_logits))
        if kl != "mc":
            raise ConfigError(f"unknown KL estimator {kl!r}; expected 'mc' or 'analytic'")
        log_px_given_c, log_pc, log_qc = self.log_terms(batch, draws)
        value = bounds.negative_elbo_mc(log_px_given_c, log_pc, log_qc, beta)
        elbo_terms = log_px_given_c + beta * (log_pc - log_qc)  # (K, B)
        surrogate = -(log_px_given_c + beta * log_pc + log_qc * elbo_terms.detach()).mean(0)
        return value.detach() + (surrogate - surrogate.detach())

    def hand_iwae_bound(self, batch: Batch, draws: Draws, beta: float = 1.0) -> Tensor:
        """log p(x) itself with the marginal guide (c summed out in the model), else LatentModel's L_K."""
        if self.guide_kind == "marginal":
            return self.exact_log_likelihood(batch)
        return super().hand_iwae_bound(batch, draws, beta)

    def hand_vimco_bound(self, batch: Batch, draws: Draws) -> Tensor:
        """log p(x) with the marginal guide (every weight is p(x)), else VIMCO's surrogate on sampled c."""
        if self.guide_kind == "marginal":
            return self.exact_log_likelihood(batch)
        return super().hand_vimco_bound(batch, draws)
