"""Multi-device checks, run by ``tests/test_sharding.py`` in a subprocess.

The subprocess gets ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` before jax
starts, so the CPU shows four devices. Every check compares against the same computation
on one device, in this process, in float64. Usage::

    python tests/sharding_checks.py batch|chains|grid
"""

import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from numpyro.infer import MCMC, NUTS

import kronjax
from kronjax import sharding
from kronjax.sharding import collectives

jax.config.update("jax_enable_x64", True)

DEVICES = 4


def rbf(x, ell):
    return jnp.exp(-((x[:, None] - x[None, :]) ** 2) / (2 * ell**2))


def assert_close(got, want, rtol=1e-10, what=""):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        g, w = np.asarray(g), np.asarray(w)
        scale = np.max(np.abs(w)) + 1e-300
        err = np.max(np.abs(g - w)) / scale
        assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol}"


# ----------------------------------------------------------------------------------


def check_batch():
    """B hyperparameter settings, value and gradient, batch axis split over 4 devices."""
    sizes = (6, 5)
    xs = [jnp.linspace(0, 1, n) for n in sizes]
    y = jnp.asarray(np.random.default_rng(0).normal(size=math.prod(sizes)))

    def log_prob(ells, sigma):
        covs = [rbf(x, ell) for x, ell in zip(xs, ells, strict=True)]
        return kronjax.KroneckerNormal(0.0, covs=covs, sigma=sigma).log_prob(y)

    f = jax.vmap(jax.value_and_grad(log_prob, argnums=(0, 1)))
    batch = 8
    rng = np.random.default_rng(1)
    ells, sigmas = rng.uniform(0.1, 0.5, (batch, 2)), rng.uniform(0.05, 0.3, batch)
    want = jax.jit(f)(ells, sigmas)  # one device
    assert len(jax.tree.leaves(want)[0].devices()) == 1

    # The plain JAX route (jax.make_mesh gives an Explicit axis) and the helper (Auto).
    plain = NamedSharding(jax.make_mesh((DEVICES,), ("batch",)), P("batch"))
    for placed in (
        jax.device_put((ells, sigmas), plain),
        sharding.shard_batch((ells, sigmas), sharding.batch_mesh()),
    ):
        got = jax.jit(f)(*placed)
        value = got[0]
        assert value.sharding.spec == P("batch"), value.sharding
        shards = sorted(value.addressable_shards, key=lambda s: s.index[0].start)
        assert [s.data.shape for s in shards] == [(batch // DEVICES,)] * DEVICES
        assert len({s.device for s in shards}) == DEVICES
        assert_close(got, want, 1e-12, "sharded batch")
        found = collectives(jax.jit(f).lower(*placed).compile().as_text())
        assert found == [], f"a batch split over devices needs no communication; found {found}"
    print("batch: ok, no collectives")


# ----------------------------------------------------------------------------------


def check_chains():
    """NUTS, 4 chains on 4 devices, against the same chains run one after the other."""
    sizes = (6, 5)
    xs = [jnp.linspace(0, 1, n) for n in sizes]
    y = jnp.asarray(np.random.default_rng(0).normal(size=math.prod(sizes)))

    def model(y):
        ell = numpyro.sample("ell", dist.LogNormal(jnp.log(0.3), 0.5).expand([2]).to_event(1))
        sigma = numpyro.sample("sigma", dist.HalfNormal(0.5))
        covs = [rbf(x, e) for x, e in zip(xs, ell, strict=True)]
        numpyro.sample("y", kronjax.KroneckerNormal(0.0, covs=covs, sigma=sigma), obs=y)

    def run(method, keys):
        mcmc = MCMC(
            NUTS(model),
            num_warmup=15,
            num_samples=15,
            num_chains=len(keys),
            chain_method=method,
            progress_bar=False,
        )
        mcmc.run(keys, y)
        return mcmc.get_samples(group_by_chain=True)

    keys = jax.random.split(jax.random.key(0), DEVICES)  # one key per chain
    par = run("parallel", keys)
    assert par["ell"].shape == (DEVICES, 15, 2)
    assert len(par["sigma"].devices()) == DEVICES, "parallel chains did not use every device"
    assert np.unique(np.asarray(par["sigma"][:, -1])).size == DEVICES, "chains not independent"
    # Sequential chains are compiled one by one (slow), so rerun two of the four with their
    # keys. Same keys, same trajectories; not bitwise: the parallel chains are one
    # compiled program (pmap), the sequential ones jit step by step, and round-off differs.
    seq = run("sequential", keys[:2])
    assert len(seq["sigma"].devices()) == 1
    assert_close(jax.tree.map(lambda a: a[:2], par), seq, 1e-7, "parallel vs sequential chains")
    print("chains: ok")


# ----------------------------------------------------------------------------------


def check_grid():
    """One grid split along its first axis over 4 devices: log_prob, grad, sample, predict."""
    sizes, test_sizes = (16, 12, 8), (8, 8, 8)
    n = math.prod(sizes)
    block = n // DEVICES
    factor_elems = sum(k * k + k for k in sizes)
    xs = [np.linspace(0, 1, k) for k in sizes]
    xt = [np.linspace(-0.1, 1.1, k) for k in test_sizes]
    ells = (0.2, 0.3, 0.25)
    covs = [rbf(jnp.asarray(x), e) for x, e in zip(xs, ells, strict=True)]
    kstars = [
        jnp.exp(-((a[:, None] - x[None, :]) ** 2) / (2 * e**2))
        for a, x, e in zip(xt, xs, ells, strict=True)
    ]
    rng = np.random.default_rng(0)
    y, loc = rng.normal(size=n), rng.normal(size=n)
    mesh = sharding.batch_mesh(axis="grid")

    # The flat (N,) vector in blocks of N / P is the (n_1, …, n_d) tensor split on axis 0.
    y_flat = sharding.shard_grid(y, sizes, mesh)
    y_grid = jax.device_put(y.reshape(sizes), NamedSharding(mesh, P("grid")))
    for s_flat, s_grid in zip(y_flat.addressable_shards, y_grid.addressable_shards, strict=True):
        assert s_flat.device == s_grid.device
        np.testing.assert_array_equal(np.asarray(s_flat.data), np.asarray(s_grid.data).ravel())
        assert s_flat.data.shape == (block,)

    def log_prob(covs, loc, y):
        return kronjax.KroneckerNormal(loc, covs=covs, sigma=0.1).log_prob(y)

    def log_prob_chols(covs, loc, y):  # noise-free Cholesky route: per-mode triangular solves
        chols = [jnp.linalg.cholesky(k + 1e-6 * jnp.eye(len(k))) for k in covs]
        return kronjax.KroneckerNormal(loc, chols=chols).log_prob(y)

    def log_prob_noise(covs, loc, y):  # structured noise: whitening, then the eigen core
        noise = [None, jnp.linspace(0.5, 2.0, sizes[1]), None]
        return kronjax.KroneckerNormal(loc, covs=covs, sigma=0.1, noise_factors=noise).log_prob(y)

    def sample(covs, loc, key):
        return kronjax.KroneckerNormal(loc, covs=covs, sigma=0.1).sample(key)

    def predict(covs, loc, y):
        d = kronjax.KroneckerNormal(loc, covs=covs, sigma=0.1)
        return kronjax.gp.predict(d, y, kstars, [jnp.ones(k) for k in test_sizes])

    replicated = jax.device_put(covs, NamedSharding(mesh, P()))
    loc_s = sharding.shard_grid(loc, sizes, mesh)
    key = jax.random.key(0)
    cases = {
        "log_prob": (log_prob, (replicated, loc_s, y_flat), (covs, loc, y)),
        "grad": (jax.grad(log_prob, (0, 1, 2)), (replicated, loc_s, y_flat), (covs, loc, y)),
        "log_prob chols": (log_prob_chols, (replicated, loc_s, y_flat), (covs, loc, y)),
        "log_prob noise": (log_prob_noise, (replicated, loc_s, y_flat), (covs, loc, y)),
        "sample": (sample, (replicated, loc_s, key), (covs, loc, key)),
        "predict": (predict, (replicated, loc_s, y_flat), (covs, loc, y)),
    }
    for name, (fn, args, args_one) in cases.items():
        split = jax.jit(sharding.split_grid(fn, mesh))
        got, want = split(*args), jax.jit(fn)(*args_one)
        assert_close(got, want, 1e-11, name)
        for leaf, ref in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            if leaf.shape in ((n,), (math.prod(test_sizes),)):  # grid vectors stay split
                assert leaf.sharding.spec == P("grid"), (name, leaf.sharding)
                assert ref.sharding.is_fully_replicated
        found = collectives(split.lower(*args).compile().as_text())
        kinds = {k for k, _ in found}
        assert "all-to-all" in kinds, (name, found)  # the reshard around the mode-1 product
        assert kinds <= {"all-to-all", "all-reduce", "all-gather"}, (name, found)
        for kind, size in found:
            # all-to-all: one device's block; the rest: scalars or factor-sized cotangents.
            limit = block if kind == "all-to-all" else factor_elems
            assert size <= limit, f"{name}: {kind} of {size} elements (N = {n})"
        if name != "grad":  # only the cotangents of the replicated factors gather
            assert "all-gather" not in kinds, (name, found)
        print(f"grid {name}: ok, {sorted(found)}")

    # Without split_grid XLA contracts the split axis in place: an N-sized all-reduce.
    plain = collectives(jax.jit(log_prob).lower(replicated, loc_s, y_flat).compile().as_text())
    assert max(size for _, size in plain) >= n, plain


if __name__ == "__main__":
    assert jax.device_count() == DEVICES, jax.devices()
    for check in sys.argv[1:]:
        {"batch": check_batch, "chains": check_chains, "grid": check_grid}[check]()
