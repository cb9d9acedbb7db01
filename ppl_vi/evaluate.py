"""Test-set evaluation: NELBO and its terms, IWAE-k (chunked), accuracy, exact log-likelihood.

All figures are per-datapoint means in nats, with their standard error over datapoints
(``*_se``). ``test_iwae`` maps k to the *negative* bound -L_k, so every number is "lower is
better" and comparable with published NLLs.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

import pyro
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ppl_vi import plots
from ppl_vi import run as rundir
from ppl_vi.config import TrainConfig
from ppl_vi.data.mnist import validate_bernoulli_data
from ppl_vi.data.sources import load_data
from ppl_vi.errors import CheckpointError, ConfigError, DataError
from ppl_vi.metrics import exact_metrics, iter_eval_batches, mean_se
from ppl_vi.models.base import LatentModel, default_make_batch, get_spec
from ppl_vi.nets import BernoulliDecoder
from ppl_vi.objectives.importance import IWAELoss
from ppl_vi.runtime import resolve_device


def _batch(model, xb, yb, labelled: bool):
    make = getattr(model, "make_batch", default_make_batch)
    return make(xb, yb if labelled else None)


def validate_eval_inputs(model, x, y: Optional[Tensor] = None, ks: Sequence[int] = (1,), batch_size: int = 1,
                         bernoulli: Optional[bool] = None) -> None:
    """A one-line DataError / ConfigError for data a user hands to the evaluation entry points.

    ``x`` must be a non-empty, finite float ``(B, D)`` tensor with the model's ``x_dim``, dtype and
    device; with a Bernoulli likelihood (inferred from a :class:`~ppl_vi.nets.BernoulliDecoder`
    when ``bernoulli`` is None) its values must lie in [0, 1]. ``y``, if given, is ``(B,)`` integer
    labels on the same device.
    """
    expected = "expected a non-empty float tensor of shape (B, D)"
    if not isinstance(x, Tensor):
        raise DataError(f"x is a {type(x).__name__}; {expected}")
    param = next(iter(model.parameters()), None)
    if param is not None and x.device != param.device:
        raise DataError(f"x is on {x.device} but the model is on {param.device}; move it with x.to({str(param.device)!r})")
    if bernoulli is None:
        bernoulli = any(isinstance(m, BernoulliDecoder) for m in model.modules())
    if bernoulli:
        validate_bernoulli_data(x, "x")
    elif x.ndim != 2 or not x.is_floating_point() or x.numel() == 0:
        raise DataError(f"x has shape {tuple(x.shape)} and dtype {x.dtype}; {expected}")
    elif not torch.isfinite(x).all():
        raise DataError(f"x contains NaN or inf; {expected} with finite values")
    x_dim = getattr(model, "x_dim", None)
    if x_dim is not None and x.shape[1] != x_dim:
        raise DataError(f"x has {x.shape[1]} columns but the model expects D = {x_dim}")
    if param is not None and x.dtype != param.dtype:
        raise DataError(f"x has dtype {x.dtype} but the model's parameters are {param.dtype}; convert with "
                        f"x.to({param.dtype})")
    if y is not None:
        if not isinstance(y, Tensor) or y.ndim != 1 or y.shape[0] != x.shape[0] or y.is_floating_point() \
                or y.dtype == torch.bool:
            shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise DataError(f"y has shape {shape}; expected integer labels of shape ({x.shape[0]},), one per row of x")
        if y.device != x.device:
            raise DataError(f"y is on {y.device} but x is on {x.device}; expected both on one device")
    if not ks or any(not isinstance(k, int) or k < 1 for k in ks):
        raise ConfigError(f"ks must be integers >= 1, got {list(ks)}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size}")


@torch.no_grad()
def bound_metrics(model: LatentModel, x: Tensor, y: Optional[Tensor] = None, ks: Sequence[int] = (1, 10),
                  batch_size: int = 500, max_rows: int = 200_000, progress: bool = False, labelled: bool = True,
                  seed: int = 0) -> Dict:
    """NELBO, KL, reconstruction and -IWAE_k per datapoint on (x, y), with standard errors.

    IWAE-k is computed with :class:`IWAELoss` in chunks of at most ``max_rows`` (particles ×
    datapoints) per forward pass, with a running logsumexp: memory stays flat in k.
    """
    validate_eval_inputs(model, x, y, ks, batch_size)
    pyro.set_rng_seed(seed)
    nelbo, kl, rec = [], [], []
    iwae = {k: [] for k in ks}
    total = math.ceil(x.shape[0] / batch_size) * (1 + len(ks))
    bar = tqdm(total=total, desc="eval", disable=not progress, leave=False, dynamic_ncols=True)
    for xb, yb in iter_eval_batches(x, y, batch_size):
        batch = _batch(model, xb, yb, labelled)
        draws = model.sample_draws(batch, 1) if model.latent_sites else {}
        if hasattr(model, "elbo_terms"):
            terms = model.elbo_terms(batch, draws)
            rec.append(terms["rec"].cpu())
            kl.append(terms["kl"].cpu())
            nelbo.append((terms["kl"] - terms["rec"]).cpu())
        else:
            nelbo.append(model.hand_negative_elbo(batch, draws, kl="analytic" if model.has_analytic_kl else "mc").cpu())
        bar.update(1)
        for k in ks:
            chunk = max(1, max_rows // xb.shape[0])
            objective = IWAELoss(k, model.max_plate_nesting, chunk_size=min(chunk, k))
            iwae[k].append((-objective.per_datapoint(model.model, model.guide, **batch)).cpu())
            bar.update(1)
    bar.close()
    out: Dict = {}
    out["test_nelbo"], out["test_nelbo_se"] = mean_se(torch.cat(nelbo))
    if kl:
        out["test_kl"], out["test_kl_se"] = mean_se(torch.cat(kl))
        out["test_rec"], out["test_rec_se"] = mean_se(-torch.cat(rec))  # distortion: -E log p(x|z)
    out["test_iwae"] = {str(k): mean_se(torch.cat(v))[0] for k, v in iwae.items()}
    out["test_iwae_se"] = {str(k): mean_se(torch.cat(v))[1] for k, v in iwae.items()}
    return out


@torch.no_grad()
def accuracy_metrics(model, x: Tensor, y: Tensor, batch_size: int = 1000, num_classes: int = 10) -> Dict:
    """Accuracy of ``model.classify`` and the confusion matrix (rows: true, columns: predicted)."""
    preds = torch.cat([model.classify(xb) for xb, _ in iter_eval_batches(x, None, batch_size)])
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    confusion.index_put_((y.cpu(), preds.cpu()), torch.ones_like(y.cpu()), accumulate=True)
    return {"test_accuracy": (preds == y).double().mean().item(), "confusion_matrix": confusion.tolist()}


def load_trained(run_dir: Path, checkpoint: str = "best", device: Optional[str] = None):
    """Rebuild a run's model from its config and checkpoint; returns (trainer-less model, config, data)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} does not exist")
    values = rundir.load_config_dict(run_dir)
    if device is not None:
        values["device"] = device
    config = TrainConfig(**values)
    dev = resolve_device(config.device)
    path = run_dir / rundir.CHECKPOINTS / f"{checkpoint}.pt"
    if not path.is_file():
        path = run_dir / rundir.CHECKPOINTS / "last.pt"
    state = rundir.load_checkpoint(path, map_location=dev)
    if state.get("model_name") != config.model:
        raise CheckpointError(f"checkpoint {path} is for model {state.get('model_name')!r}, but the run is {config.model!r}")
    spec = get_spec(config.model)
    data = load_data(spec.data, config, dev)
    model = spec.build(config, data.info).to(dev)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path} does not fit model {config.model}: {str(exc).splitlines()[0]}") from None
    model.eval()
    return model, config, data


def evaluate_run(run_dir: Path, ks: Sequence[int], *, device: Optional[str] = None, batch_size: int = 500,
                 progress: bool = True, max_rows: int = 200_000) -> Dict:
    """``ppl-vi eval``: test metrics of a run's best checkpoint, merged into its metrics.json."""
    model, config, data = load_trained(run_dir, device=device)
    start = time.perf_counter()
    labelled = data.kind in ("mnist-labelled", "mnist-completion")
    metrics = bound_metrics(model, data.test_x, data.test_y, ks, batch_size, max_rows, progress, labelled,
                            seed=config.seed)
    metrics.update(exact_metrics(model, data.test_x, data.truth))
    if hasattr(model, "classify") and data.test_y is not None:
        metrics.update(accuracy_metrics(model, data.test_x, data.test_y))
    metrics["eval_seconds"] = time.perf_counter() - start
    metrics["eval_device"] = str(next(model.parameters()).device)
    metrics = rundir.update_metrics(run_dir, **metrics)
    plots.bound_vs_k(run_dir, metrics)
    if "confusion_matrix" in metrics:
        plots.confusion_matrix(run_dir, metrics["confusion_matrix"])
    return metrics
