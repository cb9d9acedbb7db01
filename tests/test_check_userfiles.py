"""`ppl-vi check FILE.py` on real users' files: right both ways, global latents and enumerated sites included.

Each test names the wrong checker it catches. Files are written as users write them (module-level model,
guide, bound, batch), into a temporary folder, or are the examples in examples/, each run with the
command line's exit code: 0 the bound is right, 1 a check failed (the slip named under the table), 2
the file cannot be used (one line on stderr naming file, line and cause, never a traceback).
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from ppl_vi.check import check_bound
from ppl_vi.cli import main

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CHEAP = ["--repeats", "4", "--gradient-seeds", "2"]

# a user's file as reported: Normal-Normal, a guide with per-datapoint parameters of width 16, a bound equal to
# Trace_ELBO at every datapoint
NORMAL_NORMAL = '''
import math
import torch, pyro
import pyro.distributions as dist

torch.manual_seed(0)
N = 16
batch = {"x": torch.randn(N, dtype=torch.float64) * 1.5}
m = torch.randn(N, dtype=torch.float64, requires_grad=True)
log_s = torch.zeros(N, dtype=torch.float64, requires_grad=True)

def model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)

def guide(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(m, log_s.exp()))

def lognorm(v, mu, s):
    s = torch.as_tensor(s, dtype=v.dtype)
    return -0.5 * ((v - mu) / s) ** 2 - s.log() - 0.5 * math.log(2 * math.pi)

def bound(batch, draws):
    z = draws["z"]
    return (-lognorm(batch["x"], z, 1.0) + SIGN * (lognorm(z, m, log_s.exp()) - lognorm(z, 0.0, 1.0))
            + CONST).mean(0)

SIGN, CONST = 1.0, 0.0
'''


def run(path, capsys, *extra):
    """(exit code, stdout, stderr) of ``ppl-vi check path`` with cheap seed counts."""
    code = main(["check", str(path), *CHEAP, *extra])
    out, err = capsys.readouterr()
    return code, out, err


def user_file(tmp_path, text: str, name: str = "user.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def assert_clean(out: str):
    """No row named <lambda>, and no exception reported as the user's failure unless the user's code raised."""
    assert "<lambda>" not in out
    for line in out.splitlines():
        if " FAIL " in line and re.search(r"error: \w+(Error|Exception)\b", line):
            assert "raised" in line, line


# ------------------------------------------------------------------------------------------------
# the reported user's file


def test_the_issues_per_datapoint_guide_passes_on_the_whole_batch(tmp_path, capsys):
    """Catches: the expected-gradient and ground-truth rows slicing the batch to 8 datapoints while the
    guide's parameters stay 16 wide (a 'Shape mismatch ... 8 vs 16' FAIL of a right bound), and rows
    named <lambda>."""
    code, out, err = run(user_file(tmp_path, NORMAL_NORMAL), capsys)
    assert code == 0, out + err
    assert "verdict: PASS" in out and "Shape mismatch" not in out
    assert_clean(out)
    assert "expected gradient" in out and "not run" not in out  # the gradient rows ran, on all 16 datapoints


@pytest.mark.parametrize("edit, keyword, words", [
    ("SIGN, CONST = -1.0, 0.0", "sign", ["the term of site 'z' (log q - log p) has its sign flipped"]),
    ("SIGN, CONST = 1.0, -0.5 * math.log(2 * math.pi)", "constant", ["½·log 2π·D, D = 1", "the gradients agree"]),
])
def test_the_issues_file_with_a_slip_fails_with_the_slip_named(tmp_path, capsys, edit, keyword, words):
    """Catches: a slip in the reported user's file not failing, or failing without the slip named."""
    code, out, _ = run(user_file(tmp_path, NORMAL_NORMAL.replace("SIGN, CONST = 1.0, 0.0", edit)), capsys)
    assert code == 1
    diagnoses = [line for line in out.splitlines() if line.startswith("diagnosis:")]
    assert len(diagnoses) == 1 and diagnoses[0].startswith(f"diagnosis: {keyword}:"), diagnoses
    assert all(w in diagnoses[0] for w in words), diagnoses
    assert_clean(out)


# ------------------------------------------------------------------------------------------------
# the examples, as their docstrings state


