r"""Gaussian-process prediction from a ``KroneckerNormal`` fitted on a grid.

For training observations :math:`y \sim \mathcal N(\mu, A)`,
:math:`A = K_1 \otimes \dots \otimes K_d + \sigma^2 I = Q \operatorname{diag}(D) Q^\top`,
and test points with cross-covariance :math:`K_{*N}` to the grid, the posterior of the
latent function at the test points has

.. math::
    \mathbb E[f_*] = K_{*N} A^{-1} (y - \mu), \qquad
    \operatorname{Var}[f_*] = \operatorname{diag} K_{**}
        - \operatorname{diag}(K_{*N} A^{-1} K_{N*}).

When the test points form a grid, :math:`K_{*N} = \otimes_i K_{*i}` and every term is a
structured product (Saatçi 2011, ch. 5; Wilson et al. 2014). No ``N×N``, ``M×N`` or
``M×M`` array is formed.

References: Saatçi (2011), *Scalable inference for structured Gaussian process models*,
PhD thesis; Wilson et al. (2014), *Fast kernel learning for multidimensional pattern
extrapolation*.
"""

import math
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from kronjax import linalg
from kronjax.distribution import KroneckerNormal
from kronjax.incomplete import IterativeMarginal
from kronjax.linalg import (
    from_eigenbasis,
    mode_product,
    outer_tensor,
    rest_weights,
    spectrum,
    to_mode,
)

__all__ = ["predict", "cartesian"]


def cartesian(*axes) -> jax.Array:
    r"""The points of the grid :math:`X_1 \times \dots \times X_d` in the flattening order.

    Row :math:`i_1 (n_2 \cdots n_d) + \dots + i_d` is
    :math:`(X_1[i_1], \dots, X_d[i_d])`, the order of ``jnp.kron`` and of
    ``KroneckerNormal`` (last axis fastest), so ``values.reshape(n_1, …, n_d)`` puts
    each value at its point.

    Args:
        axes: ``d`` arrays, each ``(n_i,)`` or ``(n_i, k_i)`` (multi-dimensional inputs
            of one factor, as in PyMC's ``MarginalKron``).

    Returns:
        ``(N, d)`` for 1-D axes; in general ``(N, k_1 + … + k_d)``.
    """
    if not axes:
        raise ValueError("cartesian: give at least one axis")
    cols = []
    for i, x in enumerate(axes):
        x = jnp.asarray(x)
        if x.ndim not in (1, 2):
            raise ValueError(f"cartesian: axes[{i}] has shape {x.shape}; expected (n,) or (n, k)")
        cols.append(x.reshape(x.shape[0], -1))
    index = np.indices(tuple(c.shape[0] for c in cols)).reshape(len(cols), -1)
    return jnp.concatenate([c[ix] for c, ix in zip(cols, index, strict=True)], axis=-1)


# ----------------------------------------------------------------------------------
# Variance reduction diag(K*N A⁻¹ KN*). Per-example functions act on unbatched factors.
# With B_i = K*_i Q_i the reduction is (⊗ B_i ∘ B_i)(1/D) on a grid, and at point j
# Σ_k Π_i B_i[j, k_i]² / D[k]. Gradients w.r.t. K*_i and σ² come from autodiff with the
# eigenbasis held fixed (exact: they do not move it); those w.r.t. K_i from the custom
# VJPs below, which never differentiate eigenvectors.


def _grid_reduction(eigvals, eigvecs, sigma2, kstars):
    bsq = [jnp.square(k @ q) for k, q in zip(kstars, eigvecs, strict=True)]
    return linalg.kron_matvec(bsq, 1 / spectrum(eigvals, sigma2).reshape(-1))


def _points_reduction(eigvals, eigvecs, sigma2, kstars):
    bsq = [jnp.square(k @ q) for k, q in zip(kstars, eigvecs, strict=True)]
    return linalg.kron_rows_matvec(bsq, 1 / spectrum(eigvals, sigma2))


