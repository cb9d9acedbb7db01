"""The training state: checkpoints written by earlier versions still resume, exactly.

``tests/data/checkpoint_v1_*.pt`` were written by ``ppl-vi train`` before the TrainState existed (gmm,
64 points, batch 16, 4 steps per epoch, lr 0.01 x 0.9^epoch, ``--checkpoint-every-steps 3``): the
mid-epoch one after step 3, the epoch-end one after step 4. Resuming the first must land bit for bit
on the second.
"""

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

from ppl_vi import run as rundir
from ppl_vi.errors import ConfigError
from ppl_vi.models.configure import build_config
from ppl_vi.training import train

DATA = Path(__file__).resolve().parent / "data"


def _run_dir_from_fixture(tmp_path: Path, checkpoint: str) -> Path:
    run_dir = tmp_path / "run"
    (run_dir / rundir.CHECKPOINTS).mkdir(parents=True)
    (run_dir / rundir.FIGURES).mkdir()
    shutil.copy(DATA / "checkpoint_v1_config.json", run_dir / rundir.CONFIG)
    shutil.copy(DATA / checkpoint, run_dir / rundir.CHECKPOINTS / "last.pt")
    return run_dir


def test_an_old_mid_epoch_checkpoint_resumes_exactly(tmp_path):
    run_dir = _run_dir_from_fixture(tmp_path, "checkpoint_v1_mid_epoch.pt")
    config = build_config(file_values=rundir.load_config_dict(run_dir))
    messages = []
    trainer = train(config, run_dir, resume=True, progress=False, log=messages.append)
    assert "continuing epoch 1 at step 4 of 4" in messages[0]
    expected = torch.load(DATA / "checkpoint_v1_epoch_end.pt", weights_only=True)
    assert (trainer.epoch, trainer.step) == (expected["epoch"], expected["step"]) == (1, 4)
    for name, value in expected["model"].items():
        assert torch.equal(trainer.model.state_dict()[name], value), name
    assert trainer.optimizer.param_groups[0]["lr"] == expected["optimizer"]["param_groups"][0]["lr"] == 0.01 * 0.9


def test_an_old_epoch_end_checkpoint_loads_with_its_counters(tmp_path):
    run_dir = _run_dir_from_fixture(tmp_path, "checkpoint_v1_epoch_end.pt")
    config = build_config(file_values={**rundir.load_config_dict(run_dir), "epochs": 2})
    messages = []
    trainer = train(config, run_dir, resume=True, progress=False, log=messages.append)
    assert "epoch 1 of 2 done, step 4" in messages[0]
    assert (trainer.epoch, trainer.step) == (2, 8)
    assert trainer.optimizer.param_groups[0]["lr"] == 0.01 * 0.9 * 0.9


def test_a_new_schedule_reaches_the_checkpoint_not_the_config():
    """A budget's Schedule: the checkpoint (and so a resume) records the epochs and decay trained with; the
    run's config object is unchanged and frozen."""
    from ppl_vi.config import Schedule
    from ppl_vi.training import Trainer

    config = build_config("linear-gaussian", overrides={"device": "cpu", "n_train": 40, "n_test": 20, "epochs": 3})
    trainer = Trainer(config, progress=False)
    trainer.state.replan(Schedule.fitting(config, budget_seconds=70.0, epoch_seconds=10.0, max_epochs=100,
                                          lr_final=config.lr / 64))
    saved = trainer.state.state_dict()["config"]
    assert saved["epochs"] == 7 and saved["lr_decay"] == pytest.approx(0.5, rel=1e-12)  # (1/64)^(1/6) = 1/2
    assert trainer.scheduler.gamma == saved["lr_decay"] and (config.epochs, config.lr_decay) == (3, 1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.epochs = 7


def test_resolve_merges_every_source_in_order_and_names_the_models():
    from ppl_vi.config import resolve

    class Entry:
        data, defaults = "gmm", {"epochs": 2, "lr": 0.5, "batch_size": 3}

    got = resolve({"toy": Entry}, "toy", profile={"lr": 0.25, "batch_size": 4}, file_values={"batch_size": 5},
                  flags={"seed": 9, "k": None})
    assert (got.epochs, got.lr, got.batch_size, got.seed, got.k) == (2, 0.25, 5, 9, 1)
    with pytest.raises(ConfigError, match="unknown model 'vae'; expected one of: toy"):
        resolve({"toy": Entry}, "vae")
    with pytest.raises(ConfigError, match="--val-size does not apply to toy"):
        resolve({"toy": Entry}, "toy", flags={"val_size": 3}, strict=True)
    assert resolve({"toy": Entry}, "toy", flags={"val_size": 3}).val_size == 3  # a script may set any field
