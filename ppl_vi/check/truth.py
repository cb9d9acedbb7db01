"""Ground-truth checks, where log p(x) or the posterior is exact.

* the ELBO with the exact posterior as guide equals log p(x) (Trace_ELBO and the hand bound);
* log p(x) - ELBO equals KL(q || p(z|x)) (exactly, or within SE over draws);
* the IWAE ladder: ELBO ≈ L_1 ≤ L_k ≤ L_k' ≤ log p(x), each within 4 standard errors.
"""

from __future__ import annotations

import copy
import math
from typing import List, Optional, Sequence

import pyro
import torch
from pyro.infer import Trace_ELBO
from torch import Tensor

from ppl_vi.check.rows import Row, close_row, rel_diff
from ppl_vi.models.base import Batch
from ppl_vi.models.protocols import ExactPosterior


def iwae_ladder_rows(iwae_bound, elbo: Tensor, log_px: Optional[Tensor], ks: Sequence[int], repeats: int,
                     seed: int, unit: str = "mean per datapoint") -> List[Row]:
    """ELBO ≈ L_1 ≤ L_k ≤ L_k' ≤ log p(x) for the ks given, each within 4 standard errors.

    ``iwae_bound(k)`` returns per-datapoint L_k (B,) for fresh draws (or the batch's joint bound, shape
    (1,), with ``unit`` "the batch total"). The mean over datapoints and ``repeats`` independent draws,
    with its standard error, is compared in order.
    """
    rows, previous = [], None
    for k in ks:
        values = []
        with torch.no_grad():
            for r in range(repeats):
                pyro.set_rng_seed(seed + 1000 * k + r)
                values.append(iwae_bound(k).double())
        per_point = torch.stack(values).mean(0)  # (B,): average over repeats
        mean, se = per_point.mean().item(), (torch.stack(values).sum(-1).std().item() / math.sqrt(repeats)) / per_point.numel()
        if previous is None:
            ref = elbo.double().mean().item()
            rows.append(Row("ground truth", f"IWAE_{k} equals ELBO ({unit})", ref, mean, abs(ref - mean),
                            rel_diff(ref, mean), "within 4 SE", abs(ref - mean) <= 4 * se + 1e-12, f"SE {se:.3g}"))
        else:
            pk, pmean, pse = previous
            slack = 4 * math.sqrt(se**2 + pse**2)
            rows.append(Row("ground truth", f"IWAE_{pk} <= IWAE_{k}", pmean, mean, mean - pmean, rel_diff(pmean, mean),
                            "within 4 SE", mean >= pmean - slack, f"SE {se:.3g}"))
        if log_px is not None:
            ref = log_px.double().mean().item()
            rows.append(Row("ground truth", f"IWAE_{k} <= log p(x)", ref, mean, ref - mean, rel_diff(ref, mean),
                            "within 4 SE", mean <= ref + 4 * se + 1e-12, f"SE {se:.3g}"))
        previous = (k, mean, se)
    return rows



def ground_truth_rows(model, batch: Batch, ks=(1, 10, 100, 1000), repeats: int = 20, seed: int = 0,
                      rtol: float = 1e-6) -> List[Row]:
    """Checks against exact log p(x) and the exact posterior, for models that have them."""

    rows: List[Row] = []
    log_px = model.exact_log_likelihood(batch).detach() if model.has_exact_log_likelihood else None
    nest = model.max_plate_nesting
    if log_px is not None and model.exact_guide_kind:
        exact = copy.copy(model)  # shares parameters; only the guide differs
        exact.guide_kind = model.exact_guide_kind
        exact.latent_sites = type(model).latent_sites
        pyro.set_rng_seed(seed)
        pyro_elbo = -Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=nest).loss(
            exact.model, exact.guide, **batch)
        rows.append(Row("ground truth", "Trace_ELBO with exact posterior guide = log p(x)", log_px.sum().item(),
                        pyro_elbo, abs(pyro_elbo - log_px.sum().item()), rel_diff(pyro_elbo, log_px.sum().item()),
                        f"rel <= {rtol:g}", rel_diff(pyro_elbo, log_px.sum().item()) <= rtol, "every draw: log w = log p(x)"))
        pyro.set_rng_seed(seed)
        draws = exact.sample_draws(batch, 4)
        rows.append(close_row("ground truth", "hand ELBO with exact posterior guide = log p(x)", log_px,
                              -exact.hand_negative_elbo(batch, draws, kl="mc"), rtol))
    if log_px is not None and isinstance(model, ExactPosterior) and model.latent_sites:
        kl_post = model.posterior_kl(batch).detach()
        with torch.no_grad():
            pyro.set_rng_seed(seed)
            if model.enumerable_guide:
                elbo = -model.hand_negative_elbo(batch, {}, kl="analytic")
                rows.append(close_row("ground truth", "log p(x) - ELBO = KL(q || p(z|x)) (exact ELBO)",
                                      log_px - elbo, kl_post, rtol))
            else:
                m = 2000
                elbo = -model.hand_negative_elbo(batch, model.sample_draws(batch, m), kl="analytic")
                gap = (log_px - elbo - kl_post).double()  # (B,), each an average over m draws
                se = gap.std().item() / math.sqrt(gap.numel())
                rows.append(Row("ground truth", f"log p(x) - ELBO = KL(q || p(z|x)) ({m} draws)", 0.0, gap.mean().item(),
                                abs(gap.mean().item()), math.nan, "within 4 SE",
                                abs(gap.mean().item()) <= 4 * se + 1e-12, f"SE {se:.3g}"))
    if model.latent_sites:
        with torch.no_grad():
            pyro.set_rng_seed(seed)
            elbo = -model.hand_negative_elbo(batch, model.sample_draws(batch, 2000), kl="mc")
        rows += iwae_ladder_rows(lambda k: model.hand_iwae_bound(batch, model.sample_draws(batch, k)),
                                 elbo, log_px, ks, repeats, seed)
    return rows


