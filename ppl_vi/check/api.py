"""``check_bound``: the user-file checker as one call, for a notebook or a test suite.

    report = check_bound(model, guide, bound, {"x": x})
    report                      # in Jupyter: the verdict, the diagnoses, the objective typeset, the table
    print(report)               # the same table as ``ppl-vi check FILE.py``
    report.ok, report.rows, report.diagnoses, report.formula

The arguments mean what the fields of a user file mean (:mod:`ppl_vi.check.userfile`): ``bound(batch,
draws)`` is the per-datapoint negative ELBO written by hand (a (B,) tensor, or a dict of named terms
checked one by one), ``draws`` the guide's K particles per latent site, (K, B, ...). Where ``params``
is not given, the tensors whose gradients are compared are found as for a file: every leaf tensor
that requires grad and reaches Trace_ELBO's loss among the functions' globals (the notebook's
variables, the test module's), their closures, an ``nn.Module`` they are methods of, and Pyro's
param store.

The check is seeded (``seed``) and leaves the caller's random state (torch, random, numpy) and
Pyro's validation flag as they were, so the same call gives the same report, in any order of tests.
Bad arguments raise the CLI's one-line :class:`~ppl_vi.errors.ConfigError`, naming the argument.
"""

from __future__ import annotations

import contextlib
import inspect
import numbers
import types
from typing import Callable, Dict, Iterator, Optional

import pyro
import pyro.util
import torch
from torch import nn

from ppl_vi.check.rows import CheckReport
from ppl_vi.check.userfile import check_pair, make_pair
from ppl_vi.errors import ConfigError

SOURCE = "check_bound"


def _integer(name: str, value, least: int, why: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        raise ConfigError(f"{SOURCE}: {name} must be an integer >= {least}{why}, got {value!r}")
    return int(value)


def _is_loss(loss) -> bool:
    """A Pyro ELBO, or any loss object with ``differentiable_loss(model, guide, **batch)`` (our IWAELoss)."""
    return isinstance(loss, pyro.infer.ELBO) or callable(getattr(loss, "differentiable_loss", None))


def _namespace(functions) -> types.ModuleType:
    """What a user file's module is to ``ppl-vi check``, for functions defined anywhere: their globals,
    their closures' variables and the module a method belongs to (searched for tensors and modules)."""
    found: Dict[str, object] = {}
    for fn in functions:
        owner = getattr(fn, "__self__", None)
        if isinstance(owner, nn.Module):
            found.setdefault(f"{type(owner).__name__}", owner)
        fn = getattr(fn, "__func__", fn)
        if not inspect.isfunction(fn):
            continue
        found.update({k: v for k, v in fn.__globals__.items() if k not in found})
        for cell_name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
            try:
                found.setdefault(cell_name, cell.cell_contents)
            except ValueError:  # an empty cell (a variable not yet assigned)
                continue
    module = types.ModuleType(SOURCE)
    vars(module).update(found)
    return module


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch (CPU and CUDA), random and numpy, and turn Pyro's validation on, inside; restore the
    caller's states after."""
    state = pyro.util.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        with pyro.validation_enabled(True):
            pyro.set_rng_seed(seed)
            yield
    finally:
        pyro.util.set_rng_state(state)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def check_bound(model: Callable, guide: Callable, bound: Callable, batch, *, loss=None, losses=None,
                iwae_bound: Optional[Callable] = None, exact_log_likelihood: Optional[Callable] = None,
                params=None, max_plate_nesting: Optional[int] = None, num_particles: int = 3, seed: int = 0,
                repeats: int = 50, gradient_seeds: int = 50, rtol: Optional[float] = None,
                data_plate: str = "data") -> CheckReport:
    """Check a hand-derived bound against Pyro's losses (and the exact log-likelihood, if given).

    ``model(**batch)``, ``guide(**batch)``: the Pyro pair, data in ``pyro.plate("data", ...)``;
    ``bound(batch, draws)``: the per-datapoint negative ELBO, (B,), or a dict of named terms;
    ``batch``: a dict of tensors (or a function returning one), datapoints along dim 0.
    Optional, as in a user file: ``loss`` / ``losses`` (Pyro loss objects to hold the bounds against
    instead of the defaults), ``iwae_bound(batch, draws)`` (the negative IWAE_K bound),
    ``exact_log_likelihood(batch)`` (log p(x) per datapoint: the ground-truth rows), ``params`` (the
    tensors whose gradients are compared: a list, a dict name -> tensor, or an ``nn.Module``),
    ``max_plate_nesting`` (default: read off the traces), ``data_plate`` (the data plate's name). With
    global latents the bound may be the batch total, (), or named terms each (B,) or (); see
    :mod:`ppl_vi.check.usercheck` for the convention in full. The check's own settings are those of ``ppl-vi check``: ``num_particles``
    (K), ``seed``, ``repeats`` (seeds of the statistical rows), ``gradient_seeds``, ``rtol``.
    """
    entries = {"model": model, "guide": guide, "bound": bound, "batch": batch}
    for name, value in (("iwae_bound", iwae_bound), ("exact_log_likelihood", exact_log_likelihood), ("params", params)):
        if value is not None:
            entries[name] = value
    if loss is not None:
        if not _is_loss(loss):
            raise ConfigError(f"{SOURCE}: loss must be a Pyro loss object such as Trace_ELBO(num_particles=3, "
                              f"vectorize_particles=True, max_plate_nesting=1), got {type(loss).__name__}")
        entries["loss"] = loss
    if losses is not None:
        listed = losses.values() if isinstance(losses, dict) else losses
        if not isinstance(losses, (dict, list, tuple)) or not all(_is_loss(v) for v in listed):
            raise ConfigError(f"{SOURCE}: losses must be a list (or a dict name -> loss) of Pyro loss objects, "
                              f"got {type(losses).__name__}")
        entries["losses"] = losses
    if max_plate_nesting is not None:
        entries["max_plate_nesting"] = _integer("max_plate_nesting", max_plate_nesting, 1)
    entries["data_plate"] = data_plate
    k = _integer("num_particles", num_particles, 1)
    seed = _integer("seed", seed, 0)
    repeats = _integer("repeats", repeats, 2, " (the statistical rows compare means over seeds)")
    gradient_seeds = _integer("gradient_seeds", gradient_seeds, 2, " (the expected-gradient rows average over seeds)")
    if rtol is not None and (isinstance(rtol, bool) or not isinstance(rtol, numbers.Real) or not 0 < rtol < 1):
        raise ConfigError(f"{SOURCE}: rtol must be a number in (0, 1), got {rtol!r}")
    with _seeded(seed):
        module = _namespace(v for v in (model, guide, bound, iwae_bound, exact_log_likelihood) if v is not None)
        functions = [v for v in (model, guide, bound, iwae_bound, exact_log_likelihood) if v is not None]
        pair = make_pair(SOURCE, entries, module, files=_source_files(functions))
        return check_pair(pair, num_particles=k, seed=seed, repeats=repeats, gradient_seeds=gradient_seeds, rtol=rtol)


def _source_files(functions) -> list:
    """The files the functions are defined in, so that an error names the user's line."""
    found = []
    for fn in functions:
        try:
            path = inspect.getsourcefile(getattr(fn, "__func__", fn))
        except TypeError:  # a builtin or a callable object
            path = None
        if path:
            found.append(path)
    return found


__all__ = ["check_bound"]
