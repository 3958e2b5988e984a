r"""``KroneckerNormal``: a NumPyro distribution with Kronecker-structured covariance."""

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.distributions import Distribution, constraints
from numpyro.distributions.util import validate_sample
from numpyro.util import not_jax_tracer

from kronjax import linalg

__all__ = ["KroneckerNormal"]

_LOG_2PI = math.log(2 * math.pi)


def _shape_error(arg: str, seen, expected: str) -> ValueError:
    return ValueError(f"KroneckerNormal: {arg} has shape {tuple(seen)}; expected {expected}")


def _check_square(name: str, factors) -> tuple[jax.Array, ...]:
    if isinstance(factors, jax.Array | np.ndarray) or not isinstance(factors, Sequence):
        raise ValueError(
            f"KroneckerNormal: {name} must be a sequence (list or tuple) of d >= 1 "
            f"matrices of shape (..., n_i, n_i); got {type(factors).__name__}"
        )
    if len(factors) == 0:
        raise ValueError(f"KroneckerNormal: {name} is empty; expected d >= 1 factors")
    out = []
    for i, f in enumerate(factors):
        f = jnp.asarray(f)
        if f.ndim < 2 or f.shape[-1] != f.shape[-2]:
            raise _shape_error(f"{name}[{i}]", f.shape, "a square matrix (..., n, n)")
        out.append(f)
    return tuple(out)


def _check_evds(evds) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
    if not isinstance(evds, Sequence) or len(evds) == 0:
        raise ValueError(
            "KroneckerNormal: evds must be a non-empty sequence of (eigenvalues, "
            "eigenvectors) pairs, e.g. [jnp.linalg.eigh(K) for K in covs]"
        )
    vals, vecs = [], []
    for i, pair in enumerate(evds):
        if not isinstance(pair, Sequence) or len(pair) != 2:
            raise ValueError(
                f"KroneckerNormal: evds[{i}] must be a pair (eigenvalues (..., n), "
                f"eigenvectors (..., n, n)); got {type(pair).__name__}"
                + (f" of length {len(pair)}" if isinstance(pair, Sequence) else "")
            )
        v, q = jnp.asarray(pair[0]), jnp.asarray(pair[1])
        if q.ndim < 2 or q.shape[-1] != q.shape[-2]:
            raise _shape_error(f"evds[{i}] eigenvectors", q.shape, "(..., n, n)")
        if v.ndim < 1 or v.shape[-1] != q.shape[-1]:
            raise _shape_error(
                f"evds[{i}] eigenvalues",
                v.shape,
                f"(..., {q.shape[-1]}) to match eigenvectors of shape {tuple(q.shape)}",
            )
        vals.append(v)
        vecs.append(q)
    return tuple(vals), tuple(vecs)


def _batch_shape(loc, factors, sigma, factor_name: str) -> tuple[int, ...]:
    """Broadcast the batch dims of ``loc``, every factor and ``sigma``, naming a culprit."""
    shape = tuple(jnp.shape(loc)[:-1])
    parts = [(f"{factor_name}[{i}]", jnp.shape(f)[:-2]) for i, f in enumerate(factors)]
    if sigma is not None:
        parts.append(("sigma", jnp.shape(sigma)))
    for name, part in parts:
        try:
            shape = jnp.broadcast_shapes(shape, tuple(part))
        except ValueError:
            raise ValueError(
                f"KroneckerNormal: the batch dims {tuple(part)} of {name} do not broadcast "
                f"with the batch shape {shape} of loc and the arguments before it"
            ) from None
    return shape


def _tol(x, n: int) -> float:
    """Round-off tolerance for symmetry and eigenvalue checks of an ``n × n`` factor."""
    return 10 * n * float(jnp.finfo(x.dtype).eps) * float(jnp.max(jnp.abs(x), initial=0))


