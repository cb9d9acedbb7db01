"""What a model may offer beyond the model/guide pair, stated as protocols and checked with ``isinstance``.

Every model is a :class:`~ppl_vi.models.base.LatentModel` (the pair, its hand bounds, its
:class:`~ppl_vi.loss_registry.ModelTraits`, ``make_batch``, ``beta_sites``...). The capabilities
below are optional; the trainer, evaluator, figures and checker ask ``isinstance(model, Protocol)``
(``typing.runtime_checkable``: the named members are present) instead of probing for attributes.

==================  ===========================================================  ==========================
protocol            members                                                      models
==================  ===========================================================  ==========================
ImageModel          generate(n) -> (n, D); reconstruct(x) -> (B, D)              vae, gmvae, cvae, ssvae, m1m2
LatentEncoder       encode_mean(x) -> (B, Z), for 2-D latent plots                vae, gmvae, ssvae, m1m2
SplitsELBO          elbo_terms(batch, draws) -> {"rec": (B,), "kl": (B,)}         the MNIST models
Classifier          classify(x) -> (B,) labels                                    ssvae, m1m2
LabelConditional    num_classes; generate(n, y) draws images of given classes     cvae, ssvae, m1m2
SemiSupervised      labelled_sites, latent_sites_for(batch), enum_draws(batch,    ssvae, m1m2
                    K), classifier_term, baseline_classifiers(), renyi_labelled_
                    loss(batch, draws), iwae_sums_y_in_log
ExactPosterior      exact_log_likelihood(batch), posterior_kl(batch) (B,)         gmm, linear-gaussian
FittedParameters    fitted_parameters() -> dict (the learned parameters, readable) gmm
==================  ===========================================================  ==========================
"""

from __future__ import annotations

from typing import Dict, Optional, Protocol, runtime_checkable

from torch import Tensor

Batch = Dict[str, Optional[Tensor]]
Draws = Dict[str, Tensor]


@runtime_checkable
class ImageModel(Protocol):
    """Images in and out: samples from the prior and reconstructions at the guide's mean (pixel probabilities)."""

    def generate(self, n: int) -> Tensor: ...

    def reconstruct(self, x: Tensor) -> Tensor: ...


@runtime_checkable
class LatentEncoder(Protocol):
    """The guide's mean q(z|x), (B, Z): the latent scatter plot."""

    def encode_mean(self, x: Tensor) -> Tensor: ...


@runtime_checkable
class SplitsELBO(Protocol):
    """ELBO = rec - kl per datapoint: E_q log p(x|z) and the KL, each (B,), at the guide's draws."""

    def elbo_terms(self, batch: Batch, draws: Draws) -> Dict[str, Tensor]: ...


@runtime_checkable
class Classifier(Protocol):
    """Predicted labels (B,) int64: accuracy and the confusion matrix."""

    def classify(self, x: Tensor) -> Tensor: ...


@runtime_checkable
class LabelConditional(Protocol):
    """``generate(n, y)``: images of the given classes (a class, (n,) labels, or None for 0..C-1 cycled)."""

    num_classes: int

    def generate(self, n: int, y=None) -> Tensor: ...


@runtime_checkable
class SemiSupervised(Protocol):
    """Labelled batches ({"x", "y"}: y observed) and unlabelled ones (y None: sampled or enumerated in the guide).

    ``labelled_sites``: the guide's latent sites on a labelled batch; ``latent_sites_for(batch)`` a batch's own;
    ``enum_draws(batch, K)`` the guide run as TraceEnum_ELBO runs it (y enumerated:
    :class:`~ppl_vi.models.base.EnumeratedDraws`); ``renyi_labelled_loss`` the loss RenyiELBO computes on a
    labelled batch; ``iwae_sums_y_in_log``: the enumerated IWAE bound sums y inside the log (tighter than
    the ELBO); ``baseline_classifiers()`` the supervised-only baselines."""

    labelled_sites: tuple
    iwae_sums_y_in_log: bool

    def latent_sites_for(self, batch: Batch) -> tuple: ...

    def enum_draws(self, batch: Batch, num_particles: int) -> Draws: ...

    def renyi_labelled_loss(self, batch: Batch, draws: Draws) -> Tensor: ...

    def baseline_classifiers(self) -> dict: ...


@runtime_checkable
class ExactPosterior(Protocol):
    """log p(x) and KL(q(z|x) || p(z|x)) per datapoint, (B,), in closed form: the ground-truth rows."""

    def exact_log_likelihood(self, batch: Batch) -> Tensor: ...

    def posterior_kl(self, batch: Batch) -> Tensor: ...


@runtime_checkable
class FittedParameters(Protocol):
    """The learned parameters in readable form (mixture weights, means...), for the run's metrics."""

    def fitted_parameters(self) -> dict: ...
