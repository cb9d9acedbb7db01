"""The training loop: ``fit(state, stepper, batches, hooks)``.

Per epoch:

1. :func:`run_epoch`: the epoch's steps (``batches(skip)``, :mod:`ppl_vi.training.batches`), each
   one ``stepper.step`` (:mod:`ppl_vi.training.step`); the step losses stay on the device and are
   read back every ``log_every`` steps (one host sync), where a NaN/inf stops the run naming the
   step (:mod:`ppl_vi.training.diagnosis`); with ``checkpoint_every_steps``, mid-epoch checkpoints;
2. :func:`finish_epoch`: the epoch record (train loss, β, seconds, and what ``hooks.evaluate`` adds:
   validation loss every ``eval_every`` epochs, a classifier's accuracies), ``hooks.epoch_end``
   (a job's budget may change the plan here), the learning-rate schedule, the record written
   (``hooks.write_record``), and the checkpoints (best first, then last) every
   ``checkpoint_every`` epochs and at the end;
3. the time budget (``hooks.over_budget``), checked after each epoch.

The loop changes the :class:`~ppl_vi.training.state.TrainState` only through its methods, and
reaches everything else (files, progress, signals, the time budget) through ``hooks``
(:class:`Hooks`). Times count the run's whole training time: a resumed run starts from the time its
checkpoint had recorded. :func:`summary` is what ``fit`` returns, and what metrics.json starts from.
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Protocol

import torch
from torch import Tensor

from ppl_vi.config import TrainConfig
from ppl_vi.errors import Terminated, TrainingDiverged
from ppl_vi.models.base import Batch
from ppl_vi.training.state import TrainState
from ppl_vi.training.step import Stepper

Batches = Callable[[int], Iterator[List[Batch]]]  # skip -> the epoch's steps after the first `skip`


class Hooks(Protocol):
    """What the loop asks of the run around it (the :class:`~ppl_vi.training.trainer.Trainer` gives it)."""

    config: TrainConfig
    run_dir: Optional[Path]  # where checkpoints go (None: nowhere)

    def begin(self) -> None:
        """fit() starts (TensorBoard, SIGTERM routed to the loop, the fast path's notes)."""

    def end(self) -> None:
        """fit() ends, however it ends."""

    def before_step(self, step: int, batches: List[Batch]) -> None:
        """β for global step ``step``; the batches kept for a NaN diagnosis."""

    def stop_requested(self) -> bool:
        """SIGTERM arrived: checkpoint where the run stands and stop."""

    def epoch_progress(self, epoch: int, steps: int, done: int):
        """A progress handle for the epoch: ``update()``, ``show(loss)``, ``close()``."""

    def evaluate(self, epoch: int) -> dict:
        """What the epoch's record adds (validation loss, accuracies), or {}."""

    def beta_value(self) -> float:
        """The KL weight now (for the epoch's record)."""

    def epoch_end(self, record: dict) -> None:
        """After the record, before the schedule steps."""

    def write_record(self, record: dict) -> None:
        """history.jsonl, TensorBoard, the console."""

    def loss_read(self, step: int, value: float) -> None:
        """A read-back's mean loss (TensorBoard)."""

    def save_checkpoint(self, name: str) -> Path:
        """Write ``run_dir``/checkpoints/NAME.pt of the state; its path."""

    def diagnose(self) -> str:
        """Which term went non-finite (and what was kept)."""

    def over_budget(self, seconds: float) -> bool:
        """The time budget is spent (agreed over ranks)."""

    def steps_per_epoch(self) -> int:
        """Steps in one epoch."""


def fit(state: TrainState, stepper: Stepper, batches: Batches, hooks: Hooks) -> dict:
    """Train from ``state.epoch`` (0, or where a checkpoint left off) to ``state.plan.epochs``."""
    state.start_clock()
    hooks.begin()
    stepper.announce()
    try:
        while state.epoch < state.plan.epochs:  # re-read every epoch: an epoch hook may change the plan
            losses = run_epoch(state, stepper, batches, hooks)
            finish_epoch(state, hooks, losses, state.train_seconds())
            if hooks.stop_requested():
                stop(state, hooks, [], [])
            if hooks.over_budget(state.train_seconds()):
                break
    finally:
        hooks.end()
    return summary(state, stepper, state.train_seconds())


def run_epoch(state: TrainState, stepper: Stepper, batches: Batches, hooks: Hooks) -> List[Tensor]:
    """The steps of the epoch after ``state.epoch``; returns every step loss of the epoch, on the device."""
    cfg = hooks.config
    # after a mid-epoch resume: the same permutation, its first `skip` steps already done
    skip, losses = state.begin_epoch()
    checked = len(losses)  # losses[:checked] have been read back (found finite)
    bar = hooks.epoch_progress(state.epoch, hooks.steps_per_epoch(), skip)
    try:
        for step_batches in batches(skip):
            hooks.before_step(state.step, step_batches)
            loss, applied = stepper.step(step_batches)
            losses.append(loss)
            state.count_step(applied)
            bar.update()
            if len(losses) % cfg.log_every == 0:
                read_back(state, hooks, losses[checked:], bar)
                checked = len(losses)
            if hooks.stop_requested():
                stop(state, hooks, losses, losses[checked:])
            if cfg.checkpoint_every_steps and state.step % cfg.checkpoint_every_steps == 0 \
                    and hooks.run_dir is not None:
                read_back(state, hooks, losses[checked:], None)  # never checkpoint past an unchecked NaN
                checked = len(losses)
                state.hold_position(losses)
                hooks.save_checkpoint("last")
    finally:
        bar.close()
    read_back(state, hooks, losses[checked:], None)
    return losses


def stop(state: TrainState, hooks: Hooks, losses: List[Tensor], unchecked: List[Tensor]) -> None:
    """SIGTERM arrived: check the steps not yet read back, write last.pt where the run stands (mid-epoch
    after ``losses``, or at an epoch's end when ``losses`` is empty) and raise Terminated."""
    read_back(state, hooks, unchecked, None)
    where = (f"after step {state.step} (epoch {state.epoch + 1}, step {len(losses)} of "
             f"{hooks.steps_per_epoch()})" if losses else f"at the end of epoch {state.epoch} (step {state.step})")
    if hooks.run_dir is None:
        raise Terminated(f"terminated by SIGTERM {where}; no run directory, so nothing was saved")
    state.hold_position(losses)
    path = hooks.save_checkpoint("last")
    raise Terminated(f"terminated by SIGTERM {where}; checkpoint written to {path}; continue exactly from there "
                     f"with: ppl-vi train --resume {hooks.run_dir}")


def finish_epoch(state: TrainState, hooks: Hooks, losses: List[Tensor], seconds: float) -> dict:
    """Close an epoch: record (with validation), epoch hooks, schedule, history/TensorBoard/console, checkpoints.

    ``hooks.epoch_end`` runs after the record is made and before the learning-rate schedule steps:
    a job's budget may change the run's remaining plan (``state.replan``)."""
    cfg = hooks.config
    state.end_epoch()
    record = {"epoch": state.epoch, "step": state.step, "train_loss": mean_finite(losses),
              "beta": hooks.beta_value(), "seconds": seconds}
    record.update(hooks.evaluate(state.epoch))
    hooks.epoch_end(record)
    with warnings.catch_warnings():  # a resume at an epoch's last step has no optimizer.step() in this process
        warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
        state.scheduler.step()
    state.add_record(record)
    hooks.write_record(record)
    if hooks.run_dir is not None and (state.epoch % cfg.checkpoint_every == 0 or state.epoch == state.plan.epochs):
        # best first, so that last.pt (what --resume reads) carries the updated best_val
        if state.improves(record.get("val_loss", math.inf)):
            hooks.save_checkpoint("best")
        hooks.save_checkpoint("last")
    return record


def summary(state: TrainState, stepper: Stepper, seconds: float) -> dict:
    """The training summary that metrics.json starts from."""
    history = state.history
    return {"train_seconds": seconds, "epochs_done": state.epoch, "steps": state.step,
            "final_train_loss": history[-1]["train_loss"] if history else math.nan,
            "final_val_loss": history[-1].get("val_loss", math.nan) if history else math.nan,
            "skipped_steps": state.skipped_steps, "fast_path": stepper.record()}


def mean_finite(losses: List[Tensor]) -> float:
    """Mean of the finite step losses (skipped NaN steps left out); NaN when there are none."""
    if not losses:
        return math.nan
    values = torch.stack(losses).float()
    values = values[torch.isfinite(values)]
    return values.mean().item() if values.numel() else math.nan


def read_back(state: TrainState, hooks: Hooks, recent: List[Tensor], bar) -> None:
    """One host sync: the recent losses and whether every weight is finite; a NaN/inf stops the run.

    The weights are checked too, because a loss can read finite with non-finite weights (the GMM's
    enumerated loss is exactly 0.0 once every parameter is NaN), and a checkpoint always follows a
    read-back: no checkpoint is written with non-finite weights, whatever the ``nan_policy``.
    """
    if not recent:
        return
    weights_finite = torch.stack([torch.isfinite(p).all() for p in state.model.parameters()]).all()
    values = torch.cat([torch.stack(recent).float().reshape(-1), weights_finite.float().reshape(1)]).cpu()
    values, weights_finite = values[:-1], bool(values[-1])
    finite = torch.isfinite(values)
    if not finite.all() and hooks.config.nan_policy == "stop":
        first = state.step - len(recent) + int((~finite).nonzero()[0])
        raise TrainingDiverged(f"loss became {values[~finite][0].item()} at step {first + 1} "
                               f"(epoch {state.epoch + 1}); {hooks.diagnose()}; "
                               "try a lower --lr, or --nan-policy skip to skip such steps")
    if not weights_finite:
        raise TrainingDiverged(f"weights became non-finite by step {state.step} (epoch {state.epoch + 1}) "
                               f"although the loss read {values[-1].item():.6g}; {hooks.diagnose()}; "
                               "try a lower --lr or --lr-decay")
    if finite.any():
        mean = values[finite].mean().item()  # values are on the host already: no extra sync
        if bar is not None:
            bar.show(mean)
        hooks.loss_read(state.step, mean)
