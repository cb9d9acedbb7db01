"""The VAE and the mixture-prior GMVAE: Pyro's losses against the hand bounds, and their hooks.

Small sizes (D = 784, hidden [32], Z = 4, B = 16), float64 throughout.
"""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro import poutine

from ppl_vi import bounds
from ppl_vi.check import check_model
from ppl_vi.models.configure import build_config
from ppl_vi.errors import ConfigError
from ppl_vi.models import get_spec
from ppl_vi.models.base import draws_from_trace, scale_sites
from ppl_vi.models.gmvae import GMVAE
from ppl_vi.models.vae import VAE
from ppl_vi.objectives.importance import IWAELoss

X_DIM, Z_DIM, HIDDEN, B = 784, 4, [32], 16


@pytest.fixture
def batch(binary_images):
    return {"x": binary_images(B, X_DIM)}


def make_vae():
    return VAE(X_DIM, Z_DIM, HIDDEN).double()


def make_gmvae():
    return GMVAE(X_DIM, Z_DIM, HIDDEN, num_components=5).double()


# ---- the full checker --------------------------------------------------------------------------


@pytest.mark.parametrize("make", [make_vae, make_gmvae], ids=["vae", "gmvae"])
def test_check_model_passes(make, batch):
    report = check_model(make(), batch, ks=(1, 10, 100), ladder_repeats=5, repeats=20, gradient_seeds=30)
    assert report.passed, "\n" + report.table()


class KLSignError(VAE):
    """A wrong hand bound: the KL enters the negative ELBO with the wrong sign."""

    def hand_negative_elbo(self, batch, draws, kl="mc", beta=1.0):
        log_px_given_z, log_pz, log_qz = self.log_terms(batch, draws)
        return -(log_px_given_z + beta * (log_qz - log_pz)).mean(0)  # wrong: should be - β(log q - log p)


def test_checker_catches_kl_sign_error(batch):
    model = KLSignError(X_DIM, Z_DIM, HIDDEN)
    report = check_model(model, batch, ks=(1, 10), ladder_repeats=3, repeats=5, gradient_seeds=20)
    failed = {r.name for r in report.failures}
    for name in ("trace (K=3) vs hand: loss",
                 "trace (K=3) vs hand: each datapoint",
                 "trace (K=3) vs hand: gradients of 10 tensors",
                 "trace (K=3), beta=2 vs hand: loss",
                 "meanfield (K=3) vs hand: loss"):
        assert name in failed, f"{name!r} should fail\n" + report.table()
    # the importance-weighted rows do not use hand_negative_elbo: the checker localises the error
    iwae_rows = [r for r in report.rows if r.name.startswith(("iwae", "renyi", "vimco", "dreg"))]
    assert iwae_rows and all(r.passed for r in iwae_rows), "\n" + report.table()


# ---- the hand terms ----------------------------------------------------------------------------


def test_mc_kl_matches_closed_form(batch):
    """(1/K) Σ_k [log q(z_k|x) - log p(z_k)] -> KL(q || p) in closed form, within 4 SE per datapoint."""
    model, x, k = make_vae(), batch["x"], 20000
    with torch.no_grad():
        z = model.sample_draws(batch, k)["z"]  # (K, B, Z)
        q_loc, q_scale = model.encoder(x)  # (B, Z) each
        kl_draws = bounds.log_normal(z, q_loc, q_scale) - model.log_prior(z)  # (K, B)
        closed = model.kl_to_prior(batch)  # (B,)
    se = kl_draws.std(0) / math.sqrt(k)  # (B,): SE of the MC mean
    diff = (kl_draws.mean(0) - closed).abs()
    assert torch.all(diff <= 4 * se), f"|MC - closed form| {diff.tolist()} vs 4 SE {(4 * se).tolist()}"


@pytest.mark.parametrize("make", [make_vae, make_gmvae], ids=["vae", "gmvae"])
def test_elbo_terms_match_hand_elbo(make, batch):
    model = make()
    draws = model.sample_draws(batch, 7)
    terms = model.elbo_terms(batch, draws)
    assert terms["rec"].shape == terms["kl"].shape == (B,)
    kl = "analytic" if model.has_analytic_kl else "mc"
    torch.testing.assert_close(terms["rec"] - terms["kl"], -model.hand_negative_elbo(batch, draws, kl=kl))


