"""Marginal costs of a step's tokens, against finite differences."""

import jax
import numpy as np
import pytest

from diffmodel import default_factors, from_requests, step_time
from diffmodel.scheduler import marginal_cost


@pytest.mark.slow
def test_marginal_cost_matches_finite_differences(dep):
    fa = default_factors()
    new = np.array([1.0, 1.0, 300.0, 57.0, 0.0])
    ctx = np.array([800.0, 120.0, 32.0, 2048.0, 0.0])
    mask = np.array([True, True, True, True, False])
    dec = np.array([True, True, False, False, False])
    mc = marginal_cost(new, ctx, mask, dep, fa, is_decode=dec)
    assert float(mc.step_us) > 0

    @jax.jit
    def step_us(n, c):
        return step_time(from_requests(n, c, mask, is_decode=dec), dep, fa).total

    h = 1e-3
    for i in range(4):
        e = np.zeros_like(new)
        e[i] = h
        fd_new = (step_us(new + e, ctx) - step_us(new - e, ctx)) / (2 * h)
        fd_ctx = (step_us(new, ctx + e) - step_us(new, ctx - e)) / (2 * h)
        np.testing.assert_allclose(float(mc.new_tokens[i]), fd_new, rtol=1e-5)
        np.testing.assert_allclose(float(mc.context_tokens[i]), fd_ctx, rtol=1e-5)
    assert float(mc.new_tokens[4]) == 0.0 and float(mc.context_tokens[4]) == 0.0
    # A prefill token costs more than the context token behind it.
    assert float(mc.new_tokens[2]) > float(mc.context_tokens[3]) > 0
