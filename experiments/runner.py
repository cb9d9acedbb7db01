"""What the experiment scripts share: running rows as ``python -m ppl_vi`` subprocesses, recording
them, and writing their JSON files and their section of ``experiments/RESULTS.md``.

A *row* is one run directory made by a list of (stage, argv) commands, e.g. ``("train", [...])``
then ``("eval", [...])``, run exactly as a user would type them (``python -m ppl_vi ARGV``) in the
repository root. Its record (a dict: commands, device, wall times, status, then the run's metrics)
is written to ``RUN/row.json`` when every stage succeeded, and collected from there.

Used by ``experiments/vae_family.py``, ``experiments/semi_supervised.py`` and
``experiments/completion.py``; each keeps its own rows, record fields, tables and targets.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
ROW_FILE = "row.json"  # written into each run directory once all its stages succeeded
#: Unix time after which no stage may run: a stage still running then is killed, a later one is not
#: started, and the row's status says so (set by experiments/reproduce.py, which has a hard deadline)
DEADLINE_ENV = "PPL_VI_DEADLINE"

#: what a record keeps of a run's config.json "environment"
ENVIRONMENT_KEYS = ("device", "device_name", "torch", "pyro", "cuda", "git_commit")

Stages = Sequence[Tuple[str, List[str]]]


# ---- names, paths, times ---------------------------------------------------------------------------


def device_name(device: str) -> str:
    """A human name for the device the runs use: the GPU's (from ``nvidia-smi``, so that asking does
    not start CUDA in this process; else from torch), or the CPU model and core count."""
    if device.startswith("cuda"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=30)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip().splitlines()[0]
        except (OSError, subprocess.TimeoutExpired):
            pass
        try:
            import torch

            if torch.cuda.is_available():
                return torch.cuda.get_device_name(0)
        except Exception:  # noqa: BLE001 - the name is informative only
            pass
        return "cuda (unavailable)"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"CPU: {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def device_kind(device) -> str:
    """"cuda" or "cpu": results are kept apart by the kind of device they ran on."""
    return "cuda" if str(device).startswith("cuda") else "cpu"


def portable(path) -> str:
    """A path relative to the repository root where it lies inside it (records travel between machines)."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def run_arg(run_dir: Path) -> str:
    """``run_dir`` as a command-line argument of a subprocess run in the repository root."""
    return os.path.relpath(run_dir, REPO) if run_dir.is_relative_to(REPO) else str(run_dir)


def rel(path: str, base: Path) -> str:
    """``path`` (absolute, or relative to the repository root) relative to ``base``: a link from RESULTS.md."""
    try:
        return os.path.relpath(REPO / path, base)
    except ValueError:
        return path


def shown(argv: List[str]) -> str:
    """The command as a user would type it (``python -m ppl_vi ...``)."""
    return "python -m ppl_vi " + " ".join(shlex.quote(a) for a in argv)


def now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def budget_args(minutes: Optional[float], epochs: Optional[int]) -> List[str]:
    """Train flags for a budget: ``--minutes M`` -> --max-minutes M and --epochs (default 100000) as a cap."""
    if minutes is not None:
        return ["--max-minutes", f"{minutes:g}", "--epochs", str(epochs or 100000)]
    if epochs is not None:
        return ["--epochs", str(epochs)]
    return []


def cuda_missing(device: str, dry_run: bool = False) -> bool:
    """True where ``device`` is CUDA but this machine has no CUDA GPU (never checked for a dry run)."""
    if not device.startswith("cuda") or dry_run:
        return False
    import torch

    return not torch.cuda.is_available()


