r"""``KroneckerCovariance``: the structured matrix :math:`A = \otimes K_i + \sigma^2 \otimes S_i`.

Everything kronjax computes is a handful of operations on this matrix. It is factorized
once, when built, and one implementation per route owns the algebra:

- :class:`EigenCovariance`: :math:`A = Q \operatorname{diag}(D) Q^\top`,
  :math:`Q = \otimes Q_i`, :math:`D = \otimes\lambda_i + \sigma^2` (``covs``, ``evds``,
  ``chols`` with ``sigma``). Its operations are the custom-VJP eigen cores of
  :mod:`kronjax.linalg`, which never differentiate eigenvectors.
- :class:`CholeskyCovariance`: noise-free :math:`A = \otimes L_i L_i^\top`, per-mode
  triangular solves.
- :class:`kronjax.whitened.WhitenedCovariance`: structured noise, :math:`A = C\, W C^\top` with
  :math:`C = \otimes C_i`, :math:`C_i C_i^\top = S_i`, and :math:`W` an
  :class:`EigenCovariance` of the whitened factors :math:`C_i^{-1} K_i C_i^{-\top}`
  (Rakitsch et al. 2013).

Every operation costs :math:`O(N \sum_i n_i)` after the :math:`O(\sum_i n_i^3)`
factorization and never forms an :math:`N \times N` array (``dense`` excepted). Adding a
route means adding one subclass. Study models: GPyTorch's ``LinearOperator``, lineax's
operators, tinygp's ``Solver``.
"""

import math

import jax
import jax.numpy as jnp

from kronjax import conditioning, lapack, linalg

__all__ = [
    "KroneckerCovariance",
    "EigenCovariance",
    "CholeskyCovariance",
    "eigh_all",
    "tri_half_logdet",
    "whiten_factor",
]

_LOG_2PI = math.log(2 * math.pi)


