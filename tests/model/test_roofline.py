"""The step model: hand-computed values, monotonicity, gradients, transforms, errors."""

import json

import equinox as eqx
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings

import diffmodel as dm
from diffmodel._model._roofline import linear_work, step_time_batch

from helpers import (
    FIXTURES,
    cast_floats,
    check_scalar_grad,
    feature_stats,
    tiny_architecture,
    tols,
    tree_allclose,
)

H100 = dict(flops_16=989.5e12, hbm_bw=3.35e12)
UNIT = dm.Factors(gemm_flops=1.0, mem_bw=1.0, attn_flops=1.0, attn_bw=1.0, comm_bw=1.0)


def agg(p=0.0, d=0.0, np_=0.0, nd=0.0, kv=0.0, kpf=0.0):
    return dm.from_aggregates(
        prefill_tokens=p,
        decode_tokens=d,
        num_prefill=np_,
        num_decode=nd,
        kv_tokens=kv,
        prefill_context_tokens=kpf,
    )


def test_llama70b_tp4_weight_read_floor():
    # 80 layers x (QKVO 150,994,944 + MLP 704,643,072) weights x 2 bytes / 4 GPUs.
    dep = dm.deployment("llama-2-70b", "h100-sxm", 4)
    weight_bytes = 80 * (150_994_944 + 704_643_072) * 2 / 4
    assert weight_bytes == pytest.approx(34.2e9, rel=1e-3)
    _, b = linear_work(jnp.asarray(1.0), dep.arch, dep.tp)
    assert float(b) == pytest.approx(weight_bytes, rel=1e-3)  # + activations
    out = dm.step_time(agg(d=1, nd=1, kv=100), dep, UNIT)
    floor_us = weight_bytes / 3.35e12 * 1e6  # ~10.2 ms
    assert float(out.linear) == pytest.approx(floor_us, rel=5e-3)
    # With the LM head and embeddings the whole model is ~34.5 GB per GPU.
    total = float(dep.arch.total_params()) * 2 / 4
    assert total == pytest.approx(34.5e9, rel=1e-2)
    assert float(out.total) > 10_000


def test_decode_attention_hand_computed():
    dep = dm.deployment("llama-2-7b", "h100", 1)
    kv = 10_000.0
    out = dm.step_time(agg(d=10, nd=10, kv=kv), dep, UNIT)
    kv_bytes = 2 * 32 * 32 * 128 * 2 * kv  # 2 (K,V) L Hkv dh bytes tokens
    q_bytes = 2 * 32 * 32 * 128 * 2 * 10  # Q read and O written
    flops = 4 * 32 * 32 * 128 * kv
    mem_us = (kv_bytes + q_bytes) / 3.35e12 * 1e6
    comp_us = flops / 989.5e12 * 1e6
    expect = (mem_us**4 + comp_us**4) ** 0.25
    assert float(out.attention_decode) == pytest.approx(expect, rel=1e-9)


def test_allreduce_and_overhead_hand_computed():
    dep = dm.deployment("llama-2-7b", "h100", 2)
    f = dm.Factors(comm_bw=0.5, comm_latency_us=10.0)
    out = dm.step_time(agg(d=4, nd=4, kv=40), dep, f)
    ring = 2 * (2 - 1) / 2 * 4 * 4096 * 2 / (450e9 * 0.5) * 1e6
    assert float(out.allreduce) == pytest.approx(2 * 32 * (10 + ring), rel=1e-9)
    assert float(out.overhead) == pytest.approx(1000 + 32 * 5 + 4 * 10)
    tp1 = dm.step_time(agg(d=4, nd=4, kv=40), dm.deployment("llama-2-7b"), f)
    assert float(tp1.allreduce) == 0.0


def test_empty_step_is_host_overhead_only():
    dep = dm.deployment("llama-2-7b")
    out = dm.step_time(agg(), dep, dm.Factors())
    assert float(out.total) == pytest.approx(1000.0)
    assert float(out.linear) == 0.0


