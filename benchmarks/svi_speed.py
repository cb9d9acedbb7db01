"""SVI speed, side by side: the same VAE trained by hand-written PyTorch, by Pyro, and by ppl_vi.

The model: 784-400-50 VAE, softplus hidden layers, Gaussian q(z|x) with scale softplus(.) + 1e-4,
Bernoulli decoder on logits, Adam(lr=1e-3), dynamically binarised MNIST (``$PPL_VI_DATA``). Every
variant uses the very same networks (``ppl_vi.models.vae.VAE(784, 50, [400])``, fresh copies from
one seed); only the training code differs:

==========  ======================================================================================
variant     what one step is
==========  ======================================================================================
hand        hand-written eager PyTorch: encoder, reparameterised z, log-densities written out,
            ``torch.optim.Adam``. K=1: the Monte Carlo ELBO (Trace_ELBO's estimator); K>1: IWAE.
compile     ``hand`` with its loss function under ``torch.compile`` (backward and Adam eager)
pyro        plain Pyro as its examples do it: ``pyro.module`` in model/guide, ``pyro.plate``,
            ``SVI(model, guide, pyro.optim.Adam, Trace_ELBO())``; K>1: ``RenyiELBO(alpha=0)``
            vectorised. ``svi.step`` returns a float (one host sync per step). Validation off.
ppl_vi      ``ppl_vi.training.Trainer.train_step`` with ``fast=True`` (default): hot path, sync-free
            loss, CUDA graph on CUDA. K=1: ``loss=trace``; K>1: ``loss=iwae`` (our IWAELoss).
ppl_vi-off  the same trainer with ``fast=False`` (what the fast path buys)
graph       ``hand``'s whole step (loss, backward, ``Adam(capturable=True)``) in a CUDA graph
==========  ======================================================================================

Timing: every variant is warmed up, then timed over windows of ``n`` steps, the variants
interleaved (round robin, so drift and neighbours hit all of them alike), repeated; the table
gives the median ms/step over the windows, the epoch time it implies (60,000 images), and the ratio
to ``hand``. On CUDA the clock is wall time between ``torch.cuda.synchronize()`` calls; on the CPU it
is the process's CPU time (``time.process_time``, one intra-op thread by default), which a shared,
oversubscribed machine disturbs far less than wall time (wall medians are shown beside it).

Also timed: IWAE-5000 over the test set (all 10,000 images on CUDA; a subset on the CPU, said in
the output), ppl_vi's chunked evaluator (the guide once per batch, particles in chunks, as
``ppl_vi.evaluate.bound_metrics`` runs it: ``ppl_vi.iwae_eval``) against a hand-written chunked estimator, with a check
that the two agree within their standard error.

    python benchmarks/svi_speed.py --device cuda     # the full table on a GPU
    python benchmarks/svi_speed.py --quick           # ~30 s on a CPU; last line: ppl_vi/hand ratio
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from pyro.infer import SVI, RenyiELBO, Trace_ELBO  # noqa: E402

from ppl_vi.config import TrainConfig  # noqa: E402
from ppl_vi.data import mnist  # noqa: E402
from ppl_vi.iwae_eval import iwae_bounds  # noqa: E402
from ppl_vi.models.vae import VAE  # noqa: E402
from ppl_vi.training.graph_step import fast_note  # noqa: E402
from ppl_vi.training import Trainer  # noqa: E402

X_DIM, Z_DIM, HIDDEN, LR, TRAIN_SIZE = 784, 50, [400], 1e-3, 60_000
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def new_vae(device) -> VAE:
    torch.manual_seed(0)
    return VAE(X_DIM, Z_DIM, HIDDEN).to(device)


# ---- (a) hand-written ---------------------------------------------------------------------------


def hand_loss_fn(vae: VAE, k: int) -> Callable:
    """Per-datapoint negative bound, written out: K=1 the MC ELBO, K>1 IWAE-K."""
    encoder, decoder = vae.encoder, vae.decoder

    def loss(x):
        loc, scale = encoder(x)  # (B, Z)
        eps = torch.randn((k,) + loc.shape, device=x.device, dtype=x.dtype) if k > 1 else torch.randn_like(loc)
        z = loc + scale * eps  # (K, B, Z) or (B, Z)
        logits = decoder(z)
        log_px = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)
        log_pz = (-0.5 * z * z - HALF_LOG_2PI).sum(-1)
        log_qz = (-0.5 * eps * eps - torch.log(scale) - HALF_LOG_2PI).sum(-1)  # log N(z; loc, scale)
        log_w = log_px + log_pz - log_qz
        if k == 1:
            return -log_w.mean()
        return -(torch.logsumexp(log_w, 0) - math.log(k)).mean()

    return loss


class HandStep:
    def __init__(self, device, k, compiled=False):
        self.vae = new_vae(device)
        self.opt = torch.optim.Adam(self.vae.parameters(), lr=LR)
        self.loss_fn = hand_loss_fn(self.vae, k)
        if compiled:
            self.loss_fn = torch.compile(self.loss_fn)

    def __call__(self, x):
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(x)
        loss.backward()
        self.opt.step()
        return loss.detach()


class HandGraphStep:
    """(e) the hand-written step captured whole in a CUDA graph; the batch copied in per step."""

    def __init__(self, device, k, example_x, warmup=3):
        self.vae = new_vae(device)
        self.opt = torch.optim.Adam(self.vae.parameters(), lr=torch.tensor(LR, device=device), capturable=True)
        loss_fn = hand_loss_fn(self.vae, k)
        self.static_x = example_x.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, before any default-stream use
            for _ in range(warmup):
                self.opt.zero_grad(set_to_none=True)
                loss_fn(self.static_x).backward()
                self.opt.step()
        torch.cuda.current_stream().wait_stream(side)
        self.opt.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            loss = loss_fn(self.static_x)
            loss.backward()
            self.opt.step()
            self.static_loss = loss.detach()

    def __call__(self, x):
        self.static_x.copy_(x, non_blocking=True)
        self.graph.replay()
        return self.static_loss.clone()


# ---- (c) plain Pyro -----------------------------------------------------------------------------


class PyroStep:
    """Pyro's VAE example, on the same networks: pyro.module + plate + SVI + pyro.optim.Adam."""

    def __init__(self, device, k):
        self.vae = vae = new_vae(device)
        pyro.clear_param_store()

        def model(x):
            pyro.module("decoder", vae.decoder)
            with pyro.plate("data", x.shape[0]):
                z_loc = x.new_zeros(torch.Size((x.shape[0], Z_DIM)))
                z_scale = x.new_ones(torch.Size((x.shape[0], Z_DIM)))
                z = pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))
                logits = vae.decoder(z)
                pyro.sample("obs", dist.Bernoulli(logits=logits).to_event(1), obs=x)

        def guide(x):
            pyro.module("encoder", vae.encoder)
            with pyro.plate("data", x.shape[0]):
                z_loc, z_scale = vae.encoder(x)
                pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))

        loss = Trace_ELBO() if k == 1 else RenyiELBO(alpha=0, num_particles=k, vectorize_particles=True,
                                                     max_plate_nesting=1)
        self.svi = SVI(model, guide, pyro.optim.Adam({"lr": LR}), loss=loss)

    def __call__(self, x):
        return self.svi.step(x) / x.shape[0]  # a float: Pyro reads the loss back every step


