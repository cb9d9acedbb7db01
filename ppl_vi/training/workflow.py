"""A whole training run in a run directory: start or resume, fit, final metrics.

``train(config, run_dir)`` is what ``ppl-vi train`` calls and what scripts call:

1. build the :class:`~ppl_vi.training.trainer.Trainer` (the data load first, so a bad data
   folder leaves no half-made run directory behind);
2. :func:`start_or_resume`: a new run directory (config.json written), or ``resume``: the state of
   checkpoints/last.pt, mid-epoch ones included, and history.jsonl cut back to that checkpoint;
3. ``trainer.fit()``;
4. :func:`finish`: metrics.json (training summary + :func:`ppl_vi.metrics.final_metrics`, and for
   a semi-supervised run its supervised-only baseline, :mod:`ppl_vi.training.baseline`); rank 0
   only under torchrun.

The figures and report.html are the job's (:func:`ppl_vi.job.train`, what ``ppl-vi train`` calls):
training does not draw evaluation's figures or pages.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Optional

from ppl_vi import distributed
from ppl_vi import run as rundir
from ppl_vi.config import TrainConfig
from ppl_vi.metrics import final_metrics
from ppl_vi.runtime import seed_everything
from ppl_vi.training.baseline import accuracy_gain, train_baselines
from ppl_vi.training.signals import stop_on_sigterm
from ppl_vi.training.trainer import Trainer


Log = Optional[Callable[[str], None]]


def train(config: TrainConfig, run_dir: Optional[Path] = None, *, resume: bool = False, progress: bool = True,
          overwrite: bool = False, log: Log = print) -> Trainer:
    """Train ``config`` into ``run_dir`` (optional); returns the trainer, ``.metrics`` as in metrics.json.

    The data load before a new run directory is created, so a bad data folder leaves nothing
    behind (``overwrite`` replaces a non-empty one). ``resume`` continues from checkpoints/last.pt,
    mid-epoch ones included, and drops history records written after that checkpoint. ``log``
    receives the one-line messages a user should see whatever ``progress`` says (where a resumed
    run continues and what its new flags changed); None silences them.

    The run directory is locked (:func:`ppl_vi.run.locked`) from before a resume reads it (so a
    second ``--resume`` is refused before loading any data) or from when a new one is made, to the
    end: another process training, resuming or evaluating it is refused with a line naming this
    one. SIGTERM writes a checkpoint and stops (:mod:`ppl_vi.training.signals`).
    """
    run_dir = None if run_dir is None else Path(run_dir)
    with contextlib.ExitStack() as stack:
        if resume and run_dir is not None and distributed.is_main_process():  # under torchrun only rank 0 writes
            stack.enter_context(rundir.locked(run_dir))
        trainer = Trainer(config, run_dir, progress)
        return run_training(trainer, run_dir, resume=resume, overwrite=overwrite, log=log)


def run_training(trainer: Trainer, run_dir: Optional[Path] = None, *, resume: bool = False,
                 overwrite: bool = False, log: Log = print) -> Trainer:
    """:func:`train` for a trainer already built (a caller may first use its model and data).
    Holds the run directory's lock throughout."""
    with contextlib.ExitStack() as stack:
        if trainer.run_dir is not None:  # rank 0 with a run directory; re-entrant after train()'s
            stack.enter_context(rundir.locked(trainer.run_dir, create=not resume))
        stack.enter_context(stop_on_sigterm(trainer))
        if run_dir is not None:
            message = start_or_resume(trainer, Path(run_dir), resume=resume, overwrite=overwrite)
            if message and log is not None and trainer.dist.is_main:
                log(message)
        step_before = trainer.step
        summary = trainer.fit()
        if trainer.run_dir is not None and trainer.step != step_before:
            message = drop_stale_evaluation(trainer.run_dir)
            if message and log is not None:
                log(message)
        trainer.metrics.update(finish(trainer, summary))
    return trainer


