"""One configuration dataclass for every model, loadable from JSON, TOML or YAML with overrides.

Each field is declared once, with its default and help text (:class:`TrainConfig`); :data:`SCOPE`
says which models read the fields not every model reads. :func:`resolve` merges every source
(defaults, the model's registry defaults, a job profile, a file, flags) and validates them once;
the caller passes the registry (``ppl_vi.models.configure.build_config`` does), so nothing here
knows a model. A time budget yields a :class:`Schedule`; the config itself is frozen. The resolved
config is saved in every run directory as ``config.json`` and reproduces the run with
``ppl-vi train --config RUN_DIR/config.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import reprlib
import typing
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import pydantic

from ppl_vi import loss_registry
from ppl_vi.errors import ConfigError

LOSSES = loss_registry.NAMES
NAN_POLICIES = ("stop", "skip")
ACTIVATIONS = ("softplus", "relu", "elu")
SSL_OBJECTIVES = ("cs236", "kingma")  # semi-supervised objectives (ppl_vi.models.ssvae)


def _field(default=None, help: str = "", factory=None):
    """A config field: its default (or ``factory`` for a list) and its help text, the one source of
    ``ppl-vi train --help`` (:func:`ppl_vi.fields.help_text`) and of the report's configuration table."""
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One run's settings: every field's default and help text is declared here; :func:`resolve` merges
    the sources and validates them once. Frozen: a run's plan changes through a
    :class:`Schedule`, never by assigning to its config."""

    model: str = _field("vae", "registry name: ppl-vi list shows them")
    loss: str = _field("trace", "the objective to train with (ppl-vi list describes each)")
    k: int = _field(1, "particles per datapoint (K of IWAE; averaged for the ELBO losses)")
    beta: float = _field(1.0, "weight of the KL term (β-VAE); 1 is the ELBO")
    kl_anneal: int = _field(0, "steps over which β ramps linearly from 0 to `beta` (0: no annealing)")
    z_dim: int = _field(50, "latent dimension")
    hidden: List[int] = _field(help="hidden layer widths", factory=lambda: [500, 500])
    activation: str = _field("softplus", "softplus | relu | elu: the nonlinearity between hidden layers (VAE, GMVAE; "
                             "SSVAE's q(z|x,y) and p(x|y,z))")
    components: int = _field(3, "mixture components (GMM, GMVAE prior)")
    guide: Optional[str] = _field(
        None, "model-specific guide (gmm: amortised|posterior|prior|marginal; linear-gaussian: amortised|exact)")
    epochs: int = _field(10, "passes over the training set")
    batch_size: int = _field(128, "datapoints per SVI step")
    lr: float = _field(1e-3, "Adam learning rate")
    lr_decay: float = _field(1.0, "learning rate multiplied by this at the end of every epoch")
    device: str = _field("auto", "cpu | cuda | auto (cuda when available)")
    seed: int = _field(0, "seeds torch, Python and the data order")
    data_dir: Optional[str] = _field(None, "MNIST root (holds MNIST/raw); else $PPL_VI_DATA, else download")
    val_size: int = _field(5000, "MNIST: training images held out for validation (0: train on all 60k)")
    train_subset: int = _field(0, "MNIST: train on only the first N training images after the split (0: all)")
    n_train: int = _field(5000, "synthetic data sets: training points")
    n_test: int = _field(2000, "synthetic data sets: test points")
    labels: int = _field(100, "semi-supervised: labelled training images, class-balanced")
    objective: str = _field("cs236", "semi-supervised: cs236 (classifier cross-entropy on the labels, no labelled "
                            "ELBO) | kingma (Kingma et al. 2014's J^alpha)")
    alpha: Optional[float] = _field(None, "semi-supervised: weight of the classifier term (none: the objective's own, "
                                    "cs236 100, kingma 0.1 x data size)")
    labelled_every: int = _field(
        1, "semi-supervised: a labelled batch every k-th step (1: every step; 0: once per epoch)")
    labelled_batch_size: int = _field(
        0, "semi-supervised: images per labelled batch (0: all labels, at most batch_size)")
    baseline_steps: int = _field(
        1000, "semi-supervised: Adam steps of the supervised-only baseline classifier (0: none)")
    m1: Optional[str] = _field(
        None, "m1m2: run directory of a trained vae (M1), loaded and frozen (None: trained jointly)")
    eval_every: int = _field(1, "epochs between validation passes")
    eval_k: List[int] = _field(help="IWAE ks at eval", factory=lambda: [1, 10, 100, 1000, 5000])
    eval_images: int = _field(0, "test images IWAE-k is computed on at eval (0: all); the NELBO always uses all")
    checkpoint_every: int = _field(1, "epochs between checkpoints")
    checkpoint_every_steps: int = _field(0, "also checkpoint every N steps, mid-epoch (0: off); resumes exactly")
    log_every: int = _field(50, "steps between loss read-backs (each is a host sync)")
    max_minutes: Optional[float] = _field(
        None, "training-time budget (resumes included); stops after the epoch that passes it")
    nan_policy: str = _field("stop", "stop | skip: what a NaN/inf loss does")
    fast: bool = _field(True, "compiled / graph-captured step where possible (falls back to eager)")
    tensorboard: bool = _field(
        False, "also log scalars (losses, β, lr) to RUN_DIR/tensorboard (needs `pip install tensorboard`)")

    def __post_init__(self):
        # frozen: the dataclass's own initialisation is the one place a field is set
        if isinstance(self.hidden, (int, str)) and not isinstance(self.hidden, bool):
            object.__setattr__(self, "hidden", parse_int_list(self.hidden, "hidden"))
        if isinstance(self.eval_k, (int, str)) and not isinstance(self.eval_k, bool):
            object.__setattr__(self, "eval_k", parse_int_list(self.eval_k, "eval_k"))
        for name, value in typed_values(self).items():
            object.__setattr__(self, name, value)  # ints given for floats become floats
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


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How long a run trains and how its learning rate falls: ``epochs`` epochs, the learning rate
    ``lr`` × ``lr_decay``^epoch (Adam's rate during epoch e + 1, e = 0, 1, ...).

    A config gives one (:meth:`of`); a time budget gives another once the first epoch has been timed
    (:meth:`fitting`). The config itself never changes.
    """

    epochs: int
    lr: float
    lr_decay: float

    @classmethod
    def of(cls, config: "TrainConfig") -> "Schedule":
        return cls(config.epochs, config.lr, config.lr_decay)

    @classmethod
    def fitting(cls, config: "TrainConfig", budget_seconds: float, epoch_seconds: float, max_epochs: int,
                lr_final: Optional[float] = None) -> "Schedule":
        """The epochs that fit ``budget_seconds`` at ``epoch_seconds`` each (1 to ``max_epochs``), with the
        learning rate decayed geometrically from ``config.lr`` at the first epoch to ``lr_final`` at the
        last: lr_decay = (lr_final / lr)^(1 / (epochs - 1)) (1: no ``lr_final``, or a single epoch)."""
        epochs = int(max(1, min(max_epochs, math.floor(budget_seconds / epoch_seconds))))
        final = lr_final or config.lr
        decay = (final / config.lr) ** (1 / (epochs - 1)) if epochs > 1 else 1.0
        return cls(epochs, config.lr, decay)

    def applied_to(self, config: "TrainConfig") -> "TrainConfig":
        """``config`` as a run with this schedule would have been configured (what config.json records)."""
        return dataclasses.replace(config, epochs=self.epochs, lr=self.lr, lr_decay=self.lr_decay)

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


