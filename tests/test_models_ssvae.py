"""The semi-supervised VAE (M2): enumeration of y, the classifier term, the check suite, bad labels.

Tiny sizes (D = 784, hidden [16], Z = 3, B = 8), float64 throughout.
"""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceEnum_ELBO

from ppl_vi import bounds
from ppl_vi.config import TrainConfig
from ppl_vi.errors import DataError
from ppl_vi.models import get_spec
from ppl_vi.check import Comparison, check
from ppl_vi.check.semisupervised import check_semisupervised
from ppl_vi.models.ssvae import SSVAE
from ppl_vi.objectives.losses import make_loss

X_DIM, Z_DIM, HIDDEN, B, ALPHA = 784, 3, [16], 8, 2.5


@pytest.fixture
def model():
    """Kingma et al.'s objective: a labelled batch carries its ELBO and the classifier term."""
    return SSVAE(X_DIM, Z_DIM, HIDDEN, alpha_scale=ALPHA, objective="kingma").double()


@pytest.fixture
def cs236():
    """The default objective (CS236's recipe): a labelled batch carries the classifier term alone."""
    return SSVAE(X_DIM, Z_DIM, HIDDEN, alpha_scale=ALPHA).double()


@pytest.fixture
def x(binary_images):
    return binary_images(B, X_DIM)


@pytest.fixture
def y():
    return torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])


def params_of(model):
    named = [(n, p) for n, p in model.named_parameters()]
    return [p for _, p in named], [n for n, _ in named]


# ---- the full suite ----------------------------------------------------------------------------


@pytest.mark.parametrize("objective", ["cs236", "kingma"])
def test_check_suite_passes_labelled_and_unlabelled(objective, x, y):
    model = SSVAE(X_DIM, Z_DIM, HIDDEN, alpha_scale=ALPHA, objective=objective).double()
    report = check_semisupervised(model, model.make_batch(x, y), model.make_batch(x), repeats=12, gradient_seeds=12,
                                  ks=(1, 10), ladder_repeats=5)
    assert report.passed, "\n" + report.table()
    names = [r.name for r in report.rows]
    assert any(n.startswith("[L] enum") for n in names)
    # β on a sampled y: Pyro scales y's score-function term by β too, so that row compares the same draws only
    beta_rows = [r for r in report.rows if r.name.startswith("[U] trace (K=3) y sampled, beta=2")]
    assert beta_rows and {r.kind for r in beta_rows} == {"same sample"}
    enum_rows = [r for r in report.rows if "y enumerated vs hand" in r.name and r.kind == "same sample"]
    assert len(enum_rows) == 6  # K = 1 and K = 3: loss, each datapoint, gradients
    assert all("verified identical" in r.note for r in enum_rows if r.name.endswith("loss"))
    # the expected gradient of Trace_ELBO with y sampled: y enumerated exactly per datapoint on the
    # estimator's side, z averaged; every drawn-y comparison has one, and so has TraceEnum's
    summaries = [r for r in report.rows if r.kind == "expected gradient" and "vs reference" in r.name]
    exact_y = [r for r in summaries if "[U] trace (K=1) y sampled vs hand" in r.name]
    assert exact_y and all("discrete sites enumerated, continuous averaged" in r.note for r in exact_y)
    # K = 3 with y sampled: 10^3 tuples, too many to enumerate, and a sampled average hides rare classes
    # (their SE reads ~0): same draws and the mean over seeds only, no expected-gradient row
    sampled = [r for r in report.rows if r.name.startswith("[U] trace (K=3) y sampled vs hand")]
    assert {r.kind for r in sampled} == {"same sample", "statistical"}
    assert any(r.name.startswith("[U] enum (K=3) y enumerated vs hand") for r in summaries)
    assert not report.skipped


def _enumerated(model, batch, hand):
    params, names = params_of(model)
    c = Comparison("enum (K=3) y enumerated", make_loss("enum", 3, 1), hand, 3,
                   draws=lambda b: model.enum_draws(b, 3), statistical=False)
    return check(model.model, model.guide, batch, [c], params, param_names=names, repeats=0).rows[1:]


