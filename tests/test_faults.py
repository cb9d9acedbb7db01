"""Fault injection: kills at every write and at random moments, a full disk, a read-only disk,
concurrent processes, links, and malformed or oversized configs.

After every fault, every file in the run directory must be whole (strict JSON that parses,
checkpoints that load, PNGs from signature to IEND, a report without empty images), and the run
must complete by ``--resume`` (or a rerun of ``eval``) to the same result as a run that was never
interrupted. Sized for the default suite (about a minute on a 2-core CPU); the long kill-and-resume
stress run stays behind ``PPL_VI_RESUME_TRIALS`` in tests/test_reliability.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ppl_vi import run as rundir
from ppl_vi.config import read_config_file
from ppl_vi.models.configure import build_config
from ppl_vi.errors import ConfigError, PplViError
from test_robustness import cli as run_cli

REPO = Path(__file__).resolve().parents[1]
LG = ["linear-gaussian", "--device", "cpu", "--n-train", "100", "--n-test", "50", "--batch-size", "50", "--no-progress"]
PNG_START, PNG_END = b"\x89PNG\r\n\x1a\n", b"IEND\xaeB`\x82"
pytestmark = pytest.mark.filterwarnings("ignore:.*enumerate sites")


def cli(argv) -> tuple:
    """``ppl-vi ARGV`` in-process: (exit status, stderr)."""
    status, _, err = run_cli(argv)
    return status, err


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def start(argv) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ppl_vi", *map(str, argv)], cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_until(condition, proc=None, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) first: {proc.stderr.read()[-800:]}")
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.01)


def strict(text: str):
    return json.loads(text, parse_constant=lambda word: pytest.fail(f"bare {word}: not JSON"))


def assert_whole(run_dir: Path) -> None:
    """Every file a run writes is whole: a kill leaves old or new versions, never a part."""
    for path in run_dir.rglob("*"):
        if path.is_dir() or rundir._TEMPORARY.match(path.name) or path.name == rundir.LOCK:
            continue
        data = path.read_bytes()
        if path.suffix == ".json":
            assert isinstance(strict(data.decode()), dict), path
        elif path.name == rundir.HISTORY:
            lines = data.decode().split("\n")
            for line in lines[:-1]:  # a last line without its newline is an append cut short, skipped on read
                assert isinstance(strict(line), dict), path
        elif path.suffix == ".pt":
            rundir.load_checkpoint(path)
        elif path.suffix == ".png":
            assert data.startswith(PNG_START) and data.endswith(PNG_END), f"{path} is not a whole PNG"
        elif path.suffix == ".html":
            text = data.decode()
            assert text.rstrip().endswith("</html>") and 'base64,"' not in text, path


def model_state(run_dir: Path) -> dict:
    return torch.load(run_dir / rundir.CHECKPOINTS / "last.pt", weights_only=True)["model"]


def timing_free(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.endswith("_seconds")}


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so nothing on the way catches it."""


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """2 epochs x 2 steps, a checkpoint every step, then eval: the result every interrupted run must reach."""
    out = tmp_path_factory.mktemp("reference") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the tests run (conftest's per-test fixture comes after this module-scoped one)
    try:
        assert cli(["train", *LG, "--epochs", "2", "--checkpoint-every-steps", "1", "--out", out])[0] == 0
        assert cli(["eval", out, "--k", "1,3", "--no-progress"])[0] == 0
    finally:
        torch.set_num_threads(threads)
    return out


# ------------------------------------------------------------------------------------------------
# a kill at every write of train and eval (in-process, deterministic)


@contextlib.contextmanager
def kill_at_write(monkeypatch, n: int):
    """The n-th write (atomic file or history line) dies half-way, leaving what SIGKILL would: the
    old file and a half-written temporary (atomic writes), or half a line (history.jsonl)."""
    count = [0]
    atomic, append = rundir.atomic_write, rundir.append_history

    def dying_atomic(path, write):
        count[0] += 1
        if count[0] != n:
            return atomic(path, write)
        buffer = io.BytesIO()
        write(buffer)
        orphan = Path(path).parent / f".{Path(path).name}.killed00.tmp"
        orphan.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise Killed

    def dying_append(run_dir, record):
        count[0] += 1
        if count[0] != n:
            return append(run_dir, record)
        with open(Path(run_dir) / rundir.HISTORY, "a") as handle:
            handle.write(json.dumps(record)[:10])
        raise Killed

    monkeypatch.setattr(rundir, "atomic_write", dying_atomic)
    monkeypatch.setattr(rundir, "append_history", dying_append)
    try:
        yield count
    finally:
        monkeypatch.setattr(rundir, "atomic_write", atomic)
        monkeypatch.setattr(rundir, "append_history", append)


def _writes(monkeypatch, argv) -> int:
    with kill_at_write(monkeypatch, 0) as count:
        assert cli(argv)[0] == 0
    return count[0]


def test_a_kill_at_every_write_of_train_and_eval(reference, tmp_path, monkeypatch):
    """Killed at each write of a training run (then --resume, or the same command when config.json never
    landed), and at each write of eval (then eval again): whole files, no orphans, the uninterrupted result."""
    train_argv = ["train", *LG, "--epochs", "2", "--checkpoint-every-steps", "1"]
    eval_argv = ["eval", "{run}", "--k", "1,3", "--no-progress"]
    n_train = _writes(monkeypatch, [*train_argv, "--out", tmp_path / "count"])
    n_eval = _writes(monkeypatch, [a.format(run=tmp_path / "count") for a in eval_argv])
    assert n_train >= 12 and n_eval >= 4  # config, 4 + 2 + 2 checkpoints, history, metrics, figure, report, locks
    trained = tmp_path / "trained"
    assert cli([*train_argv, "--out", trained])[0] == 0
    reference_train = {k: v for k, v in rundir.read_json(trained / rundir.METRICS).items() if not k.endswith("seconds")}
    for n in range(1, n_train + n_eval + 1):
        run, in_train = tmp_path / f"kill{n}", n <= n_train
        if in_train:
            argv = [*train_argv, "--out", run]
        else:
            shutil.copytree(trained, run)
            argv = [a.format(run=run) for a in eval_argv]
        with kill_at_write(monkeypatch, n if in_train else n - n_train), pytest.raises(Killed):
            cli(argv)
        assert_whole(run)
        if in_train and (run / rundir.CONFIG).is_file():
            argv = ["train", "--resume", run, "--no-progress"]
        status, err = cli(argv)  # eval again, or the same train command when config.json never landed
        assert status == 0, f"write {n}: {err}"
        assert_whole(run)
        assert not [p for p in run.rglob("*.tmp")], f"write {n}: orphans left"
        got, want = model_state(run), model_state(reference)
        assert all(torch.equal(got[k], want[k]) for k in want), f"write {n}: parameters differ"
        metrics = timing_free(rundir.read_json(run / rundir.METRICS))
        if in_train:
            assert {k: v for k, v in metrics.items() if not k.endswith("seconds")} == reference_train, f"write {n}"
        else:
            assert metrics == timing_free(rundir.read_json(reference / rundir.METRICS)), f"write {n}"
        assert [r["epoch"] for r in rundir.read_history(run)] == [1, 2], f"write {n}"


# ------------------------------------------------------------------------------------------------
# real SIGKILLs at random moments of train's end (figures, report) and of eval


def kill_soon_after(proc: subprocess.Popen, condition, rng: random.Random) -> None:
    """SIGKILL ``proc`` 0-0.2 s (drawn from ``rng``) after ``condition()`` holds."""
    try:
        wait_until(condition, proc)
        time.sleep(rng.uniform(0.0, 0.2))
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()


def test_sigkill_at_random_moments_of_figures_report_and_eval(reference, tmp_path):
    """SIGKILL a real training process while it writes its figures and report, resume (the kernel has
    dropped its lock); SIGKILL a real eval while it writes metrics, figure and report, and eval again."""
    rng = random.Random(13)
    run = tmp_path / "run"
    # train writes metrics.json right before the figures and the report
    kill_soon_after(start(["train", *LG, "--epochs", "2", "--checkpoint-every-steps", "1", "--out", run]),
                    lambda: (run / rundir.METRICS).is_file(), rng)
    assert_whole(run)
    assert cli(["train", "--resume", run, "--no-progress"])[0] == 0  # the lock died with its holder
    before = (run / rundir.METRICS).stat().st_mtime_ns
    # eval writes bound_vs_k.png, then metrics.json, then (a lock note and) the report
    kill_soon_after(start(["eval", run, "--k", "1,3", "--no-progress"]),
                    lambda: (run / rundir.METRICS).stat().st_mtime_ns != before, rng)
    assert_whole(run)
    assert cli(["eval", run, "--k", "1,3", "--no-progress"])[0] == 0
    assert_whole(run)
    assert timing_free(rundir.read_json(run / rundir.METRICS)) == timing_free(rundir.read_json(
        reference / rundir.METRICS))


# ------------------------------------------------------------------------------------------------
# concurrent resume, SIGTERM, and the lock released by SIGKILL


def test_concurrent_resume_is_refused_naming_the_holder_and_sigterm_checkpoints(tmp_path):
    run = tmp_path / "run"
    assert cli(["train", *LG, "--epochs", "1", "--out", run])[0] == 0
    holder = start(["train", "--resume", run, "--epochs", "100000", "--no-progress"])
    try:
        wait_until(lambda: (run / rundir.LOCK_HOLDER).is_file()
                   and rundir.read_json(run / rundir.LOCK_HOLDER).get("pid") == holder.pid, holder)
        second = subprocess.run([sys.executable, "-m", "ppl_vi", "train", "--resume", str(run), "--epochs", "100000"],
                                cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        assert second.stderr.startswith(f"ppl-vi train: error: run directory {run} is in use by process "
                                        f"{holder.pid} on ") and second.stderr.count("\n") == 1, second.stderr
        for argv in (["eval", run, "--no-progress"], ["report", run]):
            status, err = cli(argv)
            assert status == 2 and f"is in use by process {holder.pid}" in err, err
        wait_until(lambda: rundir.read_history(run)[-1]["epoch"] >= 3, holder)
        holder.send_signal(signal.SIGTERM)
        err = holder.communicate(timeout=60)[1]
    finally:
        holder.kill()
    assert holder.returncode == 143, err
    assert err.startswith("ppl-vi train: terminated by SIGTERM ") and err.count("\n") == 1, err
    assert f"continue exactly from there with: ppl-vi train --resume {run}" in err
    state = torch.load(run / rundir.CHECKPOINTS / "last.pt", weights_only=True)  # written at the SIGTERM
    assert (f"after step {state['step']} (epoch {state['epoch'] + 1}, step {state['step_in_epoch']} of 2)"
            if state["step_in_epoch"] else f"at the end of epoch {state['epoch']} (step {state['step']})") in err
    assert not (run / rundir.LOCK_HOLDER).exists()
    # the SIGTERM checkpoint is an exact resume point: finish its epoch, compare with a run that never stopped
    epochs = state["epoch"] + 1
    assert cli(["train", "--resume", run, "--epochs", epochs, "--no-progress"])[0] == 0
    assert cli(["train", *LG, "--epochs", epochs, "--out", tmp_path / "straight"])[0] == 0
    got, want = model_state(run), model_state(tmp_path / "straight")
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert [r["epoch"] for r in rundir.read_history(run)] == list(range(1, epochs + 1))


def test_lock_is_released_after_an_error(tmp_path):
    run = tmp_path / "run"
    assert cli(["train", *LG, "--epochs", "1", "--out", run])[0] == 0
    assert cli(["train", "--resume", run, "--seed", "9", "--no-progress"])[0] == 2  # refused while holding it
    assert not (run / rundir.LOCK_HOLDER).exists()
    assert cli(["train", "--resume", run, "--epochs", "2", "--no-progress"])[0] == 0


# ------------------------------------------------------------------------------------------------
# a full disk and a read-only disk (a real tmpfs; needs root and mount)


@pytest.fixture
def tmpfs(tmp_path):
    """A 48 KiB tmpfs, or a skip (tests/test_robustness.py injects ENOSPC instead)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root, or no mount); ENOSPC is injected in test_robustness.py")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_disk_full_then_resume_with_space(reference, tmpfs):
    run = tmpfs / "run"
    status, err = cli(["train", *LG, "--epochs", "2", "--checkpoint-every-steps", "1", "--out", run])
    assert status == 2 and err.count("\n") == 1 and "No space left on device (ENOSPC)" in err, err
    assert_whole(run)
    assert not [p for p in run.rglob("*.tmp")]
    assert subprocess.run(["mount", "-o", "remount,size=2m", str(tmpfs)]).returncode == 0
    status, err = cli(["train", "--resume", run, "--no-progress"])
    assert status == 0, err
    got, want = model_state(run), model_state(reference)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)]).returncode == 0
    for argv in (["train", "--resume", run, "--epochs", "3", "--no-progress"], ["eval", run, "--no-progress"],
                 ["report", run]):
        status, err = cli(argv)
        assert status == 2 and err.count("\n") == 1 and "Read-only file system (EROFS)" in err, err


# ------------------------------------------------------------------------------------------------
# links inside a run directory


def test_linked_checkpoints_folder_and_history_are_refused(reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    outside = tmp_path / "outside"
    shutil.move(run / rundir.CHECKPOINTS, outside)
    (run / rundir.CHECKPOINTS).symlink_to(outside, target_is_directory=True)
    status, err = cli(["train", "--resume", run, "--epochs", "3", "--no-progress"])
    assert status == 2 and "checkpoints is a symbolic link" in err
    (run / rundir.CHECKPOINTS).unlink()
    shutil.move(outside, run / rundir.CHECKPOINTS)
    diary = tmp_path / "diary.txt"
    diary.write_text("mine\n")
    (run / rundir.HISTORY).unlink()
    (run / rundir.HISTORY).symlink_to(diary)
    status, err = cli(["train", "--resume", run, "--epochs", "3", "--no-progress"])
    assert status == 2 and "history.jsonl is a symbolic link" in err, err
    assert diary.read_text() == "mine\n"


# ------------------------------------------------------------------------------------------------
# malformed and oversized configs (property tests)

JSONISH = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                       lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                   max_size=3), max_leaves=6)
FIELDS = ["k", "beta", "epochs", "batch_size", "lr", "lr_decay", "seed", "hidden", "z_dim", "data_dir", "alpha",
          "max_minutes", "eval_k", "fast", "device", "nan_policy", "n_train", "components", "guide"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(FIELDS), JSONISH, min_size=1, max_size=4))
def test_any_config_values_give_a_valid_config_or_one_line(values):
    try:
        config = build_config("gmm", values)
    except ConfigError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 400
        return
    config.validate()  # what was accepted is typed and in range
    assert isinstance(config.epochs, int) and not isinstance(config.epochs, bool)
    assert all(isinstance(h, int) and 1 <= h <= 16384 for h in config.hidden)
    assert 0 <= config.seed < 2**32 and 0 < config.lr_decay <= 1


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400), st.sampled_from([".json", ".toml", ".yaml", ".txt"]),
       st.sampled_from([b"", b"{", b"model: gmm\n", b"a: &a [1]\nb: *a\n", b"\xff\xfe", b"[config]\n"]))
def test_any_config_file_bytes_give_a_mapping_or_one_line(tmp_path_factory, payload, suffix, prefix):
    pytest.importorskip("yaml")
    path = tmp_path_factory.mktemp("cfg") / f"config{suffix}"
    path.write_bytes(prefix + payload)
    try:
        data = read_config_file(path)
    except PplViError as exc:
        assert "\n" not in str(exc)
        return
    assert isinstance(data, dict)
