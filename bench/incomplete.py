"""Incomplete grids: kronjax's exact and iterative marginals against BoTorch's LatentKroneckerGP.

    python -m bench.incomplete           # writes bench/INCOMPLETE.md, results_incomplete.json
    python -m bench.incomplete --quick   # 64 × 48 and 128 × 128 only

Two-factor RBF grid GP (axes linspace(0, 1, n_i), ℓ = 0.2, 0.3, σ = 0.1, y a draw of the model, seed
0), a random fraction of cells missing (seed 1); log likelihood of the observed cells and its
gradient w.r.t. (ℓ₁, ℓ₂, σ), float64, by kronjax ``marginal(mask, method="exact")`` (m ≤ 3000
missing only) and ``method="iterative"`` (defaults: tol 1e-6, 16 probes, probe_tol 1e-2,
precond_rank r·N ≤ 2²⁰ and at least 96 at 128², 112 at 256², 128 from 512², 40 Lanczos steps at
most), each a ``jit(value_and_grad)`` compiled ahead; BoTorch's ``LatentKroneckerGP`` (RBF X and T
kernels, no ScaleKernel or transforms): ``-ExactMarginalLogLikelihood`` under
``use_iterative_methods()`` as in BoTorch's tests, forward + backward, times n_obs; dense SciPy
Cholesky, the reference for N ≤ 6000. Warm-up, then the median of the calls in 2 s (at least 3, at
most 31); one subprocess per (problem, system), three for kronjax iterative and BoTorch, run
alternately, their median taken (one process's time drifts by up to 1.5× with the host: 256², 60%
missing took 0.20 s in one process and 0.30 s in another); a call over 60 s is "skipped (time)",
as are that system's larger grids at that fraction. "iterative (BoTorch-like)" is the iterative
route at GPyTorch's settings (tol 1e-2, 10 probes, 20 Lanczos steps). Where neither the dense nor
the exact route runs, kronjax's iterative route at ``TIGHT`` settings is the (self-consistency)
reference. A sweep over m locates the exact/iterative crossover for "auto".
"""

import argparse
import datetime
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "20")  # as bench/__main__.py

import numpy as np  # noqa: E402
import scipy.linalg  # noqa: E402

from bench.common import data, grids, rbf_np, rel_err, versions  # noqa: E402

ELLS, SIGMA = (0.2, 0.3), 0.1
GRIDS = ((64, 48), (128, 128), (256, 256), (512, 512))
FRACS = (0.1, 0.3, 0.6)
SWEEP_M = (64, 256, 512, 1024, 2048, 3000)
ROUNDS = 3  # processes per (problem, system) for kronjax iterative and BoTorch, alternating
EXACT_MAX_M, DENSE_MAX_N, CALL_CAP_S = 3000, 6000, 60.0
MATCHED = dict(tol=1e-2, probes=10, lanczos_steps=20)  # GPyTorch's under use_iterative_methods
TIGHT = dict(tol=1e-10, probe_tol=1e-8, precond_rank=256, lanczos_steps=200)  # large-N reference
SWEEP_MAX_MN = 7e7  # the exact route peaks near 10 m N doubles (2 GB at m 1638, N 16384)
HERE = os.path.dirname(os.path.abspath(__file__))  # outputs go here; jobs run from its parent


def problem(sizes, m):
    """``y`` (N,) and the observed mask (N,) with m cells missing."""
    mask = np.ones(math.prod(sizes), bool)
    mask[np.random.default_rng(1).choice(mask.size, m, replace=False)] = False
    return data(sizes, seed=0), mask


