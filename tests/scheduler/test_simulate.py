"""The continuous-batching scheduler: exact vs relaxed, gradients, conservation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffmodel import Factors, default_factors
from diffmodel.scheduler import Knobs, marginal_cost, serving_objective, simulate


@pytest.mark.slow
def test_exact_serves_everything(workload, run):
    # A tight budget and seat limit force chunking and queueing.
    res = run(Knobs(64, 3))
    m = np.asarray(workload.mask)
    stats = res.trace.stats
    assert np.all(np.asarray(res.finished)[m] == 1.0)
    assert float(res.finished_fraction) == 1.0
    # Conservation: every prompt token prefilled once, every output token made once
    # (the first by the prefill step, the rest by decodes).
    prompts = float(np.sum(np.asarray(workload.prompt_tokens)[m]))
    outputs = float(np.sum(np.asarray(workload.output_tokens)[m]))
    assert float(jnp.sum(stats.prefill_tokens)) == prompts
    assert float(jnp.sum(stats.decode_tokens)) == outputs - m.sum()
    np.testing.assert_array_equal(
        np.asarray(res.output_tokens_done)[m], np.asarray(workload.output_tokens)[m]
    )
    # Budget and seats are respected.
    assert float(jnp.max(stats.tokens)) <= 64
    assert float(jnp.max(res.trace.running)) <= 3
    ttft, e2e = np.asarray(res.ttft_us)[m], np.asarray(res.e2e_us)[m]
    assert np.all(ttft > 0) and np.all(e2e >= ttft)
    # Padding costs nothing.
    assert np.all(np.asarray(res.ttft_us)[~m] == 0)


@pytest.mark.slow
def test_relaxed_tends_to_exact(run):
    knobs = Knobs(128, 4)
    exact = run(knobs)
    relaxed = run(knobs, jnp.asarray(1e-3))
    for name in ("ttft_us", "e2e_us", "itl_us"):
        np.testing.assert_allclose(
            getattr(relaxed, name), getattr(exact, name), rtol=1e-6, atol=1e-3
        )
    np.testing.assert_allclose(
        relaxed.trace.duration_us, exact.trace.duration_us, rtol=1e-6, atol=1e-3
    )


@pytest.mark.slow
def test_relaxed_gradients(run):
    knobs0 = jnp.log(jnp.array([96.0, 3.0]))
    tau = jnp.asarray(0.5)

    def objective(log_knobs, fa):
        knobs = Knobs(jnp.exp(log_knobs[0]), jnp.exp(log_knobs[1]))
        return serving_objective(run(knobs, tau, fa), itl_weight=5.0)

    g_knobs, g_fa = jax.jit(jax.grad(objective, argnums=(0, 1)))(
        knobs0, default_factors()
    )
    assert np.all(np.isfinite(np.asarray(g_knobs)))
    assert np.any(np.asarray(g_knobs) != 0)
    grads = {k: float(v) for k, v in g_fa.as_dict().items()}
    assert all(np.isfinite(v) for v in grads.values())
    # More per-step overhead can only slow serving down; the relaxed objective is
    # smooth in the factors, so its gradient matches central finite differences.
    assert grads["step_overhead_us"] > 0
    base = default_factors().as_dict()
    h = 1.0
    up = Factors(**{**base, "step_overhead_us": base["step_overhead_us"] + h})
    down = Factors(**{**base, "step_overhead_us": base["step_overhead_us"] - h})
    fd = (float(objective(knobs0, up)) - float(objective(knobs0, down))) / (2 * h)
    np.testing.assert_allclose(grads["step_overhead_us"], fd, rtol=1e-4)


def test_bad_simulate_arguments(workload, dep):
    fa, knobs = default_factors(), Knobs(64, 4)
    with pytest.raises(ValueError, match="num_steps"):
        simulate(workload, dep, fa, knobs, num_steps=0)
    with pytest.raises(ValueError, match="temperature"):
        simulate(workload, dep, fa, knobs, num_steps=4, temperature=-1.0)
    with pytest.raises(ValueError, match="context_tokens"):
        marginal_cost([1.0], [-2.0], None, dep, fa)
