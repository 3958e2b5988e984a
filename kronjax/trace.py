r"""The trace of :math:`A^{-1}` against sums of small Kronecker products (KL divergences),
:math:`A = K_1 \otimes \dots \otimes K_d + \sigma^2 I`, with a custom JVP that never
differentiates eigenvectors. Re-exported by :mod:`kronjax.linalg`.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from kronjax.eigenbasis import (
    contract_others,
    eig_args,
    jvp_from_gradient,
    other_eigvals,
    outer_tensor,
    spectrum,
)
from kronjax.kron import check_eig, check_factors, fence, from_eigenbasis, per_example, sizes_sig

# ----------------------------------------------------------------------------------
# The trace of A⁻¹ times a sum of Kronecker products, for KL divergences.


def _trace_forward(eigvals, eigvecs, sigma2, terms):
    D = spectrum(eigvals, sigma2)
    rotated = [[q.T @ p @ q for q, p in zip(eigvecs, term, strict=True)] for term in terms]
    diags = [[jnp.diagonal(m) for m in term] for term in rotated]
    trace = sum(jnp.sum(outer_tensor(ds) / D) for ds in diags)
    return trace, rotated, diags, D


def _eig_trace(eigvals, eigvecs, sigma2, terms):
    return _trace_forward(eigvals, eigvecs, sigma2, terms)[0]


@jax.custom_jvp
def _cov_trace(covs, eigvals, eigvecs, sigma2, terms):
    return _eig_trace(eigvals, eigvecs, sigma2, terms)


def _trace_value_and_grad(covs, eigvals, eigvecs, sigma2, terms):
    trace, rotated, diags, D = _trace_forward(eigvals, eigvecs, sigma2, terms)
    d = len(eigvals)
    cov_bars = [jnp.zeros_like(q) for q in eigvecs]
    term_bars = []
    sigma2_bar = 0.0
    for ms, ds in zip(rotated, diags, strict=True):
        bars = []
        for i, (q, c) in enumerate(zip(eigvecs, contract_others(1 / D, ds))):
            rest = tuple(j for j in range(d) if j != i)
            others = outer_tensor([jnp.ones_like(v) if j == i else v for j, v in enumerate(ds)])
            bars.append(fence((q * c) @ q.T))
            H = jnp.tensordot(others * other_eigvals(eigvals, i) / D, 1 / D, axes=(rest, rest))
            cov_bars[i] = cov_bars[i] - from_eigenbasis(q, ms[i].T * fence(H))
        term_bars.append(tuple(bars))
        sigma2_bar = sigma2_bar - jnp.sum(outer_tensor(ds) / (D * D))
    zeros = jax.tree.map(jnp.zeros_like, (eigvals, eigvecs))
    return trace, (tuple(cov_bars), *zeros, sigma2_bar, tuple(term_bars))


_cov_trace.defjvp(
    jvp_from_gradient(_trace_value_and_grad, "a second derivative of the trace of A⁻¹ (KL)")
)


def kron_eig_trace_inv(
    terms: Sequence[Sequence[jax.Array]],
    eigvals: Sequence[jax.Array],
    eigvecs: Sequence[jax.Array],
    sigma2: jax.Array,
    covs: Sequence[jax.Array] | None = None,
) -> jax.Array:
    r""":math:`\operatorname{tr}\big(A^{-1} \sum_t P^t_1 \otimes \dots \otimes P^t_d\big)`,
    :math:`A = K_1 \otimes \dots \otimes K_d + \sigma^2 I`, without forming either product.

    In the eigenbasis of :math:`A` only the diagonals of the rotated factors matter:

    .. math::
        \operatorname{tr}(A^{-1} \otimes_i P_i) = \textstyle\sum_{\text{grid}}
        \big(\otimes_i m_i\big) / D, \quad m_i = \operatorname{diag}(Q_i^\top P_i Q_i).

    With ``covs`` the gradient w.r.t. :math:`K_i` is the custom
    :math:`-Q_i \big(\sum_t M^t_i{}^\top \circ H^t_i\big) Q_i^\top`,
    :math:`M^t_i = Q_i^\top P^t_i Q_i`,
    :math:`H^t_i[a, b] = \sum_{\text{rest}} W_i \prod_{j\ne i} m^t_j / (D[a,\cdot] D[b,\cdot])`
    (the contraction of :math:`-A^{-1} P A^{-1}` with the other factors), and
    :math:`\partial/\partial\sigma^2 = -\sum_t \sum (\otimes_i m^t_i)/D^2`; the gradient
    w.r.t. :math:`P^t_i` is :math:`Q_i \operatorname{diag}(c^t_i) Q_i^\top`,
    :math:`c^t_i = \sum_{\text{rest}} \prod_{j\ne i} m^t_j / D`. Cost
    :math:`O(\sum_i n_i^3 + N \sum_i n_i)` per term.

    Args:
        terms: a sequence of terms, each a sequence of d matrices ``(..., n_i, n_i)``.
        eigvals, eigvecs, sigma2, covs: :math:`A`, as in :func:`kron_eig_solve`.
    """
    check_eig("kron_eig_trace_inv", eigvals, eigvecs, covs)
    sizes = tuple(jnp.shape(v)[-1] for v in eigvals)
    d, nt = len(sizes), len(terms)
    for t, term in enumerate(terms):
        term = check_factors("kron_eig_trace_inv", f"terms[{t}]", term, square=True)
        if tuple(p.shape[-1] for p in term) != sizes:
            raise ValueError(
                f"kron_eig_trace_inv: terms[{t}] has factor sizes "
                f"{tuple(p.shape[-1] for p in term)}; expected {sizes}"
            )
    vals, vecs = eig_args(eigvals, eigvecs, covs)
    flat = [p for term in terms for p in term]

    def unflatten(ps):
        return tuple(tuple(ps[t * d : (t + 1) * d]) for t in range(nt))

    sig = (
        sizes_sig(sizes, "({0})")
        + sizes_sig(sizes, "({0},{0})")
        + ["()"]
        + sizes_sig(sizes, "({0},{0})") * nt
    )
    if covs is None:
        fn = lambda *a: _eig_trace(a[:d], a[d : 2 * d], a[2 * d], unflatten(a[2 * d + 1 :]))  # noqa: E731
        return per_example(fn, sig, "->()")(*vals, *vecs, sigma2, *flat)

    def fn(*a):
        return _cov_trace(
            a[:d], a[d : 2 * d], a[2 * d : 3 * d], a[3 * d], unflatten(a[3 * d + 1 :])
        )

    sig = sizes_sig(sizes, "({0},{0})") + sig
    return per_example(fn, sig, "->()")(*covs, *vals, *vecs, sigma2, *flat)
