"""kronjax logp+grad under three OpenBLAS idle-wait settings: ``python -m bench.openblas_wait``.

jaxlib's ``eigh`` calls LAPACK from SciPy's OpenBLAS, whose idle workers busy-wait for
``2 ** OPENBLAS_THREAD_TIMEOUT`` cycles (default 28, about 0.1 s) after each call and then
compete with XLA's threads for the cores. Each setting runs in a fresh process (OpenBLAS
reads the variable when it loads), twice, interleaved; the table gives the better median of
the two per setting and the ratio to the default. Writes ``bench/OPENBLAS_WAIT.md``.
"""

import datetime
import json
import os
import subprocess
import sys

SETTINGS = ("28", "20", "4")  # OpenBLAS's default, the README's advice, the shortest wait
SIZES = ((256, 256), (512, 512), (1024, 1024), (64, 64, 64), (100, 100, 100), (128, 128, 128))


def child():
    """Time logp+grad of the benchmark problem at every size (workload 1's kronjax row)."""
    import jax

    jax.config.update("jax_enable_x64", True)
    from bench import peers
    from bench.common import data, params, time_call

    out = {}
    for sizes in SIZES:
        fn, (ells, sigma) = peers.KronJax().logp_grad(sizes, data(sizes)), params(sizes)
        t = time_call(lambda fn=fn, e=ells, s=sigma: fn(e, s), reps=10, budget=2.0)
        out["×".join(map(str, sizes))] = t["median_s"]
    print(json.dumps(out))


def main():
    runs = {v: [] for v in SETTINGS}
    for _ in range(2):
        for v in SETTINGS:
            env = dict(os.environ, OPENBLAS_THREAD_TIMEOUT=v)
            proc = subprocess.run(
                [sys.executable, "-m", "bench.openblas_wait", "--child"],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            runs[v].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"OPENBLAS_THREAD_TIMEOUT={v}: {runs[v][-1]}", flush=True)
    best = {v: {g: min(r[g] for r in rs) for g in rs[0]} for v, rs in runs.items()}
    head = "| grid | " + " | ".join(f"OPENBLAS_THREAD_TIMEOUT={v}" for v in SETTINGS) + " |"
    lines = [head, "|---|" + "---|" * len(SETTINGS)]
    for g, t0 in best[SETTINGS[0]].items():
        cells = [f"{best[v][g] * 1e3:.2f} ms ({best[v][g] / t0:.2f}×)" for v in SETTINGS]
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    from bench.common import machine, versions

    md = "\n".join(
        [
            "# kronjax logp+grad and OpenBLAS's idle wait",
            "",
            f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
            "- command: `python -m bench.openblas_wait`",
            f"- machine: {machine()}",
            f"- versions: {versions()}",
            "- float64 logp + gradient w.r.t. (ℓ, σ) of the benchmark problem (RBF factors, "
            "σ = 0.1); median of ≥ 10 calls after a warm-up, the better of two fresh "
            "processes per setting; (×) = time / time at the default 28.",
            "",
            *lines,
            "",
        ]
    )
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "OPENBLAS_WAIT.md")
    with open(path, "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    child() if "--child" in sys.argv else main()
