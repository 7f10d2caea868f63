"""Host factor sets: the raw <-> physical maps, kinds, the two targets, and recovery
of known host factors from synthetic timer data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffmodel as dm
from diffmodel._fitting._base import StepData
from diffmodel._fitting._factorsets import init_factor_set
from diffmodel._fitting._fit import fit_arrays
from diffmodel._fitting._host_factors import (
    host_target,
    host_to_physical,
    host_to_raw,
    init_host_set,
)
from diffmodel._fitting._host_model import HostStepModel
from diffmodel._model._deployment import stack_deployments
from diffmodel._model._host import HOST_NAMES, HOST_SPECS, HostFactors, host_time

LABELS = ("llama-2-70b/h100-sxm/tp4", "codellama-34b/h100-sxm/tp2")


def _data(n_per_group=160, seed=0):
    rng = np.random.default_rng(seed)
    deps = stack_deployments(
        [
            dm.deployment("llama-2-70b", "h100-sxm", 4),
            dm.deployment("codellama-34b", "h100-sxm", 2),
        ]
    )
    n = 2 * n_per_group
    nd = rng.integers(4, 129, n).astype(float)
    npf = (rng.random(n) < 0.3).astype(float)
    stats = dm.from_aggregates(
        prefill_tokens=npf * rng.integers(16, 1024, n),
        decode_tokens=nd,
        num_prefill=npf,
        num_decode=nd,
        kv_tokens=nd * rng.integers(200, 2000, n),
    )
    group = jnp.asarray(np.repeat([0, 1], n_per_group))
    return StepData(stats=stats, deployments=deps, group=group)


def test_raw_zero_is_the_prior_and_the_maps_invert():
    prior = host_to_physical(jnp.zeros(len(HOST_NAMES)))
    for name in HOST_NAMES:
        assert float(getattr(prior, name)) == pytest.approx(HOST_SPECS[name][0])
    raw = jnp.asarray(np.random.default_rng(1).normal(size=(3, len(HOST_NAMES))))
    np.testing.assert_allclose(host_to_raw(host_to_physical(raw)), raw, atol=1e-9)


def test_bounded_factors_stay_inside_their_bounds():
    for x in (-60.0, 60.0):
        host = host_to_physical(jnp.full(len(HOST_NAMES), x))
        for name in ("graph_limit", "gate_width"):
            lo, hi = HOST_SPECS[name][2], HOST_SPECS[name][3]
            assert lo <= float(getattr(host, name)) <= hi
        assert float(host.launch_us) >= 0.0


def test_out_of_range_factors_are_a_value_error():
    with pytest.raises(ValueError, match="graph_limit"):
        host_to_raw(HostFactors(graph_limit=1000.0))
    with pytest.raises(ValueError, match="launch_us"):
        host_to_raw(HostFactors(launch_us=-1.0))


def test_kinds_counts_and_unseen_groups():
    g = init_host_set("global", LABELS)
    p = init_host_set("per-model", LABELS)
    h = init_host_set("hierarchical", LABELS)
    assert (g.n_params(), p.n_params(), h.n_params()) == (7, 14, 21)
    unseen = ("mixtral-8x7b/h100-sxm/tp2",)
    assert h.covers(unseen).all() and g.covers(unseen).all()
    assert not p.covers(unseen).any()
    with pytest.raises(ValueError, match="no group"):
        p.factors_for(unseen)
    h = eqx_tree_set(h, offsets=jnp.ones_like(h.offsets))
    np.testing.assert_allclose(
        h.factors_for(unseen).launch_us, h.global_physical().launch_us
    )
    with pytest.raises(ValueError, match="kind"):
        init_host_set("per-step", LABELS)
    with pytest.raises(ValueError, match="gate_on"):
        init_host_set("global", LABELS, gate_on="tokens")


def eqx_tree_set(module, **fields):
    import equinox as eqx

    names = tuple(fields)
    return eqx.tree_at(
        lambda m: tuple(getattr(m, n) for n in names), module, tuple(fields.values())
    )


@pytest.mark.slow
def test_two_targets_from_one_model():
    data = _data(20)
    host = init_host_set("per-model", LABELS)
    device = init_factor_set("per-model", LABELS)
    timer = HostStepModel(host=host, device=None, target="step_duration")
    iteration = HostStepModel(host=host, device=device, target="iteration_time")
    dep = data.deployments.take(data.group)
    hf = jax.tree.map(lambda x: x[data.group], host.physical())
    want = host_time(data.stats, dep.arch, dep.tp, hf).timed
    np.testing.assert_allclose(timer.predict(data), want, rtol=1e-12)
    roofline = data.breakdown(device.physical()).total
    # Every step here is GPU-bound: the iteration is the roofline plus a small excess.
    it = np.asarray(iteration.predict(data))
    assert np.all(it >= np.asarray(roofline))
    np.testing.assert_allclose(it, roofline, rtol=2e-2)
    np.testing.assert_allclose(
        host_target(data, "iteration_time", host.physical(), device=device.physical()),
        it,
        rtol=1e-12,
    )
    with pytest.raises(ValueError, match="device"):
        HostStepModel(host=host, device=None, target="iteration_time")
    with pytest.raises(ValueError, match="target"):
        HostStepModel(host=host, device=None, target="ttft")


@pytest.mark.slow
def test_frozen_host_gets_no_gradient_for_iteration_time():
    data = _data(10)
    model = HostStepModel(
        host=init_host_set("global", LABELS),
        device=init_factor_set("global", LABELS),
        target="iteration_time",
    )
    grads = jax.grad(lambda m: jnp.sum(m.predict(data)))(model)
    assert float(jnp.abs(grads.host.raw).max()) == 0.0
    assert float(jnp.abs(grads.device.raw).max()) > 0.0


@pytest.mark.slow
def test_per_group_fit_recovers_known_gate_locations():
    data = _data(200, seed=3)
    truth = HostFactors(
        schedule_us=jnp.asarray([40.0, 60.0]),
        prepare_us=jnp.asarray([6.0, 5.0]),
        replay_us=jnp.asarray([20.0, 25.0]),
        launch_us=jnp.asarray([4.0, 6.0]),
        eager_request_us=jnp.asarray([30.0, 40.0]),
        graph_limit=jnp.asarray([45.0, 78.0]),
        gate_width=jnp.asarray([2.0, 3.0]),
    )
    y = host_target(data, "step_duration", truth)
    noise = np.exp(0.05 * np.random.default_rng(4).normal(size=y.shape))
    model = HostStepModel(
        host=init_host_set("per-model", LABELS), device=None, target="step_duration"
    )
    res = fit_arrays(model, data, np.asarray(y) * noise, max_steps=400)
    got = res.factor_set.host.physical()
    np.testing.assert_allclose(got.graph_limit, truth.graph_limit, rtol=0.05)
    np.testing.assert_allclose(got.schedule_us, truth.schedule_us, rtol=0.25)
    assert res.loss < 0.01


@pytest.mark.slow
def test_model_is_a_factor_set_that_round_trips_through_json():
    import json

    from diffmodel._fitting._base import AbstractFactorSet

    host = init_host_set("hierarchical", LABELS, gate_on="kv_tokens")
    host = eqx_tree_set(host, offsets=0.1 * jnp.ones_like(host.offsets))
    model = HostStepModel(
        host=host,
        device=init_factor_set("hierarchical", LABELS),
        target="iteration_time",
    )
    assert isinstance(model, AbstractFactorSet)
    assert model.n_params() == 21 + 27
    back = HostStepModel.from_dict(json.loads(json.dumps(model.to_dict())))
    data = _data(5)
    np.testing.assert_allclose(back.predict(data), model.predict(data), rtol=1e-12)
    assert back.host.gate_on == "kv_tokens"
    table = model.table()
    assert list(table.index[:1]) == ["global"] and set(LABELS) <= set(table.index)
    with pytest.raises(ValueError, match="model"):
        HostStepModel.from_dict({"kind": "global"})


def test_reindex_marks_unseen_groups():
    unseen = ("mixtral-8x7b/h100-sxm/tp2",)
    per = HostStepModel(
        host=init_host_set("per-model", LABELS), device=None, target="step_duration"
    )
    _, known = per.reindex((*LABELS, *unseen))
    assert known.tolist() == [True, True, False]
    hier = HostStepModel(
        host=init_host_set("hierarchical", LABELS),
        device=None,
        target="step_duration",
    )
    assert hier.reindex(unseen)[1].all()
    with pytest.raises(ValueError, match="no roofline factors"):
        per.physical()
