"""User-facing errors.

Every mistake a user can make (bad data, bad flags, a foreign checkpoint) raises a subclass of
:class:`PplViError` whose message is one line saying what was wrong and what is expected. The CLI
prints that line and exits non-zero, with no traceback unless ``--debug`` is given.
"""


class PplViError(Exception):
    """Base class: a one-line, user-facing message."""


class DataError(PplViError, ValueError):
    """Data of the wrong shape, dtype, range or location."""


class ConfigError(PplViError, ValueError):
    """A configuration value or flag that cannot be used."""


class CheckpointError(PplViError):
    """A checkpoint that is missing, truncated, foreign or unsafe."""


class TrainingDiverged(PplViError):
    """A NaN or inf appeared during training."""


class RunDirError(PplViError):
    """A run directory that cannot be written (disk full, read-only, locked by another process, a link)."""


class Terminated(BaseException):
    """SIGTERM arrived: like KeyboardInterrupt, not an Exception, so no ``except Exception`` swallows it."""