EXAMPLE_SLIPS = [
    ("coin_fairness", "flipped_kl", "sign", "the term 'kl' is minus Pyro's"),
    ("coin_fairness", "kl_per_datapoint", "scale", "+B = 10: a global latent's term counted once per datapoint"),
    ("coin_fairness", "mean_likelihood", "scale", "+1/B = 1/10: a mean over the batch"),
    ("bayesian_regression", "missing_jacobian", "missing log-Jacobian", "log|dsigma/du| of the guide's transform"),
    ("bayesian_regression", "dropped_constant", "constant", "B × (½·log 2π·D, D = 1 (the size of site 'obs')"),
    ("bayesian_regression", "missing_entropy", "missing entropy", "log q(linear.weight|x)"),
    ("eight_schools", "missing_jacobian", "missing log-Jacobian", "log|dtau/du|"),
    ("eight_schools", "global_per_school", "scale", "global latents ['mu', 'tau'] (log q - log p) is multiplied by 8"),
    ("eight_schools", "flipped_local_kl", "sign", "the term 'local' is minus Pyro's"),
    ("vae", "bce_mean_over_pixels", "scale", "+1/D = 1/16: a mean over the D = 16 values of site 'obs'"),
    ("vae", "batch_mean", "per datapoint", "it equals the mean over the batch"),
    ("vae", "iwae_mean_of_log", "log-mean-exp", "the mean of log w over the particles"),
    ("gmm_enumerated", "dropped_constant", "constant", "−½·log 2π·D, D = 1 (the size of site 'obs')"),
    ("gmm_enumerated", "flipped_kl", "sign", "the term 'kl' is minus Pyro's"),
    ("gmm_enumerated", "missing_entropy", "missing entropy", "log q(scale|x)"),
    ("local_guide", "flipped_kl", "sign", "the term 'kl' is minus Pyro's"),
    ("local_guide", "dropped_constant", "constant", "N/B = 25 (the minibatch scale)"),
    ("local_guide", "per_particle", "per datapoint", "(K, B) = (3, 16)"),
    ("local_guide", "scale_left_out", "scale", "+B/N = 1/25: the minibatch scale N/B left out"),
]


@pytest.mark.parametrize("example, loss", [
    ("coin_fairness", "TraceMeanField_ELBO"), ("bayesian_regression", "Trace_ELBO"), ("eight_schools", "Trace_ELBO"),
    ("vae", "TraceMeanField_ELBO"), ("gmm_enumerated", "TraceEnum_ELBO"), ("local_guide", "Trace_ELBO"),
])
def test_each_example_right_bound_passes_with_the_loss_chosen_and_said(capsys, example, loss):
    """Catches: a false alarm on a tutorial model written as Pyro writes it (global latents, a latent in
    its own plate, an enumerated assignment, nn.Linear, per-datapoint guide parameters), the loss not
    chosen for the user (TraceEnum_ELBO where the model enumerates, TraceMeanField_ELBO for a closed-form
    KL), or the choice not said."""
    code, out, err = run(EXAMPLES / f"{example}.py", capsys)
    assert code == 0, out + err
    assert f"note: loss: {loss} (K=3), chosen:" in out
    assert_clean(out)


@pytest.mark.parametrize("example, variant, keyword, words", EXAMPLE_SLIPS)
def test_each_example_slip_fails_with_the_slip_named(capsys, example, variant, keyword, words):
    """Catches: a classic slip (KL sign, dropped constant, missing entropy or log-Jacobian, mean vs sum,
    log-mean-exp vs mean of log, a global term counted per datapoint, 1/D) passing, or failing unnamed."""
    code, out, _ = run(f"{EXAMPLES / example}.py:{variant}", capsys)
    assert code == 1, out
    diagnoses = [line for line in out.splitlines() if line.startswith("diagnosis:")]
    assert diagnoses and diagnoses[0].startswith(f"diagnosis: {keyword}:"), diagnoses
    assert words in diagnoses[0], diagnoses
    assert not any(d.startswith("diagnosis: unexplained") for d in diagnoses), diagnoses
    assert_clean(out)


def test_every_example_slip_is_tested():
    """Catches: an example whose docstring promises a slip that no test runs."""
    for example in {e for e, *_ in EXAMPLE_SLIPS}:
        text = (EXAMPLES / f"{example}.py").read_text()
        promised = {line.split(":")[1].split()[0] for line in text.splitlines()
                    if line.strip().startswith(f"ppl-vi check examples/{example}.py:")}
        tested = {v for e, v, *_ in EXAMPLE_SLIPS if e == example}
        assert promised == tested and len(tested) >= 2, (example, promised, tested)


# ------------------------------------------------------------------------------------------------
# global latents and enumerated sites, first class


