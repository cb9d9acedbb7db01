"""The run directory: everything needed to reproduce, resume and report a run.

::

    RUN_DIR/
      config.json          the resolved TrainConfig, plus versions, device, git commit, command line,
                           and the settings each --resume changed ("resumes")
      metrics.json         final and test metrics (ppl-vi eval adds test_* keys)
      history.jsonl        one JSON line per epoch (training curves)
      checkpoints/last.pt  the latest state (model, optimiser, RNG, epoch, step, data order, β)
      checkpoints/best.pt  the state with the best validation loss
      figures/*.png        plots (samples, reconstructions, curves, bound against k, ...)
      check.json           the consistency check (ppl-vi check --json / ppl-vi report --check)
      report.html          the run report
      .lock, .lock.json    the run-directory lock and who holds it (while a process writes here)

* **Atomic writes.** Every file, figures and the report included, is written to a temporary file
  ``.NAME.XXXXXXXX.tmp`` beside it, fsynced and renamed over the old one (:func:`atomic_write`):
  a kill at any moment leaves the previous version or the new one, never a part. A temporary file
  orphaned by a kill is removed when the directory is next opened under its lock.
* **Strict JSON.** ``json`` writes NaN and infinities as the bare words ``NaN`` / ``Infinity``,
  which are not JSON. Here they are written as the strings ``"NaN"``, ``"Infinity"`` and
  ``"-Infinity"`` (the convention of protobuf's JSON mapping) and read back as floats.
* **No links followed.** Run files are opened with ``O_NOFOLLOW`` and replaced by rename, which
  replaces a symbolic link rather than writing through it; a run directory whose ``checkpoints``
  or ``figures`` folder is a link is refused.
* **One writer.** :func:`locked` holds an exclusive ``flock`` on ``RUN_DIR/.lock`` (the
  ``filelock`` package) while a process writes the directory; another process is refused with a
  line naming the holder. The kernel drops the lock when its process dies, however it dies.
* **Safe loading.** Checkpoints are read with ``torch.load(weights_only=True)``, so a file from
  someone else cannot run code when loaded; what a checkpoint must hold to resume is checked by
  :class:`ppl_vi.training.state.TrainState` (its format lives there).

Disk-full, read-only and permission errors become a one-line :class:`~ppl_vi.errors.RunDirError`.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import math
import os
import platform
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import filelock
import pyro
import torch

import ppl_vi
from ppl_vi.errors import CheckpointError, ConfigError, RunDirError
from ppl_vi.runtime import device_name

CONFIG, METRICS, HISTORY = "config.json", "metrics.json", "history.jsonl"
CHECKPOINTS, FIGURES, TENSORBOARD = "checkpoints", "figures", "tensorboard"
REPORT, CHECK = "report.html", "check.json"
LOCK, LOCK_HOLDER = ".lock", ".lock.json"
#: what ``--overwrite`` removes (anything else in the folder is left alone)
RUN_ENTRIES = (CONFIG, METRICS, HISTORY, REPORT, CHECK, CHECKPOINTS, FIGURES, TENSORBOARD)
MAX_JSON_BYTES = 64 * 2**20  # a run's JSON files are kilobytes; this only stops a hostile one
_TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")  # tempfile.mkstemp(prefix=".NAME.", suffix=".tmp")
_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_UMASK = os.umask(0o022)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK  # what open() would have given the file (mkstemp makes it 0600)


# ----------------------------------------------------------------------------------------------
# Atomic, one-line-on-failure writes


def _os_message(action: str, path: Path, exc: OSError) -> str:
    code = errno.errorcode.get(exc.errno or 0)
    reason = f"{exc.strerror or exc}" + (f" ({code})" if code else "")
    return f"cannot {action} {path}: {reason}"


class _RecordingHandle:
    """A file handle that remembers the OSError its ``write`` raised: ``torch.save`` turns a disk-full
    write into an opaque ``RuntimeError`` ("unexpected pos ..."), and this recovers the real cause."""

    def __init__(self, handle):
        self.handle, self.error = handle, None

    def write(self, data):
        try:
            return self.handle.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self):
        return self.handle.flush()

    def __getattr__(self, name):  # tell, seek, fileno, ... of the real handle
        return getattr(self.handle, name)


def atomic_write(path: Path, write: Callable) -> None:
    """Call ``write(handle)`` on a temporary file beside ``path``, fsync it and rename it over ``path``.

    A kill leaves the old ``path`` (or none) and at most an orphan ``.NAME.XXXXXXXX.tmp``; an
    exception leaves the old ``path`` and no temporary file. A symbolic link at ``path`` is
    replaced, never written through. OSErrors (disk full, read-only, permissions) become one line.
    """
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        raise RunDirError(f"cannot write {path}: it is a directory; expected a file name")
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            recording = _RecordingHandle(handle)
            try:
                write(recording)
            except RuntimeError:
                if recording.error is not None:  # torch.save hid an OSError
                    raise recording.error from None
                raise
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
        tmp = None
        _fsync_directory(path.parent)
    except OSError as exc:
        raise RunDirError(_os_message("write", path, exc) + "; the previous version, if any, is intact") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _fsync_directory(folder: Path) -> None:
    """Make a rename durable (power loss), where the platform allows opening a directory."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_file(path: Path, max_bytes: int) -> bytes:
    """The bytes of the regular file ``path``, never through a symbolic link, at most ``max_bytes``."""
    path = Path(path)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise RunDirError(f"{path} is a symbolic link; ppl_vi never follows links in a run directory "
                              "(put the file itself there)") from None
        raise RunDirError(_os_message("read", path, exc)) from None
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"{path} is not a regular file; expected a file")
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ConfigError(f"{path} is larger than {max_bytes} bytes, the most ppl_vi reads from such a file")
    return data


