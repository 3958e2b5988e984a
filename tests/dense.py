"""Independent dense twins in NumPy float64: the references every structured result meets."""

import numpy as np
from scipy.stats import multivariate_normal


def kron(factors) -> np.ndarray:
    """Batched ``np.kron`` of ``(..., p_i, q_i)`` factors."""
    out = np.asarray(factors[0], np.float64)
    for b in factors[1:]:
        b = np.asarray(b, np.float64)
        out = np.einsum("...pq,...rs->...prqs", out, b)
        out = out.reshape(out.shape[:-4] + (out.shape[-4] * out.shape[-3], -1))
    return out


def covariance(covs, sigma) -> np.ndarray:
    """``⊗ K_i + sigma² I`` with broadcasting over batch dims."""
    cov = kron(covs)
    if sigma is not None:
        s2 = np.square(np.asarray(sigma, np.float64))
        cov = cov + s2[..., None, None] * np.eye(cov.shape[-1])
    return cov


def logpdf(value, loc, cov) -> np.ndarray:
    """``scipy.stats.multivariate_normal.logpdf`` over broadcast batch dims."""
    value, loc = np.asarray(value, np.float64), np.asarray(loc, np.float64)
    batch = np.broadcast_shapes(value.shape[:-1], loc.shape[:-1], cov.shape[:-2])
    n = cov.shape[-1]
    v = np.broadcast_to(value, batch + (n,)).reshape(-1, n)
    m = np.broadcast_to(loc, batch + (n,)).reshape(-1, n)
    c = np.broadcast_to(cov, batch + (n, n)).reshape(-1, n, n)
    out = [multivariate_normal(mi, ci).logpdf(vi) for vi, mi, ci in zip(v, m, c)]
    return np.asarray(out).reshape(batch)


def entropy(cov) -> np.ndarray:
    n = cov.shape[-1]
    c = cov.reshape(-1, n, n)
    out = [multivariate_normal(np.zeros(n), ci).entropy() for ci in c]
    return np.asarray(out).reshape(cov.shape[:-2])


def logpdf_grads(value, loc, covs, sigma):
    """Analytic gradients of the dense log density of one (unbatched) example.

    With ``A = ⊗K_i + σ²I``, ``α = A⁻¹ r`` and ``G = ½(ααᵀ − A⁻¹)`` (= ∂ log p / ∂A):
    ∂/∂K_i contracts G with the other factors, ∂/∂σ = 2σ tr G, ∂/∂loc = α = −∂/∂value.
    """
    covs = [np.asarray(k, np.float64) for k in covs]
    sizes = [k.shape[-1] for k in covs]
    cov = covariance(covs, sigma)
    inv = np.linalg.inv(cov)
    alpha = inv @ (np.asarray(value, np.float64) - np.asarray(loc, np.float64))
    g = 0.5 * (np.outer(alpha, alpha) - inv)
    d = len(covs)
    gt = g.reshape(sizes + sizes)
    letters = "abcdefgh"
    cov_grads = []
    for i in range(d):
        rows, cols = letters[:d], letters[:d].upper()
        operands, subs = [gt], [rows + cols]
        for j in range(d):
            if j != i:
                operands.append(covs[j])
                subs.append(rows[j] + cols[j])
        spec = ",".join(subs) + "->" + rows[i] + cols[i]
        cov_grads.append(np.einsum(spec, *operands))
    sigma_grad = None if sigma is None else 2 * float(sigma) * np.trace(g)
    return cov_grads, sigma_grad, alpha, -alpha


def spd(rng, n: int, jitter: float = 0.5) -> np.ndarray:
    """A random symmetric positive definite ``n × n`` matrix, smallest eigenvalue >= jitter."""
    a = rng.normal(size=(n, n))
    return a @ a.T / n + jitter * np.eye(n)
