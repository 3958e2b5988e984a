"""Workload 5: NUTS on a 2-D grid GP, NumPyro + kronjax vs PyMC, one fresh process per run.

``python -m bench.nuts numpyro-kronjax 32 24`` or ``python -m bench.nuts pymc 32 24
--progress FILE`` prints one JSON line. The model: ``ℓ_i ~ LogNormal(-1.2, 0.6)``,
``σ ~ HalfNormal(0.5)``, ``y ~ KroneckerNormal(0, [k_ℓ1(x1), k_ℓ2(x2)], σ)`` on
``linspace(0, 1, n_i)`` axes; data drawn at ℓ = (0.2, 0.3), σ = 0.1. ``numpyro-normal``
swaps the likelihood for ``y ~ Normal(0, σ)`` i.i.d. (no kronjax): NumPyro's own cost of
compiling and running NUTS on a model of the same shape.
"""

import argparse
import json
import logging
import os
import re
import sys
import time

import numpy as np

PRIOR_LOC, PRIOR_SCALE, SIGMA_SCALE = -1.2, 0.6, 0.5
NOTE = (
    "Both sides: same priors, data, target acceptance 0.8, diagonal mass matrix, 2 chains "
    "run in parallel (NumPyro chain_method='parallel' over 2 forced host devices; PyMC "
    "cores=2, the faster of its NUMBA/CVM modes in workload 1). ESS = min over (ℓ1, ℓ2, σ) "
    "of numpyro's effective_sample_size on the post-warm-up draws; ESS/s uses the wall "
    "time without compilation (NumPyro: wall "
    "time minus the tracing/compile times JAX logs, as NumPyro recompiles on every run; "
    "PyMC: its sampling_time), ESS/s (w/ compile) the full "
    "wall time. Tree depth = log2(leapfrog steps + 1). A PyMC run past its time limit is "
    "killed; its progress (iterations reached, tree depths, step sizes during warm-up) comes "
    "from a per-draw callback."
)


def _data(sizes):
    from bench.common import data

    return data(sizes, seed=1)


def _summary(samples, n_steps, diverging, step_size, wall, wall_compile):
    """Common statistics: ``samples`` maps name -> (chains, draws) arrays."""
    from numpyro.diagnostics import effective_sample_size

    ess = {k: float(effective_sample_size(np.asarray(v, np.float64))) for k, v in samples.items()}
    n_steps = np.asarray(n_steps, np.float64)
    min_ess = min(ess.values())
    return dict(
        ess_min=min_ess,
        ess=ess,
        wall_s=wall,
        wall_compile_s=wall_compile,
        ess_per_s=min_ess / wall if wall > 0 else None,  # None: compile logs cover the run
        ess_per_s_compile=min_ess / wall_compile,
        divergences=int(np.sum(diverging)),
        mean_leapfrog=float(n_steps.mean()),
        mean_tree_depth=float(np.mean(np.log2(n_steps + 1))),
        step_size=[float(s) for s in np.atleast_1d(step_size)],
        means={k: float(np.mean(v)) for k, v in samples.items()},
    )


