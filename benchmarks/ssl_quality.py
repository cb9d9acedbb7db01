"""Semi-supervised accuracy per CPU-minute, side by side: ppl_vi's M2 against a plain PyTorch M2 in CS236's recipe.

==========  ==========================================================================================
contender   what trains
==========  ==========================================================================================
ppl_vi      ``ppl-vi train ssvae`` with its defaults (``build_config("ssvae")``: objective cs236,
            z 64, 300-300 ELU encoder/decoder, 784-300-300-10 ReLU classifier, α = 100, batch
            100, Adam 1e-3, TraceEnum_ELBO, fast path on), stepped by the library's own
            ``Trainer.train_step`` on ``Trainer.batches()`` (what ``ppl-vi train`` runs)
torch       written here in plain PyTorch, Stanford CS236 HW2's SSVAE recipe: the same sizes;
            q(z|x,y) variance softplus(.) + 1e-8; loss = mean over the unlabelled batch of
            [KL(q(y|x) ‖ uniform) + Σ_y q(y|x) (KL(q(z|x,y) ‖ N(0, I)) + BCE(x, dec(z_y, y)))]
            + 100 × cross-entropy on all the labelled images; one z per class, closed-form KL;
            ``torch.optim.Adam(lr=1e-3)``; no flush of subnormal floats (ppl_vi flushes them)
==========  ==========================================================================================

Both train on the same label draw: ``ppl_vi.data.sources.load_data("mnist-semisupervised")`` with
seed d (the 100 class-balanced labels, the 5,000-image validation split, the 10,000-image test set,
fixed binarisations for both), every training batch binarised afresh; draw d seeds each contender's
initialisation and data order. They run **at the same time, as two processes, one thread each**
(``torch.set_num_threads(1)``), so a shared machine's load falls on both alike, and the clock is
each process's **CPU time** (``time.process_time``), paused while the benchmark evaluates.

Every ``--eval-steps`` steps and at every budget (``--minutes``, default 5, 10, 30) the classifier's
accuracy on the validation split and on the test set is recorded. **Model selection uses the
validation split only**: a budget's row reports the test accuracy of the evaluation with the best
validation accuracy so far ("selected"), and beside it the last model's ("last").

    python benchmarks/ssl_quality.py                              # 3 draws x 30 CPU-min (two processes per draw)
    python benchmarks/ssl_quality.py --minutes 5,10 --draws 0     # the 5 and 10 minute rows, draw 0
    python benchmarks/ssl_quality.py --quick                      # seconds (a test runs this)
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from ppl_vi.models.configure import build_config  # noqa: E402
from ppl_vi.data import mnist  # noqa: E402
from ppl_vi.data.sources import load_data  # noqa: E402
from ppl_vi.metrics import accuracy  # noqa: E402
from ppl_vi.training.graph_step import fast_note  # noqa: E402
from ppl_vi.runtime import device_name  # noqa: E402
from ppl_vi.training import Trainer  # noqa: E402

CONTENDERS = ("ppl_vi", "torch")
ALPHA, Z_DIM, HIDDEN, BATCH, LR = 100.0, 64, 300, 100, 1e-3  # CS236's recipe


# ---- the clock --------------------------------------------------------------------------------------


class Clock:
    """This process's CPU time, training only: ``pause()`` / ``resume()`` around evaluations."""

    def __init__(self):
        self.spent, self.since = 0.0, None

    def resume(self) -> None:
        self.since = time.process_time()

    def pause(self) -> None:
        self.spent += time.process_time() - self.since
        self.since = None

    def seconds(self) -> float:
        return self.spent + (time.process_time() - self.since if self.since is not None else 0.0)


# ---- the plain PyTorch M2 ---------------------------------------------------------------------------


