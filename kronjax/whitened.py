r"""Structured noise: the whitened route of :class:`kronjax.KroneckerCovariance`.

:math:`A = \otimes K_i + \sigma^2 \otimes S_i` is exact by whitening each factor by its
noise root (Rakitsch et al. 2013, *It is all in the noise: efficient multi-task Gaussian
process inference with structured residuals*, NeurIPS).
"""

import jax
import jax.numpy as jnp

from kronjax import lapack, linalg
from kronjax.covariance import (
    CholeskyCovariance,
    EigenCovariance,
    KroneckerCovariance,
    tri_half_logdet,
    whiten_factor,
)

__all__ = ["WhitenedCovariance"]


def _diag_root(a: jax.Array) -> jax.Array:
    r""":math:`\operatorname{diag}(\sqrt{a})` for a diagonal noise factor given as ``a``."""
    return jnp.sqrt(a)[..., None] * jnp.eye(a.shape[-1], dtype=a.dtype)


class WhitenedCovariance(KroneckerCovariance):
    r"""Structured noise: :math:`A = \otimes K_i + \sigma^2 \otimes S_i = C W C^\top`,
    :math:`C = \otimes C_i` (Cholesky of :math:`S_i`, :math:`\operatorname{diag}\sqrt{s_i}`
    for a diagonal, identity for None), :math:`W = \otimes \tilde K_i + \sigma^2 I`,
    :math:`\tilde K_i = C_i^{-1} K_i C_i^{-\top}` (an :class:`EigenCovariance`). So
    :math:`A^{-1} = C^{-\top} W^{-1} C^{-1}` and :math:`\log\det A = \log\det W +
    2 \log|\det C|`; gradients flow through the triangular solves and :math:`W`'s custom
    VJPs, never through ``eigh``. ``signal`` is the noise-free covariance of the factors
    (sampling roots, moments).
    """

    _data = ("signal", "white", "noise_factors", "noise_chols", "sigma")

    def __init__(self, signal, white, noise_factors, noise_chols, sigma):
        self.signal, self.white, self.sigma = signal, white, sigma
        self.noise_factors, self.noise_chols = tuple(noise_factors), tuple(noise_chols)

    @classmethod
    def build(cls, covs, chols, evds, sigma, noise):
        given = None if evds is None else tuple(tuple(x) for x in zip(*evds, strict=True))
        if chols is not None:
            signal = CholeskyCovariance(chols)
        elif given is not None:
            signal = EigenCovariance(*given)
        ks = covs if covs is not None else signal.factor_covs()
        dtype = ks[0].dtype
        sigma = jnp.ones((), dtype) if sigma is None else sigma
        parts = []
        for i, (k, a) in enumerate(zip(ks, noise, strict=True)):
            n = k.shape[-1]
            chol = lapack.cholesky(a) if a is not None and a.shape[-2:] == (n, n) else None
            if a is None and given is not None:  # keep the given decomposition
                parts.append((chol, k, given[0][i], given[1][i]))
                continue
            if a is not None:
                k = whiten_factor(k, _diag_root(a) if chol is None else chol)
            parts.append((chol, k, *lapack.eigh(k)))
        noise_chols, white_covs, vals, vecs = (tuple(p) for p in zip(*parts, strict=True))
        white = EigenCovariance(vals, vecs, sigma, covs=white_covs)
        if covs is not None:  # identity-noise axes reuse the whitened decomposition
            pairs = [
                (vals[i], vecs[i]) if a is None else lapack.eigh(k)
                for i, (k, a) in enumerate(zip(covs, noise, strict=True))
            ]
            signal = EigenCovariance(*zip(*pairs, strict=True), covs=tuple(covs))
        return cls(signal, white, noise, noise_chols, sigma)

    @property
    def dtype(self):
        return self.white.dtype

    def _grid_factors(self):
        return self.white.eigvecs

    def batch_parts(self):
        yield from self.signal.batch_parts()
        yield from self.white.batch_parts()
        for a, c in zip(self.noise_factors, self.noise_chols, strict=True):
            if a is not None:
                yield a, 1 if c is None else 2

    def noise_roots(self) -> tuple[jax.Array, ...]:
        r"""Lower-triangular :math:`C_i` with :math:`C_i C_i^\top = S_i`."""
        return tuple(
            jnp.eye(n, dtype=self.dtype) if a is None else _diag_root(a) if c is None else c
            for a, c, n in zip(self.noise_factors, self.noise_chols, self.factor_sizes, strict=True)
        )

    def noise_mats(self):
        def dense(a, c, n):  # identity, the matrix given, or the diagonal given as a vector
            if a is None:
                return jnp.eye(n, dtype=self.dtype)
            return a if c is not None else a[..., None] * jnp.eye(n, dtype=a.dtype)

        return tuple(map(dense, self.noise_factors, self.noise_chols, self.factor_sizes))

    def noise_matvec(self, x):
        return linalg.kron_matvec(self.noise_mats(), x)

    def _noise_half_logdet(self):
        roots = [
            c for c, a in zip(self.noise_roots(), self.noise_factors, strict=True) if a is not None
        ]
        return tri_half_logdet(roots, self.size)

    def factor_eigenvalues(self):
        return self.signal.factor_eigenvalues()

    def signal_roots(self):
        return self.signal.signal_roots()

    def factor_covs(self):
        return self.signal.factor_covs()

    def whiten(self, x):
        return linalg.kron_solve_triangular(self.noise_roots(), x)

    def whiten_cross(self, kstars):
        return tuple(
            jnp.swapaxes(lapack.solve_triangular(c, jnp.swapaxes(k, -1, -2)), -1, -2)
            for c, k in zip(self.noise_roots(), kstars, strict=True)
        )

    def logpdf(self, r):
        return self.white.logpdf(self.whiten(r)) - self._noise_half_logdet()

    def solve(self, x):
        r""":math:`C^{-\top} W^{-1} C^{-1} x`."""
        w = self.white.solve(self.whiten(x))
        return linalg.kron_solve_triangular(self.noise_roots(), w, trans=True)

    def logdet(self):
        return self.white.logdet() + 2 * self._noise_half_logdet()

    def trace_inv(self, terms):
        r""":math:`\operatorname{tr}(W^{-1} C^{-1} P C^{-\top})`: each :math:`P^t_i` whitened."""
        roots = self.noise_roots()
        terms = [[whiten_factor(p, c) for p, c in zip(t, roots, strict=True)] for t in terms]
        return self.white.trace_inv(terms)

    def root_matvec(self, z):
        r""":math:`C\, W^{1/2} z` (:math:`W^{1/2}` the symmetric root)."""
        return linalg.kron_matvec(self.noise_roots(), self.white.root_matvec(z))

    def noise_root_matvec(self, z):
        return self.sigma[..., None] * linalg.kron_matvec(self.noise_roots(), z)

    def eigensystem(self):
        return self.white.eigensystem()
