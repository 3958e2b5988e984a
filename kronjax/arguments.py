r"""The arguments of ``KroneckerNormal``: shapes, dtypes and values, checked with messages
that name the argument, its shape and what was expected."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kronjax import linalg

__all__ = [
    "as_real",
    "broadcast_batch",
    "eig_pairs",
    "noise_entries",
    "shape_error",
    "square_factors",
    "validate_values",
]


def shape_error(arg: str, seen, expected: str) -> ValueError:
    """The ValueError for ``arg`` of shape ``seen`` where ``expected`` was wanted."""
    return ValueError(f"KroneckerNormal: {arg} has shape {tuple(seen)}; expected {expected}")


def as_real(arg: str, x) -> jax.Array:
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


def square_factors(name: str, factors) -> tuple[jax.Array, ...]:
    """A non-empty sequence of real square ``(..., n_i, n_i)`` matrices, ``n_i >= 1``."""
    return tuple(
        linalg.check_factors("KroneckerNormal", name, factors, square=True, convert=as_real)
    )


def eig_pairs(evds) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
    """``evds`` as (eigenvalues ``(..., n_i)``, eigenvectors ``(..., n_i, n_i)``) tuples."""
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
            as_real(f"evds[{i}] eigenvalues", pair[0]),
            as_real(f"evds[{i}] eigenvectors", pair[1]),
        )
        if q.ndim < 2 or q.shape[-1] != q.shape[-2] or q.shape[-1] == 0:
            raise shape_error(f"evds[{i}] eigenvectors", q.shape, "(..., n, n), n >= 1")
        if v.ndim < 1 or v.shape[-1] != q.shape[-1]:
            raise shape_error(
                f"evds[{i}] eigenvalues",
                v.shape,
                f"(..., {q.shape[-1]}) to match eigenvectors of shape {tuple(q.shape)}",
            )
        vals.append(v)
        vecs.append(q)
    return tuple(vals), tuple(vecs)


def noise_entries(noise_factors, sizes) -> tuple[tuple, tuple[bool, ...]]:
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
        s = None if s is None else as_real(f"noise_factors[{i}]", s)
        matrix = s is not None and s.ndim >= 2 and s.shape[-2:] == (n, n)
        if s is not None and not matrix and (s.ndim == 0 or s.shape[-1] != n):
            raise shape_error(
                f"noise_factors[{i}]",
                s.shape,
                f"None, a diagonal (..., {n}) or a matrix "
                f"(..., {n}, {n}): n_{i} = {n} is the size of factor {i}",
            )
        out.append(s)
        is_matrix.append(matrix)
    return tuple(out), tuple(is_matrix)


def broadcast_batch(loc, factors, sigma, factor_name: str, extra=()) -> tuple[int, ...]:
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


def validate_values(dist) -> None:
    """The value checks of ``KroneckerNormal.validate_args`` on concrete arrays; ValueError
    naming the argument and what is wrong."""
    if not bool(jnp.all(jnp.isfinite(dist.loc))):
        raise ValueError("KroneckerNormal: loc has non-finite entries")
    if dist.sigma is not None and not bool(jnp.all(jnp.isfinite(dist.sigma) & (dist.sigma >= 0))):
        raise ValueError(f"KroneckerNormal: sigma must be finite and >= 0; got {dist.sigma}")
    # sigma = 0 adds no noise: the factors must then be positive definite
    noise = dist.sigma is not None and bool(jnp.all(dist.sigma > 0))
    if dist.noise_factors is not None:
        _validate_noise(dist)
    name = "covs" if dist.covs is not None else "chols" if dist.chols is not None else "evds"
    eigvals = dist.covariance.factor_eigenvalues()
    for i, f in enumerate(dist.covs or dist.chols or [q for _, q in dist.evds]):
        arg = f"{name}[{i}]"
        if not bool(jnp.all(jnp.isfinite(f))) or (
            dist.evds is not None and not bool(jnp.all(jnp.isfinite(eigvals[i])))
        ):
            raise ValueError(f"KroneckerNormal: {arg} has non-finite entries")
        if dist.covs is not None:
            asym = float(jnp.max(jnp.abs(f - jnp.swapaxes(f, -1, -2))))
            if asym > _tol(f, f.shape[-1]):
                raise ValueError(
                    f"KroneckerNormal: {arg} is not symmetric (max |K - Kᵀ| = {asym:.3g})"
                )
        if dist.chols is not None:
            if bool(jnp.any(jnp.triu(f, 1) != 0)):
                raise ValueError(f"KroneckerNormal: {arg} is not lower triangular")
            if not noise and bool(jnp.any(jnp.diagonal(f, axis1=-2, axis2=-1) == 0)):
                raise ValueError(
                    f"KroneckerNormal: {arg} has a zero on its diagonal, so K_{i} is "
                    "singular; without sigma every factor must be positive definite"
                )
            continue
        if dist.covs is None:  # evds: the eigenvectors must be orthonormal
            n_i = f.shape[-1]
            gram = jnp.swapaxes(f, -1, -2) @ f - jnp.eye(n_i, dtype=f.dtype)
            off = float(jnp.max(jnp.abs(gram)))
            if off > 100 * n_i * float(jnp.finfo(f.dtype).eps):
                raise ValueError(
                    f"KroneckerNormal: {arg} eigenvectors are not orthonormal "
                    f"(max |QᵀQ - I| = {off:.3g})"
                )
        vals = eigvals[i]
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


def _validate_noise(dist) -> None:
    chols = dist.covariance.noise_chols
    for i, (a, c) in enumerate(zip(dist.noise_factors, chols, strict=True)):
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
            raise ValueError(f"KroneckerNormal: {arg} is not symmetric (max |S - Sᵀ| = {asym:.3g})")
        if not bool(jnp.all(jnp.isfinite(c))):
            raise ValueError(
                f"KroneckerNormal: {arg} is not positive definite (its Cholesky "
                "factorization failed)"
            )
