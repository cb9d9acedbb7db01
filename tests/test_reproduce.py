"""experiments/reproduce.py and its harness: every GPU figure in one call.

The dry run (``--device cpu --dry-run``) runs the whole pipeline for real with tiny budgets into a
temporary root, then the tarball it packs is collected into another; the rest checks the decisions
(concurrency, allocation, training budget, targets) on numbers worked out by hand, and the deadline.
"""

import hashlib
import io
import json
import math
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
import collection  # noqa: E402
import harness  # noqa: E402
import phases  # noqa: E402
import probe  # noqa: E402
import render  # noqa: E402
import reproduce  # noqa: E402
import runner  # noqa: E402
import semi_supervised  # noqa: E402
import stats  # noqa: E402
import targets  # noqa: E402
import tarball  # noqa: E402
import vae_family  # noqa: E402

SCRIPT = REPO / "experiments" / "reproduce.py"


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.setdefault("PPL_VI_DATA", str(REPO.parent / "shared" / "data"))
    return env


def _digest(paths):
    return {p: hashlib.sha256((REPO / p).read_bytes()).hexdigest() for p in paths if (REPO / p).is_file()}


# ---- the dry run, end to end ----------------------------------------------------------------------------


def test_dry_run_runs_every_phase_and_collects(tmp_path):
    before = _digest(reproduce.RESULT_FILES)
    results_before = sorted(p.name for p in (REPO / "experiments" / "results").iterdir())
    root, out = tmp_path / "call", tmp_path / "out"
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--dry-run", "--root", str(root),
                           "--out", str(out), "--deadline-minutes", "5"], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=330)
    wall = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((root / "experiments" / "results" / "dry-run" / harness.RECORD).read_text())
    assert record["dry_run"] and record["device"] == "cpu" and record["wall_s"] < 300
    # every row ran and ended ok; the phases are in order
    rows = {r["name"]: r for r in record["rows"]}
    assert set(rows) == {r.name for r in reproduce.ROWS}
    assert all(r["status"] == "ok" for r in rows.values()), {k: r["status"] for k, r in rows.items()}
    assert [p["phase"] for p in record["phases"]] == ["probe", "svi_speed", "shared rows", "writing"]
    # the probe measured 1 and 2 concurrent runs, each at a positive rate, and chose from them
    levels = record["probe"]["levels"]
    assert [e["level"] for e in levels] == [1, 2] and all(e["per_run"] > 0 for e in levels)
    assert abs(levels[1]["aggregate"] - sum(levels[1]["steps_per_s"])) < 0.05
    assert record["probe"]["parallel"] >= 1 and record["probe"]["why"]
    # the CUDA tests were found by the glob, not deselected to nothing: skipped without a GPU, run with one
    tests = rows["cuda_tests"]
    assert tests["collected"] >= 4 and tests["failed"] == 0 and tests["error"] == 0
    if torch.cuda.is_available():
        assert tests["passed"] == tests["collected"], tests
    else:
        assert tests["skipped"] == tests["collected"], tests
    assert "tests/test_fast_path.py" in tests["files"]
    # svi_speed's rows came back through its JSON
    bench = json.loads((root / "experiments" / "results" / "dry-run" / "svi_speed.json").read_text())
    assert {r["variant"] for r in bench["rows"]} == {"hand", "pyro", "ppl_vi"} and bench["eval"]["n"] == 8
    # each quality script's row is in its results JSON (this call's, smoke, on the cpu) with copies
    vae = json.loads((root / "experiments" / "vae_family.json").read_text())["rows"]["smoke/cpu/vae"]
    assert vae["status"] == "ok" and "results/dry-run/runs/smoke-vae" in vae["run_dir"]
    assert (root / "experiments" / "results" / "dry-run" / "runs" / "smoke-vae" / "metrics.json").is_file()
    assert not list((root / "experiments" / "results").rglob("*.pt"))
    judged = {t["id"]: t for t in record["targets"]}
    smoke = record['script_rows']['semi_supervised.json']['smoke/cpu/smoke-ssvae-l100-s0']
    gain = 100 * (smoke['test_accuracy'] - smoke['baseline_test_accuracy'])
    assert judged["ssvae-gain"]["measured"].startswith(f"{gain:+.2f}") and judged["ssvae-gain"]["status"] == "owed"
    assert judged["ssvae"]["status"] == "owed"  # the dry run trains no M1+M2 (tests/test_models_m1m2.py does)
    assert judged["step"]["status"] == "owed"  # no CUDA graph on a CPU
    # the sections were written into the root's copies, and the owed command is the one to run
    md = (root / "experiments" / "RESULTS.md").read_text()
    assert render.RUN_SECTION in md and render.OWED_SECTION in md and "DRY RUN" in md
    assert "python3 experiments/reproduce.py --device cuda --minutes 6 --out $OUT" in md
    bench_md = (root / "benchmarks" / "RESULTS.md").read_text()
    assert "\n## GPU\n" in bench_md and render.LEGACY_BENCH_SECTION not in bench_md
    # one tarball, only experiments/results/dry-run/, no checkpoints
    with tarfile.open(out / tarball.TARBALL) as tar:
        names = tar.getnames()
    assert names and all(n.startswith("experiments/results/dry-run") for n in names)
    assert not any("checkpoints" in n or n.endswith(".pt") for n in names)
    assert (out / "reproduce.log").read_text().count("[reproduce ") >= 10
    # --collect into a second root re-renders the same sections from the tarball alone
    second = tmp_path / "collected"
    got = subprocess.run([sys.executable, str(SCRIPT), "--collect", str(out / tarball.TARBALL), "--root", str(second)],
                         cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert got.returncode == 0, got.stderr
    again = json.loads((second / "experiments" / "vae_family.json").read_text())["rows"]["smoke/cpu/vae"]
    assert again["test_nelbo"] == vae["test_nelbo"] and str(second) in again["run_dir"]
    collected_md = (second / "experiments" / "RESULTS.md").read_text()
    assert "DRY RUN" in collected_md and record["source_digest"] in collected_md
    # and nothing in the repository changed
    assert _digest(reproduce.RESULT_FILES) == before
    assert sorted(p.name for p in (REPO / "experiments" / "results").iterdir()) == results_before
    print(f"dry run: {wall:.0f} s")


# ---- decisions, on numbers worked out by hand -------------------------------------------------------------


def _probe(per_run):
    return {"levels": [{"level": lv, "per_run": r, "min_run": r, "aggregate": lv * r} for lv, r in per_run.items()],
            "status": "ok"}


def test_all_runs_at_once_when_sharing_keeps_the_total():
    result = _probe({1: 100.0, 2: 50.0, 4: 25.0, 8: 12.5, 13: 100 / 13})  # time-sliced: the total stays 100
    assert probe.sustained(result) == 1
    parallel, why = probe.choose_parallel(result, runs=13)
    assert parallel == 13 and "all 13 runs at once" in why


def test_parallel_capped_where_the_total_falls():
    result = _probe({1: 100.0, 2: 90.0, 4: 60.0, 8: 20.0})  # totals 100, 180, 240, 160
    assert probe.sustained(result) == 2  # 90 >= 0.8 * 100 > 60
    parallel, why = probe.choose_parallel(result, runs=13)
    assert parallel == 4 and "240" in why and "160" in why


def test_no_probe_means_all_at_once_and_says_so():
    parallel, why = probe.choose_parallel({"levels": [], "status": "failed: worker 0 exited"}, runs=13)
    assert parallel == 13 and "failed: worker 0 exited" in why


def test_allocation_and_waves():
    runs = {"vae_family": 9, "semi_supervised": 3, "completion": 1}
    assert phases.allocate(13, runs) == (runs, 1)
    assert phases.allocate(20, runs) == (runs, 1)
    # 4 slots: 9*4//13 = 2, 3*4//13 = 0 -> 1, 1*4//13 = 0 -> 1; waves = max(ceil(9/2), 3, 1) = 5
    assert phases.allocate(4, runs) == ({"vae_family": 2, "semi_supervised": 1, "completion": 1}, 5)


def test_training_budget_is_cut_to_the_deadline():
    gpu = harness.GPU
    assert (gpu.write_s, gpu.row_start_s, gpu.eval_s, gpu.min_train_s) == (20, 25, 75, 30)
    assert phases.train_seconds(6, 600, gpu, 1) == 360  # room 480 s: the full 6 minutes
    assert phases.train_seconds(6, 420, gpu, 1) == 300  # 420 - 20 - 100
    assert phases.train_seconds(6, 600, gpu, 2) == 190  # two waves: (600 - 20 - 200) / 2 each
    assert phases.train_seconds(6, 100, gpu, 1) == 30  # never below min_train_s


def test_waves_only_where_they_give_each_run_more_steps():
    runs = {"vae_family": 9, "semi_supervised": 3, "completion": 1}
    # totals 100, 180, 240, 160, 130: the probe alone would say 4 at once, in 5 waves
    result = _probe({1: 100.0, 2: 90.0, 4: 60.0, 8: 20.0, 13: 10.0})
    assert probe.choose_parallel(result, 13)[0] == 4
    # 400 s left: waves get max(30, (400 - 20 - 5 * 100) / 5) = 30 s each, 60 * 30 = 1800 steps;
    # all at once 400 - 20 - 100 = 280 s, 10 * 280 = 2800 steps: all at once wins
    parallel, why = phases.decide_parallel(result, runs, 6, 400, harness.GPU)
    assert parallel == 13 and "~1800 against ~2800 steps" in why
    # 3000 s left: 360 s either way, 60 * 360 = 21600 steps in waves against 3600: waves
    assert phases.decide_parallel(result, runs, 6, 3000, harness.GPU)[0] == 4


def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_targets_measured_and_missed_by(tmp_path):
    ctx = harness.Ctx(device="cuda", dry=False, root=tmp_path, work=tmp_path)
    started = "2026-01-01T10:00:00+00:00"
    rows = [{"batch": 128, "k": 1, "variant": v, "ms": ms, "note": "cuda-graph" if v == "ppl_vi" else ""}
            for v, ms in (("hand", 2.0), ("graph", 0.30), ("ppl_vi", 0.50))]
    rows += [{"batch": 1024, "k": 50, "variant": v, "ms": ms, "note": ""} for v, ms in (("graph", 10.0), ("ppl_vi", 12.0))]
    _write(ctx.results / "svi_speed.json", {"rows": rows, "eval": {
        "k": 5000, "n": 10000, "n_test": 10000, "ppl_vi_s": 6.0, "hand_s": 4.0, "ppl_vi_nll": 90.0, "hand_nll": 90.01,
        "agree": True}})
    run = lambda name, **kw: dict(run=name, status="ok", started="2026-01-01T10:01:00+00:00", epochs_done=100,  # noqa: E731
                                  train_seconds=300, **kw)
    _write(tmp_path / "experiments" / "vae_family.json", {"rows": {
        "full/cuda/vae": run("vae", test_iwae={"5000": 88.5}, test_iwae_se={"5000": 0.3}),
        "full/cuda/iwae50": run("iwae50", test_iwae={"5000": 84.0}, test_iwae_se={"5000": 0.3}),
        "full/cuda/gmvae": run("gmvae", test_nelbo=99.0, test_iwae={"1000": 95.0}),
        "full/cuda/vae_z10": run("vae_z10", test_nelbo=98.0, test_iwae={"1000": 96.0}),
        "full/cuda/beta2": dict(run("beta2"), started="2025-12-31T10:00:00+00:00"),  # an older call's row
    }})
    _write(tmp_path / "experiments" / "semi_supervised.json", {"rows": {
        f"full/cuda/ssvae-l100-s{s}": run(f"ssvae-l100-s{s}", seed=s, test_accuracy=a, baseline_test_accuracy=0.85)
        for s, a in enumerate((0.90, 0.92, 0.94))} | {
        f"full/cuda/m1m2-l100-s{s}": run(f"m1m2-l100-s{s}", seed=s, test_accuracy=a, baseline_test_accuracy=0.5)
        for s, a in enumerate((0.90, 0.92, 0.94))} | {
        "full/cuda/m1m2-l100-s7": dict(run("m1m2-l100-s7", seed=7, test_accuracy=0.10),
                                       started="2025-12-31T10:00:00+00:00")}})
    judged = {t["id"]: t for t in collection.judge_targets(ctx, {"started": started, "probe": {"allocation": {"a": 13}}})}
    # 0.50 / 0.30 = 1.667 > 1.5: missed by 0.17x (+11.1 %)
    assert judged["step"]["status"] == "NOT met" and judged["step"]["miss"] == "by 0.17× (+11.1 %)"
    assert "B=1024, K=50: 12.000 ms vs 10.000 ms = 1.20×" in judged["step"]["measured"]
    assert judged["iwae5000"]["status"] == "NOT met" and judged["iwae5000"]["miss"] == "by 1.00 s (+20.0 %)"
    assert judged["vae-nll"]["status"] == "NOT met" and judged["vae-nll"]["miss"] == "by 1.50 (+1.7 %)"
    assert "13 training runs sharing" in judged["vae-nll"]["why"]
    assert judged["iwae50-nll"]["status"] == "met" and judged["iwae50-nll"]["miss"] == ""
    # GMVAE loses on NELBO (99 vs 98), wins on IWAE-1000 (95 vs 96): not met, by the worse margin
    assert judged["gmvae"]["status"] == "NOT met" and judged["gmvae"]["miss"] == "by 1.00 nats"
    # M1+M2 (the m1m2 rows) against 96 %: mean of the three seeds of this call (the older seed 7 left out): 92 %, sd 2 %
    assert judged["ssvae"]["status"] == "NOT met" and "M1+M2" in judged["ssvae"]["text"]
    assert judged["ssvae"]["measured"].startswith("92.00 ± 2.00 % over seeds [0, 1, 2]")
    assert judged["ssvae"]["miss"] == "by 4.00 points"
    # M2 (the ssvae rows) over its own baseline (85 %): +5, +7, +9 points, mean 7, sd 2: short of 10 by 3
    assert judged["ssvae-gain"]["status"] == "NOT met"
    assert judged["ssvae-gain"]["measured"].startswith("+7.00 ± 2.00 points over seeds [0, 1, 2]")
    assert judged["ssvae-gain"]["miss"] == "by 3.00 points"
    assert judged["completion"]["status"] == "owed"


@pytest.mark.parametrize("vae, gmvae_nelbo, status", [(86.5, 97.0, "met"), (88.5, 99.0, "NOT met")])
def test_vae_family_and_the_gpu_call_judge_the_shared_targets_alike(tmp_path, vae, gmvae_nelbo, status):
    """The NLL bounds and GMVAE-beats-VAE, declared once in targets.py: vae_family.py's section and the
    GPU call reach the same verdict on the same rows (and the GMVAE's own aim, NELBO ≤ 98, follows)."""
    ctx = harness.Ctx(device="cuda", dry=False, root=tmp_path, work=tmp_path)
    run = lambda name, **kw: dict(run=name, status="ok", started="2026-01-01T10:01:00+00:00", **kw)  # noqa: E731
    rows = {"full/cuda/vae": run("vae", test_iwae={"5000": vae}, test_iwae_se={"5000": 0.3}),
            "full/cuda/iwae50": run("iwae50", test_iwae={"5000": vae - 2}, test_iwae_se={"5000": 0.3}),
            "full/cuda/gmvae": run("gmvae", test_nelbo=gmvae_nelbo, test_iwae={"1000": 94.0}),
            "full/cuda/vae_z10": run("vae_z10", test_nelbo=98.0, test_iwae={"1000": 96.0})}
    _write(tmp_path / "experiments" / "vae_family.json", {"rows": rows})
    judged = {t["id"]: t for t in collection.judge_targets(ctx, {"started": "2026-01-01T10:00:00+00:00"})}
    for target in (targets.VAE_NLL, targets.IWAE50_NLL, targets.GMVAE):
        assert vae_family.judge(target, rows)[0] == judged[target.id]["status"] == status, target.id
    assert vae_family.judge(targets.GMVAE_AIM, rows)[0] == status


def test_one_statistic_for_every_table():
    """mean, sample sd (ddof 1) and SE = sd / sqrt(n), by hand: 0.90, 0.92, 0.94 -> 0.92, 0.02;
    1, 2, 3, 4 -> 2.5, sqrt(5/3), sqrt(5/3) / 2; one value has no spread."""
    mean, sd = stats.mean_sd([0.90, 0.92, 0.94])
    assert mean == pytest.approx(0.92, abs=1e-15) and sd == pytest.approx(0.02, abs=1e-15)
    se = stats.mean_se([1.0, 2.0, 3.0, 4.0])
    assert se["mean"] == 2.5 and se["se"] == pytest.approx(math.sqrt(5 / 3) / 2, rel=1e-15)
    one, spread = stats.mean_sd([7.0])
    assert one == 7.0 and math.isnan(spread) and math.isnan(stats.mean_se([7.0])["se"])


@pytest.mark.parametrize("accuracies, status", [((0.95, 0.97, 0.98), "met"), ((0.90, 0.92, 0.94), "NOT met"),
                                                ((0.97, 0.97), "owed")])
def test_the_gpu_call_and_the_section_judge_the_semi_supervised_targets_alike(tmp_path, accuracies, status):
    """One set of rows, two tables: the GPU call's judgement and semi_supervised.py's section agree on
    both targets (M1+M2 ≥ 96 %; M2 ≥ its baseline + 10 points), from the same declaration."""
    ctx = harness.Ctx(device="cuda", dry=False, root=tmp_path, work=tmp_path)
    rows = {}
    for s, a in enumerate(accuracies):
        common = dict(seed=s, labels=100, mode="full", device="cuda", status="ok",
                      started="2026-01-01T10:01:00+00:00")
        rows[f"full/cuda/m1m2-l100-s{s}"] = dict(common, run=f"m1m2-l100-s{s}", kind="m1m2", test_accuracy=a)
        rows[f"full/cuda/ssvae-l100-s{s}"] = dict(common, run=f"ssvae-l100-s{s}", kind="ssvae",
                                                  test_accuracy=a - 0.3,  # M2 well below 96 %
                                                  baseline_test_accuracy=a - 0.405)
    _write(tmp_path / "experiments" / "semi_supervised.json", {"rows": rows})
    judged = {t["id"]: t for t in collection.judge_targets(ctx, {"started": "2026-01-01T10:00:00+00:00"})}
    assert judged["ssvae"]["status"] == semi_supervised.judge_ssl(rows, "cuda")[0] == status
    gain = "owed" if len(accuracies) < 3 else "met"  # +10.5 points each seed
    assert judged["ssvae-gain"]["status"] == semi_supervised.judge_gain(rows, "cuda")[0] == gain


def test_parse_junit(tmp_path):
    xml = tmp_path / "t.xml"
    xml.write_text('<testsuites><testsuite tests="3"><testcase classname="tests.a" name="test_cuda_x"/>'
                   '<testcase classname="tests.a" name="test_cuda_y"><skipped message="CUDA-graph capture needs a GPU"/>'
                   '</testcase><testcase classname="tests.b" name="test_cuda_z"><failure message="boom&#10;more"/>'
                   '</testcase></testsuite></testsuites>')
    got = collection.parse_junit(xml)
    assert (got["collected"], got["passed"], got["skipped"], got["failed"], got["error"]) == (3, 1, 1, 1, 0)
    assert got["cases"][2] == {"id": "tests.b::test_cuda_z", "outcome": "failed", "message": "boom"}


# ---- deadlines ------------------------------------------------------------------------------------------


def test_a_row_past_its_deadline_is_killed_and_reported(tmp_path):
    ctx = harness.Ctx(device="cpu", dry=True, root=tmp_path, work=tmp_path)
    row = harness.Row("sleeper", "sleeps", "shared", lambda c: ["-c", "import time; time.sleep(60)"])
    clock = harness.Clock(60, None)
    start = time.monotonic()
    running = harness.launch(row, ctx, clock, 1.0, 1.0, 1)
    (record,) = harness.wait_rows([running], ctx, clock, heartbeat=30)
    assert time.monotonic() - start < 15
    assert record["status"].startswith("killed at the deadline after") and record["exit"] != 0


def test_runner_stage_is_killed_at_the_deadline(tmp_path, monkeypatch):
    monkeypatch.setenv(runner.DEADLINE_ENV, str(time.time() + 1.0))
    record = runner.run_stages("x", [("train", ["train", "gmm", "--device", "cpu", "--epochs", "100000",
                                                "--out", str(tmp_path / "run")]),
                                     ("eval", ["eval", str(tmp_path / "run")])], {}, tmp_path, 1)
    assert record["status"].startswith("train killed at the deadline after") and "eval_wall_s" not in record
    monkeypatch.setenv(runner.DEADLINE_ENV, str(time.time() - 1))
    record = runner.run_stages("x", [("train", ["list"])], {}, tmp_path, 1)
    assert record["status"] == f"train not started: past the deadline (${runner.DEADLINE_ENV})"


# ---- user mistakes: one line, exit 2 --------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["--minutes", "0"], "--minutes must be > 0"),
    (["--device", "cpu"], "--device cpu runs only with --dry-run"),
    (["--device", "tpu"], "--device must be cpu, cuda or cuda:N"),
    (["--skip", "nope"], "unknown --skip ['nope']"),
    (["--parallel", "0"], "--parallel must be auto or an integer >= 1"),
    (["--minutes", "6", "--deadline-minutes", "5"], "leaves no room for --minutes 6"),
    (["--collect", "/nonexistent/x.tar.gz"], "--collect: no such file"),
])
def test_user_mistakes_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        reproduce.main(argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and message in err, err


def test_collect_refuses_a_foreign_tarball(tmp_path, capsys):
    bad = tmp_path / "bad.tar.gz"
    with tarfile.open(bad, "w:gz") as tar:
        data = b"x"
        info = tarfile.TarInfo("../evil.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    assert reproduce.main(["--collect", str(bad), "--root", str(tmp_path / "root")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a reproduce.py results tarball" in err
    assert not (tmp_path / "evil.txt").exists()


def test_bench_section_replaces_the_legacy_heading_once(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# B\n\n## CPU (measured)\n\ncpu text\n\n## H100 (owed)\n\nold\n")
    render.write_bench_section(path, "## GPU\n\nnew\n")
    render.write_bench_section(path, "## GPU\n\nnewer\n")
    text = path.read_text()
    assert text == "# B\n\n## CPU (measured)\n\ncpu text\n\n## GPU\n\nnewer\n"


# ---- the GPU commands, which the dry run does not run, still parse -----------------------------------------


def _gpu_ctx(tmp_path):
    ctx = harness.Ctx(device="cuda", dry=False, root=tmp_path, work=tmp_path / "work", minutes=5.2)
    ctx.parallel, _ = phases.allocate(13, {r.name: r.runs for r in reproduce.ROWS if r.runs})
    return ctx


def test_every_gpu_command_parses_with_its_script(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import completion
    import svi_speed

    parsers = {"benchmarks/svi_speed.py": svi_speed.parse_args, "experiments/vae_family.py": vae_family.parse_args,
               "experiments/semi_supervised.py": semi_supervised.parse_args,
               "experiments/completion.py": completion.parse_args}
    ctx = _gpu_ctx(tmp_path)
    for row in reproduce.ROWS:
        argv = row.command(ctx)
        if argv[:2] == ["-m", "pytest"]:
            assert argv[-len(reproduce.cuda_test_files()):] == reproduce.cuda_test_files()
            continue
        opts = parsers[argv[0]](argv[1:])  # an unknown or renamed flag exits here
        assert opts.device == "cuda"
        if row.collect:
            parsers[argv[0]](row.collect(ctx, tmp_path / "runs")[1:])
    assert completion.parse_args(reproduce.completion_command(ctx)[1:]).baseline_minutes == pytest.approx(0.78)


def test_rows_start_as_many_runs_as_they_say(tmp_path):
    """``Row.runs`` sizes --parallel: a script that starts more runs by default must say so there."""
    ctx = _gpu_ctx(tmp_path)
    for row in reproduce.ROWS:
        if not row.collect:  # scripts without runner rows (completion: one run, in-process)
            continue
        argv = [a if a != "cuda" else "cpu" for a in row.command(ctx)] + ["--dry-run", "--parallel", "1"]  # one
        # thread prints the commands (threads' lines can interleave)
        out = subprocess.run([sys.executable, *argv], cwd=REPO, env=_env(), capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        names = {line.split("]")[0] for line in out.stdout.splitlines() if "] python -m ppl_vi train " in line}
        assert len(names) == row.runs, (row.name, sorted(names))
