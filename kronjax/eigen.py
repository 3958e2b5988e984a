r"""The eigen cores: log density, log determinant and solve of
:math:`A = K_1 \otimes \dots \otimes K_d + \sigma^2 I` in the eigenbasis, with derivative
rules that never differentiate eigenvectors, so first and second derivatives stay exact
and finite when factors have repeated or clustered eigenvalues; forward and reverse
mode. Re-exported by :mod:`kronjax.linalg`.

References: Saatçi (2011), *Scalable inference for structured Gaussian process models*,
PhD thesis, ch. 5; Wilson et al. (2014), *Fast kernel learning for multidimensional
pattern extrapolation*.
"""

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from kronjax.curvature import implicit_solve, logdet_gradient, logpdf_gradient_implicit
from kronjax.eigenbasis import (
    contract_others,
    eig_args,
    eig_solve,
    other_eigvals,
    pair,
    refuse_derivative,
    rotate,
    spectrum,
    to_mode,
)
from kronjax.kron import (
    check_eig,
    check_grid_vector,
    fence,
    from_eigenbasis,
    per_example,
    sizes_sig,
)

_LOG_2PI = math.log(2 * math.pi)


# ----------------------------------------------------------------------------------
# The eigen core. Per-example functions act on unbatched factors; the public wrappers
# vectorize them over leading dimensions. With ``covs``, each core is a custom JVP whose
# rule is built from gradients that never differentiate eigenvectors (first order) and
# from :mod:`kronjax.curvature` (second order).


def _eig_forward(eigvals, eigvecs, sigma2, r):
    sizes = tuple(v.shape[-1] for v in eigvals)
    rt = rotate(eigvecs, r.reshape(sizes), transpose=True)
    D = spectrum(eigvals, sigma2)
    alpha = rt / D
    logp = -0.5 * (jnp.sum(rt * alpha) + jnp.sum(jnp.log(D)) + D.size * _LOG_2PI)
    return logp, alpha, D


def _eig_logpdf(eigvals, eigvecs, sigma2, r):
    return _eig_forward(eigvals, eigvecs, sigma2, r)[0]


@jax.custom_jvp
def _logpdf_value_and_grad(covs, eigvals, eigvecs, sigma2, r):
    """The log density and its gradient in one pass through the eigenbasis."""
    logp, alpha, D = _eig_forward(eigvals, eigvecs, sigma2, r)
    gs = contract_others(1 / D, [jnp.maximum(v, 0) for v in eigvals])
    cov_bars = []
    for i, (q, gi) in enumerate(zip(eigvecs, gs)):
        b = to_mode(alpha * other_eigvals(eigvals, i, root=True), i)
        cov_bars.append(from_eigenbasis(q, 0.5 * (fence(b @ b.T) - jnp.diag(gi))))
    sigma2_bar = 0.5 * (jnp.sum(alpha * alpha) - jnp.sum(1 / D))
    r_bar = -rotate(eigvecs, alpha, transpose=False).reshape(-1)
    zeros = jax.tree.map(jnp.zeros_like, (eigvals, eigvecs))
    return logp, (tuple(cov_bars), *zeros, sigma2_bar, r_bar)


@_logpdf_value_and_grad.defjvp
def _logpdf_value_and_grad_jvp(primals, tangents):
    refuse_derivative(primals[0], "a third derivative of the log density")
    value, grads = _logpdf_value_and_grad(*primals)
    _, grads_dot = jax.jvp(logpdf_gradient_implicit, primals, tangents)
    return (value, grads), (pair(grads, tangents), grads_dot)


@jax.custom_jvp
def _cov_logpdf(covs, eigvals, eigvecs, sigma2, r):
    return _eig_logpdf(eigvals, eigvecs, sigma2, r)


@_cov_logpdf.defjvp
def _cov_logpdf_jvp(primals, tangents):
    value, grads = _logpdf_value_and_grad(*primals)
    return value, pair(grads, tangents)


def _eig_logdet(eigvals, eigvecs, sigma2):
    return jnp.sum(jnp.log(spectrum(eigvals, sigma2)))


@jax.custom_jvp
def _cov_logdet(covs, eigvals, eigvecs, sigma2):
    return _eig_logdet(eigvals, eigvecs, sigma2)


@_cov_logdet.defjvp
def _cov_logdet_jvp(primals, tangents):
    return _cov_logdet(*primals), pair(logdet_gradient(*primals), tangents)


def eig_vectorized(fn_eig, fn_cov, eigvals, eigvecs, sigma2, covs, x=None, out="(N)"):
    """Vectorize a per-example eigen function over leading dims, after checking the inputs.

    ``fn_eig(eigvals, eigvecs, sigma2[, x])`` differentiates plainly; with ``covs``,
    ``fn_cov(covs, eigvals, eigvecs, sigma2[, x])`` (custom derivatives) runs on the
    stop-gradient eigendecomposition. ``x`` is ``(..., N)``; ``out`` the core output shape.
    """
    name = "kron_eig_" + fn_eig.__name__.removeprefix("_").removeprefix("eig_")
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
    ``sigma2`` and ``r`` through a custom JVP that never differentiates eigenvectors
    (``eigvals``/``eigvecs`` are treated as constants); forward and reverse mode. With
    :math:`\tilde\alpha = \tilde r/D` and :math:`W_i = \otimes_{j\ne i}\lambda_j`:

    .. math::
        \frac{\partial \log p}{\partial K_i}
            = \tfrac12 Q_i (S_i - \operatorname{diag} g_i) Q_i^\top,
        \quad S_i = \textstyle\sum_{\text{rest}} \tilde\alpha\,\tilde\alpha^\top W_i,
        \quad g_i = \sum_{\text{rest}} W_i / D,

    :math:`\partial/\partial\sigma^2 = \tfrac12(\sum\tilde\alpha^2 - \sum 1/D)` and
    :math:`\partial/\partial r = -Q\tilde\alpha`: exact and finite for repeated eigenvalues.
    Second derivatives differentiate the same gradient written with an implicit solve and
    partial traces of :math:`A^{-1}` (:mod:`kronjax.curvature`), also exact; a third
    derivative w.r.t. ``covs`` raises ``NotImplementedError``.
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
    :math:`\partial/\partial\sigma^2 = \sum 1/D` (see :func:`kron_eig_logpdf`), itself
    differentiable (:func:`kronjax.curvature.partial_traces`): Hessians are exact.
    """
    return eig_vectorized(_eig_logdet, _cov_logdet, eigvals, eigvecs, sigma2, covs, out="()")


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

    With ``covs`` the solve is a ``lax.custom_linear_solve``
    (:func:`kronjax.curvature.implicit_solve`): the value is the eigen solve, derivatives
    come from the matvec with the factors, :math:`d\alpha = A^{-1}(dr - dA\,\alpha)`, so they
    are exact to every order and mode and never differentiate eigenvectors.
    Without ``covs``, plain autodiff through ``eigvals``/``eigvecs``. Cost
    :math:`O(N \sum_i n_i)`, forward and backward.

    Args:
        r: right-hand side ``(..., N)``.
        eigvals, eigvecs: per factor ``(..., n_i)`` and ``(..., n_i, n_i)``.
        sigma2: noise variance, broadcastable to the batch shape.
        covs: optional factors ``(..., n_i, n_i)`` that carry the gradient.
    """
    return eig_vectorized(eig_solve, implicit_solve, eigvals, eigvecs, sigma2, covs, r)