def elu_mlp(sizes: List[int], act=nn.ELU) -> nn.Sequential:
    layers: List[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


class TorchM2(nn.Module):
    """CS236's SSVAE: q(z|x,y), p(x|z,y) 300-300 ELU; q(y|x) 784-300-300-10 ReLU; z = 64."""

    def __init__(self, x_dim: int = 784, classes: int = 10):
        super().__init__()
        self.classes = classes
        self.enc = elu_mlp([x_dim + classes, HIDDEN, HIDDEN, 2 * Z_DIM])
        self.dec = elu_mlp([Z_DIM + classes, HIDDEN, HIDDEN, x_dim])
        self.cls = elu_mlp([x_dim, HIDDEN, HIDDEN, classes], act=nn.ReLU)

    def loss(self, xu: Tensor, xl: Tensor, yl: Tensor) -> Tensor:
        b, c = xu.shape[0], self.classes
        log_q = F.log_softmax(self.cls(xu), -1)  # (B, C)
        q = log_q.exp()
        kl_y = (q * (log_q + math.log(c))).sum(-1)  # KL(q(y|x) || uniform), (B,)
        y = torch.eye(c).repeat_interleave(b, 0)  # (C B, C): class-major
        x = xu.repeat(c, 1)  # (C B, D)
        m, raw = self.enc(torch.cat([x, y], -1)).chunk(2, -1)
        v = F.softplus(raw) + 1e-8  # variance
        z = m + v.sqrt() * torch.randn_like(m)
        rec = F.binary_cross_entropy_with_logits(self.dec(torch.cat([z, y], -1)), x, reduction="none").sum(-1)
        kl_z = 0.5 * (v + m ** 2 - 1 - v.log()).sum(-1)  # KL(q(z|x,y) || N(0, I)), (C B,)
        nelbo = kl_y + (q.T * (kl_z + rec).view(c, b)).sum(0)  # (B,)
        return nelbo.mean() + ALPHA * F.cross_entropy(self.cls(xl), yl)

    @torch.no_grad()
    def classify(self, x: Tensor) -> Tensor:
        return self.cls(x).argmax(-1)


class TorchContender:
    """The plain loop: a seeded permutation of the unlabelled images per epoch, batches of 100, every
    step paired with all the labelled images; both binarised afresh each step."""

    def __init__(self, data, seed: int):
        torch.manual_seed(seed)
        self.data, self.net = data, TorchM2()
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=LR)
        self.order = torch.Generator().manual_seed(seed)
        self.xl, self.yl = data.train_x[data.labelled_idx], data.train_y[data.labelled_idx]
        self.xu, self._epoch, self.steps = data.train_x[data.unlabelled_idx], iter(()), 0
        self.describe = "plain PyTorch, CS236 recipe (written in this file)"

    def step(self) -> None:
        idx = next(self._epoch, None)
        if idx is None:
            self._epoch = iter(mnist.minibatches(self.xu.shape[0], BATCH, generator=self.order))
            idx = next(self._epoch)
        self.optimizer.zero_grad(set_to_none=True)
        self.net.loss(mnist.binarize(self.xu[idx]), mnist.binarize(self.xl), self.yl).backward()
        self.optimizer.step()
        self.steps += 1

    def classify(self, x: Tensor) -> Tensor:
        return self.net.classify(x)


class PplViContender:
    """``ppl-vi train ssvae`` with its defaults: the trainer's own batches and ``train_step``."""

    def __init__(self, seed: int):
        self.trainer = Trainer(build_config("ssvae", overrides={"device": "cpu", "seed": seed}), progress=False)
        self.data, self._epoch, self.steps = self.trainer.data, iter(self.trainer.batches()), 0
        c = self.trainer.config
        self.describe = (f"ppl-vi train ssvae defaults: objective {c.objective}, z {c.z_dim}, hidden {c.hidden} "
                         f"{c.activation}, batch {c.batch_size}, lr {c.lr:g}, loss {c.loss}; {fast_note(self.trainer.stepper)}")

    def step(self) -> None:
        t = self.trainer
        batches = next(self._epoch, None)
        if batches is None:  # an epoch ends (lr_decay is 1 by default: no schedule to step)
            t.state.end_epoch()
            self._epoch = iter(t.batches())
            batches = next(self._epoch)
        t.train_step(batches)  # counted in t.state
        self.steps += 1

    def classify(self, x: Tensor) -> Tensor:
        return self.trainer.model.classify(x)