def test_a_model_that_does_not_vectorise_runs_one_particle_at_a_time_and_says_why(capsys):
    """Catches: nn.Linear on vectorised particles crashing the check ('t() expects a tensor with <= 2
    dimensions'), and the reference-gradient rows, which cannot run for such a model, counted as FAIL
    instead of said."""
    code, out, _ = run(EXAMPLES / "bayesian_regression.py", capsys)
    assert code == 0
    assert "drawn one guide run at a time (with vectorised particles the pair raised RuntimeError: t()" in out
    assert "verdict: PASS [not run: Trace_ELBO (K=3): expected gradient" in out and "rows ran" in out
    assert "draws verified identical, drawn one run at a time" in out


def test_exact_log_likelihood_as_a_total_for_a_global_model(capsys):
    """Catches: exact_log_likelihood refused for a global latent (as 'outside the data plate' or 'expected
    one value per datapoint'); the ladder then runs on the batch's joint bound."""
    code, out, _ = run(EXAMPLES / "coin_fairness.py", capsys)
    assert code == 0
    assert "IWAE_1 equals ELBO (the batch total)" in out and "IWAE_100 <= log p(x)" in out


ENUM_LOCAL = '''
import math
import torch, pyro
import pyro.distributions as dist
from pyro.infer import config_enumerate

DT = torch.float64
PI, MU = torch.tensor([0.3, 0.7], dtype=DT), torch.tensor([-2.0, 2.0], dtype=DT)
batch = {"x": torch.tensor([-2.5, -1.0, 0.3, 1.7, 2.2, 3.1], dtype=DT)}
a = torch.tensor(0.5, dtype=DT, requires_grad=True)

@config_enumerate
def model(x):
    with pyro.plate("data", x.shape[0]):
        c = pyro.sample("c", dist.Categorical(PI))
        z = pyro.sample("z", dist.Normal(MU[c], 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)

def guide(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(a * x, 0.8))

def log_n(v, loc, s):
    return -0.5 * ((v - loc) / s) ** 2 - math.log(s) - 0.5 * math.log(2 * math.pi)

def bound(batch, draws):
    z, x = draws["z"], batch["x"]
    prior = torch.logsumexp(torch.log(PI) + log_n(z.unsqueeze(-1), MU, 1.0), -1)   # log Σ_c π_c N(z; μ_c, 1)
    return (-log_n(x, z, 1.0) - prior + log_n(z, a * x, 0.8) + CONST).mean(0)

def exact_log_likelihood(batch):
    return torch.logsumexp(torch.log(PI) + log_n(batch["x"].unsqueeze(-1), MU, math.sqrt(2.0)), -1)

CONST = 0.0
'''


def test_a_model_enumerated_latent_with_exact_log_likelihood_and_a_named_slip(tmp_path, capsys):
    """Catches: exact_log_likelihood refused because the model-enumerated site 'is not sampled by the
    guide', no diagnosis for a model with an enumerated site, and TraceEnum_ELBO not chosen."""
    code, out, _ = run(user_file(tmp_path, ENUM_LOCAL), capsys)
    assert code == 0, out
    assert "note: loss: TraceEnum_ELBO (K=3), chosen: the model enumerates ['c']" in out
    assert "IWAE_100 <= log p(x)" in out
    code, out, _ = run(user_file(tmp_path, ENUM_LOCAL.replace("CONST = 0.0", "CONST = 0.5 * math.log(2 * math.pi)"),
                                 "slip.py"), capsys)
    assert code == 1
    assert "diagnosis: constant:" in out and "½·log 2π·D, D = 1" in out


