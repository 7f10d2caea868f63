"""The bulk loss: equal to the fitting objective, gradients, HVPs, compiles, devices."""

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffmodel as dm
from diffmodel._bulk._loss import (
    bulk_data,
    bulk_hvp,
    bulk_loss,
    bulk_value_and_grad,
    fit_steps,
)
from diffmodel._fitting._base import StepData
from diffmodel._fitting._factorsets import init_factor_set, to_physical, to_raw
from diffmodel._fitting._optimise import COMPILE_CLOCK

from helpers import run_on_host_devices

SPECS = (("llama-2-7b", 1), ("llama-2-70b", 4), ("mixtral-8x7b", 2))
LABELS = tuple(f"{m}/h100-sxm/tp{t}" for m, t in SPECS)
DEPS = dm.stack_deployments([dm.deployment(m, "h100-sxm", t) for m, t in SPECS])


def steps(n, seed=0):
    rng = np.random.default_rng(seed)
    p = rng.choice([0.0, 0.0, 16.0, 512.0, 2048.0], n)
    npf = np.where(p > 0, rng.integers(1, 4, n), 0).astype(float)
    nd = rng.integers(0, 128, n).astype(float)
    stats = dm.from_aggregates(
        prefill_tokens=p,
        decode_tokens=nd,
        num_prefill=npf,
        num_decode=nd,
        kv_tokens=nd * rng.uniform(10, 3000, n),
        prefill_context_tokens=p * rng.uniform(0, 2, n),
    )
    return stats, rng.integers(0, len(SPECS), n)


def perturbed(kind, seed=1):
    fs = init_factor_set(kind, LABELS, global_prior_scale=None)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: x + 0.2 * rng.normal(size=x.shape), fs)


def reference(fs, stats, group, y, w=None):
    data = StepData(stats=stats, deployments=DEPS, group=jnp.asarray(group))
    return dm.log_ratio_loss(fs.predict(data), jnp.asarray(y), w) + fs.penalty(len(y))


def target(stats, group, seed=2):
    fs = perturbed("per-model", seed)
    data = StepData(stats=stats, deployments=DEPS, group=jnp.asarray(group))
    rng = np.random.default_rng(seed)
    t = np.asarray(fs.predict(data))
    return t * np.exp(rng.normal(0, 0.1, t.shape))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["global", "per-model", "hierarchical"])
def test_value_and_gradient_equal_the_fitting_objective(kind):
    stats, group = steps(300)
    y = target(stats, group)
    fs = perturbed(kind)
    # 300 rows in chunks of 64: 5 chunks, bucketed to 8, the last ones padding.
    data = bulk_data(stats, DEPS, group, y, chunk_size=64, dtype=np.float64)
    value, grad = bulk_value_and_grad(fs, data)
    ref_value, ref_grad = eqx.filter_value_and_grad(reference)(fs, stats, group, y)
    assert float(value) == pytest.approx(float(ref_value), rel=1e-10)
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-14)


@pytest.mark.parametrize("chunk_size", [16, 64])
def test_rows_laid_out_by_group_or_in_order_give_one_loss(chunk_size):
    """Chunks of one group (tables read as scalars) and chunks of mixed groups (a
    per-row selection): the same value and gradient, padding included."""
    stats, group = steps(150, seed=3)
    y = target(stats, group)
    fs = perturbed("per-model")
    out = []
    for by_group in (True, False):
        data = bulk_data(
            stats,
            DEPS,
            group,
            y,
            chunk_size=chunk_size,
            dtype=np.float64,
            by_group=by_group,
        )
        assert np.ndim(data.group) == (1 if by_group else 2)
        out.append(bulk_value_and_grad(fs, data))
    (v1, g1), (v2, g2) = out
    assert float(v1) == pytest.approx(float(v2), rel=1e-12)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-15)


