"""Today's architectures and serving features in the step model: unchanged step
times for yesterday's models, hand-computed values and finite-difference gradients."""

import json
import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffmodel as dm
from diffmodel._model import _features as feat
from diffmodel._model._layers import (
    attention_dims,
    quant_pass_bytes,
    windowed_attention,
)
from diffmodel._model._physics import (
    SHARPNESS,
    all_to_all_us,
    attention_work_dims,
    tensor_peak,
)
from diffmodel._model._roofline import linear_work

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "step_times_before_models.json"


def test_existing_models_give_the_same_step_times():
    # Recorded with the step model before MLA, windows, quantization and EP were
    # added (commit 839f5c7): Llama-2, CodeLlama, Mixtral, Qwen3-MoE, an FP8 override.
    ref = json.loads(FIXTURE.read_text())
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


def _smooth(a, b):
    return (a**SHARPNESS + b**SHARPNESS) ** (1 / SHARPNESS)


def _tiny(**kw):
    base = dict(n_layers=3, hidden=8, n_heads=2, n_kv_heads=2, head_dim=4, ffn=16)
    return dm.Architecture(vocab=32, **{**base, **kw})


def _one(**kw):
    z = dict(
        prefill_tokens=0.0,
        decode_tokens=0.0,
        num_prefill=0.0,
        num_decode=0.0,
        kv_decode=0.0,
        attn_prefill=0.0,
        kv_prefill=0.0,
    )
    return dm.BatchStats(**{k: jnp.asarray(float(v)) for k, v in {**z, **kw}.items()})


def test_first_k_dense_shared_and_routed_flops_by_hand():
    # 3 layers: 1 dense (F = 16), 2 MoE (shared 8, 4 experts of 8, top-1), d = 8.
    a = _tiny(
        dense_layers=1, moe_layers=2, n_experts=4, top_k=1, expert_ffn=8, shared_ffn=8
    )
    f, _ = linear_work(jnp.asarray(5.0), a, 1.0)
    # 2 T (L attn + 1 * 3 d F + 2 * (3 d shared + d E + k 3 d F_e)), attn = 256.
    assert float(f) == 2 * 5 * (3 * 256 + 384 + 2 * (192 + 32 + 192))
    assert float(a.total_params()) == 3 * 256 + 384 + 2 * (4 * (192 + 8) + 192) + 512


def test_mla_sizes_and_decode_attention_by_hand(bundle_deepseek):
    a = bundle_deepseek
    # q_a 7168x1536, q_b 1536x128x192, kv_a 7168x576, kv_b 512x128x256, o 16384x7168.
    assert float(a.attention_params()) == 11_010_048 + 37_748_736 + 4_128_768 + (
        16_777_216 + 117_440_512
    )
    dims = attention_dims(a, 8.0)
    assert float(dims.q_heads) == 16 and float(dims.kv_width) == 576
    assert (float(dims.decode_qk), float(dims.decode_v)) == (576, 512)
    assert (float(dims.prefill_qk), float(dims.prefill_v)) == (192, 128)
    # One request, 1000 tokens of context, TP 8 on H200 (bf16 latent cache).
    f = 2 * 16 * (576 + 512) * 1000
    b = 576 * 2 * 1000 + 16 * 1088 * 2
    got = attention_work_dims(1000.0, 1000.0, 1.0, 16.0, 576.0, 512.0, 576.0)
    assert (float(got[0]), float(got[1])) == (f, b)
    dep = dm.deployment(a, "h200", 8)
    step = dm.step_time(
        _one(decode_tokens=1, num_decode=1, kv_decode=1000), dep, dm.default_factors()
    )
    want = _smooth(61 * f / (989.5e12 * 0.5) * 1e6, 61 * b / (4.8e12 * 0.7) * 1e6)
    assert float(step.attention_decode) == pytest.approx(want, rel=1e-12)
    # The latent is replicated, not split: the KV write is c + r per token per layer.
    assert float(step.kv_write) == pytest.approx(
        61 * 576 * 2 / (4.8e12 * 0.8) * 1e6, rel=1e-12
    )


def test_gqa_dims_equal_the_old_attention_work():
    from diffmodel._model._physics import attention_work

    x = jnp.asarray
    old = attention_work(x(700.0), x(900.0), x(30.0), 8.0, 2.0, 128.0, 1.0, 2.0)
    new = attention_work_dims(x(700.0), x(900.0), x(30.0), 8.0, 128.0, 128.0, 512.0, 1)
    np.testing.assert_allclose(old, new, rtol=1e-15)


def test_sliding_window_by_hand():
    # Decode: 2 requests, 1000 context tokens in all, W = 128: 256 pairs.
    # Prefill: one chunk of 100 after 50 cached, W = 128: int_0^100 min(50 + x, 128)
    # = 78 (50 + 128) / 2 + 22 * 128 = 9758 pairs, min(150, 228) = 150 tokens read.
    s = _one(
        prefill_tokens=100,
        num_prefill=1,
        kv_prefill=50,
        attn_prefill=100 * 100,
        decode_tokens=2,
        num_decode=2,
        kv_decode=1000,
    )
    pf, pf_read, dec, dec_read = windowed_attention(s, 128.0)
    assert [float(x) for x in (pf, pf_read, dec, dec_read)] == [9758, 150, 256, 256]
    # Sinks: every query also sees them; no window = the full-attention values.
    assert float(windowed_attention(s, 128.0, 4.0)[2]) == 256 + 8
    full = windowed_attention(s, 0.0)
    assert [float(x) for x in full] == [100 * (50 + 50), 150, 1000, 1000]


