"""Before a user's pair is checked: does it run, where is its data plate, may its particles be vectorised?

Every answer that makes the file unusable is a :class:`~ppl_vi.errors.ConfigError` of one line that
names the file, the line of the user's code that raised (the deepest frame in one of the user's
files) and the cause, never a traceback:

* the model or guide raises on the batch as given (one plain run, model-enumerated sites enumerated
  in parallel as ``TraceEnum_ELBO`` runs them);
* no observed site lies in the data plate (the plate named ``data``, or the file's ``data_plate``),
  or that plate's size is not the batch's leading dimension;
* ``max_plate_nesting`` smaller than the plates the pair uses (without it, it is read off the traces).

**Particles.** K particles are drawn in one vectorised run (a plate left of the model's plates, as
``vectorize_particles=True``) only where the model allows it: the vectorised run must not raise, and
at the same draws every site's log-density must equal the one of K plain runs (a model that reduces
over, or mis-broadcasts, the particle dim fails that). Otherwise the particles are drawn one run at
a time, and the reason is said.
"""

from __future__ import annotations

import dataclasses
import traceback
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch
from pyro import poutine

from ppl_vi.check.rows import one_line
from ppl_vi.check.terms import read_draw_set, trace_pairs
from ppl_vi.errors import ConfigError
from ppl_vi.models.base import Batch
from ppl_vi.sites import is_deterministic, is_latent


@dataclasses.dataclass
class Setup:
    """What the checker needs to know about a user's pair before it checks it."""

    data_plate: str
    nest: int  # max_plate_nesting
    size: int  # B
    shapes: Dict[str, tuple]  # every sample site's value shape in a plain run
    global_sites: Tuple[str, ...]  # latent sites outside the data plate
    enumerated: Tuple[str, ...]  # the model's sites marked for enumeration that the guide does not sample
    vectorized: bool
    why_sequential: str = ""
    score_sites: Tuple[str, ...] = ()  # guide sites without rsample (a score-function gradient)

    def particles_note(self, k: int) -> str:
        if self.vectorized:
            return f"particles: K = {k}, drawn in one vectorised run (a particle plate left of the model's plates)"
        return f"particles: K = {k}, drawn one guide run at a time ({self.why_sequential})"


def location(exc: BaseException, files: Iterable[str]) -> str:
    """``FILE:LINE`` of the deepest frame of the traceback in one of ``files``; "" if none."""
    wanted = {str(Path(f).resolve()) for f in files if f}
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if str(Path(frame.filename).resolve()) in wanted:
            return f"{frame.filename}:{frame.lineno}"
    return ""


def user_error(source: str, files: Iterable[str], what: str, exc: BaseException, hint: str = "") -> ConfigError:
    """A one-line ConfigError: where in the user's code ``what`` raised, and why."""
    where = location(exc, files)
    same = where and Path(where.rsplit(":", 1)[0]).resolve() == Path(source.split(".py:")[0] + ".py"
                                                                      if ".py:" in source else source).resolve()
    head = (where if same else f"{where} ({source})") if where else source
    return ConfigError(f"{head}: {what} raised {one_line(exc)}" + (f"; {hint}" if hint else ""))


def _plain_traces(model: Callable, guide: Callable, batch: Batch, nest: int):
    """One plain guide run and the model replayed against it, its marked sites enumerated in parallel."""
    guide_trace = poutine.trace(guide).get_trace(**batch)
    enumerated = poutine.enum(model, first_available_dim=-(nest + 1))
    return guide_trace, poutine.trace(poutine.replay(enumerated, trace=guide_trace)).get_trace(**batch)


def deepest_plate(*traces) -> int:
    """The max_plate_nesting the traces need: the deepest vectorised plate dim any sample site sits in (>= 1)."""
    return max([-f.dim for t in traces for s in t.nodes.values() if s["type"] == "sample"
                for f in s["cond_indep_stack"] if f.vectorized] + [1])


def find_data_plate(model_trace, source: str, data_plate: str, size: int) -> None:
    """ConfigError unless every observed site lies in the plate ``data_plate`` of ``size`` datapoints."""
    observed = [(n, s) for n, s in model_trace.nodes.items() if s["type"] == "sample" and s["is_observed"]
                and not is_deterministic(s)]
    if not observed:
        raise ConfigError(f"{source}: the model has no observed site (pyro.sample(..., obs=...)); nothing to check")
    for name, site in observed:
        frames = [f for f in site["cond_indep_stack"] if f.vectorized]
        frame = next((f for f in frames if f.name == data_plate), None)
        if frame is None and type(site["fn"]).__name__ == "Unit":  # a global factor: a term of the batch
            if all(f.name != data_plate for _, s in observed for f in s["cond_indep_stack"]):
                raise ConfigError(f"{source}: the factor {name!r} (pyro.factor) lies outside the data plate "
                                  f"{data_plate!r} and no observed site lies in it: put the datapoints in "
                                  f"pyro.plate({data_plate!r}, ...)")
            continue
        if frame is None:
            inside = f"in plate(s) {[f.name for f in frames]}" if frames else "in no plate"
            raise ConfigError(f"{source}: the observed site {name!r} is {inside}, not in a plate named {data_plate!r}; "
                              f"put the datapoints in pyro.plate({data_plate!r}, ...)"
                              + (f" or set data_plate = {frames[0].name!r} in the file" if frames else ""))
        if frame.size != size and frame.full_size == size:
            raise ConfigError(f"{source}: pyro.plate({data_plate!r}, {size}, subsample_size={frame.size}) draws "
                              f"{frame.size} of the batch's {size} datapoints at random, indices your bound cannot see: "
                              f"make batch the minibatch of B datapoints and write pyro.plate({data_plate!r}, N, "
                              "subsample=torch.arange(B)) (Pyro scales its sites by N/B, your bound must too; "
                              "examples/local_guide.py), or leave subsample_size out")
        if frame.size != size:
            raise ConfigError(f"{source}: the data plate {data_plate!r} has {frame.size} datapoints at site {name!r} "
                              f"but the batch has {size} (its tensors' leading dimension)")


