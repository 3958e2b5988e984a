"""Second-order derivatives: exact where kronjax supports them, refused where it does not.

The custom VJPs treat the eigenvectors as constants, so a second derivative w.r.t. the
factors through them would be wrong (it was: ``jax.hessian`` returned 663.8 where central
differences give 1.87). kronjax now raises NotImplementedError there, and second and third
derivatives w.r.t. sigma and the value stay exact (dense float64 Cholesky twins).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kronjax
from kronjax import KroneckerNormal

X1, X2 = np.linspace(0, 1, 12), np.linspace(0, 1, 10)
Y = np.random.default_rng(0).normal(size=120)


def rbf(x, ell):
    return jnp.exp(-0.5 * ((x[:, None] - x) / ell) ** 2) + 1e-6 * jnp.eye(len(x))


def dist(theta, **kw):
    return KroneckerNormal(0.0, covs=[rbf(X1, theta[0]), rbf(X2, theta[1])], sigma=theta[2], **kw)


def dense_logpdf(k1, k2, sigma, y):
    a = jnp.kron(k1, k2) + sigma**2 * jnp.eye(y.shape[-1])
    chol = jnp.linalg.cholesky(a)
    z = jax.scipy.linalg.solve_triangular(chol, y, lower=True)
    return -0.5 * z @ z - jnp.sum(jnp.log(jnp.diag(chol))) - 0.5 * y.size * np.log(2 * np.pi)


THETA = jnp.asarray([0.3, 0.4, 0.5])
SECOND_ORDER = {
    "hessian": jax.hessian,
    "jacrev(jacrev)": lambda f: jax.jacrev(jax.jacrev(f)),
    "jacfwd(grad)": lambda f: jax.jacfwd(jax.grad(f)),
}


@pytest.mark.parametrize("form", sorted(SECOND_ORDER))
@pytest.mark.parametrize(
    "quantity",
    ["log_prob", "entropy", "kl", "marginal", "predict", "noise_factors", "evds-sample"],
)
def test_second_order_wrt_factors_is_refused(form, quantity):
    y = jnp.asarray(Y)

    def f(theta):
        d = dist(theta)
        if quantity == "log_prob":
            return d.log_prob(y)
        if quantity == "entropy":
            return d.entropy()
        if quantity == "kl":
            other = dist(jnp.asarray([0.5, 0.2, 0.3]))
            return jax.numpy.sum(kronjax.kl.kl_divergence(d, other))
        if quantity == "marginal":
            return d.marginal(np.arange(120) != 5).log_prob(np.delete(Y, 5))
        if quantity == "predict":
            _, var = kronjax.gp.predict(
                d, y, [rbf(X1, 0.3)[:3], rbf(X2, 0.4)[:2]], [jnp.ones(3), jnp.ones(2)]
            )
            return var.sum()
        if quantity == "noise_factors":
            noisy = KroneckerNormal(
                0.0,
                covs=[rbf(X1, 0.3), rbf(X2, 0.4)],
                sigma=0.5,
                noise_factors=[jnp.ones(12) * theta[0], None],
            )
            return noisy.log_prob(y)
        return d.sample(jax.random.PRNGKey(0)).sum()

    with pytest.raises(NotImplementedError, match="second-order derivative"):
        SECOND_ORDER[form](f)(THETA)


def test_first_order_still_works_everywhere():
    g = jax.jit(jax.vmap(jax.grad(lambda t: dist(t).log_prob(jnp.asarray(Y)))))
    assert bool(jnp.all(jnp.isfinite(g(jnp.stack([THETA, THETA * 1.1])))))


@pytest.mark.parametrize("form", sorted(SECOND_ORDER))
def test_second_order_wrt_sigma_and_value_is_exact(form):
    k1, k2 = rbf(X1, 0.3), rbf(X2, 0.4)
    y = jnp.asarray(Y)
    ours = lambda s: KroneckerNormal(0.0, covs=[k1, k2], sigma=s).log_prob(y)  # noqa: E731
    want = lambda s: dense_logpdf(k1, k2, s, y)  # noqa: E731
    np.testing.assert_allclose(
        SECOND_ORDER[form](ours)(0.5), SECOND_ORDER[form](want)(0.5), rtol=1e-7
    )
    ours_y = lambda v: KroneckerNormal(0.0, covs=[k1, k2], sigma=0.5).log_prob(v)  # noqa: E731
    want_y = lambda v: dense_logpdf(k1, k2, 0.5, v)  # noqa: E731
    np.testing.assert_allclose(
        SECOND_ORDER[form](ours_y)(y), SECOND_ORDER[form](want_y)(y), rtol=1e-6, atol=1e-8
    )


def test_third_order_wrt_sigma_matches_finite_differences_of_the_hessian():
    k1, k2 = rbf(X1, 0.3), rbf(X2, 0.4)
    y = jnp.asarray(Y)
    f = lambda s: KroneckerNormal(0.0, covs=[k1, k2], sigma=s).log_prob(y)  # noqa: E731
    h = jax.hessian(lambda s: dense_logpdf(k1, k2, s, y))
    fd = (h(0.5 + 1e-5) - h(0.5 - 1e-5)) / 2e-5
    np.testing.assert_allclose(jax.jacfwd(jax.hessian(f))(0.5), fd, rtol=1e-5)


def test_second_order_wrt_sigma_with_noise_factors_is_exact(rng):
    """Through the whitening (kronjax.lapack's Cholesky and triangular solves)."""
    k1, k2 = rbf(X1, 0.3), rbf(X2, 0.4)
    s1 = jnp.asarray(rng.uniform(0.5, 2.0, 12))
    a = rng.normal(size=(10, 10))
    s2 = jnp.asarray(a @ a.T / 10 + 0.5 * np.eye(10))
    y = jnp.asarray(Y)

    def ours(s):
        return KroneckerNormal(0.0, covs=[k1, k2], sigma=s, noise_factors=[s1, s2]).log_prob(y)

    def want(s):
        cov = jnp.kron(k1, k2) + s**2 * jnp.kron(jnp.diag(s1), s2)
        chol = jnp.linalg.cholesky(cov)
        z = jax.scipy.linalg.solve_triangular(chol, y, lower=True)
        return -0.5 * z @ z - jnp.sum(jnp.log(jnp.diag(chol))) - 60 * np.log(2 * np.pi)

    for form in SECOND_ORDER.values():
        np.testing.assert_allclose(form(ours)(0.5), form(want)(0.5), rtol=1e-7)


def test_second_order_wrt_cross_covariances_is_exact():
    """gp.predict's mean and variance, twice differentiated w.r.t. a scale of K*_1."""
    k1, k2 = rbf(X1, 0.3), rbf(X2, 0.4)
    y = jnp.asarray(Y)
    c1, c2 = rbf(X1, 0.3)[:3], rbf(X2, 0.4)[:2]
    diags = [jnp.ones(3), jnp.ones(2)]

    def ours(t):
        d = KroneckerNormal(0.0, covs=[k1, k2], sigma=0.5)
        mean, var = kronjax.gp.predict(d, y, [t * c1, c2], diags)
        return jnp.sum(mean**2) + jnp.sum(var)

    def want(t):
        a = jnp.kron(k1, k2) + 0.25 * jnp.eye(120)
        cross = jnp.kron(t * c1, c2)
        mean = cross @ jnp.linalg.solve(a, y)
        var = 1.0 - jnp.einsum("mn,nm->m", cross, jnp.linalg.solve(a, cross.T))
        return jnp.sum(mean**2) + jnp.sum(var)

    for form in SECOND_ORDER.values():
        np.testing.assert_allclose(form(ours)(0.9), form(want)(0.9), rtol=1e-7)


@pytest.mark.parametrize("mode", ["jvp", "jacfwd"])
def test_forward_mode_raises_rather_than_returning_a_number(mode):
    """Forward mode is not supported through the custom VJPs: it raises, never a number."""
    f = lambda t: dist(t).log_prob(jnp.asarray(Y))  # noqa: E731
    call = {
        "jvp": lambda: jax.jvp(f, (THETA,), (jnp.ones(3),)),
        "jacfwd": lambda: jax.jacfwd(f)(THETA),
    }[mode]
    with pytest.raises((TypeError, NotImplementedError), match="forward-mode|second-order"):
        call()
