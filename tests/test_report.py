"""The HTML run report: contents, self-containedness, and a render in a real (headless) browser."""

import base64
import html as htmllib
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from ppl_vi import check_bound
from ppl_vi.check.userfile import load_target
from ppl_vi.cli import main

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium():
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny trained GMM run, evaluated (bound-vs-k figure) and checked (check.json), then reported."""
    out = tmp_path_factory.mktemp("report") / "gmm"
    assert main(["train", "gmm", "--device", "cpu", "--n-train", "300", "--n-test", "200", "--epochs", "2",
                 "--out", str(out), "--no-progress"]) == 0
    assert (out / "report.html").is_file(), "ppl-vi train writes the report at the end of training"
    assert main(["eval", str(out), "--k", "1,10", "--no-progress"]) == 0
    assert main(["check", "gmm", "--batch-size", "8", "--repeats", "2", "--json", str(out / "check.json")]) == 0
    assert main(["report", str(out)]) == 0
    return out


def test_report_is_self_contained_and_complete(run_dir):
    html = (run_dir / "report.html").read_text()
    pngs = sorted((run_dir / "figures").glob("*.png"))
    assert {p.stem for p in pngs} >= {"training_curves", "gmm_density", "bound_vs_k"}
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(embedded) == len(pngs)
    assert sorted(base64.b64decode(e) for e in embedded) == sorted(p.read_bytes() for p in pngs)
    # nothing loaded from anywhere else, no scripts
    assert "<script" not in html.lower() and "<link" not in html.lower()
    assert not re.search(r'(src|href)="(?!data:)', html)
    # the sections
    for text in ("Metrics", "Figures", "History", "Consistency check: passed", "Configuration", "final_train_loss",
                 "-IWAE_10 (test)", "test_log_likelihood", "TraceEnum_ELBO", "check passed", "lr"):
        assert text in html, text


def test_report_shows_the_objective_as_a_formula(run_dir):
    """check.json carries the objective Pyro optimises; the report typesets it (SVG, no TeX, no network)."""
    html = (run_dir / "report.html").read_text()
    assert "The objective Pyro optimises" in html and 'src="data:image/svg+xml;base64,' in html
    assert "−ELBO(x) = E_q(c | x)[−log Normal(x | μ=f(c), σ=θ)]" in html


def test_report_without_check_says_how(tmp_path, run_dir):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "check.json").unlink()
    assert main(["report", str(copy)]) == 0
    html = (copy / "report.html").read_text()
    assert "check not run" in html and "ppl-vi check MODEL --json RUN_DIR/check.json" in html


def test_report_of_a_non_run_is_one_line_error(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not a run directory" in err


# A tiny script, added to a *copy* of the report (the report itself has no scripts): once the page
# has loaded, record how many <img> decoded (complete, non-zero natural width) out of how many.
PROBE = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.dataset.imagesOk = ok + '/' + imgs.length;
});
</script></body>"""


def _chromium(binary, tmp_path, *args):
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}"]
    return subprocess.run([binary, *flags, *args], capture_output=True, text=True, timeout=120)


def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    binary = find_chromium()
    if binary is None:
        pytest.skip("no chromium on PATH (apt-get install chromium; .ci/run installs it): browser render not tested")
    import matplotlib.image as mpimg

    page = tmp_path / "report_probe.html"
    html = (run_dir / "report.html").read_text()
    page.write_text(html.replace("</body>", PROBE, 1))
    n_images = html.count("<img ")
    assert n_images >= 3

    shot = tmp_path / "shot.png"
    result = _chromium(binary, tmp_path, f"--screenshot={shot}", "--window-size=1200,2000", page.as_uri())
    assert shot.is_file(), f"no screenshot; chromium said: {result.stderr[-2000:]}"
    pixels = mpimg.imread(str(shot))[..., :3]
    gray = pixels.mean(-1)
    assert gray.var() > 0.005, f"screenshot looks blank (pixel variance {gray.var():.2e})"
    assert (gray < 0.9).mean() > 0.02, "screenshot is almost all white"

    result = _chromium(binary, tmp_path, "--dump-dom", "--virtual-time-budget=10000", page.as_uri())
    match = re.search(r'data-images-ok="(\d+)/(\d+)"', result.stdout)
    assert match, f"the probe did not run; chromium said: {result.stderr[-2000:]}"
    ok, total = int(match.group(1)), int(match.group(2))
    assert total == n_images and total > 0
    assert ok == total, f"only {ok} of {total} images decoded in the browser"


