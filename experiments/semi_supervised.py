"""Semi-supervised MNIST with 100 labels: the supervised-only baseline, M2 and M1+M2,
each over 3 draws of the labelled set.

Every row is a run directory made by ``python -m ppl_vi`` commands, exactly as a user types them::

    python -m ppl_vi train vae --seed 0 --out OUT/m1-vae ...                              # M1: no labels, once
    python -m ppl_vi train ssvae --labels 100 --seed S --out OUT/ssvae-l100-sS ...         # M2 and its baseline
    python -m ppl_vi eval OUT/ssvae-l100-sS --checkpoint last --k 1,10
    python -m ppl_vi train m1m2 --m1 OUT/m1-vae --labels 100 --seed S --out OUT/m1m2-l100-sS ...   # M1+M2
    python -m ppl_vi eval OUT/m1m2-l100-sS --checkpoint last --k 1,10

``--seed S`` draws the labelled set (``labelled_subset(train_y, 100, seed=S)``: 10 images per
class) and also seeds the 5,000-image validation split, the initialisation and the data order.
Every semi-supervised run trains, after the model, its **supervised-only baseline**: q(y|x)'s
784-500-10 network trained on the same 100 labels alone (``ppl_vi.training.baseline``); an
``m1m2`` run also trains its classifier network on M1's features from the labels alone. M1 is
learnt without labels, so one M1 serves the three label draws (its training time is reported
apart). The model evaluated is the last epoch's (``eval --checkpoint last``), like its baseline's
last step: no label outside the 100 selects anything. Accuracies are on the full 10,000-image test set
(fixed binarisation), reported as mean ± sample sd over the seeds; each run's
``figures/accuracy.png`` draws its test accuracy per epoch against its baseline.

The results go to ``experiments/semi_supervised.json`` and to the section "## Semi-supervised
and conditional VAEs (issue 4)" of ``experiments/RESULTS.md``, which this module renders together
with ``experiments/completion.json`` (written by ``experiments/completion.py``); other sections of
RESULTS.md are left alone. ``--quick`` rows are pipeline smoke tests (2000 training images, one
epoch, small nets), kept apart from results and never judged against a target.

Usage::

    python experiments/semi_supervised.py --device cpu --parallel 1 --minutes 10 --m1 M1_RUN   # CPU rows, each model's default objective
    # (the history rows of RESULTS.md ran Kingma et al.'s objective: --ssvae-args='--objective kingma --alpha 10')
    python experiments/semi_supervised.py --device cuda --parallel 3 --minutes 8       # the GPU rows
    python experiments/semi_supervised.py --device cpu --quick                         # CPU smoke test
    python experiments/semi_supervised.py --collect                                    # re-collect / re-render
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import shlex
import sys
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import runner  # noqa: E402  (running rows, records, results files: shared with vae_family.py, completion.py)
from runner import REPO, ROW_FILE  # noqa: E402
from stats import mean_sd  # noqa: E402
import targets  # noqa: E402  (the targets, as data, and their judgements: shared with reproduce.py)
from targets import PYRO_BASELINE, PYRO_CVAE, SSL_ACCURACY, SSL_GAIN  # noqa: E402

SECTION = "## Semi-supervised and conditional VAEs (issue 4)"
RESULTS_JSON = REPO / "experiments" / "semi_supervised.json"
COMPLETION_JSON = REPO / "experiments" / "completion.json"
RESULTS_MD = REPO / "experiments" / "RESULTS.md"

FULL_K = [1, 10]
QUICK_TRAIN = ["--epochs", "1", "--max-minutes", "0.2", "--train-subset", "2000", "--val-size", "1000",
               "--hidden", "128", "--z-dim", "16", "--baseline-steps", "50"]
QUICK_M1 = ["--epochs", "1", "--max-minutes", "0.2", "--train-subset", "2000", "--val-size", "1000",
            "--hidden", "128", "--z-dim", "16"]
KINDS = ("ssvae", "m1m2")
SSL_GPU_COMMAND = "python experiments/semi_supervised.py --device cuda --parallel 3 --minutes 8"
#: the CPU result as measured with Kingma et al.'s objective (history): M1 trained beforehand (see the M1 line in RESULTS.md), then 10 minutes
#: of training per M2 / M1+M2 run, one run at a time on a 2-core machine shared with other jobs
SSL_CPU_COMMAND = ("python experiments/semi_supervised.py --device cpu --parallel 1 --minutes 10 --m1 M1_RUN "
                   "--ssvae-args='--alpha 10' --m1m2-args='--alpha 0.1'")
COMPLETION_GPU_COMMAND = "python experiments/completion.py --device cuda --minutes 6 --k 1,10,100,1000"
ABOUT = "ppl_vi issue 11, semi-supervised MNIST (baseline, M2, M1+M2); written by experiments/semi_supervised.py"
COMPLETION_ABOUT = "ppl_vi issue 4, CVAE image completion; written by experiments/completion.py"


# ---- helpers ---------------------------------------------------------------------------------------


def load_average() -> Optional[float]:
    """The machine's 1-minute load average (how busy the CPU was: timings under load are pessimistic)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


# ---- running ---------------------------------------------------------------------------------------


def run_name(opts, seed: int, kind: str = "ssvae") -> str:
    return f"{'smoke-' if opts.quick else ''}{kind}-l{opts.labels}-s{seed}"


def m1_name(opts) -> str:
    return f"{'smoke-' if opts.quick else ''}m1-vae"


def budget(opts, minutes: Optional[float], epochs: Optional[int], quick: List[str]) -> List[str]:
    return quick if opts.quick else runner.budget_args(minutes, epochs)


