"""Data-parallel training over several processes (``torchrun``), CPU (gloo) or GPUs (NCCL).

Launch::

    torchrun --standalone --nproc_per_node 2 -m ppl_vi train gmm --out runs/gmm-ddp

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address; without
them everything here is a no-op and training is the ordinary single-process loop.

How a step is split (``batch_size`` is the *global* batch, as in a single-process run):

* every rank draws the same permutation of the training set (the data generator is seeded from
  ``seed`` on every rank), so all ranks agree on each global batch;
* rank r takes its contiguous shard ``idx.tensor_split(world_size)[r]`` of each global batch;
* each rank's loss is its shard's summed loss divided by the *global* batch size, so the sum over
  ranks of the per-rank losses (and of their gradients) is exactly the single-process loss (and
  gradient) of the global batch; one ``all_reduce(SUM)`` of one flat buffer per step (gradients,
  a has-gradient flag per parameter, and the loss for logging) completes the step, and every
  rank takes the same Adam step from the same parameters;
* parameters are broadcast from rank 0 after the model is built, and then each rank reseeds its
  global RNG with ``seed + rank``, so the particles (guide noise) of different shards are
  independent draws, as they are for different datapoints in a single process;
* only rank 0 writes the run directory (config, history, checkpoints, metrics, figures, report,
  TensorBoard) and shows progress; the other ranks train with ``run_dir=None``.

Why the gradients are all-reduced by hand rather than by wrapping the model in
``DistributedDataParallel``: Pyro's ``model``/``guide`` call the module's submodules and
parameters directly (``self.encoder(x)``, ``self.W``), never ``module.forward``, so DDP's forward
hooks, which arm its gradient buckets, would never fire. The manual reduction after
``backward()`` works for any ``LatentModel`` and any loss.

Agreement with a single process: for a deterministic loss (e.g. ``gmm`` with ``--loss enum
--guide marginal``, the exact -log p(x)) the trajectories agree to float rounding: the global
sum is formed in a different order (per shard, then across ranks). For a stochastic loss the
particle draws differ from the single-process ones (different RNG streams per rank), so the
trajectories agree only in distribution, within Monte Carlo error.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from typing import Iterable, List, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ppl_vi.errors import ConfigError


@dataclasses.dataclass
class DistInfo:
    """Where this process stands: rank, world size, and whether a process group is in use."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    enabled: bool = False  # True when world_size > 1 and a process group is initialised
    owns_group: bool = False  # we initialised the process group (so we destroy it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, idx: Tensor) -> Tensor:
        """This rank's contiguous share of a global batch of indices (sizes differ by at most 1)."""
        if not self.enabled:
            return idx
        return idx.tensor_split(self.world_size)[self.rank]


SINGLE = DistInfo()


def launched_by_torchrun() -> bool:
    """Whether this process was started with RANK and WORLD_SIZE in its environment."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """Rank 0, or not distributed at all (decided from the environment; no process group needed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return env_rank() == 0


def device_for_rank(device: torch.device) -> torch.device:
    """Under torchrun with CUDA, rank-local GPU ``cuda:LOCAL_RANK``; otherwise ``device`` unchanged."""
    if device.type == "cuda" and launched_by_torchrun() and device.index is None:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA device(s) are visible; "
                              "use --nproc_per_node <= the number of GPUs")
        return torch.device("cuda", local)
    return device


def init(device: torch.device) -> DistInfo:
    """Join (or create) the process group when launched by torchrun; a no-op DistInfo otherwise.

    gloo for CPU tensors, NCCL for CUDA. If the caller already initialised a process group
    (``torch.multiprocessing`` tests, a larger program), it is used as it is.
    """
    if not dist.is_available():
        if launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
            raise ConfigError("this torch build has no torch.distributed; cannot train with WORLD_SIZE > 1")
        return DistInfo()
    owns = False
    if not dist.is_initialized():
        if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) <= 1:
            return DistInfo()
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
        owns = True
    world = dist.get_world_size()
    if world <= 1:
        return DistInfo(owns_group=owns)
    backend = dist.get_backend()
    if device.type == "cuda" and backend != "nccl":
        raise ConfigError(f"training on {device} needs the nccl backend, the process group uses {backend}")
    if device.type == "cpu" and backend == "nccl":
        raise ConfigError("the process group uses nccl, which cannot reduce CPU tensors; use --device cuda or gloo")
    return DistInfo(rank=dist.get_rank(), world_size=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                    enabled=True, owns_group=owns)


