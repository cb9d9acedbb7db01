"""End to end through the CLI: ``ppl-vi train`` -> ``ppl-vi eval`` on MNIST, on the CPU, small.

Every run here is tiny (``--train-subset``: the first few hundred training images after the
validation split, a 64-unit network, Z = 4), so the whole file takes well under a minute; what
is tested is the pipeline (run directory, metrics, figures, β schedule, losses, exit codes), not
the quality of the fits. ``ppl-vi check`` runs on a small network by default; the full-size
784-500-500-50 checks are ``@pytest.mark.slow`` (``pytest -m slow``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ppl_vi.cli import main
from ppl_vi.config import FIELDS

#: Small-run flags shared by every training here: 512 training images, 1000 validation images.
SMALL = ["--device", "cpu", "--no-progress", "--hidden", "64", "--z-dim", "4", "--train-subset", "512",
         "--val-size", "1000", "--batch-size", "64", "--seed", "0"]
FIGURES = ("samples.png", "reconstructions.png", "training_curves.png", "bound_vs_k.png")


def _history(run: Path) -> list:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines() if line.strip()]


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    """One trained-and-evaluated VAE run directory (shared by the tests that read it)."""
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("runs") / "vae"
    assert main(["train", "vae", "--epochs", "1", "--out", str(run), "--max-minutes", "0.05", *SMALL]) == 0
    assert main(["eval", str(run), "--k", "1,10", "--no-progress"]) == 0
    return run


# ---- train -> eval ------------------------------------------------------------------------------


def test_eval_metrics(vae_run):
    m = _metrics(vae_run)
    for key in ("test_nelbo", "test_kl", "test_rec", "test_nelbo_se", "test_iwae", "test_iwae_se",
                "train_seconds", "eval_seconds", "epochs_done"):
        assert key in m, key
    assert set(m["test_iwae"]) == {"1", "10"} and set(m["test_iwae_se"]) == {"1", "10"}
    assert m["epochs_done"] == 1
    # NELBO = distortion + rate, per datapoint (float32 terms, averaged in float64)
    assert m["test_nelbo"] == pytest.approx(m["test_rec"] + m["test_kl"], rel=1e-6)
    assert m["test_kl"] >= 0 and m["test_rec"] > 0
    # more particles give a tighter bound: -IWAE_10 <= -IWAE_1 up to noise
    se = max(m["test_iwae_se"]["1"], m["test_iwae_se"]["10"])
    assert m["test_iwae"]["10"] <= m["test_iwae"]["1"] + 4 * se
    # -IWAE_1 and the NELBO estimate the same quantity
    assert abs(m["test_iwae"]["1"] - m["test_nelbo"]) <= 4 * (m["test_iwae_se"]["1"] + m["test_nelbo_se"])
    for value in (m["test_nelbo"], *m["test_iwae"].values()):
        assert 50 < value < 600  # nats per binarised MNIST image: finite and plausible


def test_figures_and_files(vae_run):
    for name in FIGURES:
        path = vae_run / "figures" / name
        assert path.is_file() and path.stat().st_size > 1000, name
    assert (vae_run / "checkpoints" / "last.pt").is_file()
    assert (vae_run / "checkpoints" / "best.pt").is_file()
    history = _history(vae_run)
    assert len(history) == 1 and "val_loss" in history[0] and history[0]["step"] == 512 // 64


def test_config_json_holds_resolved_config(vae_run):
    saved = json.loads((vae_run / "config.json").read_text())
    config, env = saved["config"], saved["environment"]
    assert set(config) == set(FIELDS)  # every field, resolved: defaults, model defaults and flags
    assert config["model"] == "vae" and config["loss"] == "trace"
    assert config["hidden"] == [64] and config["z_dim"] == 4 and config["train_subset"] == 512
    assert config["val_size"] == 1000 and config["batch_size"] == 64 and config["epochs"] == 1
    assert config["beta"] == 1.0 and config["lr"] == 1e-3  # defaults filled in
    assert env["device"] == "cpu" and env["torch"] and env["pyro"]


def test_rerun_from_saved_config(vae_run, tmp_path):
    """``train --config RUN/config.json`` reproduces the run's config."""
    again = tmp_path / "again"
    assert main(["train", "--config", str(vae_run / "config.json"), "--out", str(again), "--no-progress"]) == 0
    a = json.loads((vae_run / "config.json").read_text())["config"]
    b = json.loads((again / "config.json").read_text())["config"]
    assert a == b
    # same seed, same data order, same CPU: the same first-epoch loss
    assert _history(again)[0]["train_loss"] == pytest.approx(_history(vae_run)[0]["train_loss"], rel=1e-4)


# ---- the VAE family's training options ----------------------------------------------------------