def test_step_total_equals_step_time_total_with_idle_steps():
    from diffmodel._model._roofline import step_total

    dep = dm.deployment("mixtral-8x7b", tp=2)
    stats = dm.from_aggregates(
        prefill_tokens=jnp.array([0.0, 512.0, 0.0, 30.0]),
        decode_tokens=jnp.array([0.0, 8.0, 64.0, 0.0]),
        num_prefill=jnp.array([0.0, 1.0, 0.0, 1.0]),
        num_decode=jnp.array([0.0, 8.0, 64.0, 0.0]),
        kv_tokens=jnp.array([0.0, 4000.0, 9000.0, 0.0]),
        prefill_context_tokens=jnp.array([0.0, 0.0, 0.0, 70.0]),
    )
    fac = dm.Factors()
    want = dm.step_time(stats, dep, fac).total
    np.testing.assert_array_equal(step_total(stats, dep, fac), want)
    assert float(want[0]) == float(fac.step_overhead_us)  # idle: overhead only


STAT_FIELDS = st.fixed_dictionaries(
    {
        "p": st.floats(0, 4096),
        "d": st.floats(0, 256),
        "np_": st.floats(1, 8),
        "nd": st.floats(0, 256),
        "kv": st.floats(0, 5e5),
        "kpf": st.floats(0, 5e4),
    }
).filter(lambda s: s["nd"] > 0 or s["d"] == s["kv"] == 0)  # decodes need requests


@pytest.mark.slow
@settings(max_examples=40, deadline=None)
@given(
    base=STAT_FIELDS,
    field=st.sampled_from(["p", "d", "kv", "kpf", "nd"]),
    extra=st.floats(0.5, 1e4),
    model=st.sampled_from(["llama-2-70b", "mixtral-8x7b", "qwen3-30b-a3b"]),
)
def test_more_work_never_faster(base, field, extra, model):
    dep = dm.deployment(model, "h100", 2)
    more = dict(base, **{field: base[field] + extra})
    assume(more["nd"] > 0 or more["d"] == more["kv"] == 0)  # decodes need requests
    t0 = float(dm.step_time(agg(**base), dep, dm.Factors()).total)
    t1 = float(dm.step_time(agg(**more), dep, dm.Factors()).total)
    assert t1 >= t0 * (1 - 1e-12)


@pytest.mark.parametrize("model", ["llama-2-70b", "mixtral-8x7b", "qwen3-30b-a3b"])
@pytest.mark.parametrize("tokens", [1.0, 64.0, 2048.0])
def test_larger_tp_never_more_weight_bytes_per_gpu(model, tokens):
    arch = dm.architecture(model)
    sizes = [
        float(linear_work(jnp.asarray(tokens), arch, jnp.asarray(float(t)))[1])
        for t in (1, 2, 4, 8)
    ]
    assert all(b <= a for a, b in zip(sizes, sizes[1:], strict=False))


def _loss(stats, factors, dep):
    return jnp.log(dm.step_time(stats, dep, factors).total)


@pytest.mark.parametrize(
    "stats",
    [
        agg(),
        agg(d=1, nd=1, kv=0),
        agg(p=100, np_=1),
        agg(p=500, d=30, np_=2, nd=30, kv=3e4, kpf=200),
    ],
    ids=["empty", "decode-no-context", "prefill-only", "mixed"],
)
def test_gradients_finite_and_match_finite_differences(stats):
    dep = dm.deployment("mixtral-8x7b", "h100", 2)
    f = dm.Factors()
    g_f, g_s = jax.grad(_loss, argnums=(1, 0))(stats, f, dep)
    for leaf in jax.tree.leaves((g_f, g_s)):
        assert np.all(np.isfinite(leaf))
    # Central differences in float64 with respect to every factor.
    for name in dm.FACTOR_NAMES:
        x0 = float(getattr(f, name))
        h = 1e-6 * max(abs(x0), 1.0)

        def at(x, name=name):
            return float(
                _loss(stats, eqx.tree_at(lambda q: getattr(q, name), f, x), dep)
            )

        x_up, x_dn = jnp.asarray(x0 + h), jnp.asarray(x0 - h)
        fd = (at(x_up) - at(x_dn)) / (2 * h)
        assert float(getattr(g_f, name)) == pytest.approx(fd, rel=1e-5, abs=1e-9)
    # ... and every continuous batch statistic (away from the kinks at 0).
    if float(stats.tokens) > 0:
        for name in ("prefill_tokens", "kv_decode", "kv_prefill", "attn_prefill"):
            x0 = float(getattr(stats, name))
            h = 1e-4 * max(abs(x0), 1.0)

            def at_s(x, name=name):
                s = eqx.tree_at(lambda q: getattr(q, name), stats, jnp.asarray(x))
                return float(_loss(s, f, dep))

            if x0 - h < 0:
                continue
            fd = (at_s(x0 + h) - at_s(x0 - h)) / (2 * h)
            assert float(getattr(g_s, name)) == pytest.approx(fd, rel=1e-4, abs=1e-12)


