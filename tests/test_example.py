"""The worked example (examples/student_t_fa.py): a user's own model, checked, trained and reported."""

import importlib.util
import json
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "student_t_fa.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("student_t_fa_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_checks_trains_and_reports(example, tmp_path, capsys):
    out = tmp_path / "run"
    result = example.main(["--out", str(out), "--epochs", "3", "--n-train", "500", "--repeats", "10"])
    printed = capsys.readouterr().out
    assert result["passed"], result["check"].table()
    assert "verdict: PASS" in printed and "check passed" in printed
    # every kind of check ran, and the hand bounds matched Pyro's on the same draws (value and grads)
    kinds = {r.kind for r in result["check"].rows}
    assert kinds == {"structure", "same sample", "statistical", "expected gradient", "ground truth"}
    assert sum(r.kind == "same sample" for r in result["check"].rows) >= 8

    report = Path(result["report"])
    assert report == out / "report.html" and report.is_file()
    html = report.read_text()
    assert "student-t-fa" in html and "check passed" in html and html.count("data:image/png;base64,") >= 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_done"] == 3 and "df" in metrics["fitted_parameters"]
    assert set(metrics["test_iwae"]) == {"1", "10", "100"}
    assert json.loads((out / "check.json").read_text())["passed"] is True


def test_example_model_is_registered(example):
    from ppl_vi.models.configure import build_config
    from ppl_vi.models.base import get_spec

    spec = get_spec("student-t-fa")
    assert spec.cls is example.StudentTFactorAnalysis and spec.data == "linear-gaussian"
    assert build_config("student-t-fa").loss == "meanfield"


def test_log_student_t_matches_torch(example):
    import torch

    x, loc, scale = torch.randn(4, 3, dtype=torch.float64), torch.randn(3, dtype=torch.float64), \
        torch.rand(3, dtype=torch.float64) + 0.5
    df = torch.tensor(3.7, dtype=torch.float64)
    expected = torch.distributions.StudentT(df, loc, scale).log_prob(x).sum(-1)
    assert torch.allclose(example.log_student_t(x, df, loc, scale), expected, rtol=1e-12, atol=0)
