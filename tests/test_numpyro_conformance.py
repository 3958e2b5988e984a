"""KroneckerNormal and KroneckerMarginal as NumPyro citizens: a table of cases in the style
of NumPyro's ``CONTINUOUS`` list, run through a port of the generic checks of NumPyro's
``test/test_distributions.py`` that apply to a multivariate normal (shapes and
``infer_shapes``, ``get_args``, log_prob against SciPy under jit, pytree round trips,
``vmap_over`` per parameter and in full, sample moments, entropy, log_prob gradients
against finite differences of the SciPy density, reparameterized sample gradients,
``expand``/``to_event``, argument validation, ``promote_batch_shape`` under ``scan`` and
``plate``), each against an independent reference (SciPy / the dense covariance)."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
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


def test_plate_inside_scan_matches_dense_multivariate_normal():
    """Regression: under a ``plate`` inside NumPyro's ``scan`` the site is an
    ``ExpandedDistribution`` whose promotion needs the stored per-step batch shape (it was
    recomputed from the stacked parameters and raised a batch-shape error)."""
    k3, k2 = _f(spd(_RNG, 3, 0.3)), _f(spd(_RNG, 2, 0.3))
    dense = jnp.asarray(np.kron(np.asarray(k3), np.asarray(k2)) + 0.09 * np.eye(6), DTYPE)
    ys = _f(_RNG.normal(size=(5, 4, 6)))

    def model(kind):
        def step(c, y):
            loc = c * jnp.ones(6, DTYPE)
            with numpyro.plate("p", 4):
                if kind == "kronjax":
                    d = KroneckerNormal(loc, covs=[k3, k2], sigma=0.3)
                else:
                    d = dist.MultivariateNormal(loc, covariance_matrix=dense)
                numpyro.sample("y", d, obs=y)
            return c + 0.1, None

        return lambda: scan(step, jnp.zeros((), DTYPE), ys, length=5)

    got, trace = log_density(model("kronjax"), (), {}, {})
    want, _ = log_density(model("dense"), (), {}, {})
    np.testing.assert_allclose(got, want, rtol=RTOL)
    assert trace["y"]["fn"].batch_shape == (5, 4)


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


# ----------------------------------------------------------------------------------
# The rest of NumPyro's generic checks, on every case and on KroneckerMarginal.

MARGINALS = {  # (case, observed cells): a mask, then indices in a chosen order
    "covs-2": np.arange(12) % 5 != 2,
    "chols-3-noise": np.array([11, 0, 5, 7, 3, 9, 1]),
    "covs-2-batched": np.arange(12) % 4 != 1,
}


def _dense(d):
    """(loc, covariance) of a case as float64 NumPy, flattened over the batch."""
    cov = np.asarray(d.covariance_matrix, np.float64).reshape((-1,) + d.event_shape * 2)
    loc = np.broadcast_to(np.asarray(d.mean, np.float64), d.batch_shape + d.event_shape)
    return loc.reshape(-1, cov.shape[-1]), cov


def _make(name):
    if name.startswith("marginal:"):
        case = name.removeprefix("marginal:")
        return KroneckerNormal(**CASES[case]).marginal(MARGINALS[case])
    return KroneckerNormal(**CASES[name])


ALL = sorted(CASES) + [f"marginal:{k}" for k in sorted(MARGINALS)]


def _dense_marginal_cov(name):
    d = _make(name)
    if not name.startswith("marginal:"):
        return _dense(d)
    loc, cov = _dense(d.base)
    obs = np.asarray(d.observed)
    return loc[:, obs], cov[:, obs[:, None], obs]


@pytest.mark.parametrize("name", ALL)
def test_sample_moments_match_the_covariance(name):
    """NumPyro's test_mean_var / goodness of fit by moments: 40,000 draws."""
    d = _make(name)
    x = np.asarray(d.sample(jax.random.PRNGKey(3), (40_000,)), np.float64)
    x = x.reshape(40_000, -1, d.event_shape[0])
    loc, cov = _dense_marginal_cov(name)
    for b in range(loc.shape[0]):
        sd = np.sqrt(np.diag(cov[b]))
        np.testing.assert_allclose(x[:, b].mean(0), loc[b], atol=float(5 * sd.max() / 200))
        emp = np.cov(x[:, b].T) / np.outer(sd, sd)
        np.testing.assert_allclose(emp, cov[b] / np.outer(sd, sd), atol=0.04)
    np.testing.assert_allclose(
        np.asarray(d.mean, np.float64).reshape(loc.shape), loc, rtol=RTOL, atol=RTOL
    )
    var = np.asarray(d.variance, np.float64).reshape(loc.shape)
    np.testing.assert_allclose(var, np.diagonal(cov, axis1=-2, axis2=-1), rtol=RTOL * 10)


