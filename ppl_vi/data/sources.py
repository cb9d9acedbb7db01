"""From a registry data name to device-resident tensors: what the trainer and evaluator read.

=====================  =========================================================================
data name              contents
=====================  =========================================================================
gmm                    synthetic 2-D mixture with known parameters (ppl_vi.data.synthetic)
linear-gaussian        synthetic probabilistic-PCA data with known W, b, σ
mnist                  MNIST images; training batches binarised dynamically, test fixed-binarised
mnist-labelled         the same with labels (conditional VAEs)
mnist-semisupervised   the same with a class-balanced labelled subset (``labels``) and the rest
                       unlabelled
mnist-completion       the same, for models that build their own inputs (image completion)
=====================  =========================================================================
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor

from ppl_vi.data import mnist, synthetic
from ppl_vi.errors import ConfigError


@dataclasses.dataclass
class DataBundle:
    """Train / validation / test tensors on one device, and what a model needs to be built."""

    kind: str
    train_x: Tensor
    test_x: Tensor
    train_y: Optional[Tensor] = None
    test_y: Optional[Tensor] = None
    val_x: Optional[Tensor] = None
    val_y: Optional[Tensor] = None
    binary: bool = False  # Bernoulli data: binarise training batches dynamically
    labelled_idx: Optional[Tensor] = None  # semi-supervised: indices into train_x with labels
    unlabelled_idx: Optional[Tensor] = None
    truth: object = None  # synthetic: the true parameters

    @property
    def info(self) -> dict:
        """What ``spec.build(config, info)`` needs: sizes, and the training data for inits."""
        return {
            "x_dim": self.train_x.shape[-1],
            "train_x": self.train_x,
            "train_size": self.train_x.shape[0],
            "num_classes": 10 if self.kind.startswith("mnist") else None,
            "n_labelled": None if self.labelled_idx is None else int(self.labelled_idx.numel()),
            "truth": self.truth,
        }


def load_data(kind: str, config, device: torch.device, dtype=torch.float32) -> DataBundle:
    """Load (or synthesise) the data set ``kind`` onto ``device``."""
    if kind == "gmm":
        truth = synthetic.default_gmm_params()
        train_x, train_c = synthetic.sample_gmm(truth, config.n_train, config.seed)
        test_x, test_c = synthetic.sample_gmm(truth, config.n_test, config.seed + 1)
        return DataBundle(kind, train_x.to(device, dtype), test_x.to(device, dtype), train_c.to(device),
                          test_c.to(device), val_x=test_x.to(device, dtype), truth=truth)
    if kind == "linear-gaussian":
        truth = synthetic.default_linear_gaussian_params(x_dim=5, z_dim=config.z_dim, seed=config.seed)
        train_x, _ = synthetic.sample_linear_gaussian(truth, config.n_train, config.seed)
        test_x, _ = synthetic.sample_linear_gaussian(truth, config.n_test, config.seed + 1)
        return DataBundle(kind, train_x.to(device, dtype), test_x.to(device, dtype),
                          val_x=test_x.to(device, dtype), truth=truth)
    if kind.startswith("mnist"):
        data = mnist.MNIST.load(config.data_dir, device=device)
        train_x, train_y = data.train_x.to(dtype), data.train_y
        val_x = val_y = None
        val_size = getattr(config, "val_size", 0)
        if val_size:
            train_idx, val_idx = data.validation_split(val_size, seed=config.seed)
            val_x = mnist.fixed_binarization(train_x[val_idx], seed=config.seed + 1)
            val_y = train_y[val_idx]
            train_x, train_y = train_x[train_idx], train_y[train_idx]
        train_subset = getattr(config, "train_subset", 0)
        if train_subset:  # quick runs and tests: the first N training images (after the split)
            train_x, train_y = train_x[:train_subset], train_y[:train_subset]
        bundle = DataBundle(kind, train_x, data.test_x_bin.to(dtype), train_y, data.test_y, val_x, val_y,
                            binary=True)
        if kind == "mnist-semisupervised":
            bundle.labelled_idx, bundle.unlabelled_idx = mnist.labelled_subset(train_y, config.labels, seed=config.seed)
        return bundle
    raise ConfigError(f"unknown data set {kind!r}")
