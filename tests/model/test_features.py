"""Serving features in the step model: prefix caching, speculative decoding,
pipeline parallelism, and gradients through them."""

import jax.numpy as jnp
import numpy as np
import pytest

import diffmodel as dm
from diffmodel._model import _features as feat

from helpers import check_scalar_grad, feature_stats, one_step, power_mean


def test_prefix_cache_and_speculative_stats():
    new, ctx = feat.prefix_cached_requests(
        jnp.array([100.0, 1.0]), jnp.array([0.0, 50.0]), jnp.array([60.0, 60.0])
    )
    np.testing.assert_array_equal(new, [40.0, 1.0])
    np.testing.assert_array_equal(ctx, [60.0, 50.0])
    agg = dm.from_aggregates(
        prefill_tokens=200.0,
        decode_tokens=0.0,
        num_prefill=2.0,
        num_decode=0.0,
        kv_tokens=0.0,
    )
    hit = feat.prefix_cached(agg, 120.0)
    # Two chunks of 100, 60 cached each: 2 x 40 x (60 + 20) pairs, 120 cached read.
    assert float(hit.attn_prefill) == pytest.approx(2 * 40 * (60 + 20))
    assert (float(hit.prefill_tokens), float(hit.kv_prefill)) == (80, 120)
    spec = feat.speculative_stats(one_step(decode_tokens=3, num_decode=3), 2.0)
    assert float(spec.decode_tokens) == 9


def test_speculative_k0_is_the_plain_step_and_k_costs_more():
    dep = dm.deployment("llama-3.1-8b", "h100", 1)
    draft = dm.deployment("llama-2-7b", "h100", 1)  # any model serves as a draft
    fa = dm.default_factors()
    s = one_step(decode_tokens=32, num_decode=32, kv_decode=32 * 1500)
    plain = dm.step_time(s, dep, fa).total
    k0 = feat.speculative_step(
        s, dep, fa, k=jnp.asarray(0.0), draft=draft, n_draft_steps=0
    )
    assert float(k0.total) == pytest.approx(float(plain), rel=1e-12)
    k2 = feat.speculative_step(
        s, dep, fa, k=jnp.asarray(2.0), draft=draft, n_draft_steps=2
    )
    assert float(k2.total) > float(plain) and float(k2.draft_us) > 0
    # The verify's decode attention: 3 queries per request, KV read once.
    pairs = 3 * 32 * 1500 + 32 * 3 * 2 / 2
    f = 2 * 32 * 256 * pairs * 32
    b = 32 * (2 * 8 * 128 * 2 * (32 * 1500 + 64) + 32 * 256 * 2 * 96)
    want = power_mean(f / (989.5e12 * 0.5) * 1e6, b / (3.35e12 * 0.7) * 1e6)
    assert float(k2.verify.attention_decode) == pytest.approx(want, rel=1e-12)
    assert float(feat.accepted_tokens(2.0, 0.5)) == pytest.approx(1.75)


def test_pipeline_one_stage_is_the_plain_step_and_bubbles():
    dep = dm.deployment("llama-3.1-70b", "h100", 4)
    fa = dm.default_factors()
    s = one_step(prefill_tokens=512, num_prefill=1, attn_prefill=512 * 256)
    plain = dm.step_time(s, dep, fa)
    one = feat.pipeline_step(s, dep, fa, pp=1)
    assert float(one.total) == pytest.approx(float(plain.total), rel=1e-12)
    two = feat.pipeline_step(s, dep, fa, pp=2)
    assert float(two.bubble_us) == pytest.approx(float(two.stage_us))
    assert float(two.total) == pytest.approx(
        3 * float(two.stage_us) + float(plain.overhead)
    )
    send = 256 * 8192 * 2 / (450e9 * 0.7) * 1e6 + 8.0
    assert float(two.p2p_us) == pytest.approx(send)


def test_grad_through_serving_features():
    dep = dm.deployment("llama-3.1-8b", "h100", 1)
    draft = dm.deployment("llama-2-7b", "h100", 1)
    fa, s = dm.default_factors(), feature_stats(0.5, 1e5)
    check_scalar_grad(
        lambda k: (
            feat.speculative_step(s, dep, fa, k=k, draft=draft, n_draft_steps=2).total
        ),
        2.0,
    )
    check_scalar_grad(
        lambda h: dm.step_time(feat.prefix_cached(s, h), dep, fa).total, 200.0
    )
    check_scalar_grad(
        lambda m: (
            feat.pipeline_step(
                s, dm.deployment("llama-3.1-70b", "h100", 4), fa, pp=2, microbatches=m
            ).total
        ),
        2.0,
    )
