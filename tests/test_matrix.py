"""The registry matrix: every registered model × every loss × fast path on/off (× device).

For each combination, either

* the loss can train the model: on a small float64 instance and every kind of batch its training
  step holds (labelled and unlabelled for the semi-supervised models), the loss *as the trainer
  runs it* (through the fast path, or the plain loss object) equals the hand-derived bound on the
  same sample (value, each datapoint, every gradient), and its expected gradient equals the
  gradient of the objective it targets (exact over discrete sites: ``ppl_vi.check``); or
* building the run's configuration refuses it, with one line naming the losses that do work, and
  those are exactly the ones proven here.

The fast path's FastLoss is shared by a step's batches in the order the trainer runs them, so a
kind of batch the sync-free loss cannot take (an unlabelled batch's discrete y) follows one it can.
Only the losses with a sync-free form (``trace``, ``iwae``) run a different computation on the fast
path; for the others FastLoss runs the plain loss object, so the matrix proves them once ("plain")
and :func:`test_fast_path_runs_the_plain_loss_where_it_has_no_sync_free_form` proves the identity.

``GRADIENT_SEEDS`` seeds per expected-gradient row: enough for DReG's heavy-tailed encoder gradient
at this random guide to see a bias of ~45 % per tensor and ~20 % along the whole gradient (the note's
"detects" figures), so that
``tests/test_mutants.py``'s DReG-with-w̃ mutant (+55 % on the encoder) fails at this very count.
"""

from __future__ import annotations

import dataclasses
import warnings

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO

from ppl_vi.check import check
from ppl_vi.check.core import enumerates
from ppl_vi.check.semisupervised import labelled_comparisons, unlabelled_comparisons
from ppl_vi.check.suite import loss_comparisons, model_traits
from ppl_vi.config import LOSSES as config_losses
from ppl_vi.config import TrainConfig
from ppl_vi.data.synthetic import default_gmm_params, default_linear_gaussian_params, sample_gmm, \
    sample_linear_gaussian
from ppl_vi.errors import ConfigError
from ppl_vi.models import REGISTRY
from ppl_vi.models.protocols import (Classifier, ExactPosterior, FittedParameters, ImageModel, LabelConditional,
                                     LatentEncoder, SemiSupervised, SplitsELBO)
from ppl_vi.objectives.losses import BUILDERS, LOSSES, check_combination, make_loss, supported_losses, target_of
from ppl_vi.training.graph_step import FastLoss, SyncFreeLoss, Unsupported

DT = torch.float64
PROTOCOLS = (ImageModel, LatentEncoder, SplitsELBO, Classifier, LabelConditional, SemiSupervised, ExactPosterior,
             FittedParameters)
K = 3  # particles: a multi-sample loss needs K >= 2
B = 4  # datapoints per batch
SMALL = dict(hidden=[8], z_dim=2, components=3)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
GRADIENT_SEEDS = 100  # seeds per expected-gradient row (see the module docstring); tests/test_mutants.py uses it


#: registry models (the built-in ones: a test may register another later), and the guide choices that
#: change which losses apply
VARIANTS = {**{name: (name, {}) for name in REGISTRY},
            "gmm[marginal]": ("gmm", {"guide": "marginal"}), "linear-gaussian[exact]": ("linear-gaussian", {"guide": "exact"})}


def small_config(variant: str, loss: str = "trace") -> TrainConfig:
    name, overrides = VARIANTS[variant]
    return TrainConfig(**{**REGISTRY[name].defaults, **SMALL, **overrides, "model": name, "loss": loss, "k": K})


def traits(variant: str, loss: str = "trace"):
    config = small_config(variant, loss)
    return REGISTRY[config.model].cls.traits(config)


def build(variant: str, device: str):
    """A small float64 instance of registry model ``name`` and its training step's batches."""
    config = small_config(variant)
    spec = REGISTRY[config.model]
    g = torch.Generator().manual_seed(0)
    if spec.data == "gmm":
        x = sample_gmm(default_gmm_params(DT), B, seed=1)[0]
    elif spec.data == "linear-gaussian":
        x = sample_linear_gaussian(default_linear_gaussian_params(x_dim=5, z_dim=2, seed=0), B, seed=1)[0]
    else:  # MNIST-shaped binary images, 4×4 (square with an even side, as image completion needs)
        x = torch.bernoulli(torch.full((B, 16), 0.4, dtype=DT), generator=g)
    info = {"x_dim": x.shape[1], "train_x": x, "train_size": 1000, "num_classes": 10, "n_labelled": 10,
            "truth": None}
    torch.manual_seed(0)
    model = spec.build(config, info).to(device=device, dtype=DT)
    x = x.to(device)
    y = torch.tensor([1, 0, 3, 2], device=device)
    if spec.data == "mnist-semisupervised":
        batches = {"labelled": model.make_batch(x, y), "unlabelled": model.make_batch(x, None)}
    else:
        batches = {"batch": model.make_batch(x, y)}
    return model, batches


