"""`ppl-vi check FILE.py`: a user's own file checked term by term, each classic mistake named.

The file under test is examples/conjugate_normal.py, written as a user would (module-level model,
guide, bound, iwae_bound, batch, exact_log_likelihood), with a minibatch scale N/B = 62.5 from a
subsampled plate. Its right bounds must pass with no diagnosis; each broken variant must fail with
a verdict naming its mistake; and each diagnosis is also held on its own, on hand values built from
the example's log-densities on the checker's draws, beside a correct value on which it must not fire.
"""

from __future__ import annotations

import math
from pathlib import Path

import pyro
import pytest
import torch

from ppl_vi.check.diagnose import diagnose, residual_verdicts
from ppl_vi.check.formula import bound_formula
from ppl_vi.check.terms import site_terms
from ppl_vi.check.userfile import _grads_agree, check_pair, load_target, make_pair
from ppl_vi.cli import main
from ppl_vi.report import formula_image, render_check_page

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "conjugate_normal.py"
FAST = dict(repeats=6, gradient_seeds=3)
K = 3


@pytest.fixture(scope="module")
def pair():
    return load_target(str(EXAMPLE))


@pytest.fixture(scope="module")
def example(pair):
    return pair.module


@pytest.fixture()
def terms(pair):
    return site_terms(pair.model, pair.guide, pair.batch, K, 1, seed=0)


def _pieces(example, pair, terms):
    """log p(x|μ), log p(μ), log q(μ|x), each (K, B), at the checker's draws, from the example's own code."""
    return example.log_terms(pair.batch["x"], terms.draws["mu"])


# ------------------------------------------------------------------------------------------------
# the file, end to end


def test_right_bounds_pass_with_no_diagnosis(pair):
    report = check_pair(pair, **FAST)
    assert report.passed, report.table()
    assert report.verdicts == []
    names = [r.name for r in report.rows]
    assert "Trace_ELBO (K=3): term 'rec' = Pyro's site 'x': -log p(x|mu)" in names  # matched by name hint
    assert any("decomposition" in n for n in names)
    assert any(r.kind == "ground truth" for r in report.rows)  # exact_log_likelihood was used
    assert "Normal(x | μ=f(mu), σ=0.5)" in report.formula["text"]


@pytest.mark.parametrize("variant, keyword, words", [
    ("dropped_constant", "constant", ["½·log 2π·D, D = 5 (the size of site 'x')", "N/B = 62.5",
                                      "the gradients agree"]),
    ("flipped_kl", "sign", ["term 'kl'", "sign is flipped"]),
    ("scale_inside", "scale", ["N/B = 62.5 inside the log-mean-exp"]),
    ("per_particle", "per datapoint", ["(K, B) = (3, 16)", "averaged over the particles it equals Pyro's"]),
])
def test_each_broken_variant_fails_and_names_its_mistake(variant, keyword, words):
    report = check_pair(load_target(f"{EXAMPLE}:{variant}"), **FAST)
    assert not report.passed
    assert len(report.verdicts) == 1, report.verdicts
    verdict = report.verdicts[0]
    assert verdict.startswith(keyword + ":"), verdict
    for w in words:
        assert w in verdict, verdict
    assert f"diagnosis: {verdict}" in report.table()


def test_all_four_mistakes_in_one_file_are_each_named():
    report = check_pair(load_target(f"{EXAMPLE}:all_four"), **FAST)
    keywords = sorted(v.split(":")[0] for v in report.verdicts)
    assert keywords == ["constant", "per datapoint", "scale", "sign"], report.verdicts


