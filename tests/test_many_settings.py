"""``jit(vmap(...))`` over hundreds of hyperparameter settings finishes, on every route.

On CPU jaxlib splits a large batched LAPACK call (``eigh``, ``cholesky``, triangular solve)
over XLA's intra-op thread pool and blocks a pool thread until it is done; two such calls
running at once on a 2-core machine wait on each other forever. kronjax's decompositions
(``kronjax.lapack``) never issue a batched call on a CPU; this runs each route in a fresh
process under a timeout, so a hang fails the test instead of stalling the suite, and checks
the batched values against single-setting calls.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_enable_x64", True)
    import kronjax

    x1, x2 = jnp.linspace(0, 1, 20), jnp.linspace(0, 1, 24)

    def rbf(x, ell):
        return jnp.exp(-0.5 * (x[:, None] - x[None, :]) ** 2 / ell**2)

    def build(route, a, b):
        k1, k2 = rbf(x1, a) + 1e-6 * jnp.eye(20), rbf(x2, b) + 1e-6 * jnp.eye(24)
        if route == "covs":
            return kronjax.KroneckerNormal(0.0, covs=[k1, k2], sigma=0.2)
        if route == "chols":
            # the caller's own two batched choleskies must not run at once either
            l1 = jnp.linalg.cholesky(k1)
            chols = [l1, jnp.linalg.cholesky(k2 + 0 * l1.sum())]
            return kronjax.KroneckerNormal(0.0, chols=chols, sigma=0.2)
        noise = [jnp.eye(20) + 0.5 * rbf(x1, 0.1), jnp.eye(24) + 0.5 * rbf(x2, 0.1)]
        return kronjax.KroneckerNormal(0.0, covs=[k1, k2], sigma=0.2, noise_factors=noise)

    y = jax.random.normal(jax.random.PRNGKey(0), (480,))
    ells = jnp.geomspace(0.05, 1.0, 16)
    e1, e2 = (e.ravel() for e in jnp.meshgrid(ells, ells, indexing="ij"))
    for route in ("covs", "chols", "noise"):
        def value(a, b):
            d = build(route, a, b)
            mean, _ = kronjax.gp.predict(d, y, [rbf(x1, a)[:5], rbf(x2, b)[:6]])
            return d.log_prob(y) + d.entropy() + mean.sum()

        batched = jax.jit(jax.vmap(value))
        for _ in range(10):
            out = jax.block_until_ready(batched(e1, e2))
        one = jax.jit(value)
        for j in (0, 100, 255):
            np.testing.assert_allclose(out[j], one(e1[j], e2[j]), rtol=1e-8)
        print(route, "ok")
    """
)


def test_vmap_over_256_settings_does_not_hang():
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["covs", "ok", "chols", "ok", "noise", "ok"]