def test_gmvae_has_no_closed_form_kl(batch):
    model = make_gmvae()
    with pytest.raises(ConfigError, match="no closed form"):
        model.hand_negative_elbo(batch, model.sample_draws(batch, 2), kl="analytic")


def _recording(guide, traces):
    def recorded(**batch):
        with poutine.trace() as tracer:
            guide(**batch)
        traces.append(tracer.trace)

    return recorded


def test_chunked_iwae_equals_hand_on_recorded_draws(batch):
    model, traces = make_vae(), []
    loss = IWAELoss(num_particles=10, chunk_size=3)
    chunked = loss.per_datapoint(model.model, _recording(model.guide, traces), **batch)
    assert [t.nodes["z"]["value"].shape[0] for t in traces] == [3, 3, 3, 1]
    z = torch.cat([draws_from_trace(t, t.nodes["z"]["value"].shape[0], 1)["z"] for t in traces])  # (10, B, Z)
    torch.testing.assert_close(chunked, model.hand_iwae_bound(batch, {"z": z}))


def test_chunked_and_unchunked_iwae_agree_in_mean(batch):
    model, repeats = make_vae(), 20
    values = {}
    for chunk in (None, 3):
        loss, out = IWAELoss(num_particles=10, chunk_size=chunk), []
        with torch.no_grad():
            for r in range(repeats):
                pyro.set_rng_seed(100 + r + (0 if chunk is None else repeats))
                out.append(loss.per_datapoint(model.model, model.guide, **batch).sum())
        values[chunk] = torch.stack(out)
    se = math.sqrt(values[None].var().item() / repeats + values[3].var().item() / repeats)
    diff = abs(values[None].mean().item() - values[3].mean().item())
    assert diff <= 4 * se, f"chunked vs unchunked: |diff| {diff:.3g} > 4 SE ({4 * se:.3g})"


@pytest.mark.parametrize("k", [1, 10])
def test_iwae_loss_with_beta_equals_hand(batch, k):
    model, beta = make_vae(), 0.5
    scaled_model = scale_sites(model.model, ("z",), beta)
    scaled_guide = scale_sites(model.guide, ("z",), beta)
    pyro.set_rng_seed(7)
    pyro_loss = IWAELoss(num_particles=k).differentiable_loss(scaled_model, scaled_guide, **batch)
    pyro.set_rng_seed(7)
    draws = model.sample_draws(batch, k)
    torch.testing.assert_close(pyro_loss, -model.hand_iwae_bound(batch, draws, beta=beta).sum())
    if k == 1:  # L_1,β is the β-ELBO
        torch.testing.assert_close(pyro_loss, model.hand_negative_elbo(batch, draws, kl="mc", beta=beta).sum())


# ---- hooks and registry --------------------------------------------------------------------------


@pytest.mark.parametrize("make", [make_vae, make_gmvae], ids=["vae", "gmvae"])
def test_generate_reconstruct_encode(make, batch):
    model = make()
    for probs, shape in ((model.generate(5), (5, X_DIM)), (model.reconstruct(batch["x"]), (B, X_DIM))):
        assert probs.shape == shape and probs.dtype == torch.float64
        assert torch.all((probs >= 0) & (probs <= 1))
    assert model.encode_mean(batch["x"]).shape == (B, Z_DIM)


def test_registry_builds_both():
    vae = get_spec("vae").build(build_config("vae", overrides={"z_dim": 3, "hidden": [8]}), {"x_dim": 20})
    gmvae = get_spec("gmvae").build(build_config("gmvae", overrides={"hidden": [8]}), {"x_dim": 20})
    assert isinstance(vae, VAE) and vae.z_dim == 3 and vae.x_dim == 20
    assert isinstance(gmvae, GMVAE) and (gmvae.z_dim, gmvae.num_components) == (10, 500)
    assert gmvae.locs.shape == (500, 10)
