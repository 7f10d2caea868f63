"""Host-device factors: device efficiencies per GPU, host costs per serving stack."""

import dataclasses
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

import diffmodel as dm
from diffmodel._fitting._factorsets import to_raw
from diffmodel._fitting._io import factors_from_dict
from diffmodel._fitting._split import (
    DEVICE_FACTORS,
    HOST_FACTORS,
    host_device_data,
    init_host_device,
    split_label,
)

TRUE_DEVICE = {
    "h100-sxm": (0.75, 0.85, 0.55, 0.72, 0.60),
    "a100-sxm-80gb": (0.65, 0.80, 0.45, 0.65, 0.55),
    "l40s": (0.55, 0.75, 0.40, 0.60, 0.50),
    "h200": (0.78, 0.82, 0.58, 0.70, 0.62),
}
TRUE_HOST = {"vllm": (12.0, 2000.0, 20.0, 15.0), "sglang": (25.0, 5000.0, 40.0, 40.0)}
DEPLOYMENTS = (
    ("qwen3-0.6b", 1),
    ("llama-2-7b", 1),
    ("mistral-nemo-12b", 2),
    ("codellama-34b", 2),
    ("llama-2-70b", 4),
)


def synthetic(gpus, stacks, deployments, rows, seed, noise=0.01) -> pd.DataFrame:
    """Random prefill / decode steps on every (GPU, stack, deployment), timed by the
    true host-device factors with log-normal noise of sd ``noise``."""
    rng = np.random.default_rng(seed)
    out = []
    for gpu in gpus:
        for stack in stacks:
            for model, tp in deployments:
                for _ in range(rows):
                    d = int(rng.integers(1, 128))
                    pf = bool(rng.random() < 0.5)
                    out.append(
                        dict(
                            model=model,
                            tp=tp,
                            hardware=gpu,
                            stack=stack,
                            prefill_tokens=int(rng.integers(16, 2048)) if pf else 0,
                            decode_tokens=d,
                            num_prefill_reqs=int(pf),
                            num_decode_reqs=d,
                            kv_tokens=int(d * rng.integers(100, 3000)),
                            prefill_context_tokens=int(rng.integers(0, 16000))
                            if pf
                            else 0,
                        )
                    )
    frame = pd.DataFrame(out)
    data, labels = host_device_data(frame)
    truth = true_set(labels)
    t = np.asarray(truth.predict(data))
    frame["time_us"] = t * np.exp(rng.normal(0.0, noise, len(frame)))
    return frame


def true_set(labels):
    """The host-device set holding the true factors."""
    fs = init_host_device(labels)
    dev = np.array([TRUE_DEVICE[g] for g in fs.gpus])
    host = np.array([TRUE_HOST[s] for s in fs.stacks])
    full = np.concatenate(
        [
            np.concatenate([dev, np.tile(host[:1], (len(dev), 1))], 1),
            np.concatenate([np.tile(dev[:1], (len(host), 1)), host], 1),
        ]
    )
    raw = jnp.stack(
        [
            to_raw(dm.Factors(**dict(zip(dm.FACTOR_NAMES, row, strict=True))), fs.prior)
            for row in full
        ]
    )
    g = len(fs.gpus)
    return eqx.tree_at(
        lambda s: (s.device_raw, s.host_raw), fs, (raw[:g, :5], raw[g:, 5:])
    )


def truth_named(labels) -> dict[str, float]:
    names, values = true_set(labels).named()
    return dict(zip(names, np.asarray(values).tolist(), strict=True))


# ------------------------------------------------------------------------- units


def test_labels_split_into_gpu_and_stack():
    assert split_label("llama-2-70b/h100-sxm/tp4@vllm") == ("h100-sxm", "vllm")
    assert split_label("llama-2-70b/h100-sxm/tp4") == ("h100-sxm", "default")
    assert split_label("deepseek-v3/h200/tp8/ep8@sglang") == ("h200", "sglang")
    with pytest.raises(ValueError, match=r"expected 'model/gpu/tpN\[/epM\]@stack'"):
        split_label("h100@vllm")


@pytest.mark.slow
def test_groups_are_deployment_stack_pairs():
    frame = synthetic(["h100-sxm", "l40s"], ["vllm", "sglang"], DEPLOYMENTS[:1], 2, 0)
    data, labels = host_device_data(frame)
    assert labels == (
        "qwen3-0.6b/h100-sxm/tp1@sglang",
        "qwen3-0.6b/h100-sxm/tp1@vllm",
        "qwen3-0.6b/l40s/tp1@sglang",
        "qwen3-0.6b/l40s/tp1@vllm",
    )
    got = [labels[i] for i in np.asarray(data.group)]
    want = [
        f"qwen3-0.6b/{h}/tp1@{s}"
        for h, s in zip(frame["hardware"], frame["stack"], strict=True)
    ]
    assert got == want
    _, plain = host_device_data(frame.drop(columns="stack"))
    assert plain == ("qwen3-0.6b/h100-sxm/tp1@default", "qwen3-0.6b/l40s/tp1@default")
    with pytest.raises(ValueError, match="column 'stack': expected names without"):
        host_device_data(frame.assign(stack="a@b"))


