"""The trainer's fast path (``ppl_vi.training.graph_step``) computes what the plain path computes.

* the sync-free loss gives the same loss and gradients as ``Trace_ELBO.differentiable_loss`` and
  ``IWAELoss.differentiable_loss`` on the same seed (float64, CPU), β-scaled sites included;
* a few training steps with ``fast`` on and off give identical parameters (CPU, where the fast
  path is the sync-free eager step), and an unsupported guide falls back without changing the
  random stream;
* the hot path restores validation and the param-store switch;
* CUDA only: the graph-captured step has the eager step's loss and gradients on the same draws,
  honours β under annealing and the learning-rate schedule, and trains like the eager one.
"""

from __future__ import annotations

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO

from ppl_vi.config import TrainConfig
from ppl_vi.models.base import scale_sites
from ppl_vi.models.vae import VAE
from ppl_vi.training.graph_step import FastLoss, SyncFreeLoss, hot_path, subnormals_flushed
from ppl_vi.objectives.importance import IWAELoss
from ppl_vi.training import Trainer


def _vae64(seed: int = 0):
    torch.manual_seed(seed)
    vae = VAE(x_dim=20, z_dim=3, hidden=[8]).to(torch.float64)
    x = torch.bernoulli(torch.full((6, 20), 0.4, dtype=torch.float64))
    return vae, x


def _loss_and_grads(vae, fn, seed: int = 1):
    vae.zero_grad(set_to_none=True)
    pyro.set_rng_seed(seed)
    loss = fn()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in vae.parameters()]


def _assert_same(a, b):
    (la, ga), (lb, gb) = a, b
    torch.testing.assert_close(la, lb, rtol=1e-12, atol=1e-12)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("beta", [None, 0.3])
def test_sync_free_elbo_matches_trace_elbo(k, beta):
    vae, x = _vae64()
    model, guide = vae.model, vae.guide
    if beta is not None:  # a tensor β on the latent sites, as KL annealing uses
        scale = torch.tensor(beta, dtype=torch.float64)
        model, guide = scale_sites(model, vae.latent_sites, scale), scale_sites(guide, vae.latent_sites, scale)
    elbo = Trace_ELBO(num_particles=k, vectorize_particles=True, max_plate_nesting=1)
    plain = _loss_and_grads(vae, lambda: elbo.differentiable_loss(model, guide, x=x))
    fast_loss = SyncFreeLoss(elbo)

    def fast():
        with hot_path(vae):
            return fast_loss(model, guide, x=x)

    _assert_same(_loss_and_grads(vae, fast), plain)


@pytest.mark.parametrize("beta", [None, 0.5])
def test_sync_free_iwae_matches_iwae_loss(beta):
    vae, x = _vae64()
    model, guide = vae.model, vae.guide
    if beta is not None:
        scale = torch.tensor(beta, dtype=torch.float64)
        model, guide = scale_sites(model, vae.latent_sites, scale), scale_sites(guide, vae.latent_sites, scale)
    iwae = IWAELoss(num_particles=5, max_plate_nesting=1, chunk_size=2)
    plain = _loss_and_grads(vae, lambda: iwae.differentiable_loss(model, guide, x=x))
    fast_loss = SyncFreeLoss(iwae)

    def fast():
        with hot_path(vae):
            return fast_loss(model, guide, x=x)

    _assert_same(_loss_and_grads(vae, fast), plain)


def test_hot_path_restores_state():
    vae, x = _vae64()
    assert vae.use_param_store and pyro.infer.util.is_validation_enabled()
    with hot_path(vae):
        assert not vae.use_param_store and not pyro.infer.util.is_validation_enabled()
        assert not torch.distributions.Distribution._validate_args
        pyro.clear_param_store()
        vae.model(x=x)
        assert not list(pyro.get_param_store().keys())  # no pyro.module registration in the hot path
    assert vae.use_param_store and pyro.infer.util.is_validation_enabled()
    assert torch.distributions.Distribution._validate_args


def _config(**overrides):
    base = dict(model="vae", hidden=[16], z_dim=4, batch_size=32, train_subset=160, val_size=100, device="cpu",
                epochs=1, seed=3)
    return TrainConfig(**{**base, **overrides})


