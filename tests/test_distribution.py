"""KroneckerNormal against its dense twin: one table of cases through generic tests."""

from dataclasses import dataclass, field

import dense
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import DTYPE, RTOL
from jax.test_util import check_grads

from kronjax import KroneckerNormal

pytestmark = pytest.mark.core


@dataclass(frozen=True)
class Case:
    id: str
    sizes: tuple
    param: str = "covs"  # covs | chols | evds
    sigma: object = None  # None, a float, or a shape tuple for a batched sigma
    loc_batch: tuple = ()
    factor_batch: tuple = ()  # leading dims of factor 0
    kinds: tuple = field(default=())  # per-factor kind: "spd" (default), "eye", "psd"


CASES = [
    Case("d1", (5,)),
    Case("d2", (3, 4)),
    Case("d3", (2, 3, 4)),
    Case("d4", (2, 2, 3, 2)),
    Case("d2 sigma", (3, 4), sigma=0.7),
    Case("d3 sigma 0", (2, 3, 2), sigma=0.0),
    Case("chols d2", (3, 4), "chols"),
    Case("chols d3 sigma", (2, 3, 4), "chols", sigma=0.5),
    Case("evds d2", (3, 4), "evds"),
    Case("evds d3 sigma", (2, 3, 2), "evds", sigma=0.4),
    Case("batched loc", (3, 4), sigma=0.3, loc_batch=(2,)),
    Case("batched factor", (3, 4), sigma=0.3, factor_batch=(4, 1)),
    Case("batched sigma", (3, 2), sigma=(3,)),
    Case("batched all", (3, 2), sigma=(3,), factor_batch=(4, 1), loc_batch=(1, 3)),
    Case("chols batched", (2, 3), "chols", sigma=(2,), factor_batch=(2,)),
    Case("evds batched", (2, 3), "evds", factor_batch=(3,), loc_batch=(3,)),
    Case("identity factor", (3, 4), sigma=0.5, kinds=("eye", "spd")),
    Case("identity no noise", (3, 4), kinds=("spd", "eye")),
    Case("psd factor", (4, 3), sigma=0.6, kinds=("psd", "spd")),
]


def _factor(rng, n, batch, kind):
    if kind == "eye":
        return np.broadcast_to(1.7 * np.eye(n), batch + (n, n)).copy()
    a = rng.normal(size=batch + (n, n - 1 if kind == "psd" else n))
    return a @ np.swapaxes(a, -1, -2) + (0 if kind == "psd" else 0.5 * np.eye(n))


def build(case: Case, seed: int = 0):
    """Arrays (float64) and the distribution (in the test dtype) for a case."""
    rng = np.random.default_rng(seed)
    kinds = case.kinds or ("spd",) * len(case.sizes)
    covs = [
        _factor(rng, n, case.factor_batch if i == 0 else (), kinds[i])
        for i, n in enumerate(case.sizes)
    ]
    n = int(np.prod(case.sizes))
    loc = rng.normal(size=case.loc_batch + (n,))
    sigma = case.sigma
    if isinstance(sigma, tuple):
        sigma = rng.uniform(0.3, 1.0, size=sigma)
    kwargs = {case.param: param_arrays(case.param, covs)}
    dist = KroneckerNormal(
        jnp.asarray(loc, DTYPE),
        sigma=None if sigma is None else jnp.asarray(sigma, DTYPE),
        **kwargs,
    )
    return covs, loc, sigma, dist


def param_arrays(param, covs):
    """The factors in the case's parameterization, in the test dtype."""
    if param == "covs":
        return [jnp.asarray(k, DTYPE) for k in covs]
    if param == "chols":
        return [jnp.asarray(np.linalg.cholesky(k), DTYPE) for k in covs]
    return [tuple(jnp.asarray(a, DTYPE) for a in np.linalg.eigh(k)) for k in covs]


def close(actual, expected, rtol=RTOL, atol_scale=1.0):
    expected = np.asarray(expected, np.float64)
    atol = rtol * atol_scale * max(1.0, float(np.max(np.abs(expected), initial=0)))
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


@pytest.fixture(params=CASES, ids=[c.id for c in CASES])
def case(request):
    return request.param


def test_shapes_and_batch(case):
    covs, loc, sigma, dist = build(case)
    expected = np.broadcast_shapes(
        loc.shape[:-1], covs[0].shape[:-2], () if sigma is None else np.shape(sigma)
    )
    assert dist.batch_shape == expected
    assert dist.event_shape == (int(np.prod(case.sizes)),)
    assert dist.factor_sizes == case.sizes


def test_log_prob(case):
    covs, loc, sigma, dist = build(case)
    cov = dense.covariance(covs, sigma)
    value = np.random.default_rng(1).normal(size=(2,) + dist.batch_shape + dist.event_shape)
    close(dist.log_prob(jnp.asarray(value, DTYPE)), dense.logpdf(value, loc, cov))


