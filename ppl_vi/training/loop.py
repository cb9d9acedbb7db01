"""The training loop: epochs of steps, loss read-backs, epoch records, checkpoints, time budget.

Per epoch:

1. :func:`run_epoch`: the epoch's steps (:mod:`ppl_vi.training.batches`), each one
   ``trainer.train_step``; the step losses stay on the device and are read back every
   ``log_every`` steps (one host sync), where a NaN/inf stops the run naming the step
   (:mod:`ppl_vi.training.diagnosis`); with ``checkpoint_every_steps``, mid-epoch checkpoints;
2. :func:`finish_epoch`: the learning-rate schedule, the epoch record (train loss, β, seconds,
   validation loss every ``eval_every`` epochs, and for a model that classifies its validation and
   test accuracy) appended to history.jsonl, and the checkpoints
   (best first, then last) every ``checkpoint_every`` epochs and at the end;
3. the ``max_minutes`` budget, checked after each epoch (agreed over ranks when distributed).

Times (history's ``seconds``, ``train_seconds``, the budget) count the run's whole training time:
a resumed run starts from the time its checkpoint had recorded.

:func:`summary` is what ``fit`` returns, and what metrics.json starts from.
"""

from __future__ import annotations

import math
import re
import time
import warnings
from typing import List, Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ppl_vi import distributed
from ppl_vi import run as rundir
from ppl_vi.errors import Terminated, TrainingDiverged
from ppl_vi.metrics import classifier_accuracies
from ppl_vi.objectives.graph_step import fast_record
from ppl_vi.training.step import beta_at
from ppl_vi.training.tensorboard import log_epoch, tensorboard_writer


def fit(trainer) -> dict:
    """Train from ``trainer.epoch`` (0, or where a checkpoint left off) to ``config.epochs``."""
    cfg = trainer.config
    trainer.fit_started = time.perf_counter()
    if cfg.tensorboard and trainer.tb is None:
        trainer.tb = tensorboard_writer(trainer.run_dir)
    trainer.in_fit = True  # SIGTERM now waits for a step or an epoch to end (ppl_vi.training.signals)
    if trainer.fast is not None:  # what the fast path runs (and why), whatever --progress says
        trainer.fast.announce()
    try:
        while trainer.epoch < cfg.epochs:  # re-read every epoch: an epoch hook may change the plan
            losses = run_epoch(trainer, trainer.epoch)
            finish_epoch(trainer, losses, trainer.train_seconds())
            if trainer.stop_requested:
                stop(trainer, [], [])
            if cfg.max_minutes is not None and distributed.any_rank(trainer.train_seconds() > 60 * cfg.max_minutes,
                                                                    trainer.dist):
                break
    finally:
        trainer.in_fit = False
    return summary(trainer, trainer.train_seconds())


def run_epoch(trainer, epoch: int) -> List[Tensor]:
    """The steps of epoch ``epoch`` (0-based); returns every step loss of the epoch, on the device."""
    cfg = trainer.config
    # after a mid-epoch resume: the same permutation, its first `skip` steps already done
    skip, losses = trainer.step_in_epoch, list(trainer.epoch_losses)
    if not skip:
        trainer.epoch_data_state = trainer.data_generator.get_state()
    checked = len(losses)  # losses[:checked] have been read back (found finite)
    tracker = trainer.tracker  # a job's one bar (ppl_vi.progress.RunProgress), else a bar per epoch
    bar = tqdm(total=trainer.steps_per_epoch(), initial=skip, desc=f"epoch {epoch + 1}/{cfg.epochs}",
               disable=not trainer.progress or tracker is not None, leave=False, dynamic_ncols=True)
    try:
        for batches in trainer.batches(skip):
            if cfg.kl_anneal:
                trainer.beta.fill_(beta_at(trainer.step, cfg))
            trainer._last_batches = batches
            losses.append(trainer.train_step(batches))
            trainer.step += 1
            bar.update(1)
            if tracker is not None:
                tracker.advance("train")
            if len(losses) % cfg.log_every == 0:
                read_back(trainer, losses[checked:], bar)
                checked = len(losses)
            if trainer.stop_requested:
                stop(trainer, losses, losses[checked:])
            if cfg.checkpoint_every_steps and trainer.step % cfg.checkpoint_every_steps == 0 \
                    and trainer.run_dir is not None:
                read_back(trainer, losses[checked:], None)  # never checkpoint past an unchecked NaN
                checked = len(losses)
                trainer.step_in_epoch, trainer.epoch_losses = len(losses), losses
                trainer.save_checkpoint("last")
    finally:
        bar.close()
    read_back(trainer, losses[checked:], None)
    return losses


def stop(trainer, losses: List[Tensor], unchecked: List[Tensor]) -> None:
    """SIGTERM arrived: check the steps not yet read back, write last.pt where the run stands (mid-epoch
    after ``losses``, or at an epoch's end when ``losses`` is empty) and raise Terminated."""
    read_back(trainer, unchecked, None)
    where = (f"after step {trainer.step} (epoch {trainer.epoch + 1}, step {len(losses)} of "
             f"{trainer.steps_per_epoch()})" if losses else f"at the end of epoch {trainer.epoch} (step {trainer.step})")
    if trainer.run_dir is None:
        raise Terminated(f"terminated by SIGTERM {where}; no run directory, so nothing was saved")
    trainer.step_in_epoch, trainer.epoch_losses = len(losses), losses
    path = trainer.save_checkpoint("last")
    raise Terminated(f"terminated by SIGTERM {where}; checkpoint written to {path}; continue exactly from there "
                     f"with: ppl-vi train --resume {trainer.run_dir}")


