"""``ppl-vi``: train | eval | check | list (| report). Thin: parse, then call floor 3.

Every user mistake is one line on stderr and exit status 2 (no traceback unless ``--debug``);
a failing consistency check exits 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings
from pathlib import Path
from typing import List, Optional

import pyro
import torch

import ppl_vi.models  # noqa: F401  (the registry: every built-in model registered)
from ppl_vi import run as rundir
from ppl_vi.check import check_model
from ppl_vi.check.semisupervised import batches_from_data, check_semisupervised
from ppl_vi.config import FIELDS, TrainConfig, build_config, parse_int_list, read_config_file
from ppl_vi.data.mnist import fixed_binarization, validate_bernoulli_data
from ppl_vi.data.sources import load_data
from ppl_vi.distributed import is_main_process
from ppl_vi.errors import ConfigError, PplViError
from ppl_vi.evaluate import evaluate_run
from ppl_vi.models import REGISTRY
from ppl_vi.models.base import default_make_batch, get_spec
from ppl_vi.objectives.losses import check_config
from ppl_vi.objectives.losses import DESCRIPTIONS
from ppl_vi.report import CHECK, write_report
from ppl_vi.runtime import seed_everything
from ppl_vi.training import train

EXAMPLES = """examples:
  ppl-vi list
  ppl-vi check gmm
  ppl-vi train gmm --device cpu --seed 0 --out runs/gmm
  ppl-vi train vae --epochs 1 --device cpu --out runs/vae
  ppl-vi eval runs/vae --k 1,10
  ppl-vi train vae --loss iwae --k 50 --out runs/iwae50
  ppl-vi train --resume runs/vae
  ppl-vi train --config runs/vae/config.json --out runs/vae-again
  ppl-vi check gmm --json runs/gmm/check.json && ppl-vi report runs/gmm
  torchrun --standalone --nproc_per_node 2 -m ppl_vi train gmm --device cpu --out runs/gmm-ddp
"""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (defaults None: the model's defaults then apply)."""
    for field in dataclasses.fields(TrainConfig):
        if field.name == "model":
            continue
        if field.type in ("bool", bool):
            parser.add_argument(_flag(field.name), dest=field.name, action=argparse.BooleanOptionalAction, default=None)
        else:
            # "Optional[float]" too: --max-minutes parsed as a str crashed at the end of the first epoch
            kind = {"int": int, "float": float, "Optional[int]": int, "Optional[float]": float}.get(str(field.type), str)
            parser.add_argument(_flag(field.name), dest=field.name, type=kind, default=None, metavar=field.name.upper())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ppl-vi", description="Latent-variable models as Pyro model/guide pairs, checked against hand-derived bounds.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model with SVI into a run directory", epilog=EXAMPLES,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("model", nargs="?", help="model name (ppl-vi list)")
    train.add_argument("--out", help="run directory to create (config, metrics.json, checkpoints, figures)")
    train.add_argument("--config", dest="config_file", help="a .json/.toml/.yaml config (a run's config.json works)")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    train.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty --out")
    train.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    add_config_flags(train)

    ev = sub.add_parser("eval", help="test-set NELBO, KL, reconstruction and IWAE-k of a trained run")
    ev.add_argument("run_dir")
    ev.add_argument("--k", default=None, help="comma-separated ks for IWAE-k (default: the run's eval_k)")
    ev.add_argument("--device", default=None, help="cpu | cuda (default: the run's)")
    ev.add_argument("--batch-size", type=int, default=500)
    ev.add_argument("--no-progress", dest="progress", action="store_false")

    ch = sub.add_parser("check", help="hand-derived bounds against Pyro's losses and the exact answer")
    ch.add_argument("model")
    ch.add_argument("--batch-size", type=int, default=32, help="datapoints in the checked batch")
    ch.add_argument("--k", type=int, default=3, help="particles in the same-sample comparisons")
    ch.add_argument("--beta", type=float, default=2.0, help="β of the scaled comparisons")
    ch.add_argument("--seed", type=int, default=0)
    ch.add_argument("--repeats", type=int, default=50, help="seeds in the statistical comparisons (>= 2)")
    ch.add_argument("--gradient-seeds", type=int, default=50,
                    help="seeds averaged in the expected-gradient checks (>= 2; discrete sites are enumerated)")
    ch.add_argument("--data-dir", default=None)
    ch.add_argument("--json", dest="json_out", help="also write the check table as JSON here")

    sub.add_parser("list", help="models and losses, one line each")

    rep = sub.add_parser("report", help="write RUN_DIR/report.html: metrics, figures, check table, config")
    rep.add_argument("run_dir")
    rep.add_argument("--check", action="store_true",
                     help="first run a quick `ppl-vi check MODEL` (20 seeds) into RUN_DIR/check.json")
    return parser


