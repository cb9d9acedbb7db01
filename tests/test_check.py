"""Tests of ppl_vi.check on a model/guide pair defined here, not a library model.

The pair is conjugate and scalar per datapoint::

    z_i ~ N(0, s0²),   x_i | z_i ~ N(a z_i, s²),        guide  q(z_i | x_i) = N(w x_i + c, e^{2r})

so log p(x_i) = log N(x_i; 0, a² s0² + s²) is exact. The hand bounds below are written with plain
torch ops (not ppl_vi.bounds), and the checker must pass them; then each classic mistake (a KL sign
error, a dropped constant, β on the wrong term, a guide that misses a site or has the wrong shape, a
bound whose value is right but gradient wrong) must make it fail, as a failing row, never a crash.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import RenyiELBO, Trace_ELBO, TraceMeanField_ELBO
from torch import nn

from ppl_vi.check import CheckReport, Comparison, Row, check, iwae_ladder_rows
from ppl_vi.models.base import sample_draws, scale_sites
from ppl_vi.objectives.importance import IWAELoss

DT = torch.float64
LOG_2PI = math.log(2 * math.pi)
S0 = 1.5  # prior scale of z, fixed
K = 3  # particles


# ------------------------------------------------------------------------------------------------
# the pair under test


class Toy(nn.Module):
    """Model parameters a, log s; guide parameters w, c, r. No pyro.param of its own: the
    parameters reach Pyro through ``pyro.module`` (RenyiELBO only back-propagates when a trace has
    param sites)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(1.3, dtype=DT))
        self.log_s = nn.Parameter(torch.tensor(-0.2, dtype=DT))
        self.w = nn.Parameter(torch.tensor(0.4, dtype=DT))
        self.c = nn.Parameter(torch.tensor(0.3, dtype=DT))
        self.r = nn.Parameter(torch.tensor(-0.7, dtype=DT))

    def model(self, x):
        pyro.module("toy", self)
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample("z", dist.Normal(torch.zeros((), dtype=DT), torch.tensor(S0, dtype=DT)))
            pyro.sample("x", dist.Normal(self.a * z, self.log_s.exp()), obs=x)

    def guide(self, x):
        pyro.module("toy", self)
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("z", dist.Normal(self.w * x + self.c, self.r.exp()))

    # the broken guides -------------------------------------------------------------------------
    def guide_missing_site(self, x):
        pyro.module("toy", self)
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("u", dist.Normal(self.w * x + self.c, self.r.exp()))  # not "z"

    def guide_wrong_shape(self, x):
        pyro.module("toy", self)
        with pyro.plate("data", x.shape[0], dim=-1):
            loc = (self.w * x + self.c).unsqueeze(-1).expand(x.shape[0], 2)
            pyro.sample("z", dist.Normal(loc, self.r.exp()).to_event(1))  # (B, 2), model has (B,)

    # exact quantities --------------------------------------------------------------------------
    def log_px(self, x):
        var = self.a**2 * S0**2 + self.log_s.exp() ** 2
        return -0.5 * LOG_2PI - 0.5 * torch.log(var) - 0.5 * x**2 / var


def _log_normal(v, loc, scale):
    return -0.5 * LOG_2PI - torch.log(scale) - 0.5 * ((v - loc) / scale) ** 2


def _terms(toy, x, z, *, drop_const=False, detach_q_scale=False):
    """log p(x|z), log p(z), log q(z|x) at draws z (K, B); each (K, B)."""
    s = toy.log_s.exp()
    lpx = _log_normal(x, toy.a * z, s)
    if drop_const:
        lpx = lpx + 0.5 * LOG_2PI
    lpz = _log_normal(z, torch.zeros((), dtype=DT), torch.tensor(S0, dtype=DT))
    q_scale = toy.r.exp().detach() if detach_q_scale else toy.r.exp()
    lqz = _log_normal(z, toy.w * x + toy.c, q_scale)
    return lpx, lpz, lqz


