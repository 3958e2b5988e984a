"""Throughput of sharded batch evaluation vs device count, on forced host CPU devices.

B settings of the lengthscales of a 32×32 grid, ``log_prob`` and its gradient, the batch
axis split over 1, 2 and 4 devices (``NamedSharding(mesh, P("batch"))``). Each device
count runs in its own subprocess, since ``XLA_FLAGS`` must be set before jax starts.
Also records the per-device memory of one grid split across 4 devices
(``compiled.memory_analysis()``) for ``docs/multi_device.md``. Writes
``bench/SHARDED.md``::

    python -m bench.sharded_batch
"""

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

BATCH, SIZES, REPEATS = 256, (32, 32), 5
COUNTS = (1, 2, 4)
GRIDS = ((64, 64, 32), (128, 64, 64), (128, 128, 64))  # for the memory of a split grid


def _problem():
    import jax
    import jax.numpy as jnp
    import numpy as np

    import kronjax

    xs = [jnp.linspace(0, 1, n) for n in SIZES]
    y = jnp.asarray(np.random.default_rng(0).normal(size=int(np.prod(SIZES))))

    def log_prob(ells, sigma):
        covs = [jnp.exp(-((x[:, None] - x[None, :]) ** 2) / (2 * e**2)) for x, e in zip(xs, ells)]
        return kronjax.KroneckerNormal(0.0, covs=covs, sigma=sigma).log_prob(y)

    rng = np.random.default_rng(1)
    ells = rng.uniform(0.1, 0.5, (BATCH, len(SIZES)))
    sigmas = rng.uniform(0.05, 0.3, BATCH)
    return jax.jit(jax.vmap(jax.value_and_grad(log_prob, argnums=(0, 1)))), ells, sigmas


def worker(count: int) -> dict:
    """Time the batch on ``count`` devices; check it against one device first."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    jax.config.update("jax_enable_x64", True)
    f, ells, sigmas = _problem()
    mesh = jax.make_mesh((count,), ("batch",), devices=jax.devices()[:count])
    args = jax.device_put((ells, sigmas), NamedSharding(mesh, P("batch")))
    ref = jax.jit(f)(ells, sigmas)
    out = jax.block_until_ready(f(*args))  # warm-up and compile
    err = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b)) / (np.abs(np.asarray(b)) + 1e-300)))
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True)
    )
    times = []
    for _ in range(REPEATS):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t)
    best = min(times)
    return {"devices": count, "seconds": best, "per_s": BATCH / best, "max_rel_err": err}


def memory_worker() -> list[dict]:
    """Per-device memory of log_prob + gradient on a grid split over 4 devices."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import kronjax
    from kronjax import sharding

    jax.config.update("jax_enable_x64", True)
    mesh = sharding.batch_mesh(axis="grid")
    rows = []
    for sizes in GRIDS:
        n = int(np.prod(sizes))

        def loss(covs, y, sizes=sizes):
            return kronjax.KroneckerNormal(0.0, covs=covs, sigma=0.1).log_prob(y)

        covs = [jnp.eye(k) for k in sizes]
        covs = jax.device_put(covs, NamedSharding(mesh, P()))
        y = sharding.shard_grid(np.zeros(n), sizes, mesh)
        fn = jax.jit(sharding.split_grid(jax.value_and_grad(loss, argnums=(0, 1)), mesh))
        mem = fn.lower(covs, y).compile().memory_analysis()
        block = n // 4 * 8  # bytes of one device's N / P float64 block
        rows.append(
            {
                "sizes": list(sizes),
                "N": n,
                "temp_bytes": mem.temp_size_in_bytes,
                "arg_bytes": mem.argument_size_in_bytes,
                "out_bytes": mem.output_size_in_bytes,
                "temp_blocks": mem.temp_size_in_bytes / block,
            }
        )
    return rows


def _run(arg: str, count: int):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={count}")
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(
        [sys.executable, "-m", "bench.sharded_batch", arg],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=root,
        timeout=600,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    import jax
    import numpyro

    rows = [_run(str(c), c) for c in COUNTS]
    memory = _run("memory", 4)
    base = rows[0]["per_s"]
    lines = [
        "# Sharded batch evaluation vs device count",
        "",
        f"B = {BATCH} lengthscale settings of a {SIZES[0]}×{SIZES[1]} grid (RBF factors, σ "
        "per setting), `jax.jit(jax.vmap(jax.value_and_grad(log_prob)))` with the batch axis "
        'placed by `NamedSharding(mesh, P("batch"))`, float64, best of '
        f"{REPEATS} after a warm-up, each device count in its own process.",
        "",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}",
        f"- versions: python {platform.python_version()}, jax {jax.__version__}, "
        f"numpyro {numpyro.__version__}",
        "- command: `python -m bench.sharded_batch`",
        f"- date: {datetime.date.today().isoformat()}",
        "",
        "The devices are forced host devices (`--xla_force_host_platform_device_count`) "
        "that share the same physical cores, so the speed-up is bounded by the core count "
        f"({os.cpu_count()} here) and these numbers show the overhead of sharding, not scaling.",
        "",
        "| devices | seconds per batch | settings / s | speed-up | max rel. error vs 1 device |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['devices']} | {r['seconds']:.4f} | {r['per_s']:.0f} | "
            f"{r['per_s'] / base:.2f} | {r['max_rel_err']:.1e} |"
        )
    lines += [
        "",
        "## Per-device memory of one grid split over 4 devices",
        "",
        "`log_prob` and its gradient (w.r.t. the factors and the value) under "
        "`kronjax.sharding.split_grid`, from `compiled.memory_analysis()`; a block is one "
        "device's share of an N-vector, N / 4 float64 values.",
        "",
        "| grid | N | temp bytes | arguments | outputs | temp / block |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for m in memory:
        grid = "×".join(map(str, m["sizes"]))
        lines.append(
            f"| {grid} | {m['N']} | {m['temp_bytes']} | {m['arg_bytes']} | {m['out_bytes']} | "
            f"{m['temp_blocks']:.1f} |"
        )
    out = Path(__file__).with_name("SHARDED.md")
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    if len(sys.argv) > 1:
        arg = sys.argv[1]
        print(json.dumps(memory_worker() if arg == "memory" else worker(int(arg))))
    else:
        main()
