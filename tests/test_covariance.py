"""``KroneckerCovariance``: every operation of every route against a dense NumPy twin.

Routes: eigen (``covs``, ``evds``, ``chols`` with sigma), noise-free Cholesky, and whitened
structured noise (diagonal, matrix and identity noise entries). Batched, under ``jit``,
``vmap`` and ``grad``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from conftest import DTYPE, RTOL
from dense import spd

from kronjax import KroneckerCovariance
from kronjax.covariance import CholeskyCovariance, EigenCovariance
from kronjax.whitened import WhitenedCovariance

pytestmark = pytest.mark.core

SIZES = (3, 4)


def _spd(rng, n):
    return spd(rng, n, jitter=0.3)


def _noise_dense(entry, n):
    if entry is None:
        return np.eye(n)
    return entry if np.ndim(entry) == 2 else np.diag(entry)


# (name, parameterization, sigma, noise kinds per axis or None, expected route)
CASES = [
    ("covs-sigma", "covs", 0.5, None, EigenCovariance),
    ("covs-no-sigma", "covs", None, None, EigenCovariance),
    ("evds-sigma", "evds", 0.4, None, EigenCovariance),
    ("chols-sigma", "chols", 0.3, None, EigenCovariance),
    ("chols-no-sigma", "chols", None, None, CholeskyCovariance),
    ("covs-noise", "covs", 0.6, ("mat", "diag"), WhitenedCovariance),
    ("chols-noise", "chols", 0.6, ("diag", None), WhitenedCovariance),
    ("evds-noise", "evds", 0.5, (None, "mat"), WhitenedCovariance),
]


def _params(kind, covs, sigma, noise):
    cast = lambda x: None if x is None else jnp.asarray(x, DTYPE)  # noqa: E731
    params = {
        "covs": lambda: {"covs": [cast(k) for k in covs]},
        "chols": lambda: {"chols": [cast(np.linalg.cholesky(k)) for k in covs]},
        "evds": lambda: {"evds": [tuple(map(cast, np.linalg.eigh(k))) for k in covs]},
    }[kind]()
    params["sigma"] = None if sigma is None else jnp.asarray(sigma, DTYPE)
    params["noise_factors"] = None if noise is None else [cast(a) for a in noise]
    return params


def _build(rng, kind, sigma, noise_kinds, batch=()):
    """The covariance and, per batch member, its dense twin (NumPy, float64)."""
    count = int(np.prod(batch, dtype=int))
    covs = [np.stack([_spd(rng, n) for _ in range(count)]).reshape(batch + (n, n)) for n in SIZES]
    noise = None
    if noise_kinds is not None:
        noise = [
            None if k is None else rng.uniform(0.3, 2.0, n) if k == "diag" else _spd(rng, n)
            for k, n in zip(noise_kinds, SIZES, strict=True)
        ]
    cov = KroneckerCovariance.from_factors(**_params(kind, covs, sigma, noise))
    s = 1.0 if sigma is None and noise is not None else sigma

    def dense(b=0):
        out = functools.reduce(np.kron, [k.reshape((-1,) + k.shape[-2:])[b] for k in covs])
        if s is not None:
            entries = noise or [None] * len(SIZES)
            out = out + s**2 * functools.reduce(
                np.kron, [_noise_dense(a, n) for a, n in zip(entries, SIZES, strict=True)]
            )
        return out

    return cov, dense, (covs, noise)


@pytest.mark.parametrize("name, kind, sigma, noise, route", CASES, ids=[c[0] for c in CASES])
def test_every_operation_against_dense(rng, name, kind, sigma, noise, route):
    cov, dense, (covs, _) = _build(rng, kind, sigma, noise)
    a = dense()
    assert type(cov) is route and cov.factor_sizes == SIZES and cov.batch_shape == ()
    n = a.shape[0]
    x = jnp.asarray(rng.normal(size=(2, n)), DTYPE)  # two vectors: a leading dim
    tol = dict(rtol=RTOL, atol=RTOL * 10)
    np.testing.assert_allclose(cov.dense(), a, **tol)
    np.testing.assert_allclose(cov.matvec(x), x @ a.T, **tol)
    np.testing.assert_allclose(cov.solve(x), np.linalg.solve(a, np.asarray(x, float).T).T, **tol)
    np.testing.assert_allclose(cov.logdet(), np.linalg.slogdet(a)[1], **tol)
    want = scipy.stats.multivariate_normal(np.zeros(n), a).logpdf(np.asarray(x, float))
    np.testing.assert_allclose(cov.logpdf(x), want, **tol)
    np.testing.assert_allclose(cov.diag(), np.diag(a), **tol)
    p = [_spd(rng, m) for m in SIZES]
    want = np.trace(np.linalg.solve(a, np.kron(*p)))
    np.testing.assert_allclose(cov.trace_inv([[jnp.asarray(q, DTYPE) for q in p]]), want, **tol)
    root = jax.vmap(cov.root_matvec, out_axes=1)(jnp.eye(n, dtype=DTYPE))
    np.testing.assert_allclose(root @ root.T, a, **tol)
    signal = jax.vmap(cov.signal_root_matvec, out_axes=1)(jnp.eye(n, dtype=DTYPE))
    np.testing.assert_allclose(signal @ signal.T, np.kron(*covs), **tol)
    terms = sum(
        functools.reduce(np.kron, [np.asarray(m) for m in t]) for t in cov.kronecker_terms()
    )
    np.testing.assert_allclose(terms, a, **tol)
    if route is not CholeskyCovariance:  # exact κ of the (whitened) core
        vals, vecs, _ = cov.eigensystem()
        core = functools.reduce(np.kron, [(q * v) @ q.T for v, q in zip(vals, vecs)])
        eig = np.linalg.eigvalsh(core + float(cov.sigma2()) * np.eye(n))
        np.testing.assert_allclose(cov.condition_number(), eig[-1] / eig[0], rtol=1e-3)
    else:  # the estimate never exceeds the true κ
        eig = np.linalg.eigvalsh(a)
        assert 1 <= float(cov.condition_number()) <= eig[-1] / eig[0] * (1 + 1e-3)


@pytest.mark.parametrize("name, kind, sigma, noise, route", CASES, ids=[c[0] for c in CASES])
def test_batched_jit_vmap(rng, name, kind, sigma, noise, route):
    """A batch of two covariances through jit (a pytree), and built under vmap, against the
    dense twin of each member."""
    cov, dense, (covs, noise_arrays) = _build(rng, kind, sigma, noise, batch=(2,))
    assert cov.batch_shape == (2,)
    n = int(np.prod(SIZES))
    x = jnp.asarray(rng.normal(size=(2, n)), DTYPE)
    batched = jax.jit(lambda c, x: c.logpdf(x))(cov, x)
    params = _params(kind, covs, sigma, noise_arrays)
    batch_axes = {k: (0 if k in ("covs", "chols", "evds") else None) for k in params}
    solved = jax.vmap(
        lambda p, x: KroneckerCovariance.from_factors(**p).solve(x), in_axes=(batch_axes, 0)
    )(params, x)
    for b in range(2):
        a = dense(b)
        want = scipy.stats.multivariate_normal(np.zeros(n), a).logpdf(np.asarray(x[b], float))
        np.testing.assert_allclose(batched[b], want, rtol=RTOL)
        want = np.linalg.solve(a, np.asarray(x[b], float))
        np.testing.assert_allclose(solved[b], want, rtol=RTOL, atol=RTOL)


@pytest.mark.parametrize("name, kind, sigma, noise, route", CASES, ids=[c[0] for c in CASES])
def test_logdet_gradient_matches_finite_differences(rng, name, kind, sigma, noise, route):
    """d/dt (log det A + log N(1; 0, A)) along K_1 → K_1 + t·P (and σ → σ + t), through
    each parameterization: central differences."""
    _, _, (covs, noise_arrays) = _build(rng, "covs", sigma, noise)
    p = _spd(rng, SIZES[0])
    nz = _params("covs", covs, sigma, noise_arrays)["noise_factors"]

    def logdet(t):
        ks = [jnp.asarray(covs[0], DTYPE) + t * jnp.asarray(p, DTYPE), jnp.asarray(covs[1], DTYPE)]
        params = {
            "covs": {"covs": ks},
            "chols": {"chols": [jnp.linalg.cholesky(k) for k in ks]},
            "evds": {"evds": [tuple(jnp.linalg.eigh(k)) for k in ks]},
        }[kind]
        s = None if sigma is None else jnp.asarray(sigma, DTYPE) + t
        c = KroneckerCovariance.from_factors(**params, sigma=s, noise_factors=nz)
        return c.logdet() + c.logpdf(jnp.ones(12, DTYPE))

    h = 1e-5 if DTYPE == "float64" else 1e-2
    fd = (logdet(h) - logdet(-h)) / (2 * h)
    np.testing.assert_allclose(jax.grad(logdet)(0.0), fd, rtol=1e-5 if DTYPE == "float64" else 2e-2)