def _sum_map(fn, xs, init):
    """``sum(fn(x) for x in xs)`` over the leading axis, one term at a time (memory of one).

    ``fn`` is rematerialized, so differentiating the sum (forward mode transposes the
    reduction VJPs) never stacks a per-term residual into an ``M×N`` array."""
    fn = jax.checkpoint(fn)
    step = lambda acc, x: (jax.tree.map(jnp.add, acc, fn(x)), None)
    return jax.lax.scan(step, init, xs)[0]


def _fixed_basis_vjp(fn, res, h):
    """Cotangents of ``sigma2`` and ``kstars`` with the eigenbasis held fixed."""
    eigvals, eigvecs, sigma2, kstars = res
    _, vjp = jax.vjp(partial(fn, eigvals, eigvecs), sigma2, kstars)
    return vjp(h)


_VARIANCE_2ND = "a second derivative of the predictive variance"


@jax.custom_jvp
def _cov_grid_reduction(covs, eigvals, eigvecs, sigma2, kstars):
    return _grid_reduction(eigvals, eigvecs, sigma2, kstars)


def _cov_grid_reduction_fwd(covs, eigvals, eigvecs, sigma2, kstars):
    res = (eigvals, eigvecs, sigma2, kstars)
    return _grid_reduction(*res), res


def _cov_grid_reduction_bwd(res, h):
    r"""With :math:`\bar A = -\sum_m h_m \beta_m \beta_m^\top`, :math:`\tilde\beta_m = C_m / D`,
    :math:`C = \otimes B_i`: :math:`\bar K_i = Q_i M_i Q_i^\top` with
    :math:`M_i[a,b] = -\sum_{m_i,\text{rest}} B_i[m_i,a] B_i[m_i,b]\, H_i[m_i,\text{rest}]
    / (D[a,\text{rest}] D[b,\text{rest}])`, where :math:`H_i = W_i \cdot` (``h`` contracted
    with :math:`B_j^2` over every test axis :math:`j \ne i`). Cost
    :math:`O(N \sum_i m_i n_i)`, memory :math:`O(N + M)`."""
    eigvals, eigvecs, sigma2, kstars = res
    sigma2_bar, kstar_bars = _fixed_basis_vjp(_grid_reduction, res, h)
    dinv = 1 / spectrum(eigvals, sigma2)
    b = [k @ q for k, q in zip(kstars, eigvecs, strict=True)]
    d = len(b)
    ht = h.reshape(tuple(k.shape[0] for k in kstars))
    cov_bars = []
    for i, q in enumerate(eigvecs):
        t = ht
        for j in range(d):
            if j != i:
                t = mode_product(t, jnp.square(b[j]).T, j, d)
        hw, di = to_mode(t, i) * rest_weights(eigvals, i), to_mode(dinv, i)

        def term(row, di=di):  # one test row m_i at a time: memory O(N)
            u = row[0][:, None] * di
            return -(u * row[1]) @ u.T

        cov_bars.append(from_eigenbasis(q, _sum_map(term, (b[i], hw), jnp.zeros_like(q))))
    zeros = jax.tree.map(jnp.zeros_like, (eigvals, eigvecs))
    return (tuple(cov_bars), *zeros, sigma2_bar, kstar_bars)


_cov_grid_reduction.defjvp(
    linalg.jvp_from_vjp(_cov_grid_reduction_fwd, _cov_grid_reduction_bwd, _VARIANCE_2ND)
)


@jax.custom_jvp
def _cov_points_reduction(covs, eigvals, eigvecs, sigma2, kstars):
    return _points_reduction(eigvals, eigvecs, sigma2, kstars)


def _cov_points_reduction_fwd(covs, eigvals, eigvecs, sigma2, kstars):
    res = (eigvals, eigvecs, sigma2, kstars)
    return _points_reduction(*res), res


