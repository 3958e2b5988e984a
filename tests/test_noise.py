"""Kronecker-structured noise (``noise_factors``) against a dense twin built with jnp.kron."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from conftest import RTOL
from dense import spd
from numpyro import handlers
from numpyro.distributions.batch_util import promote_batch_shape

import kronjax
from kronjax import KroneckerNormal

_spd = spd


def _dense_noise(entry, n):
    if entry is None:
        return jnp.eye(n)
    entry = jnp.asarray(entry)
    return entry if entry.ndim == 2 and entry.shape == (n, n) else jnp.diag(entry)


def _dense_cov(covs, sigma, noise_factors):
    """``K_1 ⊗ … ⊗ K_d + σ² S_1 ⊗ … ⊗ S_d`` with jnp.kron (unbatched)."""
    k = functools.reduce(jnp.kron, covs)
    s = functools.reduce(
        jnp.kron, [_dense_noise(e, c.shape[-1]) for e, c in zip(noise_factors, covs, strict=True)]
    )
    return k + (1.0 if sigma is None else sigma**2) * s


def _dense_logpdf(value, loc, cov):
    chol = jnp.linalg.cholesky(cov)
    z = jax.scipy.linalg.solve_triangular(chol, value - loc, lower=True)
    n = value.shape[-1]
    return -0.5 * z @ z - jnp.sum(jnp.log(jnp.diag(chol))) - 0.5 * n * math.log(2 * math.pi)


# name, factor sizes, sigma, noise factor kinds per axis ("diag", "mat" or None)
CASES = [
    ("per-task noise (diagonal on the task axis)", (3, 5), None, ("diag", None)),
    ("separable space-time diagonals", (4, 3), 0.7, ("diag", "diag")),
    ("correlated noise across tasks", (3, 4), None, ("mat", None)),
    ("3-D, matrix and diagonal", (2, 3, 2), 0.5, (None, "mat", "diag")),
    ("1-D matrix noise", (5,), 0.3, ("mat",)),
]


def _make(rng, sizes, kinds):
    covs = [_spd(rng, n, jitter=0.1) for n in sizes]
    noise = [
        None if k is None else rng.uniform(0.3, 2.0, n) if k == "diag" else _spd(rng, n)
        for k, n in zip(kinds, sizes, strict=True)
    ]
    return covs, noise


def _as_param(kind, covs):
    if kind == "covs":
        return {"covs": covs}
    if kind == "chols":
        return {"chols": [np.linalg.cholesky(k) for k in covs]}
    return {"evds": [np.linalg.eigh(k) for k in covs]}


DENSITY_CASES = [
    (kind, *case)
    for kind, case in [
        ("covs", CASES[0]),
        ("chols", CASES[0]),
        ("evds", CASES[1]),
        ("covs", CASES[2]),
        ("chols", CASES[2]),
        ("evds", CASES[2]),
        ("chols", CASES[3]),
        ("covs", CASES[4]),
    ]
]


@pytest.mark.parametrize(
    "kind,name,sizes,sigma,kinds", DENSITY_CASES, ids=[f"{c[0]}, {c[1]}" for c in DENSITY_CASES]
)
def test_density_and_moments_match_dense(rng, kind, name, sizes, sigma, kinds):
    covs, noise = _make(rng, sizes, kinds)
    n = math.prod(sizes)
    loc, value = rng.normal(size=n), rng.normal(size=(2, n))

    @jax.jit
    def moments(param, noise):
        d = KroneckerNormal(loc, **param, sigma=sigma, noise_factors=noise)
        assert d.batch_shape == () and d.event_shape == (n,)
        return d.log_prob(value), d.entropy(), d.variance, d.covariance_matrix

    log_prob, entropy, variance, cov_matrix = moments(_as_param(kind, covs), noise)
    cov = np.asarray(_dense_cov(covs, sigma, noise))
    ref = scipy.stats.multivariate_normal(loc, cov)
    np.testing.assert_allclose(log_prob, ref.logpdf(value), rtol=RTOL)
    np.testing.assert_allclose(entropy, ref.entropy(), rtol=RTOL)
    np.testing.assert_allclose(variance, np.diag(cov), rtol=RTOL)
    np.testing.assert_allclose(cov_matrix, cov, rtol=RTOL, atol=RTOL)


@pytest.mark.parametrize("name,sizes,sigma,kinds", CASES[1:4], ids=[c[0] for c in CASES[1:4]])
def test_gradient_matches_dense_cholesky(rng, name, sizes, sigma, kinds):
    covs, noise = _make(rng, sizes, kinds)
    n = math.prod(sizes)
    loc, value = rng.normal(size=n), rng.normal(size=n)
    sig = 0.8 if sigma is None else sigma

    def structured(covs, noise, sig, loc):
        return KroneckerNormal(loc, covs=covs, sigma=sig, noise_factors=noise).log_prob(value)

    def dense(covs, noise, sig, loc):
        return _dense_logpdf(value, loc, _dense_cov(covs, sig, noise))

    args = (covs, noise, sig, loc)
    got = jax.jit(jax.grad(structured, argnums=(0, 1, 2, 3)))(*args)
    want = jax.jit(jax.grad(dense, argnums=(0, 1, 2, 3)))(*args)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-7, atol=1e-9)


def test_gradient_finite_differences_in_noise_scale(rng):
    """A scalar parameterization, checked by central differences (no autodiff reference)."""
    covs = [_spd(rng, 3), _spd(rng, 4)]
    s0, s1 = rng.uniform(0.5, 1.5, 3), _spd(rng, 4)
    value, loc = rng.normal(size=12), np.zeros(12)

    def f(t):
        noise = [s0 * jnp.exp(t), s1 * (1 + t**2)]
        return KroneckerNormal(loc, covs=covs, noise_factors=noise).log_prob(value)

    t, h = 0.3, 1e-5
    f_jit = jax.jit(f)
    fd = (f_jit(t + h) - f_jit(t - h)) / (2 * h)
    np.testing.assert_allclose(jax.jit(jax.grad(f))(t), fd, rtol=1e-6)


def test_repeated_eigenvalues_give_finite_gradients(rng):
    """Identity factors (all eigenvalues equal) with diagonal noise, as in MatrixNormal tests."""
    value = rng.normal(size=12)

    def structured(a, s):
        covs = [a * jnp.eye(3), jnp.eye(4)]
        return KroneckerNormal(jnp.zeros(12), covs=covs, noise_factors=[s, None]).log_prob(value)

    def dense(a, s):
        cov = _dense_cov([a * jnp.eye(3), jnp.eye(4)], None, [s, None])
        return _dense_logpdf(value, jnp.zeros(12), cov)

    s = jnp.array([0.5, 0.5, 2.0])  # repeated noise entries too
    got = jax.jit(jax.grad(structured, argnums=(0, 1)))(1.3, s)
    want = jax.jit(jax.grad(dense, argnums=(0, 1)))(1.3, s)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in got)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-8)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-8)


def test_batched_noise_factors(rng):
    covs = [_spd(rng, 3), _spd(rng, 2)]
    noise_batch = rng.uniform(0.5, 2.0, (4, 3))  # a batch of per-task diagonals
    sigma = np.array([0.5, 1.0, 1.5, 2.0])
    loc = rng.normal(size=6)
    value = rng.normal(size=(4, 6))

    @jax.jit
    def run(noise_batch, sigma):
        d = KroneckerNormal(loc, covs=covs, sigma=sigma, noise_factors=[noise_batch, None])
        assert d.batch_shape == (4,)
        return d.log_prob(value), d.sample(jax.random.key(0), (5,)), d.variance, d.entropy()

    log_prob, x, var, ent = run(noise_batch, sigma)
    want = [
        scipy.stats.multivariate_normal(
            loc, np.asarray(_dense_cov(covs, sigma[b], [noise_batch[b], None]))
        ).logpdf(value[b])
        for b in range(4)
    ]
    np.testing.assert_allclose(log_prob, want, rtol=RTOL)
    assert x.shape == (5, 4, 6) and var.shape == (4, 6) and ent.shape == (4,)


def test_batched_matrix_noise_and_factor(rng):
    mats = np.stack([_spd(rng, 2) for _ in range(3)])  # (3, 2, 2)
    covs = [_spd(rng, 4), np.stack([_spd(rng, 2) for _ in range(3)])]
    value = rng.normal(size=8)
    d = jax.jit(lambda c, s: KroneckerNormal(0.0, covs=c, noise_factors=[None, s]))(covs, mats)
    assert d.batch_shape == (3,)
    want = [
        scipy.stats.multivariate_normal(
            np.zeros(8), np.asarray(_dense_cov([covs[0], covs[1][b]], None, [None, mats[b]]))
        ).logpdf(value)
        for b in range(3)
    ]
    np.testing.assert_allclose(jax.jit(lambda d: d.log_prob(value))(d), want, rtol=RTOL)


def test_sample_moments_and_pathwise_gradient(rng):
    covs = [_spd(rng, 2), _spd(rng, 3)]
    noise = [rng.uniform(0.5, 2.0, 2), _spd(rng, 3)]
    loc = rng.normal(size=6)
    d = KroneckerNormal(loc, covs=covs, sigma=0.6, noise_factors=noise)
    x = jax.jit(lambda d: d.sample(jax.random.key(1), (40000,)))(d)
    cov = np.asarray(_dense_cov(covs, 0.6, noise))
    np.testing.assert_allclose(x.mean(0), loc, atol=0.05)
    np.testing.assert_allclose(np.cov(np.asarray(x).T), cov, atol=0.06 * np.abs(cov).max())

    # Pathwise gradient of E[Σ x²] = tr(cov) + Σ μ² w.r.t. the diagonal noise.
    def mc(s):
        d = KroneckerNormal(loc, covs=covs, sigma=0.6, noise_factors=[s, noise[1]])
        return jnp.mean(jnp.sum(d.sample(jax.random.key(2), (20000,)) ** 2, -1))

    def exact(s):
        return jnp.trace(_dense_cov(covs, 0.6, [s, noise[1]]))

    np.testing.assert_allclose(
        jax.jit(jax.grad(mc))(noise[0]), jax.grad(exact)(noise[0]), rtol=0.05
    )


def test_pytree_round_trips(rng):
    covs = [_spd(rng, 3), _spd(rng, 2)]
    noise = [rng.uniform(0.5, 2.0, 3), _spd(rng, 2)]
    value = rng.normal(size=6)
    d = KroneckerNormal(np.zeros(6), covs=covs, sigma=0.4, noise_factors=noise)
    log_prob = jax.jit(lambda d: d.log_prob(value))
    want = scipy.stats.multivariate_normal(
        np.zeros(6), np.asarray(_dense_cov(covs, 0.4, noise))
    ).logpdf(value)

    d_jit = jax.jit(lambda d: d)(d)
    assert d_jit.noise_factors[1].shape == (2, 2) and d_jit.covariance.white.eigvecs is not None
    np.testing.assert_allclose(log_prob(d_jit), want, rtol=RTOL)

    _, stacked = jax.lax.scan(lambda c, _: (c, c), d, None, length=2)
    assert promote_batch_shape(stacked).batch_shape == (2,)
    np.testing.assert_allclose(log_prob(stacked), [want, want], rtol=RTOL)

    scales = np.array([0.5, 1.0, 2.0])
    make = lambda a: KroneckerNormal(np.zeros(6), covs=covs, noise_factors=[a * noise[0], None])
    batched = promote_batch_shape(jax.jit(jax.vmap(make))(scales))
    assert batched.batch_shape == (3,)
    want = [
        scipy.stats.multivariate_normal(
            np.zeros(6), np.asarray(_dense_cov(covs, None, [a * noise[0], None]))
        ).logpdf(value)
        for a in scales
    ]
    np.testing.assert_allclose(log_prob(batched), want, rtol=RTOL)


@pytest.mark.parametrize(
    "noise,match",
    [
        (np.ones(3), "sequence"),
        ([np.ones(3)], "noise_factors has 1 entries; expected d = 2"),
        ([np.ones(3), np.ones(5)], r"noise_factors\[1\] has shape \(5,\)"),
        ([np.ones((3, 2)), None], r"noise_factors\[0\] has shape \(3, 2\)"),
        ([np.ones((5, 3)), None], r"batch dims \(5,\) of noise_factors\[0\]"),
    ],
)
def test_shape_errors(noise, match):
    covs = [np.stack([np.eye(3)] * 2), np.eye(4)]  # batch (2,)
    with pytest.raises(ValueError, match=match):
        KroneckerNormal(np.zeros(12), covs=covs, noise_factors=noise)


@pytest.mark.parametrize(
    "noise,match",
    [
        ([np.array([1.0, -1.0, 1.0]), None], r"noise_factors\[0\] is a diagonal .* > 0"),
        ([None, np.diag([1.0, 1.0, -1.0, 1.0])], r"noise_factors\[1\] is not positive definite"),
        ([None, np.triu(np.ones((4, 4)))], r"noise_factors\[1\] is not symmetric"),
        ([np.array([1.0, np.nan, 1.0]), None], r"noise_factors\[0\] has non-finite"),
    ],
)
def test_value_errors_with_validate_args(noise, match):
    with pytest.raises(ValueError, match=match):
        KroneckerNormal(
            np.zeros(12), covs=[np.eye(3), np.eye(4)], noise_factors=noise, validate_args=True
        )


@pytest.mark.parametrize("grid", [True, False], ids=["grid", "points"])
@pytest.mark.parametrize("kind", ["covs", "chols", "evds"])
def test_predict_with_noise_factors_matches_dense(rng, kind, grid):
    """Posterior mean and variance under σ²·⊗S_i noise against the dense GP formulas."""
    covs, noise = _make(rng, (3, 4), ("mat", "diag"))
    loc, y = rng.normal(size=12), rng.normal(size=12)
    rows = (2, 5) if grid else (6, 6)
    kstars = [rng.normal(size=(m, n)) * 0.5 for m, n in zip(rows, (3, 4), strict=True)]
    diags = [rng.uniform(1.0, 2.0, m) for m in rows]
    d = KroneckerNormal(loc, **_as_param(kind, covs), sigma=0.6, noise_factors=noise)
    mean, var = jax.jit(lambda d: kronjax.gp.predict(d, y, kstars, diags, grid=grid))(d)
    a = np.asarray(_dense_cov([jnp.asarray(k) for k in covs], 0.6, noise), np.float64)
    if grid:
        cross, prior = np.kron(*kstars), np.kron(*diags)
    else:
        cross = np.stack([np.kron(r0, r1) for r0, r1 in zip(*kstars, strict=True)])
        prior = diags[0] * diags[1]
    want_mean = cross @ np.linalg.solve(a, y - loc)
    want_var = prior - np.einsum("mn,nm->m", cross, np.linalg.solve(a, cross.T))
    np.testing.assert_allclose(mean, want_mean, rtol=RTOL, atol=RTOL * np.abs(want_mean).max())
    np.testing.assert_allclose(var, want_var, rtol=RTOL, atol=RTOL * np.abs(want_var).max())
    with pytest.raises(ValueError, match="pred_noise=True is undefined with noise_factors"):
        kronjax.gp.predict(d, y, kstars, diags, grid=grid, pred_noise=True)


@pytest.mark.parametrize("sigma", [None, 0.5])
def test_reparam_root_with_noise_factors(rng, sigma):
    """f = loc + R z with R Rᵀ = ⊗K_i + σ²·⊗S_i: feeding z = I recovers R."""
    covs, noise = _make(rng, (3, 4), ("diag", "mat"))
    loc = rng.normal(size=12)
    d = KroneckerNormal(loc, covs=covs, sigma=sigma, noise_factors=noise)
    with handlers.seed(rng_seed=0), handlers.substitute(data={"f_decentered": jnp.eye(12)}):
        _, value = kronjax.KroneckerReparam()("f", d, None)
    root = np.asarray(value - loc).T
    want = np.asarray(_dense_cov([jnp.asarray(k) for k in covs], sigma, noise), np.float64)
    np.testing.assert_allclose(root @ root.T, want, atol=10 * RTOL * np.abs(want).max())
