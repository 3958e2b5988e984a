"""Shared pieces: the test problem (RBF factors on [0, 1] grids), timing, errors, machine info."""

import math
import os
import platform
import statistics
import time

import numpy as np
import scipy.linalg

CAP_S = 20.0  # stop a peer past this many seconds per call
ELLS = (0.2, 0.3, 0.25)  # lengthscales of the d factors
SIGMA = 0.1


def grids(sizes):
    """The axes ``linspace(0, 1, n_i)`` of the grid."""
    return [np.linspace(0.0, 1.0, n) for n in sizes]


def rbf_np(x, ell):
    """RBF factor ``exp(-(x - x')² / (2 ℓ²))`` and its derivative in ℓ."""
    d2 = (x[:, None] - x[None, :]) ** 2
    k = np.exp(-d2 / (2 * ell**2))
    return k, k * d2 / ell**3


def params(sizes):
    """Default hyperparameters ``(ells, sigma)`` for a grid of ``len(sizes)`` axes."""
    return np.array(ELLS[: len(sizes)]), np.float64(SIGMA)


def eig_factors(sizes, ells):
    """``scipy.linalg.eigh`` of every RBF factor: lists of eigenvalues and eigenvectors."""
    pairs = [scipy.linalg.eigh(rbf_np(x, l)[0]) for x, l in zip(grids(sizes), ells)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def rotate(t, qs, transpose=False):
    """Mode products of the ``(..., q_1, …, q_d)`` tensor ``t`` with every ``Q_i`` (or ``Q_iᵀ``).

    One GEMM per mode: ``t.reshape(q_k, rest).T @ Q_kᵀ`` moves the rotated axis to the end,
    so after d steps the axes are back in order and no transpose is ever copied.
    Rectangular ``Q_i`` ``(p_i, q_i)`` are fine.
    """
    mats = [q if transpose else q.T for q in qs]  # right operands, (q_i, p_i)
    sizes = tuple(m.shape[1] for m in mats)
    lead = t.shape[: t.ndim - len(qs)]
    if lead:  # batch axes go last; after d cycles they are first again
        t = np.moveaxis(t, tuple(range(len(lead))), tuple(range(-len(lead), 0)))
    for m in mats:
        t = t.reshape(m.shape[0], -1).T @ m
    return t.reshape(lead + sizes)


def outer(vs):
    """Outer product tensor of 1-D vectors."""
    out = np.ones(())
    for v in vs:
        out = np.multiply.outer(out, v)
    return out


def sample_np(sizes, ells, sigma, n=1, seed=0):
    """Exact draws ``(n, N)`` from the model, by the eigenbasis root (numpy)."""
    lam, qs = eig_factors(sizes, ells)
    D = outer([np.maximum(v, 0) for v in lam]) + sigma**2
    z = np.random.default_rng(seed).standard_normal((n,) + tuple(sizes))
    return rotate(np.sqrt(D) * z, qs).reshape(n, -1)


def data(sizes, seed=0):
    """Observations ``y`` (N,): one draw of the model at the default hyperparameters."""
    ells, sigma = params(sizes)
    return sample_np(sizes, ells, sigma, 1, seed)[0]


def rel_err(a, b):
    """Max-norm relative error ``max|a - b| / max|b|`` (inf if ``a`` is not finite)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not np.all(np.isfinite(a)):
        return math.inf
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def lp_grad_err(out, ref):
    """Relative errors of ``(logp, grad)`` against a reference pair."""
    return rel_err(out[0], ref[0]), rel_err(out[1], ref[1])


def time_call(fn, reps=5, cap=CAP_S, budget=1.0, max_reps=50):
    """Time ``fn()`` (which must block until done).

    The first call (compile + run) is timed apart; then the median of ``reps`` or more
    calls (more while they fit in ``budget`` seconds). Returns a dict with ``first_s``,
    ``median_s``, ``min_s``, ``reps``, ``compile_s`` (first - median) and the last output; stops
    after the first call when it exceeds ``cap`` (``capped`` is then True).
    """
    t = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t
    if first > cap:
        return dict(
            first_s=first, median_s=first, min_s=first, reps=1, compile_s=None, capped=True, out=out
        )
    ts = []
    while len(ts) < reps or (sum(ts) < budget and len(ts) < max_reps):
        t = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t)
        if ts[-1] > cap:
            break
    med = statistics.median(ts)
    return dict(
        first_s=first,
        median_s=med,
        min_s=min(ts),
        reps=len(ts),
        compile_s=max(first - med, 0.0),
        capped=ts[-1] > cap,
        out=out,
    )


def threads_info():
    """BLAS/OpenMP thread pools of this process (threadpoolctl) and the XLA flags."""
    info = {"cpu_count": os.cpu_count()}
    info.update({k: os.environ.get(k, "") for k in ("XLA_FLAGS", "OPENBLAS_THREAD_TIMEOUT")})
    try:
        from threadpoolctl import threadpool_info

        info["pools"] = sorted(
            {f"{p['internal_api']}:{p['num_threads']}" for p in threadpool_info()}
        )
    except ImportError:
        pass
    return info


def machine():
    """CPU model, core count and memory, from /proc."""
    model = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) / 2**20
    except OSError:
        mem = float("nan")
    return f"{model}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.platform()}"


def versions():
    """Versions of every package the suite may use (missing ones are skipped)."""
    out = {"python": platform.python_version()}
    for name in (
        "jax",
        "jaxlib",
        "numpyro",
        "numpy",
        "scipy",
        "torch",
        "gpytorch",
        "linear_operator",
        "pymc",
        "pytensor",
        "numba",
        "kronjax",
    ):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a missing peer is just skipped
            out[name] = "missing"
    return out


def run_record(command: str) -> tuple[dict, list[str]]:
    """The record of one benchmark run (date, exact command, machine, versions) and its
    Markdown header lines, shared by a results file and its report."""
    meta = dict(
        date=time.strftime("%Y-%m-%dT%H:%M:%S"),
        command=command,
        machine=machine(),
        versions=versions(),
    )
    lines = [
        f"- date {meta['date']}; command `{command}`",
        f"- machine: {meta['machine']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
    ]
    return meta, lines
