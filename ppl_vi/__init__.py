"""ppl_vi: latent-variable models as Pyro model/guide pairs, checked against hand-derived bounds.

``ppl_vi.check_bound(model, guide, bound, batch)`` checks a hand-derived bound in one call (a rich
display in a notebook); ``ppl_vi.testing.assert_bound`` is the same check as an assertion.
"""

__version__ = "0.1.0"
__all__ = ["check_bound"]


def __getattr__(name: str):
    """``ppl_vi.check_bound``, imported on first use (PEP 562): importing a light module such as
    ``ppl_vi.errors`` does not load the checker (torch, Pyro, matplotlib)."""
    if name == "check_bound":
        from ppl_vi.check.api import check_bound

        return check_bound
    raise AttributeError(f"module 'ppl_vi' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
