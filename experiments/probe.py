"""How many training runs can share one device before each run slows down? A short probe.

``N`` worker processes (the largest level asked for) each build the same training run a row
would (``ppl_vi.training.Trainer``: VAE z=50, 784-500-500, batch 128, the fast path, so a CUDA graph
on CUDA), take a few warm-up steps (the graph is captured there) and wait. Then, level by level
(1, 2, 4, 8, ... concurrent runs), the first ``L`` workers are told at the same moment to train
for ``window`` seconds; each answers with the steps it took (synchronised with the device every
``CHUNK`` steps, so a step counts only once the device has done it). Per-run steps/s at each
level, against the solo rate, say how many concurrent runs the device sustains; the aggregate
(L × per-run) says whether sharing loses total throughput.

Workers start once and are reused by every level, so start-up (imports, data, CUDA context,
capture) is paid once: the whole probe is start-up + levels × window.

The worker is ``experiments/probe_worker.py`` (torch is imported there, not here): it reads one
JSON command per line on stdin (``{"run": SECONDS}`` or ``{"quit": true}``) and answers one JSON
line on stdout (``{"ready": ..., "mode": ...}`` once, then ``{"steps": N, "seconds": S}`` per run).
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import runner  # child environments, threads per run
from runner import REPO

WORKER = Path(__file__).resolve().parent / "probe_worker.py"
CHUNK = 20  # steps between device synchronisations in a timed window (probe_worker.CHUNK)
SUSTAIN = 0.8  # a level is "sustained" while each run keeps >= 80 % of the solo steps/s
FLAT = 0.9  # sharing "costs nothing" while the aggregate stays >= 90 % of the best aggregate


# ---- the coordinator ----------------------------------------------------------------------------


class _Worker:
    def __init__(self, index: int, argv: List[str], env: dict, log: Path):
        self.index, self.lines = index, queue.Queue()
        self.log = open(log, "w")
        self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)  # end of output: the worker exited

    def send(self, command: dict) -> None:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()

    def answer(self, until: float) -> dict:
        """The worker's next JSON line, or raise TimeoutError / RuntimeError (it exited)."""
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, until - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"worker {self.index} did not answer in time") from None
            if line is None:
                raise RuntimeError(f"worker {self.index} exited (exit {self.proc.wait()}): {self.tail()}")
            if line.startswith("{"):
                return json.loads(line)

    def tail(self) -> str:
        self.log.flush()
        lines = Path(self.log.name).read_text(errors="replace").strip().splitlines()
        return " / ".join(lines[-2:]) if lines else "no output"

    def stop(self) -> None:
        try:
            if self.proc.poll() is None:
                self.send({"quit": True})
                self.proc.wait(timeout=5)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def run_probe(levels: Sequence[int], device: str, window: float, deadline: float, log_dir: Path,
              log: Callable[[str], None] = print, train_subset: int = 0, hidden: Sequence[int] = (500, 500),
              python: str = sys.executable) -> dict:
    """Probe ``levels`` concurrent runs (time.monotonic() ``deadline`` for all of it); returns a dict
    with one entry per level measured, and ``status`` ("ok", or what went wrong)."""
    levels = sorted(set(int(v) for v in levels))
    n = levels[-1]
    log_dir.mkdir(parents=True, exist_ok=True)
    env = runner.child_env(OMP_NUM_THREADS=str(runner.threads_per_run(n)))
    argv = [python, str(WORKER), "--device", device, "--train-subset",
            str(train_subset), "--hidden", ",".join(map(str, hidden))]
    result = {"device": device, "window_s": window, "levels": [], "status": "ok", "model": "vae z=50, batch 128",
              "hidden": list(hidden), "chunk": CHUNK}
    started = time.monotonic()
    workers = [_Worker(i, argv + ["--seed", str(i)], env, log_dir / f"probe-worker{i}.log") for i in range(n)]
    try:
        log(f"probe: starting {n} worker(s) on {device}")
        modes = [w.answer(deadline) for w in workers]
        result["startup_s"] = round(time.monotonic() - started, 1)
        result["mode"] = sorted({m.get("mode", "?") for m in modes})
        log(f"probe: {n} worker(s) ready in {result['startup_s']:.0f} s ({'; '.join(result['mode'])})")
        for level in levels:
            if time.monotonic() + window + 5 > deadline:
                result["status"] = f"stopped before level {level}: the probe's deadline"
                break
            for w in workers[:level]:
                w.send({"run": window})
            answers = [w.answer(deadline) for w in workers[:level]]
            rates = [a["steps"] / a["seconds"] for a in answers]
            entry = {"level": level, "steps_per_s": [round(r, 2) for r in rates],
                     "per_run": round(statistics.mean(rates), 2), "min_run": round(min(rates), 2),
                     "aggregate": round(sum(rates), 2)}
            result["levels"].append(entry)
            log(f"probe: {level:>2} at once: {entry['per_run']:.1f} steps/s per run (min {entry['min_run']:.1f}), "
                f"{entry['aggregate']:.1f} in all")
    except (TimeoutError, RuntimeError, OSError, ValueError) as exc:
        result["status"] = f"failed: {exc}"
        log(f"probe: {result['status']}")
    finally:
        for w in workers:
            w.stop()
    result["wall_s"] = round(time.monotonic() - started, 1)
    return result