# ----------------------------------------------------------------------------------------------
# Strict JSON


def json_safe(value: Any) -> Any:
    """``value`` as plain JSON types: tensors as lists, paths as strings, NaN / ±inf as strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else ("NaN" if math.isnan(value) else
                                                   "Infinity" if value > 0 else "-Infinity")
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, dict):
        return {k if isinstance(k, (str, int, bool)) or k is None else str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return json_safe(value.tolist())
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return json_safe(value.item())
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _restore_nonfinite(value: Any) -> Any:
    if isinstance(value, str):
        return _NONFINITE.get(value, value)
    if isinstance(value, dict):
        return {k: _restore_nonfinite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_restore_nonfinite(v) for v in value]
    return value


def json_text(data: Any, indent: Optional[int] = 2) -> str:
    """Strict JSON text of ``data`` (see :func:`json_safe`); never the bare words NaN or Infinity."""
    return json.dumps(json_safe(data), indent=indent, allow_nan=False)


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented strict JSON, atomically."""
    text = json_text(data)
    atomic_write(Path(path), lambda h: h.write(text.encode() + b"\n"))


def _parse_json(raw: bytes, path: Path) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))  # still accepts the bare NaN of files from older versions
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text; expected a JSON file") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise ConfigError(f"{path} is nested too deeply to be a ppl_vi JSON file") from None


def read_json(path: Path, *, restore_nonfinite: bool = True) -> dict:
    """A JSON object from ``path`` (never through a link, at most MAX_JSON_BYTES); one line otherwise.

    ``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` are read back as floats unless
    ``restore_nonfinite`` is False (config.json, whose strings are names and paths).
    """
    path = Path(path)
    data = _parse_json(read_file(path, MAX_JSON_BYTES), path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path} holds a JSON {type(data).__name__}; expected a JSON object "
                          "(a run's files are written by ppl_vi)")
    return _restore_nonfinite(data) if restore_nonfinite else data


# ----------------------------------------------------------------------------------------------
# The folder: empty or not, overwrite, orphans, links


