"""``kronjax.gp``: prediction against the dense GP formulas, gradients against dense autodiff."""

from functools import reduce

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from conftest import RTOL

from kronjax import KroneckerNormal, gp

predict = jax.jit(gp.predict, static_argnames=("pred_noise", "grid"))

# ----------------------------------------------------------------------------------
# Dense twins: explicit GP formulas on jnp.kron / np.kron products.


def sqexp(x1, x2, ell):
    return jnp.exp(-0.5 * jnp.square(x1[:, None] - x2[None, :]) / ell**2)


def cross_matrix(kstars, grid):
    """The dense ``M × N`` (grid) or ``p × N`` (points) cross-covariance."""
    if grid:
        return reduce(np.kron, kstars)
    return np.stack([reduce(np.kron, rows) for rows in zip(*kstars, strict=True)])


def dense_predict(factors, sigma, loc, y, kstars, diags, grid, pred_noise=False):
    """Unbatched numpy/scipy reference: mean = K*N A⁻¹(y − loc), var = diag K** − …"""
    n = int(np.prod([f.shape[0] for f in factors]))
    s2 = 0.0 if sigma is None else float(sigma) ** 2
    a = reduce(np.kron, factors) + s2 * np.eye(n)
    ks = cross_matrix(kstars, grid)
    mean = ks @ scipy.linalg.solve(a, y - loc, assume_a="pos")
    if diags is None:
        return mean, None
    prior = reduce(np.kron, diags) if grid else np.prod(diags, axis=0)
    var = prior - np.einsum("mn,nm->m", ks, scipy.linalg.solve(a, ks.T, assume_a="pos"))
    return mean, var + (s2 if pred_noise else 0.0)


def make_dist(param, factors, sigma, loc):
    factors = [jnp.asarray(f) for f in factors]
    if param == "covs":
        return KroneckerNormal(loc, covs=factors, sigma=sigma)
    if param == "chols":
        return KroneckerNormal(loc, chols=[jnp.linalg.cholesky(f) for f in factors], sigma=sigma)
    return KroneckerNormal(loc, evds=[jnp.linalg.eigh(f) for f in factors], sigma=sigma)


def problem(rng, train_sizes, test_sizes, ells=None):
    """Squared-exponential factors on random 1-D inputs, their cross-covariances and diags."""
    ells = ells or [0.3 + 0.2 * i for i in range(len(train_sizes))]
    xs = [np.sort(rng.uniform(0, 1, n)) for n in train_sizes]
    ts = [rng.uniform(-0.2, 1.2, m) for m in test_sizes]
    factors = [
        np.asarray(sqexp(x, x, e)) + 1e-6 * np.eye(len(x)) for x, e in zip(xs, ells, strict=True)
    ]
    kstars = [np.asarray(sqexp(t, x, e)) for t, x, e in zip(ts, xs, ells, strict=True)]
    diags = [np.ones(len(t)) for t in ts]
    return factors, kstars, diags


def assert_close(actual, expected, rtol=RTOL):
    scale = max(1.0, float(np.max(np.abs(expected))))
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=0, atol=rtol * scale * 10)


# (name, train sizes, test sizes (grid), sigma)
CASES = [
    ("d=1 noise", (6,), (4,), 0.3),
    ("d=2 noise", (3, 4), (2, 5), 0.5),
    ("d=2 noise-free", (3, 4), (2, 5), None),
    ("d=3 noise", (2, 3, 4), (3, 2, 2), 0.7),
    ("d=3 sigma=0", (2, 3, 2), (2, 2, 3), 0.0),
]