class KroneckerNormal(Distribution):
    r"""Multivariate normal with Kronecker-structured covariance plus isotropic noise.

    .. math::
        x \sim \mathcal N(\mu, K), \quad
        K = K_1 \otimes K_2 \otimes \dots \otimes K_d + \sigma^2 I_N, \quad
        N = n_1 n_2 \cdots n_d .

    Element :math:`(i_1, \dots, i_d)` of the grid sits at flat index
    :math:`i_1 (n_2 \cdots n_d) + \dots + i_d` (row-major, as ``jnp.kron``), so a grid
    array ``y_grid`` of shape ``(..., n_1, …, n_d)`` is ``y_grid.reshape(..., N)``.

    The factors are decomposed once, here: ``covs`` by ``eigh``; ``chols`` are used by
    per-mode triangular solves when there is no noise and moved to the eigenbasis
    otherwise; ``evds`` are used as given. Then ``log_prob`` costs
    :math:`O(N \sum_i n_i)` after :math:`O(\sum_i n_i^3)`, and
    :math:`\partial \log p / \partial K_i` comes from a custom VJP that never
    differentiates eigenvectors (:func:`kronjax.linalg.kron_eig_logpdf`): exact and
    finite when factors have repeated eigenvalues, where autodiff through ``eigh`` fails.

    Args:
        loc: mean, shape ``(..., N)``, or a scalar broadcast to ``(N,)``.
        covs: sequence of ``d >= 1`` symmetric PSD factors ``(..., n_i, n_i)``
            (positive definite when ``sigma`` is None).
        chols: sequence of lower-triangular ``L_i`` with ``K_i = L_i L_iᵀ``.
        evds: sequence of pairs ``(eigenvalues (..., n_i), eigenvectors (..., n_i, n_i))``
            with ``K_i = Q_i diag(v_i) Q_iᵀ``, e.g. the output of ``jnp.linalg.eigh``.
        sigma: None, or the noise standard deviation (``>= 0``), broadcastable to the
            batch shape.
        validate_args: check values (finite, ``sigma >= 0``, factors symmetric PSD, PD
            without noise) at construction, outside ``jit``.

    Exactly one of ``covs``, ``chols``, ``evds`` is given. ``batch_shape`` broadcasts
    ``loc.shape[:-1]``, the factors' leading dims and ``jnp.shape(sigma)``.

    References: Saatçi (2011), *Scalable inference for structured Gaussian process
    models*, ch. 5; Wilson et al. (2014), *Fast kernel learning for multidimensional
    pattern extrapolation*.
    """

    arg_constraints = {
        "loc": constraints.real_vector,
        "covs": constraints.dependent(is_discrete=False),
        "chols": constraints.dependent(is_discrete=False),
        "evds": constraints.dependent(is_discrete=False),
        "sigma": constraints.dependent(is_discrete=False),
    }
    support = constraints.real_vector
    reparametrized_params = ["loc", "covs", "chols", "evds", "sigma"]
    pytree_data_fields = (
        "loc",
        "covs",
        "chols",
        "sigma",
        "_eig_covs",
        "_eigvals",
        "_eigvecs",
    )

    def __init__(
        self,
        loc,
        covs: Sequence | None = None,
        chols: Sequence | None = None,
        evds: Sequence | None = None,
        sigma=None,
        *,
        validate_args: bool | None = None,
    ):
        given = [n for n, v in (("covs", covs), ("chols", chols), ("evds", evds)) if v is not None]
        if len(given) != 1:
            raise ValueError(
                "KroneckerNormal: give exactly one of covs, chols, evds; got "
                + (", ".join(given) if given else "none")
            )
        if evds is not None:
            eigvals, eigvecs = _check_evds(evds)
            factors = eigvecs
        else:
            factors = _check_square(given[0], covs if covs is not None else chols)
        sizes = tuple(f.shape[-1] for f in factors)
        n = math.prod(sizes)

        loc = jnp.asarray(loc)
        if loc.ndim == 0:
            loc = jnp.broadcast_to(loc, (n,))
        if loc.shape[-1] != n:
            raise _shape_error(
                "loc", loc.shape, f"(..., {n}): N = {n} is the product of the factor sizes {sizes}"
            )
        sigma = None if sigma is None else jnp.asarray(sigma)
        batch_shape = _batch_shape(loc, factors, sigma, given[0])

        dtype = jnp.result_type(float, loc, *factors, *([] if sigma is None else [sigma]))
        self.loc = loc.astype(dtype)
        self.sigma = None if sigma is None else sigma.astype(dtype)
        self.covs = self.chols = None
        self._eig_covs = self._eigvals = self._eigvecs = None
        if covs is not None:
            self.covs = self._eig_covs = tuple(f.astype(dtype) for f in factors)
        elif chols is not None:
            self.chols = tuple(f.astype(dtype) for f in factors)
            if sigma is not None:  # noise: leave the Cholesky route for the eigenbasis
                self._eig_covs = tuple(l @ jnp.swapaxes(l, -1, -2) for l in self.chols)
        else:
            self._eigvals = tuple(v.astype(dtype) for v in eigvals)
            self._eigvecs = tuple(q.astype(dtype) for q in eigvecs)
        if self._eig_covs is not None:  # the one eigendecomposition per factor
            pairs = [jnp.linalg.eigh(jax.lax.stop_gradient(k)) for k in self._eig_covs]
            self._eigvals = tuple(p[0] for p in pairs)
            self._eigvecs = tuple(p[1] for p in pairs)
        super().__init__(batch_shape, (n,), validate_args=validate_args)

    # -- shapes -----------------------------------------------------------------------

    @property
    def factor_sizes(self) -> tuple[int, ...]:
        """The grid sizes ``(n_1, …, n_d)``."""
        factors = self._eigvecs if self._eigvecs is not None else self.chols
        return tuple(f.shape[-1] for f in factors)

    @property
    def evds(self) -> tuple[tuple[jax.Array, jax.Array], ...] | None:
        """The ``(eigenvalues, eigenvectors)`` pairs when given as ``evds``, else None."""
        if self.covs is not None or self.chols is not None:
            return None
        return tuple(zip(self._eigvals, self._eigvecs))

    @property
    def batch_shape(self) -> tuple[int, ...]:
        # Derived from the parameters, so a distribution returned by ``jax.vmap`` is right.
        factors = self._eigvecs if self._eigvecs is not None else self.chols
        shapes = [jnp.shape(self.loc)[:-1], *(jnp.shape(f)[:-2] for f in factors)]
        if self.sigma is not None:
            shapes.append(jnp.shape(self.sigma))
        return jnp.broadcast_shapes(*shapes)

    def _check_value(self, value) -> jax.Array:
        value = jnp.asarray(value)
        n = self.event_shape[0]
        if value.ndim == 0 or value.shape[-1] != n:
            raise ValueError(
                f"KroneckerNormal.log_prob: value has shape {value.shape}; expected "
                f"(..., {n}) with N = {n} = prod{self.factor_sizes}"
            )
        try:
            jnp.broadcast_shapes(value.shape[:-1], self.batch_shape)
        except ValueError:
            raise ValueError(
                f"KroneckerNormal.log_prob: value has shape {value.shape}, whose leading "
                f"dims do not broadcast with the batch shape {self.batch_shape}"
            ) from None
        return value

    # -- the density ------------------------------------------------------------------

    def _sigma2(self):
        return 0.0 if self.sigma is None else jnp.square(self.sigma)

    def _chol_half_logdet(self) -> jax.Array:
        r"""Half the log determinant of :math:`\otimes L_i L_i^\top`.

        .. math:: \tfrac12 \log\det = \textstyle\sum_i (N/n_i) \sum \log|\operatorname{diag} L_i|
        """
        n = self.event_shape[0]
        return sum(
            (n // l.shape[-1]) * jnp.sum(jnp.log(jnp.abs(jnp.diagonal(l, axis1=-2, axis2=-1))), -1)
            for l in self.chols
        )

    @validate_sample
    def log_prob(self, value) -> jax.Array:
        r = self._check_value(value) - self.loc
        if self._eigvals is None:  # noise-free Cholesky route: per-mode triangular solves
            z = linalg.kron_solve_triangular(self.chols, r)
            n = self.event_shape[0]
            return -0.5 * jnp.sum(z * z, -1) - self._chol_half_logdet() - 0.5 * n * _LOG_2PI
        return linalg.kron_eig_logpdf(
            r, self._eigvals, self._eigvecs, self._sigma2(), covs=self._eig_covs
        )

    def entropy(self) -> jax.Array:
        r""":math:`\tfrac12 \log\det K + \tfrac N2 (1 + \log 2\pi)`."""
        n = self.event_shape[0]
        if self._eigvals is None:
            half_logdet = self._chol_half_logdet()
        else:
            half_logdet = 0.5 * linalg.kron_eig_logdet(
                self._eigvals, self._eigvecs, self._sigma2(), covs=self._eig_covs
            )
        return jnp.broadcast_to(half_logdet + 0.5 * n * (1 + _LOG_2PI), self.batch_shape)

    # -- sampling ---------------------------------------------------------------------

    def _roots(self) -> tuple[jax.Array, ...]:
        """Factor roots ``R_i`` with ``R_i R_iᵀ = K_i``, differentiable in the parameters."""
        if self.chols is not None:
            return self.chols
        if self.covs is not None:
            return tuple(map(linalg.psd_sqrt, self.covs, self._eigvals, self._eigvecs))
        return tuple(
            q * jnp.sqrt(jnp.maximum(v, 0))[..., None, :]
            for v, q in zip(self._eigvals, self._eigvecs)
        )

    def sample(self, key, sample_shape=()) -> jax.Array:
        r"""Draw :math:`x = \mu + (\otimes R_i) z_1 + \sigma z_2`, :math:`R_i R_i^\top = K_i`.

        ``R_i`` is ``L_i`` for ``chols``, the symmetric PSD root for ``covs`` and
        :math:`Q_i \operatorname{diag}\sqrt{\lambda_i}` for ``evds``; PSD factors are fine.
        Reparameterized; cost :math:`O(N \sum_i n_i)` per draw. At an exactly singular
        factor any root's derivative is unbounded, so gradients through draws have huge
        variance there: add jitter before differentiating through such samples.
        """
        shape = tuple(sample_shape) + self.batch_shape + self.event_shape
        key_k, key_noise = jax.random.split(key)
        x = self.loc + linalg.kron_matvec(
            self._roots(), jax.random.normal(key_k, shape, self.loc.dtype)
        )
        if self.sigma is not None:
            noise = jax.random.normal(key_noise, shape, self.loc.dtype)
            x = x + self.sigma[..., None] * noise
        return x

    # -- moments ----------------------------------------------------------------------

    def _factor_covs(self) -> tuple[jax.Array, ...]:
        """The dense factors :math:`K_i` (small, ``n_i × n_i``)."""
        if self.covs is not None:
            return self.covs
        return tuple(r @ jnp.swapaxes(r, -1, -2) for r in self._roots())

    @property
    def mean(self) -> jax.Array:
        return jnp.broadcast_to(self.loc, self.batch_shape + self.event_shape)

    @property
    def variance(self) -> jax.Array:
        r""":math:`\operatorname{diag} K = \otimes_i \operatorname{diag} K_i + \sigma^2`,
        from the factors' diagonals."""
        if self.covs is not None:
            diags = [jnp.diagonal(k, axis1=-2, axis2=-1) for k in self.covs]
        else:  # row sums of squared roots: diag(R Rᵀ)
            diags = [jnp.sum(r * r, -1) for r in self._roots()]
        var = linalg.kron_outer(diags)
        if self.sigma is not None:
            var = var + jnp.square(self.sigma)[..., None]
        return jnp.broadcast_to(var, self.batch_shape + self.event_shape)

    @property
    def covariance_matrix(self) -> jax.Array:
        """The dense ``N × N`` covariance. For small N only."""
        cov = linalg.kron_dense(self._factor_covs())
        if self.sigma is not None:
            eye = jnp.eye(self.event_shape[0], dtype=cov.dtype)
            cov = cov + jnp.square(self.sigma)[..., None, None] * eye
        return jnp.broadcast_to(cov, self.batch_shape + self.event_shape * 2)

    # -- validation -------------------------------------------------------------------

    def validate_args(self, strict: bool = True) -> None:
        """Check values: finite, ``sigma >= 0``, factors symmetric PSD (PD without noise)."""
        leaves = jax.tree.leaves((self.loc, self.sigma, self.covs, self.chols, self._eigvals))
        if not all(not_jax_tracer(x) for x in leaves):
            if strict:
                raise RuntimeError("Cannot validate arguments inside jitted code.")
            return
        if not bool(jnp.all(jnp.isfinite(self.loc))):
            raise ValueError("KroneckerNormal: loc has non-finite entries")
        noise = self.sigma is not None
        if noise and not bool(jnp.all(jnp.isfinite(self.sigma) & (self.sigma >= 0))):
            raise ValueError(f"KroneckerNormal: sigma must be finite and >= 0; got {self.sigma}")
        name = "covs" if self.covs is not None else "chols" if self.chols is not None else "evds"
        for i, f in enumerate(self.covs or self.chols or self._eigvecs):
            arg = f"{name}[{i}]"
            if not bool(jnp.all(jnp.isfinite(f))) or (
                self._eigvals is not None and not bool(jnp.all(jnp.isfinite(self._eigvals[i])))
            ):
                raise ValueError(f"KroneckerNormal: {arg} has non-finite entries")
            if self.covs is not None:
                asym = float(jnp.max(jnp.abs(f - jnp.swapaxes(f, -1, -2))))
                if asym > _tol(f, f.shape[-1]):
                    raise ValueError(
                        f"KroneckerNormal: {arg} is not symmetric (max |K - Kᵀ| = {asym:.3g})"
                    )
            if self.chols is not None:
                if bool(jnp.any(jnp.triu(f, 1) != 0)):
                    raise ValueError(f"KroneckerNormal: {arg} is not lower triangular")
                if not noise and bool(jnp.any(jnp.diagonal(f, axis1=-2, axis2=-1) == 0)):
                    raise ValueError(
                        f"KroneckerNormal: {arg} has a zero on its diagonal, so K_{i} is "
                        "singular; without sigma every factor must be positive definite"
                    )
                continue
            vals = self._eigvals[i]
            tol = _tol(vals, vals.shape[-1])
            smallest = float(jnp.min(vals))
            if smallest < -tol:
                raise ValueError(
                    f"KroneckerNormal: {arg} is not positive semi-definite "
                    f"(smallest eigenvalue {smallest:.3g})"
                )
            if not noise and smallest <= tol:
                raise ValueError(
                    f"KroneckerNormal: {arg} is not positive definite (smallest eigenvalue "
                    f"{smallest:.3g}); without sigma every factor must be positive "
                    "definite: add jitter to the diagonal or give sigma"
                )