def _cov_points_reduction_bwd(res, h):
    r"""Per point j, :math:`\tilde c_j = (\otimes_i B_i[j]) / D` and
    :math:`M_i[a,b] = -\sum_j h_j \sum_{\text{rest}} W_i\, \tilde c_j[a,\text{rest}]\,
    \tilde c_j[b,\text{rest}]`. Cost :math:`O(p N \sum_i n_i)`, memory :math:`O(N)` per
    point."""
    eigvals, eigvecs, sigma2, kstars = res
    sigma2_bar, kstar_bars = _fixed_basis_vjp(_points_reduction, res, h)
    dinv = 1 / spectrum(eigvals, sigma2)
    b = [k @ q for k, q in zip(kstars, eigvecs, strict=True)]
    weights = [rest_weights(eigvals, i) for i in range(len(b))]

    def point(args):
        rows, hj = args
        c = outer_tensor(rows) * dinv
        return [-hj * (to_mode(c, i) * w) @ to_mode(c, i).T for i, w in enumerate(weights)]

    ms = _sum_map(point, (b, h), [jnp.zeros_like(q) for q in eigvecs])
    cov_bars = tuple(from_eigenbasis(q, m) for q, m in zip(eigvecs, ms, strict=True))
    zeros = jax.tree.map(jnp.zeros_like, (eigvals, eigvecs))
    return (cov_bars, *zeros, sigma2_bar, kstar_bars)


_cov_points_reduction.defjvp(
    linalg.jvp_from_vjp(_cov_points_reduction_fwd, _cov_points_reduction_bwd, _VARIANCE_2ND)
)


# ----------------------------------------------------------------------------------


def _check_inputs(dist, y, cross_covs, test_diags, grid):
    if not isinstance(dist, KroneckerNormal):
        raise TypeError(f"predict: dist must be a KroneckerNormal; got {type(dist).__name__}")
    sizes = dist.factor_sizes
    d, n = len(sizes), math.prod(sizes)
    y = jnp.asarray(y)
    if y.ndim == 0 or y.shape[-1] != n:
        raise ValueError(
            f"predict: y has shape {y.shape}; expected (..., {n}), N = prod{sizes} "
            "in the flattening order of the training grid"
        )
    if not isinstance(cross_covs, Sequence) or len(cross_covs) != d:
        got = len(cross_covs) if isinstance(cross_covs, Sequence) else type(cross_covs).__name__
        raise ValueError(
            f"predict: cross_covs has {got} entries; expected d = {d} matrices "
            f"K*_i of shape (m_i, n_i), one per factor of sizes {sizes}"
        )
    kstars = tuple(jnp.asarray(k) for k in cross_covs)
    for i, (k, n_i) in enumerate(zip(kstars, sizes, strict=True)):
        if k.ndim < 2 or k.shape[-1] != n_i:
            raise ValueError(
                f"predict: cross_covs[{i}] has shape {k.shape}; expected (..., m_{i}, {n_i}): "
                f"rows are test inputs, columns the {n_i} training inputs of factor {i}"
            )
    rows = tuple(k.shape[-2] for k in kstars)
    if not grid and len(set(rows)) != 1:
        raise ValueError(
            f"predict: with grid=False every cross_covs[i] has one row per test point; "
            f"got row counts {rows}"
        )
    if test_diags is None:
        return y, kstars, None
    if not isinstance(test_diags, Sequence) or len(test_diags) != d:
        got = len(test_diags) if isinstance(test_diags, Sequence) else type(test_diags).__name__
        raise ValueError(
            f"predict: test_diags has {got} entries; expected d = {d} vectors "
            f"diag k_i(X*_i, X*_i) of lengths {rows}"
        )
    diags = tuple(jnp.asarray(t) for t in test_diags)
    for i, (t, m) in enumerate(zip(diags, rows, strict=True)):
        if t.ndim < 1 or t.shape[-1] != m:
            raise ValueError(
                f"predict: test_diags[{i}] has shape {t.shape}; expected (..., {m}) to match "
                f"cross_covs[{i}] of shape {kstars[i].shape}"
            )
    return y, kstars, diags


