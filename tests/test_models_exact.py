"""The two models with exact log p(x) (LinearGaussian, GMM) against the truth, and IWAELoss against
Pyro's RenyiELBO. Everything in float64, data from ppl_vi.data.synthetic.

Standard errors: every statistical assertion compares means over independent seeded repeats and
allows 4 standard errors, SE = std over repeats / sqrt(repeats) (combined in quadrature for a
difference of two means); the SE is in each assertion's message.
"""

from __future__ import annotations

import math
import warnings

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import RenyiELBO, Trace_ELBO, TraceEnum_ELBO
from torch.distributions import Normal

from ppl_vi.check import check_model
from ppl_vi.data.synthetic import (
    default_gmm_params,
    default_linear_gaussian_params,
    sample_gmm,
    sample_linear_gaussian,
)
from ppl_vi.errors import ConfigError
from ppl_vi.models.base import sample_draws, scale_sites
from ppl_vi.models.gmm import GMM
from ppl_vi.models.linear_gaussian import LinearGaussian
from ppl_vi.objectives.importance import IWAELoss

DT = torch.float64
B = 20  # datapoints
KS = (1, 10, 100, 1000)


def _renyi(k):
    return RenyiELBO(alpha=0, num_particles=k, vectorize_particles=True, max_plate_nesting=1)


# ------------------------------------------------------------------------------------------------
# fixtures: models with the synthetic truth as parameters


@pytest.fixture
def lg_truth():
    return default_linear_gaussian_params(x_dim=5, z_dim=2, seed=0)


@pytest.fixture
def lg_batch(lg_truth):
    x, _ = sample_linear_gaussian(lg_truth, B, seed=1)
    return {"x": x}


def make_lg(truth, guide="amortised", perturb_encoder=True):
    """LinearGaussian(5, 2) with (W, b, σ) the truth and, optionally, a non-trivial encoder."""
    m = LinearGaussian(5, 2, guide=guide).to(DT)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        m.W.copy_(truth.W)
        m.b.copy_(truth.b)
        m.log_sigma.fill_(math.log(truth.sigma))
        if perturb_encoder:
            # q(z|x) near, not at, the exact posterior: the default encoder is q = p(z), for which
            # log q - log p = 0 and the β checks are vacuous; a random one is hopelessly far off.
            eye = torch.eye(2, dtype=DT)
            cov = torch.linalg.inv(eye + truth.W.T @ truth.W / truth.sigma**2)
            A = cov @ truth.W.T / truth.sigma**2  # posterior mean = A (x - b)
            m.enc_A.copy_(A + 0.15 * torch.randn(2, 5, generator=g, dtype=DT))
            m.enc_c.copy_(-A @ truth.b + 0.1 * torch.randn(2, generator=g, dtype=DT))
            m.enc_log_scale.copy_(0.5 * torch.diagonal(cov).log() + torch.tensor([0.6, -0.6], dtype=DT))
    return m


@pytest.fixture
def gmm_truth():
    return default_gmm_params(DT)


@pytest.fixture
def gmm_batch(gmm_truth):
    x, _ = sample_gmm(gmm_truth, B, seed=1)
    return {"x": x}


def make_gmm(truth=None, guide="amortised"):
    """GMM(3, 2); with ``truth`` its (logits, locs, log_scales) are set from the synthetic truth."""
    m = GMM(3, 2, guide=guide).to(DT)
    if truth is not None:
        with torch.no_grad():
            m.logits.copy_(truth.weights.log())
            m.locs.copy_(truth.means)
            m.log_scales.copy_(truth.scales.log())
    return m


def _row(report, name_part):
    rows = [r for r in report.rows if name_part in r.name]
    assert rows, f"no row containing {name_part!r}\n{report.table()}"
    return rows[0]


# ------------------------------------------------------------------------------------------------
# the full checker on the built-in models


