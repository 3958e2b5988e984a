"""The registered KL divergence between KroneckerNormals, against the dense formula."""

import functools
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import RTOL
from numpyro.distributions.kl import kl_divergence

import kronjax  # noqa: F401  (registers the KL)
from kronjax import KroneckerNormal


def _spd(rng, n, jitter=0.3):
    a = rng.normal(size=(n, n))
    return a @ a.T / n + jitter * np.eye(n)


def _dense_cov(covs, sigma, noise=None):
    k = functools.reduce(jnp.kron, covs)
    if sigma is None and noise is None:
        return k
    s = functools.reduce(
        jnp.kron,
        [
            jnp.eye(c.shape[-1]) if noise is None else jnp.diag(jnp.asarray(e))
            for c, e in zip(covs, noise or [None] * len(covs), strict=True)
        ],
    )
    return k + (1.0 if sigma is None else sigma**2) * s


def _dense_kl(mu_p, cov_p, mu_q, cov_q):
    """The textbook formula with Cholesky factors of the dense covariances."""
    lp, lq = jnp.linalg.cholesky(cov_p), jnp.linalg.cholesky(cov_q)
    m = jax.scipy.linalg.solve_triangular(lq, lp, lower=True)
    z = jax.scipy.linalg.solve_triangular(lq, mu_q - mu_p, lower=True)
    logdet = 2 * (jnp.sum(jnp.log(jnp.diag(lq))) - jnp.sum(jnp.log(jnp.diag(lp))))
    return 0.5 * (jnp.sum(m * m) + z @ z - mu_p.shape[-1] + logdet)


def _param(kind, covs):
    if kind == "covs":
        return {"covs": covs}
    if kind == "chols":
        return {"chols": [jnp.linalg.cholesky(k) for k in covs]}
    return {"evds": [jnp.linalg.eigh(k) for k in covs]}


# name, (p kind, p sigma, p diag noise), (q kind, q sigma, q diag noise)
CASES = [
    ("noise-free both", ("chols", None, False), ("covs", None, False)),
    ("noise in p", ("covs", 0.4, False), ("chols", None, False)),
    ("noise in both, evds q", ("covs", 0.4, False), ("evds", 0.6, False)),
    ("noise factors in q", ("chols", None, False), ("covs", None, True)),
    ("noise factors in both", ("evds", 0.7, True), ("chols", 0.5, True)),
]


@pytest.mark.parametrize("name,p_spec,q_spec", CASES, ids=[c[0] for c in CASES])
def test_value_and_gradient_match_dense(rng, name, p_spec, q_spec):
    sizes = (3, 4)
    kp, kq = [_spd(rng, n) for n in sizes], [_spd(rng, n) for n in sizes]
    mp, mq = rng.normal(size=12), rng.normal(size=12)
    np_, nq = ([rng.uniform(0.5, 2.0, n) for n in sizes] for _ in range(2))
    (p_kind, p_sigma, p_noise), (q_kind, q_sigma, q_noise) = p_spec, q_spec

    def structured(kp, kq, mp, mq, np_, nq):
        p = KroneckerNormal(
            mp, **_param(p_kind, kp), sigma=p_sigma, noise_factors=np_ if p_noise else None
        )
        q = KroneckerNormal(
            mq, **_param(q_kind, kq), sigma=q_sigma, noise_factors=nq if q_noise else None
        )
        return kl_divergence(p, q)

    def dense(kp, kq, mp, mq, np_, nq):
        cov_p = _dense_cov(kp, p_sigma, np_ if p_noise else None)
        cov_q = _dense_cov(kq, q_sigma, nq if q_noise else None)
        return _dense_kl(mp, cov_p, mq, cov_q)

    args = (kp, kq, mp, mq, np_, nq)
    np.testing.assert_allclose(jax.jit(structured)(*args), jax.jit(dense)(*args), rtol=RTOL)
    argnums = (0, 1, 2, 3, 4, 5)
    got = jax.jit(jax.grad(structured, argnums=argnums))(*args)
    want = jax.jit(jax.grad(dense, argnums=argnums))(*args)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-7, atol=1e-9)


def test_batched(rng):
    kp = [_spd(rng, 2), _spd(rng, 3)]
    kq = [np.stack([_spd(rng, 2) for _ in range(3)]), _spd(rng, 3)]  # q factor batch (3,)
    mp = rng.normal(size=(2, 1, 6))  # p loc batch (2, 1)
    sq = np.array([0.2, 0.5, 0.9])
    kl = jax.jit(
        lambda: kl_divergence(
            KroneckerNormal(mp, covs=kp, sigma=0.3), KroneckerNormal(0.0, covs=kq, sigma=sq)
        )
    )()
    assert kl.shape == (2, 3)
    for a in range(2):
        for b in range(3):
            want = _dense_kl(
                mp[a, 0], _dense_cov(kp, 0.3), jnp.zeros(6), _dense_cov([kq[0][b], kq[1]], sq[b])
            )
            np.testing.assert_allclose(kl[a, b], want, rtol=RTOL)


def test_repeated_eigenvalues_and_self_divergence(rng):
    """Identity factors: finite gradients; KL(p, p) = 0 with zero gradient."""
    mu = rng.normal(size=6)

    def kl(a):
        p = KroneckerNormal(mu, covs=[a * jnp.eye(2), jnp.eye(3)], sigma=0.5)
        q = KroneckerNormal(mu, covs=[jnp.eye(2), jnp.eye(3)], sigma=0.5)
        return kl_divergence(p, q)

    def dense(a):
        cov_q = _dense_cov([jnp.eye(2), jnp.eye(3)], 0.5)
        return _dense_kl(mu, _dense_cov([a * jnp.eye(2), jnp.eye(3)], 0.5), mu, cov_q)

    np.testing.assert_allclose(jax.jit(kl)(1.0), 0.0, atol=1e-12)
    np.testing.assert_allclose(jax.jit(jax.grad(kl))(1.0), 0.0, atol=1e-12)
    np.testing.assert_allclose(jax.jit(jax.grad(kl))(1.7), jax.grad(dense)(1.7), rtol=1e-8)


def test_mismatched_grids():
    p = KroneckerNormal(np.zeros(12), covs=[np.eye(3), np.eye(4)])
    with pytest.raises(NotImplementedError, match="same factor sizes"):
        kl_divergence(p, KroneckerNormal(np.zeros(12), covs=[np.eye(4), np.eye(3)]))
    with pytest.raises(ValueError, match="event shapes differ"):
        kl_divergence(p, KroneckerNormal(np.zeros(6), covs=[np.eye(2), np.eye(3)]))


def test_svi_example_runs():
    path = pathlib.Path(__file__).parents[1] / "examples" / "svi_kronecker_guide.py"
    spec = importlib.util.spec_from_file_location("svi_kronecker_guide", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = example.main(sizes=(5, 4), steps=300, verbose=False)
    losses = np.asarray(out["losses"])
    assert np.all(np.isfinite(losses))
    assert losses[-20:].mean() < 0.5 * losses[:20].mean()
    # The best Gaussian guide mean is the exact posterior mean (the model is Gaussian).
    assert out["rmse_vs_exact"] < 0.1