def _batch(n, seed=0):
    rng = np.random.default_rng(seed)
    p = rng.choice([0, 0, 0, 17, 512, 2048], n).astype(float)
    np_ = (p > 0).astype(float) * rng.integers(1, 4, n)
    nd = rng.integers(0, 128, n).astype(float)
    return agg(p=p, d=nd, np_=np_, nd=nd, kv=nd * rng.uniform(50, 3000, n), kpf=p / 3)


@pytest.mark.slow
def test_jit_equals_eager_and_vmap_equals_loop():
    dep = dm.deployment("codellama-34b", "h100", 2)
    stats = _batch(16)
    f = dm.Factors()
    eager = dm.step_time(stats, dep, f)
    jitted = jax.jit(dm.step_time)(stats, dep, f)
    vmapped = jax.vmap(dm.step_time, in_axes=(0, None, None))(stats, dep, f)
    loop = [
        dm.step_time(jax.tree.map(lambda x, i=i: x[i], stats), dep, f).total
        for i in range(16)
    ]
    np.testing.assert_allclose(jitted.total, eager.total, rtol=1e-12)
    np.testing.assert_allclose(vmapped.total, eager.total, rtol=1e-12)
    np.testing.assert_allclose(np.array(loop), eager.total, rtol=1e-12)


def test_float32_step_time_agrees_with_float64():
    # Every input in float32 (batch, deployment, factors): the result stays float32
    # and equals the float64 one to float32's tolerance.
    inputs = (_batch(4), dm.deployment("codellama-34b", "h100", 2), dm.Factors())
    step_time = jax.jit(dm.step_time)
    got = step_time(*cast_floats(inputs, jnp.float32))
    want = step_time(*cast_floats(inputs, jnp.float64))
    for name in dm.Breakdown.__dataclass_fields__:
        assert getattr(got, name).dtype == jnp.float32, name
    rtol, atol = tols(jnp.float32)
    assert tree_allclose(got, cast_floats(want, jnp.float32), rtol=rtol, atol=atol)


@pytest.mark.slow
def test_mixed_batch_of_two_models_equals_each_alone():
    deps = [
        dm.deployment("llama-2-70b", "h100", 4),
        dm.deployment("mixtral-8x7b", "a100", 2),
    ]
    stacked = dm.stack_deployments(deps)
    stats = _batch(20, seed=1)
    group = jnp.asarray(np.arange(20) % 2)
    both = jax.jit(step_time_batch)(stats, stacked, group, dm.Factors()).total
    for g, dep in enumerate(deps):
        alone = dm.step_time(stats, dep, dm.Factors()).total
        np.testing.assert_allclose(both[g::2], alone[g::2], rtol=1e-12)


def test_fp8_weights_halve_the_weight_floor():
    bf16 = dm.deployment("llama-2-70b", "h100", 4)
    fp8 = dm.deployment("llama-2-70b", "h100", 4, weight_dtype="fp8")
    s = agg(d=1, nd=1, kv=10)
    t16 = float(dm.step_time(s, bf16, UNIT).linear)
    t8 = float(dm.step_time(s, fp8, UNIT).linear)
    assert t8 == pytest.approx(t16 / 2, rel=0.01)


@pytest.mark.parametrize("field", ["p", "d", "kv", "kpf"])
@pytest.mark.parametrize("bad", [-1.0, float("nan")])
def test_bad_statistics_raise_inside_jit(field, bad):
    dep = dm.deployment("llama-2-7b")
    stats = agg(**{"p": 10.0, "np_": 1.0, field: bad})
    with pytest.raises(Exception, match="must be finite and >= 0"):
        jax.jit(dm.step_time)(stats, dep, dm.Factors()).total.block_until_ready()


