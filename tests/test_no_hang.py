"""No deadlock, by construction: every scenario that hung XLA's CPU pool, in fresh processes.

Before ``kronjax.lapack`` these hung in one run of two or three (two distributions in one
vmapped program, a KL term, ``gp.predict`` with noise factors, Python threads). A hang is
intermittent, so each scenario runs several times, each in its own process under a timeout
(``python -m bench.stress`` runs them 20 times each). The batch is smaller than the
stress run's so that CI stays short; the hangs occurred from B = 128 on.
"""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.stress import SCENARIOS, run_once  # noqa: E402
from kronjax import lapack  # noqa: E402

RUNS = 3


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_scenario_never_hangs(name):
    results = [run_once(name, batch=256, timeout=240) for _ in range(RUNS)]
    assert results == ["ok"] * RUNS, results


def _lapack_batch_dims(fn, *args) -> list[str]:
    text = jax.jit(fn).lower(*args).as_text()
    return [
        line.split("num_batch_dims = ")[1].split('"')[1]
        for line in text.splitlines()
        if "lapack_" in line and "num_batch_dims" in line
    ]


def test_vmapped_decompositions_are_unbatched_lapack_calls(rng):
    """Under (nested) vmap every LAPACK call in the lowered program has no batch dim."""
    a = rng.normal(size=(3, 2, 5, 5))
    spd = a @ np.swapaxes(a, -1, -2) + 5 * np.eye(5)
    b = rng.normal(size=(3, 2, 5, 4))

    def f(s, b):
        l = lapack.cholesky(s)
        return lapack.eigh(s)[0].sum() + lapack.solve_triangular(l, b, trans=True).sum()

    dims = _lapack_batch_dims(jax.vmap(jax.vmap(jax.value_and_grad(f, (0, 1)))), spd, b)
    assert dims and set(dims) == {"0"}, dims


def test_lapack_matches_jax_values_and_gradients(rng):
    """Against jnp.linalg / jax.scipy.linalg: values and reverse-mode gradients, batched."""
    a = rng.normal(size=(3, 5, 5))
    spd = a @ np.swapaxes(a, -1, -2) + 5 * np.eye(5)
    b = rng.normal(size=(3, 5, 4))
    tri = jax.scipy.linalg.solve_triangular

    def ours(s, b):
        l = lapack.cholesky(s)
        x = lapack.solve_triangular(l, b) + lapack.solve_triangular(l, b, trans=True)
        return jnp.sum(jnp.sin(x)) + jnp.sum(lapack.eigh(s)[0])

    def theirs(s, b):
        l = jnp.linalg.cholesky(s)
        x = tri(l, b, lower=True) + tri(l, b, lower=True, trans=1)
        return jnp.sum(jnp.sin(x)) + jnp.sum(jnp.linalg.eigvalsh(jax.lax.stop_gradient(s)))

    np.testing.assert_allclose(ours(spd, b), theirs(spd, b), rtol=1e-10)
    for f in (jax.grad, lambda g, **k: jax.vmap(jax.grad(g, **k))):
        got = f(ours, argnums=(0, 1))(spd, b)
        want = f(theirs, argnums=(0, 1))(spd, b)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-8, atol=1e-12)