def _kl(toy, x, sign=1.0):
    """KL(N(w x + c, e^{2r}) || N(0, s0²)) per datapoint; ``sign=-1`` is the classic bug."""
    m, sq = toy.w * x + toy.c, toy.r.exp()
    return sign * (math.log(S0) - toy.r + (sq**2 + m**2) / (2 * S0**2) - 0.5)


# the hand bounds: per-datapoint losses (negative bounds), shape (B,)
def hand_nelbo_mc(toy, beta=1.0, **kw):
    def hand(batch, draws):
        lpx, lpz, lqz = _terms(toy, batch["x"], draws["z"], **kw)
        return -(lpx - beta * (lqz - lpz)).mean(0)
    return hand


def hand_nelbo_analytic(toy, kl_sign=1.0):
    def hand(batch, draws):
        lpx, _, _ = _terms(toy, batch["x"], draws["z"])
        return -lpx.mean(0) + _kl(toy, batch["x"], kl_sign)
    return hand


def hand_neg_iwae(toy, **kw):
    def hand(batch, draws):
        lpx, lpz, lqz = _terms(toy, batch["x"], draws["z"], **kw)
        return -(torch.logsumexp(lpx + lpz - lqz, dim=0) - math.log(lpx.shape[0]))
    return hand


@pytest.fixture
def toy():
    return Toy()


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(123)
    return {"x": 2.0 * torch.randn(12, generator=g, dtype=DT)}


def _run(toy, batch, comparisons, guide=None, repeats=30, extra_rows=()):
    params = [toy.a, toy.log_s, toy.w, toy.c, toy.r]
    return check(toy.model, guide or toy.guide, batch, comparisons, params,
                 param_names=["a", "log_s", "w", "c", "r"], max_plate_nesting=1, repeats=repeats,
                 extra_rows=extra_rows)


def _rows(report: CheckReport, kind: str, name_part: str):
    rows = [r for r in report.rows if r.kind == kind and name_part in r.name]
    assert rows, f"no {kind!r} row containing {name_part!r} in\n{report.table()}"
    return rows


def _kw():
    return dict(num_particles=K, vectorize_particles=True, max_plate_nesting=1)


def good_comparisons(toy):
    return [
        Comparison("Trace_ELBO vs hand NELBO MC", Trace_ELBO(**_kw()), hand_nelbo_mc(toy), K),
        Comparison("TraceMeanField vs hand analytic KL", TraceMeanField_ELBO(**_kw()), hand_nelbo_analytic(toy), K),
        Comparison("RenyiELBO(alpha=0) vs hand IWAE", RenyiELBO(alpha=0, **_kw()), hand_neg_iwae(toy), K),
        Comparison("IWAELoss vs hand IWAE", IWAELoss(num_particles=K, max_plate_nesting=1), hand_neg_iwae(toy), K),
    ]


# ------------------------------------------------------------------------------------------------
# the right bounds pass