# ---- (d) ppl_vi -----------------------------------------------------------------------------------


class PplviStep:
    def __init__(self, device, k, batch_size, fast=True):
        config = TrainConfig(model="vae", hidden=HIDDEN, z_dim=Z_DIM, batch_size=batch_size, lr=LR, k=k,
                             loss="trace" if k == 1 else "iwae", device=str(device), val_size=0, fast=fast,
                             seed=0)
        self.trainer = Trainer(config, progress=False)

    def __call__(self, x):
        return self.trainer.train_step([{"x": x}])

    @property
    def note(self) -> str:
        return fast_note(self.trainer.stepper)


# ---- timing -----------------------------------------------------------------------------------------


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_window(step, pool, start, n, device, clock):
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(n):
        step(pool[(start + i) % len(pool)])
    sync(device)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return 1e3 * (cpu if clock == "cpu" else wall) / n, 1e3 * wall / n


def build_variants(names, device, b, k, example_x, log) -> Dict[str, Callable]:
    variants: Dict[str, Callable] = {}
    for name in names:
        try:
            if name == "hand":
                variants[name] = HandStep(device, k)
            elif name == "compile":
                variants[name] = HandStep(device, k, compiled=True)
            elif name == "pyro":
                variants[name] = PyroStep(device, k)
            elif name == "ppl_vi":
                variants[name] = PplviStep(device, k, b)
            elif name == "ppl_vi-off":
                variants[name] = PplviStep(device, k, b, fast=False)
            elif name == "graph":
                if device.type != "cuda":
                    log(f"  graph: skipped (CUDA graphs need a CUDA device; this run is on {device.type})")
                    continue
                variants[name] = HandGraphStep(device, k, example_x)
        except Exception as exc:  # noqa: BLE001 - a variant that cannot run is reported, not fatal
            log(f"  {name}: skipped ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
    return variants


def warm(name, step, pool, n, device, log, compile_budget: float) -> bool:
    """Warm-up steps; a torch.compile variant gets its first (compiling) step timed and a budget."""
    t0 = time.perf_counter()
    try:
        for i in range(n):
            step(pool[i % len(pool)])
            sync(device)
            if name == "compile" and i == 0:
                spent = time.perf_counter() - t0
                log(f"  compile: first step (compilation) took {spent:.1f} s")
                if spent > compile_budget:
                    log(f"  compile: skipped (compilation over the {compile_budget:.0f} s budget)")
                    return False
    except Exception as exc:  # noqa: BLE001
        log(f"  {name}: skipped ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
        return False
    return True


def run_config(args, device, data_x, b, k, log) -> List[dict]:
    names = list(args.variants)
    if "compile" in names and not args.compile:
        names.remove("compile")
        log(f"  compile: skipped ({args.compile_note})")
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(data_x.shape[0], generator=gen)[: b * args.pool].to(device)
    pool = [mnist.binarize(data_x[order[i * b:(i + 1) * b]]) for i in range(args.pool)]
    variants = build_variants(names, device, b, k, pool[0], log)
    # one calibration step of the hand variant sets the steps per window for every variant
    hand = variants.get("hand")
    heavy = False
    if hand is not None:
        for x in pool[:2]:
            hand(x)
        _, one = time_window(hand, pool, 0, 1, device, "wall")
        n = args.steps or max(1, min(200, math.ceil(args.window * 1e3 / one)))
        heavy = one > 1000 and device.type == "cpu"
    else:
        n = args.steps or 10
    warmup = 1 if heavy else args.warmup
    repeats = min(args.repeats, 3) if heavy else args.repeats
    for name in list(variants):
        if not warm(name, variants[name], pool, warmup, device, log, args.compile_budget):
            del variants[name]
    wins: Dict[str, List[float]] = {name: [] for name in variants}
    walls: Dict[str, List[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(repeats):
        for j in range(len(names)):
            name = names[(j + r) % len(names)]  # round robin, rotated
            ms, wall = time_window(variants[name], pool, r * n, n, device, args.clock)
            wins[name].append(ms)
            walls[name].append(wall)
    steps_per_epoch = math.ceil(TRAIN_SIZE / b)
    rows = []
    base = statistics.median(wins["hand"]) if wins.get("hand") else math.nan
    for name in names:
        med = statistics.median(wins[name])
        rows.append({"batch": b, "k": k, "variant": name, "ms": med, "lo": min(wins[name]), "hi": max(wins[name]),
                     "wall": statistics.median(walls[name]), "epoch_s": med * steps_per_epoch / 1e3,
                     "ratio": med / base, "n": n, "windows": len(wins[name]),
                     "note": getattr(variants[name], "note", "")})
    return rows


# ---- IWAE-5000 evaluation -------------------------------------------------------------------------


@torch.no_grad()
def eval_pplvi(model, x, k, batch_size=500, max_rows=200_000):
    """ppl_vi's evaluator: ``iwae_eval.iwae_bounds`` (the guide once per batch), as evaluate.bound_metrics runs it."""
    out = []
    for start in range(0, x.shape[0], batch_size):
        xb = x[start:start + batch_size]
        out.append(-iwae_bounds(model, {"x": xb}, (k,), rows=max_rows).bounds[k])
    return torch.cat(out)


@torch.no_grad()
def eval_hand(model, x, k, batch_size=500, max_rows=200_000):
    """The same estimator written by hand: running logsumexp over chunks of particles."""
    out = []
    for start in range(0, x.shape[0], batch_size):
        xb = x[start:start + batch_size]
        chunk = min(k, max(1, max_rows // xb.shape[0]))
        loc, scale = model.encoder(xb)
        running, done = None, 0
        while done < k:
            c = min(chunk, k - done)
            eps = torch.randn((c,) + loc.shape, device=x.device, dtype=x.dtype)
            z = loc + scale * eps
            logits = model.decoder(z)
            log_px = -F.binary_cross_entropy_with_logits(logits, xb.expand_as(logits), reduction="none").sum(-1)
            log_w = log_px + (-0.5 * z * z).sum(-1) - (-0.5 * eps * eps - torch.log(scale)).sum(-1)
            lse = torch.logsumexp(log_w, 0)
            running = lse if running is None else torch.logaddexp(running, lse)
            done += c
        out.append(-(running - math.log(k)))
    return torch.cat(out)


def run_eval(args, device, model, test_x, log, out: Optional[dict] = None) -> List[str]:
    """The IWAE-k timing; its lines, and (into ``out``, when given) the figures for ``--json``."""
    n = args.eval_n if args.eval_n else test_x.shape[0]
    x = test_x[:n]
    lines = []
    results = {}
    for seed, (name, fn) in enumerate((("ppl_vi", eval_pplvi), ("hand", eval_hand))):
        torch.manual_seed(1 + seed)  # independent draws: agreement is up to Monte Carlo error
        fn(model, x[: min(2, n)], 10)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        values = fn(model, x, args.eval_k)
        sync(device)
        results[name] = (values.double().cpu(), time.perf_counter() - t0)
    (a, ta), (h, th) = results["ppl_vi"], results["hand"]
    se = lambda v: v.std().item() / math.sqrt(v.numel()) if v.numel() > 1 else math.nan  # noqa: E731
    diff = (a - h).mean().item()
    paired = se(a - h)
    joint = math.sqrt(se(a) ** 2 + se(h) ** 2)
    subset = "" if n == test_x.shape[0] else f" (a SUBSET: the first {n} of {test_x.shape[0]} test images)"
    lines.append(f"IWAE-{args.eval_k} evaluation on {n} test images{subset}, batch 500, <= 200k rows per pass:")
    lines.append(f"  ppl_vi chunked evaluator : {ta:8.2f} s   -L = {a.mean():.3f} ± {se(a):.3f} (SE)")
    lines.append(f"  hand-written chunked     : {th:8.2f} s   -L = {h.mean():.3f} ± {se(h):.3f} (SE)")
    agree = abs(diff) <= 3 * paired if n > 1 else abs(diff) <= 3 * max(joint, 1e-6)
    lines.append(f"  ratio ppl_vi/hand {ta / th:.2f}; difference {diff:+.4f} nats, paired SE {paired:.4f}, "
                 f"unpaired SE {joint:.3f}: {'agree' if agree else 'DISAGREE'} (|diff| <= 3 paired SE)")
    if out is not None:
        out.update(k=args.eval_k, n=n, n_test=int(test_x.shape[0]), ppl_vi_s=ta, hand_s=th, ppl_vi_nll=a.mean().item(),
                   ppl_vi_se=se(a), hand_nll=h.mean().item(), hand_se=se(h), diff=diff, paired_se=paired,
                   agree=bool(agree))
    return lines


# ---- main -----------------------------------------------------------------------------------------


def environment(device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return (f"torch {torch.__version__}, pyro {pyro.__version__}, python {platform.python_version()}, "
            f"CPU {cpu} ({os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads){gpu}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="about 30 s on a CPU: batch 128, K=1, few steps")
    p.add_argument("--batch-sizes", default=None, help="comma-separated (default 128,1024; --quick: 128)")
    p.add_argument("--ks", default=None, help="particles, comma-separated (default 1,50; --quick: 1)")
    p.add_argument("--variants", default="hand,compile,pyro,ppl_vi,ppl_vi-off,graph")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="torch.compile variant; auto: on, except on the CPU with --quick")
    p.add_argument("--compile-budget", type=float, default=300.0, help="seconds allowed for compilation")
    p.add_argument("--steps", type=int, default=0, help="steps per timed window (0: ~--window seconds)")
    p.add_argument("--window", type=float, default=None, help="target seconds per window")
    p.add_argument("--repeats", type=int, default=None, help="timed windows per variant")
    p.add_argument("--warmup", type=int, default=5, help="warm-up steps per variant (>= 4 for the CUDA graph)")
    p.add_argument("--pool", type=int, default=8, help="distinct pre-binarised batches cycled through")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU default 1; 0: torch's)")
    p.add_argument("--clock", choices=["auto", "cpu", "wall"], default="auto",
                   help="auto: wall on CUDA, process CPU time on the CPU")
    p.add_argument("--eval-k", type=int, default=5000)
    p.add_argument("--eval-n", type=int, default=None, help="test images for the IWAE evaluation (0: all)")
    p.add_argument("--no-eval", action="store_true")
    p.add_argument("--json", default=None, help="also write the table and the evaluation's figures to this JSON file")
    args = p.parse_args(argv)
    q = args.quick
    args.batch_sizes = [int(v) for v in (args.batch_sizes or ("128" if q else "128,1024")).split(",")]
    args.ks = [int(v) for v in (args.ks or ("1" if q else "1,50")).split(",")]
    args.variants = [v for v in args.variants.split(",") if v]
    args.window = args.window if args.window is not None else (0.5 if q else 1.0)
    args.repeats = args.repeats or (5 if q else 7)
    if args.eval_n is None:
        args.eval_n = (8 if q else 100) if args.device == "cpu" else 0
    if args.compile == "auto":
        args.compile = not (q and args.device == "cpu")
        args.compile_note = "torch.compile skipped by default on the CPU with --quick; --compile on runs it"
    else:
        args.compile = args.compile == "on"
        args.compile_note = "--compile off"
    if args.clock == "auto":
        args.clock = "wall" if args.device == "cuda" else "cpu"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda asked for, but no CUDA GPU is available", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    threads = args.threads if args.threads is not None else (1 if device.type == "cpu" else 0)
    if threads:
        torch.set_num_threads(threads)
    pyro.enable_validation(False)  # every variant without validation (Pyro's default is on)
    log = lambda s: print(s, flush=True)  # noqa: E731
    t_start = time.perf_counter()
    log(f"svi_speed: {' '.join(sys.argv[1:]) or '(defaults)'}")
    log(environment(device))
    clock = "wall time, synchronised" if args.clock == "wall" else "process CPU time"
    log(f"VAE {X_DIM}-{HIDDEN[0]}-{Z_DIM}, Adam lr {LR}, MNIST dynamically binarised; clock: {clock}")
    data_x, _ = mnist.load_mnist("train", device=device)
    test_x = mnist.fixed_binarization(mnist.load_mnist("test", device=device)[0])
    rows: List[dict] = []
    for k in args.ks:
        for b in args.batch_sizes:
            log(f"batch {b}, K={k}:")
            rows += run_config(args, device, data_x, b, k, log)
    header = (f"{'batch':>5} {'K':>3}  {'variant':<11} {'ms/step':>9} {'[min, max]':>19} "
              f"{'wall ms':>9} {'epoch s':>8} {'x hand':>7}  note")
    log("")
    log(f"ms/step: median of timed windows ({clock}); epoch = {TRAIN_SIZE} images at that median; "
        "x hand = ratio to the hand-written eager step")
    log(header)
    for r in rows:
        log(f"{r['batch']:>5} {r['k']:>3}  {r['variant']:<11} {r['ms']:9.2f} [{r['lo']:8.2f}, {r['hi']:8.2f}] "
            f"{r['wall']:9.2f} {r['epoch_s']:8.1f} {r['ratio']:7.2f}  {r['n']}x{r['windows']} steps"
            + (f"; {r['note']}" if r["note"] else ""))
    evaluation: dict = {}
    if not args.no_eval:
        log("")
        step = HandStep(device, 1)  # a briefly trained model makes the bound meaningful
        gen = torch.Generator().manual_seed(1)
        n_train = 200 if device.type == "cuda" else 20
        for _ in range(n_train):
            idx = torch.randint(0, data_x.shape[0], (128,), generator=gen).to(device)
            step(mnist.binarize(data_x[idx]))
        step.vae.eval()
        for line in run_eval(args, device, step.vae, test_x, log, evaluation):
            log(line)
        log(f"  (model: the VAE after {n_train} hand-written Adam steps at batch 128)")
        evaluation["model_steps"] = n_train
    log(f"total {time.perf_counter() - t_start:.0f} s")
    quick = [r for r in rows if r["batch"] == 128 and r["k"] == 1]
    ratio = next((r["ratio"] for r in quick if r["variant"] == "ppl_vi"), math.nan)
    log(f"ppl_vi/hand ratio: {ratio:.2f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "command": "python benchmarks/svi_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "environment": environment(device), "device": args.device,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "clock": clock, "rows": rows, "eval": evaluation, "ppl_vi_hand_ratio": ratio,
            "total_s": time.perf_counter() - t_start}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
