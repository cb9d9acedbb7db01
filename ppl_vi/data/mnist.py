"""MNIST: locating, reading (IDX format), binarising and batching.

The data live as four IDX files under ``<root>/MNIST/raw/`` (torchvision's layout), gzipped or
not. ``root`` is, in order: an explicit ``data_dir``, the ``PPL_VI_DATA`` environment variable, or
the cache folder ``$XDG_CACHE_HOME/ppl_vi/data`` (default ``~/.cache/ppl_vi/data``). Only the cache
is ever filled by downloading (through torchvision); an explicit folder without the files is an
error, never a download.

Everything here works with whole tensors on one device: :func:`minibatches` yields index tensors
to slice device-resident data with, ``x[idx]``, instead of a DataLoader.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ppl_vi.errors import DataError

ENV_VAR = "PPL_VI_DATA"
NUM_PIXELS = 28 * 28
_SPLIT_PREFIX = {"train": "train", "test": "t10k"}
_IDX_UBYTE = 0x08
MAX_IDX_BYTES = 2**30  # MNIST's largest file holds 47 MB; this bounds what a corrupt or hostile header can cost
_CHUNK = 2**20
_CACHE: dict[tuple[Path, str], tuple[Tensor, Tensor]] = {}


def _cache_dir() -> Path:
    """``$XDG_CACHE_HOME/ppl_vi/data``, with ``XDG_CACHE_HOME`` defaulting to ``~/.cache``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "ppl_vi" / "data"


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """The root folder holding ``MNIST/raw/``: ``data_dir``, else ``$PPL_VI_DATA``, else the cache.

    A path to the ``MNIST`` folder or to ``MNIST/raw`` itself is normalised to that root.
    """
    if data_dir is None:
        data_dir = os.environ.get(ENV_VAR) or _cache_dir()
    root = Path(data_dir).expanduser()
    if root.name == "raw" and root.parent.name == "MNIST":
        return root.parent.parent
    if root.name == "MNIST":
        return root.parent
    return root