# The notebook display of a check (CheckReport._repr_html_), two of them in one page as in a notebook:
# once loaded, record per report how the browser laid it out: the failing rows and their computed
# background beside a passing row's, whether each MathML fraction has its numerator above its
# denominator (a browser that does not typeset MathML puts them side by side), each formula's size.
DISPLAY_PROBE = """<script>
window.addEventListener('load', function () {
  var out = [];
  document.querySelectorAll('.ppl-vi-check').forEach(function (box) {
    var background = function (el) { return el ? getComputedStyle(el).backgroundColor : ''; };
    var stacked = Array.prototype.map.call(box.querySelectorAll('mfrac'), function (f) {
      return f.children[0].getBoundingClientRect().bottom <= f.children[1].getBoundingClientRect().top + 1;
    });
    var sizes = Array.prototype.map.call(box.querySelectorAll('math'), function (m) {
      var r = m.getBoundingClientRect(); return [r.width, r.height];
    });
    out.push({bad: box.querySelectorAll('tbody tr.bad').length, rows: box.querySelectorAll('tbody tr').length,
              badBackground: background(box.querySelector('tbody tr.bad td')),
              okBackground: background(box.querySelector('tbody tr:not(.bad) td')),
              stacked: stacked, sizes: sizes, title: box.querySelector('h2').textContent,
              diagnosis: box.querySelector('.scaled') ? box.querySelector('.scaled').textContent : ''});
  });
  document.body.dataset.probe = JSON.stringify(out);
});
</script></body>"""


def test_check_display_renders_in_headless_chromium(tmp_path):
    """A passing and a failing ``check_bound`` report, as Jupyter shows them (``_repr_html_``), rendered
    by Chromium: the failing rows (and only they) drawn on a red background, the verdict and the
    diagnosis shown, the objective typeset as MathML (fractions stacked, not LaTeX text). Catches a
    highlight that does not reach the page, style lost to the scoping, and formulas left unrendered."""
    binary = find_chromium()
    if binary is None:
        pytest.skip("no chromium on PATH (apt-get install chromium; .ci/run installs it): browser render not tested")
    import matplotlib.image as mpimg

    example = load_target(str(Path(__file__).resolve().parents[1] / "examples" / "conjugate_normal.py")).module
    args = (example.model, example.guide)
    passing = check_bound(*args, example.bound, example.batch, repeats=4, gradient_seeds=3)
    failing = check_bound(*args, example.flipped_kl["bound"], example.batch, repeats=4, gradient_seeds=3)
    assert passing.ok and not failing.ok
    page = tmp_path / "display.html"
    body = passing._repr_html_() + "<hr>" + failing._repr_html_()
    page.write_text("<!DOCTYPE html><html><head><meta charset='utf-8'></head><body>" + body + DISPLAY_PROBE + "</html>")

    shot = tmp_path / "display.png"
    result = _chromium(binary, tmp_path, f"--screenshot={shot}", "--window-size=1400,2400", page.as_uri())
    assert shot.is_file(), f"no screenshot; chromium said: {result.stderr[-2000:]}"
    gray = mpimg.imread(str(shot))[..., :3].mean(-1)
    assert gray.var() > 0.005 and (gray < 0.9).mean() > 0.02, "screenshot looks blank"

    result = _chromium(binary, tmp_path, "--dump-dom", "--virtual-time-budget=10000", page.as_uri())
    match = re.search(r'data-probe="([^"]*)"', result.stdout)
    assert match, f"the probe did not run; chromium said: {result.stderr[-2000:]}"
    shown_pass, shown_fail = json.loads(htmllib.unescape(match.group(1)))
    assert shown_pass["bad"] == 0 and shown_pass["rows"] == len(passing.rows) and shown_pass["title"].endswith("passed")
    assert shown_fail["bad"] == len(failing.failures) > 0 and shown_fail["rows"] == len(failing.rows)
    red = tuple(int(v) for v in re.findall(r"\d+", shown_fail["badBackground"])[:3])
    assert red[0] > 200 and red[0] - red[1] > 8 and red[0] - red[2] > 8, shown_fail["badBackground"]
    assert shown_fail["okBackground"] != shown_fail["badBackground"]
    assert shown_fail["title"] == f"Consistency check: failed ({len(failing.failures)} of {len(failing.rows)} checks)"
    assert "its sign is flipped" in shown_fail["diagnosis"]
    for shown in (shown_pass, shown_fail):
        assert len(shown["sizes"]) == 2 and all(w > 200 and h > 15 for w, h in shown["sizes"]), shown["sizes"]
        assert len(shown["stacked"]) >= 3 and all(shown["stacked"]), shown["stacked"]
