"""A newcomer's friction list: --help, a default run directory, resume, eval's checkpoint,
--epochs 0, and what the report shows. Tiny synthetic runs (gmm / linear-gaussian), a few seconds each."""

from __future__ import annotations

import dataclasses
import datetime
import json
import re
import shutil
from pathlib import Path

import matplotlib.image as mpimg
import pytest
import torch

from ppl_vi import fields, plots
from ppl_vi import run as rundir
from ppl_vi.cli import build_parser, main
from ppl_vi.config import TrainConfig
from ppl_vi.models.configure import build_config
from ppl_vi.models import REGISTRY
from ppl_vi.training import Trainer
from ppl_vi.training.workflow import resume_message

GMM = ["gmm", "--device", "cpu", "--n-train", "200", "--n-test", "100", "--batch-size", "100", "--no-progress"]
LG = ["linear-gaussian", "--device", "cpu", "--n-train", "100", "--n-test", "50", "--batch-size", "50",
      "--no-progress"]


def _metrics(run: Path) -> dict:
    return json.loads((run / rundir.METRICS).read_text())


# ---- --help ---------------------------------------------------------------------------------------


def _train_parser():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices["train"]


def test_every_config_field_has_its_help_line():
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    assert set(fields.help_texts()) == set(names) and all(fields.help_texts().values())  # declared with the field
    by_dest = {a.dest: a for a in _train_parser()._actions}
    for name in names:
        if name == "model":
            continue
        action = by_dest[name]
        assert action.help and "default:" in action.help, name
        assert fields.help_texts()[name] in action.help, name  # the field's help is --help's: one source


