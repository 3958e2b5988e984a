"""Exact marginals of incomplete grids against the dense sub-covariance."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import pytest
import scipy.stats
from conftest import RTOL
from numpyro.infer.util import log_density

from kronjax import KroneckerMarginal, KroneckerNormal


def _spd(rng, n, jitter=0.3):
    a = rng.normal(size=(n, n))
    return a @ a.T / n + jitter * np.eye(n)


def _dense_cov(covs, sigma, noise=None):
    k = functools.reduce(jnp.kron, covs)
    if noise is None:
        s = jnp.eye(k.shape[-1])
    else:
        s = functools.reduce(jnp.kron, [jnp.diag(jnp.asarray(e)) for e in noise])
    return k + (0.0 if sigma is None else sigma**2) * s


def _dense_marginal_logpdf(value, loc, cov, idx):
    sub = cov[np.ix_(idx, idx)]
    chol = jnp.linalg.cholesky(sub)
    z = jax.scipy.linalg.solve_triangular(chol, value - loc[idx], lower=True)
    return -0.5 * z @ z - jnp.sum(jnp.log(jnp.diag(chol))) - 0.5 * len(idx) * math.log(2 * math.pi)


def _mask(rng, n, n_missing):
    mask = np.ones(n, bool)
    mask[rng.choice(n, n_missing, replace=False)] = False
    return mask


# name, sizes, sigma, parameter kind, noise on, number of missing cells
CASES = [
    ("one missing, covs + sigma", (4, 5), 0.5, "covs", False, 1),
    ("a few missing, noise-free chols", (4, 3), None, "chols", False, 3),
    ("20% missing, evds + sigma", (5, 4), 0.7, "evds", False, 4),
    ("20% missing, 3-D covs + sigma", (3, 2, 5), 0.4, "covs", False, 6),
    ("a few missing, noise factors", (3, 4), 0.6, "covs", True, 3),
]


def _build(rng, sizes, sigma, kind, noise_on):
    covs = [_spd(rng, n) for n in sizes]
    noise = [rng.uniform(0.5, 2.0, n) for n in sizes] if noise_on else None
    if kind == "covs":
        param = {"covs": covs}
    elif kind == "chols":
        param = {"chols": [np.linalg.cholesky(k) for k in covs]}
    else:
        param = {"evds": [np.linalg.eigh(k) for k in covs]}
    return covs, noise, param


@pytest.mark.parametrize("name,sizes,sigma,kind,noise_on,m", CASES, ids=[c[0] for c in CASES])
def test_log_prob_matches_dense(rng, name, sizes, sigma, kind, noise_on, m):
    covs, noise, param = _build(rng, sizes, sigma, kind, noise_on)
    n = math.prod(sizes)
    mask = _mask(rng, n, m)
    loc, y = rng.normal(size=n), rng.normal(size=(3, n))

    @jax.jit
    def log_prob(param, noise, v):
        marginal = KroneckerNormal(loc, **param, sigma=sigma, noise_factors=noise).marginal(mask)
        assert isinstance(marginal, KroneckerMarginal)
        assert marginal.event_shape == (n - m,) and marginal.batch_shape == ()
        return marginal.log_prob(v)

    got = log_prob(param, noise, y[:, mask])
    cov = np.asarray(_dense_cov(covs, sigma, noise))
    want = scipy.stats.multivariate_normal(loc[mask], cov[np.ix_(mask, mask)]).logpdf(y[:, mask])
    np.testing.assert_allclose(got, want, rtol=RTOL)


@pytest.mark.parametrize("m", [1, 6], ids=["one missing", "20% missing"])
def test_gradient_matches_dense_cholesky(rng, m):
    sizes = (5, 6)
    covs = [_spd(rng, n) for n in sizes]
    n = math.prod(sizes)
    idx = np.flatnonzero(_mask(rng, n, m))
    loc, y = rng.normal(size=n), rng.normal(size=n)

    def structured(covs, sigma, loc):
        return KroneckerNormal(loc, covs=covs, sigma=sigma).marginal(idx).log_prob(y[idx])

    def dense(covs, sigma, loc):
        return _dense_marginal_logpdf(y[idx], loc, _dense_cov(covs, sigma), idx)

    got = jax.jit(jax.grad(structured, argnums=(0, 1, 2)))(covs, 0.6, loc)
    want = jax.jit(jax.grad(dense, argnums=(0, 1, 2)))(covs, 0.6, loc)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-7, atol=1e-9)


def test_gradient_through_chols_and_noise_factors(rng):
    """The noise-free Cholesky route and the whitened route, by autodiff of a dense twin."""
    sizes = (3, 4)
    chols = [np.linalg.cholesky(_spd(rng, n)) for n in sizes]
    noise = [rng.uniform(0.5, 2.0, n) for n in sizes]
    idx = np.array([7, 0, 3, 11, 5, 9, 2, 10])  # unsorted indices: event order follows them
    y = rng.normal(size=12)

    def structured(chols, noise):
        d = KroneckerNormal(jnp.zeros(12), chols=chols, noise_factors=noise)
        return d.marginal(idx).log_prob(y[idx])

    def dense(chols, noise):
        cov = _dense_cov([c @ c.T for c in chols], 1.0, noise)
        return _dense_marginal_logpdf(y[idx], jnp.zeros(12), cov, idx)

    np.testing.assert_allclose(
        jax.jit(structured)(chols, noise), jax.jit(dense)(chols, noise), rtol=RTOL
    )
    got = jax.jit(jax.grad(structured, argnums=(0, 1)))(chols, noise)
    want = jax.jit(jax.grad(dense, argnums=(0, 1)))(chols, noise)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-7, atol=1e-9)


def test_gradient_finite_differences(rng):
    sizes = (3, 4)
    base = [_spd(rng, n) for n in sizes]
    mask = _mask(rng, 12, 2)
    y = rng.normal(size=12)

    def f(t):  # a lengthscale-like scalar on the first factor, an identity second factor
        covs = [base[0] * jnp.exp(-t), jnp.eye(4) * (1 + t**2)]
        return KroneckerNormal(jnp.zeros(12), covs=covs, sigma=0.5).marginal(mask).log_prob(y[mask])

    f_jit, t, h = jax.jit(f), 0.2, 1e-5
    fd = (f_jit(t + h) - f_jit(t - h)) / (2 * h)
    np.testing.assert_allclose(jax.jit(jax.grad(f))(t), fd, rtol=1e-6)


def test_batched(rng):
    covs = [_spd(rng, 3), _spd(rng, 4)]
    sigma = np.array([0.3, 0.6])
    loc = rng.normal(size=(2, 12))
    mask = _mask(rng, 12, 3)
    y = rng.normal(size=(5, 2, 12))
    marginal = jax.jit(lambda s: KroneckerNormal(loc, covs=covs, sigma=s).marginal(mask))(sigma)
    assert marginal.batch_shape == (2,) and marginal.event_shape == (9,)
    got = jax.jit(lambda d, v: d.log_prob(v))(marginal, y[..., mask])
    assert got.shape == (5, 2)
    for b in range(2):
        cov = np.asarray(_dense_cov(covs, sigma[b]))[np.ix_(mask, mask)]
        want = scipy.stats.multivariate_normal(loc[b, mask], cov).logpdf(y[:, b, mask])
        np.testing.assert_allclose(got[:, b], want, rtol=RTOL)


def test_sample_moments(rng):
    covs = [_spd(rng, 3), _spd(rng, 3)]
    loc = rng.normal(size=9)
    mask = _mask(rng, 9, 2)
    marginal = jax.jit(lambda c: KroneckerNormal(loc, covs=c, sigma=0.5).marginal(mask))(covs)
    x = jax.jit(lambda d: d.sample(jax.random.key(0), (40000,)))(marginal)
    assert x.shape == (40000, 7)
    cov = np.asarray(_dense_cov(covs, 0.5))[np.ix_(mask, mask)]
    np.testing.assert_allclose(x.mean(0), loc[mask], atol=0.05)
    np.testing.assert_allclose(np.cov(np.asarray(x).T), cov, atol=0.05 * np.abs(cov).max())
    np.testing.assert_allclose(marginal.mean, loc[mask], rtol=RTOL)
    np.testing.assert_allclose(marginal.variance, np.diag(cov), rtol=RTOL)


def test_in_a_numpyro_model(rng):
    covs = [_spd(rng, 4), _spd(rng, 5)]
    mask = _mask(rng, 20, 4)
    y = rng.normal(size=20)

    def model(sigma):
        d = KroneckerNormal(jnp.zeros(20), covs=covs, sigma=sigma)
        numpyro.sample("y", d.marginal(mask), obs=y[mask])

    got = jax.jit(lambda s: log_density(model, (s,), {}, {})[0])(0.4)
    cov = np.asarray(_dense_cov(covs, 0.4))[np.ix_(mask, mask)]
    want = scipy.stats.multivariate_normal(np.zeros(16), cov).logpdf(y[mask])
    np.testing.assert_allclose(got, want, rtol=RTOL)


def test_nothing_missing_is_the_full_density(rng):
    covs = [_spd(rng, 2), _spd(rng, 3)]
    y = rng.normal(size=6)
    want = scipy.stats.multivariate_normal(np.zeros(6), np.asarray(_dense_cov(covs, 0.2))).logpdf(y)

    @jax.jit
    def log_prob(covs):
        d = KroneckerNormal(np.zeros(6), covs=covs, sigma=0.2)
        return d.marginal(np.ones(6, bool)).log_prob(y)

    np.testing.assert_allclose(log_prob(covs), want, rtol=RTOL)


@pytest.mark.parametrize(
    "observed,match",
    [
        (np.ones(5, bool), r"boolean mask observed has shape \(5,\); expected \(6,\)"),
        (np.array([0, 0, 1]), "unique"),
        (np.array([0, 6]), r"\[0, 6\)"),
        (np.zeros(6, bool), "selects no cell"),
        (np.ones(6), "dtype float64"),
    ],
)
def test_bad_observed(observed, match):
    d = KroneckerNormal(np.zeros(6), covs=[np.eye(2), np.eye(3)], sigma=0.2)
    with pytest.raises(ValueError, match=match):
        d.marginal(observed)


def test_traced_mask_is_refused():
    d = KroneckerNormal(np.zeros(6), covs=[np.eye(2), np.eye(3)], sigma=0.2)
    with pytest.raises(ValueError, match="concrete"):
        jax.jit(lambda mask: d.marginal(mask).log_prob(jnp.zeros(3)))(np.arange(6) < 3)
