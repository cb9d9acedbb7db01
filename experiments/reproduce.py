"""Every GPU figure in one call: ``python experiments/reproduce.py --device cuda --minutes M``.

One process tree on one GPU, in four phases, each with a deadline (a row still running at its
deadline is killed and reported as killed; nothing waits past the call's own deadline):

1. **probe**: how many training runs the GPU sustains at once (``experiments/probe.py``: 1, 2, 4,
   8, ... concurrent short training processes, steps/s each); it sizes ``--parallel`` (``auto``).
2. **alone** rows, one after another with nothing else on the GPU (timings): ``svi_speed``
   (``benchmarks/svi_speed.py``: ppl_vi against hand-written eager PyTorch, the hand-written
   whole-step CUDA graph (the floor) and plain Pyro SVI; VAE and IWAE-50 at batch 128 and 1024;
   then IWAE-5000 over the whole test set, timed).
3. **shared** rows, all at once as parallel processes sharing the GPU: the tests that take a CUDA
   device (pytest, ``-k cuda`` over ``tests/test_fast_path.py`` and ``tests/test_matrix*.py``,
   globbed), and every quality row through its own script: ``experiments/vae_family.py`` (VAE
   z=50, β ∈ {0.5, 2, 4}, KL annealing, IWAE k=5 and 50, GMVAE z=10 against VAE z=10),
   ``experiments/semi_supervised.py`` (SSVAE, 100 labels, 3 seeds) and ``experiments/completion.py``
   (CVAE completion). Each trains for ``--minutes`` (less if the earlier phases ran long: the call's
   deadline wins, and the record says so), then evaluates (IWAE up to k = 5000).
4. **writing**: a copy of every run (metrics, config, history, figures, row records, logs; no
   checkpoints) under ``experiments/results/gpu/``, the scripts' own results files and sections
   re-collected from those copies, ``experiments/results/gpu/reproduce.json`` (the probe, the
   phases, every row's status, the targets), the sections "GPU run" and "GPU figures owed" of
   ``experiments/RESULTS.md`` and "GPU" of ``benchmarks/RESULTS.md`` (device name included), and,
   with ``--out DIR``, one tarball ``DIR/ppl_vi_gpu.tar.gz`` of ``experiments/results/gpu/``.

The rows are the list ``ROWS`` below: a new row is one entry (its command, its phase, how many
training runs it starts, and how to re-collect it). Time plan for ``--minutes 6`` (deadline
``M + 2.75`` = 8.75 minutes, inside the 9 that the call may take with its install): start-up
~10 s, probe ~35 s (<= 75 s), svi_speed ~50 s (<= 110 s), then the shared rows with 25 s for
their start-up and 75 s for their evaluation, and 20 s for writing. That leaves the training
``min(M, what the deadline leaves)``: about 5.2 minutes at the expected phase times, not 6 (the
record and RESULTS.md say what each run got); ``--deadline-minutes`` moves the deadline.

This file holds the rows and the command line; the parts are beside it: ``harness.py`` (processes
against deadlines, the budgets), ``phases.py`` (the time plan and phases 1-3), ``collection.py``
(copies, re-collection, the targets judged from ``targets.py``), ``render.py`` (the sections) and
``tarball.py``.

Usage::

    python experiments/reproduce.py --device cuda --minutes 6 --out $OUT    # on the GPU machine
    python experiments/reproduce.py --collect PATH/ppl_vi_gpu.tar.gz         # here: unpack, re-render
    python experiments/reproduce.py --device cpu --dry-run                   # CI: the same pipeline, tiny
    python experiments/reproduce.py --render                                 # re-render the sections only

``--dry-run`` runs every phase for real with tiny budgets (probe levels 1 and 2, a few steps of
svi_speed, the tests (they skip without CUDA), ``--quick`` runs of one row of each script) into a
temporary root holding copies of the RESULTS files, so it never writes into the repository.
"""

from __future__ import annotations

