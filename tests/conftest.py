"""Shared test set-up: one intra-op thread, validation on, param store cleared, seeded; data from
../shared/data."""

import os
from pathlib import Path

import pyro
import pytest
import torch

from skips import StrictSkips

pytest_plugins = ["pytester"]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def pytest_configure(config):
    os.environ.setdefault("PPL_VI_DATA", str(SHARED_DATA))
    config.pluginmanager.register(StrictSkips(), "ppl_vi_strict_skips")  # see tests/skips.py


@pytest.fixture(autouse=True)
def _pyro_state():
    # one intra-op thread: the tensors in these tests are tiny, and on a loaded 2-core machine two
    # OpenMP threads make every small matmul wait on the other (tens of times slower).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pyro.clear_param_store()
    pyro.enable_validation(True)
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()
    torch.set_num_threads(threads)


@pytest.fixture
def binary_images():
    """``make(b, d)``: b random binary images of d pixels, float64, from their own generator
    (seed 123), so they do not depend on, or advance, the global RNG."""

    def make(b: int, d: int, seed: int = 123) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.bernoulli(torch.rand(b, d, generator=g, dtype=torch.float64), generator=g)

    return make
