"""Training learns: short seeded CPU runs of the VAE, IWAE and GMM, each beside an lr ≈ 0 control.

``ppl-vi train`` refuses lr = 0 (config: lr must be > 0), so the control runs at lr = 1e-9: Adam
moves each parameter by at most ~1e-9 per step, so its validation loss is the untrained model's
(same seed, same initialisation) to ~1e-6 nats. A run has *learned* when its final validation loss
lies ``MARGIN`` nats (per datapoint) below that untrained value; the control must not pass the same
predicate. Catches a trainer that never steps, steps on the wrong sign, drops the loss's gradient
(e.g. detaches the bound) or evaluates a stale model; the old "50 < NELBO < 600" window passed an
untrained VAE (≈ 543).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ppl_vi.cli import main

SMALL = ["--device", "cpu", "--no-progress", "--hidden", "64", "--z-dim", "4", "--train-subset", "512",
         "--val-size", "500", "--batch-size", "64", "--seed", "0", "--epochs", "2"]
GMM = ["--device", "cpu", "--no-progress", "--n-train", "1000", "--n-test", "500", "--epochs", "20",
       "--batch-size", "100", "--seed", "0"]
#: nats per datapoint the validation loss must fall below the untrained model's (measured drop in the comment)
CASES = {
    "vae": (["vae", *SMALL], 100.0),
    "iwae": (["vae", "--loss", "iwae", "--k", "5", *SMALL], 100.0),
    "gmm": (["gmm", *GMM], 0.5),
}


def _train(args, out: Path, lr: str = None) -> dict:
    argv = ["train", *args, "--out", str(out)] + (["--lr", lr] if lr else [])
    assert main(argv) == 0
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines() if line.strip()]
    metrics = json.loads((out / "metrics.json").read_text())
    return {"val": history[-1]["val_loss"], "metrics": metrics}


def learned(final_val: float, untrained_val: float, margin: float) -> bool:
    return final_val <= untrained_val - margin


@pytest.mark.parametrize("case", sorted(CASES))
def test_training_lowers_the_validation_loss_and_the_lr0_control_does_not(case, tmp_path):
    args, margin = CASES[case]
    trained = _train(args, tmp_path / "trained")
    control = _train(args, tmp_path / "control", lr="1e-9")
    untrained = control["val"]
    assert learned(trained["val"], untrained, margin), (trained["val"], untrained, margin)
    assert not learned(control["val"], untrained, margin)  # the negative control fails the same predicate
    if case == "gmm":  # the held-out log-likelihood moves at least halfway toward the synthetic truth's
        truth = trained["metrics"]["true_log_likelihood"]
        gap_trained = truth - trained["metrics"]["test_log_likelihood"]
        gap_control = truth - control["metrics"]["test_log_likelihood"]
        assert gap_control > 0.5 and gap_trained < 0.5 * gap_control, (gap_trained, gap_control)
