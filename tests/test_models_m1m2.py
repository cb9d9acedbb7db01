"""The stacked model M1+M2: its check suite (joint and with a frozen M1), closed forms of the
enumerated bounds, the frozen M1 staying put in training, loading M1 from a run, refusals.

Tiny sizes (D = 30, M1 hidden [8], Z1 = 3, M2 hidden [8], Z2 = 2, C = 4 classes, B = 6), float64.
"""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro.infer import TraceEnum_ELBO

from ppl_vi import bounds
from ppl_vi.cli import main
from ppl_vi.models.configure import build_config
from ppl_vi.errors import ConfigError, DataError
from ppl_vi.check import Comparison, check
from ppl_vi.check.semisupervised import check_semisupervised
from ppl_vi.models.m1m2 import M1M2
from ppl_vi.models.base import get_spec
from ppl_vi.objectives.losses import check_config, make_loss
from ppl_vi.models.vae import VAE

D, Z1, Z2, C, B, ALPHA = 30, 3, 2, 4, 6, 2.5


def build(frozen: bool) -> M1M2:
    """A small M1 (frozen, or trained jointly with M2) under M2."""
    torch.manual_seed(0)
    return M1M2(D, Z2, [8], m1=VAE(D, Z1, [8]), num_classes=C, alpha_scale=ALPHA, freeze_m1=frozen).double()


@pytest.fixture
def x(binary_images):
    return binary_images(B, D)


@pytest.fixture
def y():
    return torch.tensor([0, 3, 1, 2, 3, 1])


@pytest.mark.parametrize("frozen", [False, True])
def test_check_suite_passes(frozen, x, y):
    model = build(frozen)
    report = check_semisupervised(model, model.make_batch(x, y), model.make_batch(x), repeats=8, gradient_seeds=10,
                                  ks=(1, 10), ladder_repeats=4)
    assert report.passed, "\n" + report.table()
    enum = [r for r in report.rows if "y enumerated vs hand" in r.name and r.kind == "same sample"
            and r.name.endswith("loss")]
    assert len(enum) == 2 and all("verified identical" in r.note for r in enum)
    grads = [r for r in report.rows if r.kind == "same sample" and ": gradients of" in r.name]
    n_trainable = sum(p.requires_grad for p in model.parameters())
    assert grads and all(f"gradients of {n_trainable} tensors" in r.name for r in grads)
    n_m2 = sum(1 for name, _ in model.named_parameters() if not name.startswith("m1."))
    assert n_m2 == 16 and n_trainable == (n_m2 if frozen else n_m2 + len(list(model.m1.parameters())))
    assert any(r.kind == "expected gradient" and r.name.startswith("[U] trace (K=1) y sampled") for r in report.rows)


def _enumerated(model, batch, hand):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params, names = [p for _, p in named], [n for n, _ in named]
    c = Comparison("enum (K=3) y enumerated", make_loss("enum", 3, 1), hand, 3,
                   draws=lambda b: model.enum_draws(b, 3), statistical=False)
    return check(model.model, model.guide, batch, [c], params, param_names=names, repeats=0).rows[1:]


def test_a_wrong_bound_fails(x):
    """Dropping -log q(z1|x) (as if z1 were data, not a latent) is not TraceEnum's loss: the row fails."""
    model = build(frozen=True)
    batch = model.make_batch(x)

    def without_qz1(b, d):
        _, log_qz1 = model.log_px_and_qz1(b["x"], d["z1"])
        return model.hand_negative_elbo(b, d) - log_qz1.mean(0)

    good = _enumerated(model, batch, model.hand_negative_elbo)
    bad = _enumerated(model, batch, without_qz1)
    assert all(r.passed for r in good)
    assert not bad[0].passed and bad[0].rel_diff > 1e-6


