r"""``KroneckerNormal``: a NumPyro distribution with Kronecker-structured covariance."""

import copy
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.distributions import Distribution, constraints
from numpyro.distributions.batch_util import promote_batch_shape, vmap_over
from numpyro.distributions.util import validate_sample
from numpyro.util import not_jax_tracer

from kronjax import arguments, conditioning
from kronjax.covariance import KroneckerCovariance
from kronjax.incomplete import IterativeMarginal
from kronjax.marginal import KroneckerMarginal, observed_indices

__all__ = ["KroneckerNormal"]

_LOG_2PI = math.log(2 * math.pi)

#: ``marginal(method="auto")`` takes the exact route up to this many missing cells, and
#: while the exact route's m × N solves stay under ``AUTO_EXACT_MAX_CELLS`` entries. Measured
#: (``bench/INCOMPLETE.md``, the iterative route with its default preconditioner): equal
#: times at m ≈ 219 (64×48, rank 341) and below 64 (128×128 and 256×256, ranks 96 and 112;
#: exact takes 1.3× and 1.8× at m = 64); the exact route's peak memory is 8–27 × m·N
#: doubles. Kept above the crossover: the exact route is exact and has second derivatives
#: (the iterative one refuses them), at m = 192 for about 4 × (128×128) to 5 × (256×256) the
#: iterative time.
AUTO_EXACT_MAX_MISSING = 192
AUTO_EXACT_MAX_CELLS = 2**24


