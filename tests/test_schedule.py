"""The semi-supervised schedule: whatever the labelled batches' cadence and size, one epoch of the
trainer's steps is, in expectation, the gradient of the run's objective: Kingma et al.'s

    J = Σ_u -U(x_u) + Σ_l [-L(x_l, y_l) - α' log q(y_l|x_l)]

(``--objective kingma``), or CS236's (the default), a labelled batch's mean cross-entropy every step,

    J_cs236 = Σ_u -U(x_u) + S α (B / N_l) Σ_l -log q(y_l|x_l)     (S steps per epoch, batch B)

(:mod:`ppl_vi.training.batches`). Held exactly: the trainer's own epoch (its batches, weights and
loss normalisation, through ``Trainer.step_loss`` and TraceEnum_ELBO) against J written from the
hand bounds, float64, with every reparameterised draw fixed at ε = 0 (z = the guide's mean) and a
fixed binarisation, for schedules whose labelled slots per epoch (m b_l) are a multiple of N_l,
where every epoch uses each labelled image exactly m b_l / N_l times. The expectation for the other
schedules rests on the labelled stream's counts, held statistically below.
"""

from __future__ import annotations

import math

import pytest
import torch

from ppl_vi import bounds
from ppl_vi.models.configure import build_config
from ppl_vi.data.mnist import fixed_binarization
from ppl_vi.training import Trainer
from ppl_vi.training.batches import LabelledSchedule, labelled_stream

N_TRAIN, N_LABELLED, BATCH = 100, 20, 20  # 80 unlabelled images: S = 4 steps per epoch


def rsample_at_mean(self, sample_shape=torch.Size()):
    """Normal.rsample with ε = 0: z = loc, still differentiable in loc and scale (a fixed draw)."""
    shape = self._extended_shape(sample_shape)
    return self.loc.expand(shape) + 0.0 * self.scale.expand(shape)


ALPHA = 0.3


def make_trainer(model: str, every: int, labelled_batch_size: int, objective: str = "kingma") -> Trainer:
    config = build_config(model, overrides=dict(
        device="cpu", seed=0, train_subset=N_TRAIN, val_size=500, labels=N_LABELLED, batch_size=BATCH,
        labelled_every=every, labelled_batch_size=labelled_batch_size, hidden=[8], z_dim=2, fast=False,
        baseline_steps=0, alpha=ALPHA, objective=objective))
    trainer = Trainer(config, progress=False)
    trainer.model.double()
    trainer.data.train_x = fixed_binarization(trainer.data.train_x, seed=3).double()
    trainer.data.binary = False  # the fixed binarisation above: the same images at every step
    return trainer


def hand_objective(trainer: Trainer) -> torch.Tensor:
    """J from the hand bounds: every unlabelled image once (y enumerated); kingma: every labelled image
    once with its α' classifier term (hand_negative_elbo includes it); cs236: S α (B / N_l) times the
    labelled images' summed cross-entropy, written from the classifier's logits (not from α')."""
    model, data = trainer.model, trainer.data
    unlabelled = model.make_batch(data.train_x[data.unlabelled_idx])
    labelled = model.make_batch(data.train_x[data.labelled_idx], data.train_y[data.labelled_idx])
    total = model.hand_negative_elbo(unlabelled, model.enum_draws(unlabelled, 1)).sum()
    if trainer.config.objective == "cs236":
        cross_entropy = -bounds.log_categorical(labelled["y"], model.classifier(labelled["x"])).sum()
        return total + trainer.steps_per_epoch() * ALPHA * BATCH / N_LABELLED * cross_entropy
    return total + model.hand_negative_elbo(labelled, model.sample_draws(labelled, 1)).sum()


def epoch_gradient(trainer: Trainer, params, weights: bool = True):
    """The gradient of B · Σ_steps step loss over one epoch of the trainer's own schedule."""
    total, labelled_batches = 0.0, 0
    for batches in trainer.batches():
        if not weights:
            batches.scales = [1.0] * len(batches)
        labelled_batches += sum(b.get("y") is not None for b in batches)
        total = total + trainer.step_loss(batches) * BATCH
    assert labelled_batches == trainer.schedule.batches_per_epoch
    return torch.autograd.grad(total, params)


