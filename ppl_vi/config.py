"""One configuration dataclass for every model, loadable from JSON, TOML or YAML with overrides.

The registry gives each model its own defaults (``ModelSpec.defaults``); the resolved config is
saved in every run directory as ``config.json`` and reproduces the run with
``ppl-vi train --config RUN_DIR/config.json``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import List, Optional

from ppl_vi.errors import ConfigError

LOSSES = ("trace", "meanfield", "enum", "stl", "renyi", "iwae", "vimco", "dreg")
NAN_POLICIES = ("stop", "skip")


@dataclasses.dataclass
class TrainConfig:
    model: str = "vae"  # registry name: ppl-vi list shows them
    loss: str = "trace"  # trace | meanfield | enum | stl | renyi | iwae | vimco | dreg (ppl-vi list)
    k: int = 1  # particles per datapoint (K of IWAE; averaged for the ELBO losses)
    beta: float = 1.0  # weight of the KL term (β-VAE); 1 is the ELBO
    kl_anneal: int = 0  # steps over which β ramps linearly from 0 to `beta` (0: no annealing)
    z_dim: int = 50  # latent dimension
    hidden: List[int] = dataclasses.field(default_factory=lambda: [500, 500])  # hidden layer widths
    components: int = 3  # mixture components (GMM, GMVAE prior)
    guide: Optional[str] = None  # model-specific guide (gmm: amortised|posterior|prior|marginal; linear-gaussian: amortised|exact)
    epochs: int = 10  # passes over the training set
    batch_size: int = 128  # datapoints per SVI step
    lr: float = 1e-3  # Adam learning rate
    lr_decay: float = 1.0  # learning rate multiplied by this at the end of every epoch
    device: str = "auto"  # cpu | cuda | auto (cuda when available)
    seed: int = 0  # seeds torch, Python and the data order
    data_dir: Optional[str] = None  # MNIST root (holds MNIST/raw); else $PPL_VI_DATA, else download
    val_size: int = 5000  # MNIST: training images held out for validation (0: train on all 60k)
    train_subset: int = 0  # MNIST: train on only the first N training images after the split (0: all)
    n_train: int = 5000  # synthetic data sets: training points
    n_test: int = 2000  # synthetic data sets: test points
    labels: int = 100  # semi-supervised: labelled training images, class-balanced
    alpha: float = 0.1  # semi-supervised: weight of the classifier term, times the data size
    eval_every: int = 1  # epochs between validation passes
    eval_k: List[int] = dataclasses.field(default_factory=lambda: [1, 10, 100, 1000, 5000])  # IWAE ks at eval
    eval_images: int = 0  # test images IWAE-k is computed on at eval (0: all); the NELBO always uses all
    checkpoint_every: int = 1  # epochs between checkpoints
    checkpoint_every_steps: int = 0  # also checkpoint every N steps, mid-epoch (0: off); resumes exactly
    log_every: int = 50  # steps between loss read-backs (each is a host sync)
    max_minutes: Optional[float] = None  # training-time budget (resumes included); stops after the epoch that passes it
    nan_policy: str = "stop"  # stop | skip: what a NaN/inf loss does
    fast: bool = True  # compiled / graph-captured step where possible (falls back to eager)
    tensorboard: bool = False  # also log scalars (losses, β, lr) to RUN_DIR/tensorboard (needs `pip install tensorboard`)

    def __post_init__(self):
        if isinstance(self.hidden, (int, str)):
            self.hidden = parse_int_list(self.hidden, "hidden")
        if isinstance(self.eval_k, (int, str)):
            self.eval_k = parse_int_list(self.eval_k, "eval_k")
        self.validate()

    def validate(self) -> None:
        if self.loss not in LOSSES:
            raise ConfigError(f"unknown loss {self.loss!r}; expected one of: {', '.join(LOSSES)}")
        checks = [
            (self.k >= 1, f"k (particles) must be >= 1, got {self.k}"),
            (0 <= self.beta < float("inf"), f"beta must be >= 0 and finite, got {self.beta}"),
            (self.kl_anneal >= 0, f"kl_anneal must be >= 0 steps, got {self.kl_anneal}"),
            (self.z_dim >= 1, f"z_dim must be >= 1, got {self.z_dim}"),
            (all(h >= 1 for h in self.hidden) and len(self.hidden) >= 1, f"hidden must be positive widths, got {self.hidden}"),
            (self.components >= 1, f"components must be >= 1, got {self.components}"),
            (self.epochs >= 1, f"epochs must be >= 1 (passes over the training set), got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (0 < self.lr < float("inf"), f"lr must be > 0 and finite, got {self.lr}"),
            (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
             f"device must be cpu, cuda or auto, got {self.device!r}"),
            (all(k >= 1 for k in self.eval_k), f"eval_k values must be >= 1, got {self.eval_k}"),
            (self.n_train >= 1 and self.n_test >= 1, "n_train and n_test must be >= 1"),
            (self.val_size >= 0, f"val_size must be >= 0, got {self.val_size}"),
            (self.eval_images >= 0, f"eval_images must be >= 0 (0: all), got {self.eval_images}"),
            (self.train_subset >= 0, f"train_subset must be >= 0 (0: all), got {self.train_subset}"),
            (self.labels >= 0, f"labels must be >= 0, got {self.labels}"),
            (self.eval_every >= 1 and self.checkpoint_every >= 1 and self.log_every >= 1,
             "eval_every, checkpoint_every and log_every must be >= 1"),
            (self.checkpoint_every_steps >= 0, f"checkpoint_every_steps must be >= 0 (0: off), got {self.checkpoint_every_steps}"),
            (self.nan_policy in NAN_POLICIES, f"nan_policy must be stop or skip, got {self.nan_policy!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def parse_int_list(value, name: str) -> List[int]:
    """"500,500" or 500 or [500, 500] -> [500, 500]."""
    if isinstance(value, int):
        return [value]
    try:
        return [int(v) for v in str(value).replace(" ", "").split(",") if v]
    except ValueError:
        raise ConfigError(f"{name} must be comma-separated integers like 500,500; got {value!r}") from None


def read_config_file(path: str | Path) -> dict:
    """A dict from a .json, .toml or .yaml/.yml file (YAML needs PyYAML; safe loader only)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        elif path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ConfigError("reading YAML configs needs PyYAML (pip install pyyaml); or use .json/.toml") from None
            data = yaml.safe_load(text)
        else:
            raise ConfigError(f"config file {path} must end in .json, .toml, .yaml or .yml")
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parse error becomes one line
        raise ConfigError(f"could not parse config file {path}: {exc}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of field names to values")
    return data.get("config", data) if isinstance(data.get("config"), dict) else data


def build_config(model: Optional[str] = None, file_values: Optional[dict] = None, overrides: Optional[dict] = None
                 ) -> TrainConfig:
    """Defaults <- the model's registry defaults <- a config file <- command-line overrides."""
    from ppl_vi.models.base import get_spec

    file_values = dict(file_values or {})
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    for source in (file_values, overrides):
        unknown = sorted(set(source) - set(FIELDS))
        if unknown:
            raise ConfigError(f"unknown config key(s) {unknown}; valid keys: {', '.join(FIELDS)}")
    name = overrides.get("model") or model or file_values.get("model")
    if not name:
        raise ConfigError("no model given; name one (ppl-vi list shows them)")
    spec = get_spec(name)
    values = {**spec.defaults, **file_values, **overrides, "model": name}
    try:
        return TrainConfig(**values)
    except TypeError as exc:
        raise ConfigError(str(exc)) from None
