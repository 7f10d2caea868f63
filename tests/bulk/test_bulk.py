"""Bulk prediction: chunked == unchunked == step_time; per-group factors; requests;
the frame wrapper; out buffers."""

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

import diffmodel as dm
from diffmodel._bulk._bulk import predict_frame_fast, predict_requests, predict_steps
from diffmodel._model._roofline import COMPONENTS

from helpers import BULK_RTOL, direct_step_time, random_requests, random_stats


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_chunked_equals_unchunked_equals_step_time(deps, dtype):
    n = 1000  # not a multiple of the chunk: the last chunk is padded
    stats = random_stats(n)
    group = np.random.default_rng(1).integers(0, 3, n)
    ref = direct_step_time(stats, deps, group)
    chunked = predict_steps(
        stats, deps, group, chunk_size=96, dtype=dtype, components=True
    )
    whole = predict_steps(stats, deps, group, chunk_size=None, dtype=dtype)
    assert whole.dtype == dtype and whole.shape == (n,)
    for key in ("total", *COMPONENTS):
        assert chunked[key].dtype == dtype
        np.testing.assert_allclose(
            chunked[key], ref[key], rtol=BULK_RTOL[dtype], atol=1e-6, err_msg=key
        )
    np.testing.assert_allclose(whole, ref["total"], rtol=BULK_RTOL[dtype])
    np.testing.assert_allclose(chunked["total"], whole, rtol=BULK_RTOL[dtype])


@pytest.mark.slow
def test_per_group_factors_and_tail_padding(deps):
    # n = 2 chunks + 1 step: the last chunk is all padding but one step.
    stats = random_stats(2 * 32 + 1, seed=3)
    group = np.arange(65) % 3
    fac = dm.Factors(
        gemm_flops=jnp.asarray([0.6, 0.7, 0.8]),
        step_overhead_us=jnp.asarray([500.0, 1000.0, 1500.0]),
    )
    ref = direct_step_time(stats, deps, group, fac)["total"]
    got = predict_steps(stats, deps, group, fac, chunk_size=32, dtype=np.float64)
    np.testing.assert_allclose(got, ref, rtol=1e-11)
    empty = jax.tree.map(lambda x: x[:0], stats)
    assert predict_steps(empty, deps, group[:0]).shape == (0,)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_requests_equal_loop_of_from_requests(deps, dtype):
    new, ctx, mask = random_requests(37, 12)
    group = np.random.default_rng(2).integers(0, 3, 37)
    got = predict_requests(new, ctx, mask, deps, group, chunk_size=12 * 16, dtype=dtype)

    @jax.jit
    def one_step(n, s, m, dep):
        stats = dm.from_requests(n, s, m)
        return dm.step_time(stats, dep, dm.default_factors()).total

    for i, g in enumerate(group):
        dep = jax.tree.map(lambda x, g=g: x[g], deps)
        ref = float(one_step(new[i], ctx[i], mask[i], dep))
        np.testing.assert_allclose(got[i], ref, rtol=BULK_RTOL[dtype], err_msg=str(i))


@pytest.mark.slow
def test_frame_wrapper_matches_predict():
    frame = pd.DataFrame(
        {
            "prefill_tokens": [0, 512, 128],
            "decode_tokens": [64, 0, 10],
            "num_prefill_reqs": [0, 1, 1],
            "num_decode_reqs": [64, 0, 10],
            "kv_tokens": [64 * 900, 0, 5000],
            "model": ["llama-2-70b", "mixtral-8x7b", "llama-2-70b"],
            "tp": [4, 2, 4],
        }
    )
    ref = dm.predict(frame)["predicted_us"].to_numpy()
    got = predict_frame_fast(frame, dtype=np.float64)
    np.testing.assert_allclose(got, ref, rtol=1e-11)


def test_out_buffer_is_filled_and_returned(deps):
    n = 300
    stats = random_stats(n)
    group = np.random.default_rng(6).integers(0, 3, n)
    want = predict_steps(stats, deps, group, chunk_size=64, dtype=np.float32)
    buf = np.full(n, -1.0, np.float32)
    got = predict_steps(stats, deps, group, chunk_size=64, dtype=np.float32, out=buf)
    assert got is buf
    np.testing.assert_array_equal(buf, want)
    new, ctx, mask = random_requests(50, 4, seed=7)
    g = np.zeros(50, np.int32)
    want = predict_requests(new, ctx, mask, deps, g, dtype=np.float32)
    buf = np.empty(50, np.float32)
    got = predict_requests(new, ctx, mask, deps, g, dtype=np.float32, out=buf)
    assert got is buf
    np.testing.assert_array_equal(buf, want)


def test_repeated_calls_reuse_prepared_deployments_but_follow_their_values(deps):
    """Deployments and factors are moved to the device and tabulated once per
    distinct value: a second call with the same values reuses them (the cache is
    keyed by the values' bytes, not by object), and new values are seen at once."""
    from diffmodel._bulk import _feeder

    stats = random_stats(40, seed=5)
    group = np.arange(40) % 3
    steps = np.asarray([500.0, 1000.0, 1500.0])
    fac = dm.Factors(step_overhead_us=steps)
    _feeder._PREPARED.clear()
    first = predict_steps(stats, deps, group, fac, dtype=np.float64)
    again = predict_steps(stats, deps, group, fac, dtype=np.float64)
    assert len(_feeder._PREPARED) == 1
    np.testing.assert_array_equal(first, again)
    fac = dm.Factors(step_overhead_us=2.0 * steps)
    moved = predict_steps(stats, deps, group, fac, dtype=np.float64)
    assert len(_feeder._PREPARED) == 2
    ref = direct_step_time(stats, deps, group, fac)["total"]
    np.testing.assert_allclose(moved, ref, rtol=1e-11)
    np.testing.assert_allclose(moved - first, steps[group], rtol=1e-9)
    for i in range(2 * _feeder._PREPARED_MAX):  # bounded
        predict_steps(stats, deps, group, dm.Factors(step_overhead_us=float(i)))
    assert len(_feeder._PREPARED) == _feeder._PREPARED_MAX
