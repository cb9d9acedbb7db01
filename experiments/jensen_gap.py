"""Why not maximise E_p(z)[log p(x|z)] by Monte Carlo?  The Jensen gap, measured.

A newcomer's question: log p(x) = log E_p(z)[p(x|z)] is what we want, so why not just sample
z ~ p(z) and average log p(x|z)? Because the log and the expectation do not commute. Jensen's
inequality gives

    E_p(z)[log p(x|z)]  ≤  log E_p(z)[p(x|z)] = log p(x),

and the gap is KL(p(z) || p(z|x)), which does not vanish with more samples: averaging *log*
likelihoods estimates the left-hand side without bias, not log p(x). Two remedies:

* average the likelihoods *before* the log: L_K = log (1/K) Σ_k p(x|z_k), z_k ~ p(z). This is a
  consistent but biased estimate of log p(x); E[L_K] increases with K to log p(x), slowly when
  the prior rarely hits the posterior (bias ≈ Var[w] / (2 K p(x)²) only once K is large);
* sample from a guide q(z|x) close to p(z|x): ELBO = E_q[log p(x,z) - log q(z|x)]
  = log p(x) - KL(q(z|x) || p(z|x)) and the IWAE bound L_K = log (1/K) Σ_k p(x,z_k)/q(z_k|x)
  closes the remaining gap quickly.

Part (1) measures all of this on a Gaussian mixture whose parameters are known, so log p(x) and
every bound with the latent summed out are exact. Part (2) shows the consequence for learning:
fitting the mixture by maximising E_p(c)[log p(x|c)] (the "naive" objective) is not a poor
estimate of maximum likelihood but a different objective with a different optimum.

Run::

    python experiments/jensen_gap.py --out DIR [--seed S] [--quick]

Writes DIR/jensen_gap.json, DIR/jensen_gap.md, DIR/bias_vs_k.png and DIR/fits.png.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Ellipse  # noqa: E402
from pyro.infer import TraceEnum_ELBO  # noqa: E402
from torch import Tensor  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script without PYTHONPATH
from ppl_vi import bounds  # noqa: E402
from ppl_vi.data.synthetic import GMMParams, default_gmm_params, sample_gmm  # noqa: E402
from ppl_vi.models.gmm import GMM  # noqa: E402

DTYPE = torch.float64

#: Settings of a full run and of a --quick run (the test's).
SETTINGS = {
    "full": {
        "n_train": 2000, "n_test": 2000, "hidden": 32,
        "ks": [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000],
        "max_repeats": 100, "min_repeats": 4, "particle_budget": 20000, "chunk_elements": 2_000_000,
        "guide_steps": 300, "guide_lr": 0.05,
        "fit_steps": 600, "fit_lr": 0.05,
    },
    "quick": {
        "n_train": 1000, "n_test": 1000, "hidden": 32,
        "ks": [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000],
        "max_repeats": 20, "min_repeats": 4, "particle_budget": 4000, "chunk_elements": 1_000_000,
        "guide_steps": 150, "guide_lr": 0.05,
        "fit_steps": 300, "fit_lr": 0.05,
    },
}

FIT_KINDS = {
    "exact": ("marginal", "exact marginal likelihood  -Σ log p(x)"),
    "elbo": ("amortised", "ELBO, amortised q(c|x), c enumerated"),
    "naive": ("prior", "naive  Σ E_p(c)[log p(x|c)]"),
}


# ---------------------------------------------------------------------------------------------
# Helpers


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    pyro.set_rng_seed(seed)


def gmm_at(params: GMMParams, guide: str, hidden: int) -> GMM:
    """A float64 GMM whose mixture parameters are set to ``params`` (encoder left at its init)."""
    model = GMM(params.weights.shape[0], params.means.shape[1], hidden=hidden, guide=guide).to(DTYPE)
    with torch.no_grad():
        model.logits.copy_(params.weights.log())
        model.locs.copy_(params.means)
        model.log_scales.copy_(params.scales.log())
    return model


def mixture_of(model: GMM) -> dict:
    """Weights, means and scales of a fitted GMM as nested lists."""
    return {
        "weights": model.log_weights().exp().tolist(),
        "means": model.locs.tolist(),
        "scales": model.scales.tolist(),
    }


def mean_and_se(values: Tensor) -> tuple[float, float]:
    """Mean over (repeats R, datapoints B) and its Monte Carlo standard error given the data.

        m = (1/RB) Σ_{r,i} L_{r,i},   SE(m) = sqrt( (1/B) Σ_i s_i² / (R B) ),

    s_i² the sample variance of L_{·,i} over the R independent repeats for datapoint i. The data
    set is fixed, so the only randomness is the sampling of c; that is what the SE measures.
    """
    repeats, n = values.shape
    var = values.var(dim=0, unbiased=True).mean() if repeats > 1 else torch.tensor(float("nan"))
    return values.mean().item(), math.sqrt(var.item() / (repeats * n))


# ---------------------------------------------------------------------------------------------
# Part 1: the bounds at the true parameters


def train_amortised_guide(model: GMM, x: Tensor, steps: int, lr: float) -> list[float]:
    """Fit q(c|x) = Cat(softmax(MLP(x))) with the mixture FIXED, by maximising the exact ELBO

        ELBO(x) = Σ_c q(c|x) log p(x|c) - KL(q(c|x) || π)      (c summed out, no sampling),

    i.e. minimising Σ_i KL(q(c|x_i) || p(c|x_i)), with Adam over the encoder's parameters only.
    Returns the loss curve (mean -ELBO per datapoint).
    """
    for p in (model.logits, model.locs, model.log_scales):
        p.requires_grad_(False)
    optimiser = torch.optim.Adam(model.encoder.parameters(), lr=lr)
    curve = []
    for _ in range(steps):
        optimiser.zero_grad()
        loss = model.hand_negative_elbo({"x": x}, {}, kl="analytic").mean()
        loss.backward()
        optimiser.step()
        curve.append(loss.item())
    return curve


def log_mean_exp_bound(log_w: Tensor, log_r: Tensor, k: int, repeats: int, chunk_elements: int,
                       generator: torch.Generator) -> Tensor:
    """``repeats`` independent draws of the K-sample bound, for every datapoint: (repeats, B).

        L_K(x_i) = log (1/K) Σ_k w(x_i, c_k),   c_k ~ r(c|x_i),   w = p(x, c) / r(c|x)

    ``log_w`` (B, C) is log w for every c, ``log_r`` (B, C) the normalised log-probabilities of
    the proposal r. With r = p(c), w = p(x|c): the prior log-mean-exp; with r = q(c|x), the IWAE
    bound. c is drawn by inverting the CDF of r; K is split into chunks of at most
    ``chunk_elements`` draws, joined by a running logsumexp, so memory stays O(chunk).
    """
    n = log_w.shape[0]
    cdf = log_r.exp().cumsum(-1)[:, :-1]  # (B, C-1): c = #{j : cdf_j < u}

    def draw_log_w(shape: tuple) -> Tensor:
        u = torch.rand((n,) + shape, generator=generator, dtype=log_w.dtype)
        c = (u.unsqueeze(-1) > cdf.view((n,) + (1,) * len(shape) + cdf.shape[-1:])).sum(-1)
        return log_w.gather(1, c.reshape(n, -1)).reshape(c.shape)  # log w at c, same shape

    out = torch.empty(repeats, n, dtype=log_w.dtype)
    per_chunk = max(1, chunk_elements // n)  # draws per datapoint in one chunk
    if k <= per_chunk:  # several repeats per chunk
        group = max(1, per_chunk // k)
        for start in range(0, repeats, group):
            g = min(group, repeats - start)
            out[start:start + g] = bounds.log_mean_exp(draw_log_w((g, k)), dim=-1).T
    else:  # one repeat at a time, K in chunks
        for r in range(repeats):
            running = torch.full((n,), -math.inf, dtype=log_w.dtype)
            for start in range(0, k, per_chunk):
                running = torch.logaddexp(running, torch.logsumexp(draw_log_w((min(per_chunk, k - start),)), dim=-1))
            out[r] = running - math.log(k)
    return out


def repeats_for(k: int, cfg: dict) -> int:
    """More repeats where K is small (noisy bound, cheap), fewer where K is large."""
    return int(min(cfg["max_repeats"], max(cfg["min_repeats"], cfg["particle_budget"] // k)))


def part1_bounds(params: GMMParams, x: Tensor, cfg: dict, seed: int) -> dict:
    """Every bound on (1/n) Σ_i log p(x_i) at the TRUE mixture parameters.

    * exact:        log p(x) = logsumexp_c [log π_c + log N(x; μ_c, σ_c²)]
    * prior ELBO:   E_p(c)[log p(x|c)] = Σ_c π_c log N(x; μ_c, σ_c²)
                    = log p(x) - KL(p(c) || p(c|x))                 (Jensen; exact sum over c)
    * amortised:    ELBO = log p(x) - KL(q(c|x) || p(c|x)), q trained with the mixture fixed
    * L_K prior:    log (1/K) Σ_k p(x|c_k),             c_k ~ p(c)
    * L_K guide:    log (1/K) Σ_k p(x,c_k)/q(c_k|x),    c_k ~ q(c|x)   (IWAE)
    """
    batch = {"x": x}
    prior_model = gmm_at(params, "prior", cfg["hidden"])
    seed_everything(seed)
    guide_model = gmm_at(params, "amortised", cfg["hidden"])
    posterior_model = gmm_at(params, "posterior", cfg["hidden"])

    t0 = time.perf_counter()
    curve = train_amortised_guide(guide_model, x, cfg["guide_steps"], cfg["guide_lr"])
    guide_seconds = time.perf_counter() - t0

    with torch.no_grad():
        exact = guide_model.exact_log_likelihood(batch)
        prior_elbo = -prior_model.hand_negative_elbo(batch, {}, kl="analytic")
        amortised_elbo = -guide_model.hand_negative_elbo(batch, {}, kl="analytic")
        amortised_gap = guide_model.posterior_kl(batch)
        prior_gap = prior_model.posterior_kl(batch)
        posterior_elbo = -posterior_model.hand_negative_elbo(batch, {}, kl="analytic")

        log_joint = guide_model.log_joint_all(x)  # (B, C)
        log_prior = guide_model.log_weights().expand_as(log_joint)
        log_q = torch.log_softmax(guide_model.guide_logits(x), dim=-1)
        proposals = {
            "prior": (log_joint - log_prior, log_prior),  # w = p(x|c)
            "guide": (log_joint - log_q, log_q),  # w = p(x,c)/q(c|x)
        }
        generator = torch.Generator().manual_seed(seed + 101)
        t0 = time.perf_counter()
        rows = []
        for k in cfg["ks"]:
            repeats = repeats_for(k, cfg)
            row = {"K": k, "repeats": repeats}
            for name, (log_w, log_r) in proposals.items():
                mean, se = mean_and_se(log_mean_exp_bound(log_w, log_r, k, repeats, cfg["chunk_elements"], generator))
                row[name] = {"mean": mean, "se": se, "gap": exact.mean().item() - mean}
            rows.append(row)
        sampling_seconds = time.perf_counter() - t0

    exact_mean = exact.mean().item()
    return {
        "n": x.shape[0],
        "exact_log_px": exact_mean,
        "exact_log_px_check_vs_GMMParams": (exact - params.log_prob(x)).abs().max().item(),
        "prior_elbo": prior_elbo.mean().item(),
        "prior_gap_kl": prior_gap.mean().item(),
        "amortised_elbo": amortised_elbo.mean().item(),
        "amortised_gap_kl": amortised_gap.mean().item(),
        "posterior_guide_elbo": posterior_elbo.mean().item(),
        "identity_error_prior": (exact - prior_elbo - prior_gap).abs().max().item(),
        "identity_error_amortised": (exact - amortised_elbo - amortised_gap).abs().max().item(),
        "guide_training": {"steps": cfg["guide_steps"], "lr": cfg["guide_lr"], "first_loss": curve[0],
                           "final_loss": curve[-1], "seconds": guide_seconds},
        "log_mean_exp": rows,
        "sampling_seconds": sampling_seconds,
    }


# ---------------------------------------------------------------------------------------------
# Part 2: fitting the mixture three ways


def initial_model(x: Tensor, num_components: int, hidden: int, seed: int) -> GMM:
    """The shared start: zero logits, unit scales, means at ``num_components`` random data points
    (chosen with a generator seeded by ``seed``), encoder from ``torch.manual_seed(seed)``."""
    generator = torch.Generator().manual_seed(seed)
    init = x[torch.randperm(x.shape[0], generator=generator)[:num_components]]
    seed_everything(seed)
    return GMM(num_components, x.shape[1], hidden=hidden, guide="amortised", init_locs=init).to(DTYPE)


def fit(template: GMM, guide: str, x: Tensor, steps: int, lr: float) -> tuple[GMM, dict]:
    """Minimise Pyro's ``TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss`` (per datapoint)
    from the template's parameters, with torch Adam over all parameters.

    With guide "marginal" the model enumerates c and the loss is -Σ_i log p(x_i) exactly; with
    "amortised" the guide's c is enumerated, so the loss is -Σ_i ELBO(x_i) exactly, with
    ELBO = log p(x) - KL(q(c|x) || p(c|x)); with "prior" (q = p(c)) it is -Σ_i E_p(c)[log p(x_i|c)].
    """
    model = GMM(template.num_components, template.x_dim, hidden=template.encoder[0].out_features,
                guide=guide).to(DTYPE)
    model.load_state_dict(copy.deepcopy(template.state_dict()))
    pyro.clear_param_store()
    elbo = TraceEnum_ELBO(max_plate_nesting=1)
    n = x.shape[0]
    # the library loss against the hand formula, at the start (differentiable_loss needs grad mode)
    pyro_start = elbo.differentiable_loss(model.model, model.guide, x=x).item() / n
    hand_start = model.hand_negative_elbo({"x": x}, {}, kl="analytic").mean().item()
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    curve, t0 = [], time.perf_counter()
    for _ in range(steps):
        optimiser.zero_grad()
        loss = elbo.differentiable_loss(model.model, model.guide, x=x) / n
        loss.backward()
        optimiser.step()
        curve.append(loss.item())
    seconds = time.perf_counter() - t0
    final = elbo.differentiable_loss(model.model, model.guide, x=x).item() / n
    return model, {"objective_start": -pyro_start, "objective_final": -final,
                   "pyro_vs_hand_at_start": abs(pyro_start - hand_start), "seconds": seconds,
                   "curve_every_50": curve[::50]}


def match_to_truth(model: GMM, params: GMMParams) -> dict:
    """Fitted components reordered to the true ones by the permutation minimising the mean
    Euclidean distance between matched means; returns the matched mixture and its errors."""
    fitted = mixture_of(model)
    locs, truth = model.locs.detach(), params.means
    c = truth.shape[0]
    best = min(itertools.permutations(range(c)),
               key=lambda perm: (locs[list(perm)] - truth).norm(dim=-1).mean().item())
    perm = list(best)
    matched = {key: [fitted[key][j] for j in perm] for key in ("weights", "means", "scales")}
    matched["permutation"] = perm
    matched["mean_distance"] = (locs[perm] - truth).norm(dim=-1).mean().item()
    matched["max_abs_weight_error"] = (model.log_weights().exp()[perm] - params.weights).abs().max().item()
    matched["max_abs_scale_error"] = (model.scales[perm] - params.scales).abs().max().item()
    return matched


def describe_collapse(model: GMM, x: Tensor) -> dict:
    """How far each component sits from the global data mean, relative to the data's spread."""
    centre, spread = x.mean(0), x.std(0)
    with torch.no_grad():
        return {
            "global_mean": centre.tolist(),
            "global_std": spread.tolist(),
            "distance_to_global_mean": (model.locs - centre).norm(dim=-1).tolist(),
            "scale_over_global_std": (model.scales / spread).tolist(),
            "max_weight": model.log_weights().exp().max().item(),
        }