class KroneckerNormal(Distribution):
    r"""Multivariate normal with Kronecker-structured covariance plus (structured) noise.

    .. math::
        x \sim \mathcal N(\mu, K), \quad
        K = K_1 \otimes K_2 \otimes \dots \otimes K_d + \sigma^2 I_N, \quad
        N = n_1 n_2 \cdots n_d ,

    or, with ``noise_factors``, :math:`K = \otimes_i K_i + \sigma^2 \otimes_i S_i`.

    Element :math:`(i_1, \dots, i_d)` of the grid sits at flat index
    :math:`i_1 (n_2 \cdots n_d) + \dots + i_d` (row-major, as ``jnp.kron``), so a grid
    array ``y_grid`` of shape ``(..., n_1, …, n_d)`` is ``y_grid.reshape(..., N)``.

    The covariance is factorized once, here, into ``self.covariance``, a
    :class:`kronjax.KroneckerCovariance` that owns the route: ``covs`` by ``eigh``;
    ``chols`` by per-mode triangular solves when there is no noise, moved to the eigenbasis
    otherwise; ``evds`` as given. Every method below is one of its operations. Then
    ``log_prob`` costs
    :math:`O(N \sum_i n_i)` after :math:`O(\sum_i n_i^3)`, and
    :math:`\partial \log p / \partial K_i` comes from a custom JVP that never
    differentiates eigenvectors (:func:`kronjax.linalg.kron_eig_logpdf`): exact and
    finite when factors have repeated eigenvalues, where autodiff through ``eigh`` fails.

    Args:
        loc: mean, shape ``(..., N)``, or a scalar broadcast to ``(N,)``.
        covs: sequence of ``d >= 1`` symmetric PSD factors ``(..., n_i, n_i)``
            (positive definite when ``sigma`` is None).
        chols: sequence of lower-triangular ``L_i`` with ``K_i = L_i L_iᵀ``.
        evds: sequence of pairs ``(eigenvalues (..., n_i), eigenvectors (..., n_i, n_i))``
            with ``K_i = Q_i diag(v_i) Q_iᵀ``, e.g. the output of ``jnp.linalg.eigh``.
        sigma: None, or the noise standard deviation (``>= 0``), broadcastable to the
            batch shape.
        noise_factors: None, or a sequence of d entries ``S_i``, each None (identity), a
            positive vector ``(..., n_i)`` (a diagonal) or a positive definite matrix
            ``(..., n_i, n_i)``; the noise becomes :math:`\sigma^2 \otimes_i S_i`, with
            :math:`\sigma = 1` when ``sigma`` is None. An entry whose trailing dims are
            ``(n_i, n_i)`` is read as a matrix.
        validate_args: check values (finite, ``sigma >= 0``, factors symmetric PSD, PD
            without noise, ``evds`` eigenvectors orthonormal) at construction, outside
            ``jit``. Given explicitly as True, ``log_prob`` and the solves also refuse a
            covariance too ill-conditioned for the dtype (:mod:`kronjax.conditioning`);
            otherwise they warn once.

    Exactly one of ``covs``, ``chols``, ``evds`` is given. ``batch_shape`` broadcasts
    ``loc.shape[:-1]``, the factors' leading dims, ``jnp.shape(sigma)`` and the leading
    dims of the noise factors.

    **Kronecker-structured noise** is exact by whitening (Rakitsch et al. 2013): with
    :math:`S_i = C_i C_i^\top` (Cholesky; :math:`C_i = \operatorname{diag}\sqrt{s_i}`
    for a diagonal) and :math:`\tilde K_i = C_i^{-1} K_i C_i^{-\top}`,

    .. math::
        K = C \big(\otimes_i \tilde K_i + \sigma^2 I\big) C^\top, \quad C = \otimes_i C_i,
        \qquad \log p(x) = \log \mathcal N\big(C^{-1}(x - \mu);\, 0,
        \otimes_i \tilde K_i + \sigma^2 I\big) - \log|\det C| ,

    :math:`\log|\det C| = \sum_i (N/n_i) \sum \log \operatorname{diag} C_i`. The whitened
    factors go through the same eigen core, so the cost stays
    :math:`O(\sum_i n_i^3 + N \sum_i n_i)` and the gradient w.r.t. :math:`K_i` and
    :math:`S_i` flows through the triangular solves of the whitening and the custom JVP
    of the core, never through ``eigh``. ``evds`` are turned into
    :math:`K_i = Q_i \operatorname{diag}(v_i) Q_i^\top` (small) and whitened, so the
    whitened factors are decomposed afresh (axes whose noise entry is None keep the given
    decomposition). Use cases: one noise level per task in a multi-output GP (a diagonal
    on the task axis), noise varying separably over space and time (diagonals on several
    axes), correlated noise across tasks (a matrix on the task axis).

    References: Saatçi (2011), *Scalable inference for structured Gaussian process
    models*, ch. 5; Wilson et al. (2014), *Fast kernel learning for multidimensional
    pattern extrapolation*; Rakitsch et al. (2013), *It is all in the noise: efficient
    multi-task Gaussian process inference with structured residuals*, NeurIPS.
    """

    arg_constraints = {  # event_dim: the core dims of one entry (a factor is a matrix)
        "loc": constraints.real_vector,
        "covs": constraints.dependent(is_discrete=False, event_dim=2),
        "chols": constraints.dependent(is_discrete=False, event_dim=2),
        "evds": constraints.dependent(is_discrete=False, event_dim=2),
        "sigma": constraints.dependent(is_discrete=False, event_dim=0),
        "noise_factors": constraints.dependent(is_discrete=False, event_dim=2),
    }
    support = constraints.real_vector
    reparametrized_params = ["loc", "covs", "chols", "evds", "sigma", "noise_factors"]
    pytree_aux_fields = ("_strict",)
    pytree_data_fields = ("loc", "covs", "chols", "_evds", "sigma", "noise_factors", "covariance")

    def __init__(
        self,
        loc,
        covs: Sequence | None = None,
        chols: Sequence | None = None,
        evds: Sequence | None = None,
        sigma=None,
        noise_factors: Sequence | None = None,
        *,
        validate_args: bool | None = None,
    ):
        given = [n for n, v in (("covs", covs), ("chols", chols), ("evds", evds)) if v is not None]
        if len(given) != 1:
            raise ValueError(
                "KroneckerNormal: give exactly one of covs, chols, evds; got "
                + (", ".join(given) if given else "none")
            )
        if evds is not None:
            eigvals, eigvecs = arguments.eig_pairs(evds)
            factors = eigvecs
        else:
            factors = arguments.square_factors(given[0], covs if covs is not None else chols)
        sizes = tuple(f.shape[-1] for f in factors)
        n = math.prod(sizes)

        loc = arguments.as_real("loc", loc)
        if loc.ndim == 0:
            loc = jnp.broadcast_to(loc, (n,))
        if loc.shape[-1] != n:
            raise arguments.shape_error(
                "loc", loc.shape, f"(..., {n}): N = {n} is the product of the factor sizes {sizes}"
            )
        sigma = None if sigma is None else arguments.as_real("sigma", sigma)
        noise, noise_is_matrix = (
            (None, None) if noise_factors is None else arguments.noise_entries(noise_factors, sizes)
        )
        extra = [
            (f"noise_factors[{i}]", jnp.shape(a)[: -2 if m else -1])
            for i, (a, m) in enumerate(zip(noise or (), noise_is_matrix or (), strict=True))
            if a is not None
        ]
        batch_shape = arguments.broadcast_batch(loc, factors, sigma, given[0], extra)

        dtype = jnp.result_type(
            float,
            loc,
            *factors,
            *([] if sigma is None else [sigma]),
            *(a for a in noise or () if a is not None),
        )

        def cast(xs):
            return None if xs is None else tuple(None if x is None else x.astype(dtype) for x in xs)

        self.loc = loc.astype(dtype)
        self.covs = cast(None if covs is None else factors)
        self.chols = cast(None if chols is None else factors)
        self._evds = None if evds is None else tuple(zip(cast(eigvals), cast(eigvecs)))
        self.noise_factors = cast(noise)
        self.covariance = KroneckerCovariance.from_factors(
            self.covs,
            self.chols,
            self._evds,
            None if sigma is None else sigma.astype(dtype),
            self.noise_factors,
        )
        self.sigma = self.covariance.sigma  # 1 when only noise factors are given
        self._strict = validate_args is True  # an explicit request refuses ill-conditioning
        super().__init__(batch_shape, (n,), validate_args=validate_args)

    # -- shapes -----------------------------------------------------------------------

    @property
    def factor_sizes(self) -> tuple[int, ...]:
        """The grid sizes ``(n_1, …, n_d)``."""
        return self.covariance.factor_sizes

    @property
    def evds(self) -> tuple[tuple[jax.Array, jax.Array], ...] | None:
        """The ``(eigenvalues, eigenvectors)`` pairs when given as ``evds``, else None."""
        return self._evds

    def get_args(self) -> dict:
        """The parameters given (``loc``, one of ``covs``/``chols``/``evds``, ``sigma`` and
        ``noise_factors`` when given), as passed to ``__init__``."""
        names = ("loc", "covs", "chols", "evds", "sigma", "noise_factors")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}

    @classmethod
    def infer_shapes(
        cls, loc=(), covs=None, chols=None, evds=None, sigma=None, noise_factors=None
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(batch_shape, event_shape)`` from the shapes of the arguments: ``loc`` a shape,
        ``covs``/``chols`` a list of shapes, ``evds`` a list of (eigenvalue shape,
        eigenvector shape) pairs, ``sigma`` a shape, ``noise_factors`` a list of shapes or
        None (a shape ending in ``(n_i, n_i)`` is a matrix)."""
        mats = covs or chols or [q for _, q in evds or ()]
        sizes = [tuple(m)[-1] for m in mats]
        parts = [tuple(loc)[:-1], *(tuple(m)[:-2] for m in mats)]
        if sigma is not None:
            parts.append(tuple(sigma))
        for s, n in zip(noise_factors or (), sizes, strict=False):
            if s is not None:
                s = tuple(s)
                parts.append(s[:-2] if s[-2:] == (n, n) else s[:-1])
        return jnp.broadcast_shapes(*parts), (math.prod(sizes),)

    def _check_value(self, value) -> jax.Array:
        value = arguments.as_real("value", value)
        n = self.event_shape[0]
        if value.ndim == 0 or value.shape[-1] != n:
            raise ValueError(
                f"KroneckerNormal.log_prob: value has shape {value.shape}; expected "
                f"(..., {n}) with N = {n} = prod{self.factor_sizes}"
            )
        try:
            jnp.broadcast_shapes(value.shape[:-1], self.batch_shape)
        except ValueError:
            raise ValueError(
                f"KroneckerNormal.log_prob: value has shape {value.shape}, whose leading "
                f"dims do not broadcast with the batch shape {self.batch_shape}"
            ) from None
        return value

    # -- the density: every operation is the covariance's ------------------------------

    def condition_number(self) -> jax.Array:
        r"""The condition number :math:`\kappa` of the covariance, batched
        (:meth:`kronjax.KroneckerCovariance.condition_number`: exact on the eigen routes,
        an estimate for noise-free ``chols``). ``log_prob``, the solves, the marginal and
        prediction check it against the dtype (:mod:`kronjax.conditioning`)."""
        return self.covariance.condition_number()

    def check_conditioning(self, where: str) -> jax.Array:
        """Refuse (``validate_args=True`` given) or warn once when :meth:`condition_number`
        passes the dtype's limit; ``where`` names the operation in the message. Returns
        the condition number."""
        cond = self.condition_number()
        conditioning.check(cond, self.loc.dtype, f"KroneckerNormal.{where}", strict=self._strict)
        return cond

    def solve(self, x: jax.Array) -> jax.Array:
        r""":math:`K^{-1} x` for ``x`` ``(..., N)``, :math:`O(N \sum_i n_i)`, never forming K;
        the conditioning is checked first."""
        self.check_conditioning("solve")
        return self.covariance.solve(x)

    def marginal(self, observed=None, method: str = "auto", *, cell_noise=None, **options):
        r"""The marginal distribution of the cells at ``observed`` (all cells when None),
        optionally with per-cell noise variances ``cell_noise`` ``(..., N)`` added.

        ``observed`` is a concrete boolean mask ``(N,)`` or an array of unique flat
        indices; the result has ``event_shape == (n_obs,)`` and serves as the likelihood
        of an incomplete grid: ``numpyro.sample("y", dist.marginal(mask), obs=y[mask])``.
        Never an :math:`N \times N` array. Two routes:

        * ``"exact"``: :class:`kronjax.marginal.KroneckerMarginal`,
          :math:`O(m N \sum_i n_i + m^3)` for m missing cells, memory :math:`O(m N)`;
          no ``cell_noise``.
        * ``"iterative"``: :class:`kronjax.incomplete.IterativeMarginal`, preconditioned
          conjugate gradients and stochastic Lanczos quadrature, :math:`O(N \sum_i n_i)`
          per operator application, memory :math:`O(N \cdot \text{probes} + n_o r)`; ``options``
          (``tol``, ``max_iters``, ``probes``, ``lanczos_steps``, ``probe_tol``,
          ``precond_rank``, ``key``) go to it.
        * ``"auto"`` (default): ``"iterative"`` when ``cell_noise`` is given or more than
          ``AUTO_EXACT_MAX_MISSING`` (192) cells are missing or ``m·N`` exceeds
          ``AUTO_EXACT_MAX_CELLS`` (2²⁴) (the measured crossover and the exact route's
          memory, ``bench/INCOMPLETE.md``), else ``"exact"``.
        """
        n = self.event_shape[0]
        obs = np.arange(n) if observed is None else observed_indices(observed, n)
        if method not in ("auto", "exact", "iterative"):
            raise ValueError(
                f"KroneckerNormal.marginal: method = {method!r}; expected 'auto', 'exact' "
                "or 'iterative'"
            )
        missing = n - obs.size
        if method == "auto":
            iterative = (
                cell_noise is not None
                or missing > AUTO_EXACT_MAX_MISSING
                or missing * n > AUTO_EXACT_MAX_CELLS
            )
            method = "iterative" if iterative else "exact"
        if method == "exact":
            if cell_noise is not None or options:
                given = sorted(options) + ["cell_noise"] * (cell_noise is not None)
                raise ValueError(
                    "KroneckerNormal.marginal: the exact route takes no cell_noise or solver "
                    f"options (got {given}); use method='iterative'"
                )
            return KroneckerMarginal(self, obs, validate_args=self._validate_args)
        return IterativeMarginal(
            self, obs, cell_noise=cell_noise, validate_args=self._validate_args, **options
        )

    def log_prob(self, value) -> jax.Array:
        return self._log_prob(self._check_value(value))

    @validate_sample
    def _log_prob(self, value) -> jax.Array:
        self.check_conditioning("log_prob")
        return self.covariance.logpdf(value - self.loc)

    def entropy(self) -> jax.Array:
        r""":math:`\tfrac12 \log\det K + \tfrac N2 (1 + \log 2\pi)`."""
        n = self.event_shape[0]
        logdet = self.covariance.logdet()
        return jnp.broadcast_to(0.5 * logdet + 0.5 * n * (1 + _LOG_2PI), self.batch_shape)

    def sample(self, key, sample_shape=()) -> jax.Array:
        r"""Draw :math:`x = \mu + (\otimes R_i) z_1 + \sigma (\otimes C_i) z_2`.

        :math:`R_i R_i^\top = K_i`: ``R_i`` is ``L_i`` for ``chols``, the symmetric PSD
        root for ``covs`` and :math:`Q_i \operatorname{diag}\sqrt{\lambda_i}` for ``evds``;
        PSD factors are fine. :math:`C_i C_i^\top = S_i` are the noise roots (identity
        without ``noise_factors``). Reparameterized; cost :math:`O(N \sum_i n_i)` per draw.
        At an exactly singular factor any root's derivative is unbounded, so gradients
        through draws have huge variance there: add jitter before differentiating through
        such samples.
        """
        shape = tuple(sample_shape) + self.batch_shape + self.event_shape
        key_k, key_noise = jax.random.split(key)
        z = jax.random.normal(key_k, shape, self.loc.dtype)
        x = self.loc + self.covariance.signal_root_matvec(z)
        if self.sigma is not None:
            noise = jax.random.normal(key_noise, shape, self.loc.dtype)
            x = x + self.covariance.noise_root_matvec(noise)
        return x

    # -- moments ----------------------------------------------------------------------

    @property
    def mean(self) -> jax.Array:
        return jnp.broadcast_to(self.loc, self.batch_shape + self.event_shape)

    @property
    def variance(self) -> jax.Array:
        r""":math:`\operatorname{diag} K = \otimes_i \operatorname{diag} K_i + \sigma^2
        \otimes_i \operatorname{diag} S_i`, from the factors' diagonals."""
        return jnp.broadcast_to(self.covariance.diag(), self.batch_shape + self.event_shape)

    @property
    def covariance_matrix(self) -> jax.Array:
        """The dense ``N × N`` covariance. For small N only."""
        return jnp.broadcast_to(self.covariance.dense(), self.batch_shape + self.event_shape * 2)

    # -- validation -------------------------------------------------------------------

    def validate_args(self, strict: bool = True) -> None:
        """Check values (:func:`kronjax.arguments.validate_values`): finite, ``sigma >= 0``,
        factors symmetric PSD (PD without noise), ``evds`` eigenvectors orthonormal, noise
        factors positive (diagonals) or symmetric positive definite (matrices)."""
        leaves = jax.tree.leaves(
            (self.loc, self.sigma, self.covs, self.chols, self._evds, self.noise_factors)
        )
        if not all(not_jax_tracer(x) for x in leaves):
            if strict:
                raise RuntimeError("Cannot validate arguments inside jitted code.")
            return
        arguments.validate_values(self)


@promote_batch_shape.register
def _promote_batch_shape(d: KroneckerNormal):
    """The batch shape of a distribution stacked by ``jax.vmap`` or NumPyro's ``scan``, read
    from its parameters. As for NumPyro's own distributions, ``batch_shape`` is stored, so
    until promoted a stacked distribution keeps the per-member shape that
    ``ExpandedDistribution`` (a ``plate``) promotes against."""
    new = copy.copy(d)
    new._batch_shape = jnp.broadcast_shapes(jnp.shape(d.loc)[:-1], d.covariance.batch_shape)
    return new


@vmap_over.register
def _vmap_over(d: KroneckerNormal, **axes):
    """Axes for ``jax.vmap`` over a batched ``KroneckerNormal``: ``axes`` maps parameter names
    (``loc``, ``covs``, ``chols``, ``evds``, ``sigma``, ``noise_factors``) to 0 or None.
    The factorization's arrays (``d.covariance``) are mapped where they carry the batch axis,
    found by building one member's distribution shapes (``jax.eval_shape``) and comparing."""

    def drop(a, core):  # one member: the leading axis dropped where there is one
        return a if a is None or jnp.ndim(a) == core else a[0]

    def first(name, value):
        if name == "evds":  # pairs: eigenvalues (..., n), eigenvectors (..., n, n)
            return [(drop(v, 1), drop(q, 2)) for v, q in value]
        if name == "noise_factors":  # a matrix entry has a Cholesky factor, a diagonal not
            chols = d.covariance.noise_chols
            return [drop(a, 1 if c is None else 2) for a, c in zip(value, chols, strict=True)]
        core = {"loc": 1, "covs": 2, "chols": 2, "sigma": 0}[name]
        return [drop(a, core) for a in value] if isinstance(value, tuple) else drop(value, core)

    one = {k: first(k, v) if axes.get(k) == 0 else v for k, v in d.get_args().items()}
    member = jax.eval_shape(lambda: KroneckerNormal(**one, validate_args=False))
    full, treedef = jax.tree.flatten(d)
    leaves = [
        0 if jnp.ndim(a) > len(b.shape) else None
        for a, b in zip(full, jax.tree.leaves(member), strict=True)
    ]
    return jax.tree.unflatten(treedef, leaves)
