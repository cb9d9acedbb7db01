"""The semi-supervised and completion experiments on the CPU, tiny: the SSVAE and CVAE through the
CLI, the completion experiment's ``--quick`` main(), and bad input (one line on stderr, exit status 2).

What is tested is the pipeline (run directories, metrics, figures, the estimator's ordering in K,
the error paths), not the quality of the fits: every run is a few hundred images for one epoch.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from ppl_vi.cli import main
from ppl_vi.errors import DataError

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
TINY = ["--device", "cpu", "--no-progress", "--hidden", "32", "--z-dim", "4", "--train-subset", "1000",
        "--val-size", "500", "--batch-size", "100", "--epochs", "1", "--seed", "0"]
MNIST_TEST_SIZE = 10_000


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"experiment_{name}", EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ssvae_run(tmp_path_factory):
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("ssl") / "ssvae"
    assert main(["train", "ssvae", "--labels", "100", "--baseline-steps", "100", "--out", str(run), *TINY]) == 0
    assert main(["eval", str(run), "--k", "1,10", "--no-progress"]) == 0
    return run


# ---- SSVAE through the CLI ---------------------------------------------------------------------------


def test_ssvae_train_eval_metrics_and_figures(ssvae_run):
    m = json.loads((ssvae_run / "metrics.json").read_text())
    assert 0.0 <= m["test_accuracy"] <= 1.0
    confusion = torch.tensor(m["confusion_matrix"])
    assert confusion.shape == (10, 10) and int(confusion.sum()) == MNIST_TEST_SIZE
    assert m["test_accuracy"] == pytest.approx(confusion.diag().sum().item() / MNIST_TEST_SIZE)
    assert math.isfinite(m["test_nelbo"]) and m["test_nelbo"] > 0 and m["test_nelbo_se"] > 0
    assert set(m["test_iwae"]) == {"1", "10"}
    assert 0.5 < m["baseline_test_accuracy"] <= 1.0 and 0.0 <= m["final_test_accuracy"] <= 1.0  # 100 labels alone
    history = [json.loads(line) for line in (ssvae_run / "history.jsonl").read_text().splitlines()]
    assert all(0.0 <= h["test_accuracy"] <= 1.0 and 0.0 <= h["val_accuracy"] <= 1.0 for h in history)
    assert history[-1]["test_accuracy"] == m["final_test_accuracy"]
    for name in ("style_grid", "confusion_matrix", "samples", "training_curves", "accuracy"):
        path = ssvae_run / "figures" / f"{name}.png"
        assert path.is_file() and path.stat().st_size > 1000, name
    config = json.loads((ssvae_run / "config.json").read_text())["config"]
    assert config["labels"] == 100 and config["seed"] == 0


def test_labelled_subset_depends_on_seed_only():
    from ppl_vi.data.mnist import labelled_subset

    y = torch.arange(1000) % 10
    a, _ = labelled_subset(y, 100, seed=0)
    b, _ = labelled_subset(y, 100, seed=0)
    c, _ = labelled_subset(y, 100, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.bincount(y[a], minlength=10).tolist() == [10] * 10


# ---- CVAE: the class-conditional sample grid ------------------------------------------------------------


def test_cvae_train_writes_class_grid(tmp_path):
    run = tmp_path / "cvae"
    assert main(["train", "cvae", "--out", str(run), *TINY]) == 0
    grid = run / "figures" / "style_grid.png"
    assert grid.is_file() and grid.stat().st_size > 1000


def test_style_grid_rows_share_z():
    """Row c of the grid is generate(n, c) after re-seeding: the same z in every row."""
    from ppl_vi.models.cvae import CVAE

    model = CVAE(784, z_dim=3, hidden=[8]).eval()
    torch.manual_seed(0)
    z = torch.randn(5, 3)
    torch.manual_seed(0)
    got = model.generate(5, 7)
    want = torch.sigmoid(model.decoder(torch.cat([z, torch.nn.functional.one_hot(torch.full((5,), 7), 10).float()],
                                                 -1)))
    assert torch.allclose(got, want)


# ---- the completion experiment ---------------------------------------------------------------------------


def test_completion_quick_main(tmp_path):
    completion = _load("completion")
    results_json, results_md = tmp_path / "completion.json", tmp_path / "RESULTS.md"
    results_md.write_text("# Results\n\n## VAE family (issue 3)\n\nkept as is\n")
    argv = ["--device", "cpu", "--quick", "--train-subset", "1000", "--n-test", "200", "--k", "1,50",
            "--out-dir", str(tmp_path / "runs"), "--results-json", str(results_json), "--results-md",
            str(results_md), "--ssl-json", str(tmp_path / "none.json")]
    assert completion.main(argv) == 0
    record = json.loads(results_json.read_text())["rows"]["smoke/cpu"]
    assert record["mode"] == "smoke" and record["n_test"] == 200 and record["ks"] == [1, 50]
    for q in ("1", "2", "3"):
        row = record["quadrants"][q]
        small, large = row["cvae_is"]["1"], row["cvae_is"]["50"]
        assert large["mean"] <= small["mean"] + 4 * math.hypot(small["se"], large["se"]), (q, small, large)
        for value in (row["baseline"]["mean"], row["cvae_nelbo"]["mean"], small["mean"], large["mean"]):
            assert math.isfinite(value) and value > 0
    # fewer pixels missing, fewer nats
    assert record["quadrants"]["3"]["baseline"]["mean"] < record["quadrants"]["1"]["baseline"]["mean"]
    run = tmp_path / "runs" / "smoke-completion"
    assert (run / "figures" / "completions.png").is_file() and (run / "completion.md").is_file()
    assert (run / "checkpoints" / "best.pt").is_file() and (run / "checkpoints" / "baseline.pt").is_file()
    text = results_md.read_text()
    assert "## VAE family (issue 3)\n\nkept as is" in text
    assert text.index("## VAE family (issue 3)") < text.index("## Semi-supervised and conditional VAEs (issue 4)")
    assert "NOT a result" in text and "GPU figures owed" in text


def _ssl_rows(device: str, accuracies: dict) -> dict:
    """Finished records: for each kind (ssvae, m1m2) and seed, a test accuracy and a baseline."""
    rows = {}
    for kind, values in accuracies.items():
        for seed, (acc, base) in enumerate(values):
            name = f"{kind}-l100-s{seed}"
            rows[f"full/{device}/{name}"] = dict(
                run=name, kind=kind, seed=seed, labels=100, mode="full", device=device, device_name="H100",
                status="ok", test_accuracy=acc, baseline_test_accuracy=base, test_nelbo=100.0 + seed,
                test_nelbo_se=0.3, train_command="t", eval_command="e", test_iwae={"10": 99.0},
                test_iwae_se={"10": 0.3}, figures=[], epochs_done=10 + seed, train_wall_s=60.0,
                config={"baseline_steps": 1000})
    return rows


def test_semi_supervised_summary_gain_and_section(tmp_path):
    ssl = _load("semi_supervised")
    rows = _ssl_rows("cuda", {"ssvae": [(0.88, 0.76), (0.90, 0.75), (0.86, 0.77)],
                              "m1m2": [(0.95, 0.76), (0.97, 0.75), (0.96, 0.77)]})
    records = list(rows.values())
    s = ssl.summary(records, "m1m2")
    assert s["accuracy_mean"] == pytest.approx(0.96) and s["accuracy_sd"] == pytest.approx(0.01)
    assert ssl.summary(records, "ssvae", "baseline_test_accuracy")["mean"] == pytest.approx(0.76)
    g = ssl.gain(records)  # per seed: +12, +15, +9 points
    assert g["values"] == pytest.approx([0.12, 0.15, 0.09]) and g["mean"] == pytest.approx(0.12)
    assert ssl.judge_ssl(rows, "cuda")[0] == "met" and ssl.judge_gain(rows, "cuda")[0] == "met"
    assert ssl.judge_ssl({k: v for k, v in rows.items() if not k.endswith("s2")}, "cuda")[0] == "owed"
    assert ssl.judge_gain(rows, "cpu")[0] == "owed"  # no CPU rows
    text = ssl.section({"rows": rows}, {"rows": {}}, tmp_path)
    assert "96.00 ± 1.00 %" in text and "88.00 ± 2.00 %" in text and "76.00 ± 1.00 %" in text
    assert "M2 − supervised-only baseline: +12.00 ± 3.00 points" in text
    assert "| M1+M2, 100 labels: test accuracy ≥ 96 % (mean of 3 labelled-set seeds) | **met**" in text


def test_semi_supervised_gain_not_met_on_the_cpu(tmp_path):
    ssl = _load("semi_supervised")
    rows = _ssl_rows("cpu", {"ssvae": [(0.80, 0.76), (0.81, 0.75), (0.79, 0.77)]})
    assert ssl.judge_gain(rows, "cpu")[0] == "NOT met"
    text = ssl.section({"rows": rows}, {"rows": {}}, tmp_path)
    assert "| M2 beats its supervised-only baseline by ≥ 10 points of test accuracy (mean of 3 labelled-set seeds) " \
           "| **NOT met** | +4.00 ± 2.00 points" in text


def test_semi_supervised_budget_and_a_reused_m1(tmp_path):
    """The section states each kind's budget and alpha, and an M1 given with --m1 (no row of its own) by its
    recorded training command, read from its run directory."""
    ssl = _load("semi_supervised")
    m1 = tmp_path / "m1"
    m1.mkdir()
    (m1 / "config.json").write_text(json.dumps({"config": {"hidden": [500, 500], "z_dim": 50, "train_subset": 0},
                                                "environment": {"command": "/x/ppl_vi/__main__.py train vae --seed 0",
                                                                "git_commit": "fd09076f49dad"}}))
    (m1 / "metrics.json").write_text(json.dumps({"epochs_done": 61, "train_seconds": 2751.3, "final_val_loss": 98.2282}))
    info = ssl.read_m1(m1)
    assert info["command"] == "python -m ppl_vi train vae --seed 0" and info["epochs_done"] == 61
    rows = _ssl_rows("cpu", {"ssvae": [(0.80, 0.76)], "m1m2": [(0.85, 0.76)]})
    for r in rows.values():
        r.update(train_seconds=630.0, eval_wall_s=40.0)
        r["config"].update(max_minutes=10.0, alpha=10.0 if r["kind"] == "ssvae" else 0.1, hidden=[500], z_dim=50)
        if r["kind"] == "m1m2":
            r["m1_run"] = info
    text = ssl.section({"rows": rows}, {"rows": {}}, tmp_path)
    assert "- Budget, M2: `--max-minutes 10` of training per run" in text and "10.5 min trained" in text
    assert "α = 10.0 (α' = α·N/N_l" in text and "- Budget, M1+M2: `--max-minutes 10`" in text and "α = 0.1 (" in text
    assert ("- M1 (given with `--m1`, trained once beforehand without labels, not counted in the per-run budget): "
            "`python -m ppl_vi train vae --seed 0` (ppl_vi fd09076), a `vae` 784-500-500-50 on the full training "
            "split: 61 epochs in 45.9 min, final validation NELBO 98.23") in text


def test_semi_supervised_dry_run_and_bad_options(capsys):
    ssl = _load("semi_supervised")
    assert ssl.main(["--device", "cpu", "--quick", "--dry-run", "--seeds", "3,4"]) == 0
    out = capsys.readouterr().out
    assert "--labels 100" in out and "--seed 3" in out and "--seed 4" in out and "eval" in out
    assert "train vae" in out and "train m1m2" in out and "--m1 experiments/runs/smoke-m1-vae" in out
    assert ssl.main(["--device", "cpu", "--quick", "--dry-run", "--models", "ssvae"]) == 0
    assert "m1m2" not in capsys.readouterr().out
    for bad in (["--labels", "105"], ["--models", "m3"], ["--m1", "/nowhere"], ["--m1-minutes", "0"]):
        with pytest.raises(SystemExit) as exc:
            ssl.parse_args(bad)
        assert exc.value.code == 2


# ---- bad input: one line, exit status 2 ------------------------------------------------------------------


@pytest.mark.parametrize("labels, message", [
    ("105", "not divisible by num_classes=10"),
    ("100000", "is out of range"),
    ("1000", "labelled ones were asked for"),  # 1000 of 1000 images: more than a class has (100 each)
])
def test_ssvae_bad_labels_exit_2(tmp_path, capsys, labels, message):
    run = tmp_path / "bad"
    assert main(["train", "ssvae", "--labels", labels, "--out", str(run), *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and err.startswith("ppl-vi train: error:")
    assert not run.exists()  # nothing half-made


def test_labels_outside_range_python_api():
    from ppl_vi.data.mnist import labelled_subset
    from ppl_vi.models.ssvae import SSVAE

    model = SSVAE(784, z_dim=2, hidden=[8])
    x = torch.zeros(4, 784)
    for bad in (torch.tensor([0, 1, 2, 10]), torch.tensor([-1, 0, 1, 2])):
        with pytest.raises(DataError, match=r"labels range over .*expected integer labels of shape \(4,\) in 0\.\.9"):
            model.make_batch(x, bad)
    with pytest.raises(DataError, match="labels have dtype"):
        model.make_batch(x, torch.zeros(4))
    with pytest.raises(DataError, match="in 0..9"):
        model.generate(3, 10)
    with pytest.raises(DataError, match="expected integers in 0..9"):
        labelled_subset(torch.tensor([0, 1, 2, 10] * 5), 10)


def test_cvae_requires_labels():
    from ppl_vi.models.cvae import CVAE

    model = CVAE(784, z_dim=2, hidden=[8])
    x = torch.zeros(4, 784)
    with pytest.raises(DataError, match="cvae needs labels but the batch has none"):
        model.make_batch(x, None)
    with pytest.raises(DataError, match="cvae needs labels"):
        model.model(x)
    with pytest.raises(DataError, match="cvae needs labels"):
        model.guide(x)
    assert str(DataError("a")).count("\n") == 0