def part2_fits(params: GMMParams, x_train: Tensor, x_test: Tensor, cfg: dict, seed: int) -> tuple[dict, dict]:
    """Three fits from one start; held-out (1/n) Σ log p(x) of each, of the truth, and of the
    single diagonal Gaussian fitted by moments (the best the naive objective can do: for fixed π,
    Σ_c π_c Σ_i log N(x_i; μ_c, σ_c²) is maximised by every component at the global mean and std).
    Returns the results and the fitted models by name.
    """
    template = initial_model(x_train, params.weights.shape[0], cfg["hidden"], seed + 7)
    truth = gmm_at(params, "marginal", cfg["hidden"])
    with torch.no_grad():
        result = {
            "init": mixture_of(template),
            "steps": cfg["fit_steps"], "lr": cfg["fit_lr"], "optimiser": "Adam (torch), full batch",
            "true_heldout": truth.exact_log_likelihood({"x": x_test}).mean().item(),
            "true_train": truth.exact_log_likelihood({"x": x_train}).mean().item(),
            "single_gaussian_heldout": bounds.log_normal(x_test, x_train.mean(0), x_train.std(0, unbiased=False))
            .mean().item(),
            "fits": {},
        }
    models = {}
    for name, (guide, label) in FIT_KINDS.items():
        model, info = fit(template, guide, x_train, cfg["fit_steps"], cfg["fit_lr"])
        models[name] = model
        with torch.no_grad():
            info.update({
                "guide": guide, "objective": label,
                "heldout_log_px": model.exact_log_likelihood({"x": x_test}).mean().item(),
                "train_log_px": model.exact_log_likelihood({"x": x_train}).mean().item(),
                "fitted": mixture_of(model),
                "matched": match_to_truth(model, params),
                "collapse": describe_collapse(model, x_train),
            })
        result["fits"][name] = info
    return result, models


