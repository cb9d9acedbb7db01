"""The class-conditional VAE and CVAE image completion: checks, completion batches, IS NLL, errors.

Tiny sizes (D = 784, hidden [16], Z = 3, B = 8), float64 throughout.
"""

from __future__ import annotations

import math

import pytest
import torch
from pyro.infer import Trace_ELBO

from ppl_vi.check import check_model
from ppl_vi.errors import DataError
from ppl_vi.models import get_spec
from ppl_vi.models.cvae import (
    CVAE,
    CVAECompletion,
    CompletionBaseline,
    baseline_nll,
    completion_batch,
    completion_nll,
    quadrant_masks,
)

X_DIM, Z_DIM, HIDDEN, B = 784, 3, [16], 8


@pytest.fixture
def x(binary_images):
    return binary_images(B, X_DIM)


@pytest.fixture
def y():
    return torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])


# ---- the checker -------------------------------------------------------------------------------


def test_cvae_check_model_passes(x, y):
    model = CVAE(X_DIM, Z_DIM, HIDDEN).double()
    report = check_model(model, model.make_batch(x, y), ks=(1, 10, 100), ladder_repeats=5, repeats=12)
    assert report.passed, "\n" + report.table()


def test_completion_check_model_passes(x):
    model = CVAECompletion(X_DIM, Z_DIM, HIDDEN).double()
    report = check_model(model, model.make_batch(x), ks=(1, 10, 100), ladder_repeats=5, repeats=12)
    assert report.passed, "\n" + report.table()


def test_registry():
    assert get_spec("cvae").data == "mnist-labelled" and get_spec("cvae").cls is CVAE
    assert get_spec("cvae-completion").data == "mnist-completion"


# ---- conditional generation ------------------------------------------------------------------


def test_cvae_hooks(x, y):
    model = CVAE(X_DIM, Z_DIM, HIDDEN).double()
    grid = model.generate(30)  # 3 rows of the 10 classes
    assert grid.shape == (30, X_DIM) and ((grid >= 0) & (grid <= 1)).all()
    assert model.generate(4, y=2).shape == (4, X_DIM)
    assert model.reconstruct(x, y).shape == (B, X_DIM) and model.needs_labels
    terms = model.elbo_terms(model.make_batch(x, y), model.sample_draws(model.make_batch(x, y), 2))
    assert terms["rec"].shape == terms["kl"].shape == (B,) and (terms["kl"] >= 0).all()


# ---- completion batches ------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3])
def test_completion_batch_masks(x, n):
    batch = completion_batch(x, n)
    c, mask = batch["c"], batch["mask"]
    assert (mask.sum(-1) == 196 * (4 - n)).all()  # each quadrant is 14 x 14
    assert torch.equal(c[mask], torch.full_like(c[mask], -1.0)) and torch.equal(c[~mask], x[~mask])
    image = mask[0].reshape(28, 28)
    assert not image[14:, :14].any() and image[14:, 14:].all()  # bottom-left given, bottom-right missing
    assert image[:14, 14:].all() == (n < 2) and image[:14, :14].all() == (n < 3)


def test_make_batch_draws_seeded_quadrant_counts(x):
    a, b = CVAECompletion(X_DIM, Z_DIM, HIDDEN, seed=5), CVAECompletion(X_DIM, Z_DIM, HIDDEN, seed=5)
    first, again = a.make_batch(x)["mask"], b.make_batch(x)["mask"]
    assert torch.equal(first, again)
    counts = torch.cat([a.make_batch(x)["mask"].sum(-1) for _ in range(20)])
    assert set(counts.tolist()) == {196, 392, 588}
    a.eval()  # evaluation: the same conditions at every call
    assert torch.equal(a.make_batch(x)["mask"], a.make_batch(x)["mask"])


def test_quadrant_masks_partition():
    masks = quadrant_masks(X_DIM)
    assert masks.shape == (3, X_DIM) and (masks.sum(-1) == 196).all() and masks.sum(0).max() == 1


# ---- -log p(x_missing | c) by importance sampling -------------------------------------------------