def kronjax_route(sizes, y, mask, method, **options):
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)  # a benchmark script, not the library
    from kronjax import KroneckerNormal

    xs, yo, theta = (
        [jnp.asarray(x) for x in grids(sizes)],
        jnp.asarray(y[mask]),
        jnp.array([*ELLS, SIGMA]),
    )

    def marginal(th):
        covs = [jnp.exp(-0.5 * ((x[:, None] - x) / ell) ** 2) for x, ell in zip(xs, th)]
        return KroneckerNormal(0.0, covs=covs, sigma=th[2]).marginal(mask, method=method, **options)

    start = time.perf_counter()
    fn = jax.jit(jax.value_and_grad(lambda th: marginal(th).log_prob(yo))).lower(theta).compile()
    extra = {"compile_s": time.perf_counter() - start}
    if options or method == "iterative":
        info = jax.jit(lambda th: marginal(th).solver_info(yo))(theta)
        extra.update(iterations=int(info.iterations), residual=float(info.residual))
    return lambda: tuple(map(np.asarray, jax.block_until_ready(fn(theta)))), extra


def botorch_route(sizes, y, mask):
    import torch
    from botorch.models.latent_kronecker_gp import LatentKroneckerGP
    from gpytorch.kernels import RBFKernel
    from gpytorch.mlls import ExactMarginalLogLikelihood
    from linear_operator import settings

    torch.set_num_threads(2)
    tk = dict(dtype=torch.float64)
    x, t = (torch.tensor(g, **tk)[:, None] for g in grids(sizes))
    Y = torch.tensor(np.where(mask, y, np.nan).reshape(sizes), **tk)
    model = LatentKroneckerGP(
        x, t, Y, covar_module_X=RBFKernel(), covar_module_T=RBFKernel(), outcome_transform=None
    ).to(**tk)
    model.covar_module_X.lengthscale, model.covar_module_T.lengthscale = ELLS
    model.likelihood.noise = SIGMA**2
    model.train()
    mll = ExactMarginalLogLikelihood(model.likelihood, model)
    raw = [
        model.covar_module_X.raw_lengthscale,
        model.covar_module_T.raw_lengthscale,
        model.likelihood.noise_covar.raw_noise,
    ]  # ℓ = softplus(raw), σ² = 1e-4 + softplus(raw)
    n_obs = int(mask.sum())

    def call():
        torch.manual_seed(0)  # GPyTorch's trace probes
        model.zero_grad()
        with model.use_iterative_methods():
            loss = -mll(model(*model.train_inputs), model.train_targets)
            loss.backward()
        g = np.array([p.grad.item() / torch.sigmoid(p).item() for p in raw])
        g[2] *= 2 * SIGMA  # d/dσ = 2σ d/dσ²
        return -loss.item() * n_obs, -g * n_obs

    with model.use_iterative_methods():  # what is in force inside, for the record
        used = {
            k: getattr(settings, k).value()
            for k in (
                "cg_tolerance",
                "max_cg_iterations",
                "max_cholesky_size",
                "num_trace_samples",
                "max_lanczos_quadrature_iterations",
                "max_preconditioner_size",
            )
        }
    used["path"] = "Cholesky" if n_obs <= used["max_cholesky_size"] else "CG"
    return call, {"settings": used}


def dense_route(sizes, y, mask):
    (k1, d1), (k2, d2) = (rbf_np(x, ell) for x, ell in zip(grids(sizes), ELLS))
    o = np.flatnonzero(mask)

    def call():
        sub = lambda a, b: np.kron(a, b)[np.ix_(o, o)]  # noqa: E731
        cf = scipy.linalg.cho_factor(sub(k1, k2) + SIGMA**2 * np.eye(o.size), lower=True)
        alpha = scipy.linalg.cho_solve(cf, y[o])
        w = np.outer(alpha, alpha) - scipy.linalg.cho_solve(cf, np.eye(o.size))
        grad = [0.5 * np.sum(w * sub(d1, k2)), 0.5 * np.sum(w * sub(k1, d2)), SIGMA * np.trace(w)]
        logdet = 2 * np.sum(np.log(np.diag(cf[0])))
        return -0.5 * (y[o] @ alpha + logdet + o.size * math.log(2 * math.pi)), np.array(grad)

    return call, {}


