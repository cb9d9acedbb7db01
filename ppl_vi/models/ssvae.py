"""Semi-supervised VAE: Kingma et al. 2014, model "M2", with the label summed out by enumeration.

Generative story (C = 10 classes)::

    y ~ Cat(1/C)                                    p(y), uniform
    z ~ N(0, I_Z)                                   p(z)
    x | y, z ~ Bernoulli(σ(dec(z, onehot y)))       p(x|y,z)

Guide::

    q(y | x)    = Cat(softmax(classifier(x)))       classifier: x_dim-hidden-C, ReLU
    q(z | x, y) = N(enc(x, onehot y))               enc and dec: ``hidden``, ``activation`` (ELU by default)

Default networks (CS236's recipe): z = 64, hidden 300-300, encoder and decoder ELU, classifier ReLU.
With ELBO(x, y) = E_q(z|x,y)[log p(x|y,z) + log p(y) + log p(z) - log q(z|x,y)] and the
unlabelled bound U(x) = Σ_y q(y|x) ELBO(x, y) + H[q(y|x)] ≤ log p(x), two objectives
(``config.objective``), the same on unlabelled batches and different on labelled ones:

**cs236** (the default; Stanford CS236's SSVAE recipe). Per step, an unlabelled batch of B images
and a labelled batch of b_l (all the labels, at most B), minimise

    mean_u -U(x_u) + α · mean_l [-log q(y_l|x_l)],      α = 100 (``config.alpha``),

written per datapoint as ``-U(x)`` for an unlabelled x and ``-α' log q(y|x)`` for a labelled one,
α' = α B / b_l, no labelled ELBO term (-U(x) = KL(q(y|x) ‖ p(y)) + Σ_y q(y|x) (KL(q(z|x,y) ‖ N(0, I)) - E log p(x|y,z))).
It estimates nothing by itself: it is the unlabelled images' evidence bound, averaged, plus a
cross-entropy penalty that makes q(y|x) a classifier; α = 100 weighs the labels the way CS236 does
(100 labels, every step). Per epoch of S steps it is

    J_cs236 = Σ_u -U(x_u) + S α (B / N_l) Σ_l -log q(y_l|x_l),

which the trainer holds whatever the labelled schedule (:mod:`ppl_vi.training.batches`:
labelled batches weighted w = S/m for m labelled batches per epoch; ``tests/test_schedule.py``).

**kingma** (Kingma et al. 2014's J^α, as Pyro's ``examples/vae/ss_vae_M2.py``). Per datapoint::

    labelled (x, y):   -ELBO(x, y) - α' log q(y|x)
    unlabelled x:      -U(x)

and per pass over the unlabelled set (each labelled image counted once per epoch, labelled
batches weighted w = N_l / (m b_l))

    J = Σ_u -U(x_u) + Σ_l [-L(x_l, y_l) - α' log q(y_l|x_l)],   L(x, y) = ELBO(x, y),

a lower bound on log p(x_u's, x_l's, y_l's) minus the classifier penalty. α' = α N / N_l: Kingma
et al. add α · E_labelled[-log q(y|x)] to J with α = 0.1 · N (N training images); spread over the
labelled images that is 0.1 · 55000 / 100 = 55 per labelled datapoint for 100 labels (Pyro's
example uses 46). Measured: with 100 labels it ends below its own supervised-only baseline
(``experiments/RESULTS.md``); α = 100 (α' = 55,000) rescues it partly.

**The classifier term lives inside the pair**, so every Pyro loss sees it: on a labelled batch the
model has an observed site ``y_aux ~ Cat(classifier(x))`` at ``obs=y`` under
``poutine.scale(α')`` (cs236: the only site of a labelled batch; its guide is empty). Its
log-density α' log q(y|x) does not depend on z, so it adds to the ELBO and also factors out of the
IWAE log-mean-exp (RenyiELBO gives -(L_K + α' log q(y|x))).

**Enumeration**: on an unlabelled batch the guide marks ``y`` ``{"enumerate": "parallel"}``, so
``TraceEnum_ELBO(max_plate_nesting=1)`` sums it out exactly: y takes the value
``arange(C).view(C, 1, 1)`` on an enumeration dimension left of the particle plate (or
``(C, 1)`` without one), the guide's z is drawn once per class, shape (C, K, B, Z) (or (C, B, Z)
for K = 1), and every cost is weighted by q(y|x). :meth:`SSVAE.enum_draws` re-runs the guide the
way TraceEnum does, so that re-seeding reproduces its z draws bit for bit;
``ppl_vi.check.semisupervised`` holds TraceEnum against the hand bound on them. Under Trace_ELBO,
RenyiELBO or our IWAELoss ``y`` is sampled instead (score-function gradient).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import Tensor

from ppl_vi import bounds
from ppl_vi.errors import ConfigError
from ppl_vi.loss_registry import ModelTraits
from ppl_vi.models.base import Batch, Draws, EnumeratedDraws, LatentModel, register
from ppl_vi.models.cvae import NUM_CLASSES, LabelConditionalGenerator, one_hot, validate_labels
from ppl_vi.nets import ACTIVATIONS, BernoulliDecoder, GaussianEncoder, fresh_copy, mlp
from ppl_vi.sites import PARTICLE_PLATE

#: the semi-supervised objectives (``config.objective``) and their own α when ``config.alpha`` is None
OBJECTIVE_ALPHA = {"cs236": 100.0, "kingma": 0.1}


class SemiSupervisedPair:
    """What the semi-supervised pairs (:class:`SSVAE`, :class:`~ppl_vi.models.m1m2.M1M2`) share:
    batches labelled or not, the uniform p(y), the α' of Kingma et al., one-hot labels."""

    #: the registry name, for messages; the guide's latent sites on a labelled batch.
    name = "ssvae"
    labelled_sites: tuple = ("z",)
    #: whether the enumerated IWAE bound sums y inside the log (a latent drawn before y): tighter than the ELBO
    iwae_sums_y_in_log: bool = False
    #: "kingma" (a labelled batch carries its ELBO and the classifier term) or "cs236" (the classifier term alone)
    objective: str = "kingma"

    def check_sizes(self, num_classes: int, alpha_scale: float, objective: str = "kingma") -> None:
        if objective not in OBJECTIVE_ALPHA:
            raise ConfigError(f"unknown objective {objective!r}; expected one of: {', '.join(OBJECTIVE_ALPHA)}")
        if num_classes < 2:
            raise ConfigError(f"num_classes must be >= 2, got {num_classes}")
        if alpha_scale < 0:
            raise ConfigError(f"alpha_scale must be >= 0, got {alpha_scale}")

    @staticmethod
    def alpha_for(config) -> float:
        """α: ``config.alpha``, or the objective's own (:data:`OBJECTIVE_ALPHA`) when it is None."""
        return OBJECTIVE_ALPHA[config.objective] if config.alpha is None else config.alpha

    @classmethod
    def alpha_scale_for(cls, config, data_info) -> float:
        """α' per labelled datapoint: kingma α · train_size / N_l (Kingma et al.'s α = 0.1 N spread over
        the labels); cs236 α · batch_size / b_l (α times the mean over a labelled batch of b_l images,
        the step's loss being divided by batch_size)."""
        n_labelled = max(int(data_info.get("n_labelled") or 0), 1)  # None / 0: no labelled batches, α' unused
        if config.objective == "cs236":
            labelled_batch = config.labelled_batch_size or min(config.batch_size, n_labelled)
            return cls.alpha_for(config) * config.batch_size / labelled_batch
        return cls.alpha_for(config) * data_info["train_size"] / n_labelled

    def make_batch(self, x: Tensor, y: Optional[Tensor] = None) -> Batch:
        """``{"x": x, "y": y}``: labelled when ``y`` is given (checked: integers in 0..C-1), else unlabelled."""
        validate_labels(y, x.shape[0], self.num_classes, required=False, model=self.name)
        return {"x": x, "y": y}

    def latent_sites_for(self, batch: Batch) -> tuple:
        """The guide's latent sites on this batch: ``labelled_sites``, or all of ``latent_sites``."""
        return self.labelled_sites if batch.get("y") is not None else self.latent_sites

    @property
    def labelled_elbo(self) -> bool:
        """Does a labelled batch carry its ELBO term (kingma), or only the classifier term (cs236)?"""
        return self.objective == "kingma"

    def _one_hot(self, y: Tensor, like: Tensor) -> Tensor:
        return one_hot(y, self.num_classes, like.dtype)

    def log_prior_y(self) -> float:
        """log p(y) = -log C."""
        return -math.log(self.num_classes)

    def _class_values(self, x: Tensor) -> Tensor:
        return torch.arange(self.num_classes, device=x.device).view(-1, 1, 1)  # (C, 1, 1)


