r"""Fit the hyperparameters of a grid Kronecker GP with optax, on data it simulates.

Each axis has an RBF kernel :math:`k(x, x') = \exp(-(x - x')^2 / 2\ell_i^2)` (the first
scaled by :math:`a^2`); the data are one draw of ``KroneckerNormal`` plus noise
:math:`\sigma`. The optimizer (L-BFGS by default, or Adam) minimizes the exact negative log
marginal likelihood per cell, :math:`-\log p(y) / N`, over the log parameters, in float64;
each evaluation is one ``value_and_grad`` of ``log_prob``.

The fit is called converged when the gradient norm is at most ``GTOL`` and the loss changed
by at most ``FTOL`` (relative) over the last ``WINDOW`` steps; otherwise the demo says it did
not converge. A converged fit is the maximum-likelihood point of this one draw, which is not
the truth: the draw identifies the parameters only up to sampling noise (the amplitude least
well, as it trades off against the length scales). So the demo compares the two by their
log likelihoods and by Laplace standard errors (the inverse Hessian at the fit).
"""

import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from kronjax import cli
from kronjax.distribution import KroneckerNormal

TRUE = {"lengthscale": (0.15, 0.25, 0.4), "amplitude": 1.3, "sigma": 0.2}
MAX_AXES = len(TRUE["lengthscale"])
MAX_AXIS = 4096  # points per axis (each axis costs one n × n eigendecomposition)
MAX_CELLS = 2**24  # grid cells N (float64 vectors of 128 MiB)
GTOL = 1e-6  # converged: gradient norm of -log p / N (log parameters) at most this …
FTOL = 1e-9  # … and |Δ loss| / max(|loss|, 1) over the last WINDOW steps at most this
WINDOW = 3
SUMMARY = "fit a simulated 3-D grid GP (N = 61,440) with optax, checking convergence"
DESCRIPTION = (
    "Simulate one draw of a grid GP (RBF per axis, plus noise), fit its hyperparameters by "
    "maximum likelihood with optax in float64, say whether the fit converged and compare it "
    "with the true values."
)


def rbf(x: jax.Array, lengthscale) -> jax.Array:
    """Unit-amplitude RBF kernel matrix of the points ``x``."""
    return jnp.exp(-0.5 * jnp.square((x[:, None] - x[None, :]) / lengthscale))


def make_dist(params: dict, axes) -> KroneckerNormal:
    """``N(0, a² ⊗ RBF(x_i; ℓ_i) + σ² I)`` from unconstrained (log) parameters."""
    lengthscales = jnp.exp(params["log_lengthscale"])
    covs = [rbf(x, ell) for x, ell in zip(axes, lengthscales)]
    covs[0] = jnp.exp(2 * params["log_amplitude"]) * covs[0]
    return KroneckerNormal(0.0, covs=covs, sigma=jnp.exp(params["log_sigma"]))


def make_step(loss, optimizer: str, learning_rate: float):
    """``(init, step)``: ``step(params, state) -> (new params, state, loss, grad norm,
    evaluations)``, the loss and gradient taken at ``params``; ``init(params)`` the state."""
    if optimizer == "lbfgs":
        opt = optax.lbfgs()
        value_and_grad = optax.value_and_grad_from_state(loss)

        def step(params, state):
            value, grads = value_and_grad(params, state=state)
            updates, state = opt.update(
                grads, state, params, value=value, grad=grads, value_fn=loss
            )
            evals = optax.tree_utils.tree_get(state, "num_linesearch_steps")
            return optax.apply_updates(params, updates), state, value, optax.tree.norm(grads), evals

    elif optimizer == "adam":
        opt = optax.adam(learning_rate)

        def step(params, state):
            value, grads = jax.value_and_grad(loss)(params)
            updates, state = opt.update(grads, state)
            return optax.apply_updates(params, updates), state, value, optax.tree.norm(grads), 1

    else:
        raise ValueError(f"synthetic_demo: unknown optimizer {optimizer!r}")
    return lambda params: strong(opt.init(params)), jax.jit(step)


def strong(tree):
    """``tree`` with strongly typed arrays: a jitted step compiles once only if its
    parameters and optimizer state are (weakly typed leaves each cost another compile)."""
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.result_type(x)), tree)


def laplace_se(loss, params: dict, n: int, h: float = 1e-4):
    """Standard errors of the log parameters, ``sqrt(diag(H⁻¹))`` with ``H`` the Hessian of
    ``n · loss`` by central differences of the gradient (``2 d`` gradients); None when ``H``
    is not positive definite."""
    flat, unravel = ravel_pytree(params)
    grad = jax.jit(lambda v: ravel_pytree(jax.grad(loss)(unravel(v)))[0])
    eye = np.eye(flat.size)
    cols = [(grad(flat + h * e) - grad(flat - h * e)) / (2 * h) for e in eye]
    hess = n * np.asarray(jnp.stack(cols, 1))
    hess = 0.5 * (hess + hess.T)
    if not np.all(np.linalg.eigvalsh(hess) > 0):
        return None
    return unravel(jnp.asarray(np.sqrt(np.diag(np.linalg.inv(hess)))))


