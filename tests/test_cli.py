"""The ``ppl-vi`` command line: help, list, report and --tensorboard."""

import subprocess
import sys
from pathlib import Path

import pytest

from ppl_vi.cli import main

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("train", "eval", "check", "list", "report")
LOSSES = ("trace", "meanfield", "enum", "iwae", "renyi")
BUILT_IN = ("gmm", "linear-gaussian", "vae")


def test_help_lists_every_command_and_examples(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert command in out, command
    assert "examples:" in out and "ppl-vi report" in out and "torchrun" in out


@pytest.mark.parametrize("command, flags", [("train", ("--tensorboard", "--out", "--resume", "--epochs")),
                                            ("report", ("--check", "run_dir")),
                                            ("check", ("--json",))])
def test_subcommand_help(command, flags, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for flag in flags:
        assert flag in out, flag


def test_list_shows_models_and_losses(capsys):
    from ppl_vi.models import REGISTRY

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "models:" in out and "losses (--loss):" in out
    for name in set(BUILT_IN) | set(REGISTRY):
        assert f"  {name} " in out, name
    for loss in LOSSES:
        assert f"  {loss} " in out, loss


def test_python_m_ppl_vi_help():
    result = subprocess.run([sys.executable, "-m", "ppl_vi", "--help"], capture_output=True, text=True, cwd=ROOT,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    for command in COMMANDS:
        assert command in result.stdout


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["frobnicate"])
    assert exit_.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


TINY = ["gmm", "--device", "cpu", "--n-train", "200", "--n-test", "100", "--epochs", "2", "--batch-size", "100",
        "--log-every", "1", "--no-progress"]


def test_tensorboard_without_the_package_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    out = tmp_path / "run"
    assert main(["train", *TINY, "--tensorboard", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install tensorboard" in err
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*")), "nothing written on a config error"


def test_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard not installed (pip install tensorboard)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main(["train", *TINY, "--tensorboard", "--out", str(out)]) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/epoch_loss", "val/loss", "train/beta", "train/lr"} <= tags
    assert [e.step for e in events.Scalars("val/loss")] == [2, 4]  # at the global step of each epoch end
