r"""The eigen cores: log density, log determinant and solve of
:math:`A = K_1 \otimes \dots \otimes K_d + \sigma^2 I` in the eigenbasis, with custom VJPs
that never differentiate eigenvectors, so gradients stay exact and finite when factors
have repeated or clustered eigenvalues. Re-exported by :mod:`kronjax.linalg`.

References: Saatçi (2011), *Scalable inference for structured Gaussian process models*,
PhD thesis, ch. 5; Wilson et al. (2014), *Fast kernel learning for multidimensional
pattern extrapolation*.
"""

import math
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp

from kronjax.kron import (
    check_eig,
    check_grid_vector,
    fence,
    fibres,
    from_eigenbasis,
    mode_product,
    per_example,
    sizes_sig,
    split_along,
)

_LOG_2PI = math.log(2 * math.pi)


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def _second_order(where: str, covs) -> jax.Array:
    return jnp.zeros(())


@_second_order.defjvp
def _second_order_jvp(where, primals, tangents):
    raise NotImplementedError(
        f"kronjax: a second-order derivative through {where} w.r.t. the covariance factors "
        "(covs, chols, evds, noise_factors, or what they are computed from, e.g. lengthscales) "
        "is not supported: the custom VJP treats the eigenvectors as constants, so it would "
        "be wrong. First-order gradients are exact; second order w.r.t. sigma, loc, the value "
        "and cross-covariances is exact. Forward mode (jax.jvp, jacfwd) is not supported."
    )


def refuse_second_order(covs, where: str) -> None:
    """Called in the forward pass of each custom VJP that carries factor gradients: when
    that pass is itself differentiated w.r.t. the factors (``jax.hessian``,
    ``jacrev(jacrev)``, ``jacfwd(grad)``), raise NotImplementedError instead of returning
    the wrong second derivative; first-order use never differentiates the forward pass."""
    _second_order(where, covs)


# ----------------------------------------------------------------------------------
# The eigen core. Per-example functions act on unbatched factors; the public wrappers
# vectorize them over leading dimensions.


def outer_tensor(vectors: Sequence[jax.Array]) -> jax.Array:
    """Outer product of 1-D vectors as a ``(n_1, …, n_d)`` tensor."""
    d = len(vectors)
    out = 1.0
    for k, v in enumerate(vectors):
        out = out * v.reshape((1,) * k + (-1,) + (1,) * (d - k - 1))
    return out


def spectrum(eigvals, sigma2) -> jax.Array:
    r""":math:`D = \lambda_1 \otimes \dots \otimes \lambda_d + \sigma^2` as a grid tensor.

    Under a grid split it is laid out split along axis 0, like the rotated residuals it
    divides, so XLA never gathers it when another use wants a different layout.
    """
    d = len(eigvals)
    return split_along(outer_tensor([jnp.maximum(v, 0) for v in eigvals]) + sigma2, 0, d)


def rotate(eigvecs, t, transpose: bool) -> jax.Array:
    """Mode products of the ``(n_1, …, n_d)`` tensor ``t`` with ``Q_i`` (or ``Q_iᵀ``)."""
    d = len(eigvecs)
    for k, q in enumerate(eigvecs):
        t = mode_product(t, q.T if transpose else q, k, d)
    return t


def _eig_forward(eigvals, eigvecs, sigma2, r):
    sizes = tuple(v.shape[-1] for v in eigvals)
    rt = rotate(eigvecs, r.reshape(sizes), transpose=True)
    D = spectrum(eigvals, sigma2)
    alpha = rt / D
    logp = -0.5 * (jnp.sum(rt * alpha) + jnp.sum(jnp.log(D)) + D.size * _LOG_2PI)
    return logp, alpha, D


def _eig_logpdf(eigvals, eigvecs, sigma2, r):
    return _eig_forward(eigvals, eigvecs, sigma2, r)[0]


def other_eigvals(eigvals, i, root: bool = False):
    """:math:`W_i = \\otimes_{j \\ne i} \\lambda_j` (or :math:`\\sqrt{W_i}`), broadcastable against
    the grid tensor. With the root, a :math:`W_i`-weighted contraction of a tensor with itself
    over the other axes is one Gram matrix."""
    vals = [jnp.maximum(v, 0) for v in eigvals]
    return outer_tensor(
        [jnp.ones_like(v) if j == i else jnp.sqrt(v) if root else v for j, v in enumerate(vals)]
    )


