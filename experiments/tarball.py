"""The GPU call's results as one tarball, and back: :func:`pack` writes ``ppl_vi_gpu.tar.gz`` of
``experiments/results/TAG/`` (under the device tool's size limit for a returned file); :func:`unpack`
extracts one into a results root, refusing anything outside one ``experiments/results/TAG/`` folder.
"""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

from harness import RECORD, Clock, Ctx

TARBALL = "ppl_vi_gpu.tar.gz"


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