import argparse
import glob
import json
import re
import shlex
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import runner  # noqa: E402  (device names, results files)
from collection import copy_runs, judge_targets, parse_junit, recollect, snapshot  # noqa: E402
from harness import DEADLINE_EXTRA, GPU, RECORD, Clock, Ctx, Row  # noqa: E402
from phases import run_call  # noqa: E402
from render import render  # noqa: E402
from runner import REPO  # noqa: E402
from tarball import pack, unpack  # noqa: E402

CUDA_TESTS = ("tests/test_fast_path.py", "tests/test_matrix*.py")  # globbed; the tests whose id says "cuda"
RESULT_FILES = ("experiments/RESULTS.md", "benchmarks/RESULTS.md", "experiments/vae_family.json",
                "experiments/semi_supervised.json", "experiments/completion.json")


# ---- reading the rows' outputs ------------------------------------------------------------------------


def read_bench(ctx: Ctx, record: dict) -> None:
    path = ctx.results / "svi_speed.json"
    if path.is_file():
        bench = json.loads(path.read_text())
        record["environment"] = bench.get("environment")
        record["ppl_vi_hand_ratio"] = bench.get("ppl_vi_hand_ratio")



def read_tests(ctx: Ctx, record: dict) -> None:
    path = ctx.results / "cuda_tests.xml"
    record["files"] = cuda_test_files()
    if not path.is_file():
        return
    record.update(parse_junit(path))
    if record["status"] != "ok":
        return
    if record["collected"] == 0:
        record["status"] = "no test selected: nothing in " + ", ".join(CUDA_TESTS) + " has 'cuda' in its id"
    elif record["skipped"] and runner.device_kind(ctx.device) == "cuda":  # on a GPU a skip hides a missing check
        record["status"] = f"{record['skipped']} of {record['collected']} skipped on a GPU"


def svi_speed_command(ctx: Ctx) -> List[str]:
    out = ["benchmarks/svi_speed.py", "--device", ctx.device, "--compile", "off", "--json",
           str(ctx.results / "svi_speed.json")]
    if ctx.dry:
        return out + ["--batch-sizes", "32", "--ks", "1", "--variants", "hand,pyro,ppl_vi,graph", "--window", "0.05",
                      "--repeats", "2", "--warmup", "4", "--eval-k", "10", "--eval-n", "8"]
    return out + ["--batch-sizes", "128,1024", "--ks", "1,50", "--variants", "hand,pyro,ppl_vi,ppl_vi-off,graph",
                  "--window", "0.2", "--repeats", "3", "--warmup", "5", "--eval-k", "5000", "--eval-n", "0"]


def cuda_test_files() -> List[str]:
    return sorted({f for pattern in CUDA_TESTS for f in glob.glob(pattern, root_dir=REPO)})


def tests_command(ctx: Ctx) -> List[str]:
    return ["-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-k", "cuda", "--junitxml",
            str(ctx.results / "cuda_tests.xml"), *cuda_test_files()]


def script(ctx: Ctx, name: str, *extra: str) -> List[str]:
    """``experiments/NAME.py`` on the call's device: its runs in the work folder, its results JSON in
    the root, its RESULTS.md section into a scratch file (rows run side by side; the re-collection
    writes the real section afterwards)."""
    return [f"experiments/{name}.py", "--device", ctx.device, "--out-dir", str(ctx.runs), "--results-md",
            str(ctx.scratch(f"{name}.md")), "--results-json", str(ctx.file(f"experiments/{name}.json")), *extra]


def shared_budget(ctx: Ctx, name: str, dry: List[str]) -> List[str]:
    """A runner-based script's budget: ``dry`` in a dry run, else its --parallel and --minutes."""
    return dry if ctx.dry else ["--parallel", str(ctx.parallel[name]), "--minutes", f"{ctx.minutes:.2f}"]


