"""The model/guide protocol every ppl_vi model follows, and the registry that names them.

A model is an ``nn.Module`` with

* ``model(**batch)`` and ``guide(**batch)``: the Pyro pair, data in ``pyro.plate("data", ...)``;
* ``hand_negative_elbo(batch, draws, kl="mc"|"analytic", beta=1.0)`` and
  ``hand_iwae_bound(batch, draws)``: the same bounds written by hand from :mod:`ppl_vi.bounds`,
  per datapoint, evaluated at the guide's ``draws`` so the checker can hold them against Pyro's
  losses on the very same sample. :class:`LatentModel` writes both from the model's
  ``log_terms(batch, draws)`` (log p(x|z), log p(z), log q(z|x) at the draws) and, for the
  closed-form KL, ``kl_to_prior(batch)``; a model whose bounds take another form (a discrete
  latent with a score-function surrogate, an enumerated label) overrides them instead;
* optionally ``exact_log_likelihood(batch)`` where log p(x) is tractable;
* its :class:`~ppl_vi.loss_registry.ModelTraits` (``model_traits``, or ``traits(config)``), stated once;
* any of the optional capabilities of :mod:`ppl_vi.models.protocols` (images, a classifier,
  semi-supervised batches, an exact posterior), which callers check with ``isinstance``.

``batch`` is a dict of tensors (``{"x": x}``, or ``{"x": x, "y": y}``) passed to model and guide as
keyword arguments. ``draws`` maps each latent site of the guide to its sampled value with a leading
particle dimension, shape ``(K, B, ...)``, still attached to the autograd graph of the guide's
parameters (the reparameterised path), so gradients of a hand bound are comparable with Pyro's.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Callable, Dict, Optional, Tuple

import pyro
import torch
from pyro import poutine
from torch import Tensor, nn

from ppl_vi import bounds
from ppl_vi.errors import ConfigError
from ppl_vi.loss_registry import ModelTraits
from ppl_vi.sites import PARTICLE_PLATE, is_latent

Batch = Dict[str, Optional[Tensor]]
Draws = Dict[str, Tensor]


class EnumeratedDraws(dict):
    """Draws in which the guide's discrete site is enumerated, not sampled (``enum_draws`` of a
    semi-supervised model): the discrete site holds its support, and the sites drawn after it have a
    leading class dimension, (C, K, B, ...). A hand bound takes its exact-in-y form on these."""


class LatentModel(nn.Module):
    """Base class: a Pyro model/guide pair with its hand-derived bounds."""

    #: plates the model nests (the data plate); particle plates go to the left of these.
    max_plate_nesting: int = 1
    #: names of the guide's latent sample sites, in the order the guide draws them.
    latent_sites: tuple = ("z",)
    #: the data's dimension D (columns of x), where the model fixes it; evaluation checks x against it.
    x_dim: Optional[int] = None
    #: whether KL(q(z|x) || p(z)) has a closed form (:meth:`kl_to_prior`; TraceMeanField_ELBO).
    has_analytic_kl: bool = False
    #: what decides which losses can train the model: the one statement of its traits (a model whose
    #: traits depend on its config, e.g. the guide it is built with, overrides :meth:`traits`).
    model_traits: ModelTraits = ModelTraits()
    #: the guide the model was built with, for models that offer several (``--guide``); None otherwise.
    guide_kind: Optional[str] = None
    #: the guide setting under which q(z|x) is the exact posterior, where the model has one.
    exact_guide_kind = None
    #: whether ``reconstruct(x, y)`` needs the labels (a class-conditional decoder that cannot predict y).
    needs_labels: bool = False
    #: whether model/guide register the networks in Pyro's param store (``pyro.module``), as plain
    #: ``SVI`` with a ``pyro.optim`` optimiser needs; the trainer's fast path switches it off in
    #: the hot path (it optimises ``module.parameters()`` with a torch optimiser).
    use_param_store: bool = True

    @classmethod
    def traits(cls, config=None) -> ModelTraits:
        """The model's :class:`ModelTraits` under ``config`` (:attr:`model_traits` by default)."""
        return cls.model_traits

    def own_traits(self) -> ModelTraits:
        """The traits of this built model (its guide choice included)."""
        return self.traits(types.SimpleNamespace(guide=self.guide_kind))

    @property
    def latent_reparameterized(self) -> bool:
        """Whether every latent site of the guide is reparameterised (pathwise gradients); False for discrete."""
        return not self.own_traits().discrete_guide

    @property
    def enumerable_guide(self) -> bool:
        """Whether the guide samples a discrete site TraceEnum_ELBO can enumerate."""
        traits = self.own_traits()
        return traits.enumerable and traits.guide_latents

    @property
    def beta_sites(self) -> tuple:
        """The sites β (``--beta``, KL annealing) scales: every latent site of the guide."""
        return tuple(self.latent_sites)

    def make_batch(self, x: Tensor, y: Optional[Tensor] = None) -> Batch:
        """How the model sees a slice of data: ``{"x": x}`` (labels unused) by default."""
        return default_make_batch(x, y)

    def model(self, **batch):  # pragma: no cover - abstract
        raise NotImplementedError

    def guide(self, **batch):  # pragma: no cover - abstract
        raise NotImplementedError

    # ---- the hand-derived bounds: written once here from the model's log-densities -----------
    def log_terms(self, batch: Batch, draws: Draws) -> Tuple[Tensor, Tensor, Tensor]:
        """log p(x|z), log p(z), log q(z|x) at the guide's ``draws`` (K, B, ...); each (K, B).

        What a model implements to inherit :meth:`hand_negative_elbo` and :meth:`hand_iwae_bound`."""
        raise NotImplementedError(f"{type(self).__name__} does not implement log_terms(batch, draws)")

    def kl_to_prior(self, batch: Batch) -> Tensor:
        """KL(q(z|x) || p(z)) in closed form, per datapoint (B,), where the model has one."""
        raise ConfigError(f"{type(self).__name__} has no closed-form KL(q(z|x) || p(z)); use kl='mc'")

    def hand_negative_elbo(self, batch: Batch, draws: Draws, kl: str = "mc", beta: float = 1.0) -> Tensor:
        """Per-datapoint negative ELBO at the K ``draws`` (shape (B,)), written by hand:

            kl="mc":        -ELBO_β(x) ≈ -(1/K) Σ_k [ log p(x|z_k) - β (log q(z_k|x) - log p(z_k)) ]
            kl="analytic":  -ELBO_β(x) ≈ -(1/K) Σ_k log p(x|z_k) + β KL(q(z|x) || p(z))

        from :meth:`log_terms`, and :meth:`kl_to_prior` for the closed-form KL. β = 1 is the ELBO;
        β ≠ 1 the β-VAE objective."""
        log_px_given_z, log_pz, log_qz = self.log_terms(batch, draws)
        if kl == "mc":
            return bounds.negative_elbo_mc(log_px_given_z, log_pz, log_qz, beta)
        if kl == "analytic":
            return bounds.negative_elbo_analytic(log_px_given_z, self.kl_to_prior(batch), beta)
        raise ConfigError(f"unknown KL estimator {kl!r}; expected 'mc' or 'analytic'")

    def hand_iwae_bound(self, batch: Batch, draws: Draws, beta: float = 1.0) -> Tensor:
        """Per-datapoint IWAE bound at the K ``draws`` (shape (B,)), written by hand from :meth:`log_terms`:

            L_K(x) = log (1/K) Σ_k p(x|z_k) p(z_k) / q(z_k|x)

        With β ≠ 1 the β-weighted bound of :func:`ppl_vi.bounds.iwae_bound_beta`,
        β L_K(x) + (1 - β) (1/K) Σ_k log p(x|z_k)."""
        return bounds.iwae_bound_beta(*self.log_terms(batch, draws), beta)

    def hand_path_surrogate(self, batch: Batch, draws: Draws, explicit_weights: Tensor, path_weights: Tensor,
                            beta: float = 1.0) -> Tensor:
        """A per-datapoint surrogate (B,) whose gradient is, for reparameterised draws z_k (K, B, ...),

            Σ_k a_k ∇_θ [log p(x|z_k) + β log p(z_k)]|_z          (explicit: the model's parameters, z held)
          + Σ_k b_k ∂[log p(x|z_k) + β (log p(z_k) - log q(z_k|x))]/∂z_k · ∂z_k/∂φ     (the path through z)

        with a = ``explicit_weights``, b = ``path_weights`` (K, B), both held constant. Written by
        hand from :meth:`log_terms`: ∂/∂z at detached leaves, then chained into the draws. No term
        differentiates log q through its parameters: DReG and STL drop that zero-mean score part."""
        if not torch.is_grad_enabled():  # values only: the surrogate carries gradients and nothing else
            return torch.zeros_like(explicit_weights[0])
        leaves = {n: v.detach().requires_grad_(True) for n, v in draws.items()}
        log_px, log_pz, log_qz = self.log_terms(batch, leaves)
        integrand = log_px + beta * (log_pz - log_qz)  # (K, B)
        dz = torch.autograd.grad((path_weights.detach() * integrand).sum(), list(leaves.values()), retain_graph=True)
        k, b = integrand.shape
        path = sum((g.detach() * draws[n]).reshape(k, b, -1).sum((0, 2)) for n, g in zip(leaves, dz))
        explicit = (explicit_weights.detach() * (log_px + beta * log_pz)).sum(0)
        return explicit + path

    def hand_dreg_bound(self, batch: Batch, draws: Draws) -> Tensor:
        """L_K(x) per datapoint (B,), with the DReG gradient (Tucker et al. 2019), by hand:
        explicit weights w̃_k, path weights w̃_k² (w̃ the normalised importance weights)."""
        log_w = bounds.elbo_mc(*self.log_terms(batch, draws)).detach()  # (K, B)
        normalised = torch.softmax(log_w, dim=0)
        surrogate = self.hand_path_surrogate(batch, draws, normalised, normalised**2)
        return bounds.iwae_bound(log_w) + (surrogate - surrogate.detach())

    def hand_stl_elbo(self, batch: Batch, draws: Draws, beta: float = 1.0) -> Tensor:
        """ELBO_β(x) per datapoint (B,), with the sticking-the-landing gradient (Roeder et al. 2017), by hand:
        explicit and path weights 1/K."""
        k = next(iter(draws.values())).shape[0]
        weights = torch.full(bounds.elbo_mc(*self.log_terms(batch, draws)).shape, 1.0 / k,
                             dtype=next(iter(draws.values())).dtype, device=next(iter(draws.values())).device)
        surrogate = self.hand_path_surrogate(batch, draws, weights, weights, beta)
        value = -self.hand_negative_elbo(batch, draws, kl="mc", beta=beta).detach()
        return value + (surrogate - surrogate.detach())

    def hand_vimco_bound(self, batch: Batch, draws: Draws) -> Tensor:
        """L_K(x) per datapoint (B,), with VIMCO's gradient: :func:`ppl_vi.bounds.vimco_surrogate` on the
        hand log-weights, the score term over log q(z|x) when the latents are discrete."""
        log_px, log_pz, log_qz = self.log_terms(batch, draws)
        score = torch.zeros_like(log_qz) if self.latent_reparameterized else log_qz
        return bounds.vimco_surrogate(bounds.elbo_mc(log_px, log_pz, log_qz), score)

    def exact_log_likelihood(self, batch: Batch) -> Tensor:
        """Per-datapoint exact log p(x) (shape (B,)), where tractable."""
        raise NotImplementedError(f"{type(self).__name__} has no tractable log p(x)")

    @property
    def has_exact_log_likelihood(self) -> bool:
        return type(self).exact_log_likelihood is not LatentModel.exact_log_likelihood

    def sample_draws(self, batch: Batch, num_particles: int, guide: Optional[Callable] = None) -> Draws:
        """Run the guide under a particle plate and return its latent values, (K, B, ...) each."""
        return sample_draws(guide or self.guide, batch, num_particles, self.max_plate_nesting, self.latent_sites)


