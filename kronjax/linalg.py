r"""Structured linear algebra for Kronecker products, never forming the product.

Every function works on the factors :math:`A_1, \dots, A_d` of
:math:`A = A_1 \otimes \dots \otimes A_d` and on vectors in the row-major flattening
order of ``jnp.kron``: grid element :math:`(i_1, \dots, i_d)` sits at flat index
:math:`i_1 (n_2 \cdots n_d) + \dots + i_d`.

The eigen log-density core has a custom VJP that never differentiates eigenvectors
(see :func:`kron_eig_logpdf`), so gradients stay exact and finite when factors have
repeated or clustered eigenvalues. References: Saatçi (2011), *Scalable inference for
structured Gaussian process models*, PhD thesis, ch. 5; Wilson et al. (2014), *Fast
kernel learning for multidimensional pattern extrapolation*.
"""

import math
from collections.abc import Sequence
from contextvars import ContextVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kronjax import lapack

__all__ = [
    "kron_matvec",
    "kron_diag",
    "kron_dense",
    "kron_outer",
    "kron_solve_triangular",
    "kron_eig_logpdf",
    "kron_eig_logdet",
    "kron_eig_solve",
    "kron_eig_sqrt_matvec",
    "kron_eig_trace_inv",
    "psd_sqrt",
    "check_factors",
    "from_eigenbasis",
    "mode_product",
    "outer_tensor",
    "rest_weights",
    "spectrum",
    "to_mode",
]

_GRID = "abcdefghijklmnopqrstuvwxy"  # einsum letters of the grid axes; "z" is the new one
_LOG_2PI = math.log(2 * math.pi)

# A grid split across devices: ``(mesh, axis name)`` while a function wrapped by
# ``kronjax.sharding.split_grid`` is traced, else None. Read at trace time only.
GRID_SPLIT: ContextVar[tuple[Mesh, str] | None] = ContextVar("kronjax_grid_split", default=None)


def _fence(x: jax.Array) -> jax.Array:
    """``x`` unchanged, as a boundary XLA's CPU compiler does not fuse across.

    jaxlib 0.10 fuses chains of float64 dots with the elementwise ops and reductions around
    them (the caller's chain rule included) into one YNNPACK fusion that runs 5–10× slower
    than the same dots apart (``bench/profile.py``); a ``select`` between them keeps them
    apart. Costs one elementwise pass.
    """
    return jnp.where(jnp.isnan(x), jnp.nan, x)


def from_eigenbasis(q: jax.Array, m: jax.Array) -> jax.Array:
    r""":math:`Q M Q^\top`, the products kept apart by :func:`_fence`: a cotangent ``M`` in a
    factor's eigenbasis back to the original one (with ``Q = Q_iᵀ``, into the eigenbasis)."""
    return _fence(_fence(q @ m) @ jnp.swapaxes(q, -1, -2))


def _split_along(t: jax.Array, j: int, d: int) -> jax.Array:
    """Constrain the trailing ``d`` grid axes of ``t`` to be split along grid axis ``j``.

    A no-op unless a grid split is active (:data:`GRID_SPLIT`) and ``d >= 2``; leading
    (batch) axes are left to the partitioner.
    """
    split = GRID_SPLIT.get()
    if split is None or d < 2:
        return t
    mesh, name = split
    spec = [P.UNCONSTRAINED] * (t.ndim - d) + [name if i == j else None for i in range(d)]
    return jax.lax.with_sharding_constraint(t, NamedSharding(mesh, P(*spec)))


def _fibre_split_axis(shape: tuple[int, ...], k: int, d: int) -> int:
    """The grid axis that :func:`_fibres` splits: 0, or for ``k = 0`` the largest other."""
    rest = shape[len(shape) - d + 1 :]
    return 1 + max(range(len(rest)), key=rest.__getitem__) if k == 0 and rest else 0


