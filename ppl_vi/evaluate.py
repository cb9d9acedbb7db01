"""Test-set evaluation: NELBO and its terms, IWAE-k (chunked), accuracy, exact log-likelihood.

All figures are per-datapoint means in nats, with their standard error over datapoints
(``*_se``). ``test_iwae`` maps k to the *negative* bound -L_k, so every number is "lower is
better" and comparable with published NLLs.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Dict, NamedTuple, Optional, Sequence, Union

import pyro
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ppl_vi import plots
from ppl_vi import run as rundir
from ppl_vi.config import TrainConfig
from ppl_vi.data.mnist import validate_bernoulli_data
from ppl_vi.data.sources import DataBundle, load_data
from ppl_vi.errors import CheckpointError, ConfigError, DataError
from ppl_vi.metrics import exact_metrics, iter_eval_batches, mean_se, predictions
from ppl_vi.models.base import LatentModel, get_spec
from ppl_vi.models.protocols import Classifier, SplitsELBO
from ppl_vi.iwae_eval import iwae_bounds, rows_per_pass
from ppl_vi.nets import BernoulliDecoder
from ppl_vi.runtime import resolve_device

CHECKPOINT_NAMES = ("best", "last")


def _batch(model, xb, yb, labelled: bool):
    return model.make_batch(xb, yb if labelled else None)


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
    if model.x_dim is not None and x.shape[1] != model.x_dim:
        raise DataError(f"x has {x.shape[1]} columns but the model expects D = {model.x_dim}")
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
                  batch_size: int = 500, max_rows: Optional[int] = None,
                  progress: Union[bool, Callable[[int], None]] = False, labelled: bool = True, seed: int = 0,
                  iwae_images: Optional[int] = None) -> Dict:
    """NELBO, KL, reconstruction and -IWAE_k per datapoint on (x, y), with standard errors.

    IWAE-k comes from :func:`ppl_vi.iwae_eval.iwae_bounds`: the guide once per batch, max(ks)
    particles shared by every k, in passes of :func:`~ppl_vi.iwae_eval.rows_per_pass` rows
    (``max_rows`` caps it); memory stays flat in k. ``iwae_images`` (None: all) computes IWAE-k on
    the first that many datapoints only; the NELBO always uses all of them. ``progress``: a bar,
    or a callable told the rows done (one per datapoint for the NELBO, max(ks) per IWAE datapoint).
    The returned ``eval_*`` / ``test_iwae_images`` keys say how it ran.
    """
    validate_eval_inputs(model, x, y, ks, batch_size)
    if max_rows is not None and (not isinstance(max_rows, int) or max_rows < 1):
        raise ConfigError(f"max_rows must be an integer >= 1, got {max_rows}")
    n_iwae = x.shape[0] if not iwae_images else min(iwae_images, x.shape[0])
    pyro.set_rng_seed(seed)
    nelbo, kl, rec = [], [], []
    iwae: Dict[int, list] = {k: [] for k in ks}
    rows = rows_per_pass(model, x.shape[1], x.device, cap=max_rows)
    paths = set()
    # one unit per particle row (the NELBO's one per datapoint, IWAE's max(ks)), so an ETA is honest
    bar = tqdm(total=x.shape[0] + n_iwae * max(ks), desc="eval", unit="rows", unit_scale=True, leave=False,
               disable=progress is not True, dynamic_ncols=True)
    advance = progress if callable(progress) else bar.update
    for start, (xb, yb) in zip(range(0, x.shape[0], batch_size), iter_eval_batches(x, y, batch_size)):
        batch = _batch(model, xb, yb, labelled)
        draws = model.sample_draws(batch, 1) if model.latent_sites else {}
        if isinstance(model, SplitsELBO):
            terms = model.elbo_terms(batch, draws)
            rec.append(terms["rec"].cpu())
            kl.append(terms["kl"].cpu())
            nelbo.append((terms["kl"] - terms["rec"]).cpu())
        else:
            nelbo.append(model.hand_negative_elbo(batch, draws, kl="analytic" if model.has_analytic_kl else "mc").cpu())
        advance(xb.shape[0])
        if start >= n_iwae:
            continue
        if start + xb.shape[0] > n_iwae:  # the last batch of the IWAE subset
            xb, yb = xb[: n_iwae - start], None if yb is None else yb[: n_iwae - start]
            batch = _batch(model, xb, yb, labelled)
        result = iwae_bounds(model, batch, ks, rows, progress=advance)
        paths.add(result.path)
        for k in ks:
            iwae[k].append((-result.bounds[k]).cpu())
    bar.close()
    out: Dict = {}
    out["test_nelbo"], out["test_nelbo_se"] = mean_se(torch.cat(nelbo))
    if kl:
        out["test_kl"], out["test_kl_se"] = mean_se(torch.cat(kl))
        out["test_rec"], out["test_rec_se"] = mean_se(-torch.cat(rec))  # distortion: -E log p(x|z)
    out["test_iwae"] = {str(k): mean_se(torch.cat(v))[0] for k, v in iwae.items()}
    out["test_iwae_se"] = {str(k): mean_se(torch.cat(v))[1] for k, v in iwae.items()}
    out["test_nelbo_images"], out["test_iwae_images"] = x.shape[0], n_iwae
    if n_iwae < x.shape[0]:  # the NELBO on IWAE's images too: the two compared on the same images
        out["test_nelbo_on_iwae_images"], out["test_nelbo_on_iwae_images_se"] = mean_se(torch.cat(nelbo)[:n_iwae])
    out["eval_iwae_path"] = "; ".join(sorted(paths))
    out["eval_rows_per_pass"] = rows
    out["eval_threads"] = torch.get_num_threads()
    return out


@torch.no_grad()
def accuracy_metrics(model, x: Tensor, y: Tensor, batch_size: int = 1000, num_classes: int = 10) -> Dict:
    """Accuracy of ``model.classify`` and the confusion matrix (rows: true, columns: predicted)."""
    preds = predictions(model.classify, x, batch_size)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    confusion.index_put_((y.cpu(), preds.cpu()), torch.ones_like(y.cpu()), accumulate=True)
    return {"test_accuracy": (preds == y).double().mean().item(), "confusion_matrix": confusion.tolist()}


class Trained(NamedTuple):
    """A run's model rebuilt from a checkpoint, with the checkpoint it came from."""

    model: LatentModel
    config: TrainConfig
    data: DataBundle
    checkpoint: Dict  # file (relative to the run directory), epoch, step, and why if not the one asked for


