r"""Incomplete grids and per-cell noise at scale, by structured iterative solves.

The observed cells ``o`` of a grid whose complete covariance is :math:`A` (any
:class:`~kronjax.KroneckerCovariance`, :math:`\otimes K_i + \sigma^2 \otimes S_i`), plus
per-cell noise variances :math:`v` (a missing cell is a cell with infinite noise, so it
drops out):

.. math::
    C = A_{oo} + \operatorname{diag}(v_o), \qquad
    \log p(y_o) = -\tfrac12 r_o^\top C^{-1} r_o - \tfrac12 \log\det C
                  - \tfrac{n_o}2 \log 2\pi .

Only ever applied: :math:`C x = (A \tilde x)_o + v_o x`, with :math:`\tilde x` the
zero-filled grid, :math:`O(N \sum_i n_i)`. Never an :math:`N \times N`, :math:`m \times N`
or :math:`n_o \times n_o` array; memory :math:`O(N \cdot \text{probes})`.

* **Solves**: preconditioned conjugate gradients. The preconditioner is the exact
  complete-grid inverse restricted to the observed cells, :math:`(A + cI)^{-1}_{oo}` (with
  :math:`c` the mean observed per-cell noise when :math:`A` has an eigen route): since
  :math:`(A_{oo})^{-1} = (A^{-1})_{oo} - (A^{-1})_{om} ((A^{-1})_{mm})^{-1} (A^{-1})_{mo}`,
  it differs from :math:`C^{-1}` by a term of rank at most m.
* **Log determinant**: stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017): for each
  Rademacher probe :math:`z`, ``lanczos_steps`` Lanczos steps on :math:`C` give
  :math:`z^\top \log(C) z \approx \|z\|^2 \sum_k \tau_k^2 \log\theta_k`. The Lanczos
  tridiagonal is read off unpreconditioned conjugate gradients on :math:`C w = z` (mBCG,
  Gardner et al. 2018), so one loop over the probes gives the quadrature and the solves the
  gradient needs. With ``probes >= n_o`` the probes are the unit vectors, so the trace is
  exact (and with ``lanczos_steps >= n_o`` so is each quadrature): a deterministic exact
  mode for small problems.
* **Gradients**: one custom JVP for the whole log density: the quadratic term from the
  solve :math:`\alpha` already made (:math:`d(r^\top C^{-1} r) = 2\alpha^\top dr -
  \alpha^\top dC\,\alpha`), the log determinant by Hutchinson with the same probes,
  :math:`\partial \log\det C = \operatorname{tr}(C^{-1} \partial C) \approx \tfrac1s
  \sum_j (C^{-1} z_j)^\top \partial C\, z_j`, the :math:`C^{-1} z_j` being the quadrature's
  conjugate-gradient iterates, run on to ``probe_tol``. Second derivatives are refused.
  ``solve`` (prediction, imputation) is a ``lax.custom_linear_solve``: implicit
  derivatives of every order.

Everything is a fixed function of the parameters and the probes (drawn once from ``key``),
so NUTS and optax see one deterministic target.

References: Wilson & Nickisch (2015), Flaxman et al. (2015), *Fast Kronecker inference in
Gaussian processes with non-Gaussian likelihoods*; Ubaru, Chen & Saad (2017), *Fast
estimation of tr(f(A)) via stochastic Lanczos quadrature*; Gardner et al. (2018),
*GPyTorch*; Wilson et al. (2020), *Efficiently sampling functions from Gaussian process
posteriors* (pathwise conditioning).
"""

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.distributions import Distribution, constraints
from numpyro.distributions.util import validate_sample
from numpyro.util import not_jax_tracer

from kronjax import lapack, linalg
from kronjax.covariance import EigenCovariance
from kronjax.eigenbasis import refuse_derivative
from kronjax.marginal import observed_indices

__all__ = ["IterativeMarginal", "SolverInfo"]

_LOG_2PI = math.log(2 * math.pi)