def _train_steps(config, steps: int):
    trainer = Trainer(config, progress=False)
    losses = []
    for i, batches in enumerate(trainer.batches()):
        if i == steps:
            break
        if config.kl_anneal:
            trainer.beta.fill_(min(1.0, i / config.kl_anneal))
        losses.append(trainer.train_step(batches))
    return trainer, torch.stack(losses)


@pytest.mark.parametrize("overrides", [{}, {"kl_anneal": 4}, {"loss": "iwae", "k": 3}, {"k": 2}],
                         ids=["elbo", "annealed", "iwae", "elbo-k2"])
def test_trainer_fast_on_off_identical(overrides):
    fast, fast_losses = _train_steps(_config(fast=True, **overrides), 4)
    plain, plain_losses = _train_steps(_config(fast=False, **overrides), 4)
    assert fast.fast.mode == "sync-free" and plain.fast is None
    torch.testing.assert_close(fast_losses, plain_losses, rtol=1e-6, atol=1e-4)  # values: same up to rounding
    for (name, p), q in zip(fast.model.named_parameters(), plain.model.parameters()):
        assert torch.equal(p, q), name  # parameters: bit for bit


def test_cpu_steps_flush_subnormals_and_give_the_setting_back():
    """Catches a process-wide flush left on after training (it broke Hypothesis's float strategies in the
    same process, and would change a user's own arithmetic): inside a fast CPU step subnormals read as
    0, outside (before and after, plain path always) they do not; metrics.json's record says so."""
    seen = []
    trainer, _ = _train_steps(_config(fast=True), 1)
    inner = trainer.stepper.step
    trainer.stepper.step = lambda batches: (seen.append(subnormals_flushed()), inner(batches))[1]
    batches = next(iter(trainer.batches()))
    assert not subnormals_flushed()
    trainer.train_step(batches)
    assert seen == [True] and not subnormals_flushed()
    assert trainer.stepper.record()["flush_denormal"] is True
    plain, _ = _train_steps(_config(fast=False), 1)
    assert plain.stepper.record()["flush_denormal"] is False and not subnormals_flushed()


def test_unsupported_loss_falls_back():
    trainer, _ = _train_steps(_config(fast=True, loss="meanfield"), 2)
    plain, _ = _train_steps(_config(fast=False, loss="meanfield"), 2)
    assert trainer.fast.mode == "eager" and "TraceMeanField_ELBO" in trainer.fast.notes[0]
    for p, q in zip(trainer.model.parameters(), plain.model.parameters()):
        assert torch.equal(p, q)


def test_unsupported_guide_falls_back_without_changing_the_random_stream():
    """A non-reparameterised guide site: found on the first traces, whose draws are undone."""

    class DiscreteGuideVAE(VAE):
        def guide(self, x, **_):
            super().guide(x)
            with pyro.plate("data2", x.shape[0], dim=-1):
                pyro.sample("c", pyro.distributions.Bernoulli(logits=x.new_zeros(x.shape[0])))

        def model(self, x, **_):
            super().model(x)
            with pyro.plate("data2", x.shape[0], dim=-1):
                pyro.sample("c", pyro.distributions.Bernoulli(logits=x.new_zeros(x.shape[0])))

    class _T:  # a model and its loss
        def __init__(self):
            self.model, self.x = _vae64()
            self.model.__class__ = DiscreteGuideVAE
            self.model_fn, self.guide_fn = self.model.model, self.model.guide
            self.loss = Trace_ELBO(max_plate_nesting=1, vectorize_particles=True)

    t = _T()
    fast = FastLoss(t.loss, t.model, "cpu", quiet=True)
    pyro.set_rng_seed(5)
    a = fast.differentiable_loss(t.model_fn, t.guide_fn, x=t.x)
    assert fast.mode == "eager" and "not reparameterised" in fast.notes[-1]
    pyro.set_rng_seed(5)
    b = t.loss.differentiable_loss(t.model_fn, t.guide_fn, x=t.x)
    torch.testing.assert_close(a, b)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph capture needs a CUDA GPU")


def _captured(config, steps: int = 5):
    """A Trainer whose fast path has captured its CUDA graph, and the next step's batches."""
    trainer, _ = _train_steps(config, steps)
    assert trainer.stepper.mode == "cuda-graph", trainer.stepper.notes
    batches = next(iter(trainer.batches()))
    return trainer, batches