def _logdet_grads(eigvals, D):
    r""":math:`g_i[a] = \sum_{\text{rest}} W_i / D`, one vector per factor.

    Contractions of :math:`1/D` with the eigenvalue vectors, never an N-sized :math:`W_i`:
    the last axis is contracted once and the other axes' sums recurse on the result.
    """
    return contract_others(1 / D, [jnp.maximum(v, 0) for v in eigvals])


def contract_others(t, vectors):
    r"""For each axis i of ``t``: ``t`` contracted with ``vectors[j]`` over every axis j ≠ i."""
    if len(vectors) == 1:
        return [t]
    last = t.reshape(-1, t.shape[-1])
    head = contract_others((last @ vectors[-1]).reshape(t.shape[:-1]), vectors[:-1])
    return head + [outer_tensor(vectors[:-1]).reshape(-1) @ last]


@jax.custom_vjp
def _cov_logpdf(covs, eigvals, eigvecs, sigma2, r):
    return _eig_logpdf(eigvals, eigvecs, sigma2, r)


def _cov_logpdf_fwd(covs, eigvals, eigvecs, sigma2, r):
    refuse_second_order(covs, "the log density")
    logp, alpha, D = _eig_forward(eigvals, eigvecs, sigma2, r)
    return logp, (eigvals, eigvecs, alpha, D)


def _cov_logpdf_bwd(res, g):
    eigvals, eigvecs, alpha, D = res
    cov_bars = []
    for i, (q, gi) in enumerate(zip(eigvecs, _logdet_grads(eigvals, D))):
        b = to_mode(alpha * other_eigvals(eigvals, i, root=True), i)
        M = 0.5 * g * (fence(b @ b.T) - jnp.diag(gi))
        cov_bars.append(from_eigenbasis(q, M))
    sigma2_bar = 0.5 * g * (jnp.sum(alpha * alpha) - jnp.sum(1 / D))
    r_bar = -g * rotate(eigvecs, alpha, transpose=False).reshape(-1)
    zeros = jax.tree.map(jnp.zeros_like, (eigvals, eigvecs))
    return (tuple(cov_bars), *zeros, sigma2_bar, r_bar)


_cov_logpdf.defvjp(_cov_logpdf_fwd, _cov_logpdf_bwd)


def _eig_logdet(eigvals, eigvecs, sigma2):
    return jnp.sum(jnp.log(spectrum(eigvals, sigma2)))


@jax.custom_vjp
def _cov_logdet(covs, eigvals, eigvecs, sigma2):
    return _eig_logdet(eigvals, eigvecs, sigma2)


def _cov_logdet_fwd(covs, eigvals, eigvecs, sigma2):
    refuse_second_order(covs, "the log determinant")
    D = spectrum(eigvals, sigma2)
    return jnp.sum(jnp.log(D)), (eigvals, eigvecs, D)


def _cov_logdet_bwd(res, g):
    eigvals, eigvecs, D = res
    cov_bars = tuple(
        fence((q * (g * gi)) @ q.T) for q, gi in zip(eigvecs, _logdet_grads(eigvals, D))
    )
    zeros = jax.tree.map(jnp.zeros_like, (eigvals, eigvecs))
    return (cov_bars, *zeros, g * jnp.sum(1 / D))


_cov_logdet.defvjp(_cov_logdet_fwd, _cov_logdet_bwd)


def eig_args(eigvals, eigvecs, covs):
    """Stop gradients through the eigendecomposition when ``covs`` carry them instead."""
    if covs is None:
        return eigvals, eigvecs
    return jax.lax.stop_gradient((tuple(eigvals), tuple(eigvecs)))