def cmd_train(args) -> int:
    overrides = {name: getattr(args, name) for name in FIELDS if name != "model" and getattr(args, name, None) is not None}
    if args.resume:
        run_dir = rundir.prepare_run_dir(args.resume, resume=True)
        saved = rundir.load_config_dict(run_dir)
        config = build_config(saved["model"], saved, overrides)
    else:
        file_values = read_config_file(args.config_file) if args.config_file else {}
        config = build_config(args.model, file_values, overrides)
        check_config(config, get_spec(config.model))  # a model x loss combination that cannot train: one line
        # checked here, created by train() only once the data have loaded (no half-made run directory);
        # under torchrun only rank 0 creates (or clears) the run directory; the others never write it
        run_dir = rundir.check_run_dir(args.out, overwrite=args.overwrite) if is_main_process() \
            else (Path(args.out) if args.out else None)
    trainer = train(config, run_dir, resume=bool(args.resume), progress=args.progress, overwrite=args.overwrite)
    if not trainer.dist.is_main:
        return 0
    shown = {k: v for k, v in trainer.metrics.items() if isinstance(v, (int, float))}
    print(" ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()))
    if run_dir is not None:
        print(f"run directory: {run_dir}")
    return 0


def cmd_eval(args) -> int:
    if args.k is not None:
        ks = parse_int_list(args.k, "--k")
    else:
        ks = rundir.load_config_dict(Path(args.run_dir)).get("eval_k", [1, 10])
    if not ks or any(k < 1 for k in ks):
        raise ConfigError(f"--k values must be integers >= 1, got {args.k}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    metrics = evaluate_run(Path(args.run_dir), ks, device=args.device, batch_size=args.batch_size,
                           progress=args.progress)
    for key in ("test_nelbo", "test_kl", "test_rec", "test_log_likelihood", "test_accuracy"):
        if key in metrics:
            print(f"{key:>22}: {metrics[key]:.4f} ± {metrics.get(key + '_se', float('nan')):.4f}")
    for k, value in metrics["test_iwae"].items():
        print(f"{'-IWAE_' + k:>22}: {value:.4f} ± {metrics['test_iwae_se'][k]:.4f}")
    print(f"written to {Path(args.run_dir) / rundir.METRICS}")
    if (Path(args.run_dir) / "report.html").is_file():
        print(f"report refreshed: {write_report(Path(args.run_dir))}")
    return 0


def cmd_check(args) -> int:
    if args.k < 1:
        raise ConfigError(f"--k must be >= 1, got {args.k}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.repeats < 2:
        raise ConfigError(f"--repeats must be >= 2 (the statistical rows compare means over seeds), got {args.repeats}")
    if args.gradient_seeds < 2:
        raise ConfigError(f"--gradient-seeds must be >= 2 (the expected-gradient rows average over seeds), got "
                          f"{args.gradient_seeds}")
    spec = get_spec(args.model)
    config = build_config(args.model, overrides={"seed": args.seed, "data_dir": args.data_dir, "device": "cpu",
                                                 "n_train": 1000, "n_test": 200})
    seed_everything(args.seed)
    pyro.enable_validation(True)
    data = load_data(spec.data, config, torch.device("cpu"), dtype=torch.float64)
    model = spec.build(config, data.info)
    x = data.train_x[: args.batch_size]
    if data.binary:
        validate_bernoulli_data(x, f"the {data.kind} batch")  # corrupt data: one line, before binarising
        x = fixed_binarization(x, seed=args.seed)
    warnings.filterwarnings("ignore", message=".*enumerate sites, you need to use TraceEnum_ELBO.*")
    common = dict(num_particles=args.k, beta=args.beta, seed=args.seed, repeats=args.repeats,
                  gradient_seeds=args.gradient_seeds)
    if hasattr(model, "latent_sites_for"):  # semi-supervised: a labelled and an unlabelled batch
        report = check_semisupervised(model, *batches_from_data(model, data, args.batch_size, args.seed), **common)
    else:
        y = data.train_y[: args.batch_size] if data.train_y is not None else None
        batch = getattr(model, "make_batch", default_make_batch)(x, y)
        report = check_model(model, batch, **common)
    print(f"ppl-vi check {args.model}: float64, batch of {args.batch_size}, K={args.k}, seed {args.seed}")
    print(report.table())
    if args.json_out:
        rundir.write_json(Path(args.json_out), report.to_dict())
    return 0 if report.passed else 1


def cmd_list(args) -> int:
    print("models:")
    for name, spec in sorted(REGISTRY.items()):
        print(f"  {name:<18} {spec.description}  [data: {spec.data}; default loss: {spec.defaults.get('loss', 'trace')}]")
    print("losses (--loss):")
    for name, text in DESCRIPTIONS.items():
        print(f"  {name:<18} {text}")
    return 0


def cmd_report(args) -> int:
    run_dir = Path(args.run_dir)
    if not (run_dir / rundir.CONFIG).is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no {rundir.CONFIG}); train into it first "
                          f"(ppl-vi train MODEL --out {run_dir})")
    status = 0
    if args.check:
        saved = rundir.load_config_dict(run_dir)
        argv = ["check", saved["model"], "--repeats", "20", "--seed", str(saved.get("seed", 0)),
                "--json", str(run_dir / CHECK)]
        if saved.get("data_dir"):
            argv += ["--data-dir", saved["data_dir"]]
        status = cmd_check(build_parser().parse_args(argv))
    path = write_report(run_dir)
    print(f"report written: {path}")
    return status


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "check": cmd_check, "list": cmd_list, "report": cmd_report}


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except PplViError as exc:
        if args.debug:
            raise
        print(f"ppl-vi {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ppl-vi: interrupted; the last checkpoint in the run directory is intact", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