def vae_family_command(ctx: Ctx) -> List[str]:
    return script(ctx, "vae_family", *shared_budget(ctx, "vae_family", [
        "--quick", "--rows", "vae", "--k", "1,10", "--parallel", "1",
        "--train-args=--hidden 64 --z-dim 8 --val-size 500 --train-subset 512"]))


def ssl_command(ctx: Ctx) -> List[str]:
    return script(ctx, "semi_supervised", "--completion-json", str(ctx.scratch("completion-read.json")),
                  *shared_budget(ctx, "semi_supervised", ["--quick", "--seeds", "0", "--k", "1", "--parallel", "1",
                                                          "--models", "ssvae",  # M1+M2: tests/test_models_m1m2.py
                                                          "--train-args=--train-subset 512 --val-size 500"]))


def completion_command(ctx: Ctx) -> List[str]:
    out = script(ctx, "completion", "--ssl-json", str(ctx.scratch("ssl-read.json")))
    if ctx.dry:
        return out + ["--quick", "--epochs", "1", "--train-subset", "512", "--n-test", "100", "--k", "1,10"]
    # the CVAE gets 80 % of the window, the baseline (same epochs, or fewer at its cap) the rest
    return out + ["--minutes", f"{0.8 * ctx.minutes:.2f}", "--baseline-minutes", f"{0.15 * ctx.minutes:.2f}",
                  "--k", "1,10,100,1000"]


def collect_command(ctx: Ctx, name: str, runs: Path, *extra: str) -> List[str]:
    """``experiments/NAME.py --collect`` over the run copies, into the root's JSON and RESULTS.md."""
    return [f"experiments/{name}.py", "--collect", "--out-dir", str(runs), "--results-md",
            str(ctx.file("experiments/RESULTS.md")), "--results-json", str(ctx.file(f"experiments/{name}.json")),
            *extra]


ROWS: List[Row] = [
    Row("svi_speed", "benchmarks/svi_speed.py: ppl_vi vs hand eager vs hand CUDA graph (floor) vs plain Pyro SVI; "
        "VAE and IWAE-50, batch 128 and 1024; IWAE-5000 over the test set, timed", "alone", svi_speed_command,
        seconds=110, read=read_bench),
    Row("cuda_tests", "pytest -k cuda over " + ", ".join(CUDA_TESTS) + ": the tests that take a CUDA device",
        "shared", tests_command, read=read_tests),
    Row("vae_family", "experiments/vae_family.py: VAE z=50, β 0.5/2/4, KL annealing, IWAE k=5/50, GMVAE z=10 vs "
        "VAE z=10", "shared", vae_family_command, runs=9, results="vae_family.json",
        collect=lambda ctx, runs: collect_command(ctx, "vae_family", runs)),
    Row("semi_supervised", "experiments/semi_supervised.py: supervised-only baseline, M2 and M1+M2 (one label-free M1 "
        "shared), 100 labels, 3 labelled-set seeds", "shared",
        ssl_command, runs=7, results="semi_supervised.json",  # its collection also merges the completion run
        collect=lambda ctx, runs: collect_command(ctx, "semi_supervised", runs, "--completion-json",
                                                  str(ctx.file("experiments/completion.json")))),
    Row("completion", "experiments/completion.py: CVAE image completion against the MLP baseline", "shared",
        completion_command, runs=1, results="completion.json"),
]



# ---- the call's end: collection, targets, record, sections ---------------------------------------


