"""The VAE family on binarised MNIST: one results table, reproducible from the CLI.

Rows (``--rows``, comma-separated groups):

=========  ====================================================================================
group      runs
=========  ====================================================================================
vae        ``vae``: VAE, z = 50, the ELBO
beta       ``beta0.5``, ``beta2``, ``beta4``: β-VAE (rate = test KL, distortion = -E log p(x|z))
anneal     ``anneal``: VAE with the KL weight ramped 0 -> 1 over ``--anneal-steps`` steps
iwae       ``iwae5``, ``iwae50``: trained on the IWAE bound (``--loss iwae --k K``)
gmvae      ``vae_z10`` and ``gmvae``: a mixture-prior VAE (z = 10, 500 components) against a
           VAE with z = 10
=========  ====================================================================================

Each run is two subprocesses, exactly what a user would type::

    python -m ppl_vi train MODEL ... --out OUT_DIR/RUN
    python -m ppl_vi eval OUT_DIR/RUN --k 1,10,100,1000,5000

then RUN/metrics.json is collected into ``experiments/RESULTS.md`` (the section ``SECTION``; other
sections of that file are left alone) and ``experiments/vae_family.json``.
Every row records its commands, device name, wall time, seed and mode: ``--quick`` rows are
smoke tests of the pipeline (a 2000-image training subset, one epoch, IWAE-10 at most), listed
apart from results and never counted against a target.

Usage::

    python experiments/vae_family.py --device cuda --parallel 9 --minutes 10     # the table (one GPU)
    python experiments/vae_family.py --device cpu --quick --rows vae             # CPU smoke test
    python experiments/vae_family.py --collect --out-dir PATH/runs               # re-collect only

``--parallel N`` runs N rows at once (one small VAE leaves an H100 mostly idle); each
subprocess then gets ``cores // N`` CPU threads.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import shlex
import sys
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import runner  # noqa: E402  (running rows, records, results files: shared with semi_supervised.py)
from runner import REPO, ROW_FILE  # noqa: E402
from targets import GMVAE, VAE_FAMILY, Target  # noqa: E402

SECTION = "## VAE family (issue 3)"
ABOUT = "ppl_vi issue 3, the VAE family; written by experiments/vae_family.py"

FULL_K = [1, 10, 100, 1000, 5000]
QUICK_K = [1, 10]
QUICK_TRAIN = ["--epochs", "1", "--max-minutes", "0.2", "--train-subset", "2000"]


def row_specs(anneal_steps: int) -> Dict[str, List[dict]]:
    """Group name -> runs; each run: name, description, the train arguments after ``train``."""
    return {
        "vae": [dict(name="vae", what="VAE z=50", args=["vae", "--z-dim", "50"])],
        "beta": [dict(name=f"beta{b}", what=f"β-VAE β={b}, z=50", args=["vae", "--z-dim", "50", "--beta", b])
                 for b in ("0.5", "2", "4")],
        "anneal": [dict(name="anneal", what=f"VAE z=50, KL annealed over {anneal_steps} steps",
                        args=["vae", "--z-dim", "50", "--kl-anneal", str(anneal_steps)])],
        "iwae": [dict(name=f"iwae{k}", what=f"IWAE k={k}, z=50",
                      args=["vae", "--z-dim", "50", "--loss", "iwae", "--k", str(k)]) for k in (5, 50)],
        "gmvae": [dict(name="vae_z10", what="VAE z=10 (GMVAE baseline)", args=["vae", "--z-dim", "10"]),
                  dict(name="gmvae", what="GMVAE z=10, 500 components",
                       args=["gmvae", "--z-dim", "10", "--components", "500"])],
    }




# ---- running -------------------------------------------------------------------------------------


def build_commands(spec: dict, opts, run_dir: Path) -> tuple:
    """The train and eval argv (the subprocesses run in the repository root: paths relative to it)."""
    run_arg = runner.run_arg(run_dir)
    train = ["train", *spec["args"], "--device", opts.device, "--seed", str(opts.seed), "--out", run_arg,
             "--overwrite", "--no-progress"]
    if opts.quick:
        train += [*QUICK_TRAIN, "--eval-k", ",".join(map(str, QUICK_K))]
    else:
        train += [*runner.budget_args(opts.minutes, opts.epochs), "--eval-k", ",".join(map(str, opts.ks))]
    train += shlex.split(opts.train_args or "")
    evaluate = ["eval", run_arg, "--k", ",".join(map(str, opts.ks)), "--no-progress"]
    return train, evaluate


def run_one(spec: dict, opts, out_dir: Path, dev_name: str, threads: int) -> dict:
    """Train, then evaluate, one row in subprocesses; returns its record (also RUN/row.json)."""
    run_dir = out_dir / (f"smoke-{spec['name']}" if opts.quick else spec["name"])  # a smoke test never overwrites a run
    train, evaluate = build_commands(spec, opts, run_dir)
    record = dict(run=spec["name"], what=spec["what"], mode="smoke" if opts.quick else "full",
                  device=opts.device, device_name=dev_name, seed=opts.seed, parallel=opts.parallel,
                  train_command=runner.shown(train), eval_command=runner.shown(evaluate),
                  run_dir=runner.portable(run_dir), started=runner.now())
    if opts.skip_done and (run_dir / ROW_FILE).is_file():
        old = json.loads((run_dir / ROW_FILE).read_text())
        if old.get("train_command") == record["train_command"] and old.get("status") == "ok":
            print(f"[{spec['name']}] done already: {run_dir} (--skip-done)", flush=True)
            return old
    return runner.run_row(spec["name"], run_dir, (("train", train), ("eval", evaluate)), record, out_dir, threads,
                          read_run, opts.dry_run)


KEEP = ("test_nelbo", "test_nelbo_se", "test_kl", "test_kl_se", "test_rec", "test_rec_se", "test_iwae",
        "test_iwae_se", "epochs_done", "steps", "train_seconds", "eval_seconds", "final_val_loss")


def read_run(run_dir: Path) -> dict:
    """What the table needs from a run directory: metrics, the device it ran on, its figures."""
    return runner.read_run(run_dir, KEEP)


# ---- collecting ------------------------------------------------------------------------------------


def largest_k(record: dict) -> Optional[str]:
    ks = sorted((int(k) for k in record.get("test_iwae", {})), reverse=True)
    return str(ks[0]) if ks else None


def fmt(record: dict, key: str, k: Optional[str] = None) -> str:
    if k is not None:
        value, se = record.get("test_iwae", {}).get(k), record.get("test_iwae_se", {}).get(k)
    else:
        value, se = record.get(key), record.get(key + "_se")
    if value is None:
        return "–"
    return f"{value:.2f} ± {se:.2f}" if se is not None else f"{value:.2f}"


def table(records: List[dict], base: Path) -> List[str]:
    lines = ["| run | command (train; eval) | device | wall: train + eval (concurrent runs) | seed | epochs | "
             "test NELBO | KL (rate) | distortion | NLL = -IWAE-k (largest k) | figures |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if r.get("status", "ok") != "ok":
            lines.append(f"| {r['run']} ({r['what']}) | `{r['train_command']}` | {r['device_name']} | – | {r['seed']} "
                         f"| – | **{r['status']}** | | | | |")
            continue
        k = largest_k(r)
        figures = ", ".join(f"[{Path(f).stem}]({runner.rel(f, base)})" for f in r.get("figures", []))
        wall = f"{r.get('train_wall_s', 0):.0f} s + {r.get('eval_wall_s', 0):.0f} s ({r.get('parallel', 1)})"
        lines.append(
            f"| {r['run']} ({r['what']}) | `{r['train_command']}`; `{r['eval_command']}` | {r['device_name']} | {wall} "
            f"| {r['seed']} | {r.get('epochs_done', '–')} | {fmt(r, 'test_nelbo')} | {fmt(r, 'test_kl')} "
            f"| {fmt(r, 'test_rec')} | {fmt(r, '', k)} (k={k}) | {figures} |")
    return lines


def judge(target: Target, rows: Dict[str, dict]) -> tuple:
    """(status, detail) of a target (``targets.VAE_FAMILY``) from the full GPU rows: owed, met or NOT met."""
    got = {name: rows.get(f"full/cuda/{name}") for name in target.runs}
    if any(r is None or r.get("status") != "ok" for r in got.values()):
        return "owed", ""
    iw = lambda r, k: r.get("test_iwae", {}).get(k)  # noqa: E731
    if target.group != "gmvae":  # an NLL bound on one run
        value, bound = iw(got[target.runs[0]], "5000"), target.bound
        if value is None:
            return "owed", "no IWAE-5000 evaluated"
        return ("met" if value <= bound else "NOT met"), f"{value:.2f} (bound {bound})"
    g, v = got["gmvae"], got.get("vae_z10")
    if target is GMVAE:
        if iw(g, "1000") is None or iw(v, "1000") is None:
            return "owed", "no IWAE-1000 evaluated"
        ok = g["test_nelbo"] < v["test_nelbo"] and iw(g, "1000") < iw(v, "1000")
        return ("met" if ok else "NOT met"), (f"NELBO {g['test_nelbo']:.2f} vs {v['test_nelbo']:.2f}; "
                                              f"-IWAE-1000 {iw(g, '1000'):.2f} vs {iw(v, '1000'):.2f}")
    if iw(g, "1000") is None:
        return "owed", "no IWAE-1000 evaluated"
    ok = g["test_nelbo"] <= target.bound["test_nelbo"] and iw(g, "1000") <= target.bound["1000"]
    return ("met" if ok else "NOT met"), f"NELBO {g['test_nelbo']:.2f}, -IWAE-1000 {iw(g, '1000'):.2f}"


GPU_COMMAND = "python experiments/vae_family.py --device cuda --parallel 9 --minutes 10"


def section(results: dict, base: Path) -> str:
    rows = results["rows"]
    order = [s["name"] for group in row_specs(0).values() for s in group]
    ordered = lambda keys: sorted(keys, key=lambda key: order.index(key.split("/")[-1]))  # noqa: E731
    full_gpu = [rows[k] for k in ordered(k for k in rows if k.startswith("full/cuda/"))]
    full_cpu = [rows[k] for k in ordered(k for k in rows if k.startswith("full/cpu/"))]
    smoke = [rows[k] for k in ordered(k for k in rows if k.startswith("smoke/"))]
    out = [SECTION, "",
           "Binarised MNIST (dynamic binarisation for training, one fixed binarisation of the 10,000 test images), "
           "55,000 training / 5,000 validation images, the best-validation checkpoint evaluated. All figures are "
           "nats per test image, mean ± standard error over the test images: test NELBO = KL (rate) + distortion "
           "(-E_q log p(x|z)), all at β = 1 whatever β the run was trained with; NLL is -IWAE-k at the largest k "
           "evaluated (k = 5000 in full runs). Produced by `experiments/vae_family.py`, which runs each row as "
           "`python -m ppl_vi train ...` then `python -m ppl_vi eval ...` and collects the run's metrics.json "
           "(all rows also in `experiments/vae_family.json`). Figure links point into the run directories "
           "(`experiments/runs/`, not committed).", "",
           "Copies of the two full CPU runs (config.json, metrics.json, history.jsonl and figures; checkpoints left "
           "out) are committed in `experiments/results/cpu-vae/` and `experiments/results/cpu-ssvae-l100-s0/`, since "
           "`experiments/runs/` is not; the GPU call's copies are in `experiments/results/gpu/runs/` (GPU rows link "
           "there).", ""]
    out += ["### GPU results", ""]
    out += table(full_gpu, base) if full_gpu else ["_None yet: see \"GPU figures owed\" below._"]
    if full_cpu:
        out += ["", "### Full runs on a CPU", "", *table(full_cpu, base)]
    out += ["", "### CPU smoke tests (NOT results)", "",
            "Pipeline checks only: `--quick` trains on the first 2,000 training images for one epoch and evaluates "
            "IWAE-10 at most. The numbers show the commands run end to end; they say nothing about the models.", ""]
    out += table(smoke, base) if smoke else ["_None._"]
    out += ["", "### GPU figures owed", "",
            "Each target is judged on full GPU rows only (never on smoke tests). Every row is run by the single "
            "GPU call in the section \"GPU figures owed\" at the top of this file (`experiments/reproduce.py`: "
            "all 9 runs at once with the other scripts' rows, then IWAE up to k = 5000, re-collected here). This "
            "script alone, on one GPU:", "",
            f"    {GPU_COMMAND}", "",
            "Ten minutes is far fewer epochs than the thousands behind the published figures, so a target missed "
            "at such a budget needs a longer `--minutes` before it counts as a finding.", ""]
    out += ["| target | status | measured | command for just this target |", "|---|---|---|---|"]
    for t in VAE_FAMILY:
        status, detail = judge(t, rows)
        cmd = f"python experiments/vae_family.py --device cuda --parallel 2 --minutes 10 --rows {t.group}"
        out.append(f"| {t.label or t.text} | **{status}** | {detail or '–'} | `{cmd}` |")
    return "\n".join(out) + "\n"


def write_results_md(path: Path, text: str) -> None:
    """Replace (or add) the VAE-family section of RESULTS.md; every other section is kept as is."""
    runner.write_section(path, SECTION, text)


def collect(out_dir: Path) -> List[dict]:
    """Records of this script's finished runs under ``out_dir`` (RUN/row.json), refreshed from
    metrics.json; runs of other scripts sharing the folder (ssvae, completion) are left out."""
    names = {spec["name"] for group in row_specs(0).values() for spec in group}
    return [r for r in runner.collect(out_dir, "*", read_run) if r.get("run") in names]


# ---- main ------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda | cpu (default cuda)")
    p.add_argument("--parallel", type=int, default=1, help="runs at once (default 1)")
    p.add_argument("--minutes", type=float, default=None,
                   help="training budget per run: passes --max-minutes M and a large --epochs")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (with --minutes: the cap; default 100000)")
    p.add_argument("--rows", default="vae,beta,anneal,iwae,gmvae", help="groups to run (default: all)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 2000 training images, 1 epoch, --max-minutes 0.2, IWAE k = 1,10")
    p.add_argument("--k", dest="k", default=None, help="IWAE ks at eval (default 1,10,100,1000,5000; --quick: 1,10)")
    p.add_argument("--anneal-steps", type=int, default=None, help="KL annealing steps (default 10000; --quick: 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-args", default="", help="extra flags for every train command, e.g. \"--lr 3e-4\"")
    p.add_argument("--out-dir", default=str(REPO / "experiments" / "runs"), help="run directories (gitignored)")
    p.add_argument("--results-md", default=str(REPO / "experiments" / "RESULTS.md"))
    p.add_argument("--results-json", default=str(REPO / "experiments" / "vae_family.json"))
    p.add_argument("--skip-done", action="store_true", help="keep finished runs whose train command is unchanged")
    p.add_argument("--collect", action="store_true", help="run nothing: collect finished runs under --out-dir")
    p.add_argument("--dry-run", action="store_true", help="print the commands; run and write nothing")
    opts = p.parse_args(argv)
    runner.check_run_options(p, opts)
    try:
        opts.ks = [int(k) for k in opts.k.split(",")] if opts.k else (QUICK_K if opts.quick else FULL_K)
    except ValueError:
        p.error(f"--k must be comma-separated integers, got {opts.k!r}")
    if not opts.ks or min(opts.ks) < 1:
        p.error("--k values must be >= 1")
    opts.anneal_steps = opts.anneal_steps or (10 if opts.quick else 10000)
    groups = row_specs(opts.anneal_steps)
    opts.groups = [g.strip() for g in opts.rows.split(",") if g.strip()]
    unknown = [g for g in opts.groups if g not in groups]
    if unknown:
        p.error(f"unknown --rows {unknown}; choose from {', '.join(groups)}")
    opts.specs = [s for g in opts.groups for s in groups[g]]
    return opts


def main(argv=None) -> int:
    opts = parse_args(argv)
    out_dir = Path(opts.out_dir).resolve()
    results_md, results_json = Path(opts.results_md), Path(opts.results_json)
    if opts.collect:
        records = collect(out_dir)
        if not records:
            print(f"no finished runs (*/{ROW_FILE}) under {out_dir}", file=sys.stderr)
            return 2
    else:
        if runner.cuda_missing(opts.device, opts.dry_run):
            print("vae_family: --device cuda but no CUDA GPU here; use --device cpu (with --quick)", file=sys.stderr)
            return 2
        out_dir.mkdir(parents=True, exist_ok=True)
        dev_name = runner.device_name(opts.device)
        threads = runner.threads_per_run(opts.parallel)
        print(f"{len(opts.specs)} runs on {dev_name}, {opts.parallel} at a time, {threads} CPU thread(s) each; "
              f"runs in {out_dir}", flush=True)
        with concurrent.futures.ThreadPoolExecutor(max_workers=opts.parallel) as pool:
            records = list(pool.map(lambda s: run_one(s, opts, out_dir, dev_name, threads), opts.specs))
        if opts.dry_run:
            return 0
    results = runner.save_rows(results_json, ABOUT, {runner.record_key(r): r for r in records})
    write_results_md(results_md, section(results, results_md.parent.resolve()))
    for r in records:
        k = largest_k(r)
        print(f"{r['run']:>8} [{r['mode']}, {r['device_name']}] {r.get('status')}: NELBO {fmt(r, 'test_nelbo')}, "
              f"KL {fmt(r, 'test_kl')}, distortion {fmt(r, 'test_rec')}, -IWAE-{k} {fmt(r, '', k)}")
    print(f"written: {results_md} ({SECTION!r} section), {results_json}")
    return 0 if all(r.get("status") == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
