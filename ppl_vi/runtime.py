"""Where and how a run executes: the device it asked for, and the seeds.

Floor 1: training, evaluation and the checker all resolve ``--device`` and seed the random
number generators through here, so none of them has to import another.
"""

from __future__ import annotations

import random

import pyro
import torch

from ppl_vi.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed Python, torch (CPU and CUDA) and Pyro."""
    random.seed(seed)
    pyro.set_rng_seed(seed)
    torch.manual_seed(seed)