def test_formula_for_global_and_enumerated_models(capsys):
    """Catches: --formula refusing any model with a global latent or an enumerated site ('a global latent?')."""
    assert main(["check", str(EXAMPLES / "gmm_enumerated.py"), "--formula"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("−ELBO(data) = Σ_i [E_q(weights, scale, locs | data)[−log Σ_{assignment} Categorical(")
    assert "global latent(s) ['weights', 'scale', 'locs']" in out
    assert main(["check", str(EXAMPLES / "eight_schools.py"), "--formula"]) == 0
    out = capsys.readouterr().out
    assert "Σ_i [" in out and "log LogNormal(tau | μ=φ, σ=φ) − log HalfCauchy(tau | σ=5)" in out
    assert "Normal(obs | μ=f(mu, tau, theta_tilde), σ=f(sigma))" in out


POISSON = '''
import torch, pyro
import pyro.distributions as dist

DT = torch.float64
batch = {"k": torch.tensor([0.0, 3.0, 1.0, 7.0, 2.0, 4.0], dtype=DT)}
loc = torch.tensor(0.5, dtype=DT, requires_grad=True)

def model(k):
    with pyro.plate("data", k.shape[0]):
        log_rate = pyro.sample("log_rate", dist.Normal(torch.zeros_like(k), 1.0))
        pyro.sample("k", dist.Poisson(log_rate.exp()), obs=k)

def guide(k):
    with pyro.plate("data", k.shape[0]):
        pyro.sample("log_rate", dist.Normal(loc + 0.1 * k, 0.5))

def bound(batch, draws):
    u, k = draws["log_rate"], batch["k"]
    log_lik = k * u - u.exp() - torch.lgamma(k + 1) * KEEP
    log_p = dist.Normal(torch.zeros_like(u), 1.0).log_prob(u)
    log_q = dist.Normal(loc + 0.1 * k, 0.5).log_prob(u)
    return (-log_lik + log_q - log_p).mean(0)

KEEP = 1.0
'''


def test_a_data_dependent_constant_is_named(tmp_path, capsys):
    """Catches: -Σ log x! of a Poisson likelihood dropped, reported as 'unexplained' although the residual
    is exactly that constant."""
    code, out, _ = run(user_file(tmp_path, POISSON), capsys)
    assert code == 0, out
    code, out, _ = run(user_file(tmp_path, POISSON.replace("KEEP = 1.0", "KEEP = 0.0"), "slip.py"), capsys)
    assert code == 1
    assert "diagnosis: constant:" in out and "-Σ log x! (the Poisson's normalising constant) of site 'k'" in out


def test_the_statistical_row_catches_a_flipped_global_kl(capsys):
    """Catches: the 'within 4 SE' row passing a flipped sign (independent draws: the SE of two noisy means
    hides it; paired seeds leave the SE of their difference)."""
    code, out, _ = run(f"{EXAMPLES / 'coin_fairness.py'}:flipped_kl", capsys)
    row = next(line for line in out.splitlines() if line.startswith("statistical") and "TraceMeanField" in line)
    assert " FAIL " in row and "paired seeds" in row


def test_expected_gradient_rows_are_named_for_the_loss_not_the_bound(capsys):
    """Catches: rows that do not depend on the bound labelled 'vs bound'."""
    code, out, _ = run(EXAMPLES / "local_guide.py", capsys)
    rows = [line for line in out.splitlines() if line.startswith("expected gradient")]
    assert rows and all("vs bound" not in r and "(K=3): expected gradient" in r for r in rows)


# ------------------------------------------------------------------------------------------------
# unusable files: one line, exit 2, file, line and cause


GOOD = '''
import torch, pyro
import pyro.distributions as dist

batch = {"x": torch.zeros(4, dtype=torch.float64)}
scale = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)

def model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)

def guide(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(torch.zeros_like(x), scale))

def bound(batch, draws):
    z = draws["z"]
    return (dist.Normal(z, 1.0).log_prob(batch["x"]) * 0).mean(0)
'''


@pytest.mark.parametrize("edit, words", [
    (("        pyro.sample(\"x\", dist.Normal(z, 1.0), obs=x)", "        pyro.sample(\"x\", dist.Normal(z.loc, 1.0), obs=x)"),
     ["user.py:LINE: the model (replayed against the guide) raised AttributeError"]),
    (('batch = {"x": torch.zeros(4, dtype=torch.float64)}', 'def batch():\n    return {"x": torch.load("missing.pt")}'),
     ["user.py:LINE: batch() raised FileNotFoundError"]),
    (("def bound(batch, draws):", "def bound(draws):"), ["bound must take bound(batch, draws)"]),
    (('    return (dist.Normal(z, 1.0).log_prob(batch["x"]) * 0).mean(0)', '    return draws["w"]'),
     ["user.py:LINE: bound(batch, draws) raised KeyError: 'w'"]),
    (('pyro.plate("data", x.shape[0]):\n        z', 'pyro.plate("points", x.shape[0]):\n        z'),
     ["in plate(s) ['points'], not in a plate named 'data'", "or set data_plate = 'points'"]),
    (('batch = {"x"', 'max_plate_nesting = 0\nbatch = {"x"'), ["max_plate_nesting = 0, but the pair uses 1"]),
    (('batch = {"x"', 'max_plate_nesting = "one"\nbatch = {"x"'), ["max_plate_nesting must be an integer", "'one'"]),
    (('    return (dist.Normal(z, 1.0).log_prob(batch["x"]) * 0).mean(0)', '    return {}'),
     ["bound(batch, draws) returned a dict with no terms"]),
    (('    return (dist.Normal(z, 1.0).log_prob(batch["x"]) * 0).mean(0)', '    return {"rec": z.mean(0) / 0.0}'),
     ["bound(batch, draws)'s term 'rec' is not finite (nan or inf)"]),
    (('    return (dist.Normal(z, 1.0).log_prob(batch["x"]) * 0).mean(0)', '    return z.mean(0) * float("nan")'),
     ["bound(batch, draws) is not finite (nan or inf)"]),
])
def test_unusable_files_fail_in_one_line_with_exit_2(tmp_path, capsys, edit, words):
    """Catches: a model that raises, batch() raising (a missing data file), a bound with the wrong signature
    or raising, a plate not named 'data', or a wrong max_plate_nesting giving a traceback and exit 1."""
    text = GOOD.replace(*edit)
    assert text != GOOD
    code, out, err = run(user_file(tmp_path, text), capsys)
    assert code == 2, out + err
    line = err.strip()
    assert "\n" not in line and "Traceback" not in line and line.startswith("ppl-vi check: error:"), err
    changed = max((i + 1 for i, t in enumerate(text.splitlines()) if t.strip() and t.strip() in edit[1]
                   and t not in GOOD.splitlines()), default=None)
    for w in words:  # LINE: the (last) line the edit put in, where the user's code raised
        assert w.replace("LINE", str(changed)) in line, line


def test_a_variant_that_is_no_dict_nor_function_is_refused_in_one_line(tmp_path, capsys):
    """Catches: FILE.py:NAME naming a number silently checked as the file's own bound (exit 0 or 1 for the
    wrong thing)."""
    code, out, err = run(f"{user_file(tmp_path, GOOD + 'slip = 3')}:slip", capsys)
    assert code == 2, out + err
    assert "user.py:slip is int '3'; FILE.py:NAME takes a dict of replacements" in err and "\n" not in err.strip()


def test_check_bound_is_the_python_entry_point():
    """Catches: the one-call API (check_bound) disagreeing with the file checker it is built on."""
    import math

    import pyro
    import pyro.distributions as dist
    import torch

    x = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
    loc = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc + 0.5 * x, 0.7))

    def bound(batch, draws, sign=1.0):
        z, x = draws["z"], batch["x"]
        log_n = lambda v, m, s: -0.5 * ((v - m) / s) ** 2 - math.log(s) - 0.5 * math.log(2 * math.pi)  # noqa: E731
        return {"rec": -log_n(x, z, 1.0).mean(0), "kl": sign * (log_n(z, loc + 0.5 * x, 0.7) - log_n(z, 0.0, 1.0)).mean(0)}

    right = check_bound(model, guide, bound, {"x": x}, repeats=4, gradient_seeds=2)
    assert right.passed and not right.verdicts, right.table()
    wrong = check_bound(model, guide, lambda b, d: bound(b, d, -1.0), {"x": x}, repeats=4, gradient_seeds=2)
    assert not wrong.passed and wrong.verdicts[0].startswith("sign:")


