"""Where kronjax's logp+grad time goes: ``python -m bench.profile 1024 1024`` (or ``128 128 128``).

Times, on one grid: the factors' eigh (XLA vs LAPACK through SciPy), one rotation pass
(``kronjax.linalg.kron_matvec`` vs a cyclic-GEMM pass in JAX and in NumPy), log_prob
alone, log_prob + gradient, and the gradient's extra cost; counts the transposes and copies
in the optimized HLO. Prints one table and one JSON line.
"""

import json
import math
import sys


def main(sizes):
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import scipy.linalg

    import kronjax
    from bench.common import data, eig_factors, grids, params, rbf_np, rotate, time_call

    y, (ells, sigma) = data(sizes), params(sizes)
    xs = [jnp.asarray(x) for x in grids(sizes)]
    yj, e, s = jnp.asarray(y), jnp.asarray(ells), jnp.asarray(sigma)
    ks_np = [rbf_np(x, l)[0] for x, l in zip(grids(sizes), ells)]
    lam, qs_np = eig_factors(sizes, ells)
    qs = [jnp.asarray(q) for q in qs_np]
    t_np = y.reshape(sizes)

    def covs(e):
        return [
            jnp.exp(-((x[:, None] - x[None, :]) ** 2) / (2 * e[i] ** 2)) for i, x in enumerate(xs)
        ]

    def logp(e, s):
        return kronjax.KroneckerNormal(0.0, covs=covs(e), sigma=s).log_prob(yj)

    def cyclic(t, qs):
        for q in qs:  # one GEMM per mode; the rotated axis moves to the end
            t = t.reshape(q.shape[0], -1).T @ q
        return t

    eigh_jax = jax.jit(lambda e: [jnp.linalg.eigh(k) for k in covs(e)])
    rot_kron = jax.jit(lambda v: kronjax.linalg.kron_matvec([q.T for q in qs], v))
    rot_cyc = jax.jit(lambda t: cyclic(t, qs))
    lp = jax.jit(logp)
    lpg = jax.jit(jax.value_and_grad(logp, argnums=(0, 1)))
    cases = {
        "eigh, XLA (jnp.linalg.eigh)": lambda: jax.block_until_ready(eigh_jax(e)),
        "eigh, LAPACK via scipy (evd)": lambda: [scipy.linalg.eigh(k, driver="evd") for k in ks_np],
        "eigh, LAPACK via scipy (evr)": lambda: [scipy.linalg.eigh(k) for k in ks_np],
        "rotation pass, kron_matvec": lambda: jax.block_until_ready(rot_kron(yj)),
        "rotation pass, cyclic GEMM in JAX": lambda: jax.block_until_ready(
            rot_cyc(yj.reshape(sizes))
        ),
        "rotation pass, cyclic GEMM in NumPy": lambda: rotate(t_np, qs_np, transpose=True),
        "log_prob (jit)": lambda: jax.block_until_ready(lp(e, s)),
        "log_prob + grad (jit)": lambda: jax.block_until_ready(lpg(e, s)),
    }
    res = {}
    for name, fn in cases.items():
        res[name] = time_call(fn, reps=5, budget=2.0)["median_s"]
    res["gradient's extra (lp+grad − lp)"] = res["log_prob + grad (jit)"] - res["log_prob (jit)"]
    hlo = lpg.lower(e, s).compile().as_text()
    counts = {
        op: hlo.count(f" {op}(") for op in ("transpose", "copy", "dot", "fusion", "custom-call")
    }
    n = math.prod(sizes)
    print(f"grid {sizes}, N = {n:,}")
    for k, v in res.items():
        print(f"  {k:38s} {v * 1e3:10.2f} ms")
    print(f"  optimized HLO of log_prob+grad: {counts}")
    print(
        json.dumps(
            dict(sizes=sizes, times_s=res, hlo_ops=counts, lam_min=[float(v.min()) for v in lam])
        )
    )


if __name__ == "__main__":
    import os

    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "20")  # as python -m bench; README, "Speed"
    print(f"OPENBLAS_THREAD_TIMEOUT={os.environ['OPENBLAS_THREAD_TIMEOUT']}")
    main(tuple(int(a) for a in sys.argv[1:]))
