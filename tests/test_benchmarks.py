"""The CPU benchmark scripts run end to end at tiny sizes (the real tables come from full runs)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from ppl_vi.models import REGISTRY

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_quality_tiny(tmp_path, capsys):
    out = tmp_path / "q.json"
    assert _load("cpu_quality").main(["--minutes", "0.01,0.02", "--test-images", "20", "--iwae-k", "5",
                                      "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert {(r["contender"], r["minutes"]) for r in results} == {
        (c, m) for c in ("ppl_vi", "pyro", "torch") for m in (0.01, 0.02)}
    for r in results:
        assert r["steps"] > 0 and r["seconds"] >= 60 * r["minutes"]
        assert r["images_per_s"] == pytest.approx(r["steps_per_s"] * r["batch_size"])
        assert 50 < r["nelbo"] < 800 and math.isfinite(r["iwae5"])
        assert r["iwae5"] <= r["nelbo"] + 4 * r["nelbo_se"] + 4 * r["iwae5_se"]  # -IWAE_5 <= NELBO, up to noise
    text = capsys.readouterr().out
    assert "at 0.02 min: best NELBO" in text and "ppl_vi/pyro: steps/s" in text and "ppl_vi/torch: steps/s" in text


def test_cpu_quality_rejects_bad_options(capsys):
    bench = _load("cpu_quality")
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--contenders", "jax"])
    assert exit_.value.code == 2 and "choose from ppl_vi, pyro, torch" in capsys.readouterr().err


def test_cpu_quality_scorer_is_the_iwae_bound_of_a_known_model():
    """The shared evaluator on q = p(z|x) of a linear-Gaussian model: every weight is p(x), so -IWAE_K = -log p(x)."""
    import torch

    bench = _load("cpu_quality")
    torch.manual_seed(0)
    # z ~ N(0, 1), x | z ~ N(z, 1) (one pixel): p(x) = N(x; 0, 2), p(z|x) = N(x/2, 1/2)
    x = torch.randn(30, 1, dtype=torch.float64)

    def encode(xb):
        return xb / 2, torch.full_like(xb, math.sqrt(0.5))

    def log_px(xb, z):
        return (-0.5 * (xb - z) ** 2 - 0.5 * math.log(2 * math.pi)).sum(-1)

    scores = bench.score(encode, log_px, x, k=7, seed=0, batch=10, rows=20)
    log_p = (-0.5 * x ** 2 / 2 - 0.5 * math.log(2 * math.pi * 2)).squeeze(-1)
    assert scores["iwae7"] == pytest.approx(-log_p.mean().item(), rel=1e-10)
    assert scores["nelbo"] >= scores["iwae7"] - 4 * scores["nelbo_se"]


def test_iwae_eval_speed_quick(tmp_path):
    out = tmp_path / "s.json"
    assert _load("iwae_eval_speed").main(["--quick", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    # 20 images, ks up to 50: 20 x 51 decoder passes of 2(50*500 + 500*500 + 500*784) FLOPs, and three encoder
    # passes per image of 2(784*500 + 500*500 + 2*500*50) FLOPs
    assert r["flops"] == 20 * 51 * 2 * (50 * 500 + 500 * 500 + 500 * 784) + 3 * 20 * 2 * (784 * 500 + 500 * 500 + 500 * 100)
    assert r["flop_bound_s"] == pytest.approx(r["flops"] / (r["gemm_gflops"] * 1e9))
    assert r["ppl_vi"]["path"] == "encoder once per batch" and set(r["ppl_vi"]["iwae"]) == {"1", "10", "50"}
    assert set(r["per_k_previous"]["iwae"]) == {"1", "10", "50"}


def test_check_calibration_quick(tmp_path):
    """The calibration script resamples a right estimator (no false alarm in 20 at 5 seeds on the
    linear-Gaussian model) and sees a gradient 50 % too long every time."""
    out = tmp_path / "c.json"
    before = {name: dict(spec.defaults) for name, spec in REGISTRY.items()}
    assert _load("check_calibration").main(["--quick", "--json", str(out)]) == 0
    assert {name: dict(spec.defaults) for name, spec in REGISTRY.items()} == before  # the registry left as found
    results = json.loads(out.read_text())["results"]
    right, biased = (next(r for r in results if r["bias"] == b) for b in (0.0, 0.5))
    assert right["resamples"] == 20 and right["failed"] == 0 and right["upper95"] == pytest.approx(1 - 0.05 ** (1 / 20))
    assert biased["failed"] == 20 and "along r" in biased["tests"]


def test_ssl_quality_quick(tmp_path, capsys):
    """Both contenders run side by side (two processes), on the CPU-time clock, and give a row per budget."""
    out = tmp_path / "ssl.json"
    assert _load("ssl_quality").main(["--quick", "--out", str(tmp_path), "--json", str(out)]) == 0
    saved = json.loads(out.read_text())
    rows = saved["rows"]
    assert saved["clock"].startswith("cpu")
    assert {(r["contender"], r["minutes"]) for r in rows} == {(c, m) for c in ("ppl_vi", "torch") for m in (0.05, 0.1)}
    for r in rows:
        assert r["steps"] > 0 and r["cpu_seconds"] >= 60 * r["minutes"]
        assert r["steps_per_s"] == pytest.approx(r["steps"] / r["cpu_seconds"])
        assert r["selected_val_accuracy"] >= r["last_val_accuracy"]  # selected on the validation split
        assert 0.3 < r["last_test_accuracy"] <= 1.0  # 100 labels weighted by α = 100: far above chance (0.1) at once
    assert (tmp_path / "ssl_quality.png").stat().st_size > 0
    text = capsys.readouterr().out
    assert "at 0.1 CPU-min (mean over 1 draw(s), selected on validation): ppl_vi" in text


def test_ssl_quality_selects_on_validation_only():
    """A budget's 'selected' row is the evaluation with the best validation accuracy up to that budget,
    whatever the test accuracies; evaluations after the budget are not seen."""
    bench = _load("ssl_quality")
    evaluations = [
        {"steps": 10, "cpu_seconds": 1.0, "budget": None, "val_accuracy": 0.5, "test_accuracy": 0.9},
        {"steps": 20, "cpu_seconds": 2.0, "budget": None, "val_accuracy": 0.7, "test_accuracy": 0.6},
        {"steps": 25, "cpu_seconds": 3.02, "budget": 3.0, "val_accuracy": 0.6, "test_accuracy": 0.8},
        {"steps": 30, "cpu_seconds": 3.5, "budget": None, "val_accuracy": 0.9, "test_accuracy": 0.95},
        {"steps": 40, "cpu_seconds": 6.0, "budget": 6.0, "val_accuracy": 0.8, "test_accuracy": 0.85},
    ]
    rows = bench.budget_rows({"contender": "torch", "draw": 0, "evaluations": evaluations}, [3.0, 6.0])
    assert [(r["selected_test_accuracy"], r["selected_steps"], r["last_test_accuracy"]) for r in rows] == [
        (0.6, 20, 0.8), (0.95, 30, 0.85)]
    assert rows[0]["steps_per_s"] == pytest.approx(25 / 3.02)  # the clock ran just past the budget


def test_ssl_quality_rejects_bad_options(capsys):
    with pytest.raises(SystemExit) as exit_:
        _load("ssl_quality").main(["--minutes", "0,5"])
    assert exit_.value.code == 2 and "--minutes must be positive" in capsys.readouterr().err
