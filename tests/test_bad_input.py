"""Every bad input is one clear line: a PplViError from the API, exit status 2 and no traceback from the CLI.

Plain cases for each kind of mistake (tensors of the wrong shape, dtype, device or support; NaN
data; empty batches; labels out of range; model/guide pairs with missing or mismatched sites;
truncated, foreign or code-running checkpoints; missing or corrupt data folders; reused output
directories; unknown names; out-of-range numbers; CUDA without a GPU), then Hypothesis property
tests that arbitrary inputs give either a valid result or a PplViError, never another exception.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ppl_vi import run as rundir
from ppl_vi.cli import main
from ppl_vi.models.configure import build_config
from ppl_vi.data.mnist import labelled_subset, validate_bernoulli_data
from ppl_vi.errors import CheckpointError, ConfigError, DataError, PplViError
from ppl_vi.evaluate import bound_metrics
from ppl_vi.models.base import get_spec

REPO = Path(__file__).resolve().parents[1]
HYPOTHESIS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def one_line(exc_or_text) -> str:
    text = str(exc_or_text).strip()
    assert text and "\n" not in text and "Traceback" not in text, text
    return text


def run_cli(argv) -> tuple:
    """``ppl-vi ARGV`` in-process: (exit status, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse's own usage errors
            status = exc.code
    return status, err.getvalue()


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    """A finished 1-epoch linear-Gaussian run to corrupt in various ways."""
    out = tmp_path_factory.mktemp("small") / "run"
    status, err = run_cli(["train", "linear-gaussian", "--device", "cpu", "--epochs", "1", "--n-train", "100",
                           "--n-test", "50", "--batch-size", "50", "--no-progress", "--out", out])
    assert status == 0, err
    return out


@pytest.fixture
def run_copy(small_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(small_run, copy)
    return copy


def built(name: str, **overrides):
    """A model from the registry with small networks, and its (tiny) data."""
    from ppl_vi.data.sources import DataBundle

    config = build_config(name, overrides={"device": "cpu", "hidden": [8], "z_dim": 2, **overrides})
    x = torch.rand(6, 5 if name != "vae" else 784)
    data = DataBundle(get_spec(name).data, x, x)
    return get_spec(name).build(config, {**data.info, "x_dim": x.shape[1]})


# ------------------------------------------------------------------------------------------------
# tensors into the evaluation entry point


LG_X = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))  # seeded: not the import-time global state
BAD_TENSORS = [
    ("1-D", lambda: LG_X[0], "shape (5,)"),
    ("3-D", lambda: LG_X.unsqueeze(0), "shape (1, 6, 5)"),
    ("wrong D", lambda: torch.randn(6, 4), "4 columns but the model expects D = 5"),
    ("integer dtype", lambda: LG_X.long(), "dtype torch.int64"),
    ("float64 for a float32 model", lambda: LG_X.double(), "dtype torch.float64 but the model's parameters"),
    ("NaN", lambda: LG_X.index_put((torch.tensor(2), torch.tensor(3)), torch.tensor(torch.nan)), "NaN or inf"),
    ("inf", lambda: torch.full((6, 5), torch.inf), "NaN or inf"),
    ("empty batch", lambda: LG_X[:0], "shape (0, 5)"),
    ("wrong device", lambda: LG_X.to("meta"), "x is on meta but the model is on cpu"),
    ("not a tensor", lambda: LG_X.tolist(), "x is a list"),
]


@pytest.mark.parametrize("case, make, message", BAD_TENSORS, ids=[c[0] for c in BAD_TENSORS])
def test_bound_metrics_rejects_bad_x(case, make, message):
    with pytest.raises(DataError) as caught:
        bound_metrics(built("linear-gaussian"), make(), ks=(1,))
    assert message in one_line(caught.value)


@pytest.mark.parametrize("x, message", [
    (torch.full((3, 784), 1.5), "values in [1.5, 1.5]"),  # outside a Bernoulli likelihood's support
    (-torch.rand(3, 784), "expected a non-empty float tensor of shape (B, D) with values in [0, 1]"),
    (torch.rand(0, 784), "is empty"),
])
def test_bound_metrics_rejects_data_outside_bernoulli_support(x, message):
    with pytest.raises(DataError) as caught:
        bound_metrics(built("vae"), x, ks=(1,))
    assert message in one_line(caught.value)


@pytest.mark.parametrize("y, ks, error, message", [
    (torch.zeros(5, dtype=torch.long), (1,), DataError, "expected integer labels of shape (6,)"),
    (torch.zeros(6), (1,), DataError, "expected integer labels"),
    (None, (0,), ConfigError, "ks must be integers >= 1"),
    (None, (), ConfigError, "ks must be integers >= 1"),
])
def test_bound_metrics_rejects_bad_labels_and_ks(y, ks, error, message):
    with pytest.raises(error) as caught:
        bound_metrics(built("linear-gaussian"), LG_X, y, ks=ks)
    assert message in one_line(caught.value)