def _same(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor], rtol: float) -> bool:
    return set(a) == set(b) and all(
        a[n].shape == b[n].shape and bool(torch.allclose(a[n].detach(), b[n].detach(), rtol=rtol, atol=rtol))
        for n in a)


def vectorisable(model, guide, batch: Batch, nest: int, data_plate: str, size: int, shapes, k: int = 2
                 ) -> Tuple[bool, str]:
    """(True, "") when K particles may be drawn in one vectorised run, else (False, why): see the module
    docstring. The probe's draws are undone (the RNG state is restored)."""
    state = torch.get_rng_state()
    try:
        with torch.no_grad():
            vec = read_draw_set(trace_pairs(model, guide, batch, k, nest, True), k, nest, data_plate, True, size, shapes)
            seq = read_draw_set(trace_pairs(model, guide, batch, k, nest, False, values=vec.draws), k, nest,
                                data_plate, False, size, shapes)
    except Exception as exc:  # noqa: BLE001 - the model does not broadcast over a particle dim
        return False, f"with vectorised particles the pair raised {one_line(exc)}"[:240]
    finally:
        torch.set_rng_state(state)
    dtype = next(iter(vec.observed.values())).dtype
    rtol = 1e-9 if dtype == torch.float64 else 1e-4
    for field in ("observed", "prior", "guide"):
        if not _same(getattr(vec, field), getattr(seq, field), rtol):
            return False, (f"with vectorised particles the log-densities ({field}) differ from those of plain "
                           "runs at the same draws: the model reduces over, or mis-broadcasts, the particle dim")
    return True, ""


def prepare(model, guide, batch: Batch, *, source: str, files: Iterable[str], data_plate: str = "data",
            max_plate_nesting: Optional[int] = None, num_particles: int = 3, vectorize: Optional[bool] = None) -> Setup:
    """Run the pair once and answer the module docstring's questions (ConfigError where unusable)."""
    files = list(files)
    size = next(v for v in batch.values() if torch.is_tensor(v)).shape[0]
    state = torch.get_rng_state()
    try:
        try:
            guide_trace = poutine.trace(guide).get_trace(**batch)
        except Exception as exc:  # noqa: BLE001 - the user's code: one line
            raise user_error(source, files, "the guide", exc) from None
        try:
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(**batch)
        except Exception as exc:  # noqa: BLE001
            raise user_error(source, files, "the model (replayed against the guide)", exc) from None
        needed = deepest_plate(guide_trace, model_trace)
        if max_plate_nesting is not None and max_plate_nesting < needed:
            raise ConfigError(f"{source}: max_plate_nesting = {max_plate_nesting}, but the pair uses {needed} nested "
                              f"plate dims; set max_plate_nesting = {needed}")
        nest = max_plate_nesting if max_plate_nesting is not None else needed
        guided = {n for n, s in guide_trace.nodes.items() if is_latent(s)}
        enumerated = tuple(n for n, s in model_trace.nodes.items() if is_latent(s) and n not in guided
                           and s["infer"].get("enumerate") == "parallel")
        if enumerated:
            try:
                guide_trace, model_trace = _plain_traces(model, guide, batch, nest)
            except Exception as exc:  # noqa: BLE001
                raise user_error(source, files, f"the model, its site(s) {list(enumerated)} enumerated in parallel "
                                 "(as TraceEnum_ELBO runs it),", exc) from None
    finally:
        torch.set_rng_state(state)
    find_data_plate(model_trace, source, data_plate, size)
    shapes = {n: tuple(s["value"].shape) for t in (model_trace, guide_trace) for n, s in t.nodes.items()
              if s["type"] == "sample" and n not in enumerated}
    global_sites = tuple(n for n, s in guide_trace.nodes.items() if is_latent(s)
                         and not any(f.name == data_plate for f in s["cond_indep_stack"]))
    global_factors = [n for n, s in model_trace.nodes.items() if s["type"] == "sample" and s["is_observed"]
                      and not any(f.name == data_plate for f in s["cond_indep_stack"])]
    if global_factors and not global_sites:
        raise ConfigError(f"{source}: the factor(s) {global_factors} (pyro.factor) lie outside the data plate "
                          f"{data_plate!r} but no latent does: the bound then has no batch total to hold them in; put "
                          "them inside the plate (one per datapoint)")
    if vectorize is None:
        vectorized, why = vectorisable(model, guide, batch, nest, data_plate, size, shapes, max(2, num_particles))
    else:
        vectorized, why = vectorize, "" if vectorize else "the file's loss draws them so (vectorize_particles=False)"
    score_sites = tuple(n for n, s in guide_trace.nodes.items() if is_latent(s)
                        and not getattr(s["fn"], "has_rsample", False))
    return Setup(data_plate, nest, size, shapes, global_sites, enumerated, vectorized, why, score_sites)
