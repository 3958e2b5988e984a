r"""A Gaussian process on a grid from one kernel per axis: kernels in, posterior out.

On the grid :math:`X = X_1 \times \dots \times X_d` (axis i holds :math:`n_i` inputs, one or
several columns each) with kernels :math:`k_i` and a mean function :math:`m`,

.. math::
    f \sim \mathcal{GP}\big(m,\ k_1 \otimes \dots \otimes k_d\big), \qquad
    y = f(X) + \varepsilon, \quad
    \varepsilon \sim \mathcal N\big(0,\ \sigma^2 \otimes S_i + \operatorname{diag} v\big),

so :math:`y \sim \mathcal N(m(X), \otimes K_i + \sigma^2 \otimes S_i)` with
:math:`K_i = k_i(X_i, X_i)`: a :class:`~kronjax.KroneckerNormal`, or its marginal at the
observed cells when cells are missing or carry their own noise variances :math:`v`.

:meth:`GridGP.condition` returns the posterior of :math:`f` on a test grid
:math:`T = T_1 \times \dots \times T_d` (or at scattered points):

.. math::
    \mathbb E[f_*] = m(T) + K_{*o}\, C^{-1} (y_o - m(X)_o), \qquad
    \operatorname{Var}[f_*] = \operatorname{diag} K_{**}
        - \operatorname{diag}(K_{*o} C^{-1} K_{o*}),

with :math:`K_{*N} = \otimes_i k_i(T_i, X_i)`, by :func:`kronjax.gp.predict` (complete grid)
or :meth:`kronjax.IterativeMarginal.predict` (incomplete grid). Joint draws use pathwise
conditioning (Matheron's rule; Wilson et al. 2020): on the union axes
:math:`U_i = X_i \cup T_i` a prior draw :math:`f' = (\otimes_i R_i) z`,
:math:`R_i R_i^\top = k_i(U_i, U_i)`, and a noise draw :math:`\varepsilon'` give

.. math::
    f_* \mid y = f'_* + K_{*o}\, C^{-1} \big(y_o - f'_o - \varepsilon'_o\big),

exactly distributed as the posterior, at the cost of one structured solve and a draw on a
grid of :math:`\prod_i (n_i + m_i)` cells: never an :math:`M \times M`, :math:`N \times M`
or :math:`N \times N` array.

Kernels are any callables ``k(X1, X2) -> (len(X1), len(X2))``: plain functions or tinygp
kernels (``tinygp.kernels.ExpSquared(scale=ℓ)``) as they are.

References: Saatçi (2011), *Scalable inference for structured Gaussian process models*;
Wilson et al. (2020), *Efficiently sampling functions from Gaussian process posteriors*.
"""

import math
from collections.abc import Callable, Sequence
from functools import cached_property

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.distributions import TransformedDistribution
from numpyro.distributions.transforms import ReshapeTransform

from kronjax import lapack, linalg
from kronjax.distribution import KroneckerNormal
from kronjax.gp import cartesian, predict
from kronjax.marginal import observed_indices

__all__ = ["GridGP", "GridPosterior"]


def _as_axis(x, where: str) -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim not in (1, 2) or x.shape[0] < 1:
        raise ValueError(f"GridGP: {where} has shape {x.shape}; expected (n,) or (n, k), n >= 1")
    return x


def _width(x: jax.Array) -> int:
    return 1 if x.ndim == 1 else x.shape[1]


