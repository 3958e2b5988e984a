"""``validate_args`` judges positive (semi-)definiteness to the round-off of the dtype.

The tolerance is :math:`2 n \\epsilon \\|K\\|_2` (:func:`kronjax.arguments.eig_tolerance`):
a float32 factor with 1e-4 jitter passes, a genuinely indefinite one is refused in both
dtypes with a message that names it and suggests a jitter that passes. The arrays are
built in float32 (or float64) explicitly, so the float32 cases run in both test passes.
"""

import re

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import DTYPE

from kronjax import KroneckerNormal

pytestmark = pytest.mark.core

F32, F64 = jnp.float32, jnp.float64
# float64 arrays exist only with x64 enabled (the float64 pass)
DTYPES = [F32] + ([F64] if DTYPE == "float64" else [])
ROUTES = ["covs", "chols", "evds"]


def rbf(n, ell, dtype, jitter=1e-4):
    """The RBF kernel on ``linspace(0, 1, n)`` plus ``jitter · I``, computed in ``dtype``."""
    x = jnp.linspace(0, 1, n, dtype=dtype)
    return jnp.exp(-0.5 * ((x[:, None] - x[None, :]) / ell) ** 2) + jitter * jnp.eye(n, dtype=dtype)


def rbf64(n, ell=0.5, jitter=1e-4):
    """``rbf`` in NumPy float64 (available in the float32 pass too)."""
    x = np.linspace(0, 1, n)
    return np.exp(-0.5 * ((x[:, None] - x[None, :]) / ell) ** 2) + jitter * np.eye(n)


def with_eigenvalues(n, smallest):
    """``(eigenvalues, Q)`` in float64: those of an ``n``-point RBF with 1e-4 jitter (from
    about 1e-4 to 7) with the smallest replaced by ``smallest``."""
    v, q = np.linalg.eigh(rbf64(n))
    v[0] = smallest
    return v, q


def tolerance(vals, dtype):
    """``2 n eps max|λ|``, written out (not kronjax's function: this checks it)."""
    return 2 * len(vals) * float(jnp.finfo(dtype).eps) * float(np.max(np.abs(vals)))


def route_args(route, ks, dtype):
    if route == "covs":
        return ks
    if route == "chols":
        return [jnp.linalg.cholesky(k) for k in ks]
    return [tuple(jnp.linalg.eigh(k)) for k in ks]


def build(route, args, dtype, sigma=None, **kw):
    n = int(np.prod([(a[1] if route == "evds" else a).shape[-1] for a in args]))
    sigma = None if sigma is None else jnp.asarray(sigma, dtype)
    loc = jnp.zeros(n, dtype)
    return KroneckerNormal(loc, **{route: args}, sigma=sigma, validate_args=True, **kw)


def jitter_in(message: str) -> float:
    found = re.search(r"add at least ([0-9.e+-]+)·I \(jitter\)", message)
    assert found, message
    return float(found.group(1))


# -- the user's case: 12 × 10 RBF factors with 1e-4 jitter in float32 -------------------


@pytest.mark.parametrize("sigma", [None, 0.1], ids=["no-sigma", "sigma"])
@pytest.mark.parametrize("ell", [0.2, 0.5, 1.0])
@pytest.mark.parametrize("route", ROUTES)
def test_rbf_with_1e_4_jitter_passes_in_float32(route, ell, sigma):
    ks = [rbf(12, ell, F32), rbf(10, ell, F32)]
    d = build(route, route_args(route, ks, F32), F32, sigma)
    assert d.loc.dtype == F32
    if sigma is not None:  # without it κ ~ 1e9 is past float32's limit: log_prob refuses
        assert bool(jnp.isfinite(d.log_prob(jnp.ones(120, F32))))


def test_batch_members_get_their_own_tolerance():
    """A member 1000× larger must not raise the tolerance of the others."""
    k = rbf(12, 0.5, F32)
    build("covs", [jnp.stack([1000 * k, k]), rbf(10, 0.5, F32)], F32)