def test_enumerated_bounds_equal_loops_over_classes(x):
    """K = 1: TraceEnum's unlabelled loss = Σ_c q(c|z1) [labelled loss at (c, z2_c), without α'] - H[q(y|z1)],
    and the enumerated IWAE_1 = log p(x|z1) - log q(z1|x) + log Σ_c p(c) p(z1|c,z2_c) p(z2_c) / q(z2_c|z1,c)."""
    model = build(frozen=False)
    batch = model.make_batch(x)
    pyro.set_rng_seed(11)
    pyro_loss = TraceEnum_ELBO(max_plate_nesting=1).loss(model.model, model.guide, **batch)
    pyro.set_rng_seed(11)
    draws = model.enum_draws(batch, 1)
    z1, z2 = draws["z1"], draws["z2"]  # (1, B, Z1), (C, 1, B, Z2)
    assert z1.shape == (1, B, Z1) and z2.shape == (C, 1, B, Z2)
    with torch.no_grad():
        logits = model.classifier(z1[0])
        q = logits.softmax(-1)
        loop = -bounds.entropy_categorical(logits)
        weights = []
        for c in range(C):
            labelled = model.make_batch(x, torch.full((B,), c))
            loss_c = model.hand_negative_elbo(labelled, {"z1": z1, "z2": z2[c]}) + model.classifier_term(labelled, z1)
            loop = loop + q[:, c] * loss_c
            weights.append(model.log_weights_labelled(labelled, {"z1": z1, "z2": z2[c]})[0])
        assert loop.sum().item() == pytest.approx(pyro_loss, rel=1e-10)
        # log p̂(x) = logsumexp_c log w_c, with log w_c the labelled log-weight at class c
        iwae = torch.logsumexp(torch.stack(weights), dim=0)
        torch.testing.assert_close(model.hand_iwae_bound(batch, draws), iwae, rtol=1e-12, atol=1e-12)
        assert (model.hand_iwae_bound(batch, draws) >= -model.hand_negative_elbo(batch, draws) - 1e-9).all()


