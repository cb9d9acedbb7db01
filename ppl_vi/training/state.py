"""The training state: what a run has become, and the one place its checkpoint format is written and read.

A :class:`TrainState` holds the model, the optimiser and its scheduler, the data-order generator, the
counters (epoch, global step, skipped steps, best validation loss, training seconds), the position
inside an epoch and the epoch records (``history``). Only its own methods change it; the loop
(:mod:`ppl_vi.training.loop`) calls them.

A checkpoint (``RUN_DIR/checkpoints/{last,best}.pt``, written atomically by :mod:`ppl_vi.run`) is
:meth:`TrainState.state_dict`, format 1 (``"ppl_vi": 1``):

* model, optimiser and scheduler state; epoch, global step, best validation loss, skipped steps,
  and the training time so far (``train_seconds``: a resumed run's clock continues from it);
* the RNG states (torch CPU and CUDA, Python) and the data-order generator, both its current
  state and its state at the start of the epoch (which regenerates the epoch's permutation);
* the position inside an epoch (``step_in_epoch`` > 0 for a ``--checkpoint-every-steps``
  checkpoint) and the losses of the steps already done in it;
* the config it was trained with and the model's name.

:meth:`TrainState.validate` refuses, in one line, a checkpoint that cannot continue this run (another
model, another seed, changed data settings mid-epoch) or whose fields are not what is written here;
:meth:`TrainState.load_state_dict` then puts all of it back, so that the continued run is bit for bit
the run that was interrupted (``tests/test_reliability.py``; ``tests/test_train_state.py`` holds
checkpoints written before this class existed).
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ppl_vi.config import Schedule, TrainConfig
from ppl_vi.errors import CheckpointError, ConfigError
from ppl_vi.training.graph_step import plain_optimizer

FORMAT = 1
#: settings that decide an epoch's batches: a mid-epoch resume must keep them
DATA_ORDER_FIELDS = ("seed", "batch_size", "n_train", "val_size", "labels", "labelled_every", "labelled_batch_size")


@dataclasses.dataclass(eq=False)
class TrainState:
    """One run's trainable state and position; see the module docstring for its checkpoint."""

    config: TrainConfig
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    data_generator: torch.Generator
    epoch: int = 0  # epochs completed
    step: int = 0  # global steps taken (skipped ones included)
    best_val: float = math.inf
    skipped_steps: int = 0
    seconds_before: float = 0.0  # training seconds before this process (from a checkpoint)
    fit_started: Optional[float] = None  # perf_counter when fit() started in this process
    # position inside the current epoch, for an exact mid-epoch resume: the data generator's state before
    # the epoch's permutation was drawn, the steps done, their losses
    epoch_data_state: Optional[Tensor] = None
    step_in_epoch: int = 0
    epoch_losses: List[Tensor] = dataclasses.field(default_factory=list)
    history: List[dict] = dataclasses.field(default_factory=list)
    last_saved: Optional[Tuple[int, int]] = None  # (epoch, step) of the last checkpoint written or loaded
    plan: Optional[Schedule] = None  # the epochs and learning-rate decay (None: the config's)

    def __post_init__(self):
        if self.epoch_data_state is None:
            self.epoch_data_state = self.data_generator.get_state()
        if self.plan is None:
            self.plan = Schedule.of(self.config)

    def replan(self, plan: Schedule) -> None:
        """Train to ``plan.epochs``, the learning rate decaying by ``plan.lr_decay`` at every epoch end from
        now on (a job's time budget, once the first epoch has been timed)."""
        self.plan = plan
        # the scheduler is the ExponentialLR built with this state: its decay factor is its state's "gamma"
        self.scheduler.load_state_dict({**self.scheduler.state_dict(), "gamma": plan.lr_decay})

    # ---- the clock ----------------------------------------------------------------------------
    def start_clock(self) -> None:
        self.fit_started = time.perf_counter()

    def train_seconds(self) -> float:
        """Training time of the run so far, over every process that trained it (resumes included)."""
        now = 0.0 if self.fit_started is None else time.perf_counter() - self.fit_started
        return self.seconds_before + now

    # ---- what the loop changes ----------------------------------------------------------------
    def begin_epoch(self) -> Tuple[int, List[Tensor]]:
        """(steps of this epoch already done, their losses): (0, []) unless resumed mid-epoch, when the
        data generator already holds the epoch's starting state."""
        if not self.step_in_epoch:
            self.epoch_data_state = self.data_generator.get_state()
        return self.step_in_epoch, list(self.epoch_losses)

    def count_step(self, applied: bool) -> None:
        self.step += 1
        if not applied:
            self.skipped_steps += 1

    def hold_position(self, losses: List[Tensor]) -> None:
        """Mid-epoch: the epoch's steps so far are ``losses`` (what a checkpoint written now resumes)."""
        self.step_in_epoch, self.epoch_losses = len(losses), losses

    def end_epoch(self) -> None:
        self.epoch += 1
        self.step_in_epoch, self.epoch_losses = 0, []

    def improves(self, val_loss: float) -> bool:
        """Whether ``val_loss`` beats the best so far; if so it becomes the best."""
        if val_loss < self.best_val:
            self.best_val = val_loss
            return True
        return False

    def add_record(self, record: dict) -> None:
        self.history.append(record)

    def set_history(self, records: List[dict]) -> None:
        self.history = list(records)

    def saved(self) -> None:
        """A checkpoint of this state was written (what a divergence keeps)."""
        self.last_saved = (self.epoch, self.step)

    # ---- the checkpoint -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The checkpoint as a dict of tensors and plain containers."""
        return {
            "ppl_vi": FORMAT,
            "model_name": self.config.model,
            "config": self.plan.applied_to(self.config).to_dict(),  # as trained: a budget's epochs and decay
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "best_val": self.best_val,
            "skipped_steps": self.skipped_steps,
            "train_seconds": self.train_seconds(),  # cumulative: a resumed run's clock continues from here
            "step_in_epoch": self.step_in_epoch,  # > 0: a mid-epoch checkpoint
            "epoch_losses": torch.stack(self.epoch_losses).cpu() if self.epoch_losses else torch.zeros(0),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "python": list(random.getstate()[1]),
                "python_pos": random.getstate()[2],
                "data": self.data_generator.get_state(),
                "data_epoch_start": self.epoch_data_state,  # regenerates this epoch's permutation
            },
        }

    def validate(self, state: dict, where) -> None:
        """Refuse (one line) a checkpoint ``state`` that cannot continue this run: another model, another
        seed, changed data settings mid-epoch (ConfigError), or fields not as :meth:`state_dict` writes
        them (CheckpointError). ``where`` names the checkpoint in the message."""
        config = self.config
        if state.get("model_name") != config.model:
            raise ConfigError(f"checkpoint is for model {state.get('model_name')!r}, not {config.model!r}")
        saved = state.get("config") if isinstance(state.get("config"), dict) else {}
        changed = [f for f in DATA_ORDER_FIELDS if f in saved and saved[f] != getattr(config, f)]
        if state.get("step_in_epoch", 0) and changed:
            raise ConfigError(f"cannot resume mid-epoch with changed {', '.join(changed)} (the epoch's batches "
                              "would differ); resume with the run's own settings")
        if "seed" in saved and saved["seed"] != config.seed:
            raise ConfigError(f"cannot resume with seed {config.seed}: the run's random state comes from its "
                              f"checkpoint (seed {saved['seed']}); for another seed start a new run (ppl-vi train "
                              "--config RUN_DIR/config.json --seed N --out NEW_DIR)")
        problems = format_problems(state)
        if problems:
            raise CheckpointError(f"cannot resume from {where}: it is incomplete or foreign "
                                  f"({'; '.join(problems[:3])}{'; ...' if len(problems) > 3 else ''}); expected a "
                                  "checkpoint written by ppl-vi train")

    def load_state_dict(self, state: dict, where="the checkpoint") -> Optional[str]:
        """Continue exactly where ``state`` (from :meth:`state_dict`) left off, mid-epoch included;
        :meth:`validate` first. Returns what a changed ``--lr`` / ``--lr-decay`` did (or None)."""
        self.validate(state, where)
        step_in_epoch = state.get("step_in_epoch", 0)
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as exc:
            raise ConfigError(f"checkpoint does not fit this model: {str(exc).splitlines()[0]}") from None
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.epoch, self.step, self.best_val = state["epoch"], state["step"], state["best_val"]
            self.skipped_steps = state.get("skipped_steps", 0)
            self.seconds_before, self.fit_started = float(state.get("train_seconds", 0.0)), None
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
        plain_optimizer(self.optimizer)  # a CUDA-graph run saves a capturable Adam; the fast path redoes it
        saved = state.get("config") if isinstance(state.get("config"), dict) else {}
        note = self._continue_schedule(saved)
        self.plan = Schedule.of(self.config)
        self.data_generator.set_state(data_state)
        self.epoch_data_state = data_state
        self.step_in_epoch = step_in_epoch
        device = next(self.model.parameters(), torch.zeros(0)).device
        self.epoch_losses = list(epoch_losses.to(device).unbind()) if step_in_epoch else []
        self.last_saved = (self.epoch, self.step)
        return note

    def _continue_schedule(self, saved: dict) -> Optional[str]:
        """``--lr`` / ``--lr-decay`` given with ``--resume``: the restored Adam and scheduler take them.

        The learning rate continues as a run with the new settings would have it at this epoch,
        lr × lr_decay^epoch (Adam's moment estimates and step counts are kept), and the scheduler
        decays by the new factor from here on. Unchanged settings leave the restored state untouched
        (bitwise). Returns what changed, for the resume message, or None.
        """
        config = self.config
        old_lr, old_decay = saved.get("lr", config.lr), saved.get("lr_decay", config.lr_decay)
        if (old_lr, old_decay) == (config.lr, config.lr_decay):
            return None
        lr = config.lr * config.lr_decay ** self.epoch
        groups = len(self.optimizer.param_groups)
        for group in self.optimizer.param_groups:
            group["lr"], group["initial_lr"] = lr, config.lr
        # the scheduler's state as a fresh ExponentialLR(gamma=lr_decay) would have it at this epoch
        self.scheduler.load_state_dict({**self.scheduler.state_dict(), "base_lrs": [config.lr] * groups,
                                        "gamma": config.lr_decay, "_last_lr": [lr] * groups})
        return (f"learning rate {old_lr:g} x {old_decay:g}^epoch -> {config.lr:g} x {config.lr_decay:g}^epoch: Adam "
                f"continues at {lr:.6g} (epoch {self.epoch}), keeping its moment estimates")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _byte_state(value, size: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.shape == (size,)


def format_problems(state: dict) -> List[str]:
    """What in ``state`` is not as :meth:`TrainState.state_dict` writes it (empty: nothing).

    A foreign file can pass :func:`ppl_vi.run.load_checkpoint` (a dict of tensors) and still hold an
    epoch stored as a string, a short RNG state or a list where a state dict belongs; each would fail
    deep inside torch or the training loop. Checked: the optimiser and scheduler states are
    mappings; epoch, step, step_in_epoch and skipped_steps are integers >= 0; best_val a number;
    epoch_losses a 1-D tensor of step_in_epoch values; the torch and data-order generator states
    byte tensors of the length this torch uses; Python's state 625 integers and a position.
    """
    torch_size = torch.get_rng_state().numel()
    generator_size = torch.Generator().get_state().numel()
    rng = state.get("rng")
    problems = []
    for key in ("optimizer", "scheduler"):
        if not isinstance(state.get(key), dict):
            problems.append(f"{key} is not a mapping")
    for key in ("epoch", "step"):
        if not _is_int(state.get(key)) or state[key] < 0:
            problems.append(f"{key} is {state.get(key)!r}, not an integer >= 0")
    for key in ("step_in_epoch", "skipped_steps"):
        if key in state and (not _is_int(state[key]) or state[key] < 0):
            problems.append(f"{key} is {state[key]!r}, not an integer >= 0")
    if not isinstance(state.get("best_val"), (int, float)) or isinstance(state.get("best_val"), bool):
        problems.append(f"best_val is {type(state.get('best_val')).__name__}, not a number")
    steps = state.get("step_in_epoch", 0)
    losses = state.get("epoch_losses")
    if _is_int(steps) and steps and not (isinstance(losses, torch.Tensor) and losses.shape == (steps,)):
        problems.append(f"epoch_losses does not hold the {steps} losses of the epoch so far")
    if not isinstance(rng, dict):
        return problems + ["rng is not a mapping"]
    if not _byte_state(rng.get("torch"), torch_size):
        problems.append(f"rng.torch is not a {torch_size}-byte generator state")
    for key in ("data", "data_epoch_start"):
        if not _byte_state(rng.get(key), generator_size):
            problems.append(f"rng.{key} is not a {generator_size}-byte generator state")
    python = rng.get("python")
    gauss = rng.get("python_pos")  # random.getstate()[2]: the cached Gaussian, None or a float
    if not (isinstance(python, (list, tuple)) and len(python) == 625 and all(_is_int(v) for v in python)
            and (gauss is None or isinstance(gauss, float))):
        problems.append("rng.python is not Python's 625-integer random state")
    cuda = rng.get("cuda", [])
    if not (isinstance(cuda, (list, tuple)) and all(isinstance(s, torch.Tensor) and s.dtype == torch.uint8
                                                    for s in cuda)):
        problems.append("rng.cuda is not a list of generator states")
    return problems