def test_beta_vae_trains(tmp_path):
    run = tmp_path / "beta4"
    assert main(["train", "vae", "--beta", "4", "--epochs", "1", "--out", str(run), *SMALL]) == 0
    history = _history(run)
    assert history[0]["beta"] == 4.0
    assert json.loads((run / "config.json").read_text())["config"]["beta"] == 4.0
    assert _metrics(run)["final_train_loss"] == pytest.approx(history[0]["train_loss"])


def test_kl_annealing_ramps_beta(tmp_path):
    """β ramps linearly 0 -> 1 over 10 steps; 8 steps per epoch, so epoch-end β is 0.7, 1, 1."""
    run = tmp_path / "anneal"
    assert main(["train", "vae", "--kl-anneal", "10", "--epochs", "3", "--out", str(run), *SMALL]) == 0
    betas = [h["beta"] for h in _history(run)]
    assert len(betas) == 3
    assert betas == sorted(betas) and betas[0] < 1.0 and betas[-1] == 1.0
    assert betas[0] == pytest.approx(0.7)  # the last step of epoch 1 is step 7: β = 7/10


def test_iwae_loss_trains(tmp_path):
    run = tmp_path / "iwae5"
    assert main(["train", "vae", "--loss", "iwae", "--k", "5", "--epochs", "1", "--out", str(run), *SMALL]) == 0
    m = _metrics(run)
    assert m["epochs_done"] == 1 and torch.isfinite(torch.tensor(m["final_train_loss"]))
    config = json.loads((run / "config.json").read_text())["config"]
    assert config["loss"] == "iwae" and config["k"] == 5


def test_gmvae_trains_one_epoch(tmp_path):
    run = tmp_path / "gmvae"
    assert main(["train", "gmvae", "--components", "10", "--epochs", "1", "--out", str(run), *SMALL]) == 0
    m = _metrics(run)
    assert m["epochs_done"] == 1 and 50 < m["final_val_loss"] < 600
    config = json.loads((run / "config.json").read_text())["config"]
    assert config["model"] == "gmvae" and config["components"] == 10 and config["z_dim"] == 4
    assert (run / "figures" / "samples.png").is_file()


# ---- ppl-vi check -------------------------------------------------------------------------------


@pytest.fixture
def small_defaults(monkeypatch):
    """Make ``ppl-vi check`` build small networks (it uses the model's registry defaults)."""
    from ppl_vi.models import REGISTRY

    for spec in REGISTRY.values():
        monkeypatch.setitem(spec.defaults, "hidden", [8])
        monkeypatch.setitem(spec.defaults, "z_dim", 2)
        monkeypatch.setitem(spec.defaults, "components", 3)


def _registered():
    from ppl_vi.models import REGISTRY

    return sorted(REGISTRY)


@pytest.mark.parametrize("model", _registered())
def test_check_small_exits_0_with_gradient_rows(model, small_defaults, capsys):
    """`ppl-vi check MODEL` passes for every registered model and prints expected-gradient rows."""
    assert main(["check", model, "--batch-size", "4", "--repeats", "10", "--gradient-seeds", "10"]) == 0
    out = capsys.readouterr().out
    assert "verdict: PASS" in out and "not run" not in out
    assert out.count("expected gradient") >= 2 and "|z| <=" in out


@pytest.mark.parametrize("flag, message", [("--repeats", "--repeats must be >= 2"),
                                           ("--gradient-seeds", "--gradient-seeds must be >= 2")])
def test_check_refuses_too_few_seeds(flag, message, capsys):
    assert main(["check", "gmm", flag, "0"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.slow
@pytest.mark.parametrize("model", ["vae", "gmvae"])
def test_check_full_size_exits_0(model, capsys):
    """The full 784-500-500-Z networks in float64 (about a minute each on a loaded CPU)."""
    assert main(["check", model, "--batch-size", "8", "--repeats", "10"]) == 0
    assert "verdict: PASS" in capsys.readouterr().out


# ---- bad input: one line on stderr, exit status 2, no run directory left behind -----------------


@pytest.mark.parametrize("argv, message", [
    (["train", "no-such-model"], "unknown model"),
    (["train", "vae", "--k", "0"], "k must be >= 1, got 0"),
    (["train", "vae", "--beta", "-1"], "beta must be >= 0"),
    (["train", "vae", "--train-subset", "-1"], "train_subset must be >= 0"),
    (["train", "vae", "--loss", "nope"], "unknown loss"),
])
def test_bad_train_input_exits_2(argv, message, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*argv, "--out", str(out), "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_eval_of_non_run_dir_exits_2(tmp_path, capsys):
    assert main(["eval", str(tmp_path), "--k", "1,10", "--no-progress"]) == 2
    assert main(["eval", str(tmp_path / "missing"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 2


def test_eval_bad_k_exits_2(vae_run, capsys):
    assert main(["eval", str(vae_run), "--k", "0", "--no-progress"]) == 2
    assert main(["eval", str(vae_run), "--k", "one", "--no-progress"]) == 2
    assert "Traceback" not in capsys.readouterr().err