def test_missing_entropy_term_fails(model, x):
    """-Σ_y q(y|x) ELBO(x, y) without + H[q(y|x)] is not TraceEnum's loss."""
    batch = model.make_batch(x)

    def wrong(b, d):
        return model.hand_negative_elbo(b, d) + bounds.entropy_categorical(model.classifier(b["x"]))

    good = _enumerated(model, batch, lambda b, d: model.hand_negative_elbo(b, d))
    bad = _enumerated(model, batch, wrong)
    assert all(r.passed for r in good)
    assert not bad[0].passed and bad[0].rel_diff > 1e-6
    # datapoint by datapoint, every datapoint is off by its own entropy
    assert not bad[1].passed and len(bad[1].details["differing"]) == B


# ---- enumeration in closed form ----------------------------------------------------------------


def test_trace_enum_equals_loop_over_classes(model, x):
    """TraceEnum's unlabelled loss = Σ_c q(c|x) [labelled loss(x, c) + α' log q(c|x)] - H[q(y|x)],
    the labelled losses evaluated by hand at the z that TraceEnum drew for class c."""
    batch, k = model.make_batch(x), 2
    pyro.set_rng_seed(7)
    pyro_loss = TraceEnum_ELBO(num_particles=k, vectorize_particles=True, max_plate_nesting=1).loss(
        model.model, model.guide, **batch)
    pyro.set_rng_seed(7)
    draws = model.enum_draws(batch, k)
    assert draws["z"].shape == (10, k, B, Z_DIM) and draws["y"].shape == (10, 1, 1)
    with torch.no_grad():
        logits = model.classifier(x)
        q = logits.softmax(-1)
        loop = -bounds.entropy_categorical(logits)
        for c in range(10):
            labelled = model.make_batch(x, torch.full((B,), c))
            labelled_loss = model.hand_negative_elbo(labelled, {"z": draws["z"][c]})
            loop = loop + q[:, c] * (labelled_loss + ALPHA * bounds.log_categorical(labelled["y"], logits))
    assert loop.sum().item() == pytest.approx(pyro_loss, rel=1e-9)


def test_enumerated_closed_kl_is_loop_and_iwae_above_elbo(model, x):
    batch = model.make_batch(x)
    with torch.no_grad():
        draws = model.enum_draws(batch, 3)
        logits = model.classifier(x)
        analytic = model.hand_negative_elbo(batch, draws, kl="analytic")
        # -Σ_y q [E log p(x|y,z) - KL_z(y)] + KL(q(y|x) || p(y)), by hand per class
        rec = torch.stack([model._log_terms(x, torch.full((B,), c), draws["z"][c])[0].mean(0) for c in range(10)])
        kl_z = torch.stack([model.kl_z(x, torch.full((B,), c)) for c in range(10)])
        expected = (logits.softmax(-1).T * (kl_z - rec)).sum(0) + bounds.kl_categorical(logits, torch.zeros(10))
        assert torch.allclose(analytic, expected, rtol=1e-10)
        # log Σ_y p(y) p̂(x|y) >= Σ_y q(y|x) [log p(y) + mean_k log w_yk - log q(y|x)] pointwise (Jensen twice)
        assert (model.hand_iwae_bound(batch, draws) >= -model.hand_negative_elbo(batch, draws) - 1e-9).all()


# ---- the classifier term and the batch kinds ---------------------------------------------------


def test_classifier_term_is_inside_the_pair(model, x, y):
    """Labelled loss(α') - loss(0) = -α' Σ log q(y|x), on the same draws."""
    batch = model.make_batch(x, y)
    loss = Trace_ELBO(num_particles=2, vectorize_particles=True, max_plate_nesting=1)
    pyro.set_rng_seed(3)
    with_term = loss.loss(model.model, model.guide, **batch)
    model.alpha_scale = 0.0
    pyro.set_rng_seed(3)
    without = loss.loss(model.model, model.guide, **batch)
    log_q = bounds.log_categorical(y, model.classifier(x)).sum().item()
    assert with_term - without == pytest.approx(-ALPHA * log_q, rel=1e-9)


def test_latent_sites_and_draws_by_batch(model, x, y):
    assert model.latent_sites_for(model.make_batch(x, y)) == ("z",)
    assert model.latent_sites_for(model.make_batch(x)) == ("y", "z")
    assert set(model.sample_draws(model.make_batch(x, y), 4)) == {"z"}
    draws = model.sample_draws(model.make_batch(x), 4)
    assert draws["y"].shape == (4, B) and draws["z"].shape == (4, B, Z_DIM)