def _fibres(t: jax.Array, k: int, d: int) -> jax.Array:
    """``t`` laid out so every device holds whole mode-``k`` fibres of the grid.

    Under a grid split, axis 0 is the split one, so for ``k >= 1`` this keeps that layout;
    for ``k = 0`` it moves the split to the largest other grid axis, which XLA lowers to
    one all-to-all (each device sends and receives ``(P - 1) / P`` of its ``N / P``
    block). Contracting the split axis in place would instead leave every device an
    ``N``-sized partial sum to all-reduce. A no-op without a grid split.
    """
    return _split_along(t, _fibre_split_axis(t.shape, k, d), d)


def mode_product(t: jax.Array, a: jax.Array, k: int, d: int) -> jax.Array:
    """Multiply axis ``k`` of the trailing ``d`` grid axes of ``t`` by ``a`` ``(..., p, q)``.

    Under a grid split (see :func:`_fibres`) the product is local to each device; only
    ``k = 0`` moves data: an all-to-all before it and one after, back to axis 0.
    """
    src = _GRID[:d]
    dst = src[:k] + "z" + src[k + 1 :]
    out = jnp.einsum(f"...z{src[k]},...{src}->...{dst}", a, _fibres(t, k, d))
    if k == 0:
        out = _fibres(out, 0, d)  # the product stays local; the move back follows
    return _split_along(out, 0, d)


def check_factors(
    fn: str, name: str, factors, *, square: bool, ndim: int = 2, convert=None
) -> list:
    """``factors`` as arrays (each through ``convert(f"{name}[i]", a)`` when given, else
    ``jnp.asarray``): a non-empty sequence of ``(..., n_i, n_i)`` (``square``),
    ``(..., p_i, q_i)`` or, with ``ndim=1``, ``(..., n_i)``, sizes >= 1. Raises ValueError
    naming ``fn``, the entry and its shape."""
    want = "(..., n)" if ndim == 1 else "a square matrix (..., n, n)" if square else "(..., p, q)"
    if isinstance(factors, jax.Array | np.ndarray) or not isinstance(factors, Sequence):
        raise ValueError(
            f"{fn}: {name} must be a sequence (list or tuple) of d >= 1 arrays {want}; got "
            f"{type(factors).__name__}"
        )
    if len(factors) == 0:
        raise ValueError(f"{fn}: {name} is empty; expected d >= 1 arrays {want}")
    out = []
    for i, a in enumerate(factors):
        a = jnp.asarray(a) if convert is None else convert(f"{name}[{i}]", a)
        core = a.shape[a.ndim - ndim :] if a.ndim >= ndim else ()
        if a.ndim < ndim or 0 in core or (square and core[0] != core[1]):
            raise ValueError(f"{fn}: {name}[{i}] has shape {a.shape}; expected {want}, sizes >= 1")
        out.append(a)
    return out


def _check_eig(fn: str, eigvals, eigvecs, covs=None) -> None:
    """Matching eigenvalue vectors ``(..., n_i)``, eigenvector matrices and optional ``covs``."""
    vals = check_factors(fn, "eigvals", eigvals, square=False, ndim=1)
    vecs = check_factors(fn, "eigvecs", eigvecs, square=True)
    pairs = [("eigvecs", vecs)] + ([] if covs is None else [("covs", covs)])
    for name, mats in pairs:
        mats = check_factors(fn, name, mats, square=True)
        if len(mats) != len(vals):
            raise ValueError(
                f"{fn}: {name} has {len(mats)} entries and eigvals {len(vals)}; expected one "
                "per factor"
            )
        for i, (v, m) in enumerate(zip(vals, mats, strict=True)):
            if m.shape[-1] != v.shape[-1]:
                raise ValueError(
                    f"{fn}: {name}[{i}] has shape {m.shape}; expected (..., {v.shape[-1]}, "
                    f"{v.shape[-1]}) to match eigvals[{i}] of shape {v.shape}"
                )


def _check_grid_vector(fn: str, name: str, x, sizes) -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim == 0 or x.shape[-1] != math.prod(sizes):
        raise ValueError(
            f"{fn}: {name} has shape {x.shape}; expected (..., {math.prod(sizes)}), the "
            f"product of the factor sizes {tuple(sizes)}"
        )
    return x