@pytest.mark.parametrize("name", sorted(CASES))
def test_entropy_matches_scipy(name):
    d = _make(name)
    loc, cov = _dense(d)
    want = [scipy.stats.multivariate_normal(m, c).entropy() for m, c in zip(loc, cov)]
    np.testing.assert_allclose(np.reshape(d.entropy(), -1), want, rtol=RTOL * 10)


@pytest.mark.parametrize(
    "name", [n for n in ALL if not n.startswith("marginal:")] + [f"marginal:{k}" for k in MARGINALS]
)
def test_log_prob_matches_scipy_under_jit(name):
    d = _make(name)
    x = d.sample(jax.random.PRNGKey(1))
    loc, cov = _dense_marginal_cov(name)
    xs = np.asarray(x, np.float64).reshape(loc.shape)
    want = [scipy.stats.multivariate_normal(m, c).logpdf(v) for m, c, v in zip(loc, cov, xs)]
    got = jax.jit(lambda d, x: d.log_prob(x))(d, x)
    np.testing.assert_allclose(np.reshape(got, -1), want, rtol=RTOL * 10)


def _directions(params, rng):
    """A random direction per differentiable parameter that keeps it valid: symmetric for
    matrices, lower triangular for Cholesky factors, eigenvalues only for ``evds``."""
    out = {}
    for k, v in params.items():
        if k == "evds":
            out[k] = [(_f(rng.normal(size=val.shape)), None) for val, _ in v]
        elif k in ("covs", "noise_factors"):
            out[k] = [
                None
                if a is None
                else _f(rng.normal(size=a.shape))
                if a.shape[-1:] != a.shape[-2:-1] or a.ndim == 1
                else _f(_sym(rng.normal(size=a.shape)))
                for a in v
            ]
        elif k == "chols":
            out[k] = [_f(np.tril(rng.normal(size=a.shape))) for a in v]
        else:
            out[k] = _f(rng.normal(size=jnp.shape(v)))
    return out


def _sym(a):
    return 0.5 * (a + np.swapaxes(a, -1, -2))


def _step(params, dirs, eps):
    out = {}
    for k, v in params.items():
        if k == "evds":
            out[k] = [(val + eps * dv, q) for (val, q), (dv, _) in zip(v, dirs[k])]
        elif isinstance(v, list):
            out[k] = [None if a is None else a + eps * da for a, da in zip(v, dirs[k])]
        else:
            out[k] = v + eps * dirs[k]
    return out