def test_gpt_oss_half_the_layers_windowed(bundle_gpt_oss):
    a = bundle_gpt_oss
    dep = dm.deployment(a, "h100", 1)
    s = _one(decode_tokens=1, num_decode=1, kv_decode=4000)
    got = float(dm.step_time(s, dep, dm.default_factors()).attention_decode)
    dims = (64 * 128, 2 * 8 * 64)  # H (qk + v) and the KV width
    f = 2 * dims[0] * (18 * 4000 + 18 * 128)
    b = 2 * dims[1] * (18 * 4000 + 18 * 128) + 36 * dims[0] * 2
    want = _smooth(f / (989.5e12 * 0.5) * 1e6, b / (3.35e12 * 0.7) * 1e6)
    assert got == pytest.approx(want, rel=1e-12)


def test_quantization_bytes_peaks_and_pass():
    assert float(tensor_peak(2.0, 1.0, 3.0, 7.0)) == 1.0
    assert float(tensor_peak(1.0, 1.0, 3.0, 7.0)) == 3.0
    assert float(tensor_peak(0.5625, 1.0, 3.0, 7.0)) == 3.0
    assert float(tensor_peak(0.5, 1.0, 3.0, 7.0)) == 7.0
    a = _tiny(weight_bytes=1.0, quant_passes=2.0)
    assert float(quant_pass_bytes(10.0, a)) == 10 * (2 * 2 + 1)
    assert float(quant_pass_bytes(10.0, _tiny())) == 0.0
    # Llama-3.1-70B FP8 (ModelOpt): one token reads the FP8 weights once.
    ll = dm.architecture("llama-3.1-70b", weight_dtype="fp8")
    weights = 80 * (2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672)
    _, b = linear_work(jnp.asarray(1.0), ll, 1.0)
    assert weights <= float(b) <= weights * 1.001  # + ~0.7 MB of activations a layer


def test_expert_parallel_all_to_all_by_hand():
    got = all_to_all_us(1e6, 8.0, 450e9, 0.7, 8.0)
    assert float(got) == pytest.approx(8 + 7 / 8 * 1e6 / (450e9 * 0.7) * 1e6)
    assert float(all_to_all_us(1e6, 1.0, 450e9, 0.7, 8.0)) == 0.0
    a = _tiny(n_experts=8, top_k=2, expert_ffn=8, ffn=0, moe_layers=3)
    fa = dm.default_factors()
    s = _one(decode_tokens=4, num_decode=4, kv_decode=400)
    tp_only = dm.step_time(s, dm.deployment(a, "h100", 1), fa)
    dp_ep = dm.step_time(s, dm.deployment(a, "h100", 1, ep=4), fa)
    # Dispatch + combine: 3 MoE layers x 2 all-to-alls of T k d = 4 x 2 x 8 bf16.
    one = float(all_to_all_us(4 * 2 * 8 * 2.0, 4.0, 450e9, 0.7, 8.0))
    assert float(dp_ep.allreduce - tp_only.allreduce) == pytest.approx(6 * one)
    with pytest.raises(ValueError, match="ep=3"):
        dm.deployment(a, "h100", 1, ep=3)


def test_expert_parallel_splits_experts_not_ffn():
    a = _tiny(n_experts=8, top_k=2, expert_ffn=8, ffn=0)
    # ep = t = 2: whole experts, 4 per GPU, T k / t slots; same FLOPs as TP-split.
    f_tp, _ = linear_work(jnp.asarray(16.0), a, 2.0, 1.0)
    f_ep, _ = linear_work(jnp.asarray(16.0), a, 2.0, 2.0)
    assert float(f_tp) == pytest.approx(float(f_ep), rel=1e-12)


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
    spec = feat.speculative_stats(_one(decode_tokens=3, num_decode=3), 2.0)
    assert float(spec.decode_tokens) == 9


def test_speculative_k0_is_the_plain_step_and_k_costs_more():
    dep = dm.deployment("llama-3.1-8b", "h100", 1)
    draft = dm.deployment("llama-2-7b", "h100", 1)  # any model serves as a draft
    fa = dm.default_factors()
    s = _one(decode_tokens=32, num_decode=32, kv_decode=32 * 1500)
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
    want = _smooth(f / (989.5e12 * 0.5) * 1e6, b / (3.35e12 * 0.7) * 1e6)
    assert float(k2.verify.attention_decode) == pytest.approx(want, rel=1e-12)
    assert float(feat.accepted_tokens(2.0, 0.5)) == pytest.approx(1.75)


def test_pipeline_one_stage_is_the_plain_step_and_bubbles():
    dep = dm.deployment("llama-3.1-70b", "h100", 4)
    fa = dm.default_factors()
    s = _one(prefill_tokens=512, num_prefill=1, attn_prefill=512 * 256)
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