def eig_vectorized(fn_eig, fn_cov, eigvals, eigvecs, sigma2, covs, x=None, out="(N)"):
    """Vectorize a per-example eigen function over leading dims, after checking the inputs.

    ``fn_eig(eigvals, eigvecs, sigma2[, x])`` differentiates plainly; with ``covs``,
    ``fn_cov(covs, eigvals, eigvecs, sigma2[, x])`` (a custom VJP) runs on the
    stop-gradient eigendecomposition. ``x`` is ``(..., N)``; ``out`` the core output shape.
    """
    name = "kron_eig_" + fn_eig.__name__.removeprefix("_eig_")
    check_eig(name, eigvals, eigvecs, covs)
    if x is not None:
        x = check_grid_vector(name, "the grid vector", x, [jnp.shape(v)[-1] for v in eigvals])
    d = len(eigvals)
    vals, vecs = eig_args(eigvals, eigvecs, covs)
    xs = () if x is None else (x,)
    sig = sizes_sig(vals, "({0})") + sizes_sig(vals, "({0},{0})") + ["()"] + ["(N)"] * len(xs)
    if covs is None:
        fn = lambda *a: fn_eig(a[:d], a[d : 2 * d], *a[2 * d :])  # noqa: E731
        return per_example(fn, sig, "->" + out)(*vals, *vecs, sigma2, *xs)
    fn = lambda *a: fn_cov(a[:d], a[d : 2 * d], a[2 * d : 3 * d], *a[3 * d :])  # noqa: E731
    sig = sizes_sig(vals, "({0},{0})") + sig
    return per_example(fn, sig, "->" + out)(*covs, *vals, *vecs, sigma2, *xs)


def kron_eig_logpdf(
    r: jax.Array,
    eigvals: Sequence[jax.Array],
    eigvecs: Sequence[jax.Array],
    sigma2: jax.Array,
    covs: Sequence[jax.Array] | None = None,
) -> jax.Array:
    r"""Log density of :math:`r \sim \mathcal N(0, K_1 \otimes \dots \otimes K_d + \sigma^2 I)`.

    With :math:`K_i = Q_i \operatorname{diag}(\lambda_i) Q_i^\top`,
    :math:`D = \lambda_1 \otimes \dots \otimes \lambda_d + \sigma^2` and
    :math:`\tilde r = (\otimes Q_i)^\top r`:

    .. math::
        \log p = -\tfrac12 \textstyle\sum \tilde r^2 / D - \tfrac12 \sum \log D
                 - \tfrac N2 \log 2\pi .

    When ``covs`` (the matrices :math:`K_i`) are given, gradients flow to ``covs``,
    ``sigma2`` and ``r`` through a custom VJP that never differentiates eigenvectors
    (``eigvals``/``eigvecs`` are treated as constants). With :math:`\tilde\alpha = \tilde r/D`
    and :math:`W_i = \otimes_{j\ne i}\lambda_j`:

    .. math::
        \frac{\partial \log p}{\partial K_i}
            = \tfrac12 Q_i (S_i - \operatorname{diag} g_i) Q_i^\top,
        \quad S_i = \textstyle\sum_{\text{rest}} \tilde\alpha\,\tilde\alpha^\top W_i,
        \quad g_i = \sum_{\text{rest}} W_i / D,

    :math:`\partial/\partial\sigma^2 = \tfrac12(\sum\tilde\alpha^2 - \sum 1/D)` and
    :math:`\partial/\partial r = -Q\tilde\alpha`: exact and finite for repeated eigenvalues.
    Without ``covs``, plain autodiff differentiates the formula above in ``eigvals`` and
    ``eigvecs`` (no ``eigh`` is involved). Negative eigenvalues (round-off of a PSD factor)
    are clipped to zero. Cost :math:`O(N \sum_i n_i)`.

    Args:
        r: residual ``(..., N)``.
        eigvals, eigvecs: per factor ``(..., n_i)`` and ``(..., n_i, n_i)``.
        sigma2: noise variance, shape broadcastable to the batch shape.
        covs: optional factors ``(..., n_i, n_i)`` matching ``eigvecs``.
    """
    return eig_vectorized(_eig_logpdf, _cov_logpdf, eigvals, eigvecs, sigma2, covs, r, "()")


def kron_eig_logdet(
    eigvals: Sequence[jax.Array],
    eigvecs: Sequence[jax.Array],
    sigma2: jax.Array,
    covs: Sequence[jax.Array] | None = None,
) -> jax.Array:
    r""":math:`\log\det(K_1 \otimes \dots \otimes K_d + \sigma^2 I) = \sum \log D`.

    With ``covs`` the gradient is the custom
    :math:`\partial/\partial K_i = Q_i \operatorname{diag}(g_i) Q_i^\top`,
    :math:`\partial/\partial\sigma^2 = \sum 1/D` (see :func:`kron_eig_logpdf`).
    """
    return eig_vectorized(_eig_logdet, _cov_logdet, eigvals, eigvecs, sigma2, covs, out="()")


# ----------------------------------------------------------------------------------
# Solves and the symmetric root. Their custom VJPs contract an eigenbasis cotangent
# of A = ⊗K_i + σ²I over every grid axis but i (weighted by W_i), as in the log density.


