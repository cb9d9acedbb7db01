"""Stacked semi-supervised VAE: Kingma et al. 2014, "M1+M2" (M2 on the latent features of M1).

Generative story (C = 10 classes)::

    y ~ Cat(1/C)                                        p(y), uniform
    z2 ~ N(0, I_Z2)                                     p(z2)
    z1 | y, z2 ~ N(μ(z2, onehot y), σ(z2, onehot y))    p(z1|y,z2), M2's Gaussian decoder
    x | z1 ~ Bernoulli(σ(dec1(z1)))                     p(x|z1), M1's decoder

Guide::

    q(z1 | x)     = N(enc1(x))                          M1's encoder
    q(y | z1)     = Cat(softmax(classifier(z1)))
    q(z2 | z1, y) = N(enc2(z1, onehot y))

The pair is the whole stacked model, so its bound is on log p(x) (or log p(x, y)) of the images::

    ELBO(x, y) = E_q[log p(x|z1) + log p(z1|y,z2) + log p(z2) + log p(y) - log q(z1|x) - log q(z2|z1,y)]
    ELBO(x)    = E_q(z1|x)[log p(x|z1) - log q(z1|x)
                           + Σ_y q(y|z1) (log p(y) + E_q(z2|z1,y)[log p(z1|y,z2) + log p(z2) - log q(z2|z1,y)])
                           + H[q(y|z1)]]

and the per-datapoint losses are, as for :mod:`ppl_vi.models.ssvae` (M2),

    labelled (x, y):   -ELBO(x, y) - α' E_q(z1|x)[log q(y|z1)]
    unlabelled x:      -ELBO(x)

**M1 trained first, then frozen** (Kingma et al.'s procedure): built with ``config.m1`` = the run
directory of a trained ``vae`` (``ppl-vi train vae --out M1_DIR``), q(z1|x) and p(x|z1) are that
VAE's encoder and decoder, loaded from its best checkpoint and frozen (``requires_grad`` off, not
registered with ``pyro.module``). The gradient of the bound then reaches M2's networks only, and
equals the gradient of M2's bound on the features z1 ~ q(z1|x): log p(x|z1) and log q(z1|x) do
not depend on M2's parameters. M1 is trained without labels, so one M1 can serve every draw of
the labelled set. **Without** ``config.m1`` both layers start from a random initialisation and
are trained together (the same bound, end to end); Kingma et al. do not do this.

The classifier sees z1, not x: its α' term, α' log q(y|z1) at the guide's z1 draw, depends on z1,
so, unlike M2's, it does not factor out of an importance-weighted bound; RenyiELBO gives
-log (1/K) Σ_k w_k q(y|z1_k)^α' (:meth:`M1M2.renyi_labelled_loss`). Prediction uses the mean of
q(z1|x): ``classify(x) = argmax_y q(y | μ1(x))``.

**Enumeration**: on an unlabelled batch the guide marks ``y`` ``{"enumerate": "parallel"}``;
z1 is drawn before y, once per particle (K, B, Z1), and z2 once per class (C, K, B, Z2).
**Losses**: ``enum`` (default) and ``trace`` (y sampled, score-function gradient).
``meanfield`` is refused: TraceMeanField_ELBO takes KL(q(z1|x) || p(z1|y,z2)) in closed form at
the model's z2 draw, which is only right for a mean-field guide, and q(z2|z1,y) depends on z1.
``renyi`` and ``iwae`` are refused for training (no score-function term for the sampled y);
the evaluator uses IWAELoss for values only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import Tensor, nn

from ppl_vi import bounds
from ppl_vi import run as rundir
from ppl_vi.errors import ConfigError
from ppl_vi.loss_registry import ModelTraits
from ppl_vi.models.base import Batch, Draws, EnumeratedDraws, LatentModel, register
from ppl_vi.models.cvae import NUM_CLASSES, LabelConditionalGenerator, validate_labels
from ppl_vi.models.ssvae import SemiSupervisedPair
from ppl_vi.models.vae import VAE
from ppl_vi.sites import PARTICLE_PLATE
from ppl_vi.nets import GaussianEncoder, fresh_copy, mlp

#: M1's architecture when no trained M1 is given (the ``vae`` defaults).
M1_Z_DIM, M1_HIDDEN = 50, (500, 500)


def load_m1(run_dir: str, x_dim: int) -> VAE:
    """The VAE (M1) of a ``ppl-vi train vae`` run directory, from its best checkpoint (else last)."""
    path = Path(run_dir)
    if not (path / rundir.CONFIG).is_file():
        raise ConfigError(f"--m1 {run_dir} is not a run directory (no {rundir.CONFIG}); train M1 first: "
                          f"ppl-vi train vae --out {run_dir}")
    saved = rundir.load_config_dict(path)
    if saved.get("model") != "vae":
        raise ConfigError(f"--m1 {run_dir} is a {saved.get('model')!r} run; M1 must be a 'vae' run")
    checkpoint = path / rundir.CHECKPOINTS / "best.pt"
    if not checkpoint.is_file():
        checkpoint = path / rundir.CHECKPOINTS / "last.pt"
    if not checkpoint.is_file():
        raise ConfigError(f"--m1 {run_dir} has no checkpoint (checkpoints/best.pt or last.pt); let its training finish")
    state = rundir.load_checkpoint(checkpoint)
    m1 = VAE(x_dim, saved["z_dim"], saved["hidden"], saved.get("activation", "softplus"))
    try:
        m1.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as exc:
        raise ConfigError(f"checkpoint {checkpoint} does not fit a vae: {str(exc).splitlines()[0]}") from None
    return m1


class FeatureClassifier(nn.Module):
    """logits = head(z1) on the features of a Gaussian encoder: z1 ~ q(z1|x) in training mode,
    its mean in eval mode. The encoder is read, never trained (its output is computed without grad)."""

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            loc, scale = self.encoder(x)
            z1 = loc + scale * torch.randn_like(loc) if self.training else loc
        return self.head(z1)

    def parameters(self, recurse: bool = True):
        """The head's parameters only: the encoder is not this network's to train."""
        return self.head.parameters(recurse)


@register(
    "m1m2",
    description="stacked semi-supervised VAE (Kingma et al. 2014, M1+M2): M2 on the latent z1 of a VAE (--m1 RUN_DIR)",
    data="mnist-semisupervised",
    defaults={"loss": "enum", "z_dim": 50, "hidden": [500], "epochs": 100, "batch_size": 128, "lr": 1e-3,
              "labels": 100, "objective": "kingma"},
)
class M1M2(SemiSupervisedPair, LabelConditionalGenerator, LatentModel):
    #: every latent site the guide may have; :meth:`latent_sites_for` gives a batch's own.
    latent_sites = ("z1", "y", "z2")
    labelled_sites = ("z1", "z2")
    name = "m1m2"
    has_analytic_kl = False  # q(z2|z1,y) depends on z1: no mean-field closed form
    #: y is discrete on unlabelled batches; labelled batches carry the α'-scaled classifier site (which
    #: depends on z1). So: enum and trace (``ppl_vi.loss_registry.refusal`` says why not the others;
    #: meanfield would also need a mean-field guide, and q(z2|z1,y) depends on z1).
    model_traits = ModelTraits(discrete_guide=True, enumerable=True, auxiliary_observed=True)
    #: with z1 drawn before y, the enumerated IWAE bound sums y inside the log: tighter than the ELBO
    iwae_sums_y_in_log = True

    def __init__(self, x_dim: int = 784, z_dim: int = 50, hidden: Sequence[int] = (500,), m1: Optional[VAE] = None,
                 num_classes: int = NUM_CLASSES, alpha_scale: float = 1.0, freeze_m1: bool = True):
        super().__init__()
        self.check_sizes(num_classes, alpha_scale)
        self.m1 = m1 if m1 is not None else VAE(x_dim, M1_Z_DIM, M1_HIDDEN)  # q(z1|x), p(x|z1)
        if self.m1.x_dim != x_dim:
            raise ConfigError(f"M1 models {self.m1.x_dim} pixels but the data have {x_dim}")
        self.x_dim, self.z1_dim, self.z_dim, self.num_classes = x_dim, self.m1.z_dim, z_dim, num_classes
        self.hidden = list(hidden)
        self.alpha_scale = float(alpha_scale)  # α': weight of -log q(y|z1) per labelled datapoint
        self.m1_frozen = bool(m1 is not None and freeze_m1)
        for p in self.m1.parameters():
            p.requires_grad_(not self.m1_frozen)
        self.classifier = mlp([self.z1_dim, *hidden, num_classes])  # logits of q(y|z1)
        self.encoder = GaussianEncoder(self.z1_dim + num_classes, list(hidden), z_dim)  # q(z2|z1,y)
        self.decoder = GaussianEncoder(z_dim + num_classes, list(reversed(hidden)), self.z1_dim)  # p(z1|y,z2)

    @classmethod
    def from_config(cls, config, data_info) -> "M1M2":
        """M1 from ``config.m1`` (a trained vae run, frozen) or a fresh one (trained jointly);
        α' = config.alpha · train_size / n_labelled, Kingma et al.'s objective (the only one it trains)."""
        if config.objective != "kingma":
            raise ConfigError(f"m1m2 trains Kingma et al.'s objective only; use --objective kingma "
                              f"(objective {config.objective!r} is ssvae's)")
        m1 = load_m1(config.m1, data_info["x_dim"]) if getattr(config, "m1", None) else None
        return cls(data_info["x_dim"], config.z_dim, config.hidden, m1, data_info.get("num_classes") or NUM_CLASSES,
                   cls.alpha_scale_for(config, data_info))

    def _register(self) -> None:
        """``pyro.module`` for the trainable networks (a frozen M1 stays out of the param store)."""
        for name in ("classifier", "encoder", "decoder") + (() if self.m1_frozen else ("m1",)):
            pyro.module(f"m1m2.{name}", getattr(self, name))

    # ---- the Pyro pair -------------------------------------------------------------------
    def model(self, x: Tensor, y: Optional[Tensor] = None, **_):
        if self.use_param_store:  # off in the trainer's hot path
            self._register()
        with pyro.plate("data", x.shape[0], dim=-1, device=x.device):
            y_value = pyro.sample("y", dist.Categorical(logits=x.new_zeros(self.num_classes)), obs=y)  # p(y)
            zeros = x.new_zeros(self.z_dim)
            z2 = pyro.sample("z2", dist.Normal(zeros, torch.ones_like(zeros)).to_event(1))  # (C?, K?, B, Z2)
            loc, scale = self.decoder(z2, self._one_hot(y_value, x))
            z1 = pyro.sample("z1", dist.Normal(loc, scale).to_event(1))  # the guide's (K?, B, Z1)
            pyro.sample("x", dist.Bernoulli(logits=self.m1.decoder(z1)).to_event(1), obs=x)
            if y is not None and self.alpha_scale > 0:  # the classifier term α' log q(y|z1), labelled only
                with poutine.scale(scale=self.alpha_scale):
                    pyro.sample("y_aux", dist.Categorical(logits=self.classifier(z1)), obs=y)

    def guide(self, x: Tensor, y: Optional[Tensor] = None, **_):
        if self.use_param_store:  # off in the trainer's hot path
            self._register()
        with pyro.plate("data", x.shape[0], dim=-1, device=x.device):
            loc1, scale1 = self.m1.encoder(x)
            z1 = pyro.sample("z1", dist.Normal(loc1, scale1).to_event(1))  # (K?, B, Z1)
            if y is None:
                y = pyro.sample("y", dist.Categorical(logits=self.classifier(z1)), infer={"enumerate": "parallel"})
            loc2, scale2 = self.encoder(z1, self._one_hot(y, x))  # (C?, K?, B, Z2)
            pyro.sample("z2", dist.Normal(loc2, scale2).to_event(1))

    # ---- enumerated draws --------------------------------------------------------------------
    def enum_draws(self, batch: Batch, num_particles: int) -> Draws:
        """The guide run as ``TraceEnum_ELBO(num_particles=K, vectorize_particles=True)`` runs it:
        ``{"y": arange(C).view(C, 1, 1), "z1": (K, B, Z1), "z2": (C, K, B, Z2)}``."""
        nest = self.max_plate_nesting
        guide = poutine.enum(self.guide, first_available_dim=-(nest + 2))
        with pyro.plate(PARTICLE_PLATE, num_particles, dim=-(nest + 1)):
            trace = poutine.trace(guide).get_trace(**batch)
        return EnumeratedDraws({name: trace.nodes[name]["value"] for name in ("y", "z1", "z2")})

    # ---- log-densities, one line per term ------------------------------------------------------
    def log_px_and_qz1(self, x: Tensor, z1: Tensor):
        """log p(x|z1) and log q(z1|x) at z1 (..., B, Z1)."""
        loc1, scale1 = self.m1.encoder(x)
        return bounds.log_bernoulli_with_logits(x, self.m1.decoder(z1)), bounds.log_normal(z1, loc1, scale1)

    def log_m2_terms(self, z1: Tensor, y: Tensor, z2: Tensor):
        """log p(z1|y,z2), log p(z2), log q(z2|z1,y); y broadcastable to z2's batch shape."""
        y1h = self._one_hot(y, z2)
        loc, scale = self.decoder(z2, y1h)
        log_pz1 = bounds.log_normal(z1, loc, scale)
        log_pz2 = bounds.log_normal(z2, torch.zeros_like(z2), torch.ones_like(z2))
        loc2, scale2 = self.encoder(z1, y1h)
        return log_pz1, log_pz2, bounds.log_normal(z2, loc2, scale2)

    def log_qy(self, y: Tensor, z1: Tensor) -> Tensor:
        """log q(y|z1), y broadcastable to z1's batch shape."""
        logits = self.classifier(z1)
        shape = torch.broadcast_shapes(y.shape, logits.shape[:-1])
        return bounds.log_categorical(y.expand(shape), logits.expand(shape + logits.shape[-1:]))

    def classifier_term(self, batch: Batch, z1: Tensor) -> Tensor:
        """α' (1/K) Σ_k log q(y|z1_k) per labelled datapoint, (B,), at draws z1 (K, B, Z1)."""
        return self.alpha_scale * self.log_qy(batch["y"], z1).mean(0)

    # ---- hand-derived bounds ----------------------------------------------------------------
    def log_weights_labelled(self, batch: Batch, draws: Draws, beta: float = 1.0) -> Tensor:
        """log p(x|z1) + β [log p(z1|y,z2) + log p(z2) - log q(z1|x) - log q(z2|z1,y)] + log p(y), (K, B)."""
        x, y, z1, z2 = batch["x"], batch["y"], draws["z1"], draws["z2"]
        log_px, log_qz1 = self.log_px_and_qz1(x, z1)
        log_pz1, log_pz2, log_qz2 = self.log_m2_terms(z1, y, z2)
        return log_px + beta * (log_pz1 + log_pz2 - log_qz1 - log_qz2) + self.log_prior_y()

    def hand_negative_elbo(self, batch: Batch, draws: Draws, kl: str = "mc", beta: float = 1.0) -> Tensor:
        """The per-datapoint loss (B,), by the kind of batch and draws (``kl="mc"`` only):

        * labelled, draws z1 (K, B, Z1), z2 (K, B, Z2):
          -(1/K) Σ_k [log p(x|z1_k) + β (log p(z1_k|y,z2_k) + log p(z2_k) - log q(z1_k|x) - log q(z2_k|z1_k,y))
          + log p(y)] - α' (1/K) Σ_k log q(y|z1_k);
        * unlabelled, enumerated draws (:meth:`enum_draws`: z1 (K, B, Z1), z2 (C, K, B, Z2)):
          -(1/K) Σ_k [log p(x|z1_k) - β log q(z1_k|x)
          + Σ_y q(y|z1_k) β (log p(y) + log p(z1_k|y,z2_yk) + log p(z2_yk) - log q(z2_yk|z1_k,y)) + β H[q(y|z1_k)]];
        * unlabelled, sampled draws y (K, B): the value -(1/K) Σ_k w_k with
          w_k = log p(x|z1_k) + β [log p(y_k) + log p(z1_k|y_k,z2_k) + log p(z2_k) - log q(z1_k|x)
          - log q(y_k|z1_k) - log q(z2_k|z1_k,y_k)], and Trace_ELBO's surrogate for the gradient:
          the pathwise terms plus log q(y_k|z1_k) · stop_grad(w_k).
        """
        if kl != "mc":
            raise ConfigError(f"m1m2 has no closed-form KL (q(z2|z1,y) depends on z1); use kl='mc', not {kl!r}")
        x, y, z1 = batch["x"], batch.get("y"), draws["z1"]
        if y is not None:
            return -self.log_weights_labelled(batch, draws, beta).mean(0) - self.classifier_term(batch, z1)
        log_px, log_qz1 = self.log_px_and_qz1(x, z1)  # (K, B)
        if isinstance(draws, EnumeratedDraws):  # z2 (C, K, B, Z2)
            classes = self._class_values(x)  # (C, 1, 1)
            log_pz1, log_pz2, log_qz2 = self.log_m2_terms(z1, classes, draws["z2"])  # (C, K, B)
            logits = self.classifier(z1)  # (K, B, C)
            q = logits.softmax(-1).movedim(-1, 0)  # (C, K, B)
            per_class = beta * (self.log_prior_y() + log_pz1 + log_pz2 - log_qz2)  # (C, K, B)
            expected = (q * per_class).sum(0)  # Σ_y q(y|z1_k) (...)
            elbo = log_px - beta * log_qz1 + expected + beta * bounds.entropy_categorical(logits)
            return -elbo.mean(0)
        y_k, z2 = draws["y"], draws["z2"]
        log_pz1, log_pz2, log_qz2 = self.log_m2_terms(z1, y_k, z2)
        log_qy = self.log_qy(y_k, z1)
        pathwise = log_px + beta * (self.log_prior_y() + log_pz1 + log_pz2 - log_qz1 - log_qz2)
        w = pathwise - beta * log_qy
        surrogate = -(pathwise + log_qy * w.detach()).mean(0)
        return -w.mean(0).detach() + (surrogate - surrogate.detach())

    def hand_iwae_bound(self, batch: Batch, draws: Draws, beta: float = 1.0) -> Tensor:
        """Importance-weighted bound (B,) on log p(x, y) (labelled) or log p(x) (unlabelled), β = 1:

        * labelled: log (1/K) Σ_k p(x, y, z1_k, z2_k) / (q(z1_k|x) q(z2_k|z1_k,y))  (no α' term);
        * sampled (z1_k, y_k, z2_k) ~ q: log (1/K) Σ_k p(x, y_k, z1_k, z2_k) / (q(z1_k|x) q(y_k|z1_k) q(z2_k|z1_k,y_k));
        * enumerated: log (1/K) Σ_k [p(x|z1_k) / q(z1_k|x) Σ_y p(y) p(z1_k|y,z2_yk) p(z2_yk) / q(z2_yk|z1_k,y)].
        """
        if beta != 1:
            raise ConfigError("the m1m2 IWAE bound is defined for beta = 1 only")
        x, y, z1 = batch["x"], batch.get("y"), draws["z1"]
        if y is not None:
            return bounds.iwae_bound(self.log_weights_labelled(batch, draws))
        log_px, log_qz1 = self.log_px_and_qz1(x, z1)
        if isinstance(draws, EnumeratedDraws):
            log_pz1, log_pz2, log_qz2 = self.log_m2_terms(z1, self._class_values(x), draws["z2"])  # (C, K, B)
            per_class = torch.logsumexp(self.log_prior_y() + log_pz1 + log_pz2 - log_qz2, dim=0)  # (K, B)
            return bounds.iwae_bound(log_px - log_qz1 + per_class)
        y_k = draws["y"]
        log_pz1, log_pz2, log_qz2 = self.log_m2_terms(z1, y_k, draws["z2"])
        log_w = log_px + self.log_prior_y() + log_pz1 + log_pz2 - log_qz1 - self.log_qy(y_k, z1) - log_qz2
        return bounds.iwae_bound(log_w)

    def renyi_labelled_loss(self, batch: Batch, draws: Draws) -> Tensor:
        """What RenyiELBO(α=0) computes on a labelled batch, (B,): the α' term inside the log-mean-exp,

            -log (1/K) Σ_k exp(log w_k + α' log q(y|z1_k))."""
        log_w = self.log_weights_labelled(batch, draws) + self.alpha_scale * self.log_qy(batch["y"], draws["z1"])
        return -bounds.iwae_bound(log_w)

    def elbo_terms(self, batch: Batch, draws: Draws) -> dict:
        """ELBO = rec - kl per datapoint (B,): rec = (1/K) Σ_k log p(x|z1_k), and kl the rest, the KL of
        q(z1, y, z2|x) to p(z1, y, z2) at the draws (exact in y given z1 where y is enumerated or
        sampled: KL(q(y|z1_k) || p(y)) in closed form; log p(y) for a labelled y). The α' term is not included."""
        x, y, z1 = batch["x"], batch.get("y"), draws["z1"]
        log_px, log_qz1 = self.log_px_and_qz1(x, z1)
        if y is not None:
            log_pz1, log_pz2, log_qz2 = self.log_m2_terms(z1, y, draws["z2"])
            return {"rec": log_px.mean(0), "kl": (log_qz1 + log_qz2 - log_pz1 - log_pz2).mean(0) - self.log_prior_y()}
        logits = self.classifier(z1)
        kl_y = bounds.kl_categorical(logits, torch.zeros_like(logits))  # (K, B)
        if isinstance(draws, EnumeratedDraws):
            log_pz1, log_pz2, log_qz2 = self.log_m2_terms(z1, self._class_values(x), draws["z2"])  # (C, K, B)
            kl_rest = (logits.softmax(-1).movedim(-1, 0) * (log_qz2 - log_pz1 - log_pz2)).sum(0)
        else:
            log_pz1, log_pz2, log_qz2 = self.log_m2_terms(z1, draws["y"], draws["z2"])
            kl_rest = log_qz2 - log_pz1 - log_pz2
        return {"rec": log_px.mean(0), "kl": (log_qz1 + kl_y + kl_rest).mean(0)}

    # ---- classification and image hooks ------------------------------------------------------
    def baseline_classifiers(self) -> dict:
        """Label-only references (:mod:`ppl_vi.training.baseline`), freshly initialised:
        ``"baseline"``, M2's classifier network on the pixels (x_dim-hidden-C, as q(y|x) of ``ssvae``),
        and ``"baseline_m1"``, this model's classifier network on M1's features (z1 ~ q(z1|x) while
        training, μ1(x) to predict; M1 itself is not trained by it)."""
        return {"baseline": mlp([self.x_dim, *self.hidden, self.num_classes]),
                "baseline_m1": FeatureClassifier(self.m1.encoder, fresh_copy(self.classifier))}

    @torch.no_grad()
    def features(self, x: Tensor) -> Tensor:
        """μ1(x), the mean of q(z1|x): (B, Z1)."""
        return self.m1.encoder(x)[0]

    @torch.no_grad()
    def classify(self, x: Tensor) -> Tensor:
        """Predicted labels argmax_y q(y | μ1(x)), (B,) int64."""
        return self.classifier(self.features(x)).argmax(-1)

    @torch.no_grad()
    def generate(self, n: int, y=None) -> Tensor:
        """(n, D) pixel probabilities σ(dec1(z1)), z1 ~ p(z1|y,z2), z2 ~ N(0, I); ``y`` a class, (n,)
        labels, or None for classes 0..C-1 cycled."""
        p = next(self.classifier.parameters())
        y = self._labels(n, y, p.device)
        z2 = torch.randn(n, self.z_dim, dtype=p.dtype, device=p.device)
        loc, scale = self.decoder(z2, self._one_hot(y, z2))
        z1 = loc + scale * torch.randn_like(loc)
        return torch.sigmoid(self.m1.decoder(z1))

    @torch.no_grad()
    def encode_mean(self, x: Tensor, y: Optional[Tensor] = None) -> Tensor:
        """(B, Z2) mean of q(z2 | μ1(x), y); without labels y is the classifier's prediction."""
        z1 = self.features(x)
        y = self.classifier(z1).argmax(-1) if y is None else y
        validate_labels(y, x.shape[0], self.num_classes, model="m1m2")
        return self.encoder(z1, self._one_hot(y, z1))[0]

    @torch.no_grad()
    def reconstruct(self, x: Tensor, y: Optional[Tensor] = None) -> Tensor:
        """(B, D) pixel probabilities through both layers at the means: z1 = μ1(x), z2 = mean q(z2|z1,y),
        z1' = mean p(z1|y,z2), σ(dec1(z1')); y predicted if not given."""
        z1 = self.features(x)
        y = self.classifier(z1).argmax(-1) if y is None else y
        z2 = self.encode_mean(x, y)
        return torch.sigmoid(self.m1.decoder(self.decoder(z2, self._one_hot(y, z2))[0]))