def kron_matvec(factors: Sequence[jax.Array], x: jax.Array) -> jax.Array:
    r"""Compute :math:`(A_1 \otimes \dots \otimes A_d)\, x` by one mode product per factor.

    .. math::
        y = \operatorname{vec}\big(X \times_1 A_1 \times_2 \dots \times_d A_d\big),
        \quad X = \operatorname{reshape}(x, (q_1, \dots, q_d))

    Args:
        factors: ``A_i`` of shape ``(..., p_i, q_i)``; rectangular factors are allowed and
            leading (batch) dimensions broadcast with those of ``x``.
        x: shape ``(..., q_1 * ... * q_d)``.

    Returns:
        Shape ``(..., p_1 * ... * p_d)``. Cost
        :math:`O(\sum_i p_i \prod_{j \le i} p_j \prod_{j \ge i} q_j)`, memory :math:`O(N)`.
    """
    factors = check_factors("kron_matvec", "factors", factors, square=False)
    q = tuple(a.shape[-1] for a in factors)
    x = _check_grid_vector("kron_matvec", "x", x, q)
    d = len(factors)
    t = x.reshape(x.shape[:-1] + q)
    for k, a in enumerate(factors):
        t = mode_product(t, a, k, d)
    return t.reshape(t.shape[: t.ndim - d] + (-1,))


def kron_outer(vectors: Sequence[jax.Array]) -> jax.Array:
    r"""Flattened outer product :math:`v_1 \otimes \dots \otimes v_d` of vectors ``(..., n_i)``."""
    vectors = check_factors("kron_outer", "vectors", vectors, square=False, ndim=1)
    out = vectors[0]
    for v in vectors[1:]:
        out = out[..., :, None] * v[..., None, :]
        out = out.reshape(out.shape[:-2] + (-1,))
    return out


def kron_diag(factors: Sequence[jax.Array]) -> jax.Array:
    r"""Diagonal of :math:`A_1 \otimes \dots \otimes A_d`: the outer product of the diagonals."""
    factors = check_factors("kron_diag", "factors", factors, square=True)
    return kron_outer([jnp.diagonal(a, axis1=-2, axis2=-1) for a in factors])


def kron_dense(factors: Sequence[jax.Array]) -> jax.Array:
    """The dense product ``A_1 ⊗ … ⊗ A_d``, batched. For tests and small N only."""
    factors = check_factors("kron_dense", "factors", factors, square=False)
    out = factors[0]
    for b in factors[1:]:
        out = jnp.einsum("...pq,...rs->...prqs", out, b)
        out = out.reshape(out.shape[:-4] + (out.shape[-4] * out.shape[-3], -1))
    return out


def _per_example(fn, factor_sigs: Sequence[str], rest: str):
    """Vectorize ``fn`` over leading dims; ``factor_sigs`` holds one core shape per argument."""
    return jnp.vectorize(fn, signature=",".join(factor_sigs) + rest)


def _sizes_sig(sizes, template: str) -> list[str]:
    return [template.format(f"n{i}") for i in range(len(sizes))]