def test_bound_metrics_accepts_good_data():
    out = bound_metrics(built("linear-gaussian"), LG_X, ks=(1, 3))
    assert torch.isfinite(torch.tensor([out["test_nelbo"], *out["test_iwae"].values()])).all()


# ------------------------------------------------------------------------------------------------
# labels, and model/guide pairs the checker must report rather than crash on


@pytest.mark.parametrize("labels, n, message", [
    (torch.tensor([0, 1, 2, 10] * 5), 4, "labels range over [0, 10]; expected integers in 0..3"),
    (torch.tensor([-1, 0, 1, 2] * 5), 4, "labels range over [-1, 2]; expected integers in 0..3"),
    (torch.arange(20) % 4, 5, "expected a multiple"),
    (torch.arange(20) % 4, 40, "out of range"),
])
def test_labelled_subset_rejects_bad_labels(labels, n, message):
    with pytest.raises(DataError) as caught:
        labelled_subset(labels, n, num_classes=4)
    assert message in one_line(caught.value)


def _pair_model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z + w, 1.0), obs=x)


def _guide_missing_w(x):
    loc = pyro.param("loc", torch.zeros(()))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(loc, 1.0))


def _guide_wrong_shape(x):
    loc = pyro.param("loc", torch.zeros(()))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(loc, 1.0).expand([x.shape[0], 2]).to_event(1))
        pyro.sample("w", dist.Normal(loc, 1.0))


@pytest.mark.filterwarnings("ignore:Found vars in model but not guide")
@pytest.mark.parametrize("guide, problem", [(_guide_missing_w, "guide misses latent site(s) ['w']"),
                                            (_guide_wrong_shape, "shape mismatch at z: model (4,) vs guide (4, 2)")])
def test_checker_reports_missing_or_mismatched_sites(guide, problem):
    from pyro.infer import Trace_ELBO

    from ppl_vi.check import Comparison, check

    x = torch.randn(4)
    guide(x)  # create the param
    hand = Comparison("Trace_ELBO vs a hand bound needing w", Trace_ELBO(), lambda b, d: -(d["z"] + d["w"]))
    report = check(_pair_model, guide, {"x": x}, [hand], [pyro.param("loc").unconstrained()], repeats=0)
    assert not report.passed
    structure = report.rows[0]
    assert structure.kind == "structure" and not structure.passed and problem in structure.note
    assert "verdict: FAIL" in report.table()


# ------------------------------------------------------------------------------------------------
# checkpoints: truncated, foreign, and ones whose loading would run code