def sustained(result: dict, tolerance: float = SUSTAIN) -> Optional[int]:
    """The largest level whose mean per-run steps/s is >= ``tolerance`` × the solo rate (None without
    a solo measurement)."""
    levels = {e["level"]: e for e in result.get("levels", [])}
    if 1 not in levels or levels[1]["per_run"] <= 0:
        return None
    solo = levels[1]["per_run"]
    return max(level for level, e in levels.items() if e["per_run"] >= tolerance * solo)


def choose_parallel(result: dict, runs: int, flat: float = FLAT) -> tuple:
    """(concurrent runs, why) for ``runs`` training runs sharing one device for a fixed window.

    In a fixed window every run trains until the window closes, so running them all at once loses
    nothing as long as the device's total throughput does not fall with sharing (each run then
    gets its share of the same total), and it overlaps every run's start-up and evaluation. So: all
    at once when the aggregate at the largest level measured is >= ``flat`` × the best aggregate;
    else the level with the best aggregate (the rows then run in waves, the window split between
    them). Without a usable probe: all at once, said in ``why``.
    """
    levels = result.get("levels", [])
    if not levels or sustained(result) is None:
        return runs, f"no usable probe ({result.get('status', 'not run')}): all {runs} runs at once"
    best = max(levels, key=lambda e: e["aggregate"])
    last = levels[-1]
    knee = sustained(result)
    if last["aggregate"] >= flat * best["aggregate"]:
        return runs, (f"per-run throughput holds (>= {SUSTAIN:.0%} of solo) up to {knee} at once; the aggregate at "
                      f"{last['level']} at once is {last['aggregate'] / best['aggregate']:.0%} of the best "
                      f"({best['aggregate']:.0f} steps/s at {best['level']}): sharing loses no total throughput, "
                      f"so all {runs} runs at once")
    return min(runs, best["level"]), (f"per-run throughput holds up to {knee} at once; the aggregate falls from "
                                      f"{best['aggregate']:.0f} steps/s at {best['level']} to "
                                      f"{last['aggregate']:.0f} at {last['level']}: {min(runs, best['level'])} "
                                      "at once, in waves")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--train-subset", type=int, default=0, help="first N training images (0: all; else >= 128)")
    p.add_argument("--hidden", default="500,500")
    p.add_argument("--levels", default="1,2,4,8", help="concurrent runs to measure")
    p.add_argument("--window", type=float, default=3.0, help="seconds per level")
    p.add_argument("--log-dir", default="/tmp/ppl_vi_probe")
    args = p.parse_args(argv)
    try:
        hidden = [int(h) for h in args.hidden.split(",")]
        levels = [int(v) for v in args.levels.split(",")]
    except ValueError:
        p.error("--hidden and --levels must be comma-separated integers")
    if min(levels) < 1 or args.window <= 0:
        p.error("--levels must be >= 1 and --window > 0")
    result = run_probe(levels, args.device, args.window, time.monotonic() + 600, Path(args.log_dir),
                       train_subset=args.train_subset, hidden=hidden)
    print(json.dumps(result, indent=2))
    return 0 if result["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
