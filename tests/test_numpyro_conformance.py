"""KroneckerNormal as a NumPyro citizen: a table of cases in the style of NumPyro's
``CONTINUOUS`` list, run through the generic checks that apply (shapes, ``infer_shapes``,
``get_args``, ``vmap_over``, pytree round trips, ``scan``), each against an independent
reference (SciPy / the dense covariance)."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import pytest
import scipy.stats
from conftest import DTYPE, RTOL
from dense import spd
from numpyro.contrib.control_flow import scan
from numpyro.distributions.batch_util import vmap_over
from numpyro.infer.util import log_density

from kronjax import KroneckerNormal

pytestmark = pytest.mark.core
_RNG = np.random.default_rng(1)


def _f(x):
    return jnp.asarray(x, DTYPE)


def _case(sizes, kind, sigma, noise=None, batch=()):
    covs = [
        np.stack([spd(_RNG, n, 0.3) for _ in range(int(np.prod(batch, dtype=int)))]).reshape(
            batch + (n, n)
        )
        for n in sizes
    ]
    params = {"covs": [_f(k) for k in covs]}
    if kind == "chols":
        params = {"chols": [_f(np.linalg.cholesky(k)) for k in covs]}
    if kind == "evds":
        params = {"evds": [tuple(map(_f, np.linalg.eigh(k))) for k in covs]}
    params["loc"] = _f(_RNG.normal(size=batch + (int(np.prod(sizes)),)))
    if sigma is not None:
        params["sigma"] = _f(np.full(batch, sigma))
    if noise is not None:
        params["noise_factors"] = [
            None if k is None else _f(_RNG.uniform(0.5, 2, n)) if k == "diag" else _f(spd(_RNG, n))
            for k, n in zip(noise, sizes, strict=True)
        ]
    return params


CASES = {
    "covs-2": _case((3, 4), "covs", 0.3),
    "chols-2": _case((3, 4), "chols", None),
    "chols-2-sigma": _case((3, 4), "chols", 0.2),
    "evds-2": _case((3, 4), "evds", 0.4),
    "covs-3": _case((2, 3, 2), "covs", 0.5),
    "evds-3-no-sigma": _case((2, 3, 2), "evds", None),
    "covs-2-noise": _case((3, 4), "covs", 0.3, ("mat", "diag")),
    "chols-3-noise": _case((2, 3, 2), "chols", 0.4, (None, "diag", "mat")),
    "covs-2-batched": _case((3, 4), "covs", 0.3, batch=(2,)),
    "evds-2-batched": _case((3, 4), "evds", 0.3, batch=(2,)),
    "chols-2-noise-batched": _case((3, 4), "chols", 0.3, ("diag", None), batch=(2,)),
}


def _shapes(params):
    out = {}
    for k, v in params.items():
        if k == "evds":
            out[k] = [(p[0].shape, p[1].shape) for p in v]
        elif isinstance(v, list):
            out[k] = [None if a is None else a.shape for a in v]
        else:
            out[k] = jnp.shape(v)
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_shapes_and_infer_shapes(name):
    params = CASES[name]
    d = KroneckerNormal(**params)
    assert KroneckerNormal.infer_shapes(**_shapes(params)) == (d.batch_shape, d.event_shape)
    x = d.sample(jax.random.PRNGKey(0), (5,))
    assert x.shape == (5,) + d.batch_shape + d.event_shape
    assert d.log_prob(x).shape == (5,) + d.batch_shape
    assert set(d.get_args()) == set(params)
    assert all(d.arg_constraints[k].event_dim >= 0 for k in d.arg_constraints)


@pytest.mark.parametrize("name", sorted(CASES))
def test_log_prob_matches_scipy_and_survives_jit(name):
    d = KroneckerNormal(**CASES[name])
    x = d.sample(jax.random.PRNGKey(1))
    cov = np.asarray(d.covariance_matrix, np.float64).reshape((-1,) + d.event_shape * 2)
    loc = np.broadcast_to(np.asarray(d.loc), d.batch_shape + d.event_shape).reshape(
        -1, cov.shape[-1]
    )
    want = [
        scipy.stats.multivariate_normal(m, c).logpdf(v)
        for m, c, v in zip(loc, cov, np.asarray(x, np.float64).reshape(-1, cov.shape[-1]))
    ]
    got = jax.jit(lambda d, x: d.log_prob(x))(d, x)
    np.testing.assert_allclose(np.reshape(got, -1), want, rtol=RTOL * 10)


def _batch_one(params, name):
    """``params`` with parameter ``name`` alone batched (two members: itself and a variant)."""
    scale = lambda a: None if a is None else jnp.stack([a, 1.5 * a])  # noqa: E731
    out = dict(params)
    if name == "evds":
        out[name] = [(jnp.stack([v, 1.5 * v]), jnp.stack([q, q])) for v, q in params[name]]
    elif isinstance(params[name], list):
        out[name] = [scale(a) for a in params[name]]
    else:
        out[name] = scale(params[name])
    return out


@pytest.mark.parametrize("name", [n for n in sorted(CASES) if not n.endswith("batched")])
def test_vmap_over_each_parameter(name):
    """NumPyro's vmap check: batch one parameter, map it with vmap_over, compare."""
    for param in CASES[name]:
        d = KroneckerNormal(**_batch_one(CASES[name], param))
        value = d.sample(jax.random.PRNGKey(2))
        axes = vmap_over(d, **{param: 0})
        got = jax.vmap(lambda d, v: d.log_prob(v), in_axes=(axes, 0))(d, value)
        np.testing.assert_allclose(got, d.log_prob(value), rtol=RTOL, err_msg=param)


