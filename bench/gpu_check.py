"""One prepared GPU check: log_prob + gradient and sampling, float32 and float64, large grids.

Run on a machine with a GPU from the repository root::

    PYTHONPATH=. python bench/gpu_check.py --out bench/GPU_RESULTS.md

RBF factors on [0, 1] grids (lengthscale 0.2, no jitter), sigma = 0.1; gradient w.r.t.
the lengthscales and sigma. Each row checks float32 against float64 first, then times
(median of 5 after a warm-up; compile time separately). GPyTorch (Kronecker linear
operator + constant diagonal, float32 and float64, log_prob + backward) runs beside it
where it is installed, for a ratio in the same run on the same card.
"""

import argparse
import json
import platform
import statistics
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)  # a benchmark script, not the library

from kronjax import KroneckerNormal  # noqa: E402

SIZES = [(256, 256), (1024, 1024), (2048, 2048), (64, 64, 64), (128, 128, 128), (256, 256, 256)]


def rbf(x, ell):
    return jnp.exp(-0.5 * jnp.square((x[:, None] - x[None, :]) / ell))


def timed(fn, *args, reps=5):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def kronjax_row(shape, dtype):
    xs = [jnp.linspace(0, 1, n, dtype=dtype) for n in shape]
    y = jax.random.normal(jax.random.PRNGKey(0), (int(np.prod(shape)),), dtype)

    def logp(theta):
        covs = [rbf(x, theta[i]) for i, x in enumerate(xs)]
        return KroneckerNormal(0.0, covs=covs, sigma=theta[-1]).log_prob(y)

    theta = jnp.asarray([0.2] * len(shape) + [0.1], dtype)
    vg = jax.jit(jax.value_and_grad(logp))
    compile_s, vg_s = timed(vg, theta)
    value, grad = vg(theta)
    sample = jax.jit(
        lambda k: KroneckerNormal(0.0, covs=[rbf(x, 0.2) for x in xs], sigma=0.1).sample(k)
    )
    _, sample_s = timed(sample, jax.random.PRNGKey(1))
    return {
        "value": float(value),
        "grad": np.asarray(grad, np.float64).tolist(),
        "compile_s": compile_s,
        "logp_grad_s": vg_s,
        "sample_s": sample_s,
    }


def gpytorch_row(shape, dtype):
    import gpytorch
    import torch
    from linear_operator.operators import (
        ConstantDiagLinearOperator,
        KroneckerProductLinearOperator,
    )

    tdtype = {"float32": torch.float32, "float64": torch.float64}[dtype]
    dev = torch.device("cuda")
    xs = [torch.linspace(0, 1, n, dtype=tdtype, device=dev) for n in shape]
    n = int(np.prod(shape))
    y = torch.randn(n, dtype=tdtype, device=dev)
    theta = torch.tensor([0.2] * len(shape) + [0.1], dtype=tdtype, device=dev, requires_grad=True)

    def step():
        ks = [
            torch.exp(-0.5 * ((x[:, None] - x[None, :]) / theta[i]) ** 2) for i, x in enumerate(xs)
        ]
        noise = ConstantDiagLinearOperator(theta[-1:] ** 2, diag_shape=n)
        cov = KroneckerProductLinearOperator(*ks) + noise
        dist = gpytorch.distributions.MultivariateNormal(
            torch.zeros(n, dtype=tdtype, device=dev), cov
        )
        lp = dist.log_prob(y)
        (g,) = torch.autograd.grad(lp, theta)
        torch.cuda.synchronize()
        return float(lp), g

    with gpytorch.settings.max_cholesky_size(0):
        step()
        times = []
        for _ in range(5):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    return {"logp_grad_s": statistics.median(times)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/GPU_RESULTS.md")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds before stopping")
    args = parser.parse_args()
    start = time.perf_counter()
    device = jax.devices()[0]
    try:
        smi = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip()
    except OSError:
        smi = str(device)
    lines = [
        "# kronjax on a GPU: log_prob + gradient and sampling",
        "",
        f"- device: {smi} (JAX sees {device.device_kind})",
        f"- jax {jax.__version__}, python {platform.python_version()}",
        "- command: `PYTHONPATH=. python bench/gpu_check.py`",
        "- RBF factors on [0, 1] grids, lengthscale 0.2, no jitter, sigma 0.1; gradient "
        "w.r.t. lengthscales and sigma; median of 5 after warm-up",
        "",
        "| grid | N | dtype | logp+grad (ms) | compile (s) | sample (ms) | "
        "rel. err vs f64 (value / grad) | GPyTorch logp+grad (ms) | GPyTorch / kronjax |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    results = []
    for shape in SIZES:
        ref = None
        for dtype in ("float64", "float32"):
            if time.perf_counter() - start > args.budget:
                lines.append(f"| {shape} | stopped: time budget | | | | | | | |")
                break
            row = {"shape": shape, "dtype": dtype}
            try:
                row.update(kronjax_row(shape, dtype))
            except Exception as exc:  # out of memory at the largest sizes, say
                row["error"] = repr(exc)[:200]
            try:
                row["gpytorch"] = gpytorch_row(shape, dtype)
            except Exception as exc:
                row["gpytorch"] = {"error": repr(exc)[:200]}
            results.append(row)
            print(json.dumps(row), flush=True)
            if "error" in row:
                lines.append(f"| {'×'.join(map(str, shape))} | | {dtype} | {row['error']} |||||")
                continue
            if dtype == "float64":
                ref = row
                err = "—"
            else:
                gv, gr = np.asarray(row["grad"]), np.asarray(ref["grad"])
                rel_v = abs(row["value"] - ref["value"]) / abs(ref["value"])
                rel_g = np.max(np.abs(gv - gr)) / np.max(np.abs(gr))
                err = f"{rel_v:.1e} / {rel_g:.1e}"
            gp = row["gpytorch"]
            gp_ms = f"{1e3 * gp['logp_grad_s']:.1f}" if "logp_grad_s" in gp else "n/a"
            ratio = f"{gp['logp_grad_s'] / row['logp_grad_s']:.1f}×" if "logp_grad_s" in gp else ""
            lines.append(
                f"| {'×'.join(map(str, shape))} | {int(np.prod(shape)):,} | {dtype} | "
                f"{1e3 * row['logp_grad_s']:.2f} | {row['compile_s']:.1f} | "
                f"{1e3 * row['sample_s']:.2f} | {err} | {gp_ms} | {ratio} |"
            )
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.out, "w") as f:
        f.write(text)
    with open(args.out.replace(".md", ".json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
