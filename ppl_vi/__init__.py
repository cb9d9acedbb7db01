"""ppl_vi: latent-variable models as Pyro model/guide pairs, checked against hand-derived bounds.

``ppl_vi.check_bound(model, guide, bound, batch)`` checks a hand-derived bound in one call (a rich
display in a notebook); ``ppl_vi.testing.assert_bound`` is the same check as an assertion.
"""

__version__ = "0.1.0"

from ppl_vi.check.api import check_bound  # noqa: E402 - after __version__, which submodules may read

__all__ = ["check_bound"]