def test_check_model_linear_gaussian_amortised_passes(lg_truth, lg_batch):
    model = make_lg(lg_truth)
    report = check_model(model, lg_batch, repeats=30, gradient_seeds=60, ks=KS, ladder_repeats=10)
    assert report.passed, report.table()
    # every loss a reparameterised model trains with ran, each same-sample (loss, each datapoint,
    # gradients) and with its expected gradient; β on the latents wherever the loss allows β
    unscaled = ["trace", "meanfield", "stl", "renyi", "iwae", "vimco", "dreg"]
    scaled = ["trace", "meanfield", "stl", "iwae"]
    for name in unscaled:
        for part in ("loss", "each datapoint", "gradients of 6 tensors"):
            assert _row(report, f"{name} (K=3) vs hand: {part}").passed
        assert _row(report, f"{name} (K=3) vs hand: mean over 30 seeds").kind == "statistical"
        assert "vs reference" in _row(report, f"{name} (K=3) vs hand: mean over 60 seeds vs reference").name
    for name in scaled:
        assert _row(report, f"{name} (K=3), beta=2 vs hand: each datapoint").passed
    kinds = [r.kind for r in report.rows]
    assert kinds.count("same sample") == 3 * (len(unscaled) + len(scaled))
    assert kinds.count("statistical") == len(unscaled)
    assert kinds.count("expected gradient") == 7 * (len(unscaled) + len(scaled))  # summary + 6 tensors each
    assert kinds.count("ground truth") == 3 + 2 * len(KS)
    assert not report.skipped
    # β = 2 changes the loss (the encoder was perturbed), so the β rows test something
    plain, beta = _row(report, "trace (K=3) vs hand: loss"), _row(report, "trace (K=3), beta=2 vs hand: loss")
    assert abs(beta.reference - plain.reference) > 0.1


def test_check_model_gmm_amortised_passes(gmm_batch):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Trace_ELBO on a guide marked for enumeration
        report = check_model(make_gmm(), gmm_batch, repeats=30, gradient_seeds=20, ks=KS, ladder_repeats=10)
    assert report.passed, report.table()
    names = " | ".join(r.name for r in report.rows)
    assert "enum (K=3), guide enumerated, vs hand exact ELBO: loss" in names
    assert "log p(x) - ELBO = KL(q || p(z|x)) (exact ELBO)" in names
    assert "IWAE_100 <= IWAE_1000" in names
    assert "IWAELoss (K=3) values, for eval, vs hand IWAE: each datapoint" in names
    # the discrete c: Trace_ELBO's and VIMCO's expected gradients are exact (every tuple of c
    # enumerated per datapoint) and equal the exact gradients of the ELBO and of E[L_3] to rounding
    for name in ("trace (K=3) vs hand", "trace (K=3), beta=2 vs hand", "vimco (K=3) vs hand"):
        summary = _row(report, f"{name}: expectation over 27 tuples x 8 datapoints, exact vs reference")
        assert summary.passed and summary.details["worst_z"] < 1e-3
        worst_rel = max(r.rel_diff for r in report.rows if r.kind == "expected gradient" and r.name.startswith(name)
                        and r.name.endswith(("weight", "bias", "logits", "locs", "log_scales")) and r.reference > 0)
        assert worst_rel < 1e-10
    # the losses that cannot train a discrete guide are not offered
    assert "iwae (K=3) vs hand" not in names and "meanfield" not in names and "dreg" not in names


def test_check_model_gmm_marginal_passes(gmm_batch):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        report = check_model(make_gmm(guide="marginal"), gmm_batch, repeats=30, gradient_seeds=20, ks=KS,
                             ladder_repeats=10)
    assert report.passed, report.table()
    row = _row(report, "enum (K=3) vs hand -log p(x): loss")
    assert row.rel_diff < 1e-12
    assert _row(report, "enum (K=3) vs hand -log p(x): gradients").passed
    # IWAE-k with c summed out in the model is log p(x) itself, for every datapoint and K
    for name in ("iwae", "vimco"):
        assert _row(report, f"{name} (K=3) vs hand: each datapoint").rel_diff < 1e-12
        assert _row(report, f"{name} (K=3) vs hand: one evaluation (deterministic) vs reference").passed


# ------------------------------------------------------------------------------------------------
# exact log p(x) and the exact posterior


