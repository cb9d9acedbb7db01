"""A whole training run in a run directory: start or resume, fit, final metrics, figures, report.

``train(config, run_dir)`` is what ``ppl-vi train`` calls and what scripts call:

1. build the :class:`~ppl_vi.training.trainer.Trainer` (the data load first, so a bad data
   folder leaves no half-made run directory behind);
2. :func:`start_or_resume`: a new run directory (config.json written), or ``resume``: the state of
   checkpoints/last.pt, mid-epoch ones included, and history.jsonl cut back to that checkpoint;
3. ``trainer.fit()``;
4. :func:`finish`: metrics.json (training summary + :func:`ppl_vi.metrics.final_metrics`), the
   figures and report.html (rank 0 only under torchrun).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ppl_vi import distributed, plots
from ppl_vi import run as rundir
from ppl_vi.config import TrainConfig
from ppl_vi.metrics import final_metrics
from ppl_vi.report import write_report
from ppl_vi.runtime import seed_everything
from ppl_vi.training.trainer import Trainer


def train(config: TrainConfig, run_dir: Optional[Path] = None, *, resume: bool = False, progress: bool = True,
          figures: bool = True, overwrite: bool = False) -> Trainer:
    """Train ``config`` into ``run_dir`` (optional); returns the trainer, ``.metrics`` as in metrics.json.

    The data load before a new run directory is created, so a bad data folder leaves nothing
    behind (``overwrite`` replaces a non-empty one). ``resume`` continues from checkpoints/last.pt,
    mid-epoch ones included, and drops history records written after that checkpoint.
    """
    trainer = Trainer(config, run_dir, progress)
    if run_dir is not None:
        start_or_resume(trainer, Path(run_dir), resume=resume, overwrite=overwrite)
    summary = trainer.fit()
    trainer.metrics = finish(trainer, summary, figures=figures)
    return trainer


def start_or_resume(trainer: Trainer, run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Prepare ``run_dir`` for a new run, or load its last checkpoint into ``trainer``."""
    config = trainer.config
    last = run_dir / rundir.CHECKPOINTS / "last.pt"
    if resume and last.is_file():
        trainer.load_state(rundir.load_checkpoint(last, trainer.device))
        trainer.history = rundir.truncate_history(trainer.run_dir, trainer.step, trainer.epoch) \
            if trainer.run_dir is not None else rundir.read_history(run_dir)
        if trainer.run_dir is not None and rundir.load_config_dict(run_dir) != config.to_dict():
            rundir.save_config(run_dir, config.to_dict(), rundir.environment(trainer.device))  # e.g. more --epochs
        if trainer.dist.rank > 0:  # the checkpoint holds rank 0's RNG: give the other ranks their own
            seed_everything(config.seed + trainer.dist.rank + trainer.dist.world_size * trainer.step)
    elif trainer.run_dir is not None:
        if resume:  # killed before its first checkpoint: start over in the same directory
            rundir.truncate_history(run_dir, 0, 0)
        else:
            rundir.prepare_run_dir(run_dir, overwrite=overwrite)
        rundir.save_config(run_dir, config.to_dict(), rundir.environment(trainer.device))


def finish(trainer: Trainer, summary: dict, *, figures: bool = True) -> dict:
    """metrics.json, figures and report.html after ``fit``; closes TensorBoard and the process group."""
    run_dir = trainer.run_dir  # None on ranks > 0 under torchrun: only rank 0 writes
    metrics = {**summary, **final_metrics(trainer.model, trainer.data)} if trainer.dist.is_main else summary
    metrics = rundir.update_metrics(run_dir, **metrics)
    if run_dir is not None and figures:
        plots.training_figures(run_dir, trainer.model, trainer.data, trainer.history)
    if run_dir is not None:
        write_report(run_dir)
    if trainer.tb is not None:
        trainer.tb.close()
    distributed.shutdown(trainer.dist)
    return metrics
