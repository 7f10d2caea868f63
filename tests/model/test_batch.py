"""Batch statistics: per-request reduction, aggregates and the KV proxy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffmodel as dm

from helpers import assert_grad_matches_fd, cast_floats, tols


def test_from_requests_hand_computed():
    # Two decodes (contexts 100, 50), one prefill chunk of 30 after 10 cached,
    # one fresh prompt of 8 tokens, one padding slot.
    new = jnp.array([1.0, 1.0, 30.0, 8.0, 99.0])
    ctx = jnp.array([100.0, 50.0, 10.0, 0.0, 7.0])
    mask = jnp.array([True, True, True, True, False])
    s = dm.from_requests(new, ctx, mask)
    assert float(s.prefill_tokens) == 38 and float(s.decode_tokens) == 2
    assert float(s.num_prefill) == 2 and float(s.num_decode) == 2
    assert float(s.kv_decode) == 150 and float(s.kv_prefill) == 10
    assert float(s.attn_prefill) == 30 * (10 + 15) + 8 * (0 + 4)


def test_equal_chunks_aggregate_matches_requests():
    new = jnp.array([64.0, 64.0, 1.0])
    ctx = jnp.array([128.0, 128.0, 900.0])
    exact = dm.from_requests(new, ctx)
    approx = dm.from_aggregates(
        prefill_tokens=128,
        decode_tokens=1,
        num_prefill=2,
        num_decode=1,
        kv_tokens=900,
        prefill_context_tokens=256,
    )
    for name in dm.BatchStats.__dataclass_fields__:
        assert float(getattr(exact, name)) == pytest.approx(
            float(getattr(approx, name))
        )


def test_unequal_chunks_have_more_work_than_the_proxy():
    exact = dm.from_requests(jnp.array([120.0, 8.0]), jnp.array([0.0, 0.0]))
    approx = dm.from_aggregates(
        prefill_tokens=128, decode_tokens=0, num_prefill=2, num_decode=0, kv_tokens=0
    )
    assert float(exact.attn_prefill) > float(approx.attn_prefill)


def test_explicit_is_decode_and_batched_axes():
    new = jnp.ones((3, 4))
    ctx = jnp.full((3, 4), 10.0)
    s = dm.from_requests(new, ctx, is_decode=jnp.zeros((3, 4), bool))
    assert s.num_prefill.shape == (3,) and float(s.num_decode[0]) == 0


@pytest.mark.slow
def test_marginal_cost_gradient_per_request():
    dep = dm.deployment("llama-2-7b")

    def t(new, ctx):
        return dm.step_time(dm.from_requests(new, ctx), dep, dm.Factors()).total

    g_new, g_ctx = jax.grad(t, argnums=(0, 1))(
        jnp.array([1.0, 1.0, 200.0]), jnp.array([500.0, 2000.0, 0.0])
    )
    assert np.all(np.isfinite(g_new)) and np.all(np.isfinite(g_ctx))
    assert np.all(np.asarray(g_ctx[:2]) > 0)  # longer contexts cost more


def test_step_time_gradient_in_request_contexts_matches_finite_differences():
    # Fast central-difference check of d total / d context per request (the decode
    # flags are fixed so that the perturbation does not change the batch's kind).
    dep = dm.deployment("llama-2-7b")
    new = jnp.array([1.0, 1.0, 200.0])
    dec = jnp.array([True, True, False])

    @jax.jit
    def total(ctx):
        stats = dm.from_requests(new, ctx, is_decode=dec)
        return dm.step_time(stats, dep, dm.Factors()).total

    assert_grad_matches_fd(total, [500.0, 2000.0, 30.0], rtol=1e-5, eps=1e-4)


def test_float32_gradient_agrees_with_float64():
    # The same gradient computed in float32 (inputs, deployment and factors) is the
    # float64 one to float32's tolerance, and stays float32.
    dep, fac = dm.deployment("llama-2-7b"), dm.Factors()
    new = jnp.array([1.0, 1.0, 200.0])
    dec = jnp.array([True, True, False])

    def grad_in(dtype):
        d, f, n = cast_floats((dep, fac, new), dtype)

        def total(ctx):
            stats = dm.from_requests(n, ctx, is_decode=dec)
            return dm.step_time(stats, d, f).total

        return jax.jit(jax.grad(total))(jnp.array([500.0, 2000.0, 30.0], dtype))

    g32, g64 = grad_in(jnp.float32), grad_in(jnp.float64)
    assert g32.dtype == jnp.float32
    rtol, atol = tols(jnp.float32)
    np.testing.assert_allclose(g32, g64, rtol=rtol, atol=atol)


def test_kv_proxy():
    assert float(dm.kv_tokens_from_usage(0.5, 1000)) == 8000.0
    assert float(dm.kv_tokens_from_usage(0.5, 1000, block_size=32)) == 16000.0


def test_zero_prefill_requests_gives_zero_attention_work():
    s = dm.from_aggregates(
        prefill_tokens=0, decode_tokens=3, num_prefill=0, num_decode=3, kv_tokens=30
    )
    assert float(s.attn_prefill) == 0.0


def test_aggregates_on_host_equal_the_traced_path_and_land_on_the_device():
    """Host values are computed by NumPy (nothing compiled); under ``jit`` the same
    formula runs in ``jax.numpy``: both give the same statistics and the KV proxy."""
    rng = np.random.default_rng(3)
    n_pf = rng.integers(0, 3, 50).astype(float)
    kw = dict(
        prefill_tokens=n_pf * rng.integers(1, 900, 50),
        decode_tokens=np.arange(50.0),
        num_prefill=n_pf,
        num_decode=np.arange(50.0),
        kv_tokens=dm.kv_tokens_from_usage(rng.uniform(0, 1, 50), 700),
        prefill_context_tokens=n_pf * 40.0,
    )
    host = dm.from_aggregates(**kw)
    traced = jax.jit(lambda k: dm.from_aggregates(**k))(kw)
    for a, b in zip(jax.tree.leaves(host), jax.tree.leaves(traced), strict=True):
        assert isinstance(a, jax.Array) and a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=1e-6)
    usage = rng.uniform(0, 1, 7)
    np.testing.assert_allclose(
        dm.kv_tokens_from_usage(usage, 64),
        jax.jit(dm.kv_tokens_from_usage)(usage, 64),
        rtol=1e-6,
    )
    scalar = dm.from_aggregates(
        prefill_tokens=8, decode_tokens=1, num_prefill=2, num_decode=1, kv_tokens=5.0
    )
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(scalar))
    assert float(scalar.attn_prefill) == 8 * 4 / 2