class RunsCode:
    """Unpickling this calls os.system: what a hostile checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_code_running_checkpoint_is_refused_and_runs_nothing(run_copy, tmp_path):
    marker = tmp_path / "pwned"
    evil = run_copy / rundir.CHECKPOINTS / "best.pt"
    torch.save({"ppl_vi": 1, "model_name": "linear-gaussian", "model": {}, "payload": RunsCode(marker)}, evil)
    torch.load(evil, weights_only=False)  # the file really runs code when loaded unsafely...
    assert marker.exists()
    marker.unlink()
    with pytest.raises(CheckpointError) as caught:  # ...but not through ppl_vi
        rundir.load_checkpoint(evil)
    assert "refused: loading could run code" in one_line(caught.value)
    status, err = run_cli(["eval", run_copy, "--k", "1", "--no-progress"])
    assert status == 2 and "refused: loading could run code" in one_line(err)
    assert not marker.exists()


@pytest.mark.parametrize("corrupt, message", [
    (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "truncated or not a torch checkpoint"),
    (lambda p: p.write_bytes(b""), "truncated or not a torch checkpoint"),
    (lambda p: p.write_text("not a checkpoint"), "truncated or not a torch checkpoint"),
    (lambda p: torch.save({"weights": torch.ones(2)}, p), "not a ppl_vi checkpoint"),
    (lambda p: torch.save({"ppl_vi": 1, "model_name": "vae", "model": {}}, p), "is for model 'vae'"),
    (lambda p: torch.save({"ppl_vi": 1, "model_name": "linear-gaussian", "model": {"W": torch.ones(3)}}, p),
     "does not fit model linear-gaussian"),
], ids=["truncated", "empty", "text", "foreign", "other model", "wrong shapes"])
def test_eval_of_bad_checkpoint_exits_2_one_line(run_copy, corrupt, message):
    corrupt(run_copy / rundir.CHECKPOINTS / "best.pt")
    status, err = run_cli(["eval", run_copy, "--k", "1", "--no-progress"])
    assert status == 2 and message in one_line(err) and err.startswith("ppl-vi eval: error:")


def test_resume_from_truncated_checkpoint_exits_2(run_copy):
    last = run_copy / rundir.CHECKPOINTS / "last.pt"
    last.write_bytes(last.read_bytes()[:100])
    status, err = run_cli(["train", "--resume", run_copy, "--no-progress"])
    assert status == 2 and "truncated" in one_line(err)


# ------------------------------------------------------------------------------------------------
# the CLI: one line, exit 2, no traceback, no run directory left behind


def _corrupt_mnist(root: Path) -> Path:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    header = bytes([0, 0, 8, 3]) + (60000).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    (raw / "train-images-idx3-ubyte").write_bytes(header + bytes(1000))  # truncated
    (raw / "train-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + (60000).to_bytes(4, "big") + bytes(60000))
    return root


CLI_CASES = [
    ("unknown model", ["train", "no-such-model"], "unknown model 'no-such-model'; expected one of"),
    ("unknown loss", ["train", "gmm", "--loss", "nope"], "unknown loss 'nope'; expected one of"),
    ("k < 1", ["train", "gmm", "--k", "0"], "k must be >= 1, got 0"),
    ("beta < 0", ["train", "gmm", "--beta", "-0.5"], "beta must be >= 0"),
    ("lr inf", ["train", "gmm", "--lr", "inf"], "config field lr must be a finite number, got inf (float)"),
    ("batch size 0", ["train", "gmm", "--batch-size", "0"], "batch_size must be >= 1"),
    ("negative step checkpoints", ["train", "gmm", "--checkpoint-every-steps", "-1"], "checkpoint_every_steps must be >= 0"),
    ("nan policy", ["train", "gmm", "--nan-policy", "ignore"], "nan_policy must be stop or skip"),
    ("no data folder", ["train", "vae", "--data-dir", "/no/such/dir"], "no MNIST IDX files in /no/such/dir/MNIST/raw"),
    ("corrupt data folder", ["train", "vae", "--data-dir", "{corrupt}"], "the file is truncated or corrupt"),
    ("data folder is a file", ["train", "vae", "--data-dir", "{file}"], "no MNIST IDX files"),
    ("missing config file", ["train", "--config", "/no/such.json"], "config file /no/such.json does not exist"),
    ("unknown config key", ["train", "--config", "{unknown_key}"], "unknown config key(s) ['learning_rate']"),
    ("malformed config", ["train", "--config", "{malformed}"], "could not parse config file"),
    ("resume a non-run", ["train", "--resume", "{empty}"], "cannot resume"),
    ("check k < 1", ["check", "gmm", "--k", "0"], "--k must be >= 1"),
    ("check no data", ["check", "vae", "--data-dir", "/no/such/dir"], "no MNIST IDX files"),
    ("eval no run", ["eval", "/no/such/run"], "does not exist"),
]
if not torch.cuda.is_available():
    CLI_CASES.append(("cuda without GPU", ["train", "gmm", "--device", "cuda"], "no CUDA GPU is available; use --device cpu"))


@pytest.mark.parametrize("case, argv, message", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_one_line_exit_2(case, argv, message, tmp_path):
    files = {"corrupt": _corrupt_mnist(tmp_path / "data"), "file": tmp_path / "a-file", "empty": tmp_path / "empty",
             "unknown_key": tmp_path / "bad.json", "malformed": tmp_path / "malformed.toml"}
    files["file"].write_text("x")
    files["empty"].mkdir()
    files["unknown_key"].write_text(json.dumps({"model": "gmm", "learning_rate": 0.1}))
    files["malformed"].write_text("epochs = = 3")
    argv = [a.format(**files) for a in argv]
    out = tmp_path / "out"
    extra = ["--out", out, "--no-progress"] if argv[0] == "train" else []
    status, err = run_cli([*argv, *extra])
    assert status == 2, err
    assert message in one_line(err) and err.startswith(f"ppl-vi {argv[0]}: error:")
    assert not out.exists(), "a failed start left a run directory behind"


def test_existing_out_refused_unless_overwrite_or_resume(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    argv = ["train", "linear-gaussian", "--device", "cpu", "--epochs", "1", "--n-train", "50", "--n-test", "20",
            "--no-progress", "--out", out]
    status, err = run_cli(argv)
    assert status == 2 and "exists and is not empty; pass --resume to continue that run or --overwrite" in one_line(err)
    assert (out / "notes.txt").read_text() == "keep me" and not (out / rundir.CONFIG).exists()
    assert run_cli([*argv, "--overwrite"])[0] == 0
    assert (out / rundir.CONFIG).is_file() and (out / rundir.CHECKPOINTS / "last.pt").is_file()


def test_argparse_errors_exit_2_without_traceback():
    status, err = run_cli(["train", "gmm", "--epochs", "three"])
    assert status == 2 and "invalid int value: 'three'" in err and "Traceback" not in err


def test_bad_data_dir_real_subprocess(tmp_path):
    """The real entry point: one line on stderr, exit 2, no traceback, no run directory."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "ppl_vi", "train", "vae", "--data-dir", "/no/such/dir", "--out",
                           str(out), "--device", "cpu"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("ppl-vi train: error: no MNIST IDX files in /no/such/dir/MNIST/raw; expected "
                                   "train-images-idx3-ubyte[.gz] and train-labels-idx1-ubyte[.gz]")
    assert not out.exists()


