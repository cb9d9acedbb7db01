"""Signal-to-noise ratio of the IWAE gradient against K: IWAELoss against DReG, side by side.

Rainforth et al. (2018, "Tighter variational bounds are not necessarily better") show that the
IWAE bound's inference-network (encoder) gradient has a signal-to-noise ratio that falls like
1/√K for large K, while the generative network's (decoder's) rises like √K. Tucker et al. (2019)'s
doubly reparameterised gradient (DReG) removes the score part whose noise causes the fall (they
report an encoder SNR that no longer falls with K). What this script measured is in
benchmarks/RESULTS.md, section "Gradient signal-to-noise". Both estimators target the same gradient (``ppl_vi.check``'s expected-gradient
rows prove DReG unbiased), so the SNR is a fair comparison of their noise.

Protocol: a VAE (``ppl_vi.models.vae.VAE``, 784-H-Z, the library's model/guide pair) is first
trained for ``--train-steps`` steps with IWAELoss (K = 10) on dynamically binarised MNIST, so the
gradients are those of a model mid-training, not of a random one. Then, for each K and each
loss (``make_loss("iwae", K)`` and ``make_loss("dreg", K)``, exactly what ``ppl-vi train --loss``
builds), the gradient of the loss on a fixed batch of ``--batch`` test images is drawn ``--seeds``
times (fresh particles each time, the same seeds for both losses), and per parameter element

    SNR_e = |mean_s g_se| / sd_s(g_se),

averaged over the encoder's elements and over the decoder's (Rainforth et al.'s definition, on
the batch's summed gradient). Elements whose gradient is exactly zero on every draw (first-layer
weights of pixels that are 0 in the batch) count as SNR 0: a constant fraction for every K and
loss, so it scales the columns alike and leaves the slopes unchanged. An element with no signal
still shows |mean|/sd ≈ 0.8/√seeds (the noise floor). The table goes to stdout and ``--out`` (Markdown, JSON, a log-log
figure), with the slope of log SNR against log K fitted for each column.

    python benchmarks/gradient_snr.py --out benchmarks/results/gradient_snr       # ~21 min on one CPU thread
    python benchmarks/gradient_snr.py --quick --out /tmp/snr                       # seconds (the test runs it)
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from ppl_vi.data import mnist  # noqa: E402
from ppl_vi.models.vae import VAE  # noqa: E402
from ppl_vi.objectives.losses import make_loss  # noqa: E402
from ppl_vi.runtime import resolve_device  # noqa: E402

LOSSES = ("iwae", "dreg")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ks", default="1,3,10,30,100,300", help="particle counts K, comma-separated")
    p.add_argument("--seeds", type=int, default=200, help="gradient draws per K and loss")
    p.add_argument("--batch", type=int, default=16, help="test images in the fixed batch")
    p.add_argument("--hidden", type=int, default=200, help="hidden width of encoder and decoder")
    p.add_argument("--z-dim", type=int, default=20)
    p.add_argument("--train-steps", type=int, default=1000, help="IWAE (K=10) steps before measuring")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=None, help="folder for snr.md, snr.json and snr_vs_k.png")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in seconds")
    args = p.parse_args(argv)
    if args.quick:
        args.ks, args.seeds, args.batch, args.hidden, args.z_dim, args.train_steps = "1,4,16", 12, 4, 16, 4, 20
    args.ks = [int(k) for k in str(args.ks).split(",")]
    if any(k < 1 for k in args.ks) or args.seeds < 3 or args.batch < 1:
        p.error("--ks must be >= 1, --seeds >= 3, --batch >= 1")
    return args


def train_briefly(vae: VAE, images: torch.Tensor, steps: int, seed: int) -> float:
    """``steps`` Adam steps of IWAELoss (K=10) on dynamically binarised training batches of 100."""
    loss = make_loss("iwae", 10)
    optim = torch.optim.Adam(vae.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    last = math.nan
    vae.use_param_store = False
    for _ in tqdm(range(steps), desc="pre-training (IWAE K=10)", leave=False):
        idx = torch.randint(images.shape[0], (100,), generator=g).to(images.device)
        x = mnist.binarize(images[idx])
        optim.zero_grad()
        value = loss.differentiable_loss(vae.model, vae.guide, x=x) / x.shape[0]
        value.backward()
        optim.step()
        last = value.item()
    return last


def snr(vae: VAE, name: str, k: int, x: torch.Tensor, seeds: int, seed: int) -> Dict[str, float]:
    """Mean element-wise SNR of the encoder's and the decoder's gradient over ``seeds`` draws."""
    loss = make_loss(name, k)
    groups = {"encoder": [p for p in vae.encoder.parameters()], "decoder": [p for p in vae.decoder.parameters()]}
    params = groups["encoder"] + groups["decoder"]
    draws = []
    for s in range(seeds):
        pyro.set_rng_seed(seed + s)
        grads = torch.autograd.grad(loss.differentiable_loss(vae.model, vae.guide, x=x), params)
        draws.append(torch.cat([g.reshape(-1) for g in grads]).double())
    g = torch.stack(draws)  # (seeds, elements)
    ratio = g.mean(0).abs() / g.std(0).clamp_min(1e-300)
    n_enc = sum(p.numel() for p in groups["encoder"])
    return {"encoder": ratio[:n_enc].mean().item(), "decoder": ratio[n_enc:].mean().item()}


def slope(ks: List[int], values: List[float]) -> float:
    """Least-squares slope of log value against log K."""
    lx = [math.log(k) for k in ks]
    ly = [math.log(v) for v in values]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    den = sum((a - mx) ** 2 for a in lx)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / den if den else math.nan


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    data = mnist.MNIST.load(args.data_dir, device=device)
    vae = VAE(784, args.z_dim, [args.hidden]).to(device)
    start = time.perf_counter()
    final_loss = train_briefly(vae, data.train_x, args.train_steps, args.seed)
    x = data.test_x_bin[: args.batch].to(device)
    rows = []
    for k in tqdm(args.ks, desc="K"):
        row = {"k": k}
        for name in LOSSES:
            for part, value in snr(vae, name, k, x, args.seeds, args.seed + 1000 * k).items():
                row[f"{name}_{part}"] = value
        rows.append(row)
    seconds = time.perf_counter() - start
    fits = {col: slope(args.ks, [r[col] for r in rows]) for col in rows[0] if col != "k"}
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU: {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    result = {"device": device_name, "seconds": seconds, "settings": {k: v for k, v in vars(args).items()},
              "pretrain_final_loss_per_image": final_loss, "rows": rows, "log_log_slopes": fits}
    table = render(result)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "snr.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "snr.md").write_text(table + "\n")
        figure(result, out / "snr_vs_k.png")
    return result


def render(result: dict) -> str:
    s = result["settings"]
    head = ("| K | IWAE encoder SNR | DReG encoder SNR | IWAE decoder SNR | DReG decoder SNR |\n"
            "|---|---|---|---|---|")
    lines = [head] + [f"| {r['k']} | {r['iwae_encoder']:.4f} | {r['dreg_encoder']:.4f} | {r['iwae_decoder']:.4f} | "
                      f"{r['dreg_decoder']:.4f} |" for r in result["rows"]]
    f = result["log_log_slopes"]
    lines.append(f"| slope of log SNR vs log K | {f['iwae_encoder']:+.2f} | {f['dreg_encoder']:+.2f} | "
                 f"{f['iwae_decoder']:+.2f} | {f['dreg_decoder']:+.2f} |")
    lines.append("")
    lines.append(f"{result['device']}; VAE 784-{s['hidden']}-{s['z_dim']} pre-trained {s['train_steps']} IWAE(K=10) "
                 f"steps (final loss {result['pretrain_final_loss_per_image']:.2f} nats/image); batch of {s['batch']} "
                 f"test images; {s['seeds']} gradient draws per K and loss; {result['seconds']:.0f} s in all.")
    return "\n".join(lines)


def figure(result: dict, path: Path) -> None:
    ks = [r["k"] for r in result["rows"]]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), constrained_layout=True)
    for ax, part in zip(axes, ("encoder", "decoder")):
        for name, style in (("iwae", "o-"), ("dreg", "s-")):
            ax.plot(ks, [r[f"{name}_{part}"] for r in result["rows"]], style, label=name.upper())
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("K (particles)")
        ax.set_title(f"{part} gradient SNR")
        ax.legend()
    axes[0].set_ylabel("mean |E g| / sd(g)")
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
