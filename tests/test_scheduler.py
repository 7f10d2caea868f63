"""The continuous-batching scheduler: exact vs relaxed, gradients, conservation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffmodel import (
    Factors,
    default_factors,
    deployment,
    from_requests,
    step_time,
)
from diffmodel.scheduler import (
    Knobs,
    make_workload,
    marginal_cost,
    serving_objective,
    simulate,
    tune_knobs,
)

STEPS = 120


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
            workload, dep, fa, knobs, num_steps=STEPS, temperature=temperature
        )

    return go


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


def test_tune_knobs_reaches_grid_optimum(workload, dep, run):
    # A 7 x 5 grid of the exact simulator (35 runs) against 13 runs of the smoothed
    # gradient from a seat-starved, budget-starved start.
    grid = [
        float(serving_objective(run(Knobs(b, s))))
        for b in (16, 32, 64, 128, 256, 512, 1024)
        for s in (1, 2, 4, 8, 16)
    ]
    res = tune_knobs(workload, dep, default_factors(), Knobs(32, 2), num_steps=STEPS)
    assert res.evaluations == 13
    assert res.log_knobs.shape == (4, 2) and res.gradients.shape == (3, 2)
    assert np.all(np.isfinite(np.asarray(res.gradients)))
    # The first step leaves the starved corner: both knobs want to grow.
    assert np.all(np.asarray(res.gradients[0]) < 0)
    obj = float(res.objective_us)
    assert obj < 0.5 * float(res.start_objective_us)
    assert obj <= 1.05 * min(grid)
    # The reported objective is the exact simulator's at the returned knobs.
    np.testing.assert_allclose(obj, float(serving_objective(run(res.knobs))))
    for k in (res.knobs.max_num_batched_tokens, res.knobs.max_num_seqs):
        assert float(k) == round(float(k)) and float(k) >= 1


@pytest.mark.parametrize(
    "field, kwargs",
    [
        ("iterations", dict(iterations=0)),
        ("sigma", dict(sigma=0.0)),
        ("learning_rate", dict(learning_rate=-1.0)),
        ("max_step", dict(max_step=np.inf)),
    ],
)
def test_bad_tune_arguments(workload, dep, field, kwargs):
    with pytest.raises(ValueError, match=field):
        tune_knobs(
            workload, dep, default_factors(), Knobs(32, 2), num_steps=4, **kwargs
        )


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


@pytest.mark.parametrize(
    "field, kwargs",
    [
        ("arrival_us", dict(arrival_us=[-1.0, 0.0])),
        ("arrival_us", dict(arrival_us=[np.nan, 0.0])),
        ("prompt_tokens", dict(prompt_tokens=[0, 5])),
        ("prompt_tokens", dict(prompt_tokens=[2.5, 5])),
        ("output_tokens", dict(output_tokens=[-3, 5])),
        ("output_tokens", dict(output_tokens=[1, 2, 3])),
        ("cached_tokens", dict(cached_tokens=[-16, 0])),
        ("pad_to", dict(pad_to=1)),
    ],
)
def test_bad_workload(field, kwargs):
    args = dict(arrival_us=[0.0, 10.0], prompt_tokens=[4, 5], output_tokens=[2, 3])
    args.update(kwargs)
    with pytest.raises(ValueError, match=field):
        make_workload(
            args.pop("arrival_us"),
            args.pop("prompt_tokens"),
            args.pop("output_tokens"),
            **args,
        )


@pytest.mark.parametrize(
    "field, knobs",
    [("max_num_batched_tokens", (0.0, 4.0)), ("max_num_seqs", (64.0, np.nan))],
)
def test_bad_knobs(field, knobs):
    with pytest.raises(ValueError, match=field):
        Knobs(*knobs)


def test_bad_simulate_arguments(workload, dep):
    fa, knobs = default_factors(), Knobs(64, 4)
    with pytest.raises(ValueError, match="num_steps"):
        simulate(workload, dep, fa, knobs, num_steps=0)
    with pytest.raises(ValueError, match="temperature"):
        simulate(workload, dep, fa, knobs, num_steps=4, temperature=-1.0)
    with pytest.raises(ValueError, match="context_tokens"):
        marginal_cost([1.0], [-2.0], None, dep, fa)