def _is_bookkeeping(path: Path, run_dir: Path) -> bool:
    return (path.parent == run_dir and path.name in (LOCK, LOCK_HOLDER)) or bool(_TEMPORARY.match(path.name))


def user_files(run_dir: Path) -> list:
    """Files (and links) in ``run_dir`` other than ppl_vi's bookkeeping: the lock and orphan temporaries."""
    found = []
    for folder, dirs, files in os.walk(run_dir, followlinks=False):
        base = Path(folder)
        found += [base / d for d in dirs if (base / d).is_symlink()]  # a linked folder is content, not followed
        found += [base / f for f in files if not _is_bookkeeping(base / f, run_dir)]
    return found


def check_run_dir(path: Optional[str], *, overwrite: bool = False, resume: bool = False) -> Optional[Path]:
    """Validate ``path`` as a run directory to create (or resume) without touching the disk.

    The CLI calls this before loading data, and :func:`prepare_run_dir` only once data have
    loaded, so a failed start leaves no half-made run directory behind. A folder that holds only
    ppl_vi's bookkeeping (a lock, a temporary file orphaned by a kill before config.json was
    renamed into place, empty folders) counts as empty.
    """
    if path is None:
        return None
    run_dir = Path(path)
    if resume:
        if not (run_dir / CONFIG).is_file():
            hint = (" (a run killed before it wrote config.json: start it again with the same --out)"
                    if run_dir.is_dir() and not user_files(run_dir) else " (not a run directory)")
            raise ConfigError(f"cannot resume: {run_dir} holds no {CONFIG}{hint}")
        return run_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"output path {run_dir} exists and is not a directory; expected a new or empty folder")
    if run_dir.exists() and user_files(run_dir) and not overwrite:
        raise ConfigError(f"output directory {run_dir} exists and is not empty; pass --resume to continue "
                          "that run or --overwrite to replace it")
    return run_dir


