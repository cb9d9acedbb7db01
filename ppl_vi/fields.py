"""What each configuration field means, its choices, and which models it applies to.

One source of truth for ``ppl-vi train --help`` and the report's configuration table: the help
text of a field is declared with it in :class:`~ppl_vi.config.TrainConfig` (its ``metadata``),
and :data:`~ppl_vi.config.SCOPE` (with the fields, in config.py) says which models read the
fields that not every model reads (a field not named there applies to every model).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

from ppl_vi.config import ACTIVATIONS, LOSSES, NAN_POLICIES, SSL_OBJECTIVES, TrainConfig
from ppl_vi.config import SCOPE, Scope, applies, refuse_inapplicable  # noqa: F401  (declared with the fields)

#: fields whose values come from a fixed set (shown in --help; the config validates them)
CHOICES: Dict[str, Tuple[str, ...]] = {"loss": LOSSES, "nan_policy": NAN_POLICIES, "activation": ACTIVATIONS,
                                       "objective": SSL_OBJECTIVES,
                                       "device": ("auto", "cpu", "cuda", "cuda:N")}


def help_texts() -> Dict[str, str]:
    """{field: its help text}, as declared with the field in :class:`~ppl_vi.config.TrainConfig`."""
    return {f.name: f.metadata["help"] for f in dataclasses.fields(TrainConfig)}


def _show(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return "none" if value is None else str(value)


def help_text(name: str, model_defaults: Optional[Dict[str, dict]] = None) -> str:
    """``--help`` text of field ``name``: its help text, choices, default (and each model's own), scope.

    ``model_defaults`` maps a model name to its registry defaults; models whose default differs
    from TrainConfig's are listed.
    """
    field = {f.name: f for f in dataclasses.fields(TrainConfig)}[name]
    default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
    text = field.metadata["help"]
    if name in CHOICES and "|" not in text:
        text += f" ({' | '.join(CHOICES[name])})"
    shown = f"default: {_show(default)}"
    own = {m: d[name] for m, d in sorted((model_defaults or {}).items()) if name in d and d[name] != default}
    if own:
        shown += "; " + ", ".join(f"{m}: {_show(v)}" for m, v in own.items())
    scope = f" [applies to: {SCOPE[name].label}]" if name in SCOPE else ""
    return f"{text} ({shown}){scope}".replace("%", "%%")  # argparse formats help with %
