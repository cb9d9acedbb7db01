"""IWAE-k at evaluation time, close to the machine's limit: the guide once per batch, particles in chunks.

For a batch of B datapoints and the ks asked for (K = max k), K particles per datapoint are drawn
in chunks of c, and every IWAE-k is read off the same draws (the first k of them):

    log w_j(x) = log p(x|z_j) + log p(z_j) - log q(z_j|x),     z_j ~ q(z|x), j = 1..K
    L_k(x)     = logsumexp_{j <= k} log w_j(x) - log k           (Burda et al. 2016)

with the logsumexp over chunks merged by ``logaddexp``. Each L_k is exactly the IWAE-k estimator
(the first k of K i.i.d. draws are k i.i.d. draws); the estimates for different k share draws.
The log-densities are those of :meth:`ppl_vi.objectives.importance.IWAELoss.terms` (the
model replayed against the guide's trace, model-only enumerated sites summed out), so the values
are the library's IWAE bound.

**The encoder once per batch.** The guide is run once on the batch and its latent sites'
distributions are recorded (:func:`record_guide`); each chunk then samples from the recorded
distributions (:func:`replay_guide`) instead of re-running the encoder. That is exact when the
guide's sites depend on the batch only (every amortised mean-field guide here), and it is
checked, not assumed (:func:`replay_mismatch`): on two particles drawn from one RNG state the
recorded guide must reproduce the real guide's draws bit for bit; otherwise the real guide runs
per chunk, and which path ran is recorded (``path``).

**Chunk size** (:func:`rows_per_pass`): rows = particles × datapoints per forward pass. On a GPU,
as many as a quarter of the free device memory holds; on a CPU, as many as keep one pass's working set
within ``CPU_WORKING_SET`` (about an L3 cache: measured faster than bigger passes, see
benchmarks/RESULTS.md), never more than a quarter of the available memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Dict, List, Optional, Sequence

import psutil
import pyro
import torch
from pyro import poutine
from torch import Tensor, nn

from ppl_vi.errors import ConfigError
from ppl_vi.models.base import Batch
from ppl_vi.objectives.importance import IWAELoss
from ppl_vi.sites import PARTICLE_PLATE, LogMeanExp, chunk_sizes, is_latent, is_variable

CPU_WORKING_SET = 32 * 2**20  # bytes one CPU pass may touch (about an L3 cache)
GPU_MEMORY_FRACTION = 0.25  # of the free device memory
CPU_MEMORY_FRACTION = 0.25  # of the available host memory
MAX_ROWS = 1 << 22


@dataclasses.dataclass
class SiteRecord:
    """One sample site of a guide run: enough to draw from it again without the guide's networks."""

    name: str
    fn: object  # the distribution, batch shape over the data plate(s)
    frames: tuple  # (name, size, dim) of the plates it sat in
    obs: Optional[Tensor]  # the value of an observed site, else None


def _rng_state():
    return torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def _set_rng_state(state) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def record_guide(guide: Callable, batch: Batch) -> List[SiteRecord]:
    """Run ``guide(**batch)`` once (no particle plate) and record its sample sites; the RNG is left as it was."""
    state = _rng_state()
    try:
        trace = poutine.trace(guide).get_trace(**batch)
    finally:
        _set_rng_state(state)
    records = []
    for name, site in trace.nodes.items():
        if not is_variable(site):
            continue
        frames = tuple((f.name, f.size, f.dim) for f in site["cond_indep_stack"] if f.vectorized)
        records.append(SiteRecord(name, site["fn"], frames, site["value"] if site["is_observed"] else None))
    return records


def replay_guide(records: List[SiteRecord]) -> Callable:
    """A guide that samples each recorded site from its recorded distribution, in its plates (each
    plate made once per call, as the guide made it)."""

    def guide(**_):
        plates: Dict[tuple, pyro.plate] = {}
        for record in records:
            frames = sorted(record.frames, key=lambda f: f[2])  # outermost (most negative dim) first
            for f in frames:
                if f not in plates:
                    plates[f] = pyro.plate(f[0], f[1], dim=f[2])
            stack = [plates[f] for f in frames]
            with contextlib.ExitStack() as entered:
                for plate in stack:
                    entered.enter_context(plate)
                pyro.sample(record.name, record.fn, obs=record.obs)

    return guide