def _remove(path: Path) -> None:
    """Remove a file, a link (never its target) or a folder tree."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def remove_orphans(run_dir: Path) -> list:
    """Delete temporary files a killed writer left behind; call only while holding the lock."""
    removed = []
    for folder in (run_dir, run_dir / CHECKPOINTS, run_dir / FIGURES):
        if folder.is_dir() and not folder.is_symlink():
            for path in folder.iterdir():
                if _TEMPORARY.match(path.name) and (path.is_file() or path.is_symlink()):
                    path.unlink(missing_ok=True)
                    removed.append(path)
    return removed


def check_folders(run_dir: Path) -> None:
    """Refuse a run directory whose checkpoints/figures/tensorboard folder is a link or a file."""
    for name in (CHECKPOINTS, FIGURES, TENSORBOARD):
        folder = run_dir / name
        if folder.is_symlink():
            raise RunDirError(f"{folder} is a symbolic link; ppl_vi never writes through links in a run "
                              "directory (replace it with a real folder)")
        if folder.exists() and not folder.is_dir():
            raise RunDirError(f"{folder} is not a folder; expected the run's {name} folder")


def prepare_run_dir(path: Optional[str], *, overwrite: bool = False, resume: bool = False) -> Optional[Path]:
    """Make ``path`` ready for a new run (call it holding :func:`locked`); ``resume`` only checks.

    A non-empty folder is refused unless ``overwrite``, which removes the run's own entries
    (:data:`RUN_ENTRIES`: config, metrics, history, report, check.json, checkpoints/, figures/,
    tensorboard/; links are removed, not followed) and leaves anything else.
    """
    run_dir = check_run_dir(path, overwrite=overwrite, resume=resume)
    if run_dir is None or resume:
        return run_dir
    try:
        if overwrite:
            for name in RUN_ENTRIES:
                _remove(run_dir / name)
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_orphans(run_dir)
        check_folders(run_dir)
        (run_dir / CHECKPOINTS).mkdir(exist_ok=True)
        (run_dir / FIGURES).mkdir(exist_ok=True)
    except OSError as exc:
        raise RunDirError(_os_message("prepare", run_dir, exc)) from None
    return run_dir


# ----------------------------------------------------------------------------------------------
# The lock

_HELD: dict = {}  # resolved run directory -> how many nested `locked` blocks of this process hold it


def _holder(run_dir: Path) -> str:
    try:
        info = read_json(run_dir / LOCK_HOLDER)
        return (f"process {info.get('pid', '?')} on {info.get('host', '?')} ({info.get('command', '?')}, "
                f"since {info.get('since', '?')})")
    except Exception:  # noqa: BLE001 - the holder may be between taking the lock and saying so
        return "another process"


@contextlib.contextmanager
def locked(run_dir: Path, *, create: bool = False) -> Iterator[Path]:
    """Hold ``RUN_DIR``'s lock for the block (re-entrant within a process); refuse if another has it.

    ``create`` makes the folder first (a new run). The lock is an exclusive, non-blocking flock
    on ``RUN_DIR/.lock`` through ``filelock``; ``RUN_DIR/.lock.json`` says who holds it. Taking
    it removes the temporary files a killed writer left behind.
    """
    run_dir = Path(run_dir)
    key = str(run_dir.resolve())
    if _HELD.get(key):
        _HELD[key] += 1
        try:
            yield run_dir
        finally:
            _HELD[key] -= 1
        return
    try:
        if create:
            run_dir.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(str(run_dir / LOCK))
        lock.acquire(timeout=0)
    except filelock.Timeout:
        raise RunDirError(f"run directory {run_dir} is in use by {_holder(run_dir)}; wait for it to finish "
                          "or stop it, then try again") from None
    except OSError as exc:
        raise RunDirError(_os_message("lock", run_dir, exc)) from None
    _HELD[key] = 1
    try:
        remove_orphans(run_dir)  # no other writer can be mid-write now
        write_json(run_dir / LOCK_HOLDER, {
            "pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
            "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")})
        yield run_dir
    finally:
        _HELD.pop(key, None)
        with contextlib.suppress(OSError):
            (run_dir / LOCK_HOLDER).unlink(missing_ok=True)
        lock.release()


# ----------------------------------------------------------------------------------------------
# config.json, metrics.json, history.jsonl


def environment(device: torch.device) -> dict:
    """Versions, device and git commit: what a reproduction needs to know."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "ppl_vi": ppl_vi.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "device_name": device_name(device),
        "command": " ".join(sys.argv),
        "git_commit": _git_commit(),
    }
    return info


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def save_config(run_dir: Path, config_dict: dict, env: dict, resumes: Optional[list] = None) -> None:
    """config.json: the resolved config, the environment, and what each resume changed (if any)."""
    record = {"config": config_dict, "environment": env}
    if resumes:
        record["resumes"] = resumes
    write_json(run_dir / CONFIG, record)


def read_run_record(run_dir: Path) -> dict:
    """The whole of config.json: ``config`` (a mapping), ``environment``, ``resumes``."""
    path = Path(run_dir) / CONFIG
    data = read_json(path, restore_nonfinite=False)
    if not isinstance(data.get("config"), dict):
        raise ConfigError(f"{path} has no 'config' object; expected a config.json written by ppl-vi train")
    return data


def load_config_dict(run_dir: Path) -> dict:
    """The ``config`` mapping saved in a run directory."""
    return read_run_record(run_dir)["config"]


def update_metrics(run_dir: Optional[Path], **values) -> dict:
    """Merge ``values`` into metrics.json (atomically) and return the whole mapping."""
    if run_dir is None:
        return values
    path = Path(run_dir) / METRICS
    metrics = read_json(path) if path.exists() or path.is_symlink() else {}
    metrics.update(values)
    write_json(path, metrics)
    return metrics


