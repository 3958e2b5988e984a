"""kronjax on several devices, three ways, on a CPU that pretends to have four devices.

1. a batch of hyperparameter settings split over the devices;
2. NUTS chains in parallel, one per device;
3. one grid split across the devices along its first axis.

Run: ``python examples/multi_device.py``. On real accelerators drop the XLA_FLAGS line.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import jax  # noqa: E402  (XLA_FLAGS must be set before jax starts)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import numpyro  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from numpyro.infer import MCMC, NUTS  # noqa: E402

import kronjax  # noqa: E402
from kronjax import sharding  # noqa: E402

jax.config.update("jax_enable_x64", True)
print("devices:", jax.devices())


def rbf(x, ell):
    return jnp.exp(-((x[:, None] - x[None, :]) ** 2) / (2 * ell**2))


# -- 1. a batch of settings, split over the devices --------------------------------------
xs = [jnp.linspace(0, 1, 16), jnp.linspace(0, 1, 12)]
y = jnp.asarray(np.random.default_rng(0).normal(size=16 * 12))


def log_prob(ells, sigma):
    covs = [rbf(x, e) for x, e in zip(xs, ells, strict=True)]
    return kronjax.KroneckerNormal(0.0, covs=covs, sigma=sigma).log_prob(y)


f = jax.jit(jax.vmap(jax.value_and_grad(log_prob, argnums=(0, 1))))
rng = np.random.default_rng(1)
ells, sigmas = rng.uniform(0.1, 0.5, (64, 2)), rng.uniform(0.05, 0.3, 64)
mesh = jax.make_mesh((jax.device_count(),), ("batch",))
(value, grads) = f(*jax.device_put((ells, sigmas), NamedSharding(mesh, P("batch"))))
one = f(ells, sigmas)[0]  # the same on one device
print(
    "1. batch: value sharding",
    value.sharding.spec,
    "max |diff| vs one device",
    float(jnp.max(jnp.abs(value - one))),
)

# -- 2. NUTS chains in parallel -------------------------------------------------------------


def model(y):
    ell = numpyro.sample("ell", dist.LogNormal(jnp.log(0.3), 0.5).expand([2]).to_event(1))
    sigma = numpyro.sample("sigma", dist.HalfNormal(0.5))
    covs = [rbf(x, e) for x, e in zip(xs, ell, strict=True)]
    numpyro.sample("y", kronjax.KroneckerNormal(0.0, covs=covs, sigma=sigma), obs=y)


mcmc = MCMC(
    NUTS(model),
    num_warmup=200,
    num_samples=200,
    num_chains=4,
    chain_method="parallel",
    progress_bar=False,
)
mcmc.run(jax.random.key(0), y)
draws = mcmc.get_samples(group_by_chain=True)
print(
    "2. chains:",
    draws["sigma"].shape,
    "on",
    len(draws["sigma"].devices()),
    "devices;",
    "posterior mean of sigma per chain",
    np.round(np.asarray(draws["sigma"].mean(1)), 3),
)

# -- 3. one grid split across the devices -------------------------------------------------
sizes = (32, 24, 16)
grid_axes = [np.linspace(0, 1, k) for k in sizes]
covs = [rbf(jnp.asarray(x), e) for x, e in zip(grid_axes, (0.2, 0.3, 0.25), strict=True)]
y3 = np.random.default_rng(2).normal(size=int(np.prod(sizes)))
test_axes = [np.linspace(0, 1, 8)] * 3
kstars = [
    jnp.exp(-((a[:, None] - x[None, :]) ** 2) / (2 * e**2))
    for a, x, e in zip(test_axes, grid_axes, (0.2, 0.3, 0.25), strict=True)
]

grid_mesh = sharding.batch_mesh(axis="grid")  # an Auto axis
y3_split = sharding.shard_grid(y3, sizes, grid_mesh)  # == P("grid") on y3.reshape(sizes)
covs_rep = jax.device_put(covs, NamedSharding(grid_mesh, P()))


def fit_and_predict(covs, y, key):
    d = kronjax.KroneckerNormal(0.0, covs=covs, sigma=0.1)
    value, grad = jax.value_and_grad(
        lambda c: kronjax.KroneckerNormal(0.0, covs=c, sigma=0.1).log_prob(y)
    )(covs)
    mean, var = kronjax.gp.predict(d, y, kstars, [jnp.ones(8)] * 3)
    return value, grad, d.sample(key), mean, var


split = jax.jit(sharding.split_grid(fit_and_predict, grid_mesh))
key = jax.random.key(3)
out = split(covs_rep, y3_split, key)
ref = jax.jit(fit_and_predict)(covs, y3, key)
err = max(
    float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True)
)
print("3. grid: sample sharding", out[2].sharding.spec, "max rel. diff vs one device", err)
kinds = {}
for kind, size in sharding.collectives(split.lower(covs_rep, y3_split, key).compile().as_text()):
    kinds.setdefault(kind, []).append(size)
print("   collectives (kind: elements per device):", kinds, "N / P =", int(np.prod(sizes)) // 4)
