"""Training: the TrainState, the Stepper, ``fit``, the Trainer that assembles them, and ``train()``.

Floor 3. ``ppl_vi.training.trainer`` assembles a run; ``state``, ``batches``, ``step``,
``graph_step``, ``loop`` and ``diagnosis`` each hold one part of the work (see the trainer's
docstring); ``workflow.train`` trains a run directory (``ppl_vi.job.train`` adds its figures and
report: what ``ppl-vi train`` calls).
"""

from ppl_vi.training.state import TrainState  # noqa: F401
from ppl_vi.training.step import EagerStep, Stepper, beta_at  # noqa: F401
from ppl_vi.training.trainer import Trainer  # noqa: F401
from ppl_vi.training.workflow import train  # noqa: F401