def finish(ctx: Ctx, record: dict, clock: Optional[Clock], rows: List[Row], from_work: bool) -> dict:
    """Copy the runs (from the work folder, on the device), re-collect every script's rows from the
    copies, judge the targets, write reproduce.json and render the sections."""
    t = clock.now() if clock else 0.0
    if from_work:
        copy_runs(ctx)
        record["script_rows"] = snapshot(ctx, rows, record.get("started"))
    else:  # --collect: the rows the call wrote, failures included, then the copies re-collected
        for name, found in record.get("script_rows", {}).items():
            if found:
                runner.save_rows(ctx.file(f"experiments/{name}"), f"written by experiments/reproduce.py ({name})",
                                 found)
    record["collected"] = recollect(ctx, rows, clock)
    record["targets"] = judge_targets(ctx, record)
    if clock is not None:
        record["phases"].append({"phase": "writing", "start_s": round(t, 1), "wall_s": round(clock.now() - t, 1)})
        record["wall_s"] = round(clock.now(), 1)
        record["finished"] = runner.now()
    ctx.results.mkdir(parents=True, exist_ok=True)
    (ctx.results / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    render(ctx, record, ROWS)
    return record


# ---- main -------------------------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (no usage block)
        print(f"reproduce: error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
               epilog="\n\n".join(__doc__.split("\n\n")[-2:]))
    p.add_argument("--device", default="cuda", help="cuda (default) | cuda:N | cpu (with --dry-run only)")
    p.add_argument("--minutes", type=float, default=6.0, help="training minutes per quality row (default 6)")
    p.add_argument("--deadline-minutes", type=float, default=None,
                   help="the whole call's deadline (default: --minutes + 2.75; dry run: 6)")
    p.add_argument("--parallel", default="auto",
                   help="concurrent training runs in the shared phase: auto (from the probe; default) or N")
    p.add_argument("--skip", default="", help="comma-separated: probe and/or row names ("
                   + ", ".join(r.name for r in ROWS) + ")")
    p.add_argument("--dry-run", action="store_true",
                   help="the same pipeline with tiny budgets into a temporary root (never the repository)")
    p.add_argument("--root", default=None, help="where the RESULTS files and experiments/results/ are "
                   "(default: the repository; dry run: a new temporary folder with copies)")
    p.add_argument("--work-dir", default=None, help="scratch for run directories and logs (default: ROOT-independent "
                   "/tmp folder)")
    p.add_argument("--out", default=None, help="write the tarball ppl_vi_gpu.tar.gz and reproduce.log here")
    p.add_argument("--collect", default=None, metavar="TARBALL",
                   help="run nothing: unpack a call's tarball into ROOT/experiments/results/ and re-render")
    p.add_argument("--render", action="store_true", help="run nothing: re-render the sections from "
                   "ROOT/experiments/results/gpu/reproduce.json (or as owed)")
    opts = p.parse_args(argv)
    opts.shown = "python experiments/reproduce.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None
                                                                                          else argv))
    opts.skip = {s.strip() for s in opts.skip.split(",") if s.strip()}
    unknown = opts.skip - {"probe", *(r.name for r in ROWS)}
    if unknown:
        p.error(f"unknown --skip {sorted(unknown)}; choose from probe, {', '.join(r.name for r in ROWS)}")
    if opts.device not in ("cpu", "cuda") and not re.fullmatch(r"cuda:\d+", opts.device):
        p.error(f"--device must be cpu, cuda or cuda:N, got {opts.device!r}")
    if opts.minutes <= 0:
        p.error("--minutes must be > 0")
    if opts.parallel != "auto" and (not opts.parallel.isdigit() or int(opts.parallel) < 1):
        p.error(f"--parallel must be auto or an integer >= 1, got {opts.parallel!r}")
    if opts.deadline_minutes is None:
        opts.deadline_minutes = 6.0 if opts.dry_run else opts.minutes + DEADLINE_EXTRA
    if opts.deadline_minutes <= 0:
        p.error("--deadline-minutes must be > 0")
    if not (opts.collect or opts.render):
        if opts.device == "cpu" and not opts.dry_run:
            p.error("--device cpu runs only with --dry-run (the figures are GPU figures; a CPU run of them would "
                    "take hours)")
        if not opts.dry_run and opts.deadline_minutes * 60 < GPU.row_start_s + 60 * opts.minutes + GPU.eval_s:
            p.error(f"--deadline-minutes {opts.deadline_minutes:g} leaves no room for --minutes {opts.minutes:g} of "
                    "training with start-up and evaluation")
    if opts.collect and not Path(opts.collect).is_file():
        p.error(f"--collect: no such file {opts.collect}")
    return opts