def kron_solve_triangular(
    chols: Sequence[jax.Array], x: jax.Array, *, trans: bool = False
) -> jax.Array:
    r"""Solve :math:`(L_1 \otimes \dots \otimes L_d)\, z = x` by one triangular solve per mode.

    ``chols[i]`` is lower triangular ``(..., n_i, n_i)``; ``x`` is ``(..., N)``. With
    ``trans=True`` solves :math:`(L_1 \otimes \dots \otimes L_d)^\top z = x` instead. Cost
    :math:`O(N \sum_i n_i)`.
    """
    chols = check_factors("kron_solve_triangular", "chols", chols, square=True)
    sizes = tuple(c.shape[-1] for c in chols)
    x = _check_grid_vector("kron_solve_triangular", "x", x, sizes)
    d = len(sizes)

    def solve_mode(lk, moved):  # moved: (n_k, other grid axes); one solve for every fibre
        flat = moved.reshape(moved.shape[0], -1)
        return lapack.solve_triangular(lk, flat, trans=trans).reshape(moved.shape)

    def solve(*args):
        *ls, v = args
        t = v.reshape(sizes)
        for k, lk in enumerate(ls):
            moved = jnp.moveaxis(_fibres(t, k, d), k, 0)
            split = GRID_SPLIT.get()
            if split is None or d < 2:
                solved = solve_mode(lk, moved)
            else:  # XLA does not partition triangular solves: solve each device's fibres
                j = _fibre_split_axis(sizes, k, d)
                spec = P(*(split[1] if i == (j + 1 if j < k else j) else None for i in range(d)))
                solved = jax.shard_map(
                    solve_mode, mesh=split[0], in_specs=(P(), spec), out_specs=spec
                )(lk, moved)
            t = _split_along(jnp.moveaxis(solved, 0, k), 0, d)
        return t.reshape(-1)

    sig = _sizes_sig(sizes, "({0},{0})") + ["(N)"]
    return _per_example(solve, sig, "->(N)")(*chols, x)


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
    return _split_along(outer_tensor([jnp.maximum(v, 0) for v in eigvals]) + sigma2, 0, d)


def _rotate(eigvecs, t, transpose: bool) -> jax.Array:
    """Mode products of the ``(n_1, …, n_d)`` tensor ``t`` with ``Q_i`` (or ``Q_iᵀ``)."""
    d = len(eigvecs)
    for k, q in enumerate(eigvecs):
        t = mode_product(t, q.T if transpose else q, k, d)
    return t


def _eig_forward(eigvals, eigvecs, sigma2, r):
    sizes = tuple(v.shape[-1] for v in eigvals)
    rt = _rotate(eigvecs, r.reshape(sizes), transpose=True)
    D = spectrum(eigvals, sigma2)
    alpha = rt / D
    logp = -0.5 * (jnp.sum(rt * alpha) + jnp.sum(jnp.log(D)) + D.size * _LOG_2PI)
    return logp, alpha, D


def _eig_logpdf(eigvals, eigvecs, sigma2, r):
    return _eig_forward(eigvals, eigvecs, sigma2, r)[0]


def _other_eigvals(eigvals, i, root: bool = False):
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
    return _contract_others(1 / D, [jnp.maximum(v, 0) for v in eigvals])


def _contract_others(t, vectors):
    r"""For each axis i of ``t``: ``t`` contracted with ``vectors[j]`` over every axis j ≠ i."""
    if len(vectors) == 1:
        return [t]
    last = t.reshape(-1, t.shape[-1])
    head = _contract_others((last @ vectors[-1]).reshape(t.shape[:-1]), vectors[:-1])
    return head + [outer_tensor(vectors[:-1]).reshape(-1) @ last]


@jax.custom_vjp
def _cov_logpdf(covs, eigvals, eigvecs, sigma2, r):
    return _eig_logpdf(eigvals, eigvecs, sigma2, r)


def _cov_logpdf_fwd(covs, eigvals, eigvecs, sigma2, r):
    logp, alpha, D = _eig_forward(eigvals, eigvecs, sigma2, r)
    return logp, (eigvals, eigvecs, alpha, D)


def _cov_logpdf_bwd(res, g):
    eigvals, eigvecs, alpha, D = res
    cov_bars = []
    for i, (q, gi) in enumerate(zip(eigvecs, _logdet_grads(eigvals, D))):
        b = to_mode(alpha * _other_eigvals(eigvals, i, root=True), i)
        M = 0.5 * g * (_fence(b @ b.T) - jnp.diag(gi))
        cov_bars.append(from_eigenbasis(q, M))
    sigma2_bar = 0.5 * g * (jnp.sum(alpha * alpha) - jnp.sum(1 / D))
    r_bar = -g * _rotate(eigvecs, alpha, transpose=False).reshape(-1)
    zeros = jax.tree.map(jnp.zeros_like, (eigvals, eigvecs))
    return (tuple(cov_bars), *zeros, sigma2_bar, r_bar)