# -- genuinely indefinite factors are refused, and the suggested jitter passes ----------


@pytest.mark.parametrize("sigma", [None, 0.1], ids=["no-sigma", "sigma"])
@pytest.mark.parametrize("route", ["covs", "evds"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: t.__name__)
def test_indefinite_factor_refused_with_a_jitter_that_passes(dtype, route, sigma):
    v, q = with_eigenvalues(10, -1e-2)  # -1e-2 · scale (the RBF's diagonal is 1)
    bad = jnp.asarray((q * v) @ q.T, dtype)
    first = rbf(12, 0.5, dtype)
    args = route_args(route, [first], dtype) + (
        [bad] if route == "covs" else [(jnp.asarray(v, dtype), jnp.asarray(q, dtype))]
    )
    with pytest.raises(ValueError) as info:
        build(route, args, dtype, sigma)
    message = str(info.value)
    assert f"{route}[1] is not positive semi-definite (shape (10, 10), {dtype.__name__})" in (
        message
    )
    assert "smallest eigenvalue -0.01" in message and "tolerance" in message
    x = jitter_in(message)
    assert 1e-2 < x < 2e-2
    fixed = bad + x * jnp.eye(10, dtype=dtype) if route == "covs" else (args[1][0] + x, args[1][1])
    build(route, [args[0], fixed], dtype, sigma)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: t.__name__)
def test_rbf_without_jitter_needs_the_suggested_jitter_in_float32(dtype):
    """No jitter, no sigma: refused in float32 (λ_min ~ 1e-8 is round-off there), accepted
    in float64; in float32 the jitter suggested (a few 1e-5) passes."""
    k = rbf(10, 0.5, dtype, jitter=0.0)
    if dtype == F64:
        build("covs", [k], dtype)
        return
    with pytest.raises(ValueError, match=re.escape("covs[0] is not positive definite")) as info:
        build("covs", [k], dtype)
    x = jitter_in(str(info.value))
    assert 1e-5 < x < 1e-4
    build("covs", [k + x * jnp.eye(10, dtype=dtype)], dtype)
    build("covs", [k], dtype, sigma=0.1)  # with noise it only needs to be PSD, which it is


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: t.__name__)
def test_batched_refusal_names_the_member(dtype):
    v, q = with_eigenvalues(10, -1e-2)
    k = rbf(10, 0.5, dtype)
    covs = [jnp.stack([k, jnp.asarray((q * v) @ q.T, dtype), k])]
    with pytest.raises(ValueError, match=re.escape("(shape (3, 10, 10), ")) as info:
        build("covs", covs, dtype)
    assert "batch member (1,)" in str(info.value)


# -- chols: the diagonal against 2 n eps max_j K_jj --------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: t.__name__)
def test_chols_small_pivot_refused_at_the_dtypes_tolerance(dtype):
    l = np.linalg.cholesky(rbf64(10))
    tol = 2 * 10 * float(jnp.finfo(dtype).eps) * float(np.max(np.sum(l * l, -1)))
    below, above = l.copy(), l.copy()
    below[9, 9], above[9, 9] = np.sqrt(0.5 * tol), np.sqrt(2 * tol)
    build("chols", [jnp.asarray(above, dtype)], dtype)
    build("chols", [jnp.asarray(below, dtype)], dtype, sigma=0.1)  # L Lᵀ is PSD: fine
    with pytest.raises(ValueError) as info:
        build("chols", [jnp.asarray(below, dtype)], dtype)
    message = str(info.value)
    assert "chols[0] has an entry zero to round-off on its diagonal" in message
    assert f"(shape (10, 10), {dtype.__name__})" in message and "smallest eigenvalue" in message
    x = jitter_in(message)
    kk = below @ below.T + x * np.eye(10)
    build("chols", [jnp.asarray(np.linalg.cholesky(kk), dtype)], dtype)


