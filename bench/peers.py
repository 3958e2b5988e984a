"""The systems under test, one factory per system.

``logp_grad(sizes, y)`` returns a blocking callable ``(ells, sigma) -> (logp, grad)`` with
``grad = [∂/∂ℓ_1, …, ∂/∂ℓ_d, ∂/∂σ]`` as a NumPy array; compilation happens on its first
call, so the timer sees it. ``sampler(sizes, s)`` returns ``(ells, sigma, seed) -> (s, N)``
draws. A missing peer is reported by ``skip_note()``.
"""

import functools
import math

import numpy as np
import scipy.linalg

from bench.common import eig_factors, grids, outer, rbf_np, rotate

_LOG_2PI = math.log(2 * math.pi)


def _lazy(build):
    """Defer ``build()`` (imports, model building, compilation) to the first call."""
    cell = []

    def call(*args):
        if not cell:
            cell.append(build())
        return cell[0](*args)

    return call


class System:
    """A system under test: a name, size limit, optional dtype, and its factories."""

    name = "?"
    max_n = math.inf
    max_draws = 1 << 30  # draws per sampler call
    dtype = "float64"
    module = None  # importable module that must exist

    def skip_note(self):
        """None when usable, else a one-line reason it is skipped."""
        if self.module is None:
            return None
        try:
            __import__(self.module)
        except ImportError as e:
            return f"{self.name} skipped: {e}"
        return None

    def threads(self):
        return ""

    def logp_grad(self, sizes, y):
        raise NotImplementedError

    def sampler(self, sizes, s):
        return None


# --- JAX systems ------------------------------------------------------------------------


def _jax_rbf(x, ell):
    import jax.numpy as jnp

    return jnp.exp(-((x[:, None] - x[None, :]) ** 2) / (2 * ell**2))


def _jax_logp_grad(logp_fn, sizes, y, dtype):
    """jit(value_and_grad) of ``logp_fn(covs, sigma, y)`` w.r.t. lengthscales and sigma."""
    import jax
    import jax.numpy as jnp

    xs = [jnp.asarray(x, dtype) for x in grids(sizes)]
    yj = jnp.asarray(y, dtype)

    def f(ells, sigma):
        return logp_fn([_jax_rbf(x, ells[i]) for i, x in enumerate(xs)], sigma, yj)

    g = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))

    on_device = {}

    def call(ells, sigma):
        """Blocks on the device outputs; inputs are put on the device once (as in a NUTS or
        optax loop), outputs read back to NumPy only when the caller looks at them."""
        key = (tuple(np.ravel(ells)), float(sigma))
        if key not in on_device:
            on_device[key] = (jnp.asarray(ells, dtype), jnp.asarray(sigma, dtype))
        return _JaxOut(jax.block_until_ready(g(*on_device[key])))

    return call


class _JaxOut:
    """``(logp, grad)`` view of ``(lp, (grad_ells, grad_sigma))`` device arrays, read lazily."""

    def __init__(self, out):
        self.out = out

    def __getitem__(self, i):
        lp, (ge, gs) = self.out
        return float(lp) if i == 0 else np.r_[np.asarray(ge, np.float64), float(gs)]

    def __iter__(self):
        return iter((self[0], self[1]))


def _jax_sampler(sample_fn, sizes, s, dtype):
    """jit of ``sample_fn(covs, sigma, key, s)`` with the factors built inside."""
    import jax
    import jax.numpy as jnp

    xs = [jnp.asarray(x, dtype) for x in grids(sizes)]

    @jax.jit
    def f(ells, sigma, key):
        return sample_fn([_jax_rbf(x, ells[i]) for i, x in enumerate(xs)], sigma, key, s)

    def call(ells, sigma, seed):
        key = jax.random.key(seed)
        return np.asarray(
            jax.block_until_ready(f(jnp.asarray(ells, dtype), jnp.asarray(sigma, dtype), key))
        )

    return call