def test_the_readme_user_file_example_passes(tmp_path, capsys):
    """Catches: the README's complete user file drifting from what the checker accepts (a doc a Pyro user
    copies must pass as written)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("### The checker, on your own file"):]
    code = section[section.index("```python") + len("```python"):]
    code = code[:code.index("```")]
    result, out, err = run(user_file(tmp_path, code, "readme_coin.py"), capsys)
    assert result == 0, out + err
    assert "global latent(s) ['f']" in out and "verdict: PASS" in out


CATEGORICAL_GUIDE = '''
import math, torch, pyro
import pyro.distributions as dist

DT = torch.float64
MU = torch.tensor([-2.0, 2.0], dtype=DT)
batch = {"x": torch.tensor([-2.2, 1.7, 0.3, 2.5, -1.1], dtype=DT)}
w = torch.tensor(0.8, dtype=DT, requires_grad=True)

def model(x):
    with pyro.plate("data", len(x)):
        c = pyro.sample("c", dist.Categorical(torch.tensor([0.4, 0.6], dtype=DT)))
        pyro.sample("x", dist.Normal(MU[c], 1.0), obs=x)

def guide(x):
    with pyro.plate("data", len(x)):
        p1 = torch.sigmoid(w * x)
        pyro.sample("c", dist.Categorical(torch.stack([1 - p1, p1], -1)))

def bound(batch, draws):
    c, x = draws["c"], batch["x"]
    p1 = torch.sigmoid(w * x)
    log_q = torch.where(c == 1, p1.log(), (1 - p1).log())
    log_p = torch.where(c == 1, torch.tensor(0.6, dtype=DT).log(), torch.tensor(0.4, dtype=DT).log())
    return (0.5 * (x - MU[c]) ** 2 + 0.5 * math.log(2 * math.pi) + SIGN * (log_q - log_p)).mean(0)

SIGN = 1.0
'''


def test_a_sampled_discrete_guide_site_is_no_false_alarm(tmp_path, capsys):
    """Catches: a right bound failing its same-sample gradient row for a guide with a discrete site (Pyro's
    gradient holds a score-function term no value has), and TraceMeanField_ELBO, which needs rsample, held
    against it; the gradient is checked by the exact expected-gradient rows instead."""
    code, out, _ = run(user_file(tmp_path, CATEGORICAL_GUIDE), capsys)
    assert code == 0, out
    assert "have no rsample: Pyro's gradient adds a score-function term" in out
    assert "TraceMeanField" not in out.split("note: particles")[1]
    assert "expectation over 8 tuples x 5 datapoints, exact vs reference" in out
    code, out, _ = run(user_file(tmp_path, CATEGORICAL_GUIDE.replace("SIGN = 1.0", "SIGN = -1.0"), "slip.py"), capsys)
    assert code == 1 and "diagnosis: sign:" in out and "of site 'c' (log q - log p) has its sign flipped" in out


def test_the_checkers_own_exception_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    """Catches: a bug of the checker on some user file printing a traceback (exit 1, like a failed check)
    instead of one line that says it is the checker's failure (exit 2)."""
    import ppl_vi.cli as cli

    def broken(*args, **kwargs):
        raise RuntimeError("an internal bug")

    monkeypatch.setattr(cli, "check_pair", broken)
    code, out, err = run(user_file(tmp_path, GOOD), capsys)
    assert code == 2 and out == ""
    line = err.strip()
    assert "\n" not in line and "the checker itself failed on this file (RuntimeError: an internal bug)" in line