def measure(job):
    """One (problem, system) in this process; a call past CALL_CAP_S ends the process."""
    sizes, system, load = tuple(job["grid"]), job["system"], os.getloadavg()[0]
    route = {"botorch": botorch_route, "dense": dense_route}.get(system)
    args = (sizes, *problem(sizes, job["m"]))
    if system in ("matched", "tight"):
        options = MATCHED if system == "matched" else TIGHT
        route = lambda *a: kronjax_route(*a, "iterative", **options)  # noqa: E731
    call, out = route(*args) if route else kronjax_route(*args, system)
    skipped = json.dumps(dict(out, status="skipped (time)", load=load))
    times = []
    while len(times) < 4 or (len(times) < 32 and sum(times[1:]) < 2.0):  # warm-up + 3 to 31
        watchdog = threading.Timer(CALL_CAP_S, lambda: (print(skipped, flush=True), os._exit(0)))
        watchdog.start()
        start = time.perf_counter()
        value, grad = call()
        times.append(time.perf_counter() - start)
        watchdog.cancel()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    return dict(
        out,
        status="ok",
        time_s=statistics.median(times[1:]),
        first_s=times[0],
        load=load,
        reps=len(times) - 1,
        loglik=float(value),
        grad=grad.tolist(),
        peak_mb=rss,
    )