def to_mode(t: jax.Array, i: int) -> jax.Array:
    """The grid tensor ``t`` as an ``(n_i, N / n_i)`` matrix, axis ``i`` first."""
    return jnp.moveaxis(fibres(t, i, t.ndim), i, 0).reshape(t.shape[i], -1)


def rest_weights(eigvals, i) -> jax.Array:
    r""":math:`W_i = \otimes_{j \ne i} \lambda_j` flattened over the other axes, ``(N / n_i,)``."""
    return outer_tensor([jnp.maximum(v, 0) for j, v in enumerate(eigvals) if j != i]).reshape(-1)


def _eig_solve(eigvals, eigvecs, sigma2, r):
    sizes = tuple(v.shape[-1] for v in eigvals)
    alpha = rotate(eigvecs, r.reshape(sizes), transpose=True) / spectrum(eigvals, sigma2)
    return rotate(eigvecs, alpha, transpose=False).reshape(-1)


@jax.custom_vjp
def _cov_solve(covs, eigvals, eigvecs, sigma2, r):
    return _eig_solve(eigvals, eigvecs, sigma2, r)


def _cov_solve_fwd(covs, eigvals, eigvecs, sigma2, r):
    refuse_second_order(covs, "the solve")
    sizes = tuple(v.shape[-1] for v in eigvals)
    D = spectrum(eigvals, sigma2)
    alpha = rotate(eigvecs, r.reshape(sizes), transpose=True) / D
    return rotate(eigvecs, alpha, transpose=False).reshape(-1), (eigvals, eigvecs, alpha, D)


def _cov_solve_bwd(res, g):
    eigvals, eigvecs, alpha, D = res
    beta = rotate(eigvecs, g.reshape(D.shape), transpose=True) / D
    cov_bars = []
    for i, q in enumerate(eigvecs):
        m = fence(-(to_mode(beta, i) * rest_weights(eigvals, i)) @ to_mode(alpha, i).T)
        cov_bars.append(from_eigenbasis(q, 0.5 * (m + m.T)))
    zeros = jax.tree.map(jnp.zeros_like, (eigvals, eigvecs))
    r_bar = rotate(eigvecs, beta, transpose=False).reshape(-1)
    return (tuple(cov_bars), *zeros, -jnp.sum(beta * alpha), r_bar)


_cov_solve.defvjp(_cov_solve_fwd, _cov_solve_bwd)


def kron_eig_solve(
    r: jax.Array,
    eigvals: Sequence[jax.Array],
    eigvecs: Sequence[jax.Array],
    sigma2: jax.Array,
    covs: Sequence[jax.Array] | None = None,
) -> jax.Array:
    r"""Solve :math:`(K_1 \otimes \dots \otimes K_d + \sigma^2 I)\, \alpha = r` in the eigenbasis.

    .. math::
        \alpha = Q \big( (Q^\top r) / D \big), \quad Q = \otimes Q_i, \quad
        D = \lambda_1 \otimes \dots \otimes \lambda_d + \sigma^2 .

    With ``covs`` the gradient comes from a custom VJP that never differentiates
    eigenvectors: for a cotangent :math:`\bar\alpha`, with :math:`\beta = A^{-1}\bar\alpha`,
    :math:`\bar r = \beta`, :math:`\bar\sigma^2 = -\beta^\top\alpha` and

    .. math::
        \bar K_i = Q_i\, \operatorname{sym}(M_i)\, Q_i^\top, \quad
        M_i[a, b] = -\textstyle\sum_{\text{rest}} \tilde\beta[a, \text{rest}]\,
        \tilde\alpha[b, \text{rest}]\, W_i[\text{rest}],

    (tildes: eigenbasis coordinates, :math:`W_i = \otimes_{j \ne i} \lambda_j`), the
    gradient w.r.t. a symmetric :math:`K_i`; exact and finite for repeated eigenvalues.
    Without ``covs``, plain autodiff through ``eigvals``/``eigvecs``. Cost
    :math:`O(N \sum_i n_i)`, forward and backward.

    Args:
        r: right-hand side ``(..., N)``.
        eigvals, eigvecs: per factor ``(..., n_i)`` and ``(..., n_i, n_i)``.
        sigma2: noise variance, broadcastable to the batch shape.
        covs: optional factors ``(..., n_i, n_i)`` that carry the gradient.
    """
    return eig_vectorized(_eig_solve, _cov_solve, eigvals, eigvecs, sigma2, covs, r)