# ------------------------------------------------------------------------------------------------
# second round: slips at several sites, a sampled discrete guide site with closed-form KLs

USERFILES = Path(__file__).resolve().parent / "data" / "userfiles"


@pytest.mark.parametrize("variant, keyword, words", [
    ("nojac", "missing log-Jacobian", ["[s1] + ", "[s2]"]),
    ("nojac_total", "missing log-Jacobian", ["[s1] + ", "[s2]"]),
    ("noent", "missing entropy", ["log q(s1|x) [s1] (minus the entropy) + log q(s2|x) [s2]"]),
    ("noent_total", "missing entropy", ["[s1]", "[s2]", "[z]"]),
    ("lik_mean", "scale", ["of sites ['x', 'y']", "1/B = 1/6"]),
    ("both_mean", "scale", ["of sites ['x', 'y', 'z']", "1/B = 1/6"]),
])
def test_a_slip_at_two_sites_at_once_is_named(capsys, variant, keyword, words):
    """Catches: a slip made at two or more sites at once (a missing log-Jacobian on two LogNormal guides, the
    entropy of two guide sites left out, two per-datapoint sites averaged over the batch) diagnosed as
    'unexplained': the diagnosis held the residual against one site's piece at a time."""
    code, out, _ = run(f"{USERFILES / 'two_scales.py'}:{variant}", capsys)
    assert code == 1, out
    diagnoses = [line for line in out.splitlines() if line.startswith("diagnosis:")]
    assert not any("unexplained" in d for d in diagnoses), diagnoses
    hit = [d for d in diagnoses if d.startswith(f"diagnosis: {keyword}:")]
    assert hit, diagnoses
    for w in words:
        assert any(w in d for d in hit), (w, hit)


def test_a_slip_at_two_sites_leaves_the_right_bound_alone(capsys):
    """Catches: sums of pieces matching a right bound's rounding (the combinations must not fire on PASS)."""
    code, out, _ = run(USERFILES / "two_scales.py", capsys)
    assert code == 0, out
    assert "diagnosis:" not in out


@pytest.mark.parametrize("variant", [None, "whole"])
def test_a_sampled_discrete_guide_site_with_closed_form_kls_passes(capsys, variant):
    """Catches: a right bound with the closed-form KL of a guide site without rsample (a Bernoulli switch)
    failing against Trace_ELBO's sampled terms (TraceMeanField_ELBO was ruled out for lack of rsample), and
    torch's Bernoulli KL raising on a particle dim (the particles then drawn one run at a time)."""
    target = USERFILES / "discrete_guide.py"
    code, out, _ = run(f"{target}:{variant}" if variant else target, capsys)
    assert code == 0, out
    assert "TraceMeanField_ELBO (K=3), chosen" in out and "no rsample" in out
    assert "drawn in one vectorised run" in out
    assert re.search(r"^expected gradient +Trace_ELBO \(K=3\): expected gradient: pc .* ok ", out, re.M), out
    assert_clean(out)