# ---- one worker: one contender, one draw ------------------------------------------------------------


def run_worker(name: str, draw: int, budgets: List[float], eval_steps: int, out: Path) -> None:
    """Train ``name`` on draw ``draw`` until the last budget (CPU seconds), evaluating on the way."""
    torch.set_num_threads(1)
    if name == "ppl_vi":
        contender = PplViContender(draw)
    else:
        config = build_config("ssvae", overrides={"device": "cpu", "seed": draw})
        contender = TorchContender(load_data("mnist-semisupervised", config, torch.device("cpu")), draw)
    data, clock, evaluations = contender.data, Clock(), []

    def evaluate(budget=None) -> None:
        evaluations.append({"steps": contender.steps, "cpu_seconds": clock.seconds(), "budget": budget,
                            "val_accuracy": accuracy(contender.classify, data.val_x, data.val_y),
                            "test_accuracy": accuracy(contender.classify, data.test_x, data.test_y)})

    for budget in budgets:
        clock.resume()
        while clock.seconds() < budget:
            contender.step()
            if contender.steps % eval_steps == 0:
                clock.pause()
                evaluate()
                clock.resume()
        clock.pause()
        evaluate(budget)
    out.write_text(json.dumps({"contender": name, "draw": draw, "describe": contender.describe,
                               "evaluations": evaluations}))


# ---- the rows ---------------------------------------------------------------------------------------


def budget_rows(result: dict, budgets: List[float]) -> List[dict]:
    """Per budget: the last model's test accuracy and the test accuracy of the best-validation one so far."""
    rows, evaluations = [], result["evaluations"]
    for budget in budgets:
        seen = [e for e in evaluations if e["cpu_seconds"] <= budget or e["budget"] == budget]
        seen = seen[:next(i for i, e in enumerate(seen) if e["budget"] == budget) + 1]
        last, best = seen[-1], max(seen, key=lambda e: e["val_accuracy"])
        rows.append({"contender": result["contender"], "draw": result["draw"], "minutes": budget / 60,
                     "cpu_seconds": last["cpu_seconds"], "steps": last["steps"],
                     "steps_per_s": last["steps"] / last["cpu_seconds"],
                     "last_test_accuracy": last["test_accuracy"], "last_val_accuracy": last["val_accuracy"],
                     "selected_test_accuracy": best["test_accuracy"], "selected_val_accuracy": best["val_accuracy"],
                     "selected_steps": best["steps"]})
    return rows