_cov_logpdf.defvjp(_cov_logpdf_fwd, _cov_logpdf_bwd)


def _eig_logdet(eigvals, eigvecs, sigma2):
    return jnp.sum(jnp.log(spectrum(eigvals, sigma2)))


@jax.custom_vjp
def _cov_logdet(covs, eigvals, eigvecs, sigma2):
    return _eig_logdet(eigvals, eigvecs, sigma2)


def _cov_logdet_fwd(covs, eigvals, eigvecs, sigma2):
    D = spectrum(eigvals, sigma2)
    return jnp.sum(jnp.log(D)), (eigvals, eigvecs, D)


def _cov_logdet_bwd(res, g):
    eigvals, eigvecs, D = res
    cov_bars = tuple(
        _fence((q * (g * gi)) @ q.T) for q, gi in zip(eigvecs, _logdet_grads(eigvals, D))
    )
    zeros = jax.tree.map(jnp.zeros_like, (eigvals, eigvecs))
    return (cov_bars, *zeros, g * jnp.sum(1 / D))


_cov_logdet.defvjp(_cov_logdet_fwd, _cov_logdet_bwd)


def _eig_args(eigvals, eigvecs, covs):
    """Stop gradients through the eigendecomposition when ``covs`` carry them instead."""
    if covs is None:
        return eigvals, eigvecs
    return jax.lax.stop_gradient((tuple(eigvals), tuple(eigvecs)))


def _eig_vectorized(fn_eig, fn_cov, eigvals, eigvecs, sigma2, covs, x=None, out="(N)"):
    """Vectorize a per-example eigen function over leading dims, after checking the inputs.

    ``fn_eig(eigvals, eigvecs, sigma2[, x])`` differentiates plainly; with ``covs``,
    ``fn_cov(covs, eigvals, eigvecs, sigma2[, x])`` (a custom VJP) runs on the
    stop-gradient eigendecomposition. ``x`` is ``(..., N)``; ``out`` the core output shape.
    """
    name = "kron_eig_" + fn_eig.__name__.removeprefix("_eig_")
    _check_eig(name, eigvals, eigvecs, covs)
    if x is not None:
        x = _check_grid_vector(name, "the grid vector", x, [jnp.shape(v)[-1] for v in eigvals])
    d = len(eigvals)
    vals, vecs = _eig_args(eigvals, eigvecs, covs)
    xs = () if x is None else (x,)
    sig = _sizes_sig(vals, "({0})") + _sizes_sig(vals, "({0},{0})") + ["()"] + ["(N)"] * len(xs)
    if covs is None:
        fn = lambda *a: fn_eig(a[:d], a[d : 2 * d], *a[2 * d :])  # noqa: E731
        return _per_example(fn, sig, "->" + out)(*vals, *vecs, sigma2, *xs)
    fn = lambda *a: fn_cov(a[:d], a[d : 2 * d], a[2 * d : 3 * d], *a[3 * d :])  # noqa: E731
    sig = _sizes_sig(vals, "({0},{0})") + sig
    return _per_example(fn, sig, "->" + out)(*covs, *vals, *vecs, sigma2, *xs)


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
    return _eig_vectorized(_eig_logpdf, _cov_logpdf, eigvals, eigvecs, sigma2, covs, r, "()")


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
    return _eig_vectorized(_eig_logdet, _cov_logdet, eigvals, eigvecs, sigma2, covs, out="()")


# ----------------------------------------------------------------------------------
# Solves and the symmetric root. Their custom VJPs contract an eigenbasis cotangent
# of A = ⊗K_i + σ²I over every grid axis but i (weighted by W_i), as in the log density.


def to_mode(t: jax.Array, i: int) -> jax.Array:
    """The grid tensor ``t`` as an ``(n_i, N / n_i)`` matrix, axis ``i`` first."""
    return jnp.moveaxis(_fibres(t, i, t.ndim), i, 0).reshape(t.shape[i], -1)


