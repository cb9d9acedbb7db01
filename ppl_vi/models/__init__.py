"""Built-in models. Importing this package registers them (see :mod:`ppl_vi.models.base`)."""

from ppl_vi.models.base import REGISTRY, LatentModel, get_spec, register  # noqa: F401
from ppl_vi.models.gmm import GMM  # noqa: F401
from ppl_vi.models.linear_gaussian import LinearGaussian  # noqa: F401
from ppl_vi.models.vae import VAE  # noqa: F401
from ppl_vi.models.gmvae import GMVAE  # noqa: F401
from ppl_vi.models.ssvae import SSVAE  # noqa: F401
from ppl_vi.models.cvae import CVAE, CVAECompletion  # noqa: F401
from ppl_vi.models.m1m2 import M1M2  # noqa: F401
