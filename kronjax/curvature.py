r"""Derivatives of the eigen cores that stay exact at second order, for repeated eigenvalues.

For :math:`A = K_1 \otimes \dots \otimes K_d + \sigma^2 I` the first derivatives of
:math:`\log\det A` and of the log density are built from two things:

* the solve :math:`\alpha = A^{-1} r`, here a ``lax.custom_linear_solve`` whose value is
  the eigen solve and whose derivatives come from the matvec with the factors,
  :math:`d\alpha = A^{-1}(dr - dA\,\alpha)`, exact to every order;
* the partial traces :math:`P_i(Y) = \operatorname{tr}_{\ne i}\big(A^{-1}(I \otimes
  Y_{\ne i})\big)` (the trace over every grid axis but ``i``) and
  :math:`t(Y) = \operatorname{tr}(A^{-1} \otimes_j Y_j)`: :math:`\partial \log\det A /
  \partial K_i = P_i(K)`, :math:`\partial/\partial\sigma^2 = t(I)`.

The partial traces carry a custom JVP, :math:`dP_i = P_i(dY) - \operatorname{tr}_{\ne
i}(A^{-1} dA\, A^{-1} (I \otimes Y_{\ne i}))`, evaluated in the eigenbasis without
differentiating eigenvectors. For Kronecker :math:`X = \otimes X_j` (each term of
:math:`dA`) and tildes for eigenbasis coordinates :math:`\tilde X_j = Q_j^\top X_j Q_j`,

.. math::
    \operatorname{tr}_{\ne i}(A^{-1} X A^{-1} (I \otimes Y_{\ne i}))
      = Q_i \Big[\tilde X_i \circ \big(U_i \,(\otimes_{j \ne i} M_j)\, U_i^\top\big)\Big]
        Q_i^\top, \quad M_j = \tilde X_j \circ \tilde Y_j^\top,

with :math:`U_i` the mode-``i`` unfolding of :math:`1/D`: mode products, :math:`O(N \sum_j
n_j)` per term; likewise :math:`\operatorname{tr}(A^{-1} X A^{-1} Y) = (1/D)^\top
(\otimes_j M_j)(1/D)`. A third derivative w.r.t. the factors would differentiate this
rule and is refused.

Reference: Saatçi (2011), ch. 5, for the first derivatives; the second are the product
rule applied to them.
"""

import jax
import jax.numpy as jnp

from kronjax.eigenbasis import (
    contract_others,
    eig_solve,
    outer_tensor,
    refuse_derivative,
    spectrum,
    sym,
    to_mode,
)
from kronjax.kron import kron_matvec, mode_product


def _rotate_matrix(q, m):
    return q.T @ m @ q


def _partial_traces_eig(eigvals, eigvecs, sigma2, ys):
    D = spectrum(eigvals, sigma2)
    diags = [jnp.diagonal(_rotate_matrix(q, y)) for q, y in zip(eigvecs, ys, strict=True)]
    mats = tuple((q * c) @ q.T for q, c in zip(eigvecs, contract_others(1 / D, diags)))
    return mats, jnp.sum(outer_tensor(diags) / D)


@jax.custom_jvp
def partial_traces(covs, eigvals, eigvecs, sigma2, ys):
    r"""``(P, t)``: :math:`P_i = \operatorname{tr}_{\ne i}(A^{-1}(I \otimes Y_{\ne i}))`,
    ``(n_i, n_i)`` each, and :math:`t = \operatorname{tr}(A^{-1} \otimes_j Y_j)`; with
    ``ys = covs``, :math:`P_i = \partial \log\det A / \partial K_i`. Unbatched.
    ``eigvals``/``eigvecs`` (of ``covs``) are constants; derivatives flow to ``covs``,
    ``sigma2`` and ``ys`` (see the module docstring)."""
    return _partial_traces_eig(eigvals, eigvecs, sigma2, ys)


def _sandwich(D, xs, ys, i=None):
    r"""In the eigenbasis: :math:`\operatorname{tr}_{\ne i}(D^{-1} X D^{-1} (I \otimes
    Y_{\ne i}))` as an ``(n_i, n_i)`` matrix, or with ``i=None`` the full trace
    :math:`\operatorname{tr}(D^{-1} X D^{-1} Y)`, for Kronecker ``X`` and ``Y``."""
    d = len(xs)
    u = 1 / D
    v = u
    for j in range(d):
        if j != i:
            v = mode_product(v, xs[j] * ys[j].T, j, d)
    if i is None:
        return jnp.sum(u * v)
    return xs[i] * (to_mode(u, i) @ to_mode(v, i).T)


