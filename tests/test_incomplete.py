"""Incomplete grids and per-cell noise by iterative solves (``method="iterative"``), against
dense twins: ``jnp.kron`` covariances restricted to the observed cells, Cholesky log
densities differentiated plainly, and the dense Gaussian conditional."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import DTYPE, RTOL

from kronjax import KroneckerNormal, conditioning
from kronjax.conditioning import ConditioningWarning

pytestmark = pytest.mark.core
X1, X2 = np.linspace(0, 10, 12), np.linspace(0, 10, 10)
N = 120
RNG = np.random.default_rng(11)
Y = RNG.normal(size=N)
CELL_NOISE = RNG.uniform(0.01, 0.2, N)
S1 = RNG.uniform(0.5, 2.0, 12)
EXACT = dict(probes=10**6, lanczos_steps=10**6, tol=1e-12 if DTYPE == "float64" else 1e-6)


def rbf(x, ell):
    return jnp.exp(-0.5 * ((jnp.asarray(x, DTYPE)[:, None] - x) / ell) ** 2)


def mask(missing):
    keep = np.ones(N, bool)
    keep[np.random.default_rng(int(missing * 100)).permutation(N)[: max(1, int(missing * N))]] = 0
    return keep


def model(theta, noise_factors=False):
    """(KroneckerNormal, dense complete covariance) from θ = (ℓ1, ℓ2, σ)."""
    k1, k2 = rbf(X1, theta[0]), rbf(X2, theta[1])
    if noise_factors:
        s1 = jnp.asarray(S1, DTYPE)
        d = KroneckerNormal(0.0, covs=[k1, k2], sigma=theta[2], noise_factors=[s1, None])
        return d, jnp.kron(k1, k2) + theta[2] ** 2 * jnp.kron(jnp.diag(s1), jnp.eye(10))
    return KroneckerNormal(0.0, covs=[k1, k2], sigma=theta[2]), jnp.kron(k1, k2) + theta[
        2
    ] ** 2 * jnp.eye(N)


def dense_logp(cov, y):
    chol = jnp.linalg.cholesky(cov)
    z = jax.scipy.linalg.solve_triangular(chol, y, lower=True)
    return -0.5 * z @ z - jnp.sum(jnp.log(jnp.diag(chol))) - 0.5 * y.size * np.log(2 * np.pi)


THETA = jnp.asarray([1.5, 2.0, 0.3], DTYPE)


def pair(keep, cell_noise, noise_factors, **options):
    y = jnp.asarray(Y[keep], DTYPE)
    v = None if cell_noise is None else jnp.asarray(cell_noise, DTYPE)

    def ours(theta):
        d, _ = model(theta, noise_factors)
        return d.marginal(keep, method="iterative", cell_noise=v, **options).log_prob(y)

    def dense(theta):
        _, cov = model(theta, noise_factors)
        cov = cov if v is None else cov + jnp.diag(v)
        return dense_logp(cov[np.ix_(keep, keep)], y)

    return ours, dense


@pytest.mark.parametrize(
    "missing, cell_noise, noise_factors",
    [(0.01, None, False), (0.3, "cells", False), (0.7, None, True), (0.3, "cells", True)],
)
def test_exact_mode_matches_dense(missing, cell_noise, noise_factors):
    """probes >= n_obs: unit-vector probes and full Lanczos, so value and gradient are
    exact up to the solver tolerance."""
    v = None if cell_noise is None else CELL_NOISE
    ours, dense = pair(mask(missing), v, noise_factors, **EXACT)
    value, grad = jax.jit(jax.value_and_grad(ours))(THETA)
    want_value, want_grad = jax.value_and_grad(dense)(THETA)
    np.testing.assert_allclose(value, want_value, rtol=RTOL * 10)
    np.testing.assert_allclose(grad, want_grad, rtol=RTOL * 100, atol=RTOL * 100)


def test_exact_and_iterative_routes_agree():
    keep = mask(0.3)
    d, _ = model(THETA)
    y = jnp.asarray(Y[keep], DTYPE)
    exact = d.marginal(keep, method="exact").log_prob(y)
    iterative = d.marginal(keep, method="iterative", **EXACT).log_prob(y)
    np.testing.assert_allclose(iterative, exact, rtol=RTOL * 10)
    assert type(d.marginal(keep)).__name__ == "KroneckerMarginal"  # auto: 36 missing
    assert type(d.marginal(keep, cell_noise=CELL_NOISE)).__name__ == "IterativeMarginal"


def test_solve_matches_dense_and_reports_convergence():
    keep = mask(0.3)
    d, cov = model(THETA)
    marginal = d.marginal(keep, method="iterative", tol=1e-10 if DTYPE == "float64" else 1e-5)
    b = jnp.asarray(RNG.normal(size=keep.sum()), DTYPE)
    want = np.linalg.solve(np.asarray(cov, np.float64)[np.ix_(keep, keep)], np.asarray(b))
    np.testing.assert_allclose(marginal.solve(b), want, rtol=RTOL * 100, atol=RTOL * 100)
    info = marginal.solver_info(b)
    assert 0 < int(info.iterations) < 200 and float(info.residual) <= marginal.config.tol


@pytest.mark.parametrize("rank", [0, 128])
def test_solver_info_reports_the_lanczos_convergence(rank):
    """Exact probes: the reported log determinant is the dense one at full Lanczos steps.
    Without the preconditioner (rank 0) a 6-step rule errs by over a nat and its reported
    change over the last half of the steps flags it, understating the error by at most half;
    with the low-rank preconditioner (gap ≤ 1) the same 6 steps are already exact."""
    keep = mask(0.3)
    theta = jnp.asarray([1.5, 2.0, 0.05], DTYPE)
    d, cov = model(theta)
    dense = np.linalg.slogdet(np.asarray(cov, np.float64)[np.ix_(keep, keep)])[1]
    y = jnp.asarray(Y[keep], DTYPE)
    info = {
        steps: d.marginal(
            keep, method="iterative", probes=10**6, lanczos_steps=steps, precond_rank=rank
        ).solver_info(y)
        for steps in (6, 10**6)
    }
    np.testing.assert_allclose(info[10**6].logdet, dense, rtol=100 * RTOL)
    error6 = abs(float(info[6].logdet) - dense)
    if rank == 0:
        assert np.isinf(float(info[6].precond_gap))
        assert error6 > 1.0
        assert float(info[6].logdet_change) >= 0.5 * error6
        assert float(info[6].logdet_change) > 10 * float(info[10**6].logdet_change)
    else:
        assert float(info[6].precond_gap) <= 1
        assert error6 < 1e3 * RTOL * abs(dense)


def test_impute_matches_the_dense_conditional():
    """Pathwise draws of the latent grid: mean exact, Monte Carlo moments of the draws."""
    keep = mask(0.3)
    k1, k2 = rbf(X1, 1.5), rbf(X2, 2.0)
    d = KroneckerNormal(0.2, covs=[k1, k2], sigma=0.3)
    v = jnp.asarray(CELL_NOISE, DTYPE)
    marginal = d.marginal(keep, cell_noise=v, tol=1e-10 if DTYPE == "float64" else 1e-6)
    y = jnp.asarray(Y[keep], DTYPE)
    mean, draws = marginal.impute(jax.random.PRNGKey(0), y, (4000,))
    k = np.asarray(jnp.kron(k1, k2), np.float64)
    c = k[np.ix_(keep, keep)] + 0.09 * np.eye(keep.sum()) + np.diag(CELL_NOISE[keep])
    gain = np.linalg.solve(c, k[keep]).T
    want_mean = 0.2 + gain @ (Y[keep] - 0.2)
    want_cov = k - gain @ k[keep]
    np.testing.assert_allclose(mean, want_mean, rtol=RTOL * 100, atol=RTOL * 100)
    draws = np.asarray(draws, np.float64)
    sd = np.sqrt(np.clip(np.diag(want_cov), 1e-12, None))
    np.testing.assert_allclose(draws.mean(0), want_mean, atol=5 * sd.max() / np.sqrt(4000))
    emp = np.cov(draws.T)
    np.testing.assert_allclose(emp, want_cov, atol=0.05 * np.max(np.diag(want_cov)))


def test_bad_arguments_raise_value_errors_naming_them():
    d, _ = model(THETA)
    with pytest.raises(ValueError, match="method"):
        d.marginal(mask(0.3), method="cg")
    with pytest.raises(ValueError, match="exact route"):
        d.marginal(mask(0.3), method="exact", cell_noise=CELL_NOISE)
    with pytest.raises(ValueError, match="cell_noise has shape"):
        d.marginal(mask(0.3), cell_noise=CELL_NOISE[:5])
    with pytest.raises(ValueError, match="non-negative"):
        d.marginal(mask(0.3), cell_noise=-CELL_NOISE)
    with pytest.raises(ValueError, match="probes"):
        d.marginal(mask(0.3), method="iterative", probes=0)
    keep = mask(0.3)
    marginal = d.marginal(keep, method="iterative")
    with pytest.raises(NotImplementedError, match="iterative marginal"):
        jax.hessian(
            lambda t: (
                model(t)[0].marginal(keep, method="iterative").log_prob(jnp.asarray(Y[keep], DTYPE))
            )
        )(THETA)
    assert marginal.event_shape == (int(keep.sum()),)


def test_float32_past_its_conditioning_limit_refuses_or_warns_naming_the_route(monkeypatch):
    """σ = 1e-3 puts κ near 1e8, past float32's 1/(8 eps): a ValueError with
    ``validate_args``, else a ConditioningWarning; either names the iterative route."""
    monkeypatch.setattr(conditioning, "_warned", set())  # it warns once per process
    keep = mask(0.3)
    covs = [rbf(X1, 1.5).astype(jnp.float32), rbf(X2, 2.0).astype(jnp.float32)]
    y = jnp.asarray(Y[keep], jnp.float32)
    sigma = jnp.float32(1e-3)
    strict = KroneckerNormal(0.0, covs=covs, sigma=sigma, validate_args=True)
    route = r'KroneckerNormal\.marginal\(method="iterative"\)\.log_prob: .*condition number'
    with pytest.raises(ValueError, match=route):
        strict.marginal(keep, method="iterative").log_prob(y)
    with pytest.warns(ConditioningWarning, match=route):
        KroneckerNormal(0.0, covs=covs, sigma=sigma).marginal(keep, method="iterative").log_prob(y)


@pytest.mark.parametrize("grid", [True, False])
def test_gp_predict_on_an_incomplete_grid_matches_the_dense_conditional(grid):
    from kronjax import gp

    keep = mask(0.3)
    k1, k2 = rbf(X1, 1.5), rbf(X2, 2.0)
    d = KroneckerNormal(0.0, covs=[k1, k2], sigma=0.3)
    v = jnp.asarray(CELL_NOISE, DTYPE)
    tol = 1e-10 if DTYPE == "float64" else 1e-6
    marginal = d.marginal(keep, cell_noise=v, tol=tol)
    xs1, xs2 = np.linspace(0.5, 9.5, 4), np.linspace(1, 9, 3 if grid else 4)
    c1 = jnp.exp(-0.5 * ((xs1[:, None] - X1) / 1.5) ** 2).astype(DTYPE)
    c2 = jnp.exp(-0.5 * ((xs2[:, None] - X2) / 2.0) ** 2).astype(DTYPE)
    diags = [jnp.ones(len(xs1), DTYPE), jnp.ones(len(xs2), DTYPE)]
    y = jnp.asarray(Y[keep], DTYPE)
    mean, var = gp.predict(marginal, y, [c1, c2], diags, grid=grid, pred_noise=True)
    cross = np.kron(c1, c2) if grid else np.einsum("pa,pb->pab", c1, c2).reshape(4, -1)
    cross = np.asarray(cross, np.float64)[:, keep]
    k = np.kron(np.asarray(k1, np.float64), np.asarray(k2, np.float64))
    c = k[np.ix_(keep, keep)] + 0.09 * np.eye(keep.sum()) + np.diag(CELL_NOISE[keep])
    want_mean = cross @ np.linalg.solve(c, Y[keep])
    want_var = 1.0 - np.einsum("mn,nm->m", cross, np.linalg.solve(c, cross.T)) + 0.09
    np.testing.assert_allclose(mean, want_mean, rtol=RTOL * 100, atol=RTOL * 100)
    np.testing.assert_allclose(var, want_var, rtol=RTOL * 100, atol=RTOL * 100)


def test_predict_on_a_batched_marginal_matches_each_member():
    """Batched σ and cell noise (batch 3): mean and variance per member against the dense
    conditional of that member."""
    from kronjax import gp

    keep = mask(0.3)
    k1, k2 = rbf(X1, 1.5), rbf(X2, 2.0)
    sigmas = np.array([0.2, 0.3, 0.5])
    noise = np.stack([CELL_NOISE, 2 * CELL_NOISE, CELL_NOISE[::-1]])
    d = KroneckerNormal(0.0, covs=[k1, k2], sigma=jnp.asarray(sigmas, DTYPE))
    tol = 1e-10 if DTYPE == "float64" else 1e-6
    marginal = d.marginal(keep, cell_noise=jnp.asarray(noise, DTYPE), tol=tol)
    assert marginal.batch_shape == (3,)
    xs1, xs2 = np.linspace(0.5, 9.5, 5), np.linspace(1, 9, 3)
    c1 = jnp.exp(-0.5 * ((xs1[:, None] - X1) / 1.5) ** 2).astype(DTYPE)
    c2 = jnp.exp(-0.5 * ((xs2[:, None] - X2) / 2.0) ** 2).astype(DTYPE)
    diags = [jnp.ones(5, DTYPE), jnp.ones(3, DTYPE)]
    y = jnp.asarray(Y[keep], DTYPE)
    mean, var = marginal.predict(y, [c1, c2], diags, pred_noise=True, block=4)  # padded
    assert mean.shape == var.shape == (3, 15)
    np.testing.assert_allclose(
        gp.predict(marginal, y, [c1, c2], diags, pred_noise=True)[1], var, rtol=RTOL * 100
    )
    cross = np.asarray(np.kron(c1, c2), np.float64)[:, keep]
    k = np.kron(np.asarray(k1, np.float64), np.asarray(k2, np.float64))[np.ix_(keep, keep)]
    for b in range(3):
        c = k + sigmas[b] ** 2 * np.eye(keep.sum()) + np.diag(noise[b][keep])
        want_mean = cross @ np.linalg.solve(c, Y[keep])
        want_var = 1.0 - np.einsum("mn,nm->m", cross, np.linalg.solve(c, cross.T))
        np.testing.assert_allclose(mean[b], want_mean, rtol=RTOL * 100, atol=RTOL * 100)
        np.testing.assert_allclose(
            var[b], want_var + sigmas[b] ** 2, rtol=RTOL * 100, atol=RTOL * 100
        )


def test_batched_marginal_gradients_match_each_member():
    """Batched σ and cell noise (batch 2), exact probes: the Jacobian of the batched log
    densities w.r.t. the shared lengthscales and each member's σ is the dense twin's per
    member (the preconditioner's control variate is built per member)."""
    keep = mask(0.3)
    y = jnp.asarray(Y[keep], DTYPE)
    sigmas = jnp.asarray([0.3, 0.5], DTYPE)
    noise = jnp.asarray(np.stack([CELL_NOISE, 2 * CELL_NOISE]), DTYPE)

    def ours(ells, sig):
        d = KroneckerNormal(0.0, covs=[rbf(X1, ells[0]), rbf(X2, ells[1])], sigma=sig)
        return d.marginal(keep, method="iterative", cell_noise=noise, **EXACT).log_prob(y)

    jac_ells, jac_sig = jax.jacrev(ours, argnums=(0, 1))(THETA[:2], sigmas)
    for b in range(2):

        def dense(ells, sig, b=b):
            cov = jnp.kron(rbf(X1, ells[0]), rbf(X2, ells[1])) + jnp.diag(sig**2 + noise[b])
            return dense_logp(cov[np.ix_(keep, keep)], y)

        want_ells, want_sig = jax.grad(dense, argnums=(0, 1))(THETA[:2], sigmas[b])
        np.testing.assert_allclose(jac_ells[b], want_ells, rtol=RTOL * 100, atol=RTOL * 100)
        np.testing.assert_allclose(jac_sig[b, b], want_sig, rtol=RTOL * 100)
        assert float(jac_sig[b, 1 - b]) == 0.0