def test_linear_gaussian_exact_log_likelihood_matches_synthetic_truth(lg_truth, lg_batch):
    m = make_lg(lg_truth)
    got = m.exact_log_likelihood(lg_batch)
    torch.testing.assert_close(got, lg_truth.log_prob(lg_batch["x"]), rtol=1e-12, atol=1e-12)
    # and the exact posterior agrees with the synthetic one
    loc, tril = m.posterior(lg_batch["x"])
    want_loc, want_cov = lg_truth.posterior(lg_batch["x"])
    torch.testing.assert_close(loc, want_loc, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(tril @ tril.T, want_cov, rtol=1e-10, atol=1e-12)


def test_gmm_exact_log_likelihood_matches_synthetic_truth(gmm_truth, gmm_batch):
    m = make_gmm(gmm_truth)
    got = m.exact_log_likelihood(gmm_batch)
    torch.testing.assert_close(got, gmm_truth.log_prob(gmm_batch["x"]), rtol=1e-12, atol=1e-12)
    # with other parameters it is a different number (the comparison has teeth)
    assert (make_gmm().exact_log_likelihood(gmm_batch) - got).abs().max() > 1.0


@pytest.mark.parametrize("perturb", [False, True], ids=["truth", "perturbed-W"])
def test_linear_gaussian_elbo_with_exact_guide_is_log_px(lg_truth, lg_batch, perturb):
    m = make_lg(lg_truth, guide="exact")
    if perturb:  # any parameters, not only the truth: the exact guide follows the current W, b, σ
        with torch.no_grad():
            m.W.mul_(0.7).add_(0.1)
            m.log_sigma.add_(0.3)
    log_px = m.exact_log_likelihood(lg_batch).detach()
    pyro_elbo = -Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1).loss(
        m.model, m.guide, **lg_batch)
    assert pyro_elbo == pytest.approx(log_px.sum().item(), rel=1e-6)
    with torch.no_grad():
        hand = -m.hand_negative_elbo(lg_batch, m.sample_draws(lg_batch, 4), kl="mc")
    torch.testing.assert_close(hand, log_px, rtol=1e-6, atol=0)
    # every draw: log w_k = log p(x), so IWAE_K is log p(x) too
    assert (hand - log_px).abs().max().item() < 1e-10
    assert m.posterior_kl(lg_batch).abs().max().item() < 1e-10


def test_gmm_elbo_with_posterior_guide_is_log_px(gmm_truth, gmm_batch):
    m = make_gmm(gmm_truth, guide="posterior")
    log_px = m.exact_log_likelihood(gmm_batch).detach()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pyro_elbo = -Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1).loss(
            m.model, m.guide, **gmm_batch)
    assert pyro_elbo == pytest.approx(log_px.sum().item(), rel=1e-6)
    with torch.no_grad():
        draws = m.sample_draws(gmm_batch, 4)
        hand_mc = -m.hand_negative_elbo(gmm_batch, draws, kl="mc")
        hand_exact = -m.hand_negative_elbo(gmm_batch, {}, kl="analytic")
    torch.testing.assert_close(hand_mc, log_px, rtol=1e-6, atol=0)
    torch.testing.assert_close(hand_exact, log_px, rtol=1e-10, atol=1e-10)
    assert m.posterior_kl(gmm_batch).abs().max().item() < 1e-10