@pytest.mark.slow
def test_weights_and_float32():
    stats, group = steps(200)
    y = target(stats, group)
    w = np.random.default_rng(3).uniform(0, 2, 200)
    fs = perturbed("per-model")
    ref = float(reference(fs, stats, group, y, jnp.asarray(w)))
    d64 = bulk_data(stats, DEPS, group, y, w, chunk_size=32, dtype=np.float64)
    assert float(bulk_loss(fs, d64)) == pytest.approx(ref, rel=1e-10)
    d32 = bulk_data(stats, DEPS, group, y, w, chunk_size=32, dtype=np.float32)
    assert float(bulk_loss(fs, d32)) == pytest.approx(ref, rel=1e-4)


@pytest.mark.slow
def test_gradient_matches_central_differences():
    stats, group = steps(100)
    y = target(stats, group)
    fs = perturbed("global")
    data = bulk_data(stats, DEPS, group, y, chunk_size=32, dtype=np.float64)
    _, grad = bulk_value_and_grad(fs, data)
    h = 1e-6
    for i in range(fs.raw.size):
        e = jnp.zeros_like(fs.raw).at[i].set(h)
        up = bulk_loss(eqx.tree_at(lambda f: f.raw, fs, fs.raw + e), data)
        down = bulk_loss(eqx.tree_at(lambda f: f.raw, fs, fs.raw - e), data)
        fd = (float(up) - float(down)) / (2 * h)
        assert float(grad.raw[i]) == pytest.approx(fd, rel=1e-4, abs=1e-9)


def test_the_gradient_is_summed_over_the_steps_once_per_factor():
    # The factors' tables stay out of the affine coefficients (kept), so the chunk's
    # gradient is one sum over its rows per factor and group table, not one per
    # coefficient the factor would be spread over (38 for this mix before: the loss
    # and gradient ran ~1.4x slower).
    from diffmodel._bulk._loss import _depends_on_factors, _physical

    stats, group = steps(64)
    data = bulk_data(stats, DEPS, group, target(stats, group), chunk_size=32)
    fs = perturbed("per-model")
    factors = _physical(fs, data)
    kinds = _depends_on_factors(data.deployments, factors, data.log_target.dtype)
    assert 0 < sum(kinds) <= len(jax.tree.leaves(factors))
    # No deployment here has a sliding window: its terms are marked and left out
    # (only tables that do not depend on the factors are ever marked).
    assert len(data.zero_tables) == len(kinds) and any(data.zero_tables)
    assert not any(z and k for z, k in zip(data.zero_tables, kinds, strict=True))


@pytest.mark.slow
def test_hessian_vector_product_equals_the_hessian():
    stats, group = steps(120)
    y = target(stats, group)
    fs = perturbed("global")
    data = bulk_data(stats, DEPS, group, y, chunk_size=32, dtype=np.float64)
    v = eqx.tree_at(lambda f: f.raw, fs, jnp.linspace(-1.0, 1.0, fs.raw.size))
    hv = bulk_hvp(fs, data, v)

    def of_raw(raw):
        return reference(eqx.tree_at(lambda f: f.raw, fs, raw), stats, group, y)

    expected = jax.hessian(of_raw)(fs.raw) @ v.raw
    np.testing.assert_allclose(hv.raw, expected, rtol=1e-7, atol=1e-12)


@pytest.mark.slow
def test_new_data_in_the_same_bucket_compiles_nothing():
    fs = perturbed("per-model")
    s1, g1 = steps(300, seed=4)
    s2, g2 = steps(270, seed=5)  # another size, the same bucket of chunks
    d1 = bulk_data(s1, DEPS, g1, target(s1, g1), chunk_size=64, dtype=np.float64)
    d2 = bulk_data(s2, DEPS, g2, target(s2, g2), chunk_size=64, dtype=np.float64)
    jax.block_until_ready(bulk_value_and_grad(fs, d1))
    before = COMPILE_CLOCK.compiles()
    v2, _ = bulk_value_and_grad(fs, d2)
    assert COMPILE_CLOCK.compiles() == before
    assert float(v2) == pytest.approx(float(reference(fs, s2, g2, target(s2, g2))))