def tri_half_logdet(tris, n: int) -> jax.Array:
    r""":math:`\log|\det \otimes_i T_i| = \sum_i (N/n_i) \sum \log|\operatorname{diag} T_i|`."""
    return sum(
        (n // t.shape[-1]) * jnp.sum(jnp.log(jnp.abs(jnp.diagonal(t, axis1=-2, axis2=-1))), -1)
        for t in tris
    )


def whiten_factor(k: jax.Array, c: jax.Array) -> jax.Array:
    r""":math:`C^{-1} K C^{-\top}` for lower-triangular ``c``, by two triangular solves,
    batched, symmetrized. :math:`O(n^3)`."""
    a = lapack.solve_triangular(c, k)
    a = lapack.solve_triangular(c, jnp.swapaxes(a, -1, -2))
    return 0.5 * (a + jnp.swapaxes(a, -1, -2))


class KroneckerCovariance:
    """The interface every route implements; build one with :meth:`from_factors`.

    A pytree: it passes through ``jit``, ``vmap`` and ``lax.scan`` with its factorization.
    """

    _data: tuple[str, ...] = ()
    _aux: tuple[str, ...] = ()

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        jax.tree_util.register_pytree_node(
            cls,
            lambda c: (
                tuple(getattr(c, f) for f in cls._data),
                tuple(getattr(c, f) for f in cls._aux),
            ),
            lambda aux, data: cls._unflatten(aux, data),
        )

    @classmethod
    def _unflatten(cls, aux, data):
        out = object.__new__(cls)
        for name, value in zip(cls._data + cls._aux, tuple(data) + tuple(aux), strict=True):
            setattr(out, name, value)
        return out

    @staticmethod
    def from_factors(covs=None, chols=None, evds=None, sigma=None, noise_factors=None):
        r"""Factorize :math:`\otimes K_i + \sigma^2 \otimes S_i` once and pick the route.

        Exactly one of ``covs`` (matrices), ``chols`` (lower :math:`L_i`) and ``evds``
        (pairs of eigenvalues and eigenvectors) is given, already shape-checked and of one
        dtype. ``noise_factors`` holds per axis None (identity), a diagonal ``(..., n_i)``
        or a matrix ``(..., n_i, n_i)``; with it ``sigma`` defaults to 1.
        """
        if noise_factors is not None:
            from kronjax.whitened import WhitenedCovariance  # the route builds on this module

            return WhitenedCovariance.build(covs, chols, evds, sigma, noise_factors)
        if chols is not None and sigma is None:
            return CholeskyCovariance(tuple(chols))
        if evds is not None:
            vals, vecs = (tuple(x) for x in zip(*evds, strict=True))
            return EigenCovariance(vals, vecs, sigma)
        if chols is not None:
            covs = tuple(l @ jnp.swapaxes(l, -1, -2) for l in chols)
            return EigenCovariance(*eigh_all(covs), sigma, covs=covs, chols=tuple(chols))
        return EigenCovariance(*eigh_all(covs), sigma, covs=tuple(covs))

    # -- shapes -----------------------------------------------------------------------

    @property
    def factor_sizes(self) -> tuple[int, ...]:
        """The grid sizes ``(n_1, …, n_d)``."""
        return tuple(a.shape[-1] for a in self._grid_factors())

    @property
    def size(self) -> int:
        """:math:`N = \\prod_i n_i`."""
        return math.prod(self.factor_sizes)

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """Broadcast leading dims of every array the covariance holds (its own vmap axes)."""
        shapes = []
        for leaf, core in self.batch_parts():
            if leaf is not None:
                shapes.append(jnp.shape(leaf)[: jnp.ndim(leaf) - core])
        return jnp.broadcast_shapes(*shapes)

    # -- shared by the routes ---------------------------------------------------------

    def sigma2(self):
        """:math:`\\sigma^2` (0 without noise)."""
        return 0.0 if self.sigma is None else jnp.square(self.sigma)

    def factor_covs(self) -> tuple[jax.Array, ...]:
        """The dense signal factors :math:`K_i` (small)."""
        return tuple(r @ jnp.swapaxes(r, -1, -2) for r in self.signal_roots())

    def noise_mats(self) -> tuple[jax.Array, ...]:
        """The dense noise factors :math:`S_i` (identity without noise factors)."""
        return tuple(jnp.eye(n, dtype=self.dtype) for n in self.factor_sizes)

    def kronecker_terms(self) -> list[list[jax.Array]]:
        """:math:`A` as a sum of Kronecker products of small matrices (for traces)."""
        terms = [list(self.factor_covs())]
        if self.sigma is not None:
            noise = self.noise_mats()
            terms.append([jnp.square(self.sigma)[..., None, None] * noise[0], *noise[1:]])
        return terms

    def matvec(self, x: jax.Array) -> jax.Array:
        r""":math:`A x` on the full grid, :math:`O(N \sum_i n_i)`."""
        out = linalg.kron_matvec(self.factor_covs(), x)
        if self.sigma is not None:
            out = out + self.sigma2()[..., None] * self.noise_matvec(x)
        return out

    def noise_matvec(self, x: jax.Array) -> jax.Array:
        r""":math:`(\otimes S_i) x`: ``x`` itself without noise factors."""
        return x

    def diag(self) -> jax.Array:
        r""":math:`\operatorname{diag} A = \otimes \operatorname{diag} K_i + \sigma^2
        \otimes \operatorname{diag} S_i`, :math:`O(N)`."""
        out = linalg.kron_diag(self.factor_covs())
        if self.sigma is not None:
            out = out + self.sigma2()[..., None] * linalg.kron_diag(self.noise_mats())
        return out

    def dense(self) -> jax.Array:
        """The dense ``N × N`` matrix. Tests and small N only."""
        out = linalg.kron_dense(self.factor_covs())
        if self.sigma is not None:
            out = out + self.sigma2()[..., None, None] * linalg.kron_dense(self.noise_mats())
        return out

    # -- what each route implements ---------------------------------------------------

    def batch_parts(self):
        """``(array, number of core dims)`` pairs whose leading dims make the batch shape."""
        raise NotImplementedError

    def signal_roots(self) -> tuple[jax.Array, ...]:
        r"""Roots :math:`R_i R_i^\top = K_i` of the signal factors (small)."""
        raise NotImplementedError

    def factor_eigenvalues(self):
        """The eigenvalues of the signal factors :math:`K_i`, or None when the route has
        none (noise-free Cholesky)."""
        raise NotImplementedError

    def logpdf(self, r: jax.Array) -> jax.Array:
        r""":math:`\log \mathcal N(r; 0, A) = -\tfrac12 (r^\top A^{-1} r + \log\det A
        + N \log 2\pi)`: the quadratic form and the log determinant in one pass,
        :math:`O(N \sum_i n_i)`."""
        raise NotImplementedError

    def solve(self, x: jax.Array) -> jax.Array:
        r""":math:`A^{-1} x` for ``x`` ``(..., N)``, :math:`O(N \sum_i n_i)`; on a complete grid
        exact, so also the preconditioner of iterative solves on incomplete ones."""
        raise NotImplementedError

    def logdet(self) -> jax.Array:
        r""":math:`\log\det A`, :math:`O(N)`."""
        raise NotImplementedError

    def trace_inv(self, terms) -> jax.Array:
        r""":math:`\operatorname{tr}(A^{-1} \sum_t \otimes_i P^t_i)` for small ``P^t_i``,
        :math:`O(\sum_i n_i^3 + N \sum_i n_i)` per term."""
        raise NotImplementedError

    def root_matvec(self, z: jax.Array) -> jax.Array:
        r""":math:`R z` with :math:`R R^\top = A`, smooth in the factors (the whitened
        parameterization of a latent site), :math:`O(N \sum_i n_i)`."""
        raise NotImplementedError

    def eigensystem(self):
        r"""``(eigvals, eigvecs, covs)`` with :math:`\otimes K_i + \sigma^2 I = Q
        \operatorname{diag}(D) Q^\top` in the frame of :meth:`whiten`; ``covs`` carry the
        gradient (the decomposition is then constant) or are None."""
        raise NotImplementedError

    def signal_root_matvec(self, z: jax.Array) -> jax.Array:
        r""":math:`(\otimes R_i) z`, :math:`R_i R_i^\top = K_i` (sampling's signal part)."""
        return linalg.kron_matvec(self.signal_roots(), z)

    def noise_root_matvec(self, z: jax.Array) -> jax.Array:
        r""":math:`\sigma (\otimes C_i) z`, :math:`C_i C_i^\top = S_i` (sampling's noise)."""
        return self.sigma[..., None] * z

    def whiten(self, x: jax.Array) -> jax.Array:
        r""":math:`C^{-1} x`, the grid vector in the whitened frame of :meth:`eigensystem`
        (identity without noise factors)."""
        return x

    def whiten_cross(self, kstars):
        r""":math:`K_{*i} C_i^{-\top}` per axis, cross-covariances in the whitened frame."""
        return tuple(kstars)

    def condition_number(self) -> jax.Array:
        r""":math:`\kappa(A)` (of the whitened core with noise factors), batched; see
        :mod:`kronjax.conditioning`. :math:`O(\sum_i n_i)`."""
        return conditioning.eig_condition(self.eigensystem()[0], self.sigma2())


def eigh_all(covs) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
    """``(eigvals, eigvecs)`` of every factor (:func:`kronjax.lapack.eigh`)."""
    pairs = [lapack.eigh(k) for k in covs]
    return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)