def replay_mismatch(guide: Callable, replay: Callable, batch: Batch, max_plate_nesting: int) -> Optional[str]:
    """None if the recorded guide draws what the real one draws (2 particles, one RNG state), else why not."""
    state = _rng_state()
    traces = []
    try:
        for fn in (guide, replay):
            _set_rng_state(state)
            with pyro.plate(PARTICLE_PLATE, 2, dim=-(max_plate_nesting + 1)):
                traces.append(poutine.trace(fn).get_trace(**batch))
    except Exception as exc:  # noqa: BLE001 - any failure means: run the real guide
        return f"replaying the recorded guide failed ({type(exc).__name__})"
    finally:
        _set_rng_state(state)
    real, recorded = ({n: s for n, s in t.nodes.items() if is_latent(s)} for t in traces)
    if real.keys() != recorded.keys():
        return "the guide's latent sites differ from run to run"
    for name, site in real.items():
        other = recorded[name]["value"]
        if site["value"].shape != other.shape or not torch.equal(site["value"], other):
            return f"guide site {name!r} depends on the guide's other draws"
    return None


def bytes_per_row(model: nn.Module, x_dim: int) -> int:
    """A generous bound on the memory one (particle, datapoint) row needs in one pass: every linear
    layer's output, and four x-sized temporaries (logits and the likelihood terms)."""
    param = next(model.parameters())
    widths = sum(m.out_features for m in model.modules() if isinstance(m, nn.Linear))
    return (widths + 4 * x_dim) * param.element_size()


def rows_per_pass(model: nn.Module, x_dim: int, device: torch.device, cap: Optional[int] = None) -> int:
    """Rows (particles × datapoints) per forward pass for this model on this device (module docstring)."""
    per_row = bytes_per_row(model, x_dim)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        rows = GPU_MEMORY_FRACTION * free / per_row
    else:
        rows = min(CPU_WORKING_SET / per_row, CPU_MEMORY_FRACTION * psutil.virtual_memory().available / per_row)
    return int(max(1, min(rows, cap or MAX_ROWS, MAX_ROWS)))


@dataclasses.dataclass
class IWAEResult:
    """Per-datapoint bounds L_k (B,) for each k, and how they were computed."""

    bounds: Dict[int, Tensor]
    path: str  # "encoder once per batch" or "guide per chunk (reason)"


def iwae_bounds(model, batch: Batch, ks: Sequence[int], rows: int,
                progress: Optional[Callable[[int], None]] = None) -> IWAEResult:
    """L_k(x) for every k in ``ks`` from K = max(ks) shared particles, ``rows`` // B particles per pass.

    ``progress(n)`` is told each chunk's particle count times B (rows done).
    """
    size = batch["x"].shape[0]
    top = max(ks)
    chunk = max(1, min(top, rows // size))
    records = record_guide(model.guide, batch)
    replay = replay_guide(records)
    reason = replay_mismatch(model.guide, replay, batch, model.max_plate_nesting)
    guide = model.guide if reason else replay
    objective = IWAELoss(1, model.max_plate_nesting)
    running = {k: LogMeanExp() for k in ks}
    done = 0
    for k_chunk in chunk_sizes(top, chunk):
        terms = objective.terms(model.model, guide, k_chunk, **batch)
        if terms.c != 1.0 or terms.beta != 1.0:
            raise ValueError(f"evaluation expects unscaled sites, found scale {terms.c} and β {terms.beta}")
        if terms.global_ratio is not None:
            raise ConfigError(f"per-datapoint IWAE-k needs local latents; {list(terms.global_sites)} are global "
                              "(use IWAELoss.total_bound for the joint bound)")
        log_w = terms.log_weights  # (k_chunk, B); model-enumerated sites already summed out
        for k in ks:
            if k > done:  # particles done .. min(k, done + k_chunk) - 1 belong to L_k
                running[k].add(log_w[: min(k, done + k_chunk) - done])
        done += k_chunk
        if progress is not None:
            progress(k_chunk * size)
    bounds = {k: running[k].value() for k in ks}
    return IWAEResult(bounds, f"guide per chunk ({reason})" if reason else "encoder once per batch")
