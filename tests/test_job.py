"""The main job (``ppl-vi run``): profile by device, the training budget, what is scaled down, one bar."""

from __future__ import annotations

import json

import pytest
import torch

from ppl_vi import job, progress
from ppl_vi.cli import main
from ppl_vi.models.configure import build_config
from ppl_vi.training import Trainer

BASE = ["--device", "cpu", "--train-subset", "256", "--val-size", "500", "--hidden", "16", "--z-dim", "4",
        "--batch-size", "64", "--eval-images", "40", "--eval-k", "1,5", "--no-progress"]
TINY = [*BASE, "--epochs", "1"]


def test_run_tiny_main_job(tmp_path, capsys):
    out = tmp_path / "job"
    assert main(["run", "vae", *TINY, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    first = text.splitlines()[0]
    assert first.startswith("main job on cpu (cpu profile): vae 784-16-4 relu, batch 64, trained for 1 epochs;")
    assert "IWAE-k for k = 1, 5 on 40;" in first
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["profile"] == "cpu" and metrics["epochs_done"] == 1
    assert metrics["test_iwae_images"] == 40 and metrics["test_nelbo_images"] == 10_000
    assert set(metrics["test_iwae"]) == {"1", "5"}
    assert metrics["test_iwae"]["5"] <= metrics["test_iwae"]["1"] + 4 * metrics["test_iwae_se"]["1"]
    # the NELBO on IWAE's 40 images and -IWAE_1 estimate one quantity on the same images
    assert abs(metrics["test_nelbo_on_iwae_images"] - metrics["test_iwae"]["1"]) <= 4 * (
        metrics["test_nelbo_on_iwae_images_se"] + metrics["test_iwae_se"]["1"])
    assert "(40 test images, as IWAE below)" in text
    notes = metrics["scaled_down"]
    assert "cpu: 1 epochs (the full protocol: 10)" in notes
    assert "cpu: a 784-16-4 relu VAE (the full protocol: 784-500-500-50 softplus)" in notes
    assert "cpu: IWAE-k for k up to 5 (the full protocol: up to 5000)" in notes
    assert "cpu: IWAE-k on the first 40 of the 10,000 test images (the NELBO on all of them)" in notes
    assert all(f"scaled down: {note}" in text for note in notes)  # said before it started, too
    saved = json.loads((out / "config.json").read_text())
    assert saved["job"]["profile"] == "cpu" and saved["config"]["eval_images"] == 40
    assert (out / "report.html").is_file() and (out / "figures" / "bound_vs_k.png").is_file()
    page = (out / "report.html").read_text()
    assert "Scaled down (cpu profile)" in page and "IWAE-k on the first 40 of the 10,000 test images" in page
    assert metrics["eval_checkpoint"] == "checkpoints/best.pt"


def test_run_refuses_other_models(capsys):
    assert main(["run", "gmm", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("ppl-vi run: error: the main job is defined for vae, not 'gmm'; for other models run "
                   "ppl-vi train gmm --out RUN, then ppl-vi eval RUN")


def test_profile_follows_the_device():
    assert job.choose_profile(torch.device("cpu"), full=False).name == "cpu"
    assert job.choose_profile(torch.device("cpu"), full=True).name == "full"
    assert job.choose_profile(torch.device("cuda"), full=False).name == "full"
    full = build_config("vae", job.PROFILES["full"].config)
    assert (full.eval_images, full.eval_k, full.hidden, full.epochs) == (0, [1, 10, 100, 1000, 5000], [500, 500], 10)
    assert job.scaled_down(job.PROFILES["full"], full, 10_000, None) == []  # the full protocol scales nothing down


def test_decoder_macs():
    config = build_config("vae", job.PROFILES["full"].config)  # 50 -> 500 -> 500 -> 784
    assert job.decoder_macs(config) == 50 * 500 + 500 * 500 + 500 * 784
    assert job.decoder_macs(build_config("vae", {"hidden": [400], "z_dim": 50})) == 50 * 400 + 400 * 784


def test_budget_hook_fits_epochs_and_decays_the_learning_rate():
    trainer = Trainer(build_config("linear-gaussian", overrides={"device": "cpu", "n_train": 100, "n_test": 50,
                                                                 "batch_size": 50, "lr": 1e-3}), progress=False)
    profile = job.Profile("cpu", {}, train_minutes=3.5, lr_final=2e-4)
    bar = progress.RunProgress([progress.Phase("train", 2, 1.0)], enabled=False)
    said = []
    trainer.state.epoch, trainer.state.seconds_before = 1, 10.0  # the first epoch took 10 s
    job.BudgetHook(profile, bar, said.append)(trainer, {"seconds": 9.0})
    assert trainer.state.plan.epochs == 21  # floor(210 s / 10 s)
    gamma = (2e-4 / 1e-3) ** (1 / 20)
    assert trainer.state.plan.lr_decay == pytest.approx(gamma) and trainer.scheduler.gamma == pytest.approx(gamma)
    assert trainer.config.epochs == 40 and trainer.config.lr_decay == 1.0  # the config itself never changes
    assert bar.phases["train"].units == 21 * 2  # two steps per epoch
    assert said == ["21 epochs fit the 3.5-minute training budget here (epoch 1 took 10.0 s); "
                    "learning rate 0.001 -> 0.0002"]
    trainer.optimizer.step()  # (no gradients: nothing moves) so the scheduler may step
    for _ in range(20):  # the schedule ends at lr_final
        trainer.scheduler.step()
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(2e-4)


def test_eta_sums_measured_and_estimated_phases(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: clock[0])
    bar = progress.RunProgress([progress.Phase("train", 10, 2.0), progress.Phase("eval", 1000, 0.01)], enabled=False)
    assert bar.eta() == pytest.approx(10 * 2.0 + 1000 * 0.01)
    bar.begin("train")
    clock[0] += 12.0
    bar.advance("train", 4)  # measured: 3 s per step, not the estimated 2
    assert bar.eta() == pytest.approx(6 * 3.0 + 1000 * 0.01)
    bar.begin("eval")
    assert bar.eta() == pytest.approx(1000 * 0.01)
    bar.close()
    assert bar.eta() == 0 and bar.bar.total == pytest.approx(12.0)
    budgeted = progress.RunProgress([progress.Phase("train", 1, 1.0, budget=210.0)], enabled=False)
    budgeted.begin("train")
    clock[0] += 60.0
    budgeted.advance("train", 500)  # whatever the steps: 150 s of the budget are left
    assert budgeted.eta() == pytest.approx(150.0)
    budgeted.set_units("train", 2000)  # once the epochs are known: 1500 steps left at 0.12 s each
    assert budgeted.eta() == pytest.approx(1500 * 0.12)  # done: the bar's total is the time taken


def test_run_with_a_training_budget(tmp_path, capsys):
    """No --epochs: the first epoch is timed, the epochs that fit the budget are trained, the learning rate
    decays from the profile's 3e-3 to 1e-4 over them, and config.json says what ran."""
    out = tmp_path / "job"
    assert main(["run", "vae", *BASE, "--train-minutes", "0.03", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "epochs fit the 0.03-minute training budget here" in text
    config = json.loads((out / "config.json").read_text())["config"]
    metrics = json.loads((out / "metrics.json").read_text())
    epochs = config["epochs"]
    assert metrics["epochs_done"] == epochs >= 1
    expected = (1e-4 / 3e-3) ** (1 / (epochs - 1)) if epochs > 1 else 1.0
    assert config["lr_decay"] == pytest.approx(expected)
    assert "cpu: trained for the epochs that fit 0.03 minutes (the full protocol: 10 epochs)" in metrics["scaled_down"]


def test_run_refuses_a_bad_budget(capsys):
    assert main(["run", "--device", "cpu", "--train-minutes", "0"]) == 2
    assert capsys.readouterr().err.strip() == "ppl-vi run: error: --train-minutes must be > 0, got 0.0"