def read_idx(path: str | Path) -> Tensor:
    """Read an unsigned-byte IDX file (gzipped when the name ends in ``.gz``) as a uint8 tensor.

    Layout: magic ``00 00 08 ndim``, then ``ndim`` big-endian int32 sizes, then
    ``prod(sizes)`` bytes. The header is read first and the data incrementally, up to the size the
    header declares (at most :data:`MAX_IDX_BYTES`), so a file that decompresses to more than it
    declares (a gzip bomb) costs at most that much memory. Anything else (truncated, foreign,
    oversized) raises :class:`DataError`.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            magic = f.read(4)
            if len(magic) < 4 or magic[0:3] != bytes([0, 0, _IDX_UBYTE]):
                raise DataError(f"{path} is not an unsigned-byte IDX file (bad magic number); expected "
                                "magic 0x000008NN as in MNIST's *-ubyte files")
            ndim = magic[3]
            sizes = f.read(4 * ndim)
            if len(sizes) < 4 * ndim:
                raise DataError(f"{path} is truncated inside its header; expected {ndim} dimension sizes")
            shape = [int.from_bytes(sizes[4 * i: 4 * i + 4], "big") for i in range(ndim)]
            declared = math.prod(shape)
            if declared > MAX_IDX_BYTES:
                raise DataError(f"{path} declares shape {shape}, {declared} bytes; at most {MAX_IDX_BYTES} bytes "
                                "are read from an IDX file")
            data = bytearray()
            while len(data) < declared:
                chunk = f.read(min(_CHUNK, declared - len(data)))
                if not chunk:
                    break
                data += chunk
            extra = bool(f.read(1))
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read IDX file {path} ({type(e).__name__}); expected a readable "
                        "IDX file, gzipped if named .gz") from None
    if len(data) < declared:
        raise DataError(f"{path} holds {len(data)} data bytes but its header {shape} "
                        f"needs {declared}; the file is truncated or corrupt")
    if extra:
        raise DataError(f"{path} holds more data than the {declared} bytes its header {shape} declares; "
                        "the file is corrupt (or a decompression bomb)")
    return torch.frombuffer(data, dtype=torch.uint8).reshape(shape) if declared else torch.zeros(shape, dtype=torch.uint8)


def _idx_files(raw_dir: Path, split: str) -> tuple[Path, Path] | None:
    """The (images, labels) IDX paths of ``split`` in ``raw_dir``, plain preferred over ``.gz``."""
    found = []
    for kind in ("images-idx3", "labels-idx1"):
        name = f"{_SPLIT_PREFIX[split]}-{kind}-ubyte"
        candidates = [raw_dir / name, raw_dir / f"{name}.gz"]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            return None
        found.append(path)
    return found[0], found[1]


def _download(root: Path, split: str) -> None:
    """Fetch MNIST into ``root/MNIST/raw`` with torchvision, the only network access."""
    try:
        import torchvision

        torchvision.datasets.MNIST(root=str(root), train=split == "train", download=True)
    except Exception as e:  # noqa: BLE001 - any failure becomes one actionable line
        reason = " ".join(f"{type(e).__name__}: {e}".split())
        raise DataError(f"could not download MNIST into {root} ({reason}); pass --data-dir or "
                        f"set {ENV_VAR} to a folder holding MNIST/raw") from e


def _read_split(images_path: Path, labels_path: Path) -> tuple[Tensor, Tensor]:
    """Images as float32 ``(N, 784)`` in [0, 1] and labels as int64 ``(N,)``, on CPU."""
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.ndim != 1:
        raise DataError(f"{images_path} / {labels_path} have shapes {tuple(images.shape)} / "
                        f"{tuple(labels.shape)}; expected (N, 28, 28) images and (N,) labels")
    if images.shape[0] == 0:
        raise DataError(f"{images_path} holds 0 images; expected MNIST's images (60000 train, 10000 test)")
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{images_path} has {images.shape[0]} images but {labels_path} has "
                        f"{labels.shape[0]} labels; expected the same number")
    x = images.reshape(-1, NUM_PIXELS).to(torch.float32) / 255.0
    return x, labels.to(torch.int64)


def load_mnist(
    split: str = "train",
    data_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    download: bool = True,
) -> tuple[Tensor, Tensor]:
    """Load an MNIST split: images float32 ``(N, 784)`` in [0, 1] and labels int64 ``(N,)``.

    ``split`` is ``"train"`` (60000) or ``"test"`` (10000). Files are looked up in
    ``<root>/MNIST/raw`` (see :func:`resolve_data_dir`); a download happens only into the cache,
    i.e. when neither ``data_dir`` nor ``$PPL_VI_DATA`` is given. Loaded splits are kept on CPU
    in a module-level cache, so later calls only copy to ``device``.
    """
    if split not in _SPLIT_PREFIX:
        raise DataError(f"unknown MNIST split {split!r}; expected 'train' or 'test'")
    explicit = data_dir is not None or bool(os.environ.get(ENV_VAR))
    root = resolve_data_dir(data_dir).resolve()
    key = (root, split)
    if key not in _CACHE:
        raw_dir = root / "MNIST" / "raw"
        files = _idx_files(raw_dir, split)
        if files is None and not explicit and download:
            _download(root, split)
            files = _idx_files(raw_dir, split)
        if files is None:
            prefix = _SPLIT_PREFIX[split]
            hint = "" if explicit else f"; pass --data-dir or set {ENV_VAR}"
            raise DataError(f"no MNIST IDX files in {raw_dir}; expected {prefix}-images-idx3-ubyte"
                            f"[.gz] and {prefix}-labels-idx1-ubyte[.gz]{hint}")
        _CACHE[key] = _read_split(*files)
    x, y = _CACHE[key]
    return x.to(device), y.to(device)


def binarize(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Dynamic binarisation: ``b ~ Bernoulli(x)`` elementwise, same dtype and device as ``x``."""
    return torch.bernoulli(x, generator=generator)


def fixed_binarization(x: Tensor, seed: int = 0) -> Tensor:
    """Deterministic binarisation ``b = 1[u < x]``, ``u ~ U(0, 1)`` drawn on CPU from ``seed``.

    The uniforms never depend on ``x``'s device, so one seed gives the same bits on every machine.
    """
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(seed))
    return (u < x.detach().cpu()).to(device=x.device, dtype=x.dtype)


