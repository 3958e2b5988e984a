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
or :math:`n_o \times n_o` array; memory :math:`O(N \cdot \text{probes} + n_o r)`.

* **Preconditioner** (eigen route with ``sigma``): the r largest eigenpairs of the signal
  :math:`\otimes K_i`, known exactly from the factors' eigenpairs, at the observed cells,
  plus the diagonal noise: :math:`P = U U^\top + D`, :math:`U = (Q_r)_o \Lambda_r^{1/2}`,
  :math:`D = \operatorname{diag}(\sigma^2 + v_o)`. :math:`C - P` is the rest of the signal
  at the observed cells, PSD with norm at most :math:`\lambda_{r+1}`, so the spectrum of
  :math:`P^{-1} C` lies in :math:`[1, 1 + \lambda_{r+1} / \min D]` whatever cells are
  missing. For smooth kernels the signal has few eigenvalues above the noise (an RBF grid
  up to 512×512 (ℓ 0.2, 0.3, σ 0.1) fewer than 129 above :math:`0.001 \sigma^2`), so at
  the default r (96 to 128) P is nearly C: solves take a few iterations. :math:`P^{-1}` by Woodbury,
  :math:`\log\det P` from an r×r Cholesky, draws of covariance P as :math:`U \epsilon_1 +
  D^{1/2} \epsilon_2`. Without an eigen route with ``sigma`` (noise factors, noise-free
  Cholesky), the data solves use the complete-grid inverse restricted to the observed cells
  and the probes none (r = 0).
* **Log determinant**: :math:`\log\det C = \log\det P + \log\det(P^{-1/2} C P^{-1/2})`,
  the second term by stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017) from probes
  of covariance P: preconditioned conjugate gradients on :math:`C w = z` give the Lanczos
  tridiagonal of :math:`P^{-1/2} C P^{-1/2}` from :math:`P^{-1/2} z` (mBCG, Gardner et al.
  2018), and the same loop gives the solves the gradient needs. Near 0 with a good P, so
  its stochastic error nearly vanishes. With ``probes >= n_o`` the probes are the columns
  of the root :math:`[U, D^{1/2}]` of P, so the trace is exact (and with ``lanczos_steps
  >= n_o`` so is each quadrature): a deterministic exact mode for small problems.
* **Gradients**: one custom JVP for the whole log density: the quadratic term from the
  solve :math:`\alpha` already made (:math:`d(r^\top C^{-1} r) = 2\alpha^\top dr -
  \alpha^\top dC\,\alpha`), :math:`\operatorname{tr}(C^{-1} dC)` from the probes with a
  control variate: the part of dC in the preconditioner's eigenspace, whose trace against
  :math:`P^{-1}` is known exactly from the factors (see :func:`_log_density_jvp`), or
  plainly by the probes where P misses part of the signal. One differentiated operator
  application, for the solve and the probes. Second derivatives are refused. ``solve``
  (prediction, imputation) is a ``lax.custom_linear_solve``: implicit derivatives of every
  order.

Everything is a fixed function of the parameters and the probes (drawn once from ``key``),
so NUTS and optax see one deterministic target.

References: Wilson & Nickisch (2015), Flaxman et al. (2015), *Fast Kronecker inference in
Gaussian processes with non-Gaussian likelihoods*; Ubaru, Chen & Saad (2017), *Fast
estimation of tr(f(A)) via stochastic Lanczos quadrature*; Gardner et al. (2018),
*GPyTorch*; Wilson et al. (2020), *Efficiently sampling functions from Gaussian process
posteriors* (pathwise conditioning).
"""

import math
from functools import lru_cache, partial
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
_PRECOND_ENTRIES = 2**20  # default precond_rank: r·N up to this, at least _least_rank(N)


def _least_rank(n: int) -> int:
    """The default preconditioner rank's floor: 96 up to N = 128², then 16 more per 4× in N,
    to 128 from 512². The signal's eigenvalues grow with N (a kernel's on a denser grid of
    the same extent), so one gap needs more of them; 96 rather than 128 at 128² is 1.5×
    faster there (the n_obs × r arrays outgrow the cache at 128)."""
    return min(128, max(96, 96 + round(8 * math.log2(n / 2**14))))


class SolverInfo(NamedTuple):
    r"""Convergence of one conjugate-gradient solve: iterations run and the largest final
    relative residual :math:`\|Cx - b\| / \|b\|` over the batch; from
    :meth:`IterativeMarginal.solver_info` also the log-determinant estimate, its change
    between ``lanczos_steps // 2`` and ``lanczos_steps`` Lanczos steps (nats, largest over
    the batch: the Gauss rule converges geometrically, so a change of more than about the
    probes' spread says the quadrature is still biased; raise ``lanczos_steps``), and the
    preconditioner's gap :math:`\lambda_{r+1} / \min d` (largest over the batch): at most 1,
    the log determinant's gradient has the preconditioner's control variate and is nearly
    exact; above, it is the plain stochastic estimate (raise ``precond_rank``)."""

    iterations: jax.Array
    residual: jax.Array
    logdet: jax.Array | None = None
    logdet_change: jax.Array | None = None
    precond_gap: jax.Array | None = None


class _Config(NamedTuple):  # static: hashable, part of the jitted program
    observed: tuple[int, ...]
    size: int
    tol: float
    max_iters: int
    lanczos_steps: int
    exact_trace: bool
    probe_tol: float
    rank: int  # of the low-rank preconditioner; 0: none (the identity for the probes)


@lru_cache(maxsize=16)
def _slots(observed: tuple[int, ...], size: int) -> np.ndarray:
    """Each grid cell's position among the observed cells (``n_o`` where missing)."""
    out = np.full(size, len(observed))
    out[np.asarray(observed)] = np.arange(len(observed))
    return out