@pytest.mark.parametrize("variant, keyword, words", [
    ("flip_c", "sign", ["term 'kl_c'"]),
    ("no_kl_c", "missing term", ["site 'c' (KL(q || p) in closed form)"]),
    ("dropped_constant", "constant", ["½·log 2π·D, D = 1 (the size of site 'x')"]),
])
def test_a_sampled_discrete_guide_site_slip_is_named(capsys, variant, keyword, words):
    """Catches: the closed-form KL of a discrete guide site (flipped, left out) unnamed, or held against all
    latent sites together (a term named 'kl_c' is site c's)."""
    code, out, _ = run(f"{USERFILES / 'discrete_guide.py'}:{variant}", capsys)
    assert code == 1, out
    diagnoses = [line for line in out.splitlines() if line.startswith("diagnosis:")]
    assert len(diagnoses) == 1 and diagnoses[0].startswith(f"diagnosis: {keyword}:"), diagnoses
    for w in words:
        assert w in diagnoses[0], diagnoses


def test_a_global_factor_is_a_term_of_the_batch(capsys):
    """Catches: a model with pyro.factor outside the data plate (a penalty on a global latent) refused, or its
    expected-gradient rows not run; its formula calling the factor a latent."""
    target = USERFILES / "global_factor.py"
    code, out, _ = run(target, capsys, "--gradient-seeds", "4")
    assert code == 0, out
    assert "term 'soft' = Pyro's site 'soft' (global): -soft (the pyro.factor's value)" in out
    assert re.search(r"^expected gradient +Trace_ELBO \(K=3\): expected gradient: m .* ok ", out, re.M), out
    assert "not run" not in out
    code, out, _ = run(target, capsys, "--formula")
    assert code == 0 and "global latent(s) ['mu'] and factor(s) ['soft']" in out, out


@pytest.mark.parametrize("variant, words", [
    ("flipped_factor", ["sign:", "term 'soft'"]),
    ("factor_per_datapoint", ["scale:", "site 'soft'", "B = 6: a global latent's term counted once per datapoint"]),
    ("no_factor", ["missing term:", "term 'soft' is zero"]),
])
def test_a_global_factor_slip_is_named(capsys, variant, words):
    """Catches: a global factor's slips (sign, counted per datapoint, left out) unnamed; a zero term reported
    as '0 × Pyro's (no known factor matched)'."""
    code, out, _ = run(f"{USERFILES / 'global_factor.py'}:{variant}", capsys)
    assert code == 1, out
    diagnoses = [line for line in out.splitlines() if line.startswith("diagnosis:")]
    assert len(diagnoses) == 1, diagnoses
    for w in words:
        assert w in diagnoses[0], diagnoses


def test_a_global_factor_without_a_global_latent_is_refused_in_one_line(tmp_path, capsys):
    """Catches: a factor outside the data plate in a model of local latents only crashing or held per datapoint."""
    text = GOOD.replace("def model(x):\n", "def model(x):\n    pyro.factor(\"reg\", -scale ** 2)\n")
    code, out, err = run(user_file(tmp_path, text), capsys)
    assert code == 2, out + err
    assert "the factor(s) ['reg'] (pyro.factor) lie outside the data plate 'data' but no latent does" in err


def test_subsample_size_drawing_from_the_batch_is_refused_naming_what_works(tmp_path, capsys):
    """Catches: Pyro's tutorial pyro.plate('data', N, subsample_size=B) over the whole data set refused with
    a bare size mismatch (the bound cannot see the random indices; the README's way is subsample=)."""
    text = """
    import torch, pyro
    import pyro.distributions as dist

    batch = {"x": torch.zeros(4, dtype=torch.float64)}

    def model(x):
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0))
        with pyro.plate("data", len(x), subsample_size=2) as ind:
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x[ind])

    def guide(x):
        pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0))

    def bound(batch, draws):
        return draws["mu"].sum()
    """
    code, out, err = run(user_file(tmp_path, text), capsys)
    assert code == 2, out + err
    assert "pyro.plate('data', 4, subsample_size=2) draws 2 of the batch's 4 datapoints at random" in err
    assert "subsample=torch.arange(B)" in err


