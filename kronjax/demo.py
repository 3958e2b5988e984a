r"""Forecast two years of El Niño sea-surface temperature with a year × month Kronecker GP.

The data are the monthly Niño 1+2 SSTs of 1950–2010 (:func:`kronjax.data.load_elnino`), a
61 × 12 grid. The last two years are held out; the model of the other 59 is

.. math::
    y = \mu \mathbf 1 + f + \varepsilon, \quad
    f \sim \mathcal N\big(0,\; K_{\text{year}} \otimes K_{\text{month}}\big), \quad
    \varepsilon \sim \mathcal N(0, \sigma^2 I),

    K_{\text{year}}(t, t') = b^2 + a^2\, \text{Matérn}_{5/2}(|t - t'| / \ell_y), \quad
    K_{\text{month}}(m, m') = \exp\!\big(-2 \sin^2(\pi (m - m') / 12) / \ell_m^2\big),

with :math:`\mu` the training mean. The constant :math:`b^2` carries the seasonal cycle
shared by all years (its shape set by the periodic month kernel), :math:`a^2` the
year-to-year anomalies. Stages: optax (Adam) finds the posterior mode of
:math:`(b, a, \ell_y, \ell_m, \sigma)` under log-normal priors; NUTS, started there, samples
their posterior; the forecast is the posterior predictive of the held-out grid, a mixture
over the NUTS draws of the exact Kronecker GP predictive (:func:`kronjax.gp.predict`),
compared with climatology (each month's training mean ± 1.645 training std).
"""

import argparse
import importlib.util
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
from jax.scipy.special import ndtr
from numpyro.infer import MCMC, NUTS
from numpyro.infer.util import constrain_fn, potential_energy

from kronjax import cli, gp
from kronjax.data import load_elnino
from kronjax.distribution import KroneckerNormal

HOLDOUT = 2  # years held out at the end
Z90 = 1.6448536269514722  # standard normal 95% quantile: a central 90% band is ±Z90 sd

# name: (prior median, what it is); every prior is LogNormal(log median, 1)
PRIORS = {
    "bias": (1.0, "seasonal-cycle scale b (°C)"),
    "amplitude": (1.0, "anomaly scale a (°C)"),
    "ell_year": (2.0, "anomaly length scale ℓ_y (years)"),
    "ell_month": (1.0, "periodic month length scale ℓ_m"),
    "sigma": (0.3, "noise σ (°C)"),
}


def matern52(x1: jax.Array, x2: jax.Array, ell) -> jax.Array:
    r""":math:`(1 + \sqrt5 r + \tfrac53 r^2) e^{-\sqrt5 r}`, :math:`r = |x - x'| / \ell`."""
    r = math.sqrt(5) * jnp.abs(x1[:, None] - x2[None, :]) / ell
    return (1 + r + r * r / 3) * jnp.exp(-r)


def periodic(x1: jax.Array, x2: jax.Array, ell, period: float = 12.0) -> jax.Array:
    r""":math:`\exp(-2 \sin^2(\pi (x - x') / p) / \ell^2)`."""
    s = jnp.sin(jnp.pi * (x1[:, None] - x2[None, :]) / period)
    return jnp.exp(-2 * s * s / ell**2)


def factors(params: dict, years1, years2, months1, months2) -> list[jax.Array]:
    """The year and month kernel matrices ``[K_year (n1, n2), K_month (m1, m2)]``."""
    k_year = params["bias"] ** 2 + params["amplitude"] ** 2 * matern52(
        years1, years2, params["ell_year"]
    )
    return [k_year, periodic(months1, months2, params["ell_month"])]


def model(years: jax.Array, months: jax.Array, mu, y: jax.Array | None = None) -> None:
    """Log-normal priors on the hyperparameters; ``y`` the flattened year × month grid."""
    params = {
        name: numpyro.sample(name, dist.LogNormal(math.log(median), 1.0))
        for name, (median, _) in PRIORS.items()
    }
    covs = factors(params, years, years, months, months)
    numpyro.sample("sst", KroneckerNormal(mu, covs=covs, sigma=params["sigma"]), obs=y)


