"""Every GPU figure in one call (issue 15): ``python experiments/reproduce.py --device cuda --minutes M``.

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
import dataclasses
import datetime
import glob
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from importlib import metadata
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import probe as throughput  # noqa: E402  (the concurrency probe)
import runner  # noqa: E402  (device names, results files, the per-stage deadline)
from runner import REPO  # noqa: E402

RUN_SECTION = "## GPU run: every figure in one call (issue 15)"
OWED_SECTION = "## GPU figures owed"
BENCH_SECTION = "## GPU"
LEGACY_BENCH_SECTION = "## H100 (owed)"  # replaced by BENCH_SECTION the first time it is written
RECORD = "reproduce.json"
TARBALL = "ppl_vi_gpu.tar.gz"
CUDA_TESTS = ("tests/test_fast_path.py", "tests/test_matrix*.py")  # globbed; the tests whose id says "cuda"
SOURCES = ("ppl_vi/**/*.py", "experiments/*.py", "benchmarks/*.py", "tests/*.py", "pyproject.toml")
RESULT_FILES = ("experiments/RESULTS.md", "benchmarks/RESULTS.md", "experiments/vae_family.json",
                "experiments/semi_supervised.json", "experiments/completion.json")
COPY_IGNORE = shutil.ignore_patterns("checkpoints", "*.pt", "report.html", "tensorboard")
LOG_TAIL = 200_000  # bytes kept of each log in the results copy
# what the GPU image lacks of our dependencies (its torch, matplotlib, tqdm, filelock and psutil serve);
# the first call of 2026-12-04 stopped in 21 s on the missing pydantic
GPU_WHEELS = ("pyro-ppl==1.9.2 pyro-api==0.1.2 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 "
              "typing-inspection==0.4.5 typing_extensions==4.16.0")
DEADLINE_EXTRA = 2.75  # minutes of the call's deadline beyond --minutes (8.75 for 6: the call may take 9 with its install)


@dataclasses.dataclass
class Budget:
    """Seconds for each phase (GPU run, or dry run)."""

    probe_window: float  # seconds per probe level
    probe_s: float  # the probe's deadline
    probe_expected: float  # what it usually takes (the plan)
    row_start_s: float  # a shared row's start-up before its training clock runs (imports, data, capture)
    eval_s: float  # a shared row's evaluation after training (IWAE up to 5000, figures)
    write_s: float  # copying, collecting, rendering, packing
    min_train_s: float  # never train for less than this
    heartbeat_s: float  # progress lines while rows run


GPU = Budget(probe_window=3.0, probe_s=75, probe_expected=35, row_start_s=25, eval_s=75, write_s=20,
             min_train_s=30, heartbeat_s=30)
DRY = Budget(probe_window=0.5, probe_s=120, probe_expected=25, row_start_s=20, eval_s=40, write_s=30,
             min_train_s=6, heartbeat_s=15)


# ---- the call's context ---------------------------------------------------------------------------


@dataclasses.dataclass
class Ctx:
    device: str
    dry: bool
    root: Path  # holds experiments/RESULTS.md, benchmarks/RESULTS.md, the results JSON and experiments/results/
    work: Path  # scratch: run directories (with checkpoints), logs, scratch RESULTS files
    minutes: float = 0.0  # training minutes per shared row (set when the shared phase starts)
    parallel: Dict[str, int] = dataclasses.field(default_factory=dict)  # --parallel per row
    threads: int = 1  # CPU threads per training process in the shared phase

    @property
    def tag(self) -> str:
        return "dry-run" if self.dry else "gpu"

    @property
    def results(self) -> Path:
        return self.root / "experiments" / "results" / self.tag

    @property
    def runs(self) -> Path:
        return self.work / "runs"

    @property
    def prefix(self) -> str:
        """The key prefix of this call's rows in the scripts' results JSON (mode/device kind)."""
        return f"{'smoke' if self.dry else 'full'}/{runner.device_kind(self.device)}"

    def file(self, relative: str) -> Path:
        return self.root / relative

    def scratch(self, name: str) -> Path:
        """A file only one row writes or reads while rows run side by side (the real one is written
        afterwards, one script at a time, by the re-collection)."""
        return self.work / "scratch" / name


# ---- rows -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    """One entry of the call. ``command(ctx)``: the argv after ``python`` (run in the repository
    root); ``phase``: "alone" (one after another, nothing else on the device: timings) or "shared"
    (all at once); ``runs``: training processes it starts at full parallelism (sizes ``--parallel``);
    ``seconds``: an alone row's deadline on a GPU (doubled in a dry run); ``results``: the JSON file
    (under experiments/) its script writes rows into; ``collect(ctx, runs_dir)``: the argv that
    re-collects its rows from the run copies and re-renders its RESULTS.md section; ``read``: fills
    its record from its outputs."""

    name: str
    what: str
    phase: str
    command: Callable[[Ctx], List[str]]
    runs: int = 0
    seconds: float = 0.0
    results: Optional[str] = None
    collect: Optional[Callable[[Ctx, Path], List[str]]] = None
    read: Optional[Callable[[Ctx, dict], None]] = None


# ---- reading the rows' outputs ------------------------------------------------------------------------


def read_bench(ctx: Ctx, record: dict) -> None:
    path = ctx.results / "svi_speed.json"
    if path.is_file():
        bench = json.loads(path.read_text())
        record["environment"] = bench.get("environment")
        record["ppl_vi_hand_ratio"] = bench.get("ppl_vi_hand_ratio")


def parse_junit(path: Path) -> dict:
    """Counts and per-test outcomes from pytest's ``--junitxml`` file."""
    cases = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("skipped", "failure", "error"):
                outcome = {"skipped": "skipped", "failure": "failed", "error": "error"}[child.tag]
                message = (child.get("message") or "").strip().splitlines()[0][:200] if child.get("message") else ""
        cases.append({"id": f"{case.get('classname', '')}::{case.get('name', '')}", "outcome": outcome,
                      "message": message})
    counts = {o: sum(c["outcome"] == o for c in cases) for o in ("passed", "failed", "error", "skipped")}
    return {"collected": len(cases), **counts, "cases": cases}


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


# ---- running processes with deadlines -------------------------------------------------------------------


def log_line(message: str, ctx_log: Optional[Path] = None) -> None:
    print(message, flush=True)
    if ctx_log is not None:
        with open(ctx_log, "a") as handle:
            handle.write(message + "\n")


