"""float32 knows its limits: ill-conditioned covariances warn (or refuse), never lie quietly.

References are dense float64 (NumPy/SciPy). Every case builds float32 arrays explicitly, so
it runs the same in the float64 session (JAX keeps float32 inputs in float32).
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dense import covariance, logpdf

import kronjax
from kronjax import KroneckerNormal, conditioning

X1, X2 = np.linspace(0, 1, 30), np.linspace(0, 1, 20)
Y = np.random.default_rng(0).normal(size=600)


def rbf(x, ell):
    return np.exp(-0.5 * ((x[:, None] - x[None, :]) / ell) ** 2)


def dist32(sigma, **kw):
    covs = [jnp.asarray(rbf(X1, 0.2), jnp.float32), jnp.asarray(rbf(X2, 0.3), jnp.float32)]
    return KroneckerNormal(0.0, covs=covs, sigma=jnp.float32(sigma), **kw)


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(conditioning, "_warned", set())


def caught(fn):
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        out = jax.block_until_ready(fn())
    return out, [w for w in got if issubclass(w.category, conditioning.ConditioningWarning)]


def test_condition_number_is_exact_against_dense():
    d = KroneckerNormal(0.0, covs=[rbf(X1[:8], 0.2), rbf(X2[:6], 0.3)], sigma=0.05)
    eig = np.linalg.eigvalsh(covariance([rbf(X1[:8], 0.2), rbf(X2[:6], 0.3)], 0.05))
    np.testing.assert_allclose(d.condition_number(), eig[-1] / eig[0], rtol=1e-6)


def test_well_conditioned_float32_is_accurate_and_silent():
    d = dist32(0.3)
    value, found = caught(lambda: d.log_prob(jnp.asarray(Y, jnp.float32)))
    assert found == []
    want = logpdf(Y, np.zeros(600), covariance([rbf(X1, 0.2), rbf(X2, 0.3)], 0.3))
    np.testing.assert_allclose(value, want, rtol=1e-4)


@pytest.mark.parametrize("mode", ["eager", "jit", "vmap"])
def test_ill_conditioned_float32_warns_once(mode):
    y = jnp.asarray(Y, jnp.float32)
    fns = {
        "eager": lambda: dist32(1e-3).log_prob(y),
        "jit": lambda: jax.jit(lambda s: dist32(s).log_prob(y))(jnp.float32(1e-3)),
        "vmap": lambda: jax.jit(jax.vmap(jax.grad(lambda s: dist32(s).log_prob(y))))(
            jnp.asarray([1e-3, 2e-3, 0.3], jnp.float32)
        ),
    }
    _, found = caught(fns[mode])
    assert len(found) == 1, [str(w.message) for w in found]
    assert "condition number" in str(found[0].message) and "float32" in str(found[0].message)
    _, again = caught(fns[mode])
    assert again == []  # once per process and operation


def test_validate_args_refuses_ill_conditioned_float32():
    d = dist32(1e-3, validate_args=True)
    with pytest.raises(ValueError, match="condition number 1.4.e\\+08.*float32"):
        d.log_prob(jnp.asarray(Y, jnp.float32))
    with pytest.raises(ValueError, match="condition number"):
        d.marginal(np.arange(600) != 7)
    # sampling goes through the factor roots, which stay well-conditioned
    x, found = caught(lambda: d.sample(jax.random.PRNGKey(0)))
    assert found == [] and bool(jnp.all(jnp.isfinite(x)))


def test_float64_same_problem_is_silent_and_exact():
    d = KroneckerNormal(0.0, covs=[rbf(X1, 0.2), rbf(X2, 0.3)], sigma=1e-3, validate_args=True)
    value, found = caught(lambda: d.log_prob(Y))
    assert found == []
    want = logpdf(Y, np.zeros(600), covariance([rbf(X1, 0.2), rbf(X2, 0.3)], 1e-3))
    np.testing.assert_allclose(value, want, rtol=1e-6)


def test_predict_float32_variances_never_negative():
    """30 × 20 training grid, σ = 1e-3, 17 × 13 test grid (221 points)."""
    xs1, xs2 = np.linspace(0, 1, 17), np.linspace(0, 1, 13)
    cross = [
        jnp.asarray(np.exp(-0.5 * ((a[:, None] - b) / e) ** 2), jnp.float32)
        for a, b, e in ((xs1, X1, 0.2), (xs2, X2, 0.3))
    ]
    diags = [jnp.ones(17, jnp.float32), jnp.ones(13, jnp.float32)]
    (mean, var), found = caught(
        lambda: kronjax.gp.predict(dist32(1e-3), jnp.asarray(Y, jnp.float32), cross, diags)
    )
    assert len(found) == 1 and var.shape == (221,)
    assert bool(jnp.all(var >= 0))