def comparisons(model, name: str, loss: str, kind: str):
    """The hand-bound comparisons for ``loss`` on a batch of ``kind`` (unscaled ones: β has its own tests)."""
    if kind == "labelled":
        chosen = [c for c in labelled_comparisons(model, K, 2.0) if c.name.startswith(f"{loss} (")]
    elif kind == "unlabelled":
        chosen = [c for c in unlabelled_comparisons(model, K, 2.0) if c.name.startswith(f"{loss} (")]
    else:
        chosen = loss_comparisons(model, loss, K, 2.0)
    # the trainer's loss has K particles: the comparisons drawn with K (those without draws need none)
    return [c for c in chosen if c.model is None and "beta" not in c.name and (c.num_particles == K or not c.same_sample)]


class TrainerPath:
    """The loss as the trainer evaluates one batch of a step: FastLoss's, or the plain loss's."""

    def __init__(self, loss, fast):
        self.inner, self.fast = loss, fast
        self.target = target_of(loss)
        self.enumerates = enumerates(loss)

    def differentiable_loss(self, model, guide, **batch):
        return (self.fast or self.inner).differentiable_loss(model, guide, **batch)

    def loss(self, model, guide, **batch):
        return self.inner.loss(model, guide, **batch)


CASES = [(variant, loss) for variant in sorted(VARIANTS) for loss in LOSSES]


def _accepted(variant: str, loss: str) -> bool:
    return loss in supported_losses(traits(variant), k=K)


def has_sync_free_form(loss: str) -> bool:
    """Does the fast path compute ``loss`` differently from the plain loss object (a sync-free form)?"""
    try:
        SyncFreeLoss(make_loss(loss, K, 1))
        return True
    except Unsupported:
        return False


PATHS = [(name, loss, fast) for name, loss in CASES if _accepted(name, loss)
         for fast in ([True, False] if has_sync_free_form(loss) else [False])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name, loss, fast", PATHS,
                         ids=[f"{n}-{lo}-{'fast' if f else 'plain'}" for n, lo, f in PATHS])
def test_accepted_combination_is_proven(name, loss, fast, device):
    """Catches a loss, or its fast path, whose value, per-datapoint split or gradient differs from the
    hand bound on the same draws, or whose expected gradient is not the target's (a dropped or
    mis-weighted score term, DReG with w̃, a scaled gradient: see tests/test_mutants.py)."""
    model, batches = build(name, device)
    assert model_traits(model) == traits(name)
    spec = LOSSES[loss]
    loss_object = make_loss(loss, K if spec.target == "iwae" else K, model.max_plate_nesting)
    assert target_of(loss_object) == spec.target  # else the expected-gradient rows would be skipped, not run
    fast_step = FastLoss(loss_object, model, device, quiet=True) if fast else None
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params, names = [p for _, p in named], [n for n, _ in named]
    proven = 0
    for kind, batch in batches.items():  # in the trainer's order: labelled before unlabelled
        chosen = comparisons(model, name, loss, kind)
        assert chosen, f"no hand comparison for {name} × {loss} on a {kind} batch"
        chosen = [dataclasses.replace(c, loss=TrainerPath(loss_object, fast_step), statistical=False) for c in chosen]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # Trace_ELBO sampling a site marked for enumeration
            report = check(model.model, model.guide, batch, chosen, params, param_names=names,
                           max_plate_nesting=model.max_plate_nesting, repeats=0, gradient_seeds=GRADIENT_SEEDS, gradient_batch=B)
        assert report.passed, f"\n{name} × {loss} ({'fast' if fast else 'plain'}, {kind}):\n{report.table()}"
        kinds = {r.kind for r in report.rows}
        assert "same sample" in kinds
        if any(c.compare_grads and c.objective() for c in chosen):
            assert "expected gradient" in kinds
        proven += 1
    assert proven == len(batches)
    if fast and name == "ssvae" and loss == "trace":  # the unlabelled batch runs Trace_ELBO, not the sync-free loss
        assert fast_step.mode == "sync-free + eager", fast_step.notes