@partial_traces.defjvp
def _partial_traces_jvp(primals, tangents):
    covs, eigvals, eigvecs, sigma2, ys = primals
    dcovs, _, _, dsigma2, dys = tangents
    refuse_derivative(covs, "a third derivative of the log density or log determinant")
    mats, trace = _partial_traces_eig(eigvals, eigvecs, sigma2, ys)
    d = len(eigvals)
    D = spectrum(eigvals, sigma2)
    rot = lambda ms: [_rotate_matrix(q, sym(m)) for q, m in zip(eigvecs, ms)]  # noqa: E731
    yt, dyt, dkt = rot(ys), rot(dys), rot(dcovs)
    lams = [jnp.diag(jnp.maximum(v, 0)) for v in eigvals]
    eyes = [jnp.eye(v.shape[-1], dtype=D.dtype) for v in eigvals]
    # dA = Σ_j K_1 ⊗ … dK_j … ⊗ K_d + dσ² I, each term in the eigenbasis
    das = [[dkt[j] if k == j else lams[k] for k in range(d)] for j in range(d)]
    das.append([dsigma2 * eyes[0]] + eyes[1:])
    ydiags = [jnp.diagonal(y) for y in yt]
    dmats = [jnp.zeros_like(m) for m in mats]
    dtrace = 0.0
    for j in range(d):  # P_i(dY): the product rule over the Y_j, diagonal in the eigenbasis
        diags = ydiags[:j] + [jnp.diagonal(dyt[j])] + ydiags[j + 1 :]
        dtrace = dtrace + jnp.sum(outer_tensor(diags) / D)
        for i, c in enumerate(contract_others(1 / D, diags)):
            if i != j:
                dmats[i] = dmats[i] + jnp.diag(c)
    for x in das:  # - tr_{≠i}(A⁻¹ dA A⁻¹ (I ⊗ Y_{≠i}))
        dtrace = dtrace - _sandwich(D, x, yt)
        dmats = [m - _sandwich(D, x, yt, i) for i, m in enumerate(dmats)]
    dmats = tuple(q @ sym(m) @ q.T for q, m in zip(eigvecs, dmats, strict=True))
    return (mats, trace), (dmats, dtrace)


def implicit_solve(covs, eigvals, eigvecs, sigma2, r):
    r""":math:`A^{-1} r` (unbatched) by the eigen solve, differentiable to every order
    through ``lax.custom_linear_solve``: derivatives w.r.t. ``covs`` and ``sigma2`` come
    from the matvec :math:`(\otimes K_i) x + \sigma^2 x`, never from eigenvectors."""
    covs = [sym(k) for k in covs]

    def matvec(x):
        return kron_matvec(covs, x) + sigma2 * x

    def solve(_, b):
        return eig_solve(eigvals, eigvecs, sigma2, b)

    return jax.lax.custom_linear_solve(matvec, r, solve, symmetric=True)


def logdet_gradient(covs, eigvals, eigvecs, sigma2):
    r"""The gradient of :math:`\log\det A`, ``(P(K), 0, 0, t(I))`` shaped like the arguments,
    differentiable to second order through :func:`partial_traces`."""
    mats, _ = partial_traces(covs, eigvals, eigvecs, sigma2, covs)
    eyes = tuple(jnp.eye(v.shape[-1], dtype=v.dtype) for v in eigvals)
    _, trace_inv = partial_traces(covs, eigvals, eigvecs, sigma2, eyes)
    zeros = jax.tree.map(jnp.zeros_like, (eigvals, eigvecs))
    return (mats, *zeros, trace_inv)


def logpdf_gradient_implicit(covs, eigvals, eigvecs, sigma2, r):
    r"""The gradient of the log density from the solve and the partial traces, so that
    differentiating it gives exact second derivatives:
    :math:`\partial/\partial K_i = \tfrac12 \operatorname{tr}_{\ne i}(\alpha\alpha^\top (I
    \otimes K_{\ne i})) - \tfrac12 P_i(K)`, :math:`\partial/\partial\sigma^2 =
    \tfrac12(\alpha^\top\alpha - t(I))`, :math:`\partial/\partial r = -\alpha`."""
    covs = tuple(sym(k) for k in covs)
    d = len(covs)
    sizes = tuple(k.shape[-1] for k in covs)
    alpha = implicit_solve(covs, eigvals, eigvecs, sigma2, r)
    mats, *_, trace_inv = logdet_gradient(covs, eigvals, eigvecs, sigma2)
    t = alpha.reshape(sizes)
    cov_bars = []
    for i in range(d):
        u = t
        for j in range(d):
            if j != i:
                u = mode_product(u, covs[j], j, d)
        cov_bars.append(0.5 * sym(to_mode(u, i) @ to_mode(t, i).T) - 0.5 * mats[i])
    sigma2_bar = 0.5 * (jnp.sum(alpha * alpha) - trace_inv)
    zeros = jax.tree.map(jnp.zeros_like, (eigvals, eigvecs))
    return (tuple(cov_bars), *zeros, sigma2_bar, -alpha)