@register(
    "ssvae",
    description="semi-supervised VAE (Kingma et al. 2014, M2): y summed out by enumeration, classifier q(y|x)",
    data="mnist-semisupervised",
    defaults={"loss": "enum", "z_dim": 64, "hidden": [300, 300], "activation": "elu", "epochs": 55,
              "batch_size": 100, "lr": 1e-3, "labels": 100, "objective": "cs236"},
)
class SSVAE(SemiSupervisedPair, LabelConditionalGenerator, LatentModel):
    #: every latent site the guide may have; :meth:`latent_sites_for` gives a batch's own.
    latent_sites = ("y", "z")
    has_analytic_kl = True  # for z given y
    #: y is discrete on unlabelled batches (sampled or enumerated in the guide); labelled batches carry
    #: the α'-scaled classifier site y_aux beside x.
    model_traits = ModelTraits(discrete_guide=True, enumerable=True, auxiliary_observed=True)

    def __init__(self, x_dim: int, z_dim: int = 64, hidden: Sequence[int] = (300, 300),
                 num_classes: int = NUM_CLASSES, alpha_scale: float = 100.0, objective: str = "cs236",
                 activation: str = "elu"):
        super().__init__()
        self.check_sizes(num_classes, alpha_scale, objective)
        if activation not in ACTIVATIONS:
            raise ConfigError(f"unknown activation {activation!r}; expected one of: {', '.join(ACTIVATIONS)}")
        self.x_dim, self.z_dim, self.num_classes = x_dim, z_dim, num_classes
        self.objective = objective  # cs236 | kingma: what a labelled batch's loss holds (module docstring)
        self.alpha_scale = float(alpha_scale)  # α': weight of -log q(y|x) per labelled datapoint
        act = ACTIVATIONS[activation]
        self.classifier = mlp([x_dim, *hidden, num_classes], activation=torch.nn.ReLU)  # logits of q(y|x)
        self.encoder = GaussianEncoder(x_dim + num_classes, list(hidden), z_dim, activation=act)  # q(z|x,y)
        self.decoder = BernoulliDecoder(z_dim + num_classes, list(reversed(hidden)), x_dim, activation=act)  # p(x|y,z)

    @property
    def labelled_sites(self) -> tuple:
        """The guide's latent sites on a labelled batch: ("z",) (kingma), none (cs236: no labelled ELBO)."""
        return ("z",) if self.labelled_elbo else ()

    @classmethod
    def from_config(cls, config, data_info) -> "SSVAE":
        """α' from ``config.objective`` and ``config.alpha`` (:meth:`SemiSupervisedPair.alpha_scale_for`)."""
        return cls(data_info["x_dim"], config.z_dim, config.hidden, data_info.get("num_classes", NUM_CLASSES),
                   cls.alpha_scale_for(config, data_info), config.objective, config.activation)

    # ---- the Pyro pair -------------------------------------------------------------------
    def model(self, x: Tensor, y: Optional[Tensor] = None, **_):
        if self.use_param_store:  # off in the trainer's hot path
            pyro.module("ssvae", self)
        with pyro.plate("data", x.shape[0], dim=-1, device=x.device):
            if y is not None and not self.labelled_elbo:  # cs236, labelled: the classifier term alone
                with poutine.scale(scale=self.alpha_scale):
                    pyro.sample("y_aux", dist.Categorical(logits=self.classifier(x)), obs=y)
                return
            prior_logits = x.new_zeros(self.num_classes)  # uniform p(y)
            # y: (B,) observed | (C, 1[, 1]) enumerated | (K?, B) sampled
            y_value = pyro.sample("y", dist.Categorical(logits=prior_logits), obs=y)
            zeros = x.new_zeros(self.z_dim)
            z = pyro.sample("z", dist.Normal(zeros, torch.ones_like(zeros)).to_event(1))  # (C?, K?, B, Z)
            logits = self.decoder(z, self._one_hot(y_value, x))  # (C?, K?, B, D)
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)
            if y is not None and self.alpha_scale > 0:  # the classifier term α' log q(y|x), labelled only
                with poutine.scale(scale=self.alpha_scale):
                    pyro.sample("y_aux", dist.Categorical(logits=self.classifier(x)), obs=y)

    def guide(self, x: Tensor, y: Optional[Tensor] = None, **_):
        if self.use_param_store:  # off in the trainer's hot path
            pyro.module("ssvae", self)
        with pyro.plate("data", x.shape[0], dim=-1, device=x.device):
            if y is not None and not self.labelled_elbo:  # cs236, labelled: no latent site
                return
            if y is None:
                y = pyro.sample("y", dist.Categorical(logits=self.classifier(x)), infer={"enumerate": "parallel"})
            loc, scale = self.encoder(x, self._one_hot(y, x))  # (C?, K?, B, Z)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    # ---- enumerated draws --------------------------------------------------------------------
    def enum_draws(self, batch: Batch, num_particles: int) -> Draws:
        """The guide run as ``TraceEnum_ELBO(num_particles=K, vectorize_particles=True)`` runs it.

        y is enumerated on the dimension left of a K-particle plate; returns
        ``{"y": arange(C).view(C, 1, 1), "z": (C, K, B, Z)}``. With the RNG seeded as before
        TraceEnum's call, z equals TraceEnum's draws (for K = 1 TraceEnum has no particle plate and
        draws the same numbers in the shape (C, B, Z)).
        """
        nest = self.max_plate_nesting
        guide = poutine.enum(self.guide, first_available_dim=-(nest + 2))
        with pyro.plate(PARTICLE_PLATE, num_particles, dim=-(nest + 1)):
            trace = poutine.trace(guide).get_trace(**batch)
        return EnumeratedDraws(y=trace.nodes["y"]["value"], z=trace.nodes["z"]["value"])

    # ---- closed forms ----------------------------------------------------------------------
    def _log_terms(self, x: Tensor, y: Tensor, z: Tensor):
        """log p(x|y,z), log p(z), log q(z|x,y) at z (..., B, Z), y broadcastable to z's batch shape.

        Each has z's batch shape: (K, B) labelled or sampled, (C, K, B) enumerated."""
        y1h = self._one_hot(y, x)
        log_px = bounds.log_bernoulli_with_logits(x, self.decoder(z, y1h))
        log_pz = bounds.log_normal(z, torch.zeros_like(z), torch.ones_like(z))
        loc, scale = self.encoder(x, y1h)
        return log_px, log_pz, bounds.log_normal(z, loc, scale)

    def kl_z(self, x: Tensor, y: Tensor) -> Tensor:
        """KL(q(z|x,y) || N(0, I)) in closed form, y's batch shape broadcast with (B,)."""
        loc, scale = self.encoder(x, self._one_hot(y, x))
        return bounds.kl_normal(loc, scale, torch.zeros_like(loc), torch.ones_like(scale))

    def classifier_term(self, batch: Batch) -> Tensor:
        """α' log q(y|x) per labelled datapoint, (B,)."""
        return self.alpha_scale * bounds.log_categorical(batch["y"], self.classifier(batch["x"]))

    # ---- hand-derived bounds ----------------------------------------------------------------
    def negative_elbo_xy(self, x: Tensor, y: Tensor, z: Tensor, kl: str = "mc", beta: float = 1.0,
                         beta_y: float = 1.0) -> Tensor:
        """-ELBO_β(x, y) at K draws z, the K dimension first: z (K, ..., B, Z) -> (..., B).

            -ELBO_β(x, y) = -(1/K) Σ_k [log p(x|y,z_k) + β (log p(z_k) - log q(z_k|x,y))] - β_y log p(y)

        (``kl="analytic"``: -(1/K) Σ_k log p(x|y,z_k) + β KL(q(z|x,y) || p(z)) - β_y log p(y).)
        """
        log_px, log_pz, log_qz = self._log_terms(x, y, z)
        if kl == "mc":
            return bounds.negative_elbo_mc(log_px, log_pz, log_qz, beta) - beta_y * self.log_prior_y()
        if kl == "analytic":
            return bounds.negative_elbo_analytic(log_px, self.kl_z(x, y), beta) - beta_y * self.log_prior_y()
        raise ConfigError(f"unknown KL estimator {kl!r}; expected 'mc' or 'analytic'")

    def hand_negative_elbo(self, batch: Batch, draws: Draws, kl: str = "mc", beta: float = 1.0) -> Tensor:
        """The per-datapoint loss (B,), by the kind of batch and draws:

        * labelled, objective cs236 (no draws): -α' log q(y|x);
        * labelled (``batch["y"]`` given), objective kingma, draws z (K, B, Z):
          -ELBO_β(x, y) - α' log q(y|x)   (log p(y) unscaled: y is observed);
        * unlabelled, enumerated draws from :meth:`enum_draws`, z (C, K, B, Z):
          -[Σ_y q(y|x) ELBO_β(x, y) + β H[q(y|x)]], exact in y (what TraceEnum_ELBO computes);
        * unlabelled, sampled draws y (K, B), z (K, B, Z) (Trace_ELBO), ``kl="mc"``: the value
          -(1/K) Σ_k w_k, w_k = log p(x|y_k,z_k) + β [log p(y_k) + log p(z_k) - log q(z_k|x,y_k) - log q(y_k|x)],
          with Trace_ELBO's score-function surrogate for the gradient,
          -(1/K) Σ_k [log p(x|y_k,z_k) + β (log p(y_k) + log p(z_k) - log q(z_k|x,y_k)) + log q(y_k|x) · stop_grad(w_k)];
          ``kl="analytic"``: -rec + β kl of :meth:`elbo_terms`, an estimate of the value for evaluation
          (its gradient lacks the score-function term of y: train with enumeration or ``"mc"``).
        """
        x, y = batch["x"], batch.get("y")
        if y is not None and not self.labelled_elbo:  # cs236: the classifier term alone
            return -self.classifier_term(batch)
        if y is not None:
            return self.negative_elbo_xy(x, y, draws["z"], kl, beta) - self.classifier_term(batch)
        q_logits = self.classifier(x)  # (B, C)
        if isinstance(draws, EnumeratedDraws):  # z (C, K, B, Z), K first for the mean
            per_class = self.negative_elbo_xy(x, self._class_values(x).squeeze(-1),
                                              draws["z"].transpose(0, 1), kl, beta, beta)  # (C, B)
            expected = (q_logits.softmax(-1).T * per_class).sum(0)  # Σ_y q(y|x) (-ELBO(x, y))
            return expected - beta * bounds.entropy_categorical(q_logits)
        if kl == "analytic":  # sampled y: an estimate of the value only (no score-function term)
            terms = self.elbo_terms(batch, draws)
            return -terms["rec"] + beta * terms["kl"]
        if kl != "mc":
            raise ConfigError(f"unknown KL estimator {kl!r}; expected 'mc' or 'analytic'")
        y_k, z = draws["y"], draws["z"]
        log_px, log_pz, log_qz = self._log_terms(x, y_k, z)  # (K, B)
        log_qy = bounds.log_categorical(y_k, q_logits.expand(y_k.shape + q_logits.shape[-1:]))
        w = log_px + beta * (self.log_prior_y() + log_pz - log_qz - log_qy)
        surrogate = -(log_px + beta * (self.log_prior_y() + log_pz - log_qz) + log_qy * w.detach()).mean(0)
        return -w.mean(0).detach() + (surrogate - surrogate.detach())

    def elbo_terms(self, batch: Batch, draws: Draws) -> dict:
        """ELBO = rec - kl per datapoint (B,), with the KL of q(y, z|x) = q(y|x) q(z|x,y) to p(y) p(z):

        * labelled (q(y|x) = δ_y): rec = (1/K) Σ_k log p(x|y,z_k), kl = KL_z(y) - log p(y);
        * unlabelled, enumerated draws: rec = Σ_y q(y|x) (1/K) Σ_k log p(x|y,z_yk),
          kl = KL(q(y|x) || p(y)) + Σ_y q(y|x) KL_z(y)  (exact in y);
        * unlabelled, sampled draws: rec = (1/K) Σ_k log p(x|y_k,z_k), kl = KL(q(y|x) || p(y)) + (1/K) Σ_k KL_z(y_k);

        KL_z(y) = KL(q(z|x,y) || N(0, I)) in closed form. The α' classifier term is not included
        (objective cs236, labelled: no ELBO term, both 0).
        """
        x, y = batch["x"], batch.get("y")
        if y is not None and not self.labelled_elbo:  # cs236: no labelled ELBO term, nothing drawn
            return {"rec": x.new_zeros(x.shape[0]), "kl": x.new_zeros(x.shape[0])}
        if y is not None:
            log_px, _, _ = self._log_terms(x, y, draws["z"])
            return {"rec": log_px.mean(0), "kl": self.kl_z(x, y) - self.log_prior_y()}
        q_logits = self.classifier(x)
        kl_y = bounds.kl_categorical(q_logits, torch.zeros_like(q_logits))
        if isinstance(draws, EnumeratedDraws):
            classes = self._class_values(x)  # (C, 1, 1)
            q = q_logits.softmax(-1).T  # (C, B)
            log_px, _, _ = self._log_terms(x, classes, draws["z"])  # (C, K, B)
            return {"rec": (q * log_px.mean(1)).sum(0), "kl": kl_y + (q * self.kl_z(x, classes.squeeze(-1))).sum(0)}
        log_px, _, _ = self._log_terms(x, draws["y"], draws["z"])  # (K, B)
        return {"rec": log_px.mean(0), "kl": kl_y + self.kl_z(x, draws["y"]).mean(0)}

    def hand_iwae_bound(self, batch: Batch, draws: Draws, beta: float = 1.0) -> Tensor:
        """Importance-weighted bound (B,) on log p(x, y) (labelled) or log p(x) (unlabelled).

        * labelled: log (1/K) Σ_k p(x, y, z_k) / q(z_k|x,y)  (the α' term is not part of the bound;
          objective cs236: 0, a labelled batch has no bound term);
        * sampled (y_k, z_k) ~ q: log (1/K) Σ_k p(x, y_k, z_k) / (q(y_k|x) q(z_k|x,y_k));
        * enumerated: log Σ_y p(y) (1/K) Σ_k p(x|y,z_yk) p(z_yk) / q(z_yk|x,y), z_yk ~ q(z|x,y),
          an unbiased estimate of p(x) = Σ_y p(y) p(x|y) inside the log (β = 1 only).
        """
        x, y = batch["x"], batch.get("y")
        if y is not None and not self.labelled_elbo:  # cs236: the labelled loss is the classifier term alone
            return x.new_zeros(x.shape[0])
        if y is not None:
            log_px, log_pz, log_qz = self._log_terms(x, y, draws["z"])
            return bounds.iwae_bound_beta(log_px, log_pz + self.log_prior_y(), log_qz, beta)
        if isinstance(draws, EnumeratedDraws):
            if beta != 1:
                raise ConfigError("the enumerated IWAE bound is defined for beta = 1 only")
            log_px, log_pz, log_qz = self._log_terms(x, self._class_values(x), draws["z"])  # (C, K, B)
            per_class = bounds.iwae_bound((log_px + log_pz - log_qz).transpose(0, 1))  # (C, B): log p̂(x|y)
            return torch.logsumexp(per_class + self.log_prior_y(), dim=0)
        y_k = draws["y"]
        log_px, log_pz, log_qz = self._log_terms(x, y_k, draws["z"])
        q_logits = self.classifier(x)
        log_qy = bounds.log_categorical(y_k, q_logits.expand(y_k.shape + q_logits.shape[-1:]))
        return bounds.iwae_bound_beta(log_px, log_pz + self.log_prior_y(), log_qz + log_qy, beta)

    def renyi_labelled_loss(self, batch: Batch, draws: Draws) -> Tensor:
        """What RenyiELBO(α=0) computes on a labelled batch, (B,): -(L_K + α' log q(y|x)); the classifier
        term is the same for every particle, so it leaves the log-mean-exp unchanged."""
        return -(self.hand_iwae_bound(batch, draws) + self.classifier_term(batch))

    # ---- classification and image hooks (generate: LabelConditionalGenerator's) --------------
    def baseline_classifiers(self) -> dict:
        """The supervised-only baseline (:mod:`ppl_vi.training.baseline`): q(y|x)'s network, freshly
        initialised, to be trained on the labelled images alone."""
        return {"baseline": fresh_copy(self.classifier)}

    @torch.no_grad()
    def classify(self, x: Tensor) -> Tensor:
        """Predicted labels argmax_y q(y|x), (B,) int64."""
        return self.classifier(x).argmax(-1)

    @torch.no_grad()
    def encode_mean(self, x: Tensor, y: Optional[Tensor] = None) -> Tensor:
        """(B, Z) mean of q(z|x,y); without labels y is the classifier's prediction."""
        y = self.classify(x) if y is None else y
        validate_labels(y, x.shape[0], self.num_classes, model="ssvae")
        return self.encoder(x, self._one_hot(y, x))[0]

    @torch.no_grad()
    def reconstruct(self, x: Tensor, y: Optional[Tensor] = None) -> Tensor:
        """(B, D) pixel probabilities of the decoder at q(z|x,y)'s mean (y predicted if not given)."""
        y = self.classify(x) if y is None else y
        z = self.encode_mean(x, y)
        return torch.sigmoid(self.decoder(z, self._one_hot(y, x)))