def labelled_subset(
    labels: Tensor, n_labelled: int, num_classes: int = 10, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Class-balanced labelled indices (``n_labelled / num_classes`` per class) and the rest.

    Returns sorted int64 ``(labelled_idx, unlabelled_idx)`` on ``labels``' device; together they
    partition ``range(len(labels))``. The choice depends only on ``seed``.
    """
    n = labels.shape[0]
    if not num_classes <= n_labelled <= n:
        raise DataError(f"n_labelled={n_labelled} is out of range; expected between "
                        f"num_classes={num_classes} and the number of examples {n}")
    if n_labelled % num_classes:
        raise DataError(f"n_labelled={n_labelled} is not divisible by num_classes={num_classes}; "
                        "expected a multiple so every class gets the same count (no rounding)")
    y = labels.detach().cpu().long()
    if y.min() < 0 or y.max() >= num_classes:
        raise DataError(f"labels range over [{int(y.min())}, {int(y.max())}]; expected integers "
                        f"in 0..{num_classes - 1}")
    per_class = n_labelled // num_classes
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in range(num_classes):
        members = (y == c).nonzero().squeeze(1)
        if len(members) < per_class:
            raise DataError(f"class {c} has {len(members)} examples but {per_class} labelled ones "
                            f"were asked for; expected n_labelled <= {num_classes} x its size")
        chosen.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    is_labelled = torch.zeros(n, dtype=torch.bool)
    is_labelled[torch.cat(chosen)] = True
    labelled = is_labelled.nonzero().squeeze(1)
    unlabelled = (~is_labelled).nonzero().squeeze(1)
    return labelled.to(labels.device), unlabelled.to(labels.device)


def minibatches(
    n: int,
    batch_size: int,
    *,
    generator: torch.Generator | None = None,
    shuffle: bool = True,
    drop_last: bool = False,
    device: str | torch.device | None = None,
) -> Iterator[Tensor]:
    """Yield int64 index tensors on ``device`` that partition ``range(n)``, shuffled if asked.

    The permutation is drawn on CPU with ``generator``, so a seed gives the same batches on any
    device. With ``drop_last`` a final batch smaller than ``batch_size`` is skipped.
    """
    if batch_size < 1:
        raise DataError(f"batch_size={batch_size} is invalid; expected a positive integer")
    if n < 0:
        raise DataError(f"n={n} is invalid; expected a non-negative number of examples")
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    order = order.to(device if device is not None else "cpu")
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield order[start: start + batch_size]


@dataclass
class MNIST:
    """Both MNIST splits, device-resident, plus a fixed binarisation of the test images."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    test_x_bin: Tensor | None = None

    def __post_init__(self) -> None:
        if self.test_x_bin is None:
            self.test_x_bin = fixed_binarization(self.test_x)

    @classmethod
    def load(
        cls,
        data_dir: str | Path | None = None,
        device: str | torch.device = "cpu",
        test_binarization_seed: int = 0,
    ) -> MNIST:
        """Load train and test onto ``device``; ``test_x_bin`` uses ``test_binarization_seed``."""
        train_x, train_y = load_mnist("train", data_dir, device)
        test_x, test_y = load_mnist("test", data_dir, device)
        test_x_bin = fixed_binarization(test_x, test_binarization_seed)
        return cls(train_x, train_y, test_x, test_y, test_x_bin)

    def validation_split(self, n_val: int = 10000, seed: int = 0) -> tuple[Tensor, Tensor]:
        """Sorted ``(train_idx, val_idx)``: a random ``n_val`` of the training set held out."""
        n = self.train_x.shape[0]
        if not 0 < n_val < n:
            raise DataError(f"n_val={n_val} is out of range; expected 0 < n_val < {n}")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        val, train = order[:n_val].sort().values, order[n_val:].sort().values
        return train.to(self.train_x.device), val.to(self.train_x.device)


def validate_bernoulli_data(x: Tensor, name: str = "x") -> None:
    """Raise :class:`DataError` unless ``x`` is a non-empty finite float ``(B, D)`` in [0, 1]."""
    expected = "expected a non-empty float tensor of shape (B, D) with values in [0, 1]"
    if x.ndim != 2:
        raise DataError(f"{name} has shape {tuple(x.shape)}; {expected}")
    if not x.is_floating_point():
        raise DataError(f"{name} has dtype {x.dtype}; {expected}")
    if x.numel() == 0:
        raise DataError(f"{name} is empty (shape {tuple(x.shape)}); {expected}")
    if not torch.isfinite(x).all():
        raise DataError(f"{name} contains NaN or inf; {expected}")
    if x.min() < 0 or x.max() > 1:
        raise DataError(f"{name} has values in [{x.min().item():.4g}, {x.max().item():.4g}]; "
                        f"{expected}")
