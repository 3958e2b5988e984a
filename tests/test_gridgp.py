"""``kronjax.GridGP``: kernels in, posterior out, against the dense conditional in NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
import tinygp
from conftest import DTYPE, RTOL
from scipy.stats import multivariate_normal

from kronjax import GridGP
from kronjax.gp import cartesian

F = jnp.dtype(DTYPE)
TOL = {"float64": 1e-8, "float32": 2e-3}[DTYPE]
X1 = np.linspace(0.0, 1.0, 7)
X2 = np.linspace(0.0, 2.0, 5)
T1 = np.linspace(-0.2, 1.3, 4)
T2 = np.linspace(0.1, 2.5, 3)
POINTS = np.array([[0.1, 0.3], [0.5, 1.9], [1.2, -0.1], [0.5, 1.9]])
Y = np.random.default_rng(1).normal(size=(7, 5))


def rbf(ell):
    return lambda a, b: jnp.exp(-0.5 * ((a[:, None] - b[None, :]) / ell) ** 2)


def np_rbf(a, b, ell):
    return np.exp(-0.5 * ((np.asarray(a)[:, None] - np.asarray(b)[None, :]) / ell) ** 2)


def linear_mean(points):
    return 0.3 + points[:, 0] - 0.5 * points[:, 1]


def dense_k(a, b, ells=(0.3, 0.7)):
    """The product kernel between rows of 2-column point arrays, in NumPy float64."""
    return np_rbf(a[:, 0], b[:, 0], ells[0]) * np_rbf(a[:, 1], b[:, 1], ells[1])


def dense_posterior(test, sigma=0.2, keep=None, cell_noise=None, mean=linear_mean):
    """Mean and covariance of f at the ``test`` points given Y at the kept cells."""
    x = np.asarray(cartesian(X1, X2), np.float64)
    n = x.shape[0]
    keep = np.arange(n) if keep is None else np.flatnonzero(np.reshape(keep, -1))
    noise = sigma**2 + (0.0 if cell_noise is None else np.asarray(cell_noise))
    c = dense_k(x, x)[np.ix_(keep, keep)] + np.diag(np.broadcast_to(noise, (n,))[keep])
    k_tx = dense_k(test, x)[:, keep]
    r = Y.reshape(-1)[keep] - np.asarray(mean(x))[keep]
    mu = np.asarray(mean(test)) + k_tx @ np.linalg.solve(c, r)
    return mu, dense_k(test, test) - k_tx @ np.linalg.solve(c, k_tx.T)


def make(kernels="plain", **kw):
    if kernels == "tinygp":
        kernels = [tinygp.kernels.ExpSquared(scale=0.3), tinygp.kernels.ExpSquared(scale=0.7)]
    else:
        kernels = [rbf(0.3), rbf(0.7)]
    kw.setdefault("sigma", jnp.asarray(0.2, F))
    kw.setdefault("mean", linear_mean)
    return GridGP(kernels, [jnp.asarray(X1, F), jnp.asarray(X2, F)], **kw)


@pytest.mark.core
@pytest.mark.parametrize("kernels", ["plain", "tinygp"])
def test_condition_on_test_grid_matches_dense(kernels):
    post = make(kernels).condition(jnp.asarray(Y, F), [jnp.asarray(T1, F), jnp.asarray(T2, F)])
    mu, cov = dense_posterior(np.asarray(cartesian(T1, T2), np.float64))
    assert post.mean.shape == post.variance.shape == (4, 3)
    np.testing.assert_allclose(post.mean.reshape(-1), mu, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(post.variance.reshape(-1), np.diag(cov), rtol=TOL, atol=TOL)


@pytest.mark.core
def test_condition_at_points_matches_dense():
    post = make("tinygp").condition(jnp.asarray(Y, F), points=jnp.asarray(POINTS, F))
    mu, cov = dense_posterior(POINTS)
    np.testing.assert_allclose(post.mean, mu, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(post.variance, np.diag(cov), rtol=TOL, atol=TOL)


@pytest.mark.core
def test_constant_mean_and_pred_noise():
    gp = make(mean=1.5)
    post = gp.condition(jnp.asarray(Y, F).reshape(-1), [T1, T2], pred_noise=True)
    mu, cov = dense_posterior(np.asarray(cartesian(T1, T2)), mean=lambda p: np.full(len(p), 1.5))
    np.testing.assert_allclose(post.mean.reshape(-1), mu, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(post.variance.reshape(-1), np.diag(cov) + 0.04, rtol=TOL)


@pytest.mark.core
def test_multi_column_axis():
    """Axis 0 holds 2-D inputs (stations); the kernel sees both columns."""
    stations = np.random.default_rng(3).uniform(size=(6, 2))
    times = np.linspace(0, 1, 4)
    k_space = lambda a, b: jnp.exp(-jnp.sum((a[:, None] - b[None]) ** 2, -1) / 0.5)
    gp = GridGP([k_space, rbf(0.4)], [stations, times], sigma=0.3)
    y = np.random.default_rng(4).normal(size=(6, 4))
    test = np.array([[0.2, 0.4, 0.5], [0.9, 0.1, 0.0]])  # (x, y, t) rows
    post = gp.condition(y, points=test)

    def k(a, b):
        d2 = ((a[:, None, :2] - b[None, :, :2]) ** 2).sum(-1)
        return np.exp(-d2 / 0.5) * np_rbf(a[:, 2], b[:, 2], 0.4)

    x = np.asarray(cartesian(stations, times), np.float64)
    c = k(x, x) + 0.09 * np.eye(24)
    mu = k(test, x) @ np.linalg.solve(c, y.reshape(-1))
    var = np.diag(k(test, test) - k(test, x) @ np.linalg.solve(c, k(x, test)))
    np.testing.assert_allclose(post.mean, mu, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(post.variance, var, rtol=TOL, atol=TOL)


MC = 40_000


def assert_moments(draws, mu, cov):
    """Monte Carlo mean and covariance of ``draws`` against the dense conditional: within 5
    standard errors (mean) and 0.03 of the largest variance (covariance)."""
    draws = np.asarray(draws, np.float64).reshape(MC, -1)
    se = np.sqrt(np.diag(cov) / MC)
    np.testing.assert_array_less(np.abs(draws.mean(0) - mu), 5 * se + 1e-6)
    np.testing.assert_allclose(np.cov(draws.T), cov, atol=0.03 * np.diag(cov).max())


@pytest.mark.core
def test_joint_samples_on_test_grid():
    post = make().condition(jnp.asarray(Y, F), [T1, T2])
    draws = jax.jit(post.sample, static_argnums=1)(jax.random.PRNGKey(0), (MC,))
    assert draws.shape == (MC, 4, 3)
    assert_moments(draws, *dense_posterior(np.asarray(cartesian(T1, T2))))


@pytest.mark.core
def test_joint_samples_at_points():
    """Points include a repeated one: its two draws must coincide (the covariance row
    equals the variance), which only a joint sampler gets right."""
    post = make().condition(jnp.asarray(Y, F), points=POINTS)
    draws = post.sample(jax.random.PRNGKey(1), (MC,))
    assert_moments(draws, *dense_posterior(POINTS))
    np.testing.assert_allclose(draws[:, 1], draws[:, 3], atol=1e-2 if DTYPE == "float32" else 1e-6)


@pytest.mark.core
def test_incomplete_grid_posterior():
    """Missing cells and per-cell noise: the GP object takes the iterative route."""
    keep = np.ones((7, 5), bool)
    keep[2, 3] = keep[5, 1] = keep[0, 0] = keep[6, 4] = False
    v = np.linspace(0.01, 0.1, 35)
    gp = make(
        observed=keep, cell_noise=jnp.asarray(v, F), tol=1e-10 if DTYPE == "float64" else 1e-6
    )
    test = np.asarray(cartesian(T1, T2), np.float64)
    mu, cov = dense_posterior(test, keep=keep, cell_noise=v)
    for y in (jnp.asarray(Y, F), jnp.asarray(Y, F)[keep]):  # the grid or the observed cells
        post = gp.condition(y, [T1, T2])
        np.testing.assert_allclose(post.mean.reshape(-1), mu, rtol=10 * TOL, atol=10 * TOL)
        np.testing.assert_allclose(post.variance.reshape(-1), np.diag(cov), atol=10 * TOL)
    assert_moments(post.sample(jax.random.PRNGKey(2), (MC,)), mu, cov)


@pytest.mark.core
def test_log_prob_and_numpyro_dist_match_dense():
    gp = make()
    x = np.asarray(cartesian(X1, X2), np.float64)
    want = multivariate_normal(linear_mean(x), dense_k(x, x) + 0.04 * np.eye(35)).logpdf(
        Y.reshape(-1)
    )
    np.testing.assert_allclose(gp.log_prob(jnp.asarray(Y, F)), want, rtol=RTOL)
    grid_site = gp.numpyro_dist(grid_event=True)
    assert grid_site.event_shape == (7, 5)
    np.testing.assert_allclose(grid_site.log_prob(jnp.asarray(Y, F)), want, rtol=RTOL)
    keep = np.ones(35, bool)
    keep[[3, 17]] = False
    marginal = make(observed=keep, method="exact").numpyro_dist()
    assert marginal.event_shape == (33,)
    dense = multivariate_normal(
        linear_mean(x)[keep], (dense_k(x, x) + 0.04 * np.eye(35))[np.ix_(keep, keep)]
    )
    np.testing.assert_allclose(
        marginal.log_prob(jnp.asarray(Y.reshape(-1)[keep], F)),
        dense.logpdf(Y.reshape(-1)[keep]),
        rtol=RTOL,
    )


@pytest.mark.core
def test_jit_vmap_grad():
    """Hyperparameters traced: jit of the posterior mean, vmap over lengthscales against a
    loop, and the gradient of the log likelihood against central differences of the dense
    density."""

    def build(theta):
        return GridGP(
            [tinygp.kernels.ExpSquared(scale=theta[0]), rbf(theta[1])],
            [jnp.asarray(X1, F), jnp.asarray(X2, F)],
            sigma=theta[2],
            mean=linear_mean,
        )

    theta = jnp.asarray([0.3, 0.7, 0.2], F)
    mean = jax.jit(lambda t: build(t).condition(jnp.asarray(Y, F), [T1, T2]).mean)
    mu, _ = dense_posterior(np.asarray(cartesian(T1, T2)))
    np.testing.assert_allclose(mean(theta).reshape(-1), mu, rtol=TOL, atol=TOL)
    thetas = jnp.asarray([[0.3, 0.7, 0.2], [0.5, 0.4, 0.3], [0.2, 1.0, 0.1]], F)
    batched = jax.vmap(mean)(thetas)
    for t, got in zip(thetas, batched):
        np.testing.assert_allclose(got, mean(t), rtol=TOL, atol=TOL)

    def dense_lp(t):
        x = np.asarray(cartesian(X1, X2), np.float64)
        cov = dense_k(x, x, t[:2]) + t[2] ** 2 * np.eye(35)
        return multivariate_normal(linear_mean(x), cov).logpdf(Y.reshape(-1))

    grad = jax.grad(lambda t: build(t).log_prob(jnp.asarray(Y, F)))(theta)
    t64, h = np.asarray(theta, np.float64), 1e-6
    fd = [(dense_lp(t64 + h * e) - dense_lp(t64 - h * e)) / (2 * h) for e in np.eye(3)]
    np.testing.assert_allclose(grad, fd, rtol=100 * RTOL, atol=1e-4)


# warmup's early trajectories visit lengthscales far past the grid, where κ overflows
@pytest.mark.filterwarnings("ignore::kronjax.conditioning.ConditioningWarning")
def test_nuts_with_gridgp_matches_dense_model():
    """NUTS on lengthscales and σ with the GP object and with a dense MultivariateNormal of
    the same model: posterior means within 0.25 posterior sd (two chains of 600 draws
    differ by about 0.1 sd from Monte Carlo error alone)."""
    from numpyro.infer import MCMC, NUTS

    x = jnp.asarray(cartesian(X1, X2), F)

    def model(kind):
        def fn(y):
            ell = numpyro.sample("ell", dist.LogNormal(jnp.log(0.5) * jnp.ones(2, F), 0.4))
            sigma = numpyro.sample("sigma", dist.LogNormal(jnp.log(jnp.asarray(0.2, F)), 0.5))
            if kind == "gridgp":
                gp = GridGP([rbf(ell[0]), rbf(ell[1])], [X1, X2], sigma=sigma, names=("a", "b"))
                numpyro.sample("y", gp.numpyro_dist(grid_event=True), obs=y)
            else:
                cov = rbf(ell[0])(x[:, 0], x[:, 0]) * rbf(ell[1])(x[:, 1], x[:, 1])
                cov = cov + sigma**2 * jnp.eye(35, dtype=F)
                numpyro.sample("y", dist.MultivariateNormal(0.0, cov), obs=y.reshape(-1))

        return fn

    stats = {}
    for kind in ("gridgp", "dense"):
        mcmc = MCMC(NUTS(model(kind)), num_warmup=300, num_samples=600, progress_bar=False)
        mcmc.run(jax.random.PRNGKey(3), jnp.asarray(Y, F))
        s = mcmc.get_samples()
        draws = np.column_stack([s["ell"], s["sigma"]])
        stats[kind] = (draws.mean(0), draws.std(0))
    diff = np.abs(stats["gridgp"][0] - stats["dense"][0]) / stats["dense"][1]
    np.testing.assert_array_less(diff, 0.25)


def test_arviz_dims_from_numpyro():
    """A grid-shaped site with the GP's axis names becomes an ArviZ variable with those
    dims."""
    import arviz_base
    from numpyro.infer import Predictive

    gp = GridGP([rbf(0.3), rbf(0.7)], [X1, X2], sigma=0.2, names=("year", "month"))
    model = lambda: numpyro.sample("y", gp.numpyro_dist(grid_event=True))
    prior = Predictive(model, num_samples=5)(jax.random.PRNGKey(0))
    assert prior["y"].shape == (5, 7, 5)
    idata = arviz_base.from_numpyro(prior=prior, dims=gp.dims("y"))
    assert tuple(idata.prior["y"].dims[-2:]) == ("year", "month")


@pytest.mark.core
def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="2 kernels for 3 axes"):
        GridGP([rbf(1.0)] * 2, [X1, X2, X1])
    with pytest.raises(ValueError, match=r"kernels\[1\] is a float"):
        GridGP([rbf(1.0), 1.0], [X1, X2])
    with pytest.raises(ValueError, match=r"axes\[1\] has shape \(2, 2, 2\)"):
        GridGP([rbf(1.0)] * 2, [X1, np.zeros((2, 2, 2))])
    bad = GridGP([rbf(1.0), lambda a, b: jnp.ones(3)], [X1, X2], sigma=0.1)
    with pytest.raises(ValueError, match=r"kernels\[1\] returned shape \(3,\)"):
        _ = bad.prior
    gp = make()
    with pytest.raises(ValueError, match=r"y has shape \(6, 5\)"):
        gp.condition(np.zeros((6, 5)), [T1, T2])
    with pytest.raises(ValueError, match="exactly one of test_axes and points"):
        gp.condition(Y)
    with pytest.raises(ValueError, match="test_axes has 1 entries"):
        gp.condition(Y, [T1])
    with pytest.raises(ValueError, match=r"points has shape \(4, 3\)"):
        gp.condition(Y, points=np.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"cell_noise has shape \(3,\)"):
        make(cell_noise=np.ones(3))
    with pytest.raises(ValueError, match="grid_event=True needs a complete grid"):
        make(observed=np.arange(30)).numpyro_dist(grid_event=True)
    with pytest.raises(ValueError, match="distinct names"):
        make(names=("a", "a"))
