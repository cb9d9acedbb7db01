"""The Trainer: assembles one training run (model, loss, optimiser, data) and runs it.

It builds the parts and hands them to the modules beside it, which do the work:

=========================  ========================================================================
``state.py``               :class:`TrainState`: model, optimiser, scheduler, data order, counters,
                           history; the checkpoint format, its validation and exact resume
``batches.py``             one epoch's steps (plain, or labelled paired with unlabelled, weighted)
``step.py``                the Stepper protocol and the eager step; β schedule
``graph_step.py``          the fast path: hot path, sync-free loss, the CUDA-graph step
``loop.py``                ``fit(state, stepper, batches, hooks)``: epochs, read-backs, records,
                           checkpoint cadence, time budget
``diagnosis.py``           which term went NaN/inf, and what was kept
``workflow.py``            ``train()``: a whole run in a run directory (start/resume, metrics)
=========================  ========================================================================

The Trainer is the loop's :class:`~ppl_vi.training.loop.Hooks`: files, progress, SIGTERM, β and
the time budget. Each step evaluates ``loss.differentiable_loss(model, guide, **batch)`` (a Pyro
ELBO or ours), divides by the batch size (the loss is reported in nats per datapoint), and steps a
single ``torch.optim.Adam`` over all module parameters; Pyro's param store is not used for
optimisation. The loss stays on the device: it is read back every ``log_every`` steps (one host
sync), and a NaN/inf in any step is caught at that read-back, naming the first bad step.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, Iterator, List, Optional

import pyro
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ppl_vi import distributed
from ppl_vi import run as rundir
from ppl_vi.config import TrainConfig
from ppl_vi.data.sources import DataBundle, load_data
from ppl_vi.metrics import classifier_accuracies, iter_eval_batches
from ppl_vi.loss_registry import check_config
from ppl_vi.models.base import Batch, LatentModel, get_spec, scale_sites
from ppl_vi.objectives.losses import make_loss
from ppl_vi.runtime import resolve_device, seed_everything
from ppl_vi.training import batches as epoch_batches
from ppl_vi.training import diagnosis, loop, step
from ppl_vi.training.graph_step import FastLoss, GraphStep, flushing_subnormals, graph_blocker
from ppl_vi.training.state import TrainState
from ppl_vi.training.tensorboard import log_epoch, tensorboard_writer

EpochHook = Callable[["Trainer", dict], None]


class Trainer:
    """Owns model, loss, optimiser, data and the run directory for one training run.

    ``tracker``: a job's single progress bar (:class:`ppl_vi.progress.RunProgress`; None: a bar per
    epoch). ``epoch_hooks`` run at each epoch's end, after its record and before the schedule steps.
    """

    def __init__(self, config: TrainConfig, run_dir: Optional[Path] = None, progress: bool = True,
                 tracker=None, epoch_hooks: Optional[List[EpochHook]] = None):
        self.config, self.run_dir, self.progress = config, None if run_dir is None else Path(run_dir), progress
        self.device = distributed.device_for_rank(resolve_device(config.device))
        self.dist = distributed.init(self.device)  # a no-op unless launched by torchrun (ppl_vi.distributed)
        if not self.dist.is_main:  # only rank 0 writes the run directory and shows progress
            self.run_dir, self.progress = None, False
        if config.tensorboard:
            tensorboard_writer(None)  # fail fast (ConfigError) if not installed; the writer is made by fit()
        self.tb = None  # created in fit(): the run directory does not exist until the data have loaded
        self.tracker, self.epoch_hooks = tracker, list(epoch_hooks or [])
        seed_everything(config.seed)
        pyro.clear_param_store()
        pyro.enable_validation(False)  # validation off in the hot path (tests turn it on)
        self.spec = get_spec(config.model)
        check_config(config, self.spec)  # a model x loss combination that cannot train: one line, before any work
        self.data: DataBundle = load_data(self.spec.data, config, self.device)
        model: LatentModel = self.spec.build(config, self.data.info).to(self.device)
        distributed.broadcast_parameters(model, self.dist)
        if self.dist.enabled:  # independent particles per rank; the data order stays shared
            seed_everything(config.seed + self.dist.rank)
        self.loss = make_loss(config.loss, config.k, model.max_plate_nesting)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
        self.state = TrainState(config, model, optimizer,
                                torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=config.lr_decay),
                                torch.Generator().manual_seed(config.seed))
        self.beta = torch.tensor(step.beta_at(0, config), device=self.device)  # updated in place when annealing
        scaled = config.beta != 1.0 or config.kl_anneal > 0
        sites = self.model.beta_sites
        self.model_fn = scale_sites(self.model.model, sites, self.beta) if scaled else self.model.model
        self.guide_fn = scale_sites(self.model.guide, sites, self.beta) if scaled else self.model.guide
        self.make_batch = self.model.make_batch
        # semi-supervised: where the labelled batches go in an epoch, and their weight (batches.LabelledSchedule)
        self.schedule = None if self.data.labelled_idx is None else epoch_batches.LabelledSchedule.from_config(
            config, self.data.labelled_idx.numel(), self.steps_per_epoch())
        self._last_batches = None  # the latest step's batches (NaN diagnosis)
        self.in_fit = self.stop_wanted = False  # SIGTERM: checkpoint at the next step or epoch end (training.signals)
        self.schedule_note: Optional[str] = None  # a learning rate changed on resume (load_state)
        self.metrics: dict = {}  # metrics.json's content once the run has finished (training.workflow)
        # config.fast: validation and param-store registration off in the hot path, a sync-free loss,
        # and on CUDA the whole step captured in a CUDA graph (ppl_vi.training.graph_step); what the
        # fast path decides is written to stdout whatever --progress says, and kept for metrics.json
        self.fast = FastLoss(self.loss, self.model, self.device) if config.fast else None
        self.stepper = self._stepper()

    def _stepper(self) -> step.Stepper:
        """The eager step over this run's loss, parameters and optimiser; with ``config.fast`` the
        CUDA-graph step in front of it."""
        loss_fn = functools.partial(step.step_loss, self.fast or self.loss, self.model_fn, self.guide_fn)
        params = list(self.model.parameters())
        eager = step.EagerStep(loss_fn, params, self.optimizer, self.device, self.dist, self.config.nan_policy)
        if self.fast is None:
            return eager
        blocker = graph_blocker(self.device, self.fast, self.dist.enabled, self.config.nan_policy)
        return GraphStep(loss_fn, params, self.optimizer, self.device, eager, self.fast, blocker)

    # ---- the state (ppl_vi.training.state), read through the trainer ---------------------------
    model = property(lambda self: self.state.model, doc="the model being trained")
    optimizer = property(lambda self: self.state.optimizer)
    scheduler = property(lambda self: self.state.scheduler)
    data_generator = property(lambda self: self.state.data_generator)
    epoch = property(lambda self: self.state.epoch, doc="epochs completed")
    step = property(lambda self: self.state.step, doc="global steps taken")
    history = property(lambda self: self.state.history, doc="the epoch records")
    skipped_steps = property(lambda self: self.state.skipped_steps)
    step_in_epoch = property(lambda self: self.state.step_in_epoch)
    seconds_before = property(lambda self: self.state.seconds_before)
    best_val = property(lambda self: self.state.best_val)

    def train_seconds(self) -> float:
        return self.state.train_seconds()

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
        """One step outside :meth:`fit` (benchmarks, probes): the stepper's, counted in the state."""
        with flushing_subnormals(self.flushes):
            loss, applied = self.stepper.step(batches)
        self.state.count_step(applied)
        return loss

    # ---- the loop (ppl_vi.training.loop) -------------------------------------------------------
    def fit(self) -> dict:
        with flushing_subnormals(self.flushes):  # the fast path's CPU setting, restored when training ends
            return loop.fit(self.state, self.stepper, self.batches, self)

    @property
    def flushes(self) -> bool:
        """Whether training steps flush subnormal floats (the fast path on a CPU that can)."""
        return self.fast is not None and self.fast.flush_denormal

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

    # ---- the loop's hooks (ppl_vi.training.loop.Hooks) -----------------------------------------
    def begin(self) -> None:
        if self.config.tensorboard and self.tb is None:
            self.tb = tensorboard_writer(self.run_dir)
        self.in_fit = True  # SIGTERM now waits for a step or an epoch to end (ppl_vi.training.signals)

    def end(self) -> None:
        self.in_fit = False

    def before_step(self, global_step: int, batches: List[Batch]) -> None:
        if self.config.kl_anneal:
            self.beta.fill_(step.beta_at(global_step, self.config))
        self._last_batches = batches

    def request_stop(self) -> None:
        """SIGTERM (ppl_vi.training.signals): the loop checkpoints after this step or epoch, then stops."""
        self.stop_wanted = True

    def stop_requested(self) -> bool:
        return self.stop_wanted

    def epoch_progress(self, epoch: int, steps: int, done: int) -> "_EpochBar":
        return _EpochBar(self, epoch, steps, done)

    def beta_value(self) -> float:
        return float(self.beta)

    def evaluate(self, epoch: int) -> dict:
        if not self.dist.is_main or (epoch % self.config.eval_every and epoch != self.state.plan.epochs):
            return {}
        # a classifier's accuracy per epoch (semi-supervised models): a curve only, nothing is selected on it
        return {"val_loss": self.validation_loss(), **classifier_accuracies(self.model, self.data)}

    def epoch_end(self, record: dict) -> None:
        for hook in self.epoch_hooks:
            hook(self, record)

    def write_record(self, record: dict) -> None:
        log_epoch(self.tb, record, self.optimizer.param_groups[0]["lr"])
        rundir.append_history(self.run_dir, record)
        if self.progress:
            tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))

    def loss_read(self, global_step: int, value: float) -> None:
        if self.tb is not None:
            self.tb.add_scalar("train/loss", value, global_step)

    def over_budget(self, seconds: float) -> bool:
        budget = self.config.max_minutes
        return budget is not None and distributed.any_rank(seconds > 60 * budget, self.dist)

    def diagnose(self) -> str:
        """Which term went bad, and what was kept."""
        return f"{self._diagnose()}; {self._kept()}"

    # ---- diagnosis (ppl_vi.training.diagnosis) -------------------------------------------------
    def _diagnose(self) -> str:
        return diagnosis.diagnose(self.model, self.model_fn, self.guide_fn, self._last_batches)

    def _kept(self) -> str:
        return diagnosis.kept(self.run_dir, self.state.last_saved)

    # ---- checkpoints (ppl_vi.training.state) ---------------------------------------------------
    def save_checkpoint(self, name: str) -> Path:
        """Write ``RUN_DIR/checkpoints/NAME.pt``; ``last`` also becomes the checkpoint a divergence keeps."""
        path = self.run_dir / rundir.CHECKPOINTS / f"{name}.pt"
        rundir.save_checkpoint(path, self.state.state_dict())
        if name == "last":
            self.state.saved()
        return path

    def load_state(self, state: dict) -> None:
        """Continue exactly where ``state`` (a checkpoint) left off, mid-epoch included."""
        where = self.run_dir / rundir.CHECKPOINTS / "last.pt" if self.run_dir else "the checkpoint"
        self.schedule_note = self.state.load_state_dict(state, where)
        self.stepper.reset()
        self.beta.fill_(step.beta_at(self.step, self.config))


class _EpochBar:
    """An epoch's progress: a tqdm bar of its own, or the job's one bar (``trainer.tracker``)."""

    def __init__(self, trainer: Trainer, epoch: int, steps: int, done: int):
        self.trainer, self.tracker, self.epoch = trainer, trainer.tracker, epoch
        self.bar = tqdm(total=steps, initial=done, desc=f"epoch {epoch + 1}/{trainer.state.plan.epochs}",
                        disable=not trainer.progress or self.tracker is not None, leave=False, dynamic_ncols=True)

    def update(self) -> None:
        self.bar.update(1)
        if self.tracker is not None:
            self.tracker.advance("train")

    def show(self, loss: float) -> None:
        self.bar.set_postfix(loss=f"{loss:.3f}", beta=f"{float(self.trainer.beta):.3g}")
        if self.tracker is not None:
            self.tracker.status(f"train: epoch {self.epoch + 1}/{self.trainer.state.plan.epochs}, loss {loss:.2f}")

    def close(self) -> None:
        self.bar.close()
