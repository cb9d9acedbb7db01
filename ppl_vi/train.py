"""The SVI loop: device-resident data, one torch optimiser, β annealing, progress, checkpoints.

Each step evaluates ``loss.differentiable_loss(model, guide, **batch)`` (a Pyro ELBO or ours),
divides by the batch size (the loss is reported in nats per datapoint), and steps a single
``torch.optim.Adam`` over all module parameters; Pyro's param store is not used for optimisation.
The loss stays on the device: it is read back every ``log_every`` steps (one host sync), and a
NaN/inf in any step is caught at that read-back, naming the first bad step.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import pyro
import torch
from torch import Tensor

from ppl_vi import run as rundir
from ppl_vi.config import TrainConfig
from ppl_vi.data import mnist
from ppl_vi.data.sources import DataBundle, load_data
from ppl_vi.errors import ConfigError, TrainingDiverged
from ppl_vi.models.base import Batch, LatentModel, default_make_batch, get_spec, scale_sites
from ppl_vi.objectives.losses import make_loss


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed Python, torch (CPU and CUDA) and Pyro."""
    random.seed(seed)
    pyro.set_rng_seed(seed)
    torch.manual_seed(seed)


def beta_at(step: int, config: TrainConfig) -> float:
    """KL weight at ``step``: linear ramp 0 -> β over ``kl_anneal`` steps, then β."""
    if config.kl_anneal <= 0:
        return config.beta
    return config.beta * min(1.0, step / config.kl_anneal)


