"""Fixtures shared by the scheduler tests: a deployment, a small workload and its
compiled simulators."""

import jax
import numpy as np
import pytest

from diffmodel import default_factors, deployment
from diffmodel.scheduler import make_workload, simulate

from helpers import SCHEDULER_STEPS


@pytest.fixture(scope="module")
def dep():
    return deployment("llama-2-70b", "h100", 4)


@pytest.fixture(scope="module")
def workload():
    rng = np.random.default_rng(1)
    n = 12
    arrivals = np.cumsum(rng.exponential(20_000.0, n))
    prompts = rng.integers(20, 400, n)
    outputs = rng.integers(1, 12, n)
    return make_workload(arrivals, prompts, outputs, pad_to=16)


@pytest.fixture(scope="module")
def run(workload, dep):
    """Two compiled simulators (exact: ``temperature=None``; relaxed: an array)."""

    @jax.jit
    def go(knobs, temperature=None, fa=None):
        fa = default_factors() if fa is None else fa
        return simulate(
            workload, dep, fa, knobs, num_steps=SCHEDULER_STEPS, temperature=temperature
        )

    return go
