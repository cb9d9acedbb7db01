"""The main job (``ppl-vi run``): train a model, then test NELBO and IWAE-k with standard errors,
figures and the report, sized to the machine it runs on, under one progress bar.

Two profiles, chosen by the device (``--full`` asks for the full one on a CPU):

=======  ==========================================================================================
full     a GPU: the model's own settings (the VAE: 784-500-500-50, 10 epochs) and the full test
         protocol: IWAE-k for k = 1, 10, 100, 1000, 5000 on all 10,000 test images
cpu      no GPU: a VAE chosen for a CPU budget (784-400-50, ReLU, batch 128; :data:`PROFILES`),
         trained for as many epochs as fit 3.5 minutes (measured on the first epoch), the learning
         rate decayed from 3e-3 to 1e-4 over them; the NELBO on all 10,000 test images, IWAE-k for
         k up to 1000 on the first 2,000
=======  ==========================================================================================

Whatever a profile scales down is printed before the job starts and recorded in metrics.json
(``profile``, ``scaled_down``) and in config.json's ``job`` section; the run's ``config`` section is
the resolved configuration (the epochs that fit included), so ``ppl-vi train --config
RUN/config.json`` retrains the same model. Command-line flags override a profile's settings.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from ppl_vi import plots
from ppl_vi import run as rundir
from ppl_vi.config import Schedule, TrainConfig
from ppl_vi.models.configure import build_config
from ppl_vi.errors import ConfigError
from ppl_vi.evaluate import describe_checkpoint, evaluate_run
from ppl_vi.iwae_eval import iwae_bounds, rows_per_pass
from ppl_vi.progress import Phase, RunProgress
from ppl_vi.report import write_report
from ppl_vi.runtime import resolve_device
from ppl_vi.training import Trainer
from ppl_vi.training import workflow
from ppl_vi.training.workflow import run_training

Log = Callable[[str], None]


def write_outputs(trainer: Trainer, figures: bool = True) -> None:
    """A trained run's figures (``figures``) and report.html, on the rank that writes the run directory."""
    if trainer.run_dir is None:
        return
    if figures:
        plots.training_figures(trainer.run_dir, trainer.model, trainer.data, trainer.history, trainer.metrics)
    write_report(trainer.run_dir)


def train(config: TrainConfig, run_dir: Optional[Path] = None, *, resume: bool = False, progress: bool = True,
          figures: bool = True, overwrite: bool = False, log: Log = print) -> Trainer:
    """:func:`ppl_vi.training.train`, then the run's figures and report.html: what ``ppl-vi train`` does."""
    trainer = workflow.train(config, run_dir, resume=resume, progress=progress, overwrite=overwrite, log=log)
    write_outputs(trainer, figures)
    return trainer


@dataclasses.dataclass(frozen=True)
class Profile:
    """A main job's size: configuration overrides, a training budget (None: the configured epochs)
    with the learning rate decayed to ``lr_final`` over the epochs that fit, and what it scales down."""

    name: str
    config: Dict
    train_minutes: Optional[float] = None
    lr_final: Optional[float] = None
    max_epochs: int = 200


PROFILES: Dict[str, Profile] = {
    "full": Profile("full", {"eval_images": 0, "eval_k": [1, 10, 100, 1000, 5000]}),
    "cpu": Profile(
        "cpu",  # tuned with benchmarks/cpu_quality.py (benchmarks/RESULTS.md)
        {"hidden": [400], "z_dim": 50, "activation": "relu", "batch_size": 128, "lr": 3e-3, "eval_images": 2000,
         "eval_k": [1, 10, 100, 1000], "log_every": 100},
        train_minutes=3.5, lr_final=1e-4),
}

#: the models a main job is defined for (profiles are tuned for them); others: ppl-vi train, then ppl-vi eval
JOB_MODELS = ("vae",)

#: seconds the data load and the figures and report take, before they are measured
LOAD_SECONDS, REPORT_SECONDS = 5.0, 8.0


def choose_profile(device: torch.device, full: bool) -> Profile:
    return PROFILES["full" if full or device.type == "cuda" else "cpu"]


