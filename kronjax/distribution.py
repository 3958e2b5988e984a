r"""``KroneckerNormal``: a NumPyro distribution with Kronecker-structured covariance."""

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.distributions import Distribution, constraints
from numpyro.distributions.util import validate_sample
from numpyro.util import not_jax_tracer

from kronjax import conditioning, lapack, linalg
from kronjax.marginal import KroneckerMarginal

__all__ = ["KroneckerNormal"]

_LOG_2PI = math.log(2 * math.pi)


def _shape_error(arg: str, seen, expected: str) -> ValueError:
    return ValueError(f"KroneckerNormal: {arg} has shape {tuple(seen)}; expected {expected}")


def _as_real(arg: str, x) -> jax.Array:
    """``x`` as an array of a real dtype kronjax computes in; TypeError naming ``arg`` else."""
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        raise TypeError(f"KroneckerNormal: {arg} has complex dtype {x.dtype}; expected real")
    if x.dtype in (jnp.float16, jnp.bfloat16):
        raise TypeError(
            f"KroneckerNormal: {arg} has dtype {x.dtype}, which LAPACK's eigh and Cholesky do "
            "not support; use float32 or float64"
        )
    if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)):
        raise TypeError(f"KroneckerNormal: {arg} has dtype {x.dtype}; expected a real number")
    return x


def _check_square(name: str, factors) -> tuple[jax.Array, ...]:
    return tuple(
        linalg.check_factors("KroneckerNormal", name, factors, square=True, convert=_as_real)
    )


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
        v, q = (
            _as_real(f"evds[{i}] eigenvalues", pair[0]),
            _as_real(f"evds[{i}] eigenvectors", pair[1]),
        )
        if q.ndim < 2 or q.shape[-1] != q.shape[-2] or q.shape[-1] == 0:
            raise _shape_error(f"evds[{i}] eigenvectors", q.shape, "(..., n, n), n >= 1")
        if v.ndim < 1 or v.shape[-1] != q.shape[-1]:
            raise _shape_error(
                f"evds[{i}] eigenvalues",
                v.shape,
                f"(..., {q.shape[-1]}) to match eigenvectors of shape {tuple(q.shape)}",
            )
        vals.append(v)
        vecs.append(q)
    return tuple(vals), tuple(vecs)


def _check_noise(noise_factors, sizes) -> tuple[tuple, tuple[bool, ...]]:
    """Shape-check ``noise_factors``: per axis None, a diagonal ``(..., n)`` or ``(..., n, n)``.

    Returns the arrays (None kept) and, per axis, whether the entry is a matrix. An entry
    whose trailing dims are ``(n, n)`` is a matrix, so a batch of ``n`` diagonals must be
    passed as diagonal matrices.
    """
    if isinstance(noise_factors, jax.Array | np.ndarray) or not isinstance(noise_factors, Sequence):
        raise ValueError(
            "KroneckerNormal: noise_factors must be a sequence (list or tuple) with one "
            f"entry per factor (None, (..., n_i) or (..., n_i, n_i)); got "
            f"{type(noise_factors).__name__}"
        )
    if len(noise_factors) != len(sizes):
        raise ValueError(
            f"KroneckerNormal: noise_factors has {len(noise_factors)} entries; expected "
            f"d = {len(sizes)}, one per factor of sizes {sizes} (None for identity)"
        )
    out, is_matrix = [], []
    for i, (s, n) in enumerate(zip(noise_factors, sizes, strict=True)):
        s = None if s is None else _as_real(f"noise_factors[{i}]", s)
        matrix = s is not None and s.ndim >= 2 and s.shape[-2:] == (n, n)
        if s is not None and not matrix and (s.ndim == 0 or s.shape[-1] != n):
            raise _shape_error(
                f"noise_factors[{i}]",
                s.shape,
                f"None, a diagonal (..., {n}) or a matrix "
                f"(..., {n}, {n}): n_{i} = {n} is the size of factor {i}",
            )
        out.append(s)
        is_matrix.append(matrix)
    return tuple(out), tuple(is_matrix)


