"""Conditional VAEs on MNIST: a class-conditional VAE, and image completion (Sohn et al. 2015).

**Class-conditional VAE** (``"cvae"``, every image labelled)::

    z ~ N(0, I_Z)
    x | y, z ~ Bernoulli(σ(dec(z, onehot y)))          p(x|y,z)
    guide: q(z | x, y) = N(enc(x, onehot y))

    ELBO(x, y) = E_q(z|x,y)[log p(x|y,z)] - KL(q(z|x,y) || N(0, I)) ≤ log p(x|y)

**Image completion** (``"cvae-completion"``, Sohn et al. 2015; Pyro's ``examples/cvae``): an image
is split into four 14×14 quadrants; 1, 2 or 3 of them are given, in Pyro's order bottom-left,
top-right, top-left (so bottom-right is always missing). The condition ``c`` is the image with the
missing pixels set to -1, ``mask`` marks the missing pixels M::

    z | c ~ N(prior_net(c))                             p(z|c), a learned conditional prior
    x_M | z, c ~ Bernoulli(σ(dec(z, c)))_M              only the missing pixels are modelled
    guide: q(z | x, c) = N(rec_net(x, c))

    ELBO(x_M | c) = E_q[Σ_{d∈M} log p(x_d|z,c)] - KL(q(z|x,c) || p(z|c)) ≤ log p(x_M | c)

:func:`completion_nll` estimates -log p(x_M | c) by importance sampling with K draws from
q(z|x,c); :class:`CompletionBaseline` is the deterministic network (c -> pixel logits, trained
with BCE on the missing pixels) that the CVAE is compared with, as in Pyro's example.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn

from ppl_vi import bounds
from ppl_vi.errors import ConfigError, DataError
from ppl_vi.models.base import Batch, Draws, LatentModel, register
from ppl_vi.nets import BernoulliDecoder, GaussianEncoder, mlp
from ppl_vi.sites import LogMeanExp, chunk_sizes

NUM_CLASSES = 10
#: quadrants in the order they are given (Pyro's examples/cvae): 1 -> BL, 2 -> BL+TR, 3 -> BL+TR+TL.
QUADRANT_ORDER = ("bottom-left", "top-right", "top-left")


# --------------------------------------------------------------------------------------------
# Shared helpers (also used by the semi-supervised VAE)


def one_hot(y: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """Integer labels of any shape (...) -> one-hot floats (..., C)."""
    return nn.functional.one_hot(y.long(), num_classes).to(dtype)


def broadcast_cat(*tensors: Tensor) -> Tensor:
    """Concatenate on the last dimension, broadcasting the leading (enum, particle, batch) ones.

    E.g. x (B, D) with onehot y (C, 1, 1, 10) gives (C, 1, B, D + 10).
    """
    lead = torch.broadcast_tensors(*(t[..., 0] for t in tensors))[0].shape  # views only, no copies
    return torch.cat([t.expand(lead + t.shape[-1:]) for t in tensors], dim=-1)


def validate_labels(y: Optional[Tensor], batch_size: int, num_classes: int = NUM_CLASSES,
                    required: bool = True, model: str = "this model") -> None:
    """Raise :class:`DataError` unless ``y`` is an integer (B,) tensor with values in 0..C-1."""
    expected = f"expected integer labels of shape ({batch_size},) in 0..{num_classes - 1}"
    if y is None:
        if required:
            raise DataError(f"{model} needs labels but the batch has none (y is None); {expected}")
        return
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise DataError(f"labels have dtype {y.dtype}; {expected}")
    if y.shape != (batch_size,):
        raise DataError(f"labels have shape {tuple(y.shape)}; {expected}")
    if batch_size and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"labels range over [{int(y.min())}, {int(y.max())}]; {expected}")


def masked_log_bernoulli(x: Tensor, logits: Tensor, mask: Tensor) -> Tensor:
    """Bernoulli log-likelihood over the masked pixels only, summed over the last dimension.

        log p(x_M | l) = Σ_{d∈M} [ x_d l_d - softplus(l_d) ]
    """
    return ((x * logits - nn.functional.softplus(logits)) * mask).sum(-1)


class LabelConditionalGenerator:
    """``generate(n, y)`` for the models with z ~ N(0, I) and a decoder on [z, onehot y]
    (:class:`CVAE`, :class:`~ppl_vi.models.ssvae.SSVAE`); they provide ``decoder``, ``z_dim``,
    ``num_classes`` and ``_one_hot``."""

    def _labels(self, n: int, y, device) -> Tensor:
        """None -> 0, 1, ..., C-1, 0, 1, ... (a grid with one column per class); int -> n copies."""
        if y is None:
            y = torch.arange(n, device=device) % self.num_classes
        elif isinstance(y, int):
            y = torch.full((n,), y, dtype=torch.long, device=device)
        y = torch.as_tensor(y, device=device)
        validate_labels(y, n, self.num_classes, model=type(self).__name__.lower())
        return y

    @torch.no_grad()
    def generate(self, n: int, y: Union[None, int, Tensor] = None) -> Tensor:
        """(n, D) pixel probabilities σ(dec(z, y)), z ~ N(0, I); ``y`` a class, (n,) labels, or
        None for classes 0..C-1 cycled (n = rows × C gives a grid with one column per class)."""
        p = next(self.parameters())
        labels = self._labels(n, y, p.device)
        z = torch.randn(n, self.z_dim, dtype=p.dtype, device=p.device)
        return torch.sigmoid(self.decoder(z, self._one_hot(labels, z)))


# --------------------------------------------------------------------------------------------
# Class-conditional VAE


@register(
    "cvae",
    description="class-conditional VAE: p(x|y,z), q(z|x,y); class-conditional sample grids",
    data="mnist-labelled",
    defaults={"loss": "meanfield", "z_dim": 50, "hidden": [500, 500], "epochs": 20, "batch_size": 128,
              "lr": 1e-3},
)
class CVAE(LabelConditionalGenerator, LatentModel):
    latent_sites = ("z",)
    has_analytic_kl = True
    #: ``reconstruct`` needs the labels (the plots pass them). There is no ``encode_mean(x)`` hook:
    #: q(z|x,y) needs y too; ``encode(x, y)[0]`` is its mean.
    needs_labels = True

    def __init__(self, x_dim: int, z_dim: int = 50, hidden: Sequence[int] = (500, 500),
                 num_classes: int = NUM_CLASSES):
        super().__init__()
        if num_classes < 2:
            raise ConfigError(f"num_classes must be >= 2, got {num_classes}")
        self.x_dim, self.z_dim, self.num_classes = x_dim, z_dim, num_classes
        self.encoder = GaussianEncoder(x_dim + num_classes, list(hidden), z_dim)  # q(z|x,y)
        self.decoder = BernoulliDecoder(z_dim + num_classes, list(reversed(hidden)), x_dim)  # p(x|y,z)

    @classmethod
    def from_config(cls, config, data_info) -> "CVAE":
        return cls(data_info["x_dim"], config.z_dim, config.hidden, data_info.get("num_classes", NUM_CLASSES))

    def make_batch(self, x: Tensor, y: Optional[Tensor] = None) -> Batch:
        """``{"x": x, "y": y}``; labels are required (DataError without them or out of range)."""
        validate_labels(y, x.shape[0], self.num_classes, required=True, model="cvae")
        return {"x": x, "y": y}

    def _one_hot(self, y: Tensor, like: Tensor) -> Tensor:
        return one_hot(y, self.num_classes, like.dtype)

    # ---- the Pyro pair -------------------------------------------------------------------
    def model(self, x: Tensor, y: Optional[Tensor] = None, **_):
        if self.use_param_store:  # off in the trainer's hot path
            pyro.module("cvae", self)
        if y is None:
            raise DataError("cvae needs labels but the batch has none (y is None); pass {'x': x, 'y': y}")
        with pyro.plate("data", x.shape[0], dim=-1, device=x.device):
            zeros = x.new_zeros(self.z_dim)
            z = pyro.sample("z", dist.Normal(zeros, torch.ones_like(zeros)).to_event(1))  # (K?, B, Z)
            logits = self.decoder(z, self._one_hot(y, x))  # (K?, B, D)
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)

    def guide(self, x: Tensor, y: Optional[Tensor] = None, **_):
        if self.use_param_store:  # off in the trainer's hot path
            pyro.module("cvae", self)
        if y is None:
            raise DataError("cvae needs labels but the batch has none (y is None); pass {'x': x, 'y': y}")
        with pyro.plate("data", x.shape[0], dim=-1, device=x.device):
            loc, scale = self.encode(x, y)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    # ---- closed forms ----------------------------------------------------------------------
    def encode(self, x: Tensor, y: Tensor):
        """q(z|x,y) = N(loc, diag scale²): each (B, Z)."""
        return self.encoder(x, self._one_hot(y, x))

    # ---- hand-derived bounds (hand_negative_elbo, hand_iwae_bound: LatentModel's) -----------
    #   -ELBO_β(x|y) per datapoint at draws z (K, B, Z), MC or closed-form KL, and
    #   L_K(x|y) = log (1/K) Σ_k p(x|y,z_k) p(z_k) / q(z_k|x,y), from these two:
    def log_terms(self, batch: Batch, draws: Draws):
        """log p(x|y,z), log p(z), log q(z|x,y) at draws z (K, B, Z); each (K, B)."""
        x, y, z = batch["x"], batch["y"], draws["z"]
        log_px = bounds.log_bernoulli_with_logits(x, self.decoder(z, self._one_hot(y, x)))
        log_pz = bounds.log_normal(z, torch.zeros_like(z), torch.ones_like(z))
        loc, scale = self.encode(x, y)
        return log_px, log_pz, bounds.log_normal(z, loc, scale)

    def kl_to_prior(self, batch: Batch) -> Tensor:
        """KL(q(z|x,y) || N(0, I)) in closed form, (B,)."""
        loc, scale = self.encode(batch["x"], batch["y"])
        return bounds.kl_normal(loc, scale, torch.zeros_like(loc), torch.ones_like(scale))

    def elbo_terms(self, batch: Batch, draws: Draws) -> dict:
        """E_q log p(x|y,z) (MC over the K draws) and the closed-form KL, each (B,)."""
        log_px, _, _ = self.log_terms(batch, draws)
        return {"rec": log_px.mean(0), "kl": self.kl_to_prior(batch)}

    # ---- image hooks (generate: LabelConditionalGenerator's) ---------------------------------
    @torch.no_grad()
    def reconstruct(self, x: Tensor, y: Optional[Tensor] = None) -> Tensor:
        """(B, D) pixel probabilities of the decoder at the guide's mean z."""
        validate_labels(y, x.shape[0], self.num_classes, model="cvae")
        loc, _ = self.encode(x, y)
        return torch.sigmoid(self.decoder(loc, self._one_hot(y, x)))