@pytest.mark.parametrize("model, objective, every, labelled_batch_size", [
    ("ssvae", "kingma", 1, 10),   # every step, half the labels: m = 4, 40 slots = 2 passes, w = 1/2
    ("ssvae", "kingma", 2, 10),   # every other step: m = 2, 20 slots = 1 pass, w = 1
    ("ssvae", "kingma", 1, 20),   # every step, all labels (the old pairing, now weighted): m = 4, w = 1/4
    ("ssvae", "kingma", 0, 20),   # once per epoch, all labels (Pyro's ss_vae_M2): m = 1, w = 1
    ("m1m2", "kingma", 1, 5),     # the stacked model: m = 4, 20 slots = 1 pass, w = 1
    ("ssvae", "cs236", 1, 20),    # the default: all labels every step, m = 4, w = 1, α' = α
    ("ssvae", "cs236", 1, 10),    # half the labels every step: w = 1, α' = 2α
    ("ssvae", "cs236", 2, 10),    # every other step: m = 2, w = 2, α' = 2α
    ("ssvae", "cs236", 0, 20),    # once per epoch: m = 1, w = 4, α' = α
])
def test_epoch_gradient_is_the_objective_gradient(monkeypatch, model, objective, every, labelled_batch_size):
    monkeypatch.setattr(torch.distributions.Normal, "rsample", rsample_at_mean)
    trainer = make_trainer(model, every, labelled_batch_size, objective)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    expected = torch.autograd.grad(hand_objective(trainer), params)
    for epoch in range(2):  # two epochs, two different draws of the labelled stream: each exact
        got = epoch_gradient(trainer, params)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("objective, every", [("kingma", 1), ("cs236", 2)])
def test_without_the_weights_the_gradient_is_wrong(monkeypatch, objective, every):
    """The check can fail: the labelled batch unweighted (kingma: every step, all labels, each labelled
    image 4 times per epoch; cs236: every other step, half the labelled batches' weight) is not J's gradient."""
    monkeypatch.setattr(torch.distributions.Normal, "rsample", rsample_at_mean)
    trainer = make_trainer("ssvae", every, 20, objective)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    expected = torch.autograd.grad(hand_objective(trainer), params)
    got = epoch_gradient(trainer, params, weights=False)
    worst = max(((g - e).abs().max() / e.abs().max()).item() for g, e in zip(got, expected))
    assert worst > 1e-2


@pytest.mark.parametrize("every, steps, expected_m", [(1, 430, 430), (3, 430, 144), (0, 430, 1), (500, 430, 1)])
def test_schedule_counts_and_weight(every, steps, expected_m):
    class Config:
        labelled_every, labelled_batch_size, batch_size, objective = every, 0, 128, "kingma"

    schedule = LabelledSchedule.from_config(Config, 100, steps)
    assert schedule.batch_size == 100 and schedule.batches_per_epoch == expected_m
    assert sum(schedule.has_labelled(i) for i in range(steps)) == expected_m
    assert schedule.weight * expected_m * 100 == pytest.approx(100)  # w m b_l = N_l
    Config.objective = "cs236"
    schedule = LabelledSchedule.from_config(Config, 100, steps)
    assert schedule.batches_per_epoch == expected_m and schedule.weight * expected_m == pytest.approx(steps)  # w m = S


def test_labelled_batch_larger_than_the_labelled_set_is_refused():
    from ppl_vi.errors import ConfigError

    class Config:
        labelled_every, labelled_batch_size, batch_size, objective = 1, 101, 128, "kingma"

    with pytest.raises(ConfigError, match="labelled_batch_size 101 exceeds the 100 labelled images"):
        LabelledSchedule.from_config(Config, 100, 430)


def test_labelled_stream_counts():
    """Every index once in each N consecutive slots; over many epochs of an unaligned schedule
    (b_l = 7, m = 3: 21 slots of N = 10) the mean count per epoch is m b_l / N = 2.1 within 4 SE."""
    n, size, m, epochs = 10, 7, 3, 400
    stream = labelled_stream(n, size, torch.Generator().manual_seed(0), "cpu")
    slots = torch.cat([next(stream) for _ in range(30)])  # 210 slots = 21 whole passes
    assert torch.equal(slots.view(21, n).sort(-1).values, torch.arange(n).expand(21, n))
    generator = torch.Generator().manual_seed(1)
    counts = torch.stack([torch.bincount(torch.cat([next(s) for _ in range(m)]), minlength=n)
                          for s in (labelled_stream(n, size, generator, "cpu") for _ in range(epochs))]).double()
    mean, se = counts.mean(0), counts.std(0) / math.sqrt(epochs)
    assert ((mean - m * size / n).abs() <= 4 * se).all(), (mean, se)