def load_trained(run_dir: Path, checkpoint: str = "best", device: Optional[str] = None,
                 data: Optional[DataBundle] = None) -> Trained:
    """Rebuild a run's model from its config and ``checkpoints/CHECKPOINT.pt`` (``best``, else ``last``,
    said in ``.checkpoint["note"]``). ``data``: the run's data already loaded on the device (else loaded)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} does not exist")
    if checkpoint not in CHECKPOINT_NAMES:
        raise ConfigError(f"checkpoint must be one of {', '.join(CHECKPOINT_NAMES)}, got {checkpoint!r}")
    values = rundir.load_config_dict(run_dir)
    if device is not None:
        values["device"] = device
    config = TrainConfig(**values)
    dev = resolve_device(config.device)
    path = run_dir / rundir.CHECKPOINTS / f"{checkpoint}.pt"
    info: Dict = {}
    if not path.is_file() and checkpoint == "best":
        path = run_dir / rundir.CHECKPOINTS / "last.pt"
        info["note"] = "no best.pt (no validation pass saved one): scored last.pt"
    state = rundir.load_checkpoint(path, map_location=dev)
    if state.get("model_name") != config.model:
        raise CheckpointError(f"checkpoint {path} is for model {state.get('model_name')!r}, but the run is {config.model!r}")
    spec = get_spec(config.model)
    data = data if data is not None else load_data(spec.data, config, dev)
    model = spec.build(config, data.info).to(dev)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path} does not fit model {config.model}: {str(exc).splitlines()[0]}") from None
    model.eval()
    info = {"file": str(path.relative_to(run_dir)), "epoch": state.get("epoch"), "step": state.get("step"), **info}
    return Trained(model, config, data, info)


def describe_checkpoint(info: Dict) -> str:
    """"checkpoints/best.pt (epoch 7, step 3010)"."""
    return f"{info['file']} (epoch {info.get('epoch')}, step {info.get('step')})"


#: end-of-training metrics (ppl_vi.metrics.final_metrics) that an evaluation of a checkpoint recomputes
FINAL_KEYS = ("test_log_likelihood", "test_log_likelihood_se", "true_log_likelihood")


def keep_training_values(previous: Dict, new: Dict) -> Dict:
    """Training's end-of-run values of keys ``new`` overwrites, under ``at_end_of_training`` (with the
    weights they came from: the model at the end of training, as in last.pt); {} if none."""
    if "at_end_of_training" in previous or "eval_checkpoint" in previous:
        return {}  # already kept, or the keys come from an earlier evaluation
    kept = {k: previous[k] for k in FINAL_KEYS if k in previous and k in new and previous[k] != new[k]}
    if not kept:
        return {}
    where = f"end of training (epoch {previous.get('epochs_done')}, step {previous.get('steps')}: checkpoints/last.pt)"
    return {"at_end_of_training": {"weights": where, **kept}}


def evaluate_run(run_dir: Path, ks: Sequence[int], **options) -> Dict:
    """``ppl-vi eval``: :func:`score_run` holding the run directory's lock (a process still training or
    evaluating there is named and refused), once figures/ is known not to be a link out of it."""
    if not Path(run_dir).is_dir():
        raise ConfigError(f"run directory {run_dir} does not exist")
    with rundir.locked(Path(run_dir)):
        rundir.check_folders(Path(run_dir))
        return score_run(Path(run_dir), ks, **options)


def score_run(run_dir: Path, ks: Sequence[int], *, checkpoint: str = "best", device: Optional[str] = None,
              batch_size: int = 500, progress: Union[bool, Callable[[int], None]] = True,
              max_rows: Optional[int] = None, iwae_images: Optional[int] = None,
              log: Optional[Callable[[str], None]] = None, data: Optional[DataBundle] = None) -> Dict:
    """``ppl-vi eval``: test metrics of a run's checkpoint, merged into its metrics.json.

    metrics.json records the checkpoint scored (``eval_checkpoint``, ``eval_checkpoint_epoch``,
    ``eval_checkpoint_step``), the figures written (``eval_figures``) and the keys it wrote
    (``eval_keys``: a run trained further drops them, as they describe an older checkpoint); training's end-of-run
    values of keys the evaluation recomputes are kept under ``at_end_of_training``. ``log`` receives
    a line naming the checkpoint before the (long) evaluation starts. ``iwae_images`` (default: the
    run's ``eval_images``; 0 or None: all) limits IWAE-k to the first test points. ``data``: the
    run's data, already loaded on the device by the caller (saves loading them again).
    """
    model, config, data, info = load_trained(run_dir, checkpoint=checkpoint, device=device, data=data)
    n_test = data.test_x.shape[0]
    iwae_images = config.eval_images if iwae_images is None else iwae_images
    n_iwae = min(iwae_images, n_test) if iwae_images else n_test
    if log is not None:
        log(f"scoring {describe_checkpoint(info)}{'; ' + info['note'] if 'note' in info else ''} on "
            f"{n_test} test points, IWAE k = {', '.join(map(str, ks))}"
            + (f" on the first {n_iwae}" if n_iwae < n_test else ""))
    start = time.perf_counter()
    labelled = data.kind in ("mnist-labelled", "mnist-completion")
    metrics = bound_metrics(model, data.test_x, data.test_y, ks, batch_size, max_rows, progress, labelled,
                            seed=config.seed, iwae_images=n_iwae)
    metrics.update(exact_metrics(model, data.test_x, data.truth))
    if isinstance(model, Classifier) and data.test_y is not None:
        metrics.update(accuracy_metrics(model, data.test_x, data.test_y))
    metrics["eval_seconds"] = time.perf_counter() - start
    metrics["eval_device"] = str(next(model.parameters()).device)
    metrics["eval_checkpoint"], metrics["eval_checkpoint_epoch"] = info["file"], info["epoch"]
    metrics["eval_checkpoint_step"] = info["step"]
    metrics["eval_checkpoint_note"] = info.get("note")  # None clears an earlier evaluation's note
    previous = rundir.read_json(Path(run_dir) / rundir.METRICS) if (Path(run_dir) / rundir.METRICS).is_file() else {}
    metrics.update(keep_training_values(previous, metrics))
    written = [plots.bound_vs_k(run_dir, {**previous, **metrics}, title=f"scored: {describe_checkpoint(info)}")]
    if "confusion_matrix" in metrics:
        written.append(plots.confusion_matrix(run_dir, metrics["confusion_matrix"]))
    metrics["eval_figures"] = [str(p.relative_to(run_dir)) for p in written if p is not None]
    # what training drops if the run trains on: this evaluation's keys and an earlier one's
    metrics["eval_keys"] = sorted(set(metrics) | set(previous.get("eval_keys", [])) | {"eval_keys"})
    return rundir.update_metrics(run_dir, **metrics)