def run_numpyro(sizes, warmup, draws, chains, seed=0, likelihood="kronjax"):
    """NumPyro NUTS with kronjax (or, ``likelihood="normal"``, an i.i.d. Normal)."""
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from numpyro.infer import MCMC, NUTS

    import kronjax
    from bench.common import grids

    xs = [jnp.asarray(x) for x in grids(sizes)]
    y = jnp.asarray(_data(sizes))

    def model(y):
        ell = numpyro.sample("ell", dist.LogNormal(PRIOR_LOC, PRIOR_SCALE).expand([2]))
        sigma = numpyro.sample("sigma", dist.HalfNormal(SIGMA_SCALE))
        if likelihood == "normal":
            numpyro.sample("y", dist.Normal(0.0, sigma).expand(y.shape).to_event(1), obs=y)
            return
        covs = [
            jnp.exp(-((x[:, None] - x[None, :]) ** 2) / (2 * ell[i] ** 2)) for i, x in enumerate(xs)
        ]
        numpyro.sample("y", kronjax.KroneckerNormal(0.0, covs=covs, sigma=sigma), obs=y)

    method = "parallel" if jax.local_device_count() >= chains else "vectorized"
    mcmc = MCMC(
        NUTS(model),
        num_warmup=warmup,
        num_samples=draws,
        num_chains=chains,
        chain_method=method,
        progress_bar=False,
    )
    timer = _CompileTimer()
    t0 = time.perf_counter()
    mcmc.run(jax.random.key(seed), y, extra_fields=("diverging", "num_steps"))
    jax.block_until_ready(mcmc.get_samples())
    wall_compile = time.perf_counter() - t0
    s = mcmc.get_samples(group_by_chain=True)
    extra = mcmc.get_extra_fields(group_by_chain=True)
    samples = {"ell1": s["ell"][..., 0], "ell2": s["ell"][..., 1], "sigma": s["sigma"]}
    out = _summary(
        samples,
        extra["num_steps"],
        extra["diverging"],
        mcmc.last_state.adapt_state.step_size,
        max(wall_compile - timer.total, 0.0),
        wall_compile,
    )
    out.update(chain_method=method, devices=jax.local_device_count(), compile_s=timer.total)
    return out


class _CompileTimer(logging.Handler):
    """Sums the tracing, lowering and XLA compilation times that JAX logs.

    NumPyro re-traces and re-compiles its ``pmap``-ed sampler on every ``run``, so the
    compile-free wall time is the run's wall time minus these.
    """

    _pat = re.compile(r"Finished (tracing|jaxpr to MLIR|XLA compilation).* in ([0-9.e+-]+) sec")

    def __init__(self):
        super().__init__()
        import jax

        jax.config.update("jax_log_compiles", True)
        self.total = 0.0
        logger = logging.getLogger("jax")
        logger.addHandler(self)
        logger.propagate = False

    def emit(self, record):
        m = self._pat.search(record.getMessage())
        if m:
            self.total += float(m.group(2))


def run_pymc(sizes, warmup, draws, chains, mode="NUMBA", progress=None, seed=0):
    """PyMC NUTS with ``pm.KroneckerNormal``; per-draw stats go to ``progress`` (JSONL)."""
    import pymc as pm

    from bench.common import grids

    y = _data(sizes)
    with pm.Model():
        ell = pm.LogNormal("ell", PRIOR_LOC, PRIOR_SCALE, shape=2)
        sigma = pm.HalfNormal("sigma", SIGMA_SCALE)
        covs = [pm.gp.cov.ExpQuad(1, ls=ell[i])(x[:, None]) for i, x in enumerate(grids(sizes))]
        pm.KroneckerNormal("y", mu=np.zeros(len(y)), covs=covs, sigma=sigma, observed=y)
        fh = open(progress, "w", buffering=1) if progress else None  # noqa: SIM115

        def callback(trace, draw):
            st = {k: v for d in draw.stats for k, v in d.items()}
            fh.write(
                json.dumps(
                    dict(
                        chain=int(draw.chain),
                        tune=bool(draw.tuning),
                        depth=int(st["depth"]),
                        steps=int(st["tree_size"]),
                        step_size=float(st["step_size"]),
                        diverging=bool(st["diverging"]),
                        t=time.time(),
                    )
                )
                + "\n"
            )

        t0 = time.perf_counter()
        idata = pm.sample(
            draws,
            tune=warmup,
            chains=chains,
            cores=chains,
            random_seed=seed,
            progressbar=False,
            compile_kwargs={"mode": mode},
            callback=callback if fh else None,
        )
        wall_compile = time.perf_counter() - t0
    post, st = idata.posterior, idata.sample_stats
    samples = {
        "ell1": post["ell"].values[..., 0],
        "ell2": post["ell"].values[..., 1],
        "sigma": post["sigma"].values,
    }
    out = _summary(
        samples,
        st["n_steps"].values,
        st["diverging"].values,
        st["step_size"].values[:, -1],
        float(st.attrs["sampling_time"]),
        wall_compile,
    )
    out.update(mode=mode, compile_s=max(wall_compile - out["wall_s"], 0.0))
    return out


