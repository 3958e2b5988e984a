"""Multi-device tests: sharded batches, parallel NUTS chains, one grid split across devices.

XLA_FLAGS must be set before jax starts, and this session has started it, so every check
runs ``tests/sharding_checks.py`` in a subprocess on four forced host CPU devices and
fails with its output. The subprocess imports the kronjax this session imports.
"""

import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import kronjax
from kronjax import linalg, sharding

CHECKS = Path(__file__).with_name("sharding_checks.py")


@pytest.mark.parametrize("check", ["batch", "chains", "grid"])
def test_multi_device(check):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    root = str(Path(kronjax.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("KRONJAX_TEST_DTYPE", None)
    proc = subprocess.run(
        [sys.executable, str(CHECKS), check], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"{check} failed:\n{proc.stdout}\n{proc.stderr}"
    assert f"{check}" in proc.stdout and ": ok" in proc.stdout, proc.stdout


def test_shard_grid_names_the_shapes():
    mesh = sharding.batch_mesh(axis="grid")
    with pytest.raises(ValueError, match=r"x has shape \(11,\), sizes \(3, 4\)"):
        sharding.shard_grid(np.zeros(11), (3, 4), mesh)


def test_split_grid_is_scoped_to_the_call():
    mesh = sharding.batch_mesh(axis="grid")
    seen = []

    def fn(x):
        seen.append(linalg.GRID_SPLIT.get())
        raise RuntimeError("inside")

    with pytest.raises(RuntimeError, match="inside"):
        sharding.split_grid(fn, mesh)(jnp.zeros(3))
    assert seen == [(mesh, "grid")]
    assert linalg.GRID_SPLIT.get() is None