class Trainer:
    """Owns model, loss, optimiser, data and the run directory for one training run."""

    def __init__(self, config: TrainConfig, run_dir: Optional[Path] = None, progress: bool = True):
        self.config, self.run_dir, self.progress = config, run_dir, progress
        self.device = resolve_device(config.device)
        seed_everything(config.seed)
        pyro.clear_param_store()
        pyro.enable_validation(False)  # validation off in the hot path (tests turn it on)
        self.spec = get_spec(config.model)
        self.data: DataBundle = load_data(self.spec.data, config, self.device)
        self.model: LatentModel = self.spec.build(config, self.data.info).to(self.device)
        self.loss = make_loss(config.loss, config.k, self.model.max_plate_nesting)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, gamma=config.lr_decay)
        self.beta = torch.tensor(beta_at(0, config), device=self.device)  # updated in place when annealing
        scaled = config.beta != 1.0 or config.kl_anneal > 0
        sites = getattr(self.model, "beta_sites", self.model.latent_sites)
        self.model_fn = scale_sites(self.model.model, sites, self.beta) if scaled else self.model.model
        self.guide_fn = scale_sites(self.model.guide, sites, self.beta) if scaled else self.model.guide
        self.make_batch = getattr(self.model, "make_batch", default_make_batch)
        self.data_generator = torch.Generator().manual_seed(config.seed)
        self.epoch, self.step, self.best_val = 0, 0, math.inf
        self.skipped_steps = 0
        self.history: List[dict] = []

    # ---- batches -------------------------------------------------------------------------------
    def _x(self, idx: Tensor) -> Tensor:
        x = self.data.train_x[idx]
        return mnist.binarize(x) if self.data.binary else x

    def batches(self) -> Iterator[List[Batch]]:
        """One epoch of steps; each step is a list of batches whose losses are summed."""
        d, bs = self.data, self.config.batch_size
        y = d.train_y
        if d.labelled_idx is None:
            for idx in mnist.minibatches(d.train_x.shape[0], bs, generator=self.data_generator, device=self.device):
                yield [self.make_batch(self._x(idx), None if y is None else y[idx])]
            return
        # semi-supervised: every unlabelled batch is paired with a labelled batch (cycled)
        lab, unlab = d.labelled_idx, d.unlabelled_idx
        labelled = iter(())
        for uidx in mnist.minibatches(unlab.numel(), bs, generator=self.data_generator, device=self.device):
            try:
                lidx = next(labelled)
            except StopIteration:
                labelled = mnist.minibatches(lab.numel(), min(bs, lab.numel()), generator=self.data_generator,
                                             device=self.device)
                lidx = next(labelled)
            yield [self.make_batch(self._x(lab[lidx]), y[lab[lidx]]), self.make_batch(self._x(unlab[uidx]), None)]

    # ---- one step --------------------------------------------------------------------------------
    def step_loss(self, batches: List[Batch]) -> Tensor:
        """Summed loss over the step's batches, per datapoint (divided by the datapoints)."""
        total, count = 0.0, 0
        for batch in batches:
            total = total + self.loss.differentiable_loss(self.model_fn, self.guide_fn, **batch)
            count += batch["x"].shape[0]
        return total / count

    def train_step(self, batches: List[Batch]) -> Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.step_loss(batches)
        loss.backward()
        if self.config.nan_policy == "skip" and not torch.isfinite(loss):
            self.skipped_steps += 1
            return loss.detach()
        self.optimizer.step()
        return loss.detach()

    # ---- the loop --------------------------------------------------------------------------------
    def fit(self) -> dict:
        from tqdm.auto import tqdm

        cfg, start = self.config, time.perf_counter()
        for epoch in range(self.epoch, cfg.epochs):
            losses: List[Tensor] = []
            steps_in_epoch = self._steps_per_epoch()
            bar = tqdm(total=steps_in_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not self.progress,
                       leave=False, dynamic_ncols=True)
            for batches in self.batches():
                if cfg.kl_anneal:
                    self.beta.fill_(beta_at(self.step, cfg))
                losses.append(self.train_step(batches))
                self.step += 1
                bar.update(1)
                if len(losses) % cfg.log_every == 0:
                    self._read_back(losses[-cfg.log_every:], bar)
            bar.close()
            self._read_back(losses[-(len(losses) % cfg.log_every or cfg.log_every):], None)
            train_loss = torch.stack(losses).float().mean().item() if losses else math.nan
            self.epoch = epoch + 1
            self.scheduler.step()
            record = {"epoch": self.epoch, "step": self.step, "train_loss": train_loss,
                      "beta": float(self.beta), "seconds": time.perf_counter() - start}
            if self.epoch % cfg.eval_every == 0 or self.epoch == cfg.epochs:
                record["val_loss"] = self.validation_loss()
            self.history.append(record)
            rundir.append_history(self.run_dir, record)
            if self.progress:
                tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
            if self.run_dir is not None and (self.epoch % cfg.checkpoint_every == 0 or self.epoch == cfg.epochs):
                self.save_checkpoint("last")
                if record.get("val_loss", math.inf) < self.best_val:
                    self.best_val = record["val_loss"]
                    self.save_checkpoint("best")
            if cfg.max_minutes is not None and time.perf_counter() - start > 60 * cfg.max_minutes:
                break
        return {"train_seconds": time.perf_counter() - start, "epochs_done": self.epoch, "steps": self.step,
                "final_train_loss": self.history[-1]["train_loss"] if self.history else math.nan,
                "final_val_loss": self.history[-1].get("val_loss", math.nan) if self.history else math.nan,
                "skipped_steps": self.skipped_steps}

    def _steps_per_epoch(self) -> int:
        d, bs = self.data, self.config.batch_size
        n = d.train_x.shape[0] if d.unlabelled_idx is None else d.unlabelled_idx.numel()
        return math.ceil(n / bs)

    def _read_back(self, recent: List[Tensor], bar) -> None:
        """One host sync: the mean of the recent losses, and a NaN/inf check naming the step."""
        if not recent:
            return
        values = torch.stack(recent).float().cpu()
        finite = torch.isfinite(values)
        if not finite.all() and self.config.nan_policy == "stop":
            first = self.step - len(recent) + int((~finite).nonzero()[0])
            raise TrainingDiverged(f"loss became {values[~finite][0].item()} at step {first + 1} "
                                   f"(epoch {self.epoch + 1}); {self._diagnose()}; the last good checkpoint is kept")
        if bar is not None:
            bar.set_postfix(loss=f"{values[finite].mean().item():.3f}", beta=f"{float(self.beta):.3g}")

    def _diagnose(self) -> str:
        """Which term went bad: weights, gradients, or the bound's terms on a fresh batch."""
        bad_weights = [n for n, p in self.model.named_parameters() if not torch.isfinite(p).all()]
        if bad_weights:
            return f"non-finite weights in {bad_weights[:3]}"
        bad_grads = [n for n, p in self.model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        if bad_grads:
            return f"non-finite gradients in {bad_grads[:3]}"
        return "weights and gradients finite: the bound's terms (reconstruction or KL) overflowed"

    @torch.no_grad()
    def validation_loss(self) -> float:
        """Mean per-datapoint loss on the validation set (same objective, no gradient)."""
        from ppl_vi.evaluate import iter_eval_batches

        x = self.data.val_x if self.data.val_x is not None else self.data.test_x
        y = self.data.val_y if self.data.val_x is not None else self.data.test_y
        total, count = 0.0, 0
        for xb, yb in iter_eval_batches(x, y, 1000):
            batch = self.make_batch(xb, yb) if yb is not None and self.spec.data != "mnist-semisupervised" \
                else self.make_batch(xb, None)
            total += float(self.loss.loss(self.model.model, self.model.guide, **batch))
            count += xb.shape[0]
        return total / count

    # ---- checkpoints ---------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "ppl_vi": 1,
            "model_name": self.config.model,
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "best_val": self.best_val,
            "skipped_steps": self.skipped_steps,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "python": list(random.getstate()[1]),
                "python_pos": random.getstate()[2],
                "data": self.data_generator.get_state(),
            },
        }

    def save_checkpoint(self, name: str) -> Path:
        path = self.run_dir / rundir.CHECKPOINTS / f"{name}.pt"
        rundir.save_checkpoint(path, self.state())
        return path

    def load_state(self, state: dict) -> None:
        if state.get("model_name") != self.config.model:
            raise ConfigError(f"checkpoint is for model {state.get('model_name')!r}, not {self.config.model!r}")
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as exc:
            raise ConfigError(f"checkpoint does not fit this model: {str(exc).splitlines()[0]}") from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.step, self.best_val = state["epoch"], state["step"], state["best_val"]
        self.skipped_steps = state.get("skipped_steps", 0)
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        random.setstate((3, tuple(rng["python"]), rng["python_pos"]))
        self.data_generator.set_state(rng["data"])
        self.beta.fill_(beta_at(self.step, self.config))


def train(config: TrainConfig, run_dir: Optional[Path] = None, *, resume: bool = False, progress: bool = True,
          figures: bool = True) -> Dict:
    """Train ``config`` into ``run_dir`` (optional); returns the metrics written to metrics.json."""
    trainer = Trainer(config, run_dir, progress)
    if run_dir is not None:
        if resume and (Path(run_dir) / rundir.CHECKPOINTS / "last.pt").is_file():
            trainer.load_state(rundir.load_checkpoint(Path(run_dir) / rundir.CHECKPOINTS / "last.pt", trainer.device))
            trainer.history = rundir.read_history(run_dir)
        else:
            rundir.save_config(run_dir, config.to_dict(), rundir.environment(trainer.device))
    summary = trainer.fit()
    from ppl_vi.evaluate import final_metrics

    metrics = {**summary, **final_metrics(trainer)}
    metrics = rundir.update_metrics(run_dir, **metrics)
    if run_dir is not None and figures:
        from ppl_vi import plots

        plots.training_figures(run_dir, trainer.model, trainer.data, trainer.history)
    trainer.metrics = metrics
    return trainer
