"""Training: the Trainer (one run's state) and ``train()`` (a whole run in a run directory).

Floor 3. ``ppl_vi.training.trainer`` assembles a run; ``batches``, ``step``, ``loop``,
``checkpoint`` and ``diagnosis`` each hold one part of the work (see the trainer's docstring);
``workflow.train`` is the entry point of ``ppl-vi train`` and of scripts.
"""

from ppl_vi.training.step import beta_at  # noqa: F401
from ppl_vi.training.trainer import Trainer  # noqa: F401
from ppl_vi.training.workflow import train  # noqa: F401
