"""Checkpoint I/O of a training run: what a checkpoint holds, and how a run continues from one.

A checkpoint (``RUN_DIR/checkpoints/{last,best}.pt``, written atomically by :mod:`ppl_vi.run`)
holds everything an exact resume needs:

* model, optimiser and scheduler state; epoch, global step, best validation loss, skipped steps,
  and the training time so far (``train_seconds``: a resumed run's clock continues from it);
* the RNG states (torch CPU and CUDA, Python) and the data-order generator, both its current
  state and its state at the start of the epoch (which regenerates the epoch's permutation);
* the position inside an epoch (``step_in_epoch`` > 0 for a ``--checkpoint-every-steps``
  checkpoint) and the losses of the steps already done in it.

:func:`restore` puts all of it back into a freshly built trainer, so that the continued run is
bit-for-bit the run that was interrupted (``tests/test_reliability.py``).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Optional

import torch

from ppl_vi import run as rundir
from ppl_vi.errors import CheckpointError, ConfigError
from ppl_vi.objectives.graph_step import plain_optimizer
from ppl_vi.training.step import beta_at

#: settings that decide an epoch's batches: a mid-epoch resume must keep them
DATA_ORDER_FIELDS = ("seed", "batch_size", "n_train", "val_size", "labels", "labelled_every", "labelled_batch_size")


def trainer_state(trainer) -> dict:
    """The checkpoint of ``trainer`` as a dict of tensors and plain containers."""
    return {
        "ppl_vi": 1,
        "model_name": trainer.config.model,
        "config": trainer.config.to_dict(),
        "model": trainer.model.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "epoch": trainer.epoch,
        "step": trainer.step,
        "best_val": trainer.best_val,
        "skipped_steps": trainer.skipped_steps,
        "train_seconds": trainer.train_seconds(),  # cumulative: a resumed run's clock continues from here
        "step_in_epoch": trainer.step_in_epoch,  # > 0: a mid-epoch checkpoint
        "epoch_losses": torch.stack(trainer.epoch_losses).cpu() if trainer.epoch_losses else torch.zeros(0),
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": list(random.getstate()[1]),
            "python_pos": random.getstate()[2],
            "data": trainer.data_generator.get_state(),
            "data_epoch_start": trainer.epoch_data_state,  # regenerates this epoch's permutation
        },
    }


def save(trainer, name: str) -> Path:
    """Write ``RUN_DIR/checkpoints/NAME.pt``; ``last`` also becomes the checkpoint a divergence keeps."""
    path = trainer.run_dir / rundir.CHECKPOINTS / f"{name}.pt"
    rundir.save_checkpoint(path, trainer.state())
    if name == "last":
        trainer.last_saved = (trainer.epoch, trainer.step)
    return path


def restore(trainer, state: dict) -> None:
    """Continue exactly where ``state`` (from :func:`trainer_state`) left off, mid-epoch included."""
    config = trainer.config
    if state.get("model_name") != config.model:
        raise ConfigError(f"checkpoint is for model {state.get('model_name')!r}, not {config.model!r}")
    step_in_epoch = state.get("step_in_epoch", 0)
    saved = state.get("config") if isinstance(state.get("config"), dict) else {}
    changed = [f for f in DATA_ORDER_FIELDS if f in saved and saved[f] != getattr(config, f)]
    if step_in_epoch and changed:
        raise ConfigError(f"cannot resume mid-epoch with changed {', '.join(changed)} (the epoch's batches "
                          "would differ); resume with the run's own settings")
    if "seed" in saved and saved["seed"] != config.seed:
        raise ConfigError(f"cannot resume with seed {config.seed}: the run's random state comes from its checkpoint "
                          f"(seed {saved['seed']}); for another seed start a new run (ppl-vi train --config "
                          "RUN_DIR/config.json --seed N --out NEW_DIR)")
    rundir.check_resume_state(state, trainer.run_dir / rundir.CHECKPOINTS / "last.pt" if trainer.run_dir
                              else "the checkpoint")
    try:
        trainer.model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise ConfigError(f"checkpoint does not fit this model: {str(exc).splitlines()[0]}") from None
    try:
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.scheduler.load_state_dict(state["scheduler"])
        trainer.epoch, trainer.step, trainer.best_val = state["epoch"], state["step"], state["best_val"]
        trainer.skipped_steps = state.get("skipped_steps", 0)
        trainer.seconds_before, trainer.fit_started = float(state.get("train_seconds", 0.0)), None
        rng = state["rng"]
        torch.set_rng_state(rng["torch"].cpu())  # RNG states are CPU byte tensors, whatever map_location
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
        random.setstate((3, tuple(rng["python"]), rng["python_pos"]))
        data_state = (rng["data_epoch_start"] if step_in_epoch else rng["data"]).cpu()
        epoch_losses = state["epoch_losses"] if step_in_epoch else None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"checkpoint is incomplete or from another version ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}); expected one written by "
                              "ppl-vi train") from None
    plain_optimizer(trainer.optimizer)  # a CUDA-graph run saves a capturable Adam; the fast path redoes it
    trainer.schedule_note = apply_schedule(trainer, saved)
    if trainer.fast is not None:
        trainer.fast.reset()
    trainer.data_generator.set_state(data_state)
    trainer.epoch_data_state = data_state
    trainer.step_in_epoch = step_in_epoch
    trainer.epoch_losses = list(epoch_losses.to(trainer.device).unbind()) if step_in_epoch else []
    trainer.last_saved = (trainer.epoch, trainer.step)
    trainer.beta.fill_(beta_at(trainer.step, config))


def apply_schedule(trainer, saved: dict) -> Optional[str]:
    """``--lr`` / ``--lr-decay`` given with ``--resume``: the restored Adam and scheduler take them.

    The learning rate continues as a run with the new settings would have it at this epoch,
    lr × lr_decay^epoch (Adam's moment estimates and step counts are kept), and the scheduler
    decays by the new factor from here on. Unchanged settings leave the restored state untouched
    (bitwise). Returns what changed, for the resume message, or None.
    """
    config = trainer.config
    old_lr, old_decay = saved.get("lr", config.lr), saved.get("lr_decay", config.lr_decay)
    if (old_lr, old_decay) == (config.lr, config.lr_decay):
        return None
    lr = config.lr * config.lr_decay ** trainer.epoch
    for group in trainer.optimizer.param_groups:
        group["lr"], group["initial_lr"] = lr, config.lr
    scheduler = trainer.scheduler
    scheduler.base_lrs = [config.lr] * len(trainer.optimizer.param_groups)
    scheduler.gamma = config.lr_decay
    scheduler._last_lr = [lr] * len(trainer.optimizer.param_groups)
    return (f"learning rate {old_lr:g} x {old_decay:g}^epoch -> {config.lr:g} x {config.lr_decay:g}^epoch: Adam "
            f"continues at {lr:.6g} (epoch {trainer.epoch}), keeping its moment estimates")