class GridGP:
    r"""A Gaussian process on the grid :math:`X_1 \times \dots \times X_d` with kernel
    :math:`k_1 \otimes \dots \otimes k_d` (see the module docstring for the math).

    Args:
        kernels: one callable per axis, ``k_i(A, B) -> (len(A), len(B))``: a function of
            two input arrays or a tinygp kernel.
        axes: the training inputs per axis, ``(n_i,)`` or ``(n_i, k_i)`` (several input
            columns on one axis, e.g. longitude and latitude of stations).
        mean: the prior mean: a constant, or a callable of the grid points
            ``(P, k_1 + … + k_d)`` (rows in the flattening order, :func:`kronjax.gp.cartesian`)
            returning ``(P,)``.
        sigma: the noise standard deviation (None: no noise term).
        noise_factors: structured noise :math:`\sigma^2 \otimes S_i`, as in
            :class:`~kronjax.KroneckerNormal`.
        jitter: added to the diagonal of every kernel matrix :math:`k_i(\cdot, \cdot)` (a
            white-noise term per axis), on the training, test and union inputs alike.
        observed: the observed cells, a concrete boolean mask over the grid (grid-shaped or
            flat) or flat indices; None when every cell is observed.
        cell_noise: per-cell noise variances over the grid (grid-shaped or flat), added at
            the observed cells.
        method: the route of the incomplete-grid likelihood, ``"auto"``, ``"exact"`` or
            ``"iterative"`` (:meth:`kronjax.KroneckerNormal.marginal`); conditioning on an
            incomplete grid always solves iteratively (exact to ``tol``).
        names: axis names, e.g. ``("year", "month")``, for grid-shaped sites and ArviZ
            ``dims`` (:meth:`dims`); default ``("axis_0", …)``.
        options: solver options of the iterative route (``tol``, ``max_iters``, ``probes``,
            ``lanczos_steps``, ``probe_tol``, ``precond_rank``, ``key``).
    """

    def __init__(
        self,
        kernels: Sequence[Callable],
        axes: Sequence,
        *,
        mean=0.0,
        sigma=None,
        noise_factors=None,
        jitter: float = 0.0,
        observed=None,
        cell_noise=None,
        method: str = "auto",
        names: Sequence[str] | None = None,
        **options,
    ):
        if not isinstance(axes, Sequence) or not isinstance(kernels, Sequence):
            raise ValueError(
                "GridGP: kernels and axes must be sequences, one entry per grid axis; got "
                f"{type(kernels).__name__} and {type(axes).__name__}"
            )
        if len(kernels) != len(axes) or not axes:
            raise ValueError(
                f"GridGP: {len(kernels)} kernels for {len(axes)} axes; expected one kernel per "
                "axis and at least one axis"
            )
        for i, k in enumerate(kernels):
            if not callable(k):
                raise ValueError(
                    f"GridGP: kernels[{i}] is a {type(k).__name__}; expected a callable "
                    "k(X1, X2) -> matrix"
                )
        self.kernels = tuple(kernels)
        self.axes = tuple(_as_axis(x, f"axes[{i}]") for i, x in enumerate(axes))
        self.shape = tuple(x.shape[0] for x in self.axes)
        self.size = math.prod(self.shape)
        names = tuple(f"axis_{i}" for i in range(len(self.axes))) if names is None else names
        if len(names) != len(self.axes) or len(set(names)) != len(names):
            raise ValueError(
                f"GridGP: names = {tuple(names)}; expected {len(self.axes)} distinct names"
            )
        self.names = tuple(str(n) for n in names)
        self.mean_function, self.sigma, self.jitter = mean, sigma, jitter
        self.noise_factors = noise_factors
        self.observed = None
        if observed is not None:
            mask = np.asarray(observed)
            mask = mask.reshape(-1) if mask.shape == self.shape else mask
            self.observed = observed_indices(mask, self.size)
        self.cell_noise = None
        if cell_noise is not None:
            cell_noise = jnp.asarray(cell_noise)
            if cell_noise.shape not in (self.shape, (self.size,)):
                raise ValueError(
                    f"GridGP: cell_noise has shape {cell_noise.shape}; expected the grid shape "
                    f"{self.shape} or ({self.size},)"
                )
            self.cell_noise = cell_noise.reshape(-1)
        self.method, self.options = method, options

    # -- the kernel matrices ----------------------------------------------------------

    def _kernel(self, i: int, a: jax.Array, b: jax.Array, diagonal: bool = False) -> jax.Array:
        k = jnp.asarray(self.kernels[i](a, b))
        if k.shape != (a.shape[0], b.shape[0]):
            raise ValueError(
                f"GridGP: kernels[{i}] returned shape {k.shape} for inputs of shapes {a.shape} "
                f"and {b.shape}; expected ({a.shape[0]}, {b.shape[0]})"
            )
        if diagonal and self.jitter:
            k = k + self.jitter * jnp.eye(a.shape[0], dtype=k.dtype)
        return k

    def _diag(self, i: int, t: jax.Array) -> jax.Array:
        """``diag k_i(T, T)`` point by point (never the ``m × m`` matrix), plus jitter."""
        one = lambda x: self._kernel(i, x[None], x[None])[0, 0]  # noqa: E731
        return jax.vmap(one)(t) + self.jitter

    @cached_property
    def factors(self) -> tuple[jax.Array, ...]:
        r"""The training factors :math:`K_i = k_i(X_i, X_i)` (+ jitter)."""
        return tuple(self._kernel(i, x, x, True) for i, x in enumerate(self.axes))

    def _mean_at(self, points_of) -> jax.Array:
        if callable(self.mean_function):
            points = points_of()
            m = jnp.asarray(self.mean_function(points))
            if m.shape != (points.shape[0],):
                raise ValueError(
                    f"GridGP: mean returned shape {m.shape} for {points.shape[0]} points; "
                    f"expected ({points.shape[0]},)"
                )
            return m
        return jnp.asarray(self.mean_function)

    # -- distributions ----------------------------------------------------------------

    @cached_property
    def prior(self) -> KroneckerNormal:
        r"""The distribution of the complete grid of observations, flat ``(N,)`` in the
        flattening order: :math:`\mathcal N(m(X), \otimes K_i + \sigma^2 \otimes S_i)`."""
        loc = self._mean_at(lambda: cartesian(*self.axes))
        return KroneckerNormal(
            loc, covs=self.factors, sigma=self.sigma, noise_factors=self.noise_factors
        )

    @property
    def complete(self) -> bool:
        """Whether every cell is observed without per-cell noise."""
        return self.observed is None and self.cell_noise is None

    def numpyro_dist(self, grid_event: bool = False):
        """The likelihood for ``numpyro.sample``: the ``KroneckerNormal`` of the grid
        (event ``(N,)``, or the grid shape ``(n_1, …, n_d)`` with ``grid_event=True``, for
        ArviZ ``dims``), or its marginal at the observed cells (event ``(n_obs,)``)."""
        if self.complete:
            if not grid_event:
                return self.prior
            return TransformedDistribution(self.prior, ReshapeTransform(self.shape, (self.size,)))
        if grid_event:
            raise ValueError(
                "GridGP.numpyro_dist: grid_event=True needs a complete grid; with missing cells "
                "or cell_noise the event is the observed cells (n_obs,)"
            )
        return self.prior.marginal(
            self.observed, self.method, cell_noise=self.cell_noise, **self.options
        )

    def log_prob(self, y) -> jax.Array:
        """The log marginal likelihood of ``y`` (grid-shaped, flat, or the observed cells)."""
        return self.numpyro_dist().log_prob(self._observations(y))

    def dims(self, site: str = "y") -> dict:
        """``{site: [names]}`` for ``arviz.from_numpyro(..., dims=...)`` of a grid-shaped site."""
        return {site: list(self.names)}

    def _observations(self, y) -> jax.Array:
        y = jnp.asarray(y)
        flat = y.reshape(-1) if y.shape == self.shape else y
        if flat.shape == (self.size,):
            return flat if self.observed is None else flat[self.observed]
        n_obs = self.size if self.observed is None else self.observed.size
        if flat.shape != (n_obs,):
            raise ValueError(
                f"GridGP: y has shape {y.shape}; expected the grid {self.shape}, ({self.size},) "
                f"or the {n_obs} observed cells ({n_obs},)"
            )
        return flat

    # -- the posterior ----------------------------------------------------------------

    def condition(self, y, test_axes=None, *, points=None, pred_noise: bool = False):
        r"""The posterior of the latent :math:`f` given ``y``, on the test grid ``test_axes``
        (one ``(m_i,)`` or ``(m_i, k_i)`` array per axis) or at ``points``
        ``(p, k_1 + … + k_d)``; exactly one of the two. ``y``: grid-shaped, flat ``(N,)``,
        or the observed cells ``(n_obs,)``. ``pred_noise`` adds :math:`\sigma^2` to the
        variance (the predictive of a new noisy observation)."""
        if (test_axes is None) == (points is None):
            raise ValueError("GridGP.condition: give exactly one of test_axes and points")
        if test_axes is not None:
            if not isinstance(test_axes, Sequence) or len(test_axes) != len(self.axes):
                got = len(test_axes) if isinstance(test_axes, Sequence) else test_axes
                raise ValueError(
                    f"GridGP.condition: test_axes has {got} entries; expected {len(self.axes)}, "
                    "one array per grid axis"
                )
            tests = tuple(_as_axis(t, f"test_axes[{i}]") for i, t in enumerate(test_axes))
            grid = True
        else:
            points = jnp.asarray(points)
            widths = [_width(x) for x in self.axes]
            if points.ndim != 2 or points.shape[1] != sum(widths) or points.shape[0] < 1:
                raise ValueError(
                    f"GridGP.condition: points has shape {points.shape}; expected (p, "
                    f"{sum(widths)}), one column per input column of the axes"
                )
            cuts = np.cumsum([0] + widths)
            tests = tuple(
                points[:, a] if x.ndim == 1 else points[:, a:b]
                for x, a, b in zip(self.axes, cuts[:-1], cuts[1:], strict=True)
            )
            grid = False
        for i, (x, t) in enumerate(zip(self.axes, tests, strict=True)):
            if _width(t) != _width(x) or t.ndim != x.ndim:
                raise ValueError(
                    f"GridGP.condition: test inputs of axis {i} have shape {t.shape}; expected "
                    f"the columns of axes[{i}] {x.shape[1:]}"
                )
        return GridPosterior(self, self._observations(y), tests, grid, pred_noise)