def build_commands(opts, seed: int, run_dir: Path, kind: str = "ssvae", m1_dir: Optional[Path] = None) -> tuple:
    """The train and eval commands of one semi-supervised row (``kind`` ssvae or m1m2)."""
    run_arg = runner.run_arg(run_dir)
    train = ["train", kind, "--labels", str(opts.labels), "--device", opts.device, "--seed", str(seed),
             "--out", run_arg, "--overwrite", "--no-progress"]
    if kind == "m1m2":
        train += ["--m1", runner.run_arg(m1_dir)]
    train += budget(opts, opts.minutes, opts.epochs, QUICK_TRAIN)
    train += ["--eval-k", ",".join(map(str, opts.ks))]
    train += shlex.split(opts.train_args or "") + shlex.split(getattr(opts, f"{kind}_args") or "")
    evaluate = ["eval", run_arg, "--checkpoint", "last", "--k", ",".join(map(str, opts.ks)), "--no-progress"]
    return train, evaluate


def m1_commands(opts, run_dir: Path) -> tuple:
    """M1: a ``vae`` on the training images, no labels; seed 0 (its validation split is seed 0's)."""
    run_arg = runner.run_arg(run_dir)
    train = ["train", "vae", "--device", opts.device, "--seed", "0", "--out", run_arg, "--overwrite",
             "--no-progress", "--eval-k", "1"]
    train += budget(opts, opts.m1_minutes if opts.m1_minutes is not None else opts.minutes, opts.m1_epochs, QUICK_M1)
    train += shlex.split(opts.train_args or "") + shlex.split(opts.m1_args or "")
    return train, ["eval", run_arg, "--k", "1", "--no-progress"]


KEEP = ("test_accuracy", "confusion_matrix", "test_nelbo", "test_nelbo_se", "test_kl", "test_rec",
        "test_iwae", "test_iwae_se", "epochs_done", "steps", "train_seconds", "eval_seconds", "final_val_loss",
        "final_test_accuracy", "final_val_accuracy", "baseline_test_accuracy", "baseline_val_accuracy",
        "baseline_seconds", "baseline_m1_test_accuracy", "baseline_m1_val_accuracy", "baseline_m1_seconds")


def read_run(run_dir: Path) -> dict:
    """The run's kept metrics, environment, config and figures, and its accuracy per epoch
    (``curve``: [epoch, test accuracy, training seconds] from history.jsonl)."""
    out = runner.read_run(run_dir, KEEP)
    history = run_dir / "history.jsonl"
    if history.is_file():
        records = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
        out["curve"] = [[h["epoch"], h["test_accuracy"], round(h.get("seconds", 0.0), 1)]
                        for h in records if "test_accuracy" in h]
    m1 = out.get("config", {}).get("m1")
    if m1 and (Path(m1) / "config.json").is_file():
        out["m1_run"] = read_m1(Path(m1))
    return out


def read_m1(m1_dir: Path) -> dict:
    """What an m1m2 run's M1 was: its directory, training command, architecture and training record."""
    config = json.loads((m1_dir / "config.json").read_text())
    metrics = json.loads((m1_dir / "metrics.json").read_text()) if (m1_dir / "metrics.json").is_file() else {}
    command = config.get("environment", {}).get("command", "")
    if "__main__.py " in command:  # argv as recorded: PATH/ppl_vi/__main__.py ARGS is python -m ppl_vi ARGS
        command = "python -m ppl_vi " + command.split("__main__.py ", 1)[1]
    cfg = config.get("config", {})
    return dict(run_dir=runner.portable(m1_dir), command=command, git_commit=config.get("environment", {}).get(
        "git_commit"), hidden=cfg.get("hidden"), z_dim=cfg.get("z_dim"), train_subset=cfg.get("train_subset"),
        **{k: metrics[k] for k in ("epochs_done", "train_seconds", "final_val_loss", "test_nelbo", "test_nelbo_se")
           if k in metrics})