def test_moments_and_entropy(case):
    covs, loc, sigma, dist = build(case)
    cov = np.broadcast_to(dense.covariance(covs, sigma), dist.batch_shape + dist.event_shape * 2)
    close(dist.mean, np.broadcast_to(loc, dist.batch_shape + dist.event_shape))
    close(dist.covariance_matrix, cov)
    close(dist.variance, np.diagonal(cov, axis1=-2, axis2=-1))
    close(dist.entropy(), dense.entropy(cov))


def test_sample_shapes(case):
    *_, dist = build(case)
    for sample_shape in [(), (2,), (2, 3)]:
        x = jax.jit(lambda d, k, s=sample_shape: d.sample(k, s))(dist, jax.random.PRNGKey(0))
        assert x.shape == sample_shape + dist.batch_shape + dist.event_shape
        assert x.dtype == jnp.dtype(DTYPE)
        assert bool(jnp.all(jnp.isfinite(x)))


@pytest.mark.parametrize("case", [c for c in CASES if not c.loc_batch], ids=lambda c: c.id)
def test_sample_moments(case):
    covs, loc, sigma, dist = build(case)
    draws = 20_000
    x = np.asarray(dist.sample(jax.random.PRNGKey(1), (draws,)), np.float64)
    cov = np.broadcast_to(dense.covariance(covs, sigma), dist.batch_shape + dist.event_shape * 2)
    mean = x.mean(0)
    scale = np.sqrt(np.diagonal(cov, axis1=-2, axis2=-1))
    # Monte Carlo: the mean error is ~ sd / sqrt(draws); allow 5 standard errors.
    assert np.all(np.abs(mean - loc) <= 5 * scale / np.sqrt(draws))
    centred = x - mean
    emp = np.einsum("s...i,s...j->...ij", centred, centred) / (draws - 1)
    bound = 6 * np.sqrt((scale[..., :, None] * scale[..., None, :]) ** 2 * 2 / draws)
    assert np.all(np.abs(emp - cov) <= bound)


def _grad_cases():
    return [c for c in CASES if not (c.loc_batch or c.factor_batch or isinstance(c.sigma, tuple))]


@pytest.mark.parametrize("case", _grad_cases(), ids=lambda c: c.id)
def test_gradients_vs_dense(case):
    """∂ log p w.r.t. factors, sigma, loc and value against the analytic dense twin."""
    covs, loc, sigma, _ = build(case)
    value = np.random.default_rng(2).normal(size=loc.shape)
    params = param_arrays(case.param, covs)
    s = None if sigma is None else jnp.asarray(sigma, DTYPE)

    def logp(params, s, loc, value):
        kwargs = {case.param: params}
        return KroneckerNormal(loc, sigma=s, **kwargs).log_prob(value)

    grads = jax.grad(logp, argnums=(0, 1, 2, 3))(
        params, s, jnp.asarray(loc, DTYPE), jnp.asarray(value, DTYPE)
    )
    cov_grads, sigma_grad, loc_grad, value_grad = dense.logpdf_grads(value, loc, covs, sigma)
    scale = max(np.abs(g).max() for g in cov_grads)
    for i, (g, k) in enumerate(zip(grads[0], covs)):
        if case.param == "covs":
            # symmetric directions are what K = Kᵀ parameterizations see
            close(g + g.T, cov_grads[i] + cov_grads[i].T, atol_scale=scale)
        elif case.param == "chols":
            ref = (cov_grads[i] + cov_grads[i].T) @ np.linalg.cholesky(k)
            close(np.tril(g), np.tril(ref), atol_scale=scale)
        else:
            lam, q = np.linalg.eigh(k)
            close(g[0], np.diag(q.T @ cov_grads[i] @ q), atol_scale=scale)
            # eigenvector gradients agree along directions that keep Q orthogonal
            ref_q = (cov_grads[i] + cov_grads[i].T) @ q * lam
            skew_g, skew_ref = (q.T @ m - (q.T @ m).T for m in (np.asarray(g[1], float), ref_q))
            close(skew_g, skew_ref, atol_scale=scale)
    if sigma is not None:
        close(grads[1], sigma_grad)
    close(grads[2], loc_grad)
    close(grads[3], value_grad)


# float32 finite differences need a larger step and tolerance
FD = {"float64": {}, "float32": {"eps": 1e-2, "atol": 5e-2, "rtol": 5e-2}}[DTYPE]


@pytest.mark.parametrize("case", _grad_cases()[:8], ids=lambda c: c.id)
def test_gradients_finite_differences(case):
    covs, loc, sigma, _ = build(case)
    value = jnp.asarray(np.random.default_rng(3).normal(size=loc.shape), DTYPE)
    params = param_arrays(case.param, covs)
    s = jnp.asarray(0.3 if sigma is None else sigma, DTYPE)

    def logp(params, s, loc):
        kwargs = {case.param: params, "validate_args": False}  # FD leaves K asymmetric
        return KroneckerNormal(loc, sigma=None if sigma is None else s, **kwargs)

    args = (params, s, jnp.asarray(loc, DTYPE))
    check_grads(lambda p, s, m: logp(p, s, m).log_prob(value), args, 1, ["rev"], **FD)
    check_grads(lambda p, s, m: logp(p, s, m).entropy(), args, 1, ["rev"], **FD)


