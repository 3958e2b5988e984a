"""logp+grad and sampling on a GPU, float32 and float64: kronjax vs GPyTorch (CUDA).

``python -m bench.gpu OUTFILE`` writes the rows as JSON (``{"meta", "rows"}``); ``python -m
bench`` adds them to RESULTS.md when ``bench/results_gpu.json`` exists. Agreement: every
row against kronjax float64 on the same device.
"""

# ruff: noqa: B023 - the closures in loops are called within the iteration that makes them

import datetime
import json
import platform
import sys

SIZES = {2: [256, 512, 1024, 2048], 3: [64, 128, 256]}


def main(outfile):
    import jax

    jax.config.update("jax_enable_x64", True)
    import torch

    from bench import peers
    from bench.common import CAP_S, data, lp_grad_err, params, time_call
    from bench.workloads import chi2_z, grid_name

    dev = jax.devices()[0]
    meta = dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        jax_device=str(dev),
        torch_device=torch.cuda.get_device_name(0),
        jax=jax.__version__,
        torch=torch.__version__,
        python=platform.python_version(),
    )
    print(meta, flush=True)
    systems = [
        peers.KronJax(),
        peers.KronJax("float32"),
        peers.GPyTorch(device="cuda"),
        peers.GPyTorch(dtype="float32", device="cuda"),
    ]
    for s in systems[2:]:
        s.name += "-cuda"
    rows, stopped = [], set()
    for d in (2, 3):
        for n in SIZES[d]:
            sizes = (n,) * d
            y, (ells, sigma) = data(sizes), params(sizes)
            ref = None
            for s in systems:
                if s.name in stopped:
                    continue
                base = dict(grid=grid_name(sizes), N=n**d, d=d, system=s.name, dtype=s.dtype)
                try:
                    fn = s.logp_grad(sizes, y)
                    t = time_call(lambda: fn(ells, sigma))
                    out = t.pop("out")
                    if ref is None:
                        ref = (out[0], out[1])
                    el, eg = lp_grad_err(out, ref)
                    rows.append(dict(base, workload="logp", err_lp=el, err_grad=eg, **t))
                    print(
                        f"logp {base['grid']:>6} {s.name:18s} {t['median_s'] * 1e3:9.3f} ms "
                        f"err {el:.1e}/{eg:.1e}",
                        flush=True,
                    )
                    if t["median_s"] > CAP_S:
                        stopped.add(s.name)
                    k = min(64, max(4, 2**26 // n**d))
                    seeds = iter(range(10**6))
                    fn = s.sampler(sizes, k)
                    t = time_call(lambda: fn(ells, sigma, next(seeds)))
                    x = t.pop("out")
                    rows.append(
                        dict(
                            base,
                            workload="sample",
                            draws=k,
                            draws_per_s=k / t["median_s"],
                            chi2_z=chi2_z(sizes, x, ells, sigma),
                            **t,
                        )
                    )
                    print(
                        f"sample {base['grid']:>6} {s.name:18s} {k / t['median_s']:.3g} "
                        f"draws/s z {rows[-1]['chi2_z']:+.2f}",
                        flush=True,
                    )
                except Exception as e:  # noqa: BLE001 - e.g. out of memory: report, go on
                    rows.append(dict(base, note=f"error: {type(e).__name__}: {e}"[:200]))
                    print(rows[-1], flush=True)
                    stopped.add(s.name)
                    torch.cuda.empty_cache()
                with open(outfile, "w") as f:
                    json.dump({"meta": meta, "rows": rows}, f, indent=1, default=str)


if __name__ == "__main__":
    main(sys.argv[1])