def run(
    shape=(48, 40, 32),
    steps: int = 100,
    seed: int = 0,
    optimizer: str = "lbfgs",
    learning_rate: float = 0.05,
) -> dict:
    """Simulate data on a grid of ``shape`` (1 to 3 axes) and fit, in float64.

    At most ``steps`` optimizer steps; the fit stops early once converged. Returns a dict:
    ``fitted`` and ``true`` (``{"lengthscale", "amplitude", "sigma"}``; ``fitted`` is the
    last iterate when not converged), ``converged``, ``steps`` (taken), ``grad_norm``,
    ``loss`` and ``loss_true`` (``-log p(y) / N`` at the fit and at the truth) and ``se``
    (Laplace standard errors of the log parameters, keyed ``log_…``, or None).
    """
    shape = tuple(int(n) for n in shape)
    if not 1 <= len(shape) <= MAX_AXES or min(shape) < 2:
        raise ValueError(f"synthetic_demo.run: shape needs 1 to {MAX_AXES} axes of size >= 2")
    if int(steps) != steps or steps < 1:
        raise ValueError(f"synthetic_demo.run: steps must be an integer >= 1, got {steps!r}")
    if optimizer not in ("lbfgs", "adam"):
        raise ValueError(
            f"synthetic_demo.run: optimizer must be 'lbfgs' or 'adam', got {optimizer!r}"
        )
    if not (math.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"synthetic_demo.run: learning_rate must be > 0, got {learning_rate!r}")
    with jax.enable_x64(True):
        return _run(shape, int(steps), seed, optimizer, learning_rate)