class KronJax(System):
    """``kronjax.KroneckerNormal(0, covs, sigma).log_prob`` under jit(value_and_grad)."""

    module = "kronjax"

    def __init__(self, dtype="float64"):
        self.dtype = dtype
        self.name = "kronjax" if dtype == "float64" else "kronjax-f32"

    def threads(self):
        return "XLA CPU (all cores)"

    def logp_grad(self, sizes, y):
        import kronjax

        def lp(covs, sigma, y):
            return kronjax.KroneckerNormal(0.0, covs=covs, sigma=sigma).log_prob(y)

        return _lazy(lambda: _jax_logp_grad(lp, sizes, y, self.dtype))

    def sampler(self, sizes, s):
        import kronjax

        def draw(covs, sigma, key, s):
            return kronjax.KroneckerNormal(0.0, covs=covs, sigma=sigma).sample(key, (s,))

        return _lazy(lambda: _jax_sampler(draw, sizes, s, self.dtype))


def _dense_cov(covs, sigma):
    import jax.numpy as jnp

    k = functools.reduce(jnp.kron, covs)
    return k + sigma**2 * jnp.eye(k.shape[0], dtype=k.dtype)


class DenseNumPyro(System):
    """NumPyro ``MultivariateNormal`` on the dense ``jnp.kron`` covariance (N ≤ 4096)."""

    name = "dense-numpyro"
    module = "numpyro"
    max_n = 4096

    def threads(self):
        return "XLA CPU (all cores)"

    def logp_grad(self, sizes, y):
        import jax.numpy as jnp
        from numpyro.distributions import MultivariateNormal

        def lp(covs, sigma, y):
            cov = _dense_cov(covs, sigma)
            return MultivariateNormal(jnp.zeros(cov.shape[0]), covariance_matrix=cov).log_prob(y)

        return _lazy(lambda: _jax_logp_grad(lp, sizes, y, self.dtype))

    def sampler(self, sizes, s):
        import jax.numpy as jnp
        from numpyro.distributions import MultivariateNormal

        def draw(covs, sigma, key, s):
            cov = _dense_cov(covs, sigma)
            mvn = MultivariateNormal(jnp.zeros(cov.shape[0]), covariance_matrix=cov)
            return mvn.sample(key, (s,))

        return _lazy(lambda: _jax_sampler(draw, sizes, s, self.dtype))


class NaiveEigh(System):
    """The naive way: the eigen log-density with plain autodiff through ``jnp.linalg.eigh``."""

    name = "naive-eigh-jax"
    module = "jax"

    def threads(self):
        return "XLA CPU (all cores)"

    def logp_grad(self, sizes, y):
        import jax.numpy as jnp

        def lp(covs, sigma, y):
            lam, qs = zip(*(jnp.linalg.eigh(k) for k in covs))
            t = y.reshape(sizes)
            for q in qs:  # Qᵀ r, one mode at a time, cycling the axes
                t = jnp.tensordot(t, q, axes=(0, 0))
            D = functools.reduce(jnp.multiply.outer, lam) + sigma**2
            return -0.5 * (jnp.sum(t * t / D) + jnp.sum(jnp.log(D)) + D.size * _LOG_2PI)

        return _lazy(lambda: _jax_logp_grad(lp, sizes, y, self.dtype))


# --- NumPy / SciPy: the independent reference and the structured floor --------------------


def numpy_eig_logp_grad(sizes, y, ells, sigma):
    """Eigen log density and its exact gradient (DESIGN.md §3) in NumPy/SciPy float64."""
    n = math.prod(sizes)
    lam, qs = eig_factors(sizes, ells)
    lam = [np.maximum(v, 0) for v in lam]
    D = outer(lam) + sigma**2
    alpha = rotate(np.asarray(y, np.float64).reshape(sizes), qs, transpose=True) / D
    logp = -0.5 * (np.sum(alpha * alpha * D) + np.sum(np.log(D)) + n * _LOG_2PI)
    grad = []
    for i, x in enumerate(grids(sizes)):
        w = outer([np.ones(sizes[i]) if j == i else v for j, v in enumerate(lam)])
        a = np.moveaxis(alpha, i, 0).reshape(sizes[i], -1)
        s_i = (a * np.moveaxis(w, i, 0).reshape(sizes[i], -1)) @ a.T
        g_i = np.moveaxis(w / D, i, 0).reshape(sizes[i], -1).sum(1)
        dk = 0.5 * qs[i] @ (s_i - np.diag(g_i)) @ qs[i].T
        grad.append(np.sum(dk * rbf_np(x, ells[i])[1]))
    grad.append(sigma * (np.sum(alpha * alpha) - np.sum(1 / D)))
    return float(logp), np.array(grad)


