"""KroneckerNormal under jit, vmap, scan, lax.map, and inside NumPyro inference."""

import dense
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from conftest import DTYPE, RTOL
from numpyro.distributions.batch_util import promote_batch_shape
from numpyro.infer import MCMC, NUTS, SVI, Predictive, Trace_ELBO
from numpyro.infer.autoguide import AutoDelta

from kronjax import KroneckerNormal

pytestmark = pytest.mark.core

X1 = jnp.linspace(0.0, 1.0, 6, dtype=DTYPE)
X2 = jnp.linspace(0.0, 1.0, 5, dtype=DTYPE)


def rbf(x, ell):
    return jnp.exp(-0.5 * ((x[:, None] - x[None, :]) / ell) ** 2)


def grid_dist(theta):
    """A 6×5 grid GP with lengthscales theta[0:2] and noise theta[2]."""
    return KroneckerNormal(0.0, covs=[rbf(X1, theta[0]), rbf(X2, theta[1])], sigma=theta[2])


def dense_logp(theta, y):
    cov = dense.covariance([rbf(X1, theta[0]), rbf(X2, theta[1])], theta[2])
    return dense.logpdf(y, np.zeros(30), cov)


THETA = jnp.asarray([0.3, 0.5, 0.2], DTYPE)
Y = jnp.asarray(np.random.default_rng(0).normal(size=30), DTYPE)


def test_pytree_round_trip_through_jit_keeps_factorization():
    d = grid_dist(THETA)
    leaves, treedef = jax.tree.flatten(d)
    assert len(leaves) >= 2 + 3 * 2  # loc, sigma, covs, eigvals, eigvecs
    out = jax.jit(lambda d: d)(d)
    assert isinstance(out, KroneckerNormal)
    assert out.batch_shape == d.batch_shape and out.event_shape == d.event_shape
    for a, b in zip(out.covariance.eigvecs, d.covariance.eigvecs):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(jax.jit(lambda d: d.log_prob(Y))(d), d.log_prob(Y), rtol=RTOL)


def test_jit_log_prob_and_grad():
    f = jax.jit(jax.value_and_grad(lambda t: grid_dist(t).log_prob(Y)))
    value, grad = f(THETA)
    np.testing.assert_allclose(value, dense_logp(np.asarray(THETA), Y), rtol=RTOL)
    assert bool(jnp.all(jnp.isfinite(grad)))


def test_no_retrace_on_new_values():
    traces = []

    @jax.jit
    def logp(theta, y):
        traces.append(1)
        return grid_dist(theta).log_prob(y)

    logp(THETA, Y)
    logp(THETA * 1.1, Y + 1)
    logp(THETA * 0.9, -Y)
    assert len(traces) == 1


def test_vmap_over_constructor_from_batched_hyperparameter():
    thetas = jnp.stack([THETA, THETA * 1.3, THETA * 0.7])
    values = jax.vmap(lambda t: grid_dist(t).log_prob(Y))(thetas)
    expected = [dense_logp(np.asarray(t), Y) for t in thetas]
    np.testing.assert_allclose(values, expected, rtol=RTOL)
    # a distribution returned from vmap carries the new batch dim once promoted, as
    # NumPyro's own distributions do (the stored shape is the member's until then)
    batched = jax.vmap(grid_dist)(thetas)
    assert batched.batch_shape == ()
    batched = promote_batch_shape(batched)
    assert batched.batch_shape == (3,)
    np.testing.assert_allclose(batched.log_prob(Y), expected, rtol=RTOL)
    assert batched.sample(jax.random.PRNGKey(0), (2,)).shape == (2, 3, 30)


def test_vmap_over_values_and_grad():
    ys = jnp.stack([Y, -Y, 2 * Y])
    grads = jax.vmap(jax.grad(lambda t, y: grid_dist(t).log_prob(y)), (None, 0))(THETA, ys)
    assert grads.shape == (3, 3) and bool(jnp.all(jnp.isfinite(grads)))
    np.testing.assert_allclose(
        jax.vmap(grid_dist(THETA).log_prob)(ys), grid_dist(THETA).log_prob(ys), rtol=RTOL
    )


