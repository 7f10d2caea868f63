"""Physics primitives of the step model: the smooth maximum, experts touched by
routing, attention work, the expert-parallel all-to-all."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffmodel as dm
from diffmodel._model._physics import (
    all_to_all_us,
    attention_work_dims,
    balanced_experts,
    expected_experts,
    smooth_max,
    touched_experts,
)
from diffmodel._model._roofline import linear_work

from helpers import one_step, tiny_architecture


def test_mixtral_expected_experts():
    assert float(expected_experts(1.0, 8.0, 2.0)) == pytest.approx(2.0)
    assert float(expected_experts(1000.0, 8.0, 2.0)) == pytest.approx(8.0, rel=1e-9)
    assert float(expected_experts(0.0, 8.0, 2.0)) == 0.0
    assert float(expected_experts(5.0, 0.0, 0.0)) == 0.0  # dense model
    # Weight bytes only (no activation traffic): 1 token reads 2 experts, 1000 all 8.
    arch = eqx.tree_at(lambda a: a.act_bytes, dm.architecture("mixtral-8x7b"), 0.0)
    tp = jnp.asarray(1.0)
    _, b1 = linear_work(jnp.asarray(1.0), arch, tp)
    _, b1000 = linear_work(jnp.asarray(1000.0), arch, tp)
    expert_bytes = 32 * 3 * 4096 * 14336 * 2
    assert float(b1000 - b1) == pytest.approx(6 * expert_bytes, rel=1e-6)


def test_smooth_max_properties():
    assert float(smooth_max(3.0, 0.0)) == 3.0
    assert float(smooth_max(0.0, 0.0)) == 0.0
    assert float(smooth_max(2.0, 2.0)) == pytest.approx(2 * 2**0.25)
    g = jax.grad(lambda a: smooth_max(a, 0.0))(0.0)
    assert np.isfinite(g)
    assert np.isnan(float(smooth_max(jnp.nan, 1.0)))
    assert np.isnan(float(smooth_max(1.0, jnp.nan)))


@pytest.mark.slow
def test_smooth_max_equals_the_power_mean_and_its_gradient():
    # Against (a^4 + b^4)^(1/4) in float64, on both sides of the tie and at it.
    rng = np.random.default_rng(0)
    a = np.concatenate([rng.lognormal(0, 3, 200), [1.0, 5.0, 0.0]])
    b = np.concatenate([rng.lognormal(0, 3, 200), [1.0, 0.0, 5.0]])
    np.testing.assert_allclose(smooth_max(a, b), (a**4 + b**4) ** 0.25, rtol=1e-13)
    grad = jax.vmap(jax.grad(smooth_max, argnums=(0, 1)))(a, b)
    s = (a**4 + b**4) ** 0.25
    np.testing.assert_allclose(grad[0], (a / s) ** 3, rtol=1e-12)
    np.testing.assert_allclose(grad[1], (b / s) ** 3, rtol=1e-12)
    # float32 without overflow where a^4 alone would overflow (a ~ 1e10 us).
    big = smooth_max(np.float32(1e10), np.float32(1e10))
    assert np.isfinite(big) and big == pytest.approx(1e10 * 2**0.25, rel=1e-6)


def test_smooth_max_derivative_rule_matches_the_power_mean_to_second_order():
    # The written-out derivative (custom_jvp) against autodiff of (a^4 + b^4)^(1/4)
    # and of the general power mean, first and second order (the Laplace step
    # differentiates the rule again), at a tie, with one side zero, and with a scalar
    # broadcast against an array.
    def plain(a, b, p=4.0):
        return (a**p + b**p) ** (1.0 / p)

    for a, b in [(3.0, 1.5), (0.7, 2.0), (1.0, 1.0), (2.0, 1e-3)]:
        for p in (4.0, 2.5):
            got = jax.hessian(lambda x, p=p: smooth_max(x[0], x[1], p))(
                jnp.asarray([a, b])
            )
            want = jax.hessian(lambda x, p=p: plain(x[0], x[1], p))(jnp.asarray([a, b]))
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    g = jax.grad(lambda a: smooth_max(a, 0.0))(2.0)
    assert float(g) == 1.0
    x = jnp.asarray([0.5, 1.0, 4.0])
    got = jax.grad(lambda c: jnp.sum(smooth_max(x, c)))(1.0)
    assert float(got) == pytest.approx(float(jnp.sum((1.0 / plain(x, 1.0)) ** 3)))


def _round_robin_touched(tokens, n_experts, top_k, ep):
    """Distinct experts of the first of ``ep`` GPUs hit by the benchmarks' balanced
    routing: token t takes experts (t + i s) mod E, s = ceil(E / k), once the
    tokens reach s, else floor(t s / T + i s) mod E."""
    s = -(-n_experts // top_k)
    hit = set()
    for t in range(tokens):
        for i in range(top_k):
            e = (t + i * s if tokens >= s else int(t * s / tokens + i * s)) % n_experts
            hit.add(e)
    return sum(e < n_experts // ep for e in hit)


@pytest.mark.parametrize(
    "n_experts,top_k,ep",
    [(8, 2, 1), (8, 2, 2), (8, 2, 8), (256, 8, 1), (256, 8, 8), (256, 8, 256)],
)
@pytest.mark.parametrize("tokens", [1, 2, 3, 5, 16, 31, 32, 100, 1000])
def test_balanced_experts_match_round_robin(tokens, n_experts, top_k, ep):
    got = balanced_experts(float(tokens), n_experts / ep, top_k / ep)
    assert float(got) == _round_robin_touched(tokens, n_experts, top_k, ep)


def test_touched_experts_by_routing():
    assert float(balanced_experts(1.0, 256.0, 8.0)) == 8.0
    assert float(balanced_experts(64.0, 256.0, 8.0)) == 256.0
    assert float(balanced_experts(0.0, 8.0, 2.0)) == 0.0
    assert float(balanced_experts(5.0, 0.0, 0.0)) == 0.0  # dense model
    assert float(touched_experts(1.0, 8.0, 2.0)) == pytest.approx(2.0)  # uniform
    # Uniform routing misses experts that round-robin routing touches: 4 tokens on
    # Mixtral touch 8(1 - 0.75^4) = 5.47 experts on average, balanced all 8.
    np.testing.assert_allclose(touched_experts(4.0, 8.0, 2.0), 8 * (1 - 0.75**4))
    assert float(touched_experts(4.0, 8.0, 2.0, "balanced")) == 8.0
    with pytest.raises(ValueError, match="routing"):
        touched_experts(1.0, 8.0, 2.0, "power_law")


def test_gqa_dims_equal_the_old_attention_work():
    from diffmodel._model._physics import attention_work

    x = jnp.asarray
    old = attention_work(x(700.0), x(900.0), x(30.0), 8.0, 2.0, 128.0, 1.0, 2.0)
    new = attention_work_dims(x(700.0), x(900.0), x(30.0), 8.0, 128.0, 128.0, 512.0, 1)
    np.testing.assert_allclose(old, new, rtol=1e-15)


def test_expert_parallel_all_to_all_by_hand():
    got = all_to_all_us(1e6, 8.0, 450e9, 0.7, 8.0)
    assert float(got) == pytest.approx(8 + 7 / 8 * 1e6 / (450e9 * 0.7) * 1e6)
    assert float(all_to_all_us(1e6, 1.0, 450e9, 0.7, 8.0)) == 0.0
    a = tiny_architecture(n_experts=8, top_k=2, expert_ffn=8, ffn=0, moe_layers=3)
    fa = dm.default_factors()
    s = one_step(decode_tokens=4, num_decode=4, kv_decode=400)
    tp_only = dm.step_time(s, dm.deployment(a, "h100", 1), fa)
    dp_ep = dm.step_time(s, dm.deployment(a, "h100", 1, ep=4), fa)
    # Dispatch + combine: 3 MoE layers x 2 all-to-alls of T k d = 4 x 2 x 8 bf16.
    one = float(all_to_all_us(4 * 2 * 8 * 2.0, 4.0, 450e9, 0.7, 8.0))
    assert float(dp_ep.allreduce - tp_only.allreduce) == pytest.approx(6 * one)
    with pytest.raises(ValueError, match="ep=3"):
        dm.deployment(a, "h100", 1, ep=3)
