"""IWAE-k at evaluation (ppl_vi.iwae_eval): the guide once per batch, chunks, shared draws; exact values."""

from __future__ import annotations

import collections

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from ppl_vi import iwae_eval
from ppl_vi.errors import ConfigError
from ppl_vi.evaluate import bound_metrics
from ppl_vi.iwae_eval import bytes_per_row, iwae_bounds, rows_per_pass
from ppl_vi.models.linear_gaussian import LinearGaussian
from ppl_vi.models.vae import VAE
from ppl_vi.objectives.importance import IWAELoss


def _vae64(batch: int = 6):
    torch.manual_seed(0)
    model = VAE(20, 3, [8]).double()
    x = (torch.rand(batch, 20, dtype=torch.float64) < 0.4).double()
    return model, {"x": x}


def test_values_are_the_hand_iwae_bound_on_the_same_draws():
    """Chunks of 3, 3 and 1 particles; every k read off the first k draws, as the hand bound gives it."""
    model, batch = _vae64()
    ks = (1, 4, 7)
    pyro.set_rng_seed(11)
    result = iwae_bounds(model, batch, ks, rows=3 * 6)
    assert result.path == "encoder once per batch"
    pyro.set_rng_seed(11)
    draws = torch.cat([model.sample_draws(batch, k)["z"] for k in (3, 3, 1)])  # the same RNG calls, in order
    for k in ks:
        hand = model.hand_iwae_bound(batch, {"z": draws[:k]})
        torch.testing.assert_close(result.bounds[k], hand, rtol=1e-12, atol=1e-12)
    # and the draws are not all alike: the bounds move with k
    assert not torch.allclose(result.bounds[1], result.bounds[7])


def test_encoder_runs_once_per_batch_whatever_the_chunks():
    model, batch = _vae64()
    calls = collections.Counter()
    model.encoder.register_forward_hook(lambda *_: calls.update(["encoder"]))
    model.decoder.register_forward_hook(lambda *_: calls.update(["decoder"]))
    iwae_bounds(model, batch, (50,), rows=5 * 6)  # 10 chunks of 5 particles
    assert calls["decoder"] >= 10
    assert calls["encoder"] == 2  # recorded once, and the real guide once in the replay check (2 particles)


class _ChainGuideVAE(VAE):
    """z1 ~ q(z1|x), z2 ~ N(z1, 1): the second guide site depends on the first draw."""

    def model(self, x, **_):
        with pyro.plate("data", x.shape[0], dim=-1):
            z1 = pyro.sample("z", self.prior(x))
            pyro.sample("z2", dist.Normal(z1, 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z1)).to_event(1), obs=x)

    def guide(self, x, **_):
        with pyro.plate("data", x.shape[0], dim=-1):
            loc, scale = self.encoder(x)
            z1 = pyro.sample("z", dist.Normal(loc, scale).to_event(1))
            pyro.sample("z2", dist.Normal(z1, 1.0).to_event(1))


def test_dependent_guide_runs_the_real_guide_and_says_so():
    model, batch = _vae64()
    model.__class__ = _ChainGuideVAE
    pyro.set_rng_seed(3)
    result = iwae_bounds(model, batch, (5,), rows=100)  # one chunk of 5
    assert result.path == "guide per chunk (guide site 'z2' depends on the guide's other draws)"
    pyro.set_rng_seed(3)
    expected = IWAELoss(5, model.max_plate_nesting).per_datapoint(model.model, model.guide, **batch)
    torch.testing.assert_close(result.bounds[5], expected, rtol=1e-12, atol=1e-12)


def test_exact_posterior_guide_gives_log_px_for_every_k():
    """With q(z|x) = p(z|x) every weight is p(x): L_k = log p(x) exactly, chunks and all."""
    torch.manual_seed(1)
    model = LinearGaussian(5, 2, guide="exact").double()
    x = torch.randn(9, 5, dtype=torch.float64)
    result = iwae_bounds(model, {"x": x}, (1, 3, 8), rows=3 * 9)
    exact = model.exact_log_likelihood({"x": x})
    for k in (1, 3, 8):
        torch.testing.assert_close(result.bounds[k], exact, rtol=1e-10, atol=1e-10)


def test_rows_per_pass_from_cache_and_memory(monkeypatch):
    model = VAE(784, 50, [500, 500])
    # encoder 500 + 500 + 50 + 50, decoder 500 + 500 + 784; four 784-wide temporaries; float32
    assert bytes_per_row(model, 784) == (500 + 500 + 50 + 50 + 500 + 500 + 784 + 4 * 784) * 4
    per_row = bytes_per_row(model, 784)
    assert rows_per_pass(model, 784, torch.device("cpu")) == int(iwae_eval.CPU_WORKING_SET / per_row)
    assert rows_per_pass(model, 784, torch.device("cpu"), cap=100) == 100
    Memory = collections.namedtuple("Memory", "available")
    monkeypatch.setattr(iwae_eval.psutil, "virtual_memory", lambda: Memory(400 * per_row))
    assert rows_per_pass(model, 784, torch.device("cpu")) == 100  # a quarter of what is available


def test_bytes_per_row_counts_every_linear_layer():
    model = nn.Sequential(nn.Linear(3, 7), nn.Linear(7, 2)).double()
    assert bytes_per_row(model, 10) == (7 + 2 + 40) * 8


@pytest.mark.parametrize("bad", [0, -5])
def test_bound_metrics_refuses_bad_max_rows(bad):
    model, batch = _vae64()
    with pytest.raises(ConfigError, match="max_rows must be an integer >= 1"):
        bound_metrics(model, batch["x"], ks=(1,), max_rows=bad)
