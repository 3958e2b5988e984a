"""One timing for A/B comparisons of two checkouts, in a fresh process.

    PYTHONPATH=<checkout> python bench/ab.py logp|sample N D float64|float32

Median of 30 calls (after compilation) of ``jit(value_and_grad(log_prob))`` (``logp``) or of
100 draws with the factorization (``sample``), RBF factors on a D-dimensional N^D grid.
Run it alternately in the two checkouts: on a shared machine the spread between runs is
larger than most differences (``bench/REFACTOR_AB.md``).
"""

import os
import statistics
import sys
import time

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "20")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_enable_x64", True)  # a benchmark script, not the library

from kronjax import KroneckerNormal  # noqa: E402


def main(kind: str, n: int, d: int, dtype: str) -> float:
    x = jnp.linspace(0, 1, n, dtype=dtype)

    def dist(th):
        covs = [jnp.exp(-0.5 * ((x[:, None] - x) / th[i]) ** 2) for i in range(d)]
        return KroneckerNormal(0.0, covs=covs, sigma=th[-1])

    th = jnp.asarray([0.2] * d + [0.3], dtype)
    if kind == "logp":
        y = jnp.asarray(np.random.default_rng(0).normal(size=n**d), dtype)
        fn = jax.jit(jax.value_and_grad(lambda t: dist(t).log_prob(y)))
        call = lambda: fn(th)  # noqa: E731
    else:
        key = jax.random.PRNGKey(0)
        fn = jax.jit(lambda t: dist(t).sample(key, (100,)))
        call = lambda: fn(th)  # noqa: E731
    jax.block_until_ready(call())
    times = []
    for _ in range(30):
        start = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


if __name__ == "__main__":
    print(f"{1e3 * main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]):.3f}")