@dataclasses.dataclass(frozen=True)
class Scope:
    """The models a field applies to: by data kind (prefix match) or by model name."""

    label: str  # said in --help: "(MNIST models)"
    data: Tuple[str, ...] = ()  # data kinds, prefix-matched: "mnist" covers "mnist-labelled", ...
    models: Tuple[str, ...] = ()  # model names
    all_but: Tuple[str, ...] = ()  # every model except these

    def covers(self, model: str, data_kind: str) -> bool:
        if self.all_but:
            return model not in self.all_but
        return model in self.models or any(data_kind.startswith(d) for d in self.data)


_MNIST = Scope("MNIST models", data=("mnist",))
_SYNTHETIC = Scope("gmm, linear-gaussian", data=("gmm", "linear-gaussian"))
_SEMI = Scope("ssvae, m1m2", data=("mnist-semisupervised",))

#: fields that only some models read; every other field applies to every model
SCOPE: Dict[str, Scope] = {
    "z_dim": Scope("every model but gmm", all_but=("gmm",)),
    "hidden": Scope("every model but linear-gaussian", all_but=("linear-gaussian",)),
    "components": Scope("gmm, gmvae", models=("gmm", "gmvae")),
    "activation": Scope("vae, gmvae, ssvae", models=("vae", "gmvae", "ssvae")),
    "guide": Scope("gmm, linear-gaussian", models=("gmm", "linear-gaussian")),
    "data_dir": _MNIST, "val_size": _MNIST, "train_subset": _MNIST,
    "n_train": _SYNTHETIC, "n_test": _SYNTHETIC,
    "labels": _SEMI, "alpha": _SEMI, "objective": _SEMI, "labelled_every": _SEMI, "labelled_batch_size": _SEMI, "baseline_steps": _SEMI,
    "m1": Scope("m1m2", models=("m1m2",)),
}


