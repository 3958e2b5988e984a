"""kronjax: Kronecker-structured Gaussians for NumPyro.

``KroneckerNormal`` is a NumPyro distribution for ``N(loc, K_1 ⊗ … ⊗ K_d + σ² I)`` whose
log density, gradient and samples cost ``O(Σ n_i³ + N Σ n_i)``; ``linalg`` holds the
structured operations under it.
"""

from kronjax import linalg
from kronjax.distribution import KroneckerNormal

__all__ = ["KroneckerNormal", "linalg"]
__version__ = "0.1.0"
