"""The Trainer: one training run's model, loss, optimiser, data, RNG and position, in one place.

It assembles the pieces and keeps the state; the work is done by the modules beside it:

=========================  ========================================================================
``batches.py``             one epoch's steps (plain, or labelled paired with unlabelled)
``step.py``                one SVI step: loss per datapoint, backward, all-reduce, Adam; β schedule
``loop.py``                epochs, loss read-backs, epoch records, checkpoint cadence, time budget
``checkpoint.py``          what a checkpoint holds; exact resume
``diagnosis.py``           which term went NaN/inf, and what was kept
``workflow.py``            ``train()``: a whole run in a run directory (start/resume, metrics, report)
=========================  ========================================================================

Each step evaluates ``loss.differentiable_loss(model, guide, **batch)`` (a Pyro ELBO or ours),
divides by the batch size (the loss is reported in nats per datapoint), and steps a single
``torch.optim.Adam`` over all module parameters; Pyro's param store is not used for optimisation.
The loss stays on the device: it is read back every ``log_every`` steps (one host sync), and a
NaN/inf in any step is caught at that read-back, naming the first bad step.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple

import pyro
import torch
from torch import Tensor

from ppl_vi import distributed
from ppl_vi.config import TrainConfig
from ppl_vi.data.sources import DataBundle, load_data
from ppl_vi.metrics import iter_eval_batches
from ppl_vi.models.base import Batch, LatentModel, default_make_batch, get_spec, scale_sites
from ppl_vi.objectives.graph_step import FastStep
from ppl_vi.objectives.losses import check_config, make_loss
from ppl_vi.runtime import resolve_device, seed_everything
from ppl_vi.training import batches as epoch_batches
from ppl_vi.training import checkpoint, diagnosis, loop, step
from ppl_vi.training.tensorboard import tensorboard_writer


class Trainer:
    """Owns model, loss, optimiser, data and the run directory for one training run."""

    def __init__(self, config: TrainConfig, run_dir: Optional[Path] = None, progress: bool = True):
        self.config, self.run_dir, self.progress = config, None if run_dir is None else Path(run_dir), progress
        self.device = distributed.device_for_rank(resolve_device(config.device))
        self.dist = distributed.init(self.device)  # a no-op unless launched by torchrun (ppl_vi.distributed)
        if not self.dist.is_main:  # only rank 0 writes the run directory and shows progress
            self.run_dir, self.progress = None, False
        if config.tensorboard:
            tensorboard_writer(None)  # fail fast (ConfigError) if not installed; the writer is made by fit()
        self.tb = None  # created in fit(): the run directory does not exist until the data have loaded
        seed_everything(config.seed)
        pyro.clear_param_store()
        pyro.enable_validation(False)  # validation off in the hot path (tests turn it on)
        self.spec = get_spec(config.model)
        check_config(config, self.spec)  # a model x loss combination that cannot train: one line, before any work
        self.data: DataBundle = load_data(self.spec.data, config, self.device)
        self.model: LatentModel = self.spec.build(config, self.data.info).to(self.device)
        distributed.broadcast_parameters(self.model, self.dist)
        if self.dist.enabled:  # independent particles per rank; the data order stays shared
            seed_everything(config.seed + self.dist.rank)
        self.loss = make_loss(config.loss, config.k, self.model.max_plate_nesting)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, gamma=config.lr_decay)
        self.beta = torch.tensor(step.beta_at(0, config), device=self.device)  # updated in place when annealing
        scaled = config.beta != 1.0 or config.kl_anneal > 0
        sites = getattr(self.model, "beta_sites", self.model.latent_sites)
        self.model_fn = scale_sites(self.model.model, sites, self.beta) if scaled else self.model.model
        self.guide_fn = scale_sites(self.model.guide, sites, self.beta) if scaled else self.model.guide
        self.make_batch = getattr(self.model, "make_batch", default_make_batch)
        # semi-supervised: where the labelled batches go in an epoch, and their weight (batches.LabelledSchedule)
        self.schedule = None if self.data.labelled_idx is None else epoch_batches.LabelledSchedule.from_config(
            config, self.data.labelled_idx.numel(), self.steps_per_epoch())
        self.data_generator = torch.Generator().manual_seed(config.seed)
        self.epoch, self.step, self.best_val = 0, 0, math.inf
        self.skipped_steps = 0
        self.history: List[dict] = []
        # training time: seconds spent before this process (from a checkpoint), and when fit() started here
        self.seconds_before, self.fit_started = 0.0, None
        # position inside the current epoch, for an exact mid-epoch resume (--checkpoint-every-steps): the
        # data generator's state before the epoch's permutation was drawn, the steps done, their losses
        self.epoch_data_state = self.data_generator.get_state()
        self.step_in_epoch, self.epoch_losses = 0, []
        self.last_saved: Optional[Tuple[int, int]] = None  # (epoch, step) of the last checkpoint written or loaded
        self._last_batches = None  # the latest step's batches (NaN diagnosis)
        self.in_fit = self.stop_requested = False  # SIGTERM: checkpoint at the next step or epoch end (training.signals)
        self.resume_note: Optional[str] = None  # what a resume restored and changed (training.workflow)
        self.schedule_note: Optional[str] = None  # a learning rate changed on resume (training.checkpoint)
        self.tracker = None  # a job's single progress bar (ppl_vi.progress.RunProgress); None: a bar per epoch
        self.epoch_hooks: List[Callable[["Trainer", dict], None]] = []  # run at each epoch's end (loop.finish_epoch)
        # config.fast: validation and param-store registration off in the hot path, a sync-free loss,
        # and on CUDA the whole step captured in a CUDA graph (ppl_vi.objectives.graph_step)
        # what the fast path decides is written to stdout whatever --progress says, and kept for metrics.json
        self.fast = FastStep(self) if config.fast else None

    # ---- batches (ppl_vi.training.batches) -----------------------------------------------------
    def _x(self, idx: Tensor) -> Tensor:
        return epoch_batches.training_images(self.data, idx)

    def batches(self, skip: int = 0) -> Iterator[List[Batch]]:
        """One epoch of steps, each a list of batches whose (weighted) losses are summed; the first
        ``skip`` steps are passed over without being built (a mid-epoch resume)."""
        return epoch_batches.epoch_steps(self.data, self.config.batch_size, self.data_generator, self.device,
                                         self._x, self.make_batch, self.dist.shard, skip, self.schedule)

    def steps_per_epoch(self) -> int:
        return epoch_batches.steps_per_epoch(self.data, self.config.batch_size)

    # ---- one step (ppl_vi.training.step) -------------------------------------------------------
    def step_loss(self, batches: List[Batch]) -> Tensor:
        """Summed loss over the step's batches, per datapoint (divided by the datapoints)."""
        return step.step_loss(self.fast or self.loss, self.model_fn, self.guide_fn, batches)

    def train_step(self, batches: List[Batch]) -> Tensor:
        return step.train_step(self, batches)

    # ---- the loop (ppl_vi.training.loop) -------------------------------------------------------
    def fit(self) -> dict:
        return loop.fit(self)

    def train_seconds(self) -> float:
        """Training time of the run so far, over every process that trained it (resumes included)."""
        now = 0.0 if self.fit_started is None else time.perf_counter() - self.fit_started
        return self.seconds_before + now

    @torch.no_grad()
    def validation_loss(self) -> float:
        """Mean per-datapoint loss on the validation set (same objective, no gradient)."""
        x = self.data.val_x if self.data.val_x is not None else self.data.test_x
        y = self.data.val_y if self.data.val_x is not None else self.data.test_y
        labelled = self.spec.data != "mnist-semisupervised"
        total, count = 0.0, 0
        for xb, yb in iter_eval_batches(x, y, 1000):
            batch = self.make_batch(xb, yb if labelled else None)
            total += float(self.loss.loss(self.model.model, self.model.guide, **batch))
            count += xb.shape[0]
        return total / count

    # ---- diagnosis (ppl_vi.training.diagnosis) -------------------------------------------------
    def _diagnose(self) -> str:
        return diagnosis.diagnose(self.model, self.model_fn, self.guide_fn, self._last_batches)

    def _kept(self) -> str:
        return diagnosis.kept(self.run_dir, self.last_saved)

    # ---- checkpoints (ppl_vi.training.checkpoint) ----------------------------------------------
    def state(self) -> dict:
        return checkpoint.trainer_state(self)

    def save_checkpoint(self, name: str) -> Path:
        return checkpoint.save(self, name)

    def load_state(self, state: dict) -> None:
        """Continue exactly where ``state`` (from :meth:`state`) left off, mid-epoch included."""
        checkpoint.restore(self, state)