def sample_draws(guide: Callable, batch: Batch, num_particles: int, max_plate_nesting: int, sites=None) -> Draws:
    """Trace ``guide(**batch)`` inside a ``num_particles`` plate left of the model's plates.

    Returns ``{site: value}`` for the latent (unobserved) sample sites, each with a leading
    particle dimension of size K, even when K = 1.
    """
    plate = pyro.plate(PARTICLE_PLATE, num_particles, dim=-(max_plate_nesting + 1))
    with plate:
        trace = poutine.trace(guide).get_trace(**batch)
    return draws_from_trace(trace, num_particles, max_plate_nesting, sites)


def draws_from_trace(trace, num_particles: int, max_plate_nesting: int, sites=None) -> Draws:
    """Latent values of a guide trace, each given a leading particle dimension of size K."""
    draws = {}
    for name, site in trace.nodes.items():
        if not is_latent(site) or (sites is not None and name not in sites):
            continue
        value = site["value"]
        batch_rank = max_plate_nesting + site["fn"].event_dim
        if value.dim() <= batch_rank:  # no particle dimension: K = 1 without a particle plate
            value = value.unsqueeze(0)
        if value.shape[0] != num_particles:
            value = value.expand((num_particles,) + value.shape[1:])
        draws[name] = value
    return draws