def rest_weights(eigvals, i) -> jax.Array:
    r""":math:`W_i = \otimes_{j \ne i} \lambda_j` flattened over the other axes, ``(N / n_i,)``."""
    return outer_tensor([jnp.maximum(v, 0) for j, v in enumerate(eigvals) if j != i]).reshape(-1)


def _eig_solve(eigvals, eigvecs, sigma2, r):
    sizes = tuple(v.shape[-1] for v in eigvals)
    alpha = _rotate(eigvecs, r.reshape(sizes), transpose=True) / spectrum(eigvals, sigma2)
    return _rotate(eigvecs, alpha, transpose=False).reshape(-1)


@jax.custom_vjp
def _cov_solve(covs, eigvals, eigvecs, sigma2, r):
    return _eig_solve(eigvals, eigvecs, sigma2, r)


def _cov_solve_fwd(covs, eigvals, eigvecs, sigma2, r):
    sizes = tuple(v.shape[-1] for v in eigvals)
    D = spectrum(eigvals, sigma2)
    alpha = _rotate(eigvecs, r.reshape(sizes), transpose=True) / D
    return _rotate(eigvecs, alpha, transpose=False).reshape(-1), (eigvals, eigvecs, alpha, D)


def _cov_solve_bwd(res, g):
    eigvals, eigvecs, alpha, D = res
    beta = _rotate(eigvecs, g.reshape(D.shape), transpose=True) / D
    cov_bars = []
    for i, q in enumerate(eigvecs):
        m = _fence(-(to_mode(beta, i) * rest_weights(eigvals, i)) @ to_mode(alpha, i).T)
        cov_bars.append(from_eigenbasis(q, 0.5 * (m + m.T)))
    zeros = jax.tree.map(jnp.zeros_like, (eigvals, eigvecs))
    r_bar = _rotate(eigvecs, beta, transpose=False).reshape(-1)
    return (tuple(cov_bars), *zeros, -jnp.sum(beta * alpha), r_bar)


_cov_solve.defvjp(_cov_solve_fwd, _cov_solve_bwd)


def _eig_sqrt_matvec(eigvals, eigvecs, sigma2, z):
    sizes = tuple(v.shape[-1] for v in eigvals)
    zt = _rotate(eigvecs, z.reshape(sizes), transpose=True)
    return _rotate(eigvecs, jnp.sqrt(spectrum(eigvals, sigma2)) * zt, False).reshape(-1)


@jax.custom_vjp
def _cov_sqrt_matvec(covs, eigvals, eigvecs, sigma2, z):
    return _eig_sqrt_matvec(eigvals, eigvecs, sigma2, z)


def _cov_sqrt_matvec_fwd(covs, eigvals, eigvecs, sigma2, z):
    return _eig_sqrt_matvec(eigvals, eigvecs, sigma2, z), (eigvals, eigvecs, sigma2, z)


def _safe_inv(x):
    return jnp.where(x > 0, 1 / jnp.where(x > 0, x, 1), 0)


def _cov_sqrt_matvec_bwd(res, g):
    eigvals, eigvecs, sigma2, z = res
    s = jnp.sqrt(spectrum(eigvals, sigma2))
    gt = _rotate(eigvecs, g.reshape(s.shape), transpose=True)
    zt = _rotate(eigvecs, z.reshape(s.shape), transpose=True)
    cov_bars = []
    for i, q in enumerate(eigvecs):
        gw, zi, si = to_mode(gt, i) * rest_weights(eigvals, i), to_mode(zt, i), to_mode(s, i)

        def row(a, zi=zi, si=si):  # row a of the Sylvester solve: memory O(N)
            return jnp.sum(a[0] * zi * _safe_inv(a[1] + si), axis=1)

        m = jax.lax.map(row, (gw, si))
        cov_bars.append(from_eigenbasis(q, 0.5 * (m + m.T)))
    zeros = jax.tree.map(jnp.zeros_like, (eigvals, eigvecs))
    sigma2_bar = jnp.sum(gt * zt * _safe_inv(2 * s))
    z_bar = _rotate(eigvecs, s * gt, transpose=False).reshape(-1)
    return (tuple(cov_bars), *zeros, sigma2_bar, z_bar)