def _run(shape, steps, seed, optimizer, learning_rate) -> dict:
    axes = [jnp.linspace(0.0, 1.0, n) for n in shape]
    true = {
        "log_lengthscale": jnp.log(jnp.asarray(TRUE["lengthscale"][: len(shape)])),
        "log_amplitude": jnp.log(jnp.asarray(TRUE["amplitude"])),
        "log_sigma": jnp.log(jnp.asarray(TRUE["sigma"])),
    }
    y = make_dist(true, axes).sample(jax.random.PRNGKey(seed))
    n = y.shape[-1]
    name = {"lbfgs": "L-BFGS", "adam": f"Adam (learning rate {learning_rate:g})"}[optimizer]
    print(f"grid {' x '.join(map(str, shape))} (N = {n:,}), float64; {name}, at most {steps} steps")

    # Start from the data: a² + σ² = var(y), a quarter of it noise; length scales 0.3.
    scale = jnp.std(y)
    params = {
        "log_lengthscale": jnp.log(jnp.full(len(shape), 0.3)),
        "log_amplitude": jnp.log(scale * math.sqrt(0.75)),
        "log_sigma": jnp.log(scale * 0.5),
    }
    loss = lambda p: -make_dist(p, axes).log_prob(y) / n  # noqa: E731
    init, step = make_step(loss, optimizer, learning_rate)
    params = strong(params)
    state = init(params)

    start = time.perf_counter()
    new_params, state, value, grad_norm, evals = step(params, state)
    jax.block_until_ready(value)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    losses, evaluations, converged, taken = [float(value)], 0, False, 0
    every = max(steps // 8, 1)
    while True:
        change = abs(losses[-1] - losses[max(len(losses) - 1 - WINDOW, 0)])
        change /= max(abs(losses[-1]), 1.0)
        converged = len(losses) > WINDOW and float(grad_norm) <= GTOL and change <= FTOL
        if taken % every == 0 or converged or taken == steps:
            print(
                f"  step {taken:4d}  -log p / N = {losses[-1]:.9f}  "
                f"gradient norm {float(grad_norm):.2e}",
                flush=True,
            )
        if converged or taken == steps:
            break  # ``params`` is the point where ``value`` and ``grad_norm`` were taken
        params = new_params
        taken += 1
        new_params, state, value, grad_norm, evals = step(params, state)
        losses.append(float(value))
        evaluations += int(evals)
    seconds = time.perf_counter() - start
    grad_norm = float(grad_norm)
    print(
        f"first step (with compile) {compile_s:.2f} s; then {taken} steps, "
        f"{evaluations} evaluations of value and gradient, in {seconds:.2f} s "
        f"({1e3 * seconds / max(evaluations, 1):.1f} ms per evaluation)"
    )
    if converged:
        print(
            f"converged after {taken} steps: gradient norm {grad_norm:.1e} <= {GTOL:g}, "
            f"relative loss change over the last {WINDOW} steps {change:.1e} <= {FTOL:g}"
        )
    else:
        print(
            f"did not converge after {taken} steps (gradient norm {grad_norm:.1e}, "
            f"tolerance {GTOL:g}; relative loss change over the last {WINDOW} steps "
            f"{change:.1e}): the values below are the last iterate, not the "
            "maximum-likelihood point; raise --steps"
            + (" or use --optimizer lbfgs" if optimizer == "adam" else "")
        )

    loss_fit, loss_true = losses[-1], float(loss(true))
    se = laplace_se(loss, params, n) if converged else None
    natural = lambda tree: {k.removeprefix("log_"): jnp.exp(v) for k, v in tree.items()}  # noqa: E731
    fitted, truth = natural(params), natural(true)
    column = "fitted (ML)" if converged else "last iterate"
    header = f"{'parameter':<16}{'true':>10}{column:>14}"
    if se is not None:
        header += f"{'± s.e.':>10}{'(true - fit) / s.e.':>22}"
    print(header)
    for key in ("lengthscale", "amplitude", "sigma"):
        log_se = np.atleast_1d(se[f"log_{key}"]) if se is not None else None
        for j, (t, f) in enumerate(zip(np.atleast_1d(truth[key]), np.atleast_1d(fitted[key]))):
            label = f"{key}[{j}]" if key == "lengthscale" else key
            row = f"{label:<16}{t:>10.4f}{f:>14.4f}"
            if log_se is not None:  # s.e. of f by the delta method; the truth's z in log space
                row += f"{f * log_se[j]:>10.4f}{(math.log(t) - math.log(f)) / log_se[j]:>22.1f}"
            print(row)
    what = "fit" if converged else "last iterate"
    print(
        f"-log p(y) / N: {loss_fit:.7f} at the {what}, {loss_true:.7f} at the true parameters; "
        f"log p(y | {what}) - log p(y | true) = {n * (loss_true - loss_fit):+.2f}"
    )
    if se is not None:
        print(
            "s.e.: Laplace standard errors (inverse Hessian of the log likelihood at the fit, "
            "log parameters); one draw pins the parameters down only to within a few of them, "
            "so the true values are not recovered exactly"
        )
    elif converged:
        print("the Hessian at the fit is not positive definite (a flat optimum): no s.e.")
    return {
        "fitted": fitted,
        "true": truth,
        "converged": converged,
        "steps": taken,
        "grad_norm": grad_norm,
        "loss": loss_fit,
        "loss_true": loss_true,
        "se": se,
    }


class _ShapeAction(argparse.Action):
    """``--shape``: 1 to ``MAX_AXES`` sizes, at most ``MAX_CELLS`` cells."""

    def __call__(self, parser, namespace, values, option_string=None):
        if len(values) > MAX_AXES:
            raise argparse.ArgumentError(
                self, f"at most {MAX_AXES} axes (one true length scale each), got {len(values)}"
            )
        if math.prod(values) > MAX_CELLS:
            raise argparse.ArgumentError(
                self, f"at most {MAX_CELLS:,} grid cells, got {math.prod(values):,}"
            )
        setattr(namespace, self.dest, values)


def configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the synthetic demo's options to ``parser`` (every value is checked while parsing)."""
    parser.add_argument(
        "--shape",
        type=cli.integer(2, MAX_AXIS),
        nargs="+",
        action=_ShapeAction,
        default=[48, 40, 32],
        metavar="N",
        help=f"grid size per axis: 1 to {MAX_AXES} axes of 2 to {MAX_AXIS} points, "
        f"at most {MAX_CELLS:,} cells",
    )
    parser.add_argument(
        "--steps",
        type=cli.integer(1),
        default=100,
        help="most optimizer steps, at least 1; the fit stops early once converged",
    )
    parser.add_argument(
        "--optimizer",
        choices=("lbfgs", "adam"),
        default="lbfgs",
        help="optax.lbfgs (with a zoom line search) or optax.adam",
    )
    parser.add_argument(
        "--learning-rate",
        type=cli.positive_float,
        default=0.05,
        help="Adam's learning rate (> 0; unused by L-BFGS, whose line search sets the step)",
    )
    parser.add_argument(
        "--seed",
        type=cli.integer(0, 2**32 - 1),
        default=0,
        help="seed of the simulated draw, 0 to 2**32 - 1",
    )
    parser.set_defaults(handler=_run_args)
    return parser


def _run_args(args: argparse.Namespace) -> None:
    run(tuple(args.shape), args.steps, args.seed, args.optimizer, args.learning_rate)


def main(argv=None) -> None:
    """``python -m kronjax synthetic [options]``."""
    parser = configure(cli.Parser(prog="python -m kronjax synthetic", description=DESCRIPTION))
    args = parser.parse_args(argv)
    args.handler(args)