class EigenCovariance(KroneckerCovariance):
    r""":math:`A = \otimes K_i + \sigma^2 I = Q \operatorname{diag}(D) Q^\top`.

    ``covs``, when given, carry the derivatives through the custom rules (the eigenvectors are
    constants); without them (``evds``) autodiff runs through ``eigvals``/``eigvecs``.
    ``chols``, when given, are the sampling roots.
    """

    _data = ("eigvals", "eigvecs", "sigma", "covs", "chols")

    def __init__(self, eigvals, eigvecs, sigma=None, *, covs=None, chols=None):
        self.eigvals, self.eigvecs, self.sigma = tuple(eigvals), tuple(eigvecs), sigma
        self.covs, self.chols = covs, chols

    @property
    def dtype(self):
        return self.eigvecs[0].dtype

    def _grid_factors(self):
        return self.eigvecs

    def batch_parts(self):
        yield from ((v, 1) for v in self.eigvals)
        yield from ((q, 2) for q in self.eigvecs)
        yield self.sigma, 0

    def _core(self):
        return self.eigvals, self.eigvecs, self.sigma2()

    def factor_eigenvalues(self):
        """:math:`\\lambda_i` of the signal factors."""
        return self.eigvals

    def signal_roots(self):
        if self.chols is not None:
            return self.chols
        if self.covs is not None:
            return tuple(map(linalg.psd_sqrt, self.covs, self.eigvals, self.eigvecs))
        return tuple(
            q * jnp.sqrt(jnp.maximum(v, 0))[..., None, :]
            for v, q in zip(self.eigvals, self.eigvecs, strict=True)
        )

    def factor_covs(self):
        return self.covs if self.covs is not None else super().factor_covs()

    def logpdf(self, r):
        return linalg.kron_eig_logpdf(r, *self._core(), covs=self.covs)

    def solve(self, x):
        r""":math:`A^{-1} x = Q((Q^\top x)/D)` (:func:`kronjax.linalg.kron_eig_solve`)."""
        return linalg.kron_eig_solve(x, *self._core(), covs=self.covs)

    def logdet(self):
        r""":math:`\log\det A = \sum \log D`."""
        return linalg.kron_eig_logdet(*self._core(), covs=self.covs)

    def trace_inv(self, terms):
        r""":math:`\operatorname{tr}(A^{-1} \sum_t \otimes_i P^t_i)`
        (:func:`kronjax.linalg.kron_eig_trace_inv`)."""
        return linalg.kron_eig_trace_inv(terms, *self._core(), covs=self.covs)

    def root_matvec(self, z):
        r""":math:`R z`, :math:`R R^\top = A`: the structured :math:`\otimes R_i` without noise,
        the symmetric root :math:`Q \operatorname{diag}(\sqrt D) Q^\top` with it
        (:func:`kronjax.linalg.kron_eig_sqrt_matvec`), smooth in the factors."""
        if self.sigma is None:
            return self.signal_root_matvec(z)
        return linalg.kron_eig_sqrt_matvec(z, *self._core(), covs=self.covs)

    def eigensystem(self):
        """``(eigvals, eigvecs, covs)`` of the core, the decomposition constant when ``covs``
        carry the gradient."""
        if self.covs is None:
            return self.eigvals, self.eigvecs, None
        vals, vecs = jax.lax.stop_gradient((self.eigvals, self.eigvecs))
        return vals, vecs, self.covs


