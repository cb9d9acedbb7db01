"""experiments/jensen_gap.py --quick: the bounds are ordered as the math says, the naive fit loses.

One quick run (~15 s) is shared by every test in this module.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "jensen_gap.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("jensen_gap_experiment", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("jensen_gap")
    results = _load_script().main(["--out", str(out), "--quick", "--seed", "0"])
    return out, results


def test_files_written(run):
    out, results = run
    for name in ("jensen_gap.json", "jensen_gap.md", "bias_vs_k.png", "fits.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    saved = json.loads((out / "jensen_gap.json").read_text())
    assert saved["seed"] == 0 and saved["device"] == "cpu" and saved["quick"] is True
    assert saved["torch"] and saved["pyro"] and saved["wall_seconds"] > 0
    assert saved["part1"]["exact_log_px"] == pytest.approx(results["part1"]["exact_log_px"])
    md = (out / "jensen_gap.md").read_text()
    assert "--quick" in md and "| K |" in md and "naive" in md


def test_exact_quantities_agree(run):
    """The experiment's exact log p(x), prior ELBO and KL gap against the same quantities recomputed here
    by hand from the synthetic truth and the script's own data (seed 0, quick settings), and the
    identity log p(x) = E_p(c)[log p(x|c)] + KL(p(c) || p(c|x)) checked per datapoint on the hand values.
    Catches an experiment whose "exact" log p(x) or ELBO is wrong (e.g. a weight dropped, a missing
    log π, the KL taken the other way), which its own error fields, computed from those very values,
    cannot."""
    import torch

    from ppl_vi.data.synthetic import default_gmm_params, sample_gmm

    _, results = run
    p1 = results["part1"]
    truth = default_gmm_params(torch.float64)
    x, _ = sample_gmm(truth, _load_script().SETTINGS["quick"]["n_train"], seed=0)
    log_pi = truth.weights.log()  # (C,)
    log_lik = (-0.5 * ((x[:, None, :] - truth.means) / truth.scales) ** 2 - truth.scales.log()
               - 0.5 * math.log(2 * math.pi)).sum(-1)  # log N(x_n; μ_c, σ_c²): (N, C)
    log_px = torch.logsumexp(log_pi + log_lik, -1)  # (N,)
    prior_elbo = (log_pi.exp() * log_lik).sum(-1)  # Σ_c π_c log p(x|c)
    posterior = log_pi + log_lik - log_px[:, None]  # log p(c|x)
    kl = (log_pi.exp() * (log_pi - posterior)).sum(-1)  # KL(p(c) || p(c|x))
    assert (log_px - prior_elbo - kl).abs().max().item() < 1e-10
    assert p1["exact_log_px"] == pytest.approx(log_px.mean().item(), abs=1e-10)
    assert p1["prior_elbo"] == pytest.approx(prior_elbo.mean().item(), abs=1e-10)
    assert p1["prior_gap_kl"] == pytest.approx(kl.mean().item(), abs=1e-10)
    assert p1["posterior_guide_elbo"] == pytest.approx(p1["exact_log_px"], abs=1e-10)
    # Pyro's TraceEnum_ELBO loss equals the hand formula at the shared start, for each guide
    for info in results["part2"]["fits"].values():
        assert info["pyro_vs_hand_at_start"] < 1e-8


def test_bounds_below_exact(run):
    _, results = run
    p1 = results["part1"]
    exact = p1["exact_log_px"]
    assert p1["prior_elbo"] < p1["amortised_elbo"] <= exact + 1e-12
    assert p1["prior_gap_kl"] > 1.0  # well-separated clusters: the prior is a poor guide
    for row in p1["log_mean_exp"]:
        for name in ("prior", "guide"):
            assert row[name]["se"] > 0 and math.isfinite(row[name]["mean"])
            assert row[name]["mean"] <= exact + 4 * row[name]["se"] + 1e-12, (row["K"], name)


def test_bias_shrinks_with_k(run):
    _, results = run
    p1 = results["part1"]
    rows = p1["log_mean_exp"]
    first, last = rows[0], rows[-1]
    assert first["K"] == 1 and last["K"] > 1
    # K = 1 with prior draws is an unbiased estimate of E_p(c)[log p(x|c)]
    assert abs(first["prior"]["mean"] - p1["prior_elbo"]) < 5 * first["prior"]["se"]
    se = math.hypot(first["prior"]["se"], last["prior"]["se"])
    assert last["prior"]["mean"] > first["prior"]["mean"] + 4 * se
    assert last["prior"]["gap"] < 0.05 * first["prior"]["gap"]
    for a, b in zip(rows, rows[1:]):  # E[L_K] is non-decreasing in K
        assert b["prior"]["mean"] >= a["prior"]["mean"] - 4 * math.hypot(a["prior"]["se"], b["prior"]["se"])
    # the trained guide is far better than the prior at every K tried
    for row in rows:
        assert row["guide"]["gap"] < row["prior"]["gap"]


def test_naive_fit_loses(run):
    _, results = run
    p2 = results["part2"]
    exact, naive = p2["fits"]["exact"], p2["fits"]["naive"]
    assert exact["heldout_log_px"] >= naive["heldout_log_px"] + 0.1
    assert exact["heldout_log_px"] >= p2["true_heldout"] - 0.05
    assert exact["matched"]["mean_distance"] < 0.3
    # the naive optimum is a single Gaussian in disguise
    assert abs(naive["heldout_log_px"] - p2["single_gaussian_heldout"]) < 0.05
