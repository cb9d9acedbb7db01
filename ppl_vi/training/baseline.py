"""The supervised-only baseline of a semi-supervised run: the model's classifier network trained on
the labelled images alone, so that "semi-supervised" is a measured gain, never an assumption.

A semi-supervised model offers ``baseline_classifiers()``: name -> a freshly initialised network
mapping images to class logits. For ``ssvae`` and ``m1m2``, ``"baseline"`` is q(y|x)'s network of
M2, the MLP x_dim-hidden-C on the pixels; ``m1m2`` adds ``"baseline_m1"``, its own classifier
network on the features z1 of its M1 (learnt without labels). Each is trained by Adam on the
labelled images only,

    min_θ  -(1/N_l) Σ_l log softmax(f_θ(x_l))_{y_l}

full batch, ``config.baseline_steps`` steps at ``config.lr``, every step on a fresh dynamic
binarisation of the labelled images, as the semi-supervised model sees them. No unlabelled image
and no validation label takes part, and the last step's network is the one reported (nothing is
selected). Its accuracy on the validation split and on the test set (the model's fixed
binarisation) goes into metrics.json as ``NAME_val_accuracy`` and ``NAME_test_accuracy``, beside
the model's ``test_accuracy``; ``NAME_seconds`` is its training time. ``accuracy_gain`` is
``final_test_accuracy - baseline_test_accuracy``, the trained model's (last epoch) minus the
baseline's (:func:`accuracy_gain`; the CLI's last line says it). The RNG is forked and seeded
from ``config.seed``: the baseline neither depends on nor disturbs the run's random state.
"""

from __future__ import annotations

import time
from typing import Dict

import torch
from tqdm.auto import tqdm

from ppl_vi.metrics import accuracy
from ppl_vi.models.protocols import SemiSupervised
from ppl_vi.training.batches import training_images


def train_baselines(model, data, config, progress: bool = False) -> Dict:
    """Train and score every label-only baseline of ``model`` (nothing for other models/data)."""
    if not config.baseline_steps or data.labelled_idx is None or not isinstance(model, SemiSupervised):
        return {}
    out: Dict = {}
    devices = [data.train_x.device] if data.train_x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.seed)  # the baselines' initial weights too: not a function of how long the model trained
        for name, net in model.baseline_classifiers().items():
            torch.manual_seed(config.seed)
            out.update(train_one(name, net.to(data.train_x.device), data, config, progress))
    return out


def accuracy_gain(metrics: Dict) -> Dict:
    """``accuracy_gain`` = ``final_test_accuracy`` (the trained model's, last epoch) -
    ``baseline_test_accuracy``: what the unlabelled images added to the classifier, on the same test
    set (nothing when either is missing)."""
    model, baseline = metrics.get("final_test_accuracy"), metrics.get("baseline_test_accuracy")
    if not isinstance(model, (int, float)) or not isinstance(baseline, (int, float)):
        return {}
    return {"accuracy_gain": model - baseline}


def gain_line(metrics: Dict) -> str:
    """"test accuracy 89.12 %, supervised-only baseline 76.40 %: gain +12.72 points" ("" without a gain)."""
    if "accuracy_gain" not in metrics:
        return ""
    return (f"test accuracy {100 * metrics['final_test_accuracy']:.2f} %, supervised-only baseline "
            f"{100 * metrics['baseline_test_accuracy']:.2f} %: gain {100 * metrics['accuracy_gain']:+.2f} points")


def train_one(name: str, net: torch.nn.Module, data, config, progress: bool = False) -> Dict:
    """``baseline_steps`` Adam steps of cross-entropy on the labelled images; then the accuracies."""
    start = time.perf_counter()
    labels = data.train_y[data.labelled_idx]
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=config.lr)
    net.train()
    for _ in tqdm(range(config.baseline_steps), desc=f"{name} (labels only)", disable=not progress, leave=False):
        optimizer.zero_grad(set_to_none=True)
        logits = net(training_images(data, data.labelled_idx))  # (N_l, C), a fresh binarisation each step
        torch.nn.functional.cross_entropy(logits, labels).backward()
        optimizer.step()
    net.eval()

    def classify(x):
        return net(x).argmax(-1)

    with torch.no_grad():
        out = {f"{name}_test_accuracy": accuracy(classify, data.test_x, data.test_y)}
        if data.val_x is not None and data.val_y is not None:
            out[f"{name}_val_accuracy"] = accuracy(classify, data.val_x, data.val_y)
    out[f"{name}_seconds"] = time.perf_counter() - start
    return out
