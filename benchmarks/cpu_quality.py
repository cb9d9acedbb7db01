"""Quality per CPU-minute, side by side: ppl_vi's VAE, Pyro's example VAE and a hand-written PyTorch VAE,
each trained for the same wall-clock budget on the same machine, in one run, one after the other.

==========  ==========================================================================================
contender   what trains
==========  ==========================================================================================
ppl_vi      the library's trainer (``ppl_vi.training.Trainer.train_step``, fast path on) with the
            main job's CPU profile (``ppl_vi.job.PROFILES["cpu"]``: architecture, batch size, learning
            rate), its learning rate decayed per epoch to ``lr_final`` over the epochs that fit the
            budget (measured on the first epoch, as ``ppl-vi run`` does)
pyro        written the way Pyro's ``examples/vae/vae.py`` is: 784-400-50, softplus, z scale
            exp(.), sigmoid pixel means, ``pyro.module``, ``pyro.plate``, ``SVI(model, guide,
            pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())``, ``svi.step`` on batches of 256
torch       hand-written PyTorch the way PyTorch's ``examples/vae`` is: 784-400-20, ReLU, sigmoid
            pixel means, BCE + closed-form KL, ``torch.optim.Adam(lr=1e-3)``, batches of 128
==========  ==========================================================================================

All three see the same data: the 60,000 MNIST training images, binarised afresh in every batch
(``ppl_vi.data.mnist.binarize``), in a seeded random order. The clock runs only while a contender
trains: at each checkpoint (``--minutes``, default 5 and 10) its weights are copied (clock paused)
and training continues; after training, every copy is scored by one evaluator, the same for all:
on a fixed subset of the test set (the first ``--test-images``, default 1,000, of the fixed-
binarisation test set), per image,

    NELBO      = KL(q(z|x) || N(0, I)) - (1/10) Σ_{j<=10} log p(x|z_j)        (closed-form KL)
    -IWAE_K    = -log (1/K) Σ_{j<=K} p(x|z_j) p(z_j) / q(z_j|x),   K = ``--iwae-k`` (1000)

with z_j ~ q(z|x), each contender's own encoder and likelihood, means ± SE over the images. The
table also gives steps per second and images per second, and ppl_vi's ratios to the others.

    python benchmarks/cpu_quality.py                      # ~35 min: 3 x 10 min of training + scoring
    python benchmarks/cpu_quality.py --minutes 1,2        # shorter budgets
    python benchmarks/cpu_quality.py --quick              # seconds: tiny budgets (a test runs this)
    python benchmarks/cpu_quality.py --contenders ppl_vi --ppl-vi '{"lr": 3e-3}'   # tuning ppl_vi alone

``--clock cpu`` measures process CPU time instead of wall time (for tuning on a shared machine
with ``--threads 1``); the final table must be wall time on a quiet machine (the default).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from pyro.infer import SVI, Trace_ELBO  # noqa: E402
from pyro.optim import Adam  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from ppl_vi import bounds  # noqa: E402
from ppl_vi.config import Schedule  # noqa: E402
from ppl_vi.models.configure import build_config  # noqa: E402
from ppl_vi.data import mnist  # noqa: E402
from ppl_vi.job import PROFILES  # noqa: E402
from ppl_vi.training.graph_step import fast_note  # noqa: E402
from ppl_vi.runtime import device_name  # noqa: E402
from ppl_vi.training import Trainer  # noqa: E402

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


# ---- the clock --------------------------------------------------------------------------------------


class Clock:
    """Training time only: ``pause()`` / ``resume()`` around anything that is not training."""

    def __init__(self, kind: str):
        self.now = time.process_time if kind == "cpu" else time.perf_counter
        self.spent, self.since = 0.0, None

    def resume(self) -> None:
        self.since = self.now()

    def pause(self) -> None:
        self.spent += self.now() - self.since
        self.since = None

    def seconds(self) -> float:
        return self.spent + (self.now() - self.since if self.since is not None else 0.0)


# ---- the contenders: each trains, and gives (encode, log_px) for the evaluator -----------------------


class PyroExampleVAE(nn.Module):
    """Pyro's examples/vae/vae.py: Encoder/Decoder with softplus, exp scale, sigmoid means."""

    def __init__(self, z_dim: int = 50, hidden: int = 400):
        super().__init__()
        self.z_dim = z_dim
        self.fc1, self.fc21, self.fc22 = nn.Linear(784, hidden), nn.Linear(hidden, z_dim), nn.Linear(hidden, z_dim)
        self.fc3, self.fc4 = nn.Linear(z_dim, hidden), nn.Linear(hidden, 784)

    def encode(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        hidden = F.softplus(self.fc1(x))
        return self.fc21(hidden), torch.exp(self.fc22(hidden))

    def decode(self, z: Tensor) -> Tensor:
        return torch.sigmoid(self.fc4(F.softplus(self.fc3(z))))

    def model(self, x: Tensor) -> None:
        pyro.module("decoder", self)
        with pyro.plate("data", x.shape[0]):
            z_loc = x.new_zeros(torch.Size((x.shape[0], self.z_dim)))
            z_scale = x.new_ones(torch.Size((x.shape[0], self.z_dim)))
            z = pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))
            pyro.sample("obs", dist.Bernoulli(self.decode(z), validate_args=False).to_event(1), obs=x)

    def guide(self, x: Tensor) -> None:
        pyro.module("encoder", self)
        with pyro.plate("data", x.shape[0]):
            z_loc, z_scale = self.encode(x)
            pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))

    def log_px(self, x: Tensor, z: Tensor) -> Tensor:
        """log p(x|z) as the model scores it: Bernoulli(probs) over the pixels, (K, B)."""
        return dist.Bernoulli(self.decode(z), validate_args=False).log_prob(x).sum(-1)


