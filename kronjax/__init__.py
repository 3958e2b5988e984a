"""kronjax: Kronecker-structured Gaussians for NumPyro.

``KroneckerNormal`` is a NumPyro distribution for ``N(loc, K_1 ⊗ … ⊗ K_d + σ² I)`` whose
log density, gradient and samples cost ``O(Σ n_i³ + N Σ n_i)``; ``linalg`` holds the
structured operations under it, ``gp`` GP prediction on grids and at points, and
``KroneckerReparam`` the whitened form of a latent site for NUTS.
"""

from kronjax import gp, linalg
from kronjax.distribution import KroneckerNormal
from kronjax.reparam import KroneckerReparam

__all__ = ["KroneckerNormal", "KroneckerReparam", "gp", "linalg"]
__version__ = "0.1.0"