class Clock:
    """Seconds since the call began, its deadline, and the log (stdout, and ``--out``/reproduce.log)."""

    def __init__(self, deadline_s: float, log_file: Optional[Path]):
        self.start, self.deadline_s, self.log_file = time.monotonic(), deadline_s, log_file

    def now(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.deadline_s - self.now()

    def at(self, seconds: float) -> float:
        """time.monotonic() at ``seconds`` into the call."""
        return self.start + seconds

    def log(self, message: str) -> None:
        stamp = f"[reproduce {fmt_clock(self.now())}/{fmt_clock(self.deadline_s)}]"
        log_line(f"{stamp} {message}", self.log_file)


def fmt_clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def row_env(ctx: Ctx, kill_at_unix: float, threads: Optional[int]) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env[runner.DEADLINE_ENV] = f"{kill_at_unix:.1f}"
    env["PYTHONUNBUFFERED"] = "1"
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


@dataclasses.dataclass
class Running:
    row: Row
    record: dict
    proc: subprocess.Popen
    log: Path
    kill_at: float  # time.monotonic()
    started: float
    handle: object = None


def launch(row: Row, ctx: Ctx, clock: Clock, stage_deadline: float, kill_at: float,
           threads: Optional[int]) -> Running:
    """Start ``row`` (its own process group); its stages (runner-based scripts) stop at
    ``stage_deadline`` and the whole group is killed at ``kill_at`` (both seconds into the call)."""
    argv = row.command(ctx)
    log = ctx.work / "logs" / f"{row.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    handle = open(log, "w")
    record = {"name": row.name, "what": row.what, "phase": row.phase,
              "command": "python " + " ".join(shlex.quote(a) for a in shown_argv(argv, ctx)),
              "log": f"logs/{row.name}.log", "started_s": round(clock.now(), 1)}
    unix_deadline = time.time() + (stage_deadline - clock.now())
    proc = subprocess.Popen([sys.executable, *argv], cwd=REPO, env=row_env(ctx, unix_deadline, threads),
                            stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    clock.log(f"{row.name}: started ({record['command'][:160]})")
    return Running(row, record, proc, log, clock.at(kill_at), time.monotonic(), handle)


def shown_argv(argv: Sequence[str], ctx: Ctx) -> List[str]:
    """The argv with the call's scratch and root paths shortened, for the record."""
    out = []
    for a in argv:
        a = a.replace(str(ctx.work), "$WORK").replace(str(ctx.root), ".") if isinstance(a, str) else a
        out.append(a)
    return out


def kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def wait_rows(running: List[Running], ctx: Ctx, clock: Clock, heartbeat: float) -> List[dict]:
    """Wait for every row, killing each at its deadline; progress every ``heartbeat`` seconds."""
    pending, done, last_beat = list(running), [], time.monotonic()
    while pending:
        for r in list(pending):
            rc = r.proc.poll()
            if rc is None and time.monotonic() >= r.kill_at:
                kill_group(r.proc)
                r.record["status"] = f"killed at the deadline after {time.monotonic() - r.started:.0f} s"
                rc = r.proc.returncode
            if rc is None:
                continue
            r.handle.close()
            r.record["wall_s"] = round(time.monotonic() - r.started, 1)
            r.record["exit"] = rc
            if "status" not in r.record:
                r.record["status"] = "ok" if rc == 0 else f"failed (exit {rc}): {tail(r.log)}"
            if r.row.read is not None:
                try:
                    r.row.read(ctx, r.record)
                except (OSError, ValueError, KeyError, ElementTree.ParseError) as exc:
                    r.record["read_error"] = f"{type(exc).__name__}: {exc}"
            clock.log(f"{r.row.name}: {r.record['status']} ({r.record['wall_s']:.0f} s)")
            pending.remove(r)
            done.append(r.record)
        if pending and time.monotonic() - last_beat >= heartbeat:
            last_beat = time.monotonic()
            clock.log("running: " + "; ".join(f"{r.row.name} ({tail(r.log, 1)[:90]})" for r in pending))
        if pending:
            time.sleep(0.2)
    return done


def tail(path: Path, lines: int = 3) -> str:
    try:
        text = Path(path).read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " / ".join(line.strip()[:200] for line in text[-lines:]) if text else "no output"


# ---- planning ---------------------------------------------------------------------------------------


def probe_levels(runs: int) -> List[int]:
    """1, 2, 4, 8 concurrent runs, and all of them where that is more."""
    return sorted({1, 2, 4, 8, max(1, runs)})


def allocate(parallel: int, runs: Dict[str, int]) -> tuple:
    """(--parallel per row, waves) for ``parallel`` concurrent training processes shared by rows
    starting ``runs[name]`` each: all of them when there is room, else shares in proportion."""
    total = sum(runs.values())
    if parallel >= total:
        return dict(runs), 1
    shares = {name: max(1, (parallel * n) // total) for name, n in runs.items() if n}
    waves = max(math.ceil(runs[name] / share) for name, share in shares.items())
    return shares, waves


def decide_parallel(result: dict, runs: Dict[str, int], minutes: float, left_s: float, budget: Budget) -> tuple:
    """(concurrent runs, why): :func:`probe.choose_parallel`, then, where that means waves, a check
    that waves give each run more training steps than all at once within the deadline (each wave
    pays its own start-up and evaluation), by the probe's per-run rates."""
    total = sum(runs.values())
    parallel, why = throughput.choose_parallel(result, total)
    if parallel >= total:
        return parallel, why
    rate = {e["level"]: e["per_run"] for e in result["levels"]}
    _, waves = allocate(parallel, runs)
    t_waves, t_all = train_seconds(minutes, left_s, budget, waves), train_seconds(minutes, left_s, budget, 1)
    all_level = max(rate)  # the largest level measured stands for all of them at once
    steps_waves, steps_all = rate[parallel] * t_waves, rate[all_level] * t_all
    if steps_all >= steps_waves:
        return total, (f"{why}; but {waves} waves would leave each run {t_waves:.0f} s of training against "
                       f"{t_all:.0f} s all at once (~{steps_waves:.0f} against ~{steps_all:.0f} steps per run at the "
                       f"probe's rates): all {total} at once")
    return parallel, why


def train_seconds(minutes: float, left_s: float, budget: Budget, waves: int) -> float:
    """Training seconds per row: ``minutes``, or what the deadline leaves after every wave's start-up
    and evaluation and the writing (never below ``budget.min_train_s``)."""
    room = left_s - budget.write_s - waves * (budget.row_start_s + budget.eval_s)
    return max(budget.min_train_s, min(60 * minutes, room / waves))


def source_digest(root: Path = REPO) -> str:
    """sha256 (16 hex digits) over the code that runs: ppl_vi, experiments, benchmarks, tests, pyproject."""
    digest = hashlib.sha256()
    for name in sorted({f for pattern in SOURCES for f in glob.glob(pattern, root_dir=root, recursive=True)}):
        digest.update(name.encode() + b"\0" + (root / name).read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for name, dist in (("torch", "torch"), ("pyro", "pyro-ppl")):
        try:
            out[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def gpu_name(device: str) -> str:
    """The device's name without starting CUDA in this process (nvidia-smi; else torch)."""
    if runner.device_kind(device) != "cuda":
        return runner.device_name(device)
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return runner.device_name(device)


# ---- the call ---------------------------------------------------------------------------------------


def run_call(opts, ctx: Ctx, rows: List[Row], clock: Clock) -> dict:
    budget = DRY if ctx.dry else GPU
    record = {"command": opts.shown, "device": ctx.device, "device_name": gpu_name(ctx.device), "dry_run": ctx.dry,
              "tag": ctx.tag, "prefix": ctx.prefix, "started": runner.now(), "minutes": opts.minutes,
              "deadline_s": clock.deadline_s, "versions": versions(), "source_digest": source_digest(),
              "cpu": runner.device_name("cpu"), "phases": [], "rows": []}
    shared = [r for r in rows if r.phase == "shared"]
    alone = [r for r in rows if r.phase == "alone"]
    total_runs = sum(r.runs for r in shared)
    alone_s = sum(r.seconds * (2 if ctx.dry else 1) for r in alone)
    expected = (budget.probe_expected + alone_s + budget.row_start_s + 60 * (opts.minutes or 0) + budget.eval_s
                + budget.write_s)
    record["plan"] = {"probe_s": budget.probe_s, "alone_s": alone_s, "row_start_s": budget.row_start_s,
                      "train_s": 60 * (opts.minutes or 0), "eval_s": budget.eval_s, "write_s": budget.write_s,
                      "expected_end_s": round(expected)}
    clock.log(f"{record['device_name']}; {len(rows)} rows ({total_runs} training runs in the shared phase); plan: "
              f"probe <= {budget.probe_s:.0f} s, alone rows <= {alone_s:.0f} s, shared rows {budget.row_start_s:.0f} s "
              f"start-up + {opts.minutes or 0:g} min training + {budget.eval_s:.0f} s evaluation, writing "
              f"{budget.write_s:.0f} s; deadline {fmt_clock(clock.deadline_s)}")

    # 1. probe
    t0 = clock.now()
    if opts.parallel != "auto":
        parallel, why = int(opts.parallel), f"--parallel {opts.parallel} (no probe)"
        record["probe"] = {"status": "not run (--parallel given)"}
    elif "probe" in opts.skip or total_runs == 0:
        parallel, why = total_runs, "probe skipped: all runs at once"
        record["probe"] = {"status": "skipped"}
    else:
        levels = [1, 2] if ctx.dry else probe_levels(total_runs)
        probe_deadline = clock.at(min(t0 + budget.probe_s, clock.deadline_s))
        record["probe"] = throughput.run_probe(
            levels, ctx.device, budget.probe_window, probe_deadline, ctx.work / "logs", log=clock.log,
            train_subset=1024 if ctx.dry else 0, hidden=(64,) if ctx.dry else (500, 500))
        left = clock.left() - alone_s  # what the shared phase will have, if the alone rows take their time
        parallel, why = decide_parallel(record["probe"], {r.name: r.runs for r in shared if r.runs},
                                        opts.minutes, left, budget)
        record["probe"]["sustained"] = throughput.sustained(record["probe"])
    record["probe"]["parallel"], record["probe"]["why"] = parallel, why
    ctx.parallel, waves = allocate(parallel, {r.name: r.runs for r in shared if r.runs})
    ctx.threads = max(1, (os.cpu_count() or 1) // max(1, min(parallel, total_runs)))
    record["probe"]["allocation"], record["probe"]["waves"] = ctx.parallel, waves
    record["phases"].append({"phase": "probe", "start_s": round(t0, 1), "wall_s": round(clock.now() - t0, 1)})
    clock.log(f"parallel: {why}; per row {ctx.parallel}, {waves} wave(s)")

    # 2. alone rows, one after another
    for row in alone:
        if row.name in opts.skip:
            record["rows"].append({"name": row.name, "what": row.what, "phase": row.phase, "status": "skipped"})
            continue
        t = clock.now()
        cap = row.seconds * (2 if ctx.dry else 1)
        reserve = budget.row_start_s + budget.min_train_s + budget.eval_s + budget.write_s if shared else budget.write_s
        end = min(t + cap, clock.deadline_s - reserve)
        if end - t < 5:
            record["rows"].append({"name": row.name, "what": row.what, "phase": row.phase,
                                   "status": "not started: no time left before the shared rows"})
            continue
        running = launch(row, ctx, clock, end, end, None)
        record["rows"] += wait_rows([running], ctx, clock, budget.heartbeat_s)
        record["phases"].append({"phase": row.name, "start_s": round(t, 1), "wall_s": round(clock.now() - t, 1)})

    # 3. shared rows, all at once
    t = clock.now()
    seconds = train_seconds(opts.minutes or 0, clock.left(), budget, waves)
    ctx.minutes = seconds / 60  # per run (per wave where there are waves)
    record["train_minutes"] = None if ctx.dry else round(ctx.minutes, 2)
    if not ctx.dry and opts.minutes and ctx.minutes < opts.minutes - 1e-6:
        record["train_note"] = (f"each run trained {ctx.minutes:.2f} min, not {opts.minutes:g}: "
                                + (f"{waves} waves share the window; " if waves > 1 else "")
                                + f"the probe and alone rows ended at {fmt_clock(t)} and the deadline is "
                                  f"{fmt_clock(clock.deadline_s)}")
        clock.log(record["train_note"])
    stage_deadline = clock.deadline_s - budget.write_s
    started = []
    for row in shared:
        if row.name in opts.skip:
            record["rows"].append({"name": row.name, "what": row.what, "phase": row.phase, "status": "skipped"})
            continue
        grace = budget.write_s / 2 if row.collect else 0  # runner-based scripts stop their own stages first
        started.append(launch(row, ctx, clock, stage_deadline, stage_deadline + grace, ctx.threads))
    record["rows"] += wait_rows(started, ctx, clock, budget.heartbeat_s)
    record["phases"].append({"phase": "shared rows", "start_s": round(t, 1), "wall_s": round(clock.now() - t, 1)})
    return record


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
    render(ctx, record)
    return record


def copy_runs(ctx: Ctx) -> None:
    """Each run directory (no checkpoints, no report.html) to results/runs/, logs (tails) to results/logs/."""
    for sub in ("runs", "logs"):
        shutil.rmtree(ctx.results / sub, ignore_errors=True)
    (ctx.results / "logs").mkdir(parents=True, exist_ok=True)
    if ctx.runs.is_dir():
        for run in sorted(p for p in ctx.runs.iterdir() if p.is_dir() and p.name != "logs"):
            shutil.copytree(run, ctx.results / "runs" / run.name, ignore=COPY_IGNORE)
    # records written during the run name the scratch run directory and figures: point those at the
    # copies (the commands are left as they ran)
    moved = runner.portable(ctx.results / "runs")
    for path in (ctx.results / "runs").glob("*/*.json"):
        try:
            data = json.loads(path.read_text())
        except ValueError:
            continue
        if isinstance(data, dict) and isinstance(data.get("run_dir"), str):
            data["run_dir"] = data["run_dir"].replace(str(ctx.runs), moved)
            data["figures"] = [f.replace(str(ctx.runs), moved) for f in data.get("figures", [])]
            path.write_text(json.dumps(data, indent=2) + "\n")
    for log in sorted([*ctx.runs.glob("logs/*.log"), *(ctx.work / "logs").glob("*.log")]):
        data = log.read_bytes()
        (ctx.results / "logs" / log.name).write_bytes(data[-LOG_TAIL:])


def this_call(rows: Dict[str, dict], prefix: str, since: Optional[str]) -> Dict[str, dict]:
    """The rows under ``prefix`` (mode/device kind) started (or finished) at or after ``since``."""
    def stamp(r):
        text = r.get("started") or r.get("finished")
        return datetime.datetime.fromisoformat(text) if text else None

    start = datetime.datetime.fromisoformat(since) if since else None
    return {k: r for k, r in rows.items() if k.startswith(prefix)
            and (start is None or (stamp(r) is not None and stamp(r) >= start))}


def snapshot(ctx: Ctx, rows: List[Row], since: str) -> Dict[str, dict]:
    """This call's rows in each script's results JSON, failures included (to re-merge them elsewhere)."""
    return {row.results: this_call(runner.load_json(ctx.file(f"experiments/{row.results}"), "").get("rows", {}),
                                   ctx.prefix, since) for row in rows if row.results}


def recollect(ctx: Ctx, rows: List[Row], clock: Optional[Clock]) -> List[dict]:
    """Each script's ``--collect`` over the run copies, one at a time: its results JSON gets the
    copies' paths and its section of experiments/RESULTS.md is re-rendered."""
    out = []
    for row in rows:
        if row.collect is None:
            continue
        argv = row.collect(ctx, ctx.results / "runs")
        env = row_env(ctx, time.time() + 120, 1)
        proc = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=120)
        status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-300:]}"
        out.append({"name": row.name, "status": status})
        (clock.log if clock else print)(f"collect {row.name}: {status}")
    return out


# ---- targets --------------------------------------------------------------------------------------------


def _rows(ctx: Ctx, name: str, record: dict) -> Dict[str, dict]:
    """This call's rows of one results JSON (older rows, and other calls', left out)."""
    return this_call(runner.load_json(ctx.file(f"experiments/{name}"), "").get("rows", {}), ctx.prefix,
                     record.get("started"))


def _miss(value: float, bound: float, unit: str = "") -> str:
    return f"by {value - bound:.2f}{unit} ({100 * (value - bound) / bound:+.1f} %)"


def _bench(ctx: Ctx) -> Optional[dict]:
    path = ctx.results / "svi_speed.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _ssl_rows(rows: List[dict], kind: str) -> tuple:
    """The semi-supervised rows of ``kind`` (ssvae = M2, m1m2 = M1+M2) with 100 labels, and the finished ones."""
    mine = [r for r in rows if re.fullmatch(rf"(smoke-)?{kind}-l100-s\d+", r.get("run", ""))]
    return mine, [r for r in mine if r.get("status") == "ok" and "test_accuracy" in r]


def _mean_sd(values: List[float]) -> tuple:
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else math.nan
    return mean, sd


def _judge_ssl_accuracy(rows: List[dict]) -> dict:
    """M1+M2 (the ``m1m2`` rows), 100 labels: mean test accuracy over 3 labelled-set seeds ≥ 96 %."""
    t = {"id": "ssvae", "text": "M1+M2 (`m1m2`), 100 labels: mean test accuracy over 3 labelled-set seeds ≥ 96 %"}
    mine, ok_runs = _ssl_rows(rows, "m1m2")
    if not mine:
        return {**t, "status": "owed", "measured": "", "miss": "", "why": "rows not run"}
    if not ok_runs:
        return {**t, "status": "failed", "measured": "; ".join(r.get("status", "") for r in mine), "miss": "",
                "why": ""}
    accs = [100 * r["test_accuracy"] for r in ok_runs]
    mean, sd = _mean_sd(accs)
    met = mean >= 96.0 and len(ok_runs) >= 3
    return {**t, "status": "met" if met else ("NOT met" if len(ok_runs) >= 3 else "owed"),
            "measured": f"{mean:.2f} ± {sd:.2f} % over seeds {sorted(r['seed'] for r in ok_runs)} "
                        f"({', '.join(f'{a:.2f}' for a in accs)})",
            "miss": "" if mean >= 96.0 else f"by {96.0 - mean:.2f} points",
            "why": ("" if mean >= 96.0 else "Kingma et al. 2014 report 96.67 % for M1+M2 with 100 labels; ")
            + f"{ok_runs[0].get('epochs_done', '?')} epochs (seed {ok_runs[0]['seed']})"}


def _judge_ssl_gain(rows: List[dict]) -> dict:
    """M2 (the ``ssvae`` rows) minus its own supervised-only baseline (same labels), mean over 3 seeds ≥ 10 points."""
    t = {"id": "ssvae-gain", "text": "M2 (`ssvae`), 100 labels: test accuracy − its supervised-only baseline's ≥ 10 "
                                     "points (mean over 3 labelled-set seeds)"}
    mine, ok_runs = _ssl_rows(rows, "ssvae")
    ok_runs = [r for r in ok_runs if "baseline_test_accuracy" in r]
    if not mine:
        return {**t, "status": "owed", "measured": "", "miss": "", "why": "rows not run"}
    if not ok_runs:
        return {**t, "status": "failed", "measured": "; ".join(r.get("status", "") for r in mine), "miss": "",
                "why": ""}
    gains = [100 * (r["test_accuracy"] - r["baseline_test_accuracy"]) for r in ok_runs]
    mean, sd = _mean_sd(gains)
    m2 = ", ".join(f"{100 * r['test_accuracy']:.2f}" for r in ok_runs)
    base = ", ".join(f"{100 * r['baseline_test_accuracy']:.2f}" for r in ok_runs)
    met = mean >= 10.0 and len(ok_runs) >= 3
    return {**t, "status": "met" if met else ("NOT met" if len(ok_runs) >= 3 else "owed"),
            "measured": f"{mean:+.2f} ± {sd:.2f} points over seeds {sorted(r['seed'] for r in ok_runs)} "
                        f"(M2 {m2} % against baselines {base} %)",
            "miss": "" if mean >= 10.0 else f"by {10.0 - mean:.2f} points",
            "why": f"{ok_runs[0].get('epochs_done', '?')} epochs (seed {ok_runs[0]['seed']})"}


def judge_targets(ctx: Ctx, record: dict) -> List[dict]:
    """The issue's targets, each: text, status (met / NOT met / owed / failed), measured, miss, why."""
    out = []
    bench = _bench(ctx)
    # ppl_vi step against the hand-written whole-step CUDA graph (the floor)
    t = {"id": "step", "text": "ppl_vi step ≤ 1.5 × the hand-written CUDA-graph floor (batch 128, K=1)"}
    if bench:
        by = {(r["batch"], r["k"], r["variant"]): r for r in bench["rows"]}
        configs = sorted({(b, k) for b, k, _ in by})
        ratios = {c: by[c + ("ppl_vi",)]["ms"] / by[c + ("graph",)]["ms"] for c in configs
                  if c + ("ppl_vi",) in by and c + ("graph",) in by}
        if (128, 1) in ratios:
            r = ratios[(128, 1)]
            t.update(status="met" if r <= 1.5 else "NOT met", miss="" if r <= 1.5 else _miss(r, 1.5, "×"))
        else:
            t.update(status="owed", miss="")
        t["measured"] = "; ".join(f"B={b}, K={k}: {by[(b, k, 'ppl_vi')]['ms']:.3f} ms vs {by[(b, k, 'graph')]['ms']:.3f} "
                                  f"ms = {r:.2f}×" for (b, k), r in ratios.items()) or "no graph row (no CUDA)"
        note = by.get((128, 1, "ppl_vi"), {}).get("note") or next((r.get("note") for r in bench["rows"]
                                                                   if r["variant"] == "ppl_vi"), "")
        t["why"] = f"ppl_vi ran: {note}" if note else ""
    else:
        t.update(status="owed", measured="", miss="", why="svi_speed did not finish")
    out.append(t)
    # IWAE-5000 over the test set
    t = {"id": "iwae5000", "text": "IWAE-5000 over the 10,000 test images ≤ 5 s"}
    ev = (bench or {}).get("eval") or {}
    if ev.get("ppl_vi_s") is not None:
        whole = ev["n"] == ev["n_test"] and ev["k"] == 5000
        t["measured"] = (f"{ev['ppl_vi_s']:.2f} s for k={ev['k']} on {ev['n']} images (hand-written chunked "
                         f"{ev['hand_s']:.2f} s; -L {ev['ppl_vi_nll']:.2f} vs {ev['hand_nll']:.2f}, "
                         f"{'agree' if ev['agree'] else 'DISAGREE'})")
        if whole:
            ok = ev["ppl_vi_s"] <= 5.0
            t.update(status="met" if ok else "NOT met", miss="" if ok else _miss(ev["ppl_vi_s"], 5.0, " s"),
                     why="" if ok else f"the hand-written chunked estimator took {ev['hand_s']:.2f} s on the same images")
        else:
            t.update(status="owed", miss="", why="a subset or a smaller k (not the target's measurement)")
    else:
        t.update(status="owed", measured="", miss="", why="svi_speed did not finish")
    out.append(t)
    # NLL rows
    vae = _rows(ctx, "vae_family.json", record)
    sharing = sum((record.get("probe") or {}).get("allocation", {}).values())
    p = ctx.prefix
    for run, bound, text in (("vae", 87.0, "VAE z=50: NLL (-IWAE-5000) ≤ 87.0"),
                             ("iwae50", 85.0, "IWAE k=50: NLL (-IWAE-5000) ≤ 85.0")):
        t = {"id": f"{run}-nll", "text": text}
        r = vae.get(f"{p}/{run}")
        out.append(t)
        if r is None:
            t.update(status="owed", measured="", miss="", why="row not run")
            continue
        if r.get("status") != "ok":
            t.update(status="failed", measured=r.get("status", ""), miss="", why="")
            continue
        v = r.get("test_iwae", {}).get("5000")
        trained = (f"{r.get('epochs_done', '?')} epochs in {r.get('train_seconds', 0) / 60:.1f} min, "
                   f"{sharing} training runs sharing the device")
        if v is None:
            k = max(r.get("test_iwae", {"0": 0}), key=int)
            t.update(status="owed", measured=f"-IWAE-{k} {r['test_iwae'].get(k, float('nan')):.2f} (no k=5000)",
                     miss="", why=trained)
            continue
        t.update(status="met" if v <= bound else "NOT met", measured=f"{v:.2f} ± {r['test_iwae_se']['5000']:.2f}",
                 miss="" if v <= bound else _miss(v, bound), why=trained + ("" if v <= bound else
                                                                           "; Burda et al. 2016 train 3,280 epochs"))
    # GMVAE beats VAE z=10
    t = {"id": "gmvae", "text": "GMVAE z=10 (500 components) beats VAE z=10 on test NELBO and -IWAE-1000"}
    g, v = vae.get(f"{p}/gmvae"), vae.get(f"{p}/vae_z10")
    if g is None or v is None:
        t.update(status="owed", measured="", miss="", why="rows not run")
    elif g.get("status") != "ok" or v.get("status") != "ok":
        t.update(status="failed", measured=f"gmvae: {g.get('status')}; vae_z10: {v.get('status')}", miss="", why="")
    else:
        gi, vi = g.get("test_iwae", {}).get("1000"), v.get("test_iwae", {}).get("1000")
        if gi is None or vi is None:
            t.update(status="owed", measured="no IWAE-1000", miss="", why="")
        else:
            ok = g["test_nelbo"] < v["test_nelbo"] and gi < vi
            t.update(status="met" if ok else "NOT met",
                     measured=f"NELBO {g['test_nelbo']:.2f} vs {v['test_nelbo']:.2f}; -IWAE-1000 {gi:.2f} vs {vi:.2f}",
                     miss="" if ok else f"by {max(g['test_nelbo'] - v['test_nelbo'], gi - vi):.2f} nats",
                     why=f"GMVAE {g.get('epochs_done', '?')} epochs, VAE z=10 {v.get('epochs_done', '?')} epochs")
    out.append(t)
    # semi-supervised, 100 labels, this call's rows of each kind (3 labelled-set seeds)
    ssl = list(_rows(ctx, "semi_supervised.json", record).values())
    out.append(_judge_ssl_accuracy(ssl))
    out.append(_judge_ssl_gain(ssl))
    # CVAE completion against Pyro's table
    t = {"id": "completion", "text": "CVAE completion: -L_K below Pyro's CVAE 71.8 / 51.0 / 24.2 (1 / 2 / 3 quadrants)"}
    c = _rows(ctx, "completion.json", record).get(p)
    if c is None:
        t.update(status="owed", measured="", miss="", why="row not run")
    else:
        k = str(max(c["ks"]))
        vals = {q: c["quadrants"][str(q)]["cvae_is"][k]["mean"] for q in (1, 2, 3)}
        pyro_cvae = {1: 71.8, 2: 51.0, 3: 24.2}
        ok = all(vals[q] < pyro_cvae[q] for q in vals)
        worst = max(vals, key=lambda q: vals[q] - pyro_cvae[q])
        t.update(status="met" if ok else "NOT met", measured=" / ".join(f"{vals[q]:.1f}" for q in (1, 2, 3))
                 + f" (-L_{k})", miss="" if ok else f"{worst} quadrant(s) {_miss(vals[worst], pyro_cvae[worst])}",
                 why=f"CVAE {c.get('cvae_epochs')} epochs; Pyro's figure is a -ELBO on grayscale targets "
                     "(see the issue-4 section)")
    out.append(t)
    return out


# ---- rendering ----------------------------------------------------------------------------------------


def owed_command() -> List[str]:
    """THE single owed command, as RESULTS.md shows it."""
    runs = sum(r.runs for r in ROWS if r.phase == "shared")
    return [
        "Every GPU figure comes from one call of `experiments/reproduce.py` on one GPU (about 9 minutes on an "
        "H100/H200 with `--minutes 6`). The GPU machine has torch but not pyro-ppl and cannot reach the network, "
        "so the call carries the wheels of pyro-ppl and pydantic (with their own needs) and the data.",
        "",
        "1. Preparation, here, in the root of the checkout that the device tool sends (`/.whl/` and `/.data/` are "
        "in `.gitignore`, so they travel only when carried):",
        "",
        "       python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "
        "--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "
        f"-d .whl {GPU_WHEELS}",
        "       rm -rf .data && cp -r ../shared/data .data",
        "",
        "2. The device run (the device tool's `run`, `carry` = `[\".whl\", \".data\"]`, `timeout_s` = 600):",
        "",
        "       python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export "
        "PYTHONPATH=/tmp/site:$PWD PPL_VI_DATA=$PWD/.data; python3 experiments/reproduce.py --device cuda "
        "--minutes 6 --out $OUT",
        "",
        "   It writes `$OUT/ppl_vi_gpu.tar.gz` (everything under `experiments/results/gpu/`) and `$OUT/reproduce.log`.",
        "",
        "3. Back here, with the tarball from the run's `files_at` folder:",
        "",
        "       python experiments/reproduce.py --collect FILES_AT/ppl_vi_gpu.tar.gz",
        "",
        "   unpacks it into `experiments/results/gpu/`, re-collects every script's rows from the run copies into "
        "`experiments/*.json` and their RESULTS.md sections, and renders the sections \"GPU run\" here and \"GPU\" "
        "in `benchmarks/RESULTS.md` (device name, probe, phases, targets). Commit those files.",
        "",
        f"Time plan (`--minutes 6`, the call's own deadline {6 + DEADLINE_EXTRA:g} min): start-up ~10 s; probe "
        f"~{GPU.probe_expected:.0f} s (≤ {GPU.probe_s:.0f} s; {', '.join(map(str, probe_levels(runs)))} runs at once, "
        f"{GPU.probe_window:g} s each); {', '.join(f'{r.name} alone ≤ {r.seconds:.0f} s' for r in ROWS if r.phase == 'alone')}; "
        f"then all {runs} training runs and the CUDA tests at once: ≤ {GPU.row_start_s:.0f} s start-up, training "
        f"for 6 minutes or what the deadline leaves (about 5.2 at the expected phase times; the record says what "
        f"each run got), "
        f"≤ {GPU.eval_s:.0f} s evaluation; writing ≤ {GPU.write_s:.0f} s. A row still running at its deadline is "
        "killed and reported as killed.",
    ]


def render(ctx: Ctx, record: Optional[dict]) -> None:
    md = ctx.file("experiments/RESULTS.md")
    runner.write_section(md, OWED_SECTION, owed_section(record))
    runner.write_section(md, RUN_SECTION, run_section(ctx, record))
    write_bench_section(ctx.file("benchmarks/RESULTS.md"), bench_section(ctx, record))


def owed_section(record: Optional[dict]) -> str:
    judged = (record or {}).get("targets", [])
    owed = [t for t in judged if t["status"] in ("owed", "failed")] if record and not record.get("dry_run") else None
    if owed is None:
        status = ("**Owed: no GPU call has run yet**, so every GPU figure in these files (the targets in \"GPU run\" "
                  "below) waits on this one call.")
    elif owed:
        status = (f"**Still owed after the call of {record.get('finished', '?')} on {record['device_name']}:** "
                  + "; ".join(t["text"] for t in owed) + ". Rerun:")
    else:
        status = (f"**None owed:** every target was judged in the call of {record.get('finished', '?')} on "
                  f"{record['device_name']}. To rerun:")
    return "\n".join([OWED_SECTION, "", status, "", *owed_command()]) + "\n"


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ") if text not in (None, "") else "–"


def run_section(ctx: Ctx, record: Optional[dict]) -> str:
    out = [RUN_SECTION, ""]
    if record is None:
        return "\n".join(out + ["_No call yet: see \"GPU figures owed\"._"]) + "\n"
    if record.get("dry_run"):
        out += ["**DRY RUN: tiny budgets (probe levels 1-2, a few benchmark steps, `--quick` rows), a pipeline check; "
                "none of these numbers is a result.**", ""]
    here = source_digest()
    same = "the code here" if record.get("source_digest") == here else \
        f"a different tree than the code here ({here})"
    v = record.get("versions", {})
    cpu = f" ({record['cpu']})" if record.get("cpu") and record["cpu"] != record["device_name"] else ""
    out += [f"`{record['command']}` on **{record['device_name']}**{cpu}, {record.get('started')} "
            f"to {record.get('finished')}: {record.get('wall_s', 0):.0f} s in all against a deadline of "
            f"{record['deadline_s']:.0f} s; python {v.get('python')}, torch {v.get('torch')}, pyro {v.get('pyro')}; "
            f"source digest {record.get('source_digest')} ({same}). Copies of every run (metrics, config, history, "
            f"figures, logs; no checkpoints) and `reproduce.json` are in `experiments/results/{record['tag']}/`.", ""]
    if record.get("train_note"):
        out += [f"**Training budget:** {record['train_note']}.", ""]
    out += ["### Targets", "", "| target | status | measured | misses | why / context |", "|---|---|---|---|---|"]
    for t in record.get("targets", []):
        out.append(f"| {t['text']} | **{t['status']}** | {_cell(t.get('measured'))} | {_cell(t.get('miss'))} "
                   f"| {_cell(t.get('why'))} |")
    p = record.get("probe", {})
    out += ["", "### Concurrency probe", "",
            f"{p.get('status', 'not run')}. Each worker: {p.get('model', '')} through `ppl_vi.training.Trainer` "
            f"({'; '.join(p.get('mode', [])) or '–'}); {p.get('window_s', '–')} s per level; start-up "
            f"{p.get('startup_s', '–')} s. Sustained (each run ≥ {throughput.SUSTAIN:.0%} of solo): "
            f"{p.get('sustained', '–')} at once. Chosen: {p.get('why', '–')} (per row: {p.get('allocation', {})}, "
            f"{p.get('waves', 1)} wave(s)).", ""]
    if p.get("levels"):
        solo = p["levels"][0]["per_run"]
        out += ["| runs at once | steps/s per run (mean) | slowest run | aggregate steps/s | per run vs solo |",
                "|---|---|---|---|---|"]
        out += [f"| {e['level']} | {e['per_run']:.1f} | {e['min_run']:.1f} | {e['aggregate']:.1f} | "
                f"{e['per_run'] / solo:.0%} |" for e in p["levels"]]
    out += ["", "### Phases and rows", "", "| phase / row | status | wall | command |", "|---|---|---|---|"]
    for ph in record.get("phases", []):
        out.append(f"| phase: {ph['phase']} | | {ph['wall_s']:.0f} s (from {ph['start_s']:.0f} s) | |")
    for r in record.get("rows", []):
        extra = ""
        if r["name"] == "cuda_tests" and "collected" in r:
            extra = (f" ({r['collected']} collected: {r['passed']} passed, {r['failed']} failed, {r['error']} errors, "
                     f"{r['skipped']} skipped)")
        out.append(f"| {r['name']} | **{_cell(r.get('status'))}**{extra} | {r.get('wall_s', 0):.0f} s | "
                   f"`{_cell(r.get('command'))}` |")
    if record.get("train_minutes") is not None:
        out += ["", f"Training minutes per shared run: {record['train_minutes']:g}."]
    return "\n".join(out) + "\n"


def bench_section(ctx: Ctx, record: Optional[dict]) -> str:
    out = [BENCH_SECTION, ""]
    bench = _bench(ctx) if record else None
    if record is None or bench is None:
        out += ["**Owed: no GPU call has run yet**, so none of the CUDA figures exist:",
                "* the CUDA-graph variants: `graph` (the floor), and `ppl_vi` in `cuda-graph` mode;",
                "* the CUDA timings of `hand`, `pyro` and `ppl_vi-off`;",
                "* IWAE-5000 over the full 10,000-image test set;",
                "* the two CUDA-only tests in `tests/test_fast_path.py` (skipped without CUDA).",
                "",
                "They come from the single call in `experiments/RESULTS.md`, section \"GPU figures owed\", which",
                "runs `benchmarks/svi_speed.py` alone on the GPU (before the training rows) and the CUDA tests.", ""]
    else:
        if record.get("dry_run"):
            out += ["**DRY RUN on " + record["device_name"] + ": a pipeline check with a few steps, NOT results.**", ""]
        out += [f"Measured by `experiments/reproduce.py` on **{record['device_name']}**, {record.get('started')}, "
                "with nothing else of the call running (the training rows start after it).", "",
                f"* **Software:** {bench.get('environment')}.", f"* **Clock:** {bench.get('clock')}.",
                f"* **Command:** `{bench.get('command')}` ({bench.get('total_s', 0):.0f} s; `torch.compile` off "
                "to fit the call's time).", "",
                "| batch | K | variant | ms/step | [min, max] | epoch s | × hand | × graph (floor) | note |",
                "|---|---|---|---|---|---|---|---|---|"]
        graph = {(r["batch"], r["k"]): r["ms"] for r in bench["rows"] if r["variant"] == "graph"}
        for r in bench["rows"]:
            g = graph.get((r["batch"], r["k"]))
            floor = f"{r['ms'] / g:.2f}" if g else "–"
            out.append(f"| {r['batch']} | {r['k']} | {r['variant']} | {r['ms']:.3f} | [{r['lo']:.3f}, {r['hi']:.3f}] "
                       f"| {r['epoch_s']:.1f} | {r['ratio']:.2f} | {floor} | "
                       f"{_cell(r.get('note'))} ({r['n']}×{r['windows']} steps) |")
        ev = bench.get("eval") or {}
        if ev:
            out += ["", f"IWAE-{ev['k']} on {ev['n']} of {ev['n_test']} test images: ppl_vi's chunked evaluator "
                        f"{ev['ppl_vi_s']:.2f} s (-L = {ev['ppl_vi_nll']:.3f} ± {ev['ppl_vi_se']:.3f}), hand-written "
                        f"{ev['hand_s']:.2f} s (-L = {ev['hand_nll']:.3f} ± {ev['hand_se']:.3f}); difference "
                        f"{ev['diff']:+.4f} nats, paired SE {ev['paired_se']:.4f}: "
                        f"{'agree' if ev['agree'] else 'DISAGREE'} (the model: {ev.get('model_steps')} hand-written "
                        "Adam steps)."]
        out += ["", "| target | status | measured | misses |", "|---|---|---|---|"]
        for t in record.get("targets", []):
            if t["id"] in ("step", "iwae5000"):
                out.append(f"| {t['text']} | **{t['status']}** | {_cell(t.get('measured'))} | {_cell(t.get('miss'))} |")
        out.append("")
    out += ["What the `ppl_vi` row does on CUDA, when the guide is reparameterised, the loss is `trace` or",
            "`iwae`, `nan_policy` is `stop`, and the run is a single process:",
            "* **Warm-up:** 3 eager steps run on a side stream. These are real training steps, and they check",
            "  that the trace structure does not change.",
            "* **Capture:** step 4 captures the loss, backward and `Adam(capturable=True)` update in one CUDA",
            "  graph. The learning rate becomes a device tensor, so the per-epoch scheduler still reaches the",
            "  graph.",
            "* **Replay:** every later step copies the batch into the static input and replays the graph. An",
            "  epoch's last, smaller batch takes an eager step instead.",
            "",
            "`Trainer.fast.mode` and the table's note column say which path ran. Any capture failure falls",
            "back to the sync-free eager step with a one-line message.",
            "",
            "The whole benchmark alone, with `torch.compile` and 7 windows per variant (longer than the call",
            "allows): `PPL_VI_DATA=/path/to/data python benchmarks/svi_speed.py --device cuda`."]
    return "\n".join(out) + "\n"


def write_bench_section(path: Path, text: str) -> None:
    """Replace "## GPU" (or, the first time, "## H100 (owed)") in benchmarks/RESULTS.md."""
    if path.is_file() and BENCH_SECTION not in path.read_text().splitlines() and \
            LEGACY_BENCH_SECTION in path.read_text().splitlines():
        runner.write_section(path, LEGACY_BENCH_SECTION, text)
    else:
        runner.write_section(path, BENCH_SECTION, text)


# ---- collect ----------------------------------------------------------------------------------------------


def unpack(tarball: Path, root: Path) -> Path:
    """Extract a call's tarball (every member under experiments/results/TAG/) into ``root``, replacing
    that folder; returns it. Raises ValueError on anything else in it."""
    with tarfile.open(tarball, "r:*") as tar:
        members = tar.getmembers()
        tags = {m.name.split("/")[2] for m in members if m.name.startswith("experiments/results/")
                and len(m.name.split("/")) > 2}
        bad = [m.name for m in members if not m.name.startswith("experiments/results/") or ".." in m.name.split("/")
               or m.name.startswith("/") or not (m.isfile() or m.isdir())]
        if bad or len(tags) != 1:
            raise ValueError(f"{tarball} is not a reproduce.py results tarball (members outside one "
                             f"experiments/results/TAG/ folder: {bad[:3] or sorted(tags)})")
        tag = tags.pop()
        dest = root / "experiments" / "results" / tag
        if f"experiments/results/{tag}/{RECORD}" not in tar.getnames():
            raise ValueError(f"{tarball} holds no experiments/results/{tag}/{RECORD}")
        shutil.rmtree(dest, ignore_errors=True)
        if hasattr(tarfile, "data_filter"):
            tar.extractall(root, members=members, filter="data")
        else:  # pragma: no cover - Python < 3.10.12 / 3.11.4; the names are checked above
            tar.extractall(root, members=members)
    return dest


MAX_FILE = 15 * 2 ** 20  # a file back from the device machine may have 16 MiB: keep a margin
KEEP_FIGURES = ("training_curves.png", "bound_vs_k.png", "completions.png", "confusion_matrix.png")


def pack(ctx: Ctx, out: Path, clock: Clock) -> Path:
    """One tarball of experiments/results/TAG/; over ``MAX_FILE``, again without the figures other
    than ``KEEP_FIGURES`` (said in the log and in a DROPPED.txt inside)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / TARBALL
    arcname = f"experiments/results/{ctx.tag}"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(ctx.results, arcname=arcname)
    if path.stat().st_size > MAX_FILE:
        dropped = sorted(str(p.relative_to(ctx.results)) for p in ctx.results.rglob("*.png") if p.name not in KEEP_FIGURES)
        (ctx.results / "DROPPED.txt").write_text("left out of the tarball (over 15 MiB with them):\n"
                                                 + "\n".join(dropped) + "\n")
        keep = lambda info: None if info.name.endswith(".png") and Path(info.name).name not in KEEP_FIGURES \
            else info  # noqa: E731
        with tarfile.open(path, "w:gz") as tar:
            tar.add(ctx.results, arcname=arcname, filter=keep)
        clock.log(f"tarball over {MAX_FILE / 2 ** 20:.0f} MiB: {len(dropped)} figures left out (DROPPED.txt)")
    size = path.stat().st_size
    clock.log(f"packed {path} ({size / 2 ** 20:.1f} MiB{'; STILL OVER the limit' if size > MAX_FILE else ''})")
    return path


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


def main(argv=None) -> int:
    opts = parse_args(argv)
    root = make_root(opts)
    if opts.collect or opts.render:
        ctx = Ctx(device="cuda", dry=False, root=root, work=root)
        if opts.collect:
            try:
                dest = unpack(Path(opts.collect), root)
            except (ValueError, tarfile.TarError, OSError) as exc:
                print(f"reproduce: error: {exc}", file=sys.stderr)
                return 2
            record = json.loads((dest / RECORD).read_text())
            ctx = Ctx(device=record["device"], dry=record["dry_run"], root=root, work=root)
            record = finish(ctx, record, None, ROWS, from_work=False)
            print(f"collected {dest}; rendered {root / 'experiments/RESULTS.md'} and {root / 'benchmarks/RESULTS.md'}")
            return 0
        path = ctx.results / RECORD
        render(ctx, json.loads(path.read_text()) if path.is_file() else None)
        print(f"rendered {root / 'experiments/RESULTS.md'} and {root / 'benchmarks/RESULTS.md'}")
        return 0
    if runner.cuda_missing(opts.device):
        print("reproduce: error: --device cuda but no CUDA GPU here; on a CPU use --device cpu --dry-run",
              file=sys.stderr)
        return 2
    work = Path(opts.work_dir).resolve() if opts.work_dir else \
        (root / "work" if opts.dry_run else Path(tempfile.gettempdir()) / "ppl_vi_reproduce")
    out = Path(opts.out).resolve() if opts.out else None
    ctx = Ctx(device=opts.device, dry=opts.dry_run, root=root, work=work)
    try:
        shutil.rmtree(work, ignore_errors=True)
        (work / "scratch").mkdir(parents=True)
        shutil.rmtree(ctx.results, ignore_errors=True)
        ctx.results.mkdir(parents=True)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / "reproduce.log").write_text("")
    except OSError as exc:
        print(f"reproduce: error: cannot prepare the output folders: {exc}", file=sys.stderr)
        return 2
    clock = Clock(60 * opts.deadline_minutes, out / "reproduce.log" if out else None)
    clock.log(f"{opts.shown}: root {root}, work {work}{', DRY RUN' if ctx.dry else ''}")
    record = run_call(opts, ctx, ROWS, clock)
    record = finish(ctx, record, clock, ROWS, from_work=True)
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