# --------------------------------------------------------------------------------------------
# Image completion: the condition c and the mask of missing pixels


def quadrant_masks(x_dim: int, device=None) -> Tensor:
    """(3, D) bool masks of the quadrants in :data:`QUADRANT_ORDER` for square images of D pixels."""
    side = math.isqrt(x_dim)
    if side * side != x_dim or side % 2:
        raise DataError(f"images have {x_dim} pixels; expected a square image with an even side (784 = 28²)")
    rows = torch.arange(side, device=device).view(-1, 1).expand(side, side)
    cols = torch.arange(side, device=device).view(1, -1).expand(side, side)
    top, left = rows < side // 2, cols < side // 2
    masks = [~top & left, top & ~left, top & left]  # bottom-left, top-right, top-left
    return torch.stack([m.reshape(-1) for m in masks])


def completion_batch(x: Tensor, quadrants: Union[int, Tensor]) -> Batch:
    """The completion batch for images ``x`` (B, D) with ``quadrants`` given (an int, or (B,) ints).

    Returns ``{"x": x, "c": c, "mask": mask}``: ``c`` (B, D) is ``x`` on the given quadrants and -1
    elsewhere (as in Pyro's example), ``mask`` (B, D) bool marks the missing pixels to predict.
    """
    n = torch.as_tensor(quadrants, device=x.device)
    if n.is_floating_point() or n.dtype == torch.bool:
        raise DataError(f"quadrant counts have dtype {n.dtype}; expected integers 1, 2 or 3")
    n = n.expand(x.shape[0]) if n.dim() == 0 else n
    if n.shape != (x.shape[0],):
        raise DataError(f"quadrant counts have shape {tuple(n.shape)}; expected one int or ({x.shape[0]},)")
    if n.numel() and (n.min() < 1 or n.max() > 3):
        raise DataError(f"quadrant counts range over [{int(n.min())}, {int(n.max())}]; "
                        "expected 1, 2 or 3 given quadrants")
    masks = quadrant_masks(x.shape[-1], x.device)  # (3, D)
    given = ((torch.arange(3, device=x.device) < n.unsqueeze(-1)).unsqueeze(-1) & masks).any(-2)  # (B, D)
    c = torch.where(given, x, torch.full_like(x, -1.0))
    return {"x": x, "c": c, "mask": ~given}