def fit_mode(potential_fn, init: dict, steps: int, learning_rate: float = 0.1) -> dict:
    """Minimize the potential (−log joint, unconstrained space) with Adam; print progress."""
    optimizer = optax.adam(learning_rate)

    @jax.jit
    def step(z, state):
        value, grads = jax.value_and_grad(potential_fn)(z)
        updates, state = optimizer.update(grads, state)
        return optax.apply_updates(z, updates), state, value

    z, state = init, optimizer.init(init)
    for i in range(steps):
        z, state, value = step(z, state)
        if i % max(steps // 6, 1) == 0 or i == steps - 1:
            print(f"  step {i:4d}  -log p(θ, y) = {float(value):9.3f}", flush=True)
    return z


def mixture_quantile(means: jax.Array, sds: jax.Array, q: float, iters: int = 60) -> jax.Array:
    r"""Quantile ``q`` of the equal-weight Gaussian mixture over axis 0, by bisection on
    :math:`F(x) = \tfrac1S \sum_s \Phi((x - m_s) / s_s)`."""
    lo = jnp.min(means - 10 * sds, 0)
    hi = jnp.max(means + 10 * sds, 0)

    def halve(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        below = jnp.mean(ndtr((mid - means) / sds), 0) < q
        return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

    lo, hi = jax.lax.fori_loop(0, iters, halve, (lo, hi))
    return 0.5 * (lo + hi)


@jax.jit
def forecast(samples: dict, train: tuple, test_years, mu) -> tuple[jax.Array, ...]:
    """Posterior predictive of ``y`` on ``test_years × months`` from the NUTS draws.

    For each draw, :func:`kronjax.gp.predict` gives the exact Gaussian predictive (noise
    included) on the grid; the draws' mixture gives the mean and the 5% / 95% quantiles,
    each of shape ``(len(test_years) * 12,)``.
    """
    years, months, y = train

    def one(params):
        d = KroneckerNormal(
            mu, covs=factors(params, years, years, months, months), sigma=params["sigma"]
        )
        cross = factors(params, test_years, years, months, months)
        test_diags = [
            jnp.diagonal(k) for k in factors(params, test_years, test_years, months, months)
        ]
        return gp.predict(d, y, cross, test_diags, pred_noise=True)

    means, variances = jax.vmap(one)(samples)  # (S, M) each
    means, sds = means + mu, jnp.sqrt(variances)  # predict leaves the prior mean to us
    return means.mean(0), mixture_quantile(means, sds, 0.05), mixture_quantile(means, sds, 0.95)


def score(truth, mean, lower, upper) -> tuple[float, float, float]:
    """RMSE of ``mean``, the fraction of ``truth`` in ``[lower, upper]`` and its mean width."""
    rmse = float(np.sqrt(np.mean((truth - mean) ** 2)))
    cover = float(np.mean((truth >= lower) & (truth <= upper)))
    return rmse, cover, float(np.mean(upper - lower))


def plot(path, years, sst, n_train: int, mean, lower, upper, clim, clim_sd) -> None:
    """Full record on top; below, the last years with the forecast and climatology."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError(
            "the demo's plot needs matplotlib: pip install 'kronjax[examples]'"
        ) from err

    t = (years[:, None] + (np.arange(12) + 0.5) / 12).reshape(-1)
    split = n_train * 12
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(9, 6), dpi=110, gridspec_kw={"height_ratios": [1, 1.6]}
    )
    top.plot(t[:split], sst.reshape(-1)[:split], color="0.25", lw=0.7, label="training data")
    top.plot(t[split:], sst.reshape(-1)[split:], color="C3", lw=0.9, label="held out")
    top.set(ylabel="SST (°C)", title="Niño 1+2 monthly sea-surface temperature, 1950–2010")
    top.legend(loc="upper left", fontsize=8, ncol=2)

    window = t >= years[n_train] - 6
    tw, tf = t[window], t[split:]
    bottom.plot(
        tw[tw < tf[0]],
        sst.reshape(-1)[window][: -len(tf)],
        "o-",
        color="0.25",
        ms=2.5,
        lw=0.7,
        label="training data",
    )
    # Draw order: bands at the back, then the GP mean (thick), the climatology mean (thin,
    # dashed, on top so both stay visible where they coincide), the held-out truth in front.
    bottom.fill_between(
        tf, lower, upper, color="C0", alpha=0.22, lw=0, zorder=1, label="GP 90% predictive band"
    )
    for i, bound in enumerate((clim - Z90 * clim_sd, clim + Z90 * clim_sd)):
        label = None if i else "climatology 90% band (± 1.645 sd)"
        bottom.plot(tf, bound, ":", color="C1", lw=1.1, zorder=2, label=label)
    bottom.plot(tf, mean, "-", color="C0", lw=2.6, zorder=3, label="GP predictive mean")
    bottom.plot(
        tf, clim, "--", color="C1", lw=1.1, dashes=(4, 3), zorder=4, label="climatology mean"
    )
    bottom.plot(
        tf,
        sst.reshape(-1)[split:],
        "o-",
        color="C3",
        ms=3.5,
        lw=1,
        zorder=5,
        label="held-out truth",
    )
    bottom.axvline(tf[0], color="0.6", lw=0.8)
    bottom.set(
        xlabel="year",
        ylabel="SST (°C)",
        title=f"Forecast of {years[n_train]}–{years[-1]} from {years[0]}–{years[n_train - 1]}",
    )
    order = [
        "training data",
        "held-out truth",
        "GP predictive mean",
        "GP 90% predictive band",
        "climatology mean",
        "climatology 90% band (± 1.645 sd)",
    ]
    handles = dict(zip(*reversed(bottom.get_legend_handles_labels()), strict=True))
    bottom.legend([handles[k] for k in order], order, loc="upper left", fontsize=8, ncol=3)
    low, high = bottom.get_ylim()
    bottom.set_ylim(low, high + 0.22 * (high - low))  # room for the legend above the data
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(
    out="elnino_forecast.png", num_warmup=300, num_samples=300, steps=300, seed=0, progress_bar=True
) -> dict:
    """Fit, sample, forecast, score and plot; print each stage. Returns the scores.

    Raises ``ValueError`` for a count below 1 or a negative seed (the command line checks
    these, and ``out``, before calling this).
    """
    counts = {"num_warmup": num_warmup, "num_samples": num_samples, "steps": steps}
    for name, value in counts.items():
        if int(value) != value or value < 1:
            raise ValueError(f"demo.run: {name} must be an integer >= 1, got {value!r}")
    if int(seed) != seed or seed < 0:
        raise ValueError(f"demo.run: seed must be an integer >= 0, got {seed!r}")
    times = {}
    start = time.perf_counter()
    years_all, months_np, sst = load_elnino()
    n_train = len(years_all) - HOLDOUT
    dtype = jnp.result_type(float)
    years = jnp.asarray(years_all[:n_train] - years_all[0], dtype)
    test_years = jnp.asarray(years_all[n_train:] - years_all[0], dtype)
    months = jnp.asarray(months_np, dtype)
    y = jnp.asarray(sst[:n_train].reshape(-1), dtype)
    truth = sst[n_train:].reshape(-1)
    mu = float(y.mean())
    print(
        f"El Niño (Niño 1+2) SST: {len(years_all)} years × 12 months; training on "
        f"{years_all[0]}–{years_all[n_train - 1]} (N = {y.size}), forecasting "
        f"{years_all[n_train]}–{years_all[-1]}"
    )
    times["data"] = time.perf_counter() - start

    start = time.perf_counter()
    model_args = (years, months, mu, y)
    # unconstrained (log) values; the prior medians to start
    z_init = {name: jnp.asarray(math.log(median), dtype) for name, (median, _) in PRIORS.items()}
    print(f"optax: {steps} Adam steps to the posterior mode")
    z_mode = fit_mode(lambda z: potential_energy(model, model_args, {}, z), z_init, steps)
    mode = constrain_fn(model, model_args, {}, z_mode)
    times["optax"] = time.perf_counter() - start

    start = time.perf_counter()
    print(f"NUTS: {num_warmup} warmup + {num_samples} samples, started at the mode")
    mcmc = MCMC(
        NUTS(model, dense_mass=True),
        num_warmup=num_warmup,
        num_samples=num_samples,
        progress_bar=progress_bar,
    )
    mcmc.run(jax.random.PRNGKey(seed), *model_args, init_params=z_mode)
    samples = mcmc.get_samples()
    jax.block_until_ready(samples)
    diverging = int(mcmc.get_extra_fields()["diverging"].sum())
    times["NUTS"] = time.perf_counter() - start

    print(f"\n{'hyperparameter':<36}{'optax':>8}{'median':>8}{'5%':>8}{'95%':>8}")
    for name, (_, what) in PRIORS.items():
        lo, med, hi = np.percentile(np.asarray(samples[name]), [5, 50, 95])
        print(f"{what:<36}{float(mode[name]):8.3f}{med:8.3f}{lo:8.3f}{hi:8.3f}")
    print(f"({num_samples} draws, {diverging} divergent)")

    start = time.perf_counter()
    mean, lower, upper = map(np.asarray, forecast(samples, (years, months, y), test_years, mu))
    train_grid = sst[:n_train]
    clim = np.tile(train_grid.mean(0), HOLDOUT)
    clim_sd = np.tile(train_grid.std(0, ddof=1), HOLDOUT)
    scores = {
        "GP (NUTS posterior predictive)": score(truth, mean, lower, upper),
        "climatology (monthly means)": score(
            truth, clim, clim - Z90 * clim_sd, clim + Z90 * clim_sd
        ),
    }
    times["forecast"] = time.perf_counter() - start
    print(f"\nheld out {years_all[n_train]}–{years_all[-1]} ({truth.size} months)")
    print(f"{'forecast':<34}{'RMSE (°C)':>10}{'90% coverage':>14}{'90% width (°C)':>16}")
    for name, (rmse, cover, width) in scores.items():
        print(f"{name:<34}{rmse:10.3f}{cover:14.0%}{width:16.2f}")

    start = time.perf_counter()
    plot(out, years_all, sst, n_train, mean, lower, upper, clim, clim_sd)
    times["plot"] = time.perf_counter() - start
    print(f"\nwrote {out}")
    print(
        "wall time: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in times.items())
        + f"; total {sum(times.values()):.1f} s"
    )
    return scores


SUMMARY = "forecast two held-out years of El Niño SST (optax, then NUTS; about 30 s)"
DESCRIPTION = (
    "Forecast two held-out years of El Niño SST with a year × month Kronecker GP: optax to "
    "the posterior mode, then NUTS; compared with climatology. Writes a PNG plot."
)


def configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the demo's options to ``parser`` (every value is checked while parsing)."""
    parser.add_argument(
        "--out",
        type=cli.png_path,
        default="elnino_forecast.png",
        help="where to write the forecast plot: a .png file in an existing, writable directory",
    )
    parser.add_argument(
        "--num-warmup",
        type=cli.integer(1),
        default=300,
        help="NUTS warmup (adaptation) steps, at least 1",
    )
    parser.add_argument(
        "--num-samples", type=cli.integer(1), default=300, help="NUTS samples, at least 1"
    )
    parser.add_argument(
        "--steps",
        type=cli.integer(1),
        default=300,
        help="Adam steps to the posterior mode, at least 1",
    )
    parser.add_argument(
        "--seed", type=cli.integer(0, 2**32 - 1), default=0, help="NUTS random seed, 0 to 2**32 - 1"
    )
    parser.add_argument("--no-progress", action="store_true", help="no NUTS progress bar")
    parser.set_defaults(handler=lambda args: _run_args(parser, args))
    return parser


def _run_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if importlib.util.find_spec("matplotlib") is None:
        parser.error("the plot needs matplotlib: pip install 'kronjax[examples]'")
    run(
        args.out,
        args.num_warmup,
        args.num_samples,
        args.steps,
        args.seed,
        progress_bar=not args.no_progress,
    )


def main(argv=None) -> None:
    """``python -m kronjax demo [options]``."""
    parser = configure(cli.Parser(prog="python -m kronjax demo", description=DESCRIPTION))
    args = parser.parse_args(argv)
    args.handler(args)