def test_correct_hand_bounds_pass(toy, batch):
    ladder = lambda: iwae_ladder_rows(  # noqa: E731
        lambda k: -hand_neg_iwae(toy)(batch, _draws(toy, batch, k)),
        elbo=-hand_nelbo_analytic(toy)(batch, _draws(toy, batch, 2000)).detach(),
        log_px=toy.log_px(batch["x"]).detach(), ks=(1, 10, 100), repeats=10, seed=0)
    report = _run(toy, batch, good_comparisons(toy), extra_rows=[ladder])
    assert report.passed, report.table()
    # 1 structure + 4 × (loss, each datapoint, gradients) + 4 statistical + 3 ladder steps × 2 rows (1 for the first)
    kinds = [r.kind for r in report.rows]
    assert kinds.count("structure") == 1
    assert kinds.count("same sample") == 12
    assert kinds.count("statistical") == 4
    assert kinds.count("ground truth") == 6
    # non-vacuous: the losses are real numbers, the grads were compared to ~machine precision
    for row in _rows(report, "same sample", ": loss"):
        assert row.reference == pytest.approx(row.value, rel=1e-12)
        assert abs(row.reference) > 1.0
        assert "draws verified identical" in row.note
    for row in _rows(report, "same sample", ": gradients"):
        assert row.rel_diff < 1e-10
    for row in _rows(report, "same sample", ": each datapoint"):  # every datapoint, not only the sum
        assert row.rel_diff < 1e-10 and len(row.details["pyro"]) == batch["x"].shape[0]
    # the IWAE losses are below (better bounds than) the ELBO losses on average
    stat = {r.name.split(":")[0]: r.value for r in report.rows if r.kind == "statistical"}
    assert stat["IWAELoss vs hand IWAE"] < stat["Trace_ELBO vs hand NELBO MC"]
    assert "verdict: PASS" in report.table()
    assert report.to_dict()["passed"] is True


def _draws(toy, batch, k):
    return sample_draws(toy.guide, batch, k, 1)


def test_renyi_and_iwae_loss_values_are_the_negative_iwae_bound_not_the_elbo(toy, batch):
    # the same-sample comparison does not merely compare Pyro to itself: Renyi's value is the
    # hand IWAE bound and differs from the hand ELBO on the same draws.
    report = _run(toy, batch, good_comparisons(toy), repeats=0)
    renyi = _rows(report, "same sample", "RenyiELBO(alpha=0) vs hand IWAE: loss")[0]
    elbo = _rows(report, "same sample", "Trace_ELBO vs hand NELBO MC: loss")[0]
    assert renyi.reference < elbo.reference - 0.1
    assert report.passed, report.table()


# ------------------------------------------------------------------------------------------------
# each mistake fails


def test_kl_sign_error_fails(toy, batch):
    bad = Comparison("TraceMeanField vs KL with sign error", TraceMeanField_ELBO(**_kw()),
                     hand_nelbo_analytic(toy, kl_sign=-1.0), K)
    report = _run(toy, batch, [bad], repeats=20)
    assert not report.passed
    loss_row = _rows(report, "same sample", ": loss")[0]
    assert not loss_row.passed
    kl_total = _kl(toy, batch["x"]).sum().item()
    assert kl_total > 1.0
    n = batch["x"].shape[0]
    assert loss_row.abs_diff == pytest.approx(2 * kl_total / n, rel=1e-9)  # exactly twice the KL apart (mean)
    each = _rows(report, "same sample", ": each datapoint")[0]  # and datapoint by datapoint, by its own KL
    diffs = torch.tensor(each.details["hand"], dtype=DT) - torch.tensor(each.details["pyro"], dtype=DT)
    torch.testing.assert_close(diffs, -2 * _kl(toy, batch["x"]).detach(), rtol=1e-9, atol=1e-12)
    assert not _rows(report, "statistical", "sign error")[0].passed
    assert _rows(report, "structure", "")[0].passed


def test_dropped_log_2pi_constant_fails(toy, batch):
    bad = Comparison("Trace_ELBO vs NELBO without -1/2 log 2pi", Trace_ELBO(**_kw()),
                     hand_nelbo_mc(toy, drop_const=True), K)
    report = _run(toy, batch, [bad], repeats=20)
    assert not report.passed
    loss_row = _rows(report, "same sample", ": loss")[0]
    assert not loss_row.passed
    assert loss_row.abs_diff == pytest.approx(0.5 * LOG_2PI, rel=1e-9)  # ½ log 2π per datapoint
    # a constant has no gradient: the gradients row still passes, the statistical row fails
    assert _rows(report, "same sample", ": gradients")[0].passed
    assert not _rows(report, "statistical", "")[0].passed


