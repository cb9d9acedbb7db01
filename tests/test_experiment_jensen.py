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
    _, results = run
    p1 = results["part1"]
    assert p1["exact_log_px_check_vs_GMMParams"] < 1e-10
    # log p(x) = ELBO + KL(q || p(c|x)), per datapoint, for the prior and the trained guide
    assert p1["identity_error_prior"] < 1e-9 and p1["identity_error_amortised"] < 1e-9
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