def exact_completion_nll(model: CVAECompletion, batch) -> torch.Tensor:
    """-log ∫ p(z|c) p(x_M|z,c) dz for Z = 1 by a dense Riemann sum over ±12 prior s.d."""
    from ppl_vi import bounds
    from ppl_vi.models.cvae import broadcast_cat, masked_log_bernoulli

    loc, scale = model.prior_net(batch["c"])  # (B, 1)
    t = torch.linspace(-12, 12, 2001, dtype=loc.dtype).view(-1, 1, 1)  # (G, 1, 1)
    z = loc + scale * t  # (G, B, 1)
    log_joint = bounds.log_normal(z, loc, scale) + masked_log_bernoulli(
        batch["x"], model.decoder(broadcast_cat(z, batch["c"])), batch["mask"].to(loc.dtype))
    log_dz = torch.log(scale.squeeze(-1) * (t[1] - t[0]).squeeze())
    return -(torch.logsumexp(log_joint, dim=0) + log_dz)


def test_completion_nll_bounds_and_decreases_with_k(x):
    model = CVAECompletion(X_DIM, 1, HIDDEN).double()
    with torch.no_grad():
        model.decoder.net[0].weight[:, :1] *= 20  # make x depend strongly on z: a peaked posterior
        exact = exact_completion_nll(model, completion_batch(x, 2))
    means, ses = {}, {}
    for k in (1, 10, 100):
        runs = torch.stack([completion_nll(model, x, 2, k=k).sum() for _ in range(12)])
        means[k], ses[k] = runs.mean().item(), runs.std().item() / math.sqrt(len(runs))
        assert means[k] >= exact.sum().item() - 4 * ses[k]  # an upper bound on -log p in expectation
    assert means[1] >= means[10] - 4 * math.hypot(ses[1], ses[10])
    assert means[10] >= means[100] - 4 * math.hypot(ses[10], ses[100])
    assert means[1] - means[100] > 4 * math.hypot(ses[1], ses[100])  # and it does decrease
    close = completion_nll(model, x, 2, k=2000, chunk=1000)
    assert (close >= 0).all()  # -log of a probability of binary pixels
    assert abs(close.sum().item() - exact.sum().item()) < 0.1 * (means[1] - exact.sum().item())


def test_baseline_nll_is_masked_bce_and_fit_learns(x):
    base = CompletionBaseline(X_DIM, HIDDEN).double()
    batch = completion_batch(x, 1)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(base(batch["c"]), x, reduction="none")
    assert torch.allclose(baseline_nll(base, x, 1), (bce * batch["mask"]).sum(-1), rtol=1e-12)
    before = baseline_nll(base, x, 2).mean()
    history = base.fit(x.repeat(4, 1), epochs=3, batch_size=16, lr=1e-2)
    assert len(history) == 3 and baseline_nll(base, x, 2).mean() < before


def test_cvae_trains_one_step(x, y):
    from pyro.infer import SVI
    from pyro.optim import Adam

    model = CVAE(X_DIM, Z_DIM, HIDDEN).double()
    svi = SVI(model.model, model.guide, Adam({"lr": 1e-3}), Trace_ELBO())
    assert math.isfinite(svi.step(**model.make_batch(x, y)))


# ---- bad input ---------------------------------------------------------------------------------


def test_cvae_requires_labels(x):
    model = CVAE(X_DIM, Z_DIM, HIDDEN).double()
    with pytest.raises(DataError, match="cvae needs labels but the batch has none"):
        model.make_batch(x, None)
    with pytest.raises(DataError, match="cvae needs labels"):
        Trace_ELBO().loss(model.model, model.guide, x=x)


@pytest.mark.parametrize("labels", [[0, 1, 2, 3, 4, 5, 6, 10], [-3, 1, 2, 3, 4, 5, 6, 7]])
def test_cvae_labels_out_of_range(x, labels):
    model = CVAE(X_DIM, Z_DIM, HIDDEN).double()
    with pytest.raises(DataError, match=r"labels range over .* in 0\.\.9"):
        model.make_batch(x, torch.tensor(labels))


@pytest.mark.parametrize("quadrants", [0, 4, -1, torch.tensor([1, 2, 3, 1, 2, 3, 1, 5])])
def test_quadrant_count_out_of_range(x, quadrants):
    with pytest.raises(DataError, match="expected 1, 2 or 3 given quadrants"):
        completion_batch(x, quadrants)
    model = CVAECompletion(X_DIM, Z_DIM, HIDDEN).double()
    with pytest.raises(DataError, match="expected 1, 2 or 3 given quadrants"):
        completion_nll(model, x, quadrants, k=2)


def test_non_square_images_rejected():
    with pytest.raises(DataError, match="square image"):
        CVAECompletion(100 + 1, Z_DIM, HIDDEN)