def probe_eval_seconds_per_row(trainer: Trainer) -> float:
    """Seconds per IWAE particle row on this machine: a few full passes of the untrained model (the
    cost does not depend on the weights); the RNG is left as it was, so training is not disturbed."""
    state = torch.get_rng_state()
    x = trainer.data.test_x[:50]
    rows = rows_per_pass(trainer.model, x.shape[1], x.device)
    k = max(1, 4 * rows // x.shape[0])  # four passes: the per-batch guide run is amortised as in a real eval
    try:
        with torch.no_grad():
            iwae_bounds(trainer.model, {"x": x}, (k,), rows)  # warm-up
            start = time.perf_counter()
            iwae_bounds(trainer.model, {"x": x}, (k,), rows)
            return (time.perf_counter() - start) / (k * x.shape[0])
    finally:
        torch.set_rng_state(state)


class BudgetHook:
    """After the first epoch: the schedule that fits the training budget (the epochs, and the
    learning-rate decay from ``lr`` to ``lr_final`` over them); written into the run's config.json at once."""

    def __init__(self, profile: Profile, progress: RunProgress, log: Log):
        self.profile, self.progress, self.log = profile, progress, log

    def __call__(self, trainer: Trainer, record: dict) -> None:
        if trainer.epoch != 1:
            return
        cfg = trainer.config
        seconds = trainer.train_seconds()  # the first epoch with its validation pass
        plan = Schedule.fitting(cfg, 60 * self.profile.train_minutes, seconds, self.profile.max_epochs,
                                self.profile.lr_final)
        trainer.state.replan(plan)
        if trainer.run_dir is not None:
            rundir.save_config(trainer.run_dir, plan.applied_to(cfg).to_dict(), rundir.environment(trainer.device))
        self.progress.set_units("train", plan.epochs * trainer.steps_per_epoch())
        self.log(f"{plan.epochs} epochs fit the {self.profile.train_minutes:g}-minute training budget here (epoch 1 "
                 f"took {seconds:.1f} s); learning rate {cfg.lr:g} -> {self.profile.lr_final or cfg.lr:g}")


def decoder_macs(config, x_dim: int = 784) -> int:
    """Multiply-adds of one decoder pass (z -> hidden ... -> x): what one IWAE particle row costs."""
    widths = [config.z_dim, *config.hidden[::-1], x_dim]
    return sum(a * b for a, b in zip(widths[:-1], widths[1:]))


def architecture(config) -> str:
    """"784-400-50 relu": the encoder's layer widths (the decoder mirrors them) and the nonlinearity."""
    return f"{'-'.join(map(str, [784, *config.hidden, config.z_dim]))} {config.activation}"


def scaled_down(profile: Profile, config, n_test: int, budget: Optional[float]) -> List[str]:
    """What this job does short of the full protocol (the model's own settings, IWAE-5000 on every
    test image), one line each, whether a profile or a flag chose it."""
    full = build_config(config.model, PROFILES["full"].config)
    tag, notes = profile.name, []
    if budget:
        notes.append(f"{tag}: trained for the epochs that fit {budget / 60:g} minutes (the full protocol: "
                     f"{full.epochs} epochs)")
    elif config.epochs < full.epochs:
        notes.append(f"{tag}: {config.epochs} epochs (the full protocol: {full.epochs})")
    if (config.hidden, config.z_dim, config.activation) != (full.hidden, full.z_dim, full.activation):
        notes.append(f"{tag}: a {architecture(config)} VAE (the full protocol: {architecture(full)})")
    if max(config.eval_k) < max(full.eval_k):
        notes.append(f"{tag}: IWAE-k for k up to {max(config.eval_k)} (the full protocol: up to {max(full.eval_k)})")
    if config.eval_images and config.eval_images < n_test:
        notes.append(f"{tag}: IWAE-k on the first {config.eval_images:,} of the {n_test:,} test images "
                     "(the NELBO on all of them)")
    return notes


def plan_lines(profile: Profile, config, full, device: torch.device, run_dir: Path, n_test: int, full_eval_s: float,
               budget: Optional[float], notes: List[str]) -> List[str]:
    """What the job will do, said before it starts."""
    arch = f"{config.model} {architecture(config)}"
    train = f"the epochs that fit {budget / 60:g} minutes" if budget else f"{config.epochs} epochs"
    n_iwae = config.eval_images or n_test
    lines = [f"main job on {device} ({profile.name} profile): {arch}, batch {config.batch_size}, trained for {train}; "
             f"test NELBO on {n_test:,} images, IWAE-k for k = {', '.join(map(str, config.eval_k))} on "
             f"{n_iwae:,}; run directory {run_dir}"]
    lines += [f"scaled down: {note}" for note in notes]
    if notes:
        lines.append(f"(pass --full for the full protocol; its IWAE-5000 on all {n_test:,} test images alone would "
                     f"take about {full_eval_s / 60:.0f} minutes here, on its {architecture(full)} network)")
    return lines


def announce_plan(write: Log, profile: Profile, config, device: torch.device, run_dir: Path, n_test: int,
                  row_seconds: float, budget: Optional[float]) -> List[str]:
    """Say what the job will do before it starts (:func:`plan_lines`); returns what it scales down."""
    notes = scaled_down(profile, config, n_test, budget)
    full = build_config(config.model, PROFILES["full"].config)
    # the full protocol's IWAE on its own network: this network's row time scaled by the decoders' FLOPs
    full_row_seconds = row_seconds * decoder_macs(full) / decoder_macs(config)
    full_eval = n_test * (max(full.eval_k) + 1) * full_row_seconds
    for line in plan_lines(profile, config, full, device, run_dir, n_test, full_eval, budget, notes):
        write(line)
    return notes


def record_job(run_dir: Path, job: dict) -> None:
    """The job's profile and what it scales down, in config.json (``job``) and metrics.json."""
    saved = rundir.read_json(run_dir / rundir.CONFIG)
    rundir.write_json(run_dir / rundir.CONFIG, {**saved, "job": job})
    rundir.update_metrics(run_dir, **job)


def run_job(model: str, out: Optional[str], *, full: bool = False, overrides: Optional[dict] = None,
            train_minutes: Optional[float] = None, progress: bool = True, log: Log = print) -> dict:
    """The main job for ``model`` into ``out`` (default runs/MODEL-TIMESTAMP); returns metrics.json's content.

    ``train_minutes`` replaces the profile's training budget (and gives the full profile one)."""
    if model not in JOB_MODELS:
        raise ConfigError(f"the main job is defined for {', '.join(JOB_MODELS)}, not {model!r}; for other models "
                          f"run ppl-vi train {model} --out RUN, then ppl-vi eval RUN")
    overrides = dict(overrides or {})
    device = resolve_device(overrides.get("device") or "auto")
    profile = choose_profile(device, full)
    if train_minutes is not None:
        if not 0 < train_minutes < float("inf"):
            raise ConfigError(f"--train-minutes must be > 0, got {train_minutes}")
        profile = dataclasses.replace(profile, train_minutes=train_minutes)
    config = build_config(model, None, overrides, profile=profile.config)
    run_dir = rundir.check_run_dir(out or rundir.default_run_dir(config.model))
    start = time.perf_counter()
    # the budget decides the epochs, unless they (or a time limit) were given on the command line
    explicit = "epochs" in overrides or "max_minutes" in overrides
    budget = 60 * profile.train_minutes if profile.train_minutes and not explicit else None
    # the bar first, so that it covers the data load; estimates are refined as soon as they are measured
    bar = RunProgress([Phase("load", 1, LOAD_SECONDS), Phase("train", 1, budget or 60.0, budget=budget),
                       Phase("eval", 1, 30.0), Phase("report", 1, REPORT_SECONDS)],
                      desc=f"ppl-vi run {config.model}", enabled=progress)
    bar.begin("load")
    job = {"profile": profile.name, "scaled_down": [], "run_directory": str(run_dir)}  # scaled_down: below
    hooks = [lambda t, _: record_job(run_dir, job) if t.epoch == 1 else None]
    if budget:
        hooks.append(BudgetHook(profile, bar, bar.write))
    # the data load first: a bad folder leaves nothing behind
    trainer = Trainer(config, run_dir, progress=progress, tracker=bar, epoch_hooks=hooks)
    n_test = trainer.data.test_x.shape[0]
    row_seconds = probe_eval_seconds_per_row(trainer)
    n_iwae = config.eval_images or n_test
    steps = trainer.steps_per_epoch()
    # with a budget, the train phase counts the budget's remaining seconds until the first epoch has said
    # how many epochs fit; without, the configured epochs, a step first estimated at 3 passes of a batch
    if not budget:
        bar.set_units("train", config.epochs * steps)
        bar.set_estimate("train", 3 * row_seconds * config.batch_size)
    bar.set_units("eval", n_test + n_iwae * max(config.eval_k))
    bar.set_estimate("eval", row_seconds)
    job["scaled_down"] = announce_plan(bar.write, profile, config, device, run_dir, n_test, row_seconds, budget)
    with rundir.locked(run_dir, create=True):  # the whole job: no other process trains or scores it meanwhile
        run_training(trainer, run_dir, log=bar.write)
        write_outputs(trainer)
        bar.begin("eval")
        metrics = evaluate_run(run_dir, config.eval_k, progress=lambda n: bar.advance("eval", n), log=bar.write,
                               data=trainer.data)
        bar.begin("report")
        record_job(run_dir, {**job, "job_seconds": time.perf_counter() - start})
        write_report(run_dir)
        bar.advance("report")
        bar.close()
        metrics = rundir.update_metrics(run_dir, job_seconds=time.perf_counter() - start)
    scored = describe_checkpoint({"file": metrics["eval_checkpoint"], "epoch": metrics["eval_checkpoint_epoch"],
                                  "step": metrics["eval_checkpoint_step"]})
    log(f"done in {metrics['job_seconds'] / 60:.1f} min; scored {scored}")
    return metrics
