"""Test configuration: float64 unless ``KRONJAX_TEST_DTYPE=float32`` (the core re-run)."""

import os

import jax
import numpy as np
import pytest

DTYPE = os.environ.get("KRONJAX_TEST_DTYPE", "float64")
jax.config.update("jax_enable_x64", DTYPE == "float64")

# Relative tolerances for comparisons against a float64 dense twin.
RTOL = {"float64": 1e-8, "float32": 2e-3}[DTYPE]


@pytest.fixture
def rng():
    return np.random.default_rng(0)