def test_cli_exit_codes_and_one_line_errors(tmp_path, capsys):
    assert main(["check", str(EXAMPLE), "--repeats", "4", "--gradient-seeds", "2"]) == 0
    out = capsys.readouterr().out
    assert "verdict: PASS" in out and "diagnosis:" not in out
    assert main(["check", f"{EXAMPLE}:flipped_kl", "--repeats", "4", "--gradient-seeds", "2"]) == 1
    assert "diagnosis: sign:" in capsys.readouterr().out
    broken = tmp_path / "user.py"
    broken.write_text("import torch\nbatch = {'x': torch.zeros(3)}\ndef model(x):\n    pass\n")
    assert main(["check", str(broken)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "guide(**batch)" in err[0] and "bound(batch, draws)" in err[0]
    assert main(["check", str(tmp_path / "absent.py")]) == 2
    assert "no such file" in capsys.readouterr().err
    raising = tmp_path / "raising.py"
    raising.write_text("raise RuntimeError('boom')\n")
    assert main(["check", str(raising)]) == 2
    assert "RuntimeError: boom" in capsys.readouterr().err


def test_formula_flag_prints_text_and_latex(capsys):
    assert main(["check", str(EXAMPLE), "--formula"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("−ELBO(x) = N/B × (E_q(mu | x)[−log Normal(x | μ=f(mu), σ=0.5)] + "
                          "E_q(mu | x)[log Normal(mu | μ=g(x), σ=φ) − log Normal(mu | μ=0, σ=1.5)])")
    assert r"\mathbb{E}_{q(\mathrm{mu}\mid \mathrm{x})}" in out
    assert "−IWAE_K(x) = −N/B × log (1/K) Σ_k" in out


def test_html_page_shows_the_formula_as_an_image_and_the_diagnosis(tmp_path):
    out = tmp_path / "check.html"
    assert main(["check", f"{EXAMPLE}:dropped_constant", "--repeats", "4", "--gradient-seeds", "2",
                 "--html", str(out)]) == 1
    page = out.read_text()
    assert "data:image/svg+xml;base64," in page and "<script" not in page.lower() and "<link" not in page.lower()
    assert "The objective Pyro optimises" in page and "Diagnosis" in page and "constant:" in page


def test_formula_image_is_self_contained_svg():
    tag = formula_image(r"-\mathrm{ELBO} = \mathbb{E}_{q}[\log \frac{p}{q}]")
    assert tag is not None and tag.startswith("<img") and "svg+xml" in tag
    assert formula_image(r"\frac{") is None  # unparsable: no image, the text stands alone
    page = render_check_page({"passed": True, "rows": [], "formula": {"text": "t", "latex": r"\frac{\{"}}, "t")
    assert "<pre>t</pre>" in page


# ------------------------------------------------------------------------------------------------
# each diagnosis on its own, and not on a correct value


def test_no_diagnosis_on_the_right_values(example, pair, terms):
    assert diagnose("elbo", terms.negative_elbo(), terms, "elbo") == []
    assert diagnose("iwae", terms.negative_iwae(), terms, "iwae") == []
    log_lik, log_prior, log_q = _pieces(example, pair, terms)
    by_hand = example.C * (log_q - log_prior - log_lik).mean(0)
    assert diagnose("elbo", by_hand, terms, "elbo") == []


def test_whole_sign_and_scales(terms):
    ref = terms.negative_elbo()
    sign = diagnose("L", -ref, terms, "elbo")
    assert sign[0].startswith("sign:") and "returns the bound, not the negative bound" in sign[0]
    twice = diagnose("L", terms.c * ref, terms, "elbo")
    assert twice[0].startswith("scale:") and "N/B = 62.5: the minibatch scale applied twice" in twice[0]
    unscaled = diagnose("L", ref / terms.c, terms, "elbo")
    assert unscaled[0].startswith("scale:") and "left out" in unscaled[0]
    summed = diagnose("L", K * ref, terms, "elbo")
    assert summed[0].startswith("scale:") and "K = 3: a sum over the particles" in summed[0]
    batch_sum = diagnose("L", ref.sum(), terms, "elbo")
    assert batch_sum[0].startswith("per datapoint:") and "sum over the batch" in batch_sum[0]
    batch_mean = diagnose("L", ref.mean(), terms, "elbo")
    assert "mean over the batch" in batch_mean[0]


def test_one_term_flipped_missing_or_scaled(example, pair, terms):
    log_lik, log_prior, log_q = _pieces(example, pair, terms)
    c = example.C
    rec, kl = c * (-log_lik).mean(0), c * (log_q - log_prior).mean(0)
    flipped = diagnose("L", rec - kl, terms, "elbo")
    assert flipped[0].startswith("sign:") and "site 'mu'" in flipped[0]
    no_entropy = diagnose("L", rec + c * (-log_prior).mean(0), terms, "elbo")
    assert no_entropy[0].startswith("missing entropy:"), no_entropy
    beta = diagnose("L", rec + 2 * kl, terms, "elbo")
    assert beta[0].startswith("scale:") and "multiplied by 2" in beta[0], beta


def test_constant_with_and_without_gradient_evidence(example, pair, terms):
    log_lik, log_prior, log_q = _pieces(example, pair, terms)
    c, d = example.C, example.D
    params = [example.a, example.b, example.log_s]
    ref = terms.negative_elbo()
    dropped = c * (-(log_lik + 0.5 * d * math.log(2 * math.pi)) + log_q - log_prior).mean(0)
    agree = _grads_agree(dropped, ref, params, 1e-6)
    verdict = diagnose("L", dropped, terms, "elbo", grads_agree=agree)[0]
    assert agree and verdict.startswith("constant:") and "the gradients agree" in verdict
    # log q(μ|x) without its -D log s: the same at every datapoint, but it moves log s
    no_log_s = c * (-log_lik + (log_q + d * example.log_s) - log_prior).mean(0)
    agree = _grads_agree(no_log_s, ref, params, 1e-6)
    verdict = diagnose("L", no_log_s, terms, "elbo", grads_agree=agree)[0]
    assert agree is False and verdict.startswith("constant:") and "the gradients differ" in verdict


def test_iwae_jensen_and_scale_confusions(terms):
    log_w, c = terms.log_weights, terms.c
    mean_of_log = diagnose("I", -c * log_w.mean(0), terms, "iwae")
    assert mean_of_log[0].startswith("log-mean-exp:") and "mean of log w" in mean_of_log[0]
    no_k = diagnose("I", -c * torch.logsumexp(log_w, 0), terms, "iwae")
    assert no_k[0].startswith("log-mean-exp:") and "without the 1/K" in no_k[0]
    lme_as_elbo = diagnose("E", terms.negative_iwae(), terms, "elbo")
    assert lme_as_elbo[0].startswith("log-mean-exp:") and "where the ELBO averages" in lme_as_elbo[0]
    per_particle = diagnose("I", -c * log_w, terms, "iwae")
    assert per_particle[0].startswith("per datapoint:") and "not their mean" in per_particle[0]


def test_unexplained_residual_says_so(terms):
    ref = terms.negative_elbo()
    noisy = ref + torch.linspace(0, 1, ref.numel(), dtype=ref.dtype) ** 2
    verdict = residual_verdicts("L", noisy, ref, terms, {}, 1e-6)[0]
    assert verdict.startswith("unexplained:") and "datapoints [1, 2" in verdict


def test_terms_matched_by_site_name_and_missing_term_named(example, pair):
    def by_site(batch, draws):
        log_lik, log_prior, log_q = example.log_terms(batch["x"], draws["mu"])
        return {"x": example.C * (-log_lik).mean(0), "mu": example.C * (log_q - log_prior).mean(0)}

    def rec_only(batch, draws):
        log_lik, _, _ = example.log_terms(batch["x"], draws["mu"])
        return {"rec": example.C * (-log_lik).mean(0)}

    base = {"model": pair.model, "guide": pair.guide, "batch": pair.batch}
    report = check_pair(make_pair("t", {**base, "bound": by_site}), **FAST)
    assert report.passed and any("term 'mu' = Pyro's site 'mu'" in r.name for r in report.rows), report.table()
    report = check_pair(make_pair("t", {**base, "bound": rec_only}), **FAST)
    assert not report.passed
    assert any(v.startswith("missing term:") and "site 'mu'" in v for v in report.verdicts), report.verdicts


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_unscaled_model_constant_is_half_log_2pi(dtype):
    """No subsampling (N/B = 1), a scalar latent: a dropped ½ log 2π is named with D = 1 (float32: looser
    tolerances, same verdict)."""
    import pyro.distributions as dist

    w = torch.tensor(0.5, dtype=dtype, requires_grad=True)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros((), dtype=dtype), 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(w * x, 0.8))

    def bound(batch, draws):
        x, z = batch["x"], draws["z"]
        log_lik = -0.5 * (x - z) ** 2  # the -½ log 2π dropped
        log_prior = -0.5 * z**2 - 0.5 * math.log(2 * math.pi)
        log_q = torch.distributions.Normal(w * x, 0.8).log_prob(z)
        return (log_q - log_prior - log_lik).mean(0)

    batch = {"x": torch.linspace(-1, 2, 6, dtype=dtype)}
    report = check_pair(make_pair("t", dict(model=model, guide=guide, bound=bound, batch=batch)), **FAST)
    assert len(report.verdicts) == 1 and report.verdicts[0].startswith("constant:"), report.verdicts
    assert "-0.9189" in report.verdicts[0] and "D = 1 (the size of site 'x')" in report.verdicts[0]
    assert "N/B" not in report.verdicts[0]
    assert bound_formula(model, guide, batch)["text"].startswith("−ELBO(x) = E_q(z | x)[−log Normal(x | μ=f(z), σ=1)]")


def test_closed_form_kl_is_held_against_trace_meanfield_on_the_same_sample(example, pair):
    """A bound with KL(q || p) in closed form matches TraceMeanField_ELBO draw for draw (Trace_ELBO then only
    on average); the term rows compare the 'kl' term with the closed-form KL."""
    def analytic(batch, draws):
        x, mu = batch["x"], draws["mu"]
        log_lik, _, _ = example.log_terms(x, mu)
        q = torch.distributions.Normal(example.a * x + example.b, example.log_s.exp())
        p = torch.distributions.Normal(torch.zeros_like(x), example.TAU)
        return {"rec": example.C * (-log_lik).mean(0), "kl": example.C * torch.distributions.kl_divergence(q, p).sum(-1)}

    report = check_pair(make_pair("t", {"model": pair.model, "guide": pair.guide, "batch": pair.batch,
                                        "bound": analytic}), **FAST)
    assert report.passed, report.table()
    same = {r.name.split(":")[0] for r in report.rows if r.kind == "same sample"}
    assert "TraceMeanField_ELBO (K=3) vs bound" in same and "Trace_ELBO (K=3) vs bound" not in same
    assert any("KL(q || p) in closed form" in r.name for r in report.rows if r.kind == "term")
    assert any(r.kind == "statistical" and r.name.startswith("Trace_ELBO") for r in report.rows)


def test_formula_of_a_built_in_model(capsys):
    assert main(["check", "linear-gaussian", "--formula"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("−ELBO(x) = E_q(z | x)[−log Normal(x | μ=f(z), σ=θ)] + "
                          "E_q(z | x)[log Normal(z | μ=g(x), σ=φ) − log Normal(z | μ=0, σ=1)]"), out


def test_a_file_with_a_latent_model_class_is_checked_as_a_built_in_model(tmp_path, capsys):
    student = EXAMPLE.parent / "student_t_fa.py"
    cls = load_target(str(student))
    assert cls.__name__ == "StudentTFactorAnalysis" and load_target(f"{student}:StudentTFactorAnalysis").__name__ == cls.__name__
    assert main(["check", str(student), "--formula"]) == 0  # resolved through the registry entry it made
    assert "StudentT(x | ν=θ, μ=f(z), σ=θ)" in capsys.readouterr().out
    unregistered = tmp_path / "mine.py"
    unregistered.write_text("from ppl_vi.models.base import LatentModel\nclass Mine(LatentModel):\n    pass\n")
    assert main(["check", f"{unregistered}:Mine"]) == 2
    assert "Mine is not registered" in capsys.readouterr().err


def test_a_files_own_loss_renyi_puts_the_scale_inside(example, pair):
    """``losses`` replaces the defaults; Pyro's RenyiELBO(α=0) puts N/B inside the log-mean-exp, so it matches
    the scale-inside bound and not the right one, and the verdict says that the loss itself is the culprit."""
    from ppl_vi.objectives.losses import RenyiLoss

    renyi = {"RenyiELBO": RenyiLoss(alpha=0, num_particles=K, vectorize_particles=True, max_plate_nesting=1)}
    base = {"model": pair.model, "guide": pair.guide, "batch": pair.batch, "bound": pair.bound, "losses": renyi}
    right = check_pair(make_pair("t", {**base, "iwae_bound": example.iwae_bound}), **FAST)
    assert not right.passed
    assert right.verdicts[0].startswith("scale: RenyiELBO (K=3) itself puts the minibatch scale N/B = 62.5 inside")
    inside = check_pair(make_pair("t", {**base, "iwae_bound": example._iwae_scale_inside}), **FAST)
    assert all(r.passed for r in inside.rows if r.kind == "same sample" and "decomposition" not in r.name)
    assert any("inside the log-mean-exp" in v and "hand bound" in v for v in inside.verdicts), inside.verdicts


def test_two_mistakes_in_one_tensor_a_flipped_kl_and_a_dropped_constant(example, pair, terms):
    log_lik, log_prior, log_q = _pieces(example, pair, terms)
    c, d = example.C, example.D
    both = c * (-(log_lik + 0.5 * d * math.log(2 * math.pi)) - (log_q - log_prior)).mean(0)
    verdicts = diagnose("L", both, terms, "elbo")
    assert [v.split(":")[0] for v in verdicts] == ["sign", "constant"], verdicts
    assert "site 'mu'" in verdicts[0] and "D = 5 (the size of site 'x')" in verdicts[1]


def test_a_latent_model_with_a_wrong_log_terms_gets_a_verdict_from_check_model():
    """The built-in path (check_model: every loss the model trains with) names the mistake too, and says
    nothing for the right log_terms."""
    import pyro.distributions as dist
    from torch import nn

    from ppl_vi import bounds
    from ppl_vi.check import check_model
    from ppl_vi.models.base import LatentModel

    class Scalar(LatentModel):
        has_analytic_kl = True

        def __init__(self, drop_constant: bool):
            super().__init__()
            self.w = nn.Parameter(torch.tensor([0.5]))
            self.log_s = nn.Parameter(torch.tensor([-0.3]))
            self.drop_constant = drop_constant

        def model(self, x, **_):
            with pyro.plate("data", x.shape[0]):
                z = pyro.sample("z", dist.Normal(x.new_zeros(1), 1.0).to_event(1))
                pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

        def guide(self, x, **_):
            with pyro.plate("data", x.shape[0]):
                pyro.sample("z", dist.Normal(self.w * x, self.log_s.exp()).to_event(1))

        def log_terms(self, batch, draws):
            x, z = batch["x"], draws["z"]
            log_lik = bounds.log_normal(x, z, torch.ones_like(z))
            if self.drop_constant:
                log_lik = log_lik + 0.5 * bounds.LOG_2PI
            return (log_lik, bounds.log_normal(z, torch.zeros_like(z), torch.ones_like(z)),
                    bounds.log_normal(z, self.w * x, self.log_s.exp().expand_as(z)))

        def kl_to_prior(self, batch):
            loc = self.w * batch["x"]
            return bounds.kl_normal(loc, self.log_s.exp().expand_as(loc), torch.zeros_like(loc), torch.ones_like(loc))

    batch = {"x": torch.linspace(-1, 1, 5).unsqueeze(-1)}
    kw = dict(repeats=4, gradient_seeds=2, ks=(1, 10), ladder_repeats=2)
    right = check_model(Scalar(False), batch, **kw)
    assert right.verdicts == [], right.verdicts
    wrong = check_model(Scalar(True), batch, **kw)
    constants = [v for v in wrong.verdicts if v.startswith("constant:")]
    assert constants and all("D = 1 (the size of site 'x')" in v for v in constants)
    assert len(constants) == 1 and constants[0].startswith("constant: trace (K=3), meanfield (K=3), stl (K=3)")
    assert "the gradients agree" in constants[0]
