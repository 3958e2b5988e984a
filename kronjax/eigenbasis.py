r"""The eigenbasis of :math:`A = K_1 \otimes \dots \otimes K_d + \sigma^2 I`: its spectrum,
rotations into and out of it, contractions over the other grid axes, and the two ways
the cores get forward-mode rules from their gradients. Shared by :mod:`kronjax.eigen`,
:mod:`kronjax.curvature`, :mod:`kronjax.trace`, :mod:`kronjax.roots` and
:mod:`kronjax.gp`.

With :math:`K_i = Q_i \operatorname{diag}(\lambda_i) Q_i^\top`,
:math:`A = Q \operatorname{diag}(D) Q^\top`, :math:`Q = \otimes_i Q_i`,
:math:`D = \lambda_1 \otimes \dots \otimes \lambda_d + \sigma^2`.
"""

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp

from kronjax.kron import fibres, mode_product, split_along


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def _refusal(what: str, covs) -> jax.Array:
    return jnp.zeros(())


@_refusal.defjvp
def _refusal_jvp(what, primals, tangents):
    raise NotImplementedError(
        f"kronjax: {what} w.r.t. the covariance factors (covs, chols, evds, noise_factors, "
        "or what they are computed from, e.g. lengthscales) is not supported: it would need "
        "derivatives of eigenvectors, which kronjax never takes, so it would be wrong. "
        "Supported: every first derivative, forward and reverse mode; second derivatives of "
        "log_prob, entropy, the marginal's log_prob and solves w.r.t. everything; second "
        "derivatives w.r.t. sigma, loc, the value and cross-covariances everywhere."
    )


def refuse_derivative(covs, what: str) -> None:
    """Called inside a derivative rule whose formula treats the eigenvectors as constants:
    when the rule is itself differentiated w.r.t. the factors, raise NotImplementedError
    naming ``what`` instead of returning a wrong number. Running the rule (one order of
    differentiation) never differentiates it."""
    _refusal(what, covs)


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


def other_eigvals(eigvals, i, root: bool = False):
    """:math:`W_i = \\otimes_{j \\ne i} \\lambda_j` (or :math:`\\sqrt{W_i}`), broadcastable against
    the grid tensor. With the root, a :math:`W_i`-weighted contraction of a tensor with itself
    over the other axes is one Gram matrix."""
    vals = [jnp.maximum(v, 0) for v in eigvals]
    return outer_tensor(
        [jnp.ones_like(v) if j == i else jnp.sqrt(v) if root else v for j, v in enumerate(vals)]
    )


def contract_others(t, vectors):
    r"""For each axis i of ``t``: ``t`` contracted with ``vectors[j]`` over every axis j ≠ i."""
    if len(vectors) == 1:
        return [t]
    last = t.reshape(-1, t.shape[-1])
    head = contract_others((last @ vectors[-1]).reshape(t.shape[:-1]), vectors[:-1])
    return head + [outer_tensor(vectors[:-1]).reshape(-1) @ last]


def to_mode(t: jax.Array, i: int) -> jax.Array:
    """The grid tensor ``t`` as an ``(n_i, N / n_i)`` matrix, axis ``i`` first."""
    return jnp.moveaxis(fibres(t, i, t.ndim), i, 0).reshape(t.shape[i], -1)


def rest_weights(eigvals, i) -> jax.Array:
    r""":math:`W_i = \otimes_{j \ne i} \lambda_j` flattened over the other axes, ``(N / n_i,)``."""
    return outer_tensor([jnp.maximum(v, 0) for j, v in enumerate(eigvals) if j != i]).reshape(-1)


def eig_args(eigvals, eigvecs, covs):
    """Stop gradients through the eigendecomposition when ``covs`` carry them instead."""
    if covs is None:
        return eigvals, eigvecs
    return jax.lax.stop_gradient((tuple(eigvals), tuple(eigvecs)))


def eig_solve(eigvals, eigvecs, sigma2, r):
    sizes = tuple(v.shape[-1] for v in eigvals)
    alpha = rotate(eigvecs, r.reshape(sizes), transpose=True) / spectrum(eigvals, sigma2)
    return rotate(eigvecs, alpha, transpose=False).reshape(-1)


def sym(m: jax.Array) -> jax.Array:
    """The symmetric part of a matrix: factors are symmetric, so a function of ``K`` is read
    as a function of ``sym(K)`` and its derivatives act on symmetric directions."""
    return 0.5 * (m + jnp.swapaxes(m, -1, -2))


def pair(grads, tangents) -> jax.Array:
    r""":math:`\langle \nabla f, \dot\theta \rangle` over matching pytrees: the tangent of a
    scalar from its gradient."""
    leaves = zip(jax.tree.leaves(grads), jax.tree.leaves(tangents), strict=True)
    return sum(jnp.sum(g * t) for g, t in leaves)


def jvp_from_gradient(value_and_grad, what: str):
    r"""A ``custom_jvp`` rule for a scalar core ``f(covs, eigvals, eigvecs, sigma2, x)`` from
    ``value_and_grad`` (same arguments, returning ``(f, ∇f)``, ``∇f`` shaped like the
    arguments): the tangent is :math:`\langle \nabla f, \dot\theta \rangle`, so reverse mode
    costs the gradient, as a custom VJP would. ``∇f`` treats the eigenvectors as constants,
    so the rule refuses to be differentiated w.r.t. ``covs`` (``what`` names it)."""

    def rule(primals, tangents):
        refuse_derivative(primals[0], what)
        value, grads = value_and_grad(*primals)
        return value, pair(grads, tangents)

    return rule


def jvp_from_vjp(fwd, bwd, what: str):
    r"""A ``custom_jvp`` rule for a core with a hand-written VJP (``fwd`` returns the output
    and residuals, ``bwd`` is linear in its cotangent): the tangent map is the transpose of
    ``bwd``, so forward mode costs a backward pass and reverse mode transposes it back.
    ``bwd`` treats the eigenvectors as constants, so the rule refuses to be differentiated
    w.r.t. ``covs`` (``what`` names it)."""

    def rule(primals, tangents):
        refuse_derivative(primals[0], what)
        out, res = fwd(*primals)
        _, transpose = jax.vjp(partial(bwd, res), jnp.zeros_like(out))
        (out_dot,) = transpose(tangents)
        return out, out_dot

    return rule
