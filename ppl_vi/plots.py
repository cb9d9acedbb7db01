"""Matplotlib figures for a run directory (PNG files under RUN_DIR/figures)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import List, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import torch  # noqa: E402

from ppl_vi import run as rundir  # noqa: E402
from ppl_vi.models.protocols import ImageModel, LabelConditional, LatentEncoder  # noqa: E402


def _save(fig, run_dir: Path, name: str) -> Path:
    """RUN_DIR/figures/NAME.png, written atomically: a kill leaves the old image or none, never a part,
    and a symbolic link there is replaced, not written through."""
    path = Path(run_dir) / rundir.FIGURES / f"{name}.png"
    try:
        rundir.atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=110, bbox_inches="tight"))
    finally:
        plt.close(fig)
    return path


def image_grid(images: torch.Tensor, rows: int, side: int = 28):
    """(rows*cols, side*side) pixel values -> one (rows*side, cols*side) array."""
    images = images.detach().float().cpu().reshape(rows, -1, side, side)
    return images.permute(0, 2, 1, 3).reshape(rows * side, -1).numpy()


def training_curves(run_dir: Path, history: List[dict]) -> Optional[Path]:
    if not history:
        return None
    return _save(curves_figure(history), run_dir, "training_curves")


def curves_figure(history: List[dict]):
    """Train (and validation) loss per epoch, with markers while there are few epochs (one epoch is a point)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    epochs = [h["epoch"] for h in history]
    few = len(history) <= 30
    ax.plot(epochs, [h["train_loss"] for h in history], marker="o" if few else None, ms=4, label="train loss")
    val = [(h["epoch"], h["val_loss"]) for h in history if "val_loss" in h]
    if val:
        ax.plot(*zip(*val), marker="s" if few else None, ms=4, label="validation loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (nats per datapoint)")
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


@torch.no_grad()
def image_figures(run_dir: Path, model, data) -> None:
    if isinstance(model, ImageModel):
        torch.manual_seed(0)
        samples = model.generate(64)
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.imshow(image_grid(samples, 8), cmap="gray")
        ax.set_title("samples from the prior (pixel probabilities)")
        ax.axis("off")
        _save(fig, run_dir, "samples")
        reconstruction_grid(run_dir, model, data)
    if isinstance(model, LatentEncoder) and data.test_y is not None:
        latent_scatter(run_dir, model.encode_mean(data.test_x[:2000]), data.test_y[:2000])


@torch.no_grad()
def reconstruction_grid(run_dir: Path, model, data, pairs: int = 4, columns: int = 10) -> Path:
    """``pairs`` × ``columns`` test images, each row of originals over the row of their reconstructions
    (decoder pixel probabilities at the guide's mean)."""
    n = pairs * columns
    x = data.test_x[:n]
    y = data.test_y[:n] if data.test_y is not None else None
    recon = model.reconstruct(x, y) if y is not None and model.needs_labels else model.reconstruct(x)
    rows = torch.cat([torch.cat([x[i * columns:(i + 1) * columns], recon[i * columns:(i + 1) * columns]])
                      for i in range(pairs)])  # (2 * pairs * columns, D): original row, reconstruction row, ...
    fig, ax = plt.subplots(figsize=(0.62 * columns + 0.8, 0.62 * 2 * pairs + 0.5))
    ax.imshow(image_grid(rows, 2 * pairs), cmap="gray", vmin=0, vmax=1)
    for i in range(1, pairs):
        ax.axhline(2 * i * 28 - 0.5, color="tab:orange", lw=1.5)  # between pairs of rows
    ax.set_yticks([28 * r + 14 for r in range(2 * pairs)], ["x", "recon."] * pairs, fontsize=8)
    ax.set_xticks([])
    ax.set_title("test images x (upper row of each pair) and reconstructions (lower row)", fontsize=9)
    return _save(fig, run_dir, "reconstructions")


def latent_scatter(run_dir: Path, z: torch.Tensor, labels: torch.Tensor) -> Path:
    """2-D scatter of latent means coloured by label (first two principal components if z > 2)."""
    z = z.detach().double().cpu()
    title = "latent means"
    if z.shape[1] > 2:
        z = z - z.mean(0)
        _, _, v = torch.linalg.svd(z, full_matrices=False)
        z = z @ v[:2].T
        title += " (PCA)"
    fig, ax = plt.subplots(figsize=(5, 4.5))
    points = ax.scatter(z[:, 0], z[:, 1], c=labels.cpu(), cmap="tab10", s=4)
    fig.colorbar(points, ax=ax, label="label")
    ax.set_title(title)
    return _save(fig, run_dir, "latent_scatter")


@torch.no_grad()
def gmm_density(run_dir: Path, model, data) -> Path:
    """Data scatter and the fitted mixture's log-density contours (2-D GMM)."""
    x = data.test_x.double().cpu()
    lo, hi = x.min(0).values - 1, x.max(0).values + 1
    g0, g1 = torch.meshgrid(torch.linspace(lo[0], hi[0], 200), torch.linspace(lo[1], hi[1], 200), indexing="ij")
    grid = torch.stack([g0.reshape(-1), g1.reshape(-1)], -1).double()
    m64 = copy.deepcopy(model).cpu().double()
    logp = m64.exact_log_likelihood({"x": grid}).reshape(200, 200)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.scatter(x[:, 0], x[:, 1], s=3, alpha=0.3, color="gray")
    ax.contour(g0, g1, logp, levels=12, cmap="viridis")
    ax.plot(*m64.locs.detach().T, "r+", markersize=12, label="fitted means")
    if data.truth is not None:
        ax.plot(*data.truth.means.T, "kx", markersize=10, label="true means")
    ax.legend()
    ax.set_title("GMM: data and fitted log-density")
    return _save(fig, run_dir, "gmm_density")


