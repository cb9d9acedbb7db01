"""Optional TensorBoard scalars (``--tensorboard``), written at the trainer's existing read-backs.

``tensorboard`` is an optional dependency (``pip install -e ".[tensorboard]"``), so it is
imported only when asked for; without it ``--tensorboard`` is a one-line ConfigError before
anything is written.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from ppl_vi.errors import ConfigError

TENSORBOARD = "tensorboard"  # RUN_DIR/tensorboard

#: epoch-record keys and their scalar tags
EPOCH_TAGS = (("train_loss", "train/epoch_loss"), ("val_loss", "val/loss"), ("beta", "train/beta"))


def tensorboard_writer(run_dir: Optional[Path]):
    """A ``SummaryWriter`` into ``RUN_DIR/tensorboard``, or a one-line ConfigError if unavailable.

    Returns None when there is no run directory (nothing to write into; e.g. DDP ranks > 0).
    """
    try:
        from torch.utils.tensorboard import SummaryWriter  # optional heavy dependency: imported late
    except ImportError:
        raise ConfigError("--tensorboard needs the tensorboard package: pip install tensorboard "
                          "(or train without --tensorboard)") from None
    if run_dir is None:
        return None
    return SummaryWriter(log_dir=str(Path(run_dir) / TENSORBOARD))


def log_epoch(writer, record: dict, lr: float) -> None:
    """Epoch-end scalars at the global step: epoch train loss, val loss, β and the learning rate."""
    if writer is None:
        return
    for key, tag in EPOCH_TAGS:
        if key in record and math.isfinite(record[key]):
            writer.add_scalar(tag, record[key], record["step"])
    writer.add_scalar("train/lr", lr, record["step"])
    writer.flush()