def append_history(run_dir: Optional[Path], record: dict) -> None:
    """Append one strict-JSON line to history.jsonl (never through a link)."""
    if run_dir is None:
        return
    path = Path(run_dir) / HISTORY
    line = (json_text(record, indent=None) + "\n").encode()
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, _FILE_MODE)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
    except OSError as exc:
        raise RunDirError(_os_message("append to", path, exc)) from None


def read_history(run_dir: Path) -> list:
    """The records of history.jsonl; a line cut short by a kill mid-append is dropped."""
    path = Path(run_dir) / HISTORY
    if not (path.exists() or path.is_symlink()):
        return []
    records = []
    for line in read_file(path, MAX_JSON_BYTES).decode("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            continue
        if isinstance(record, dict):
            records.append(_restore_nonfinite(record))
    return records


def truncate_history(run_dir: Optional[Path], step: int, epoch: int) -> list:
    """Keep the records a checkpoint at (``step``, ``epoch``) had seen; rewrite history.jsonl atomically.

    On resume, records written after the checkpoint (by the killed process) would otherwise be
    written twice. An epoch's record is kept when its ``epoch`` <= the checkpoint's completed
    epochs: a mid-epoch checkpoint taken on an epoch's last step has the same ``step`` as that
    epoch's record but not its epoch, and the resumed run writes that record again. Records
    without an ``epoch`` are kept when their ``step`` <= the checkpoint's.
    """
    if run_dir is None:
        return []

    def seen(r: dict) -> bool:
        if isinstance(r.get("epoch"), int):
            return r["epoch"] <= epoch
        return isinstance(r.get("step"), int) and r["step"] <= step

    kept = [r for r in read_history(run_dir) if seen(r)]
    text = "".join(json_text(r, indent=None) + "\n" for r in kept)
    if kept or (Path(run_dir) / HISTORY).exists():
        atomic_write(Path(run_dir) / HISTORY, lambda h: h.write(text.encode()))
    return kept


# ----------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(path: Path, state: dict) -> None:
    """``torch.save`` atomically: temporary file, fsync, rename."""
    atomic_write(Path(path), lambda h: torch.save(state, h))


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """Load a checkpoint safely (``weights_only=True``); one-line errors for bad files."""
    path = Path(path)
    if path.is_symlink():
        raise CheckpointError(f"cannot load checkpoint {path}: it is a symbolic link (ppl_vi never follows links "
                              "in a run directory)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated, foreign or unsafe
        text = str(exc)
        named = re.search(r"GLOBAL ([\w.]+)", text)
        if named or "unsupported class" in text.lower():  # a pickle that would import or call something
            what = f" such as {named.group(1)}" if named else ""
            reason = (f"it contains objects other than tensors and plain containers{what} "
                      "(refused: loading could run code)")
        else:  # garbage, a truncated zip, an unknown pickle opcode
            reason = f"it is truncated or not a torch checkpoint ({type(exc).__name__})"
        raise CheckpointError(f"cannot load checkpoint {path}: {reason}") from None
    if not isinstance(state, dict) or "model" not in state or "ppl_vi" not in state:
        raise CheckpointError(f"cannot load checkpoint {path}: not a ppl_vi checkpoint (missing model state)")
    model = state["model"]
    if not isinstance(model, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in model.items()):
        raise CheckpointError(f"cannot load checkpoint {path}: its model state is not a mapping of names to "
                              "tensors (not written by ppl-vi train)")
    return state


def default_run_dir(model: str, root: Path = Path("runs"), now: Optional[datetime.datetime] = None) -> Path:
    """``runs/MODEL-YYYYmmdd-HHMMSS`` (``-2``, ``-3``, ... if that exists): where ``ppl-vi train``
    puts a run when no ``--out`` is given, so that nothing trained is lost."""
    stamp = (now or datetime.datetime.now()).strftime("%Y%m%d-%H%M%S")
    path, n = Path(root) / f"{model}-{stamp}", 1
    while path.exists():
        n += 1
        path = Path(root) / f"{model}-{stamp}-{n}"
    return path