# ------------------------------------------------------------------------------------------------
# property tests: any input gives a result or a PplViError, never another exception

DTYPES = [torch.float32, torch.float64, torch.int64, torch.uint8, torch.bool]


@st.composite
def tensors(draw, max_dims=3):
    shape = draw(st.lists(st.integers(0, 6), min_size=0, max_size=max_dims))
    dtype = draw(st.sampled_from(DTYPES))
    n = 1
    for s in shape:
        n *= s
    values = draw(st.lists(st.floats(-2, 2) | st.sampled_from([0.0, 1.0, float("nan"), float("inf")]),
                           min_size=n, max_size=n))
    t = torch.tensor(values, dtype=torch.float64).reshape(shape)
    if dtype.is_floating_point:
        return t.to(dtype)
    return torch.nan_to_num(t).clamp(-2, 2).to(dtype)


@HYPOTHESIS
@given(tensors())
@example(torch.rand(3, 4))
@example(torch.rand(3, 4).double())
def test_validate_bernoulli_data_property(x):
    valid = (x.ndim == 2 and x.is_floating_point() and x.numel() > 0 and bool(torch.isfinite(x).all())
             and bool(((x >= 0) & (x <= 1)).all()))
    if valid:
        validate_bernoulli_data(x)
    else:
        with pytest.raises(DataError) as caught:
            validate_bernoulli_data(x)
        assert "expected" in one_line(caught.value)


LG_MODEL = None


@HYPOTHESIS
@given(tensors())
@example(torch.randn(3, 5))
@example(torch.randn(1, 5))
def test_bound_metrics_property(x):
    global LG_MODEL
    LG_MODEL = LG_MODEL or built("linear-gaussian")
    try:
        out = bound_metrics(LG_MODEL, x, ks=(2,))
    except PplViError as exc:
        one_line(exc)
    else:
        assert x.shape[1:] == (5,) and x.dtype == torch.float32
        assert torch.isfinite(torch.tensor(out["test_nelbo"]))


@HYPOTHESIS
@given(st.lists(st.integers(-2, 12), min_size=1, max_size=40), st.integers(0, 45))
def test_labelled_subset_property(labels, n_labelled):
    y = torch.tensor(labels)
    try:
        lab, unlab = labelled_subset(y, n_labelled, num_classes=4)
    except DataError as exc:
        one_line(exc)
    else:
        assert sorted(torch.cat([lab, unlab]).tolist()) == list(range(len(labels)))
        assert torch.bincount(y[lab], minlength=4).tolist() == [n_labelled // 4] * 4


@HYPOTHESIS
@given(st.integers(-3, 4), st.floats(allow_nan=True), st.floats(allow_nan=True), st.integers(-2, 3))
def test_build_config_property(k, beta, lr, batch_size):
    valid = k >= 1 and 0 <= beta < float("inf") and 0 < lr < float("inf") and batch_size >= 1
    overrides = {"k": k, "beta": beta, "lr": lr, "batch_size": batch_size}
    if valid:
        build_config("gmm", overrides=overrides)
    else:
        with pytest.raises(ConfigError) as caught:
            build_config("gmm", overrides=overrides)
        one_line(caught.value)


@HYPOTHESIS
@given(st.binary(max_size=300), st.sampled_from([b"", b"PK\x03\x04", b"\x80\x02"]))
def test_load_checkpoint_property(payload, prefix):
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.pt"
        path.write_bytes(prefix + payload)
        with pytest.raises(CheckpointError) as caught:
            rundir.load_checkpoint(path)
    one_line(caught.value)


@settings(max_examples=15, deadline=None)
@given(st.sampled_from([["check", "gmm", "--k"], ["check", "gmm", "--batch-size"], ["train", "gmm", "--k"],
                        ["train", "gmm", "--batch-size"], ["train", "gmm", "--eval-every"], ["eval", "/no/run", "--k"]]),
       st.integers(-10, 0))
def test_cli_out_of_range_numbers_property(argv, value):
    status, err = run_cli([*argv, str(value)])
    assert status == 2 and err.startswith(f"ppl-vi {argv[0]}: error:")
    one_line(err)