# --------------------------------------------------------------------------------------------
# Registry: a new model is one file plus one ``@register`` line.


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What the CLI, trainer, checker and report need to know about a model."""

    name: str
    cls: type
    description: str
    data: str  # "mnist", "gmm" or "linear-gaussian": the data set it trains on
    defaults: dict  # config overrides for this model (loss, epochs, lr, ...)
    build: Callable  # build(config, data_info) -> LatentModel


REGISTRY: Dict[str, ModelSpec] = {}


def register(name: str, *, description: str, data: str, defaults: Optional[dict] = None, build=None):
    """Class decorator adding a model to :data:`REGISTRY` under ``name``."""

    def decorate(cls):
        builder = build or cls.from_config
        REGISTRY[name] = ModelSpec(name, cls, description, data, dict(defaults or {}), builder)
        return cls

    return decorate


def get_spec(name: str) -> ModelSpec:
    """The registry entry for ``name``, or a ConfigError listing the valid names.

    The built-in models are registered by the time this runs: importing this module imports its package
    first, and ``ppl_vi/models/__init__.py`` imports every built-in model."""
    if name not in REGISTRY:
        raise ConfigError(f"unknown model {name!r}; expected one of: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]



class _ScaleSites(poutine.messenger.Messenger):
    """Multiply the log-density of the named sample sites by ``scale`` (β on the latent site)."""

    def __init__(self, sites, scale):
        super().__init__()
        self.sites, self.scale = frozenset(sites), scale

    def _process_message(self, msg):
        if msg["type"] == "sample" and msg["name"] in self.sites and not msg["is_observed"]:
            msg["scale"] = msg["scale"] * self.scale


def scale_sites(fn: Callable, sites, scale) -> Callable:
    """``fn`` with ``poutine.scale(scale)`` applied to the sample sites named in ``sites`` only, where
    they are latent (a site observed in this call, e.g. the SSVAE's y on a labelled batch, keeps its scale).

    With ``sites`` the latent sites and ``scale`` β, model and guide wrapped alike turn the ELBO
    into E_q[log p(x|z)] - β KL(q(z|x) || p(z)), the β-VAE objective; β ramped over the first
    steps is KL annealing. ``scale`` may be a float or a 0-dim tensor (updated in place).
    """
    if isinstance(scale, (int, float)) and scale == 1:
        return fn
    return _ScaleSites(sites, scale)(fn)


# --------------------------------------------------------------------------------------------
# Optional capabilities (images, classification, semi-supervision, exact likelihood) are the
# protocols of :mod:`ppl_vi.models.protocols`, checked with ``isinstance``.


def default_make_batch(x: Tensor, y: Optional[Tensor] = None) -> Batch:
    return {"x": x}
