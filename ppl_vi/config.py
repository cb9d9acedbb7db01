"""One configuration dataclass for every model, loadable from JSON, TOML or YAML with overrides.

The registry gives each model its own defaults (``ModelSpec.defaults``); the resolved config is
saved in every run directory as ``config.json`` and reproduces the run with
``ppl-vi train --config RUN_DIR/config.json``.
"""

from __future__ import annotations

import dataclasses
import json
import re
import reprlib
import typing
from pathlib import Path
from typing import List, Optional

import pydantic

from ppl_vi.errors import ConfigError

LOSSES = ("trace", "meanfield", "enum", "stl", "renyi", "iwae", "vimco", "dreg")
NAN_POLICIES = ("stop", "skip")
ACTIVATIONS = ("softplus", "relu", "elu")
SSL_OBJECTIVES = ("cs236", "kingma")  # semi-supervised objectives (ppl_vi.models.ssvae)


@dataclasses.dataclass
class TrainConfig:
    model: str = "vae"  # registry name: ppl-vi list shows them
    loss: str = "trace"  # trace | meanfield | enum | stl | renyi | iwae | vimco | dreg (ppl-vi list)
    k: int = 1  # particles per datapoint (K of IWAE; averaged for the ELBO losses)
    beta: float = 1.0  # weight of the KL term (β-VAE); 1 is the ELBO
    kl_anneal: int = 0  # steps over which β ramps linearly from 0 to `beta` (0: no annealing)
    z_dim: int = 50  # latent dimension
    hidden: List[int] = dataclasses.field(default_factory=lambda: [500, 500])  # hidden layer widths
    activation: str = "softplus"  # softplus | relu | elu: the nonlinearity between hidden layers (VAE, GMVAE; SSVAE's q(z|x,y) and p(x|y,z))
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
    objective: str = "cs236"  # semi-supervised: cs236 (classifier cross-entropy on the labels, no labelled ELBO) | kingma (Kingma et al. 2014's J^alpha)
    alpha: Optional[float] = None  # semi-supervised: weight of the classifier term (null: the objective's own, cs236 100, kingma 0.1 x data size)
    labelled_every: int = 1  # semi-supervised: a labelled batch every k-th step (1: every step; 0: once per epoch)
    labelled_batch_size: int = 0  # semi-supervised: images per labelled batch (0: all labels, at most batch_size)
    baseline_steps: int = 1000  # semi-supervised: Adam steps of the supervised-only baseline classifier (0: none)
    m1: Optional[str] = None  # m1m2: run directory of a trained vae (M1), loaded and frozen (None: trained jointly)
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
        if isinstance(self.hidden, (int, str)) and not isinstance(self.hidden, bool):
            self.hidden = parse_int_list(self.hidden, "hidden")
        if isinstance(self.eval_k, (int, str)) and not isinstance(self.eval_k, bool):
            self.eval_k = parse_int_list(self.eval_k, "eval_k")
        for name, value in typed_values(self).items():
            setattr(self, name, value)  # ints given for floats become floats
        self.validate()

    def validate(self) -> None:
        """Ranges (the types are checked by :func:`typed_values`): one ConfigError naming the field."""
        if self.loss not in LOSSES:
            raise ConfigError(f"unknown loss {self.loss!r}; expected one of: {', '.join(LOSSES)}")
        for name, (low, high) in INT_RANGES.items():
            values = getattr(self, name)
            for value in values if isinstance(values, list) else [values]:
                if not low <= value <= high:  # the limit passed, named
                    bound = f">= {low}" if value < low else f"<= {high}"
                    raise ConfigError(f"{name} must be {bound}{INT_NOTES.get(name, '')}, got {_short(value)}")
        if not self.hidden or len(self.hidden) > MAX_LAYERS:
            raise ConfigError(f"hidden must list 1 to {MAX_LAYERS} layer widths, got {len(self.hidden)}")
        if not self.eval_k or len(self.eval_k) > MAX_EVAL_KS:
            raise ConfigError(f"eval_k must list 1 to {MAX_EVAL_KS} values of k, got {len(self.eval_k)}")
        checks = [  # the float fields are finite already (typed_values)
            (self.beta >= 0, f"beta must be >= 0, got {self.beta}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (0 < self.lr_decay <= 1, f"lr_decay must be in (0, 1] (1: no decay), got {self.lr_decay}"),
            (self.alpha is None or self.alpha >= 0, f"alpha must be >= 0, got {self.alpha}"),
            (self.objective in SSL_OBJECTIVES,
             f"objective must be {' or '.join(SSL_OBJECTIVES)}, got {_short(self.objective)}"),
            (self.max_minutes is None or self.max_minutes > 0,
             f"max_minutes must be > 0 (or null: no budget), got {self.max_minutes}"),
            (self.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", self.device) is not None,
             f"device must be cpu, cuda, cuda:N or auto, got {_short(self.device)}"),
            (self.nan_policy in NAN_POLICIES, f"nan_policy must be stop or skip, got {_short(self.nan_policy)}"),
            (self.activation in ACTIVATIONS,
             f"activation must be {' or '.join(ACTIVATIONS)}, got {_short(self.activation)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}

INT_MAX = 2**31 - 1  # counts and sizes fit a C int: no silent overflow inside torch
MAX_WIDTH = 16384  # hidden widths, z_dim, components: 16384 x 16384 weights are 1 GiB in float32
MAX_LAYERS, MAX_EVAL_KS = 64, 64
#: (lowest, highest) for every integer field (elementwise for the lists)
INT_RANGES = {
    "k": (1, 100_000), "kl_anneal": (0, INT_MAX), "z_dim": (1, MAX_WIDTH), "hidden": (1, MAX_WIDTH),
    "components": (1, MAX_WIDTH), "epochs": (1, INT_MAX), "batch_size": (1, INT_MAX), "seed": (0, 2**32 - 1),
    "val_size": (0, INT_MAX), "train_subset": (0, INT_MAX), "n_train": (1, 10_000_000), "n_test": (1, 10_000_000),
    "labels": (0, INT_MAX), "eval_every": (1, INT_MAX), "eval_k": (1, 1_000_000), "checkpoint_every": (1, INT_MAX),
    "checkpoint_every_steps": (0, INT_MAX), "log_every": (1, INT_MAX), "eval_images": (0, INT_MAX),
    "labelled_every": (0, INT_MAX), "labelled_batch_size": (0, INT_MAX), "baseline_steps": (0, INT_MAX),
}
INT_NOTES = {"seed": " (what numpy and Python's random accept)", "epochs": " (passes over the training set)", "hidden": " per layer",
             "checkpoint_every_steps": " (0: off)", "train_subset": " (0: all)", "eval_images": " (0: all)", "kl_anneal": " (0: no annealing)",
             "labelled_every": " (0: once per epoch)", "labelled_batch_size": " (0: all labels, at most batch_size)",
             "baseline_steps": " (0: no baseline)"}
_STRICT = pydantic.ConfigDict(strict=True, allow_inf_nan=False)
_HINTS = typing.get_type_hints(TrainConfig)
#: one strict pydantic validator per field, from the dataclass's own annotations
_VALIDATORS = {name: pydantic.TypeAdapter(hint, config=_STRICT) for name, hint in _HINTS.items()}


def _short(value) -> str:
    return reprlib.repr(value)  # bounded: a huge list or string is shown by its first items


def _expected(hint) -> str:
    """int -> "an integer", Optional[float] -> "a finite number or null", List[int] -> "a list of integers"."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union:
        return _expected(args[0]) + " or null"
    if typing.get_origin(hint) is list:
        return f"a list of {_expected(args[0]).split(' ', 1)[1]}s (or a comma-separated string)"
    return {int: "an integer", float: "a finite number", str: "a string", bool: "true or false"}.get(hint, str(hint))


def typed_values(config: "TrainConfig") -> dict:
    """Every field of ``config`` checked against its annotation by pydantic in strict mode.

    No coercion: 2.5 or "3" where an int belongs, true where a number belongs, a list where a
    string belongs, and NaN or infinity anywhere are refused with a ConfigError naming the field
    and the type expected. Returns the validated values (ints given for floats become floats).
    """
    out = {}
    for name, validator in _VALIDATORS.items():
        value = getattr(config, name)
        try:
            out[name] = validator.validate_python(value)
        except pydantic.ValidationError as exc:
            index = next((i for i in exc.errors()[0]["loc"] if isinstance(i, int)), None)
            what = type(value).__name__ if index is None else f"item {index} is a {type(value[index]).__name__}"
            raise ConfigError(f"config field {name} must be {_expected(_HINTS[name])}, got {_short(value)} "
                              f"({what})") from None
    return out


def parse_int_list(value, name: str) -> List[int]:
    """"500,500" or 500 or [500, 500] -> [500, 500]."""
    if isinstance(value, int):
        return [value]
    try:
        return [int(v) for v in str(value).replace(" ", "").split(",") if v]
    except ValueError:
        raise ConfigError(f"{name} must be comma-separated integers like 500,500; got {value!r}") from None


MAX_CONFIG_BYTES = 2**20  # a config is a few hundred bytes; this bounds what a hostile file can cost


def _load_yaml(text: str, path: Path):
    """``yaml.safe_load`` that refuses aliases (``*name``): a few hundred bytes of nested aliases expand
    to gigabytes (the "billion laughs"), and no config needs them."""
    try:
        import yaml
    except ImportError:
        raise ConfigError("reading YAML configs needs PyYAML (pip install pyyaml); or use .json/.toml") from None

    class NoAliasLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise ConfigError(f"config file {path} uses the YAML alias *{event.anchor} (line "
                                  f"{event.start_mark.line + 1}); aliases are not accepted: write the value out")
            return super().compose_node(parent, index)

    return yaml.load(text, Loader=NoAliasLoader)  # noqa: S506 - a SafeLoader subclass


def read_config_file(path: str | Path) -> dict:
    """A dict from a .json, .toml or .yaml/.yml file (YAML needs PyYAML; safe loader, no aliases).

    Files over :data:`MAX_CONFIG_BYTES` are refused before parsing.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist or is not a file")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is {path.stat().st_size} bytes; config files are limited to "
                          f"{MAX_CONFIG_BYTES} bytes")
    try:
        text = path.read_bytes()[:MAX_CONFIG_BYTES + 1].decode("utf-8")
        if path.suffix == ".json":
            data = json.loads(text)
        elif path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = _load_yaml(text, path)
        else:
            raise ConfigError(f"config file {path} must end in .json, .toml, .yaml or .yml")
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parse or decoding error becomes one line
        raise ConfigError(f"could not parse config file {path}: {exc}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} holds a {type(data).__name__}; expected a mapping of field names "
                          "to values")
    if "config" in data:  # a run's config.json: {"config": {...}, "environment": {...}}
        if not isinstance(data["config"], dict):
            raise ConfigError(f"config file {path} has a 'config' entry that is a {type(data['config']).__name__}; "
                              "expected a mapping of field names to values")
        return data["config"]
    return data


def build_config(model: Optional[str] = None, file_values: Optional[dict] = None, overrides: Optional[dict] = None
                 ) -> TrainConfig:
    """Defaults <- the model's registry defaults <- a config file <- command-line overrides."""
    from ppl_vi.models.base import get_spec

    file_values = dict(file_values or {})
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    for source in (file_values, overrides):
        unknown = sorted(str(key) for key in set(source) - set(FIELDS))
        if unknown:
            raise ConfigError(f"unknown config key(s) {unknown}; valid keys: {', '.join(FIELDS)}")
    name = overrides.get("model") or model or file_values.get("model")
    if not name:
        raise ConfigError("no model given; name one (ppl-vi list shows them)")
    if not isinstance(name, str):
        raise ConfigError(f"config field model must be a string (a name from ppl-vi list), got {_short(name)}")
    spec = get_spec(name)
    values = {**spec.defaults, **file_values, **overrides, "model": name}
    try:
        return TrainConfig(**values)
    except TypeError as exc:
        raise ConfigError(str(exc)) from None
