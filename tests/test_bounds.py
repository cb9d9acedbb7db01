"""Tests of ppl_vi.bounds: every function against torch.distributions or a closed form, in float64."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributions import (
    Bernoulli,
    Categorical,
    Independent,
    MixtureSameFamily,
    MultivariateNormal,
    Normal,
    kl_divergence,
)

from ppl_vi import bounds

DT = torch.float64


def _close(a, b, rtol=1e-12, atol=1e-12):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def _random_tril(*batch, d):
    """Random lower-triangular factors with a positive diagonal, shape batch + (d, d)."""
    a = torch.randn(*batch, d, d, dtype=DT)
    tril = torch.tril(a, diagonal=-1)
    return tril + torch.diag_embed(torch.rand(*batch, d, dtype=DT) + 0.5)


# ------------------------------------------------------------------------------------------------
# log-densities


def test_log_normal_matches_torch_normal():
    x = torch.randn(7, 4, 3, dtype=DT)
    loc = torch.randn(4, 3, dtype=DT)
    scale = torch.rand(4, 3, dtype=DT) + 0.1
    got = bounds.log_normal(x, loc, scale)
    assert got.shape == (7, 4)
    _close(got, Normal(loc, scale).log_prob(x).sum(-1))


def test_log_normal_keeps_the_constant():
    # the standard normal at 0 in D dimensions: -D/2 log 2π, nothing dropped.
    d = 5
    got = bounds.log_normal(torch.zeros(d, dtype=DT), torch.zeros(d, dtype=DT), torch.ones(d, dtype=DT))
    assert got.item() == pytest.approx(-0.5 * d * math.log(2 * math.pi), rel=1e-14)
    assert bounds.LOG_2PI == pytest.approx(math.log(2 * math.pi), rel=1e-15)


def test_log_bernoulli_with_logits_matches_torch_bernoulli():
    logits = 3 * torch.randn(6, 10, dtype=DT)
    x = (torch.rand(6, 10, dtype=DT) < 0.5).to(DT)
    got = bounds.log_bernoulli_with_logits(x, logits)
    _close(got, Bernoulli(logits=logits).log_prob(x).sum(-1))


def test_log_bernoulli_with_logits_is_stable_for_large_logits():
    logits = torch.tensor([[800.0, -800.0, 40.0, -40.0]], dtype=DT)
    x = torch.tensor([[1.0, 0.0, 1.0, 0.0]], dtype=DT)
    got = bounds.log_bernoulli_with_logits(x, logits)
    assert torch.isfinite(got).all()
    # every term is log σ(|l|) ≈ -e^{-|l|}: total ≈ -2 e^{-40}
    assert got.item() == pytest.approx(-2 * math.exp(-40.0), rel=1e-10)
    x_wrong = 1 - x
    assert bounds.log_bernoulli_with_logits(x_wrong, logits).item() == pytest.approx(-1680.0, rel=1e-12)


def test_log_bernoulli_with_logits_is_a_normalised_distribution():
    # exactness: Σ over all 2^D binary configurations of p(x | l) is 1.
    d = 3
    logits = torch.tensor([0.3, -1.7, 2.2], dtype=DT)
    configs = torch.tensor(list(itertools.product([0.0, 1.0], repeat=d)), dtype=DT)  # (8, 3)
    assert configs.shape == (2**d, d)
    total = bounds.log_bernoulli_with_logits(configs, logits).exp().sum()
    assert total.item() == pytest.approx(1.0, abs=1e-14)
    # and it is not trivially normalised for a continuous x in [0, 1] (cross-entropy term only)
    half = bounds.log_bernoulli_with_logits(torch.full((d,), 0.5, dtype=DT), logits)
    assert half.item() < 0


def test_log_categorical_matches_torch_categorical():
    logits = 2 * torch.randn(5, 4, 6, dtype=DT) + 3.0  # unnormalised, shifted
    c = torch.randint(0, 6, (5, 4))
    got = bounds.log_categorical(c, logits)
    assert got.shape == (5, 4)
    _close(got, Categorical(logits=logits).log_prob(c))
    # float labels are accepted (cast to long)
    _close(bounds.log_categorical(c.to(DT), logits), got)


def test_log_categorical_broadcasts_logits_like_the_gmm_uses_it():
    logits = torch.randn(4, 3, dtype=DT).expand(2, 4, 3)
    c = torch.randint(0, 3, (2, 4))
    _close(bounds.log_categorical(c, logits), Categorical(logits=logits).log_prob(c))


def test_log_normal_mixture_matches_mixture_same_family():
    m, d = 4, 3
    log_weights = torch.log_softmax(torch.randn(m, dtype=DT), -1)
    locs = 2 * torch.randn(m, d, dtype=DT)
    scales = torch.rand(m, d, dtype=DT) + 0.3
    x = 2 * torch.randn(9, 2, d, dtype=DT)
    got = bounds.log_normal_mixture(x, log_weights, locs, scales)
    assert got.shape == (9, 2)
    mix = MixtureSameFamily(Categorical(logits=log_weights), Independent(Normal(locs, scales), 1))
    _close(got, mix.log_prob(x))


def test_log_normal_mixture_single_component_is_log_normal():
    locs, scales = torch.randn(1, 2, dtype=DT), torch.rand(1, 2, dtype=DT) + 0.5
    x = torch.randn(6, 2, dtype=DT)
    got = bounds.log_normal_mixture(x, torch.zeros(1, dtype=DT), locs, scales)
    _close(got, bounds.log_normal(x, locs[0], scales[0]))


def test_log_mvnormal_matches_torch_multivariate_normal():
    d = 4
    tril = _random_tril(d=d)
    loc = torch.randn(d, dtype=DT)
    x = torch.randn(8, 3, d, dtype=DT)
    got = bounds.log_mvnormal(x, loc, tril)
    assert got.shape == (8, 3)
    _close(got, MultivariateNormal(loc, scale_tril=tril).log_prob(x))


def test_log_mvnormal_with_batched_tril_and_diagonal_case():
    d = 3
    tril = _random_tril(5, d=d)
    loc = torch.randn(5, d, dtype=DT)
    x = torch.randn(2, 5, d, dtype=DT)  # K particles, B datapoints
    _close(bounds.log_mvnormal(x, loc, tril), MultivariateNormal(loc, scale_tril=tril).log_prob(x))
    # diagonal factor: same as the diagonal Gaussian
    scale = torch.rand(5, d, dtype=DT) + 0.2
    _close(bounds.log_mvnormal(x, loc, torch.diag_embed(scale)), bounds.log_normal(x, loc, scale))


# ------------------------------------------------------------------------------------------------
# KL divergences and entropy


def test_kl_normal_matches_torch_kl_divergence():
    q_loc, p_loc = torch.randn(6, 3, dtype=DT), torch.randn(6, 3, dtype=DT)
    q_scale, p_scale = torch.rand(6, 3, dtype=DT) + 0.2, torch.rand(6, 3, dtype=DT) + 0.2
    got = bounds.kl_normal(q_loc, q_scale, p_loc, p_scale)
    assert got.shape == (6,)
    _close(got, kl_divergence(Normal(q_loc, q_scale), Normal(p_loc, p_scale)).sum(-1))


def test_kl_normal_matches_monte_carlo_within_4_se():
    q_loc = torch.tensor([0.5, -1.0, 2.0], dtype=DT)
    q_scale = torch.tensor([0.7, 1.3, 0.4], dtype=DT)
    p_loc = torch.tensor([0.0, 0.5, 1.0], dtype=DT)
    p_scale = torch.tensor([1.0, 2.0, 0.8], dtype=DT)
    n = 200_000
    z = Normal(q_loc, q_scale).sample((n,))
    log_ratio = bounds.log_normal(z, q_loc, q_scale) - bounds.log_normal(z, p_loc, p_scale)  # (n,)
    mc, se = log_ratio.mean().item(), log_ratio.std().item() / math.sqrt(n)
    exact = bounds.kl_normal(q_loc, q_scale, p_loc, p_scale).item()
    assert exact > 0.5  # a KL far from 0, so the check has teeth
    assert abs(mc - exact) <= 4 * se, f"MC {mc:.5f} vs closed form {exact:.5f}, SE {se:.2e}"


def test_kl_categorical_matches_torch_kl_divergence():
    q_logits, p_logits = 2 * torch.randn(7, 5, dtype=DT), 2 * torch.randn(7, 5, dtype=DT) - 1.0
    got = bounds.kl_categorical(q_logits, p_logits)
    _close(got, kl_divergence(Categorical(logits=q_logits), Categorical(logits=p_logits)))
    assert (got > 0).all()
    _close(bounds.kl_categorical(q_logits, q_logits + 3.0), torch.zeros(7, dtype=DT))


def test_kl_mvnormal_matches_torch_kl_divergence():
    d = 3
    q_loc, p_loc = torch.randn(4, d, dtype=DT), torch.randn(4, d, dtype=DT)
    q_tril, p_tril = _random_tril(4, d=d), _random_tril(4, d=d)
    got = bounds.kl_mvnormal(q_loc, q_tril, p_loc, p_tril)
    assert got.shape == (4,)
    want = kl_divergence(MultivariateNormal(q_loc, scale_tril=q_tril), MultivariateNormal(p_loc, scale_tril=p_tril))
    _close(got, want, rtol=1e-10, atol=1e-10)


def test_kl_mvnormal_broadcasts_an_unbatched_prior():
    # the LinearGaussian use: batched q against N(0, I) given as a single (D, D) factor.
    d = 2
    q_loc, q_tril = torch.randn(5, d, dtype=DT), _random_tril(d=d)
    p_loc, p_tril = torch.zeros(5, d, dtype=DT), torch.eye(d, dtype=DT)
    got = bounds.kl_mvnormal(q_loc, q_tril, p_loc, p_tril)
    want = kl_divergence(MultivariateNormal(q_loc, scale_tril=q_tril.expand(5, d, d)),
                         MultivariateNormal(p_loc, scale_tril=p_tril.expand(5, d, d)))
    _close(got, want, rtol=1e-10, atol=1e-10)
    # diagonal factors: same as the diagonal-Gaussian closed form
    qs = torch.rand(5, d, dtype=DT) + 0.3
    _close(bounds.kl_mvnormal(q_loc, torch.diag_embed(qs), p_loc, p_tril),
           bounds.kl_normal(q_loc, qs, p_loc, torch.ones_like(qs)), rtol=1e-10, atol=1e-10)


def test_entropy_categorical_matches_torch():
    logits = 3 * torch.randn(6, 4, dtype=DT)
    _close(bounds.entropy_categorical(logits), Categorical(logits=logits).entropy())
    # uniform: log C
    assert bounds.entropy_categorical(torch.zeros(5, dtype=DT)).item() == pytest.approx(math.log(5), rel=1e-14)


# ------------------------------------------------------------------------------------------------
# log-mean-exp and the bounds


def test_log_mean_exp_matches_naive_on_moderate_values():
    x = 3 * torch.randn(10, 4, dtype=DT)
    _close(bounds.log_mean_exp(x, dim=0), torch.log(torch.exp(x).mean(0)))
    _close(bounds.log_mean_exp(x, dim=1), torch.log(torch.exp(x).mean(1)))
    _close(bounds.log_mean_exp(x, dim=-1), torch.log(torch.exp(x).mean(-1)))


def test_log_mean_exp_is_stable_for_huge_values():
    x = torch.tensor([[1000.0, -1000.0], [1000.0, -1000.0 + math.log(3.0)], [999.0, -1001.0]], dtype=DT)
    got = bounds.log_mean_exp(x, dim=0)
    assert torch.isfinite(got).all()
    want0 = 1000.0 + math.log((2 + math.exp(-1.0)) / 3)
    want1 = -1000.0 + math.log((1 + 3 + math.exp(-1.0)) / 3)
    _close(got, torch.tensor([want0, want1], dtype=DT), rtol=1e-14, atol=1e-12)
    # the naive form over/underflows here, which is the point of the stable one
    assert not torch.isfinite(torch.log(torch.exp(x).mean(0))).all()


def test_negative_elbo_mc_definition():
    k, b, beta = 5, 4, 2.5
    lpx, lpz, lqz = (torch.randn(k, b, dtype=DT) for _ in range(3))
    got = bounds.negative_elbo_mc(lpx, lpz, lqz, beta)
    want = torch.stack([-(lpx[i] - beta * (lqz[i] - lpz[i])) for i in range(k)]).mean(0)
    _close(got, want)
    _close(bounds.negative_elbo_mc(lpx, lpz, lqz), -bounds.elbo_mc(lpx, lpz, lqz).mean(0))


def test_negative_elbo_analytic_definition():
    k, b, beta = 3, 6, 0.25
    lpx, kl = torch.randn(k, b, dtype=DT), torch.rand(b, dtype=DT)
    _close(bounds.negative_elbo_analytic(lpx, kl, beta), -lpx.mean(0) + beta * kl)
    _close(bounds.negative_elbo_analytic(lpx, kl), -lpx.mean(0) + kl)


def test_analytic_and_mc_negative_elbo_agree_in_expectation():
    # Gaussian q and prior: E_q[log q - log p] is the closed-form KL, so the two estimators of the
    # negative ELBO have the same mean (within 4 SE over many draws), though never the same value.
    q_loc, q_scale = torch.tensor([[0.4, -0.3]], dtype=DT), torch.tensor([[0.5, 0.9]], dtype=DT)
    zeros, ones = torch.zeros_like(q_loc), torch.ones_like(q_loc)
    n = 100_000
    z = Normal(q_loc, q_scale).sample((n,))  # (n, 1, 2)
    lpx = bounds.log_normal(torch.tensor([[1.0, 2.0]], dtype=DT), z, 0.7 * ones)  # (n, 1)
    lpz, lqz = bounds.log_normal(z, zeros, ones), bounds.log_normal(z, q_loc, q_scale)
    per_draw_mc = -(lpx - (lqz - lpz))  # (n, 1)
    analytic = bounds.negative_elbo_analytic(lpx, bounds.kl_normal(q_loc, q_scale, zeros, ones))
    mc = bounds.negative_elbo_mc(lpx, lpz, lqz)
    se = per_draw_mc.std().item() / math.sqrt(n)
    assert abs(mc.item() - analytic.item()) <= 4 * se, f"{mc.item()} vs {analytic.item()}, SE {se:.2e}"


def test_iwae_bound_definition_and_jensen():
    k, b = 50, 8
    log_w = 2 * torch.randn(k, b, dtype=DT) - 3
    got = bounds.iwae_bound(log_w)
    assert got.shape == (b,)
    _close(got, torch.log(torch.exp(log_w).mean(0)))
    # Jensen: log mean exp >= mean, strictly for non-constant weights
    assert (got > log_w.mean(0)).all()
    # K = 1 is the ELBO term itself; equal weights give that weight
    _close(bounds.iwae_bound(log_w[:1]), log_w[0])
    _close(bounds.iwae_bound(log_w[:1].expand(k, b)), log_w[0])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-50, 50), min_size=1, max_size=30))
def test_iwae_bound_is_at_least_the_mean_log_weight(values):
    log_w = torch.tensor(values, dtype=DT).unsqueeze(-1)  # (K, 1)
    assert bounds.iwae_bound(log_w).item() >= log_w.mean().item() - 1e-10
    assert bounds.iwae_bound(log_w).item() <= log_w.max().item() + 1e-10


def test_iwae_bound_beta_at_k1_is_the_beta_elbo():
    b = 5
    lpx, lpz, lqz = (torch.randn(1, b, dtype=DT) for _ in range(3))
    for beta in (0.0, 0.5, 1.0, 3.0):
        _close(bounds.iwae_bound_beta(lpx, lpz, lqz, beta), -bounds.negative_elbo_mc(lpx, lpz, lqz, beta))


def test_iwae_bound_beta_at_beta1_is_iwae_and_otherwise_the_weighted_sum():
    k, b, beta = 7, 4, 0.3
    lpx, lpz, lqz = (2 * torch.randn(k, b, dtype=DT) for _ in range(3))
    log_w = lpx + lpz - lqz
    _close(bounds.iwae_bound_beta(lpx, lpz, lqz, 1.0), bounds.iwae_bound(log_w))
    _close(bounds.iwae_bound_beta(lpx, lpz, lqz), bounds.iwae_bound(log_w))
    want = beta * torch.log(torch.exp(log_w).mean(0)) + (1 - beta) * lpx.mean(0)
    _close(bounds.iwae_bound_beta(lpx, lpz, lqz, beta), want)


# ------------------------------------------------------------------------------------------------
# properties

_pos = st.floats(0.05, 5.0)
_real = st.floats(-5.0, 5.0)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(_real, _pos, _real, _pos), min_size=1, max_size=4))
def test_kl_normal_nonnegative_and_zero_iff_equal(params):
    q_loc, q_scale, p_loc, p_scale = (torch.tensor(c, dtype=DT) for c in zip(*params))
    kl = bounds.kl_normal(q_loc, q_scale, p_loc, p_scale).item()
    assert kl >= -1e-12
    assert bounds.kl_normal(q_loc, q_scale, q_loc, q_scale).item() == 0.0
    differs = ((q_loc - p_loc).abs() > 1e-3).any() or ((q_scale / p_scale).log().abs() > 1e-3).any()
    if differs:
        assert kl > 0.0
    want = kl_divergence(Normal(q_loc, q_scale), Normal(p_loc, p_scale)).sum().item()
    assert kl == pytest.approx(want, rel=1e-9, abs=1e-12)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.floats(-300, 300), min_size=1, max_size=20), st.floats(-1e4, 1e4))
def test_log_mean_exp_shift_equivariant(values, shift):
    x = torch.tensor(values, dtype=DT)
    base = bounds.log_mean_exp(x).item()
    assert bounds.log_mean_exp(x + shift).item() == pytest.approx(base + shift, rel=1e-12, abs=1e-9)
    assert x.max().item() - math.log(len(values)) - 1e-9 <= base <= x.max().item() + 1e-9
