"""The hand-derived math: one function per equation.

Every function returns *per-datapoint* values (no reduction over the batch) and keeps every
normalising constant, so its result is an exact log-density or an exact bound that can be held
against Pyro's losses. Shapes follow one convention: the last ``event`` dimension is summed, every
leading dimension (particles ``K``, batch ``B``) is kept. Reductions are the caller's, by name.

Notation: x data, z latent, q(z|x) the guide, p(z) the prior, p(x|z) the likelihood,
K the number of particles (samples from the guide).
"""

import math

import torch
from torch import Tensor

LOG_2PI = math.log(2.0 * math.pi)


def log_normal(x: Tensor, loc: Tensor, scale: Tensor) -> Tensor:
    """Diagonal Gaussian log-density, summed over the last dimension.

        log N(x; μ, diag σ²) = Σ_d [ -½ log 2π - log σ_d - (x_d - μ_d)² / (2 σ_d²) ]
    """
    return (-0.5 * LOG_2PI - torch.log(scale) - 0.5 * ((x - loc) / scale) ** 2).sum(-1)


def log_bernoulli_with_logits(x: Tensor, logits: Tensor) -> Tensor:
    """Bernoulli log-likelihood from logits, summed over the last dimension.

        log p(x | l) = Σ_d [ x_d l_d - log(1 + e^{l_d}) ] = Σ_d [ x_d l_d - softplus(l_d) ]

    Exact for x in {0, 1}; for x in [0, 1] it is the continuous cross-entropy term.
    """
    return (x * logits - torch.nn.functional.softplus(logits)).sum(-1)


def log_categorical(c: Tensor, logits: Tensor) -> Tensor:
    """Categorical log-probability of integer labels ``c`` under unnormalised ``logits``.

        log p(c | l) = l_c - log Σ_j e^{l_j}
    """
    log_probs = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    return log_probs.gather(-1, c.long().unsqueeze(-1)).squeeze(-1)


def kl_normal(q_loc: Tensor, q_scale: Tensor, p_loc: Tensor, p_scale: Tensor) -> Tensor:
    """KL between diagonal Gaussians in closed form, summed over the last dimension.

        KL(N(μ_q, σ_q²) || N(μ_p, σ_p²))
            = Σ_d [ log σ_p,d - log σ_q,d + (σ_q,d² + (μ_q,d - μ_p,d)²) / (2 σ_p,d²) - ½ ]
    """
    var_ratio = (q_scale / p_scale) ** 2
    mean_term = ((q_loc - p_loc) / p_scale) ** 2
    return (torch.log(p_scale) - torch.log(q_scale) + 0.5 * (var_ratio + mean_term) - 0.5).sum(-1)


def kl_categorical(q_logits: Tensor, p_logits: Tensor) -> Tensor:
    """KL between categoricals given by logits, over the last dimension.

        KL(q || p) = Σ_c q_c (log q_c - log p_c)
    """
    log_q = q_logits - torch.logsumexp(q_logits, dim=-1, keepdim=True)
    log_p = p_logits - torch.logsumexp(p_logits, dim=-1, keepdim=True)
    return (log_q.exp() * (log_q - log_p)).sum(-1)


def log_normal_mixture(x: Tensor, log_weights: Tensor, locs: Tensor, scales: Tensor) -> Tensor:
    """Log-density of a mixture of M diagonal Gaussians.

        log Σ_m π_m N(x; μ_m, diag σ_m²)
            = logsumexp_m [ log π_m + log N(x; μ_m, σ_m²) ]

    Shapes: x (..., D); log_weights (M,), normalised; locs, scales (M, D). Returns (...).
    """
    per_component = log_normal(x.unsqueeze(-2), locs, scales)  # (..., M)
    return torch.logsumexp(log_weights + per_component, dim=-1)


def log_mean_exp(x: Tensor, dim: int = 0) -> Tensor:
    """Numerically stable log of the mean of exponentials along ``dim``.

        log (1/K) Σ_k e^{x_k} = logsumexp_k x_k - log K
    """
    return torch.logsumexp(x, dim=dim) - math.log(x.shape[dim])