def make_root(opts) -> Path:
    """The results root: --root, else the repository, else (dry run) a temporary copy of the results files."""
    if opts.root:
        root = Path(opts.root).resolve()
    elif opts.dry_run:
        root = Path(tempfile.mkdtemp(prefix="ppl_vi_dry_run_"))
    else:
        return REPO
    for name in RESULT_FILES:
        if (REPO / name).is_file() and not (root / name).exists():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    return root


def collect_or_render(opts, root: Path) -> int:
    """``--collect`` (unpack a call's tarball, re-collect, judge, render) or ``--render`` (sections only)."""
    ctx = Ctx(device="cuda", dry=False, root=root, work=root)
    if opts.render:
        path = ctx.results / RECORD
        render(ctx, json.loads(path.read_text()) if path.is_file() else None, ROWS)
        print(f"rendered {root / 'experiments/RESULTS.md'} and {root / 'benchmarks/RESULTS.md'}")
        return 0
    try:
        dest = unpack(Path(opts.collect), root)
    except (ValueError, tarfile.TarError, OSError) as exc:
        print(f"reproduce: error: {exc}", file=sys.stderr)
        return 2
    record = json.loads((dest / RECORD).read_text())
    ctx = Ctx(device=record["device"], dry=record["dry_run"], root=root, work=root)
    finish(ctx, record, None, ROWS, from_work=False)
    print(f"collected {dest}; rendered {root / 'experiments/RESULTS.md'} and {root / 'benchmarks/RESULTS.md'}")
    return 0


def prepare(ctx: Ctx, out: Optional[Path]) -> None:
    """Empty the work folder and this call's results folder; start the log in ``out``. Raises OSError."""
    shutil.rmtree(ctx.work, ignore_errors=True)
    (ctx.work / "scratch").mkdir(parents=True)
    shutil.rmtree(ctx.results, ignore_errors=True)
    ctx.results.mkdir(parents=True)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "reproduce.log").write_text("")


def main(argv=None) -> int:
    opts = parse_args(argv)
    root = make_root(opts)
    if opts.collect or opts.render:
        return collect_or_render(opts, root)
    if runner.cuda_missing(opts.device):
        print("reproduce: error: --device cuda but no CUDA GPU here; on a CPU use --device cpu --dry-run",
              file=sys.stderr)
        return 2
    work = Path(opts.work_dir).resolve() if opts.work_dir else \
        (root / "work" if opts.dry_run else Path(tempfile.gettempdir()) / "ppl_vi_reproduce")
    out = Path(opts.out).resolve() if opts.out else None
    ctx = Ctx(device=opts.device, dry=opts.dry_run, root=root, work=work)
    try:
        prepare(ctx, out)
    except OSError as exc:
        print(f"reproduce: error: cannot prepare the output folders: {exc}", file=sys.stderr)
        return 2
    clock = Clock(60 * opts.deadline_minutes, out / "reproduce.log" if out else None)
    clock.log(f"{opts.shown}: root {root}, work {work}{', DRY RUN' if ctx.dry else ''}")
    record = finish(ctx, run_call(opts, ctx, ROWS, clock), clock, ROWS, from_work=True)
    if out is not None:
        pack(ctx, out, clock)
    for t in record["targets"]:
        clock.log(f"target: {t['text']}: {t['status']} {t.get('measured', '')} {t.get('miss', '')}".rstrip())
    failed = [r["name"] for r in record["rows"] if r.get("status") not in ("ok", "skipped")]
    clock.log(f"done in {record['wall_s']:.0f} s (deadline {clock.deadline_s:.0f} s); "
              + (f"rows not ok: {', '.join(failed)}" if failed else "every row ok")
              + f"; results in {ctx.results}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
