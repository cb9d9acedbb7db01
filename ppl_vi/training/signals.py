"""SIGTERM during training (a scheduler's preemption, ``kill``, ``docker stop``): stop, losing nothing.

While the epochs run (:func:`ppl_vi.training.loop.fit`), SIGTERM only sets
the trainer's stop request (``trainer.request_stop``). The loop then finishes the current step (or the epoch's end:
validation, record, checkpoints), reads the losses back (the NaN check), writes
``checkpoints/last.pt`` where the run stands (mid-epoch or at the epoch's end: an exact resume
point) and raises :class:`~ppl_vi.errors.Terminated`. Anywhere else (data loading, final metrics,
figures, report), and on a second SIGTERM, Terminated is raised at once: every file is written
atomically, so the last checkpoint is intact. Under torchrun the ranks could stop at different
steps (and wait on each other's all-reduce), so there Terminated is always raised at once.
``ppl-vi`` turns Terminated into one line on stderr and exit status 143 (128 + SIGTERM).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

from ppl_vi.errors import Terminated
from ppl_vi.training import diagnosis


@contextlib.contextmanager
def stop_on_sigterm(trainer) -> Iterator[None]:
    """Route SIGTERM to ``trainer`` for the block (main thread only; the old handler comes back after)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if trainer.in_fit and not trainer.stop_requested() and not trainer.dist.enabled:
            trainer.request_stop()  # the loop checkpoints after this step, then raises
            return
        raise Terminated(f"terminated by SIGTERM; {diagnosis.kept(trainer.run_dir, trainer.state.last_saved)}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
