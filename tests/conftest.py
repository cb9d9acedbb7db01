"""Shared test set-up: validation on, param store cleared, seeded; data from ../shared/data."""

import os
from pathlib import Path

import pyro
import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def pytest_configure(config):
    os.environ.setdefault("PPL_VI_DATA", str(SHARED_DATA))


@pytest.fixture(autouse=True)
def _pyro_state():
    pyro.clear_param_store()
    pyro.enable_validation(True)
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()