@pytest.mark.parametrize("param", ["covs", "chols", "evds"])
@pytest.mark.parametrize("grid", [True, False], ids=["grid", "points"])
@pytest.mark.parametrize("name,train,test,sigma", CASES, ids=[c[0] for c in CASES])
def test_predict_matches_dense(rng, param, grid, name, train, test, sigma):
    factors, kstars, diags = problem(rng, train, test)
    if not grid:  # p = 5 scattered points: resample rows of each test axis
        p = 5
        rows = [rng.integers(0, k.shape[0], p) for k in kstars]
        kstars = [k[r] for k, r in zip(kstars, rows, strict=True)]
        diags = [d[r] for d, r in zip(diags, rows, strict=True)]
    loc = rng.normal(size=int(np.prod(train)))
    y = rng.normal(size=loc.shape)
    dist = make_dist(param, factors, sigma, loc)
    mean, var = gp.predict(dist, y, kstars, diags, pred_noise=True, grid=grid)
    want_mean, want_var = dense_predict(factors, sigma, loc, y, kstars, diags, grid, True)
    assert mean.shape == want_mean.shape and var.shape == want_var.shape
    assert_close(mean, want_mean)
    assert_close(var, want_var)


def test_mean_only_without_test_diags(rng):
    factors, kstars, _ = problem(rng, (3, 4), (2, 5))
    y = rng.normal(size=12)
    mean, var = gp.predict(make_dist("covs", factors, 0.4, 0.0), y, kstars)
    assert var is None
    assert_close(mean, dense_predict(factors, 0.4, 0.0, y, kstars, None, True)[0])


def test_pred_noise_adds_sigma_squared_not_sigma(rng):
    # PyMC's MarginalKron adds sigma; the predictive variance of y* needs sigma².
    factors, kstars, diags = problem(rng, (3, 4), (2, 2))
    dist = make_dist("covs", factors, 0.5, 0.0)
    y = rng.normal(size=12)
    _, latent = gp.predict(dist, y, kstars, diags)
    _, noisy = gp.predict(dist, y, kstars, diags, pred_noise=True)
    np.testing.assert_allclose(noisy - latent, 0.25, rtol=RTOL)


def test_psd_factor_with_noise(rng):
    # A rank-one factor (constant kernel) is fine once sigma > 0.
    factors, kstars, diags = problem(rng, (3, 4), (2, 3))
    factors[1] = np.full((4, 4), 2.0)
    kstars[1] = np.full((3, 4), 2.0)
    diags[1] = np.full(3, 2.0)
    y = rng.normal(size=12)
    mean, var = gp.predict(make_dist("covs", factors, 0.3, 0.0), y, kstars, diags)
    want_mean, want_var = dense_predict(factors, 0.3, 0.0, y, kstars, diags, True)
    assert_close(mean, want_mean)
    assert_close(var, want_var)


@pytest.mark.parametrize("grid", [True, False], ids=["grid", "points"])
def test_batched_dist_and_y(rng, grid):
    """Batch dims of sigma (2,), a factor (2, n, n), y (3, 1, N) and a cross-cov broadcast."""
    factors, kstars, diags = problem(rng, (3, 4), (4, 4))
    factors0 = np.stack([factors[0], factors[0] + 0.5 * np.eye(3)])
    sigma = np.array([0.3, 0.8])
    loc = rng.normal(size=12)
    y = rng.normal(size=(3, 1, 12))
    kstars1 = np.stack([kstars[1], 0.5 * kstars[1]])
    dist = KroneckerNormal(loc, covs=[factors0, factors[1]], sigma=sigma)
    mean, var = predict(dist, y, [kstars[0], kstars1], diags, grid=grid)
    assert mean.shape == var.shape == (3, 2, 16 if grid else 4)
    for a in range(3):
        for b in range(2):
            want = dense_predict(
                [factors0[b], factors[1]],
                sigma[b],
                loc,
                y[a, 0],
                [kstars[0], kstars1[b]],
                diags,
                grid,
            )
            assert_close(mean[a, b], want[0])
            assert_close(var[a, b], want[1])


