"""Bulk prediction: chunked == unchunked == step_time; requests; sharding; errors."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pandas as pd
import pytest

import diffmodel as dm
from diffmodel._bulk._bulk import (
    STAT_FIELDS,
    predict_frame_fast,
    predict_requests,
    predict_steps,
    step_time_fast,
)
from diffmodel._model._roofline import COMPONENTS, step_time_batch

from helpers import unchecked

ROOT = pathlib.Path(__file__).resolve().parents[1]
RTOL = {np.float32: 2e-5, np.float64: 1e-11}


@pytest.fixture(scope="module")
def deps():
    return dm.stack_deployments(
        [
            dm.deployment("llama-2-70b", "h100", 4),
            dm.deployment("codellama-34b", "h100", 2),
            dm.deployment("mixtral-8x7b", "h100", 2),
        ]
    )


def _stats(n: int, seed: int = 0) -> dm.BatchStats:
    rng = np.random.default_rng(seed)
    n_pf = rng.integers(0, 4, n).astype(float)
    n_dec = rng.integers(0, 200, n).astype(float)
    p = np.where(n_pf > 0, rng.integers(1, 4096, n), 0).astype(float)
    k_pf = np.where(n_pf > 0, rng.integers(0, 2000, n), 0).astype(float)
    stats = dm.from_aggregates(
        prefill_tokens=p,
        decode_tokens=n_dec,
        num_prefill=n_pf,
        num_decode=n_dec,
        kv_tokens=n_dec * rng.uniform(100, 3000, n),
        prefill_context_tokens=k_pf,
    )
    return jax.tree.map(np.asarray, stats)


def _direct(stats, deps, group, factors=None):
    factors = dm.default_factors() if factors is None else factors
    b = step_time_batch(
        jax.tree.map(jnp.asarray, stats), deps, jnp.asarray(group), factors
    )
    return {c: np.asarray(getattr(b, c)) for c in COMPONENTS} | {
        "total": np.asarray(b.total)
    }


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_chunked_equals_unchunked_equals_step_time(deps, dtype):
    n = 1000  # not a multiple of the chunk: the last chunk is padded
    stats = _stats(n)
    group = np.random.default_rng(1).integers(0, 3, n)
    ref = _direct(stats, deps, group)
    chunked = predict_steps(
        stats, deps, group, chunk_size=96, dtype=dtype, components=True
    )
    whole = predict_steps(stats, deps, group, chunk_size=None, dtype=dtype)
    assert whole.dtype == dtype and whole.shape == (n,)
    for key in ("total", *COMPONENTS):
        assert chunked[key].dtype == dtype
        np.testing.assert_allclose(
            chunked[key], ref[key], rtol=RTOL[dtype], atol=1e-6, err_msg=key
        )
    np.testing.assert_allclose(whole, ref["total"], rtol=RTOL[dtype])
    np.testing.assert_allclose(chunked["total"], whole, rtol=RTOL[dtype])


@pytest.mark.slow
def test_per_group_factors_and_tail_padding(deps):
    # n = 2 chunks + 1 step: the last chunk is all padding but one step.
    stats = _stats(2 * 32 + 1, seed=3)
    group = np.arange(65) % 3
    fac = dm.Factors(
        gemm_flops=jnp.asarray([0.6, 0.7, 0.8]),
        step_overhead_us=jnp.asarray([500.0, 1000.0, 1500.0]),
    )
    ref = _direct(stats, deps, group, fac)["total"]
    got = predict_steps(stats, deps, group, fac, chunk_size=32, dtype=np.float64)
    np.testing.assert_allclose(got, ref, rtol=1e-11)
    empty = jax.tree.map(lambda x: x[:0], stats)
    assert predict_steps(empty, deps, group[:0]).shape == (0,)


def test_unaligned_and_strided_inputs(deps):
    stats = _stats(300, seed=4)
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


@pytest.mark.slow
def test_step_time_fast_value_and_grad(deps):
    stats = jax.tree.map(jnp.asarray, _stats(200, seed=6))
    group = jnp.asarray(np.random.default_rng(7).integers(0, 3, 200))
    fac = dm.default_factors()
    actual = _direct(stats, deps, group)["total"] * 1.3

    def loss(f, fast):
        if fast:
            pred = step_time_fast(stats, deps, group, f)
        else:
            pred = step_time_batch(stats, deps, group, f, check=False).total
        return jnp.mean((jnp.log(pred) - jnp.log(actual)) ** 2)

    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    v0, g0 = value_and_grad(fac, False)
    v1, g1 = value_and_grad(fac, True)
    np.testing.assert_allclose(v1, v0, rtol=1e-10)
    for name in dm.FACTOR_NAMES:
        np.testing.assert_allclose(
            getattr(g1, name), getattr(g0, name), rtol=1e-8, atol=1e-14, err_msg=name
        )


def _requests(steps: int, width: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    real = rng.integers(0, width + 1, steps)
    mask = np.arange(width)[None, :] < real[:, None]
    decode = rng.random((steps, width)) < 0.9
    new = np.where(decode, 1, rng.integers(1, 512, (steps, width))).astype(float)
    ctx = rng.integers(0, 4000, (steps, width)).astype(float)
    ctx = np.where(decode, np.maximum(ctx, 1), ctx)
    return np.where(mask, new, 0.0), np.where(mask, ctx, 0.0), mask


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_requests_equal_loop_of_from_requests(deps, dtype):
    new, ctx, mask = _requests(37, 12)
    group = np.random.default_rng(2).integers(0, 3, 37)
    got = predict_requests(new, ctx, mask, deps, group, chunk_size=12 * 16, dtype=dtype)

    @jax.jit
    def one_step(n, s, m, dep):
        stats = dm.from_requests(n, s, m)
        return dm.step_time(stats, dep, dm.default_factors()).total

    for i, g in enumerate(group):
        dep = jax.tree.map(lambda x, g=g: x[g], deps)
        ref = float(one_step(new[i], ctx[i], mask[i], dep))
        np.testing.assert_allclose(got[i], ref, rtol=RTOL[dtype], err_msg=str(i))


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


def test_float64_needs_x64(deps):
    stats = _stats(4)
    jax.config.update("jax_enable_x64", False)
    try:
        with pytest.raises(ValueError, match="jax_enable_x64"):
            predict_steps(stats, deps, np.zeros(4, int), dtype=np.float64)
    finally:
        jax.config.update("jax_enable_x64", True)


@pytest.mark.parametrize("field", ["decode_tokens", "kv_prefill"])
@pytest.mark.parametrize("bad", [-1.0, np.nan])
def test_bad_values_name_the_field(deps, field, bad):
    stats = _stats(50)
    values = getattr(stats, field).copy()
    values[17] = bad
    stats = dm.BatchStats(
        **{f: values if f == field else getattr(stats, f) for f in STAT_FIELDS}
    )
    with pytest.raises(ValueError, match=rf"stats\.{field}.*index 17"):
        predict_steps(stats, deps, np.zeros(50, int))


def test_bad_shapes_and_groups(deps):
    stats = _stats(50)
    # Mismatched shapes are what the boundary must catch; the test suite's run-time
    # shape checker would already refuse to build them, so it is off for this one.
    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        short = dm.BatchStats(
            **{
                f: getattr(stats, f)[: 49 if f == "num_decode" else 50]
                for f in STAT_FIELDS
            }
        )
    finally:
        jaxtyping.config.update("jaxtyping_disable", False)
    with pytest.raises(ValueError, match=r"stats\.num_decode"):
        predict_steps(short, deps, np.zeros(50, int))
    with pytest.raises(ValueError, match="group must have one entry per step"):
        predict_steps(stats, deps, np.zeros(49, int))
    for g in (3, -1):
        group = np.zeros(50, int)
        group[9] = g
        with pytest.raises(ValueError, match=r"group must index.*step 9"):
            predict_steps(stats, deps, group)
    with pytest.raises(ValueError, match="group must be an integer"):
        predict_steps(stats, deps, np.zeros(50))
    with pytest.raises(ValueError, match=r"factors\.mem_bw"):
        predict_steps(stats, deps, np.zeros(50, int), dm.Factors(mem_bw=[0.8, 0.9]))
    new, ctx, mask = _requests(5, 4)
    with pytest.raises(ValueError, match="context_tokens has shape"):
        predict_requests(new, ctx[:, :3], mask, deps, np.zeros(5, int))
    ctx[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"context_tokens.*\(2, 1\)"):
        predict_requests(new, ctx, mask, deps, np.zeros(5, int))
    with pytest.raises(ValueError, match="mask must be a boolean"):
        predict_requests(new, new, new, deps, np.zeros(5, int))


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
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    )
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-c", _SHARDED],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    err = json.loads(out.stdout)
    assert err["steps"] < 1e-6 and err["requests"] < 1e-6, err


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_one_pass_request_sums_equal_from_requests(dtype):
    from diffmodel._bulk._feeder import _sum_requests
    from diffmodel._model._batch import request_terms

    new, ctx, mask = (np.asarray(a) for a in _requests(23, 40, seed=8))
    new, ctx = new.astype(dtype), ctx.astype(dtype)
    ref = dm.from_requests(new, ctx, mask)
    got = jax.jit(lambda *a: _sum_requests(request_terms(*a)))(new, ctx, mask)
    for f in STAT_FIELDS:
        np.testing.assert_allclose(
            getattr(got, f), getattr(ref, f), rtol=RTOL[dtype], err_msg=f
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
    new, ctx, mask = _requests(100, 6, seed=9)
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
    stats = _stats(n)
    group = np.random.default_rng(3).integers(0, 3, n)
    ref = _direct(stats, deps, group)["total"]
    for _ in range(3):
        got = predict_steps(stats, deps, group, chunk_size=16, dtype=np.float32)
        np.testing.assert_allclose(got, ref, rtol=RTOL[np.float32], atol=1e-6)


def test_affine_folding_combines_coefficients_per_group():
    from diffmodel._bulk._rewrite import _Evaluator, _PerGroup

    # (w1 + x a1) + (w2 - x a2), divided by a1, plus 2 y: the coefficients of x and
    # the constants combine per group, so two tables meet the steps (x's
    # coefficient and the constant) and y's constant factor needs none.
    def f(x, y, w1, a1, w2, a2):
        return ((w1 + x * a1) + (w2 - x * a2)) / a1 + y * 2.0

    rng = np.random.default_rng(4)
    n, groups = 64, 3
    x, y = rng.uniform(0, 10, n), rng.uniform(0, 10, n)
    tabs = [rng.uniform(1, 2, groups) for _ in range(4)]
    g = rng.integers(0, groups, n)
    closed = jax.make_jaxpr(f)(x, y, *(t[g] for t in tabs))
    ev = _Evaluator(jnp.asarray(g), groups)
    args = [jnp.asarray(x), jnp.asarray(y), *(_PerGroup(jnp.asarray(t)) for t in tabs)]
    (got,) = ev.eval(closed.jaxpr, closed.consts, args)
    np.testing.assert_allclose(got, f(x, y, *(t[g] for t in tabs)), rtol=1e-12)
    assert len(ev.collected) == 2


def test_nested_jit_and_spread_constants_stay_per_group():
    from diffmodel._bulk._rewrite import _Evaluator, _PerGroup

    # jnp.where is a nested jit that broadcasts its scalar: with per-group inputs its
    # result, and the log of it, are still computed once per group, so one table
    # (the log) meets the steps and no log runs per step.
    def f(x, e, k):
        return x * jnp.log(jnp.where(e > 0, 1.0 - k / jnp.where(e > 0, e, 1.0), 1.0))

    rng = np.random.default_rng(5)
    n, groups = 32, 3
    x = rng.uniform(0, 10, n)
    e, k = np.array([0.0, 8.0, 64.0]), np.array([0.0, 2.0, 6.0])
    g = rng.integers(0, groups, n)
    closed = jax.make_jaxpr(f)(x, e[g], k[g])
    ev = _Evaluator(jnp.asarray(g), groups)
    args = [jnp.asarray(x), _PerGroup(jnp.asarray(e)), _PerGroup(jnp.asarray(k))]
    (got,) = ev.eval(closed.jaxpr, closed.consts, args)
    np.testing.assert_allclose(got, f(x, e[g], k[g]), rtol=1e-12)
    assert len(ev.collected) == 1
    lowered = jax.jit(
        lambda x: _Evaluator(jnp.asarray(g), groups).eval(
            closed.jaxpr, closed.consts, [x, *args[1:]]
        )[0]
    ).lower(jnp.asarray(x))
    logs = [ln for ln in lowered.as_text().splitlines() if "stablehlo.log" in ln]
    assert logs and all("tensor<3xf64>" in ln for ln in logs)  # per group only


def test_out_buffer_is_filled_and_returned(deps):
    n = 300
    stats = _stats(n)
    group = np.random.default_rng(6).integers(0, 3, n)
    want = predict_steps(stats, deps, group, chunk_size=64, dtype=np.float32)
    buf = np.full(n, -1.0, np.float32)
    got = predict_steps(stats, deps, group, chunk_size=64, dtype=np.float32, out=buf)
    assert got is buf
    np.testing.assert_array_equal(buf, want)
    new, ctx, mask = _requests(50, 4, seed=7)
    g = np.zeros(50, np.int32)
    want = predict_requests(new, ctx, mask, deps, g, dtype=np.float32)
    buf = np.empty(50, np.float32)
    got = predict_requests(new, ctx, mask, deps, g, dtype=np.float32, out=buf)
    assert got is buf
    np.testing.assert_array_equal(buf, want)


@pytest.mark.parametrize(
    "out, kwargs, match",
    [
        (np.zeros(10, np.float32), {}, r"shape \(300,\)"),
        (np.zeros(300, np.float64), {}, "dtype float32"),
        (np.zeros(600, np.float32)[::2], {}, "C-contiguous"),
        ([0.0] * 300, {}, "NumPy array"),
        (np.zeros(300, np.float32), {"components": True}, "components"),
    ],
)
def test_bad_out_buffer_is_named(deps, out, kwargs, match):
    stats = _stats(300)
    group = np.zeros(300, np.int32)
    with pytest.raises(ValueError, match=match), unchecked():
        predict_steps(stats, deps, group, dtype=np.float32, out=out, **kwargs)