def test_bad_concrete_statistics_raise_one_line_before_tracing():
    dep = dm.deployment("llama-2-7b")
    with pytest.raises(ValueError) as err:
        dm.step_time(agg(p=10.0, np_=1.0, d=-64.0), dep, dm.Factors())
    assert str(err.value) == (
        "BatchStats.decode_tokens must be finite and >= 0 (tokens/requests); got -64"
    )
    stats = dm.from_aggregates(
        prefill_tokens=np.array([1.0, 2.0]),
        decode_tokens=np.array([0.0, np.nan]),
        num_prefill=np.ones(2),
        num_decode=np.zeros(2),
        kv_tokens=np.zeros(2),
    )
    with pytest.raises(ValueError, match=r"got nan at index \(1,\)$"):
        dm.step_time(stats, dep, dm.Factors())
    # Under eqx.filter_jit the message comes out whole (plain jax.jit wraps it).
    with pytest.raises(eqx.EquinoxRuntimeError, match="decode_tokens must be finite"):
        eqx.filter_jit(dm.step_time)(stats, dep, dm.Factors())


def _with(factors: dm.Factors, name: str, value) -> dm.Factors:
    return eqx.tree_at(lambda f: getattr(f, name), factors, value)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gemm_flops", "mem_bw", "attn_flops", "comm_bw"])
def test_float32_second_derivatives_match_float64(name):
    """(peak eta)^3 ~ 1e45 overflowed float32 in the Hessian in eta; the physics
    divides by the hardware rate first, so float32 agrees with float64 (and with
    central differences of the float64 value)."""
    dep64 = dm.deployment("llama-2-70b", "h100", 4)
    stats64 = agg(p=512.0, d=32.0, np_=1.0, nd=32.0, kv=32_000.0)
    eta = float(getattr(dm.default_factors(), name))

    def total(e, dtype):
        cast = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)  # noqa: E731
        fac = _with(cast(dm.default_factors()), name, e)
        return dm.step_time(cast(stats64), cast(dep64), fac).total

    h64 = float(jax.hessian(total)(jnp.float64(eta), jnp.float64))
    h32 = float(jax.hessian(total)(jnp.float32(eta), jnp.float32))
    step = 1e-4
    fd = (
        total(eta + step, jnp.float64)
        - 2 * total(eta, jnp.float64)
        + total(eta - step, jnp.float64)
    ) / step**2
    assert h64 != 0.0
    assert h64 == pytest.approx(float(fd), rel=1e-4)
    assert h32 == pytest.approx(h64, rel=1e-4)


@pytest.mark.slow
def test_float32_gradient_in_the_statistics_matches_float64():
    dep = dm.deployment("llama-2-70b", "h100", 4)
    stats = agg(p=512.0, d=32.0, np_=1.0, nd=32.0, kv=32_000.0)

    def total(s, dtype):
        cast = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)  # noqa: E731
        return dm.step_time(cast(s), cast(dep), cast(dm.default_factors())).total

    g64 = jax.grad(total)(stats, jnp.float64)
    g32 = jax.grad(total)(jax.tree.map(jnp.float32, stats), jnp.float32)
    for a, b in zip(jax.tree.leaves(g32), jax.tree.leaves(g64), strict=True):
        np.testing.assert_allclose(float(a), float(b), rtol=1e-4, atol=1e-6)


def test_idle_gate_is_continuous_and_its_gradient_is_the_cost_of_a_step():
    """0 to 1 token: the forward pass scales with the tokens (min(T, 1)); whole
    token counts are unchanged, and grad at 0 is the slope the values show."""
    dep = dm.deployment("llama-2-70b", "h100", 4)
    fac = dm.default_factors()

    def total(t):
        return dm.step_time(agg(p=t, np_=1.0), dep, fac).total

    t0, t1 = float(total(0.0)), float(total(1.0))
    assert float(total(1e-9)) == pytest.approx(t0, abs=1e-3)
    assert float(total(0.5)) > t0 and float(total(0.5)) < t1
    g0 = float(jax.grad(total)(0.0))
    h = 1e-7
    assert g0 == pytest.approx((float(total(h)) - t0) / h, rel=1e-5)
    assert g0 > 1_000.0  # starting a forward pass reads the weights: ms per token
    # At T = 1 the gradient is the running step's, from the right.
    g1 = float(jax.grad(total)(1.0))
    assert g1 == pytest.approx((float(total(1.0 + h)) - t1) / h, rel=1e-3)
    assert g1 < 100.0
    # A whole token count is exactly the ungated value: one token runs the pass.
    parts = dm.step_time(agg(p=1.0, np_=1.0), dep, fac)
    assert float(parts.linear) > 0.0 and float(parts.total) == t1