def _rbf(x, ell):
    return jnp.exp(-0.5 * ((x[:, None] - x[None, :]) / ell) ** 2)


def test_rbf_grid_lengthscale_gradients():
    """40×30 RBF grid, no jitter: autodiff through eigh gets these wrong; we must not.

    The reference is dense float64 NumPy: ∂ log p/∂ℓ_i = Σ (∂ log p/∂K_i) ∘ ∂K_i/∂ℓ_i.
    """
    xs = [np.linspace(0, 10, 40), np.linspace(0, 10, 30)]
    ells, sigma = (1.5, 2.0), 0.1
    y = np.random.default_rng(0).normal(size=1200)

    def ours(theta):
        x1, x2 = (jnp.asarray(x, DTYPE) for x in xs)
        covs = [_rbf(x1, theta[0]), _rbf(x2, theta[1])]
        return KroneckerNormal(0.0, covs=covs, sigma=theta[2]).log_prob(jnp.asarray(y, DTYPE))

    sq = [np.subtract.outer(x, x) ** 2 for x in xs]
    ks = [np.exp(-0.5 * d / ell**2) for d, ell in zip(sq, ells)]
    value = dense.logpdf(y, np.zeros(1200), dense.covariance(ks, sigma))
    cov_grads, sigma_grad, *_ = dense.logpdf_grads(y, np.zeros(1200), ks, sigma)
    ell_grads = [np.sum(g * k * d / ell**3) for g, k, d, ell in zip(cov_grads, ks, sq, ells)]
    theta = jnp.asarray([*ells, sigma], DTYPE)
    rtol = {"float64": 1e-8, "float32": 2e-2}[DTYPE]  # K is ill-conditioned (σ² = 0.01)
    close(ours(theta), value, rtol=rtol)
    close(jax.grad(ours)(theta), [*ell_grads, sigma_grad], rtol=rtol)


def test_scaled_identity_factor_gradient():
    """A factor a·I has one repeated eigenvalue: eigh autodiff gives NaN there."""
    y = jnp.asarray(np.random.default_rng(0).normal(size=12), DTYPE)
    k2 = jnp.asarray(_factor(np.random.default_rng(1), 4, (), "spd"), DTYPE)

    def ours(a, s):
        return KroneckerNormal(0.0, covs=[a * jnp.eye(3, dtype=DTYPE), k2], sigma=s).log_prob(y)

    a, s = 2.0, 0.5
    g = jax.grad(ours, argnums=(0, 1))(a, s)
    cov_grads, sigma_grad, *_ = dense.logpdf_grads(y, 0.0, [a * np.eye(3), k2], s)
    close(g[0], np.trace(cov_grads[0]))
    close(g[1], sigma_grad)


def test_flattening_order_matches_kron():
    """Grid element (i, j, k) sits at flat index i·n2·n3 + j·n3 + k, as np.kron orders it."""
    sizes = (2, 3, 4)
    covs = [np.diag(np.arange(1.0, n + 1) * 10**i) for i, n in enumerate(sizes)]
    dist = KroneckerNormal(0.0, covs=[jnp.asarray(k, DTYPE) for k in covs])
    grid_var = np.einsum("i,j,k->ijk", *[np.diag(k) for k in covs])
    close(dist.variance, grid_var.reshape(-1))
    close(dist.covariance_matrix, np.kron(np.kron(covs[0], covs[1]), covs[2]))


# A singular factor is left out: K -> root(K) is not Lipschitz at a singular K, so for
# any root the reparameterized gradient estimator has unbounded variance there.
@pytest.mark.parametrize(
    "case", [c for c in _grad_cases() if "psd" not in c.kinds], ids=lambda c: c.id
)
def test_reparameterized_sample_gradient(case):
    """d/dθ E‖x‖² by reparameterized samples matches d/dθ (tr K + ‖μ‖²)."""
    covs, loc, sigma, _ = build(case)
    params = param_arrays(case.param, covs)
    s = None if sigma is None else jnp.asarray(sigma, DTYPE)
    key = jax.random.PRNGKey(4)

    def mc(params, s):
        d = KroneckerNormal(jnp.asarray(loc, DTYPE), sigma=s, **{case.param: params})
        return jnp.mean(jnp.sum(d.sample(key, (4000,)) ** 2, -1))

    def exact(params, s):
        d = KroneckerNormal(jnp.asarray(loc, DTYPE), sigma=s, **{case.param: params})
        return jnp.sum(d.variance + d.mean**2)

    g_mc = jax.grad(mc, argnums=(0, 1) if s is not None else 0)(params, s)
    g_ex = jax.grad(exact, argnums=(0, 1) if s is not None else 0)(params, s)
    scale = max(float(np.abs(b).max()) for b in jax.tree.leaves(g_ex))
    for a, b in zip(jax.tree.leaves(g_mc), jax.tree.leaves(g_ex)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.all(np.isfinite(a))
        assert np.abs(a - b).max() <= 0.1 * scale