def test_help_shows_defaults_choices_and_scope(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--epochs EPOCHS passes over the training set (default: 10;" in out
    assert f"gmm: {REGISTRY['gmm'].defaults['epochs']}" in out  # each model's own default, from the registry
    assert "--loss {trace,meanfield,enum,stl,renyi,iwae,vimco,dreg}" in out
    assert "--nan-policy {stop,skip}" in out
    assert re.search(r"--labels LABELS .*\[applies to: ssvae, m1m2\]", out)
    assert "--hidden N,N,..." in out and "default: 500,500" in out
    assert "default: runs/MODEL-YYYYmmdd-HHMMSS" in out.replace("- ", "-")  # argparse breaks lines at hyphens


def test_field_scope():
    assert fields.applies("components", "gmvae", "mnist") and not fields.applies("components", "vae", "mnist")
    assert fields.applies("val_size", "cvae", "mnist-labelled") and not fields.applies("val_size", "gmm", "gmm")
    assert fields.applies("labels", "ssvae", "mnist-semisupervised") and not fields.applies("labels", "vae", "mnist")
    assert fields.applies("m1", "m1m2", "mnist-semisupervised") and not fields.applies("m1", "ssvae", "mnist-semisupervised")
    assert not fields.applies("z_dim", "gmm", "gmm") and fields.applies("z_dim", "linear-gaussian", "linear-gaussian")
    assert fields.applies("lr", "gmm", "gmm")  # not scoped: every model


# ---- train without --out, --epochs 0 ----------------------------------------------------------------


def test_train_without_out_makes_a_default_run_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", *GMM, "--epochs", "1"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    found = re.fullmatch(r"run directory: (runs/gmm-\d{8}-\d{6}) \(no --out given\)", first)
    assert found, first
    run = tmp_path / found.group(1)
    assert (run / rundir.METRICS).is_file() and (run / rundir.CHECKPOINTS / "last.pt").is_file()


def test_default_run_dir_never_reuses_a_directory(tmp_path):
    now = datetime.datetime(2026, 1, 2, 3, 4, 5)
    first = rundir.default_run_dir("vae", tmp_path, now)
    assert first == tmp_path / "vae-20260102-030405"
    first.mkdir()
    assert rundir.default_run_dir("vae", tmp_path, now) == tmp_path / "vae-20260102-030405-2"


def test_epochs_0_is_refused(tmp_path, capsys):
    assert main(["train", *GMM, "--epochs", "0", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "ppl-vi train: error: epochs must be >= 1 (passes over the training set), got 0"
    assert not (tmp_path / "run").exists()


# ---- resume -----------------------------------------------------------------------------------------


def test_resume_says_where_it_continues_and_keeps_cumulative_time(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *LG, "--epochs", "3", "--out", str(run)]) == 0
    before = _metrics(run)["train_seconds"]
    saved = torch.load(run / rundir.CHECKPOINTS / "last.pt", weights_only=True)["train_seconds"]
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--epochs", "4", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"resuming from {run / rundir.CHECKPOINTS / 'last.pt'} (epoch 3 of 4 done, step 6," in out
    assert "continuing with epoch 4" in out
    seconds = [r["seconds"] for r in rundir.read_history(run)]
    assert len(seconds) == 4 and seconds == sorted(seconds)  # one clock: epoch 4 is later than epoch 3
    assert seconds[3] > saved and _metrics(run)["train_seconds"] > before >= saved


def test_resume_message_mid_epoch_and_when_done():
    trainer = Trainer(build_config("linear-gaussian", overrides={"device": "cpu", "n_train": 100, "n_test": 50,
                                                                 "batch_size": 10, "epochs": 4}), progress=False)
    state = trainer.state
    state.epoch, state.step, state.step_in_epoch, state.seconds_before = 2, 25, 5, 90.0
    message = resume_message(trainer, Path("R/checkpoints/last.pt"))
    assert message == ("resuming from R/checkpoints/last.pt (epoch 2 of 4 done, step 25, 1.5 min trained): "
                       "continuing epoch 3 at step 6 of 10 (the 5 steps before it are not redone)")
    state.epoch, state.step_in_epoch = 4, 0
    assert "nothing left to train; pass --epochs N (> 4)" in resume_message(trainer, Path("x"))


# ---- eval names its checkpoint ------------------------------------------------------------------------


def test_eval_names_the_checkpoint_and_keeps_trainings_values(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *GMM, "--epochs", "1", "--out", str(run)]) == 0
    early = tmp_path / "epoch1.pt"
    shutil.copy(run / rundir.CHECKPOINTS / "last.pt", early)
    assert main(["train", "--resume", str(run), "--epochs", "4", "--no-progress"]) == 0
    shutil.copy(early, run / rundir.CHECKPOINTS / "best.pt")  # best.pt is now epoch 1, last.pt epoch 4
    trained = _metrics(run)
    capsys.readouterr()

    assert main(["eval", str(run), "--k", "1,10", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "scoring checkpoints/best.pt (epoch 1, step 2) on 100 test points, IWAE k = 1, 10"
    m = _metrics(run)
    assert (m["eval_checkpoint"], m["eval_checkpoint_epoch"], m["eval_checkpoint_step"]) == ("checkpoints/best.pt", 1, 2)
    # the epoch-1 model's exact log-likelihood replaced training's end-of-run value, which is kept, and said
    assert m["test_log_likelihood"] != trained["test_log_likelihood"]
    assert m["at_end_of_training"]["test_log_likelihood"] == trained["test_log_likelihood"]
    assert "epoch 4, step 8" in m["at_end_of_training"]["weights"]
    assert "kept in metrics.json under at_end_of_training" in out
    assert m["eval_figures"] == ["figures/bound_vs_k.png"] and "figures: figures/bound_vs_k.png" in out

    assert main(["eval", str(run), "--checkpoint", "last", "--k", "1", "--no-progress"]) == 0
    m = _metrics(run)
    assert (m["eval_checkpoint"], m["eval_checkpoint_epoch"]) == ("checkpoints/last.pt", 4)
    assert m["test_log_likelihood"] == pytest.approx(trained["test_log_likelihood"], rel=1e-12)  # same weights

    # training on makes that evaluation stale: its keys and figure go, and the user is told
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--epochs", "5", "--no-progress"]) == 0
    assert "dropped the earlier evaluation of checkpoints/last.pt (epoch 4)" in capsys.readouterr().out
    m = _metrics(run)
    assert not {"test_iwae", "test_nelbo", "eval_checkpoint", "at_end_of_training"} & set(m)
    assert m["epochs_done"] == 5 and not (run / "figures" / "bound_vs_k.png").exists()


# ---- the report ---------------------------------------------------------------------------------------


def test_report_shows_applicable_fields_and_the_whole_history(tmp_path):
    run = tmp_path / "run"
    assert main(["train", *GMM, "--epochs", "45", "--out", str(run)]) == 0
    page = (run / "report.html").read_text()
    config_table = page[page.index("<h2>Configuration</h2>"):]
    assert "<th>components</th>" in config_table and "<th>n_train</th>" in config_table
    for name in ("labels", "val_size", "z_dim"):  # not read by gmm
        assert f"<th>{name}</th>" not in config_table, name
    assert re.search(r"does not read \(still in config.json\): <code>[^<]*labels", config_table)
    history = page[page.index("<h2>History (45 epochs)</h2>"):page.index("<h2>Consistency check")]
    assert history.count("<tr>") == 1 + 45  # header and every epoch


def test_one_epoch_curve_is_visible():
    fig = plots.curves_figure([{"epoch": 1, "step": 8, "train_loss": 210.0, "val_loss": 200.0}])
    lines = fig.axes[0].get_lines()
    assert len(lines) == 2 and all(line.get_marker() not in (None, "None", "") for line in lines)


@pytest.fixture(scope="module")
def small_vae_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("ux") / "vae"
    assert main(["train", "vae", "--epochs", "1", "--device", "cpu", "--no-progress", "--hidden", "32", "--z-dim", "4",
                 "--train-subset", "256", "--val-size", "500", "--batch-size", "64", "--out", str(run)]) == 0
    return run


def test_reconstruction_grid_has_rows_of_originals_over_reconstructions(small_vae_run):
    image = mpimg.imread(small_vae_run / "figures" / "reconstructions.png")
    height, width = image.shape[:2]
    assert height / width > 0.6  # 8 rows of 10 images: a grid, not a 2-row strip (aspect ~0.15)


# ---- flags that would do nothing are refused ------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["train", "vae", "--components", "5"], "--components does not apply to vae (it applies to: gmm, gmvae); drop it"),
    (["train", "gmm", "--activation", "relu"], "--activation does not apply to gmm (it applies to: vae, gmvae, ssvae); drop it"),
    (["train", "linear-gaussian", "--val-size", "10"], "--val-size does not apply to linear-gaussian (it applies to: "
                                                       "MNIST models); drop it"),
    (["train", "vae", "--n-train", "10"], "--n-train does not apply to vae (it applies to: gmm, linear-gaussian); drop it"),
])
def test_a_flag_the_model_does_not_read_is_refused(argv, message, tmp_path, capsys):
    assert main([*argv, "--device", "cpu", "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == f"ppl-vi {argv[0]}: error: {message}"
    assert not (tmp_path / "run").exists()


def test_run_offers_only_the_vae_flags(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "--activation" in out and "--eval-images" in out
    assert "--components" not in out and "--n-train" not in out and "--labels" not in out


def test_relu_vae_is_checked_and_trains(tmp_path):
    """--activation relu: the networks change, the bounds do not (same-sample check against Pyro passes)."""
    from ppl_vi.check import check_model
    from ppl_vi.models.vae import VAE

    torch.manual_seed(0)
    model = VAE(20, 3, [8], activation="relu").double()
    assert any(isinstance(m, torch.nn.ReLU) for m in model.modules())
    assert not any(isinstance(m, torch.nn.Softplus) for m in model.modules())
    x = (torch.rand(6, 20, dtype=torch.float64) < 0.4).double()
    report = check_model(model, {"x": x}, num_particles=3, beta=2.0, seed=0, repeats=10)
    assert report.passed, report.table()
    run = tmp_path / "relu"
    assert main(["train", "vae", "--activation", "relu", "--epochs", "1", "--device", "cpu", "--no-progress",
                 "--hidden", "32", "--z-dim", "4", "--train-subset", "256", "--val-size", "500", "--out", str(run)]) == 0
    assert json.loads((run / rundir.CONFIG).read_text())["config"]["activation"] == "relu"
    assert 50 < _metrics(run)["final_val_loss"] < 600