def test_chols_tiny_pivot_float32_but_not_float64():
    """L_jj = 1e-6 (L_jj² = 1e-12): round-off in float32, well resolved in float64."""
    l = np.linalg.cholesky(rbf64(10))
    l[9, 9] = 1e-6
    with pytest.raises(ValueError, match=re.escape("chols[1] has an entry zero to round-off")):
        build("chols", [jnp.asarray(l[:4, :4], F32), jnp.asarray(l, F32)], F32)
    if DTYPE == "float64":
        build("chols", [jnp.asarray(l, F64)], F64)


# -- noise factors: their Cholesky factor, the same message --------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: t.__name__)
def test_indefinite_noise_factor_refused_with_a_jitter_that_passes(dtype):
    v, q = with_eigenvalues(10, -1e-2)
    bad = jnp.asarray((q * v) @ q.T, dtype)
    covs = [rbf(12, 0.5, dtype), rbf(10, 0.5, dtype)]
    with pytest.raises(ValueError) as info:
        build("covs", covs, dtype, noise_factors=[None, bad])
    message = str(info.value)
    assert f"noise_factors[1] is not positive definite (shape (10, 10), {dtype.__name__})" in (
        message
    )
    assert "smallest eigenvalue -0.01" in message
    x = jitter_in(message)
    build("covs", covs, dtype, noise_factors=[None, bad + x * jnp.eye(10, dtype=dtype)])
    # 1e-4 jitter on a noise matrix passes in float32 too
    build("covs", covs, dtype, noise_factors=[rbf(12, 0.3, dtype), None])


# -- the tolerance scales with the dtype --------------------------------------------------


@pytest.mark.parametrize("route", ["covs", "evds"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: t.__name__)
def test_round_off_negative_eigenvalue_passes_in_float32_only(dtype, route):
    """λ_min = -1e-9 · scale is within float32's round-off (τ ≈ 2e-5) but not float64's
    (τ ≈ 4e-14): with sigma, PSD in float32, refused in float64."""
    v, q = with_eigenvalues(10, -1e-9)
    arg = (
        [jnp.asarray((q * v) @ q.T, dtype)]
        if route == "covs"
        else [(jnp.asarray(v, dtype), jnp.asarray(q, dtype))]
    )
    if dtype == F32:
        build(route, arg, dtype, sigma=0.1)
    else:
        with pytest.raises(ValueError, match=re.escape(f"{route}[0] is not positive semi-def")):
            build(route, arg, dtype, sigma=0.1)
    kind = "definite" if dtype == F32 else "semi-definite"
    with pytest.raises(ValueError, match=re.escape(f"{route}[0] is not positive {kind}")):
        build(route, arg, dtype)  # without noise: refused in either dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: t.__name__)
def test_tiny_positive_eigenvalue_is_definite_in_float64_only(dtype):
    v, q = with_eigenvalues(10, 1e-9)
    arg = [(jnp.asarray(v, dtype), jnp.asarray(q, dtype))]
    if dtype == F32:
        with pytest.raises(ValueError, match=re.escape("evds[0] is not positive definite")):
            build("evds", arg, dtype)
    else:
        build("evds", arg, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: t.__name__)
def test_tolerance_is_2_n_eps_norm(dtype):
    """Exact eigenvalues (evds) just inside and just outside ±τ, τ = 2 n eps ‖K‖₂."""
    v, q = with_eigenvalues(10, 0.0)
    tol = tolerance(v, dtype)

    def evds(smallest):
        return [(jnp.asarray(np.concatenate([[smallest], v[1:]]), dtype), jnp.asarray(q, dtype))]

    build("evds", evds(1.5 * tol), dtype)  # positive definite
    build("evds", evds(-0.7 * tol), dtype, sigma=0.1)  # positive semi-definite
    with pytest.raises(ValueError, match=re.escape(f"<= tolerance {tol:.3g}")):
        build("evds", evds(0.7 * tol), dtype)
    with pytest.raises(ValueError, match=re.escape(f"< -tolerance = {-tol:.3g}")):
        build("evds", evds(-1.5 * tol), dtype, sigma=0.1)
