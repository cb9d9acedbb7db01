"""ppl_vi: latent-variable models as Pyro model/guide pairs, checked against hand-derived bounds."""

__version__ = "0.1.0"
