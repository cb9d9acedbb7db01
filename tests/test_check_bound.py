"""``ppl_vi.check_bound`` (one call), ``ppl_vi.testing.assert_bound`` (one assertion) and the report's displays.

The model is examples/conjugate_normal.py (a conjugate Normal pair with a minibatch scale N/B), its
functions passed to the one-call API as a notebook or a test module would pass its own.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pyro
import pytest
import torch
from IPython.lib.pretty import pretty

import ppl_vi
from ppl_vi import check_bound
from ppl_vi.check.formula import bound_formula
from ppl_vi.check.userfile import UserPair, check_pair, load_target
from ppl_vi.errors import ConfigError
from ppl_vi.mathml import UnsupportedLatex, to_mathml
from ppl_vi.testing import assert_bound

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "conjugate_normal.py"
FAST = dict(repeats=4, gradient_seeds=3)


@pytest.fixture(scope="module")
def example():
    return load_target(str(EXAMPLE)).module


def _args(example, bound=None):
    return (example.model, example.guide, bound or example.bound, example.batch)


def _rows(report):
    return [(r.kind, r.name, r.reference, r.value, r.passed) for r in report.rows]


def _same(a, b):
    """Rows equal, NaN equal to NaN (a row without a number)."""
    return len(a) == len(b) and all(
        x[:2] == y[:2] and x[4] == y[4] and all((u == v) or (math.isnan(u) and math.isnan(v)) for u, v in zip(x[2:4], y[2:4]))
        for x, y in zip(a, b))


# ------------------------------------------------------------------------------------------------
# one call


def test_check_bound_is_the_user_file_check(example):
    """The one call gives the rows, verdicts and formula of ``ppl-vi check FILE.py`` (same seed, same
    numbers): catches a second code path, other defaults (loss, K, params found) or another seed."""
    report = check_bound(*_args(example), iwae_bound=example.iwae_bound,
                         exact_log_likelihood=example.exact_log_likelihood, **FAST)
    reference = check_pair(load_target(str(EXAMPLE)), **FAST)
    assert report.ok and report.diagnoses == [] and ppl_vi.check_bound is check_bound
    assert _same(_rows(report), _rows(reference)), (report.table(), reference.table())
    assert any(r.kind == "ground truth" for r in report.rows) and any("iwae_bound" in r.name for r in report.rows)
    assert "gradients of 3 tensors" in report.table()  # a, b, log_s found in the functions' globals
    assert report.formula["text"].startswith("−ELBO(x) = N/B × (")


def test_check_bound_names_the_slip_like_the_cli(example):
    """A dropped constant fails with the constant named and valued: catches a report that fails
    without the diagnosis (or diagnoses a right bound)."""
    report = check_bound(*_args(example, example.dropped_constant["bound"]), **FAST)
    assert not report.ok and len(report.diagnoses) == 1
    assert report.diagnoses[0].startswith("constant: Trace_ELBO (K=3): the term 'rec'")
    assert "½·log 2π·D, D = 5 (the size of site 'x')" in report.diagnoses[0]


def test_check_bound_is_deterministic_and_leaves_the_callers_random_state(example):
    """Twice the same call, the same numbers, and the caller's torch/random state untouched: catches an
    unseeded check (rows differing run to run) and a check that reseeds the caller's test."""
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    first = check_bound(*_args(example), **FAST)
    assert torch.equal(torch.get_rng_state(), before)
    torch.rand(7)  # another state: the check must not depend on it
    second = check_bound(*_args(example), **FAST)
    assert _same(_rows(first), _rows(second))
    other_seed = check_bound(*_args(example), seed=1, **FAST)
    assert not _same(_rows(first), _rows(other_seed))  # the seed is used


def _random_start_pair():
    """A local Normal-Normal pair whose guide parameters start at random values, drawn on first use."""
    x = torch.linspace(-1, 1, 6, dtype=torch.float64)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", pyro.distributions.Normal(torch.zeros_like(x), 1.0))
            pyro.sample("x", pyro.distributions.Normal(z, 1.0), obs=x)

    def guide(x):
        loc = pyro.param("loc", lambda: torch.randn(x.shape[0], dtype=x.dtype))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", pyro.distributions.Normal(loc, 0.5))

    def bound(batch, draws):
        x, z, loc = batch["x"], draws["z"], pyro.param("loc")
        normal = pyro.distributions.Normal
        return (normal(loc, 0.5).log_prob(z) - normal(0.0, 1.0).log_prob(z) - normal(z, 1.0).log_prob(x)).mean(0)

    return model, guide, bound, {"x": x}