def _tri_half_logdet(tris, n: int) -> jax.Array:
    r""":math:`\log|\det \otimes_i T_i| = \sum_i (N/n_i) \sum \log|\operatorname{diag} T_i|`
    for triangular ``T_i`` ``(..., n_i, n_i)``."""
    return sum(
        (n // t.shape[-1]) * jnp.sum(jnp.log(jnp.abs(jnp.diagonal(t, axis1=-2, axis2=-1))), -1)
        for t in tris
    )


def _whiten_factor(k: jax.Array, c: jax.Array) -> jax.Array:
    r""":math:`C^{-1} K C^{-\top}` by two triangular solves, batched; symmetrized."""

    def whiten(k, c):
        a = lapack.solve_triangular(c, k)
        a = lapack.solve_triangular(c, a.T)
        return 0.5 * (a + a.T)

    return jnp.vectorize(whiten, signature="(n,n),(n,n)->(n,n)")(k, c)


def _diag_root(a: jax.Array) -> jax.Array:
    r""":math:`\operatorname{diag}(\sqrt{a})` for a diagonal noise factor given as ``a``."""
    return jnp.sqrt(a)[..., None] * jnp.eye(a.shape[-1], dtype=a.dtype)


def _batch_shape(loc, factors, sigma, factor_name: str, extra=()) -> tuple[int, ...]:
    """Broadcast the batch dims of ``loc``, every factor, ``sigma`` and ``extra`` (pairs of
    name and batch dims), naming a culprit."""
    shape = tuple(jnp.shape(loc)[:-1])
    parts = [(f"{factor_name}[{i}]", jnp.shape(f)[:-2]) for i, f in enumerate(factors)]
    if sigma is not None:
        parts.append(("sigma", jnp.shape(sigma)))
    parts.extend(extra)
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
    r"""Multivariate normal with Kronecker-structured covariance plus (structured) noise.

    .. math::
        x \sim \mathcal N(\mu, K), \quad
        K = K_1 \otimes K_2 \otimes \dots \otimes K_d + \sigma^2 I_N, \quad
        N = n_1 n_2 \cdots n_d ,

    or, with ``noise_factors``, :math:`K = \otimes_i K_i + \sigma^2 \otimes_i S_i`.

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
        noise_factors: None, or a sequence of d entries ``S_i``, each None (identity), a
            positive vector ``(..., n_i)`` (a diagonal) or a positive definite matrix
            ``(..., n_i, n_i)``; the noise becomes :math:`\sigma^2 \otimes_i S_i`, with
            :math:`\sigma = 1` when ``sigma`` is None. An entry whose trailing dims are
            ``(n_i, n_i)`` is read as a matrix.
        validate_args: check values (finite, ``sigma >= 0``, factors symmetric PSD, PD
            without noise, ``evds`` eigenvectors orthonormal) at construction, outside
            ``jit``. Given explicitly as True, ``log_prob`` and the solves also refuse a
            covariance too ill-conditioned for the dtype (:mod:`kronjax.conditioning`);
            otherwise they warn once.

    Exactly one of ``covs``, ``chols``, ``evds`` is given. ``batch_shape`` broadcasts
    ``loc.shape[:-1]``, the factors' leading dims, ``jnp.shape(sigma)`` and the leading
    dims of the noise factors.

    **Kronecker-structured noise** is exact by whitening (Rakitsch et al. 2013): with
    :math:`S_i = C_i C_i^\top` (Cholesky; :math:`C_i = \operatorname{diag}\sqrt{s_i}`
    for a diagonal) and :math:`\tilde K_i = C_i^{-1} K_i C_i^{-\top}`,

    .. math::
        K = C \big(\otimes_i \tilde K_i + \sigma^2 I\big) C^\top, \quad C = \otimes_i C_i,
        \qquad \log p(x) = \log \mathcal N\big(C^{-1}(x - \mu);\, 0,
        \otimes_i \tilde K_i + \sigma^2 I\big) - \log|\det C| ,

    :math:`\log|\det C| = \sum_i (N/n_i) \sum \log \operatorname{diag} C_i`. The whitened
    factors go through the same eigen core, so the cost stays
    :math:`O(\sum_i n_i^3 + N \sum_i n_i)` and the gradient w.r.t. :math:`K_i` and
    :math:`S_i` flows through the triangular solves of the whitening and the custom VJP
    of the core, never through ``eigh``. ``evds`` are turned into
    :math:`K_i = Q_i \operatorname{diag}(v_i) Q_i^\top` (small) and whitened, so the
    whitened factors are decomposed afresh (axes whose noise entry is None keep the given
    decomposition). Use cases: one noise level per task in a multi-output GP (a diagonal
    on the task axis), noise varying separably over space and time (diagonals on several
    axes), correlated noise across tasks (a matrix on the task axis).

    References: Saatçi (2011), *Scalable inference for structured Gaussian process
    models*, ch. 5; Wilson et al. (2014), *Fast kernel learning for multidimensional
    pattern extrapolation*; Rakitsch et al. (2013), *It is all in the noise: efficient
    multi-task Gaussian process inference with structured residuals*, NeurIPS.
    """

    arg_constraints = {
        "loc": constraints.real_vector,
        "covs": constraints.dependent(is_discrete=False),
        "chols": constraints.dependent(is_discrete=False),
        "evds": constraints.dependent(is_discrete=False),
        "sigma": constraints.dependent(is_discrete=False),
        "noise_factors": constraints.dependent(is_discrete=False),
    }
    support = constraints.real_vector
    reparametrized_params = ["loc", "covs", "chols", "evds", "sigma", "noise_factors"]
    pytree_aux_fields = ("_strict",)
    pytree_data_fields = (
        "loc",
        "covs",
        "chols",
        "sigma",
        "_eig_covs",
        "_eigvals",
        "_eigvecs",
        "noise_factors",
        "_noise_chols",
        "_white_covs",
        "_white_vals",
        "_white_vecs",
    )

    def __init__(
        self,
        loc,
        covs: Sequence | None = None,
        chols: Sequence | None = None,
        evds: Sequence | None = None,
        sigma=None,
        noise_factors: Sequence | None = None,
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

        loc = _as_real("loc", loc)
        if loc.ndim == 0:
            loc = jnp.broadcast_to(loc, (n,))
        if loc.shape[-1] != n:
            raise _shape_error(
                "loc", loc.shape, f"(..., {n}): N = {n} is the product of the factor sizes {sizes}"
            )
        sigma = None if sigma is None else _as_real("sigma", sigma)
        noise, noise_is_matrix = (
            (None, None) if noise_factors is None else _check_noise(noise_factors, sizes)
        )
        extra = [
            (f"noise_factors[{i}]", jnp.shape(a)[: -2 if m else -1])
            for i, (a, m) in enumerate(zip(noise or (), noise_is_matrix or (), strict=True))
            if a is not None
        ]
        batch_shape = _batch_shape(loc, factors, sigma, given[0], extra)

        dtype = jnp.result_type(
            float,
            loc,
            *factors,
            *([] if sigma is None else [sigma]),
            *(a for a in noise or () if a is not None),
        )
        self.loc = loc.astype(dtype)
        self.sigma = None if sigma is None else sigma.astype(dtype)
        self.covs = self.chols = None
        self._eig_covs = self._eigvals = self._eigvecs = None
        if covs is not None:
            self.covs = self._eig_covs = tuple(f.astype(dtype) for f in factors)
        elif chols is not None:
            self.chols = tuple(f.astype(dtype) for f in factors)
            if sigma is not None and noise is None:  # noise: leave the Cholesky route
                self._eig_covs = tuple(l @ jnp.swapaxes(l, -1, -2) for l in self.chols)
        else:
            self._eigvals = tuple(v.astype(dtype) for v in eigvals)
            self._eigvecs = tuple(q.astype(dtype) for q in eigvecs)
        self.noise_factors = self._noise_chols = None
        self._white_covs = self._white_vals = self._white_vecs = None
        if noise is not None:
            self._init_noise(noise, noise_is_matrix, dtype)
        if self._eig_covs is not None:  # the one eigendecomposition per factor
            self._init_eigh(noise)
        self._strict = validate_args is True  # an explicit request refuses ill-conditioning
        super().__init__(batch_shape, (n,), validate_args=validate_args)

    def _init_eigh(self, noise) -> None:
        """``eigh`` of every factor (:func:`kronjax.lapack.eigh`). With noise factors only
        log_prob's whitened decompositions are needed (this one serves sampling; ``jit``
        drops it when unused); identity-noise axes reuse the whitened one."""
        own = [] if noise is None else [i for i, a in enumerate(noise) if a is None]
        pairs = {i: lapack.eigh(k) for i, k in enumerate(self._eig_covs) if i not in own}
        pairs.update({i: (self._white_vals[i], self._white_vecs[i]) for i in own})
        self._eigvals = tuple(pairs[i][0] for i in range(len(pairs)))
        self._eigvecs = tuple(pairs[i][1] for i in range(len(pairs)))

    def _init_noise(self, noise, is_matrix, dtype) -> None:
        """Whiten every factor by its noise root, once, and decompose the whitened factors."""
        self.noise_factors = tuple(None if a is None else a.astype(dtype) for a in noise)
        if self.sigma is None:
            self.sigma = jnp.ones((), dtype)
        covs, vals, vecs = self._factor_covs(), self._eigvals, self._eigvecs
        # identity noise on an axis with a decomposition given (evds): keep the factor's own
        todo = [i for i, a in enumerate(self.noise_factors) if a is not None or vals is None]

        def decompose(k, a, matrix):
            chol = lapack.cholesky(a) if matrix else None
            if a is not None:
                k = _whiten_factor(k, chol if matrix else _diag_root(a))
            return (chol, k, *lapack.eigh(k))

        done = {i: decompose(covs[i], self.noise_factors[i], is_matrix[i]) for i in todo}
        self._noise_chols = tuple(done[i][0] if i in done else None for i in range(len(covs)))
        self._white_covs, self._white_vals, self._white_vecs = (
            tuple(done[i][j] if i in done else own[i] for i in range(len(covs)))
            for j, own in ((1, covs), (2, vals), (3, vecs))
        )

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
        return tuple(zip(self._eigvals, self._eigvecs, strict=True))

    @property
    def batch_shape(self) -> tuple[int, ...]:
        # Derived from the parameters, so a distribution returned by ``jax.vmap`` is right.
        factors = self._eigvecs if self._eigvecs is not None else self.chols
        shapes = [jnp.shape(self.loc)[:-1], *(jnp.shape(f)[:-2] for f in factors)]
        if self.sigma is not None:
            shapes.append(jnp.shape(self.sigma))
        for a, c in zip(self.noise_factors or (), self._noise_chols or (), strict=True):
            if a is not None:
                shapes.append(jnp.shape(a)[: -1 if c is None else -2])
        return jnp.broadcast_shapes(*shapes)

    def _check_value(self, value) -> jax.Array:
        value = _as_real("value", value)
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
        return _tri_half_logdet(self.chols, self.event_shape[0])

    # -- Kronecker-structured noise ---------------------------------------------------

    def _noise_roots(self) -> tuple[jax.Array, ...]:
        """Lower-triangular ``C_i`` with ``C_i C_iᵀ = S_i``: identity, diagonal or Cholesky."""
        out = []
        for a, c, n in zip(self.noise_factors, self._noise_chols, self.factor_sizes, strict=True):
            if a is None:
                out.append(jnp.eye(n, dtype=self.loc.dtype))
            else:
                out.append(_diag_root(a) if c is None else c)
        return tuple(out)

    def _noise_mats(self) -> tuple[jax.Array, ...]:
        """The dense noise factors ``S_i`` (small, ``n_i × n_i``)."""
        return tuple(
            jnp.eye(n, dtype=self.loc.dtype)
            if a is None
            else a
            if c is not None
            else a[..., None] * jnp.eye(n, dtype=a.dtype)
            for a, c, n in zip(
                self.noise_factors, self._noise_chols, self.factor_sizes, strict=True
            )
        )

    def _noise_half_logdet(self) -> jax.Array:
        r""":math:`\log|\det C| = \tfrac12 \log\det \otimes_i S_i`."""
        roots = [
            c for c, a in zip(self._noise_roots(), self.noise_factors, strict=True) if a is not None
        ]
        return _tri_half_logdet(roots, self.event_shape[0])

    # -- structured solves, used by the marginal and the KL divergence ------------------

    def condition_number(self) -> jax.Array:
        r"""The condition number :math:`\kappa` of the covariance, batched.

        Exact on the eigen routes (:func:`kronjax.conditioning.eig_condition`, of
        :math:`\otimes_i \tilde K_i + \sigma^2 I` after whitening by the noise factors);
        for noise-free ``chols`` the estimate
        :math:`\prod_i (\max|\operatorname{diag} L_i| / \min|\operatorname{diag} L_i|)^2`.
        ``log_prob``, the solves, the marginal and prediction check it against the dtype
        (see :mod:`kronjax.conditioning`). Cost :math:`O(\sum_i n_i)`.
        """
        if self._eigvals is None and self.noise_factors is None:
            ratios = []
            for l in self.chols:
                diag = jnp.abs(jnp.diagonal(l, axis1=-2, axis2=-1))
                ratios.append(jnp.square(jnp.max(diag, -1) / jnp.min(diag, -1)))
            return math.prod(ratios)
        vals = self._white_vals if self.noise_factors is not None else self._eigvals
        return conditioning.eig_condition(vals, self._sigma2())

    def check_conditioning(self, where: str) -> None:
        """Refuse (``validate_args=True`` given) or warn once when :meth:`condition_number`
        passes the dtype's limit; ``where`` names the operation in the message."""
        conditioning.check(
            self.condition_number(),
            self.loc.dtype,
            f"KroneckerNormal.{where}",
            strict=self._strict,
        )

    def _logdet(self) -> jax.Array:
        r""":math:`\log\det K`, differentiable through the custom rules of the core."""
        if self.noise_factors is not None:
            core = linalg.kron_eig_logdet(
                self._white_vals, self._white_vecs, self._sigma2(), covs=self._white_covs
            )
            return core + 2 * self._noise_half_logdet()
        if self._eigvals is None:
            return 2 * self._chol_half_logdet()
        return linalg.kron_eig_logdet(
            self._eigvals, self._eigvecs, self._sigma2(), covs=self._eig_covs
        )

    def _solve(self, x: jax.Array) -> jax.Array:
        r""":math:`K^{-1} x` for ``x`` ``(..., N)``, :math:`O(N \sum_i n_i)`, never forming K.

        Eigenbasis route :math:`Q((Q^\top x)/D)` with the custom VJP of
        :func:`kronjax.linalg.kron_eig_solve`; with noise factors
        :math:`C^{-\top}(\otimes\tilde K_i + \sigma^2 I)^{-1} C^{-1} x`; noise-free Cholesky
        factors by two per-mode triangular solves.
        """
        self.check_conditioning("solve")
        if self.noise_factors is not None:
            roots = self._noise_roots()
            w = linalg.kron_solve_triangular(roots, x)
            w = linalg.kron_eig_solve(
                w, self._white_vals, self._white_vecs, self._sigma2(), covs=self._white_covs
            )
            return linalg.kron_solve_triangular(roots, w, trans=True)
        if self._eigvals is None:
            z = linalg.kron_solve_triangular(self.chols, x)
            return linalg.kron_solve_triangular(self.chols, z, trans=True)
        return linalg.kron_eig_solve(
            x, self._eigvals, self._eigvecs, self._sigma2(), covs=self._eig_covs
        )

    def _trace_inv(self, terms) -> jax.Array:
        r""":math:`\operatorname{tr}(K^{-1} \sum_t \otimes_i P^t_i)` for small dense ``P^t_i``.

        See :func:`kronjax.linalg.kron_eig_trace_inv`; with noise factors the ``P^t_i`` are
        whitened first (:math:`C_i^{-1} P^t_i C_i^{-\top}`); noise-free Cholesky factors
        give :math:`\prod_i \operatorname{tr}(K_i^{-1} P^t_i)` per term.
        """
        if self.noise_factors is not None:
            roots = self._noise_roots()
            terms = [[_whiten_factor(p, c) for p, c in zip(t, roots, strict=True)] for t in terms]
            return linalg.kron_eig_trace_inv(
                terms, self._white_vals, self._white_vecs, self._sigma2(), covs=self._white_covs
            )
        if self._eigvals is None:
            return sum(
                math.prod(
                    jnp.trace(_whiten_factor(p, l), axis1=-2, axis2=-1)
                    for p, l in zip(t, self.chols, strict=True)
                )
                for t in terms
            )
        return linalg.kron_eig_trace_inv(
            terms, self._eigvals, self._eigvecs, self._sigma2(), covs=self._eig_covs
        )

    def marginal(self, observed) -> KroneckerMarginal:
        r"""The exact marginal distribution of the cells at ``observed``.

        ``observed`` is a concrete boolean mask ``(N,)`` or an array of unique flat
        indices; the result has ``event_shape == (n_obs,)`` and serves as the likelihood
        of an incomplete grid: ``numpyro.sample("y", dist.marginal(mask), obs=y[mask])``.
        Exact, :math:`O(m N \sum_i n_i + m^3)` for m missing cells, never an
        :math:`N \times N` array; see :class:`kronjax.marginal.KroneckerMarginal`.
        """
        return KroneckerMarginal(self, observed, validate_args=self._validate_args)

    def log_prob(self, value) -> jax.Array:
        return self._log_prob(self._check_value(value))

    @validate_sample
    def _log_prob(self, value) -> jax.Array:
        self.check_conditioning("log_prob")
        r = value - self.loc
        if self.noise_factors is not None:  # whiten, then the eigen core (Rakitsch et al.)
            w = linalg.kron_solve_triangular(self._noise_roots(), r)
            core = linalg.kron_eig_logpdf(
                w, self._white_vals, self._white_vecs, self._sigma2(), covs=self._white_covs
            )
            return core - self._noise_half_logdet()
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
        return jnp.broadcast_to(0.5 * self._logdet() + 0.5 * n * (1 + _LOG_2PI), self.batch_shape)

    # -- sampling ---------------------------------------------------------------------

    def _roots(self) -> tuple[jax.Array, ...]:
        """Factor roots ``R_i`` with ``R_i R_iᵀ = K_i``, differentiable in the parameters."""
        if self.chols is not None:
            return self.chols
        if self.covs is not None:
            return tuple(map(linalg.psd_sqrt, self.covs, self._eigvals, self._eigvecs))
        return tuple(
            q * jnp.sqrt(jnp.maximum(v, 0))[..., None, :]
            for v, q in zip(self._eigvals, self._eigvecs, strict=True)
        )

    def sample(self, key, sample_shape=()) -> jax.Array:
        r"""Draw :math:`x = \mu + (\otimes R_i) z_1 + \sigma (\otimes C_i) z_2`.

        :math:`R_i R_i^\top = K_i`: ``R_i`` is ``L_i`` for ``chols``, the symmetric PSD
        root for ``covs`` and :math:`Q_i \operatorname{diag}\sqrt{\lambda_i}` for ``evds``;
        PSD factors are fine. :math:`C_i C_i^\top = S_i` are the noise roots (identity
        without ``noise_factors``). Reparameterized; cost :math:`O(N \sum_i n_i)` per draw.
        At an exactly singular factor any root's derivative is unbounded, so gradients
        through draws have huge variance there: add jitter before differentiating through
        such samples.
        """
        shape = tuple(sample_shape) + self.batch_shape + self.event_shape
        key_k, key_noise = jax.random.split(key)
        x = self.loc + linalg.kron_matvec(
            self._roots(), jax.random.normal(key_k, shape, self.loc.dtype)
        )
        if self.sigma is not None:
            noise = jax.random.normal(key_noise, shape, self.loc.dtype)
            if self.noise_factors is not None:  # σ (⊗ C_i) z₂, C_i C_iᵀ = S_i
                noise = linalg.kron_matvec(self._noise_roots(), noise)
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
        r""":math:`\operatorname{diag} K = \otimes_i \operatorname{diag} K_i + \sigma^2
        \otimes_i \operatorname{diag} S_i`, from the factors' diagonals."""
        if self.covs is not None:
            diags = [jnp.diagonal(k, axis1=-2, axis2=-1) for k in self.covs]
        else:  # row sums of squared roots: diag(R Rᵀ)
            diags = [jnp.sum(r * r, -1) for r in self._roots()]
        var = linalg.kron_outer(diags)
        if self.sigma is not None:
            noise_var = jnp.square(self.sigma)[..., None]
            if self.noise_factors is not None:
                noise_var = noise_var * linalg.kron_diag(self._noise_mats())
            var = var + noise_var
        return jnp.broadcast_to(var, self.batch_shape + self.event_shape)

    @property
    def covariance_matrix(self) -> jax.Array:
        """The dense ``N × N`` covariance. For small N only."""
        cov = linalg.kron_dense(self._factor_covs())
        if self.sigma is not None:
            if self.noise_factors is None:
                noise = jnp.eye(self.event_shape[0], dtype=cov.dtype)
            else:
                noise = linalg.kron_dense(self._noise_mats())
            cov = cov + jnp.square(self.sigma)[..., None, None] * noise
        return jnp.broadcast_to(cov, self.batch_shape + self.event_shape * 2)

    # -- validation -------------------------------------------------------------------

    def validate_args(self, strict: bool = True) -> None:
        """Check values: finite, ``sigma >= 0``, factors symmetric PSD (PD without noise),
        noise factors positive (diagonals) or symmetric positive definite (matrices)."""
        leaves = jax.tree.leaves(
            (self.loc, self.sigma, self.covs, self.chols, self._eigvals, self.noise_factors)
        )
        if not all(not_jax_tracer(x) for x in leaves):
            if strict:
                raise RuntimeError("Cannot validate arguments inside jitted code.")
            return
        if not bool(jnp.all(jnp.isfinite(self.loc))):
            raise ValueError("KroneckerNormal: loc has non-finite entries")
        if self.sigma is not None and not bool(
            jnp.all(jnp.isfinite(self.sigma) & (self.sigma >= 0))
        ):
            raise ValueError(f"KroneckerNormal: sigma must be finite and >= 0; got {self.sigma}")
        # sigma = 0 adds no noise: the factors must then be positive definite
        noise = self.sigma is not None and bool(jnp.all(self.sigma > 0))
        if self.noise_factors is not None:
            self._validate_noise()
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
            if self.covs is None:  # evds: the eigenvectors must be orthonormal
                n_i = f.shape[-1]
                gram = jnp.swapaxes(f, -1, -2) @ f - jnp.eye(n_i, dtype=f.dtype)
                off = float(jnp.max(jnp.abs(gram)))
                if off > 100 * n_i * float(jnp.finfo(f.dtype).eps):
                    raise ValueError(
                        f"KroneckerNormal: {arg} eigenvectors are not orthonormal "
                        f"(max |QᵀQ - I| = {off:.3g})"
                    )
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

    def _validate_noise(self) -> None:
        for i, (a, c) in enumerate(zip(self.noise_factors, self._noise_chols, strict=True)):
            arg = f"noise_factors[{i}]"
            if a is None:
                continue
            if not bool(jnp.all(jnp.isfinite(a))):
                raise ValueError(f"KroneckerNormal: {arg} has non-finite entries")
            if c is None:
                if bool(jnp.any(a <= 0)):
                    raise ValueError(
                        f"KroneckerNormal: {arg} is a diagonal of noise variances and must be "
                        f"> 0 (smallest entry {float(jnp.min(a)):.3g})"
                    )
                continue
            asym = float(jnp.max(jnp.abs(a - jnp.swapaxes(a, -1, -2))))
            if asym > _tol(a, a.shape[-1]):
                raise ValueError(
                    f"KroneckerNormal: {arg} is not symmetric (max |S - Sᵀ| = {asym:.3g})"
                )
            if not bool(jnp.all(jnp.isfinite(c))):
                raise ValueError(
                    f"KroneckerNormal: {arg} is not positive definite (its Cholesky "
                    "factorization failed)"
                )
