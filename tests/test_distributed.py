"""Data-parallel training (torchrun, gloo on CPU) against a single process with the same global batch.

Both comparisons use models whose loss *value* does not depend on the particles, so the two
trajectories must agree to float32 rounding (we allow 1e-5 relative; observed ~2e-7):

* ``gmm --loss enum --guide marginal``: the loss is the exact -log p(x) (c summed out), no
  sampling at all;
* ``linear-gaussian --guide exact``: z *is* sampled, and the ranks draw different particles
  (each rank reseeds with seed + rank), but with the exact posterior as guide every draw gives
  log p(x, z) - log q(z|x) = log p(x), value and gradient, so the particles cancel.

What is left is the order of summation: per shard, then across ranks (all_reduce), instead of
one sum over the global batch. For a loss whose value depends on the particles (an amortised
guide) the particle draws differ between a 2-rank and a 1-rank run, so the trajectories agree
only in distribution; that case is not asserted here.

n_train is chosen so that the last global batch does not split evenly (301 = 4·64 + 45: shards
23/22) or leaves rank 1 with an empty shard (257 = 4·64 + 1), which exercises the "no local
gradient" path of the all-reduce.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ppl_vi.cli import main
from ppl_vi.distributed import DistInfo, all_reduce_gradients
from ppl_vi.training.batches import Step

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="this torch build has no torch.distributed gloo backend")

CASES = {
    "gmm-exact-marginal": ["gmm", "--loss", "enum", "--guide", "marginal", "--n-train", "257"],
    "linear-gaussian-exact-guide": ["linear-gaussian", "--guide", "exact", "--n-train", "301"],
}
COMMON = ["--device", "cpu", "--n-test", "100", "--epochs", "3", "--batch-size", "64", "--no-progress"]
RTOL = 1e-5


def history(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines() if line.strip()]


def torchrun(args, nproc=2):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           "-m", "ppl_vi", *args], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_ranks_match_one_process(case, tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert main(["train", *CASES[case], *COMMON, "--out", str(single)]) == 0
    result = torchrun(["train", *CASES[case], *COMMON, "--out", str(ddp)])
    assert result.returncode == 0, result.stderr[-3000:]
    # only rank 0 reports and writes
    assert result.stdout.count("run directory:") == 1, result.stdout
    for name in ("config.json", "metrics.json", "history.jsonl", "report.html", "checkpoints/last.pt"):
        assert (ddp / name).is_file(), name

    h1, h2 = history(single), history(ddp)
    assert [h["epoch"] for h in h1] == [h["epoch"] for h in h2] == [1, 2, 3]
    assert [h["step"] for h in h1] == [h["step"] for h in h2]
    for a, b in zip(h1, h2):
        for key in ("train_loss", "val_loss"):
            assert b[key] == pytest.approx(a[key], rel=RTOL), (key, a, b)
    m1 = json.loads((single / "metrics.json").read_text())
    m2 = json.loads((ddp / "metrics.json").read_text())
    assert m2["test_log_likelihood"] == pytest.approx(m1["test_log_likelihood"], rel=RTOL)


def test_shards_partition_every_global_batch():
    idx = torch.randperm(45)
    for world in (1, 2, 3, 4):
        shards = [DistInfo(rank=r, world_size=world, enabled=world > 1).shard(idx) for r in range(world)]
        assert torch.equal(torch.cat(shards), idx)
        assert max(s.numel() for s in shards) - min(s.numel() for s in shards) <= 1
    one = torch.tensor([7])
    assert [DistInfo(rank=r, world_size=2, enabled=True).shard(one).numel() for r in range(2)] == [1, 0]
    step = Step([{"x": torch.zeros(3, 2)}], global_count=6)
    assert len(step) == 1 and step.global_count == 6 and isinstance(step, list)


def test_not_distributed_without_torchrun(monkeypatch):
    from ppl_vi import distributed

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = distributed.init(torch.device("cpu"))
    assert not info.enabled and info.is_main and info.world_size == 1
    assert distributed.is_main_process()
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), 3.0)
    loss = torch.tensor(1.5)
    assert distributed.all_reduce_gradients([p], loss, info) is loss  # a no-op
    assert torch.equal(p.grad, torch.full((2,), 3.0))


def _reduced_gradients_worker(rank: int, world: int, port: int, out: str) -> None:
    """One rank: its shard of a fixed GMM batch, loss / global count, backward, all_reduce_gradients."""
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model, x = _exact_gmm()
        shard = DistInfo(rank=rank, world_size=world, enabled=True).shard(torch.arange(x.shape[0]))
        loss = _enum_loss(model, x[shard]) / x.shape[0]
        loss.backward()
        total = all_reduce_gradients(model.parameters(), loss, DistInfo(rank=rank, world_size=world, enabled=True))
        torch.save({"loss": total, "grads": [p.grad for p in model.parameters()]}, f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def _exact_gmm():
    from ppl_vi.data.synthetic import default_gmm_params, sample_gmm
    from ppl_vi.models.gmm import GMM

    torch.manual_seed(0)
    model = GMM(3, 2, hidden=8, guide="marginal").to(torch.float64)
    x, _ = sample_gmm(default_gmm_params(torch.float64), 7, seed=1)
    return model, x


def _enum_loss(model, x):
    from pyro.infer import TraceEnum_ELBO

    return TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(model.model, model.guide, x=x)


def test_reduced_gradients_equal_the_single_process_gradient(tmp_path):
    """Two gloo ranks, each with its shard (4 + 3 datapoints) of an exact (enumerated) GMM loss divided by
    the global count: after ``all_reduce_gradients`` every rank's gradients equal the single process's on
    the whole batch (float64, 1e-12). Catches an all-reduce that averages instead of summing, or scales
    the gradients but not the loss, which the loss-only comparison under Adam (scale-invariant) misses."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "grads")
    torch.multiprocessing.spawn(_reduced_gradients_worker, args=(2, port, out), nprocs=2, join=True)
    model, x = _exact_gmm()
    loss = _enum_loss(model, x) / x.shape[0]
    single = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    for rank in range(2):
        got = torch.load(f"{out}.{rank}")
        assert got["loss"].item() == pytest.approx(loss.item(), rel=1e-12)
        used = [(n, a, b) for (n, _), a, b in zip(model.named_parameters(), got["grads"], single) if b is not None]
        assert len(used) >= 3  # the mixture's weights, means and scales
        assert all(a is None for a, b in zip(got["grads"], single) if b is None)  # unused stays None, as in one process
        for name, a, b in used:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=name)
