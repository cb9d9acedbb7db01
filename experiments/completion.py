"""CVAE image completion on MNIST quadrants (Sohn et al. 2015; Pyro's examples/cvae).

One ``cvae-completion`` model is trained through the library (``ppl_vi.training.train``: a run
directory with config, checkpoints, history and figures), with 1, 2 or 3 given quadrants drawn
per training image; the deterministic :class:`~ppl_vi.models.cvae.CompletionBaseline` is trained on
the same training split (same validation split, same dynamic binarisation, the same number of
epochs as the CVAE completed, best validation NLL kept). Then, on the first ``--n-test`` images of
the fixed-binarised MNIST test set and for 1, 2 and 3 given quadrants (bottom-left, + top-right,
+ top-left), per image, in nats:

* **baseline**: its exact -log p(x_M | c) = Σ_{d∈M} BCE(x_d, σ(l_d)), l = MLP(c);
* **CVAE -L_K** (:func:`~ppl_vi.models.cvae.completion_nll`): the importance-sampling estimate
  -log (1/K) Σ_k p(x_M|z_k,c) p(z_k|c) / q(z_k|x,c), z_k ~ q(z|x,c), for each K in ``--k``. It is
  an upper bound on -log p(x_M|c) in expectation and decreases towards it as K grows;
* **CVAE -ELBO**: -(1/10) Σ_k log p(x_M|z_k,c) + KL(q(z|x,c) || p(z|c)), 10 draws: the quantity
  Pyro's table reports (its ``Trace_ELBO(num_particles=10)`` loss).

Each is a mean over the test images ± its standard error over images. Written: ``RUN/completion.json``,
``RUN/completion.md`` (the table), ``RUN/figures/completions.png`` (per quadrant count: given
quadrants / baseline / CVAE samples / truth), ``experiments/completion.json`` and the section
``semi_supervised.SECTION`` of ``experiments/RESULTS.md`` (rendered by
``experiments/semi_supervised.py``, together with the SSVAE rows).

Usage::

    python experiments/completion.py --device cuda --minutes 6 --k 1,10,100,1000    # the result (one GPU)
    python experiments/completion.py --device cpu --quick                           # CPU smoke test
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # ppl_vi without installing it
import runner  # noqa: E402  (device names, portable paths, results files)
import semi_supervised  # noqa: E402  (the RESULTS.md section, rendered with the SSVAE rows)
from runner import REPO  # noqa: E402
from stats import mean_se  # noqa: E402
from targets import PYRO_BASELINE, PYRO_CVAE  # noqa: E402

RESULTS_JSON = semi_supervised.COMPLETION_JSON
FULL_K = [1, 10, 100, 1000]
QUICK_K = [1, 10]
NELBO_PARTICLES = 10  # Pyro's num_particles default in examples/cvae


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda | cpu (default cuda)")
    p.add_argument("--minutes", type=float, default=None,
                   help="CVAE training budget (--max-minutes; the baseline gets the same number of epochs)")
    p.add_argument("--epochs", type=int, default=None, help="CVAE epochs (with --minutes: the cap; default 20)")
    p.add_argument("--baseline-minutes", type=float, default=None,
                   help="cap on the baseline's training: it stops after the epoch that passes it, even if that is "
                        "fewer epochs than the CVAE's (recorded as baseline_epochs; default: no cap)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 2000 training images, 1 epoch, hidden 128, z = 16, 300 test images, K = 1,10")
    p.add_argument("--k", default=None, help="importance samples K for -L_K (default 1,10,100,1000; --quick: 1,10)")
    p.add_argument("--n-test", type=int, default=None, help="test images evaluated (default 10000; --quick: 300)")
    p.add_argument("--hidden", default=None, help="hidden widths of every network (default 500,500; --quick: 128)")
    p.add_argument("--z-dim", type=int, default=None, help="latent dimension (default 50; --quick: 16)")
    p.add_argument("--train-subset", type=int, default=None, help="first N training images (default all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--eval-batch", type=int, default=500, help="test images per evaluation batch")
    p.add_argument("--samples", type=int, default=3, help="CVAE samples per image in the figure")
    p.add_argument("--data-dir", default=None, help="MNIST root (default $PPL_VI_DATA)")
    p.add_argument("--out-dir", default=str(REPO / "experiments" / "runs"), help="run directories (gitignored)")
    p.add_argument("--results-md", default=str(semi_supervised.RESULTS_MD))
    p.add_argument("--results-json", default=str(RESULTS_JSON))
    p.add_argument("--ssl-json", default=str(semi_supervised.RESULTS_JSON), help="read only: the SSVAE rows of the section")
    opts = p.parse_args(argv)
    if opts.device not in ("cpu", "cuda") and not opts.device.startswith("cuda:"):
        p.error("--device must be cpu or cuda")
    if opts.minutes is not None and opts.minutes <= 0:
        p.error("--minutes must be > 0")
    if opts.baseline_minutes is not None and opts.baseline_minutes <= 0:
        p.error("--baseline-minutes must be > 0")
    try:
        opts.ks = [int(k) for k in opts.k.split(",")] if opts.k else (QUICK_K if opts.quick else FULL_K)
        opts.hidden_list = [int(h) for h in opts.hidden.split(",")] if opts.hidden else ([128] if opts.quick else
                                                                                         [500, 500])
    except ValueError:
        p.error("--k and --hidden must be comma-separated integers")
    if not opts.ks or min(opts.ks) < 1 or min(opts.hidden_list) < 1:
        p.error("--k and --hidden values must be >= 1")
    opts.z_dim = opts.z_dim or (16 if opts.quick else 50)
    opts.n_test = opts.n_test or (300 if opts.quick else 10000)
    opts.train_subset = opts.train_subset if opts.train_subset is not None else (2000 if opts.quick else 0)
    for name in ("n_test", "z_dim", "batch_size", "eval_batch", "samples"):
        if getattr(opts, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return opts


# ---- training ----------------------------------------------------------------------------------------


def train_cvae(opts, run_dir: Path):
    """``cvae-completion`` through the library; returns the trainer with its best checkpoint loaded."""
    from ppl_vi import run as rundir
    from ppl_vi.models.configure import build_config
    from ppl_vi.job import train

    overrides = dict(device=opts.device, seed=opts.seed, hidden=opts.hidden_list, z_dim=opts.z_dim, lr=opts.lr,
                     batch_size=opts.batch_size, train_subset=opts.train_subset, data_dir=opts.data_dir,
                     eval_k=[1])
    if opts.quick:
        overrides.update(epochs=opts.epochs or 1, max_minutes=opts.minutes or 0.2, val_size=1000)
    elif opts.minutes is not None:
        overrides.update(epochs=opts.epochs or 100000, max_minutes=opts.minutes)
    elif opts.epochs is not None:
        overrides.update(epochs=opts.epochs)
    config = build_config("cvae-completion", overrides=overrides)
    trainer = train(config, run_dir, progress=False, overwrite=True)
    best = run_dir / rundir.CHECKPOINTS / "best.pt"
    state = rundir.load_checkpoint(best if best.is_file() else run_dir / rundir.CHECKPOINTS / "last.pt",
                                   map_location=trainer.device)
    trainer.model.load_state_dict(state["model"])
    trainer.model.eval()
    return trainer, config


def train_baseline(data, opts, epochs: int, device):
    """:class:`CompletionBaseline` on the CVAE's training split: Adam on the mean masked BCE, 1-3
    quadrants drawn per image, training images binarised afresh each batch (as the CVAE's are);
    the epoch with the best validation NLL is kept; ``--baseline-minutes`` stops it after the epoch
    that passes that time. Returns (net, per-epoch records)."""
    import torch

    from ppl_vi.data import mnist
    from ppl_vi.models.cvae import CompletionBaseline, completion_batch

    torch.manual_seed(opts.seed)
    net = CompletionBaseline(data.train_x.shape[1], opts.hidden_list).to(device)
    optimiser = torch.optim.Adam(net.parameters(), lr=opts.lr)
    generator = torch.Generator().manual_seed(opts.seed)
    val_x = data.val_x if data.val_x is not None else data.test_x
    val_q = torch.randint(1, 4, (val_x.shape[0],), generator=torch.Generator().manual_seed(opts.seed + 1))
    val_batch = completion_batch(val_x, val_q.to(device))
    best, best_state, history = math.inf, copy.deepcopy(net.state_dict()), []
    n = data.train_x.shape[0]
    start = time.perf_counter()
    for epoch in range(max(1, epochs)):
        order = torch.randperm(n, generator=generator).to(device)
        total = 0.0
        for start in range(0, n, opts.batch_size):
            idx = order[start:start + opts.batch_size]
            xb = mnist.binarize(data.train_x[idx])
            quadrants = torch.randint(1, 4, (idx.numel(),), generator=generator).to(device)
            loss = net.nll(completion_batch(xb, quadrants)).mean()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total += loss.detach() * idx.numel()
        with torch.no_grad():
            val = net.nll(val_batch).mean().item()
        history.append({"epoch": epoch + 1, "train_nll": float(total) / n, "val_nll": val})
        if val < best:
            best, best_state = val, copy.deepcopy(net.state_dict())
        if opts.baseline_minutes is not None and time.perf_counter() - start > 60 * opts.baseline_minutes:
            break
    net.load_state_dict(best_state)
    net.eval()
    return net, history


# ---- evaluation ----------------------------------------------------------------------------------------


def evaluate(model, baseline, x, ks: List[int], batch_size: int, seed: int) -> Dict[str, dict]:
    """Per number of given quadrants: baseline exact NLL, CVAE -ELBO (10 draws) and -L_K for each K."""
    import pyro
    import torch

    from ppl_vi.models.cvae import baseline_nll, completion_batch, completion_nll

    rows_budget = 50_000  # particles × images per decoder pass
    out = {}
    with torch.no_grad():
        for q in (1, 2, 3):
            base, nelbo, iw = [], [], {k: [] for k in ks}
            pyro.set_rng_seed(seed + q)
            for start in range(0, x.shape[0], batch_size):
                xb = x[start:start + batch_size]
                base.append(baseline_nll(baseline, xb, q).cpu())
                batch = completion_batch(xb, q)
                draws = model.sample_draws(batch, NELBO_PARTICLES)
                nelbo.append(model.hand_negative_elbo(batch, draws, kl="analytic").cpu())
                chunk = max(1, rows_budget // xb.shape[0])
                for k in ks:
                    iw[k].append(completion_nll(model, xb, q, k=k, chunk=min(k, chunk)).cpu())
            per_image = lambda parts: torch.cat(parts).double().tolist()  # noqa: E731
            out[str(q)] = {"baseline": mean_se(per_image(base)), "cvae_nelbo": mean_se(per_image(nelbo)),
                           "cvae_is": {str(k): mean_se(per_image(v)) for k, v in iw.items()}}
    return out


def completion_figure(path: Path, model, baseline, x, samples: int, seed: int) -> Path:
    """Per number of given quadrants, 10 test images: given quadrants (missing shown grey), the
    baseline's completion σ(l) on the missing pixels, ``samples`` CVAE completions σ(dec(z, c)) with
    z ~ p(z|c), and the truth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from ppl_vi.models.cvae import completion_batch
    from ppl_vi.plots import image_grid

    torch.manual_seed(seed)
    x = x[:10]
    labels = ["given", "baseline", *[f"CVAE {i + 1}" for i in range(samples)], "truth"]
    fig, axes = plt.subplots(3, 1, figsize=(6.5, 3 * 0.62 * len(labels)))
    with torch.no_grad():
        for ax, q in zip(axes, (1, 2, 3)):
            batch = completion_batch(x, q)
            given = torch.where(batch["mask"], torch.full_like(x, 0.3), x)
            base = torch.where(batch["mask"], torch.sigmoid(baseline(batch["c"])), x)
            cvae = model.complete(x, q, samples)  # (S, B, D)
            grid = torch.cat([given, base, *cvae, x]).cpu()
            ax.imshow(image_grid(grid, len(labels)), cmap="gray", vmin=0, vmax=1)
            ax.set_yticks([28 * i + 14 for i in range(len(labels))], labels, fontsize=7)
            ax.set_xticks([])
            ax.set_title(f"{q} given quadrant{'s' if q > 1 else ''}", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


# ---- main ------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    opts = parse_args(argv)
    argv_shown = sys.argv[1:] if argv is None else list(argv)
    command = "python experiments/completion.py " + " ".join(shlex.quote(a) for a in argv_shown)
    import torch

    if runner.cuda_missing(opts.device):
        print("completion: --device cuda but no CUDA GPU here; use --device cpu (with --quick)", file=sys.stderr)
        return 2
    from ppl_vi.errors import PplViError

    out_dir = Path(opts.out_dir).resolve()
    run_dir = out_dir / ("smoke-completion" if opts.quick else "completion")
    dev_name = runner.device_name(opts.device)
    print(f"completion: training cvae-completion into {run_dir} on {dev_name}", flush=True)
    try:
        start = time.perf_counter()
        trainer, config = train_cvae(opts, run_dir)
        cvae_train_s = time.perf_counter() - start
        epochs = int(trainer.metrics.get("epochs_done", 1))
        print(f"completion: CVAE {epochs} epoch(s) in {cvae_train_s:.0f} s; training the baseline", flush=True)
        start = time.perf_counter()
        baseline, base_history = train_baseline(trainer.data, opts, epochs, trainer.device)
        baseline_train_s = time.perf_counter() - start
        torch.save(baseline.state_dict(), run_dir / "checkpoints" / "baseline.pt")
        x = trainer.data.test_x[:opts.n_test]
        start = time.perf_counter()
        quadrants = evaluate(trainer.model, baseline, x, opts.ks, opts.eval_batch, opts.seed)
        eval_s = time.perf_counter() - start
        figure = completion_figure(run_dir / "figures" / "completions.png", trainer.model, baseline, x, opts.samples,
                                   opts.seed)
    except PplViError as exc:
        print(f"completion: error: {exc}", file=sys.stderr)
        return 2
    record = dict(
        run=run_dir.name, mode="smoke" if opts.quick else "full", device=opts.device, device_name=dev_name,
        command=command, seed=opts.seed, run_dir=runner.portable(run_dir), ks=opts.ks, n_test=int(x.shape[0]),
        nelbo_particles=NELBO_PARTICLES, hidden=opts.hidden_list, z_dim=opts.z_dim,
        train_subset=opts.train_subset, cvae_epochs=epochs, cvae_train_s=round(cvae_train_s, 1),
        cvae_final_val_loss=trainer.metrics.get("final_val_loss"), baseline_epochs=len(base_history),
        baseline_train_s=round(baseline_train_s, 1), baseline_history=base_history, eval_s=round(eval_s, 1),
        quadrants=quadrants, pyro_cvae=PYRO_CVAE, pyro_baseline=PYRO_BASELINE,
        figures=[runner.portable(figure), *(runner.portable(p) for p in sorted((run_dir / "figures").glob("*.png"))
                                            if p.name != figure.name)],
        environment={k: v for k, v in json.loads((run_dir / "config.json").read_text())["environment"].items()
                     if k in runner.ENVIRONMENT_KEYS},
        finished=runner.now())
    (run_dir / "completion.json").write_text(json.dumps(record, indent=2) + "\n")
    table = "\n".join(semi_supervised.completion_table(record)) + "\n"
    (run_dir / "completion.md").write_text(
        f"# CVAE completion ({record['mode']}, {dev_name})\n\n`{command}`\n\n{table}\n"
        "Nats per test image, mean ± SE over images. CVAE -L_K: importance sampling with K draws from q(z|x,c); "
        f"CVAE -ELBO: {NELBO_PARTICLES} draws, closed-form KL (Pyro's reported quantity).\n")
    results_json = Path(opts.results_json)
    runner.save_rows(results_json, semi_supervised.COMPLETION_ABOUT, {semi_supervised.completion_key(record): record})
    semi_supervised.update_results_md(Path(opts.results_md), Path(opts.ssl_json), results_json)
    print(table, end="")
    print(f"written: {run_dir / 'completion.json'}, {run_dir / 'completion.md'}, {figure}, {results_json}, "
          f"{opts.results_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