def test_a_group_takes_its_gpus_device_row_and_its_stacks_host_row():
    labels = ("m/h100-sxm/tp1@a", "m/l40s/tp1@b", "m/l40s/tp1@a")
    fs = init_host_device(labels)
    assert fs.gpus == ("h100-sxm", "l40s") and fs.stacks == ("a", "b")
    fs = eqx.tree_at(
        lambda s: (s.device_raw, s.host_raw),
        fs,
        (jnp.array([[0.0] * 5, [1.0] * 5]), jnp.array([[0.0] * 4, [2.0] * 4])),
    )
    f = fs.physical()
    prior = dict(zip(dm.FACTOR_NAMES, fs.prior, strict=True))
    sig = lambda x, p: 1 / (1 + np.exp(-(x + np.log(p / (1 - p)))))  # noqa: E731
    sp = lambda x, p: p * np.log1p(np.exp(x)) / np.log(2)  # noqa: E731
    for n in DEVICE_FACTORS:
        np.testing.assert_allclose(
            getattr(f, n), [prior[n], sig(1.0, prior[n]), sig(1.0, prior[n])], 1e-12
        )
    for n in HOST_FACTORS:
        np.testing.assert_allclose(
            getattr(f, n), [prior[n], sp(2.0, prior[n]), prior[n]], rtol=1e-12
        )
    # A new deployment on a known GPU and stack needs no new parameter.
    new = fs.factors_for(["other/l40s/tp2@b"])
    np.testing.assert_allclose(new.mem_bw, [sig(1.0, prior["mem_bw"])], rtol=1e-12)
    with pytest.raises(ValueError, match="no GPU 'h200'"):
        fs.factors_for(["m/h200/tp1@a"])
    with pytest.raises(ValueError, match="no stack 'c'"):
        fs.factors_for(["m/l40s/tp1@c"])


def test_penalty_is_the_device_prior_and_checks_its_sd():
    fs = init_host_device(["m/h100-sxm/tp1@a"], device_prior_sd=0.5, noise_scale=0.2)
    fs = eqx.tree_at(lambda s: s.device_raw, fs, jnp.full((1, 5), 0.3))
    fs = eqx.tree_at(lambda s: s.host_raw, fs, jnp.full((1, 4), 7.0))
    np.testing.assert_allclose(fs.penalty(100), 0.2**2 / 100 * 5 * (0.3 / 0.5) ** 2)
    assert float(init_host_device(["m/h100-sxm/tp1@a"]).penalty(10)) == 0.0
    with pytest.raises(ValueError, match="device_prior_sd must be > 0"):
        init_host_device(["m/h100-sxm/tp1@a"], device_prior_sd=0.0)


def test_predict_is_the_roofline_with_the_groups_factors():
    frame = synthetic(["l40s"], ["vllm"], DEPLOYMENTS[1:2], 6, 1)
    data, labels = host_device_data(frame)
    truth = true_set(labels)
    want = dm.predict(frame, factors=truth.factors_for(labels))["predicted_us"]
    np.testing.assert_allclose(truth.predict(data), want, rtol=1e-9)
    # dm.predict reads a plain deployment label as the default stack.
    plain = dataclasses.replace(truth, stacks=("default",))
    got = dm.predict(frame.drop(columns="stack"), factors=plain)["predicted_us"]
    np.testing.assert_allclose(got, want, rtol=1e-9)


def test_dict_round_trip():
    fs = true_set(("m/h100-sxm/tp1@vllm", "m/l40s/tp1@sglang"))
    fs = dataclasses.replace(fs, device_prior_sd=(0.1,) * 5)
    d = {"format": "diffmodel-factors/1", **fs.to_dict()}
    back = factors_from_dict({**d, "format": _format()})
    assert back.gpus == fs.gpus and back.device_prior_sd == fs.device_prior_sd
    np.testing.assert_allclose(back.device_raw, fs.device_raw, rtol=1e-12)
    np.testing.assert_allclose(back.host_raw, fs.host_raw, rtol=1e-12)
    with pytest.raises(ValueError, match="field 'host_raw': expected shape"):
        factors_from_dict({**d, "format": _format(), "host_raw": [[1.0]]})


