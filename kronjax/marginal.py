r"""Exact marginals of incomplete grids: ``KroneckerNormal.marginal(observed)``.

A grid with a few missing cells is no longer a Kronecker-structured Gaussian, but its
marginal is still exact and cheap through the inverse of the full covariance. With
:math:`A = K_1 \otimes \dots \otimes K_d + \sigma^2 I` (or the structured-noise covariance),
:math:`B = A^{-1}` (cheap in the eigenbasis: :math:`B v = Q((Q^\top v)/D)`), ``o`` the
observed and ``m`` the missing cells, the block-inverse identities give

.. math::
    \log\det A_{oo} = \log\det A + \log\det B_{mm}, \qquad
    A_{oo}^{-1} = B_{oo} - B_{om} B_{mm}^{-1} B_{mo} .

Reference: Saatçi (2011), *Scalable inference for structured Gaussian process models*,
ch. 5 (the incomplete-grid problem); the identities are the Schur complement of
:math:`B`.
"""

import copy
import math

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.distributions import Distribution, constraints
from numpyro.distributions.batch_util import promote_batch_shape
from numpyro.distributions.util import validate_sample

from kronjax import lapack

__all__ = ["KroneckerMarginal"]

_LOG_2PI = math.log(2 * math.pi)


def observed_indices(observed, n: int) -> np.ndarray:
    """Turn a boolean mask ``(N,)`` or an integer index array into unique indices."""
    if isinstance(observed, jax.core.Tracer):
        raise ValueError(
            "KroneckerNormal.marginal: observed must be concrete (a NumPy array or a "
            "concrete jax array), not traced: build the mask outside jit and close over it"
        )
    obs = np.asarray(observed)
    if obs.dtype == np.bool_:
        if obs.shape != (n,):
            raise ValueError(
                f"KroneckerNormal.marginal: the boolean mask observed has shape {obs.shape}; "
                f"expected ({n},), one entry per grid cell"
            )
        idx = np.flatnonzero(obs)
    elif np.issubdtype(obs.dtype, np.integer):
        if obs.ndim != 1:
            raise ValueError(
                f"KroneckerNormal.marginal: the index array observed has shape {obs.shape}; "
                "expected a 1-D array of flat grid indices"
            )
        if obs.size and (obs.min() < 0 or obs.max() >= n):
            raise ValueError(
                f"KroneckerNormal.marginal: observed indices must lie in [0, {n}); got "
                f"min {obs.min()}, max {obs.max()}"
            )
        if np.unique(obs).size != obs.size:
            raise ValueError("KroneckerNormal.marginal: observed indices must be unique")
        idx = obs
    else:
        raise ValueError(
            "KroneckerNormal.marginal: observed must be a boolean mask of length "
            f"{n} or an integer index array; got dtype {obs.dtype}"
        )
    if idx.size == 0:
        raise ValueError("KroneckerNormal.marginal: observed selects no cell")
    return idx.astype(np.int64)


def _tri_solve(chol, b):
    return lapack.solve_triangular(chol, b[..., None])[..., 0]