def test_jit_and_vmap(rng):
    factors, kstars, diags = problem(rng, (3, 4), (2, 3))
    ys = rng.normal(size=(5, 12))

    @jax.jit
    def one(covs, sigma, y):
        return gp.predict(KroneckerNormal(0.0, covs=covs, sigma=sigma), y, kstars, diags)

    sigmas = jnp.array([0.2, 0.4, 0.6, 0.8, 1.0])
    means, vars_ = jax.vmap(one, in_axes=(None, 0, 0))(factors, sigmas, ys)
    # a distribution as a jit argument (pytree), batched y
    dist = make_dist("covs", factors, 0.6, 0.0)
    jitted = jax.jit(lambda dist, y: gp.predict(dist, y, kstars, diags))(dist, ys)
    for k in range(5):
        want = dense_predict(factors, float(sigmas[k]), 0.0, ys[k], kstars, diags, True)
        assert_close(means[k], want[0])
        assert_close(vars_[k], want[1])
    assert_close(jitted[0][2], dense_predict(factors, 0.6, 0.0, ys[2], kstars, diags, True)[0])


# ----------------------------------------------------------------------------------
# Gradients against dense autodiff (jnp.linalg.solve: no eigh anywhere).


def _points(kst, rows):
    return [k[r] for k, r in zip(kst, rows, strict=True)]


def _losses(rng, param, repeated):
    """A scalar loss of (lengthscales, sigma, loc, y) through predict, and its dense twin.

    The loss sums weighted grid and point predictions, so one compilation checks both.
    """
    xs = [jnp.asarray(np.sort(rng.uniform(0, 1, n))) for n in (3, 4)]
    ts = [jnp.asarray(rng.uniform(0, 1, m)) for m in (2, 3)]
    rows = [np.array([0, 1, 1, 0]), np.array([2, 0, 1, 1])]
    w = {True: jnp.asarray(rng.normal(size=(2, 6))), False: jnp.asarray(rng.normal(size=(2, 4)))}

    def parts(theta, grid):
        ell, amp = theta[0], theta[1]
        covs = [sqexp(xs[0], xs[0], ell) + 1e-6 * jnp.eye(3)]
        kst = [sqexp(ts[0], xs[0], ell)]
        if repeated:  # amp · I: every eigenvalue repeated, eigh's gradient would be NaN
            covs.append(amp * jnp.eye(4))
            kst.append(amp * jnp.ones((3, 4)) / 4)
        else:
            covs.append(amp * sqexp(xs[1], xs[1], 0.5) + 1e-6 * jnp.eye(4))
            kst.append(amp * sqexp(ts[1], xs[1], 0.5))
        diags = [jnp.ones(2), amp * jnp.ones(3)]
        if not grid:
            kst, diags = _points(kst, rows), _points(diags, rows)
        return covs, kst, diags

    def ours(theta, sigma, loc, y):
        covs = parts(theta, True)[0]
        if param == "covs":
            dist = KroneckerNormal(loc, covs=covs, sigma=sigma)
        elif param == "chols":
            dist = KroneckerNormal(loc, chols=[jnp.linalg.cholesky(c) for c in covs], sigma=sigma)
        else:
            dist = KroneckerNormal(loc, evds=[jnp.linalg.eigh(c) for c in covs], sigma=sigma)
        total = 0.0
        for grid in (True, False):
            _, kst, diags = parts(theta, grid)
            mean, var = gp.predict(dist, y, kst, diags, pred_noise=True, grid=grid)
            total = total + jnp.sum(w[grid][0] * mean) + jnp.sum(w[grid][1] * var)
        return total

    def dense(theta, sigma, loc, y):
        sigma = 0.0 if sigma is None else sigma
        total = 0.0
        for grid in (True, False):
            covs, kst, diags = parts(theta, grid)
            a = reduce(jnp.kron, covs) + sigma**2 * jnp.eye(12)
            ks = (
                reduce(jnp.kron, kst)
                if grid
                else jnp.stack([jnp.kron(*r) for r in zip(*kst, strict=True)])
            )
            prior = reduce(jnp.kron, diags) if grid else diags[0] * diags[1]
            mean = ks @ jnp.linalg.solve(a, y - loc)
            var = prior - jnp.sum(ks * jnp.linalg.solve(a, ks.T).T, axis=1) + sigma**2
            total = total + jnp.sum(w[grid][0] * mean) + jnp.sum(w[grid][1] * var)
        return total

    return ours, dense


