"""``python -m bench --quick|--full [--only logp,sample,predict,vmap,nuts,memory]``.

Runs the workloads of issue 4 and writes ``bench/RESULTS.md``, ``bench/results_<mode>.json``
and ``bench/*.png``; each table is printed as well.
"""

import argparse
import datetime
import os
import sys
import time
import traceback
import warnings


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="smaller grids (default)")
    g.add_argument("--full", action="store_true", help="every size of issue 4")
    p.add_argument("--only", default="", help="comma-separated subset of workloads")
    p.add_argument(
        "--pymc-timeout",
        type=float,
        default=None,
        help="wall-clock limit of one PyMC NUTS run (quick 240 s, full 1800 s)",
    )
    p.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    p.add_argument("--report-only", metavar="JSON", help="re-render RESULTS.md and plots")
    a = p.parse_args(argv)
    mode = "full" if a.full else "quick"
    # Before any BLAS loads: OpenBLAS workers idle after a LAPACK call (jaxlib's eigh)
    # spin for 2^28 cycles (~0.1 s) and take a core from XLA's matrix products; 2^20
    # cycles (~0.4 ms) still covers the gaps between the BLAS calls inside one eigh.
    # README, "Speed on a CPU".
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "20")
    if a.report_only:
        import json

        from bench import report

        with open(a.report_only) as f:
            d = json.load(f)
        print(report.write(d["meta"], d["sections"], a.out))
        return

    import jax

    jax.config.update("jax_enable_x64", True)
    warnings.filterwarnings("ignore")
    from bench import report, workloads
    from bench.common import machine, threads_info, versions

    chosen = [w for w in a.only.split(",") if w] or list(workloads.WORKLOADS)
    bad = set(chosen) - set(workloads.WORKLOADS)
    if bad:
        p.error(f"unknown workloads {sorted(bad)}; choose from {list(workloads.WORKLOADS)}")
    meta = dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        command="python -m bench " + " ".join(argv or sys.argv[1:]),
        mode=mode,
        machine=machine(),
        versions=versions(),
        threads=threads_info(),
        load_start=open("/proc/loadavg").read().split()[:3],
    )
    print(f"# kronjax bench, {mode} mode: {', '.join(chosen)}\n# {meta['machine']}", flush=True)
    sections = {}
    for name in chosen:
        print(f"\n== {name} ==", flush=True)
        t0 = time.perf_counter()
        try:
            kw = {}
            if name == "nuts":
                kw = {
                    "pymc_timeout": a.pymc_timeout,
                    "pymc_mode": sections.get("logp", {}).get("pymc_mode", "NUMBA"),
                }
            sections[name] = workloads.WORKLOADS[name](
                mode, log=lambda s: print(s, flush=True), **kw
            )
        except Exception as e:  # noqa: BLE001 - one broken workload must not lose the others
            traceback.print_exc()
            sections[name] = dict(
                key=name, title=name, rows=[], notes=[f"failed: {type(e).__name__}: {e}"]
            )
        sections[name]["seconds"] = time.perf_counter() - t0
        print(f"== {name} done in {sections[name]['seconds']:.0f} s", flush=True)
    meta["load_end"] = open("/proc/loadavg").read().split()[:3]
    md = report.write(meta, sections, a.out)
    print("\n" + md)


if __name__ == "__main__":
    main()
