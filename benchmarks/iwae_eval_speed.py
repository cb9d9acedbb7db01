"""IWAE-k evaluation speed against the machine's limit: measured time beside the FLOP-bound estimate.

For a VAE (default 784-500-500-50, the README's main-job architecture on a GPU; ``--run RUN_DIR``
scores a trained run's best checkpoint instead of a fresh network), on the first ``--images`` test
images, IWAE-k for ``--ks`` (default 1,10,100,1000,5000) is timed, one after the other in one run:

==========  ===========================================================================================
variant     what runs
==========  ===========================================================================================
ppl_vi      ``ppl_vi.evaluate.bound_metrics``'s path (``ppl_vi.iwae_eval``): the guide once per batch,
            max(ks) particles shared by every k, rows per pass from ``rows_per_pass``
per-k      the previous evaluator, for comparison: ``IWAELoss(k)`` for each k separately, the guide
            re-run for every chunk of at most 200,000 rows
==========  ===========================================================================================

The limit: every particle row costs one decoder pass, 2·Σ(in·out) FLOPs over the decoder's linear
layers (the guide's encoder runs once per batch: counted, but small). The FLOP-bound estimate is
that count divided by the matrix-multiply throughput measured in the same process, with the same
threads, on a (rows × 500) @ (500 × 784)-shaped product (the decoder's largest layer): what the
machine does at best on this shape. ``measured / bound`` says how close the evaluator comes.

``--sweep`` also times ppl_vi's IWAE path alone at several rows per pass (on at most 100 images),
which is how ``CPU_WORKING_SET`` was chosen.

    python benchmarks/iwae_eval_speed.py                       # CPU: 500 images, ks up to 5000
    python benchmarks/iwae_eval_speed.py --images 10000 --device cuda
    python benchmarks/iwae_eval_speed.py --quick               # seconds: a test runs this
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyro  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from ppl_vi.data import mnist  # noqa: E402
from ppl_vi.evaluate import bound_metrics, load_trained  # noqa: E402
from ppl_vi.iwae_eval import iwae_bounds, rows_per_pass  # noqa: E402
from ppl_vi.models.vae import VAE  # noqa: E402
from ppl_vi.objectives.importance import IWAELoss  # noqa: E402
from ppl_vi.runtime import device_name  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def linear_macs(module: nn.Module) -> int:
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


@torch.no_grad()
def gemm_flops_per_second(device: torch.device, rows: int, inner: int, out: int, seconds: float = 2.0) -> float:
    """Best throughput of (rows × inner) @ (inner × out) on ``device``, FLOP/s (a few timed repeats)."""
    a = torch.randn(rows, inner, device=device)
    b = torch.randn(inner, out, device=device)
    for _ in range(3):
        a @ b
    sync(device)
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        for _ in range(5):
            a @ b
        sync(device)
        best = max(best, 5 * 2 * rows * inner * out / (time.perf_counter() - t))
    return best


@torch.no_grad()
def per_k_previous(model, x, ks, batch_size: int, max_rows: int = 200_000) -> Dict[int, float]:
    """The evaluator before the chunked one (kept to time against it): one IWAELoss per k, the guide re-run per chunk."""
    out = {k: [] for k in ks}
    for start in range(0, x.shape[0], batch_size):
        xb = x[start:start + batch_size]
        for k in ks:
            objective = IWAELoss(k, model.max_plate_nesting, chunk_size=min(max(1, max_rows // xb.shape[0]), k))
            out[k].append(-objective.per_datapoint(model.model, model.guide, x=xb))
    return {k: torch.cat(v).double().mean().item() for k, v in out.items()}


@torch.no_grad()
def sweep_pass(model, x, ks, batch_size: int, rows: int) -> None:
    """ppl_vi's IWAE path alone at a forced ``rows`` per pass."""
    for start in range(0, x.shape[0], batch_size):
        iwae_bounds(model, {"x": x[start:start + batch_size]}, ks, rows)


