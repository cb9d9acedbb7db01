"""``ppl-vi``: train | eval | check | list (| report). Thin: parse, then call floor 3.

Every user mistake is one line on stderr and exit status 2 (no traceback unless ``--debug``);
a failing consistency check exits 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import List, Optional

import pyro
import torch

import ppl_vi.models  # noqa: F401  (the registry: every built-in model registered)
from ppl_vi import fields
from ppl_vi import run as rundir
from ppl_vi.check import check_model
from ppl_vi.check.formula import bound_formula
from ppl_vi.check.semisupervised import batches_from_data, check_semisupervised
from ppl_vi.check.userfile import UserPair, check_pair, load_target
from ppl_vi.check.rows import one_line
from ppl_vi.check.usercheck import pair_formula
from ppl_vi.config import FIELDS, TrainConfig, parse_int_list, read_config_file
from ppl_vi.models.configure import build_config
from ppl_vi.data.mnist import fixed_binarization, validate_bernoulli_data
from ppl_vi.data.sources import load_data
from ppl_vi.distributed import is_main_process
from ppl_vi.errors import ConfigError, PplViError, Terminated
from ppl_vi.evaluate import CHECKPOINT_NAMES, describe_checkpoint, evaluate_run
from ppl_vi.job import run_job, train
from ppl_vi.models import REGISTRY
from ppl_vi.loss_registry import DESCRIPTIONS
from ppl_vi.models.base import get_spec
from ppl_vi.models.protocols import SemiSupervised
from ppl_vi.report import CHECK, render_check_page, write_report
from ppl_vi.runtime import seed_everything
from ppl_vi.training.baseline import gain_line

EXAMPLES = """examples:
  ppl-vi run                                   # the main job: a VAE trained, tested and reported, sized to this machine
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


CHECK_EPILOG = """your own file (no registry entry needed) defines at module level:
  model(**batch), guide(**batch)   the Pyro pair, the datapoints in pyro.plate("data", B)
  bound(batch, draws)              your NEGATIVE ELBO, K particles averaged, scaled as Pyro scales it: per datapoint
                                   (B,); with global latents the batch total () (or (B,) values, summed); or a dict
                                   of named terms, each (B,) or () (a global latent's term), checked one by one
  batch                            a dict of tensors (or a function returning one); float64 recommended
  optional: iwae_bound(batch, draws), params, exact_log_likelihood(batch) ((B,), or () with global latents),
  loss / losses (default: TraceEnum_ELBO where the model enumerates, TraceMeanField_ELBO for closed-form KLs,
  else Trace_ELBO), max_plate_nesting, data_plate (the data plate's name, default "data")
draws[s] holds K particles of site s, (K,) + its shape (a local z: (K, B, ...); a global w of shape (3,): (K, 3)).
FILE.py:NAME picks a LatentModel subclass, a dict of replacements (e.g. another bound) or a function (the bound).
Exit 0: every check that ran passed; 1: a check failed (the likely mistakes are named under the table); 2: the
file cannot be used (one line: file, line and cause). Rows the checker cannot run say why and count neither way.

examples:
  ppl-vi check examples/coin_fairness.py                 # a global latent, a closed-form KL
  ppl-vi check examples/coin_fairness.py:flipped_kl
  ppl-vi check examples/gmm_enumerated.py                # an enumerated assignment: TraceEnum_ELBO
  ppl-vi check examples/conjugate_normal.py --formula
  ppl-vi check examples/student_t_fa.py
"""