def test_scan_and_map_carry_the_distribution():
    d = grid_dist(THETA)

    def body(carry, y):
        return carry, carry.log_prob(y)

    ys = jnp.stack([Y, -Y])
    carry, out = jax.lax.scan(body, d, ys)
    assert isinstance(carry, KroneckerNormal)
    np.testing.assert_allclose(out, d.log_prob(ys), rtol=RTOL)
    thetas = jnp.stack([THETA, 1.2 * THETA])
    mapped = promote_batch_shape(jax.lax.map(grid_dist, thetas))
    assert mapped.batch_shape == (2,)
    np.testing.assert_allclose(
        mapped.log_prob(Y), [dense_logp(np.asarray(t), Y) for t in thetas], rtol=RTOL
    )


def _model(y=None):
    ell = numpyro.sample("ell", dist.LogNormal(jnp.log(0.4), 0.3).expand([2]).to_event(1))
    sigma = numpyro.sample("sigma", dist.HalfNormal(0.5))
    numpyro.sample("y", grid_dist(jnp.concatenate([ell, sigma[None]])), obs=y)


def test_numpyro_nuts_svi_predictive():
    y = grid_dist(THETA).sample(jax.random.PRNGKey(1))
    mcmc = MCMC(NUTS(_model), num_warmup=50, num_samples=50, progress_bar=False)
    mcmc.run(jax.random.PRNGKey(2), y)
    samples = mcmc.get_samples()
    assert samples["ell"].shape == (50, 2)
    assert bool(jnp.all(jnp.isfinite(samples["sigma"])))
    prior = Predictive(_model, num_samples=4)(jax.random.PRNGKey(3))
    assert prior["y"].shape == (4, 30)
    post = Predictive(_model, samples)(jax.random.PRNGKey(4))
    assert post["y"].shape == (50, 30)
    svi = SVI(_model, AutoDelta(_model), numpyro.optim.Adam(0.05), Trace_ELBO())
    result = svi.run(jax.random.PRNGKey(5), 50, y, progress_bar=False)
    assert bool(jnp.isfinite(result.losses[-1])) and result.losses[-1] < result.losses[0]


def test_large_grid_value_and_grad_and_sample():
    """64×64×64 (N = 262,144): no N×N array can exist here (it would need 550 GB).

    Diagonal factors give an independent reference: K is diagonal, so log p is a sum
    of univariate normal log densities.
    """
    n = 64
    diags = [jnp.linspace(0.5, 2.0, n, dtype=DTYPE) * (i + 1) for i in range(3)]
    y = jax.random.normal(jax.random.PRNGKey(0), (n**3,), DTYPE)

    def logp(scales, sigma):
        covs = [jnp.diag(s * d) for s, d in zip(scales, diags)]
        return KroneckerNormal(0.0, covs=covs, sigma=sigma).log_prob(y)

    def reference(scales, sigma):
        var = jnp.einsum("i,j,k->ijk", *[s * d for s, d in zip(scales, diags)]).reshape(-1)
        return jnp.sum(dist.Normal(0.0, jnp.sqrt(var + sigma**2)).log_prob(y))

    args = (jnp.ones(3, DTYPE), jnp.asarray(0.3, DTYPE))
    value, grads = jax.jit(jax.value_and_grad(logp, argnums=(0, 1)))(*args)
    ref_value, ref_grads = jax.value_and_grad(reference, argnums=(0, 1))(*args)
    rtol = 10 * RTOL if DTYPE == "float32" else RTOL
    np.testing.assert_allclose(value, ref_value, rtol=rtol)
    for a, b in zip(grads, ref_grads):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * float(jnp.max(jnp.abs(b))))
    x = jax.jit(lambda k: KroneckerNormal(0.0, covs=[jnp.diag(d) for d in diags]).sample(k))(
        jax.random.PRNGKey(1)
    )
    assert x.shape == (n**3,) and bool(jnp.all(jnp.isfinite(x)))