class CholeskyCovariance(KroneckerCovariance):
    r"""Noise-free :math:`A = \otimes L_i L_i^\top`, by per-mode triangular solves."""

    _data = ("chols",)
    sigma = None

    def __init__(self, chols):
        self.chols = tuple(chols)

    @property
    def dtype(self):
        return self.chols[0].dtype

    def _grid_factors(self):
        return self.chols

    def batch_parts(self):
        yield from ((l, 2) for l in self.chols)

    def factor_eigenvalues(self):
        return None

    def signal_roots(self):
        return self.chols

    def _half_logdet(self):
        return tri_half_logdet(self.chols, self.size)

    def logpdf(self, r):
        z = linalg.kron_solve_triangular(self.chols, r)
        return -0.5 * jnp.sum(z * z, -1) - self._half_logdet() - 0.5 * self.size * _LOG_2PI

    def solve(self, x):
        """Two per-mode triangular solves."""
        z = linalg.kron_solve_triangular(self.chols, x)
        return linalg.kron_solve_triangular(self.chols, z, trans=True)

    def logdet(self):
        return 2 * self._half_logdet()

    def trace_inv(self, terms):
        r""":math:`\sum_t \prod_i \operatorname{tr}(K_i^{-1} P^t_i)`."""
        return sum(
            math.prod(
                jnp.trace(whiten_factor(p, l), axis1=-2, axis2=-1)
                for p, l in zip(t, self.chols, strict=True)
            )
            for t in terms
        )

    def root_matvec(self, z):
        return self.signal_root_matvec(z)

    def eigensystem(self):
        """The eigendecomposition of :math:`L_i L_i^\\top` (one ``eigh`` per factor), the
        gradient carried by :math:`L_i L_i^\\top`."""
        covs = self.factor_covs()
        return (*eigh_all(covs), covs)

    def condition_number(self):
        r"""The estimate :math:`\prod_i (\max|\operatorname{diag} L_i| /
        \min|\operatorname{diag} L_i|)^2` (no decomposition)."""
        ratios = []
        for l in self.chols:
            diag = jnp.abs(jnp.diagonal(l, axis1=-2, axis2=-1))
            ratios.append(jnp.square(jnp.max(diag, -1) / jnp.min(diag, -1)))
        return math.prod(ratios)