def dense_ref(sizes, y, ells, sigma):
    """Dense Cholesky log density and gradient ½ tr((ααᵀ − K⁻¹) ∂K) in SciPy (small N)."""
    xs = grids(sizes)
    ks = [rbf_np(x, l) for x, l in zip(xs, ells)]
    n = math.prod(sizes)
    kmat = functools.reduce(np.kron, [k for k, _ in ks]) + sigma**2 * np.eye(n)
    cho = scipy.linalg.cho_factor(kmat, lower=True)
    alpha = scipy.linalg.cho_solve(cho, y)
    logp = -0.5 * (y @ alpha + 2 * np.sum(np.log(np.diag(cho[0]))) + n * _LOG_2PI)
    w = np.outer(alpha, alpha) - scipy.linalg.cho_solve(cho, np.eye(n))
    grad = []
    for i in range(len(sizes)):
        dk = functools.reduce(np.kron, [dk_ if j == i else k for j, (k, dk_) in enumerate(ks)])
        grad.append(0.5 * np.sum(w * dk))
    grad.append(sigma * np.trace(w))
    return float(logp), np.array(grad)


class NumpyEig(System):
    """Hand-written eigen method in NumPy/SciPy (LAPACK eigh + BLAS GEMMs): the reference."""

    name = "numpy-eig"

    def threads(self):
        from bench.common import threads_info

        return ",".join(threads_info().get("pools", []))

    def logp_grad(self, sizes, y):
        return lambda ells, sigma: numpy_eig_logp_grad(sizes, y, ells, sigma)

    def sampler(self, sizes, s):
        def draw(ells, sigma, seed):
            lam, qs = eig_factors(sizes, ells)
            D = outer([np.maximum(v, 0) for v in lam]) + sigma**2
            z = np.random.default_rng(seed).standard_normal((s,) + tuple(sizes))
            return rotate(np.sqrt(D) * z, qs).reshape(s, -1)

        return draw


class Floor(System):
    """Structured floor: the factors' eigendecompositions + three full-tensor rotation passes.

    The least an exact eigen method can do: the logp alone needs one pass (Qᵀr), the
    gradient's contractions about two more. Each part is timed on its own and the fastest
    implementation counts: eigh by LAPACK through SciPy (drivers evd and evr), a pass as one
    GEMM per mode (``rotate``) in NumPy or in JAX (XLA). ``time`` returns the parts.
    """

    name = "floor"

    def threads(self):
        return NumpyEig().threads() + ", XLA"

    def logp_grad(self, sizes, y):
        """Only the log density, for the agreement check: ``(logp, None)``."""

        def call(ells, sigma):
            lam, qs = eig_factors(sizes, ells)
            rt = rotate(np.asarray(y, np.float64).reshape(sizes), qs, transpose=True)
            D = outer([np.maximum(v, 0) for v in lam]) + sigma**2
            return float(-0.5 * (np.sum(rt * rt / D) + np.sum(np.log(D)) + D.size * _LOG_2PI)), None

        return call

    def time(self, sizes, y, ells):
        """Median seconds of the best eigh and the best pass; ``median_s`` = eigh + 3 passes."""
        import jax
        import jax.numpy as jnp

        from bench.common import time_call

        ks = [rbf_np(x, l)[0] for x, l in zip(grids(sizes), ells)]
        qs = eig_factors(sizes, ells)[1]
        t = np.asarray(y, np.float64).reshape(sizes)
        qj, tj = [jnp.asarray(q) for q in qs], jnp.asarray(t)

        @jax.jit
        def jpass(t):
            for q in qj:
                t = t.reshape(q.shape[0], -1).T @ q
            return t

        parts = {
            "eigh evd": lambda: [scipy.linalg.eigh(k, driver="evd") for k in ks],
            "eigh evr": lambda: [scipy.linalg.eigh(k, driver="evr") for k in ks],
            "pass numpy": lambda: rotate(t, qs, transpose=True),
            "pass jax": lambda: jax.block_until_ready(jpass(tj)),
        }
        res = {k: time_call(f)["median_s"] for k, f in parts.items()}
        eigh = min(res["eigh evd"], res["eigh evr"])
        npass = min(res["pass numpy"], res["pass jax"])
        return dict(median_s=eigh + 3 * npass, eigh_s=eigh, pass_s=npass, parts_s=res)