@pytest.mark.parametrize("name", [n for n in sorted(CASES) if n.endswith("batched")])
def test_vmap_over_all_parameters(name):
    d = KroneckerNormal(**CASES[name])
    value = d.sample(jax.random.PRNGKey(2))
    axes = vmap_over(d, **{k: 0 for k in CASES[name]})
    got = jax.vmap(lambda d, v: d.log_prob(v), in_axes=(axes, 0))(d, value)
    np.testing.assert_allclose(got, d.log_prob(value), rtol=RTOL)


def test_vmap_over_batched_evds_under_default_validation():
    """Regression: the tracer check skipped the eigenvectors (TracerBoolConversionError)."""
    k = np.stack([spd(_RNG, 3, 0.3) for _ in range(4)])
    vals, vecs = np.linalg.eigh(k)

    def log_prob(v, q):
        return KroneckerNormal(0.0, evds=[(v, q)], sigma=0.1).log_prob(jnp.ones(3, DTYPE))

    got = jax.vmap(log_prob)(_f(vals), _f(vecs))
    want = [
        scipy.stats.multivariate_normal(np.zeros(3), ki + 0.01 * np.eye(3)).logpdf(np.ones(3))
        for ki in k
    ]
    np.testing.assert_allclose(got, want, rtol=RTOL)


def test_scan_of_kronecker_sites():
    """A KroneckerNormal site inside numpyro.contrib.control_flow.scan (promote_batch_shape)."""
    k3, k4 = _f(spd(_RNG, 3, 0.3)), _f(spd(_RNG, 4, 0.3))

    def model(ys):
        def step(c, y):
            numpyro.sample(
                "x", KroneckerNormal(jnp.zeros(12, DTYPE) + c, covs=[k3, k4], sigma=0.3), obs=y
            )
            return c + 1.0, None

        scan(step, jnp.zeros((), DTYPE), ys, length=5)

    ys = _f(_RNG.normal(size=(5, 12)))
    got, _ = log_density(model, (ys,), {}, {})
    a = np.kron(np.asarray(k3), np.asarray(k4)) + 0.09 * np.eye(12)
    want = sum(scipy.stats.multivariate_normal(np.full(12, t), a).logpdf(ys[t]) for t in range(5))
    np.testing.assert_allclose(got, want, rtol=RTOL)