# ---------------------------------------------------------------------------------------------
# Output: markdown, figures


def _fmt_vec(v, digits=2) -> str:
    return "(" + ", ".join(f"{a:.{digits}f}" for a in v) + ")"


def _first_k_below(rows: list, name: str, tol: float):
    """Smallest K whose mean gap to log p(x) is below ``tol`` nats (None if none is)."""
    return next((row["K"] for row in rows if row[name]["gap"] < tol), None)


def _notes_part1(p1: dict) -> list[str]:
    rows = p1["log_mean_exp"]
    return [
        f"* Averaging log-likelihoods over prior draws estimates E_p(c)[log p(x|c)], "
        f"{p1['prior_gap_kl']:.2f} nats below log p(x) for every number of draws; averaging the "
        f"likelihoods before the log closes the gap, but the prior needs K = "
        f"{_first_k_below(rows, 'prior', 0.1)} for a gap under 0.1 nats and K = "
        f"{_first_k_below(rows, 'prior', 0.01)} for 0.01; the trained guide is within 0.01 nats at K = "
        f"{_first_k_below(rows, 'guide', 0.01)}.",
        "* The guide's K = 1 row estimates the amortised ELBO above, whose tiny gap is carried by rare "
        "draws (c where q(c|x) ~ 1e-5 but p(c|x) is far smaller); a run that sees few of them "
        "understates the gap, and the SE, computed from the draws seen, understates the error.",
    ]