@pytest.mark.slow
def test_fit_steps_recovers_per_group_factors():
    stats, group = steps(3000, seed=6)
    truth = perturbed("per-model", seed=7)
    data = StepData(stats=stats, deployments=DEPS, group=jnp.asarray(group))
    y = np.asarray(truth.predict(data)) * np.exp(
        np.random.default_rng(8).normal(0, 0.02, 3000)
    )
    res = fit_steps(
        init_factor_set("per-model", LABELS),
        stats,
        DEPS,
        group,
        y,
        chunk_size=512,
        dtype=np.float64,
        max_steps=300,
    )
    assert res.result != "nonfinite" and res.loss < 1.2 * 0.02**2
    fresh, fg = steps(500, seed=9)
    d = StepData(stats=fresh, deployments=DEPS, group=jnp.asarray(fg))
    np.testing.assert_allclose(res.factor_set.predict(d), truth.predict(d), rtol=0.03)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"target": -1.0}, "target must be finite and > 0"),
        ({"group": 7}, "group must index"),
        ({"kind": "study-9"}, "fits roofline factor sets"),
        ({"weights": -1.0}, "weights must be"),
        ({"chunk_size": 0}, "chunk_size"),
    ],
)
def test_bad_inputs_are_named(change, match):
    stats, group = steps(50)
    y = target(stats, group)
    if "target" in change:
        y[3] = change["target"]
    if "group" in change:
        group = group.copy()
        group[5] = change["group"]
    fs = init_factor_set(change.get("kind", "global"), LABELS)
    w = np.full(50, change.get("weights", 1.0))
    with pytest.raises(ValueError, match=match):
        fit_steps(
            fs,
            stats,
            DEPS,
            group,
            y,
            weights=w,
            chunk_size=change.get("chunk_size", 64),
        )


def test_raw_round_trip_of_helpers_used_above():
    truth = perturbed("per-model")
    phys = truth.physical()
    np.testing.assert_allclose(to_raw(phys, truth.prior), truth.raw, atol=1e-9)
    np.testing.assert_allclose(
        to_physical(truth.raw, truth.prior).mem_bw, phys.mem_bw, rtol=1e-12
    )


_SHARDED = """
import json, sys
import jax
jax.config.update("jax_enable_x64", True)
import numpy as np
import diffmodel as dm
from diffmodel._bulk._loss import bulk_data, bulk_hvp, bulk_value_and_grad, fit_steps
from diffmodel._fitting._factorsets import init_factor_set
assert len(jax.devices()) == 2, jax.devices()
deps = dm.stack_deployments([dm.deployment("llama-2-70b", "h100", 4),
                             dm.deployment("mixtral-8x7b", "h100", 2)])
rng = np.random.default_rng(0)
n = 203
stats = dm.BatchStats(*[rng.uniform(0, 900, n) for _ in range(7)])
group = rng.integers(0, 2, n)
y = dm.predict_steps(stats, deps, group, dtype=np.float64) * rng.lognormal(0, .1, n)
fs = init_factor_set("per-model", ["a", "b"])
out = {}
for name, devs in (("two", None), ("one", jax.devices()[:1])):
    d = bulk_data(stats, deps, group, y, chunk_size=64, dtype=np.float64, devices=devs)
    v, g = bulk_value_and_grad(fs, d)
    hv = bulk_hvp(fs, d, g)
    r = fit_steps(fs, stats, deps, group, y, chunk_size=64, dtype=np.float64,
                  devices=devs, max_steps=30)
    out[name] = [float(v), np.asarray(g.raw).tolist(), float(r.loss),
                 len(d.group.sharding.device_set), np.asarray(hv.raw).tolist()]
json.dump(out, sys.stdout)
"""


@pytest.mark.slow
def test_data_parallel_over_two_host_devices_equals_one():
    stdout = run_on_host_devices(_SHARDED, timeout=300)
    r = json.loads(stdout)
    assert r["two"][3] == 2 and r["one"][3] == 1  # rows really sharded
    assert r["two"][0] == pytest.approx(r["one"][0], rel=1e-12)
    np.testing.assert_allclose(r["two"][1], r["one"][1], rtol=1e-9, atol=1e-15)
    assert r["two"][2] == pytest.approx(r["one"][2], rel=1e-6)
    # The Hessian-vector product (the Laplace step's) through the same sharded loop.
    np.testing.assert_allclose(r["two"][4], r["one"][4], rtol=1e-9, atol=1e-15)
