"""The checker's power, measured: plausible wrong estimators must FAIL, the right ones PASS.

Each mutant (``tests/mutants.py``) patches one thing in the real estimator code; each runs through
``ppl_vi.check``'s expected-gradient check exactly as it is shipped, at the seed counts it is shipped
with:

* "matrix": ``tests/test_matrix.py``'s small float64 models (K = 3, B = 4) at its
  ``GRADIENT_SEEDS``;
* "cli": ``ppl-vi check``'s default ``--gradient-seeds`` and ``--k``, on the registry's default
  model (the full-size VAE, 784-500-500-50; 8 datapoints as the CLI's ``gradient_batch``; random
  binary images instead of MNIST: the data do not change the seed count) and the default GMM.

VIMCO without its baseline is unbiased, so no expected-gradient check can see it (asserted here:
it passes); its variance and its baselines' values fail it (``tests/test_estimators.py``, run here
at the matrix's seed count too). The reference gradient of a (model, batch, target) is computed
once and shared by the right estimator and its mutants.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import test_matrix
from mutants import mutant
from ppl_vi.check import core
from ppl_vi.check.core import enumerates, expected_gradient_check
from ppl_vi.cli import build_parser
from ppl_vi.models.configure import build_config
from ppl_vi.data.synthetic import default_gmm_params, sample_gmm
from ppl_vi.models import REGISTRY
from ppl_vi.objectives.losses import LOSSES, make_loss

DT = torch.float64
CLI = build_parser().parse_args(["check", "vae"])  # the CLI's defaults
SETTINGS = {"matrix": (test_matrix.GRADIENT_SEEDS, test_matrix.K), "cli": (CLI.gradient_seeds, CLI.k)}

#: (mutant, model, loss, settings it runs in); "right" rows are the unmutated estimators
CASES = [
    ("right", "vae", "dreg", ("matrix", "cli")), ("dreg-wtilde", "vae", "dreg", ("matrix", "cli")),
    ("right", "gmvae", "dreg", ("matrix",)), ("dreg-wtilde", "gmvae", "dreg", ("matrix",)),
    ("right", "vae", "iwae", ("matrix", "cli")), ("scale-5pct", "vae", "iwae", ("matrix", "cli")),
    ("scale-5pct", "vae", "dreg", ("matrix",)), ("per-particle-lme", "vae", "iwae", ("matrix", "cli")),
    ("right", "gmm", "trace", ("matrix", "cli")), ("score-dropped", "gmm", "trace", ("matrix", "cli")),
    ("score-half", "gmm", "trace", ("matrix", "cli")),
    ("right", "gmm", "vimco", ("matrix", "cli")), ("score-dropped", "gmm", "vimco", ("matrix", "cli")),
    ("score-half", "gmm", "vimco", ("matrix", "cli")), ("vimco-no-baseline", "gmm", "vimco", ("matrix", "cli")),
    ("right", "ssvae", "trace", ("matrix",)), ("score-dropped", "ssvae", "trace", ("matrix",)),
]
#: unbiased mutants: the expected-gradient check must pass them (other tests fail them)
UNBIASED = {"vimco-no-baseline"}


def cli_model(name: str):
    """The registry's default model of ``name`` (float64) and a batch of the CLI's gradient_batch size."""
    config = build_config(name, overrides={"device": "cpu"})
    if name == "gmm":
        x = sample_gmm(default_gmm_params(DT), 8, seed=1)[0]
    else:
        x = torch.bernoulli(torch.full((8, 784), 0.3, dtype=DT), generator=torch.Generator().manual_seed(0))
    info = {"x_dim": x.shape[1], "train_x": x, "train_size": 1000, "num_classes": 10, "n_labelled": 10,
            "truth": None}
    torch.manual_seed(0)
    return REGISTRY[name].build(config, info).to(DT), {"x": x}


_MODELS, _REFERENCES = {}, {}


def model_and_batch(setting: str, name: str):
    key = (setting, name)
    if key not in _MODELS:
        if setting == "matrix":
            model, batches = test_matrix.build(name, "cpu")
            _MODELS[key] = model, batches.get("unlabelled", batches.get("batch"))  # SSVAE: the sampled y
        else:
            _MODELS[key] = cli_model(name)
    return _MODELS[key]


@pytest.fixture
def shared_reference(monkeypatch):
    """core.reference_stats computed once per (model, batch, target, K, seeds)."""
    original = core.reference_stats

    def cached(model, guide, batch, params, **kw):
        key = (id(model), id(batch["x"]), tuple(sorted(kw.items())))
        if key not in _REFERENCES:
            _REFERENCES[key] = original(model, guide, batch, params, **kw)
        return _REFERENCES[key]
    monkeypatch.setattr(core, "reference_stats", cached)


def run_check(setting: str, mutation: str, name: str, loss_name: str):
    seeds, k = SETTINGS[setting]
    model, batch = model_and_batch(setting, name)
    loss = make_loss(loss_name, k, model.max_plate_nesting)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with mutant(mutation), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return expected_gradient_check(
            f"{mutation}: {name} x {loss_name}", lambda b: loss.differentiable_loss(model.model, model.guide, **b),
            model.model, model.guide, batch, [p for _, p in named], [n for n, _ in named],
            target=LOSSES[loss_name].target, k=k, max_plate_nesting=model.max_plate_nesting, seeds=seeds,
            enumerate_discrete=not enumerates(loss))


#: the full-size VAE at the CLI's seeds takes ~15 s a case on 2 cores: run with ``pytest -m slow``
#: (measured results in docs/reliability.md); the CLI's GMM cases and every matrix case run by default
PARAMS = [pytest.param(setting, m, name, loss, id=f"{setting}-{m}-{name}-{loss}",
                       marks=[pytest.mark.slow] if setting == "cli" and name == "vae" else [])
          for m, name, loss, settings in CASES for setting in settings]


@pytest.mark.parametrize("setting, mutation, name, loss", PARAMS)
def test_mutant_fails_and_the_right_estimator_passes(setting, mutation, name, loss, shared_reference):
    """Catches a checker without power at its shipped seed counts: each biased mutant must FAIL the
    expected-gradient check (summary row), each right estimator PASS; the note states the smallest
    bias the check could detect."""
    rows = run_check(setting, mutation, name, loss)
    summary = rows[0]
    should_pass = mutation == "right" or mutation in UNBIASED
    assert summary.passed == should_pass, "\n".join(f"{r.name}: {r.tolerance}; {r.note}" for r in rows)
    assert "detects a bias along r" in summary.note or "exact" in summary.note


def test_vimco_without_baseline_fails_its_variance_check_at_the_matrix_seed_count():
    """The unbiased mutant's other test, at the matrix's seed count: VIMCO's variance below half the
    no-baseline estimator's (see tests/test_estimators.py)."""
    from test_estimators import encoder_variance

    model, batch = model_and_batch("matrix", "gmm")
    seeds = range(test_matrix.GRADIENT_SEEDS)
    right = encoder_variance(model, batch, seeds)
    with mutant("vimco-no-baseline"):
        none = encoder_variance(model, batch, seeds)
    assert right < 0.5 * none, (right, none)