def shutdown(info: DistInfo) -> None:
    """Destroy the process group if :func:`init` created it, once every rank has reached this point.

    Rank 0 evaluates and writes the run directory after the last step while the other ranks are
    idle; a rank that tore its gloo connections down meanwhile could abort (``terminate called
    without an active exception``, SIGABRT) when rank 0's side closed. A barrier first lets all
    ranks destroy the group together.
    """
    if info.owns_group and torch.distributed.is_initialized():
        if info.enabled and dist.get_backend() == "gloo":  # rank 0's evaluation may outlast the group's timeout
            dist.monitored_barrier(timeout=datetime.timedelta(hours=24))
        elif info.enabled:
            dist.barrier()
        torch.distributed.destroy_process_group()


def broadcast_parameters(module: torch.nn.Module, info: DistInfo) -> None:
    """Copy rank 0's parameters and buffers to every rank (identical starting points)."""
    if not info.enabled:
        return
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            torch.distributed.broadcast(tensor.data, src=0)


def all_reduce_gradients(params: Iterable[torch.nn.Parameter], loss: Tensor, info: DistInfo) -> Tensor:
    """Sum gradients and the loss over ranks in one collective; returns the summed loss.

    Each rank's loss must already be divided by the *global* batch size: the sum is then the
    global per-datapoint loss and the summed gradients its gradient. A parameter with no gradient
    on any rank keeps ``grad=None`` (so Adam skips it, as in a single process); one with a
    gradient on some ranks only gets the sum of the ranks that have one. No host sync when every
    parameter has a local gradient: with NCCL the all-reduce is queued on the device stream.
    """
    if not info.enabled:
        return loss
    params = [p for p in params if p.requires_grad]
    loss = loss.detach()
    device = params[0].device if params else loss.device
    flats: List[Tensor] = []
    for p in params:
        flats.append(p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=device, dtype=p.dtype))
    dtype = params[0].dtype if params else loss.dtype
    has_grad = torch.tensor([p.grad is not None for p in params], device=device, dtype=dtype)
    buffer = torch.cat([f.to(dtype) for f in flats] + [has_grad, loss.reshape(1).to(device, dtype)])
    torch.distributed.all_reduce(buffer, op=torch.distributed.ReduceOp.SUM)
    n = len(params)
    missing = [i for i, p in enumerate(params) if p.grad is None]
    # whether another rank had a gradient where this one has none: read on the host (one sync)
    # only when some parameter lacks a local gradient, so the usual path stays sync-free
    elsewhere = set()
    if missing:
        present = buffer[-(n + 1):-1][missing].tolist()
        elsewhere = {i for i, count in zip(missing, present) if count > 0}
    offset = 0
    for i, p in enumerate(params):
        count = p.numel()
        chunk = buffer[offset:offset + count].view_as(p).to(p.dtype)
        offset += count
        if p.grad is not None:
            p.grad.copy_(chunk)
        elif i in elsewhere:
            p.grad = chunk.clone()
    return buffer[-1].to(loss.dtype)


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank if ``flag`` is True on any (a consistent stop decision; one sync)."""
    if not info.enabled:
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" \
        else torch.device("cpu")
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item() > 0)


def rank_seed(seed: int, info: DistInfo) -> Optional[int]:
    """The global-RNG seed for this rank's particles (None when not distributed: keep the stream)."""
    return seed + info.rank if info.enabled else None
