"""Bad input raises ValueError at once, naming the argument, the factor, and the shapes."""

import re

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import DTYPE

from kronjax import KroneckerNormal

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
