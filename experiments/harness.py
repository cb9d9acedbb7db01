"""Processes against deadlines, for the single GPU call (``experiments/reproduce.py``).

A call is a list of :class:`Row` s (a command each, run as ``python ARGV`` in the repository root,
in its own process group) under one :class:`Clock` (seconds since the call began, its deadline,
its log). :func:`launch` starts a row with two deadlines: the one its stages see (``$PPL_VI_DEADLINE``,
read by ``runner.run_stages``: a stage still running then is killed, a later one not started) and
the one at which :func:`wait_rows` kills its whole process group. :class:`Budget` holds the seconds
each phase of a call may take (``GPU``, or ``DRY`` for a dry run).
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import runner  # device kinds, the per-stage deadline variable
from runner import REPO

RECORD = "reproduce.json"  # the call's record, in its results folder
#: minutes of the call's deadline beyond --minutes (8.75 for 6: the call may take 9 with its install)
DEADLINE_EXTRA = 2.75


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
    """A row's environment: its stages' deadline (Unix time), unbuffered output, ``threads`` CPU threads."""
    env = runner.child_env(**{runner.DEADLINE_ENV: f"{kill_at_unix:.1f}", "PYTHONUNBUFFERED": "1"})
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