def timed(device, fn):
    sync(device)
    t = time.perf_counter()
    value = fn()
    sync(device)
    return value, time.perf_counter() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--run", default=None, help="score this run's best checkpoint (else a fresh 784-500-500-50 VAE)")
    p.add_argument("--images", type=int, default=None, help="test images (default: CPU 500, GPU 10000)")
    p.add_argument("--ks", default="1,10,100,1000,5000")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, all cores)")
    p.add_argument("--no-previous", action="store_true", help="skip the per-k previous evaluator")
    p.add_argument("--sweep", action="store_true", help="also time ppl_vi's path at several rows per pass")
    p.add_argument("--quick", action="store_true", help="a few seconds: 20 images, ks 1,10,50, small sweep")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("iwae_eval_speed: error: --device cuda asked for, but no CUDA GPU is available", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    ks = [int(k) for k in ("1,10,50" if args.quick else args.ks).split(",")]
    images = 20 if args.quick else args.images or (500 if device.type == "cpu" else 10_000)
    pyro.enable_validation(False)
    torch.manual_seed(0)
    if args.run:
        model = load_trained(Path(args.run), device=str(device)).model
        what = f"run {args.run} (best checkpoint)"
    else:
        model = VAE(784, 50, [500, 500]).to(device).eval()
        what = "a fresh VAE 784-500-500-50 (timing does not depend on the weights)"
    x = mnist.fixed_binarization(mnist.load_mnist("test", device=device)[0])[:images]
    print(f"iwae_eval_speed on {device_name(device)}; torch {torch.__version__}, pyro {pyro.__version__}", flush=True)
    print(f"model: {what}; {x.shape[0]} test images, IWAE k = {ks}, batch {args.batch_size}", flush=True)

    decoder_flops = 2 * linear_macs(model.decoder)
    encoder_flops = 2 * linear_macs(model.encoder)
    rows = rows_per_pass(model, x.shape[1], device)
    width = max(m.out_features for m in model.decoder.modules() if isinstance(m, nn.Linear))
    inner = max(m.in_features for m in model.decoder.modules() if isinstance(m, nn.Linear))
    gemm = gemm_flops_per_second(device, max(rows, 512), inner, width, seconds=0.5 if args.quick else 2.0)
    particles = x.shape[0] * (max(ks) + 1)  # IWAE's shared draws and the NELBO's one
    flops = particles * decoder_flops + 3 * x.shape[0] * encoder_flops  # the encoder: NELBO, record, check
    bound = flops / gemm
    results: Dict = {"device": device_name(device), "images": x.shape[0], "ks": ks, "rows_per_pass": rows,
                     "gemm_gflops": gemm / 1e9, "flops": flops, "flop_bound_s": bound}

    metrics, seconds = timed(device, lambda: bound_metrics(model, x, None, ks, args.batch_size, seed=0))
    results["ppl_vi"] = {"seconds": seconds, "iwae": metrics["test_iwae"], "path": metrics["eval_iwae_path"]}
    lines = [f"matrix-multiply limit ({max(rows, 512)}x{inner} @ {inner}x{width}): {gemm / 1e9:.1f} GFLOP/s",
             f"work: {particles:,} particle rows x {decoder_flops / 1e6:.2f} MFLOP (decoder) "
             f"+ encoder = {flops / 1e12:.3f} TFLOP -> FLOP-bound estimate {bound:.1f} s",
             f"{'variant':<9} {'seconds':>9} {'x bound':>8} {'GFLOP/s':>8}  -IWAE_k",
             f"{'ppl_vi':<9} {seconds:9.1f} {seconds / bound:8.2f} {flops / seconds / 1e9:8.1f}  "
             + " ".join(f"{k}:{v:.2f}" for k, v in metrics["test_iwae"].items())
             + f"  ({metrics['eval_iwae_path']}; {rows} rows/pass)"]
    if not args.no_previous:
        previous_particles = x.shape[0] * sum(ks)
        previous_flops = previous_particles * decoder_flops
        values, seconds_prev = timed(device, lambda: per_k_previous(model, x, ks, args.batch_size))
        results["per_k_previous"] = {"seconds": seconds_prev, "iwae": values}
        lines.append(f"{'per-k':<9} {seconds_prev:9.1f} {seconds_prev / bound:8.2f} "
                     f"{previous_flops / seconds_prev / 1e9:8.1f}  "
                     + " ".join(f"{k}:{v:.2f}" for k, v in values.items())
                     + f"  (independent draws per k; {previous_particles:,} particle rows)")
        lines.append(f"ratio per-k / ppl_vi: {seconds_prev / seconds:.2f}")
    if args.sweep:
        sweep: List[dict] = []
        xs = x[:100]  # the sweep: IWAE-max(k) alone on at most 100 images
        sweep_flops = xs.shape[0] * max(ks) * decoder_flops
        for r in ([512, 2048, 8192] if args.quick else [512, 1024, 2048, 4096, 8192, 32768, 131072]):
            _, s = timed(device, lambda: sweep_pass(model, xs, ks, args.batch_size, r))
            sweep.append({"rows": r, "seconds": s, "gflops": sweep_flops / s / 1e9})
            lines.append(f"  sweep ({xs.shape[0]} images, IWAE only): {r:>7} rows/pass {s:8.1f} s  "
                         f"({sweep_flops / s / 1e9:.1f} GFLOP/s)")
        results["sweep"] = sweep
    for line in lines:
        print(line, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
