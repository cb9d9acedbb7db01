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

from ppl_vi import distributed
from ppl_vi import run as rundir
from ppl_vi.config import TrainConfig
from ppl_vi.data import mnist
from ppl_vi.data.sources import DataBundle, load_data
from ppl_vi.errors import CheckpointError, ConfigError, TrainingDiverged
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
        self.config, self.run_dir, self.progress = config, None if run_dir is None else Path(run_dir), progress
        self.device = distributed.device_for_rank(resolve_device(config.device))
        self.dist = distributed.init(self.device)  # a no-op unless launched by torchrun (ppl_vi.distributed)
        if not self.dist.is_main:  # only rank 0 writes the run directory and shows progress
            self.run_dir, self.progress = None, False
        from ppl_vi.report import tensorboard_writer

        if config.tensorboard:
            tensorboard_writer(None)  # fail fast (ConfigError) if not installed; the writer is made by fit()
        self.tb = None  # created in fit(): the run directory does not exist until the data have loaded
        seed_everything(config.seed)
        pyro.clear_param_store()
        pyro.enable_validation(False)  # validation off in the hot path (tests turn it on)
        self.spec = get_spec(config.model)
        self.data: DataBundle = load_data(self.spec.data, config, self.device)
        self.model: LatentModel = self.spec.build(config, self.data.info).to(self.device)
        distributed.broadcast_parameters(self.model, self.dist)
        if self.dist.enabled:  # independent particles per rank; the data order stays shared
            seed_everything(config.seed + self.dist.rank)
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
        # position inside the current epoch, for an exact mid-epoch resume (--checkpoint-every-steps): the
        # data generator's state before the epoch's permutation was drawn, the steps done, their losses
        self.epoch_data_state = self.data_generator.get_state()
        self.step_in_epoch, self.epoch_losses = 0, []
        self._last_saved = None  # (epoch, step) of the last checkpoint written or loaded
        self._last_batches = None  # the latest step's batches (NaN diagnosis)
        # config.fast: validation and param-store registration off in the hot path, a sync-free loss,
        # and on CUDA the whole step captured in a CUDA graph (ppl_vi.objectives.graph_step)
        from ppl_vi.objectives.graph_step import FastStep

        self.fast = FastStep(self, quiet=not self.progress) if config.fast else None

    # ---- batches -------------------------------------------------------------------------------
    def _x(self, idx: Tensor) -> Tensor:
        x = self.data.train_x[idx]
        return mnist.binarize(x) if self.data.binary else x

    def batches(self, skip: int = 0) -> Iterator[List[Batch]]:
        """One epoch of steps; each step is a list of batches whose losses are summed.

        The first ``skip`` steps are passed over without building their batches (so without drawing
        their binarisation noise): a mid-epoch resume re-draws the epoch's permutation from the saved
        generator state and continues at step ``skip`` of it.
        """
        d, bs = self.data, self.config.batch_size
        y = d.train_y
        if d.labelled_idx is None:
            for i, idx in enumerate(mnist.minibatches(d.train_x.shape[0], bs, generator=self.data_generator,
                                                      device=self.device)):
                if i < skip:
                    continue
                own = self.dist.shard(idx)  # all of idx unless distributed
                yield distributed.Step([self.make_batch(self._x(own), None if y is None else y[own])], idx.numel())
            return
        # semi-supervised: every unlabelled batch is paired with a labelled batch (cycled)
        lab, unlab = d.labelled_idx, d.unlabelled_idx
        labelled = iter(())
        for i, uidx in enumerate(mnist.minibatches(unlab.numel(), bs, generator=self.data_generator,
                                                   device=self.device)):
            try:
                lidx = next(labelled)
            except StopIteration:
                labelled = mnist.minibatches(lab.numel(), min(bs, lab.numel()), generator=self.data_generator,
                                             device=self.device)
                lidx = next(labelled)
            if i < skip:  # the labelled cycle above still advances, as it did in the interrupted run
                continue
            count = lidx.numel() + uidx.numel()
            lidx, uidx = self.dist.shard(lidx), self.dist.shard(uidx)
            yield distributed.Step([self.make_batch(self._x(lab[lidx]), y[lab[lidx]]),
                                    self.make_batch(self._x(unlab[uidx]), None)], count)

    # ---- one step --------------------------------------------------------------------------------
    def step_loss(self, batches: List[Batch]) -> Tensor:
        """Summed loss over the step's batches, per datapoint (divided by the datapoints)."""
        total, count = 0.0, 0
        for batch in batches:
            if batch["x"].shape[0] == 0:  # an empty shard (distributed, global batch < world size)
                continue
            total = total + (self.fast or self.loss).differentiable_loss(self.model_fn, self.guide_fn, **batch)
            count += batch["x"].shape[0]
        # distributed: divided by the step's datapoints over all ranks, so the ranks' losses sum to the mean
        return total / (getattr(batches, "global_count", None) or count)

    def train_step(self, batches: List[Batch]) -> Tensor:
        if self.fast is not None:
            graphed = self.fast.graph_step(batches)  # the whole step replayed from a CUDA graph, where it can be
            if graphed is not None:
                return graphed
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.step_loss(batches)
        if isinstance(loss, Tensor):
            loss.backward()
        else:  # nothing on this rank's shard
            loss = torch.zeros((), device=self.device)
        loss = distributed.all_reduce_gradients(self.model.parameters(), loss, self.dist)  # no-op unless DDP
        if self.config.nan_policy == "skip" and not self._finite_step(loss):
            self.skipped_steps += 1
            self.optimizer.zero_grad(set_to_none=True)
            return loss.detach()
        self.optimizer.step()
        return loss.detach()

    def _finite_step(self, loss: Tensor) -> bool:
        """Loss and every gradient finite? One host sync; only ``--nan-policy skip`` asks."""
        flags = [torch.isfinite(loss).all()]
        flags += [torch.isfinite(p.grad).all() for p in self.model.parameters() if p.grad is not None]
        return bool(torch.stack(flags).all())

    # ---- the loop --------------------------------------------------------------------------------
    def fit(self) -> dict:
        from tqdm.auto import tqdm

        cfg, start = self.config, time.perf_counter()
        if cfg.tensorboard and self.tb is None:
            from ppl_vi.report import tensorboard_writer

            self.tb = tensorboard_writer(self.run_dir)
        for epoch in range(self.epoch, cfg.epochs):
            # after a mid-epoch resume: the same permutation, its first `skip` steps already done
            skip, losses = self.step_in_epoch, list(self.epoch_losses)
            if not skip:
                self.epoch_data_state = self.data_generator.get_state()
            checked = len(losses)  # losses[:checked] have been read back (found finite)
            steps_in_epoch = self._steps_per_epoch()
            bar = tqdm(total=steps_in_epoch, initial=skip, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       disable=not self.progress, leave=False, dynamic_ncols=True)
            for batches in self.batches(skip):
                if cfg.kl_anneal:
                    self.beta.fill_(beta_at(self.step, cfg))
                self._last_batches = batches
                losses.append(self.train_step(batches))
                self.step += 1
                bar.update(1)
                if len(losses) % cfg.log_every == 0:
                    self._read_back(losses[checked:], bar)
                    checked = len(losses)
                if cfg.checkpoint_every_steps and self.step % cfg.checkpoint_every_steps == 0 and self.run_dir is not None:
                    self._read_back(losses[checked:], None)  # never checkpoint past an unchecked NaN
                    checked = len(losses)
                    self.step_in_epoch, self.epoch_losses = len(losses), losses
                    self.save_checkpoint("last")
            bar.close()
            self._read_back(losses[checked:], None)
            train_loss = self._mean_finite(losses)
            self.epoch = epoch + 1
            self.step_in_epoch, self.epoch_losses = 0, []
            self.scheduler.step()
            record = {"epoch": self.epoch, "step": self.step, "train_loss": train_loss,
                      "beta": float(self.beta), "seconds": time.perf_counter() - start}
            if self.dist.is_main and (self.epoch % cfg.eval_every == 0 or self.epoch == cfg.epochs):
                record["val_loss"] = self.validation_loss()
            self.history.append(record)
            self._log_tensorboard(record)
            rundir.append_history(self.run_dir, record)
            if self.progress:
                tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
            if self.run_dir is not None and (self.epoch % cfg.checkpoint_every == 0 or self.epoch == cfg.epochs):
                # best first, so that last.pt (what --resume reads) carries the updated best_val
                if record.get("val_loss", math.inf) < self.best_val:
                    self.best_val = record["val_loss"]
                    self.save_checkpoint("best")
                self.save_checkpoint("last")
            if cfg.max_minutes is not None and distributed.any_rank(time.perf_counter() - start > 60 * cfg.max_minutes,
                                                                    self.dist):
                break
        return {"train_seconds": time.perf_counter() - start, "epochs_done": self.epoch, "steps": self.step,
                "final_train_loss": self.history[-1]["train_loss"] if self.history else math.nan,
                "final_val_loss": self.history[-1].get("val_loss", math.nan) if self.history else math.nan,
                "skipped_steps": self.skipped_steps}

    def _steps_per_epoch(self) -> int:
        d, bs = self.data, self.config.batch_size
        n = d.train_x.shape[0] if d.unlabelled_idx is None else d.unlabelled_idx.numel()
        return math.ceil(n / bs)

    @staticmethod
    def _mean_finite(losses: List[Tensor]) -> float:
        """Mean of the finite step losses (skipped NaN steps left out); NaN when there are none."""
        if not losses:
            return math.nan
        values = torch.stack(losses).float()
        values = values[torch.isfinite(values)]
        return values.mean().item() if values.numel() else math.nan

    def _read_back(self, recent: List[Tensor], bar) -> None:
        """One host sync: the mean of the recent losses, and a NaN/inf check naming the step."""
        if not recent:
            return
        values = torch.stack(recent).float().cpu()
        finite = torch.isfinite(values)
        if not finite.all() and self.config.nan_policy == "stop":
            first = self.step - len(recent) + int((~finite).nonzero()[0])
            raise TrainingDiverged(f"loss became {values[~finite][0].item()} at step {first + 1} "
                                   f"(epoch {self.epoch + 1}); {self._diagnose()}; {self._kept()}; "
                                   "try a lower --lr, or --nan-policy skip to skip such steps")
        if bar is not None and finite.any():
            bar.set_postfix(loss=f"{values[finite].mean().item():.3f}", beta=f"{float(self.beta):.3g}")
        if self.tb is not None and finite.any():  # values are on the host already: no extra sync
            self.tb.add_scalar("train/loss", values[finite].mean().item(), self.step)

    def _log_tensorboard(self, record: dict) -> None:
        """Epoch-end scalars at the global step: epoch train loss, val loss, β, lr (``--tensorboard``)."""
        if self.tb is None:
            return
        for key, tag in (("train_loss", "train/epoch_loss"), ("val_loss", "val/loss"), ("beta", "train/beta")):
            if key in record and math.isfinite(record[key]):
                self.tb.add_scalar(tag, record[key], record["step"])
        self.tb.add_scalar("train/lr", self.optimizer.param_groups[0]["lr"], record["step"])
        self.tb.flush()

    def _kept(self) -> str:
        if self.run_dir is None:
            return "no run directory, so nothing was saved"
        if self._last_saved is None:
            return "no checkpoint had been written yet"
        epoch, step = self._last_saved
        return (f"the last good checkpoint (epoch {epoch}, step {step}) is kept in "
                f"{self.run_dir / rundir.CHECKPOINTS / 'last.pt'}")

    def _diagnose(self) -> str:
        """Which term went bad: weights, gradients, or the log-density terms on the latest batch."""
        bad_weights = [n for n, p in self.model.named_parameters() if not torch.isfinite(p).all()]
        if bad_weights:
            return f"non-finite weights in {bad_weights[:3]} (the optimiser applied a non-finite gradient)"
        bad_grads = [n for n, p in self.model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        if bad_grads:
            return f"non-finite gradients in {bad_grads[:3]}"
        return self._bad_terms(self._last_batches)

    @torch.no_grad()
    def _bad_terms(self, batches: Optional[List[Batch]]) -> str:
        """The sample sites whose log-density is non-finite on ``batches``: observed sites are the
        reconstruction term, latent ones (the model's prior or the guide) the KL term."""
        from pyro import poutine

        generic = "weights and gradients finite: the bound's terms (reconstruction or KL) overflowed"
        bad: List[str] = []
        try:
            for batch in batches or []:
                guide_trace = poutine.trace(self.guide_fn).get_trace(**batch)
                model_trace = poutine.trace(poutine.replay(self.model_fn, trace=guide_trace)).get_trace(**batch)
                for where, trace in (("model", model_trace), ("guide", guide_trace)):
                    trace.compute_log_prob()
                    for name, site in trace.nodes.items():
                        if site["type"] == "sample" and "log_prob" in site and not torch.isfinite(site["log_prob"]).all():
                            label = f"{'reconstruction' if site['is_observed'] else 'KL'} term ({where} site {name!r})"
                            bad += [label] if label not in bad else []
        except Exception:  # noqa: BLE001 - a diagnosis must never hide the divergence itself
            return generic
        return f"weights and gradients finite; non-finite {', '.join(bad)}" if bad else generic

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

    def save_checkpoint(self, name: str) -> Path:
        path = self.run_dir / rundir.CHECKPOINTS / f"{name}.pt"
        rundir.save_checkpoint(path, self.state())
        if name == "last":
            self._last_saved = (self.epoch, self.step)
        return path

    def load_state(self, state: dict) -> None:
        """Continue exactly where ``state`` (from :meth:`state`) left off, mid-epoch included."""
        if state.get("model_name") != self.config.model:
            raise ConfigError(f"checkpoint is for model {state.get('model_name')!r}, not {self.config.model!r}")
        step_in_epoch = int(state.get("step_in_epoch", 0))
        saved = state.get("config") or {}
        changed = [f for f in ("seed", "batch_size", "n_train", "val_size", "labels")
                   if f in saved and saved[f] != getattr(self.config, f)]
        if step_in_epoch and changed:
            raise ConfigError(f"cannot resume mid-epoch with changed {', '.join(changed)} (the epoch's batches "
                              "would differ); resume with the run's own settings")
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as exc:
            raise ConfigError(f"checkpoint does not fit this model: {str(exc).splitlines()[0]}") from None
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.epoch, self.step, self.best_val = state["epoch"], state["step"], state["best_val"]
            self.skipped_steps = state.get("skipped_steps", 0)
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
        from ppl_vi.objectives.graph_step import plain_optimizer

        plain_optimizer(self.optimizer)  # a CUDA-graph run saves a capturable Adam; the fast path redoes it
        if self.fast is not None:
            self.fast.reset()
        self.data_generator.set_state(data_state)
        self.epoch_data_state = data_state
        self.step_in_epoch = step_in_epoch
        self.epoch_losses = list(epoch_losses.to(self.device).unbind()) if step_in_epoch else []
        self._last_saved = (self.epoch, self.step)
        self.beta.fill_(beta_at(self.step, self.config))


def train(config: TrainConfig, run_dir: Optional[Path] = None, *, resume: bool = False, progress: bool = True,
          figures: bool = True, overwrite: bool = False) -> "Trainer":
    """Train ``config`` into ``run_dir`` (optional); returns the trainer, ``.metrics`` as in metrics.json.

    The data load before a new run directory is created, so a bad data folder leaves nothing
    behind (``overwrite`` replaces a non-empty one). ``resume`` continues from checkpoints/last.pt,
    mid-epoch ones included, and drops history records written after that checkpoint.
    """
    trainer = Trainer(config, run_dir, progress)
    if run_dir is not None:
        run_dir = Path(run_dir)
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
    summary = trainer.fit()
    from ppl_vi.evaluate import final_metrics

    run_dir = trainer.run_dir  # None on ranks > 0 under torchrun: only rank 0 writes
    metrics = {**summary, **final_metrics(trainer)} if trainer.dist.is_main else summary
    metrics = rundir.update_metrics(run_dir, **metrics)
    if run_dir is not None and figures:
        from ppl_vi import plots

        plots.training_figures(run_dir, trainer.model, trainer.data, trainer.history)
    if run_dir is not None:
        from ppl_vi.report import write_report

        write_report(run_dir)
    if trainer.tb is not None:
        trainer.tb.close()
    distributed.shutdown(trainer.dist)
    trainer.metrics = metrics
    return trainer
