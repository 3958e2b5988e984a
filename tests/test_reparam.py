"""``KroneckerReparam``: the whitened site reproduces the prior, and NUTS agrees with it."""

from functools import reduce

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from conftest import RTOL
from numpyro import handlers
from numpyro.infer import MCMC, NUTS, Predictive

from kronjax import KroneckerNormal, KroneckerReparam


def sqexp(x1, x2, ell):
    return jnp.exp(-0.5 * jnp.square(x1[:, None] - x2[None, :]) / ell**2)


def make_dist(param, factors, sigma, loc=0.0):
    factors = [jnp.asarray(f) for f in factors]
    if param == "covs":
        return KroneckerNormal(loc, covs=factors, sigma=sigma)
    if param == "chols":
        return KroneckerNormal(loc, chols=[jnp.linalg.cholesky(f) for f in factors], sigma=sigma)
    return KroneckerNormal(loc, evds=[jnp.linalg.eigh(f) for f in factors], sigma=sigma)


def factors_3x4():
    x1, x2 = jnp.linspace(0, 1, 3), jnp.linspace(0, 2, 4)
    return [
        np.asarray(sqexp(x1, x1, 0.5)) + 1e-3 * np.eye(3),
        np.asarray(1.5 * sqexp(x2, x2, 0.8)) + 1e-3 * np.eye(4),
    ]


def reparam_value(fn, z):
    """The deterministic value of a site ``f ~ fn`` reparameterized, with ``f_decentered = z``."""
    with handlers.seed(rng_seed=0), handlers.substitute(data={"f_decentered": z}):
        new_fn, value = KroneckerReparam()("f", fn, None)
    assert new_fn is None
    return value


def dense_cov(factors, sigma):
    n = int(np.prod([f.shape[0] for f in factors]))
    return reduce(np.kron, factors) + (0.0 if sigma is None else sigma**2) * np.eye(n)


@pytest.mark.parametrize("param", ["covs", "chols", "evds"])
@pytest.mark.parametrize("sigma", [None, 0.4], ids=["noise-free", "noise"])
def test_root_reproduces_covariance_exactly(rng, param, sigma):
    """f = loc + R z is linear in z: feeding z = e_1, …, e_N recovers R; R Rᵀ must equal K."""
    factors = factors_3x4()
    loc = rng.normal(size=12)
    value = reparam_value(make_dist(param, factors, sigma, loc), jnp.eye(12))
    root = np.asarray(value - loc).T
    want = dense_cov(factors, sigma)
    np.testing.assert_allclose(root @ root.T, want, atol=10 * RTOL * np.max(want))


def test_root_psd_factor_and_batched_sigma(rng):
    """A rank-one factor with noise, and a batch of two sigmas: one root per batch member."""
    factors = factors_3x4()
    factors[1] = np.full((4, 4), 2.0)
    sigma = np.array([0.3, 1.1])
    value = reparam_value(make_dist("covs", factors, sigma), jnp.eye(12)[:, None, :])
    assert value.shape == (12, 2, 12)
    for b in range(2):
        root = np.asarray(value[:, b]).T
        want = dense_cov(factors, sigma[b])
        np.testing.assert_allclose(root @ root.T, want, atol=10 * RTOL * np.max(want))


def test_prior_moments_through_plate_and_predictive(rng):
    """Monte Carlo: prior draws of the reparameterized site, inside a plate, match loc and K."""
    factors = factors_3x4()
    loc = rng.normal(size=(2, 12))

    def model():
        with numpyro.plate("batch", 2):
            numpyro.sample("f", KroneckerNormal(loc, covs=factors, sigma=0.5))

    model = handlers.reparam(model, config={"f": KroneckerReparam()})
    n = 20_000
    draws = Predictive(model, num_samples=n)(jax.random.PRNGKey(1))
    assert draws["f_decentered"].shape == draws["f"].shape == (n, 2, 12)
    want = dense_cov(factors, 0.5)
    scale = np.sqrt(np.max(np.diag(want)))
    for b in range(2):
        f = np.asarray(draws["f"][:, b])
        np.testing.assert_allclose(f.mean(0), loc[b], atol=5 * scale / np.sqrt(n))
        np.testing.assert_allclose(np.cov(f.T), want, atol=5 * scale**2 * np.sqrt(2 / n))


def test_expanded_to_event_site_keeps_shapes():
    factors = factors_3x4()

    def model():
        numpyro.sample("f", KroneckerNormal(0.0, covs=factors).expand([3]).to_event(1))

    model = handlers.reparam(model, config={"f": KroneckerReparam()})
    tr = handlers.trace(handlers.seed(model, 0)).get_trace()
    assert tr["f_decentered"]["fn"].event_shape == (3, 12)
    assert tr["f"]["type"] == "deterministic" and tr["f"]["value"].shape == (3, 12)