def predict(
    dist: KroneckerNormal,
    y: jax.Array,
    cross_covs: Sequence[jax.Array],
    test_diags: Sequence[jax.Array] | None = None,
    *,
    pred_noise: bool = False,
    grid: bool = True,
) -> tuple[jax.Array, jax.Array | None]:
    r"""Posterior mean and variance of the latent GP at test points, exactly, in structure.

    ``dist`` is the ``KroneckerNormal`` of the training grid,
    :math:`y \sim \mathcal N(\mu, A)`, :math:`A = \otimes K_i + \sigma^2 I
    = Q \operatorname{diag}(D) Q^\top`. With :math:`\alpha = A^{-1}(y - \mu)`,
    :math:`B_i = K_{*i} Q_i`:

    .. math::
        m_* = K_{*N}\, \alpha, \qquad
        v_* = \operatorname{diag} K_{**} - \operatorname{diag}(K_{*N} A^{-1} K_{N*})
              \;[+\, \sigma^2 \text{ if pred\_noise}].

    - ``grid=True``: the test set is the grid :math:`X_{*1} \times \dots \times X_{*d}`,
      :math:`K_{*N} = \otimes K_{*i}`, so :math:`m_* = (\otimes K_{*i})\,\alpha` and
      :math:`v_* = \otimes \operatorname{diag} K_{**i} - (\otimes B_i \circ B_i)(1/D)`.
      Cost :math:`O(M \sum n_i + N \sum n_i + \sum n_i^3)`, :math:`M = \prod m_i`.
    - ``grid=False``: row j of every :math:`K_{*i}` is test point j, whose cross-covariance
      is the Kronecker vector :math:`\otimes_i K_{*i}[j]`; :math:`m_*[j]` contracts the
      :math:`\alpha` tensor with those d vectors and
      :math:`v_*[j] = \prod_i K_{**i}[j] - \sum_k \prod_i B_i[j, k_i]^2 / D_k`.
      Cost :math:`O(p N)`, largest intermediate ``(p, N / max n_i)``.

    With ``noise_factors`` (:math:`A = C(\otimes\tilde K_i + \sigma^2 I)C^\top`,
    :math:`C = \otimes C_i`) the same formulas run on the whitened factors
    :math:`\tilde K_i`, the residual :math:`C^{-1}(y - \mu)` and the cross-covariances
    :math:`K_{*i} C_i^{-\top}`; ``pred_noise`` is then undefined (the noise factors
    describe the training grid only) and raises ``ValueError``.

    The prior mean at the test points is taken as zero: ``mean`` is
    :math:`K_{*N} A^{-1}(y - \mu)`, the posterior mean of :math:`f_* - m(X_*)`. Add your
    mean function at the test points yourself (for a constant ``loc`` c, add c). PyMC's
    ``MarginalKron.conditional`` adds ``mean_func(Xnew)``; kronjax has no mean function.

    Gradients w.r.t. every input are exact and finite, also for factors with repeated
    eigenvalues: the eigendecompositions are never differentiated (custom rules through
    :func:`kronjax.linalg.kron_eig_solve` and the variance reduction; see
    ``kronjax.linalg``). Backward cost: :math:`O(N \sum_i m_i n_i)` for the grid
    variance, :math:`O(p N \sum_i n_i)` for the point variance w.r.t. the training
    factors. The noise-free ``chols`` parameterization is moved to the eigenbasis of
    :math:`L_i L_i^\top` (one ``eigh`` per factor). Works under ``jit``, ``vmap`` and
    ``grad``; leading dims of ``dist``, ``y``, ``cross_covs`` and ``test_diags`` broadcast.

    Args:
        dist: the training ``KroneckerNormal`` (any parameterization, batch shape ``b``),
            or the ``IterativeMarginal`` of an incomplete grid
            (``dist.marginal(observed, method="iterative")``; see
            :meth:`kronjax.incomplete.IterativeMarginal.predict`).
        y: observations ``(..., N)`` in the flattening order of the grid (for an
            incomplete grid, ``(n_obs,)`` at the observed cells).
        cross_covs: ``[K*_1, …, K*_d]``, ``K*_i = k_i(X*_i, X_i)`` of shape
            ``(..., m_i, n_i)``; with ``grid=False`` every ``m_i`` equals ``p``.
        test_diags: ``[diag k_i(X*_i, X*_i)]``, shapes ``(..., m_i)``; when None only the
            mean is computed and ``var`` is None.
        pred_noise: add :math:`\sigma^2` (the noise variance) to ``var``: the predictive
            distribution of a new noisy observation.
        grid: whether the test set is the grid of the ``cross_covs`` rows (True) or the
            ``p`` points given row by row (False).

    The condition number :math:`\kappa` of the training covariance is checked against the
    dtype (:mod:`kronjax.conditioning`: a warning, or ``ValueError`` for a ``dist`` built
    with ``validate_args=True``), and negative variances within the round-off
    :math:`4\kappa\epsilon \cdot \operatorname{diag} K_{**}` are set to 0, so a
    consistent ``cross_covs``/``test_diags`` pair never gives a negative variance.

    Returns:
        ``(mean, var)``, each ``(..., M)`` (grid, in the flattening order) or
        ``(..., p)`` (points), with the same leading dims (``var`` does not depend on
        ``y`` but is broadcast to its batch dims); ``var`` is None without ``test_diags``.
    """
    if isinstance(dist, IterativeMarginal):
        return dist.predict(y, cross_covs, test_diags, pred_noise=pred_noise, grid=grid)
    y, kstars, diags = _check_inputs(dist, y, cross_covs, test_diags, grid)
    cond = dist.check_conditioning("predict")
    cov = dist.covariance
    vals, vecs, covs = cov.eigensystem()
    sigma2 = jnp.asarray(cov.sigma2(), dist.loc.dtype)
    r = y - dist.loc
    if dist.noise_factors is not None:
        if pred_noise:
            raise ValueError(
                "predict: pred_noise=True is undefined with noise_factors, which give the "
                "noise of the training grid only; add the noise variance at your test points"
            )
    # A = C (⊗K̃_i + σ²I) Cᵀ: the residual whitened by C⁻¹, the cross-covariances by C⁻ᵀ
    r, kstars = cov.whiten(r), cov.whiten_cross(kstars)
    alpha = linalg.kron_eig_solve(r, vals, vecs, sigma2, covs=covs)
    if grid:
        mean = linalg.kron_matvec(kstars, alpha)
    else:
        sizes = dist.factor_sizes
        sig = ",".join(["(N)"] + [f"(p,n{i})" for i in range(len(sizes))]) + "->(p)"
        contract = lambda a, *ks: linalg.kron_rows_matvec(ks, a.reshape(sizes))
        mean = jnp.vectorize(contract, signature=sig)(alpha, *kstars)
    if diags is None:
        return mean, None

    d, n_cov = len(vals), 0 if covs is None else len(covs)

    def reduction(*a):
        cov_args, a = a[:n_cov], a[n_cov:]
        args = (a[:d], a[d : 2 * d], a[2 * d], a[2 * d + 1 :])
        if covs is None:
            return (_grid_reduction if grid else _points_reduction)(*args)
        return (_cov_grid_reduction if grid else _cov_points_reduction)(cov_args, *args)

    squares = [f"(n{i},n{i})" for i in range(d)]
    rows = [f"(m{i},n{i})" if grid else f"(p,n{i})" for i in range(d)]
    sig = squares[:n_cov] + [f"(n{i})" for i in range(d)] + squares + ["()"] + rows
    red = jnp.vectorize(reduction, signature=",".join(sig) + "->(M)")(
        *(covs or ()), *vals, *vecs, sigma2, *kstars
    )
    prior = linalg.kron_outer(diags) if grid else math.prod(diags)
    var = prior - red
    # Round-off of the reduction is about κε·prior: clip negatives of that size to 0
    slack = 4 * float(jnp.finfo(var.dtype).eps) * cond[..., None] * prior
    var = jnp.where((var < 0) & (var >= -slack), 0, var)
    if pred_noise:
        var = var + sigma2[..., None]
    shape = jnp.broadcast_shapes(mean.shape, var.shape)
    return jnp.broadcast_to(mean, shape), jnp.broadcast_to(var, shape)