def finish_epoch(trainer, losses: List[Tensor], seconds: float) -> dict:
    """Close an epoch: record (with validation), epoch hooks, schedule, history/TensorBoard/console, checkpoints.

    ``trainer.epoch_hooks`` run after the record is made and before the learning-rate schedule
    steps: a hook may change the run's remaining plan (``config.epochs``, the schedule)."""
    cfg = trainer.config
    trainer.epoch += 1
    trainer.step_in_epoch, trainer.epoch_losses = 0, []
    record = {"epoch": trainer.epoch, "step": trainer.step, "train_loss": mean_finite(losses),
              "beta": float(trainer.beta), "seconds": seconds}
    if trainer.dist.is_main and (trainer.epoch % cfg.eval_every == 0 or trainer.epoch == cfg.epochs):
        record["val_loss"] = trainer.validation_loss()
        # a classifier's accuracy per epoch (semi-supervised models): a curve only, nothing is selected on it
        record.update(classifier_accuracies(trainer.model, trainer.data))
    for hook in trainer.epoch_hooks:
        hook(trainer, record)
    with warnings.catch_warnings():  # a resume at an epoch's last step has no optimizer.step() in this process
        warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
        trainer.scheduler.step()
    trainer.history.append(record)
    log_epoch(trainer.tb, record, trainer.optimizer.param_groups[0]["lr"])
    rundir.append_history(trainer.run_dir, record)
    if trainer.progress:
        tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
    if trainer.run_dir is not None and (trainer.epoch % cfg.checkpoint_every == 0 or trainer.epoch == cfg.epochs):
        # best first, so that last.pt (what --resume reads) carries the updated best_val
        if record.get("val_loss", math.inf) < trainer.best_val:
            trainer.best_val = record["val_loss"]
            trainer.save_checkpoint("best")
        trainer.save_checkpoint("last")
    return record


def summary(trainer, seconds: float) -> dict:
    """The training summary that metrics.json starts from."""
    history = trainer.history
    return {"train_seconds": seconds, "epochs_done": trainer.epoch, "steps": trainer.step,
            "final_train_loss": history[-1]["train_loss"] if history else math.nan,
            "final_val_loss": history[-1].get("val_loss", math.nan) if history else math.nan,
            "skipped_steps": trainer.skipped_steps, "fast_path": fast_record(trainer)}


def mean_finite(losses: List[Tensor]) -> float:
    """Mean of the finite step losses (skipped NaN steps left out); NaN when there are none."""
    if not losses:
        return math.nan
    values = torch.stack(losses).float()
    values = values[torch.isfinite(values)]
    return values.mean().item() if values.numel() else math.nan


def read_back(trainer, recent: List[Tensor], bar: Optional[tqdm]) -> None:
    """One host sync: the recent losses and whether every weight is finite; a NaN/inf stops the run.

    The weights are checked too, because a loss can read finite with non-finite weights (the GMM's
    enumerated loss is exactly 0.0 once every parameter is NaN), and a checkpoint always follows a
    read-back: no checkpoint is written with non-finite weights, whatever the ``nan_policy``.
    """
    if not recent:
        return
    weights_finite = torch.stack([torch.isfinite(p).all() for p in trainer.model.parameters()]).all()
    values = torch.cat([torch.stack(recent).float().reshape(-1), weights_finite.float().reshape(1)]).cpu()
    values, weights_finite = values[:-1], bool(values[-1])
    finite = torch.isfinite(values)
    if not finite.all() and trainer.config.nan_policy == "stop":
        first = trainer.step - len(recent) + int((~finite).nonzero()[0])
        raise TrainingDiverged(f"loss became {values[~finite][0].item()} at step {first + 1} "
                               f"(epoch {trainer.epoch + 1}); {trainer._diagnose()}; {trainer._kept()}; "
                               "try a lower --lr, or --nan-policy skip to skip such steps")
    if not weights_finite:
        raise TrainingDiverged(f"weights became non-finite by step {trainer.step} (epoch {trainer.epoch + 1}) "
                               f"although the loss read {values[-1].item():.6g}; {trainer._diagnose()}; "
                               f"{trainer._kept()}; try a lower --lr or --lr-decay")
    if bar is not None and finite.any():
        bar.set_postfix(loss=f"{values[finite].mean().item():.3f}", beta=f"{float(trainer.beta):.3g}")
        if trainer.tracker is not None:
            trainer.tracker.status(f"train: epoch {trainer.epoch + 1}/{trainer.config.epochs}, "
                                   f"loss {values[finite].mean().item():.2f}")
    if trainer.tb is not None and finite.any():  # values are on the host already: no extra sync
        trainer.tb.add_scalar("train/loss", values[finite].mean().item(), trainer.step)