_cov_sqrt_matvec.defvjp(_cov_sqrt_matvec_fwd, _cov_sqrt_matvec_bwd)


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
    return _eig_vectorized(_eig_solve, _cov_solve, eigvals, eigvecs, sigma2, covs, r)


def kron_eig_sqrt_matvec(
    z: jax.Array,
    eigvals: Sequence[jax.Array],
    eigvecs: Sequence[jax.Array],
    sigma2: jax.Array,
    covs: Sequence[jax.Array] | None = None,
) -> jax.Array:
    r"""Multiply by the symmetric root :math:`A^{1/2} = Q \operatorname{diag}(\sqrt D) Q^\top`.

    :math:`A = K_1 \otimes \dots \otimes K_d + \sigma^2 I`; :math:`x = A^{1/2} z` has
    covariance :math:`A` for :math:`z \sim \mathcal N(0, I)`. The symmetric root is a
    function of :math:`A` alone (unlike :math:`Q \operatorname{diag}\sqrt D`, which depends
    on the arbitrary choice of eigenvectors), so it is smooth in the factors. With
    ``covs`` its gradient solves the Sylvester equation :math:`dR\,R + R\,dR = dA` in the
    eigenbasis: for a cotangent :math:`\bar x`, with :math:`s = \sqrt D`,

    .. math::
        \bar K_i = Q_i\, \operatorname{sym}(M_i)\, Q_i^\top, \quad
        M_i[a, b] = \textstyle\sum_{\text{rest}} W_i[\text{rest}]\,
        \frac{\tilde{\bar x}[a, \text{rest}]\, \tilde z[b, \text{rest}]}
             {s[a, \text{rest}] + s[b, \text{rest}]},

    :math:`\bar\sigma^2 = \sum \tilde{\bar x}\,\tilde z / (2 s)` and
    :math:`\bar z = A^{1/2} \bar x`; pairs with :math:`s_a + s_b = 0` get zero. Exact and
    finite for repeated eigenvalues. Cost :math:`O(N \sum_i n_i)` forward and backward,
    memory :math:`O(N)`.

    Args:
        z: ``(..., N)``.
        eigvals, eigvecs, sigma2, covs: as in :func:`kron_eig_solve`.
    """
    return _eig_vectorized(_eig_sqrt_matvec, _cov_sqrt_matvec, eigvals, eigvecs, sigma2, covs, z)


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


@jax.custom_vjp
def _cov_trace(covs, eigvals, eigvecs, sigma2, terms):
    return _eig_trace(eigvals, eigvecs, sigma2, terms)


def _cov_trace_fwd(covs, eigvals, eigvecs, sigma2, terms):
    trace, rotated, diags, D = _trace_forward(eigvals, eigvecs, sigma2, terms)
    return trace, (eigvals, eigvecs, rotated, diags, D)


def _cov_trace_bwd(res, g):
    eigvals, eigvecs, rotated, diags, D = res
    d = len(eigvals)
    cov_bars = [jnp.zeros_like(q) for q in eigvecs]
    term_bars = []
    sigma2_bar = 0.0
    for ms, ds in zip(rotated, diags, strict=True):
        bars = []
        for i, (q, c) in enumerate(zip(eigvecs, _contract_others(1 / D, ds))):
            rest = tuple(j for j in range(d) if j != i)
            others = outer_tensor([jnp.ones_like(v) if j == i else v for j, v in enumerate(ds)])
            bars.append(_fence((q * (g * c)) @ q.T))
            H = jnp.tensordot(others * _other_eigvals(eigvals, i) / D, 1 / D, axes=(rest, rest))
            cov_bars[i] = cov_bars[i] - from_eigenbasis(q, g * ms[i].T * _fence(H))
        term_bars.append(tuple(bars))
        sigma2_bar = sigma2_bar - g * jnp.sum(outer_tensor(ds) / (D * D))
    zeros = jax.tree.map(jnp.zeros_like, (eigvals, eigvecs))
    return (tuple(cov_bars), *zeros, sigma2_bar, tuple(term_bars))