def test_from_config_alpha_scale_and_registry():
    spec = get_spec("ssvae")
    assert spec.data == "mnist-semisupervised" and spec.defaults["loss"] == "enum"
    info = {"x_dim": X_DIM, "num_classes": 10, "train_size": 50000, "n_labelled": 100}
    # the default, CS236's recipe: α = 100 times the mean cross-entropy over a labelled batch of all 100 labels,
    # the step divided by the batch size 100: α' = α B / b_l = 100 per labelled image
    config = TrainConfig(**{**spec.defaults, "model": "ssvae"})
    m = spec.build(config, info)
    assert (m.objective, m.alpha_scale, m.z_dim, config.batch_size) == ("cs236", 100.0, 64, 100)
    assert [layer.out_features for layer in m.classifier if isinstance(layer, torch.nn.Linear)] == [300, 300, 10]
    assert isinstance(m.classifier[1], torch.nn.ReLU) and isinstance(m.encoder.act, torch.nn.ELU)
    m = spec.build(TrainConfig(**{**spec.defaults, "model": "ssvae", "labels": 1000}), {**info, "n_labelled": 1000})
    assert m.alpha_scale == pytest.approx(100.0)  # b_l = min(B, N_l) = 100: still α × a batch mean
    m = spec.build(TrainConfig(**{**spec.defaults, "model": "ssvae", "labelled_batch_size": 25, "alpha": 3.0}), info)
    assert m.alpha_scale == pytest.approx(3.0 * 100 / 25)
    # Kingma et al.: α = 0.1 (its own default when alpha is not given) times N, spread over the N_l labels
    config = TrainConfig(**{**spec.defaults, "model": "ssvae", "objective": "kingma"})
    m = spec.build(config, info)
    assert m.objective == "kingma" and m.alpha_scale == pytest.approx(0.1 * 50000 / 100)
    m = spec.build(config, {**info, "n_labelled": None})
    assert m.alpha_scale == pytest.approx(0.1 * 50000)  # no labelled data: the term never appears


def test_unknown_objective_is_refused():
    from ppl_vi.errors import ConfigError

    with pytest.raises(ConfigError, match="objective must be cs236 or kingma, got 'm2'"):
        TrainConfig(model="ssvae", objective="m2")
    with pytest.raises(ConfigError, match="unknown objective 'm2'; expected one of: cs236, kingma"):
        SSVAE(X_DIM, Z_DIM, HIDDEN, objective="m2")


def test_cs236_labelled_batch_is_the_classifier_term_alone(cs236, x, y):
    """Every ELBO loss on a cs236 labelled batch is -α' Σ log q(y|x) exactly: no latent site, no ELBO term."""
    batch = cs236.make_batch(x, y)
    expected = -ALPHA * bounds.log_categorical(y, cs236.classifier(x)).sum()
    assert cs236.latent_sites_for(batch) == () and cs236.sample_draws(batch, 3) == {}
    for name in ("trace", "enum", "meanfield"):
        value = make_loss(name, 2, 1).differentiable_loss(cs236.model, cs236.guide, **batch)
        assert value.item() == pytest.approx(expected.item(), rel=1e-12)
    torch.testing.assert_close(cs236.hand_negative_elbo(batch, {}).sum(), expected, rtol=1e-12, atol=0)
    # the unlabelled batch is the same bound under both objectives
    kingma = SSVAE(X_DIM, Z_DIM, HIDDEN, alpha_scale=ALPHA, objective="kingma").double()
    kingma.load_state_dict(cs236.state_dict())
    unlabelled = cs236.make_batch(x)
    pyro.set_rng_seed(4)
    draws = cs236.enum_draws(unlabelled, 2)
    torch.testing.assert_close(cs236.hand_negative_elbo(unlabelled, draws), kingma.hand_negative_elbo(unlabelled, draws))


def test_elbo_terms_match_the_bounds(model, x, y):
    """rec - kl is the ELBO: labelled (with the α' term apart), enumerated (exact in y), sampled."""
    labelled, unlabelled = model.make_batch(x, y), model.make_batch(x)
    with torch.no_grad():
        draws = model.sample_draws(labelled, 2)
        terms = model.elbo_terms(labelled, draws)
        assert torch.allclose(terms["kl"] - terms["rec"] - model.classifier_term(labelled),
                              model.hand_negative_elbo(labelled, draws, kl="analytic"), rtol=1e-12)
        enum = model.enum_draws(unlabelled, 2)
        terms = model.elbo_terms(unlabelled, enum)
        assert torch.allclose(terms["kl"] - terms["rec"], model.hand_negative_elbo(unlabelled, enum, kl="analytic"),
                              rtol=1e-12)
        sampled = model.sample_draws(unlabelled, 2)
        terms = model.elbo_terms(unlabelled, sampled)
        assert terms["rec"].shape == terms["kl"].shape == (B,) and (terms["kl"] >= 0).all()