def test_frozen_m1_is_not_trained(x, y):
    """An Adam step on the loss moves M2's networks and leaves M1's weights exactly as loaded."""
    model = build(frozen=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss = TraceEnum_ELBO(max_plate_nesting=1, strict_enumeration_warning=False)
    for batch in (model.make_batch(x, y), model.make_batch(x)):
        optimizer.zero_grad()
        loss.differentiable_loss(model.model, model.guide, **batch).backward()
        optimizer.step()
    for name, p in model.named_parameters():
        moved = not torch.equal(p, before[name])
        assert moved == (not name.startswith("m1.")), name
    assert all(p.grad is None for p in model.m1.parameters())


def test_classify_uses_the_mean_of_q_z1(x):
    model = build(frozen=True)
    expected = model.classifier(model.m1.encoder(x)[0]).argmax(-1)
    assert torch.equal(model.classify(x), expected)
    assert model.generate(5, 2).shape == (5, D) and model.reconstruct(x).shape == (B, D)
    assert model.encode_mean(x).shape == (B, Z2)


def test_baseline_classifiers_are_fresh_and_label_only(x):
    model = build(frozen=True)
    nets = {name: net.double() for name, net in model.baseline_classifiers().items()}
    assert set(nets) == {"baseline", "baseline_m1"}
    assert nets["baseline"](x).shape == (B, C)  # pixels -> logits
    head = nets["baseline_m1"]
    assert all(not torch.equal(a, b) for a, b in zip(head.head.parameters(), model.classifier.parameters()))
    assert sum(p.numel() for p in head.parameters()) == sum(p.numel() for p in model.classifier.parameters())
    head.eval()
    torch.testing.assert_close(head(x), head.head(model.m1.encoder(x)[0]))


@pytest.mark.parametrize("loss", ["meanfield", "renyi", "iwae", "vimco", "dreg", "stl"])
def test_losses_it_cannot_train_with_are_refused(loss):
    config = build_config("m1m2", overrides={"loss": loss, "k": 3})
    with pytest.raises(ConfigError, match=f"--loss {loss} cannot train m1m2: .*; losses that work for m1m2: trace, enum$"):
        check_config(config, get_spec("m1m2"))


def test_labels_are_checked(x):
    model = build(frozen=True)
    with pytest.raises(DataError, match=r"expected integer labels of shape \(6,\) in 0\.\.3"):
        model.make_batch(x, torch.tensor([0, 1, 2, 3, 4, 0]))


# ---- through the CLI: M1 from a vae run, bad --m1 ----------------------------------------------------

TINY = ["--device", "cpu", "--no-progress", "--train-subset", "600", "--val-size", "300", "--batch-size", "100",
        "--epochs", "1", "--seed", "0"]


@pytest.fixture(scope="module")
def m1_run(tmp_path_factory):
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("m1") / "vae"
    assert main(["train", "vae", "--hidden", "16", "--z-dim", "3", "--out", str(run), *TINY]) == 0
    return run


def test_m1m2_trains_on_a_trained_m1(m1_run, tmp_path):
    import json

    from ppl_vi.evaluate import load_trained
    from ppl_vi.run import load_checkpoint

    run = tmp_path / "m1m2"
    assert main(["train", "m1m2", "--m1", str(m1_run), "--hidden", "16", "--z-dim", "2", "--labels", "20",
                 "--baseline-steps", "20", "--out", str(run), *TINY]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("final_test_accuracy", "baseline_test_accuracy", "baseline_m1_test_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0, key
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert "test_accuracy" in history[-1] and "val_accuracy" in history[-1]
    assert (run / "figures" / "accuracy.png").is_file()
    # M1's weights in the m1m2 checkpoint are the vae run's, untouched by training
    m1_state = load_checkpoint(m1_run / "checkpoints" / "best.pt")["model"]
    model = load_trained(run).model
    for name, value in m1_state.items():
        assert torch.equal(model.m1.state_dict()[name], value), name


@pytest.mark.parametrize("make, message", [
    (lambda tmp, m1: tmp / "nowhere", "is not a run directory"),
    (lambda tmp, m1: m1.parent, "is not a run directory"),
])
def test_bad_m1_is_one_line(tmp_path, m1_run, capsys, make, message):
    run = tmp_path / "bad"
    assert main(["train", "m1m2", "--m1", str(make(tmp_path, m1_run)), "--out", str(run), *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and not run.exists()


def test_m1_must_be_a_vae_run(tmp_path, capsys):
    gmm = tmp_path / "gmm"
    assert main(["train", "gmm", "--device", "cpu", "--no-progress", "--epochs", "1", "--out", str(gmm)]) == 0
    assert main(["train", "m1m2", "--m1", str(gmm), "--out", str(tmp_path / "bad"), *TINY]) == 2
    assert "is a 'gmm' run; M1 must be a 'vae' run" in capsys.readouterr().err


def test_alpha_scale_from_config():
    config = build_config("m1m2", overrides={"alpha": 0.1})
    model = M1M2.from_config(config, {"x_dim": D, "train_size": 55000, "n_labelled": 100, "num_classes": C})
    assert model.alpha_scale == pytest.approx(55.0) and not model.m1_frozen
    assert all(p.requires_grad for p in model.m1.parameters())
    assert math.isclose(model.log_prior_y(), -math.log(C))


def test_check_cli_with_a_trained_m1(m1_run, capsys):
    """``ppl-vi check m1m2 --m1 RUN``: the run's M1 frozen, gradients compared on M2's 16 tensors only."""
    assert main(["check", "m1m2", "--m1", str(m1_run), "--batch-size", "4", "--repeats", "3", "--k", "2"]) == 0
    out = capsys.readouterr().out
    assert "verdict: PASS" in out and "gradients of 16 tensors" in out
    assert main(["check", "ssvae", "--m1", str(m1_run)]) == 2
    assert "--m1 applies to m1m2 only" in capsys.readouterr().err


def test_baselines_start_from_the_same_weights_however_long_the_model_trained(x, monkeypatch):
    """Catches a baseline built before its seed is set: its initial weights (and so its accuracy) would
    depend on the RNG draws the model's training made first (76.77 % vs 76.60 % in two runs)."""
    from types import SimpleNamespace

    from ppl_vi.training import baseline

    model = build(frozen=True)
    start = lambda name, net, *args, **kw: {name: [p.detach().clone() for p in net.parameters()]}  # noqa: E731
    monkeypatch.setattr(baseline, "train_one", start)
    data, config = SimpleNamespace(train_x=x, labelled_idx=torch.arange(4)), SimpleNamespace(baseline_steps=1, seed=0)
    first = baseline.train_baselines(model, data, config)
    torch.rand(1000)  # the model's training drew from the RNG
    second = baseline.train_baselines(model, data, config)
    assert set(first) == {"baseline", "baseline_m1"}
    for name in first:
        assert all(torch.equal(a, b) for a, b in zip(first[name], second[name])), name