# --- today's architectures: yesterday's step times, gradients through their features


def test_existing_models_give_the_same_step_times():
    # Recorded with the step model before MLA, windows, quantization and EP were
    # added (commit 839f5c7): Llama-2, CodeLlama, Mixtral, Qwen3-MoE, an FP8 override.
    ref = json.loads((FIXTURES / "step_times_before_models.json").read_text())
    stats = dm.BatchStats(**{k: jnp.asarray(v) for k, v in ref["stats"].items()})
    for case in ref["cases"]:
        dep = dm.deployment(
            case["model"], case["hardware"], case["tp"], **case["overrides"]
        )
        got = dm.step_time(stats, dep, dm.default_factors()).as_dict()
        for name, want in case["components"].items():
            np.testing.assert_allclose(
                got[name], want, rtol=1e-12, atol=0, err_msg=f"{case} {name}"
            )


def test_first_k_dense_shared_and_routed_flops_by_hand():
    # 3 layers: 1 dense (F = 16), 2 MoE (shared 8, 4 experts of 8, top-1), d = 8.
    a = tiny_architecture(
        dense_layers=1, moe_layers=2, n_experts=4, top_k=1, expert_ffn=8, shared_ffn=8
    )
    f, _ = linear_work(jnp.asarray(5.0), a, 1.0)
    # 2 T (L attn + 1 * 3 d F + 2 * (3 d shared + d E + k 3 d F_e)), attn = 256.
    assert float(f) == 2 * 5 * (3 * 256 + 384 + 2 * (192 + 32 + 192))
    assert float(a.total_params()) == 3 * 256 + 384 + 2 * (4 * (192 + 8) + 192) + 512


@pytest.mark.parametrize(
    ("feature", "field"),
    [
        ("mla_moe_fp8", "kv_decode"),
        ("mla_moe_fp8", "kv_prefill"),
        ("mla_moe_fp8", "prefill_tokens"),
        ("window", "kv_decode"),
        ("window", "prefill_tokens"),
        ("expert_parallel", "decode_tokens"),
        ("nvfp4", "prefill_tokens"),
    ],
)
def test_grad_through_features_matches_finite_differences(
    feature, field, bundle_deepseek, bundle_gpt_oss
):
    fa = dm.default_factors()
    deps = {
        "mla_moe_fp8": dm.deployment(bundle_deepseek, "h200", 8),
        "window": dm.deployment(bundle_gpt_oss, "h100", 1),
        "expert_parallel": dm.deployment(bundle_deepseek, "h200", 1, ep=8),
        "nvfp4": dm.deployment(
            eqx_replace(
                dm.architecture("llama-3.1-70b"),
                weight_bytes=0.5625,
                compute_bytes=0.5,
                quant_passes=1.0,
            ),
            "h200",
            2,
        ),
    }
    base = feature_stats()

    def f(x):
        s = dm.BatchStats(**{**base.__dict__, field: x})
        return dm.step_time(s, deps[feature], fa).total

    check_scalar_grad(f, getattr(base, field))


def test_grad_through_arch_fields(bundle_deepseek, bundle_gpt_oss):
    fa, s = dm.default_factors(), feature_stats()

    def through(arch, name, hw="h200", tp=8):
        def f(x):
            a = eqx_replace(arch, **{name: x})
            return dm.step_time(
                s,
                dm.Deployment(arch=a, hw=dm.hardware(hw), tp=jnp.asarray(float(tp))),
                fa,
            ).total

        check_scalar_grad(f, getattr(arch, name))

    through(bundle_deepseek, "kv_lora_rank")
    through(bundle_deepseek, "expert_weight_bytes")
    through(bundle_gpt_oss, "window", "h100", 1)


def test_jit_equals_eager_for_new_features(bundle_deepseek):
    dep = dm.deployment(bundle_deepseek, "h200", 1, ep=8)
    fa, s = dm.default_factors(), feature_stats()
    eager = dm.step_time(s, dep, fa).total
    jitted = jax.jit(lambda s, d: dm.step_time(s, d, fa).total)(s, dep)
    np.testing.assert_allclose(eager, jitted, rtol=1e-12)


def eqx_replace(module, **fields):
    names = list(fields)
    return eqx.tree_at(
        lambda m: [getattr(m, n) for n in names],
        module,
        [jnp.asarray(fields[n], float) for n in names],
    )