_cov_trace.defvjp(_cov_trace_fwd, _cov_trace_bwd)


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
    _check_eig("kron_eig_trace_inv", eigvals, eigvecs, covs)
    sizes = tuple(jnp.shape(v)[-1] for v in eigvals)
    d, nt = len(sizes), len(terms)
    for t, term in enumerate(terms):
        term = check_factors("kron_eig_trace_inv", f"terms[{t}]", term, square=True)
        if tuple(p.shape[-1] for p in term) != sizes:
            raise ValueError(
                f"kron_eig_trace_inv: terms[{t}] has factor sizes "
                f"{tuple(p.shape[-1] for p in term)}; expected {sizes}"
            )
    vals, vecs = _eig_args(eigvals, eigvecs, covs)
    flat = [p for term in terms for p in term]

    def unflatten(ps):
        return tuple(tuple(ps[t * d : (t + 1) * d]) for t in range(nt))

    sig = (
        _sizes_sig(sizes, "({0})")
        + _sizes_sig(sizes, "({0},{0})")
        + ["()"]
        + _sizes_sig(sizes, "({0},{0})") * nt
    )
    if covs is None:
        fn = lambda *a: _eig_trace(a[:d], a[d : 2 * d], a[2 * d], unflatten(a[2 * d + 1 :]))  # noqa: E731
        return _per_example(fn, sig, "->()")(*vals, *vecs, sigma2, *flat)

    def fn(*a):
        return _cov_trace(
            a[:d], a[d : 2 * d], a[2 * d : 3 * d], a[3 * d], unflatten(a[3 * d + 1 :])
        )

    sig = _sizes_sig(sizes, "({0},{0})") + sig
    return _per_example(fn, sig, "->()")(*covs, *vals, *vecs, sigma2, *flat)


@jax.custom_vjp
def _psd_sqrt(cov, eigval, eigvec):
    s = jnp.sqrt(jnp.maximum(eigval, 0))
    return (eigvec * s[..., None, :]) @ jnp.swapaxes(eigvec, -1, -2)


def _psd_sqrt_fwd(cov, eigval, eigvec):
    return _psd_sqrt(cov, eigval, eigvec), (eigval, eigvec)


def _psd_sqrt_bwd(res, root_bar):
    eigval, eigvec = res
    qt = jnp.swapaxes(eigvec, -1, -2)
    s = jnp.sqrt(jnp.maximum(eigval, 0))
    m = from_eigenbasis(qt, root_bar)  # Qᵀ R̄ Q
    m = 0.5 * (m + jnp.swapaxes(m, -1, -2))
    denom = s[..., :, None] + s[..., None, :]
    m = jnp.where(denom > 0, m / jnp.where(denom > 0, denom, 1), 0)
    return from_eigenbasis(eigvec, m), jnp.zeros_like(eigval), jnp.zeros_like(eigvec)


_psd_sqrt.defvjp(_psd_sqrt_fwd, _psd_sqrt_bwd)


def psd_sqrt(cov: jax.Array, eigval: jax.Array, eigvec: jax.Array) -> jax.Array:
    r"""Symmetric square root :math:`R = Q \operatorname{diag}(\sqrt{\lambda}) Q^\top` of ``cov``.

    The gradient w.r.t. ``cov`` solves the Sylvester equation
    :math:`dR\,R + R\,dR = dK`; in the eigenbasis
    :math:`\widetilde{dR}_{ab} = \widetilde{dK}_{ab} / (\sqrt{\lambda_a} + \sqrt{\lambda_b})`,
    finite for repeated eigenvalues (pairs of zero eigenvalues get zero). ``eigval`` and
    ``eigvec`` (from ``eigh(cov)``) are treated as constants.
    """
    eigval, eigvec = jax.lax.stop_gradient((eigval, eigvec))
    return _psd_sqrt(cov, eigval, eigvec)