def applies(name: str, model: str, data_kind: str) -> bool:
    """Does field ``name`` matter to ``model`` (trained on ``data_kind``)?"""
    scope = SCOPE.get(name)
    return scope is None or scope.covers(model, data_kind)


def refuse_inapplicable(given, model: str, data_kind: str) -> None:
    """A one-line ConfigError for the first field in ``given`` (flags set on the command line) that
    ``model`` does not read: a flag that would do nothing is refused, not ignored."""
    for name in given:
        if not applies(name, model, data_kind):
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag} does not apply to {model} (it applies to: {SCOPE[name].label}); drop it")


def resolve(models: Mapping[str, Any], model: Optional[str] = None, *, file_values: Optional[dict] = None,
            flags: Optional[dict] = None, profile: Optional[dict] = None, strict: bool = False,
            check: Optional[Callable[[TrainConfig, Any], None]] = None) -> TrainConfig:
    """The one resolution of a run's config: TrainConfig's defaults <- the model's registry defaults <-
    a job ``profile`` <- a config file (``file_values``) <- ``flags`` (None values dropped), validated once.

    ``models`` maps each model name to its registry entry (its ``defaults`` and ``data`` kind): the
    caller passes the registry, so the config knows no model. Unknown keys, an unknown or non-string
    model name, and every field's type and range are refused with one ConfigError. ``strict`` (the
    command line) also refuses flags the model does not read (:data:`SCOPE`), and ``check(config,
    entry)`` a model x loss combination that cannot train. The result is frozen.
    """
    file_values, profile = dict(file_values or {}), dict(profile or {})
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    for source in (profile, file_values, flags):
        unknown = sorted(str(key) for key in set(source) - set(FIELDS))
        if unknown:
            raise ConfigError(f"unknown config key(s) {unknown}; valid keys: {', '.join(FIELDS)}")
    name = flags.get("model") or model or file_values.get("model") or profile.get("model")
    if not name:
        raise ConfigError("no model given; name one (ppl-vi list shows them)")
    if not isinstance(name, str):
        raise ConfigError(f"config field model must be a string (a name from ppl-vi list), got {_short(name)}")
    if name not in models:
        raise ConfigError(f"unknown model {name!r}; expected one of: {', '.join(sorted(models))}")
    entry = models[name]
    try:
        config = TrainConfig(**{**entry.defaults, **profile, **file_values, **flags, "model": name})
    except TypeError as exc:
        raise ConfigError(str(exc)) from None
    if strict:
        refuse_inapplicable([k for k in flags if k != "model"], name, entry.data)
    if check is not None:
        check(config, entry)
    return config
