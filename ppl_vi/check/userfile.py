"""``ppl-vi check FILE.py``: a user's own model, guide and hand-derived bound, loaded from a plain file.

The file defines, at module level (no class, no registry entry needed)::

    model(**batch), guide(**batch)      the Pyro pair; the datapoints in pyro.plate("data", B) (or the plate
                                        named by data_plate)
    bound(batch, draws)                 the NEGATIVE ELBO, written by hand, K particles averaged, scaled as Pyro
                                        scales it: per datapoint (B,); with global latents the batch total ()
                                        or (B,) values, summed; or a dict of named terms, each (B,) or ()
    batch                               a dict of tensors, or a function returning one
    iwae_bound(batch, draws)            optional: the negative IWAE_K bound, (B,) (() with global latents)
    params                              optional: the tensors whose gradients to compare (default: every leaf
                                        tensor that requires grad and reaches the loss, the file's nn.Module
                                        parameters, Pyro's param store)
    exact_log_likelihood(batch)         optional: log p(x), (B,) (with global latents the total, ()); adds the
                                        ground-truth rows
    loss / losses                       optional: Pyro loss object(s) to hold the bound against instead of the one
                                        chosen (TraceEnum_ELBO where the model enumerates, TraceMeanField_ELBO
                                        where the bound uses closed-form KLs, else Trace_ELBO; IWAELoss for
                                        iwae_bound)
    max_plate_nesting                   optional (default: read off the traces)
    data_plate                          optional: the data plate's name (default "data")

``draws`` maps each latent site to its K particles, (K,) + the site's shape (a local z: (K, B, ...); a
global weight of shape (3,): (K, 3)). See :mod:`ppl_vi.check.usercheck` for the convention in full.
``FILE.py:NAME`` picks ``NAME`` from the file instead: a ``LatentModel`` subclass (checked as
``ppl-vi check MODEL``), a dict or object whose entries replace the module-level ones, or a function
(then the ``bound``).

Every unusable file is a ConfigError (one line naming file, line and cause; exit 2); a failing check
exits 1 with, under the table, one verdict per likely mistake (:mod:`ppl_vi.check.diagnose`).
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
import types
from pathlib import Path
from typing import List, Optional, Tuple

from ppl_vi.check.preflight import user_error
from ppl_vi.check.rows import CheckReport
from ppl_vi.check.usercheck import _grads_agree, UserPair, check_pair, make_pair  # noqa: F401 - re-exported
from ppl_vi.errors import ConfigError
from ppl_vi.models.base import LatentModel

FIELDS = ("model", "guide", "bound", "iwae_bound", "batch", "params", "exact_log_likelihood", "loss", "losses",
          "max_plate_nesting", "data_plate")
REQUIRED = {"model": "model(**batch), the Pyro model", "guide": "guide(**batch), the Pyro guide",
            "bound": "bound(batch, draws), the negative bound written by hand",
            "batch": "batch, a dict of tensors (or a function returning one)"}


# ------------------------------------------------------------------------------------------------
# loading


def split_target(target: str) -> Tuple[Path, Optional[str]]:
    """``FILE.py`` or ``FILE.py:NAME`` -> (path, NAME)."""
    path, _, name = target.partition(".py:")
    path = Path(path + ".py") if name else Path(target)
    return path, (name or None)


def import_file(path: Path) -> types.ModuleType:
    """Import a user's file as a module (its directory first on sys.path, for its own imports)."""
    if path.suffix != ".py":
        raise ConfigError(f"{path}: expected a Python file (FILE.py or FILE.py:NAME)")
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    name = f"ppl_vi_user_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    sys.path.insert(0, str(path.resolve().parent))
    try:
        spec.loader.exec_module(module)
    except SystemExit as exc:
        raise ConfigError(f"{path}: importing it called sys.exit({exc.code}); guard its script part with "
                          "if __name__ == '__main__'") from None
    except Exception as exc:  # noqa: BLE001 - the user's code: one line, exit 2
        raise user_error(str(path), [str(path)], "importing it", exc) from None
    finally:
        sys.path.remove(str(path.resolve().parent))
    return module


def latent_model_classes(module: types.ModuleType) -> List[type]:
    """The LatentModel subclasses a file defines itself."""
    return [v for v in vars(module).values() if inspect.isclass(v) and issubclass(v, LatentModel)
            and v is not LatentModel and v.__module__ == module.__name__]


def load_target(target: str):
    """A :class:`UserPair`, or a LatentModel subclass to check as a built-in model."""
    path, name = split_target(target)
    module = import_file(path)
    entries = {f: getattr(module, f) for f in FIELDS if hasattr(module, f)}
    if name is not None:
        if not hasattr(module, name):
            found = sorted(n for n, v in vars(module).items() if not n.startswith("_") and not inspect.ismodule(v))
            raise ConfigError(f"{path} defines no {name!r}; it defines: {', '.join(found[:20])}")
        chosen = getattr(module, name)
        if inspect.isclass(chosen) and issubclass(chosen, LatentModel):
            return chosen
        if isinstance(chosen, dict):
            entries.update({k: v for k, v in chosen.items() if k in FIELDS})
        elif inspect.isfunction(chosen):
            entries["bound"] = chosen
        elif any(hasattr(chosen, k) for k in FIELDS) and not isinstance(chosen, (int, float, str, bytes)):
            entries.update({k: getattr(chosen, k) for k in FIELDS if hasattr(chosen, k)})
        else:
            raise ConfigError(f"{path}:{name} is {type(chosen).__name__} {str(chosen)[:40]!r}; FILE.py:NAME takes a "
                              "dict of replacements (e.g. {'bound': my_slipped_bound}), a function (the bound), an "
                              "object with such attributes, or a LatentModel subclass")
    missing = [f for f in REQUIRED if f not in entries]
    if missing and name is None:
        classes = latent_model_classes(module)
        if len(classes) == 1 and not ({"model", "guide", "bound"} & set(entries)):
            return classes[0]
    if missing:
        raise ConfigError(f"{path}{':' + name if name else ''} is missing {', '.join(REQUIRED[m] for m in missing)}"
                          " (define them at module level; see `ppl-vi check --help`)")
    return make_pair(str(path) + (f":{name}" if name else ""), entries, module, files=[str(path)])


def check_target(target: str, **kwargs) -> CheckReport:
    """:func:`check_pair` for ``FILE.py`` or ``FILE.py:NAME`` (a LatentModel subclass: ConfigError, the
    CLI checks those as built-in models)."""
    loaded = load_target(target)
    if inspect.isclass(loaded):
        raise ConfigError(f"{target} names the LatentModel {loaded.__name__}; check it with ppl-vi check")
    return check_pair(loaded, **kwargs)


__all__ = ["UserPair", "check_pair", "check_target", "load_target", "make_pair", "split_target"]