@pytest.mark.parametrize("name", ALL)
def test_log_prob_gradient_matches_finite_differences_of_scipy(name):
    """NumPyro's test_log_prob_gradient: every parameter at once, in a random valid
    direction, against central differences of the float64 SciPy density."""
    case = name.removeprefix("marginal:")
    params = CASES[case]
    observed = MARGINALS.get(case) if name.startswith("marginal:") else None
    rng = np.random.default_rng(4)
    dirs = _directions(params, rng)

    def build(p):
        d = KroneckerNormal(**p, validate_args=False)
        return d if observed is None else d.marginal(observed)

    x = build(params).sample(jax.random.PRNGKey(5))
    f = lambda t: jnp.sum(build(_step(params, dirs, t)).log_prob(x))  # noqa: E731

    def scipy_logp(t):
        d = build(jax.tree.map(lambda a: np.asarray(a, np.float64), _step(params, dirs, t)))
        if observed is None:
            loc, cov = _dense(d)
        else:
            loc, cov = _dense(d.base)
            obs = np.asarray(d.observed)
            loc, cov = loc[:, obs], cov[:, obs[:, None], obs]
        xs = np.asarray(x, np.float64).reshape(loc.shape)
        return sum(scipy.stats.multivariate_normal(m, c).logpdf(v) for m, c, v in zip(loc, cov, xs))

    eps = 1e-5
    want = (scipy_logp(eps) - scipy_logp(-eps)) / (2 * eps)
    got = jax.jit(jax.grad(f))(jnp.zeros((), DTYPE))
    np.testing.assert_allclose(got, want, rtol=RTOL * 50, atol=RTOL * 50)
    np.testing.assert_allclose(jax.jit(jax.jacfwd(f))(jnp.zeros((), DTYPE)), got, rtol=RTOL * 10)


@pytest.mark.parametrize("name", sorted(CASES))
def test_reparameterized_sample_gradient_matches_finite_differences(name):
    """NumPyro's test_sample_gradient: d/dt of a draw with the key fixed."""
    params = CASES[name]
    dirs = _directions(params, np.random.default_rng(6))
    key = jax.random.PRNGKey(7)

    def draw(t):
        return KroneckerNormal(**_step(params, dirs, t), validate_args=False).sample(key)

    w = _f(np.random.default_rng(8).normal(size=draw(0.0).shape))
    f = lambda t: jnp.sum(w * draw(t))  # noqa: E731
    eps = 1e-3 if DTYPE == "float32" else 1e-6
    want = (f(eps) - f(-eps)) / (2 * eps)
    np.testing.assert_allclose(jax.grad(f)(0.0), want, rtol=RTOL * 50, atol=RTOL * 50)


@pytest.mark.parametrize("name", ALL)
def test_expand_to_event_and_pytree_round_trip(name):
    d = _make(name)
    x = d.sample(jax.random.PRNGKey(9), (3,))
    big = d.expand((4, 3) + d.batch_shape)
    assert big.batch_shape == (4, 3) + d.batch_shape
    np.testing.assert_allclose(
        big.log_prob(x), jnp.broadcast_to(d.log_prob(x), (4,) + x.shape[:-1]), rtol=RTOL
    )
    ind = d.to_event(len(d.batch_shape))
    np.testing.assert_allclose(ind.log_prob(x), d.log_prob(x).reshape(3, -1).sum(-1), rtol=RTOL)
    same = jax.jit(lambda d: d)(d)
    assert type(same) is type(d) and same.batch_shape == d.batch_shape
    np.testing.assert_allclose(same.log_prob(x), d.log_prob(x), rtol=RTOL)


@pytest.mark.parametrize("name", ["covs-2", "chols-2-sigma", "evds-2", "covs-2-noise"])
def test_invalid_parameters_raise_a_value_error_under_validate_args(name):
    """NumPyro's test_distribution_constraints: an invalid parameter raises under
    validate_args, naming it."""
    params = dict(CASES[name])
    key = next(k for k in ("covs", "chols", "evds") if k in params)
    bad = dict(params)
    if key == "evds":
        bad[key] = [(v, 2.0 * q) for v, q in params[key]]  # not orthonormal
    elif key == "chols":
        bad[key] = [a.at[0, 0].set(jnp.nan) for a in params[key]]
    else:
        bad[key] = [-a for a in params[key]]  # not positive semi-definite
    with pytest.raises(ValueError, match=key):
        KroneckerNormal(**bad, validate_args=True)
    if "sigma" in params:
        with pytest.raises(ValueError, match="sigma"):
            KroneckerNormal(**{**params, "sigma": -params["sigma"]}, validate_args=True)
