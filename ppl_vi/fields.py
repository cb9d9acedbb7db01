"""What each configuration field means, its choices, and which models it applies to.

One source of truth for ``ppl-vi train --help`` and the report's configuration table: the help
text of a field is the comment beside it in :class:`~ppl_vi.config.TrainConfig` (read from the
source with :mod:`tokenize`), and :data:`SCOPE` says which models read the fields that not every
model reads (a field not named there applies to every model).
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import tokenize
from functools import lru_cache
from typing import Dict, Optional, Tuple

from ppl_vi.config import ACTIVATIONS, LOSSES, NAN_POLICIES, SSL_OBJECTIVES, TrainConfig
from ppl_vi.errors import ConfigError

#: fields whose values come from a fixed set (shown in --help; the config validates them)
CHOICES: Dict[str, Tuple[str, ...]] = {"loss": LOSSES, "nan_policy": NAN_POLICIES, "activation": ACTIVATIONS,
                                       "objective": SSL_OBJECTIVES,
                                       "device": ("auto", "cpu", "cuda", "cuda:N")}


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


@lru_cache(maxsize=None)
def comments() -> Dict[str, str]:
    """{field: the comment beside it} in TrainConfig's source."""
    source = inspect.getsource(TrainConfig)
    found: Dict[str, str] = {}
    name: Optional[str] = None
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.NL or token.type == tokenize.NEWLINE:
            name = None
        elif token.type == tokenize.NAME and name is None and token.start[1] == 4 and token.string in _FIELD_NAMES:
            name = token.string
        elif token.type == tokenize.COMMENT and name is not None and name not in found:
            found[name] = token.string.lstrip("#").strip()
    return found


_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(TrainConfig))


def _show(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return "none" if value is None else str(value)


def help_text(name: str, model_defaults: Optional[Dict[str, dict]] = None) -> str:
    """``--help`` text of field ``name``: its comment, choices, default (and each model's own), scope.

    ``model_defaults`` maps a model name to its registry defaults; models whose default differs
    from TrainConfig's are listed.
    """
    field = {f.name: f for f in dataclasses.fields(TrainConfig)}[name]
    default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
    text = comments().get(name, "")
    if name in CHOICES and "|" not in text:
        text += f" ({' | '.join(CHOICES[name])})"
    shown = f"default: {_show(default)}"
    own = {m: d[name] for m, d in sorted((model_defaults or {}).items()) if name in d and d[name] != default}
    if own:
        shown += "; " + ", ".join(f"{m}: {_show(v)}" for m, v in own.items())
    scope = f" [applies to: {SCOPE[name].label}]" if name in SCOPE else ""
    return f"{text} ({shown}){scope}".replace("%", "%%")  # argparse formats help with %
