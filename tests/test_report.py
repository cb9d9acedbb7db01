"""The HTML run report: contents, self-containedness, and a render in a real (headless) browser."""

import base64
import re
import shutil
import subprocess

import pytest

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