def test_random_initial_values_are_seeded_too():
    """A guide whose parameters start at random values: after clearing the param store and moving the
    caller's RNG on, the same report; catches a check that runs the user's code (first parameter
    draws, ``batch()``) unseeded, so that a suite's order changes the numbers."""
    pyro.clear_param_store()
    first = check_bound(*_random_start_pair(), **FAST)
    pyro.clear_param_store()
    torch.rand(3)
    second = check_bound(*_random_start_pair(), **FAST)
    assert first.ok and _same(_rows(first), _rows(second))


def test_params_given_explicitly_are_the_ones_compared(example):
    """``params`` as a dict names the compared tensors: catches params ignored in favour of the search."""
    report = check_bound(*_args(example), params={"a": example.a}, **FAST)
    row = next(r for r in report.rows if r.name.endswith("gradients of 1 tensors"))
    assert row.passed and "worst: a" in row.tolerance + row.note


# ------------------------------------------------------------------------------------------------
# one assertion


def test_assert_bound_is_silent_on_the_right_bound(example):
    assert assert_bound(*_args(example), **FAST) is None


@pytest.mark.parametrize("variant, expected", [
    ("flipped_kl", ["sign: Trace_ELBO (K=3): the term 'kl' is minus Pyro's at every datapoint: its sign is flipped"]),
    ("dropped_constant", ["constant:", "the term 'rec' differs from Pyro's by -287.168 per datapoint",
                          "½·log 2π·D, D = 5"]),
])
def test_assert_bound_raises_with_the_slip_named(example, variant, expected):
    """The message carries the verdict, the diagnosis (which term, by how much, the slip) and the
    failing rows with both values: catches a bare AssertionError, or one without the numbers."""
    with pytest.raises(AssertionError) as caught:
        assert_bound(*_args(example, getattr(example, variant)["bound"]), **FAST)
    message = str(caught.value)
    assert message.startswith("the hand-derived bound does not match Pyro's: ")
    for text in expected:
        assert text in message, message
    each = next(line for line in message.splitlines() if "vs bound: each datapoint" in line)
    assert re.search(r"Pyro/reference [-\d.]+, yours [-\d.]+, abs diff [\d.]+", each), each


# ------------------------------------------------------------------------------------------------
# bad input: the CLI's one-line ConfigError, naming the argument


def _bad(example, name):
    good = dict(zip(("model", "guide", "bound", "batch"), _args(example)))
    cases = {
        "model": dict(good, model=3),
        "batch": dict(good, batch=[1.0, 2.0]),
        "bound": dict(good, bound="negative_elbo"),
        "num_particles": dict(good, num_particles=0),
        "repeats": dict(good, repeats=1),
        "gradient_seeds": dict(good, gradient_seeds=True),
        "seed": dict(good, seed=-1),
        "loss": dict(good, loss="Trace_ELBO"),
        "losses": dict(good, losses=[pyro.infer.Trace_ELBO(), "x"]),
        "params": dict(good, params=[torch.zeros(2)]),
        "rtol": dict(good, rtol=2.0),
        "exact_log_likelihood": dict(good, exact_log_likelihood=1.5),
        "max_plate_nesting": dict(good, max_plate_nesting=0),
    }
    return cases[name]


@pytest.mark.parametrize("name", ["model", "batch", "bound", "num_particles", "repeats", "gradient_seeds", "seed",
                                  "loss", "losses", "params", "rtol", "exact_log_likelihood", "max_plate_nesting"])
def test_bad_argument_is_one_line_config_error_naming_it(example, name):
    kwargs = _bad(example, name)
    with pytest.raises(ConfigError) as caught:
        check_bound(kwargs.pop("model"), kwargs.pop("guide"), kwargs.pop("bound"), kwargs.pop("batch"), **kwargs)
    message = str(caught.value)
    assert len(message.splitlines()) == 1 and message.startswith("check_bound: ") and name in message, message


# ------------------------------------------------------------------------------------------------
# displays


