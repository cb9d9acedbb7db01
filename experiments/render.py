"""The GPU call's sections of the RESULTS files, rendered from its record (``reproduce.json``):
"GPU figures owed" (the one command to run, and what is still owed) and "GPU run" (targets, the
concurrency probe, phases and rows) in ``experiments/RESULTS.md``, and "GPU" (svi_speed's table) in
``benchmarks/RESULTS.md``. Every other section of those files is kept as is.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

import probe as throughput  # the probe's threshold for "sustained"
import runner  # write_section
from collection import load_bench, source_digest
from harness import DEADLINE_EXTRA, GPU, Ctx, Row
from phases import probe_levels
from targets import IWAE5000, STEP

RUN_SECTION = "## GPU run: every figure in one call (issue 15)"
OWED_SECTION = "## GPU figures owed"
BENCH_SECTION = "## GPU"
LEGACY_BENCH_SECTION = "## H100 (owed)"  # replaced by BENCH_SECTION the first time it is written
# what the GPU image lacks of our dependencies (its torch, matplotlib, tqdm, filelock and psutil serve);
# without pydantic the call stops at its first import
GPU_WHEELS = ("pyro-ppl==1.9.2 pyro-api==0.1.2 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 "
              "typing-inspection==0.4.5 typing_extensions==4.16.0")


def owed_command(rows: Sequence[Row]) -> List[str]:
    """THE single owed command, as RESULTS.md shows it."""
    runs = sum(r.runs for r in rows if r.phase == "shared")
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
        f"{GPU.probe_window:g} s each); {', '.join(f'{r.name} alone ≤ {r.seconds:.0f} s' for r in rows if r.phase == 'alone')}; "
        f"then all {runs} training runs and the CUDA tests at once: ≤ {GPU.row_start_s:.0f} s start-up, training "
        f"for 6 minutes or what the deadline leaves (about 5.2 at the expected phase times; the record says what "
        f"each run got), "
        f"≤ {GPU.eval_s:.0f} s evaluation; writing ≤ {GPU.write_s:.0f} s. A row still running at its deadline is "
        "killed and reported as killed.",
    ]


def render(ctx: Ctx, record: Optional[dict], rows: Sequence[Row]) -> None:
    md = ctx.file("experiments/RESULTS.md")
    runner.write_section(md, OWED_SECTION, owed_section(record, rows))
    runner.write_section(md, RUN_SECTION, run_section(ctx, record))
    write_bench_section(ctx.file("benchmarks/RESULTS.md"), bench_section(ctx, record))


def owed_section(record: Optional[dict], rows: Sequence[Row]) -> str:
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
    return "\n".join([OWED_SECTION, "", status, "", *owed_command(rows)]) + "\n"


def cell(text) -> str:
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
        out.append(f"| {t['text']} | **{t['status']}** | {cell(t.get('measured'))} | {cell(t.get('miss'))} "
                   f"| {cell(t.get('why'))} |")
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
        out.append(f"| {r['name']} | **{cell(r.get('status'))}**{extra} | {r.get('wall_s', 0):.0f} s | "
                   f"`{cell(r.get('command'))}` |")
    if record.get("train_minutes") is not None:
        out += ["", f"Training minutes per shared run: {record['train_minutes']:g}."]
    return "\n".join(out) + "\n"


BENCH_OWED = [
    "**Owed: no GPU call has run yet**, so none of the CUDA figures exist:",
    "* the CUDA-graph variants: `graph` (the floor), and `ppl_vi` in `cuda-graph` mode;",
    "* the CUDA timings of `hand`, `pyro` and `ppl_vi-off`;",
    "* IWAE-5000 over the full 10,000-image test set;",
    "* the two CUDA-only tests in `tests/test_fast_path.py` (skipped without CUDA).",
    "",
    "They come from the single call in `experiments/RESULTS.md`, section \"GPU figures owed\", which",
    "runs `benchmarks/svi_speed.py` alone on the GPU (before the training rows) and the CUDA tests.", ""]
CUDA_GRAPH_NOTE = [
    "What the `ppl_vi` row does on CUDA, when the guide is reparameterised, the loss is `trace` or",
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


def bench_section(ctx: Ctx, record: Optional[dict]) -> str:
    """svi_speed's table from the call (or what is owed), its two targets, and what the fast path does."""
    bench = load_bench(ctx) if record else None
    body = BENCH_OWED if record is None or bench is None else bench_measured(record, bench)
    return "\n".join([BENCH_SECTION, "", *body, *CUDA_GRAPH_NOTE]) + "\n"


def bench_measured(record: dict, bench: dict) -> List[str]:
    out = []
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
                   f"{cell(r.get('note'))} ({r['n']}×{r['windows']} steps) |")
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
        if t["id"] in (STEP.id, IWAE5000.id):
            out.append(f"| {t['text']} | **{t['status']}** | {cell(t.get('measured'))} | {cell(t.get('miss'))} |")
    return out + [""]


def write_bench_section(path: Path, text: str) -> None:
    """Replace "## GPU" (or, the first time, "## H100 (owed)") in benchmarks/RESULTS.md."""
    if path.is_file() and BENCH_SECTION not in path.read_text().splitlines() and \
            LEGACY_BENCH_SECTION in path.read_text().splitlines():
        runner.write_section(path, LEGACY_BENCH_SECTION, text)
    else:
        runner.write_section(path, BENCH_SECTION, text)
