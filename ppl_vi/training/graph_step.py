"""The fast training step: model/guide kept, host syncs and Python overheads taken out.

Three layers, each used where it applies and falling back, with a one-line note, where not:

1. **The hot path** (:func:`hot_path`), always: Pyro's and ``torch.distributions``' argument
   validation off, and the model's ``pyro.module`` param-store registration skipped
   (``LatentModel.use_param_store``; the trainer optimises the module's parameters with its own
   torch optimiser, so the param store plays no part in training). Both are restored afterwards.
2. **A sync-free loss** (:class:`SyncFreeLoss`) for ``Trace_ELBO`` and :class:`IWAELoss` with
   reparameterised guides: the guide traced once and the model replayed against it
   (``poutine.trace``/``poutine.replay``), log-densities summed as Pyro sums them, but no
   ``.item()`` (``Trace_ELBO`` reads every site's log-density back to the host to form its loss
   value, and checks it for NaN with another read-back). Same sample, same value, same gradient
   as ``loss.differentiable_loss`` (``tests/test_fast_path.py``). On the CPU this is the fast step.
3. **A CUDA graph** (:class:`GraphStep`): the whole step -- loss, backward and
   ``Adam(capturable=True)`` update -- captured once and replayed per batch, the batch copied into
   static input buffers. Only on CUDA, for one process (not under torchrun), ``nan_policy="stop"``
   (skipping a step needs a host decision), a sync-free loss and a static trace structure (checked
   during warm-up). The warm-up steps are real training steps run eagerly on a side stream before
   the parameters are used in any step on the default stream, as CUDA-graph capture requires.
   Batches of another shape (an epoch's last, smaller batch) take the eager step.

What a model needs for capture (the built-in VAE family has it): no Python-float distribution
parameters (build them from the data, ``x.new_zeros``), ``pyro.plate(..., device=x.device)``,
no data-dependent Python control flow, no ``.item()``. The plate's own subsample site is left out
of the log-density sum, as Pyro leaves it out.

:class:`FastLoss` is layers 1 and 2 (a loss object); :class:`GraphStep` is layer 3, a
:class:`~ppl_vi.training.step.Stepper` built from the step's loss function, the parameters and the
optimiser, with the eager step (:class:`~ppl_vi.training.step.EagerStep`) beside it for every step
the graph does not take. Neither sees the trainer.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Dict, List, Optional, Tuple

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer import Trace_ELBO
from torch import Tensor

from ppl_vi.objectives.importance import IWAELoss
from ppl_vi.objectives.traces import particle_terms
from ppl_vi.sites import PARTICLE_PLATE, LogMeanExp, chunk_sizes, is_variable


class Unsupported(Exception):
    """The sync-free loss or the CUDA graph does not apply; the message says why (one line)."""


# --------------------------------------------------------------------------------------------
# 1. the hot path


@contextlib.contextmanager
def hot_path(module=None):
    """Validation off (Pyro's and ``torch.distributions``') and ``module.use_param_store`` False
    inside; all three restored on exit."""
    torch_validate = torch.distributions.Distribution._validate_args
    store = getattr(module, "use_param_store", None)
    torch.distributions.Distribution.set_default_validate_args(False)
    if store is not None:
        module.use_param_store = False
    try:
        with pyro.validation_enabled(False):
            yield
    finally:
        if store is not None:
            module.use_param_store = store
        torch.distributions.Distribution.set_default_validate_args(torch_validate)


def _sample_sites(trace):
    """The trace's sample sites without the plates' own subsample sites (as Pyro prunes them)."""
    return [site for site in trace.nodes.values() if is_variable(site)]


def _site_log_prob(site) -> Tensor:
    """A site's scaled and masked log-density, exactly as ``Trace.compute_log_prob`` forms it."""
    log_p = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
    return scale_and_mask(log_p, site["scale"], site["mask"])


