"""Reading Pyro traces: the questions every loss and every check asks of a trace site, answered once.

A *site* is a node of a ``pyro.poutine.Trace`` (a dict: ``type``, ``fn``, ``value``, ``is_observed``,
``cond_indep_stack``, ``scale``, ``mask``, ``infer``...). The objectives (:mod:`ppl_vi.objectives`),
the models' draws (:mod:`ppl_vi.models.base`), the IWAE evaluator and the checker
(:mod:`ppl_vi.check`) all read sites through these helpers:

* :func:`is_variable` / :func:`is_latent`: a sample site that is a random variable (observed or not) /
  an unobserved one that is a random variable (not a plate's subsample site);
* :func:`unscaled_log_prob`: its log-density at its value, masked, without its scale;
  :func:`is_deterministic`: a ``pyro.deterministic`` value, which has none;
* :func:`in_data_plate` / :func:`data_plate_dim`: is the site inside the data plate, the plate at dim
  ``-max_plate_nesting`` (built-in models) or the plate of a given name (a user's file)?
  Outside it, a latent site is global (θ);
* :func:`guide_sites`: the guide's latent sites from one run, its random draws undone;
* :func:`model_only_sites` / :func:`enumerate_dim`: the model's latent sites the guide does not sample,
  enumerated (summed out) or not, and the dim of an enumerated one;
* :class:`FixValues`: a messenger that gives named latent sites fixed values instead of sampling them;
* :func:`tuple_digits`: the i-th tuple of discrete values over (site, particle), mixed radix;
* :func:`split_scales`: Pyro's site scales split into the minibatch scale c, shared by every observed
  site, and the latent weight β = (latent scale) / c;
* :class:`LogMeanExp` with :func:`chunk_sizes`: the log-mean-exp of K particles' log-weights drawn in
  chunks (a running logsumexp), for the IWAE bound at large K.

Particles are drawn in a plate named :data:`PARTICLE_PLATE` left of the model's ``max_plate_nesting`` plates.
Public Pyro API only, but for the two keys :func:`is_deterministic` and :func:`enumerate_dim` read
(said where they are read).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from pyro import poutine
from pyro.distributions import Unit
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch import Tensor

from ppl_vi.errors import ConfigError

PARTICLE_PLATE = "particles"

Scale = Union[float, Tensor]


def is_variable(site) -> bool:
    """A sample site that is a random variable, observed or latent (not a plate's subsample site)."""
    return site["type"] == "sample" and not site_is_subsample(site)


def is_latent(site) -> bool:
    """An unobserved sample site that is a real random variable (not a plate's subsample site)."""
    return is_variable(site) and not site["is_observed"]


def unscaled_log_prob(site) -> Tensor:
    """A site's log-density at its value, masked, without its scale."""
    lp = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
    if site["mask"] is not None:
        lp = lp * site["mask"]
    return lp


def in_data_plate(site, max_plate_nesting: int, data_plate: Optional[str] = None) -> bool:
    """Is the site inside the data plate (named ``data_plate``, else the plate at dim -max_plate_nesting)?"""
    return data_plate_dim(site, max_plate_nesting, data_plate) is not None


def data_plate_dim(site, max_plate_nesting: int, data_plate: Optional[str] = None) -> Optional[int]:
    """The dim of the site's data plate (named ``data_plate``, else at dim -max_plate_nesting); None outside it."""
    for f in site["cond_indep_stack"]:
        if (f.name == data_plate) if data_plate is not None else (f.dim == -max_plate_nesting):
            return f.dim
    return None


def is_deterministic(site) -> bool:
    """A ``pyro.deterministic`` site: an observed value recorded in the trace, with no density of its own."""
    return bool(site["infer"].get("_deterministic"))  # private Pyro key that pyro.deterministic sets: no public test


def is_factor(site) -> bool:
    """Is an observed site a ``pyro.factor`` (a Unit distribution, expanded or masked by plates: its
    log-density is the factor's value)?"""
    fn = site["fn"]
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return isinstance(fn, Unit)


def enumerate_dim(site) -> Optional[int]:
    """The (negative) dim on which ``poutine.enum`` laid out the site's support; None where it is not enumerated."""
    return site["infer"].get("_enumerate_dim")  # private Pyro key, where poutine.enum records it: no public accessor


def model_only_sites(guide_trace, model_trace) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
    """(enumerated, unguided): the model's latent sites that the guide does not sample, split into those
    ``poutine.enum`` sums out and the rest (which no objective here can weigh)."""
    guided = {n for n, s in guide_trace.nodes.items() if is_latent(s)}
    own = [(n, s) for n, s in model_trace.nodes.items() if is_latent(s) and n not in guided]
    return (tuple(n for n, s in own if enumerate_dim(s) is not None),
            tuple(n for n, s in own if enumerate_dim(s) is None))


def guide_sites(guide: Callable, batch: dict) -> Dict[str, dict]:
    """The guide's latent sites, ``{name: site}``, from one run without gradients; its RNG draws are undone."""
    state = torch.get_rng_state()
    try:
        with torch.no_grad(), poutine.block():
            trace = poutine.trace(guide).get_trace(**batch)
    finally:
        torch.set_rng_state(state)
    return {n: s for n, s in trace.nodes.items() if is_latent(s)}


class FixValues(Messenger):
    """Give the named latent sample sites these values instead of sampling them (they stay latent sites)."""

    def __init__(self, values: Dict[str, Tensor]):
        super().__init__()
        self.values = values

    def _pyro_sample(self, msg):
        if msg["name"] in self.values and not msg["is_observed"]:
            msg["value"] = self.values[msg["name"]]
            msg["done"] = True


def tuple_digits(sizes: Sequence[int], k: int, index: Union[int, Tensor]) -> Tuple[Tensor, ...]:
    """Tuple number ``index`` of discrete values for K particles of sites with ``sizes`` support points.

    Mixed radix, one digit per (site, particle), the first site's first particle least significant:
    index = Σ_{s,k} d_sk Π_{earlier digits} size. Returns per site its digits, shape (K,) for an int
    ``index``, (T, K) for a tensor of T indices; there are Π_s size_s^K tuples in all."""
    out, stride = [], 1
    for size in sizes:
        digits = []
        for _ in range(k):
            digits.append(torch.as_tensor((index // stride) % size))
            stride *= size
        out.append(torch.stack(digits, dim=-1))
    return tuple(out)


def split_scales(obs_scales: Sequence[Scale], latent_scales: Sequence[Scale], check: bool = True
                 ) -> Tuple[Scale, Scale]:
    """(c, β) from the observed and the latent sites' scales: c the observed sites' one scale (the
    minibatch scale), β the latent sites' one scale over c (1 without latent sites, or where c = 0).

    Python floats are checked (one c, one β); with ``check=False``, tensor scales (KL annealing) are
    taken as given, to keep a training step free of host syncs."""
    if not obs_scales:
        raise ConfigError("the objective needs an observed site (obs=...) in the model")
    if any(torch.is_tensor(s) for s in list(obs_scales) + list(latent_scales)) and not check:
        c = obs_scales[0]
        return c, (latent_scales[0] / c if latent_scales else 1.0)
    obs = {float(s) for s in obs_scales}
    if len(obs) != 1:
        raise ConfigError(f"the observed sites must share one scale (the minibatch scale), found {sorted(obs)}")
    c = obs.pop()
    betas = {round(float(s) / c, 12) for s in latent_scales} if c else set()
    if len(betas) > 1:
        raise ConfigError(f"the latent sites must share one scale β, found {sorted(betas)}")
    return c, (betas.pop() if betas else 1.0)


def chunk_sizes(total: int, chunk: Optional[int]) -> List[int]:
    """``total`` particles split into chunks of at most ``chunk`` (all at once for None): [chunk, ..., rest]."""
    step = chunk or total
    return [min(step, total - done) for done in range(0, total, step)]


class LogMeanExp:
    """:func:`ppl_vi.bounds.log_mean_exp` over chunks of particles, so a large K fits in memory:

        log (1/K) Σ_k e^{x_k} = logaddexp_chunks [ logsumexp_{k in chunk} x_k ] - log K

    ``add(x)`` takes one chunk (its particles along dim 0); :meth:`value` is the log-mean-exp so far."""

    def __init__(self):
        self.lse: Optional[Tensor] = None
        self.count = 0

    def add(self, x: Tensor) -> None:
        lse = torch.logsumexp(x, dim=0)
        self.lse = lse if self.lse is None else torch.logaddexp(self.lse, lse)
        self.count += x.shape[0]

    def value(self) -> Tensor:
        return self.lse - math.log(self.count)