def _as_float(mask: Tensor, like: Tensor) -> Tensor:
    return mask.to(like.dtype)


@register(
    "cvae-completion",
    description="CVAE image completion (Sohn et al. 2015): p(z|c), q(z|x,c), p(x_missing|z,c) on MNIST quadrants",
    data="mnist-completion",
    defaults={"loss": "meanfield", "z_dim": 50, "hidden": [500, 500], "epochs": 20, "batch_size": 128,
              "lr": 1e-3},
)
class CVAECompletion(LatentModel):
    latent_sites = ("z",)
    has_analytic_kl = True

    def __init__(self, x_dim: int, z_dim: int = 50, hidden: Sequence[int] = (500, 500), seed: int = 0):
        super().__init__()
        quadrant_masks(x_dim)  # validates the image shape
        self.x_dim, self.z_dim = x_dim, z_dim
        self.prior_net = GaussianEncoder(x_dim, list(hidden), z_dim)  # p(z|c)
        self.recognition_net = GaussianEncoder(2 * x_dim, list(hidden), z_dim)  # q(z|x,c)
        self.decoder = BernoulliDecoder(z_dim + x_dim, list(reversed(hidden)), x_dim)  # p(x|z,c)
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)  # draws the quadrant counts (training)

    @classmethod
    def from_config(cls, config, data_info) -> "CVAECompletion":
        return cls(data_info["x_dim"], config.z_dim, config.hidden, seed=config.seed)

    def make_batch(self, x: Tensor, y: Optional[Tensor] = None) -> Batch:
        """A completion batch with 1-3 given quadrants per image, drawn uniformly (labels unused).

        In training mode the counts come from the model's generator, seeded once with ``seed``; in
        eval mode (``model.eval()``) from a generator re-seeded with ``seed`` at every call, so an
        evaluation sees the same conditions whatever ran before."""
        generator = self.generator if self.training else torch.Generator().manual_seed(self.seed)
        quadrants = torch.randint(1, 4, (x.shape[0],), generator=generator).to(x.device)
        return completion_batch(x, quadrants)

    # ---- the Pyro pair -------------------------------------------------------------------
    def model(self, x: Tensor, c: Tensor, mask: Tensor, **_):
        if self.use_param_store:  # off in the trainer's hot path
            pyro.module("cvae_completion", self)
        with pyro.plate("data", x.shape[0], dim=-1, device=x.device):
            loc, scale = self.prior_net(c)
            z = pyro.sample("z", dist.Normal(loc, scale).to_event(1))  # (K?, B, Z)
            logits = self.decoder(z, c)  # (K?, B, D)
            pyro.sample("x", dist.Bernoulli(logits=logits).mask(mask).to_event(1), obs=x)

    def guide(self, x: Tensor, c: Tensor, mask: Tensor, **_):
        if self.use_param_store:  # off in the trainer's hot path
            pyro.module("cvae_completion", self)
        with pyro.plate("data", x.shape[0], dim=-1, device=x.device):
            loc, scale = self.recognition_net(x, c)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    # ---- hand-derived bounds (hand_negative_elbo, hand_iwae_bound: LatentModel's) -----------
    #   -ELBO_β(x_M|c) per datapoint at draws z (K, B, Z), and
    #   L_K(x_M|c) = log (1/K) Σ_k p(x_M|z_k,c) p(z_k|c) / q(z_k|x,c), from these two:
    def log_terms(self, batch: Batch, draws: Draws):
        """log p(x_M|z,c), log p(z|c), log q(z|x,c) at draws z (K, B, Z); each (K, B)."""
        x, c, mask, z = batch["x"], batch["c"], batch["mask"], draws["z"]
        log_px = masked_log_bernoulli(x, self.decoder(z, c), _as_float(mask, x))
        log_pz = bounds.log_normal(z, *self.prior_net(c))
        log_qz = bounds.log_normal(z, *self.recognition_net(x, c))
        return log_px, log_pz, log_qz

    def kl_to_prior(self, batch: Batch) -> Tensor:
        """KL(q(z|x,c) || p(z|c)) in closed form, (B,)."""
        return bounds.kl_normal(*self.recognition_net(batch["x"], batch["c"]), *self.prior_net(batch["c"]))

    def elbo_terms(self, batch: Batch, draws: Draws) -> dict:
        log_px, _, _ = self.log_terms(batch, draws)
        return {"rec": log_px.mean(0), "kl": self.kl_to_prior(batch)}

    # ---- completion ------------------------------------------------------------------------
    @torch.no_grad()
    def complete(self, x: Tensor, quadrants: Union[int, Tensor], num_samples: int = 1) -> Tensor:
        """(S, B, D) completed images: the given pixels of ``x``, and on the missing ones the
        probabilities σ(dec(z, c)) for S draws z ~ p(z|c)."""
        batch = completion_batch(x, quadrants)
        loc, scale = self.prior_net(batch["c"])
        z = loc + scale * torch.randn((num_samples,) + loc.shape, dtype=loc.dtype, device=loc.device)
        probs = torch.sigmoid(self.decoder(z, batch["c"]))
        return torch.where(batch["mask"], probs, x)


