"""Tests of ppl_vi.data: MNIST reading and helpers, and the exact synthetic models."""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import pytest
import torch
import torchvision
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from ppl_vi.data import mnist
from ppl_vi.data.mnist import (
    MNIST,
    binarize,
    fixed_binarization,
    labelled_subset,
    load_mnist,
    minibatches,
    read_idx,
    resolve_data_dir,
    validate_bernoulli_data,
)
from ppl_vi.data.synthetic import (
    default_gmm_params,
    default_linear_gaussian_params,
    sample_gmm,
    sample_linear_gaussian,
)
from ppl_vi.errors import DataError

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
DATA_DIR = Path(os.environ.get("PPL_VI_DATA", DEFAULT_DATA_DIR))
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]

needs_mnist = pytest.mark.skipif(
    not (DATA_DIR / "MNIST" / "raw").is_dir(), reason=f"no MNIST under {DATA_DIR}"
)


def write_idx(path: Path, data: torch.Tensor) -> None:
    """Write a uint8 tensor as an IDX file (gzipped if the name ends in .gz)."""
    header = bytes([0, 0, 0x08, data.ndim]) + b"".join(s.to_bytes(4, "big") for s in data.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + data.to(torch.uint8).numpy().tobytes())


def fake_mnist(root: Path, n: int, split: str = "test") -> Path:
    """A tiny MNIST of ``n`` images in torchvision layout under ``root``."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    prefix = {"train": "train", "test": "t10k"}[split]
    write_idx(raw / f"{prefix}-images-idx3-ubyte", torch.full((n, 28, 28), 255))
    write_idx(raw / f"{prefix}-labels-idx1-ubyte", torch.arange(n) % 10)
    return root


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch, tmp_path):
    """No test sees the caller's PPL_VI_DATA or cache, and none may download."""
    monkeypatch.delenv("PPL_VI_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def no_network(*args, **kwargs):
        raise AssertionError("torchvision.datasets.MNIST must not be called")

    monkeypatch.setattr(torchvision.datasets, "MNIST", no_network)


@pytest.fixture(scope="module")
def data() -> MNIST:
    if not (DATA_DIR / "MNIST" / "raw").is_dir():
        pytest.skip(f"no MNIST under {DATA_DIR}")
    return MNIST.load(DATA_DIR)


# --- reading MNIST ------------------------------------------------------------------------------


def test_shapes_dtypes_and_range(data):
    assert data.train_x.shape == (60000, 784) and data.test_x.shape == (10000, 784)
    assert data.train_y.shape == (60000,) and data.test_y.shape == (10000,)
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.int64
    assert data.train_x.min() == 0 and data.train_x.max() == 1


def test_class_counts_and_mean(data):
    assert torch.bincount(data.train_y, minlength=10).tolist() == TRAIN_COUNTS
    assert torch.bincount(data.test_y, minlength=10).tolist() == TEST_COUNTS
    assert abs(data.train_x.double().mean().item() - 0.1307) < 1e-4


def test_test_x_bin_is_fixed_binarization(data):
    assert torch.equal(data.test_x_bin, fixed_binarization(data.test_x, 0))
    assert set(data.test_x_bin.unique().tolist()) == {0.0, 1.0}


@needs_mnist
def test_uncompressed_copy_reads_identically(tmp_path, data):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        with gzip.open(DATA_DIR / "MNIST" / "raw" / f"{name}.gz", "rb") as src:
            (raw / name).write_bytes(src.read())
    x, y = load_mnist("test", data_dir=tmp_path)
    assert torch.equal(x, data.test_x) and torch.equal(y, data.test_y)
    x_raw, _ = load_mnist("test", data_dir=raw)  # handed MNIST/raw itself
    assert torch.equal(x_raw, data.test_x)


def test_read_idx_roundtrip(tmp_path):
    data = torch.randint(0, 256, (3, 4, 5), dtype=torch.uint8)
    for name in ("a-ubyte", "a-ubyte.gz"):
        write_idx(tmp_path / name, data)
        assert torch.equal(read_idx(tmp_path / name), data)


@needs_mnist
def test_truncated_file_raises(tmp_path):
    gz = (DATA_DIR / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz").read_bytes()
    (tmp_path / "cut.gz").write_bytes(gz[: len(gz) // 2])
    with pytest.raises(DataError, match="cut.gz"):
        read_idx(tmp_path / "cut.gz")
    plain = gzip.decompress(gz)
    (tmp_path / "cut").write_bytes(plain[:-10])
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "cut")


def test_wrong_magic_raises(tmp_path):
    write_idx(tmp_path / "ok", torch.zeros(2, 3, dtype=torch.uint8))
    payload = bytearray((tmp_path / "ok").read_bytes())
    payload[2] = 0x0D  # float32 type code
    (tmp_path / "bad").write_bytes(bytes(payload))
    with pytest.raises(DataError, match="magic"):
        read_idx(tmp_path / "bad")


def test_empty_folder_raises_without_download(tmp_path):
    with pytest.raises(DataError, match="no MNIST IDX files"):
        load_mnist("test", data_dir=tmp_path)


def test_empty_cache_wraps_download_failure_or_refuses():
    with pytest.raises(DataError, match="PPL_VI_DATA"):
        load_mnist("test")  # the patched torchvision.datasets.MNIST raises
    with pytest.raises(DataError, match="no MNIST IDX files"):
        load_mnist("test", download=False)


def test_bad_split_raises(tmp_path):
    with pytest.raises(DataError, match="split"):
        load_mnist("valid", data_dir=tmp_path)


def test_env_var_honoured_and_data_dir_wins(tmp_path, monkeypatch):
    env_root = fake_mnist(tmp_path / "env", 3)
    arg_root = fake_mnist(tmp_path / "arg", 5)
    monkeypatch.setenv("PPL_VI_DATA", str(env_root))
    assert load_mnist("test")[0].shape == (3, 784)
    assert load_mnist("test", data_dir=arg_root)[0].shape == (5, 784)
    assert resolve_data_dir() == env_root
    assert resolve_data_dir(arg_root / "MNIST") == arg_root


def test_resolve_data_dir_defaults_to_cache(tmp_path):
    assert resolve_data_dir() == tmp_path / "cache" / "ppl_vi" / "data"


def test_loads_are_cached(tmp_path):
    root = fake_mnist(tmp_path, 4)
    x1, _ = load_mnist("test", data_dir=root)
    shutil.rmtree(root / "MNIST")
    x2, _ = load_mnist("test", data_dir=root)
    assert torch.equal(x1, x2)
    assert (root.resolve(), "test") in mnist._CACHE


# --- binarisation -------------------------------------------------------------------------------


def four_standard_errors(x: torch.Tensor) -> float:
    """4 x the standard error of the mean of independent Bernoulli(x) bits."""
    x = x.double()
    return 4 * (x * (1 - x)).sum().sqrt().item() / x.numel()


def test_fixed_binarization_deterministic_and_unbiased(data):
    x = data.test_x[:2000]
    b0 = fixed_binarization(x, seed=0)
    assert torch.equal(b0, fixed_binarization(x, seed=0))
    assert not torch.equal(b0, fixed_binarization(x, seed=1))
    assert b0.dtype == x.dtype and b0.device == x.device
    assert abs(b0.double().mean().item() - x.double().mean().item()) < four_standard_errors(x)


def test_binarize_unbiased(data):
    x = data.test_x[:2000]
    b = binarize(x, generator=torch.Generator().manual_seed(3))
    assert b.dtype == x.dtype and set(b.unique().tolist()) <= {0.0, 1.0}
    assert abs(b.double().mean().item() - x.double().mean().item()) < four_standard_errors(x)


# --- labelled subsets, batches, validation split ------------------------------------------------


def test_labelled_subset_balanced_reproducible_partition(data):
    y = data.train_y
    lab, unlab = labelled_subset(y, 100, seed=0)
    assert torch.bincount(y[lab], minlength=10).tolist() == [10] * 10
    assert lab.dtype == torch.int64 and torch.equal(lab, lab.sort().values)
    assert torch.equal(lab, labelled_subset(y, 100, seed=0)[0])
    assert not torch.equal(lab, labelled_subset(y, 100, seed=1)[0])
    assert torch.equal(torch.cat([lab, unlab]).sort().values, torch.arange(len(y)))


def test_labelled_subset_errors():
    y = torch.arange(50) % 10  # five per class
    with pytest.raises(DataError, match="divisible"):
        labelled_subset(y, 21)
    with pytest.raises(DataError, match="n_labelled=0"):
        labelled_subset(y, 0)
    with pytest.raises(DataError, match="n_labelled=60"):
        labelled_subset(y, 60)
    with pytest.raises(DataError, match="0..9"):
        labelled_subset(torch.tensor([0, 1, 2, 10] * 5), 10)
    with pytest.raises(DataError, match="class 0 has 5"):
        labelled_subset(torch.cat([y, torch.ones(20, dtype=torch.int64)]), 60)


def test_labelled_subset_101_raises(data):
    with pytest.raises(DataError, match="divisible"):
        labelled_subset(data.train_y, 101)


@pytest.mark.parametrize("n, batch_size", [(10, 3), (12, 4), (1, 5), (0, 2)])
def test_minibatches_partition(n, batch_size):
    batches = list(minibatches(n, batch_size, generator=torch.Generator().manual_seed(0)))
    assert all(b.dtype == torch.int64 for b in batches)
    assert all(len(b) == batch_size for b in batches[:-1])
    seen = torch.cat(batches) if batches else torch.zeros(0, dtype=torch.int64)
    assert torch.equal(seen.sort().values, torch.arange(n))
    kept = list(minibatches(n, batch_size, drop_last=True))
    assert sum(len(b) for b in kept) == n - n % batch_size
    assert all(len(b) == batch_size for b in kept)


def test_minibatches_reproducible_and_unshuffled():
    def run(seed):
        return torch.cat(list(minibatches(100, 7, generator=torch.Generator().manual_seed(seed))))

    assert torch.equal(run(0), run(0)) and not torch.equal(run(0), run(1))
    assert torch.equal(torch.cat(list(minibatches(10, 3, shuffle=False))), torch.arange(10))
    with pytest.raises(DataError, match="batch_size"):
        next(minibatches(10, 0))


def test_validation_split(data):
    train_idx, val_idx = data.validation_split(n_val=10000, seed=0)
    assert len(val_idx) == 10000 and len(train_idx) == 50000
    assert torch.equal(torch.cat([train_idx, val_idx]).sort().values, torch.arange(60000))
    assert torch.equal(val_idx, data.validation_split(10000, seed=0)[1])
    assert not torch.equal(val_idx, data.validation_split(10000, seed=1)[1])


# --- validate_bernoulli_data --------------------------------------------------------------------


@pytest.mark.parametrize(
    "x, problem",
    [
        (torch.rand(784), "shape"),
        (torch.rand(2, 28, 28), "shape"),
        (torch.ones(2, 3, dtype=torch.int64), "dtype"),
        (torch.empty(0, 784), "empty"),
        (torch.tensor([[0.5, float("nan")]]), "NaN"),
        (torch.tensor([[0.5, float("inf")]]), "inf"),
        (torch.tensor([[0.5, 1.5]]), "values"),
        (torch.tensor([[-0.1, 0.5]]), "values"),
    ],
)
def test_validate_bernoulli_data_rejects(x, problem):
    with pytest.raises(DataError, match=problem) as info:
        validate_bernoulli_data(x, name="batch")
    message = str(info.value)
    assert message.startswith("batch") and "expected" in message and "\n" not in message


def test_validate_bernoulli_data_accepts():
    validate_bernoulli_data(torch.rand(4, 784))
    validate_bernoulli_data(torch.tensor([[0.0, 1.0]], dtype=torch.float64))


# --- synthetic models with known answers --------------------------------------------------------


def test_gmm_log_prob_matches_mixture_same_family():
    params = default_gmm_params()
    x, c = sample_gmm(params, 200, seed=0)
    assert x.shape == (200, 2) and c.shape == (200,) and x.dtype == torch.float64
    mixture = MixtureSameFamily(
        Categorical(probs=params.weights), Independent(Normal(params.means, params.scales), 1)
    )
    expected = torch.stack([mixture.log_prob(x_i) for x_i in x])
    assert torch.allclose(params.log_prob(x), expected, rtol=0, atol=1e-10)


def test_sample_gmm_reproducible_and_proportions():
    params = default_gmm_params()
    x, c = sample_gmm(params, 20000, seed=1)
    assert torch.equal(x, sample_gmm(params, 20000, seed=1)[0])
    freq = torch.bincount(c, minlength=3).double() / len(c)
    w = params.weights
    assert torch.all((freq - w).abs() < 4 * (w * (1 - w) / len(c)).sqrt())


def gaussian_conditioning(W, b, sigma, x):
    """p(z | x) from the joint N([0, b], [[I, W^T], [W, W W^T + s^2 I]])."""
    cov_xx = W @ W.T + sigma**2 * torch.eye(W.shape[0], dtype=W.dtype)
    gain = torch.linalg.solve(cov_xx, W).T  # W^T cov_xx^{-1}, (Z, D)
    return (x - b) @ gain.T, torch.eye(W.shape[1], dtype=W.dtype) - gain @ W


def test_linear_gaussian_posterior_matches_conditioning():
    params = default_linear_gaussian_params(x_dim=5, z_dim=2, seed=0)
    x, _ = sample_linear_gaussian(params, 50, seed=0)
    mean, cov = params.posterior(x)
    ref_mean, ref_cov = gaussian_conditioning(params.W, params.b, params.sigma, x)
    assert mean.shape == (50, 2) and cov.shape == (2, 2)
    assert torch.allclose(mean, ref_mean, rtol=0, atol=1e-10)
    assert torch.allclose(cov, ref_cov, rtol=0, atol=1e-10)


def test_linear_gaussian_log_prob_bayes_identity():
    """log p(x) = log p(z) + log p(x | z) - log p(z | x) for any z, here z = 0.3."""
    params = default_linear_gaussian_params()
    x, _ = sample_linear_gaussian(params, 20, seed=2)
    z = torch.full((20, 2), 0.3, dtype=torch.float64)
    mean, cov = params.posterior(x)
    log_joint = (Normal(0.0, 1.0).log_prob(z).sum(-1)
                 + Normal(z @ params.W.T + params.b, params.sigma).log_prob(x).sum(-1))
    log_post = torch.distributions.MultivariateNormal(mean, cov).log_prob(z)
    assert torch.allclose(params.log_prob(x), log_joint - log_post, rtol=0, atol=1e-10)


def test_linear_gaussian_samples_moments():
    """200k samples: each mean / covariance entry within 5 standard errors of b / W W^T + s^2 I."""
    params = default_linear_gaussian_params()
    n = 200_000
    x, z = sample_linear_gaussian(params, n, seed=0)
    assert x.shape == (n, 5) and z.shape == (n, 2)
    sigma = params.W @ params.W.T + params.sigma**2 * torch.eye(5, dtype=torch.float64)
    var = sigma.diagonal()
    assert torch.all((x.mean(0) - params.b).abs() < 5 * (var / n).sqrt())
    cov_se = ((var[:, None] * var[None, :] + sigma**2) / n).sqrt()  # Var of a sample covariance
    assert torch.all((torch.cov(x.T) - sigma).abs() < 5 * cov_se)
