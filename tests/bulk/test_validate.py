"""Boundary validation of bulk inputs: dtypes, values, shapes, groups, out buffers,
each named in a one-line error."""

import jax
import jaxtyping
import numpy as np
import pytest

import diffmodel as dm
from diffmodel._bulk._bulk import STAT_FIELDS, predict_requests, predict_steps

from helpers import random_requests, random_stats, unchecked


def test_float64_needs_x64(deps):
    stats = random_stats(4)
    jax.config.update("jax_enable_x64", False)
    try:
        with pytest.raises(ValueError, match="jax_enable_x64"):
            predict_steps(stats, deps, np.zeros(4, int), dtype=np.float64)
    finally:
        jax.config.update("jax_enable_x64", True)


@pytest.mark.parametrize("field", ["decode_tokens", "kv_prefill"])
@pytest.mark.parametrize("bad", [-1.0, np.nan])
def test_bad_values_name_the_field(deps, field, bad):
    stats = random_stats(50)
    values = getattr(stats, field).copy()
    values[17] = bad
    stats = dm.BatchStats(
        **{f: values if f == field else getattr(stats, f) for f in STAT_FIELDS}
    )
    with pytest.raises(ValueError, match=rf"stats\.{field}.*index 17"):
        predict_steps(stats, deps, np.zeros(50, int))


def test_bad_shapes_and_groups(deps):
    stats = random_stats(50)
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
    new, ctx, mask = random_requests(5, 4)
    with pytest.raises(ValueError, match="context_tokens has shape"):
        predict_requests(new, ctx[:, :3], mask, deps, np.zeros(5, int))
    ctx[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"context_tokens.*\(2, 1\)"):
        predict_requests(new, ctx, mask, deps, np.zeros(5, int))
    with pytest.raises(ValueError, match="mask must be a boolean"):
        predict_requests(new, new, new, deps, np.zeros(5, int))


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
    stats = random_stats(300)
    group = np.zeros(300, np.int32)
    with pytest.raises(ValueError, match=match), unchecked():
        predict_steps(stats, deps, group, dtype=np.float32, out=out, **kwargs)
