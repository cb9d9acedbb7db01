"""One worker of the concurrency probe (``experiments/probe.py`` starts and drives it).

It builds the training run a quality row would (``ppl_vi.training.Trainer``: VAE z=50, batch 128,
the fast path, so a CUDA graph on CUDA), takes ``WARMUP`` steps (the graph is captured on the
fourth), prints ``{"ready": ..., "mode": ...}`` and then answers one JSON command per stdin line:
``{"run": SECONDS}`` -> trains full batches for at least that long, synchronising the device every
``CHUNK`` steps (a step counts once the device has done it), and prints ``{"steps": N, "seconds":
S}``; ``{"quit": true}`` -> exits.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # ppl_vi without installing it

import torch  # noqa: E402

from ppl_vi.config import TrainConfig  # noqa: E402
from ppl_vi.training.graph_step import fast_note  # noqa: E402
from ppl_vi.training import Trainer  # noqa: E402

CHUNK = 20  # steps between device synchronisations in a timed window
WARMUP = 8  # warm-up steps (>= 4: the CUDA graph is captured on the fourth)


def full_batches(trainer: Trainer):
    """Full batches only, epoch after epoch (a short last batch would leave the CUDA graph)."""
    full = trainer.config.batch_size
    while True:
        for batches in trainer.batches():
            if batches[0]["x"].shape[0] == full:
                yield batches


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-subset", type=int, default=0, help="first N training images (0: all; else >= 128)")
    p.add_argument("--hidden", default="500,500")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    config = TrainConfig(model="vae", device=args.device, seed=args.seed, val_size=0, train_subset=args.train_subset,
                         hidden=[int(h) for h in args.hidden.split(",")], fast=True)
    trainer = Trainer(config, progress=False)
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    stream = full_batches(trainer)
    for _ in range(WARMUP):
        trainer.train_step(next(stream))
    sync()
    print(json.dumps({"ready": True, "mode": fast_note(trainer.stepper), "device": str(trainer.device)}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        if command.get("quit"):
            break
        window = float(command["run"])
        sync()
        start, done = time.perf_counter(), 0
        while True:
            for _ in range(CHUNK):
                trainer.train_step(next(stream))
            sync()
            done += CHUNK
            elapsed = time.perf_counter() - start
            if elapsed >= window:
                break
        print(json.dumps({"steps": done, "seconds": elapsed}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
