r"""Square roots in the eigenbasis: the symmetric root of
:math:`A = K_1 \otimes \dots \otimes K_d + \sigma^2 I` (the whitened parameterization of a
latent site) and the symmetric root of one factor (sampling), each with a derivative rule that
solves a Sylvester equation in the eigenbasis and never differentiates eigenvectors.
Re-exported by :mod:`kronjax.linalg`.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from kronjax.eigen import eig_vectorized
from kronjax.eigenbasis import jvp_from_vjp, rest_weights, rotate, spectrum, to_mode
from kronjax.kron import from_eigenbasis


def _eig_sqrt_matvec(eigvals, eigvecs, sigma2, z):
    sizes = tuple(v.shape[-1] for v in eigvals)
    zt = rotate(eigvecs, z.reshape(sizes), transpose=True)
    return rotate(eigvecs, jnp.sqrt(spectrum(eigvals, sigma2)) * zt, False).reshape(-1)


@jax.custom_jvp
def _cov_sqrt_matvec(covs, eigvals, eigvecs, sigma2, z):
    return _eig_sqrt_matvec(eigvals, eigvecs, sigma2, z)


def _cov_sqrt_matvec_fwd(covs, eigvals, eigvecs, sigma2, z):
    return _eig_sqrt_matvec(eigvals, eigvecs, sigma2, z), (eigvals, eigvecs, sigma2, z)


def _safe_inv(x):
    return jnp.where(x > 0, 1 / jnp.where(x > 0, x, 1), 0)


def _cov_sqrt_matvec_bwd(res, g):
    eigvals, eigvecs, sigma2, z = res
    s = jnp.sqrt(spectrum(eigvals, sigma2))
    gt = rotate(eigvecs, g.reshape(s.shape), transpose=True)
    zt = rotate(eigvecs, z.reshape(s.shape), transpose=True)
    cov_bars = []
    for i, q in enumerate(eigvecs):
        gw, zi, si = to_mode(gt, i) * rest_weights(eigvals, i), to_mode(zt, i), to_mode(s, i)

        def row(a, zi=zi, si=si):  # row a of the Sylvester solve: memory O(N)
            return jnp.sum(a[0] * zi * _safe_inv(a[1] + si), axis=1)

        m = jax.lax.map(row, (gw, si))
        cov_bars.append(from_eigenbasis(q, 0.5 * (m + m.T)))
    zeros = jax.tree.map(jnp.zeros_like, (eigvals, eigvecs))
    sigma2_bar = jnp.sum(gt * zt * _safe_inv(2 * s))
    z_bar = rotate(eigvecs, s * gt, transpose=False).reshape(-1)
    return (tuple(cov_bars), *zeros, sigma2_bar, z_bar)


_cov_sqrt_matvec.defjvp(
    jvp_from_vjp(
        _cov_sqrt_matvec_fwd, _cov_sqrt_matvec_bwd, "a second derivative of the symmetric root"
    )
)


def kron_eig_sqrt_matvec(
    z: jax.Array,
    eigvals: Sequence[jax.Array],
    eigvecs: Sequence[jax.Array],
    sigma2: jax.Array,
    covs: Sequence[jax.Array] | None = None,
) -> jax.Array:
    r"""Multiply by the symmetric root :math:`A^{1/2} = Q \operatorname{diag}(\sqrt D) Q^\top`.

    :math:`A = K_1 \otimes \dots \otimes K_d + \sigma^2 I`; :math:`x = A^{1/2} z` has
    covariance :math:`A` for :math:`z \sim \mathcal N(0, I)`. The symmetric root is a
    function of :math:`A` alone (unlike :math:`Q \operatorname{diag}\sqrt D`, which depends
    on the arbitrary choice of eigenvectors), so it is smooth in the factors. With
    ``covs`` its gradient solves the Sylvester equation :math:`dR\,R + R\,dR = dA` in the
    eigenbasis: for a cotangent :math:`\bar x`, with :math:`s = \sqrt D`,

    .. math::
        \bar K_i = Q_i\, \operatorname{sym}(M_i)\, Q_i^\top, \quad
        M_i[a, b] = \textstyle\sum_{\text{rest}} W_i[\text{rest}]\,
        \frac{\tilde{\bar x}[a, \text{rest}]\, \tilde z[b, \text{rest}]}
             {s[a, \text{rest}] + s[b, \text{rest}]},

    :math:`\bar\sigma^2 = \sum \tilde{\bar x}\,\tilde z / (2 s)` and
    :math:`\bar z = A^{1/2} \bar x`; pairs with :math:`s_a + s_b = 0` get zero. Exact and
    finite for repeated eigenvalues. Cost :math:`O(N \sum_i n_i)` forward and backward,
    memory :math:`O(N)`.

    Args:
        z: ``(..., N)``.
        eigvals, eigvecs, sigma2, covs: as in :func:`kron_eig_solve`.
    """
    return eig_vectorized(_eig_sqrt_matvec, _cov_sqrt_matvec, eigvals, eigvecs, sigma2, covs, z)


@jax.custom_jvp
def _psd_sqrt(cov, eigval, eigvec):
    s = jnp.sqrt(jnp.maximum(eigval, 0))
    return (eigvec * s[..., None, :]) @ jnp.swapaxes(eigvec, -1, -2)


def _psd_sqrt_fwd(cov, eigval, eigvec):
    return _psd_sqrt(cov, eigval, eigvec), (eigval, eigvec)


def _psd_sqrt_bwd(res, root_bar):
    eigval, eigvec = res
    qt = jnp.swapaxes(eigvec, -1, -2)
    s = jnp.sqrt(jnp.maximum(eigval, 0))
    m = from_eigenbasis(qt, root_bar)  # Qᵀ R̄ Q
    m = 0.5 * (m + jnp.swapaxes(m, -1, -2))
    denom = s[..., :, None] + s[..., None, :]
    m = jnp.where(denom > 0, m / jnp.where(denom > 0, denom, 1), 0)
    return from_eigenbasis(eigvec, m), jnp.zeros_like(eigval), jnp.zeros_like(eigvec)


_psd_sqrt.defjvp(
    jvp_from_vjp(_psd_sqrt_fwd, _psd_sqrt_bwd, "a second derivative of psd_sqrt (sampling)")
)


def psd_sqrt(cov: jax.Array, eigval: jax.Array, eigvec: jax.Array) -> jax.Array:
    r"""Symmetric square root :math:`R = Q \operatorname{diag}(\sqrt{\lambda}) Q^\top` of ``cov``.

    The gradient w.r.t. ``cov`` solves the Sylvester equation
    :math:`dR\,R + R\,dR = dK`; in the eigenbasis
    :math:`\widetilde{dR}_{ab} = \widetilde{dK}_{ab} / (\sqrt{\lambda_a} + \sqrt{\lambda_b})`,
    finite for repeated eigenvalues (pairs of zero eigenvalues get zero). ``eigval`` and
    ``eigvec`` (from ``eigh(cov)``) are treated as constants.
    """
    eigval, eigvec = jax.lax.stop_gradient((eigval, eigvec))
    return _psd_sqrt(cov, eigval, eigvec)