@pytest.mark.parametrize(
    "param,sigma,repeated",
    [("covs", 0.4, False), ("covs", 0.4, True), ("chols", None, False), ("chols", 0.4, True)],
    ids=["covs-noise", "covs-noise-repeated", "chols-noise-free", "chols-noise-repeated"],
)
def test_gradient_of_reparam_value_matches_finite_differences(rng, param, sigma, repeated):
    """d⟨w, loc + R(θ) z⟩/dθ against central differences of a dense root of K(θ)."""
    x1, x2 = jnp.linspace(0, 1, 3), jnp.linspace(0, 2, 4)
    z, w = rng.normal(size=12), rng.normal(size=12)

    def factors(theta):
        f2 = theta[1] * jnp.eye(4) if repeated else theta[1] * sqexp(x2, x2, 0.8)
        return [sqexp(x1, x1, theta[0]) + 1e-3 * jnp.eye(3), f2 + 1e-3 * jnp.eye(4)]

    def ours(theta, s):
        fn = make_dist(param, factors(theta), None if sigma is None else s)
        return jnp.sum(w * reparam_value(fn, jnp.asarray(z)))

    def dense(theta, s):
        fs = [np.asarray(f) for f in factors(jnp.asarray(theta))]
        if sigma is None:  # the structured root of the noise-free Cholesky parameterization
            root = reduce(np.kron, [np.linalg.cholesky(f) for f in fs])
        else:  # the symmetric root of K + s² I
            vals, vecs = np.linalg.eigh(dense_cov(fs, s))
            root = (vecs * np.sqrt(vals)) @ vecs.T
        return w @ root @ z

    theta, s, eps = np.array([0.4, 1.3]), 0.4, 1e-6
    got_theta, got_s = jax.grad(ours, argnums=(0, 1))(jnp.asarray(theta), s)
    for k in range(2):
        step = eps * np.eye(2)[k]
        fd = (dense(theta + step, s) - dense(theta - step, s)) / (2 * eps)
        np.testing.assert_allclose(got_theta[k], fd, rtol=1e-6, atol=1e-7)
    if sigma is not None:
        fd = (dense(theta, s + eps) - dense(theta, s - eps)) / (2 * eps)
        np.testing.assert_allclose(got_s, fd, rtol=1e-6, atol=1e-7)


def test_observed_site_and_other_distribution_raise():
    fn = KroneckerNormal(0.0, covs=factors_3x4())
    with pytest.raises(ValueError, match="'f' is observed"):
        KroneckerReparam()("f", fn, jnp.zeros(12))
    with pytest.raises(ValueError, match="expected a KroneckerNormal"):
        KroneckerReparam()("f", dist.Normal(jnp.zeros(12), 1.0).to_event(1), None)


# ----------------------------------------------------------------------------------
# NUTS


def run_nuts(model, seed, *args, warmup=400, samples=800):
    mcmc = MCMC(NUTS(model), num_warmup=warmup, num_samples=samples, progress_bar=False)
    mcmc.run(jax.random.PRNGKey(seed), *args)
    return mcmc.get_samples()


@pytest.mark.parametrize("param,sigma", [("covs", 0.3), ("chols", None)], ids=["noise", "chol"])
def test_gaussian_grid_posterior_same_with_and_without_reparam(rng, param, sigma):
    """A latent grid field under Gaussian noise: NUTS with and without the reparam both
    match the exact Gaussian posterior (dense formulas)."""
    factors = factors_3x4()
    tau = 0.5
    y = rng.normal(size=12)

    def model(y):
        f = numpyro.sample("f", make_dist(param, factors, sigma))
        numpyro.sample("y", dist.Normal(f, tau), obs=y)

    prior = dense_cov(factors, sigma)
    post_cov = np.linalg.inv(np.linalg.inv(prior) + np.eye(12) / tau**2)
    post_mean = post_cov @ y / tau**2
    post_sd = np.sqrt(np.diag(post_cov))
    reparam_model = handlers.reparam(model, config={"f": KroneckerReparam()})
    for m in (model, reparam_model):
        f = np.asarray(run_nuts(m, 0, y)["f"])
        # Monte Carlo tolerance: effective sample size well above 150 for this 12-d Gaussian
        np.testing.assert_allclose(f.mean(0), post_mean, atol=0.2 * np.max(post_sd))
        np.testing.assert_allclose(f.std(0), post_sd, rtol=0.2)


def test_poisson_grid_recovers_latent_field(rng):
    """A log-Gaussian Cox process on an 8×8 grid: the posterior mean tracks the truth."""
    x1, x2 = jnp.linspace(0, 1, 8), jnp.linspace(0, 1, 8)
    covs = [sqexp(x1, x1, 0.3) + 1e-4 * jnp.eye(8), sqexp(x2, x2, 0.3) + 1e-4 * jnp.eye(8)]
    truth = (np.sin(4 * np.asarray(x1))[:, None] + np.cos(3 * np.asarray(x2))[None, :]).ravel()
    counts = rng.poisson(np.exp(1.5 + truth))

    def model(counts):
        f = numpyro.sample("f", KroneckerNormal(0.0, covs=covs))
        numpyro.sample("counts", dist.Poisson(jnp.exp(1.5 + f)), obs=counts)

    reparam_model = handlers.reparam(model, config={"f": KroneckerReparam()})
    f = np.asarray(run_nuts(reparam_model, 2, counts, warmup=300, samples=300)["f"])
    assert np.corrcoef(f.mean(0), truth)[0, 1] > 0.95
    assert np.sqrt(np.mean((f.mean(0) - truth) ** 2)) < 0.3