class SolverInfo(NamedTuple):
    """Convergence of one conjugate-gradient solve: iterations run and the largest final
    relative residual :math:`\\|Cx - b\\| / \\|b\\|` over the batch; from
    :meth:`IterativeMarginal.solver_info` also the log-determinant estimate and its change
    between ``lanczos_steps // 2`` and ``lanczos_steps`` Lanczos steps (nats, largest over
    the batch): the Gauss rule converges geometrically, so a change of more than about the
    probes' spread says the quadrature is still biased (raise ``lanczos_steps``)."""

    iterations: jax.Array
    residual: jax.Array
    logdet: jax.Array | None = None
    logdet_change: jax.Array | None = None


class _Config(NamedTuple):  # static: hashable, part of the jitted program
    observed: tuple[int, ...]
    size: int
    tol: float
    max_iters: int
    lanczos_steps: int
    exact_trace: bool
    probe_tol: float


def _fill(cfg, x):
    obs = np.asarray(cfg.observed)
    return jnp.zeros(x.shape[:-1] + (cfg.size,), x.dtype).at[..., obs].set(x)


def _observed_matvec(cfg, cov, noise_o):
    """:math:`x \\mapsto (A \\tilde x)_o + v_o x`, differentiable in ``cov`` and ``noise_o``."""
    obs = np.asarray(cfg.observed)

    def matvec(x):
        out = cov.matvec(_fill(cfg, x))[..., obs]
        return out if noise_o is None else out + noise_o * x

    return matvec


def _preconditioner(cfg, cov, noise_o):
    r""":math:`x \mapsto ((A + cI)^{-1} \tilde x)_o`, the parameters held constant."""
    cov, noise_o = jax.lax.stop_gradient((cov, noise_o))
    obs = np.asarray(cfg.observed)
    if noise_o is not None and isinstance(cov, EigenCovariance):
        shift = jnp.mean(noise_o, -1)
        sigma = jnp.sqrt(cov.sigma2() + shift)
        cov = EigenCovariance(cov.eigvals, cov.eigvecs, sigma)
    return lambda x: cov.solve(_fill(cfg, x))[..., obs]


def _dot(a, b):
    return jnp.sum(a * b, -1, keepdims=True)


def _pcg(cfg, matvec, precond, b):
    """Preconditioned conjugate gradients for all leading dims at once; stops when every
    relative residual is below ``tol`` or after ``max_iters``. Returns ``(x, SolverInfo)``."""
    bnorm = jnp.sqrt(_dot(b, b))
    bnorm = jnp.where(bnorm > 0, bnorm, 1)

    def residual(r):
        return jnp.max(jnp.sqrt(_dot(r, r)) / bnorm)

    def cond(state):
        k, _, r, _, _ = state
        return (k < cfg.max_iters) & (residual(r) > cfg.tol)

    def body(state):
        k, x, r, p, rz = state
        ap = matvec(p)
        pap = _dot(p, ap)
        a = jnp.where(pap > 0, rz / jnp.where(pap > 0, pap, 1), 0)
        x, r = x + a * p, r - a * ap
        z = precond(r)
        rz_new = _dot(r, z)
        beta = jnp.where(rz > 0, rz_new / jnp.where(rz > 0, rz, 1), 0)
        return k + 1, x, r, z + beta * p, rz_new

    z = precond(b)
    state = (jnp.zeros((), jnp.int32), jnp.zeros_like(b), b, z, _dot(b, z))
    k, x, r, _, _ = jax.lax.while_loop(cond, body, state)
    return x, SolverInfo(k, residual(r))


def _solve(cfg, cov, noise_o, b):
    """:math:`C^{-1} b`, derivatives by implicit differentiation (every order)."""
    matvec = _observed_matvec(cfg, cov, noise_o)
    precond = _preconditioner(cfg, cov, noise_o)
    return jax.lax.custom_linear_solve(
        matvec, b, lambda mv, rhs: _pcg(cfg, mv, precond, rhs)[0], symmetric=True
    )


class _Krylov(NamedTuple):
    """Unpreconditioned conjugate gradients from each probe: the Lanczos tridiagonals
    (``diag``, ``off``: ``lanczos_steps`` entries), ``|z|``, the iterates ``x`` and
    :class:`SolverInfo` of the solves."""

    diag: jax.Array
    off: jax.Array
    znorm: jax.Array
    x: jax.Array
    info: SolverInfo