def test_report_displays(example):
    """print: the CLI's table; repr: one line; HTML: the failing rows highlighted (and only those), the
    verdict, the diagnosis, the objective as MathML (not LaTeX source), self-contained. Catches a
    highlight on the wrong rows, a display without the diagnosis, and a page loading anything."""
    failing = check_bound(*_args(example, example.flipped_kl["bound"]), **FAST)
    passing = check_bound(*_args(example), **FAST)
    assert str(failing) == failing.table() and str(failing).splitlines()[-1].startswith("diagnosis: sign:")
    assert repr(failing).startswith("<CheckReport FAIL:") and "\n" not in repr(failing)
    assert pretty(failing) == failing.table()  # IPython in a terminal shows the table
    for report in (failing, passing):
        page = report._repr_html_()
        bad_rows = re.findall(r"<tr class='bad'>", page)
        assert len(bad_rows) == len(report.failures)
        assert page.count("<math ") == 2 and "<mfrac>" in page and "<munderover>" in page  # ELBO and IWAE_K
        assert "<script" not in page.lower() and not re.search(r"(src|href)=\"(?!data:)", page)
        assert page.startswith("<div class='ppl-vi-check'><style>") and "\nbody" not in page and "\ntable " not in page
    failing_page = failing._repr_html_()
    assert "check FAILED" in failing_page and "Diagnosis" in failing_page and "its sign is flipped" in failing_page
    assert f"failed ({len(failing.failures)} of {len(failing.rows)} checks)" in failing_page
    assert "check passed" in passing._repr_html_() and "Diagnosis" not in passing._repr_html_()


# ------------------------------------------------------------------------------------------------
# LaTeX -> MathML


def test_mathml_structure():
    """Fractions, limits, scripts, fences, functions and signs become the MathML elements that lay them
    out: catches a converter that prints the LaTeX as text or drops a script."""
    out = to_mathml(r"-\log \frac{1}{K}\sum_{k=1}^{K} \mathbb{E}_{q(\mathrm{z}\mid \mathrm{x})}\left[x_i^{2}\right] - \sigma")
    assert out.startswith('<math xmlns="http://www.w3.org/1998/Math/MathML" display="block"><semantics><mrow>')
    body = out[:out.index("<annotation")]
    assert body.startswith('<math xmlns="http://www.w3.org/1998/Math/MathML" display="block"><semantics><mrow>'
                           '<mo form="prefix">−</mo><mi>log</mi>')  # a leading minus is a sign
    assert "<mfrac><mrow><mn>1</mn></mrow><mrow><mi>K</mi></mrow></mfrac>" in body
    assert ('<munderover><mo largeop="true" movablelimits="false">∑</mo><mrow><mi>k</mi><mo stretchy="false" '
            'lspace="0.278em" rspace="0.278em">=</mo><mn>1</mn></mrow><mrow><mi>K</mi></mrow></munderover>') in body
    assert "<msub><mi>𝔼</mi><mrow><mi>q</mi>" in body and "<msubsup><mi>x</mi><mi>i</mi><mrow><mn>2</mn></mrow></msubsup>" in body
    assert '<mo stretchy="true">[</mo>' in body and "<mo>−</mo><mi>σ</mi>" in body  # a binary minus after ]
    assert "\\" not in body  # no LaTeX left in what is shown
    assert '<annotation encoding="application/x-tex">-\\log' in out


def test_mathml_escapes_names_and_refuses_what_it_does_not_know():
    assert "<mi>a&lt;b</mi>" in to_mathml(r"\mathrm{a<b}") and "<mi>site_name</mi>" in to_mathml(r"\mathrm{site\_name}")
    for bad in (r"\frac{1}", r"\unknowncommand", "x_1_2", "}", r"\mathbb{e}", r"\left<"):
        with pytest.raises(UnsupportedLatex):
            to_mathml(bad)


USER_FILES = sorted(p for p in EXAMPLE.parent.glob("*.py") if isinstance(load_target(str(p)), UserPair))


@pytest.mark.parametrize("path", USER_FILES, ids=[p.name for p in USER_FILES])
def test_every_formula_the_checker_writes_is_mathml(path):
    """The objective of every example user file (the ELBO and the IWAE bound) converts to MathML, not
    to the image fallback: catches a construct the formula writer emits that the converter does not know."""
    pair = load_target(str(path))
    formula = bound_formula(pair.model, pair.guide, pair.batch, pair.max_plate_nesting)
    assert formula, f"{path.name}: no formula"
    for key in ("latex", "iwae_latex"):
        assert "<mi>" in to_mathml(formula[key])