def _check_guide(guide_trace, model_trace) -> None:
    """Raise :class:`Unsupported` unless every guide site is reparameterised and nothing enumerates."""
    for site in _sample_sites(guide_trace):
        if not getattr(site["fn"], "has_rsample", False):
            raise Unsupported(f"guide site {site['name']!r} is not reparameterised (needs a score-function term)")
    for trace in (guide_trace, model_trace):
        for site in _sample_sites(trace):
            if site["infer"].get("enumerate"):
                raise Unsupported(f"site {site['name']!r} is enumerated")


def structure(*traces) -> tuple:
    """The static structure of traces: site names, types and value shapes, in order."""
    return tuple((name, site["type"], tuple(site["value"].shape) if torch.is_tensor(site.get("value")) else None)
                 for trace in traces for name, site in trace.nodes.items() if site["type"] == "sample")


# --------------------------------------------------------------------------------------------
# 2. the sync-free loss


class SyncFreeLoss:
    """``differentiable_loss(model, guide, **batch)`` of ``Trace_ELBO`` / :class:`IWAELoss` without
    host syncs. Raises :class:`Unsupported` (at construction or on the first traces) otherwise.

    Inside :meth:`recording`, each call keeps the traces' :func:`structure` (the CUDA graph's warm-up
    checks that it stays put).
    """

    def __init__(self, loss):
        if type(loss) is Trace_ELBO:  # not its subclasses (mean-field KL, enumeration, ...)
            self.kind = "elbo"
        elif isinstance(loss, IWAELoss):
            self.kind = "iwae"
        else:
            raise Unsupported(f"{type(loss).__name__} has no sync-free form here")
        self.loss = loss
        self.checked, self._seen = False, None

    # ---- traces -----------------------------------------------------------------------------
    def _traces(self, model, guide, batch):
        guide_trace = poutine.trace(guide).get_trace(**batch)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(**batch)
        _check_guide(guide_trace, model_trace)  # every call: a step's batches may differ in kind (SSVAE)
        self.checked = True
        if self._seen is not None:
            self._seen["structure"] = structure(guide_trace, model_trace)
        return guide_trace, model_trace

    @contextlib.contextmanager
    def recording(self):
        """Inside the block, the latest call's trace structure is the yielded dict's ``"structure"``."""
        self._seen = {"structure": None}
        try:
            yield self._seen
        finally:
            self._seen = None

    # ---- Trace_ELBO -------------------------------------------------------------------------
    def _elbo_particle(self, model, guide, batch) -> Tensor:
        guide_trace, model_trace = self._traces(model, guide, batch)
        # the same operations in the same order as Trace_ELBO's surrogate: model log-densities and
        # their sums first, then the guide's, then -(Σ model - Σ guide)
        model_sums = [_site_log_prob(site).sum() for site in _sample_sites(model_trace)]
        guide_terms = [_site_log_prob(site) for site in _sample_sites(guide_trace)]
        elbo = 0
        for term in model_sums:
            elbo = elbo + term
        for term in guide_terms:
            elbo = elbo - term.sum()
        return -elbo

    def _elbo(self, model, guide, batch) -> Tensor:
        loss = self.loss
        if loss.max_plate_nesting == float("inf"):
            loss._guess_max_plate_nesting(model, guide, (), batch)  # private Pyro API: its first-call guess
        if loss.vectorize_particles:  # private Pyro API (_vectorized_num_particles): Trace_ELBO's own particle plate
            particles = [self._elbo_particle(loss._vectorized_num_particles(model),
                                             loss._vectorized_num_particles(guide), batch)]
        else:
            particles = [self._elbo_particle(model, guide, batch) for _ in range(loss.num_particles)]
        total = 0.0
        for particle in particles:
            total = total + particle / loss.num_particles
        return total

    # ---- IWAELoss ---------------------------------------------------------------------------
    def _iwae(self, model, guide, batch) -> Tensor:
        """:meth:`IWAELoss.differentiable_loss` without reading scales back: a tensor β stays a tensor."""
        loss = self.loss
        K, nest = loss.num_particles, loss.max_plate_nesting
        log_mean_w, mean_log_lik, terms = LogMeanExp(), 0.0, None
        for k in chunk_sizes(K, loss.chunk_size):
            with pyro.plate(PARTICLE_PLATE, k, dim=-(nest + 1)):
                guide_trace, model_trace = self._traces(model, guide, batch)
            terms = particle_terms(guide_trace, model_trace, k, nest, check_scales=False)
            if terms.global_ratio is not None:
                raise Unsupported(f"global latent(s) {list(terms.global_sites)}")
            log_mean_w.add(terms.log_weights)
            mean_log_lik = mean_log_lik + terms.log_lik.sum(0)
        bound = log_mean_w.value()
        if torch.is_tensor(terms.beta) or terms.beta != 1.0:
            bound = terms.beta * bound + (1 - terms.beta) * mean_log_lik / K
        return -terms.c * bound.sum()

    # ---- entry point ------------------------------------------------------------------------
    def __call__(self, model, guide, **batch) -> Tensor:
        return self._elbo(model, guide, batch) if self.kind == "elbo" else self._iwae(model, guide, batch)


