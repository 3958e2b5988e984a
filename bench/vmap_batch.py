"""Workload 4 on its own process (no torch/PyMC loaded): vmapped batch vs a Python loop.

    PYTHONPATH=. python bench/vmap_batch.py      # writes bench/VMAP.md

B hyperparameter settings (two lengthscales, sigma) of a 32 × 32 RBF grid GP, log_prob and
its gradient: one ``jit(vmap(value_and_grad))`` call against B calls of the jitted
single-setting function. Float64, median of 5 after a warm-up, compile time apart.

Each B runs in its own subprocess with a time limit and up to three tries, so that a hang
is recorded rather than stalling the run. (Concurrent batched ``eigh`` calls deadlocked
XLA's CPU thread pool here at B >= 256 until kronjax's decompositions stopped issuing
batched LAPACK calls; see ``kronjax.lapack`` and README "No hangs on a CPU".)
"""

import datetime
import os
import platform
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

jax.config.update("jax_enable_x64", True)  # a benchmark script, not the library

from kronjax import KroneckerNormal  # noqa: E402

X = jnp.linspace(0.0, 1.0, 32)
Y = KroneckerNormal(0.0, covs=[jnp.exp(-0.5 * ((X[:, None] - X) / 0.2) ** 2)] * 2, sigma=0.1)
Y = Y.sample(jax.random.PRNGKey(0))


def logp(theta):
    covs = [jnp.exp(-0.5 * ((X[:, None] - X) / theta[i]) ** 2) for i in range(2)]
    return KroneckerNormal(0.0, covs=covs, sigma=theta[2]).log_prob(Y)


def median_time(fn, reps=5):
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(b):
    """One row: (vmap s, loop s, vmap compile s, max relative difference)."""
    single = jax.jit(jax.value_and_grad(logp))
    batched = jax.jit(jax.vmap(jax.value_and_grad(logp)))
    thetas = jnp.stack(
        [jnp.linspace(0.1, 0.4, b), jnp.linspace(0.15, 0.35, b), jnp.linspace(0.05, 0.2, b)], 1
    )
    start = time.perf_counter()
    jax.block_until_ready(batched(thetas))
    compile_s = time.perf_counter() - start
    jax.block_until_ready(single(thetas[0]))
    values, _ = batched(thetas)
    loop_values = jnp.stack([single(t)[0] for t in thetas])
    err = float(jnp.max(jnp.abs(values - loop_values) / jnp.abs(loop_values)))
    t_vmap = median_time(lambda: batched(thetas))
    t_loop = median_time(lambda: [single(t) for t in thetas])
    return t_vmap, t_loop, compile_s, err


def main():
    rows = []
    for b in (1, 16, 256, 1024):
        row, tries = None, 0
        while row is None and tries < 3:
            tries += 1
            cmd = [sys.executable, __file__, "--one", str(b)]
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
                row = tuple(map(float, out.stdout.split()))
            except (subprocess.TimeoutExpired, ValueError):
                print(f"B={b}: try {tries} hung or failed", flush=True)
        rows.append((b, row, tries))
        if row:
            tv, tl, c, e = row
            print(
                f"B={b:5d}  vmap {1e3 * tv:9.2f} ms  loop {1e3 * tl:9.2f} ms  "
                f"loop/vmap {tl / tv:6.2f}  compile {c:.2f} s  max rel err {e:.1e}",
                flush=True,
            )
    lines = [
        "# Workload 4: vmapped batch evaluation vs a Python loop (kronjax only)",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        "- command: `PYTHONPATH=. python bench/vmap_batch.py`",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}; "
        f"load average {os.getloadavg()[0]:.2f}",
        f"- versions: python {platform.python_version()}, jax {jax.__version__}",
        "- 32 × 32 RBF grid GP, log_prob + gradient w.r.t. (ℓ₁, ℓ₂, σ), float64; the loop "
        "calls the jitted single-setting function B times; agreement = max relative "
        "difference of the B log densities between the two routes",
        "",
        "| B | vmap (ms) | loop (ms) | loop / vmap | vmap compile (s) | agreement | tries |",
        "|---|---|---|---|---|---|---|",
    ]
    for b, row, tries in rows:
        if row is None:
            lines.append(f"| {b} | deadlocked in {tries} tries (see the docstring) | | | | |")
            continue
        tv, tl, c, e = row
        lines.append(
            f"| {b} | {1e3 * tv:.2f} | {1e3 * tl:.2f} | {tl / tv:.2f}× | {c:.2f} | {e:.1e} "
            f"| {tries} |"
        )
    with open(os.path.join(os.path.dirname(__file__), "VMAP.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:
        print(*measure(int(sys.argv[2])))
    else:
        main()