def elbo_mc(log_px_given_z: Tensor, log_pz: Tensor, log_qz: Tensor) -> Tensor:
    """Single-sample ELBO terms with a Monte Carlo KL, per particle and datapoint.

        ELBO ≈ log p(x|z) + log p(z) - log q(z|x),   z ~ q(z|x)

    Inputs are (K, B) log-densities at the same K draws; the result is (K, B). Average over K
    (``.mean(0)``) for the K-particle ELBO estimate.
    """
    return log_px_given_z + log_pz - log_qz


def negative_elbo_mc(log_px_given_z: Tensor, log_pz: Tensor, log_qz: Tensor, beta: float = 1.0) -> Tensor:
    """Negative ELBO with a Monte Carlo KL, averaged over particles, per datapoint.

        -ELBO_β(x) ≈ -(1/K) Σ_k [ log p(x|z_k) - β (log q(z_k|x) - log p(z_k)) ]

    Inputs (K, B); result (B,). β = 1 is the ELBO; β ≠ 1 is the β-VAE objective.
    """
    return -(log_px_given_z - beta * (log_qz - log_pz)).mean(0)


def negative_elbo_analytic(log_px_given_z: Tensor, kl: Tensor, beta: float = 1.0) -> Tensor:
    """Negative ELBO with a closed-form KL, per datapoint.

        -ELBO_β(x) ≈ -(1/K) Σ_k log p(x|z_k) + β KL(q(z|x) || p(z))

    ``log_px_given_z`` is (K, B), ``kl`` is (B,); result (B,).
    """
    return -log_px_given_z.mean(0) + beta * kl


def iwae_bound(log_weights: Tensor) -> Tensor:
    """Importance-weighted bound from K log-weights per datapoint.

        L_K(x) = log (1/K) Σ_k p(x, z_k) / q(z_k|x),   z_k ~ q(z|x)

    ``log_weights`` is (K, B) with log w_k = log p(x, z_k) - log q(z_k|x); result (B,).
    L_1 is the ELBO, L_K increases with K and tends to log p(x).
    """
    return log_mean_exp(log_weights, dim=0)


def iwae_bound_beta(log_px_given_z: Tensor, log_pz: Tensor, log_qz: Tensor, beta: float = 1.0) -> Tensor:
    """β-weighted importance-weighted bound, β outside the log-mean-exp.

        L_K,β(x) = β · log (1/K) Σ_k p(x, z_k)/q(z_k|x) + (1 - β) · (1/K) Σ_k log p(x|z_k)

    Inputs (K, B); result (B,). β = 1 is L_K; K = 1 is the β-ELBO log p(x|z) - β (log q - log p).
    """
    iwae = iwae_bound(log_px_given_z + log_pz - log_qz)
    if beta == 1:
        return iwae
    return beta * iwae + (1 - beta) * log_px_given_z.mean(0)


def entropy_categorical(logits: Tensor) -> Tensor:
    """Entropy of a categorical from logits, over the last dimension.

        H[q] = -Σ_c q_c log q_c
    """
    log_q = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    return -(log_q.exp() * log_q).sum(-1)


def log_mvnormal(x: Tensor, loc: Tensor, scale_tril: Tensor) -> Tensor:
    """Full-covariance Gaussian log-density with Σ = L Lᵀ (L lower triangular).

        log N(x; μ, Σ) = -D/2 log 2π - Σ_d log L_dd - ½ ‖L⁻¹ (x - μ)‖²
    """
    diff = (x - loc).unsqueeze(-1)  # (..., D, 1)
    batch = torch.broadcast_shapes(diff.shape[:-2], scale_tril.shape[:-2])
    diff = diff.expand(batch + diff.shape[-2:])
    tril = scale_tril.expand(batch + scale_tril.shape[-2:])
    white = torch.linalg.solve_triangular(tril, diff, upper=False).squeeze(-1)
    half_log_det = torch.diagonal(scale_tril, dim1=-2, dim2=-1).log().sum(-1)
    return -0.5 * x.shape[-1] * LOG_2PI - half_log_det - 0.5 * (white**2).sum(-1)