def figure(results: List[dict], path: Path) -> None:
    """Test accuracy (every evaluation, the model of that moment) against CPU-minutes, per contender and draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = {"ppl_vi": "tab:blue", "torch": "tab:orange"}
    for r in results:
        e = r["evaluations"]
        ax.plot([x["cpu_seconds"] / 60 for x in e], [100 * x["test_accuracy"] for x in e], color=colours[r["contender"]],
                alpha=0.8, label=f"{r['contender']} (draw {r['draw']})", marker=".", markersize=3, linewidth=1)
    ax.set_xlabel("CPU-minutes of training (time.process_time, one thread)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("M2 with 100 labels: ppl_vi (defaults) vs plain PyTorch (CS236 recipe)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- main ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", default="5,10,30", help="budgets in CPU-minutes of training, the last ends the run")
    p.add_argument("--draws", default="0,1,2", help="label draws (seeds): the labelled subset, split, init, order")
    p.add_argument("--eval-steps", type=int, default=500, help="steps between evaluations (clock paused)")
    p.add_argument("--quick", action="store_true", help="seconds: budgets of 3 and 6 CPU-seconds, draw 0")
    p.add_argument("--out", default=None, help="folder for the figure and the workers' files (default: a temp folder)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--worker", choices=CONTENDERS, default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.minutes, args.draws, args.eval_steps = "0.05,0.1", "0", 20
    try:
        args.budgets = sorted(float(m) * 60 for m in args.minutes.split(","))
        args.draw_list = [int(d) for d in args.draws.split(",")]
    except ValueError as exc:
        p.error(f"--minutes must be numbers like 5,10 and --draws integers like 0,1,2 ({exc})")
    if not args.budgets or min(args.budgets) <= 0 or not args.draw_list or args.eval_steps < 1:
        p.error("--minutes must be positive, --draws non-empty and --eval-steps >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_worker(args.worker, args.draw_list[0], args.budgets, args.eval_steps, Path(args.worker_out))
        return 0
    import tempfile

    log = lambda s: print(s, flush=True)  # noqa: E731
    out = Path(args.out or tempfile.mkdtemp(prefix="ssl_quality_"))
    out.mkdir(parents=True, exist_ok=True)
    device = f"{device_name(torch.device('cpu'))}; torch {torch.__version__}"
    log(f"ssl_quality on {device}; CPU-time clock (time.process_time), one thread per process, the two contenders "
        f"side by side; budgets {args.minutes} CPU-min; draws {args.draws}")
    results: List[dict] = []
    for draw in args.draw_list:
        started, procs = time.perf_counter(), []
        for name in CONTENDERS:
            path = out / f"{name}-draw{draw}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--draws", str(draw),
                   "--minutes", args.minutes, "--eval-steps", str(args.eval_steps), "--worker-out", str(path)]
            procs.append((name, path, subprocess.Popen(cmd)))
        for name, path, proc in procs:
            if proc.wait() != 0:
                log(f"{name} (draw {draw}) failed with exit code {proc.returncode}")
                return 1
            results.append(json.loads(path.read_text()))
        log(f"draw {draw}: both done in {time.perf_counter() - started:.0f} s of wall time")
    for r in results:
        log(f"{r['contender']}: {r['describe']}")
    rows = [row for r in results for row in budget_rows(r, args.budgets)]
    log("")
    log("test accuracy: 'selected' = the evaluation with the best validation accuracy so far; 'last' = the model at "
        "the budget")
    log(f"{'CPU-min':>7} {'draw':>4}  {'contender':<8} {'steps':>7} {'steps/s':>8} {'selected':>9} {'last':>7}")
    for r in sorted(rows, key=lambda r: (r["minutes"], r["draw"], r["contender"])):
        log(f"{r['minutes']:7.2f} {r['draw']:4d}  {r['contender']:<8} {r['steps']:7d} {r['steps_per_s']:8.2f} "
            f"{100 * r['selected_test_accuracy']:8.2f}% {100 * r['last_test_accuracy']:6.2f}%")
    summary = []
    for minutes in sorted({r["minutes"] for r in rows}):
        means = {}
        for name in CONTENDERS:
            here = [r["selected_test_accuracy"] for r in rows if r["minutes"] == minutes and r["contender"] == name]
            means[name] = sum(here) / len(here)
        summary.append({"minutes": minutes, **{f"{n}_selected_test_accuracy": v for n, v in means.items()},
                        "difference": means["ppl_vi"] - means["torch"]})
        log(f"at {minutes:g} CPU-min (mean over {len(args.draw_list)} draw(s), selected on validation): ppl_vi "
            f"{100 * means['ppl_vi']:.2f} %, torch {100 * means['torch']:.2f} %, difference "
            f"{100 * (means['ppl_vi'] - means['torch']):+.2f} points")
    figure(results, out / "ssl_quality.png")
    log(f"figure: {out / 'ssl_quality.png'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "clock": "cpu (time.process_time)", "rows": rows,
                                               "summary": summary, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