def row(opts, name: str, kind: str, seed: Optional[int], stages, run_dir: Path, out_dir: Path, dev_name: str,
        threads: int) -> dict:
    """Run one row's stages (or print them, ``--dry-run``); the record, with the load around it."""
    record = dict(run=name, kind=kind, seed=seed, labels=opts.labels, mode="smoke" if opts.quick else "full",
                  device=opts.device, device_name=dev_name, parallel=opts.parallel,
                  train_command=runner.shown(stages[0][1]), eval_command=runner.shown(stages[1][1]),
                  run_dir=runner.portable(run_dir), started=runner.now(), load_start=load_average())
    record = runner.run_row(name, run_dir, stages, record, out_dir, threads, read_run, opts.dry_run)
    record["load_end"] = load_average()
    if record.get("status") == "ok" and not opts.dry_run:  # row.json again, with the load at the end
        (run_dir / ROW_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def run_all(opts, out_dir: Path, dev_name: str) -> List[dict]:
    """M1 (if an m1m2 row needs it and ``--m1`` names none), then every (kind, seed) row, ``--parallel``
    at a time; an m1m2 row starts once M1 has finished (and is skipped if M1 failed)."""
    threads = runner.threads_per_run(opts.parallel)
    kinds = [k for k in KINDS if k in opts.kinds]
    m1_dir = Path(opts.m1).resolve() if opts.m1 else out_dir / m1_name(opts)
    with concurrent.futures.ThreadPoolExecutor(max_workers=opts.parallel) as pool:
        m1_future = None
        if "m1m2" in kinds and not opts.m1:  # submitted first: it starts before any row that waits on it
            m1_future = pool.submit(row, opts, m1_name(opts), "m1", None, tuple(zip(("train", "eval"),
                                    m1_commands(opts, m1_dir))), m1_dir, out_dir, dev_name, threads)

        def semi_supervised(kind: str, seed: int) -> dict:
            name = run_name(opts, seed, kind)
            if kind == "m1m2" and m1_future is not None and m1_future.result().get("status", "ok") != "ok":
                return dict(run=name, kind=kind, seed=seed, labels=opts.labels, mode="smoke" if opts.quick else "full",
                            device=opts.device, device_name=dev_name, status="skipped: M1 failed",
                            train_command="", eval_command="")
            stages = tuple(zip(("train", "eval"), build_commands(opts, seed, out_dir / name, kind, m1_dir)))
            return row(opts, name, kind, seed, stages, out_dir / name, out_dir, dev_name, threads)

        futures = [pool.submit(semi_supervised, kind, seed) for kind in kinds for seed in opts.seed_list]
        records = ([m1_future.result()] if m1_future is not None else []) + [f.result() for f in futures]
    return records


def collect(out_dir: Path) -> List[dict]:
    """Finished rows under ``out_dir``: M2, M1+M2 and M1 runs (kind from the record, else the name)."""
    records = []
    for pattern in ("*ssvae-l*", "*m1m2-l*", "*m1-vae"):
        for record in runner.collect(out_dir, pattern, read_run):
            record.setdefault("kind", "m1" if record["run"].endswith("m1-vae") else
                              "m1m2" if "m1m2-l" in record["run"] else "ssvae")
            records.append(record)
    return records


def collect_completion(out_dir: Path, completion_json: Path) -> None:
    """Merge the records of finished completion runs under ``out_dir`` (RUN/completion.json, written by
    experiments/completion.py) into ``completion_json``: runs copied back from another machine."""
    found = sorted(out_dir.glob("*completion/completion.json"))
    if not found:
        return
    records = [json.loads(path.read_text()) for path in found]
    runner.save_rows(completion_json, COMPLETION_ABOUT, {completion_key(r): r for r in records})


def completion_key(record: dict) -> str:
    """Completion rows are kept per (smoke|full, cpu|cuda)."""
    return f"{record['mode']}/{runner.device_kind(record.get('device', ''))}"


def groups(rows: Dict[str, dict]) -> Dict[tuple, List[dict]]:
    """Rows grouped by (mode, device kind, labels): one experiment (its M1, M2 and M1+M2 rows)."""
    out: Dict[tuple, List[dict]] = {}
    for key, r in sorted(rows.items()):
        mode, kind, _ = key.split("/", 2)
        out.setdefault((mode, kind, r.get("labels", 100)), []).append(r)
    return out


def kind_of(record: dict) -> str:
    """ssvae, m1m2 or m1 (records written before M1+M2 existed, without a kind, are ssvae rows)."""
    return record.get("kind", "ssvae")


def summary(records: List[dict], kind: str = "ssvae", key: str = "test_accuracy") -> dict:
    """Mean and sd over the seeds of ``key`` for the finished ``kind`` rows, with the seeds and values."""
    ok = sorted((r for r in records if kind_of(r) == kind and r.get("status") == "ok" and key in r),
                key=lambda r: r["seed"])
    if not ok:
        return {"seeds": [], "n": 0, "values": []}
    mean, sd = mean_sd([r[key] for r in ok])
    out = {"seeds": [r["seed"] for r in ok], "n": len(ok), "values": [r[key] for r in ok], "mean": mean, "sd": sd,
           "epochs": [r.get("epochs_done") for r in ok], "train_wall_s": [r.get("train_wall_s") for r in ok],
           "train_seconds": [r.get("train_seconds") for r in ok]}
    if key == "test_accuracy":  # the fields the semi-supervised tables and tests read
        out.update(accuracy_mean=mean, accuracy_sd=sd)
        nelbo = [r["test_nelbo"] for r in ok if "test_nelbo" in r]
        if nelbo:
            out["nelbo_mean"], out["nelbo_sd"] = mean_sd(nelbo)
    return out


def gain(records: List[dict]) -> dict:
    """M2's test accuracy minus its own supervised-only baseline's, per seed (same labels), and their mean."""
    pairs = sorted((r["seed"], r["test_accuracy"] - r["baseline_test_accuracy"]) for r in records
                   if kind_of(r) == "ssvae" and r.get("status") == "ok" and "test_accuracy" in r
                   and "baseline_test_accuracy" in r)
    if not pairs:
        return {"n": 0}
    mean, sd = mean_sd([g for _, g in pairs])
    return {"n": len(pairs), "seeds": [s for s, _ in pairs], "values": [g for _, g in pairs], "mean": mean, "sd": sd}


# ---- RESULTS.md ------------------------------------------------------------------------------------


def _pm(value, se, digits=2) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f} ± {se:.{digits}f}" if se is not None and not math.isnan(se) else f"{value:.{digits}f}"


def _pct(s: dict) -> str:
    """"mean ± sd %" of a :func:`summary` in percent (no sd for one seed)."""
    if not s.get("n"):
        return "–"
    sd = f" ± {100 * s['sd']:.2f}" if not math.isnan(s["sd"]) else ""
    return f"**{100 * s['mean']:.2f}{sd} %**"


def _per_seed(s: dict) -> str:
    return ", ".join(f"{100 * v:.2f}" for v in s.get("values", [])) or "–"


def _seconds(values) -> str:
    values = [v for v in values if v is not None]
    return ", ".join(f"{v:.0f}" for v in values) + " s" if values else "–"