def _graph_vs_eager(trainer, batches):
    """The captured step and the eager loss on the same draws (the CUDA RNG state reset in between):
    (graph loss, graph gradients, eager loss, eager gradients); the parameters are put back afterwards."""
    params = list(trainer.model.parameters())
    before = [p.detach().clone() for p in params]
    state = torch.cuda.get_rng_state(trainer.device)
    graph_loss = trainer.stepper.graph_step(batches)
    graph_grads = [p.grad.detach().clone() for p in params]
    with torch.no_grad():
        for p, b in zip(params, before):
            p.copy_(b)  # in place: the graph keeps its addresses
    torch.cuda.set_rng_state(state, trainer.device)
    eager_loss = trainer.step_loss(batches)
    eager_grads = torch.autograd.grad(eager_loss, params)
    return graph_loss, graph_grads, eager_loss.detach(), eager_grads


@CUDA
def test_cuda_graph_step_has_the_eager_gradients_on_the_same_draws():
    """The captured step computes the eager step's loss and gradients on the same random draws (float32,
    1e-6). Catches a graph that replays stale inputs (a batch not copied into its buffers), stale
    draws (the RNG offset not advanced per replay) or a backward captured for another loss."""
    trainer, batches = _captured(_config(fast=True, device="cuda", train_subset=32 * 12))
    for _ in range(2):  # two replays: different draws each time, each matching its eager twin
        graph_loss, graph_grads, eager_loss, eager_grads = _graph_vs_eager(trainer, batches)
        torch.testing.assert_close(graph_loss, eager_loss, rtol=1e-6, atol=1e-6)
        for g, e in zip(graph_grads, eager_grads):
            torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)


@CUDA
def test_cuda_graph_honours_beta_under_annealing():
    """With KL annealing β is a device tensor read by the captured step: at β = 0.25 and 0.75 the graph's
    loss and gradients equal the eager ones at that β, and differ between the two β. Catches a β baked
    into the graph at capture time (the step would train at the capture's β forever)."""
    trainer, batches = _captured(_config(fast=True, device="cuda", train_subset=32 * 12, kl_anneal=100))
    losses = []
    for beta in (0.25, 0.75):
        trainer.beta.fill_(beta)
        graph_loss, graph_grads, eager_loss, eager_grads = _graph_vs_eager(trainer, batches)
        torch.testing.assert_close(graph_loss, eager_loss, rtol=1e-6, atol=1e-6)
        for g, e in zip(graph_grads, eager_grads):
            torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)
        losses.append(graph_loss.item())
    assert abs(losses[0] - losses[1]) > 1e-3, losses


@CUDA
def test_cuda_graph_step_trains_like_eager():
    steps = 60
    cfg = dict(device="cuda", train_subset=32 * steps + 7, epochs=1)  # + 7: a last, smaller batch
    graphed, graphed_losses = _train_steps(_config(fast=True, **cfg), steps + 1)
    eager, eager_losses = _train_steps(_config(fast=False, **cfg), steps + 1)
    assert graphed.stepper.mode == "cuda-graph", graphed.stepper.notes
    assert torch.isfinite(graphed_losses).all()
    for p in graphed.model.parameters():
        assert torch.isfinite(p).all()
    # different random draws inside the graph, the same optimisation: the late losses agree
    late_g, late_e = graphed_losses[-20:].mean().item(), eager_losses[-20:].mean().item()
    assert abs(late_g - late_e) < 0.05 * abs(late_e), (late_g, late_e)


@CUDA
def test_cuda_graph_respects_lr_schedule():
    """The scheduler's decay reaches the captured step (a device learning-rate tensor filled in place).
    Catches a learning rate baked into the graph."""
    trainer, losses = _train_steps(_config(fast=True, device="cuda", train_subset=32 * 20, lr_decay=0.5), 20)
    assert trainer.stepper.mode == "cuda-graph"
    lr = trainer.optimizer.param_groups[0]["lr"]
    assert torch.is_tensor(lr)
    trainer.scheduler.step()  # fills the captured learning-rate tensor in place
    assert trainer.optimizer.param_groups[0]["lr"] is lr and abs(lr.item() - trainer.config.lr * 0.5) < 1e-9
    assert torch.isfinite(losses).all()