def test_beta_on_the_wrong_term_fails(toy, batch):
    beta = 2.0
    scaled_model = scale_sites(toy.model, ("z",), beta)
    scaled_guide = scale_sites(toy.guide, ("z",), beta)

    def beta_on_likelihood(b, d):
        lpx, lpz, lqz = _terms(toy, b["x"], d["z"])
        return -(beta * lpx - (lqz - lpz)).mean(0)

    right = Comparison("beta on the KL (right)", Trace_ELBO(**_kw()), hand_nelbo_mc(toy, beta=beta), K,
                       model=scaled_model, guide=scaled_guide)
    wrong = Comparison("beta on the likelihood (wrong)", Trace_ELBO(**_kw()), beta_on_likelihood, K,
                       model=scaled_model, guide=scaled_guide)
    report = _run(toy, batch, [right, wrong], repeats=20)
    assert all(r.passed for r in report.rows if "(right)" in r.name), report.table()
    assert all(not r.passed for r in report.rows if "(wrong)" in r.name and r.kind == "same sample")
    assert {r.name for r in report.failures} >= {"beta on the likelihood (wrong): loss"}
    # and β really matters here: the scaled loss differs from the unscaled one
    plain = _run(toy, batch, good_comparisons(toy)[:1], repeats=0)
    assert abs(_rows(plain, "same sample", ": loss")[0].reference
               - _rows(report, "same sample", "(right): loss")[0].reference) > 0.3  # nats per datapoint


def test_guide_missing_the_latent_site_fails_without_raising(toy, batch):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pyro warns about the unmatched site
        report = _run(toy, batch, good_comparisons(toy), guide=toy.guide_missing_site, repeats=5)
    assert not report.passed
    structure = _rows(report, "structure", "")[0]
    assert not structure.passed
    assert "misses latent site(s) ['z']" in structure.note
    assert "['u']" in structure.note  # and has one the model does not sample
    assert any(r.note.startswith("error:") for r in report.failures)
    assert "FAIL" in report.table()


def test_guide_with_wrong_shape_fails_without_raising(toy, batch):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = _run(toy, batch, good_comparisons(toy), guide=toy.guide_wrong_shape, repeats=5)
    assert not report.passed
    structure = _rows(report, "structure", "")[0]
    assert not structure.passed
    assert "shape mismatch at z: model (12,) vs guide (12, 2)" in structure.note
    # every comparison produced failing rows, none raised
    for c in good_comparisons(toy):
        assert any(c.name in r.name and not r.passed for r in report.rows), c.name


def test_right_value_wrong_gradient_fails_on_grads_only(toy, batch):
    bad = Comparison("Trace_ELBO vs NELBO with detached q scale", Trace_ELBO(**_kw()),
                     hand_nelbo_mc(toy, detach_q_scale=True), K)
    report = _run(toy, batch, [bad], repeats=20)
    loss_row = _rows(report, "same sample", ": loss")[0]
    grads_row = _rows(report, "same sample", ": gradients")[0]
    assert loss_row.passed and loss_row.rel_diff < 1e-12
    assert not grads_row.passed
    assert grads_row.note == "worst: r"  # only the guide scale's gradient is wrong
    assert grads_row.rel_diff > 1e-2
    assert _rows(report, "statistical", "")[0].passed  # values are right: statistics cannot see it
    assert not report.passed
    assert [r.name for r in report.failures] == [grads_row.name]


def test_iwae_with_detached_q_scale_fails_on_grads(toy, batch):
    bad = Comparison("IWAELoss vs IWAE with detached q scale", IWAELoss(num_particles=K, max_plate_nesting=1),
                     hand_neg_iwae(toy, detach_q_scale=True), K)
    report = _run(toy, batch, [bad], repeats=0)
    assert _rows(report, "same sample", ": loss")[0].passed
    assert not _rows(report, "same sample", ": gradients")[0].passed


