"""What went wrong when a loss turned NaN/inf: which term, and what was kept.

Called once, after the read-back found a non-finite loss, to write the one-line message of
:class:`~ppl_vi.errors.TrainingDiverged`. In order, it blames

1. non-finite **weights** (the optimiser already applied a non-finite gradient),
2. non-finite **gradients**,
3. otherwise the **sample sites** whose log-density is non-finite on the latest batches, traced
   again: an observed site is the reconstruction term, a latent site (the model's prior or the
   guide) the KL term.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Tuple

import torch
from pyro import poutine
from torch import nn

from ppl_vi import run as rundir
from ppl_vi.models.base import Batch

GENERIC = "weights and gradients finite: the bound's terms (reconstruction or KL) overflowed"


def diagnose(model: nn.Module, model_fn, guide_fn, batches: Optional[List[Batch]]) -> str:
    """Which term went bad: weights, gradients, or the log-density terms on ``batches``."""
    bad_weights = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad_weights:
        return f"non-finite weights in {bad_weights[:3]} (the optimiser applied a non-finite gradient)"
    bad_grads = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    if bad_grads:
        return f"non-finite gradients in {bad_grads[:3]}"
    return bad_terms(model_fn, guide_fn, batches)


@torch.no_grad()
def bad_terms(model_fn, guide_fn, batches: Optional[List[Batch]]) -> str:
    """The sample sites whose log-density is non-finite on ``batches`` (guide traced, model replayed)."""
    bad: List[str] = []
    try:
        for batch in batches or []:
            guide_trace = poutine.trace(guide_fn).get_trace(**batch)
            model_trace = poutine.trace(poutine.replay(model_fn, trace=guide_trace)).get_trace(**batch)
            for where, trace in (("model", model_trace), ("guide", guide_trace)):
                trace.compute_log_prob()
                for name, site in trace.nodes.items():
                    if site["type"] == "sample" and "log_prob" in site and not torch.isfinite(site["log_prob"]).all():
                        label = f"{'reconstruction' if site['is_observed'] else 'KL'} term ({where} site {name!r})"
                        bad += [label] if label not in bad else []
    except Exception:  # noqa: BLE001 - a diagnosis must never hide the divergence itself
        return GENERIC
    return f"weights and gradients finite; non-finite {', '.join(bad)}" if bad else GENERIC


def kept(run_dir: Optional[Path], last_saved: Optional[Tuple[int, int]]) -> str:
    """What survives the divergence: the last good checkpoint (epoch, step), or why there is none."""
    if run_dir is None:
        return "no run directory, so nothing was saved"
    if last_saved is None:
        return "no checkpoint had been written yet"
    epoch, step = last_saved
    return (f"the last good checkpoint (epoch {epoch}, step {step}) is kept in "
            f"{Path(run_dir) / rundir.CHECKPOINTS / 'last.pt'}")