def run_job(job):
    cmd = [sys.executable, "-m", "bench.incomplete", "--one", json.dumps(job)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
    try:
        return dict(job, **json.loads(proc.stdout.strip().splitlines()[-1]))
    except (IndexError, json.JSONDecodeError):
        return dict(job, status="failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1][:200])


def ok(*rs):
    return all(r and r["status"] == "ok" for r in rs)


def errs(r, ref):
    """Relative errors (loglik, max-norm gradient) of r against ref, or Nones."""
    ll = abs(r["loglik"] - ref["loglik"]) / abs(ref["loglik"]) if ok(r, ref) else None
    return ll, rel_err(r["grad"], ref["grad"]) if ll is not None else None


def ratio(a, b):
    return a["time_s"] / b["time_s"] if ok(a, b) else None


def pooled(runs):
    """Runs of one job in several processes as one: the first that finished, its ``time_s``
    the median over those that finished, their times in ``rounds`` (where two or more did)."""
    done = [r for r in runs if ok(r)]
    if len(done) < 2:
        return (done or runs)[0]
    rounds = [r["time_s"] for r in done]
    return dict(done[0], rounds=rounds, time_s=statistics.median(rounds))


def run_all(quick):
    rows, sweep, slow = [], [], set()
    for sizes in GRIDS[: 2 if quick else 4]:
        for frac in FRACS:
            n, m = math.prod(sizes), round(frac * math.prod(sizes))
            row = {"grid": list(sizes), "N": n, "frac": frac, "m": m}
            systems = ["dense"] * (n <= DENSE_MAX_N) + ["exact"] * (m <= EXACT_MAX_M)
            systems += ["tight"] * (n > DENSE_MAX_N and m > EXACT_MAX_M)
            paired = ["iterative", "botorch"] * ROUNDS  # interleaved: the host's drift hits both
            runs = {}
            for s in systems + ["matched"] + paired:
                job = {"grid": list(sizes), "m": m, "system": s}
                run = dict(job, status="skipped (time)") if (s, frac) in slow else run_job(job)
                if run["status"] == "skipped (time)":
                    slow.add((s, frac))  # a larger grid would be slower still
                runs.setdefault(s, []).append(run)
                print(f"{sizes} m={m} {s}: {cell(run)}", flush=True)
            row.update((s, pooled(r)) for s, r in runs.items())
            refs = [s for s in ("dense", "exact", "tight") if ok(row.get(s))]
            row["ref"] = refs[0] if refs else None
            for s in ("exact", "iterative", "matched", "botorch"):
                row[f"err_{s}"] = errs(row.get(s), row.get(row["ref"]))
            row["iterative_vs_botorch"] = errs(row["iterative"], row["botorch"])
            rows.append(row)
    for sizes in GRIDS[: 2 if quick else 3]:
        n = math.prod(sizes)
        for m in (m for m in SWEEP_M if m <= 0.6 * n and m * n <= SWEEP_MAX_MN):
            p = {
                s: run_job({"grid": list(sizes), "m": m, "system": s})
                for s in ("exact", "iterative")
            }
            p.update(
                grid=list(sizes),
                N=n,
                m=m,
                ratio=ratio(p["exact"], p["iterative"]),
                err=errs(p["iterative"], p["exact"]),
            )
            print(f"sweep {sizes} m={m}: {cell(p['exact'])} / {cell(p['iterative'])}", flush=True)
            sweep.append(p)
    return rows, sweep


def crossover(points):
    """Per grid, the m where exact/iterative time = 1, by a least-squares line through
    log(ratio) vs log(m) over the swept m; only where the measured ratios straddle 1."""
    out = {}
    for grid in sorted({tuple(g) for g, _, _ in points}):
        pts = [(math.log(m), math.log(q)) for g, m, q in points if tuple(g) == grid and q]
        if len(pts) > 1 and min(q for _, q in pts) < 0 < max(q for _, q in pts):
            slope, icpt = np.polyfit(*zip(*pts), 1)
            out[f"{grid[0]}×{grid[1]}"] = round(math.exp(-icpt / slope))
    return out


def cell(r, spec=None):
    if spec or r is None or isinstance(r, float):  # a number
        return "—" if r is None else format(r, spec)
    if r["status"] != "ok":
        return r["status"]
    chol = r.get("settings", {}).get("path") == "Cholesky"
    spread = f" [{min(r['rounds']):.3g}–{max(r['rounds']):.3g}]" if "rounds" in r else ""
    return f"{r['time_s']:.3g} s" + spread + " (Cholesky)" * chol


def observations(rows, sweep, cross):
    """The paragraph under the tables, from the numbers."""
    from kronjax import distribution as kd

    cells = getattr(kd, "AUTO_EXACT_MAX_CELLS", None)
    now = f"{kd.AUTO_EXACT_MAX_MISSING}" + (f" and m·N ≤ {cells}" if cells else "")
    span = lambda xs, f=".2f": f"{min(xs):{f}}–{max(xs):{f}}" if xs else "—"  # noqa: E731
    at = lambda m: [p["ratio"] for p in sweep if p["m"] == m and p["ratio"]]  # noqa: E731
    lo, hi = (min(cross.values()), max(cross.values())) if cross else (0, 0)
    rec = [k for k in range(64, 4097, 64) if lo <= k <= hi] or (
        [64 * round(statistics.median(cross.values()) / 64)] if cross else ["? (no crossover)"]
    )
    loads = [
        x["load"] for d in rows + sweep for x in d.values() if isinstance(x, dict) and "load" in x
    ]
    big = max((p for p in sweep if ok(p["exact"])), key=lambda p: p["m"] * p["N"], default=None)
    text = (
        "**Exact vs iterative.** Equal times (log-log fit over the swept m) at "
        + (", ".join(f"m ≈ {m} on {g}" for g, m in cross.items()) or "no swept m")
        + " (a grid not listed: the iterative route was the faster at every swept m); both "
        "routes cost O(N Σn_i) per missing cell or per operator application. Exact takes "
        f"{span(at(512))} × the "
        f"iterative time at m = 512 and {span(at(1024))} × at m = 1024, and it is exact, "
        "while the iterative gradient is off by the relative errors in the tables. So "
        f"`AUTO_EXACT_MAX_MISSING` should be about {' or '.join(map(str, rec))} (kronjax has "
        f"{now})"
    )
    if big:
        text += (
            f", with a cap on m·N too: the exact route's peak RSS was "
            f"{big['exact']['peak_mb'] / 1024:.1f} GiB at m·N = {big['m'] * big['N']:.2g} "
            f"({big['grid'][0]}×{big['grid'][1]}, m = {big['m']})"
        )
    q = lambda s: [x for r in rows if (x := ratio(r[s], r["botorch"]))]  # noqa: E731
    e = lambda s, k=0: [
        r[f"err_{s}"][k]
        for r in rows
        if r[f"err_{s}"][0] is not None  # noqa
        and r["ref"] != s
        and r[s].get("settings", {}).get("path") != "Cholesky"
    ]
    d = [
        r["iterative_vs_botorch"][0]
        for r in rows
        if r["ref"] is None and ok(r["botorch"]) and r["iterative_vs_botorch"][0] is not None
    ]
    text += (
        ". **Iterative vs BoTorch.** Time ratio iterative / BoTorch per row (< 1: kronjax "
        "faster): "
        + ", ".join(
            f"{r['grid'][0]}×{r['grid'][1]} {100 * r['frac']:.0f}% {x:.2f}"
            for r in rows
            if (x := ratio(r["iterative"], r["botorch"]))
        )
        + f"; at BoTorch-like settings {span(q('matched'))}. BoTorch below n_obs 4096 is "
        f"a dense Cholesky (exact). Log-likelihood relative errors: kronjax iterative "
        f"{span(e('iterative'), '.1e')} (gradient {span(e('iterative', 1), '.1e')}), "
        f"BoTorch-like {span(e('matched'), '.1e')} (gradient "
        f"{span(e('matched', 1), '.1e')}), BoTorch on its CG path {span(e('botorch'), '.1e')}"
        f" (gradient {span(e('botorch', 1), '.1e')}); without a reference the two "
        f"iterative estimates differ by {span(d, '.1e')} relative. **Caveat.** The 2 cores "
        f"were shared with other work (load average {span(loads, '.1f')} at job starts), "
        "so single times can be off by up to 2× and ratios near 1 are within noise."
    )
    return text


def meta():
    """Date, machine and versions, taken when the run ends."""
    sh = lambda c: subprocess.run(c, shell=True, capture_output=True, text=True).stdout.strip()  # noqa: E731
    v = dict(versions(), botorch=__import__("botorch").__version__)
    commit = sh("git -C /work/main rev-parse --short HEAD")
    commit += " + uncommitted kronjax/ changes" * bool(sh("git -C /work/main status -s kronjax"))
    return dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        kronjax=commit,
        machine=sh("lscpu | sed -n 's/^Model name:[ ]*//p'"),
        nproc=sh("nproc"),
        platform=platform.platform(),
        versions={
            k: v[k]
            for k in (
                "python",
                "jax",
                "jaxlib",
                "numpyro",
                "torch",
                "gpytorch",
                "linear_operator",
                "botorch",
            )
        },
    )


def report(res):
    rows, sweep, quick, wall, v = (res[k] for k in ("rows", "sweep", "quick", "wall_s", "versions"))
    loads = [
        x["load"] for d in rows + sweep for x in d.values() if isinstance(x, dict) and "load" in x
    ]
    bt = next((r["botorch"]["settings"] for r in rows if "settings" in r["botorch"]), {})
    cross = crossover([(p["grid"], p["m"], p["ratio"]) for p in sweep])
    lines = [
        "# Incomplete grids: exact vs iterative marginal vs BoTorch LatentKroneckerGP",
        "",
        f"- date {res['date']}, wall {wall / 60:.0f} min;"
        f" command `python -m bench.incomplete{' --quick' * quick}` (from /work/main)",
        f"- machine: {res['machine']}, nproc {res['nproc']}, {res['platform']}; torch threads "
        f"2, XLA default; load average at job starts {min(loads):.1f}–{max(loads):.1f}",
        "- versions: "
        + ", ".join(f"{k} {x}" for k, x in v.items())
        + f", kronjax {res['kronjax']}",
        "- problem and methods: the docstring of `bench/incomplete.py`. BoTorch settings in force "
        "under `use_iterative_methods()`: "
        + ", ".join(f"{k} {x}" for k, x in bt.items() if k != "path")
        + "; BoTorch's import sets max_cholesky_size 4096, so n_obs ≤ 4096 is a dense Cholesky",
        "- errors: relative error of the log likelihood (in brackets: max-norm relative error "
        "of the gradient) against the dense Cholesky where N ≤ 6000, else kronjax exact where it "
        "ran, else kronjax iterative at tight settings (`TIGHT`: tol 1e-10, probe_tol 1e-8, "
        "rank 256, 200 Lanczos steps; a self-consistency reference, not an independent one); "
        "CG iterations of the data solve from `solver_info` (also where the timing was skipped)",
        "- times: per process the median of its calls; kronjax iterative and BoTorch the median "
        f"of {ROUNDS} processes run alternately, [their range]",
        "",
        "| grid | N | missing % | m | time exact | time iterative | time BoTorch | iterative / "
        "BoTorch | exact / iterative | CG iterations (kronjax) | rel. err exact | rel. err "
        "iterative | rel. err BoTorch | time iterative (BoTorch-like) | rel. err iterative "
        "(BoTorch-like) |",
        "|" + "---|" * 15,
    ]
    for r in rows:
        e = [
            ("reference" if r["ref"] == s else f"{a:.1e} ({b:.1e})" if a is not None else "—")
            for s in ("exact", "iterative", "botorch", "matched")
            for a, b in [r[f"err_{s}"]]
        ]
        lines.append(
            f"| {r['grid'][0]}×{r['grid'][1]} | {r['N']} | {100 * r['frac']:.0f} | {r['m']} "
            f"| {cell(r.get('exact'))} | {cell(r['iterative'])} | {cell(r['botorch'])} "
            f"| {cell(ratio(r['iterative'], r['botorch']), '.2f')} "
            f"| {cell(ratio(r.get('exact'), r['iterative']), '.2f')} "
            f"| {r['iterative'].get('iterations', '—')} | {' | '.join(e[:3])} "
            f"| {cell(r['matched'])} | {e[3]} |"
        )
    lines += [
        "",
        "Crossover sweep (errors of iterative against exact):",
        "",
        "| grid | N | m | time exact | time iterative | exact / iterative | CG iterations "
        "| compile exact / iterative | peak RSS exact / iterative | rel. err iterative |",
        "|" + "---|" * 10,
    ]
    for p in sweep:
        ex, it = p["exact"], p["iterative"]
        lines.append(
            f"| {p['grid'][0]}×{p['grid'][1]} | {p['N']} | {p['m']} | {cell(ex)} | {cell(it)} "
            f"| {cell(p['ratio'], '.2f')} | {it.get('iterations', '—')} "
            f"| {cell(ex.get('compile_s'), '.1f')} / {cell(it.get('compile_s'), '.1f')} s "
            f"| {cell(ex.get('peak_mb'), '.0f')} / {cell(it.get('peak_mb'), '.0f')} MB "
            f"| {cell(p['err'][0], '.1e')} ({cell(p['err'][1], '.1e')}) |"
        )
    lines += ["", "## Observations", "", observations(rows, sweep, cross), ""]
    with open(os.path.join(HERE, "INCOMPLETE.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(HERE, "results_incomplete.json"), "w") as f:
        json.dump(dict(res, crossover=cross), f, indent=1)
    print("\n".join(lines))


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m bench.incomplete",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="only 64×48 and 128×128")
    p.add_argument("--report-only", metavar="JSON", help="re-render INCOMPLETE.md from results")
    p.add_argument("--one", metavar="JSON", help=argparse.SUPPRESS)  # one subprocess job
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(measure(json.loads(a.one))), flush=True)
        return
    if a.report_only:
        with open(a.report_only) as f:
            return report(json.load(f))
    start = time.perf_counter()
    rows, sweep = run_all(a.quick)
    res = dict(meta(), quick=a.quick, wall_s=time.perf_counter() - start, rows=rows, sweep=sweep)
    with open(os.path.join(HERE, "results_incomplete.json"), "w") as f:  # raw, in case
        json.dump(res, f)
    report(res)


if __name__ == "__main__":
    main()