RUN_EPILOG = """On a GPU: the full protocol (the model's own settings; IWAE-k up to 5000 on all 10,000 test images).
On a CPU: a profile sized to finish in minutes (printed before it starts, recorded in metrics.json);
--full runs the full protocol there too. Flags below override either profile.

examples:
  ppl-vi run                     # VAE, sized to this machine, into runs/vae-TIMESTAMP
  ppl-vi run vae --out runs/vae --full
"""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser, only_for: Optional[str] = None) -> None:
    """One flag per TrainConfig field, its help declared with the field (ppl_vi.fields), with the default,
    each model's own default and the models it applies to. Defaults stay None here: the model's then apply.
    ``only_for``: just the fields that model reads."""
    model_defaults = {name: spec.defaults for name, spec in REGISTRY.items()}
    group = parser.add_argument_group("configuration (one flag per field of the run's config.json)")
    for field in dataclasses.fields(TrainConfig):
        if field.name == "model" or (only_for and not fields.applies(field.name, only_for, REGISTRY[only_for].data)):
            continue
        help_text = fields.help_text(field.name, model_defaults)
        if field.type in ("bool", bool):
            group.add_argument(_flag(field.name), dest=field.name, action=argparse.BooleanOptionalAction, default=None,
                               help=help_text)
            continue
        # "Optional[float]" too: --max-minutes parsed as a str crashed at the end of the first epoch
        kind = {"int": int, "float": float, "Optional[int]": int, "Optional[float]": float}.get(str(field.type), str)
        metavar = ("{" + ",".join(fields.CHOICES[field.name]) + "}" if field.name in fields.CHOICES
                   else "N,N,..." if str(field.type).startswith("List") else field.name.upper())
        group.add_argument(_flag(field.name), dest=field.name, type=kind, default=None, metavar=metavar,
                           help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ppl-vi", description="Latent-variable models as Pyro model/guide pairs, checked against hand-derived bounds.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model with SVI into a run directory", epilog=EXAMPLES,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("model", nargs="?", help=f"model name: {', '.join(sorted(REGISTRY))} (ppl-vi list describes them)")
    train.add_argument("--out", help="run directory to create (config, metrics.json, checkpoints, figures); "
                       "default: runs/MODEL-YYYYmmdd-HHMMSS")
    train.add_argument("--config", dest="config_file", help="a .json/.toml/.yaml config (a run's config.json works)")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    train.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty --out")
    train.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    add_config_flags(train)

    job = sub.add_parser("run", help="the main job: train, then test NELBO and IWAE-k ± SE, figures and report, "
                         "sized to this machine", epilog=RUN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    job.add_argument("model", nargs="?", default="vae", help="model name (default: vae)")
    job.add_argument("--out", help="run directory to create; default: runs/MODEL-YYYYmmdd-HHMMSS")
    job.add_argument("--full", action="store_true",
                     help="the full protocol on a CPU too (the GPU default): the model's own settings, "
                          "IWAE-k up to 5000 on all test images")
    job.add_argument("--train-minutes", type=float, default=None,
                     help="training budget: the epochs that fit it, the learning rate decayed over them "
                          "(default: the cpu profile's 3.5; the full profile trains its epochs)")
    job.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    add_config_flags(job, only_for="vae")

    ev = sub.add_parser("eval", help="test-set NELBO, KL, reconstruction and IWAE-k of a trained run")
    ev.add_argument("run_dir", help="a run directory written by ppl-vi train")
    ev.add_argument("--k", default=None, help="comma-separated ks for IWAE-k (default: the run's eval_k)")
    ev.add_argument("--checkpoint", choices=CHECKPOINT_NAMES, default="best",
                    help="which checkpoint to score: best (lowest validation loss) or last (default: best)")
    ev.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: the run's)")
    ev.add_argument("--batch-size", type=int, default=500, help="test images per forward pass (default: 500)")
    ev.add_argument("--images", type=int, default=None,
                    help="test images IWAE-k is computed on (default: the run's eval_images; 0: all)")
    ev.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")

    ch = sub.add_parser("check", help="hand-derived bounds against Pyro's losses and the exact answer",
                        epilog=CHECK_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ch.add_argument("model", metavar="MODEL | FILE.py[:NAME]",
                    help="a built-in model, or your own file (module-level model, guide, bound, batch)")
    ch.add_argument("--batch-size", type=int, default=32, help="datapoints in the checked batch (built-in models; a file brings its own batch)")
    ch.add_argument("--k", type=int, default=3, help="particles in the same-sample comparisons")
    ch.add_argument("--beta", type=float, default=2.0, help="β of the scaled comparisons (built-in models)")
    ch.add_argument("--seed", type=int, default=0)
    ch.add_argument("--repeats", type=int, default=50, help="seeds in the statistical comparisons (>= 2)")
    ch.add_argument("--gradient-seeds", type=int, default=50,
                    help="seeds averaged in the expected-gradient checks (>= 2; discrete sites are enumerated)")
    ch.add_argument("--data-dir", default=None)
    ch.add_argument("--json", dest="json_out", help="also write the check table as JSON here")
    ch.add_argument("--formula", action="store_true",
                    help="print the objective Pyro optimises (plain text and LaTeX), with your site names, and stop")
    ch.add_argument("--html", dest="html_out", metavar="PATH",
                    help="also write the check table, diagnoses and formula as one self-contained HTML page")
    ch.add_argument("--m1", default=None, metavar="RUN_DIR",
                    help="m1m2 only: check with the trained M1 of this vae run, frozen (default: a random M1, trained)")

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
        file_values = rundir.load_config_dict(run_dir)
    else:
        file_values = read_config_file(args.config_file) if args.config_file else {}
    # every source merged and validated once: flags the model does not read and a model x loss combination
    # that cannot train are refused here, in one line, before any data load
    config = build_config(None if args.resume else args.model, file_values, overrides, strict=True)
    if not args.resume:
        # checked here, created by train() only once the data have loaded (no half-made run directory);
        # under torchrun only rank 0 creates (or clears) the run directory; the others never write it
        if is_main_process():
            out = args.out or rundir.default_run_dir(config.model)
            run_dir = rundir.check_run_dir(out, overwrite=args.overwrite)
            if not args.out:
                print(f"run directory: {run_dir} (no --out given)", flush=True)
        else:
            run_dir = Path(args.out) if args.out else None
    trainer = train(config, run_dir, resume=bool(args.resume), progress=args.progress, overwrite=args.overwrite)
    if not trainer.dist.is_main:
        return 0
    shown = {k: v for k, v in trainer.metrics.items() if isinstance(v, (int, float))}
    print(" ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()))
    if run_dir is not None:
        print(f"run directory: {run_dir}")
    if gain_line(trainer.metrics):  # semi-supervised: the last line says what the unlabelled images added
        print(gain_line(trainer.metrics))
    return 0


def print_results(metrics: dict) -> None:
    """Test NELBO, its terms and -IWAE_k, each ± its standard error."""
    for key in ("test_nelbo", "test_kl", "test_rec", "test_log_likelihood", "test_accuracy"):
        if key in metrics:
            print(f"{key:>22}: {metrics[key]:.4f} ± {metrics.get(key + '_se', float('nan')):.4f}")
    subset = metrics.get("test_iwae_images")
    if "test_nelbo_on_iwae_images" in metrics:
        print(f"{'test_nelbo':>22}: {metrics['test_nelbo_on_iwae_images']:.4f} ± "
              f"{metrics['test_nelbo_on_iwae_images_se']:.4f}   ({subset} test images, as IWAE below)")
    for k, value in metrics["test_iwae"].items():
        print(f"{'-IWAE_' + k:>22}: {value:.4f} ± {metrics['test_iwae_se'][k]:.4f}"
              + (f"   ({subset} test images)" if subset and subset != metrics.get("test_nelbo_images") else ""))


def cmd_run(args) -> int:
    overrides = {name: getattr(args, name) for name in FIELDS if name != "model" and getattr(args, name, None) is not None}
    if args.model in REGISTRY:
        fields.refuse_inapplicable(overrides, args.model, get_spec(args.model).data)
    metrics = run_job(args.model, args.out, full=args.full, overrides=overrides, train_minutes=args.train_minutes,
                      progress=args.progress)
    print_results(metrics)
    print(f"run directory: {metrics['run_directory']} (report.html, metrics.json, figures/)")
    return 0


def cmd_eval(args) -> int:
    if args.k is not None:
        ks = parse_int_list(args.k, "--k")
    else:  # the run's own eval_k, validated (config.json may have been edited by hand)
        ks = build_config(None, rundir.load_config_dict(Path(args.run_dir))).eval_k
    if not ks or any(k < 1 for k in ks):
        raise ConfigError(f"--k values must be integers >= 1, got {args.k}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.images is not None and args.images < 0:
        raise ConfigError(f"--images must be >= 0 (0: all), got {args.images}")
    metrics = evaluate_run(Path(args.run_dir), ks, checkpoint=args.checkpoint, device=args.device,
                           batch_size=args.batch_size, progress=args.progress, iwae_images=args.images,
                           log=lambda line: print(line, flush=True))
    scored = describe_checkpoint({"file": metrics["eval_checkpoint"], "epoch": metrics["eval_checkpoint_epoch"],
                                  "step": metrics["eval_checkpoint_step"]})
    print_results(metrics)
    kept = metrics.get("at_end_of_training", {})
    for key in (k for k in kept if k != "weights"):
        print(f"{key} is now {scored}'s; the value at the {kept['weights']}, {kept[key]:.4f}, "
              "is kept in metrics.json under at_end_of_training")
    print(f"written to {Path(args.run_dir) / rundir.METRICS}; figures: {', '.join(metrics['eval_figures'])}")
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
    for flag, out in (("--json", args.json_out), ("--html", getattr(args, "html_out", None))):
        if out and Path(out).is_dir():
            raise ConfigError(f"{flag} {out} is a directory; expected a file name such as "
                              f"{Path(out) / ('check.json' if flag == '--json' else 'check.html')}")
    seed_everything(args.seed)
    pyro.enable_validation(True)
    name = args.model
    if is_user_file(name):
        loaded = load_target(name)
        if not isinstance(loaded, UserPair):  # FILE.py:Class, a LatentModel: checked as the built-in models are
            name = next((n for n, s in REGISTRY.items() if s.cls is loaded), None)
            if name is None:
                raise ConfigError(f"{args.model}: {loaded.__name__} is not registered; decorate it with "
                                  "@register(...) (see examples/student_t_fa.py), or define model/guide/bound/batch")
        else:
            try:
                if args.formula:
                    return print_formula(pair_formula(loaded))
                report = check_pair(loaded, num_particles=args.k, seed=args.seed, repeats=args.repeats,
                                    gradient_seeds=args.gradient_seeds)
            except PplViError:
                raise
            except Exception as exc:  # the checker's own failure: one line too (--debug shows the traceback)
                if args.debug:
                    raise
                raise ConfigError(f"{args.model}: the checker itself failed on this file ({one_line(exc)}); "
                                  "rerun with --debug for the traceback, and please report it") from None
            first = next(iter(loaded.batch.values()))
            print(f"ppl-vi check {args.model}: {str(first.dtype).replace('torch.', '')}, batch of {first.shape[0]}, "
                  f"K={args.k}, seed {args.seed}")
            return finish_check(args, report)
    spec = get_spec(name)
    if getattr(args, "m1", None) and name != "m1m2":
        raise ConfigError(f"--m1 applies to m1m2 only (M1+M2's trained M1), not to {name}")
    config = build_config(name, overrides={"seed": args.seed, "data_dir": args.data_dir, "device": "cpu",
                                           "n_train": 1000, "n_test": 200, "m1": getattr(args, "m1", None)})
    data = load_data(spec.data, config, torch.device("cpu"), dtype=torch.float64)
    model = spec.build(config, data.info).to(torch.float64)  # the checks run in float64 (the formula's trace too)
    x = data.train_x[: args.batch_size]
    if data.binary:
        validate_bernoulli_data(x, f"the {data.kind} batch")  # corrupt data: one line, before binarising
        x = fixed_binarization(x, seed=args.seed)
    # the checker runs Pyro's losses on purpose where they warn (Trace_ELBO on an enumerated model...): no stray
    # warnings before the table; the structure row reports a guide that misses a site
    warnings.filterwarnings("ignore", module=r"pyro(\..*)?$")
    common = dict(num_particles=args.k, beta=args.beta, seed=args.seed, repeats=args.repeats,
                  gradient_seeds=args.gradient_seeds)
    if isinstance(model, SemiSupervised):  # a labelled and an unlabelled batch
        batches = batches_from_data(model, data, args.batch_size, args.seed)
        if args.formula:
            return print_formula(bound_formula(model.model, model.guide, batches[0], model.max_plate_nesting))
        report = check_semisupervised(model, *batches, **common)
    else:
        y = data.train_y[: args.batch_size] if data.train_y is not None else None
        batch = model.make_batch(x, y)
        if args.formula:
            return print_formula(bound_formula(model.model, model.guide, batch, model.max_plate_nesting))
        report = check_model(model, batch, **common)
        report.formula = bound_formula(model.model, model.guide, batch, model.max_plate_nesting)
    print(f"ppl-vi check {args.model}: float64, batch of {args.batch_size}, K={args.k}, seed {args.seed}")
    return finish_check(args, report)


def is_user_file(target: str) -> bool:
    return target.endswith(".py") or ".py:" in target


def print_formula(formula: dict) -> int:
    """``ppl-vi check --formula``: the objective as plain text, then LaTeX."""
    if not formula:
        raise ConfigError("no formula: the model and guide do not run once as written")
    print(formula["text"])
    print(formula["iwae_text"])
    if formula.get("note"):
        print(formula["note"])
    print()
    print("LaTeX:")
    print(formula["latex"])
    print(formula["iwae_latex"])
    return 0


def finish_check(args, report) -> int:
    print(report.table())
    if args.json_out:
        rundir.write_json(Path(args.json_out), report.to_dict())
    if getattr(args, "html_out", None):
        page = render_check_page(report.to_dict(), f"ppl-vi check {args.model}").encode("utf-8")
        rundir.atomic_write(Path(args.html_out), lambda handle: handle.write(page))
        print(f"HTML written: {args.html_out}")
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
    with rundir.locked(run_dir):
        if args.check:
            saved = build_config(None, rundir.load_config_dict(run_dir))  # validated: a hand-edited file is one line
            argv = ["check", saved.model, "--repeats", "20", "--seed", str(saved.seed), "--json", str(run_dir / CHECK)]
            if saved.data_dir:
                argv += ["--data-dir", saved.data_dir]
            if saved.m1:  # m1m2: the run's own (frozen) M1
                argv += ["--m1", saved.m1]
            status = cmd_check(build_parser().parse_args(argv))
        path = write_report(run_dir)
    print(f"report written: {path}")
    return status


COMMANDS = {"run": cmd_run, "train": cmd_train, "eval": cmd_eval, "check": cmd_check, "list": cmd_list, "report": cmd_report}


def _terminated(signum, frame):
    raise Terminated("terminated by SIGTERM; every file in the run directory is whole (atomic writes)")


def main(argv: Optional[List[str]] = None) -> int:
    """Run one command; a user mistake is one line and exit 2, SIGTERM one line and exit 143 (128 + 15)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if main_thread else None  # training refines it
    try:
        return COMMANDS[args.command](args)
    except PplViError as exc:
        if args.debug:
            raise
        print(f"ppl-vi {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Terminated as exc:
        print(f"ppl-vi {args.command}: {exc}", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("ppl-vi: interrupted; the last checkpoint in the run directory is intact", file=sys.stderr)
        return 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
