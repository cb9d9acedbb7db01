"""The consistency checker: hand-derived bounds against Pyro's losses against the truth.

* :mod:`~ppl_vi.check.core`: :func:`check` for any model/guide pair and hand bound (same sample,
  datapoint by datapoint, statistical, expected gradient);
* :mod:`~ppl_vi.check.gradients` and :mod:`~ppl_vi.check.reference`: expected gradients against
  the objective computed exactly over discrete sites;
* :mod:`~ppl_vi.check.truth`: exact log p(x), the posterior gap, the IWAE ladder;
* :mod:`~ppl_vi.check.suite`: :func:`check_model`, every loss a built-in model trains with;
* :mod:`~ppl_vi.check.userfile`: ``ppl-vi check FILE.py``, a user's own model/guide/bound, loaded;
  :mod:`~ppl_vi.check.usercheck`: :func:`check_bound` / :func:`check_pair` check it (after
  :mod:`~ppl_vi.check.preflight`: does it run, its data plate, vectorised particles or not), with
  :mod:`~ppl_vi.check.terms` (Pyro's estimate per site and datapoint),
  :mod:`~ppl_vi.check.diagnose` (the likely mistake, named) and :mod:`~ppl_vi.check.formula` (the
  objective written out with the user's site names);
* :mod:`~ppl_vi.check.api`: :func:`check_bound`, the user-file check as one call (a notebook, a
  test suite: :func:`ppl_vi.testing.assert_bound`).
"""

from ppl_vi.check.core import (Comparison, check, expected_gradient_check, loss_value, pyro_loss_and_grads,  # noqa: F401
                               pyro_per_datapoint, recording, same_sample_rows, statistical_row, structure_row)
from ppl_vi.check.gradients import GradientStats, expected_gradient_rows, gradient_stats, z_limit  # noqa: F401
from ppl_vi.check.reference import reference_loss, reference_objective  # noqa: F401
from ppl_vi.check.rows import CheckReport, Row, close_row, failure_row, rel_diff  # noqa: F401
from ppl_vi.check.suite import check_model, loss_comparisons, standard_comparisons  # noqa: F401
from ppl_vi.check.truth import ground_truth_rows, iwae_ladder_rows  # noqa: F401
from ppl_vi.check.diagnose import diagnose  # noqa: F401
from ppl_vi.check.formula import bound_formula  # noqa: F401
from ppl_vi.check.terms import SiteTerms, site_terms  # noqa: F401
from ppl_vi.check.usercheck import UserPair, check_pair, make_pair  # noqa: F401
from ppl_vi.check.userfile import load_target  # noqa: F401
from ppl_vi.check.api import check_bound  # noqa: F401