def start_or_resume(trainer: Trainer, run_dir: Path, *, resume: bool, overwrite: bool) -> Optional[str]:
    """Prepare ``run_dir`` for a new run, or load its last checkpoint into ``trainer``; on resume,
    returns the line that says where the run continues."""
    config = trainer.config
    last = run_dir / rundir.CHECKPOINTS / "last.pt"
    message = None
    if trainer.run_dir is not None and resume:
        rundir.check_folders(run_dir)
    if resume and last.is_file():
        trainer.load_state(rundir.load_checkpoint(last, trainer.device))
        message = resume_message(trainer, last)
        trainer.state.set_history(rundir.truncate_history(trainer.run_dir, trainer.step, trainer.epoch)
                                  if trainer.run_dir is not None else rundir.read_history(run_dir))
        if trainer.run_dir is not None:
            record = rundir.read_run_record(run_dir)
            changed = {k: [record["config"].get(k), v] for k, v in config.to_dict().items()
                       if record["config"].get(k) != v}
            if changed:  # e.g. more --epochs, a lower --lr: recorded, and said
                resumes = list(record.get("resumes") or []) + [{"epoch": trainer.epoch, "step": trainer.step,
                                                                 "changed": changed}]
                rundir.save_config(run_dir, config.to_dict(), rundir.environment(trainer.device), resumes)
                message += "; changed: " + changes_note(trainer, changed)
        if trainer.dist.rank > 0:  # the checkpoint holds rank 0's RNG: give the other ranks their own
            seed_everything(config.seed + trainer.dist.rank + trainer.dist.world_size * trainer.step)
    elif trainer.run_dir is not None:
        if resume:  # killed before its first checkpoint: start over in the same directory
            rundir.truncate_history(run_dir, 0, 0)
            message = f"resuming {run_dir}: no checkpoint was written before it stopped; starting from epoch 1"
        else:
            rundir.prepare_run_dir(run_dir, overwrite=overwrite)
        rundir.save_config(run_dir, config.to_dict(), rundir.environment(trainer.device))
    return message


def resume_message(trainer: Trainer, checkpoint: Path) -> str:
    """Where a resumed run continues: epoch, global step, position inside the epoch, time so far."""
    cfg, done = trainer.config, trainer.epoch
    head = (f"resuming from {checkpoint} (epoch {done} of {cfg.epochs} done, step {trainer.step}, "
            f"{trainer.seconds_before / 60:.1f} min trained)")
    if done >= cfg.epochs:
        return f"{head}: nothing left to train; pass --epochs N (> {done}) to train longer"
    if trainer.step_in_epoch:
        return (f"{head}: continuing epoch {done + 1} at step {trainer.step_in_epoch + 1} of "
                f"{trainer.steps_per_epoch()} (the {trainer.step_in_epoch} steps before it are not redone)")
    return (f"{head}: continuing with epoch {done + 1}; steps the stopped process took after this checkpoint "
            "are redone (--checkpoint-every-steps N also saves inside epochs)")


def changes_note(trainer: Trainer, changed: dict) -> str:
    """"epochs 2 -> 3; learning rate 0.02 x 1^epoch -> 0.004 x 0.5^epoch: Adam continues at 0.001 (...)"."""
    parts = [f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items() if k not in ("lr", "lr_decay")]
    if trainer.schedule_note:
        parts.append(trainer.schedule_note)
    return "; ".join(parts)


def drop_stale_evaluation(run_dir: Path) -> Optional[str]:
    """Remove an earlier ``ppl-vi eval``'s keys (``eval_keys``) and figures (``eval_figures``) from a run
    that has trained on: they describe a checkpoint that has since changed. Returns what was dropped."""
    path = run_dir / rundir.METRICS
    metrics = rundir.read_json(path) if path.is_file() else {}
    if "eval_keys" not in metrics:
        return None
    scored = f"{metrics.get('eval_checkpoint')} (epoch {metrics.get('eval_checkpoint_epoch')})"
    for name in metrics.get("eval_figures", []):
        parts = Path(str(name)).parts  # from metrics.json: never a path out of figures/
        if len(parts) == 2 and parts[0] == rundir.FIGURES and parts[1] not in ("..", "."):
            (run_dir / name).unlink(missing_ok=True)
    for key in metrics["eval_keys"]:
        metrics.pop(key, None)
    rundir.write_json(path, metrics)
    return f"dropped the earlier evaluation of {scored} from metrics.json (the run trained on); run ppl-vi eval again"


def finish(trainer: Trainer, summary: dict) -> dict:
    """metrics.json after ``fit``; closes TensorBoard and the process group."""
    run_dir = trainer.run_dir  # None on ranks > 0 under torchrun: only rank 0 writes
    if trainer.dist.is_main:  # + the supervised-only baseline of a semi-supervised run (labels alone)
        metrics = {**summary, **final_metrics(trainer.model, trainer.data),
                   **train_baselines(trainer.model, trainer.data, trainer.config, trainer.progress)}
        metrics.update(accuracy_gain(metrics))  # test accuracy minus the baseline's
    else:
        metrics = summary
    metrics = rundir.update_metrics(run_dir, **metrics)
    if trainer.tb is not None:
        trainer.tb.close()
    distributed.shutdown(trainer.dist)
    return metrics