def test_batches_from_data_for_the_cli(model, x, y):
    from types import SimpleNamespace

    from ppl_vi.check.semisupervised import batches_from_data

    data = SimpleNamespace(train_x=torch.rand(20, X_DIM, dtype=torch.float64), train_y=torch.arange(20) % 10,
                           labelled_idx=torch.tensor([2, 5, 7, 11]), unlabelled_idx=torch.arange(12, 20))
    labelled, unlabelled = batches_from_data(model, data, 3, seed=0)
    assert torch.equal(labelled["y"], torch.tensor([2, 5, 7])) and unlabelled["y"] is None
    assert labelled["x"].shape == unlabelled["x"].shape == (3, X_DIM)
    assert set(labelled["x"].unique().tolist()) <= {0.0, 1.0}


def test_hooks_shapes(model, x, y):
    assert model.classify(x).shape == (B,) and model.classify(x).dtype == torch.int64
    grid = model.generate(20)
    assert grid.shape == (20, X_DIM) and ((grid >= 0) & (grid <= 1)).all()
    assert model.generate(3, y=7).shape == (3, X_DIM)
    assert model.reconstruct(x).shape == (B, X_DIM) and model.reconstruct(x, y).shape == (B, X_DIM)
    assert model.encode_mean(x, y).shape == (B, Z_DIM)


# ---- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("labels", [[0, 1, 2, 3, 4, 5, 6, 10], [-1, 1, 2, 3, 4, 5, 6, 7]])
def test_labels_out_of_range(model, x, labels):
    with pytest.raises(DataError, match=r"labels range over .*expected integer labels .* in 0\.\.9"):
        model.make_batch(x, torch.tensor(labels))


def test_labels_wrong_dtype_or_shape(model, x):
    with pytest.raises(DataError, match="dtype"):
        model.make_batch(x, torch.zeros(B))
    with pytest.raises(DataError, match="shape"):
        model.make_batch(x, torch.zeros(B + 1, dtype=torch.long))
    with pytest.raises(DataError, match="in 0..9"):
        model.generate(2, y=12)
    assert len(str(DataError("x")).splitlines()) == 1
    with pytest.raises(DataError) as info:
        model.make_batch(x, torch.full((B,), 11))
    assert "\n" not in str(info.value)


def test_default_loss_gives_finite_gradients(model, x, y):
    """The default loss (TraceEnum_ELBO) on each batch kind: a finite loss and finite gradients."""
    loss = TraceEnum_ELBO(max_plate_nesting=1, strict_enumeration_warning=False)
    for batch in (model.make_batch(x, y), model.make_batch(x)):
        value = loss.differentiable_loss(model.model, model.guide, **batch)
        grads = torch.autograd.grad(value, list(model.parameters()), allow_unused=True)
        assert math.isfinite(value.item()) and all(g is None or torch.isfinite(g).all() for g in grads)


def test_split_first_layer_equals_the_concatenated_input():
    """nets.linear_of_concat: x (B, D) beside one-hot labels enumerated (C, 1, 1, C) gives what the
    layer gives on the concatenation broadcast to (C, 1, B, D + C), to float64 round-off."""
    from ppl_vi.models.cvae import broadcast_cat
    from ppl_vi.nets import GaussianEncoder, linear_of_concat

    torch.manual_seed(0)
    encoder = GaussianEncoder(X_DIM + 10, HIDDEN, Z_DIM).double()
    x = torch.rand(B, X_DIM, dtype=torch.float64)
    labels = torch.nn.functional.one_hot(torch.arange(10).view(10, 1, 1), 10).double()  # (C, 1, 1, C)
    split, joined = encoder(x, labels), encoder(broadcast_cat(x, labels))
    assert split[0].shape == (10, 1, B, Z_DIM)
    for a, b in zip(split, joined):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="inputs of widths \\[784, 9\\]"):
        linear_of_concat(encoder.body[0], [x, labels[..., :9]])
