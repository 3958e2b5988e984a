r"""The KL divergence between two ``KroneckerNormal`` s, registered with NumPyro.

``import kronjax`` registers it, so ``numpyro.distributions.kl.kl_divergence(p, q)`` and
``TraceMeanField_ELBO`` (which uses the analytic KL of each latent site) work with
Kronecker-structured guides and priors. For :math:`p = \mathcal N(\mu_p, A_p)`,
:math:`q = \mathcal N(\mu_q, A_q)` on the same grid:

.. math::
    \mathrm{KL}(p \,\|\, q) = \tfrac12 \Big(\operatorname{tr}(A_q^{-1} A_p)
      + (\mu_q - \mu_p)^\top A_q^{-1} (\mu_q - \mu_p) - N
      + \log\det A_q - \log\det A_p\Big)
    = \tfrac12 \operatorname{tr}(A_q^{-1} A_p) - \log q(\mu_p) - \mathrm H(p) .

:math:`A_p = \otimes_i K^p_i + \sigma_p^2 \otimes_i S^p_i` is a sum of two Kronecker
products, so the trace is
:func:`kronjax.linalg.kron_eig_trace_inv` in the eigenbasis of :math:`A_q` (after
whitening by :math:`q`'s noise roots when :math:`q` has ``noise_factors``):
:math:`\sum_{\text{grid}} (\otimes_i \operatorname{diag}(Q_i^\top K^p_i Q_i) + \sigma_p^2
\otimes_i \operatorname{diag}(Q_i^\top S^p_i Q_i)) / D_q`. The other two terms are
``q.log_prob`` and ``p.entropy``. Every piece has the custom gradients of the eigen core,
so the KL is differentiable in both arguments, exact and finite for repeated
eigenvalues. Cost :math:`O(\sum_i n_i^3 + N \sum_i n_i)`; never an :math:`N \times N`
array.
"""

import jax.numpy as jnp
from jax import lax
from numpyro.distributions.kl import kl_divergence

from kronjax.distribution import KroneckerNormal

__all__: list[str] = []


@kl_divergence.register(KroneckerNormal, KroneckerNormal)
def _kl_kronecker_normal(p: KroneckerNormal, q: KroneckerNormal):
    if p.event_shape != q.event_shape:
        raise ValueError(
            f"kl_divergence(KroneckerNormal, KroneckerNormal): event shapes differ, "
            f"{p.event_shape} and {q.event_shape}"
        )
    if p.factor_sizes != q.factor_sizes:
        raise NotImplementedError(
            "kl_divergence(KroneckerNormal, KroneckerNormal) needs the same factor sizes; got "
            f"{p.factor_sizes} and {q.factor_sizes}"
        )
    trace = q.covariance.trace_inv(p.covariance.kronecker_terms())
    kl = 0.5 * trace - q.log_prob(p.mean) - p.entropy()
    return jnp.broadcast_to(kl, lax.broadcast_shapes(p.batch_shape, q.batch_shape))