def method_table(records: List[dict]) -> List[str]:
    """One line per method: mean ± sd test accuracy over the seeds, per seed, epochs, wall time."""
    base, m2 = summary(records, "ssvae", "baseline_test_accuracy"), summary(records, "ssvae")
    base_m1, m1m2 = summary(records, "m1m2", "baseline_m1_test_accuracy"), summary(records, "m1m2")
    base_m1m2 = summary(records, "m1m2", "baseline_test_accuracy")
    steps = next((r["config"].get("baseline_steps") for r in records if kind_of(r) == "ssvae" and "config" in r), None)
    lines = ["| method | learns from | test accuracy, mean ± sd over seeds | per seed (%) | seeds | epochs reached "
             "| training wall time per seed |", "|---|---|---|---|---|---|---|"]
    rows = [
        ("supervised-only baseline: q(y|x)'s 784-500-10 network", "the 100 labels only", base,
         f"{steps} Adam steps" if steps else "–", _seconds(summary(records, "ssvae", "baseline_seconds")["values"])),
        ("M2 (`ssvae`)", "100 labels + the unlabelled training images", m2, ", ".join(map(str, m2.get("epochs", []))),
         _seconds(m2.get("train_wall_s", []))),
        ("classifier on M1's features (z1 = mean of q(z1|x)), labels only", "the 100 labels; M1 learnt without labels",
         base_m1, f"{steps} Adam steps" if steps else "–",
         _seconds(summary(records, "m1m2", "baseline_m1_seconds")["values"])),
        ("M1+M2 (`m1m2`)", "100 labels + the unlabelled images; M1 shared", m1m2,
         ", ".join(map(str, m1m2.get("epochs", []))), _seconds(m1m2.get("train_wall_s", []))),
    ]
    for name, source, s, epochs, wall in rows:
        if s.get("n"):
            lines.append(f"| {name} | {source} | {_pct(s)} | {_per_seed(s)} | {s['seeds']} | {epochs} | {wall} |")
    if base_m1m2.get("n"):  # the m1m2 rows' own pixel baselines (the same labels as the ssvae rows' seeds)
        lines.append(f"| (the same pixel baseline, trained in the M1+M2 runs) | the 100 labels only | "
                     f"{_pct(base_m1m2)} | {_per_seed(base_m1m2)} | {base_m1m2['seeds']} | – | – |")
    return lines


def verdicts(records: List[dict]) -> List[str]:
    """The measured gain of M2 over its baseline, and M1+M2 against the 96 % goal."""
    out, g, m1m2 = [], gain(records), summary(records, "m1m2")
    if g["n"]:
        sd = f" ± {100 * g['sd']:.2f}" if not math.isnan(g["sd"]) else ""
        out.append(f"- **M2 − supervised-only baseline: {100 * g['mean']:+.2f}{sd} points** (mean ± sd over seeds "
                   f"{g['seeds']}; per seed {', '.join(f'{100 * v:+.2f}' for v in g['values'])}); target +10 points.")
    if m1m2["n"]:
        out.append(f"- **M1+M2: {100 * m1m2['mean']:.2f} %** against the 96 % goal (Kingma et al. 2014: 96.67 %, "
                   f"error 3.33 ± 0.14 %): {'reached' if m1m2['mean'] >= SSL_ACCURACY.bound else 'short by ' + format(100 * (SSL_ACCURACY.bound - m1m2['mean']), '.2f') + ' points'}.")
    out += budget_lines(records)
    for r in records:
        if kind_of(r) == "m1" and r.get("status") == "ok":
            out.append(f"- M1 (`{r['train_command']}`): {r.get('epochs_done', '–')} epoch(s) in "
                       f"{r.get('train_wall_s', 0):.0f} s, test NELBO {_pm(r.get('test_nelbo'), r.get('test_nelbo_se'))}; "
                       "learnt without labels, shared by the M1+M2 rows of every seed.")
    loads = [v for r in records for v in (r.get("load_start"), r.get("load_end")) if v is not None]
    if loads:
        out.append(f"- Machine load (1-minute load average at the start and end of each row): {min(loads):.1f} to "
                   f"{max(loads):.1f} on {records[0].get('device_name', '?')}; wall times measured under load are "
                   "pessimistic.")
    return out


def budget_lines(records: List[dict]) -> List[str]:
    """The training budget of each kind (--max-minutes, checked after each epoch), its alpha, and the M1
    that M1+M2 used where it was given with --m1 (trained apart, so it has no row of its own)."""
    out = []
    for kind, name in (("ssvae", "M2"), ("m1m2", "M1+M2")):
        ok = [r for r in records if kind_of(r) == kind and r.get("status") == "ok" and "config" in r]
        if not ok:
            continue
        minutes = sorted({r["config"].get("max_minutes") for r in ok}, key=str)
        alphas = sorted({r["config"].get("alpha") for r in ok}, key=str)
        seconds = [r.get("train_seconds") for r in ok if r.get("train_seconds") is not None]
        evals = [r.get("eval_wall_s") for r in ok if r.get("eval_wall_s") is not None]
        cfg = ok[0]["config"]
        shown = ", ".join(f"{m:g}" for m in minutes if m is not None) or "–"
        out.append(f"- Budget, {name}: `--max-minutes {shown}` "
                   f"of training per run (checked after each epoch, so the epoch under way finishes: "
                   f"{', '.join(f'{v / 60:.1f}' for v in seconds)} min trained), then the baselines and "
                   f"`eval` ({', '.join(f'{v:.0f}' for v in evals)} s); α = {', '.join(map(str, alphas))} "
                   f"(α' = α·N/N_l per labelled image)"
                   + "".join(f", {label} {cfg[key]}" for label, key in (("hidden", "hidden"), ("z =", "z_dim"),
                             ("batch", "batch_size"), ("lr", "lr"), ("labelled_every", "labelled_every"))
                             if cfg.get(key) is not None) + ".")
    if not any(kind_of(r) == "m1" for r in records):
        m1s = {json.dumps(r["m1_run"], sort_keys=True): r["m1_run"] for r in records if r.get("m1_run")}
        for m1 in m1s.values():
            nelbo = (f", test NELBO {_pm(m1['test_nelbo'], m1.get('test_nelbo_se'))}" if "test_nelbo" in m1 else
                     f", final validation NELBO {m1['final_val_loss']:.2f}" if "final_val_loss" in m1 else "")
            data = "full training split" if not m1.get("train_subset") else f"first {m1['train_subset']} training images"
            out.append(f"- M1 (given with `--m1`, trained once beforehand without labels, not counted in the per-run "
                       f"budget): `{m1['command']}` (ppl_vi {str(m1.get('git_commit') or '?')[:7]}), a `vae` "
                       f"784-{'-'.join(map(str, m1.get('hidden') or []))}-{m1.get('z_dim')} on the {data}: "
                       f"{m1.get('epochs_done', '–')} epochs in {m1.get('train_seconds', 0) / 60:.1f} min{nelbo}; "
                       "shared by the M1+M2 rows of every seed.")
    return out