COIN_IWAE = '''
import math

def iwae_bound(batch, draws):
    f = draws["latent_fairness"]
    x = batch["data"]
    log_lik = dist.Bernoulli(f.unsqueeze(-1)).log_prob(x)                                  # (K, B)
    log_prior = dist.Beta(torch.tensor(ALPHA0, dtype=DT), torch.tensor(BETA0, dtype=DT)).log_prob(f)
    log_q = dist.Beta(pyro.param("alpha_q"), pyro.param("beta_q")).log_prob(f)
    log_w = log_lik.sum(-1) + log_prior - log_q                                            # (K,): joint
    return -(torch.logsumexp(log_w, 0) - math.log(log_w.shape[0]))

def _per_point(batch, draws):
    f = draws["latent_fairness"]
    log_lik = dist.Bernoulli(f.unsqueeze(-1)).log_prob(batch["data"])                      # (K, B)
    return -(torch.logsumexp(log_lik, 0) - math.log(log_lik.shape[0]))                     # (B,): wrong

per_point = {"iwae_bound": _per_point}
'''


def test_a_global_models_iwae_bound_is_joint_and_a_per_datapoint_one_named(tmp_path, capsys):
    """Catches: the README's iwae_bound convention for a global latent (joint over the batch, ()) not holding;
    a (B,) IWAE bound reported as 'expected (1,), one value per datapoint' beside a failing decomposition row
    (the checker's own: no row held Pyro's total)."""
    path = user_file(tmp_path, (EXAMPLES / "coin_fairness.py").read_text() + COIN_IWAE, "coin.py")
    code, out, _ = run(path, capsys)
    assert code == 0, out
    assert re.search(r"^same sample +IWAELoss \(K=3\) vs iwae_bound: loss .* ok ", out, re.M), out
    code, out, _ = run(f"{path}:per_point", capsys)
    assert code == 1, out
    assert "IWAELoss (K=3): Pyro's loss = the sum of its site terms" not in out
    diagnoses = [line for line in out.splitlines() if line.startswith("diagnosis:")]
    assert diagnoses == ["diagnosis: per datapoint: IWAELoss (K=3): the bound returns shape (10,); with global "
                         "latents it is one number for the batch, shape (): an IWAE bound per datapoint, but a "
                         "global latent ties the datapoints together; the bound is -log (1/K) Σ_k Π_i w_ik · (the "
                         "global terms)_k, joint over the batch"], diagnoses


@pytest.mark.parametrize("variant, words", [
    ("kl_mean", ["per datapoint:", "the local latents ['a', 'b']", "averaged over the batch"]),
    ("kl_mean_named", ["per datapoint:", "the term 'kl' is averaged over the batch"]),
    ("noent2", ["missing entropy:", "log q(a|x) [a] (minus the entropy) + log q(b|x) [b]"]),
])
def test_a_batch_mean_or_missing_entropy_at_two_local_sites_is_named(capsys, variant, words):
    """Catches: two per-datapoint sites' terms averaged over the batch (the mean given to each datapoint) or
    both sites' entropies left out reported as 'unexplained' (and the loss chosen by the residual's spread)."""
    code, out, _ = run(f"{USERFILES / 'two_local.py'}:{variant}", capsys)
    assert code == 1, out
    assert "loss: Trace_ELBO (K=3), chosen" in out
    diagnoses = [line for line in out.splitlines() if line.startswith("diagnosis:")]
    assert len(diagnoses) == 1, diagnoses
    for w in words:
        assert w in diagnoses[0], diagnoses


def test_an_autoguide_is_no_false_alarm_and_its_missing_jacobian_is_named(capsys):
    """Catches: an AutoNormal guide (an auxiliary site the model does not sample, a Delta at the latent) failing
    a right bound: the structure row refusing the auxiliary site, its log q left out of Pyro's terms, the
    Delta's "KL" taken for a closed form (TraceMeanField_ELBO's mean then held against the bound), the
    formula crashing; and the dropped log-Jacobian of its transform named."""
    target = USERFILES / "coin_autonormal.py"
    code, out, _ = run(target, capsys)
    assert code == 0, out
    assert "loss: Trace_ELBO (K=3), chosen" in out and "TraceMeanField" not in out
    code, out, _ = run(f"{target}:nojac", capsys)
    assert code == 1, out
    diagnoses = [line for line in out.splitlines() if line.startswith("diagnosis:")]
    assert len(diagnoses) == 1 and diagnoses[0].startswith("diagnosis: missing log-Jacobian:"), diagnoses
    assert "log|df/du| of the guide's transform [f]" in diagnoses[0]
    code, out, _ = run(target, capsys, "--formula")
    assert code == 0 and "E_q(f | data)[log Normal(f_unconstrained | μ=φ, σ=φ)]" in out, out