@torch.no_grad()
def completion_nll(model: CVAECompletion, x: Tensor, quadrants: Union[int, Tensor], k: int = 1000,
                   chunk: Optional[int] = 100) -> Tensor:
    """Importance-sampling estimate of -log p(x_M | c) per image, (B,), with K = ``k`` samples.

        -log p(x_M|c) ≈ -log (1/K) Σ_k p(x_M|z_k,c) p(z_k|c) / q(z_k|x,c),   z_k ~ q(z|x,c)

    This is -L_K, the negative IWAE bound: an upper bound on -log p(x_M|c) in expectation that
    decreases with K and converges to it as K → ∞. The K draws are taken ``chunk`` at a time with a
    running logsumexp, so K = 5000 fits in memory.
    """
    if k < 1 or (chunk is not None and chunk < 1):
        raise ConfigError(f"k and chunk must be >= 1, got k={k}, chunk={chunk}")
    batch = completion_batch(x, quadrants)
    log_mean_w = LogMeanExp()
    for size in chunk_sizes(k, chunk):
        log_px, log_pz, log_qz = model.log_terms(batch, model.sample_draws(batch, size))
        log_mean_w.add(log_px + log_pz - log_qz)  # (size, B)
    return -log_mean_w.value()


class CompletionBaseline(nn.Module):
    """Deterministic baseline: an MLP c -> logits of every pixel, trained with BCE on the missing ones.

        NLL(x_M | c) = -Σ_{d∈M} [ x_d l_d - softplus(l_d) ],   l = MLP(c)

    exact, since the network predicts independent Bernoulli pixels (no latent variable).
    """

    def __init__(self, x_dim: int, hidden: Sequence[int] = (500, 500)):
        super().__init__()
        quadrant_masks(x_dim)
        self.x_dim = x_dim
        self.net = mlp([x_dim, *hidden, x_dim], activation=nn.ReLU)

    def forward(self, c: Tensor) -> Tensor:
        return self.net(c)

    def nll(self, batch: Batch) -> Tensor:
        """Exact -log p(x_M | c) per image, (B,): the BCE summed over the missing pixels."""
        return -masked_log_bernoulli(batch["x"], self(batch["c"]), _as_float(batch["mask"], batch["x"]))

    def fit(self, x: Tensor, *, epochs: int = 10, batch_size: int = 128, lr: float = 1e-3, seed: int = 0) -> list:
        """Train with Adam on the mean BCE, 1-3 quadrants drawn per image; returns the epoch losses."""
        generator = torch.Generator().manual_seed(seed)
        optimiser = torch.optim.Adam(self.parameters(), lr=lr)
        history = []
        for _ in range(epochs):
            order, total = torch.randperm(x.shape[0], generator=generator), 0.0
            for start in range(0, x.shape[0], batch_size):
                xb = x[order[start: start + batch_size].to(x.device)]
                quadrants = torch.randint(1, 4, (xb.shape[0],), generator=generator).to(x.device)
                loss = self.nll(completion_batch(xb, quadrants)).mean()
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                total += loss.item() * xb.shape[0]
            history.append(total / x.shape[0])
        return history


@torch.no_grad()
def baseline_nll(baseline: CompletionBaseline, x: Tensor, quadrants: Union[int, Tensor]) -> Tensor:
    """The baseline's exact -log p(x_M | c) per image, (B,)."""
    return baseline.nll(completion_batch(x, quadrants))


__all__ = ["CVAE", "CVAECompletion", "CompletionBaseline", "completion_batch", "completion_nll", "baseline_nll",
           "quadrant_masks", "validate_labels", "one_hot", "broadcast_cat", "masked_log_bernoulli",
           "LabelConditionalGenerator"]