class TorchExampleVAE(nn.Module):
    """PyTorch's examples/vae/main.py: 784-400-20, ReLU, sigmoid means, BCE + KLD."""

    def __init__(self, z_dim: int = 20, hidden: int = 400):
        super().__init__()
        self.fc1, self.fc21, self.fc22 = nn.Linear(784, hidden), nn.Linear(hidden, z_dim), nn.Linear(hidden, z_dim)
        self.fc3, self.fc4 = nn.Linear(z_dim, hidden), nn.Linear(hidden, 784)

    def encode(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        hidden = F.relu(self.fc1(x))
        mu, logvar = self.fc21(hidden), self.fc22(hidden)
        return mu, torch.exp(0.5 * logvar)

    def decode(self, z: Tensor) -> Tensor:
        return torch.sigmoid(self.fc4(F.relu(self.fc3(z))))

    def loss(self, x: Tensor) -> Tensor:
        mu, std = self.encode(x)
        recon = self.decode(mu + std * torch.randn_like(std))
        bce = F.binary_cross_entropy(recon, x, reduction="sum")
        kld = -0.5 * torch.sum(1 + 2 * torch.log(std) - mu.pow(2) - std.pow(2))
        return bce + kld

    def log_px(self, x: Tensor, z: Tensor) -> Tensor:
        """log p(x|z) as the loss scores it: -BCE of the sigmoid means (log clamped at -100), (K, B)."""
        probs = self.decode(z)
        return -F.binary_cross_entropy(probs, x.expand_as(probs), reduction="none").sum(-1)


class Contender:
    name = ""
    batch_size = 0

    def train_until(self, clock: Clock, seconds: float) -> None:
        raise NotImplementedError

    def snapshot(self):
        raise NotImplementedError


class PplVi(Contender):
    """The library's trainer, fast path on, with the main job's CPU profile and its budget schedule."""

    name = "ppl_vi"

    def __init__(self, seed: int, budget: float, overrides: dict):
        profile = PROFILES["cpu"]
        values = {**profile.config, "device": "cpu", "seed": seed, "val_size": 0, "eval_every": 10_000,
                  "epochs": 10_000, "fast": True, **overrides}
        self.lr_final = values.pop("lr_final", profile.lr_final)
        self.trainer = Trainer(build_config("vae", values), progress=False)
        self.batch_size = self.trainer.config.batch_size
        self.budget, self.steps, self.epoch_seconds = budget, 0, None
        self._epoch = iter(self.trainer.batches())
        self.note = fast_note(self.trainer.stepper)
        self.describe = (f"hidden {self.trainer.config.hidden}, z {self.trainer.config.z_dim}, batch {self.batch_size}, "
                         f"lr {self.trainer.config.lr:g} -> {self.lr_final:g} over the epochs that fit "
                         f"{budget / 60:g} min")

    def train_until(self, clock: Clock, seconds: float) -> None:
        t = self.trainer
        while clock.seconds() < seconds:
            batches = next(self._epoch, None)
            if batches is None:  # an epoch ends: the schedule (fitted to the budget after the first) steps
                t.state.end_epoch()
                if t.epoch == 1:
                    self.epoch_seconds = clock.seconds()
                    t.state.replan(Schedule.fitting(t.config, self.budget, self.epoch_seconds, 2**62, self.lr_final))
                t.scheduler.step()
                self._epoch = iter(t.batches())
                continue
            t.train_step(batches)  # counted in t.state
            self.steps += 1

    def model_copy(self):
        return copy.deepcopy(self.trainer.model).eval()

    @staticmethod
    def scorer(model) -> Tuple[Callable, Callable]:
        return model.encoder, lambda x, z: bounds.log_bernoulli_with_logits(x, model.decoder(z))


class ExampleContender(Contender):
    """An example's plain loop: a seeded permutation of the training set per epoch, one ``step`` per batch."""

    def __init__(self, seed: int, data: Tensor):
        self.data, self.steps = data, 0
        self.order = torch.Generator().manual_seed(seed)
        self._epoch = iter(())

    def step(self, x: Tensor) -> None:
        raise NotImplementedError

    def train_until(self, clock: Clock, seconds: float) -> None:
        while clock.seconds() < seconds:
            idx = next(self._epoch, None)
            if idx is None:
                self._epoch = iter(mnist.minibatches(self.data.shape[0], self.batch_size, generator=self.order))
                continue
            self.step(mnist.binarize(self.data[idx]))
            self.steps += 1

    def model_copy(self):
        return copy.deepcopy(self.vae).eval()

    @staticmethod
    def scorer(model):
        return model.encode, model.log_px


class PyroContender(ExampleContender):
    name, batch_size = "pyro", 256

    def __init__(self, seed: int, data: Tensor):
        super().__init__(seed, data)
        torch.manual_seed(seed)
        pyro.set_rng_seed(seed)
        pyro.clear_param_store()
        self.vae = PyroExampleVAE()
        self.svi = SVI(self.vae.model, self.vae.guide, Adam({"lr": 1.0e-3}), loss=Trace_ELBO())
        self.note = "SVI.step (returns a float: one host sync per step); validation off"
        self.describe = "784-400-50, softplus, batch 256, pyro.optim.Adam lr 1e-3, Trace_ELBO"

    def step(self, x: Tensor) -> None:
        self.svi.step(x)


class TorchContender(ExampleContender):
    name, batch_size = "torch", 128

    def __init__(self, seed: int, data: Tensor):
        super().__init__(seed, data)
        torch.manual_seed(seed)
        self.vae = TorchExampleVAE()
        self.optimizer = torch.optim.Adam(self.vae.parameters(), lr=1e-3)
        self.note = "eager PyTorch"
        self.describe = "784-400-20, ReLU, batch 128, torch.optim.Adam lr 1e-3, BCE + KLD"

    def step(self, x: Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.vae.loss(x).backward()
        self.optimizer.step()


# ---- the evaluator (the same for every contender) ---------------------------------------------------


@torch.no_grad()
def score(encode: Callable, log_px: Callable, x: Tensor, k: int, seed: int, batch: int = 100,
          rows: int = 2048) -> Dict[str, float]:
    """NELBO (closed-form KL, 10 draws) and -IWAE_k per image, means and SEs, from ``encode`` and ``log_px``."""
    torch.manual_seed(seed)
    nelbo, iwae = [], []
    for start in range(0, x.shape[0], batch):
        xb = x[start:start + batch]
        loc, scale = encode(xb)  # (B, Z)
        kl = (-torch.log(scale) + 0.5 * (scale ** 2 + loc ** 2) - 0.5).sum(-1)  # KL(q || N(0, I)), (B,)
        chunk = max(1, rows // xb.shape[0])
        running, rec, done = None, 0.0, 0
        while done < k:
            c = min(chunk, k - done)
            eps = torch.randn((c,) + loc.shape, dtype=loc.dtype)
            z = loc + scale * eps  # (c, B, Z)
            lp = log_px(xb, z)  # log p(x|z), (c, B)
            log_w = lp + (-0.5 * z ** 2 - HALF_LOG_2PI).sum(-1) - (-0.5 * eps ** 2 - torch.log(scale) - HALF_LOG_2PI).sum(-1)
            lse = torch.logsumexp(log_w, 0)
            running = lse if running is None else torch.logaddexp(running, lse)
            if done < 10:
                rec = rec + lp[: 10 - done].sum(0)
            done += c
        nelbo.append(kl - rec / min(10, k))
        iwae.append(-(running - math.log(k)))
    out = {}
    for name, values in (("nelbo", torch.cat(nelbo)), (f"iwae{k}", torch.cat(iwae))):
        values = values.double()
        out[name], out[name + "_se"] = values.mean().item(), values.std().item() / math.sqrt(values.numel())
    return out


# ---- main ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", default="5,10", help="checkpoints in minutes of training, the last is the budget")
    p.add_argument("--quick", action="store_true", help="seconds: checkpoints at 3 and 6 s, 50 test images, K=20")
    p.add_argument("--contenders", default="ppl_vi,pyro,torch")
    p.add_argument("--ppl-vi", default="{}", help="JSON overrides of ppl_vi's profile (tuning), e.g. '{\"lr\": 3e-3}'")
    p.add_argument("--test-images", type=int, default=1000)
    p.add_argument("--iwae-k", type=int, default=1000)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, all cores)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.minutes, args.test_images, args.iwae_k = "0.05,0.1", 50, 20
    try:
        args.checkpoints = sorted(float(m) * 60 for m in args.minutes.split(","))
        args.overrides = json.loads(args.ppl_vi)
    except ValueError as exc:
        p.error(f"--minutes must be numbers like 5,10 and --ppl-vi a JSON object ({exc})")
    asked = args.contenders
    args.contenders = [c for c in asked.split(",") if c]
    if not args.contenders or set(args.contenders) - {"ppl_vi", "pyro", "torch"}:
        p.error(f"--contenders: choose from ppl_vi, pyro, torch (got {asked!r})")
    if not isinstance(args.overrides, dict):
        p.error("--ppl-vi must be a JSON object")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pyro.enable_validation(False)
    log = lambda s: print(s, flush=True)  # noqa: E731
    device = f"{device_name(torch.device('cpu'))}; torch {torch.__version__}, pyro {pyro.__version__}"
    budget = args.checkpoints[-1]
    log(f"cpu_quality on {device}; {args.clock} clock; checkpoints at "
        f"{', '.join(f'{c / 60:g}' for c in args.checkpoints)} min of training each")
    train_x = mnist.load_mnist("train")[0]
    test_x = mnist.fixed_binarization(mnist.load_mnist("test")[0])[: args.test_images]
    results: List[dict] = []
    for name in args.contenders:
        contender = {"ppl_vi": lambda: PplVi(args.seed, budget, args.overrides),
                     "pyro": lambda: PyroContender(args.seed, train_x),
                     "torch": lambda: TorchContender(args.seed, train_x)}[name]()
        log(f"{name}: {contender.describe}")
        clock, snapshots = Clock(args.clock), []
        for checkpoint in args.checkpoints:
            clock.resume()
            contender.train_until(clock, checkpoint)
            clock.pause()
            snapshots.append((checkpoint, clock.seconds(), contender.steps, contender.model_copy()))
        for checkpoint, seconds, steps, model in snapshots:
            scores = score(*contender.scorer(model), test_x, args.iwae_k, seed=args.seed)
            row = {"contender": name, "minutes": checkpoint / 60, "seconds": seconds, "steps": steps,
                   "steps_per_s": steps / seconds, "images_per_s": steps * contender.batch_size / seconds,
                   "batch_size": contender.batch_size, "note": contender.note, **scores}
            results.append(row)
            log(f"  {checkpoint / 60:5.2f} min: {steps} steps, NELBO {scores['nelbo']:.2f} ± {scores['nelbo_se']:.2f}, "
                f"-IWAE_{args.iwae_k} {scores[f'iwae{args.iwae_k}']:.2f} ± {scores[f'iwae{args.iwae_k}_se']:.2f}")
    k = args.iwae_k
    log("")
    log(f"test subset: the first {test_x.shape[0]} test images (fixed binarisation); K = {k}; {args.clock} clock")
    log(f"{'minutes':>7}  {'contender':<8} {'steps':>7} {'steps/s':>8} {'images/s':>9} {'NELBO':>16} {f'-IWAE_{k}':>16}")
    for r in sorted(results, key=lambda r: (r["minutes"], r["contender"])):
        log(f"{r['minutes']:7.2f}  {r['contender']:<8} {r['steps']:7d} {r['steps_per_s']:8.2f} {r['images_per_s']:9.0f} "
            f"{r['nelbo']:8.2f} ± {r['nelbo_se']:5.2f} {r[f'iwae{k}']:8.2f} ± {r[f'iwae{k}_se']:5.2f}")
    by = {(r["contender"], r["minutes"]): r for r in results}
    for minutes in sorted({r["minutes"] for r in results}):
        here = [r for r in results if r["minutes"] == minutes]
        best = min(here, key=lambda r: r["nelbo"])
        line = f"at {minutes:g} min: best NELBO {best['contender']} ({best['nelbo']:.2f})"
        if ("ppl_vi", minutes) in by:
            mine = by[("ppl_vi", minutes)]
            for other in ("pyro", "torch"):
                if (other, minutes) in by:
                    o = by[(other, minutes)]
                    line += (f"; ppl_vi/{other}: steps/s {mine['steps_per_s'] / o['steps_per_s']:.2f}, "
                             f"NELBO {mine['nelbo'] - o['nelbo']:+.2f} nats")
        log(line)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "clock": args.clock, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
