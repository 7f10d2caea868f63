"""The chunk feeder: strided, unaligned and misaligned inputs, staging buffers while
chunks are in flight, request sums in one pass, sharding over devices."""

import json

import jax
import numpy as np
import pytest

import diffmodel as dm
from diffmodel._bulk._bulk import STAT_FIELDS, predict_requests, predict_steps

from helpers import (
    BULK_RTOL,
    direct_step_time,
    random_requests,
    random_stats,
    run_on_host_devices,
)


def test_unaligned_and_strided_inputs(deps):
    stats = random_stats(300, seed=4)
    group = np.random.default_rng(5).integers(0, 3, 300)
    ref = predict_steps(stats, deps, group, chunk_size=64, dtype=np.float64)

    def strided(x):
        buf = np.zeros(2 * len(x) + 1)
        buf[1::2] = x
        return buf[1::2]

    def unaligned(x):
        buf = np.zeros(len(x) + 1)
        buf[1:] = x
        return buf[1:]

    for view in (strided, unaligned):
        moved = jax.tree.map(view, stats)
        got = predict_steps(moved, deps, group, chunk_size=64, dtype=np.float64)
        np.testing.assert_allclose(got, ref, rtol=1e-12, err_msg=view.__name__)


_SHARDED = """
import json, sys
import jax, numpy as np
import diffmodel as dm
from diffmodel._bulk._bulk import predict_steps, predict_requests
assert len(jax.devices()) == 2, jax.devices()
deps = dm.stack_deployments([dm.deployment("llama-2-70b", "h100", 4),
                             dm.deployment("mixtral-8x7b", "h100", 2)])
rng = np.random.default_rng(0)
n = 203
stats = dm.BatchStats(*[rng.uniform(0, 900, n).astype(np.float32) for _ in range(7)])
group = rng.integers(0, 2, n)
sharded = predict_steps(stats, deps, group, chunk_size=64)
single = predict_steps(stats, deps, group, chunk_size=64, devices=jax.devices()[:1])
new = rng.integers(0, 5, (n, 8)).astype(np.float32)
ctx = rng.integers(0, 900, (n, 8)).astype(np.float32)
mask = rng.random((n, 8)) < 0.7
rs = predict_requests(new, ctx, mask, deps, group, chunk_size=256)
r1 = predict_requests(new, ctx, mask, deps, group, chunk_size=256,
                      devices=jax.devices()[:1])
json.dump({"steps": float(np.max(np.abs(sharded / single - 1))),
           "requests": float(np.max(np.abs(rs / r1 - 1)))}, sys.stdout)
"""


@pytest.mark.slow
def test_sharded_over_two_host_devices_equals_single():
    stdout = run_on_host_devices(_SHARDED, timeout=120)
    err = json.loads(stdout)
    assert err["steps"] < 1e-6 and err["requests"] < 1e-6, err


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_one_pass_request_sums_equal_from_requests(dtype):
    from diffmodel._bulk._feeder import _sum_requests
    from diffmodel._model._batch import request_terms

    new, ctx, mask = (np.asarray(a) for a in random_requests(23, 40, seed=8))
    new, ctx = new.astype(dtype), ctx.astype(dtype)
    ref = dm.from_requests(new, ctx, mask)
    got = jax.jit(lambda *a: _sum_requests(request_terms(*a)))(new, ctx, mask)
    for f in STAT_FIELDS:
        np.testing.assert_allclose(
            getattr(got, f), getattr(ref, f), rtol=BULK_RTOL[dtype], err_msg=f
        )


def _misaligned(x, shift_bytes):
    """``x`` copied to an address ``shift_bytes`` past a 64-byte boundary."""
    raw = np.zeros(x.nbytes + 128, np.uint8)
    start = (-raw.__array_interface__["data"][0]) % 64 + shift_bytes
    out = raw[start : start + x.nbytes].view(x.dtype).reshape(x.shape)
    out[...] = x
    return out


def test_misaligned_inputs_are_read_in_place_and_agree(deps):
    from diffmodel._bulk._feeder import _Feeder

    # Middle chunks of misaligned arrays go as windows into the array itself (no
    # copy); the first and the padded last chunk are staged. Both give the same.
    new, ctx, mask = random_requests(100, 6, seed=9)
    group = np.random.default_rng(10).integers(0, 3, 100)
    ref = predict_requests(new, ctx, mask, deps, group, chunk_size=None)
    moved = [_misaligned(a, s) for a, s in ((new, 8), (ctx, 24), (mask, 5))]
    got = predict_requests(*moved, deps, group, chunk_size=16 * 6)
    np.testing.assert_allclose(got, ref, rtol=1e-12)
    feeder = _Feeder(moved, [np.float64, np.float64, np.bool_], 16, None, [0] * 3, True)
    first, offsets0 = feeder(0, 0)
    middle, offsets1 = feeder(1, 16)
    for a, w0, w1 in zip(moved, first, middle, strict=True):
        assert not np.shares_memory(w0, a) and np.shares_memory(w1, a)
        assert w1.__array_interface__["data"][0] % 64 == 0
    assert offsets0.tolist() == [0, 0, 0] and offsets1.tolist() == [1, 3, 37]


def test_staging_buffer_not_refilled_while_its_chunk_may_be_in_flight():
    from diffmodel._bulk._feeder import _IN_FLIGHT, _Feeder

    # XLA reads staged buffers in place and asynchronously: the chunks that may be
    # in flight together (the one being staged and the _IN_FLIGHT before it) must
    # each have their own buffer, else a later chunk overwrites an earlier one's
    # inputs before it is computed (CI once saw float32 totals off by 15x from this).
    x = np.arange(16 * 10, dtype=np.float64)  # float64 -> float32: always staged
    feeder = _Feeder([x], [np.float32], 16, None, [0], True)
    staged = [feeder(i, 16 * i)[0][0] for i in range(2 * (_IN_FLIGHT + 1))]
    for i, a in enumerate(staged):
        for j in range(max(0, i - _IN_FLIGHT), i):
            assert not np.shares_memory(a, staged[j]), (i, j)


@pytest.mark.slow
def test_many_staged_chunks_in_flight_agree(deps):
    # Many short chunks that are all staged (float64 input, float32 evaluation),
    # so staging-buffer reuse across in-flight chunks would show as wrong totals.
    n = 4096
    stats = random_stats(n)
    group = np.random.default_rng(3).integers(0, 3, n)
    ref = direct_step_time(stats, deps, group)["total"]
    for _ in range(3):
        got = predict_steps(stats, deps, group, chunk_size=16, dtype=np.float32)
        np.testing.assert_allclose(got, ref, rtol=BULK_RTOL[np.float32], atol=1e-6)