@pytest.mark.parametrize(
    "param,repeated,sigma",
    [
        ("covs", False, 0.4),
        ("covs", True, 0.4),
        ("covs", True, None),
        ("chols", False, 0.4),
        ("chols", True, None),
        ("evds", False, 0.4),
    ],
    ids=[
        "covs",
        "covs-repeated",
        "covs-repeated-noise-free",
        "chols",
        "chols-repeated-noise-free",
        "evds",
    ],
)
def test_gradients_match_dense(rng, param, repeated, sigma):
    """Gradients w.r.t. kernel hyperparameters (in K_i, K*_i and diag K**), sigma, loc, y."""
    ours, dense = _losses(rng, param, repeated)
    theta = jnp.array([0.4, 1.3])
    loc, y = jnp.asarray(rng.normal(size=12)), jnp.asarray(rng.normal(size=12))
    argnums = (0, 2, 3) if sigma is None else (0, 1, 2, 3)
    got = jax.jit(jax.grad(ours, argnums=argnums), static_argnums=1 if sigma is None else ())(
        theta, sigma, loc, y
    )
    want = jax.grad(dense, argnums=argnums)(theta, sigma, loc, y)
    for g, h in zip(got, want, strict=True):
        assert np.all(np.isfinite(g))
        assert_close(g, np.asarray(h), rtol=1e3 * RTOL)  # dense solve of a 1e-6-jittered K


@pytest.mark.parametrize("grid", [True, False], ids=["grid", "points"])
def test_gradient_wrt_factor_matrices(rng, grid):
    """∂/∂K_i (symmetrized) of the custom VJPs equals dense autodiff, identity factor included."""
    factors, kstars, diags = problem(rng, (3, 4), (2, 3))
    factors[1] = np.eye(4)
    if not grid:
        rows = [np.array([0, 1, 1, 0]), np.array([2, 0, 1, 1])]
        kstars, diags = _points(kstars, rows), _points(diags, rows)
    y = rng.normal(size=12)
    w = rng.normal(size=(2, 6 if grid else 4))

    def ours(covs, sigma):
        mean, var = gp.predict(
            KroneckerNormal(0.0, covs=covs, sigma=sigma), y, kstars, diags, grid=grid
        )
        return jnp.sum(w[0] * mean) + jnp.sum(w[1] * var)

    def dense(covs, sigma):
        a = reduce(jnp.kron, covs) + sigma**2 * jnp.eye(12)
        ks = jnp.asarray(cross_matrix(kstars, grid))
        mean = ks @ jnp.linalg.solve(a, y)
        red = jnp.sum(ks * jnp.linalg.solve(a, ks.T).T, axis=1)
        return jnp.sum(w[0] * mean) - jnp.sum(w[1] * red)

    covs = [jnp.asarray(f) for f in factors]
    got, got_s = jax.jit(jax.grad(ours, argnums=(0, 1)))(covs, 0.5)
    want, want_s = jax.grad(dense, argnums=(0, 1))(covs, 0.5)
    for g, h in zip(got, want, strict=True):
        assert_close(g, np.asarray(0.5 * (h + h.T)), rtol=100 * RTOL)
    assert_close(got_s, np.asarray(want_s), rtol=100 * RTOL)


# ----------------------------------------------------------------------------------
# Structure: no N×N, M×N or M×M array anywhere, forward or backward.