def _fill(cfg, x):
    """The observed values (last axis) zero-filled to the grid (a gather: cheaper than a
    scatter on CPU, and its transpose is the restriction's)."""
    pad = [(0, 0)] * (x.ndim - 1) + [(0, 1)]
    return jnp.take(jnp.pad(x, pad), _slots(cfg.observed, cfg.size), axis=-1)


def _observed_matvec(cfg, cov, noise_o):
    """:math:`x \\mapsto (A \\tilde x)_o + v_o x`, differentiable in ``cov`` and ``noise_o``."""
    obs = np.asarray(cfg.observed)

    def matvec(x):
        out = cov.matvec(_fill(cfg, x))[..., obs]
        return out if noise_o is None else out + noise_o * x

    return matvec


def _restricted_inverse(cfg, cov, noise_o):
    r""":math:`x \mapsto ((A + cI)^{-1} \tilde x)_o` (c the mean observed per-cell noise on
    the eigen route), the data solves' preconditioner where there is no low-rank one (noise
    factors, or no ``sigma``); the parameters held constant."""
    cov, noise_o = jax.lax.stop_gradient((cov, noise_o))
    obs = np.asarray(cfg.observed)
    if noise_o is not None and isinstance(cov, EigenCovariance):
        sigma = jnp.sqrt(cov.sigma2() + jnp.mean(noise_o, -1))
        cov = EigenCovariance(cov.eigvals, cov.eigvecs, sigma)
    return lambda x: cov.solve(_fill(cfg, x))[..., obs]


def _dot(a, b):
    return jnp.sum(a * b, -1, keepdims=True)


class _LowRank(NamedTuple):
    r""":math:`P = U U^\top + \operatorname{diag}(d)` on the observed cells, :math:`U = Y
    \Lambda^{1/2}` (:math:`Y` the top eigenvectors at the observed cells), with :math:`M = I_r
    + U^\top D^{-1} U = L L^\top`: :math:`P^{-1} x = D^{-1} x - V M^{-1} V^\top x`
    (:math:`V = D^{-1} U`, :math:`M^{-1} = L^{-\top} L^{-1}`), :math:`\log\det P = \sum \log d
    + \log\det M`, draws :math:`U \epsilon_1 + \sqrt d\, \epsilon_2` with covariance P. Rank 0
    and d = 1 is the identity."""

    d: jax.Array  # (..., n_o)
    li: jax.Array  # (..., r, r) L⁻¹
    gap: jax.Array  # (...,) λ_{r+1} / min d: the spectrum of P⁻¹C lies in [1, 1 + gap]
    y: jax.Array  # (..., n_o, r) the top eigenvectors q_k of the signal at the observed cells
    lam: jax.Array  # (..., r) their eigenvalues
    f: jax.Array  # (..., r, r) Yᵀ D⁻¹ Y
    idx: tuple  # per factor (..., r): the factor eigen indices k_i of each top eigenpair
    cols: tuple  # per factor (..., n_i, r): the factor eigenvectors q_{i k_i}

    def inv(self, x):
        """:math:`P^{-1} x = D^{-1} (x - U M^{-1} U^\top D^{-1} x)`."""
        out = x / self.d
        if self.y.shape[-1]:  # U = Y Λ^½, the Λ^½ applied on the r side
            root = jnp.sqrt(self.lam)
            t = root * jnp.einsum("...n,...nr->...r", out, self.y)
            t = jnp.einsum("...lk,...l->...k", self.li, jnp.einsum("...kl,...l->...k", self.li, t))
            out = out - jnp.einsum("...nr,...r->...n", self.y, root * t) / self.d
        return out

    def m_inv(self):
        """:math:`M^{-1}` ``(..., r, r)``."""
        return jnp.swapaxes(self.li, -1, -2) @ self.li

    def logdet(self):
        out = jnp.sum(jnp.log(self.d), -1)
        diag = jnp.diagonal(self.li, axis1=-2, axis2=-1)
        return out - 2 * jnp.sum(jnp.log(diag), -1)

    def draw(self, eps):
        r""":math:`U \epsilon_{:r} + \sqrt d\, \epsilon_{r:}` for ``eps`` ``(..., r + n_o)``."""
        r = self.y.shape[-1]
        out = jnp.sqrt(self.d) * eps[..., r:]
        if r:
            out = out + jnp.einsum("...nr,...r->...n", self.y, jnp.sqrt(self.lam) * eps[..., :r])
        return out


