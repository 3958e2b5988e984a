"""Derivatives of every order: exact where kronjax supports them, refused where it does not.

Every quantity is compared with a dense float64 twin (``jnp.kron`` + Cholesky), which
JAX differentiates plainly, on the issue's 40×30 RBF grid (ℓ = 1.5, 2.0 on [0, 10],
σ = 0.1, no jitter: many eigenvalues agree to rounding, where autodiff through ``eigh``
is wrong). Before, ``jax.hessian`` of ``log_prob`` returned 663.8 where central
differences give 1.87, and forward mode raised a JAX TypeError.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer import MCMC, NUTS, SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoLaplaceApproximation

import kronjax
from kronjax import KroneckerNormal

X1, X2 = np.linspace(0, 10, 40), np.linspace(0, 10, 30)
N = 1200
Y = np.random.default_rng(0).normal(size=N)
THETA = jnp.asarray([1.5, 2.0, 0.1])
Q1 = np.linalg.eigh(np.exp(-0.5 * (X1[:, None] - X1) ** 2))[1]
Q2 = np.linalg.eigh(np.exp(-0.5 * (X2[:, None] - X2) ** 2))[1]
S1 = np.random.default_rng(1).uniform(0.5, 2.0, 40)

SECOND_ORDER = {  # jitted: eager dispatch of a Hessian costs seconds
    "hessian": lambda f: jax.jit(jax.hessian(f)),
    "jacfwd(jacrev)": lambda f: jax.jit(jax.jacfwd(jax.jacrev(f))),
    "jacrev(jacrev)": lambda f: jax.jit(jax.jacrev(jax.jacrev(f))),
    "jacrev(jacfwd)": lambda f: jax.jit(jax.jacrev(jax.jacfwd(f))),
}


def rbf(x, ell):
    return jnp.exp(-0.5 * ((x[:, None] - x) / ell) ** 2)


def route(name, theta):
    """The KroneckerNormal parameters of a route and the dense covariance, from θ."""
    k1, k2 = rbf(X1, theta[0]), rbf(X2, theta[1])
    s2 = theta[2] ** 2
    if name == "covs":
        return dict(covs=[k1, k2], sigma=theta[2]), jnp.kron(k1, k2) + s2 * jnp.eye(N)
    if name == "a·I factor":
        k2 = theta[1] * jnp.eye(30)
        return dict(covs=[k1, k2], sigma=theta[2]), jnp.kron(k1, k2) + s2 * jnp.eye(N)
    if name == "chols":
        k1, k2 = (k + 1e-6 * jnp.eye(len(k)) for k in (k1, k2))
        chols = [jnp.linalg.cholesky(k) for k in (k1, k2)]
        return dict(chols=chols, sigma=theta[2]), jnp.kron(k1, k2) + s2 * jnp.eye(N)
    if name == "evds":
        v1, v2 = jnp.linspace(1, 2, 40) * theta[0], jnp.linspace(1, 2, 30) * theta[1]
        dense = jnp.kron((Q1 * v1) @ Q1.T, (Q2 * v2) @ Q2.T) + s2 * jnp.eye(N)
        return dict(evds=[(v1, Q1), (v2, Q2)], sigma=theta[2]), dense
    noise = theta[0] * S1
    dense = jnp.kron(k1, k2) + s2 * jnp.kron(jnp.diag(noise), jnp.eye(30))
    return dict(covs=[k1, k2], sigma=theta[2], noise_factors=[noise, None]), dense


def dense_logpdf(cov, y):
    chol = jnp.linalg.cholesky(cov)
    z = jax.scipy.linalg.solve_triangular(chol, y, lower=True)
    return -0.5 * z @ z - jnp.sum(jnp.log(jnp.diag(chol))) - 0.5 * y.size * np.log(2 * np.pi)


def dense_entropy(cov):
    chol = jnp.linalg.cholesky(cov)
    return jnp.sum(jnp.log(jnp.diag(chol))) + 0.5 * cov.shape[-1] * (1 + np.log(2 * np.pi))


def quantity(name, name_of_route):
    """(kronjax's f(θ), the dense twin's f(θ)) for a scalar quantity."""
    y = jnp.asarray(Y)
    keep = np.arange(N) % 7 != 3

    def ours(theta):
        d = KroneckerNormal(0.0, **route(name_of_route, theta)[0])
        if name == "log_prob":
            return d.log_prob(y)
        if name == "entropy":
            return d.entropy()
        return d.marginal(keep).log_prob(y[keep])

    def dense(theta):
        cov = route(name_of_route, theta)[1]
        if name == "log_prob":
            return dense_logpdf(cov, y)
        if name == "entropy":
            return dense_entropy(cov)
        return dense_logpdf(cov[np.ix_(keep, keep)], y[keep])

    return ours, dense


def close(a, b, rtol):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.max(np.abs(b)))


@pytest.mark.parametrize("name", ["covs", "a·I factor", "chols", "evds", "noise_factors"])
def test_log_prob_hessians_and_jacfwd_match_dense(name):
    ours, dense = quantity("log_prob", name)
    close(jax.jit(jax.jacfwd(ours))(THETA), jax.jit(jax.grad(dense))(THETA), 1e-7)
    want = jax.jit(jax.hessian(dense))(THETA)
    for form in SECOND_ORDER.values():
        close(form(ours)(THETA), want, 1e-6)


@pytest.mark.parametrize("name", ["entropy", "marginal"])
@pytest.mark.parametrize("name_of_route", ["covs", "noise_factors"])
def test_entropy_and_marginal_hessians_match_dense(name, name_of_route):
    ours, dense = quantity(name, name_of_route)
    close(jax.jit(jax.jacfwd(ours))(THETA), jax.jit(jax.grad(dense))(THETA), 1e-7)
    close(jax.jit(jax.hessian(ours))(THETA), jax.jit(jax.hessian(dense))(THETA), 1e-6)


def test_hessian_wrt_the_value_and_loc_is_exact():
    k1, k2 = rbf(X1, 1.5), rbf(X2, 2.0)
    cov = jnp.kron(k1, k2) + 0.01 * jnp.eye(N)
    y = jnp.asarray(Y[:N])

    def ours(v):
        return KroneckerNormal(0.5 * v, covs=[k1, k2], sigma=0.1).log_prob(y + v)

    want = jax.hessian(lambda v: dense_logpdf(cov, 0.5 * v + y))(jnp.zeros(N))
    close(jax.jit(jax.hessian(ours))(jnp.zeros(N))[:50, :50], want[:50, :50], 1e-6)


def test_third_order_is_exact_wrt_sigma_and_refused_wrt_factors():
    """On a 20×15 corner of the grid (third derivatives compile slowly)."""
    k1, k2 = rbf(X1[:20], 1.5), rbf(X2[:15], 2.0)
    y = jnp.asarray(Y[:300])
    f = lambda s: KroneckerNormal(0.0, covs=[k1, k2], sigma=s).log_prob(y)  # noqa: E731
    h = jax.jit(jax.hessian(lambda s: dense_logpdf(jnp.kron(k1, k2) + s**2 * jnp.eye(300), y)))
    fd = (h(0.1 + 1e-6) - h(0.1 - 1e-6)) / 2e-6
    close(jax.jit(jax.jacfwd(jax.hessian(f)))(0.1), fd, 1e-4)

    def by_ell(t):
        return KroneckerNormal(0.0, covs=[rbf(X1[:20], t[0]), k2], sigma=t[1]).log_prob(y)

    with pytest.raises(NotImplementedError, match="third derivative of the log density"):
        jax.jacfwd(jax.hessian(by_ell))(jnp.asarray([1.5, 0.1]))


def kl_pair(theta):
    """KL(p ‖ q) with p from θ[:2] and q from θ[2:]: kronjax's and the dense twin's."""
    p_covs, q_covs = [rbf(X1, theta[0]), rbf(X2, 2.0)], [rbf(X1, 1.2), rbf(X2, 1.8)]
    p = KroneckerNormal(0.0, covs=p_covs, sigma=theta[1])
    q = KroneckerNormal(0.1, covs=q_covs, sigma=theta[2])
    ours = jnp.sum(kronjax.kl.kl_divergence(p, q))
    ap = jnp.kron(*p_covs) + theta[1] ** 2 * jnp.eye(N)
    aq = jnp.kron(*q_covs) + theta[2] ** 2 * jnp.eye(N)
    lq = jnp.linalg.cholesky(aq)
    w = jax.scipy.linalg.solve_triangular(lq, jnp.linalg.cholesky(ap), lower=True)
    m = jax.scipy.linalg.solve_triangular(lq, 0.1 * jnp.ones(N), lower=True)
    dense = (
        0.5 * (jnp.sum(w**2) + m @ m - N)
        + jnp.sum(jnp.log(jnp.diag(lq)))
        - jnp.sum(jnp.log(jnp.diag(jnp.linalg.cholesky(ap))))
    )
    return ours, dense


def test_kl_forward_mode_and_hessian_wrt_p_and_sigmas_match_dense():
    theta = jnp.asarray([1.5, 0.1, 0.2])
    ours = lambda t: kl_pair(t)[0]  # noqa: E731
    dense = lambda t: kl_pair(t)[1]  # noqa: E731
    close(ours(theta), dense(theta), 1e-9)
    close(jax.jit(jax.jacfwd(ours))(theta), jax.jit(jax.grad(dense))(theta), 1e-7)
    close(jax.jit(jax.hessian(ours))(theta), jax.jit(jax.hessian(dense))(theta), 1e-6)


def test_kl_hessian_wrt_q_factors_is_refused():
    p = KroneckerNormal(0.0, covs=[rbf(X1, 1.5), rbf(X2, 2.0)], sigma=0.1)

    def f(ell):
        q = KroneckerNormal(0.0, covs=[rbf(X1, ell), rbf(X2, 1.8)], sigma=0.2)
        return kronjax.kl.kl_divergence(p, q)

    np.testing.assert_allclose(jax.jit(jax.jacfwd(f))(1.2), jax.jit(jax.grad(f))(1.2), rtol=1e-9)
    for form in SECOND_ORDER.values():
        with pytest.raises(NotImplementedError, match="trace of A⁻¹"):
            form(f)(1.2)


def predict_pair(theta, cross_scale=1.0, ells=None):
    """Sum of gp.predict's mean² and variance at 4×2 test points: kronjax's, dense twin's;
    ``ells`` fixes the lengthscales as constants."""
    ell1, ell2 = (theta[0], theta[1]) if ells is None else ells
    k1, k2 = rbf(X1, ell1), rbf(X2, ell2)
    c1 = cross_scale * rbf(X1, ell1)[::13]
    c2 = rbf(X2, ell2)[::15]
    y = jnp.asarray(Y)
    d = KroneckerNormal(0.0, covs=[k1, k2], sigma=theta[2])
    mean, var = kronjax.gp.predict(d, y, [c1, c2], [jnp.ones(4), jnp.ones(2)])
    a = jnp.kron(k1, k2) + theta[2] ** 2 * jnp.eye(N)
    cross = jnp.kron(c1, c2)
    dmean = cross @ jnp.linalg.solve(a, y)
    dvar = 1.0 - jnp.einsum("mn,nm->m", cross, jnp.linalg.solve(a, cross.T))
    return jnp.sum(mean**2) + jnp.sum(var), jnp.sum(dmean**2) + jnp.sum(dvar)


def test_predict_forward_mode_matches_dense_and_factor_hessian_is_refused():
    ours = lambda t: predict_pair(t)[0]  # noqa: E731
    dense = lambda t: predict_pair(t)[1]  # noqa: E731
    close(jax.jit(jax.jacfwd(ours))(THETA), jax.jit(jax.grad(dense))(THETA), 1e-6)
    close(jax.jit(jax.grad(ours))(THETA), jax.jit(jax.grad(dense))(THETA), 1e-6)
    by_sigma = [
        lambda s, k=k: predict_pair(jnp.stack([0.0, 0.0, s]), ells=(1.5, 2.0))[k] for k in (0, 1)
    ]
    close(jax.jit(jax.hessian(by_sigma[0]))(0.1), jax.jit(jax.hessian(by_sigma[1]))(0.1), 1e-6)
    for form in SECOND_ORDER.values():
        with pytest.raises(NotImplementedError, match="predictive variance"):
            form(ours)(THETA)


def test_predict_hessian_wrt_cross_covariances_is_exact():
    ours = lambda t: predict_pair(THETA, t)[0]  # noqa: E731
    dense = lambda t: predict_pair(THETA, t)[1]  # noqa: E731
    for form in SECOND_ORDER.values():
        close(form(ours)(0.9), form(dense)(0.9), 1e-6)


def test_sampling_forward_mode_matches_reverse_mode():
    def f(theta):
        d = KroneckerNormal(0.0, **route("covs", theta)[0])
        return jnp.sum(d.sample(jax.random.PRNGKey(0)) ** 2)

    close(jax.jit(jax.jacfwd(f))(THETA), jax.jit(jax.grad(f))(THETA), 1e-8)
    with pytest.raises(NotImplementedError, match="second derivative of"):
        jax.jit(jax.hessian(f))(THETA)


# ----------------------------------------------------------------------------------
# Inference that needs the derivatives: the Laplace approximation (a Hessian) and NUTS
# in forward mode, on a small grid against the same model with a dense MultivariateNormal.

XS1, XS2 = np.linspace(0, 1, 8), np.linspace(0, 1, 6)
YS = np.random.default_rng(3).normal(size=48)


def grid_model(kind):
    def model(y):
        ell = numpyro.sample("ell", dist.LogNormal(jnp.log(0.4) * jnp.ones(2), 0.3))
        sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
        k1, k2 = rbf(XS1, ell[0]), rbf(XS2, ell[1])
        if kind == "kronjax":
            obs = KroneckerNormal(0.0, covs=[k1, k2], sigma=sigma)
        else:
            cov = jnp.kron(k1, k2) + sigma**2 * jnp.eye(48)
            obs = dist.MultivariateNormal(jnp.zeros(48), covariance_matrix=cov)
        numpyro.sample("y", obs, obs=y)

    return model


def test_auto_laplace_matches_the_dense_model():
    fits = {}
    for kind in ("kronjax", "dense"):
        guide = AutoLaplaceApproximation(grid_model(kind))
        svi = SVI(grid_model(kind), guide, numpyro.optim.Adam(0.05), Trace_ELBO())
        result = svi.run(jax.random.PRNGKey(0), 600, jnp.asarray(YS), progress_bar=False)
        post = guide.get_posterior(result.params)
        fits[kind] = (post.mean, post.covariance_matrix)
    close(fits["kronjax"][0], fits["dense"][0], 1e-6)
    close(fits["kronjax"][1], fits["dense"][1], 1e-5)
    assert np.all(np.linalg.eigvalsh(np.asarray(fits["kronjax"][1])) > 0)


def test_forward_mode_nuts_matches_reverse_mode_nuts():
    means = {}
    for forward in (False, True):
        kernel = NUTS(grid_model("kronjax"), forward_mode_differentiation=forward)
        mcmc = MCMC(kernel, num_warmup=300, num_samples=400, progress_bar=False)
        mcmc.run(jax.random.PRNGKey(1), jnp.asarray(YS))
        samples = mcmc.get_samples()
        means[forward] = (samples["ell"].mean(0), samples["sigma"].mean(), samples["ell"].std(0))
    ell_sd = means[False][2]
    np.testing.assert_array_less(np.abs(means[True][0] - means[False][0]), 0.1 * ell_sd)
    assert abs(float(means[True][1] - means[False][1])) < 0.05
