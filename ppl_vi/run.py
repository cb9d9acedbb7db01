"""The run directory: everything needed to reproduce, resume and report a run.

::

    RUN_DIR/
      config.json          the resolved TrainConfig, plus versions, device, git commit, command line
      metrics.json         final and test metrics (ppl-vi eval adds test_* keys)
      history.jsonl        one JSON line per logged step / epoch (training curves)
      checkpoints/last.pt  the latest state (model, optimiser, RNG, epoch, step, data order, β)
      checkpoints/best.pt  the state with the best validation loss
      figures/*.png        plots (samples, reconstructions, curves, bound against k, ...)

Every file is written atomically (temporary file, fsync, rename): a kill at any moment leaves the
previous version intact. Checkpoints are read with ``torch.load(weights_only=True)``, so a file
from someone else cannot run code when loaded.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import pyro
import torch

import ppl_vi
from ppl_vi.errors import CheckpointError, ConfigError

CONFIG, METRICS, HISTORY = "config.json", "metrics.json", "history.jsonl"
CHECKPOINTS, FIGURES = "checkpoints", "figures"


def _atomic_write_bytes(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    text = json.dumps(data, indent=2, sort_keys=False, default=_jsonable)
    _atomic_write_bytes(Path(path), lambda h: h.write(text.encode() + b"\n"))


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None


def check_run_dir(path: Optional[str], *, overwrite: bool = False, resume: bool = False) -> Optional[Path]:
    """Validate ``path`` as a run directory to create (or resume) without touching the disk.

    The CLI calls this before loading data, and :func:`prepare_run_dir` only once data have
    loaded, so a failed start leaves no half-made run directory behind.
    """
    if path is None:
        return None
    run_dir = Path(path)
    if resume:
        if not (run_dir / CONFIG).is_file():
            raise ConfigError(f"cannot resume: {run_dir} holds no {CONFIG} (not a run directory)")
        return run_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"output path {run_dir} exists and is not a directory; expected a new or empty folder")
    if run_dir.exists() and any(p.is_file() for p in run_dir.rglob("*")) and not overwrite:
        raise ConfigError(f"output directory {run_dir} exists and is not empty; pass --resume to continue "
                          "that run or --overwrite to replace it")
    return run_dir


def prepare_run_dir(path: Optional[str], *, overwrite: bool = False, resume: bool = False) -> Optional[Path]:
    """Create ``path`` for a new run; refuse to reuse a non-empty one unless told.

    ``resume`` requires an existing run; ``overwrite`` clears the known run files first.
    """
    run_dir = check_run_dir(path, overwrite=overwrite, resume=resume)
    if run_dir is None or resume:
        return run_dir
    if run_dir.exists() and any(p.is_file() for p in run_dir.rglob("*")):
        for name in (CONFIG, METRICS, HISTORY, "report.html"):
            (run_dir / name).unlink(missing_ok=True)
        for folder in (CHECKPOINTS, FIGURES):
            for f in (run_dir / folder).glob("*") if (run_dir / folder).is_dir() else []:
                f.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CHECKPOINTS).mkdir(exist_ok=True)
    (run_dir / FIGURES).mkdir(exist_ok=True)
    return run_dir


def environment(device: torch.device) -> dict:
    """Versions, device and git commit: what a reproduction needs to know."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "ppl_vi": ppl_vi.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
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


def save_config(run_dir: Path, config_dict: dict, env: dict) -> None:
    write_json(run_dir / CONFIG, {"config": config_dict, "environment": env})


def load_config_dict(run_dir: Path) -> dict:
    """The ``config`` mapping saved in a run directory."""
    data = read_json(Path(run_dir) / CONFIG)
    if "config" not in data:
        raise ConfigError(f"{run_dir}/{CONFIG} has no 'config' section")
    return data["config"]


def update_metrics(run_dir: Optional[Path], **values) -> dict:
    """Merge ``values`` into metrics.json (atomically) and return the whole mapping."""
    if run_dir is None:
        return values
    path = Path(run_dir) / METRICS
    metrics = read_json(path) if path.is_file() else {}
    metrics.update(values)
    write_json(path, metrics)
    return metrics


def append_history(run_dir: Optional[Path], record: dict) -> None:
    if run_dir is None:
        return
    with open(Path(run_dir) / HISTORY, "a") as handle:
        handle.write(json.dumps(record, default=_jsonable) + "\n")


def read_history(run_dir: Path) -> list:
    """The records of history.jsonl; a line cut short by a kill mid-append is dropped."""
    path = Path(run_dir) / HISTORY
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def truncate_history(run_dir: Optional[Path], step: int, epoch: int) -> list:
    """Keep the records a checkpoint at (``step``, ``epoch``) had seen; rewrite history.jsonl atomically.

    On resume, records written after the checkpoint (by the killed process) would otherwise be
    written twice. Records with a ``step`` are kept when ``step`` <= the checkpoint's; others
    when their ``epoch`` <= the checkpoint's.
    """
    if run_dir is None:
        return []
    kept = [r for r in read_history(run_dir)
            if (r["step"] <= step if isinstance(r.get("step"), int) else r.get("epoch", 0) <= epoch)]
    text = "".join(json.dumps(r, default=_jsonable) + "\n" for r in kept)
    if kept or (Path(run_dir) / HISTORY).exists():
        _atomic_write_bytes(Path(run_dir) / HISTORY, lambda h: h.write(text.encode()))
    return kept


def save_checkpoint(path: Path, state: dict) -> None:
    """``torch.save`` atomically: temporary file, fsync, rename."""
    _atomic_write_bytes(Path(path), lambda h: torch.save(state, h))


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """Load a checkpoint safely (``weights_only=True``); one-line errors for bad files."""
    path = Path(path)
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