def child_env(**extra: str) -> dict:
    """This process's environment for a child run in the repository root: the repository first on
    ``PYTHONPATH`` (so ``ppl_vi`` is this checkout's), then ``extra``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.update(extra)
    return env


def check_run_options(parser, opts) -> None:
    """The checks of the options every row-running script takes (``--parallel``, ``--minutes``,
    ``--device``): ``parser.error`` (exit status 2) on the first bad one."""
    if opts.parallel < 1:
        parser.error("--parallel must be >= 1")
    if opts.minutes is not None and opts.minutes <= 0:
        parser.error("--minutes must be > 0")
    if opts.device not in ("cpu", "cuda") and not opts.device.startswith("cuda:"):
        parser.error("--device must be cpu or cuda")


def threads_per_run(parallel: int) -> int:
    """CPU threads for each of ``parallel`` concurrent runs."""
    return max(1, (os.cpu_count() or 1) // parallel)


# ---- running a row ---------------------------------------------------------------------------------


def run_stages(name: str, stages: Stages, record: dict, out_dir: Path, threads: int) -> dict:
    """Run each (stage, argv) as ``python -m ppl_vi ARGV`` in the repository root, in order, up to
    the first failure; logs to OUT_DIR/logs/NAME.STAGE.log, ``OMP_NUM_THREADS`` = ``threads``
    unless set. Adds to ``record``: ``status`` ("ok", or "STAGE failed (exit N): " and the log's
    last lines, or "STAGE killed at the deadline ..." / "STAGE not started: ..." under
    ``$PPL_VI_DEADLINE``) and, per stage run, ``STAGE_wall_s`` and ``STAGE_log``. Returns ``record``."""
    deadline = float(os.environ[DEADLINE_ENV]) if os.environ.get(DEADLINE_ENV) else None
    env = child_env()
    env.setdefault("OMP_NUM_THREADS", str(threads))
    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    record["status"] = "ok"
    for stage, argv in stages:
        left = None if deadline is None else deadline - time.time()
        if left is not None and left <= 0:
            record["status"] = f"{stage} not started: past the deadline (${DEADLINE_ENV})"
            print(f"[{name}] {record['status']}", flush=True)
            break
        print(f"[{name}] {shown(argv)}", flush=True)
        log = logs / f"{name}.{stage}.log"
        start = time.perf_counter()
        with open(log, "w") as handle:
            try:
                rc = subprocess.run([sys.executable, "-m", "ppl_vi", *argv], cwd=REPO, env=env, stdout=handle,
                                    stderr=subprocess.STDOUT, timeout=left).returncode
            except subprocess.TimeoutExpired:  # subprocess.run has killed it
                rc = None
        record[f"{stage}_wall_s"] = round(time.perf_counter() - start, 1)
        record[f"{stage}_log"] = portable(log)
        if rc is None:
            record["status"] = f"{stage} killed at the deadline after {record[f'{stage}_wall_s']:.0f} s"
            print(f"[{name}] {record['status']}", flush=True)
            break
        if rc != 0:
            tail = log.read_text().strip().splitlines()[-3:]
            record["status"] = f"{stage} failed (exit {rc}): " + " / ".join(tail)
            print(f"[{name}] {record['status']}", flush=True)
            break
        print(f"[{name}] {stage} done in {record[f'{stage}_wall_s']:.0f} s", flush=True)
    return record


def run_row(name: str, run_dir: Path, stages: Stages, record: dict, out_dir: Path, threads: int,
            read_run: Callable[[Path], dict], dry_run: bool = False) -> dict:
    """One row: print its commands (``dry_run``), or run them (:func:`run_stages`) and, if all
    succeeded, add ``read_run(run_dir)`` to the record and write it to RUN/row.json. A stale
    row.json is removed first, so it never outlives a failed re-run. Returns the record."""
    if dry_run:
        print("\n".join(f"[{name}] {shown(argv)}" for _, argv in stages), flush=True)
        return record
    (run_dir / ROW_FILE).unlink(missing_ok=True)
    run_stages(name, stages, record, out_dir, threads)
    if record["status"] == "ok":
        record.update(read_run(run_dir))
        (run_dir / ROW_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def read_run(run_dir: Path, keep: Sequence[str]) -> dict:
    """From a run directory: the metrics named in ``keep`` (those present), the environment it ran
    in, its config and its figures."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    out = {k: metrics[k] for k in keep if k in metrics}
    out["environment"] = {k: config.get("environment", {}).get(k) for k in ENVIRONMENT_KEYS}
    out["config"] = config.get("config", {})
    out["figures"] = sorted(portable(p) for p in (run_dir / "figures").glob("*.png"))
    return out


def collect(out_dir: Path, pattern: str, read_run: Callable[[Path], dict]) -> List[dict]:
    """Records of the finished runs ``out_dir/PATTERN/row.json``, refreshed with ``read_run``."""
    records = []
    for row in sorted(out_dir.glob(f"{pattern}/{ROW_FILE}")):
        record = json.loads(row.read_text())
        record.update(read_run(row.parent))
        record["run_dir"] = portable(row.parent)
        records.append(record)
    return records


# ---- results files ---------------------------------------------------------------------------------


def record_key(record: dict) -> str:
    """Rows are kept per (smoke|full, cpu|cuda, run): a smoke test never replaces a result."""
    return f"{record['mode']}/{device_kind(record.get('device', ''))}/{record['run']}"


def load_json(path: Path, about: str) -> dict:
    """A results file, or an empty one (``{"about": about, "rows": {}}``) where there is none yet."""
    if Path(path).is_file():
        return json.loads(Path(path).read_text())
    return {"about": about, "rows": {}}


def save_rows(path: Path, about: str, rows: Dict[str, dict]) -> dict:
    """Add ``rows`` (key -> record) to the results file ``path``, stamp it and write it; returns it."""
    results = load_json(path, about)
    results["rows"].update(rows)
    results["updated"] = now()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=2) + "\n")
    return results


def write_section(path: Path, heading: str, text: str) -> None:
    """Replace (or append) the section of RESULTS.md that starts at the line ``heading`` with
    ``text``; every other section is kept as is."""
    path = Path(path)
    if not path.is_file():
        path.write_text("# Results\n\nOne section per experiment; each says how its figures were produced.\n\n" + text)
        return
    lines = path.read_text().splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == heading), None)
    if start is None:
        path.write_text("".join(lines).rstrip("\n") + "\n\n" + text)
        return
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    rest = "".join(lines[end:])
    path.write_text("".join(lines[:start]) + text + ("\n" + rest if rest else ""))
