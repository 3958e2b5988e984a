"""Structured linear algebra against dense NumPy twins."""

import dense
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import DTYPE, RTOL
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from kronjax import linalg

pytestmark = pytest.mark.core


def _arrays(seed, shapes):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=s) for s in shapes]


@settings(max_examples=15, deadline=None)
@given(
    dims=st.lists(st.tuples(st.integers(1, 4), st.integers(1, 4)), min_size=1, max_size=4),
    x_batch=st.sampled_from([(), (3,), (2, 1)]),
    factor_batch=st.sampled_from([(), (1,), (3,)]),
    seed=st.integers(0, 1000),
)
def test_kron_matvec_matches_dense(dims, x_batch, factor_batch, seed):
    factors = _arrays(seed, [factor_batch + d if i == 0 else d for i, d in enumerate(dims)])
    (x,) = _arrays(seed + 1, [x_batch + (int(np.prod([q for _, q in dims])),)])
    out = linalg.kron_matvec([jnp.asarray(f, DTYPE) for f in factors], jnp.asarray(x, DTYPE))
    expected = np.einsum("...ij,...j->...i", dense.kron(factors), x)
    np.testing.assert_allclose(out, expected, rtol=RTOL, atol=RTOL * np.abs(expected).max())


def test_kron_dense_and_diag_match_jnp_kron():
    a, b, c = _arrays(0, [(2, 3), (3, 3), (4, 2)])
    expected = jnp.kron(jnp.kron(a, b), c)
    np.testing.assert_allclose(linalg.kron_dense([a, b, c]), expected, rtol=RTOL, atol=RTOL)
    sq = _arrays(1, [(2, 2), (3, 3), (4, 4)])
    expected = np.diag(np.kron(np.kron(*sq[:2]), sq[2]))
    np.testing.assert_allclose(linalg.kron_diag(sq), expected, rtol=RTOL, atol=RTOL)


def test_kron_solve_triangular():
    ls = [np.tril(m) + 3 * np.eye(m.shape[0]) for m in _arrays(2, [(3, 3), (2, 2), (4, 4)])]
    (x,) = _arrays(3, [(2, 24)])
    z = linalg.kron_solve_triangular([jnp.asarray(l, DTYPE) for l in ls], jnp.asarray(x, DTYPE))
    expected = np.linalg.solve(dense.kron(ls), x.T).T
    np.testing.assert_allclose(z, expected, rtol=RTOL, atol=RTOL * np.abs(expected).max())


def test_eig_logpdf_matches_dense_and_is_finite_for_repeated_eigenvalues():
    covs = [np.eye(3) * 2.0, np.ones((4, 4)) + np.eye(4)]  # both with repeated eigenvalues
    (r,) = _arrays(4, [(12,)])
    vals, vecs = zip(*[jnp.linalg.eigh(jnp.asarray(k, DTYPE)) for k in covs])
    covs_j = [jnp.asarray(k, DTYPE) for k in covs]

    def f(covs, s2, r):
        return linalg.kron_eig_logpdf(r, vals, vecs, s2, covs=covs)

    value = f(covs_j, 0.25, jnp.asarray(r, DTYPE))
    expected = dense.logpdf(r, np.zeros(12), dense.covariance(covs, 0.5))
    np.testing.assert_allclose(value, expected, rtol=RTOL)
    grads = jax.grad(f, argnums=(0, 1, 2))(covs_j, 0.25, jnp.asarray(r, DTYPE))
    cov_grads, sigma_grad, _, value_grad = dense.logpdf_grads(r, np.zeros(12), covs, 0.5)
    for g, ref in zip(grads[0], cov_grads):
        np.testing.assert_allclose(g, ref, rtol=RTOL, atol=RTOL * np.abs(ref).max())
    np.testing.assert_allclose(grads[1], sigma_grad / (2 * 0.5), rtol=RTOL)
    np.testing.assert_allclose(grads[2], value_grad, rtol=RTOL, atol=RTOL)


def test_eig_logdet_gradient():
    covs = [np.eye(2) * 1.5, np.diag([1.0, 2.0, 2.0])]
    vals, vecs = zip(*[jnp.linalg.eigh(jnp.asarray(k, DTYPE)) for k in covs])

    def f(covs, s2):
        return linalg.kron_eig_logdet(vals, vecs, s2, covs=covs)

    np.testing.assert_allclose(
        f([jnp.asarray(k, DTYPE) for k in covs], 0.3),
        np.linalg.slogdet(dense.covariance(covs, np.sqrt(0.3)))[1],
        rtol=RTOL,
    )
    g = jax.grad(f, argnums=(0, 1))([jnp.asarray(k, DTYPE) for k in covs], 0.3)
    inv = np.linalg.inv(dense.covariance(covs, np.sqrt(0.3)))  # ∂ log det A / ∂A = A⁻¹
    ref0 = np.einsum("abAB,bB->aA", inv.reshape(2, 3, 2, 3), covs[1])
    np.testing.assert_allclose(g[0][0], ref0, rtol=RTOL, atol=RTOL)
    np.testing.assert_allclose(g[1], np.trace(inv), rtol=RTOL)


def test_psd_sqrt_value_and_gradient():
    a = np.random.default_rng(5).normal(size=(4, 4))
    k = jnp.asarray(a @ a.T + np.eye(4), DTYPE)
    fd = {"float64": {}, "float32": {"eps": 1e-2, "atol": 5e-2, "rtol": 5e-2}}[DTYPE]

    def root(k):
        vals, vecs = jnp.linalg.eigh(k)
        return linalg.psd_sqrt(k, vals, vecs)

    r = root(k)
    np.testing.assert_allclose(r @ r, k, rtol=RTOL, atol=RTOL)
    np.testing.assert_allclose(r, r.T, rtol=RTOL, atol=RTOL)
    check_grads(lambda k: root(0.5 * (k + k.T)), (k,), 1, ["rev"], **fd)
    # repeated eigenvalues: d sqrt(a I) / da = I / (2 sqrt(a))
    g = jax.grad(lambda a: jnp.trace(root(a * jnp.eye(3))))(2.0)
    np.testing.assert_allclose(g, 3 / (2 * np.sqrt(2.0)), rtol=RTOL)