def _cg_lanczos(cfg, matvec, z, solve_tol=None):
    r"""Conjugate gradients on :math:`C x = z` from :math:`x_0 = 0`, all probes at once, whose
    coefficients are the Lanczos tridiagonal of :math:`C` from :math:`z / \|z\|` (mBCG,
    Gardner et al. 2018): with step lengths :math:`a_k` and :math:`b_k = \|r_{k+1}\|^2 /
    \|r_k\|^2`, :math:`T_{kk} = 1/a_k + b_{k-1}/a_{k-1}`, :math:`T_{k,k+1} = \sqrt{b_k}/a_k`.
    One loop gives the quadrature (the first ``lanczos_steps`` steps) and the solves
    :math:`C^{-1} z` of the gradient's trace estimate: it runs ``lanczos_steps`` steps, and
    on to relative residual ``solve_tol`` (at most ``max_iters``) when that is given.

    A probe whose residual falls below machine precision has spanned its Krylov space: its
    later steps decouple (diagonal 1, coupling 0), adding nothing to the quadrature."""
    steps = cfg.lanczos_steps
    eps2 = jnp.finfo(z.dtype).eps ** 2
    rr0 = _dot(z, z)
    rr0 = jnp.where(rr0 > 0, rr0, 1)
    lead = z.shape[:-1]

    def residual(rr):
        return jnp.max(jnp.sqrt(rr / rr0))

    def cond(state):
        k, _, _, _, rr, active, *_ = state
        more = k < steps
        if solve_tol is not None:
            more = more | ((k < cfg.max_iters) & (residual(rr) > solve_tol))
        return more & jnp.any(active)

    def body(state):
        k, x, r, p, rr, active, diag, off, carry = state
        ap = matvec(p)
        pap = _dot(p, ap)
        active = active & (pap > 0)
        a = jnp.where(active, rr / jnp.where(active, pap, 1), 0)
        x, r = x + a * p, r - a * ap
        rr_new = _dot(r, r)
        b = jnp.where(active, rr_new / rr, 0)
        next_active = active & (rr_new > eps2 * rr0)
        safe_a = jnp.where(active, a, 1)
        t_diag = jnp.where(active, 1 / safe_a + carry, 1)[..., 0]
        t_off = jnp.where(next_active, jnp.sqrt(b) / safe_a, 0)[..., 0]
        idx = jnp.minimum(k, steps - 1)
        record = k < steps
        diag = jnp.where(record, diag.at[..., idx].set(t_diag), diag)
        off = jnp.where(record, off.at[..., idx].set(t_off), off)
        p = jnp.where(next_active, r + b * p, p)
        return k + 1, x, r, p, rr_new, next_active, diag, off, b / safe_a

    state = (
        jnp.zeros((), jnp.int32),
        jnp.zeros_like(z),
        z,
        z,
        rr0,
        _dot(z, z) > 0,
        jnp.ones(lead + (steps,), z.dtype),
        jnp.zeros(lead + (steps,), z.dtype),
        jnp.zeros_like(rr0),
    )
    k, x, _, _, rr, _, diag, off, _ = jax.lax.while_loop(cond, body, state)
    return _Krylov(diag, off, jnp.sqrt(rr0)[..., 0], x, SolverInfo(k, residual(rr)))


def _gauss_logquad(krylov, steps: int):
    r""":math:`z^\top \log(C) z \approx \|z\|^2 \sum_k \tau_k^2 \log\theta_k` from the
    leading ``steps`` Lanczos coefficients (the ``steps``-point Gauss rule)."""
    alphas, betas, znorm = krylov.diag[..., :steps], krylov.off[..., : steps - 1], krylov.znorm
    # a probe that spanned its Krylov space decouples (diagonal 1, coupling 0): eigenvalue 1,
    # log 1 = 0 and weight 0 on e_1, so those steps do not contribute.
    tri = jnp.zeros(alphas.shape + (steps,), alphas.dtype)
    idx = np.arange(steps)
    tri = tri.at[..., idx, idx].set(alphas)
    tri = tri.at[..., idx[:-1], idx[1:]].set(betas).at[..., idx[1:], idx[:-1]].set(betas)
    theta, u = lapack.eigh(tri)
    weights = u[..., 0, :] ** 2
    logs = jnp.log(jnp.where(theta > 0, theta, 1))
    return znorm**2 * jnp.sum(jnp.where(weights > 0, weights * logs, 0), -1)


