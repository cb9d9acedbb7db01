"""Where and how a run executes: the device it asked for, its name, and the seeds.

Floor 1: training, evaluation and the checker all resolve ``--device`` and seed the random
number generators through here, so none of them has to import another.
"""

from __future__ import annotations

import os
import platform
import random
from pathlib import Path

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


def cpu_name() -> str:
    """The CPU's model name ("AMD EPYC", from /proc/cpuinfo on Linux), else what platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's with its cores and torch threads: what a timing is quoted with."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads"