def kl_mvnormal(q_loc: Tensor, q_tril: Tensor, p_loc: Tensor, p_tril: Tensor) -> Tensor:
    """KL between full-covariance Gaussians (Σ = L Lᵀ) in closed form.

        KL(N(μ_q, Σ_q) || N(μ_p, Σ_p)) = ½ [ tr(Σ_p⁻¹ Σ_q) + (μ_p - μ_q)ᵀ Σ_p⁻¹ (μ_p - μ_q)
                                             - D + log det Σ_p - log det Σ_q ]
    """
    d = q_loc.shape[-1]
    batch = torch.broadcast_shapes(q_loc.shape[:-1], p_loc.shape[:-1], q_tril.shape[:-2], p_tril.shape[:-2])
    p_tril = p_tril.expand(batch + (d, d))
    trace_term = torch.linalg.solve_triangular(p_tril, q_tril.expand(batch + (d, d)), upper=False).pow(2).sum((-2, -1))
    diff = (p_loc - q_loc).expand(batch + (d,)).unsqueeze(-1)
    mahalanobis = torch.linalg.solve_triangular(p_tril, diff, upper=False).pow(2).sum((-2, -1))
    log_det_p = 2 * torch.diagonal(p_tril, dim1=-2, dim2=-1).log().sum(-1)
    log_det_q = 2 * torch.diagonal(q_tril, dim1=-2, dim2=-1).log().sum(-1)
    return 0.5 * (trace_term + mahalanobis - d + log_det_p - log_det_q)


def vimco_surrogate(log_weights: Tensor, log_q_score: Tensor) -> Tensor:
    """The IWAE bound with VIMCO's gradient for the non-reparameterised sites (Mnih & Rezende 2016).

        L̂ = log (1/K) Σ_k w_k
        L̂_-j = log (1/K) [ Σ_{k≠j} w_k + exp( (1/(K-1)) Σ_{k≠j} log w_k ) ]     (h_j replaced by a geometric mean)
        ∇L_K ≈ ∇L̂ + Σ_j (L̂ - L̂_-j) ∇log q(h_j | x)

    ``log_weights`` (K, B) are log w_k = log p(x, h_k) - log q(h_k|x) (differentiable through the
    parameters and any reparameterised values); ``log_q_score`` (K, B) is Σ log q over the sites
    sampled without ``rsample``. Returns (B,): the value of L̂, with gradient L̂'s plus the leave-one-out
    score term Σ_j ⊥(L̂ - L̂_-j) log q(h_j|x) (⊥: stop-gradient). The baseline L̂_-j does not depend on
    h_j, so the estimator stays unbiased for ∇E[L̂]. Memory O(K² B). Needs K ≥ 2.
    """
    k = log_weights.shape[0]
    if k < 2:
        raise ValueError("VIMCO needs K >= 2 particles (the baseline of particle j uses the others)")
    lw = log_weights.detach()
    bound = log_mean_exp(lw, dim=0)  # (B,)
    geometric = (lw.sum(0, keepdim=True) - lw) / (k - 1)  # (K, B): mean of the others' log w
    replaced = lw.unsqueeze(0).expand((k,) + lw.shape).clone()  # (J, K, B): row j holds log w with k=j swapped
    index = torch.arange(k, device=lw.device)
    replaced[index, index] = geometric
    baseline = log_mean_exp(replaced, dim=1)  # (J, B): L̂_-j
    pathwise = log_mean_exp(log_weights, dim=0)  # ∇L̂ = Σ_k w̃_k ∇log w_k
    score = ((bound - baseline) * log_q_score).sum(0)  # Σ_j (L̂ - L̂_-j) log q(h_j|x)
    return bound + (pathwise - pathwise.detach()) + (score - score.detach())
