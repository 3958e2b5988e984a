r"""The small dense decompositions under kronjax, safe to batch on a CPU.

``eigh``, ``cholesky`` and ``solve_triangular`` of the factors are the only LAPACK calls
kronjax makes. On a CPU, jaxlib runs a *batched* LAPACK call by splitting the batch over
XLA's intra-op thread pool and blocking the calling pool thread until the pieces finish.
When several such calls run at once — two distributions in one ``jax.vmap``, a KL term, a
prediction, or several Python threads each running a vmapped program — every pool thread
can end up blocked waiting for pieces that no free thread is left to run: the process
stops using CPU and never returns (seen with jaxlib 0.10 in ``lapack_dsyevd_ffi`` →
``ParallelBatchMap`` → ``BlockingCounter::Wait``). No XLA flag prevents it.

The functions here never issue a batched LAPACK call on a CPU: each has a batching rule
(``jax.custom_batching.custom_vmap``) that runs the batch as a loop (``lax.map``) of
unbatched calls, and an unbatched call runs inline on the thread that makes it. So any
number of them may run concurrently, by construction, whatever the user's flags. The
cost is that one batch's decompositions no longer spread over the cores; the matrix
products around them still do (measured in ``bench/VMAP.md``). Elsewhere (GPU, TPU) the
batched calls are kept. Derivatives (every order and mode) come from rules built from the same
safe calls; ``eigh`` is never differentiated (kronjax treats eigenvectors as constants).

Calling ``jnp.linalg.eigh`` / ``cholesky`` on batches in your own code under ``vmap`` can
still hit the jaxlib bug; use these functions there too.
"""

from functools import partial

import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap
from jax.scipy.linalg import solve_triangular as _jax_solve_triangular
from jax.sharding import PartitionSpec as P

__all__ = ["eigh", "cholesky", "solve_triangular", "device_split"]


def _on_cpu() -> bool:
    return jax.default_backend() == "cpu"


def device_split(x) -> tuple | None:
    """``(mesh, axis name)`` when the leading axis of ``x`` is split over devices by an
    explicit sharding (visible in its type while tracing), else None."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    spec = getattr(sharding, "spec", None)
    return (sharding.mesh, spec[0]) if spec and spec[0] is not None else None


def _looped(fn):
    """``fn`` on unbatched arrays, whose ``vmap`` is a ``lax.map`` loop of ``fn`` itself.

    The loop body calls the wrapped function again, so nested ``vmap`` s loop too. A batch
    split over devices (explicit sharding) loops over each device's own part.
    """
    wrapped = custom_vmap(fn)

    @wrapped.def_vmap
    def _rule(axis_size, in_batched, *args):
        def loop(*args):
            def one(xs):
                it = iter(xs)
                return wrapped(*(next(it) if b else a for a, b in zip(args, in_batched)))

            return jax.lax.map(one, tuple(a for a, b in zip(args, in_batched) if b))

        split = next((device_split(a) for a, b in zip(args, in_batched) if b), None)
        if split is not None:
            mesh, name = split
            specs = tuple(P(name) if b else P() for b in in_batched)
            loop = jax.shard_map(loop, mesh=mesh, in_specs=specs, out_specs=P(name))
        out = loop(*args)
        return out, jax.tree.map(lambda _: True, out)

    return wrapped


_eigh_looped = _looped(lambda a: tuple(jnp.linalg.eigh(a)))
_cholesky_looped = _looped(jnp.linalg.cholesky)


def _trsm(trans: int):
    return lambda l, b: _jax_solve_triangular(l, b, lower=True, trans=trans)


_trsm_looped = {trans: _looped(_trsm(trans)) for trans in (0, 1)}


def eigh(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    r"""Eigenvalues (ascending) and eigenvectors of symmetric ``a`` ``(..., n, n)``.

    :math:`a = Q \operatorname{diag}(\lambda) Q^\top`. Not differentiated: the input's
    gradient is stopped (kronjax's custom rules carry the factors' derivatives instead).
    Cost :math:`O(n^3)` per matrix.
    """
    a = jax.lax.stop_gradient(jnp.asarray(a))
    if not _on_cpu():
        return tuple(jnp.linalg.eigh(a))
    return jnp.vectorize(_eigh_looped, signature="(n,n)->(n),(n,n)")(a)


def _solve_one(l, b, trans: int):
    r"""One (unbatched) triangular solve as a ``lax.custom_linear_solve``: the matrix enters
    only through the product :math:`L x` (or :math:`L^\top x`), so derivatives of every order
    and mode, and transposition, are JAX's own; the solves are the looped LAPACK calls."""
    lower = jnp.tril(l)
    mat = lower.T if trans else lower
    return jax.lax.custom_linear_solve(
        lambda x: mat @ x,
        b,
        solve=lambda _, r: _trsm_looped[trans](l, r),
        transpose_solve=lambda _, r: _trsm_looped[1 - trans](l, r),
    )


@jax.custom_jvp
def _cholesky(a):
    return jnp.vectorize(_cholesky_looped, signature="(n,n)->(n,n)")(a)


@_cholesky.defjvp
def _cholesky_jvp(primals, tangents):
    r""":math:`dL = L\,\Phi(L^{-1}\, dA_s\, L^{-\top})`, :math:`dA_s` the symmetric part,
    :math:`\Phi`: the lower triangle with the diagonal halved (Murray 2016). Built from
    ``_cholesky`` itself and the linear solves, so it differentiates again."""
    (a,), (da,) = primals, tangents
    l = _cholesky(a)
    da = 0.5 * (da + jnp.swapaxes(da, -1, -2))
    tmp = solve_triangular(l, da)  # L⁻¹ dA
    phi = solve_triangular(l, jnp.swapaxes(tmp, -1, -2))  # L⁻¹ dA L⁻ᵀ (dA symmetric)
    phi = jnp.tril(phi) - 0.5 * jnp.eye(l.shape[-1], dtype=l.dtype) * phi
    return l, l @ phi


def cholesky(a: jax.Array) -> jax.Array:
    r"""Lower-triangular :math:`L` with :math:`L L^\top = a` for symmetric positive definite
    ``a`` ``(..., n, n)`` (NaN where ``a`` is not). Differentiable in every mode and order
    (the derivative w.r.t. ``a`` is symmetric, as ``jnp.linalg.cholesky``'s). Cost
    :math:`O(n^3)`."""
    a = jnp.asarray(a)
    if not _on_cpu():
        return jnp.linalg.cholesky(a)
    return _cholesky(a)


def solve_triangular(l: jax.Array, b: jax.Array, *, trans: bool = False) -> jax.Array:
    r"""Solve :math:`L X = B` (or :math:`L^\top X = B` with ``trans``) for lower-triangular
    ``l`` ``(..., n, n)`` and ``b`` ``(..., n, m)``; leading dims broadcast.
    Only the lower triangle of ``l`` is read. Differentiable in both, every mode and order.
    Cost :math:`O(n^2 m)`."""
    l, b = jnp.asarray(l), jnp.asarray(b)
    if not _on_cpu():
        solve = partial(_jax_solve_triangular, lower=True, trans=int(trans))
        return jnp.vectorize(solve, signature="(n,n),(n,m)->(n,m)")(l, b)
    solve = partial(_solve_one, trans=int(trans))
    return jnp.vectorize(solve, signature="(n,n),(n,m)->(n,m)")(l, b)
