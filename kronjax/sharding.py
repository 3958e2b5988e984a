r"""Multi-device helpers: thin wrappers over ``jax.sharding``; kronjax adds no engine.

Three ways to use several devices (see ``docs/multi_device.md``):

1. **Batches** (hyperparameter settings, datasets): place the batch axis of the inputs
   with ``NamedSharding(mesh, P("batch"))`` and run ``jax.jit(jax.vmap(f))``; XLA's
   partitioner gives every device its slice and no device talks to another. Plain JAX;
   :func:`batch_mesh` and :func:`shard_batch` only save boilerplate.
2. **NUTS chains**: ``MCMC(..., num_chains=k, chain_method="parallel")`` (NumPyro).
3. **One grid split across devices**: the flat ``(N,)`` vector sharded in contiguous
   blocks of ``N / P`` is the ``(n_1, …, n_d)`` tensor split along its first axis
   (the flattening order is row-major), so :func:`shard_grid` places it with
   ``P("grid")``. Wrap the function with :func:`split_grid` so that kronjax's mode
   products keep that layout: the products along axes ``2..d`` are local, and the one
   along axis 1 runs after an all-to-all that moves the split to another grid axis.
"""

import functools
import math
import re
from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kronjax import linalg

__all__ = ["batch_mesh", "collectives", "shard_batch", "shard_grid", "split_grid"]

_COLLECTIVE = re.compile(
    r"^\s*(?:ROOT )?%\S+ = (.*?) "
    r"(all-gather|all-reduce|all-to-all|reduce-scatter|collective-permute)(?:-start)?\("
)


def batch_mesh(num_devices: int | None = None, axis: str = "batch") -> Mesh:
    """A one-axis mesh over the first ``num_devices`` devices (all by default).

    The axis type is ``Auto``: shardings live on the arrays, not in their types, and
    XLA's partitioner propagates them (``jax.make_mesh`` defaults to ``Explicit``).
    """
    devices = jax.devices()[: num_devices or jax.device_count()]
    return jax.make_mesh((len(devices),), (axis,), axis_types=(AxisType.Auto,), devices=devices)


def shard_batch(tree, mesh: Mesh, axis: str = "batch"):
    """Put every array of ``tree`` on ``mesh``, its leading (batch) axis split over ``axis``.

    The batch size must be a multiple of ``mesh.shape[axis]``. The split is explicit (in
    the arrays' types, ``AxisType.Explicit``), so kronjax's factor decompositions
    (:mod:`kronjax.lapack`) loop over each device's own part with no communication; with
    an ``Auto`` axis XLA would gather the factors onto every device first.
    """
    names = mesh.axis_names
    explicit = Mesh(mesh.devices, names, axis_types=(AxisType.Explicit,) * len(names))
    return jax.device_put(tree, NamedSharding(explicit, P(axis)))


def shard_grid(x, sizes: Sequence[int], mesh: Mesh, axis: str = "grid") -> jax.Array:
    r"""Place a flat grid vector ``(..., N)`` split along the first grid axis over ``axis``.

    In the flattening order grid element :math:`(i_1, \dots, i_d)` sits at
    :math:`i_1 (n_2 \cdots n_d) + \dots + i_d`, so device :math:`p` of :math:`P` holds
    the contiguous block :math:`[p N/P, (p+1) N/P)`, i.e. the rows
    :math:`i_1 \in [p n_1/P, (p+1) n_1/P)` of the ``(n_1, …, n_d)`` tensor: the same
    layout as ``P(axis)`` on ``x.reshape(..., *sizes)`` along its first grid axis.
    Leading axes are replicated. Requires :math:`P \mid n_1`.
    """
    x = np.asarray(x) if not isinstance(x, jax.Array) else x
    n_dev = mesh.shape[axis]
    if x.shape[-1] != math.prod(sizes) or sizes[0] % n_dev:
        raise ValueError(
            f"shard_grid: x has shape {tuple(x.shape)}, sizes {tuple(sizes)}, {n_dev} devices "
            f"on axis {axis!r}; expected (..., {math.prod(sizes)}) and n_1 = {sizes[0]} "
            "divisible by the device count"
        )
    spec = P(*([None] * (x.ndim - 1)), axis)
    return jax.device_put(x, NamedSharding(mesh, spec))


def split_grid(fn: Callable, mesh: Mesh, axis: str = "grid") -> Callable:
    """``fn`` with kronjax's mode products keeping grid axis 1 split over ``axis`` of ``mesh``.

    Use as ``jax.jit(split_grid(f, mesh))``, with the grid vectors placed by
    :func:`shard_grid` and the factors replicated. While ``fn`` is traced, every mode
    product of ``kronjax.linalg`` constrains its grid tensor
    (``jax.lax.with_sharding_constraint``) to be split along grid axis 1; the product
    along that axis is preceded by a reshard to the largest other grid axis (an
    all-to-all, ``N / P`` elements per device) and followed by one back. Without this
    XLA contracts the split axis in place and all-reduces an ``N``-sized partial sum on
    every device. The setting is scoped to the trace of ``fn``, so jit's cache stays right.
    Grids with ``d = 1`` are left to the partitioner.
    """

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        token = linalg.GRID_SPLIT.set((mesh, axis))
        try:
            return fn(*args, **kwargs)
        finally:
            linalg.GRID_SPLIT.reset(token)

    return wrapped


def collectives(compiled_text: str) -> list[tuple[str, int]]:
    """``(kind, elements per device)`` of every collective in compiled HLO text.

    ``compiled_text`` is ``jax.jit(f).lower(*args).compile().as_text()``; kinds are
    ``all-gather``, ``all-reduce``, ``all-to-all``, ``reduce-scatter`` and
    ``collective-permute``. A tuple-shaped collective (XLA's all-to-all sends one piece
    per peer) counts the sum of its pieces. For auditing what a sharded program moves.
    """
    out = []
    for line in compiled_text.splitlines():
        m = _COLLECTIVE.match(line)
        if m:
            dims = re.findall(r"[a-z]+\d*\[([\d,]*)\]", m.group(1))
            size = sum(math.prod(int(v) for v in s.split(",") if v) for s in dims)
            out.append((m.group(2), size))
    return out
