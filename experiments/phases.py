"""The GPU call's time plan and its three running phases, each against the call's deadline.

1. **probe** (``experiments/probe.py``): how many training runs the device sustains at once; that,
   and whether waves would give each run more steps than all at once, sizes each row's ``--parallel``;
2. **alone** rows, one after another with nothing else on the device (timings);
3. **shared** rows, all at once, each training for ``--minutes`` or what the deadline leaves after
   every wave's start-up and evaluation and the writing.

Each phase adds to the call's record (a dict that becomes ``reproduce.json``): its rows' records and
its entry in ``record["phases"]``.
"""

from __future__ import annotations

import math
import os
from typing import Dict, List

import probe as throughput  # the concurrency probe
import runner  # device names, the time stamp
from collection import source_digest, versions
from harness import DRY, GPU, Budget, Clock, Ctx, Row, fmt_clock, launch, wait_rows


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


# ---- the phases -------------------------------------------------------------------------------------


def start_record(opts, ctx: Ctx, rows: List[Row], clock: Clock, budget: Budget) -> dict:
    """The call's record before anything runs: command, device, versions, source digest and the plan."""
    record = {"command": opts.shown, "device": ctx.device, "device_name": runner.device_name(ctx.device),
              "dry_run": ctx.dry, "tag": ctx.tag, "prefix": ctx.prefix, "started": runner.now(),
              "minutes": opts.minutes, "deadline_s": clock.deadline_s, "versions": versions(),
              "source_digest": source_digest(), "cpu": runner.device_name("cpu"), "phases": [], "rows": []}
    total_runs = sum(r.runs for r in rows if r.phase == "shared")
    alone_s = sum(r.seconds * (2 if ctx.dry else 1) for r in rows if r.phase == "alone")
    expected = (budget.probe_expected + alone_s + budget.row_start_s + 60 * (opts.minutes or 0) + budget.eval_s
                + budget.write_s)
    record["plan"] = {"probe_s": budget.probe_s, "alone_s": alone_s, "row_start_s": budget.row_start_s,
                      "train_s": 60 * (opts.minutes or 0), "eval_s": budget.eval_s, "write_s": budget.write_s,
                      "expected_end_s": round(expected)}
    clock.log(f"{record['device_name']}; {len(rows)} rows ({total_runs} training runs in the shared phase); plan: "
              f"probe <= {budget.probe_s:.0f} s, alone rows <= {alone_s:.0f} s, shared rows {budget.row_start_s:.0f} s "
              f"start-up + {opts.minutes or 0:g} min training + {budget.eval_s:.0f} s evaluation, writing "
              f"{budget.write_s:.0f} s; deadline {fmt_clock(clock.deadline_s)}")
    return record


def probe_phase(opts, ctx: Ctx, shared: List[Row], clock: Clock, budget: Budget, record: dict) -> int:
    """Size ``ctx.parallel`` (per row) and ``ctx.threads``: by ``--parallel``, or the probe; returns the waves."""
    t0 = clock.now()
    runs = {r.name: r.runs for r in shared if r.runs}
    total_runs = sum(runs.values())
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
        left = clock.left() - record["plan"]["alone_s"]  # what the shared phase will have after the alone rows
        parallel, why = decide_parallel(record["probe"], runs, opts.minutes, left, budget)
        record["probe"]["sustained"] = throughput.sustained(record["probe"])
    record["probe"]["parallel"], record["probe"]["why"] = parallel, why
    ctx.parallel, waves = allocate(parallel, runs)
    ctx.threads = max(1, (os.cpu_count() or 1) // max(1, min(parallel, total_runs)))
    record["probe"]["allocation"], record["probe"]["waves"] = ctx.parallel, waves
    record["phases"].append({"phase": "probe", "start_s": round(t0, 1), "wall_s": round(clock.now() - t0, 1)})
    clock.log(f"parallel: {why}; per row {ctx.parallel}, {waves} wave(s)")
    return waves


def skipped(row: Row, status: str = "skipped") -> dict:
    return {"name": row.name, "what": row.what, "phase": row.phase, "status": status}


def alone_phase(opts, ctx: Ctx, rows: List[Row], clock: Clock, budget: Budget, record: dict) -> None:
    """The alone rows one after another, each stopped at its own cap or where the shared rows need the rest."""
    shared = any(r.phase == "shared" for r in rows)
    for row in (r for r in rows if r.phase == "alone"):
        if row.name in opts.skip:
            record["rows"].append(skipped(row))
            continue
        t = clock.now()
        cap = row.seconds * (2 if ctx.dry else 1)
        reserve = budget.row_start_s + budget.min_train_s + budget.eval_s + budget.write_s if shared else budget.write_s
        end = min(t + cap, clock.deadline_s - reserve)
        if end - t < 5:
            record["rows"].append(skipped(row, "not started: no time left before the shared rows"))
            continue
        record["rows"] += wait_rows([launch(row, ctx, clock, end, end, None)], ctx, clock, budget.heartbeat_s)
        record["phases"].append({"phase": row.name, "start_s": round(t, 1), "wall_s": round(clock.now() - t, 1)})


def shared_phase(opts, ctx: Ctx, shared: List[Row], clock: Clock, budget: Budget, record: dict, waves: int) -> None:
    """The shared rows all at once: the training minutes each gets (``ctx.minutes``), then run and wait."""
    t = clock.now()
    ctx.minutes = train_seconds(opts.minutes or 0, clock.left(), budget, waves) / 60  # per run (per wave)
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
            record["rows"].append(skipped(row))
            continue
        grace = budget.write_s / 2 if row.collect else 0  # runner-based scripts stop their own stages first
        started.append(launch(row, ctx, clock, stage_deadline, stage_deadline + grace, ctx.threads))
    record["rows"] += wait_rows(started, ctx, clock, budget.heartbeat_s)
    record["phases"].append({"phase": "shared rows", "start_s": round(t, 1), "wall_s": round(clock.now() - t, 1)})


def run_call(opts, ctx: Ctx, rows: List[Row], clock: Clock) -> dict:
    """The three phases of a call; returns its record (the rows' records, the probe, the phases)."""
    budget = DRY if ctx.dry else GPU
    shared = [r for r in rows if r.phase == "shared"]
    record = start_record(opts, ctx, rows, clock, budget)
    waves = probe_phase(opts, ctx, shared, clock, budget, record)
    alone_phase(opts, ctx, rows, clock, budget, record)
    shared_phase(opts, ctx, shared, clock, budget, record, waves)
    return record