def ssl_table(records: List[dict], base: Path) -> List[str]:
    """Every row of one experiment: commands, device, wall times, epochs, accuracies, NELBO, figures."""
    lines = ["| run | command (train; eval) | device | wall: train + eval | epochs | test accuracy | "
             "baseline (labels only) | test NELBO | -IWAE-k (largest k) | figures |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    order = {"m1": 0, "ssvae": 1, "m1m2": 2}
    for r in sorted(records, key=lambda r: (order.get(kind_of(r), 3), r.get("seed") or 0)):
        if r.get("status", "ok") != "ok":
            lines.append(f"| {r['run']} | `{r.get('train_command', '')}` | {r['device_name']} | – | – | "
                         f"**{r['status']}** | | | | |")
            continue
        ks = sorted((int(k) for k in r.get("test_iwae", {})), reverse=True)
        iw = f"{_pm(r['test_iwae'][str(ks[0])], r['test_iwae_se'][str(ks[0])])} (k={ks[0]})" if ks else "–"
        figures = ", ".join(f"[{Path(f).stem}]({runner.rel(f, base)})" for f in r.get("figures", [])
                            if Path(f).stem in ("accuracy", "style_grid", "confusion_matrix", "samples",
                                                "training_curves"))
        accuracy = f"{100 * r['test_accuracy']:.2f} %" if "test_accuracy" in r else "–"
        baselines = " / ".join(f"{100 * r[k]:.2f} %" for k in ("baseline_test_accuracy", "baseline_m1_test_accuracy")
                               if k in r) or "–"
        label = f" (labelled-set seed {r['seed']})" if r.get("seed") is not None else " (no labels)"
        lines.append(f"| {r['run']}{label} | `{r['train_command']}`; `{r['eval_command']}` "
                     f"| {r['device_name']} | {r.get('train_wall_s', 0):.0f} s + {r.get('eval_wall_s', 0):.0f} s "
                     f"| {r.get('epochs_done', '–')} | {accuracy} | {baselines} "
                     f"| {_pm(r.get('test_nelbo'), r.get('test_nelbo_se'))} | {iw} | {figures} |")
    return lines


def completion_table(record: dict) -> List[str]:
    ks = record["ks"]
    head = ["given quadrants", "baseline: exact NLL", "CVAE -ELBO (K=10, Pyro's quantity)",
            *[f"CVAE -L_K, K={k}" for k in ks], "Pyro baseline", "Pyro CVAE (-ELBO)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for q in ("1", "2", "3"):
        row = record["quadrants"][q]
        cells = [q, _pm(row["baseline"]["mean"], row["baseline"]["se"]),
                 _pm(row["cvae_nelbo"]["mean"], row["cvae_nelbo"]["se"]),
                 *[_pm(row["cvae_is"][str(k)]["mean"], row["cvae_is"][str(k)]["se"]) for k in ks],
                 f"{PYRO_BASELINE[int(q)]}", f"{PYRO_CVAE[int(q)]}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def completion_block(record: dict, base: Path) -> List[str]:
    figs = ", ".join(f"[{Path(f).stem}]({runner.rel(f, base)})" for f in record.get("figures", []))
    return [f"- **{record['mode']}** run `{record['command']}` on {record['device_name']}: CVAE "
            f"{record['cvae_epochs']} epoch(s) ({record['cvae_train_s']:.0f} s), baseline {record['baseline_epochs']} "
            f"epoch(s) ({record['baseline_train_s']:.0f} s), {record['n_test']} test images, networks "
            f"{record['hidden']} hidden, z = {record['z_dim']}; evaluation {record['eval_s']:.0f} s. Figures: {figs}.",
            "", *completion_table(record), ""]


EXPLAIN_COMPLETION = (
    "Image completion as in Sohn et al. 2015 and Pyro's `examples/cvae`: 1, 2 or 3 of the four 14×14 quadrants "
    "are given (bottom-left, then top-right, then top-left) and the rest must be predicted. One `cvae-completion` "
    "model (conditional prior p(z|c), recognition q(z|x,c), decoder p(x_M|z,c)) is trained through the library "
    "(`ppl_vi.training.train`, a run directory with checkpoints), with 1–3 given quadrants drawn per image; the "
    "`CompletionBaseline` MLP c -> pixel logits is trained on the same training split (the same validation "
    "split, the same dynamic binarisation, the same number of epochs, best validation NLL kept). On the first "
    "`n_test` test images (the fixed binarisation of the MNIST test set), for each number of given quadrants: "
    "**baseline** = its exact -log p(x_M|c) = Σ_{d∈M} BCE (independent Bernoulli pixels); **CVAE -L_K** = "
    "`completion_nll`, the importance-sampling estimate -log (1/K) Σ_k p(x_M|z_k,c) p(z_k|c) / q(z_k|x,c), "
    "z_k ~ q(z|x,c), per image — an upper bound on -log p(x_M|c) in expectation that decreases towards it as K "
    "grows; **CVAE -ELBO** = -(1/10) Σ_k log p(x_M|z_k,c) + KL(q(z|x,c) || p(z|c)) with 10 draws, the quantity "
    "Pyro's table reports. Each figure is a mean over the test images, in nats per image, ± its standard error "
    "over images (the Monte Carlo noise of the estimator is inside that spread).")

EXPLAIN_PYRO = (
    "**Comparing with Pyro's numbers (CVAE 71.8 / 51.0 / 24.2; baseline 100.4 / 61.9 / 25.4, from the table in "
    "Pyro's `tutorial/source/cvae.ipynb`).** Read from Pyro's `examples/cvae` source (`util.generate_table`, "
    "`mnist.py`, `cvae.py`, `main.py`): their CVAE column is `Trace_ELBO(num_particles=10)` loss, i.e. the "
    "**negative ELBO** (K = 10 particles averaged, not an importance-weighted bound), per test image, averaged "
    "over batches of 32; their baseline column is the masked BCE. Their targets are **grayscale** pixel "
    "intensities (ToTensor, no binarisation) scored with a Bernoulli/BCE, and their inputs are grayscale too; "
    "they train **a separate baseline and CVAE for each number of given quadrants**, feed the baseline's "
    "prediction into the prior network, use z = 200, and stop early (patience 3). Here targets and inputs are "
    "binarised, one model covers 1–3 quadrants, z is the run's `z_dim`, and the headline CVAE figure is -L_K, "
    "which is ≤ the -ELBO in expectation. The like-for-like column for Pyro's CVAE number is therefore "
    "\"CVAE -ELBO (K=10)\"; -L_K at large K is the better estimate of the negative conditional log-likelihood "
    "itself. BCE against grayscale targets and Bernoulli log-likelihoods of binarised pixels are different "
    "quantities, so even the like-for-like column is indicative, not an exact replication.")


def _full(rows: Dict[str, dict], device_kind: str) -> List[dict]:
    return [r for k, r in rows.items() if k.startswith(f"full/{device_kind}/") and r.get("labels") == 100]


def judge_ssl(rows: Dict[str, dict], device_kind: str = "cuda") -> tuple:
    """M1+M2 with 100 labels: mean test accuracy over 3 seeds ≥ 96 %, on ``device_kind``'s full rows."""
    return targets.judge_ssl(SSL_ACCURACY, [r for r in _full(rows, device_kind) if kind_of(r) == "m1m2"])


def judge_gain(rows: Dict[str, dict], device_kind: str = "cpu") -> tuple:
    """M2 beats its supervised-only baseline by ≥ 10 points of test accuracy, mean over 3 seeds."""
    return targets.judge_ssl(SSL_GAIN, [r for r in _full(rows, device_kind) if kind_of(r) == "ssvae"])


def judge_completion(completion: dict) -> tuple:
    return targets.judge_completion(completion.get("rows", {}).get("full/cuda"))


EXPLAIN_SSL = (
    "100 labels = 10 per class, drawn by `labelled_subset(seed=S)`; `--seed S` also seeds the 5,000-image "
    "validation split, the initialisation and the data order. **Objective** (Kingma et al. 2014's J^α, "
    "`ppl_vi/models/ssvae.py`): per epoch Σ_unlabelled −U(x) + Σ_labelled [−L(x,y) − α' log q(y|x)], each "
    "labelled image counted once per pass over the unlabelled set, α' = α · N / N_l; a labelled batch joins every "
    "`labelled_every`-th step, scaled by `poutine.scale(N_l / (m b_l))` so that any schedule has this expectation "
    "(`tests/test_schedule.py`). **M2** (`ssvae`): y summed out by enumeration on unlabelled batches "
    "(`TraceEnum_ELBO`), classifier q(y|x) = 784-500-10. **M1+M2** (`m1m2`): M2 on the latent z1 of a VAE (M1, "
    "784-500-500-50, trained first without labels and frozen), p(z1|y,z2) Gaussian; the pair is the whole "
    "stacked model, checked by `ppl-vi check m1m2`. **Supervised-only baseline**: q(y|x)'s 784-500-10 network "
    "trained on the same 100 labels alone (Adam, full batch, a fresh binarisation each step, the last step "
    "reported), in every run's metrics.json; the M1+M2 runs also train their 50-500-10 classifier on M1's "
    "features from the labels alone. Test accuracy = argmax of the classifier on the 10,000 test images (fixed "
    "binarisation), of the last epoch's model (nothing selected). For scale: Kingma et al. 2014 "
    "report 88.03 % (M2, error 11.97 ± 1.71 %) and 96.67 % (M1+M2, 3.33 ± 0.14 %) with 100 labels, and 74.2 % for "
    "a neural network on the labels alone.")


def section(ssl: dict, completion: dict, base: Path) -> str:
    rows = ssl.get("rows", {})
    out = [SECTION, "",
           "Produced by `experiments/semi_supervised.py` (supervised-only baseline, M2, M1+M2) and "
           "`experiments/completion.py` (CVAE image completion); the rows are also in "
           "`experiments/semi_supervised.json` and `experiments/completion.json`. Figure links point into the run "
           "directories (`experiments/runs/`, not committed). Smoke rows are pipeline checks on a CPU, NOT results: "
           "they say nothing about the models.", "",
           "### Semi-supervised MNIST, 100 labels: supervised-only baseline, M2, M1+M2", "", EXPLAIN_SSL, ""]
    for (mode, kind, labels), records in sorted(groups(rows).items(), key=lambda kv: (kv[0][0] != "full", kv[0])):
        title = ("GPU result" if kind == "cuda" else "full run on a CPU") if mode == "full" else \
            "CPU smoke test (NOT a result)" if kind == "cpu" else "GPU smoke test (NOT a result)"
        out += [f"#### {title}: {labels} labels", ""]
        if mode == "smoke":
            out += ["`--quick`: the first 2,000 training images, 1,000 validation images, one epoch (at most 0.2 "
                    "minutes), hidden 128, z = 16, a 50-step baseline. The accuracies only show that the pipeline "
                    "runs: far too little training to mean anything.", ""]
        copies = f"results/{'gpu/runs' if kind == 'cuda' else f'cpu-ssl-l{labels}'}"
        if mode == "full" and (Path(__file__).resolve().parent / copies).is_dir():
            out += [f"Copies of these runs without checkpoints (config.json, metrics.json, history.jsonl, the row "
                    f"record, the train/eval logs and the figures) are committed in [`experiments/{copies}/`]"
                    f"({copies}/); the commands below name the run directories they were copied from.", ""]
        out += method_table(records) + [""] + verdicts(records) + ["", "Every row:", ""]
        out += ssl_table(records, base) + [""]
    if not rows:
        out += ["_No runs yet: see \"GPU figures owed\" below._", ""]
    gain_cpu, gain_cpu_detail = judge_gain(rows, "cpu")
    acc_cpu, acc_cpu_detail = judge_ssl(rows, "cpu")
    out += ["#### Targets on the CPU (issue 11)", "",
            "| target | status | measured | command |", "|---|---|---|---|",
            f"| M2 beats its supervised-only baseline by ≥ 10 points of test accuracy (mean of 3 labelled-set seeds) "
            f"| **{gain_cpu}** | {gain_cpu_detail or '–'} | `{SSL_CPU_COMMAND}` |",
            f"| M1+M2 towards ≥ 96 % (mean of 3 seeds; reported honestly, a goal on the CPU) | **{acc_cpu}** | "
            f"{acc_cpu_detail or '–'} | `{SSL_CPU_COMMAND}` |", ""]
    out += ["### CVAE image completion", "", EXPLAIN_COMPLETION, "", EXPLAIN_PYRO, ""]
    crow = completion.get("rows", {})
    for key in sorted(crow, key=lambda k: (not k.startswith("full"), k)):
        r = crow[key]
        if r["mode"] == "smoke":
            r_title = "CPU smoke test (NOT a result)" if r["device"] == "cpu" else "GPU smoke test (NOT a result)"
        else:
            r_title = "GPU result" if r["device"].startswith("cuda") else "full run on a CPU"
        out += [f"#### {r_title}", "", *completion_block(r, base)]
    if not crow:
        out += ["_No runs yet: see \"GPU figures owed\" below._", ""]
    out += ["### Conditional VAE (`ppl-vi train cvae`)", "",
            "`ppl-vi train cvae` writes `figures/style_grid.png` (a row per digit, one z per column shared by the "
            "rows) next to the prior samples and reconstructions; `ppl-vi check cvae` (float64, batch 32, K = 3, 50 "
            "seeds) passes every row: Trace_ELBO, TraceMeanField_ELBO, RenyiELBO(0) and IWAELoss against the hand "
            "bounds, same-sample and statistical, and the IWAE ladder L_1 ≤ L_10 ≤ L_100 ≤ L_1000.", ""]
    status_ssl, detail_ssl = judge_ssl(rows, "cuda")
    status_gain, detail_gain = judge_gain(rows, "cuda")
    status_c, detail_c = judge_completion(completion)
    out += ["### GPU figures owed (issue 4)", "",
            "Judged on full GPU rows only, never on smoke tests. On one H100, one command after the other; each "
            "is sized for a 10-minute command limit (an estimate, not yet measured): the semi-supervised script "
            "trains M1 for 8 minutes, and the M2 and M1+M2 runs for 8 minutes each, 3 at once, then evaluates "
            "them (about 25 minutes in all: start it with `nohup`); the completion script trains the CVAE for 6 minutes, "
            "then the baseline for the same number of epochs (a cheaper network), then evaluates -L_K up to "
            "K = 1000 on the 10,000 test images. Where a command limit is tighter, start it with `nohup ... &` "
            "and collect afterwards.", "",
            f"    {SSL_GPU_COMMAND}", f"    {COMPLETION_GPU_COMMAND}", "",
            "Then copy back `experiments/RESULTS.md`, `experiments/semi_supervised.json`, "
            "`experiments/completion.json` "
            "and `experiments/runs/` (or re-render from copied runs with `python experiments/semi_supervised.py "
            "--collect --out-dir PATH/runs`). Six to eight minutes may be shorter than the published trainings (Pyro's "
            "tutorial: 50 epochs per quadrant count, with early stopping), so a miss at this budget needs a longer "
            "`--minutes` before it counts as a finding.", "",
            "| target | status | measured | command |", "|---|---|---|---|",
            f"| M1+M2, 100 labels: test accuracy ≥ 96 % (mean of 3 labelled-set seeds) | **{status_ssl}** | "
            f"{detail_ssl or '–'} | `{SSL_GPU_COMMAND}` |",
            f"| M2 beats its supervised-only baseline by ≥ 10 points (mean of 3 seeds) | **{status_gain}** | "
            f"{detail_gain or '–'} | `{SSL_GPU_COMMAND}` |",
            f"| CVAE completion: -L_K below Pyro's CVAE 71.8 / 51.0 / 24.2 (1 / 2 / 3 quadrants) | **{status_c}** | "
            f"{detail_c or '–'} | `{COMPLETION_GPU_COMMAND}` |"]
    return "\n".join(out) + "\n"


def write_results_md(path: Path, text: str) -> None:
    """Replace (or append) this section of RESULTS.md; every other section is kept as is."""
    runner.write_section(path, SECTION, text)


def update_results_md(results_md: Path = RESULTS_MD, ssl_json: Path = RESULTS_JSON,
                      completion_json: Path = COMPLETION_JSON) -> None:
    """Re-render the issue-4 section from both JSON files (also called by experiments/completion.py)."""
    ssl = runner.load_json(ssl_json, "")
    completion = runner.load_json(completion_json, "")
    write_results_md(results_md, section(ssl, completion, Path(results_md).parent.resolve()))


# ---- main ------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda | cpu (default cuda)")
    p.add_argument("--parallel", type=int, default=1, help="runs at once (default 1)")
    p.add_argument("--minutes", type=float, default=None, help="training budget per M2 / M1+M2 run (--max-minutes)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (with --minutes: the cap)")
    p.add_argument("--seeds", default="0,1,2", help="labelled-set seeds (default 0,1,2)")
    p.add_argument("--labels", type=int, default=100, help="labelled training images (default 100)")
    p.add_argument("--models", default="ssvae,m1m2",
                   help="which semi-supervised models: ssvae (M2), m1m2 (M1+M2) or both (default ssvae,m1m2)")
    p.add_argument("--m1", default=None, help="a trained vae run to use as M1 (default: train one, OUT_DIR/m1-vae)")
    p.add_argument("--m1-minutes", type=float, default=None, help="M1's training budget (default: --minutes)")
    p.add_argument("--m1-epochs", type=int, default=None, help="M1's epochs (with --m1-minutes: the cap)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 2000 training images, 1 epoch (<= 0.2 min), hidden 128, z = 16")
    p.add_argument("--k", default=None, help="IWAE ks at eval (default 1,10)")
    p.add_argument("--train-args", default="", help="extra flags for every train command (M1 included)")
    p.add_argument("--ssvae-args", default="", help="extra flags for the M2 train commands")
    p.add_argument("--m1m2-args", default="", help="extra flags for the M1+M2 train commands")
    p.add_argument("--m1-args", default="", help="extra flags for M1's train command")
    p.add_argument("--out-dir", default=str(REPO / "experiments" / "runs"), help="run directories (gitignored)")
    p.add_argument("--results-md", default=str(RESULTS_MD))
    p.add_argument("--results-json", default=str(RESULTS_JSON))
    p.add_argument("--completion-json", default=str(COMPLETION_JSON), help="read only: the completion rows")
    p.add_argument("--collect", action="store_true", help="run nothing: collect finished runs under --out-dir")
    p.add_argument("--dry-run", action="store_true", help="print the commands; run and write nothing")
    opts = p.parse_args(argv)
    runner.check_run_options(p, opts)
    try:
        opts.ks = [int(k) for k in opts.k.split(",")] if opts.k else FULL_K
        opts.seed_list = [int(s) for s in opts.seeds.split(",") if s.strip()]
    except ValueError:
        p.error("--k and --seeds must be comma-separated integers")
    if not opts.ks or min(opts.ks) < 1:
        p.error("--k values must be >= 1")
    if not opts.seed_list:
        p.error("--seeds must name at least one seed")
    if opts.labels < 10 or opts.labels % 10:
        p.error(f"--labels must be a positive multiple of 10 (10 classes, the same count each), got {opts.labels}")
    opts.kinds = [k.strip() for k in opts.models.split(",") if k.strip()]
    if not opts.kinds or any(k not in KINDS for k in opts.kinds):
        p.error(f"--models must name ssvae and/or m1m2 (comma-separated), got {opts.models!r}")
    if opts.m1 is not None and not (Path(opts.m1) / "config.json").is_file():
        p.error(f"--m1 {opts.m1} is not a run directory (no config.json); train M1 with ppl-vi train vae --out DIR")
    if opts.m1_minutes is not None and opts.m1_minutes <= 0:
        p.error("--m1-minutes must be > 0")
    return opts


def main(argv=None) -> int:
    opts = parse_args(argv)
    out_dir = Path(opts.out_dir).resolve()
    if opts.collect:
        records = collect(out_dir)
        if not records:
            print(f"no finished semi-supervised runs (*ssvae-l*, *m1m2-l*, *m1-vae with {ROW_FILE}) under {out_dir}",
                  file=sys.stderr)
            return 2
    else:
        if runner.cuda_missing(opts.device, opts.dry_run):
            print("semi_supervised: --device cuda but no CUDA GPU here; use --device cpu (with --quick)",
                  file=sys.stderr)
            return 2
        out_dir.mkdir(parents=True, exist_ok=True)
        dev_name = runner.device_name(opts.device)
        print(f"{' and '.join(opts.kinds)} runs for seeds {opts.seed_list} ({opts.labels} labels) on {dev_name}, "
              f"{opts.parallel} at a time; runs in {out_dir}", flush=True)
        records = run_all(opts, out_dir, dev_name)
        if opts.dry_run:
            return 0
    results_json = Path(opts.results_json)
    runner.save_rows(results_json, ABOUT, {runner.record_key(r): r for r in records})
    if opts.collect:
        collect_completion(out_dir, Path(opts.completion_json))
    update_results_md(Path(opts.results_md), results_json, Path(opts.completion_json))
    for r in records:
        acc = f"{100 * r['test_accuracy']:.2f} %" if "test_accuracy" in r else "–"
        base = f", baseline {100 * r['baseline_test_accuracy']:.2f} %" if "baseline_test_accuracy" in r else ""
        print(f"{r['run']:>22} [{r['mode']}, {r['device_name']}] {r.get('status')}: test accuracy {acc}{base}, "
              f"test NELBO {_pm(r.get('test_nelbo'), r.get('test_nelbo_se'))}")
    for line in method_table(records):
        print(line)
    for line in verdicts(records):
        print(line)
    print(f"written: {opts.results_md} ({SECTION!r} section), {results_json}")
    return 0 if all(r.get("status") == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
