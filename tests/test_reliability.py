"""Reliability: crash-safe runs, exact resume (also after SIGKILL), reproducibility, NaN handling.

Every run here is a small linear-Gaussian fit on CPU with one thread, so that a bitwise claim is
about ppl_vi and not about thread scheduling. One test starts a real ``python -m ppl_vi train``
subprocess and SIGKILLs it; ``PPL_VI_RESUME_TRIALS=N pytest -m slow`` repeats that N times with 1-3 kills
each at random moments (the table in docs/reliability.md was filled that way).
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from ppl_vi import run as rundir
from ppl_vi.cli import main
from ppl_vi.models.configure import build_config
from ppl_vi.errors import CheckpointError, ConfigError, TrainingDiverged
from ppl_vi.training import Trainer, train
from ppl_vi.training import step as step_module

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:Encountered NaN")  # the NaN tests make them on purpose
# 40 steps per epoch, 240 in all; a checkpoint every 7 steps (mid-epoch) and at every epoch end
ARGS = ["linear-gaussian", "--device", "cpu", "--seed", "3", "--epochs", "6", "--n-train", "800", "--n-test", "200",
        "--batch-size", "20", "--checkpoint-every", "1", "--checkpoint-every-steps", "7", "--no-progress"]
STEPS_PER_EPOCH, EPOCHS = 40, 6


def timing_free(metrics: dict) -> dict:
    """metrics.json without wall-clock entries (train_seconds, eval_seconds, ...)."""
    return {k: v for k, v in metrics.items() if not (k == "seconds" or k.endswith("_seconds"))}


def final_state(run_dir: Path) -> dict:
    return torch.load(Path(run_dir) / rundir.CHECKPOINTS / "last.pt", weights_only=True)


def assert_same_run(a: Path, b: Path) -> None:
    """Bitwise-equal final model and optimiser state; equal metrics and history (timings aside)."""
    sa, sb = final_state(a), final_state(b)
    assert sa["model"].keys() == sb["model"].keys()
    for name in sa["model"]:
        assert torch.equal(sa["model"][name], sb["model"][name]), f"parameter {name} differs"
    for pid, st in sa["optimizer"]["state"].items():
        for key, value in st.items():
            assert torch.equal(value, sb["optimizer"]["state"][pid][key]), f"optimiser state {pid}.{key} differs"
    assert (sa["epoch"], sa["step"]) == (sb["epoch"], sb["step"])
    ma, mb = (rundir.read_json(p / rundir.METRICS) for p in (a, b))
    assert timing_free(ma) == timing_free(mb)
    ha, hb = ([timing_free(r) for r in rundir.read_history(p)] for p in (a, b))
    assert ha == hb
    assert [r["epoch"] for r in hb] == list(range(1, len(hb) + 1)), "history.jsonl repeats or skips epochs"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run every other run here must reproduce exactly."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(["train", *ARGS, "--out", str(out)]) == 0
    torch.set_num_threads(threads)
    return out


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
            "PPL_VI_DATA": os.environ.get("PPL_VI_DATA", "")}


def _start(argv) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ppl_vi", *argv], cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for(run_dir: Path, proc: subprocess.Popen, ready, timeout: float = 180.0):
    """Poll checkpoints/last.pt until ``ready(state)``; None if the process ended first."""
    path, seen = run_dir / rundir.CHECKPOINTS / "last.pt", None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return None
        try:
            stamp = path.stat().st_mtime_ns
            if stamp != seen:
                seen, state = stamp, torch.load(path, weights_only=True)
                if ready(state):
                    return state
        except (FileNotFoundError, RuntimeError, EOFError):
            pass
        time.sleep(0.01)
    raise AssertionError(f"no checkpoint ready in {run_dir} after {timeout} s")


# ------------------------------------------------------------------------------------------------
# exact resume


def test_kill_and_resume_is_bitwise_exact(reference, tmp_path):
    """SIGKILL a real training process once last.pt holds epoch >= 2; --resume; same run, bit for bit."""
    run = tmp_path / "killed"
    proc = _start(["train", *ARGS, "--out", str(run)])
    try:
        state = _wait_for(run, proc, lambda s: s["epoch"] >= 2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert state is not None and proc.returncode == -signal.SIGKILL, \
        f"the run ended (rc {proc.returncode}) before it could be killed: {proc.stderr.read().decode()[-500:]}"
    proc.stderr.close()
    at_kill = final_state(run)
    assert at_kill["epoch"] < EPOCHS
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert_same_run(reference, run)


@pytest.mark.slow  # a stress run, deselected by default (not skipped: CI allows CUDA skips only)
def test_kill_at_random_moments_stress(reference, tmp_path):
    """N runs (PPL_VI_RESUME_TRIALS, default 20), each SIGKILLed 1-3 times at random moments (resumed by a
    killable subprocess): ``pytest -m slow tests/test_reliability.py``."""
    trials, rng, outcomes = int(os.environ.get("PPL_VI_RESUME_TRIALS", "20")), random.Random(0), []
    for trial in range(trials):
        run = tmp_path / f"trial{trial}"
        proc, kills, positions = _start(["train", *ARGS, "--out", str(run)]), rng.randint(1, 3), []
        last = run / rundir.CHECKPOINTS / "last.pt"
        for _ in range(kills):
            # wait for progress (config.json from a fresh run; a new last.pt from a resumed one), then a random delay
            before = last.stat().st_mtime_ns if last.is_file() else None
            while proc.poll() is None and not ((run / rundir.CONFIG).is_file() if before is None
                                               else last.stat().st_mtime_ns != before):
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 1.5))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            assert proc.returncode in (0, -signal.SIGKILL), proc.stderr.read().decode()
            proc.stderr.close()
            positions.append("finished" if proc.returncode == 0 else
                             (lambda s: f"{s['step']}/{s.get('step_in_epoch', 0)}")(torch.load(last, weights_only=True))
                             if last.is_file() else "no checkpoint")
            if proc.returncode == 0:
                break
            proc = _start(["train", "--resume", str(run), "--no-progress"])
        proc.wait()
        assert proc.stderr.closed or proc.returncode == 0, proc.stderr.read().decode()
        proc.stderr.close()
        if proc.returncode != 0:
            assert main(["train", "--resume", str(run), "--no-progress"]) == 0
        assert_same_run(reference, run)
        outcomes.append(positions)
    print(f"\n{trials} trials, kills at (step/step-in-epoch of last.pt): {outcomes}")


def test_mid_epoch_resume_is_exact(reference, tmp_path, monkeypatch):
    """Interrupted right after the mid-epoch checkpoint at step 91 (epoch 3, step 11 of 40)."""
    run = tmp_path / "interrupted"
    original = Trainer.save_checkpoint

    class Interrupted(Exception):
        pass

    def save_then_die(self, name):
        path = original(self, name)
        if self.step == 91:
            raise Interrupted
        return path

    monkeypatch.setattr(Trainer, "save_checkpoint", save_then_die)
    with pytest.raises(Interrupted):
        main(["train", *ARGS, "--out", str(run)])
    monkeypatch.setattr(Trainer, "save_checkpoint", original)
    state = final_state(run)
    assert (state["epoch"], state["step"], state["step_in_epoch"]) == (2, 91, 11)
    assert len(state["epoch_losses"]) == 11
    assert [r["epoch"] for r in rundir.read_history(run)] == [1, 2]
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert_same_run(reference, run)


def test_resume_drops_history_written_after_the_checkpoint(tmp_path):
    """A record appended after last.pt (and a line cut short by the kill) is not kept twice."""
    run = tmp_path / "run"
    args = ["linear-gaussian", "--device", "cpu", "--epochs", "3", "--n-train", "100", "--n-test", "50",
            "--batch-size", "50", "--checkpoint-every", "2", "--no-progress", "--out", str(run)]
    assert main(["train", *args, "--epochs", "2"]) == 0  # last.pt at epoch 2
    rundir.append_history(run, {"epoch": 3, "step": 6, "train_loss": 1.0})  # the killed process's epoch 3
    with open(run / rundir.HISTORY, "a") as handle:
        handle.write('{"epoch": 4, "st')  # cut short by SIGKILL
    assert main(["train", "--resume", str(run), "--epochs", "3", "--no-progress"]) == 0
    assert [r["epoch"] for r in rundir.read_history(run)] == [1, 2, 3]
    assert rundir.load_config_dict(run)["epochs"] == 3  # config.json follows the resumed settings


def test_semisupervised_skip_replays_the_same_epoch():
    """batches(skip) on the labelled+unlabelled path: same permutations, no batch built for skipped steps."""
    from ppl_vi import distributed
    from ppl_vi.data.sources import DataBundle
    from ppl_vi.models.base import default_make_batch
    from ppl_vi.training.batches import LabelledSchedule

    trainer = Trainer.__new__(Trainer)
    x = torch.arange(50, dtype=torch.float32).unsqueeze(1)
    trainer.data = DataBundle("mnist-semisupervised", x, x, torch.arange(50) % 10, None,
                              labelled_idx=torch.arange(0, 50, 7), unlabelled_idx=torch.arange(50)[torch.arange(50) % 7 != 0])
    trainer.config = build_config("linear-gaussian", overrides={"batch_size": 4})
    trainer.device, trainer.dist = torch.device("cpu"), getattr(distributed, "SINGLE", None)
    trainer.make_batch, built = default_make_batch, []
    trainer._x = lambda idx: built.append(idx) or x[idx]
    trainer.schedule = LabelledSchedule.from_config(trainer.config, 8, 11)  # a labelled batch at every step
    trainer.state = types.SimpleNamespace(data_generator=torch.Generator().manual_seed(5))
    start = trainer.data_generator.get_state()
    full = [[b["x"] for b in step] for step in trainer.batches()]
    end = trainer.data_generator.get_state()
    trainer.data_generator.set_state(start)
    built.clear()
    rest = [[b["x"] for b in step] for step in trainer.batches(skip=5)]
    assert len(built) == 2 * (len(full) - 5)  # nothing built (no binarisation drawn) for skipped steps
    assert all(torch.equal(a, b) for s, t in zip(full[5:], rest) for a, b in zip(s, t)) and len(rest) == len(full) - 5
    assert torch.equal(trainer.data_generator.get_state(), end)


def test_resume_mid_epoch_refuses_changed_data_settings(tmp_path):
    config = build_config("linear-gaussian", overrides={"device": "cpu", "n_train": 100, "n_test": 50})
    state = Trainer(config, progress=False).state.state_dict()
    state["step_in_epoch"] = 3
    state["config"]["batch_size"] = 7
    with pytest.raises(ConfigError, match="cannot resume mid-epoch with changed batch_size"):
        Trainer(config, progress=False).load_state(state)
    del state["rng"]
    state["config"]["batch_size"] = config.batch_size
    with pytest.raises(CheckpointError, match="incomplete"):
        Trainer(config, progress=False).load_state(state)


# ------------------------------------------------------------------------------------------------
# reproducibility


def test_same_config_reproduces_metrics_and_parameters(reference, tmp_path):
    """--config RUN/config.json --out NEW: the same seed/device/config, so the same run bit for bit."""
    again = tmp_path / "again"
    saved = json.loads((reference / rundir.CONFIG).read_text())
    assert {"config", "environment"} <= saved.keys()
    assert {"torch", "pyro", "python", "device", "git_commit"} <= saved["environment"].keys()
    assert main(["train", "--config", str(reference / rundir.CONFIG), "--out", str(again), "--no-progress"]) == 0
    assert_same_run(reference, again)


# ------------------------------------------------------------------------------------------------
# crash safety of the files themselves


def test_atomic_checkpoint_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    rundir.save_checkpoint(path, {"ppl_vi": 1, "model": {"w": torch.ones(3)}})

    def dies_mid_write(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # as if killed mid-write

    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        rundir.save_checkpoint(path, {"ppl_vi": 1, "model": {"w": torch.zeros(3)}})
    monkeypatch.undo()
    assert torch.equal(rundir.load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


# ------------------------------------------------------------------------------------------------
# NaN / inf

NAN_ARGS = dict(device="cpu", seed=1, epochs=4, n_train=200, n_test=50, batch_size=20, checkpoint_every_steps=4)


def poison(monkeypatch, bad_steps):
    """Make the loss NaN at the given (0-based) global steps."""
    original, calls = step_module.step_loss, []

    def step_loss(*args):  # called once per training step: the stepper's loss function
        loss = original(*args)
        calls.append(None)
        return loss * math.nan if len(calls) - 1 in bad_steps else loss

    monkeypatch.setattr(step_module, "step_loss", step_loss)


def test_nan_stops_with_step_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    poison(monkeypatch, {25})  # the 26th step: epoch 3, 6th step of 10
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged) as caught:
        train(build_config("linear-gaussian", overrides=NAN_ARGS), run, progress=False)
    message = str(caught.value)
    assert "\n" not in message
    assert "loss became nan at step 26 (epoch 3)" in message
    assert "non-finite weights" in message or "non-finite gradients" in message
    assert "last good checkpoint (epoch 2, step 24)" in message
    state = rundir.load_checkpoint(run / rundir.CHECKPOINTS / "last.pt")
    assert state["step"] == 24 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (run / rundir.METRICS).exists()


def test_nan_cli_exit_code_and_one_line(tmp_path, monkeypatch, capsys):
    poison(monkeypatch, {12})
    argv = ["train", "linear-gaussian", "--device", "cpu", "--epochs", "2", "--n-train", "200", "--n-test", "50",
            "--batch-size", "20", "--no-progress", "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert err.startswith("ppl-vi train: error: loss became nan at step 13 (epoch 2)")
    assert rundir.load_checkpoint(tmp_path / "run" / rundir.CHECKPOINTS / "last.pt")["epoch"] == 1


def test_nan_policy_skip_counts_skipped_steps(tmp_path, monkeypatch):
    poison(monkeypatch, {3, 17})
    trainer = train(build_config("linear-gaussian", overrides={**NAN_ARGS, "nan_policy": "skip"}), tmp_path / "run",
                    progress=False)
    assert trainer.metrics["skipped_steps"] == 2
    assert rundir.read_json(tmp_path / "run" / rundir.METRICS)["skipped_steps"] == 2
    assert math.isfinite(trainer.metrics["final_train_loss"]) and trainer.metrics["steps"] == 40
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


@pytest.mark.parametrize("param, term", [("log_sigma", "reconstruction term (model site 'x')"),
                                         ("enc_log_scale", "KL term (guide site 'z')")])
def test_nan_diagnosis_names_the_bad_term(param, term):
    """With finite weights and gradients, the message names the site whose log-density overflowed."""
    trainer = Trainer(build_config("linear-gaussian", overrides={"device": "cpu", "n_train": 50, "n_test": 20}),
                      progress=False)
    with torch.no_grad():
        getattr(trainer.model, param).fill_(-1e4)  # a scale of exp(-1e4) = 0: finite weight, infinite density
    trainer._last_batches = next(iter(trainer.batches()))
    assert not torch.isfinite(trainer.step_loss(trainer._last_batches))
    assert term in trainer._diagnose()