# --- jax.grad through every feature, checked against central differences ----------


def _fd_check(f, x0, rel=1e-6, rtol=2e-5):
    x0 = jnp.asarray(x0, float)
    g = float(jax.grad(f)(x0))
    h = rel * max(abs(float(x0)), 1.0)
    fd = (float(f(x0 + h)) - float(f(x0 - h))) / (2 * h)
    assert g == pytest.approx(fd, rel=rtol, abs=1e-9), (g, fd)
    assert g != 0.0


def _stats(scale=1.0, kv=2.0e5, pf=700.0):
    return dm.from_aggregates(
        prefill_tokens=pf,
        decode_tokens=96.0 * scale,
        num_prefill=1.0,
        num_decode=96.0 * scale,
        kv_tokens=kv,
        prefill_context_tokens=300.0,
    )


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
    base = _stats()

    def f(x):
        s = dm.BatchStats(**{**base.__dict__, field: x})
        return dm.step_time(s, deps[feature], fa).total

    _fd_check(f, getattr(base, field))


def test_grad_through_arch_fields(bundle_deepseek, bundle_gpt_oss):
    fa, s = dm.default_factors(), _stats()

    def through(arch, name, hw="h200", tp=8):
        def f(x):
            a = eqx_replace(arch, **{name: x})
            return dm.step_time(
                s,
                dm.Deployment(arch=a, hw=dm.hardware(hw), tp=jnp.asarray(float(tp))),
                fa,
            ).total

        _fd_check(f, getattr(arch, name))

    through(bundle_deepseek, "kv_lora_rank")
    through(bundle_deepseek, "expert_weight_bytes")
    through(bundle_gpt_oss, "window", "h100", 1)


def test_grad_through_serving_features():
    dep = dm.deployment("llama-3.1-8b", "h100", 1)
    draft = dm.deployment("llama-2-7b", "h100", 1)
    fa, s = dm.default_factors(), _stats(0.5, 1e5)
    _fd_check(
        lambda k: (
            feat.speculative_step(s, dep, fa, k=k, draft=draft, n_draft_steps=2).total
        ),
        2.0,
    )
    _fd_check(lambda h: dm.step_time(feat.prefix_cached(s, h), dep, fa).total, 200.0)
    _fd_check(
        lambda m: (
            feat.pipeline_step(
                s, dm.deployment("llama-3.1-70b", "h100", 4), fa, pp=2, microbatches=m
            ).total
        ),
        2.0,
    )


def test_jit_equals_eager_for_new_features(bundle_deepseek):
    dep = dm.deployment(bundle_deepseek, "h200", 1, ep=8)
    fa, s = dm.default_factors(), _stats()
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


@pytest.fixture(scope="module")
def bundle_deepseek():
    pytest.importorskip("aiconfigurator_core")
    return dm.architecture("deepseek-ai/DeepSeek-V3")


@pytest.fixture(scope="module")
def bundle_gpt_oss():
    pytest.importorskip("aiconfigurator_core")
    return dm.architecture("openai/gpt-oss-120b")


def test_dsa_indexer_and_top_k_by_hand():
    # DeepSeek sparse attention: each query attends min(ctx, 2048) tokens, and the
    # indexer (64 heads of 128, FP8 keys) scores the whole context, in every layer.
    ds = _tiny(
        kv_lora_rank=16,
        qk_rope_dim=4,
        head_dim=8,
        v_head_dim=8,
        n_kv_heads=2,
        window=100,
        window_layers=3,
        index_heads=2,
        index_dim=4,
        index_layers=3,
    )
    dep = dm.deployment(ds, "h100", 1)
    s = _one(decode_tokens=1, num_decode=1, kv_decode=1000)
    got = float(dm.step_time(s, dep, dm.default_factors()).attention_decode)
    # Absorbed MLA on 100 selected tokens: 2 H (c + r + c) pairs, (c + r) bf16 read;
    # indexer: 2 Hi di FLOPs per context token, di FP8 bytes per token, Hi di query.
    f = 3 * (2 * 2 * (20 + 16) * 100 + 2 * 2 * 4 * 1000)
    b = 3 * (20 * 2 * 100 + 2 * 36 * 2 + 4 * 1000 + 2 * 4 * 2)
    want = _smooth(f / (989.5e12 * 0.5) * 1e6, b / (3.35e12 * 0.7) * 1e6)
    assert got == pytest.approx(want, rel=1e-12)


def test_dsa_configs(bundle_deepseek):
    v32 = dm.architecture("deepseek-ai/DeepSeek-V3.2")
    assert (float(v32.window), float(v32.index_heads), float(v32.index_dim)) == (
        2048,
        64,
        128,
    )
    assert float(v32.index_layers) == 61 == float(v32.window_layers)
    glm = dm.architecture("zai-org/GLM-5.3")  # 'shared' layers reuse the top-k
    assert float(glm.index_layers) == 21 and float(glm.dense_layers) == 3
    assert float(glm.total_params()) / 1e9 == pytest.approx(743.4, abs=0.1)