class GridPosterior:
    r"""The posterior of a :class:`GridGP`'s latent function on a test grid or at points:
    ``mean`` and ``variance`` (grid-shaped ``(m_1, …, m_d)`` or ``(p,)``) and joint draws
    by :meth:`sample`. Built by :meth:`GridGP.condition`."""

    def __init__(self, gp: GridGP, y_obs, tests, grid: bool, pred_noise: bool):
        self.gp, self.y_obs, self.tests, self.grid = gp, y_obs, tests, grid
        self.pred_noise = pred_noise
        self.shape = tuple(t.shape[0] for t in tests) if grid else (tests[0].shape[0],)

    @cached_property
    def _cross(self) -> tuple[jax.Array, ...]:
        return tuple(
            self.gp._kernel(i, t, x) for i, (x, t) in enumerate(zip(self.gp.axes, self.tests))
        )

    @cached_property
    def _test_mean(self) -> jax.Array:
        if self.grid:
            return self.gp._mean_at(lambda: cartesian(*self.tests))
        return self.gp._mean_at(
            lambda: jnp.concatenate([t.reshape(t.shape[0], -1) for t in self.tests], -1)
        )

    @cached_property
    def _marginal(self):
        gp = self.gp
        return gp.prior.marginal(gp.observed, "iterative", cell_noise=gp.cell_noise, **gp.options)

    def _predict(self, diags):
        if self.gp.complete:
            return predict(
                self.gp.prior,
                self.y_obs,
                self._cross,
                diags,
                grid=self.grid,
                pred_noise=self.pred_noise,
            )
        return self._marginal.predict(
            self.y_obs, self._cross, diags, grid=self.grid, pred_noise=self.pred_noise
        )

    @cached_property
    def mean(self) -> jax.Array:
        r""":math:`m(T) + K_{*o} C^{-1}(y_o - m(X)_o)`."""
        return (self._predict(None)[0] + self._test_mean).reshape(self.shape)

    @cached_property
    def variance(self) -> jax.Array:
        r""":math:`\operatorname{diag} K_{**} - \operatorname{diag}(K_{*o} C^{-1} K_{o*})`
        (+ :math:`\sigma^2` with ``pred_noise``); on an incomplete grid one batched solve per
        256 test points (exact; for very many points estimate it from :meth:`sample`)."""
        diags = [self.gp._diag(i, t) for i, t in enumerate(self.tests)]
        return self._predict(diags)[1].reshape(self.shape)

    def sample(self, key, sample_shape=()) -> jax.Array:
        r"""Joint posterior draws of :math:`f` on the test grid (or at the points),
        ``sample_shape + shape``, by pathwise conditioning on the union axes (module
        docstring): exact, :math:`O(\prod_i (n_i + m_i) \sum_i (n_i + m_i))` per draw. At
        ``p`` scattered points the union grid has :math:`\prod_i (n_i + p)` cells: use a
        test grid for many points."""
        gp, sample_shape = self.gp, tuple(sample_shape)
        unions = [jnp.concatenate([x, t]) for x, t in zip(gp.axes, self.tests, strict=True)]
        kus = [gp._kernel(i, u, u, True) for i, u in enumerate(unions)]
        roots = [linalg.psd_sqrt(k, *lapack.eigh(k)) for k in kus]
        k_prior, k_noise, k_cell = jax.random.split(key, 3)
        dtype = kus[0].dtype
        union_shape = tuple(u.shape[0] for u in unions)
        z = jax.random.normal(k_prior, sample_shape + (math.prod(union_shape),), dtype)
        f = linalg.kron_matvec(roots, z).reshape(sample_shape + union_shape)
        lead = (slice(None),) * len(sample_shape)
        f_train = f[lead + tuple(slice(0, n) for n in gp.shape)].reshape(sample_shape + (-1,))
        if self.grid:
            f_test = f[lead + tuple(slice(n, None) for n in gp.shape)]
        else:
            j = jnp.arange(self.shape[0])
            f_test = f[lead + tuple(n + j for n in gp.shape)]
        f_test = f_test.reshape(sample_shape + (-1,))
        cov = gp.prior.covariance
        noise = jnp.zeros_like(f_train)
        if gp.sigma is not None or gp.noise_factors is not None:
            noise = cov.noise_root_matvec(jax.random.normal(k_noise, f_train.shape, dtype))
        resid_grid = gp.prior.loc + f_train + noise
        kstars = [k[n:, :n] for k, n in zip(kus, gp.shape, strict=True)]
        if gp.complete:
            alpha = gp.prior.solve(self.y_obs - resid_grid)
        else:
            obs = gp.observed
            resid = self.y_obs - resid_grid[..., obs]
            if gp.cell_noise is not None:
                v = gp.cell_noise[obs]
                resid = resid - jnp.sqrt(v) * jax.random.normal(k_cell, resid.shape, dtype)
            alpha = jnp.zeros(resid.shape[:-1] + (gp.size,), dtype)
            alpha = alpha.at[..., obs].set(self._marginal.solve(resid))
        if self.grid:
            update = linalg.kron_matvec(kstars, alpha)
        else:
            contract = lambda a: linalg.kron_rows_matvec(kstars, a.reshape(gp.shape))  # noqa: E731
            update = jnp.vectorize(contract, signature="(n)->(p)")(alpha)
        return (self._test_mean + f_test + update).reshape(sample_shape + self.shape)