@pytest.mark.parametrize("loss", [lo for lo in LOSSES if not has_sync_free_form(lo)])
def test_fast_path_runs_the_plain_loss_where_it_has_no_sync_free_form(loss):
    """The matrix proves these losses once, plain: this proves the fast path is that very computation.
    Catches a fast path that silently replaced such a loss (same value and gradients, bit for bit)."""
    name = next(n for n, lo in CASES if lo == loss and _accepted(n, lo))
    model, batches = build(name, "cpu")
    batch = next(iter(batches.values()))
    loss_object = make_loss(loss, K, model.max_plate_nesting)
    fast = FastLoss(loss_object, model, "cpu", quiet=True)
    assert fast.sync_free is None and fast.mode == "eager"
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for path in (fast, loss_object):
        pyro.set_rng_seed(5)
        value = path.differentiable_loss(model.model, model.guide, **batch)
        results.append([value.detach()] + list(torch.autograd.grad(value, params, allow_unused=True)))
    for a, b in zip(*results):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("name, loss", [c for c in CASES if not _accepted(*c)])
def test_refused_combination_names_what_works(name, loss):
    config = small_config(name, loss)
    works = supported_losses(traits(name), k=K)
    with pytest.raises(ConfigError) as info:
        check_combination(config.model, traits(name), loss, K, config.beta, config.kl_anneal)
    message = str(info.value)
    assert "\n" not in message and f"--loss {loss} cannot train {config.model}" in message
    assert message.endswith(f"losses that work for {config.model}: {', '.join(works)}")
    assert works, f"no loss trains {name}"


def test_every_model_has_a_default_loss_that_works():
    for variant, (name, _) in VARIANTS.items():
        config = small_config(variant, REGISTRY[name].defaults.get("loss", "trace"))
        check_combination(name, REGISTRY[name].cls.traits(config), config.loss, config.k)


def test_the_matrix_covers_every_loss_and_model():
    accepted = {c for c in CASES if _accepted(*c)}
    assert {loss for _, loss in accepted} == set(LOSSES)  # every loss trains some model
    assert {name for name, _ in accepted} == set(VARIANTS)  # every model trains with some loss
    assert supported_losses(traits("gmm[marginal]"), k=K) == ["enum", "iwae", "vimco"]
    assert supported_losses(traits("gmm"), k=K) == ["trace", "enum", "vimco"]


def test_one_registry_names_builds_and_targets_every_loss():
    """Catches: a loss added to the registry without a builder (or the reverse), a made loss whose target is not
    the registry's, a Pyro ELBO made elsewhere given a target it does not declare, config listing other names."""
    assert list(BUILDERS) == list(LOSSES) == list(config_losses)
    for name, spec in LOSSES.items():
        assert target_of(make_loss(name, 2)) == spec.target, name
    assert target_of(Trace_ELBO()) is None and not hasattr(make_loss("trace"), "target")


#: the optional capabilities (ppl_vi.models.protocols) each registry model offers
CAPABILITIES = {
    "vae": {"ImageModel", "LatentEncoder", "SplitsELBO"},
    "gmvae": {"ImageModel", "LatentEncoder", "SplitsELBO"},
    "cvae": {"ImageModel", "SplitsELBO", "LabelConditional"},
    "cvae-completion": {"SplitsELBO"},
    "ssvae": {"ImageModel", "LatentEncoder", "SplitsELBO", "Classifier", "LabelConditional", "SemiSupervised"},
    "m1m2": {"ImageModel", "LatentEncoder", "SplitsELBO", "Classifier", "LabelConditional", "SemiSupervised"},
    "gmm": {"ExactPosterior", "FittedParameters"},
    "gmm[marginal]": {"ExactPosterior", "FittedParameters"},
    "linear-gaussian": {"ExactPosterior"},
    "linear-gaussian[exact]": {"ExactPosterior"},
    "student-t-fa": {"FittedParameters"},  # examples/student_t_fa.py, registered when a test imported it first
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_protocols_say_what_each_model_offers(variant):
    """Catches: a hook renamed or dropped from a model (the figures, metrics or checker would silently skip it),
    a protocol that matches a model it does not describe, traits stated apart from the model's own."""
    model, _ = build(variant, "cpu")
    offered = {p.__name__ for p in PROTOCOLS if isinstance(model, p)}
    assert offered == CAPABILITIES[variant]
    assert model.own_traits() == traits(variant)
    assert model.latent_reparameterized == (not traits(variant).discrete_guide)


def matrix_table() -> str:
    """The matrix as the closing note shows it: model × loss, proven (fast and plain) or refused."""
    head = "| model | " + " | ".join(LOSSES) + " |"
    lines = [head, "|" + "---|" * (len(LOSSES) + 1)]
    for variant in sorted(VARIANTS):
        cells = ["proven (fast, plain)" if _accepted(variant, loss) else "refused" for loss in LOSSES]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