def test_traceenum_with_marginal_guide_is_exact_negative_log_likelihood(gmm_truth, gmm_batch):
    m = make_gmm(gmm_truth, guide="marginal")
    log_px = m.exact_log_likelihood(gmm_batch)
    loss = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(m.model, m.guide, **gmm_batch)
    assert loss.item() == pytest.approx(-log_px.sum().item(), rel=1e-10)
    assert loss.item() == pytest.approx(-gmm_truth.log_prob(gmm_batch["x"]).sum().item(), rel=1e-10)
    # and so is its gradient: that of -Σ log p(x)
    params = [m.logits, m.locs, m.log_scales]
    g_enum = torch.autograd.grad(loss, params)
    g_exact = torch.autograd.grad(-log_px.sum(), params)
    for a, b in zip(g_enum, g_exact):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_gmm_posterior_kl_is_the_gap_to_the_exact_elbo(gmm_batch):
    m = make_gmm()  # random parameters and encoder: a real gap
    x = gmm_batch["x"]
    with torch.no_grad():
        # exact ELBO by enumeration, written with torch.distributions:
        # Σ_c q(c|x) [log π_c + log N(x; μ_c, σ_c²) - log q(c|x)]
        log_q = torch.log_softmax(m.encoder(x), -1)  # (B, C)
        log_joint = torch.log_softmax(m.logits, -1) + Normal(m.locs, m.log_scales.exp()).log_prob(
            x.unsqueeze(-2)).sum(-1)
        elbo = (log_q.exp() * (log_joint - log_q)).sum(-1)
        log_px = torch.logsumexp(log_joint, -1)
        kl = m.posterior_kl(gmm_batch)
    assert kl.min().item() > 1e-3
    torch.testing.assert_close(kl, log_px - elbo, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(m.exact_log_likelihood(gmm_batch), log_px, rtol=1e-12, atol=1e-12)


def test_linear_gaussian_posterior_kl_is_the_gap_to_the_exact_elbo(lg_truth, lg_batch):
    m = make_lg(lg_truth)
    x = lg_batch["x"]
    with torch.no_grad():
        # exact ELBO in closed form for q = N(m, diag s²):
        #   E_q log p(x|z) = -D/2 log 2π - D log σ - (‖x - W m - b‖² + tr(W diag(s²) Wᵀ)) / (2σ²)
        #   KL(q || N(0, I)) = Σ_d [ -log s_d + (s_d² + m_d²)/2 - 1/2 ]
        loc = x @ m.enc_A.T + m.enc_c
        s = m.enc_log_scale.exp()
        sigma, d = m.log_sigma.exp(), x.shape[-1]
        resid = ((x - loc @ m.W.T - m.b) ** 2).sum(-1)
        trace = (m.W**2 * s**2).sum()
        expected_ll = -0.5 * d * math.log(2 * math.pi) - d * torch.log(sigma) - (resid + trace) / (2 * sigma**2)
        kl_prior = (-torch.log(s) + 0.5 * (s**2 + loc**2) - 0.5).sum(-1)
        elbo = expected_ll - kl_prior
        kl = m.posterior_kl(lg_batch)
        log_px = m.exact_log_likelihood(lg_batch)
    assert kl.min().item() > 1e-2
    torch.testing.assert_close(kl, log_px - elbo, rtol=1e-9, atol=1e-9)
    # the model's own closed-form KL to the prior is the same
    torch.testing.assert_close(m.kl_to_prior(lg_batch).detach(), kl_prior, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# the IWAE ladder


def test_iwae_increases_with_k_and_stays_below_log_px(lg_truth, lg_batch):
    m = make_lg(lg_truth)
    repeats = 20
    log_px = m.exact_log_likelihood(lg_batch).detach().mean().item()
    means, ses = {}, {}
    with torch.no_grad():
        for k in KS:
            vals = []
            for r in range(repeats):
                pyro.set_rng_seed(1000 * k + r)
                vals.append(IWAELoss(num_particles=k).per_datapoint(m.model, m.guide, **lg_batch).mean().item())
            v = torch.tensor(vals, dtype=DT)
            means[k], ses[k] = v.mean().item(), v.std().item() / math.sqrt(repeats)
    summary = ", ".join(f"L_{k} = {means[k]:.4f} (SE {ses[k]:.2e})" for k in KS) + f"; log p(x) = {log_px:.4f}"
    for k in KS:
        assert means[k] <= log_px + 4 * ses[k], summary
    for k0, k1 in zip(KS, KS[1:]):
        assert means[k1] >= means[k0] - 4 * math.hypot(ses[k0], ses[k1]), summary
    # the increase is real, not noise: L_1 → L_10 → L_100 → L_1000 each significantly up
    # (with this guide: ≈ -11.0, -8.0, -7.45, -7.23 against log p(x) ≈ -7.06; SEs 0.25 down to 0.015)
    for k0, k1 in zip(KS, KS[1:]):
        assert means[k1] - means[k0] > 4 * math.hypot(ses[k0], ses[k1]), summary
    # and the gap to log p(x) closes: L_1000 is much nearer than L_1
    assert log_px - means[1000] < 0.1 * (log_px - means[1]), summary


# ------------------------------------------------------------------------------------------------
# IWAELoss


def test_iwae_chunked_equals_hand_bound_on_the_same_draws(lg_truth, lg_batch):
    # the chunked estimator runs the guide once per chunk (3, 3, 3, 1); re-seeding and drawing the
    # same chunks reproduces its draws exactly, so it equals the hand bound on all 10 of them.
    m = make_lg(lg_truth)
    for beta in (1.0, 0.4):
        model, guide = scale_sites(m.model, ("z",), beta), scale_sites(m.guide, ("z",), beta)
        pyro.set_rng_seed(3)
        got = IWAELoss(num_particles=10, chunk_size=3).per_datapoint(model, guide, **lg_batch)
        pyro.set_rng_seed(3)
        z = torch.cat([sample_draws(m.guide, lg_batch, k, 1)["z"] for k in (3, 3, 3, 1)])
        want = m.hand_iwae_bound(lg_batch, {"z": z}, beta=beta)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_iwae_chunked_with_exact_guide_is_log_px(lg_truth, lg_batch):
    m = make_lg(lg_truth, guide="exact")
    log_px = m.exact_log_likelihood(lg_batch).detach()
    for k, chunk in ((10, 3), (7, 7), (5, 1), (4, 100)):
        got = IWAELoss(num_particles=k, chunk_size=chunk).per_datapoint(m.model, m.guide, **lg_batch)
        torch.testing.assert_close(got.detach(), log_px, rtol=1e-10, atol=1e-10)


def test_iwae_chunked_has_the_same_distribution_as_unchunked(lg_truth, lg_batch):
    m = make_lg(lg_truth)
    repeats, k = 40, 50
    with torch.no_grad():
        runs = {}
        for chunk in (None, 7):
            vals = []
            for r in range(repeats):
                pyro.set_rng_seed(10_000 * (chunk or 1) + r)
                vals.append(IWAELoss(num_particles=k, chunk_size=chunk).per_datapoint(m.model, m.guide, **lg_batch))
            runs[chunk] = torch.stack(vals)  # (repeats, B)
    a, c = runs[None], runs[7]
    se = (a.var(0) / repeats + c.var(0) / repeats).sqrt()  # (B,)
    diff = (a.mean(0) - c.mean(0)).abs()
    assert (diff <= 4 * se).all(), f"per-datapoint |diff| / SE: {(diff / se).tolist()}"
    total_se = math.sqrt(a.sum(-1).var().item() / repeats + c.sum(-1).var().item() / repeats)
    total_diff = abs(a.sum(-1).mean().item() - c.sum(-1).mean().item())
    assert total_diff <= 4 * total_se, f"batch sum differs by {total_diff:.3g}, SE {total_se:.3g}"
    # the two are not trivially the same numbers
    assert not torch.equal(a, c)


@pytest.mark.parametrize("kwargs", [dict(num_particles=0), dict(num_particles=-3),
                                    dict(num_particles=5, chunk_size=0)])
def test_iwae_loss_rejects_bad_particle_counts(kwargs):
    with pytest.raises(ConfigError):
        IWAELoss(**kwargs)


def test_iwae_loss_gradient_equals_renyi_alpha0(lg_truth, lg_batch):
    m = make_lg(lg_truth)
    k = 5
    params = list(m.parameters())
    pyro.set_rng_seed(5)
    ours = IWAELoss(num_particles=k).differentiable_loss(m.model, m.guide, **lg_batch)
    g_ours = torch.autograd.grad(ours, params)
    for p in params:
        p.grad = None
    pyro.set_rng_seed(5)
    renyi = _renyi(k).loss_and_grads(m.model, m.guide, **lg_batch)
    g_renyi = [p.grad for p in params]
    assert ours.item() == pytest.approx(renyi, rel=1e-12)
    assert all(g is not None for g in g_renyi)
    for name, a, b in zip([n for n, _ in m.named_parameters()], g_ours, g_renyi):
        assert a.abs().max() > 1.0, name  # non-trivial gradients
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8, msg=name)


def test_scale_goes_outside_the_log_mean_exp(lg_truth, lg_batch):
    m = make_lg(lg_truth)
    k, c = 5, 3.0
    scaled_model, scaled_guide = poutine.scale(m.model, scale=c), poutine.scale(m.guide, scale=c)

    def loss_on_seed(loss, model, guide):
        pyro.set_rng_seed(7)
        return loss.loss(model, guide, **lg_batch)

    ours, ours_scaled = (loss_on_seed(IWAELoss(num_particles=k), *mg)
                         for mg in ((m.model, m.guide), (scaled_model, scaled_guide)))
    assert ours_scaled == pytest.approx(c * ours, rel=1e-12)

    renyi, renyi_scaled = (loss_on_seed(_renyi(k), *mg) for mg in ((m.model, m.guide), (scaled_model, scaled_guide)))
    assert renyi == pytest.approx(ours, rel=1e-12)  # unscaled, the two agree
    # Pyro's RenyiELBO puts the scale inside the logsumexp: -Σ_i [log mean_k exp(c log w_ik)],
    # which is not c × the IWAE bound (here it differs by far more than rounding).
    assert abs(renyi_scaled - c * renyi) > 1.0
    pyro.set_rng_seed(7)
    z = sample_draws(m.guide, lg_batch, k, 1)["z"]
    with torch.no_grad():
        lpx, lpz, lqz = m.log_terms(lg_batch, {"z": z})
        log_w = lpx + lpz - lqz
        pyro_form = -(torch.logsumexp(c * log_w, 0) - math.log(k)).sum().item()
        ours_form = -c * (torch.logsumexp(log_w, 0) - math.log(k)).sum().item()
    assert renyi_scaled == pytest.approx(pyro_form, rel=1e-12)
    assert ours_scaled == pytest.approx(ours_form, rel=1e-12)


def _subsampled_pair(m, full_size):
    """LinearGaussian's model and guide with the data plate a subsample of ``full_size`` points:
    Pyro scales every site in it by full_size / B (the minibatch scale c)."""
    import pyro.distributions as dist

    def plate(x):
        return pyro.plate("data", full_size, subsample=torch.arange(x.shape[0]), dim=-1)

    def model(x):
        pyro.module("linear_gaussian", m)
        with plate(x):
            zeros = x.new_zeros(m.z_dim)
            z = pyro.sample("z", dist.Normal(zeros, torch.ones_like(zeros)).to_event(1))
            loc = z @ m.W.T + m.b
            pyro.sample("x", dist.Normal(loc, m.sigma.expand_as(loc)).to_event(1), obs=x)

    def guide(x):
        pyro.module("linear_gaussian", m)
        with plate(x):
            loc, scale = m.encode(x)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    return model, guide


def test_subsampled_plate_scale_goes_outside_the_log_mean_exp(lg_truth, lg_batch):
    m = make_lg(lg_truth)
    n_full = 3 * B  # minibatch scale c = 3
    sub_model, sub_guide = _subsampled_pair(m, n_full)
    full_model, full_guide = _subsampled_pair(m, B)  # subsample = everything: scale 1
    pyro.set_rng_seed(2)
    plain = IWAELoss(num_particles=5).loss(m.model, m.guide, **lg_batch)
    pyro.set_rng_seed(2)
    assert IWAELoss(num_particles=5).loss(full_model, full_guide, **lg_batch) == pytest.approx(plain, rel=1e-12)
    # K = 1: the minibatch-scaled ELBO, exactly Trace_ELBO's loss on the same draw
    pyro.set_rng_seed(4)
    elbo = Trace_ELBO(num_particles=1, max_plate_nesting=1).loss(sub_model, sub_guide, **lg_batch)
    pyro.set_rng_seed(4)
    assert IWAELoss(num_particles=1).loss(sub_model, sub_guide, **lg_batch) == pytest.approx(elbo, rel=1e-10)
    # K = 5: c × the IWAE loss
    pyro.set_rng_seed(2)
    assert IWAELoss(num_particles=5).loss(sub_model, sub_guide, **lg_batch) == pytest.approx(3 * plain, rel=1e-10)