# --- GPyTorch / linear_operator -----------------------------------------------------------


class GPyTorch(System):
    """``KroneckerProductLinearOperator`` + constant diagonal noise, log_prob + backward."""

    module = "gpytorch"

    def __init__(self, max_chol=None, dtype="float64", device="cpu"):
        self.max_chol, self.dtype, self.device = max_chol, dtype, device
        self.name = (
            "gpytorch"
            + ("-nochol" if max_chol == 0 else "")
            + ("-f32" if dtype == "float32" else "")
        )

    def threads(self):
        import torch

        return f"torch intra-op {torch.get_num_threads()}"

    def _cov(self, xs, ells, sigma):
        import torch
        from linear_operator.operators import DenseLinearOperator, KroneckerProductLinearOperator

        ks = [
            torch.exp(-((x[:, None] - x[None, :]) ** 2) / (2 * ells[i] ** 2))
            for i, x in enumerate(xs)
        ]
        ks = [DenseLinearOperator(k) for k in ks]
        return KroneckerProductLinearOperator(*ks).add_diagonal(sigma**2)

    def _settings(self):
        import contextlib

        import gpytorch

        if self.max_chol is None:
            return contextlib.nullcontext()
        return gpytorch.settings.max_cholesky_size(self.max_chol)

    def logp_grad(self, sizes, y):
        import gpytorch
        import torch

        dt = getattr(torch, self.dtype)
        xs = [torch.tensor(x, dtype=dt, device=self.device) for x in grids(sizes)]
        yt = torch.tensor(y, dtype=dt, device=self.device)
        zero = torch.zeros_like(yt)

        def call(ells, sigma):
            e = torch.tensor(ells, dtype=dt, device=self.device, requires_grad=True)
            s = torch.tensor(sigma, dtype=dt, device=self.device, requires_grad=True)
            with self._settings():
                mvn = gpytorch.distributions.MultivariateNormal(zero, self._cov(xs, e, s))
                lp = mvn.log_prob(yt)
                lp.backward()
            return lp.item(), np.r_[e.grad.double().cpu().numpy(), s.grad.item()]

        return call

    def batch_logp_grad(self, sizes, y):
        """Batch mode: ``(B, d) ells, (B,) sigmas -> ((B,), (B, d+1))`` in one call."""
        import gpytorch
        import torch

        dt = getattr(torch, self.dtype)
        xs = [torch.tensor(x, dtype=dt, device=self.device) for x in grids(sizes)]
        yt = torch.tensor(y, dtype=dt, device=self.device)

        def call(ells, sigmas):
            e = torch.tensor(ells, dtype=dt, device=self.device, requires_grad=True)
            s = torch.tensor(sigmas, dtype=dt, requires_grad=True)
            ks = [
                torch.exp(-((x[:, None] - x[None, :]) ** 2)[None] / (2 * e[:, i, None, None] ** 2))
                for i, x in enumerate(xs)
            ]
            from linear_operator.operators import (
                DenseLinearOperator,
                KroneckerProductLinearOperator,
            )

            cov = KroneckerProductLinearOperator(*[DenseLinearOperator(k) for k in ks])
            cov = cov.add_diagonal((s**2)[:, None])  # (B, 1): a constant diagonal per setting
            with self._settings():
                mvn = gpytorch.distributions.MultivariateNormal(torch.zeros_like(yt), cov)
                lp = mvn.log_prob(yt)
                lp.sum().backward()
            grad = torch.cat([e.grad, s.grad[:, None]], 1)
            return lp.detach().double().numpy(), grad.double().numpy()

        return call

    def sampler(self, sizes, s):
        import gpytorch
        import torch

        dt = getattr(torch, self.dtype)
        xs = [torch.tensor(x, dtype=dt, device=self.device) for x in grids(sizes)]
        zero = torch.zeros(math.prod(sizes), dtype=dt, device=self.device)

        def call(ells, sigma, seed):
            torch.manual_seed(seed)
            e = torch.tensor(ells, dtype=dt, device=self.device)
            sg = torch.tensor(sigma, dtype=dt, device=self.device)
            with torch.no_grad(), self._settings():
                mvn = gpytorch.distributions.MultivariateNormal(zero, self._cov(xs, e, sg))
                return mvn.rsample(torch.Size([s])).double().cpu().numpy()

        return call