def _low_rank(cfg, cov, noise_o) -> _LowRank:
    r"""The preconditioner :math:`P = (Q_r \Lambda_r Q_r^\top)_{oo} + \operatorname{diag}(
    \sigma^2 + v_o)`: the r largest eigenpairs of the signal :math:`\otimes K_i` (products of
    the factors' eigenpairs, exact, from the eigen route), their eigenvectors at the
    observed cells, plus the diagonal noise. The rest of the signal has eigenvalues below
    :math:`\lambda_{r+1}`, so the spectrum of :math:`P^{-1} C` lies in
    :math:`[1, 1 + \lambda_{r+1} / \min d]` (Weyl), whatever the missing cells: for smooth
    kernels nearly the identity. Rank 0 (the identity) without an eigen route with
    ``sigma``. The parameters are held constant."""
    cov, noise_o = jax.lax.stop_gradient((cov, noise_o))
    n_o = len(cfg.observed)
    batch = (
        cov.batch_shape
        if noise_o is None
        else jnp.broadcast_shapes(cov.batch_shape, noise_o.shape[:-1])
    )
    dtype = cov.dtype
    if not cfg.rank:
        ones = jnp.ones(batch + (n_o,), dtype)
        cols, square = jnp.zeros(batch + (n_o, 0), dtype), jnp.zeros(batch + (0, 0), dtype)
        none = jnp.zeros(batch + (0,), dtype)
        return _LowRank(ones, square, jnp.full(batch, jnp.inf, dtype), cols, none, square, (), ())
    top_vals, idx = _top_eigen(cov, min(cfg.rank + 1, cfg.size), batch)
    rest = top_vals[..., cfg.rank] if cfg.rank < cfg.size else jnp.zeros_like(top_vals[..., 0])
    top_vals, idx = top_vals[..., : cfg.rank], [i[..., : cfg.rank] for i in idx]
    cols = _top_columns(cov, idx, batch)
    y = _khatri_rao(cols, cfg.observed)
    d = cov.sigma2()[..., None] if noise_o is None else cov.sigma2()[..., None] + noise_o
    d = jnp.broadcast_to(d, batch + (n_o,))
    missing = _missing(cfg.observed, cfg.size)
    eye = jnp.broadcast_to(jnp.eye(cfg.rank, dtype=dtype), batch + (cfg.rank, cfg.rank))
    if noise_o is None and missing.size < n_o:  # F = Yᵀ Y / σ² = (I - Y_mᵀ Y_m) / σ²
        y_m = _khatri_rao(cols, missing)
        f = (eye - jnp.swapaxes(y_m, -1, -2) @ y_m) / d[..., :1, None]
    else:
        f = jnp.swapaxes(y / d[..., None], -1, -2) @ y
    root = jnp.sqrt(top_vals)
    gram = root[..., :, None] * f * root[..., None, :]
    li = lapack.solve_triangular(lapack.cholesky(gram + eye), eye)
    gap = jnp.broadcast_to(rest, batch) / jnp.min(d, -1)
    return _LowRank(d, li, gap, y, top_vals, f, tuple(idx), tuple(cols))


def _top_eigen(cov, count: int, batch):
    r"""The ``count`` largest eigenvalues :math:`\prod_i \lambda_{i k_i}` of the signal (factor
    eigenvalues clipped at 0), ``(..., count)``, and per factor their eigen indices
    :math:`k_i`, ``(..., count)`` each. With each
    factor's eigenvalues sorted descending, the product at sorted positions
    :math:`(a_1, \dots, a_d)` is at most the :math:`\prod_i (a_i + 1)` products at positions
    below it, so the top ``count`` are among the positions with :math:`\prod_i (a_i + 1) \le`
    ``count`` (:func:`_staircase`, about ``count · log(count)`` of them for d = 2): never a
    length-N sort."""
    vals, idx = zip(
        *(jax.lax.top_k(jnp.maximum(v, 0), min(count, v.shape[-1])) for v in cov.eigvals)
    )
    cand = _staircase(tuple(i.shape[-1] for i in idx), count)  # (d, candidates), static
    prods = math.prod(jnp.take(v, c, axis=-1) for v, c in zip(vals, cand, strict=True))
    top_vals, pos = jax.lax.top_k(prods, count)
    top_vals, pos = (jnp.broadcast_to(t, batch + (count,)) for t in (top_vals, pos))
    return top_vals, [
        jnp.take_along_axis(jnp.broadcast_to(i, batch + i.shape[-1:]), jnp.asarray(c)[pos], -1)
        for i, c in zip(idx, cand, strict=True)
    ]


@lru_cache(maxsize=16)
def _missing(observed: tuple[int, ...], size: int) -> np.ndarray:
    """The flat indices of the cells not observed, ascending."""
    return np.setdiff1d(np.arange(size), observed)


