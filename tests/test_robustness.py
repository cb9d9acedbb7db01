"""Reliability: one regression test (or a few) per defect found by trying
ppl_vi as an attacker and a careless user would. Each failed on the code before the fix.

1. ``--resume`` honours ``--lr`` / ``--lr-decay``       6. a lock on the run directory (also tests/test_faults.py)
2. the NaN guard cannot be bypassed                   7. one line instead of a traceback (configs, flags, IDX,
3. symbolic links are never followed                     checkpoints, JSON, --json DIR, --overwrite, ENOSPC, read-only)
4. a kill cannot duplicate an epoch in history.jsonl  8. bounded readers (YAML aliases, gzip bombs, huge files)
5. figures are written atomically                     9. no stale state (--overwrite, orphan .tmp, a kill before config.json)
                                                     10. SIGTERM (tests/test_faults.py) and strict JSON
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import io
import json
import math
import shutil
import tracemalloc
from pathlib import Path

import matplotlib.figure
import pytest
import torch

from ppl_vi import plots
from ppl_vi import run as rundir
from ppl_vi.cli import main
from ppl_vi.config import read_config_file
from ppl_vi.models.configure import build_config
from ppl_vi.data.mnist import read_idx
from ppl_vi.errors import ConfigError, DataError, TrainingDiverged
from ppl_vi.training import EagerStep, train

pytestmark = pytest.mark.filterwarnings("ignore:Encountered NaN", "ignore:.*enumerate sites")

LG = ["linear-gaussian", "--device", "cpu", "--n-train", "100", "--n-test", "50", "--batch-size", "50", "--no-progress"]


def cli(argv) -> tuple:
    """``ppl-vi ARGV`` in-process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            status = main([str(a) for a in argv])
        except SystemExit as exc:
            status = exc.code
    return status, out.getvalue(), err.getvalue()


def one_line_error(status, err, command="train") -> str:
    assert status == 2, err
    text = err.strip()
    assert text.startswith(f"ppl-vi {command}: error:") and "\n" not in text and "Traceback" not in text, err
    return text


