r"""Whether an answer can be trusted in its dtype: the condition number of the covariance.

Solves, log densities, the marginal and prediction lose about :math:`\kappa(A)\,\epsilon`
of relative accuracy, :math:`\kappa(A) = \lambda_{\max}(A) / \lambda_{\min}(A)` and
:math:`\epsilon` the dtype's machine epsilon; gradients somewhat more. In the eigenbasis
:math:`\kappa` is exact and cheap: with :math:`A = \otimes_i K_i + \sigma^2 I` and
:math:`K_i = Q_i \operatorname{diag}(\lambda_i) Q_i^\top` (eigenvalues clipped at 0),

.. math::
    \kappa(A) = \frac{\prod_i \max \lambda_i + \sigma^2}{\prod_i \min \lambda_i + \sigma^2},

:math:`O(\sum_i n_i)`, no N-sized array. Measured on a 30 × 20 RBF grid, float32 against
float64 (README, "float32"): at :math:`\kappa \epsilon \approx 0.02` the log density is
within 2e-4 relative and the gradient within 2e-3, at 0.18 within 1.2e-3 and 1.1e-2; at
:math:`\kappa \epsilon \approx 2` the gradient is 9% off, at 20 it is 55% off with flipped
signs. A float32 fit of a 128 × 96 grid (``bench/FLOAT32.md``) reaches the float64 optimum
within 1e-4 at :math:`\kappa\epsilon = 0.04`, 6e-4 at 0.4 and 7e-3 at 3.6. So the limit is
:math:`\kappa \le 1/(8\epsilon)`: about 1.0e6 in float32, 5.6e14 in float64.

Past the limit, with ``validate_args=True`` given to the distribution (and concrete
values) the operation raises
``ValueError``; otherwise it warns once per process and operation
(:class:`ConditioningWarning`), also inside ``jit`` (a host callback). Sampling is not
checked: it goes through the factor roots, which stay well-conditioned.
"""

import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_batching import custom_vmap
from numpyro.util import find_stack_level, not_jax_tracer

from kronjax import lapack

__all__ = ["ConditioningWarning", "condition_limit", "eig_condition", "check"]


class ConditioningWarning(UserWarning):
    """The covariance is too ill-conditioned for the current dtype to give a trusted answer."""


def condition_limit(dtype) -> float:
    r"""The largest condition number trusted in ``dtype``: :math:`1 / (8 \epsilon)`."""
    return 1.0 / (8.0 * float(jnp.finfo(dtype).eps))


def eig_condition(eigvals, sigma2) -> jax.Array:
    r""":math:`\kappa(\otimes_i K_i + \sigma^2 I)` from the factors' eigenvalues
    ``(..., n_i)`` (clipped at 0), batched; ``inf`` for a singular matrix."""
    vals = [jnp.maximum(v, 0) for v in eigvals]
    top = math.prod(jnp.max(v, -1) for v in vals) + sigma2
    bottom = math.prod(jnp.min(v, -1) for v in vals) + sigma2
    return jnp.where(bottom > 0, top / jnp.where(bottom > 0, bottom, 1), jnp.inf)


_warned: set[tuple[str, str]] = set()


def _message(where: str, cond: float, dtype) -> str:
    name = jnp.dtype(dtype).name
    return (
        f"{where}: the covariance has condition number {cond:.3g}, past what {name} can "
        f"resolve (limit {condition_limit(dtype):.3g} = 1/(8 eps)): the result and its "
        "gradient cannot be trusted. Use float64 (jax.config.update('jax_enable_x64', "
        "True)), a larger sigma, or more jitter."
    )


def _warn(where: str, dtype, cond) -> None:
    worst = float(np.max(np.asarray(cond), initial=0.0))
    key = (where, jnp.dtype(dtype).name)
    if worst > condition_limit(dtype) and key not in _warned:
        _warned.add(key)
        warnings.warn(_message(where, worst, dtype), ConditioningWarning, find_stack_level())


def check(cond: jax.Array, dtype, where: str, strict: bool) -> None:
    """Refuse (``strict`` and concrete) or warn once when ``cond`` passes the dtype's limit.

    ``where`` names the operation in the message. Under a trace the check runs on the host
    through ``jax.debug.callback`` and can only warn.
    """
    if not_jax_tracer(cond):
        worst = float(jnp.max(cond, initial=0.0))
        if strict and worst > condition_limit(dtype):
            raise ValueError(_message(where, worst, dtype))
        _warn(where, dtype, cond)
        return
    _reporter(where, jnp.dtype(dtype).name)(jax.lax.stop_gradient(cond))


@functools.cache
def _reporter(where: str, dtype: str):
    """Warn on the host only when the limit is passed (a ``lax.cond`` around the callback,
    so a well-conditioned call costs no host round trip), once per call whatever the batch
    (``jax.debug.callback`` under ``vmap`` alone would unroll into one callback per member).
    A batch split over devices calls back on each device's own part (no communication)."""
    limit = condition_limit(dtype)
    warn = functools.partial(_warn, where, dtype)

    @custom_vmap
    def report(cond):
        if lapack.device_split(cond) is not None:
            jax.debug.callback(warn, cond, partitioned=True)
        else:
            bad = jnp.max(cond, initial=0.0) > limit
            jax.lax.cond(bad, lambda c: jax.debug.callback(warn, c), lambda c: None, cond)
        return cond

    @report.def_vmap
    def _batched(axis_size, in_batched, cond):
        return report(cond), True

    return report
