"""A run's config resolved against the model registry: :func:`ppl_vi.config.resolve` given the
registry, so that the config module itself knows no model."""

from __future__ import annotations

from typing import Optional

from ppl_vi.config import TrainConfig, resolve
from ppl_vi.models import REGISTRY
from ppl_vi.objectives.losses import check_config


def build_config(model: Optional[str] = None, file_values: Optional[dict] = None, overrides: Optional[dict] = None,
                 profile: Optional[dict] = None, *, strict: bool = False) -> TrainConfig:
    """Defaults <- the model's registry defaults <- a job profile <- a config file <- overrides, validated
    once. ``strict`` (the command line): overrides the model does not read, and a model x loss
    combination that cannot train, are refused too."""
    return resolve(REGISTRY, model, file_values=file_values, flags=overrides, profile=profile, strict=strict,
                   check=check_config if strict else None)