def strict_json(path: Path):
    """JSON as the standard has it: the bare words NaN / Infinity are refused."""
    def refuse(word):
        raise AssertionError(f"{path} contains the bare word {word}, which is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture(scope="module")
def lg_run(tmp_path_factory) -> Path:
    """A finished 2-epoch linear-Gaussian run (eval done: figures/bound_vs_k.png exists) to copy and damage."""
    out = tmp_path_factory.mktemp("lg") / "run"
    assert cli(["train", *LG, "--epochs", "2", "--out", out])[0] == 0
    assert cli(["eval", out, "--k", "1,5", "--no-progress"])[0] == 0
    return out


@pytest.fixture
def run_copy(lg_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(lg_run, copy, symlinks=True)
    return copy


# ------------------------------------------------------------------------------------------------
# 1. --resume honours --lr and --lr-decay


def test_resume_applies_new_lr_and_lr_decay(run_copy):
    """The restored Adam and scheduler take the new values: lr x lr_decay^epoch, then decay by the new factor."""
    before = rundir.load_checkpoint(run_copy / rundir.CHECKPOINTS / "last.pt")
    assert before["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.02)  # the model's default, no decay
    status, out, err = cli(["train", "--resume", run_copy, "--epochs", "3", "--lr", "0.004", "--lr-decay", "0.5",
                            "--no-progress"])
    assert status == 0, err
    state = rundir.load_checkpoint(run_copy / rundir.CHECKPOINTS / "last.pt")
    # resumed at epoch 2 with 0.004 x 0.5^2 = 0.001, and epoch 3's end decays it by 0.5
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.004 * 0.5 ** 3, rel=1e-12)
    assert state["scheduler"]["gamma"] == 0.5 and state["scheduler"]["base_lrs"] == [0.004]
    record = rundir.read_run_record(run_copy)
    assert (record["config"]["lr"], record["config"]["lr_decay"], record["config"]["epochs"]) == (0.004, 0.5, 3)
    assert record["resumes"][-1] == {"epoch": 2, "step": 4, "changed": {"epochs": [2, 3], "lr": [0.02, 0.004],
                                                                         "lr_decay": [1.0, 0.5]}}
    assert "Adam continues at 0.001 (epoch 2)" in out and "epochs 2 -> 3" in out


def test_resume_with_a_new_seed_is_refused(run_copy):
    """The random state comes from the checkpoint: a new --seed could only be ignored, so it is refused."""
    status, _, err = cli(["train", "--resume", run_copy, "--seed", "7", "--epochs", "3", "--no-progress"])
    assert "cannot resume with seed 7" in one_line_error(status, err)


# ------------------------------------------------------------------------------------------------
# 2. the NaN guard


@pytest.mark.parametrize("flag, value, message", [
    ("--lr-decay", "nan", "config field lr_decay must be a finite number, got nan"),
    ("--lr-decay", "0", "lr_decay must be in (0, 1]"),
    ("--alpha", "nan", "config field alpha must be a finite number"),
    ("--alpha", "-1", "alpha must be >= 0"),
    ("--max-minutes", "inf", "config field max_minutes must be a finite number or null"),
    ("--max-minutes", "0", "max_minutes must be > 0"),
])
def test_lr_decay_alpha_max_minutes_validated(flag, value, message, tmp_path):
    status, _, err = cli(["train", "gmm", "--epochs", "3", "--device", "cpu", flag, value, "--no-progress",
                          "--out", tmp_path / "run"])
    assert message in one_line_error(status, err)
    assert not (tmp_path / "run").exists()


def test_nan_weights_stop_the_run_even_when_the_loss_reads_finite(tmp_path, monkeypatch):
    """The GMM's enumerated loss is exactly 0.0 once every weight is NaN; the read-back checks the weights."""
    original, steps = EagerStep.step, []

    def poisoned(self, batches):
        result = original(self, batches)
        steps.append(None)
        if len(steps) == 13:  # the 13th step (epoch 2 of 10-step epochs), as a NaN learning rate would
            with torch.no_grad():
                for p in self.parameters:
                    p.fill_(math.nan)
        return result

    monkeypatch.setattr(EagerStep, "step", poisoned)
    config = build_config("gmm", overrides={"device": "cpu", "epochs": 3, "n_train": 1000, "batch_size": 100,
                                            "log_every": 4})
    with pytest.raises(TrainingDiverged) as caught:
        train(config, tmp_path / "run", progress=False)
    message = str(caught.value)
    assert "\n" not in message and "weights became non-finite by step 14 (epoch 2)" in message
    assert "last good checkpoint (epoch 1, step 10)" in message
    state = rundir.load_checkpoint(tmp_path / "run" / rundir.CHECKPOINTS / "last.pt")
    assert state["step"] == 10 and all(torch.isfinite(v).all() for v in state["model"].values())


# ------------------------------------------------------------------------------------------------
# 3. symbolic links


def _png_bytes() -> bytes:
    fig = matplotlib.figure.Figure(figsize=(1, 1))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def test_report_never_embeds_a_linked_figure(run_copy, tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(_png_bytes() + b"")  # a valid PNG: left out for being a link, not for being broken
    (run_copy / rundir.FIGURES / "leak.png").symlink_to(secret)
    assert cli(["report", run_copy])[0] == 0
    page = (run_copy / "report.html").read_text()
    assert base64.b64encode(secret.read_bytes()).decode() not in page
    assert "leak.png (a symbolic link, not followed)" in page
    assert "fig-bound_vs_k" in page  # the run's own figures are still there


def test_report_refuses_a_linked_metrics_file(run_copy, tmp_path):
    outside = tmp_path / "elsewhere.json"
    outside.write_text(json.dumps({"api_token": "s3cr3t"}))
    (run_copy / rundir.METRICS).unlink()
    (run_copy / rundir.METRICS).symlink_to(outside)
    status, _, err = cli(["report", run_copy])
    assert "is a symbolic link" in one_line_error(status, err, "report")
    assert "s3cr3t" not in (run_copy / "report.html").read_text()


def test_eval_replaces_a_linked_figure_instead_of_writing_through_it(run_copy, tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("do not overwrite")
    figure = run_copy / rundir.FIGURES / "bound_vs_k.png"
    figure.unlink()
    figure.symlink_to(target)
    assert cli(["eval", run_copy, "--k", "1", "--no-progress"])[0] == 0
    assert target.read_text() == "do not overwrite"
    assert not figure.is_symlink() and figure.read_bytes().startswith(b"\x89PNG")


def test_eval_refuses_a_linked_figures_folder(run_copy, tmp_path):
    outside = tmp_path / "outside"
    shutil.move(run_copy / rundir.FIGURES, outside)
    (run_copy / rundir.FIGURES).symlink_to(outside, target_is_directory=True)
    status, _, err = cli(["eval", run_copy, "--k", "1", "--no-progress"])
    assert "figures is a symbolic link" in one_line_error(status, err, "eval")


# ------------------------------------------------------------------------------------------------
# 4. a kill cannot duplicate an epoch in history.jsonl


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so nothing on the way catches it."""


def test_kill_after_a_mid_epoch_checkpoint_on_an_epochs_last_step(tmp_path, monkeypatch):
    """2 steps per epoch, a checkpoint every 2 steps: each falls on an epoch's last step, before that epoch's
    record is appended. Killed at the third: last.pt is step 4 (epoch 1 + 2 steps), history holds epochs 1-2."""
    args = [*LG, "--epochs", "3", "--checkpoint-every-steps", "2", "--checkpoint-every", "10"]
    assert cli(["train", *args, "--out", tmp_path / "reference"])[0] == 0
    original, calls = rundir.save_checkpoint, []

    def dies_at_the_third(path, state):
        calls.append(path)
        if len(calls) == 3:
            raise Killed
        original(path, state)

    monkeypatch.setattr(rundir, "save_checkpoint", dies_at_the_third)
    with pytest.raises(Killed):
        main(["train", *args, "--out", str(tmp_path / "run")])
    monkeypatch.setattr(rundir, "save_checkpoint", original)
    state = rundir.load_checkpoint(tmp_path / "run" / rundir.CHECKPOINTS / "last.pt")
    assert (state["epoch"], state["step"], state["step_in_epoch"]) == (1, 4, 2)
    assert [r["epoch"] for r in rundir.read_history(tmp_path / "run")] == [1, 2]
    assert cli(["train", "--resume", tmp_path / "run", "--no-progress"])[0] == 0
    history = rundir.read_history(tmp_path / "run")
    assert [r["epoch"] for r in history] == [1, 2, 3]
    timing_free = [{k: v for k, v in r.items() if k != "seconds"} for r in history]
    assert timing_free == [{k: v for k, v in r.items() if k != "seconds"}
                           for r in rundir.read_history(tmp_path / "reference")]


# ------------------------------------------------------------------------------------------------
# 5. figures written atomically; the report never embeds an empty image


def test_a_kill_during_a_figure_write_keeps_the_old_image(tmp_path, monkeypatch):
    old = plots.training_curves(tmp_path, [{"epoch": 1, "train_loss": 2.0}, {"epoch": 2, "train_loss": 1.0}])
    before = old.read_bytes()

    def dies_mid_write(self, fname, *args, **kwargs):
        partial = before[:100]
        if hasattr(fname, "write"):
            fname.write(partial)
        else:
            Path(fname).write_bytes(partial)
        raise Killed

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", dies_mid_write)
    with pytest.raises(Killed):
        plots.training_curves(tmp_path, [{"epoch": 1, "train_loss": 3.0}])
    assert old.read_bytes() == before
    assert sorted(p.name for p in old.parent.iterdir()) == ["training_curves.png"]


def test_report_leaves_out_empty_and_truncated_images(run_copy):
    good = (run_copy / rundir.FIGURES / "bound_vs_k.png").read_bytes()
    (run_copy / rundir.FIGURES / "samples.png").write_bytes(b"")
    (run_copy / rundir.FIGURES / "reconstructions.png").write_bytes(good[: len(good) // 2])
    assert cli(["report", run_copy])[0] == 0
    page = (run_copy / "report.html").read_text()
    assert 'base64,"' not in page and "fig-samples" not in page and "fig-reconstructions" not in page
    assert "samples.png (empty)" in page and "reconstructions.png (not a complete PNG image)" in page
    assert base64.b64encode(good).decode() in page


# ------------------------------------------------------------------------------------------------
# 7. one line, exit 2, no traceback


CONFIG_CASES = [
    ({"epochs": 2.5}, "config field epochs must be an integer, got 2.5 (float)"),
    ({"epochs": "3"}, "config field epochs must be an integer, got '3' (str)"),
    ({"batch_size": True}, "config field batch_size must be an integer, got True (bool)"),
    ({"lr": "x"}, "config field lr must be a finite number, got 'x' (str)"),
    ({"beta": 1e999}, "config field beta must be a finite number, got inf (float)"),
    ({"seed": 2**40}, "seed must be <= 4294967295"),
    ({"seed": 1e30}, "config field seed must be an integer, got 1e+30 (float)"),
    ({"data_dir": ["a", "b"]}, "config field data_dir must be a string or null, got ['a', 'b'] (list)"),
    ({"hidden": [32, 1.5]}, "config field hidden must be a list of integers (or a comma-separated string), "
                            "got [32, 1.5] (item 1 is a float)"),
    ({"fast": "no"}, "config field fast must be true or false, got 'no' (str)"),
    ({"model": ["gmm"]}, "config field model must be a string"),
]


@pytest.mark.parametrize("values, message", CONFIG_CASES, ids=[str(v) for v, _ in CONFIG_CASES])
def test_config_file_types_and_values(values, message, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model": "gmm", **values}))
    status, _, err = cli(["train", "--config", path, "--device", "cpu", "--out", tmp_path / "run", "--no-progress"])
    assert message in one_line_error(status, err)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, message", [
    (["--seed", "-1"], "seed must be >= 0 (what numpy and Python's random accept), got -1"),
    (["--hidden", "1000000000"], "hidden must be <= 16384 per layer, got 1000000000"),
    (["--n-train", "2"], "n_train=2 is fewer than components=3"),
    (["--k", "1000000000"], "k must be <= 100000, got 1000000000"),
    (["--eval-k", "1,2000000"], "eval_k must be <= 1000000, got 2000000"),
], ids=["seed -1", "hidden 1e9", "n-train 2", "k 1e9", "eval-k 2e6"])
def test_absurd_flags(argv, message, tmp_path):
    status, _, err = cli(["train", "gmm", "--device", "cpu", "--epochs", "1", *argv, "--no-progress",
                          "--out", tmp_path / "run"])
    assert message in one_line_error(status, err)


def _idx(path: Path, shape) -> None:
    header = bytes([0, 0, 8, len(shape)]) + b"".join(n.to_bytes(4, "big") for n in shape)
    path.write_bytes(header + bytes(math.prod(shape)))


def test_idx_with_zero_images(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split in ("train", "t10k"):
        _idx(raw / f"{split}-images-idx3-ubyte", (0, 28, 28))
        _idx(raw / f"{split}-labels-idx1-ubyte", (0,))
    status, _, err = cli(["train", "vae", "--data-dir", tmp_path, "--device", "cpu", "--no-progress",
                          "--out", tmp_path / "run"])
    assert "train-images-idx3-ubyte holds 0 images" in one_line_error(status, err)


def _edit_checkpoint(path: Path, edit) -> None:
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)


@pytest.mark.parametrize("edit, message", [
    (lambda s: s["rng"].update(torch=s["rng"]["torch"][:100]), "rng.torch is not a 5056-byte generator state"),
    (lambda s: s.update(epoch="1"), "epoch is '1', not an integer >= 0"),
    (lambda s: s.update(optimizer=[1, 2]), "optimizer is not a mapping"),
    (lambda s: s.update(rng=[0]), "rng is not a mapping"),
    (lambda s: s["rng"].update(python=[1, 2, 3]), "rng.python is not Python's 625-integer random state"),
], ids=["short rng", "epoch string", "optimizer list", "rng list", "python rng short"])
def test_resume_from_foreign_but_plausible_checkpoint(run_copy, edit, message):
    _edit_checkpoint(run_copy / rundir.CHECKPOINTS / "last.pt", edit)
    status, _, err = cli(["train", "--resume", run_copy, "--epochs", "3", "--no-progress"])
    text = one_line_error(status, err)
    assert "it is incomplete or foreign" in text and message in text


def test_eval_of_a_checkpoint_whose_model_state_is_not_a_mapping(run_copy):
    _edit_checkpoint(run_copy / rundir.CHECKPOINTS / "best.pt", lambda s: s.update(model=[torch.ones(2)]))
    status, _, err = cli(["eval", run_copy, "--k", "1", "--no-progress"])
    assert "model state is not a mapping of names to tensors" in one_line_error(status, err, "eval")


@pytest.mark.parametrize("command", [["train", "--resume", "{run}", "--no-progress"],
                                     ["eval", "{run}", "--no-progress"], ["report", "{run}"]])
def test_list_valued_config_json(run_copy, command):
    (run_copy / rundir.CONFIG).write_text("[1, 2, 3]")
    status, _, err = cli([a.format(run=run_copy) for a in command])
    assert "config.json holds a JSON list; expected a JSON object" in one_line_error(status, err, command[0])


@pytest.mark.parametrize("content, message", [
    ("[true]", "check.json holds a JSON list; expected a JSON object"),
    ('{"passed": true, "rows": [1, 2]}', "check.json has 'rows' that are not a list of objects"),
])
def test_malformed_check_json(run_copy, content, message):
    (run_copy / rundir.CHECK).write_text(content)
    status, _, err = cli(["report", run_copy])
    assert message in one_line_error(status, err, "report")


def test_check_json_into_a_directory(tmp_path):
    status, _, err = cli(["check", "gmm", "--json", tmp_path])
    assert "is a directory; expected a file name" in one_line_error(status, err, "check")


def test_overwrite_clears_subfolders_and_stale_check(run_copy):
    """--overwrite with a folder inside figures/ (a traceback before), and a stale check.json from another model."""
    (run_copy / rundir.FIGURES / "old-sweep").mkdir()
    (run_copy / rundir.FIGURES / "old-sweep" / "a.png").write_bytes(b"x")
    (run_copy / rundir.CHECK).write_text(json.dumps({"passed": True, "rows": []}))
    (run_copy / "notes.txt").write_text("mine")
    status, _, err = cli(["train", "gmm", "--device", "cpu", "--epochs", "1", "--overwrite", "--no-progress",
                          "--out", run_copy])
    assert status == 0, err
    assert not (run_copy / rundir.FIGURES / "old-sweep").exists() and not (run_copy / rundir.CHECK).exists()
    assert (run_copy / "notes.txt").read_text() == "mine"  # not a run file: left alone
    assert "check not run" in (run_copy / "report.html").read_text()
    assert rundir.load_config_dict(run_copy)["model"] == "gmm"


def test_disk_full_is_one_line(run_copy, monkeypatch):
    """An injected ENOSPC (tests/test_faults.py fills a real tmpfs): one line naming the file, old file intact."""
    import errno
    import os

    before = (run_copy / rundir.CHECKPOINTS / "last.pt").read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    status, _, err = cli(["train", "--resume", run_copy, "--epochs", "3", "--no-progress"])
    text = one_line_error(status, err)
    assert "No space left on device (ENOSPC)" in text and "the previous version, if any, is intact" in text
    monkeypatch.undo()
    assert (run_copy / rundir.CHECKPOINTS / "last.pt").read_bytes() == before
    assert not [p for p in run_copy.rglob("*.tmp")]


# ------------------------------------------------------------------------------------------------
# 8. bounded readers


def test_yaml_alias_bomb_is_refused_before_expanding(tmp_path):
    pytest.importorskip("yaml")
    levels = ["a: &a [x, x, x, x, x, x, x, x, x]"] + [
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]" for i in range(8)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(["model: gmm", *levels]) + "\n")  # 9^9 = 387M strings if expanded
    assert bomb.stat().st_size < 600
    status, _, err = cli(["train", "--config", bomb, "--device", "cpu", "--out", tmp_path / "run", "--no-progress"])
    assert "uses the YAML alias *a (line 3); aliases are not accepted" in one_line_error(status, err)


def test_oversized_config_file_is_refused_unread(tmp_path):
    big = tmp_path / "big.json"
    big.write_text('{"model": "gmm", "guide": "' + "x" * (2**20) + '"}')
    with pytest.raises(ConfigError, match=r"big.json is \d+ bytes; config files are limited to 1048576 bytes"):
        read_config_file(big)


def test_gzip_bomb_costs_at_most_its_declared_size(tmp_path):
    """A header declaring 1000 images (784 kB) followed by 64 MB of zeros (64 kB gzipped): refused,
    with at most about the declared size in memory (the whole file was read before: 64 MB)."""
    path = tmp_path / "train-images-idx3-ubyte.gz"
    with gzip.open(path, "wb") as handle:
        handle.write(bytes([0, 0, 8, 3]) + (1000).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2)
        for _ in range(64):
            handle.write(bytes(2**20))
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"holds more data than the 784000 bytes its header \[1000, 28, 28\]"):
            read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20, f"peak {peak / 2**20:.1f} MiB"


def test_idx_header_declaring_too_much_is_refused(tmp_path):
    path = tmp_path / "huge"
    path.write_bytes(bytes([0, 0, 8, 3]) + (2**31 - 1).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2)
    with pytest.raises(DataError, match="at most 1073741824 bytes are read from an IDX file"):
        read_idx(path)


# ------------------------------------------------------------------------------------------------
# 9. stale and stuck state


def test_resume_removes_orphan_temporary_files(run_copy):
    orphans = [run_copy / rundir.CHECKPOINTS / ".last.pt.k2j4h5g6.tmp", run_copy / ".metrics.json.abcd_123.tmp",
               run_copy / rundir.FIGURES / ".samples.png.zz9y8x7w.tmp"]
    for path in orphans:
        path.write_bytes(b"half")
    assert cli(["train", "--resume", run_copy, "--epochs", "3", "--no-progress"])[0] == 0
    assert not any(p.exists() for p in orphans)


def test_a_kill_before_config_json_was_renamed_leaves_a_folder_a_new_run_accepts(tmp_path):
    """What a kill between config.json's temporary write and its rename leaves: the folders, the lock and the
    temporary file. A fresh run in the same --out accepts it; --resume says what to do."""
    run = tmp_path / "run"
    (run / rundir.CHECKPOINTS).mkdir(parents=True)
    (run / rundir.FIGURES).mkdir()
    (run / ".lock").write_bytes(b"")
    (run / ".config.json.q1w2e3r4.tmp").write_text('{"config": {"model": "gm')
    status, _, err = cli(["train", "--resume", run, "--no-progress"])
    assert "start it again with the same --out" in one_line_error(status, err)
    status, _, err = cli(["train", *LG, "--epochs", "1", "--out", run])
    assert status == 0, err
    assert not (run / ".config.json.q1w2e3r4.tmp").exists() and (run / rundir.CONFIG).is_file()


# ------------------------------------------------------------------------------------------------
# 10. strict JSON


def test_metrics_and_history_are_strict_json(tmp_path):
    """One test point: the standard errors are NaN. They are written as "NaN" and read back as floats."""
    run = tmp_path / "run"
    assert cli(["train", *LG, "--epochs", "1", "--n-test", "1", "--out", run])[0] == 0
    metrics = strict_json(run / rundir.METRICS)
    assert metrics["test_log_likelihood_se"] == "NaN"
    assert math.isnan(rundir.read_json(run / rundir.METRICS)["test_log_likelihood_se"])
    for line in (run / rundir.HISTORY).read_text().splitlines():
        json.loads(line, parse_constant=lambda word: pytest.fail(f"bare {word} in history.jsonl"))
    rundir.append_history(run, {"epoch": 2, "train_loss": math.inf, "val_loss": -math.inf})
    assert json.loads((run / rundir.HISTORY).read_text().splitlines()[-1]) == {
        "epoch": 2, "train_loss": "Infinity", "val_loss": "-Infinity"}
    assert rundir.read_history(run)[-1]["train_loss"] == math.inf
