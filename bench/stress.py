"""Hang check: every scenario that deadlocked XLA's CPU pool, in fresh processes under a timeout.

    python -m bench.stress              # 20 runs of each scenario, writes bench/STRESS.md
    python -m bench.stress --runs 3     # a quick look

Each run is a fresh ``python -c`` process (a hang is intermittent, so many runs), killed after
``--timeout`` seconds; the table counts finished, hung (timed out) and failed runs. The tests
run the same scenarios a few times each (``tests/test_no_hang.py``).
"""

import argparse
import datetime
import os
import platform
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_PRELUDE = """
import threading
import jax, jax.numpy as jnp, numpy as np, numpyro.distributions as nd
jax.config.update("jax_enable_x64", True)
import kronjax
from kronjax import KroneckerNormal as KN
x = jnp.linspace(0, 1, 32)
k = lambda l: jnp.exp(-0.5 * ((x[:, None] - x) / l) ** 2) + 1e-6 * jnp.eye(32)
A, C = jnp.asarray(np.exp(np.random.default_rng(0).uniform(-4, 1, (2, B))))
y = jax.random.normal(jax.random.PRNGKey(0), (1024,))
"""

# name -> body run after the prelude (B settings); each must print "ok" at its end
SCENARIOS = {
    "kl": """
f = lambda a, c: nd.kl.kl_divergence(KN(0., covs=[k(a), k(c)], sigma=.1),
                                     KN(0., covs=[k(c), k(a)], sigma=.2))
out = jax.jit(jax.vmap(jax.value_and_grad(f, (0, 1))))(A, C)
""",
    "two_likelihoods": """
def f(a, c):
    return (KN(0., covs=[k(a), k(c)], sigma=.1).log_prob(y)
            + KN(0., covs=[k(c), k(a)], sigma=.3).log_prob(y))
out = jax.jit(jax.vmap(jax.value_and_grad(f, (0, 1))))(A, C)
""",
    "predict_noise_factors": """
S = [jnp.eye(32) + 0.5 * k(0.1), jnp.linspace(0.5, 2.0, 32)]
def f(a, c):
    d = KN(0., covs=[k(a), k(c)], sigma=.2, noise_factors=S)
    mean, var = kronjax.gp.predict(d, y, [k(a)[:5], k(c)[:6]], [jnp.ones(5), jnp.ones(6)])
    return d.log_prob(y) + mean.sum() + var.sum()
out = jax.jit(jax.vmap(jax.value_and_grad(f, (0, 1))))(A, C)
""",
    "marginal": """
mask = np.ones(1024, bool); mask[::97] = False
def f(a, c):
    return KN(0., covs=[k(a), k(c)], sigma=.1).marginal(mask).log_prob(y[mask])
out = jax.jit(jax.vmap(jax.value_and_grad(f, (0, 1))))(A, C)
""",
    "threads": """
def work(i):
    f = lambda a, c: KN(0., covs=[k(a * (1 + i)), k(c)], sigma=.1 * (i + 1)).log_prob(y)
    g = jax.jit(jax.vmap(jax.value_and_grad(f, (0, 1))))
    for _ in range(3):
        jax.block_until_ready(g(A[:B // 4], C[:B // 4]))
ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
[t.start() for t in ts]; [t.join() for t in ts]
out = 0.
""",
}


def script(name: str, batch: int) -> str:
    body = SCENARIOS[name] + "\njax.block_until_ready(out)\nprint('ok')\n"
    return f"B = {batch}\n" + textwrap.dedent(_PRELUDE) + textwrap.dedent(body)


def run_once(name: str, batch: int, timeout: float) -> str:
    """``"ok"``, ``"hang"`` (killed at the timeout) or ``"fail: <last line of stderr>"``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        done = subprocess.run(
            [sys.executable, "-c", script(name, batch)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return "hang"
    if done.returncode == 0 and done.stdout.split()[-1:] == ["ok"]:
        return "ok"
    return "fail: " + (done.stderr.strip().splitlines() or ["?"])[-1][:200]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--timeout", type=float, default=90.0)
    parser.add_argument("--only", default=",".join(SCENARIOS))
    parser.add_argument("--out", default=str(ROOT / "bench" / "STRESS.md"))
    args = parser.parse_args()
    rows = []
    for name in args.only.split(","):
        counts = {"ok": 0, "hang": 0, "fail": 0}
        errors, start = [], time.perf_counter()
        for _ in range(args.runs):
            result = run_once(name, args.batch, args.timeout)
            counts[result.split(":")[0]] += 1
            if result.startswith("fail"):
                errors.append(result)
        mean_s = (time.perf_counter() - start) / args.runs
        rows.append((name, counts, mean_s, errors[:1]))
        print(
            f"{name:24s} ok {counts['ok']:3d}  hang {counts['hang']:3d}  "
            f"fail {counts['fail']:3d}  {mean_s:6.1f} s/run",
            *errors[:1],
            flush=True,
        )
    import jax

    lines = [
        "# Hang check (`python -m bench.stress`)",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='minutes')}",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        f"- versions: python {platform.python_version()}, jax {jax.__version__}",
        f"- command: `python -m bench.stress {' '.join(sys.argv[1:])}`".rstrip(),
        f"- {args.runs} fresh processes per scenario, B = {args.batch} settings of a "
        f"32 × 32 grid, timeout {args.timeout:g} s",
        "",
        "| scenario | finished | hung | failed | s per run |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {n} | {c['ok']} | {c['hang']} | {c['fail']} | {s:.1f} |" for n, c, s, _ in rows]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("wrote", args.out)
    if any(c["hang"] or c["fail"] for _, c, _, _ in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
