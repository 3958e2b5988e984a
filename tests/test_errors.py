"""Bad input raises ValueError at once, naming the argument, the factor, and the shapes."""

import re

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import DTYPE

from kronjax import KroneckerNormal, linalg

pytestmark = pytest.mark.core

K3 = jnp.asarray(np.eye(3) + 0.3, DTYPE)
K4 = jnp.asarray(np.eye(4) + 0.2, DTYPE)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(loc=0.0), "exactly one of covs, chols, evds; got none"),
        (dict(loc=0.0, covs=[K3], chols=[K3]), "exactly one of covs, chols, evds; got covs, chols"),
        (dict(loc=0.0, covs=K3), "covs must be a sequence"),
        (dict(loc=0.0, covs=[]), "covs is empty"),
        (dict(loc=0.0, covs=[K3, jnp.ones((4, 3))]), "covs[1] has shape (4, 3); expected a square"),
        (dict(loc=0.0, chols=[jnp.ones(3)]), "chols[0] has shape (3,); expected a square"),
        (dict(loc=jnp.zeros(11), covs=[K3, K4]), "loc has shape (11,); expected (..., 12)"),
        (
            dict(loc=0.0, covs=[jnp.stack([K3] * 2), jnp.stack([K4] * 3)]),
            "batch dims (3,) of covs[1] do not broadcast with the batch shape (2,)",
        ),
        (
            dict(loc=0.0, covs=[jnp.stack([K3] * 2)], sigma=jnp.ones(4) * 0.1),
            "batch dims (4,) of sigma do not broadcast",
        ),
        (dict(loc=0.0, evds=[(jnp.ones(3),)]), "evds[0] must be a pair"),
        (dict(loc=0.0, evds=[K3]), "evds[0] must be a pair"),
        (
            dict(loc=0.0, evds=[(jnp.ones(4), K3)]),
            "evds[0] eigenvalues has shape (4,); expected (..., 3)",
        ),
        (dict(loc=0.0, evds=[(jnp.ones(3), jnp.ones((3, 2)))]), "evds[0] eigenvectors has shape"),
    ],
)
def test_shape_errors(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        KroneckerNormal(**kwargs)


def test_batched_loc_mismatch_names_loc():
    with pytest.raises(
        ValueError, match=re.escape("covs[0] do not broadcast with the batch shape (2,)")
    ):
        KroneckerNormal(jnp.zeros((2, 3)), covs=[jnp.stack([K3] * 5)])


def test_value_errors_in_log_prob():
    d = KroneckerNormal(jnp.zeros((2, 12)), covs=[K3, K4], sigma=0.1)
    with pytest.raises(ValueError, match=re.escape("value has shape (11,); expected (..., 12)")):
        d.log_prob(jnp.zeros(11))
    with pytest.raises(ValueError, match=re.escape("do not broadcast with the batch shape (2,)")):
        d.log_prob(jnp.zeros((3, 12)))


def _asym():
    return K3.at[0, 1].add(0.5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(covs=[K3], sigma=-0.1), "sigma must be finite and >= 0"),
        (dict(covs=[K3], sigma=jnp.nan), "sigma must be finite and >= 0"),
        (dict(covs=[K3.at[0, 0].set(jnp.inf)], sigma=0.1), "covs[0] has non-finite entries"),
        (dict(covs=[K4, _asym()], sigma=0.1), "covs[1] is not symmetric"),
        (dict(covs=[K3 - 2 * jnp.eye(3)], sigma=0.1), "covs[0] is not positive semi-definite"),
        (dict(covs=[K4, jnp.ones((3, 3))]), "covs[1] is not positive definite"),
        (dict(covs=[K4, jnp.ones((3, 3))], sigma=0.0), "covs[1] is not positive definite"),
        (dict(chols=[jnp.ones((3, 3))]), "chols[0] is not lower triangular"),
        (dict(chols=[jnp.diag(jnp.array([1.0, 0.0, 2.0]))]), "chols[0] has a zero on its diagonal"),
        (dict(evds=[(jnp.array([1.0, -1.0, 2.0]), jnp.eye(3))]), "evds[0] is not positive semi"),
        (dict(evds=[(jnp.array([1.0, 0.0, 2.0]), jnp.eye(3))]), "evds[0] is not positive definite"),
    ],
)
def test_value_errors_with_validate_args(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        KroneckerNormal(0.0, validate_args=True, **kwargs)


def test_psd_factor_is_fine_with_noise():
    d = KroneckerNormal(0.0, covs=[K4, jnp.ones((3, 3), DTYPE)], sigma=0.1, validate_args=True)
    assert bool(jnp.isfinite(d.log_prob(jnp.zeros(12, DTYPE))))
    assert bool(
        jnp.isfinite(KroneckerNormal(0.0, covs=[K3], sigma=0.0, validate_args=True).entropy())
    )


# -- inputs that used to get through (dtype, size 0, evds, overflow, culprit naming) -----


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(covs=[K3.astype(jnp.complex64)]), TypeError, "covs[0] has complex dtype"),
        (dict(covs=[K3], sigma=jnp.asarray(0.1 + 0j)), TypeError, "sigma has complex dtype"),
        (dict(covs=[K3, K4.astype(jnp.float16)]), TypeError, "covs[1] has dtype float16"),
        (dict(covs=[K3.astype(jnp.bfloat16)]), TypeError, "covs[0] has dtype bfloat16"),
        (dict(covs=[K3, jnp.zeros((0, 0))]), ValueError, "covs[1] has shape (0, 0)"),
        (dict(evds=[(jnp.ones(0), jnp.zeros((0, 0)))]), ValueError, "evds[0] eigenvectors has"),
        (
            dict(evds=[(jnp.ones(3, DTYPE), 2 * jnp.eye(3, dtype=DTYPE))], validate_args=True),
            ValueError,
            "evds[0] eigenvectors are not orthonormal",
        ),
        (
            dict(covs=[K3, K4.at[1, 1].set(jnp.inf)], sigma=0.1, validate_args=True),
            ValueError,
            "covs[1] has non-finite entries",
        ),
    ],
)
def test_inputs_refused_by_name(kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        KroneckerNormal(0.0, **kwargs)


def test_complex_value_refused():
    with pytest.raises(TypeError, match=re.escape("value has complex dtype")):
        KroneckerNormal(0.0, covs=[K3]).log_prob(jnp.ones(3, jnp.complex64))


def test_huge_valid_float32_factor_is_finite():
    """1e37·I is valid in float32; nothing may overflow it on the way (log det 3·log 1e37)."""
    big = jnp.float32(1e37) * jnp.eye(3, dtype=jnp.float32)
    d = KroneckerNormal(0.0, covs=[big, jnp.eye(2, dtype=jnp.float32)], validate_args=True)
    value = d.log_prob(jnp.ones(6, jnp.float32))
    want = -0.5 * (2 * 3 * np.log(1e37) + 6e-37 + 6 * np.log(2 * np.pi))
    np.testing.assert_allclose(value, want, rtol=1e-5)


def test_lists_are_accepted_like_numpy():
    d = KroneckerNormal([0.0] * 12, covs=[K3.tolist(), K4.tolist()], sigma=0.1)
    want = KroneckerNormal(jnp.zeros(12), covs=[K3, K4], sigma=0.1).log_prob(jnp.ones(12))
    np.testing.assert_allclose(d.log_prob([1.0] * 12), want, rtol=1e-6)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: linalg.kron_matvec([], jnp.ones(3)), "kron_matvec: factors is empty"),
        (lambda: linalg.kron_matvec([jnp.ones(3)], jnp.ones(3)), "factors[0] has shape (3,)"),
        (lambda: linalg.kron_diag([K3, jnp.ones((2, 3))]), "kron_diag: factors[1] has shape"),
        (lambda: linalg.kron_dense(K3), "kron_dense: factors must be a sequence"),
        (lambda: linalg.kron_outer([]), "kron_outer: vectors is empty"),
        (
            lambda: linalg.kron_solve_triangular([K3, jnp.ones((4, 3))], jnp.ones(12)),
            "kron_solve_triangular: chols[1] has shape (4, 3)",
        ),
        (
            lambda: linalg.kron_solve_triangular([K3], jnp.ones(4)),
            "kron_solve_triangular: x has shape (4,); expected (..., 3)",
        ),
        (
            lambda: linalg.kron_eig_logpdf(jnp.ones(12), [jnp.ones(3)], [K3, K4], 0.1),
            "kron_eig_logpdf: eigvecs has 2 entries and eigvals 1",
        ),
        (
            lambda: linalg.kron_eig_solve(jnp.ones(12), [jnp.ones(3), jnp.ones(4)], [K3, K3], 0.1),
            "kron_eig_solve: eigvecs[1] has shape (3, 3); expected (..., 4, 4)",
        ),
        (
            lambda: linalg.kron_eig_logdet([jnp.ones(3)], [K3], 0.1, covs=[K4]),
            "kron_eig_logdet: covs[0] has shape (4, 4); expected (..., 3, 3)",
        ),
        (
            lambda: linalg.kron_eig_trace_inv([[K4]], [jnp.ones(3)], [K3], 0.1),
            "kron_eig_trace_inv: terms[0] has factor sizes (4,); expected (3,)",
        ),
    ],
)
def test_linalg_checks_its_inputs(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()
