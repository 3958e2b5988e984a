r"""Structured linear algebra for Kronecker products, never forming the product.

One namespace for :mod:`kronjax.kron` (products, diagonals, triangular solves, the grid
layout), :mod:`kronjax.eigen` (the eigen cores, whose derivative rules never differentiate
eigenvectors), :mod:`kronjax.roots` (symmetric roots) and :mod:`kronjax.trace` (traces of
:math:`A^{-1}` against Kronecker sums).
Grid element :math:`(i_1, \dots, i_d)` sits at flat index
:math:`i_1 (n_2 \cdots n_d) + \dots + i_d`, the order of ``jnp.kron``.
"""

from kronjax.eigen import kron_eig_logdet, kron_eig_logpdf, kron_eig_solve
from kronjax.eigenbasis import (
    jvp_from_vjp,
    outer_tensor,
    rest_weights,
    spectrum,
    to_mode,
)
from kronjax.kron import (
    GRID_SPLIT,
    check_factors,
    from_eigenbasis,
    kron_dense,
    kron_diag,
    kron_matvec,
    kron_outer,
    kron_rows_matvec,
    kron_solve_triangular,
    mode_product,
)
from kronjax.roots import kron_eig_sqrt_matvec, psd_sqrt
from kronjax.trace import kron_eig_trace_inv

__all__ = [
    "GRID_SPLIT",
    "check_factors",
    "from_eigenbasis",
    "kron_dense",
    "kron_diag",
    "kron_eig_logdet",
    "kron_eig_logpdf",
    "kron_eig_solve",
    "kron_eig_sqrt_matvec",
    "kron_eig_trace_inv",
    "kron_matvec",
    "kron_outer",
    "kron_rows_matvec",
    "kron_solve_triangular",
    "mode_product",
    "outer_tensor",
    "psd_sqrt",
    "jvp_from_vjp",
    "rest_weights",
    "spectrum",
    "to_mode",
]