def _trace_scale(cfg, probes):
    return 1.0 if cfg.exact_trace else 1.0 / probes.shape[0]


def _log_density_value(cfg, cov, noise_o, probes, r, solve_tol=None):
    """The log density, :math:`\alpha = C^{-1} r` and the probes' :class:`_Krylov` (their
    solves to ``solve_tol`` when given)."""
    matvec = _observed_matvec(cfg, cov, noise_o)
    alpha, _ = _pcg(cfg, matvec, _preconditioner(cfg, cov, noise_o), r)
    krylov = _cg_lanczos(cfg, matvec, probes, solve_tol)
    logdet = _trace_scale(cfg, probes) * jnp.sum(_gauss_logquad(krylov, cfg.lanczos_steps), 0)
    value = -0.5 * (jnp.sum(r * alpha, -1) + logdet + r.shape[-1] * _LOG_2PI)
    return value, alpha, krylov


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def _log_density(cfg, cov, noise_o, probes, r):
    r""":math:`-\tfrac12 (r^\top C^{-1} r + \log\det C + n_o \log 2\pi)`: the solve to
    ``tol``, the log determinant by stochastic Lanczos quadrature over ``probes``."""
    return _log_density_value(cfg, cov, noise_o, probes, r)[0]


@_log_density.defjvp
def _log_density_jvp(cfg, primals, tangents):
    r"""With :math:`\alpha = C^{-1} r` and :math:`w_j = C^{-1} z_j` (the quadrature's own
    conjugate-gradient iterates, run on to ``probe_tol``):
    :math:`d\log p = -\alpha^\top dr + \tfrac12 \alpha^\top dC\,\alpha
    - \tfrac12 \cdot \tfrac1s \sum_j w_j^\top dC\, z_j`; one differentiated matvec for
    all of them."""
    cov, noise_o, probes, r = primals
    dcov, dnoise, _, dr = tangents
    refuse_derivative((cov, noise_o), "a second derivative of the iterative marginal")
    solve_tol = cfg.tol if cfg.exact_trace else max(cfg.tol, cfg.probe_tol)
    value, alpha, krylov = _log_density_value(cfg, cov, noise_o, probes, r, solve_tol)
    alpha, w = jax.lax.stop_gradient((alpha, krylov.x))
    lead = jnp.concatenate([alpha[None], probes])  # one differentiated matvec for all

    def apply(c, n):
        return _observed_matvec(cfg, c, n)(lead)

    _, dc_lead = jax.jvp(apply, (cov, noise_o), (dcov, dnoise))
    quad_dot = jnp.sum(alpha * dc_lead[0], -1)
    logdet_dot = _trace_scale(cfg, probes) * jnp.sum(w * dc_lead[1:], (0, -1))
    return value, -jnp.sum(alpha * dr, -1) + 0.5 * quad_dot - 0.5 * logdet_dot


def _probes(key, count, shape, dtype, n_obs):
    """Rademacher probes ``(count, *shape, n_obs)``, or the unit vectors when
    ``count >= n_obs`` (the exact trace)."""
    if count >= n_obs:
        eye = jnp.eye(n_obs, dtype=dtype).reshape((n_obs,) + (1,) * len(shape) + (n_obs,))
        return jnp.broadcast_to(eye, (n_obs, *shape, n_obs)), True
    signs = jax.random.rademacher(key, (count, *shape, n_obs), dtype=dtype)
    return signs, False