class KroneckerMarginal(Distribution):
    r"""The exact marginal of a :class:`~kronjax.KroneckerNormal` at the observed cells.

    Built by ``dist.marginal(observed)``; ``event_shape == (n_obs,)`` with the entries in
    the order of ``observed`` (ascending for a mask), so
    ``numpyro.sample("y", dist.marginal(mask), obs=y[mask])`` is the likelihood of an
    incomplete grid.

    With :math:`r_o = y_o - \mu_o`, :math:`\tilde r` the length-N vector holding
    :math:`r_o` and zeros at the missing cells, and :math:`u = B \tilde r`:

    .. math::
        r_o^\top A_{oo}^{-1} r_o = u_o^\top r_o - u_m^\top B_{mm}^{-1} u_m, \qquad
        \log p(y_o) = -\tfrac12\big(r_o^\top A_{oo}^{-1} r_o + \log\det A
        + \log\det B_{mm} + n_o \log 2\pi\big),

    since :math:`B_{mo} r_o = u_m`. :math:`B_{mm}` comes from :math:`m` structured solves
    :math:`B e_j`, done once here and Cholesky-factored. Every solve is the implicit one of
    :func:`kronjax.linalg.kron_eig_solve` (and the log det has the rules of
    :func:`kronjax.linalg.kron_eig_logdet`), so first and second derivatives w.r.t. the
    factors, ``sigma``, the noise factors and ``loc`` are exact, in forward and reverse
    mode, and never differentiate eigenvectors.

    Cost: :math:`O(m N \sum_i n_i + m^3)` to build, memory :math:`O(m N)` (the m solves),
    then :math:`O(N \sum_i n_i + m^2)` per ``log_prob``; never an :math:`N \times N` array.
    Use it when a few cells are missing (m up to a few thousand). For mostly missing
    grids switch to the latent route: sample the full grid with ``KroneckerReparam``
    (whitened, :math:`O(N \sum_i n_i)` per step) and observe
    ``Normal(f[observed], sigma)``. ``sample`` draws the full grid and keeps the observed
    cells (reparameterized).

    Args:
        base: the full-grid ``KroneckerNormal``.
        observed: concrete boolean mask ``(N,)`` or unique integer indices into the flat
            grid; never traced.
    """

    arg_constraints = {"base": constraints.dependent(is_discrete=False)}
    support = constraints.real_vector
    reparametrized_params = ["base"]
    pytree_data_fields = ("base", "_chol_mm")
    pytree_aux_fields = ("observed", "missing")

    def __init__(self, base, observed, *, validate_args: bool | None = None):
        n = base.event_shape[0]
        obs = observed_indices(observed, n)
        missing = np.setdiff1d(np.arange(n), obs)
        self.base = base
        self.observed = tuple(obs.tolist())
        self.missing = tuple(missing.tolist())
        self._chol_mm = self._factor_missing() if missing.size else None
        super().__init__(base.batch_shape, (obs.size,), validate_args=validate_args)

    def _factor_missing(self) -> jax.Array:
        r"""Cholesky factor of :math:`B_{mm}`, from the solves :math:`B e_j`, batched."""
        n, m = self.base.event_shape[0], len(self.missing)
        missing = np.asarray(self.missing)
        batch = self.base.batch_shape
        units = jnp.zeros((m, n), self.base.loc.dtype).at[np.arange(m), missing].set(1)
        cols = self.base.solve(units.reshape((m,) + (1,) * len(batch) + (n,)))
        b_mm = jnp.moveaxis(cols[..., missing], 0, -2)
        return lapack.cholesky(0.5 * (b_mm + jnp.swapaxes(b_mm, -1, -2)))

    @validate_sample
    def log_prob(self, value) -> jax.Array:
        value = jnp.asarray(value)
        n_obs, n = self.event_shape[0], self.base.event_shape[0]
        if value.ndim == 0 or value.shape[-1] != n_obs:
            raise ValueError(
                f"KroneckerMarginal.log_prob: value has shape {value.shape}; expected "
                f"(..., {n_obs}), one entry per observed cell"
            )
        obs = np.asarray(self.observed)
        r_o = value - self.base.loc[..., obs]
        r = jnp.zeros(r_o.shape[:-1] + (n,), r_o.dtype).at[..., obs].set(r_o)
        u = self.base.solve(r)
        quad = jnp.sum(u[..., obs] * r_o, -1)
        logdet = self.base.covariance.logdet()
        if self._chol_mm is not None:
            w = _tri_solve(self._chol_mm, u[..., np.asarray(self.missing)])
            quad = quad - jnp.sum(w * w, -1)
            diag = jnp.diagonal(self._chol_mm, axis1=-2, axis2=-1)
            logdet = logdet + 2 * jnp.sum(jnp.log(diag), -1)
        return -0.5 * (quad + logdet + n_obs * _LOG_2PI)

    def sample(self, key, sample_shape=()) -> jax.Array:
        """Draw the full grid from ``base`` and keep the observed cells."""
        return self.base.sample(key, sample_shape)[..., np.asarray(self.observed)]

    @property
    def mean(self) -> jax.Array:
        return self.base.mean[..., np.asarray(self.observed)]

    @property
    def variance(self) -> jax.Array:
        return self.base.variance[..., np.asarray(self.observed)]


@promote_batch_shape.register
def _promote_batch_shape(d: KroneckerMarginal):
    """Promote the base (see ``KroneckerNormal``'s rule) and take its batch shape."""
    new = copy.copy(d)
    new.base = promote_batch_shape(d.base)
    new._batch_shape = new.base.batch_shape
    return new
