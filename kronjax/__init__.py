"""kronjax: Kronecker-structured Gaussians for NumPyro.

``KroneckerNormal`` is a NumPyro distribution for ``N(loc, K_1 ⊗ … ⊗ K_d + σ² I)`` (or
``σ² S_1 ⊗ … ⊗ S_d`` noise) whose log density, gradient and samples cost
``O(Σ n_i³ + N Σ n_i)``; ``KroneckerNormal.marginal`` gives the exact
``KroneckerMarginal`` or the iterative ``IterativeMarginal`` (per-cell noise too) of an
incomplete grid; importing kronjax registers the analytic
``numpyro.distributions.kl.kl_divergence`` between two ``KroneckerNormal`` s; ``linalg``
holds the structured operations under them, ``gp`` GP prediction on grids and at points,
``KroneckerReparam`` the whitened form of a latent site for NUTS, and ``GridGP`` a
Gaussian process on a grid from one kernel per axis, conditioned to a ``GridPosterior``.
"""

from kronjax import gp, kl, linalg
from kronjax.covariance import KroneckerCovariance
from kronjax.distribution import KroneckerNormal
from kronjax.gridgp import GridGP, GridPosterior
from kronjax.incomplete import IterativeMarginal
from kronjax.marginal import KroneckerMarginal
from kronjax.reparam import KroneckerReparam

__all__ = [
    "GridGP",
    "GridPosterior",
    "IterativeMarginal",
    "KroneckerCovariance",
    "KroneckerMarginal",
    "KroneckerNormal",
    "KroneckerReparam",
    "gp",
    "kl",
    "linalg",
]
__version__ = "0.1.0"