# --- PyMC ---------------------------------------------------------------------------------


class PyMC(System):
    """``pm.KroneckerNormal`` with ``ExpQuad`` factors; compiled logp and dlogp."""

    module = "pymc"
    max_draws = 4  # each draw costs PyMC a dense N×N Cholesky

    def __init__(self, mode="NUMBA"):
        self.mode = mode
        self.name = f"pymc-{mode.lower()}"

    def threads(self):
        from bench.common import threads_info

        return ",".join(threads_info().get("pools", []))

    def _model(self, sizes, y):
        import pymc as pm

        with pm.Model() as m:
            ell = pm.Flat("ell", shape=len(sizes))
            sigma = pm.Flat("sigma")
            covs = [pm.gp.cov.ExpQuad(1, ls=ell[i])(x[:, None]) for i, x in enumerate(grids(sizes))]
            mu = np.zeros(math.prod(sizes))
            pm.KroneckerNormal("y", mu=mu, covs=covs, sigma=sigma, observed=y)
        return m

    def logp_grad(self, sizes, y):
        def build():
            import pytensor

            m = self._model(sizes, y)
            lp = m.logp()
            vv = m.value_vars
            f = pytensor.function(vv, [lp, *pytensor.grad(lp, vv)], mode=self.mode)

            def call(ells, sigma):
                lp_, g_ell, g_s = f(np.asarray(ells, np.float64), np.float64(sigma))
                return float(lp_), np.r_[g_ell, g_s]

            return call

        return _lazy(build)

    def sampler(self, sizes, s):
        def build():
            import pymc as pm
            import pytensor.tensor as pt

            ell, sigma = pt.dvector("ell"), pt.dscalar("sigma")
            covs = [pm.gp.cov.ExpQuad(1, ls=ell[i])(x[:, None]) for i, x in enumerate(grids(sizes))]
            n = math.prod(sizes)
            rv = pm.KroneckerNormal.dist(mu=np.zeros(n), covs=covs, sigma=sigma, shape=(s, n))
            fn = pm.pytensorf.compile([ell, sigma], rv, random_seed=0, mode=self.mode)
            return lambda ells, sig, seed: fn(np.asarray(ells, np.float64), np.float64(sig))

        return _lazy(build)


def logp_systems():
    """Every system of the logp+grad workload, kronjax first, the floor last."""
    return [
        KronJax(),
        KronJax("float32"),
        GPyTorch(),
        GPyTorch(max_chol=0),
        GPyTorch(dtype="float32"),
        PyMC("NUMBA"),
        PyMC("CVM"),
        DenseNumPyro(),
        NaiveEigh(),
        NumpyEig(),
        Floor(),
    ]
