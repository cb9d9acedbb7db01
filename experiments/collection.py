"""What the GPU call leaves behind, gathered: copies of its runs, each script's rows re-collected
from those copies, the CUDA tests' JUnit counts, the source digest and versions, and the targets
judged on this call's rows (``targets.judge_gpu``).

Rows of a script's results JSON are keyed ``mode/device kind/run``; "this call's" rows are those
under the call's prefix that started (or finished) at or after the call began.
"""

from __future__ import annotations

import datetime
import glob
import hashlib
import json
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from importlib import metadata
from pathlib import Path
from typing import Dict, List, Optional

import runner  # results files, portable paths
import targets
from harness import Clock, Ctx, Row, row_env
from runner import REPO

SOURCES = ("ppl_vi/**/*.py", "experiments/*.py", "benchmarks/*.py", "tests/*.py", "pyproject.toml")
COPY_IGNORE = shutil.ignore_patterns("checkpoints", "*.pt", "report.html", "tensorboard")
LOG_TAIL = 200_000  # bytes kept of each log in the results copy


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
        output = (proc.stderr or proc.stdout).strip()[-300:]
        status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}: {output}"
        out.append({"name": row.name, "status": status})
        (clock.log if clock else print)(f"collect {row.name}: {status}")
    return out


def load_bench(ctx: Ctx) -> Optional[dict]:
    """svi_speed's results (``svi_speed.json`` in the call's results folder), or None."""
    path = ctx.results / "svi_speed.json"
    return json.loads(path.read_text()) if path.is_file() else None


def call_rows(ctx: Ctx, name: str, record: dict) -> Dict[str, dict]:
    """This call's rows of one results JSON (older rows, and other calls', left out)."""
    return this_call(runner.load_json(ctx.file(f"experiments/{name}"), "").get("rows", {}), ctx.prefix,
                     record.get("started"))


def judge_targets(ctx: Ctx, record: dict) -> List[dict]:
    """The GPU targets (``targets.GPU_TARGETS``) judged on this call's results."""
    return targets.judge_gpu({
        "bench": load_bench(ctx), "prefix": ctx.prefix,
        "sharing": sum((record.get("probe") or {}).get("allocation", {}).values()),
        "vae_family": call_rows(ctx, "vae_family.json", record),
        "semi_supervised": list(call_rows(ctx, "semi_supervised.json", record).values()),
        "completion": call_rows(ctx, "completion.json", record)})