@lru_cache(maxsize=16)
def _coordinates(observed: tuple[int, ...], sizes: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    """Each observed cell's index along each factor's axis (row-major flattening)."""
    return np.unravel_index(np.asarray(observed), sizes)


@lru_cache(maxsize=16)
def _staircase(sizes: tuple[int, ...], count: int) -> np.ndarray:
    """Every position tuple ``a`` with ``a_i < sizes[i]`` and ``prod(a_i + 1) <= count``,
    ``(d, candidates)``."""
    out = [()]
    for n in sizes:
        out = [
            t + (a,)
            for t in out
            for a in range(n)
            if math.prod(x + 1 for x in t) * (a + 1) <= count
        ]
    return np.asarray(out, dtype=np.int32).T


def _top_columns(cov, idx, batch):
    """The factors' eigenvectors :math:`q_{i k_i}` of each top eigen index, ``(..., n_i, r)``:
    products with one-hot selections, so later gathers read a plain array (a gather of a
    gather fuses into a slow chain on CPU)."""
    out = []
    for q, i, n in zip(cov.eigvecs, idx, cov.factor_sizes, strict=True):
        pick = (jnp.arange(n)[:, None] == i[..., None, :]).astype(q.dtype)  # (..., n_i, r)
        out.append(q @ pick)
    return out


def _khatri_rao(cols, cells):
    r"""Column-wise Kronecker products :math:`\otimes_i q_{i k_i}` at the flat grid ``cells``
    (static), ``(..., cells, r)``: a row gather from the grid of products, which XLA fuses
    into one pass (the grid itself is never stored)."""
    out = cols[0]
    for c in cols[1:]:
        out = (out[..., :, None, :] * c[..., None, :, :]).reshape(
            out.shape[:-2] + (-1, out.shape[-1])
        )
    return jnp.take(out, np.asarray(cells), axis=-2)


def _data_preconditioner(cfg, cov, noise_o, low_rank: _LowRank):
    """The preconditioner of the solves with data: the low-rank one, or the restricted
    complete-grid inverse where there is none."""
    return low_rank.inv if cfg.rank else _restricted_inverse(cfg, cov, noise_o)


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
    precond = _data_preconditioner(cfg, cov, noise_o, _low_rank(cfg, cov, noise_o))
    return jax.lax.custom_linear_solve(
        matvec, b, lambda mv, rhs: _pcg(cfg, mv, precond, rhs)[0], symmetric=True
    )


class _Krylov(NamedTuple):
    """Preconditioned conjugate gradients from each probe: the Lanczos tridiagonals
    (``diag``, ``off``: ``lanczos_steps`` entries), :math:`\\|z\\|_{P^{-1}}`, the iterates
    ``x`` and :class:`SolverInfo` of the solves."""

    diag: jax.Array
    off: jax.Array
    znorm: jax.Array
    x: jax.Array
    pz: jax.Array  # P⁻¹z, the first preconditioned residual
    info: SolverInfo


def _cg_lanczos(cfg, matvec, precond, z, solve_tol=None):
    r"""Preconditioned conjugate gradients on :math:`C x = z` from :math:`x_0 = 0`, all probes
    at once, whose coefficients are the Lanczos tridiagonal of :math:`P^{-1/2} C P^{-1/2}`
    from :math:`P^{-1/2} z / \|z\|_{P^{-1}}` (mBCG, Gardner et al. 2018): with step lengths
    :math:`a_k` and :math:`b_k = r_{k+1}^\top P^{-1} r_{k+1} / r_k^\top P^{-1} r_k`,
    :math:`T_{kk} = 1/a_k + b_{k-1}/a_{k-1}`, :math:`T_{k,k+1} = \sqrt{b_k}/a_k`.
    One loop gives the quadrature (the first ``lanczos_steps`` steps) and the solves
    :math:`C^{-1} z` of the gradient: it runs ``lanczos_steps`` steps, and on to relative
    residual ``solve_tol`` (at most ``max_iters``) when that is given.

    A probe whose relative preconditioned residual falls below ``min(tol, probe_tol)``
    (machine precision at least) is done: its later steps decouple (diagonal 1, coupling 0).
    What its Gauss rule misses is of the order of that residual squared (1e-12 of the
    probe's norm at the default ``tol``), and its solve is as accurate as the data's."""
    steps = cfg.lanczos_steps
    stop = max(min(cfg.tol, cfg.probe_tol), float(jnp.finfo(z.dtype).eps))
    eps2 = stop**2  # squared: rz is a squared norm
    zz = _dot(z, z)
    zz = jnp.where(zz > 0, zz, 1)
    pz = precond(z)
    rz0 = _dot(z, pz)

    def residual(r):
        return jnp.max(jnp.sqrt(_dot(r, r) / zz))

    def cond(state):
        k, _, r, _, _, active, *_ = state
        more = k < steps
        if solve_tol is not None:
            more = more | ((k < cfg.max_iters) & (residual(r) > solve_tol))
        return more & jnp.any(active)

    def body(state):
        k, x, r, p, rz, active, diag, off, carry = state
        ap = matvec(p)
        pap = _dot(p, ap)
        active = active & (pap > 0)
        a = jnp.where(active, rz / jnp.where(active, pap, 1), 0)
        x, r = x + a * p, r - a * ap
        pr = precond(r)
        rz_new = _dot(r, pr)
        b = jnp.where(active, rz_new / jnp.where(active, rz, 1), 0)
        next_active = active & (rz_new > eps2 * rz0)
        safe_a = jnp.where(active, a, 1)
        t_diag = jnp.where(active, 1 / safe_a + carry, 1)[..., 0]
        t_off = jnp.where(next_active, jnp.sqrt(jnp.maximum(b, 0)) / safe_a, 0)[..., 0]
        idx = jnp.minimum(k, steps - 1)
        record = k < steps
        diag = jnp.where(record, diag.at[..., idx].set(t_diag), diag)
        off = jnp.where(record, off.at[..., idx].set(t_off), off)
        p = jnp.where(next_active, pr + b * p, p)
        return k + 1, x, r, p, rz_new, next_active, diag, off, b / safe_a

    lead = z.shape[:-1]
    state = (
        jnp.zeros((), jnp.int32),
        jnp.zeros_like(z),
        z,
        pz,
        rz0,
        rz0 > 0,
        jnp.ones(lead + (steps,), z.dtype),
        jnp.zeros(lead + (steps,), z.dtype),
        jnp.zeros_like(rz0),
    )
    k, x, r, _, _, _, diag, off, _ = jax.lax.while_loop(cond, body, state)
    znorm = jnp.sqrt(jnp.maximum(rz0, 0))[..., 0]
    return _Krylov(diag, off, znorm, x, pz, SolverInfo(k, residual(r)))


def _gauss_logquad(krylov, steps: int):
    r""":math:`u^\top \log(X) u \approx \|u\|^2 \sum_k \tau_k^2 \log\theta_k` from the
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


class _Parts(NamedTuple):
    value: jax.Array
    alpha: jax.Array
    info: SolverInfo
    precond: _LowRank
    krylov: _Krylov


def _log_density_parts(cfg, cov, noise_o, eps, r, solve_tol=None):
    r"""The log density with what its derivative reuses: :math:`\alpha = C^{-1} r`, the
    preconditioner P and the :class:`_Krylov` of the probes drawn from ``eps`` with
    covariance P (their solves to ``solve_tol`` when given). :math:`\log\det C = \log\det P +
    \log\det(P^{-1/2} C P^{-1/2})`, the second term by quadrature (near 0 for a good P)."""
    matvec = _observed_matvec(cfg, cov, noise_o)
    precond = _low_rank(cfg, cov, noise_o)
    alpha, info = _pcg(cfg, matvec, _data_preconditioner(cfg, cov, noise_o, precond), r)
    krylov = _cg_lanczos(cfg, matvec, precond.inv, precond.draw(eps), solve_tol)
    quads = _gauss_logquad(krylov, cfg.lanczos_steps)
    logdet = precond.logdet() + _trace_scale(cfg, eps) * jnp.sum(quads, 0)
    value = -0.5 * (jnp.sum(r * alpha, -1) + logdet + r.shape[-1] * _LOG_2PI)
    return _Parts(value, alpha, info, precond, krylov)


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def _log_density(cfg, cov, noise_o, eps, r):
    r""":math:`-\tfrac12 (r^\top C^{-1} r + \log\det C + n_o \log 2\pi)`: the solve to
    ``tol``, the log determinant by preconditioned stochastic Lanczos quadrature."""
    return _log_density_parts(cfg, cov, noise_o, eps, r).value


def _trace_control(cfg, cov, pre: _LowRank, p, scale, uniform: bool):
    r"""The exact part of the gradient's trace: :math:`\operatorname{tr}(\tilde P X)` with
    :math:`\tilde P = P^{-1} - \hat S`, :math:`\hat S = \text{scale} \sum_j p_j p_j^\top`
    (the probes' estimate of :math:`P^{-1}`, :math:`E[p p^\top] = P^{-1}`) and X the part of
    :math:`dC` that P captures: with :math:`\Pi = Q_r Q_r^\top` the top eigenspace,

    .. math::
        X = (dK\,\Pi + \Pi\, dK - \Pi\, dK\, \Pi)_{oo} + dD, \qquad
        dC - X = (\Pi_\perp dK\, \Pi_\perp)_{oo},

    small where the rest of the signal is. Linear in the tangents :math:`dK_i` (of the
    factors) and :math:`dd` (of :math:`\sigma^2 + v_o`):
    :math:`\sum_i \langle dK_i, H_i \rangle + \langle dd, \operatorname{diag} \tilde P\rangle`.
    Since :math:`dK\, q_k = \sum_i w_{ik}\, q_{1 k_1} \otimes \dots \otimes dK_i q_{i k_i}
    \otimes \dots` (:math:`w_{ik} = \prod_{j \ne i} \lambda_{j k_j}`), and with
    :math:`B = \tilde P Y`, :math:`Z_{ik}[x] = \sum_{c:\, c_i = x} B_{ck} \prod_{j \ne i}
    q_{j k_j}[c_j]` over the observed cells c (a segment sum), :math:`F = Y^\top \tilde P Y`,
    :math:`\hat q_{ik} = q_{i k_i}`:

    .. math::
        H_i = 2 \textstyle\sum_k w_{ik} Z_{ik} \hat q_{ik}^\top - \sum_{k k'} w_{ik}
        [k_j = k'_j\ \forall j \ne i]\, F_{k k'}\, \hat q_{ik} \hat q_{ik'}^\top .

    Returns the :math:`H_i` and :math:`\operatorname{diag}\tilde P` (its trace where the
    noise is ``uniform``: no per-cell noise), all held constant:
    :math:`O(n_o r^2 + d^2 n_o r)` once, then :math:`O(\sum_i n_i^2)` per tangent."""
    cov, pre, p = jax.lax.stop_gradient((cov, pre, p))
    y, d, f, lam = pre.y, pre.d, pre.f, pre.lam
    root = jnp.sqrt(lam)
    a = root[..., :, None] * pre.m_inv() * root[..., None, :]  # Λ^½ M⁻¹ Λ^½: P⁻¹ = D⁻¹ - D⁻¹YAYᵀD⁻¹
    pty = jnp.einsum("j...n,...nr->j...r", p, y)
    ftil = f - f @ a @ f - scale * jnp.einsum("j...k,j...l->...kl", pty, pty)  # YᵀP̃Y
    if uniform:  # dd is one number per batch member: only the trace of P̃ is needed
        tr_pinv = jnp.sum(1 / d, -1) - jnp.sum(a * f, (-2, -1)) / d[..., 0]
        dvec = (tr_pinv - scale * jnp.sum(p * p, (0, -1)))[..., None]
    else:
        dvec = 1 / d - jnp.sum((y @ a) * y, -1) / d**2 - scale * jnp.sum(p * p, 0)  # diag P̃
    batch, sizes, ndim = d.shape[:-1], cov.factor_sizes, len(cov.factor_sizes)
    idx, cols = pre.idx, pre.cols
    same = [  # [k_j = k'_j for every j ≠ i], (..., r, r) per factor i
        math.prod(
            (idx[j][..., :, None] == idx[j][..., None, :] for j in range(ndim) if j != i),
            start=jnp.ones(batch + (cfg.rank, cfg.rank), bool),
        )
        for i in range(ndim)
    ]
    # Z = Z(P⁻¹Y) - Z(ŜY), P⁻¹Y = D⁻¹ Y G
    g = jnp.eye(cfg.rank, dtype=y.dtype) - a @ f
    shat_y = scale * jnp.einsum("j...n,j...r->...nr", p, pty)
    missing = _missing(cfg.observed, cfg.size)
    if uniform and missing.size < len(cfg.observed):
        # over the whole grid, Σ_{c: c_i = x} q_{k'}[c] Π_{j≠i} q_{j k_j}[c_j] = q_{i k'_i}[x]
        # [k'_j = k_j, j ≠ i] (orthonormal factor eigenvectors): only the missing cells'
        # rows are summed, O(m r²), as for F
        y_m = _khatri_rao(cols, missing)
        zs = [
            (c @ (s * g) - zm) / d[..., :1, None] - zo
            for c, s, zm, zo in zip(
                cols,
                same,
                _axis_sums(cols, sizes, missing, y_m @ g),
                _axis_sums(cols, sizes, cfg.observed, shat_y),
                strict=True,
            )
        ]
    else:
        zs = _axis_sums(cols, sizes, cfg.observed, (y @ g) / d[..., None] - shat_y)
    lams = [  # λ_{j k_j} of each top eigenpair, (..., r) per factor
        jnp.take_along_axis(jnp.broadcast_to(v, batch + (n,)), i, axis=-1)
        for v, i, n in zip(cov.eigvals, idx, sizes, strict=True)
    ]
    out = []
    for i in range(ndim):
        w = math.prod((lams[j] for j in range(ndim) if j != i), start=jnp.ones_like(lam))
        h = 2 * (zs[i] * w[..., None, :]) @ jnp.swapaxes(cols[i], -1, -2)
        h = h - cols[i] @ (w[..., :, None] * same[i] * ftil) @ jnp.swapaxes(cols[i], -1, -2)
        out.append(0.5 * (h + jnp.swapaxes(h, -1, -2)))
    return out, dvec


def _axis_sums(cols, sizes, cells, rows):
    r"""Per factor i, :math:`Z_i[x, k] = \sum_{c \in \text{cells}:\, c_i = x} \text{rows}[c, k]
    \prod_{j \ne i} q_{j k_j}[c_j]`, ``(..., n_i, r)``, for ``rows`` ``(..., cells, r)`` at the
    flat grid ``cells`` (static): a segment sum per factor, :math:`O(d^2 \cdot \text{cells}
    \cdot r)`, no grid (filled to the grid and contracted it took 9× longer at 128²)."""
    coords = _coordinates(tuple(cells), sizes)
    at = [jnp.take(c, x, axis=-2) for c, x in zip(cols, coords, strict=True)]
    out = []
    for i, x in enumerate(coords):
        z = math.prod((a for j, a in enumerate(at) if j != i), start=rows)
        ordered = bool(np.all(np.diff(x) >= 0))
        z = jax.ops.segment_sum(jnp.moveaxis(z, -2, 0), x, sizes[i], indices_are_sorted=ordered)
        out.append(jnp.moveaxis(z, 0, -2))
    return out


@_log_density.defjvp
def _log_density_jvp(cfg, primals, tangents):
    r"""With :math:`\alpha = C^{-1} r`, probes :math:`z_j` of covariance P,
    :math:`p_j = P^{-1} z_j`, :math:`w_j = C^{-1} z_j` (the quadrature's iterates, run on to
    ``probe_tol``):

    .. math::
        d\log p = -\alpha^\top dr + \tfrac12 \alpha^\top dC\,\alpha - \tfrac12 \big(
        \tfrac1s \textstyle\sum_j w_j^\top dC\, p_j + \operatorname{tr}\big((P^{-1} -
        \tfrac1s \textstyle\sum_j p_j p_j^\top) X\big) \big),

    the trace :math:`\operatorname{tr}(C^{-1} dC)` by Hutchinson's estimator
    (:math:`E[z z^\top] = P`) with a control variate: :math:`\tfrac1s \sum_j p_j^\top X p_j`
    estimates :math:`\operatorname{tr}(P^{-1} X)`, known exactly, for X the part of dC in
    the preconditioner's eigenspace (:func:`_trace_control`). Unbiased for any X; each
    probe's term is :math:`(w_j - p_j)^\top dC\, p_j + p_j^\top (dC - X) p_j`, whose spread
    vanishes as P approaches C and X approaches dC. That holds while P captures every
    direction where the signal exceeds the noise (``gap`` = :math:`\lambda_{r+1} / \min d
    \le 1`); past it the plain :math:`\tfrac1s \sum_j w_j^\top dC\, p_j` is used. One
    differentiated matvec, for :math:`\alpha` and the :math:`p_j`."""
    cov, noise_o, eps, r = primals
    dcov, dnoise, _, dr = tangents
    refuse_derivative((cov, noise_o), "a second derivative of the iterative marginal")
    solve_tol = cfg.tol if cfg.exact_trace else max(cfg.tol, cfg.probe_tol)
    parts = _log_density_parts(cfg, cov, noise_o, eps, r, solve_tol)
    alpha, p, w = jax.lax.stop_gradient((parts.alpha, parts.krylov.pz, parts.krylov.x))
    lead = jnp.concatenate([alpha[None], p])
    _, dc_lead = jax.jvp(
        lambda c, n: _observed_matvec(cfg, c, n)(lead), (cov, noise_o), (dcov, dnoise)
    )
    quad_dot = jnp.sum(alpha * dc_lead[0], -1)
    scale = _trace_scale(cfg, eps)
    logdet_dot = scale * jnp.sum(w * dc_lead[1:], (0, -1))
    if cfg.rank:
        h, dvec = _trace_control(cfg, cov, parts.precond, p, scale, noise_o is None)

        def captured(c, n):
            diag = c.sigma2()[..., None] if n is None else c.sigma2()[..., None] + n
            return c.factor_covs(), diag

        _, (dks, dd) = jax.jvp(captured, (cov, noise_o), (dcov, dnoise))
        control = jnp.sum(dd * dvec, -1) + sum(
            jnp.sum(dk * hi, (-2, -1)) for dk, hi in zip(dks, h, strict=True)
        )
        logdet_dot = jnp.where(parts.precond.gap <= 1, logdet_dot + control, logdet_dot)
    return parts.value, -jnp.sum(alpha * dr, -1) + 0.5 * quad_dot - 0.5 * logdet_dot


def _probe_draws(key, count, shape, dtype, n_obs, rank):
    """Rademacher draws ``(count, *shape, rank + n_obs)``, coloured into probes of
    covariance P, or the unit vectors when ``count >= n_obs`` (the exact trace: the probes
    are then the ``rank + n_obs`` columns of the root :math:`[U, \\sqrt D]` of P)."""
    width = rank + n_obs
    if count >= n_obs:
        eye = jnp.eye(width, dtype=dtype).reshape((width,) + (1,) * len(shape) + (width,))
        return jnp.broadcast_to(eye, (width, *shape, width)), True
    return jax.random.rademacher(key, (count, *shape, width), dtype=dtype), False


class IterativeMarginal(Distribution):
    r"""The marginal of a :class:`~kronjax.KroneckerNormal` at the observed cells, with
    optional per-cell noise, by structured iterative solves (see the module docstring).

    Built by ``dist.marginal(observed, method="iterative", ...)``; ``event_shape ==
    (n_obs,)`` in the order of ``observed``. Per ``log_prob`` with its gradient: the data
    solve's and the probes' iterations (each one application of the complete-grid operator,
    :math:`O(N \sum_i n_i)`, per vector), plus ``1 + probes`` differentiated applications
    and :math:`O(n_o r^2 + d^2 n_o r)` for the gradient, plus :math:`O(n_o r^2)` to build P.
    The log determinant (and its gradient) is a stochastic estimate with a fixed seed,
    nearly exact where P captures the signal (``solver_info(y).precond_gap <= 1``); the
    quadratic term is exact to ``tol``.

    Args:
        base: the complete-grid ``KroneckerNormal``.
        observed: concrete boolean mask ``(N,)`` or unique flat indices; ``None`` for all.
        cell_noise: optional per-cell noise variances ``(..., N)``, non-negative, added to
            the observed cells (heteroscedastic or known measurement noise).
        tol: relative residual at which conjugate gradients stop.
        max_iters: most conjugate-gradient iterations.
        probes: probes for the log determinant (Rademacher draws coloured to covariance
            P); at least ``n_obs`` means the ``precond_rank + n_obs`` columns of a root of P
            (exact trace, deterministic).
        lanczos_steps: Lanczos steps per probe at most (capped at ``n_obs``; the loop ends
            earlier once every probe's relative residual is below ``min(tol,
            probe_tol)``: a few steps when P is nearly C). Too few bias the log determinant
            upward, the Gauss rule's error decaying like
            :math:`((\sqrt\kappa - 1)/(\sqrt\kappa + 1))^{2k}`; about :math:`0.4\sqrt\kappa`
            steps bring the bias below the 16-probe spread (measured without a
            preconditioner, ``bench/LANCZOS_STEPS.md``). With the preconditioner
            :math:`\kappa = \kappa(P^{-1} C) \le 1 +` ``precond_gap``, and the default 40
            suits a gap up to about :math:`10^4`; without it (``precond_rank=0``, noise
            factors, no ``sigma``) :math:`\kappa(C) \le` ``base.condition_number()`` and the
            default is 100, for :math:`\kappa \lesssim 6 \times 10^4`. Each evaluation
            also diagonalizes a ``lanczos_steps``-square tridiagonal per probe.
        probe_tol: relative residual of the probe solves of the gradient's trace
            estimate (never tighter than needed: at 1e-2 their error was under a tenth of
            the estimate's spread over seeds on 128×128; in the exact mode ``tol`` is used).
        precond_rank: rank r of the preconditioner P (the r largest eigenpairs of the
            signal plus the diagonal noise; used with ``sigma`` on the eigen route, capped
            at ``n_obs``). The spectrum of :math:`P^{-1} C` lies in :math:`[1, 1 +
            \lambda_{r+1}/\sigma^2]`. Default: as large as keeps :math:`r N \le 2^{20}`,
            at least 96 up to N = 128², then 16 more per 4× in N, to 128 from 512²: an
            RBF grid (ℓ 0.2 and 0.3 on [0, 1], σ = 0.1) then has a gap of 0.006, 0.002 and
            0.0008 on 128², 256² and 512². Raise it for rough kernels or a small σ
            (``solver_info(y).precond_gap > 1``), or for a more exact gradient (at 256²,
            30% missing, r = 96, 112, 128 give gradient errors 1.4e-3, 2e-5, 5e-6 at
            0.20, 0.24, 0.26 s). Cost :math:`O(n_o r^2)` per evaluation, memory
            :math:`O(N r)`.
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
        lanczos_steps: int | None = None,
        probe_tol: float = 1e-2,
        precond_rank: int | None = None,
        key=0,
        validate_args: bool | None = None,
    ):
        n = base.event_shape[0]
        obs = np.arange(n) if observed is None else observed_indices(observed, n)
        if precond_rank is None:
            precond_rank = max(_least_rank(n), _PRECOND_ENTRIES // n)
        for name, value, least in (
            ("probes", probes, 1),
            ("lanczos_steps", 1 if lanczos_steps is None else lanczos_steps, 1),
            ("precond_rank", precond_rank, 0),
        ):
            if int(value) < least:
                raise ValueError(f"IterativeMarginal: {name} = {value}; expected at least {least}")
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
        cov = base.covariance
        low_rank = isinstance(cov, EigenCovariance) and cov.sigma is not None
        rank = min(int(precond_rank), obs.size) if low_rank else 0
        if lanczos_steps is None:
            lanczos_steps = 40 if rank else 100
        self.probes, exact = _probe_draws(key, int(probes), batch, base.loc.dtype, obs.size, rank)
        self.base, self.cell_noise = base, cell_noise
        steps = min(int(lanczos_steps), obs.size)
        self.config = _Config(
            tuple(obs.tolist()),
            n,
            float(tol),
            int(max_iters),
            steps,
            exact,
            float(probe_tol),
            rank,
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
        cfg, r = self.config, self._residual(value)
        parts = _log_density_parts(cfg, self.base.covariance, self._noise_o(), self.probes, r)
        scale = _trace_scale(cfg, self.probes)
        full, half = (
            parts.precond.logdet() + scale * jnp.sum(_gauss_logquad(parts.krylov, k), 0)
            for k in (cfg.lanczos_steps, max(cfg.lanczos_steps // 2, 1))
        )
        return parts.info._replace(
            logdet=full,
            logdet_change=jnp.max(jnp.abs(full - half)),
            precond_gap=jnp.max(parts.precond.gap),
        )

    @validate_sample
    def log_prob(self, value) -> jax.Array:
        value = jnp.asarray(value)
        n_obs = self.event_shape[0]
        if value.ndim == 0 or value.shape[-1] != n_obs:
            raise ValueError(
                f"IterativeMarginal.log_prob: value has shape {value.shape}; expected "
                f"(..., {n_obs}), one entry per observed cell"
            )
        self.base.check_conditioning('marginal(method="iterative").log_prob')
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