def markdown(results: dict) -> str:
    p1, p2 = results["part1"], results["part2"]
    lines = [
        "# Why not maximise E_p(c)[log p(x|c)]? The Jensen gap on a known GMM",
        "",
        f"Command: `{results['command']}`  ",
        f"seed {results['seed']}, torch {results['torch']}, pyro {results['pyro']}, device {results['device']}, "
        f"wall time {results['wall_seconds']:.1f} s",
        "",
        f"## (1) Bounds at the true parameters (per datapoint, n = {p1['n']})",
        "",
        "| quantity | value | gap to log p(x) |",
        "|---|---:|---:|",
        f"| exact log p(x) | {p1['exact_log_px']:.4f} | 0 |",
        f"| E_p(c)[log p(x\\|c)] (prior as guide, exact sum) | {p1['prior_elbo']:.4f} | "
        f"{p1['prior_gap_kl']:.4f} = KL(p(c)‖p(c\\|x)) |",
        f"| amortised ELBO (q(c\\|x) trained, mixture fixed) | {p1['amortised_elbo']:.4f} | "
        f"{p1['amortised_gap_kl']:.4f} = KL(q‖p(c\\|x)) |",
        f"| ELBO with q = p(c\\|x) | {p1['posterior_guide_elbo']:.4f} | "
        f"{p1['exact_log_px'] - p1['posterior_guide_elbo']:.2e} |",
        "",
        "Log-mean-exp over K samples, mean over datapoints and repeats ± Monte Carlo SE (given the data):",
        "",
        "| K | repeats | prior: log (1/K) Σ p(x\\|c_k) | gap | guide (IWAE): log (1/K) Σ p(x,c_k)/q(c_k\\|x) | gap |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in p1["log_mean_exp"]:
        pr, gu = row["prior"], row["guide"]
        lines.append(f"| {row['K']} | {row['repeats']} | {pr['mean']:.4f} ± {pr['se']:.4f} | {pr['gap']:.4f} | "
                     f"{gu['mean']:.6f} ± {gu['se']:.1e} | {gu['gap']:.1e} |")
    lines += ["", *_notes_part1(p1), "", f"## (2) Fitting the mixture from one start ({p2['steps']} Adam steps, lr {p2['lr']}, full batch)",
        "",
        "Held-out exact log p(x) per datapoint; components matched to the truth by the permutation "
        "minimising the mean distance between means (listed in the truth's order).",
        "",
        "| fit | objective | held-out log p(x) | train log p(x) | weights | means | scales | mean ‖Δμ‖ |",
        "|---|---|---:|---:|---|---|---|---:|",
    ]
    truth = results["truth"]
    lines.append(f"| truth | – | {p2['true_heldout']:.4f} | {p2['true_train']:.4f} | {_fmt_vec(truth['weights'])} | "
                 + ", ".join(_fmt_vec(m, 1) for m in truth["means"]) + " | "
                 + ", ".join(_fmt_vec(s) for s in truth["scales"]) + " | 0 |")
    for name, info in p2["fits"].items():
        m = info["matched"]
        lines.append(f"| {name} | {info['objective'].replace('|', chr(92) + '|')} | {info['heldout_log_px']:.4f} | {info['train_log_px']:.4f} | "
                     f"{_fmt_vec(m['weights'])} | " + ", ".join(_fmt_vec(v, 1) for v in m["means"]) + " | "
                     + ", ".join(_fmt_vec(s) for s in m["scales"]) + f" | {m['mean_distance']:.2f} |")
    lines.append(f"| single Gaussian (moments) | – | {p2['single_gaussian_heldout']:.4f} | | | | | |")
    naive = p2["fits"]["naive"]["collapse"]
    lines += [
        "",
        "Naive fit, against the data's global mean " + _fmt_vec(naive["global_mean"]) + " and std "
        + _fmt_vec(naive["global_std"]) + ": distance of each component's mean to the global mean "
        + _fmt_vec(naive["distance_to_global_mean"]) + "; scales / global std "
        + ", ".join(_fmt_vec(s) for s in naive["scale_over_global_std"])
        + f"; largest weight {naive['max_weight']:.3f}.",
        "",
    ]
    return "\n".join(lines)


def plot_bias_vs_k(p1: dict, path: Path) -> None:
    ks = [row["K"] for row in p1["log_mean_exp"]]
    fig, (ax, ax_gap) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, label, colour in (("prior", "log-mean-exp, c ~ p(c)", "tab:red"),
                                ("guide", "IWAE, c ~ q(c|x)", "tab:blue")):
        mean = [row[name]["mean"] for row in p1["log_mean_exp"]]
        se = [row[name]["se"] for row in p1["log_mean_exp"]]
        ax.errorbar(ks, mean, yerr=se, marker="o", ms=4, capsize=3, color=colour, label=label)
        gap = [(k, row[name]["gap"], row[name]["se"]) for k, row in zip(ks, p1["log_mean_exp"]) if row[name]["gap"] > 0]
        if gap:
            gk, gv, gs = zip(*gap)
            ax_gap.errorbar(gk, gv, yerr=gs, marker="o", ms=4, capsize=3, color=colour, label=label)
    ax.axhline(p1["exact_log_px"], color="k", label="exact log p(x)")
    ax.axhline(p1["prior_elbo"], color="tab:red", ls="--", label="E_p(c)[log p(x|c)]")
    ax.axhline(p1["amortised_elbo"], color="tab:blue", ls="--", label="amortised ELBO")
    ax.set_xscale("log")
    ax.set_xlabel("K (samples per datapoint)")
    ax.set_ylabel("mean bound per datapoint (nats)")
    ax.set_title("Bounds on log p(x) vs K (±1 SE)")
    ax.legend(fontsize=8)
    ax_gap.axhline(p1["prior_gap_kl"], color="tab:red", ls="--", label="KL(p(c)‖p(c|x)) (K=1 gap)")
    ax_gap.axhline(p1["amortised_gap_kl"], color="tab:blue", ls="--", label="KL(q‖p(c|x)) (K=1 gap)")
    ax_gap.set_xscale("log")
    ax_gap.set_yscale("log")
    ax_gap.set_xlabel("K")
    ax_gap.set_ylabel("log p(x) − bound (nats; positive values only)")
    ax_gap.set_title("Bias vs K")
    ax_gap.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _draw_mixture(ax, weights, means, scales, colour, ls="-", label=None) -> None:
    """1-σ ellipses (axis-aligned: the components are diagonal), line width ∝ weight."""
    for j, (w, m, s) in enumerate(zip(weights, means, scales)):
        ax.add_patch(Ellipse(m, 2 * s[0], 2 * s[1], fill=False, edgecolor=colour, ls=ls,
                             lw=0.8 + 4 * w, label=label if j == 0 else None))
        ax.plot(*m, marker="x", color=colour, ms=6)


def plot_fits(x: Tensor, results: dict, models: dict, path: Path) -> None:
    truth = results["truth"]
    fig, axes = plt.subplots(1, 4, figsize=(20, 5), sharex=True, sharey=True)
    lo, hi = x.min(0).values - 1.5, x.max(0).values + 1.5
    gx, gy = torch.meshgrid(torch.linspace(lo[0], hi[0], 200, dtype=DTYPE),
                            torch.linspace(lo[1], hi[1], 200, dtype=DTYPE), indexing="xy")
    grid = torch.stack([gx, gy], -1).reshape(-1, 2)
    panels = [("truth", None)] + [(name, models[name]) for name in FIT_KINDS]
    for ax, (name, model) in zip(axes, panels):
        ax.scatter(x[:, 0], x[:, 1], s=2, color="0.6", alpha=0.5)
        if model is not None:
            with torch.no_grad():
                dens = model.exact_log_likelihood({"x": grid}).reshape(gx.shape)
            ax.contour(gx, gy, dens, levels=torch.linspace(dens.max() - 8, dens.max(), 6).tolist(),
                       colors="tab:blue", linewidths=0.6, linestyles="solid", alpha=0.6)
            f = results["part2"]["fits"][name]
            _draw_mixture(ax, f["fitted"]["weights"], f["fitted"]["means"], f["fitted"]["scales"], "tab:blue",
                          label="fit (1σ)")
            ax.set_title(f"{name}: {f['objective']}\nheld-out log p(x) = {f['heldout_log_px']:.3f}", fontsize=9)
        else:
            ax.set_title(f"truth\nheld-out log p(x) = {results['part2']['true_heldout']:.3f}", fontsize=9)
        _draw_mixture(ax, truth["weights"], truth["means"], truth["scales"], "k", ls="--", label="truth (1σ)")
        ax.set_xlim(lo[0].item(), hi[0].item())
        ax.set_ylim(lo[1].item(), hi[1].item())
        ax.set_aspect("equal")
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="small run (~15 s) for tests")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    """Run parts (1) and (2), write the JSON, markdown and figures into --out; return the results."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: extra threads only add overhead on a shared CPU
    try:
        return _run(args, argv)
    finally:
        torch.set_num_threads(threads)


def _run(args, argv) -> dict:
    cfg = SETTINGS["quick" if args.quick else "full"]
    start = time.perf_counter()
    seed_everything(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    params = default_gmm_params(DTYPE)
    x_train, _ = sample_gmm(params, cfg["n_train"], seed=args.seed)
    x_test, _ = sample_gmm(params, cfg["n_test"], seed=args.seed + 1_000_003)

    t0 = time.perf_counter()
    part1 = part1_bounds(params, x_train, cfg, args.seed)
    part1["seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    part2, models = part2_fits(params, x_train, x_test, cfg, args.seed)
    part2["seconds"] = time.perf_counter() - t0

    results = {
        "command": "python experiments/jensen_gap.py " + " ".join(argv),
        "seed": args.seed, "quick": args.quick, "settings": cfg,
        "torch": torch.__version__, "pyro": pyro.__version__, "device": "cpu",
        "truth": {"weights": params.weights.tolist(), "means": params.means.tolist(),
                  "scales": params.scales.tolist()},
        "part1": part1, "part2": part2,
    }
    t0 = time.perf_counter()
    plot_bias_vs_k(part1, args.out / "bias_vs_k.png")
    plot_fits(x_train, results, models, args.out / "fits.png")
    results["plot_seconds"] = time.perf_counter() - t0
    results["wall_seconds"] = time.perf_counter() - start

    table = markdown(results)
    (args.out / "jensen_gap.md").write_text(table)
    (args.out / "jensen_gap.json").write_text(json.dumps(results, indent=2))
    print(table)
    return results


if __name__ == "__main__":
    main()
