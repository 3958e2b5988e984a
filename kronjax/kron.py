r"""Structured products of Kronecker factors, never forming the product.

Every function works on the factors :math:`A_1, \dots, A_d` of
:math:`A = A_1 \otimes \dots \otimes A_d` and on vectors in the row-major flattening
order of ``jnp.kron``: grid element :math:`(i_1, \dots, i_d)` sits at flat index
:math:`i_1 (n_2 \cdots n_d) + \dots + i_d`. Also the grid layout under a split across
devices (:data:`GRID_SPLIT`) and the input checks shared by :mod:`kronjax.eigen`.
Re-exported by :mod:`kronjax.linalg`.
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

_GRID = "abcdefghijklmnopqrstuvwxy"  # einsum letters of the grid axes; "z" is the new one

# A grid split across devices: ``(mesh, axis name)`` while a function wrapped by
# ``kronjax.sharding.split_grid`` is traced, else None. Read at trace time only.
GRID_SPLIT: ContextVar[tuple[Mesh, str] | None] = ContextVar("kronjax_grid_split", default=None)


def fence(x: jax.Array) -> jax.Array:
    """``x`` unchanged, as a boundary XLA's CPU compiler does not fuse across.

    jaxlib 0.10 fuses chains of float64 dots with the elementwise ops and reductions around
    them (the caller's chain rule included) into one YNNPACK fusion that runs 5–10× slower
    than the same dots apart (``bench/profile.py``); a ``select`` between them keeps them
    apart. Costs one elementwise pass.
    """
    return jnp.where(jnp.isnan(x), jnp.nan, x)


def from_eigenbasis(q: jax.Array, m: jax.Array) -> jax.Array:
    r""":math:`Q M Q^\top`, the products kept apart by :func:`fence`: a cotangent ``M`` in a
    factor's eigenbasis back to the original one (with ``Q = Q_iᵀ``, into the eigenbasis)."""
    return fence(fence(q @ m) @ jnp.swapaxes(q, -1, -2))


def split_along(t: jax.Array, j: int, d: int) -> jax.Array:
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


def fibre_split_axis(shape: tuple[int, ...], k: int, d: int) -> int:
    """The grid axis that :func:`fibres` splits: 0, or for ``k = 0`` the largest other."""
    rest = shape[len(shape) - d + 1 :]
    return 1 + max(range(len(rest)), key=rest.__getitem__) if k == 0 and rest else 0


def fibres(t: jax.Array, k: int, d: int) -> jax.Array:
    """``t`` laid out so every device holds whole mode-``k`` fibres of the grid.

    Under a grid split, axis 0 is the split one, so for ``k >= 1`` this keeps that layout;
    for ``k = 0`` it moves the split to the largest other grid axis, which XLA lowers to
    one all-to-all (each device sends and receives ``(P - 1) / P`` of its ``N / P``
    block). Contracting the split axis in place would instead leave every device an
    ``N``-sized partial sum to all-reduce. A no-op without a grid split.
    """
    return split_along(t, fibre_split_axis(t.shape, k, d), d)


def mode_product(t: jax.Array, a: jax.Array, k: int, d: int) -> jax.Array:
    """Multiply axis ``k`` of the trailing ``d`` grid axes of ``t`` by ``a`` ``(..., p, q)``.

    Under a grid split (see :func:`fibres`) the product is local to each device; only
    ``k = 0`` moves data: an all-to-all before it and one after, back to axis 0.
    """
    src = _GRID[:d]
    dst = src[:k] + "z" + src[k + 1 :]
    out = jnp.einsum(f"...z{src[k]},...{src}->...{dst}", a, fibres(t, k, d))
    if k == 0:
        out = fibres(out, 0, d)  # the product stays local; the move back follows
    return split_along(out, 0, d)


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


def check_eig(fn: str, eigvals, eigvecs, covs=None) -> None:
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


def check_grid_vector(fn: str, name: str, x, sizes) -> jax.Array:
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
    x = check_grid_vector("kron_matvec", "x", x, q)
    d = len(factors)
    t = x.reshape(x.shape[:-1] + q)
    for k, a in enumerate(factors):
        t = mode_product(t, a, k, d)
    return t.reshape(t.shape[: t.ndim - d] + (-1,))


def kron_rows_matvec(rows: Sequence[jax.Array], t: jax.Array) -> jax.Array:
    r"""Dot every row of the face-splitting product with a grid tensor:
    :math:`u_j = \sum_k t[k] \prod_i V_i[j, k_i] = (\otimes_i V_i[j])^\top \operatorname{vec} t`.

    The cross-covariance of scattered point j to a grid is the Kronecker vector
    :math:`\otimes_i V_i[j]`; this applies p of them without the ``(p, N)`` matrix,
    contracting the largest axis first (largest intermediate ``(p, N / max n_i)``).

    Args:
        rows: ``V_i`` of shape ``(p, n_i)``, one row per point.
        t: the grid tensor ``(n_1, …, n_d)``.

    Returns:
        ``(p,)``.
    """
    axes = list(range(len(rows)))
    first = max(axes, key=lambda i: t.shape[i])
    out = jnp.tensordot(rows[first], t, axes=(1, first))  # (p, other axes in order)
    axes.remove(first)
    while axes:
        i = axes.pop(0)
        out = jnp.einsum("pa,pa...->p...", rows[i], out)
    return out


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


def per_example(fn, factor_sigs: Sequence[str], rest: str):
    """Vectorize ``fn`` over leading dims; ``factor_sigs`` holds one core shape per argument."""
    return jnp.vectorize(fn, signature=",".join(factor_sigs) + rest)


def sizes_sig(sizes, template: str) -> list[str]:
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
    x = check_grid_vector("kron_solve_triangular", "x", x, sizes)
    d = len(sizes)

    def solve_mode(lk, moved):  # moved: (n_k, other grid axes); one solve for every fibre
        flat = moved.reshape(moved.shape[0], -1)
        return lapack.solve_triangular(lk, flat, trans=trans).reshape(moved.shape)

    def solve(*args):
        *ls, v = args
        t = v.reshape(sizes)
        for k, lk in enumerate(ls):
            moved = jnp.moveaxis(fibres(t, k, d), k, 0)
            split = GRID_SPLIT.get()
            if split is None or d < 2:
                solved = solve_mode(lk, moved)
            else:  # XLA does not partition triangular solves: solve each device's fibres
                j = fibre_split_axis(sizes, k, d)
                spec = P(*(split[1] if i == (j + 1 if j < k else j) else None for i in range(d)))
                solved = jax.shard_map(
                    solve_mode, mesh=split[0], in_specs=(P(), spec), out_specs=spec
                )(lk, moved)
            t = split_along(jnp.moveaxis(solved, 0, k), 0, d)
        return t.reshape(-1)

    sig = sizes_sig(sizes, "({0},{0})") + ["(N)"]
    return per_example(solve, sig, "->(N)")(*chols, x)
