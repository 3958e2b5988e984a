"""Workload 6: peak RSS of one logp+grad on an n³ grid, in a fresh process.

``python -m bench.memory kronjax 128`` prints one JSON line. The baseline is the RSS after
imports, the data and (for kronjax) ahead-of-time compilation; the peak is ``VmHWM`` after a
``/proc/self/clear_refs`` reset, over one call.
"""

import json
import sys


def _status(field):
    """A ``/proc/self/status`` field in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def _reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def main(system, n):
    import jax

    jax.config.update("jax_enable_x64", True)
    from bench import peers
    from bench.common import data, params

    sizes = (n, n, n)
    y, (ells, sigma) = data(sizes), params(sizes)
    if system == "gpytorch":
        import gpytorch  # noqa: F401 - imports belong to the baseline
    before_compile = _status("VmRSS")
    _reset_peak()
    if system == "kronjax":
        import jax.numpy as jnp

        import kronjax
        from bench.common import grids

        xs = [jnp.asarray(x) for x in grids(sizes)]
        yj = jnp.asarray(y)

        def f(e, s):
            covs = [
                jnp.exp(-((x[:, None] - x[None, :]) ** 2) / (2 * e[i] ** 2))
                for i, x in enumerate(xs)
            ]
            return kronjax.KroneckerNormal(0.0, covs=covs, sigma=s).log_prob(yj)

        e, s = jnp.asarray(ells), jnp.asarray(sigma)
        compiled = jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(e, s).compile()
        del yj  # the compiled call holds y as a constant now

        def call():
            return jax.block_until_ready(compiled(e, s))
    else:
        cls = {"gpytorch": peers.GPyTorch, "numpy-eig": peers.NumpyEig}[system]
        fn = cls().logp_grad(sizes, y)

        def call():
            return fn(ells, sigma)

    compile_peak = _status("VmHWM") - before_compile if system == "kronjax" else None
    baseline = _status("VmRSS")
    _reset_peak()
    call()
    peak = _status("VmHWM")
    above = peak - baseline
    print(
        json.dumps(
            dict(
                baseline_mb=baseline,
                peak_mb=peak,
                peak_above_mb=above,
                compile_peak_mb=compile_peak,
                n_times_8N=above * 2**20 / (8 * n**3),
                target_mb=12 * 8 * n**3 / 2**20,
            )
        )
    )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