@torch.no_grad()
def ssvae_style_grid(run_dir: Path, model, n_styles: int = 10, seed: int = 0) -> Path:
    """Class-conditional samples, style against content: row = class y, column = one z ~ N(0, I).

    ``model.generate(n, y)`` is called once per class with the RNG re-seeded, so every row uses the
    same n_styles draws of z: a column holds one "style" rendered as each digit."""
    rows = []
    for c in range(model.num_classes):
        torch.manual_seed(seed)
        rows.append(model.generate(n_styles, c))
    fig, ax = plt.subplots(figsize=(0.5 * n_styles + 0.6, 0.5 * model.num_classes))
    ax.imshow(image_grid(torch.cat(rows), model.num_classes), cmap="gray")
    ax.set_yticks([28 * c + 14 for c in range(model.num_classes)], [str(c) for c in range(model.num_classes)])
    ax.set_xticks([])
    ax.set_ylabel("class y")
    ax.set_xlabel("z (one draw per column, shared by the rows)")
    ax.set_title("samples p(x|y,z): row = y, column = z")
    return _save(fig, run_dir, "style_grid")


def accuracy_curve(run_dir: Path, history: List[dict], metrics: Optional[dict] = None) -> Optional[Path]:
    """Validation and test accuracy per epoch of a classifying model, with the label-only baselines
    of metrics.json (``NAME_test_accuracy``) as horizontal lines: learning from the unlabelled
    images is the gap between the curve and the baseline."""
    points = [h for h in history if "test_accuracy" in h]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.8))
    epochs = [h["epoch"] for h in points]
    ax.plot(epochs, [100 * h["test_accuracy"] for h in points], "o-", label="test accuracy")
    if all("val_accuracy" in h for h in points):
        ax.plot(epochs, [100 * h["val_accuracy"] for h in points], ".--", label="validation accuracy")
    styles = iter([("black", ":"), ("gray", "-."), ("brown", "--")])
    for key, value in sorted((metrics or {}).items()):
        if key.startswith("baseline") and key.endswith("_test_accuracy"):
            color, dash = next(styles, ("gray", ":"))
            name = key[: -len("_test_accuracy")]
            ax.axhline(100 * value, color=color, ls=dash, label=f"{name} (labels only): {100 * value:.2f} %")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("classifier q(y|.) per epoch against the supervised-only baseline")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, run_dir, "accuracy")


def training_figures(run_dir: Path, model, data, history: List[dict], metrics: Optional[dict] = None) -> None:
    """Every figure that applies to this model, after training (``metrics``: the baselines' accuracies)."""
    model.eval()
    training_curves(run_dir, history)
    accuracy_curve(run_dir, history, metrics)
    if data.kind.startswith("mnist"):
        image_figures(run_dir, model, data)
        if isinstance(model, LabelConditional):
            ssvae_style_grid(run_dir, model)  # ssvae, cvae: a row per class
    elif data.kind == "gmm" and data.train_x.shape[1] == 2:
        gmm_density(run_dir, model, data)
    model.train()


def bound_vs_k(run_dir: Path, metrics: dict, title: Optional[str] = None) -> Optional[Path]:
    iw = metrics.get("test_iwae")
    if not iw:
        return None
    ks = sorted(int(k) for k in iw)
    se = metrics.get("test_iwae_se", {})
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    n_iwae, n_all = metrics.get("test_iwae_images"), metrics.get("test_nelbo_images")
    subset = n_iwae is not None and n_all is not None and n_iwae < n_all
    on = f" (first {n_iwae:,} test images)" if subset else ""
    ax.errorbar(ks, [iw[str(k)] for k in ks], yerr=[se.get(str(k), 0) for k in ks], marker="o", capsize=3,
                label="-IWAE_k" + on)
    # the NELBO on the same images as IWAE-k, so that the gap is the bound's, not the subset's
    nelbo = metrics.get("test_nelbo_on_iwae_images") if subset else metrics.get("test_nelbo")
    if nelbo is not None:
        ax.axhline(nelbo, color="gray", ls="--", label="NELBO" + on)
    if "test_log_likelihood" in metrics:
        ax.axhline(-metrics["test_log_likelihood"], color="black", ls=":", label="exact -log p(x)")
    ax.set_xscale("log")
    if title:
        ax.set_title(title, fontsize=9)
    ax.set_xlabel("k (importance samples)")
    ax.set_ylabel("nats per datapoint")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, run_dir, "bound_vs_k")


def confusion_matrix(run_dir: Path, matrix) -> Path:
    m = torch.tensor(matrix)
    fig, ax = plt.subplots(figsize=(5, 4.5))
    im = ax.imshow(m, cmap="Blues")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=6)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(im, ax=ax)
    return _save(fig, run_dir, "confusion_matrix")