def _format():
    from diffmodel._fitting._io import FORMAT

    return FORMAT


@pytest.mark.slow
def test_objective_gradient_matches_finite_differences():
    frame = synthetic(["h100-sxm", "l40s"], ["vllm"], DEPLOYMENTS[:2], 5, 2)
    data, labels = host_device_data(frame)
    fs = init_host_device(labels, device_prior_sd=0.3)
    y = jnp.asarray(frame["time_us"].to_numpy())
    params, static = eqx.partition(fs, eqx.is_inexact_array)

    def f(p):
        s = eqx.combine(p, static)
        return dm.log_ratio_loss(s.predict(data), y) + s.penalty(len(y))

    g = jax.grad(f)(params)
    h = 1e-6
    for leaf in ("device_raw", "host_raw"):
        for idx in ((0, 0), (0, 2), (len(getattr(fs, leaf)) - 1, 3)):
            e = jnp.zeros_like(getattr(params, leaf)).at[idx].set(h)
            up = eqx.tree_at(
                lambda p, leaf=leaf: getattr(p, leaf), params, getattr(params, leaf) + e
            )
            dn = eqx.tree_at(
                lambda p, leaf=leaf: getattr(p, leaf), params, getattr(params, leaf) - e
            )
            fd = (f(up) - f(dn)) / (2 * h)
            np.testing.assert_allclose(getattr(g, leaf)[idx], fd, rtol=1e-5, atol=1e-10)
    np.testing.assert_allclose(jax.jit(f)(params), f(params), rtol=1e-12)


def test_fit_wants_its_target():
    frame = synthetic(["l40s"], ["vllm"], DEPLOYMENTS[:1], 3, 0)
    with pytest.raises(ValueError, match="missing target column 'y'"):
        dm.fit_host_device(frame, target="y")


# ---------------------------------------------------------------------- recovery


@pytest.fixture(scope="module")
def separable():
    """Four GPUs x two stacks x five deployments, 60 steps each (2,400 rows)."""
    frame = synthetic(list(TRUE_DEVICE), list(TRUE_HOST), DEPLOYMENTS, 60, 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", dm.IdentifiabilityWarning)
        result = dm.fit_host_device(frame, target="time_us")
    return frame, result, [str(w.message) for w in caught]


@pytest.mark.slow
def test_host_and_device_factors_are_recovered_within_5_percent(separable):
    frame, result, caught = separable
    _, labels = host_device_data(frame)
    truth = truth_named(labels)
    got = result.laplace.summary()
    assert set(got) == set(truth) and len(got) == 4 * 5 + 2 * 4
    # Each factor within 5% where the fit is sure to 2.5% (all but the per-layer
    # overheads here, whose 40 us x 28-80 layers hide under 1% noise), and every
    # factor within 4 of its reported sds.
    misses = []
    for name, want in truth.items():
        value, sd = got[name]
        assert abs(value - want) < 4 * sd, (name, value, want, sd)
        if abs(value / want - 1) >= 0.05:
            misses.append(name)
            assert sd > 0.025 * want, (name, value, want, sd)
    assert len(misses) <= 1, misses
    assert caught == [] and result.laplace.unpinned == ()
    table = result.table()
    assert table.loc["sglang", "step_overhead_us [us per step] sd"] > 0


@pytest.mark.slow
def test_two_starts_agree_within_their_sds(separable):
    frame, first, _ = separable
    start = eqx.tree_at(
        lambda s: (s.device_raw, s.host_raw),
        first.factor_set,
        (first.factor_set.device_raw * 0 - 1.0, first.factor_set.host_raw * 0 + 2.0),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dm.IdentifiabilityWarning)
        second = dm.fit_host_device(frame, target="time_us", start=start)
    a, b = first.laplace.summary(), second.laplace.summary()
    for name in a:
        (va, sa), (vb, sb) = a[name], b[name]
        assert abs(va - vb) <= max(sa, sb), (name, va, vb, sa, sb)


@pytest.mark.slow
def test_one_gpu_one_stack_one_deployment_fails_loudly():
    frame = synthetic(["h100-sxm"], ["vllm"], DEPLOYMENTS[-1:], 200, 3)
    with pytest.warns(dm.IdentifiabilityWarning) as caught:
        result = dm.fit_host_device(frame, target="time_us")
    lap = result.laplace
    assert lap.unpinned, "no unpinned direction reported"
    rel = {n: s / abs(v) for n, (v, s) in lap.summary().items()}
    wide = [n for n, r in rel.items() if r > 0.5]
    assert wide, rel
    # Every wide factor is named in a warning.
    text = " ".join(str(w.message) for w in caught)
    assert all(n.rsplit(".", 1)[1] in text for n in wide), (wide, text)