def test_renyi_without_param_sites_gives_no_gradient(batch):
    # Pyro's RenyiELBO.loss_and_grads only calls backward when a trace has a param site: with plain
    # tensors it silently leaves every gradient empty, and the checker reports that as a failure.
    a, w = torch.tensor(1.3, dtype=DT, requires_grad=True), torch.tensor(0.4, dtype=DT, requires_grad=True)

    def model(x):
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample("z", dist.Normal(torch.zeros((), dtype=DT), torch.tensor(S0, dtype=DT)))
            pyro.sample("x", dist.Normal(a * z, torch.tensor(0.8, dtype=DT)), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("z", dist.Normal(w * x, torch.tensor(0.5, dtype=DT)))

    def hand(b, d):
        z, x = d["z"], b["x"]
        log_w = (_log_normal(x, a * z, torch.tensor(0.8, dtype=DT)) + _log_normal(z, 0.0, torch.tensor(S0, dtype=DT))
                 - _log_normal(z, w * x, torch.tensor(0.5, dtype=DT)))
        return -(torch.logsumexp(log_w, 0) - math.log(z.shape[0]))

    renyi = Comparison("Renyi, plain tensors", RenyiELBO(alpha=0, **_kw()), hand, K)
    iwae = Comparison("IWAELoss, plain tensors", IWAELoss(num_particles=K, max_plate_nesting=1), hand, K)
    report = check(model, guide, batch, [renyi, iwae], [a, w], param_names=["a", "w"], repeats=0)
    assert _rows(report, "same sample", "Renyi, plain tensors: loss")[0].passed
    assert not _rows(report, "same sample", "Renyi, plain tensors: gradients")[0].passed
    assert _rows(report, "same sample", "IWAELoss, plain tensors: gradients")[0].passed


# ------------------------------------------------------------------------------------------------
# the report


def test_table_names_failing_checks():
    rows = [Row("structure", "guide covers the model's latent sites", passed=True),
            Row("same sample", "alpha: loss", 1.0, 2.0, 1.0, 0.5, "rel <= 1e-06", False),
            Row("statistical", "beta: mean", 1.0, 1.0, 0.0, 0.0, "within 4 SE", True)]
    failing = CheckReport(rows)
    table = failing.table()
    assert not failing.passed
    assert "verdict: FAIL (1 of 3 checks failed: alpha: loss)" in table
    assert "verdict: PASS" not in table
    assert [r.name for r in failing.failures] == ["alpha: loss"]
    assert len(table.splitlines()) == 2 + 3 + 1
    passing = CheckReport([rows[0], rows[2]])
    assert passing.passed and passing.table().endswith("verdict: PASS")
    # no rows is not a pass
    assert not CheckReport([]).passed


def test_table_of_a_real_failure_names_the_failing_rows(toy, batch):
    bad = Comparison("KL sign error", TraceMeanField_ELBO(**_kw()), hand_nelbo_analytic(toy, kl_sign=-1.0), K)
    good = Comparison("Trace_ELBO ok", Trace_ELBO(**_kw()), hand_nelbo_mc(toy), K)
    report = _run(toy, batch, [good, bad], repeats=10)
    table = report.table()
    assert "verdict: FAIL" in table
    verdict = table.splitlines()[-1]
    assert "KL sign error: loss" in verdict
    assert "Trace_ELBO ok" not in verdict
    fail_lines = [ln for ln in table.splitlines()[2:-1] if " FAIL " in ln]
    assert len(fail_lines) == len(report.failures) >= 2


def test_check_imports_alone():
    # `from ppl_vi.check import check` in a fresh interpreter, before anything else of ppl_vi.
    # Regression: ppl_vi.check imports ppl_vi.models.base, whose package __init__ imports every model;
    # a model module importing ppl_vi.check at module level makes this a circular ImportError.
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", "from ppl_vi.check import check, check_model"], cwd=root,
                          env={"PYTHONPATH": str(root), "PATH": ""}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr.strip().splitlines()[-1]