# --------------------------------------------------------------------------------------------
# optimiser conversions (CUDA graphs need a capturable Adam with a tensor learning rate)


def make_capturable(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """``capturable=True``, the learning rate a device tensor (so a scheduler's in-place update reaches
    a captured step), and any ``step`` counters on the device."""
    optimizer.defaults["capturable"] = True
    for group in optimizer.param_groups:
        group["capturable"] = True
        if not torch.is_tensor(group["lr"]):
            group["lr"] = torch.tensor(float(group["lr"]), device=device)
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if "step" in state and state["step"].device != p.device:
                state["step"] = state["step"].to(device=p.device, dtype=torch.float32)


def plain_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Undo :func:`make_capturable` (e.g. a CUDA-graph run's checkpoint loaded for an eager run)."""
    if not any(group.get("capturable") for group in optimizer.param_groups):
        return
    optimizer.defaults["capturable"] = False
    for group in optimizer.param_groups:
        group["capturable"] = False
        if torch.is_tensor(group["lr"]):
            group["lr"] = float(group["lr"])
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if "step" in state and state["step"].device.type != "cpu" and not group.get("fused"):
                state["step"] = state["step"].cpu()


# --------------------------------------------------------------------------------------------
# 3. the fast loss and the graph step


def subnormals_flushed() -> bool:
    """Does this thread flush subnormal floats to zero now? (torch has no getter: the smallest
    subnormal double times 1 reads 0 exactly when it does.)"""
    return (torch.tensor(5e-324, dtype=torch.float64) * 1.0).item() == 0.0


def flush_supported() -> bool:
    """Can this CPU flush subnormals (SSE3)? Asked by setting the flag, then put back as it was."""
    before = subnormals_flushed()
    supported = torch.set_flush_denormal(True)
    torch.set_flush_denormal(before)
    return supported


@contextlib.contextmanager
def flushing_subnormals(on: bool = True):
    """Inside the block (when ``on``), subnormal floats read and compute as 0 on this thread; the
    caller's setting comes back after, so a user's own code (or a property-based test generating
    subnormals) never inherits it."""
    if not on:
        yield
        return
    before = subnormals_flushed()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(before)


def _stdout(message: str) -> None:
    """What the fast path decided: information, not an error, so stdout (stderr stays one line per mistake)."""
    print(message, file=sys.stdout, flush=True)


def _rng_state(device: torch.device):
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _signature(batches) -> tuple:
    return tuple(tuple((k, None if v is None else (tuple(v.shape), v.dtype, v.device) if torch.is_tensor(v) else v)
                       for k, v in sorted(batch.items())) for batch in batches)


class FastLoss:
    """The fast path's loss: :meth:`differentiable_loss` on the hot path, through the sync-free loss
    where it applies and through ``loss`` (the plain loss object) otherwise.

    ``mode`` says what runs: ``"sync-free"``, ``"eager"`` (the plain loss, still on the hot path),
    or ``"sync-free + eager"`` when some kinds of batch are supported and others are not.

    Support is decided per *kind* of batch (which keys it has, and which are None: a labelled and
    an unlabelled SSVAE batch are two kinds), on its first traces, and the traces are checked again
    on every call: a batch whose guide samples a discrete site (which needs a score-function term)
    or whose sites are enumerated runs the plain loss, eagerly, never the sync-free one. Every
    decision is a line in ``notes``, written to stdout as it is made once :meth:`announce` has been
    called (whatever the progress setting). On a CPU device the trainer's steps run with subnormal
    floats flushed to zero (:func:`flushing_subnormals`: 2.4-3.3x faster CPU steps once weights
    decay into them), said in a note and recorded as ``flush_denormal``.
    """

    def __init__(self, loss, module: torch.nn.Module, device, quiet: bool = False,
                 log: Optional[Callable[[str], None]] = None):
        self.loss, self.module, self.device = loss, module, torch.device(device)
        self.log = None if quiet else (log or _stdout)
        self.notes: List[str] = []
        self.announced = False  # notes are written from the first training step on (announce)
        self.kinds: Dict[tuple, Optional[str]] = {}  # batch kind -> None (sync-free) or why it runs eagerly
        try:
            self.sync_free: Optional[SyncFreeLoss] = SyncFreeLoss(loss)
        except Unsupported as exc:
            self.sync_free = None
            self.note(f"sync-free loss off ({exc}); using {type(loss).__name__} eagerly")
        self.flush_denormal = self.device.type == "cpu" and flush_supported()
        if self.flush_denormal:
            self.note("CPU: subnormal floats flushed to zero during training steps (torch.set_flush_denormal, "
                      "restored after); they made CPU steps 2.4-3.3x slower once weights and gradients decayed "
                      "into them")

    def note(self, message: str) -> None:
        """Keep ``message`` in ``notes``; write it at once if the notes have been announced."""
        self.notes.append(message)
        if self.log is not None and self.announced:
            self.log(f"ppl_vi fast path: {message}")

    def announce(self) -> None:
        """Write the notes made so far (once training starts), and every later one as it is made."""
        if not self.announced and self.log is not None:
            for message in self.notes:
                self.log(f"ppl_vi fast path: {message}")
        self.announced = True

    @property
    def some_eager(self) -> bool:
        """Whether some kind of batch runs the plain loss (a CUDA graph then cannot hold the step)."""
        return any(why is not None for why in self.kinds.values())

    @property
    def mode(self) -> str:
        if self.sync_free is None:
            return "eager"
        eager = [k for k, why in self.kinds.items() if why is not None]
        if eager and len(eager) == len(self.kinds):
            return "eager"
        return "sync-free + eager" if eager else "sync-free"

    def differentiable_loss(self, model, guide, *args, **batch) -> Tensor:
        """The summed negative bound over ``batch``, like ``loss.differentiable_loss``."""
        with hot_path(self.module):
            if self.sync_free is not None:
                kind = _kind(batch)
                if kind in self.kinds and self.kinds[kind] is None:
                    return self.sync_free(model, guide, **batch)
                if kind not in self.kinds:
                    rng = _rng_state(self.device)
                    try:  # the first traces of this kind of batch tell whether it is supported
                        value = self.sync_free(model, guide, **batch)
                        self.kinds[kind] = None
                        return value
                    except Unsupported as exc:  # its random draws are undone: the eager loss draws the same
                        _set_rng_state(rng, self.device)
                        self.kinds[kind] = str(exc)
                        what = f" for batches with {_describe(kind)}" if len(self.kinds) > 1 or _has_none(kind) else ""
                        self.note(f"sync-free loss off{what} ({exc}); using {type(self.loss).__name__} "
                                  "eagerly for them")
            return self.loss.differentiable_loss(model, guide, *args, **batch)


def graph_blocker(device: torch.device, fast: FastLoss, distributed: bool, nan_policy: str) -> Optional[str]:
    """Why a CUDA graph cannot hold the step here, or None."""
    if device.type != "cuda":
        return f"{device.type} device"
    if fast.sync_free is None:
        return "no sync-free loss"
    if distributed:
        return "distributed run (gradients all-reduced per step)"
    if nan_policy != "stop":
        return f"nan_policy={nan_policy!r} decides on the host every step"
    return None


class GraphStep:
    """A :class:`~ppl_vi.training.step.Stepper`: the whole step (loss, backward, Adam) captured in a CUDA
    graph and replayed per batch, where it applies; ``eager`` (a Stepper over the same loss function,
    parameters and optimiser) takes every other step.

    Built from the step's loss function (``loss_fn(batches)``: the per-datapoint loss, evaluated
    through ``fast``, the :class:`FastLoss` that also says whether the trace structure is static),
    the parameters and the optimiser. ``blocker`` (see :func:`graph_blocker`) is why the graph does
    not apply at all, or None. ``mode`` is ``"cuda-graph"`` once captured, otherwise ``fast.mode``.
    """

    def __init__(self, loss_fn: Callable, parameters, optimizer: torch.optim.Optimizer, device, eager, fast: FastLoss,
                 blocker: Optional[str], warmup: int = 3):
        self.loss_fn, self.parameters, self.optimizer = loss_fn, list(parameters), optimizer
        self.device, self.eager, self.fast, self.warmup = torch.device(device), eager, fast, warmup
        self.graph_reason = blocker
        if blocker and fast.sync_free is not None:
            fast.note(f"CUDA graph off ({blocker}); using the sync-free eager step")
        self.reset()

    # ---- bookkeeping --------------------------------------------------------------------------
    def reset(self) -> None:
        """Drop any captured graph and start warming up again (after loading a checkpoint)."""
        self.graph = None
        self.graph_key = None
        self.static: Dict = {}
        self.warm_key, self.warm_done, self.warm_structure = None, 0, None
        self.stream = None
        self._capturable = False

    def announce(self) -> None:
        self.fast.announce()

    @property
    def mode(self) -> str:
        return "cuda-graph" if self.graph is not None else self.fast.mode

    @property
    def notes(self) -> List[str]:
        return self.fast.notes

    def record(self) -> dict:
        """What ran, for metrics.json: the mode and every note on how it was decided."""
        return {"mode": self.mode, "flush_denormal": self.fast.flush_denormal, "notes": list(self.fast.notes)}

    def _no_graph(self, reason: str, quiet: bool = False) -> None:
        """Give the CUDA graph up for this run: eager steps from now on, with a plain optimiser."""
        self.graph_reason, self.graph, self.static = reason, None, {}
        if self._capturable:
            plain_optimizer(self.optimizer)
            self._capturable = False
        if not quiet:
            self.fast.note(f"CUDA graph off ({reason}); using the sync-free eager step")

    # ---- the step -----------------------------------------------------------------------------
    def step(self, batches) -> Tuple[Tensor, bool]:
        """One training step: through the CUDA graph where it applies, else ``eager``'s."""
        graphed = self.graph_step(batches)
        return (graphed, True) if graphed is not None else self.eager.step(batches)

    def _eager_step(self, batches) -> Tensor:
        loss, _ = self.eager.step(batches)
        return loss

    def graph_step(self, batches) -> Optional[Tensor]:
        """One whole training step through the CUDA graph (warming up / capturing on the way);
        None where the graph does not apply (the eager step then runs)."""
        if self.graph_reason is None and self.fast.some_eager:
            self._no_graph("a kind of batch has no sync-free loss", quiet=True)
        if self.graph_reason is not None:
            return None
        key = _signature(batches)
        if self.graph is None:
            if not self._capturable:
                make_capturable(self.optimizer, self.device)
                self._capturable = True
                self.stream = torch.cuda.Stream(device=self.device)
            if self.warm_key != key:
                self.warm_key, self.warm_done, self.warm_structure = key, 0, None
            if self.warm_done < self.warmup:
                return self._warmup_step(batches)
            try:
                self._capture(batches, key)
            except Exception as exc:  # noqa: BLE001 - any capture failure falls back to eager
                self._abandon_capture(exc)
                return None
            self.graph.replay()
            return self.static["loss"].clone()
        if key != self.graph_key:  # another batch shape (an epoch's last batch): eager, default stream
            return self._eager_beside_graph(batches)
        for static_batch, batch in zip(self.static["batches"], batches):
            for name, value in batch.items():
                if torch.is_tensor(value):
                    static_batch[name].copy_(value, non_blocking=True)
        self.graph.replay()
        return self.static["loss"].clone()

    def _warmup_step(self, batches) -> Tensor:
        """A real training step, eager, on the side stream; checks the trace structure stays put."""
        stream, current = self.stream, torch.cuda.current_stream(self.device)
        stream.wait_stream(current)
        with self.fast.sync_free.recording() as seen:
            with torch.cuda.stream(stream):
                loss = self._eager_step(batches)
        current.wait_stream(stream)
        loss.record_stream(current)
        if self.fast.some_eager:  # turned out unsupported on the first traces
            self._no_graph("a kind of batch has no sync-free loss", quiet=True)
            return loss
        if self.warm_structure is not None and seen["structure"] != self.warm_structure:
            self._no_graph("the trace structure changes from step to step")
        self.warm_structure = seen["structure"]
        self.warm_done += 1
        return loss

    def _capture(self, batches, key) -> None:
        static_batches = [{k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()} for batch in batches]
        if hasattr(batches, "global_count"):
            static_batches = type(batches)(static_batches, batches.global_count, getattr(batches, "scales", None))
        self.optimizer.zero_grad(set_to_none=True)  # gradients are allocated inside the graph's pool
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loss = self.loss_fn(static_batches)
            loss.backward()
            self.optimizer.step()
            static_loss = loss.detach()
        self.graph, self.graph_key = graph, key
        self.static = {"batches": static_batches, "loss": static_loss, "grads": [p.grad for p in self.parameters]}
        self.fast.note(f"whole step captured in a CUDA graph after {self.warm_done} warm-up steps")

    def _abandon_capture(self, exc: Exception) -> None:
        try:
            torch.cuda.synchronize(self.device)
        finally:
            self.optimizer.zero_grad(set_to_none=True)  # no gradient may point into the graph's pool
        self.graph, self.static = None, {}
        self._no_graph(f"capture failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")

    def _eager_beside_graph(self, batches) -> Tensor:
        loss = self._eager_step(batches)  # fresh gradients outside the graph's memory pool
        for p, g in zip(self.parameters, self.static["grads"]):
            p.grad = g  # torch's API for a parameter's gradient: the captured step keeps reading and writing these
        return loss


def _kind(batch: dict) -> tuple:
    """A batch's kind: its keys, each marked present or None (labelled vs unlabelled)."""
    return tuple(sorted((k, v is None) for k, v in batch.items()))


def _has_none(kind: tuple) -> bool:
    return any(none for _, none in kind)


def _describe(kind: tuple) -> str:
    missing = [k for k, none in kind if none]
    return f"no {', '.join(missing)}" if missing else "every field (" + ", ".join(k for k, _ in kind) + ")"


def fast_note(stepper) -> str:
    """One line saying which fast path a stepper (``Trainer.stepper``) runs (for benchmarks and logs)."""
    record = stepper.record()
    if record["mode"] == "off":
        return "fast path off (config.fast=False)"
    return record["mode"] + (f" ({'; '.join(record['notes'])})" if record["notes"] else "")
