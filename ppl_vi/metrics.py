"""Per-datapoint figures of a fitted model, shared by training and evaluation.

Floor 2: the trainer reports them at the end of a run (``final_metrics``) and the evaluator on
the test set, without either importing the other. Every figure is a mean over datapoints with
its standard error, SE = sd / sqrt(n).
"""

from __future__ import annotations

import copy
import math
from typing import Dict, Iterator, Optional, Tuple

import torch
from torch import Tensor

from ppl_vi.models.protocols import Classifier, FittedParameters


def iter_eval_batches(x: Tensor, y: Optional[Tensor], batch_size: int) -> Iterator[Tuple[Tensor, Optional[Tensor]]]:
    """Consecutive slices of ``x`` (and ``y``) of at most ``batch_size`` rows, in order."""
    for start in range(0, x.shape[0], batch_size):
        yield x[start:start + batch_size], None if y is None else y[start:start + batch_size]


def mean_se(values: Tensor) -> Tuple[float, float]:
    """Mean and its standard error over the first dimension (float64)."""
    values = values.double()
    se = values.std().item() / math.sqrt(values.numel()) if values.numel() > 1 else math.nan
    return values.mean().item(), se


@torch.no_grad()
def exact_metrics(model, x: Tensor, truth=None) -> Dict:
    """Exact per-datapoint log-likelihood of the fit (float64) and of the true parameters."""
    out: Dict = {}
    if not model.has_exact_log_likelihood:
        return out
    m64 = copy.deepcopy(model).to(torch.float64)
    ll = m64.exact_log_likelihood({"x": x.double()})
    out["test_log_likelihood"], out["test_log_likelihood_se"] = mean_se(ll)
    if truth is not None and hasattr(truth, "log_prob"):
        out["true_log_likelihood"] = mean_se(truth.log_prob(x.double().cpu()))[0]
    return out


@torch.no_grad()
def predictions(classify, x: Tensor, batch_size: int = 1000) -> Tensor:
    """``classify(x_batch)`` (predicted labels) over ``x`` in slices of ``batch_size`` rows: (N,)."""
    return torch.cat([classify(xb) for xb, _ in iter_eval_batches(x, None, batch_size)])


def accuracy(classify, x: Tensor, y: Tensor, batch_size: int = 1000) -> float:
    """The fraction of rows of ``x`` whose predicted label equals ``y``."""
    return (predictions(classify, x, batch_size) == y).double().mean().item()


def classifier_accuracies(model, data, prefix: str = "") -> Dict:
    """``{prefix}val_accuracy`` and ``{prefix}test_accuracy`` of ``model.classify`` where the model
    classifies and the data have labels (the validation split only where it exists); else {}."""
    if not isinstance(model, Classifier) or data.test_y is None:
        return {}
    was_training = model.training
    model.eval()
    out = {}
    if data.val_x is not None and data.val_y is not None:
        out[f"{prefix}val_accuracy"] = accuracy(model.classify, data.val_x, data.val_y)
    out[f"{prefix}test_accuracy"] = accuracy(model.classify, data.test_x, data.test_y)
    model.train(was_training)
    return out


def final_metrics(model, data) -> Dict:
    """Cheap end-of-training figures: exact log-likelihood of synthetic fits, fitted parameters, and
    the last model's classifier accuracy (``final_val_accuracy``, ``final_test_accuracy``)."""
    out = exact_metrics(model, data.test_x, data.truth)
    if out:
        out["train_log_likelihood"] = exact_metrics(model, data.train_x)["test_log_likelihood"]
    if isinstance(model, FittedParameters):
        out["fitted_parameters"] = model.fitted_parameters()
    out.update(classifier_accuracies(model, data, prefix="final_"))
    return out
