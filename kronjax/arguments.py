r"""The arguments of ``KroneckerNormal``: shapes, dtypes and values, checked with messages
that name the argument, its shape and what was expected."""

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kronjax import lapack, linalg

__all__ = [
    "as_real",
    "broadcast_batch",
    "eig_pairs",
    "eig_tolerance",
    "noise_entries",
    "shape_error",
    "square_factors",
    "suggested_jitter",
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
    """Round-off tolerance of the symmetry check of an ``n × n`` factor."""
    return 10 * n * float(jnp.finfo(x.dtype).eps) * float(jnp.max(jnp.abs(x), initial=0))


# -- positive (semi-)definiteness, to the round-off of eigh ----------------------------

#: The constant :math:`c` of the eigenvalue tolerance :math:`c\,n\,\epsilon\,\|K\|_2`.
EIG_TOL_FACTOR = 2.0


def eig_tolerance(eigvals, dtype=None) -> np.ndarray:
    r"""The round-off :math:`\tau = c\,n\,\epsilon\,\|K\|_2` of eigenvalues ``(..., n)``
    computed by ``eigh`` in ``dtype`` (default theirs), per batch member, as float64.

    ``eigh`` (LAPACK's Householder tridiagonalization followed by QR or divide and conquer)
    is backward stable: the computed :math:`\hat\lambda_i` are the exact eigenvalues of
    :math:`K + E` with :math:`\|E\|_2 \le p(n)\,\epsilon\,\|K\|_2`, :math:`p(n)` a modest
    function of :math:`n` and :math:`\epsilon` = ``jnp.finfo(dtype).eps``; by Weyl's
    inequality :math:`|\lambda_i(K + E) - \lambda_i(K)| \le \|E\|_2`, so
    :math:`|\hat\lambda_i - \lambda_i| \le p(n)\,\epsilon\,\|K\|_2` (Golub & Van Loan,
    *Matrix Computations*, ch. 8: Weyl's inequality in §8.1, the rounding errors of the
    symmetric QR algorithm in §8.3; Demmel, *Applied Numerical Linear Algebra*, 1997, §5.2;
    LAPACK Users' Guide, 3rd ed., §4.7). Rounding the entries of ``K`` to
    ``dtype`` moves its eigenvalues by at most :math:`\tfrac{\epsilon}{2}\|K\|_F \le
    \tfrac{\sqrt n}{2}\epsilon\|K\|_2` more. Here :math:`p(n) = c\,n` with :math:`c` =
    :data:`EIG_TOL_FACTOR` = 2 and :math:`\|K\|_2 = \max_i|\hat\lambda_i|`: the worst-case
    analyses give a small multiple of :math:`n` or more, the errors seen in practice grow
    like :math:`\sqrt n`. Measured with kronjax's ``eigh`` in both dtypes (RBF and
    Matérn-5/2 matrices on 2–400 points; 30,000 random rank-deficient :math:`BB^\top`,
    :math:`n` = 2–16, rounding of the product included): :math:`|\hat\lambda_i - \lambda_i|
    \le 7.6\,\epsilon\|K\|_2` (n = 200) and :math:`-\hat\lambda_{\min} \le 0.85\,n\,
    \epsilon\|K\|_2` (the worst, n = 3); :math:`c = 2` keeps a margin over both.

    A factor is then refused as not positive semi-definite when
    :math:`\hat\lambda_{\min} < -\tau`, and (without noise) as not positive definite when
    :math:`\hat\lambda_{\min} \le \tau`. So a jitter :math:`\delta I` passes once
    :math:`\delta > \tau` (plus the error): a 12-point RBF factor (:math:`\|K\|_2 \approx
    9`) has :math:`\tau \approx 2.6 \times 10^{-5}` in float32, so 1e-4 jitter passes, and
    :math:`4.8 \times 10^{-14}` in float64.
    """
    dtype = jnp.dtype(eigvals.dtype if dtype is None else dtype)
    v = np.asarray(eigvals, np.float64)
    eps = float(jnp.finfo(dtype).eps)
    return EIG_TOL_FACTOR * v.shape[-1] * eps * np.max(np.abs(v), -1, initial=0.0)


def suggested_jitter(smallest: float, tol: float, n: int, dtype) -> float:
    r"""A jitter :math:`X` for which :math:`K + XI` passes the definiteness check, from the
    smallest eigenvalue :math:`\hat\lambda` of ``K`` and its tolerance :math:`\tau`.

    :math:`\|K + XI\|_2 \le \|K\|_2 + X`, so its tolerance is at most
    :math:`\tau + c n \epsilon X`; asking its smallest eigenvalue :math:`\hat\lambda + X` to be
    twice that (margin for the round-off of both ``eigh`` calls) gives
    :math:`X \ge (2\tau - \hat\lambda) / (1 - 2 c n \epsilon)`, rounded up to two significant
    digits (never below the dtype's smallest normal number), so that ``f"{X:.2g}"`` is
    exactly ``X``.
    """
    finfo = jnp.finfo(dtype)
    shrink = max(1.0 - 2 * EIG_TOL_FACTOR * n * float(finfo.eps), 0.5)
    x = max((2 * tol - smallest) / shrink, float(finfo.smallest_normal))
    exp = math.floor(math.log10(x)) - 1
    digits = math.ceil(x / 10.0**exp)  # 10 to 100
    out = float(f"{digits}e{exp}")
    return out if out >= x else float(f"{digits + 1}e{exp}")


def _member(bad: np.ndarray) -> tuple[int, ...]:
    """The batch index of the first ``True`` in ``bad``."""
    return tuple(int(j) for j in np.argwhere(bad)[0])


def _describe(shape, dtype, member: tuple[int, ...]) -> str:
    """``(shape (12, 12), float32)``, with the batch member when batched."""
    where = f", batch member {member}" if member else ""
    return f"(shape {tuple(shape)}, {jnp.dtype(dtype).name}{where})"


def _eig_detail(vals, tol: float, n: int, dtype, definite: bool) -> tuple[str, float]:
    """The clause stating the smallest eigenvalue against the tolerance, and the jitter."""
    smallest, norm = float(np.min(vals)), float(np.max(np.abs(vals), initial=0.0))
    eps = float(jnp.finfo(dtype).eps)
    if definite:  # (a failed Cholesky factorization can see what eigh does not)
        relation = f"{'<=' if smallest <= tol else '>'} tolerance {tol:.3g}"
    else:
        relation = f"< -tolerance = {-tol:.3g}"
    clause = (
        f"smallest eigenvalue {smallest:.3g} {relation}, tolerance = {EIG_TOL_FACTOR:g}·n·eps·"
        f"‖K‖₂ (n = {n}, eps = {eps:.3g}, ‖K‖₂ = {norm:.3g}), the round-off of eigh in "
        f"{jnp.dtype(dtype).name}"
    )
    return clause, suggested_jitter(smallest, tol, n, dtype)


def _check_eigenvalues(arg: str, vals, shape, definite: bool, target: str) -> None:
    """Refuse a factor whose eigenvalues ``(..., n)`` are not PSD (PD when ``definite``) to
    the tolerance of :func:`eig_tolerance`, per batch member; an indefinite member first."""
    tol = eig_tolerance(vals)
    smallest = np.min(np.asarray(vals, np.float64), -1)
    indefinite = smallest < -tol
    singular = (smallest <= tol) if definite else np.zeros_like(indefinite)
    if not bool(np.any(indefinite | singular)):
        return
    member = _member(indefinite if bool(np.any(indefinite)) else singular)
    pd = not bool(indefinite[member])  # PSD, but PD is needed: sigma would also do
    n = shape[-1]
    clause, jitter = _eig_detail(
        np.asarray(vals, np.float64)[member], float(tol[member]), n, vals.dtype, pd
    )
    kind = "positive definite" if pd else "positive semi-definite"
    need = "without sigma every factor must be positive definite: " if pd else ""
    raise ValueError(
        f"KroneckerNormal: {arg} is not {kind} {_describe(shape, vals.dtype, member)}: "
        f"{clause}; {need}add at least {jitter:.2g}·I (jitter) to {target}"
        + (", or give sigma" if pd else "")
    )


def _small_pivots(l) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Per batch member of lower-triangular ``l``: whether it is numerically singular,
    :math:`\min_j L_{jj}^2` and its tolerance :math:`c\,n\,\epsilon \max_j K_{jj}` (float64).

    :math:`K = LL^\top` has :math:`\lambda_{\min}(K) = \sigma_{\min}(L)^2 \le \min_j L_{jj}^2`
    (the :math:`L_{jj}` are the eigenvalues of :math:`L`) and :math:`\max_j K_{jj} \le
    \|K\|_2`, so a factor refused here is refused by :func:`eig_tolerance`'s test of
    :math:`LL^\top` too: a necessary condition, :math:`O(n^2)`, no decomposition.
    Non-finite entries (a failed Cholesky factorization) count as singular. Computed on
    ``l`` scaled to ``max |l| = 1``, so nothing overflows in ``l``'s dtype.
    """
    n = l.shape[-1]
    scale = jnp.max(jnp.abs(l), axis=(-2, -1), keepdims=True)
    scaled = l / jnp.where((scale > 0) & jnp.isfinite(scale), scale, 1)
    pivots = np.square(np.asarray(jnp.diagonal(scaled, axis1=-2, axis2=-1), np.float64))
    rows = np.asarray(jnp.sum(jnp.square(scaled), -1), np.float64)
    s2 = np.square(np.asarray(scale[..., 0, 0], np.float64))
    tol = EIG_TOL_FACTOR * n * float(jnp.finfo(l.dtype).eps) * np.max(rows, -1)
    smallest = np.min(pivots, -1)
    finite = np.asarray(jnp.all(jnp.isfinite(l), axis=(-2, -1)))
    return ~finite | ~(smallest > tol), smallest * s2, tol * s2


def _check_cholesky(arg: str, l, name: str) -> None:
    """Refuse the Cholesky factor ``l`` of ``name`` = L Lᵀ (a ``chols`` entry without
    noise) when :func:`_small_pivots` finds it singular to round-off."""
    bad, pivot, tol = _small_pivots(l)
    if not bool(np.any(bad)):
        return
    member = _member(bad)
    one = l[member]
    vals = np.asarray(lapack.eigh(one @ one.T)[0], np.float64)
    clause, jitter = _eig_detail(
        vals, float(eig_tolerance(vals, l.dtype)), l.shape[-1], l.dtype, True
    )
    zero = "a zero" if float(pivot[member]) == 0 else "an entry zero to round-off"
    raise ValueError(
        f"KroneckerNormal: {arg} has {zero} on its diagonal, so {name} = L Lᵀ is not "
        f"positive definite {_describe(l.shape, l.dtype, member)}: min_j L_jj² = "
        f"{float(pivot[member]):.3g} <= tolerance {float(tol[member]):.3g} "
        f"({EIG_TOL_FACTOR:g}·n·eps·max_j K_jj); of L Lᵀ the {clause}; without sigma every "
        f"factor must be positive definite: add at least {jitter:.2g}·I (jitter) to {name} "
        "before its Cholesky factorization, or give sigma"
    )


def validate_values(dist) -> None:
    r"""The value checks of ``KroneckerNormal.validate_args`` on concrete arrays; ValueError
    naming the argument and what is wrong.

    Definiteness is judged to the round-off of the dtype (:func:`eig_tolerance`):
    ``covs`` and ``evds`` by their eigenvalues, ``chols`` (without noise) by their
    diagonal (:func:`_small_pivots`), matrix ``noise_factors`` by their Cholesky factor
    (and eigenvalues for the message), diagonal ``noise_factors`` exactly (``> 0``: no
    round-off). A refusal names the argument, its shape and dtype, the smallest eigenvalue,
    the tolerance and a jitter :math:`X I` that would pass (:func:`suggested_jitter`).
    """
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
            if not noise:  # with noise L Lᵀ only needs to be PSD, which it is
                _check_cholesky(arg, f, f"K_{i}")
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
        target = "it" if dist.covs is not None else "it (to its eigenvalues)"
        _check_eigenvalues(arg, eigvals[i], f.shape, not noise, target)


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
        bad, pivot, tol = _small_pivots(c)
        if not bool(np.any(bad)):
            continue
        member = _member(bad)
        vals = np.asarray(lapack.eigh(a[member])[0], np.float64)
        clause, jitter = _eig_detail(
            vals, float(eig_tolerance(vals, a.dtype)), a.shape[-1], a.dtype, True
        )
        how = (
            "its Cholesky factorization failed"
            if not bool(np.isfinite(pivot[member]))
            else f"its Cholesky factor has min_j C_jj² = {float(pivot[member]):.3g} <= "
            f"tolerance {float(tol[member]):.3g} ({EIG_TOL_FACTOR:g}·n·eps·max_j S_jj)"
        )
        raise ValueError(
            f"KroneckerNormal: {arg} is not positive definite "
            f"{_describe(a.shape, a.dtype, member)}: {how}; {clause}; a noise factor must "
            f"be positive definite: add at least {jitter:.2g}·I (jitter) to it"
        )