def _largest_intermediate(jaxpr) -> int:
    biggest = 0
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            biggest = max(biggest, int(np.prod(getattr(v.aval, "shape", ()))))
        for p in eqn.params.values():
            for sub in p if isinstance(p, tuple | list) else (p,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    biggest = max(biggest, _largest_intermediate(inner))
    return biggest


@pytest.mark.parametrize("grid", [True, False], ids=["grid", "points"])
def test_no_dense_intermediates(rng, grid):
    train, test = (5, 7), (6, 8)
    factors, kstars, diags = problem(rng, train, test)
    if not grid:
        rows = [rng.integers(0, 6, 48), rng.integers(0, 8, 48)]
        kstars, diags = _points(kstars, rows), _points(diags, rows)
    n, m = 35, 48
    y = rng.normal(size=n)

    def loss(covs, sigma, kst):
        mean, var = gp.predict(
            KroneckerNormal(0.0, covs=covs, sigma=sigma), y, kst, diags, grid=grid
        )
        return jnp.sum(mean) + jnp.sum(var)

    covs = [jnp.asarray(f) for f in factors]
    kst = [jnp.asarray(k) for k in kstars]
    limit = min(n * n, n * m) // 2
    assert _largest_intermediate(jax.make_jaxpr(loss)(covs, 0.3, kst).jaxpr) < limit
    grad = jax.grad(loss, argnums=(0, 1, 2))
    assert _largest_intermediate(jax.make_jaxpr(grad)(covs, 0.3, kst).jaxpr) < limit


# ----------------------------------------------------------------------------------
# cartesian


def test_cartesian_order_matches_kron():
    a, b, c = np.array([0.0, 1.0]), np.array([10.0, 20.0, 30.0]), np.array([5.0, 6.0])
    pts = np.asarray(gp.cartesian(a, b, c))
    want = np.array([[i, j, k] for i in a for j in b for k in c])
    np.testing.assert_array_equal(pts, want)
    # a product kernel on the points is the Kronecker product of the factor kernels
    xs = [np.linspace(0, 1, 3), np.linspace(0, 2, 4)]
    pts = np.asarray(gp.cartesian(*xs))
    k = lambda u, v: np.exp(-(np.subtract.outer(u, v) ** 2))
    dense = k(pts[:, 0], pts[:, 0]) * k(pts[:, 1], pts[:, 1])
    np.testing.assert_allclose(dense, np.kron(k(xs[0], xs[0]), k(xs[1], xs[1])), rtol=1e-12)


def test_cartesian_multicolumn_axes():
    a = np.array([[0.0, 1.0], [2.0, 3.0]])
    b = np.array([7.0, 8.0, 9.0])
    pts = np.asarray(gp.cartesian(a, b))
    want = np.array([[*r, v] for r in a for v in b])
    np.testing.assert_array_equal(pts, want)


# ----------------------------------------------------------------------------------
# Bad input


def _bad_inputs(rng):
    factors, kstars, diags = problem(rng, (3, 4), (2, 5))
    dist = make_dist("covs", factors, 0.3, 0.0)
    y = rng.normal(size=12)
    return dist, y, kstars, diags


@pytest.mark.parametrize(
    "change,match",
    [
        (
            lambda a: {**a, "cross_covs": a["cross_covs"][:1]},
            r"cross_covs has 1 entries; expected d = 2",
        ),
        (
            lambda a: {**a, "cross_covs": [a["cross_covs"][0], a["cross_covs"][1][:, :3]]},
            r"cross_covs\[1\] has shape \(5, 3\); expected \(\.\.\., m_1, 4\)",
        ),
        (lambda a: {**a, "grid": False}, r"grid=False .* row counts \(2, 5\)"),
        (lambda a: {**a, "y": a["y"][:9]}, r"y has shape \(9,\); expected \(\.\.\., 12\)"),
        (
            lambda a: {**a, "test_diags": [a["test_diags"][0], a["test_diags"][1][:4]]},
            r"test_diags\[1\] has shape \(4,\); expected \(\.\.\., 5\)",
        ),
        (lambda a: {**a, "test_diags": a["test_diags"][:1]}, r"test_diags has 1 entries"),
    ],
    ids=["count", "columns", "grid=False rows", "y length", "diag length", "diag count"],
)
def test_bad_input_raises(rng, change, match):
    dist, y, kstars, diags = _bad_inputs(rng)
    args = change({"y": y, "cross_covs": kstars, "test_diags": diags, "grid": True})
    with pytest.raises(ValueError, match=match):
        gp.predict(dist, args["y"], args["cross_covs"], args["test_diags"], grid=args["grid"])


def test_cartesian_bad_axis():
    with pytest.raises(ValueError, match=r"axes\[1\] has shape \(2, 2, 2\)"):
        gp.cartesian(np.zeros(3), np.zeros((2, 2, 2)))
