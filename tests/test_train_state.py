"""The training state: checkpoints written by earlier versions still resume, exactly.

``tests/data/checkpoint_v1_*.pt`` were written by ``ppl-vi train`` before the TrainState existed (gmm,
64 points, batch 16, 4 steps per epoch, lr 0.01 x 0.9^epoch, ``--checkpoint-every-steps 3``): the
mid-epoch one after step 3, the epoch-end one after step 4. Resuming the first must land bit for bit
on the second.
"""

import shutil
from pathlib import Path

import torch

from ppl_vi import run as rundir
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