class IterativeMarginal(Distribution):
    r"""The marginal of a :class:`~kronjax.KroneckerNormal` at the observed cells, with
    optional per-cell noise, by structured iterative solves (see the module docstring).

    Built by ``dist.marginal(observed, method="iterative", ...)``; ``event_shape ==
    (n_obs,)`` in the order of ``observed``. Per ``log_prob``: about
    ``2 × iterations`` (the preconditioned solve) ``+ probes × max(lanczos_steps, probe
    iterations)`` applications of the complete-grid operator, :math:`O(N \sum_i n_i)`
    each. The log determinant (and its gradient) is a
    stochastic estimate with a fixed seed; the quadratic term is exact to ``tol``.

    Args:
        base: the complete-grid ``KroneckerNormal``.
        observed: concrete boolean mask ``(N,)`` or unique flat indices; ``None`` for all.
        cell_noise: optional per-cell noise variances ``(..., N)``, non-negative, added to
            the observed cells (heteroscedastic or known measurement noise).
        tol: relative residual at which conjugate gradients stop.
        max_iters: most conjugate-gradient iterations.
        probes: Rademacher probes for the log determinant; at least ``n_obs`` means the unit
            vectors (exact trace, deterministic).
        lanczos_steps: Lanczos steps per probe (capped at ``n_obs``). Too few bias the log
            determinant upward, the Gauss rule's error decaying like
            :math:`((\sqrt\kappa - 1)/(\sqrt\kappa + 1))^{2k}`; measured
            (``bench/LANCZOS_STEPS.md``), about :math:`0.4\sqrt\kappa` steps bring the bias
            below the 16-probe spread. :math:`\kappa(C) \le \kappa(A)` =
            ``base.condition_number()`` (interlacing), so the default 100 suits
            :math:`\kappa \lesssim 6 \times 10^4`; raise it for a smaller ``sigma``.
        probe_tol: relative residual of the probe solves of the gradient's trace
            estimate (never tighter than needed: at 1e-2 their error was under a tenth of
            the estimate's spread over seeds on 128×128; in the exact mode ``tol`` is used).
        key: the probes' seed (an int or a PRNG key).
    """

    arg_constraints = {"base": constraints.dependent(is_discrete=False)}
    support = constraints.real_vector
    reparametrized_params = ["base", "cell_noise"]
    pytree_data_fields = ("base", "cell_noise", "probes")
    pytree_aux_fields = ("config",)

    def __init__(
        self,
        base,
        observed=None,
        *,
        cell_noise=None,
        tol: float = 1e-6,
        max_iters: int = 1000,
        probes: int = 16,
        lanczos_steps: int = 100,
        probe_tol: float = 1e-2,
        key=0,
        validate_args: bool | None = None,
    ):
        n = base.event_shape[0]
        obs = np.arange(n) if observed is None else observed_indices(observed, n)
        for name, value in (("probes", probes), ("lanczos_steps", lanczos_steps)):
            if int(value) < 1:
                raise ValueError(f"IterativeMarginal: {name} = {value}; expected at least 1")
        if not (0 < tol < 1 and 0 < probe_tol < 1) or int(max_iters) < 1:
            raise ValueError(
                f"IterativeMarginal: tol = {tol}, probe_tol = {probe_tol}, max_iters = "
                f"{max_iters}; expected 0 < tol, probe_tol < 1 and max_iters >= 1"
            )
        batch = base.batch_shape
        if cell_noise is not None:
            if not_jax_tracer(cell_noise):
                host = np.asarray(cell_noise)
                if not np.all((host >= 0) & np.isfinite(host)):
                    raise ValueError(
                        "IterativeMarginal: cell_noise must be finite and non-negative "
                        "(variances; leave a missing cell out of observed rather than give it "
                        "infinite noise)"
                    )
            cell_noise = jnp.asarray(cell_noise, base.loc.dtype)
            if cell_noise.ndim == 0 or cell_noise.shape[-1] != n:
                raise ValueError(
                    f"IterativeMarginal: cell_noise has shape {cell_noise.shape}; expected "
                    f"(..., {n}), one variance per grid cell"
                )
            batch = jnp.broadcast_shapes(batch, cell_noise.shape[:-1])
        key = jax.random.PRNGKey(key) if isinstance(key, int) else key
        self.probes, exact = _probes(key, int(probes), batch, base.loc.dtype, obs.size)
        self.base, self.cell_noise = base, cell_noise
        steps = min(int(lanczos_steps), obs.size)
        self.config = _Config(
            tuple(obs.tolist()), n, float(tol), int(max_iters), steps, exact, float(probe_tol)
        )
        super().__init__(batch, (obs.size,), validate_args=validate_args)

    @property
    def observed(self) -> tuple[int, ...]:
        return self.config.observed

    def _noise_o(self):
        if self.cell_noise is None:
            return None
        return self.cell_noise[..., np.asarray(self.observed)]

    def _residual(self, value) -> jax.Array:
        r""":math:`y_o - \mu_o`, broadcast to the batch shape (the solves need one shape)."""
        r = jnp.asarray(value) - self.base.loc[..., np.asarray(self.observed)]
        return jnp.broadcast_to(
            r, jnp.broadcast_shapes(r.shape, self.batch_shape + self.event_shape)
        )

    def solve(self, b: jax.Array) -> jax.Array:
        r""":math:`C^{-1} b` for ``b`` ``(..., n_obs)``, differentiable (implicitly)."""
        return _solve(self.config, self.base.covariance, self._noise_o(), b)

    def solver_info(self, value: jax.Array) -> SolverInfo:
        """Iterations and final relative residual of the solve that ``log_prob(value)`` runs,
        and the log-determinant estimate with its change over the last half of the Lanczos
        steps (:class:`SolverInfo`)."""
        cov, noise_o = self.base.covariance, self._noise_o()
        r = self._residual(value)
        cfg = self.config
        matvec = _observed_matvec(cfg, cov, noise_o)
        info = _pcg(cfg, matvec, _preconditioner(cfg, cov, noise_o), r)[1]
        krylov = _cg_lanczos(cfg, matvec, self.probes)
        scale = _trace_scale(cfg, self.probes)
        full, half = (
            scale * jnp.sum(_gauss_logquad(krylov, k), 0)
            for k in (cfg.lanczos_steps, max(cfg.lanczos_steps // 2, 1))
        )
        return info._replace(logdet=full, logdet_change=jnp.max(jnp.abs(full - half)))

    @validate_sample
    def log_prob(self, value) -> jax.Array:
        value = jnp.asarray(value)
        n_obs = self.event_shape[0]
        if value.ndim == 0 or value.shape[-1] != n_obs:
            raise ValueError(
                f"IterativeMarginal.log_prob: value has shape {value.shape}; expected "
                f"(..., {n_obs}), one entry per observed cell"
            )
        self.base.check_conditioning("the iterative marginal")
        r = self._residual(value)
        return _log_density(self.config, self.base.covariance, self._noise_o(), self.probes, r)

    def sample(self, key, sample_shape=()) -> jax.Array:
        """The complete grid from ``base`` at the observed cells, plus the per-cell noise."""
        k1, k2 = jax.random.split(key)
        x = self.base.sample(k1, sample_shape)[..., np.asarray(self.observed)]
        noise_o = self._noise_o()
        if noise_o is None:
            return x
        eps = jax.random.normal(k2, x.shape, x.dtype)
        return x + jnp.sqrt(noise_o) * eps

    @property
    def mean(self) -> jax.Array:
        return jnp.broadcast_to(
            self.base.mean[..., np.asarray(self.observed)], self.batch_shape + self.event_shape
        )

    @property
    def variance(self) -> jax.Array:
        var = self.base.variance[..., np.asarray(self.observed)]
        noise_o = self._noise_o()
        var = var if noise_o is None else var + noise_o
        return jnp.broadcast_to(var, self.batch_shape + self.event_shape)

    def impute(self, key, value, sample_shape=()) -> tuple[jax.Array, jax.Array]:
        r"""The posterior of the latent signal on the complete grid given ``value`` at the
        observed cells: ``(mean, draws)``, ``mean`` ``(..., N)``, ``draws``
        ``sample_shape + (..., N)``, by pathwise conditioning (Matheron's rule):

        .. math::
            f \mid y_o = f' + K P_o^\top C^{-1} \big(y_o - (f' + \varepsilon')_o\big),
            \quad f' \sim \mathcal N(\mu, K),\ \varepsilon' \sim
            \mathcal N(0, \sigma^2 \otimes S_i + \operatorname{diag} v),

        with :math:`K = \otimes K_i` the signal: one prior draw through the Kronecker roots
        and one batched solve, never a dense conditional."""
        cov, obs = self.base.covariance, np.asarray(self.observed)
        n = self.config.size
        signal = lambda x: linalg.kron_matvec(cov.factor_covs(), x)  # noqa: E731
        r = self._residual(value)
        mean = self.base.loc + signal(_fill(self.config, self.solve(r)))
        k1, k2, k3 = jax.random.split(key, 3)
        shape = tuple(sample_shape) + self.batch_shape + (n,)
        dtype = r.dtype
        prior = cov.signal_root_matvec(jax.random.normal(k1, shape, dtype))
        noise = cov.noise_root_matvec(jax.random.normal(k2, shape, dtype))[..., obs]
        noise_o = self._noise_o()
        if noise_o is not None:
            noise = noise + jnp.sqrt(noise_o) * jax.random.normal(k3, noise.shape, dtype)
        resid = r - prior[..., obs] - noise
        return mean, self.base.loc + prior + signal(_fill(self.config, self.solve(resid)))

    def predict(
        self, value, cross_covs, test_diags=None, *, pred_noise=False, grid=True, block: int = 256
    ):
        r"""Posterior mean and variance of the latent GP at test points given ``value`` at
        the observed cells (:func:`kronjax.gp.predict` on an incomplete grid).

        With :math:`k_j = ((\otimes_i K_{*i})[j])_o` the cross-covariance of test point
        j to the observed cells: :math:`m_j = k_j^\top C^{-1} r_o` (one solve, then a
        Kronecker product), :math:`v_j = \prod_i K_{**i}[j] - k_j^\top C^{-1} k_j`
        (exact: one batched solve per ``block`` test points, memory
        :math:`O(\text{block} \cdot N)` per batch member), plus :math:`\sigma^2` with
        ``pred_noise``. For very many test points, estimate the variance from
        :meth:`impute`'s draws instead. ``grid`` as in :func:`kronjax.gp.predict`. A batched
        marginal (batched factors, ``sigma`` or ``cell_noise``) gives ``(..., M)``; the
        ``cross_covs`` and ``test_diags`` are shared by the batch members."""
        obs = np.asarray(self.observed)
        kstars = [jnp.asarray(k) for k in cross_covs]
        for i, k in enumerate(kstars):
            if k.ndim != 2:
                raise ValueError(
                    f"IterativeMarginal.predict: cross_covs[{i}] has shape {k.shape}; expected "
                    "(m_i, n_i), shared by the batch members (jax.vmap for one per member)"
                )
        alpha = _fill(self.config, self.solve(self._residual(value)))
        sizes = tuple(k.shape[-1] for k in kstars)
        if grid:
            mean = linalg.kron_matvec(kstars, alpha)
            index = np.indices(tuple(k.shape[0] for k in kstars)).reshape(len(kstars), -1).T
        else:
            index = np.repeat(np.arange(kstars[0].shape[0])[:, None], len(kstars), 1)
            contract = lambda a: linalg.kron_rows_matvec(kstars, a.reshape(sizes))  # noqa: E731
            mean = jnp.vectorize(contract, signature="(n)->(p)")(alpha)
        if test_diags is None:
            return mean, None
        batch = self.batch_shape

        def one_block(idx):
            rows = linalg.kron_outer([k[idx[:, i]] for i, k in enumerate(kstars)])[..., obs]
            rows = jnp.broadcast_to(
                rows.reshape(rows.shape[:1] + (1,) * len(batch) + rows.shape[1:]),
                rows.shape[:1] + batch + rows.shape[1:],
            )
            prior = 1.0
            for i, diag in enumerate(test_diags):
                prior = prior * jnp.asarray(diag)[idx[:, i]]
            prior = prior.reshape(prior.shape + (1,) * len(batch))
            return prior - jnp.sum(rows * self.solve(rows), -1)  # (block, *batch)

        count = index.shape[0]
        pad = (-count) % block
        blocks = np.concatenate([index, index[:pad] if pad else index[:0]])
        blocks = blocks.reshape(-1, min(block, blocks.shape[0]), len(kstars))
        var = jax.lax.map(one_block, jnp.asarray(blocks))
        var = jnp.moveaxis(var.reshape((-1,) + batch)[:count], 0, -1)  # (*batch, M)
        if pred_noise:
            var = var + jnp.asarray(self.base.covariance.sigma2())[..., None]
        shape = jnp.broadcast_shapes(mean.shape, var.shape)
        return jnp.broadcast_to(mean, shape), jnp.broadcast_to(var, shape)
