r"""``KroneckerReparam``: the non-centred (whitened) form of a latent ``KroneckerNormal``."""

import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro.infer.reparam import Reparam

from kronjax.distribution import KroneckerNormal

__all__ = ["KroneckerReparam"]


class KroneckerReparam(Reparam):
    r"""Decentre a latent ``KroneckerNormal`` site into whitened noise and a deterministic.

    A site ``f ~ KroneckerNormal(μ, …)`` becomes

    .. math::
        z \sim \mathcal N(0, I_N) \ \text{(site ``f_decentered``)}, \qquad
        f = \mu + R\, z \ \text{(deterministic site ``f``)},

    with :math:`R R^\top = K_1 \otimes \dots \otimes K_d + \sigma^2 I`:

    - no noise: the structured root :math:`R = \otimes R_i` — the Cholesky factors
      ``L_i`` for ``chols``, the symmetric roots :math:`K_i^{1/2}` for ``covs`` (PSD factors
      allowed), :math:`Q_i \operatorname{diag}\sqrt{\lambda_i}` for ``evds``;
    - with noise: the symmetric eigen root :math:`R = Q \operatorname{diag}(\sqrt D) Q^\top`,
      :math:`D = \otimes \lambda_i + \sigma^2` (:func:`kronjax.linalg.kron_eig_sqrt_matvec`).
      It is a smooth function of the factors, so NUTS moving the hyperparameters moves
      :math:`f` smoothly, and its derivative rule never differentiates eigenvectors.

    ``z`` has the event shape ``(N,)`` of ``f`` and the site's full batch shape (plates,
    ``expand``, ``to_event`` are kept, as in NumPyro's ``LocScaleReparam``). Cost
    :math:`O(N \sum_i n_i)` per evaluation. This is the parameterization NUTS needs for
    latent GPs on grids under non-Gaussian likelihoods (Saatçi 2011, ch. 5; PyMC's
    ``LatentKron`` uses the same whitening with Cholesky factors only).

    Only latent sites: an observed site raises ``ValueError``.

    Example::

        reparam_model = numpyro.handlers.reparam(model, config={"f": KroneckerReparam()})
    """

    def __call__(self, name, fn, obs):
        if obs is not None:
            raise ValueError(
                f"KroneckerReparam: site {name!r} is observed; only latent sites can be "
                "reparameterized"
            )
        fn, expand_shape, event_dim = self._unwrap(fn)
        if not isinstance(fn, KroneckerNormal):
            raise ValueError(
                f"KroneckerReparam: site {name!r} has distribution {type(fn).__name__}; "
                "expected a KroneckerNormal"
            )
        white = dist.Normal(jnp.zeros(fn.event_shape, fn.loc.dtype), 1.0).to_event(1)
        z = numpyro.sample(f"{name}_decentered", self._wrap(white, expand_shape, event_dim))
        # Simulates a deterministic site with the value of the original one.
        return None, fn.loc + fn.covariance.root_matvec(z)