def progress_summary(path):
    """What a killed PyMC run reached: iterations per chain, tree depth, step size."""
    try:
        with open(path) as f:
            recs = [json.loads(ln) for ln in f if ln.strip()]
    except OSError:
        return {"progress": "no progress file"}
    if not recs:
        return {"progress": "no draw finished"}
    depth = np.array([r["depth"] for r in recs], float)
    steps = np.array([r["steps"] for r in recs], float)
    chains = sorted({r["chain"] for r in recs})
    last_step = [next(r["step_size"] for r in reversed(recs) if r["chain"] == c) for c in chains]
    return dict(
        iterations={str(c): sum(r["chain"] == c for r in recs) for c in chains},
        mean_tree_depth=float(depth.mean()),
        mean_leapfrog=float(steps.mean()),
        step_size=last_step,
        divergences=int(sum(r["diverging"] for r in recs)),
        max_tree_depth_frac=float(np.mean(depth >= 10)),
    )


def fmt(r):
    """One log line for a result row."""
    if "ess_per_s" in r:
        return (
            f"{r['grid']:>6} {r['system']:16s} wall {r['wall_s']:.1f} s "
            f"(+compile {r['compile_s']:.1f} s) ESS {r['ess_min']:.0f} "
            f"ESS/s {r['ess_per_s'] or float('nan'):.1f} div {r['divergences']} "
            f"depth {r['mean_tree_depth']:.2f} step {np.round(r['step_size'], 4).tolist()}"
        )
    return f"{r['grid']:>6} {r['system']:16s} {r.get('note', '')} {r.get('error', '')[-300:]} " + (
        json.dumps({k: r[k] for k in ("iterations", "mean_tree_depth", "step_size") if k in r})
    )


def gradient_check(grids_, log=print, pymc_mode="NUMBA"):
    """Why PyMC collapses: its dlogp vs the dense reference at the NUTS grids."""
    from bench import peers
    from bench.common import lp_grad_err, params

    rows = []
    rng = np.random.default_rng(0)
    for sizes in grids_:
        y = _data(sizes)
        points = [params(sizes)] + [
            (rng.uniform(0.1, 0.5, 2), rng.uniform(0.05, 0.2)) for _ in range(2)
        ]
        systems = [
            s
            for s in (peers.KronJax(), peers.PyMC(pymc_mode), peers.NaiveEigh())
            if not s.skip_note()
        ]
        fns = {s.name: s.logp_grad(sizes, y) for s in systems}
        lam = [
            np.linalg.eigvalsh(peers.rbf_np(x, l)[0])
            for x, l in zip(peers.grids(sizes), points[0][0])
        ]
        tiny = sum(int(np.sum(np.abs(v) < 1e-12 * v.max())) for v in lam)
        for name, fn in fns.items():
            errs = []
            for ells, sigma in points:
                ref = peers.dense_ref(sizes, y, ells, sigma)
                errs.append(lp_grad_err(fn(ells, sigma), ref))
            row = dict(
                grid="×".join(map(str, sizes)),
                system=name,
                err_lp=max(e[0] for e in errs),
                err_grad=max(e[1] for e in errs),
                tiny_eigvals=tiny,
            )
            rows.append(row)
            log(
                f"  grad check {row['grid']:>6} {name:15s} lp {row['err_lp']:.1e} "
                f"grad {row['err_grad']:.1e} ({tiny} factor eigenvalues < 1e-12·max)"
            )
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("system", choices=["numpyro-kronjax", "numpyro-normal", "pymc"])
    p.add_argument("n1", type=int)
    p.add_argument("n2", type=int)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--draws", type=int, default=300)
    p.add_argument("--chains", type=int, default=2)
    p.add_argument("--mode", default="NUMBA")
    p.add_argument("--progress", default=None)
    a = p.parse_args(argv)
    sizes = (a.n1, a.n2)
    if a.system.startswith("numpyro"):
        out = run_numpyro(sizes, a.warmup, a.draws, a.chains, likelihood=a.system[8:])
    else:
        out = run_pymc(sizes, a.warmup, a.draws, a.chains, a.mode, a.progress)
    print(json.dumps(out))


if __name__ == "__main__":
    if any(a.startswith("numpyro") for a in sys.argv):  # before jax is imported
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
        ).strip()
    main()
    sys.stdout.flush()
