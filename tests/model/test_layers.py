"""Layer work of today's architectures by hand: MLA, sliding windows, quantization,
expert parallelism, DeepSeek sparse attention."""

import jax.numpy as jnp
import pytest

import diffmodel as dm
from diffmodel._model._layers import (
    attention_dims,
    quant_pass_bytes,
    windowed_attention,
)
from diffmodel._model._physics import attention_work_dims, tensor_peak
from diffmodel._model._roofline import linear_work

from helpers import one_step, power_mean, tiny_architecture


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
        one_step(decode_tokens=1, num_decode=1, kv_decode=1000),
        dep,
        dm.default_factors(),
    )
    want = power_mean(61 * f / (989.5e12 * 0.5) * 1e6, 61 * b / (4.8e12 * 0.7) * 1e6)
    assert float(step.attention_decode) == pytest.approx(want, rel=1e-12)
    # The latent is replicated, not split: the KV write is c + r per token per layer.
    assert float(step.kv_write) == pytest.approx(
        61 * 576 * 2 / (4.8e12 * 0.8) * 1e6, rel=1e-12
    )


def test_sliding_window_by_hand():
    # Decode: 2 requests, 1000 context tokens in all, W = 128: 256 pairs.
    # Prefill: one chunk of 100 after 50 cached, W = 128: int_0^100 min(50 + x, 128)
    # = 78 (50 + 128) / 2 + 22 * 128 = 9758 pairs, min(150, 228) = 150 tokens read.
    s = one_step(
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
    s = one_step(decode_tokens=1, num_decode=1, kv_decode=4000)
    got = float(dm.step_time(s, dep, dm.default_factors()).attention_decode)
    dims = (64 * 128, 2 * 8 * 64)  # H (qk + v) and the KV width
    f = 2 * dims[0] * (18 * 4000 + 18 * 128)
    b = 2 * dims[1] * (18 * 4000 + 18 * 128) + 36 * dims[0] * 2
    want = power_mean(f / (989.5e12 * 0.5) * 1e6, b / (3.35e12 * 0.7) * 1e6)
    assert got == pytest.approx(want, rel=1e-12)


def test_quantization_bytes_peaks_and_pass():
    assert float(tensor_peak(2.0, 1.0, 3.0, 7.0)) == 1.0
    assert float(tensor_peak(1.0, 1.0, 3.0, 7.0)) == 3.0
    assert float(tensor_peak(0.5625, 1.0, 3.0, 7.0)) == 3.0
    assert float(tensor_peak(0.5, 1.0, 3.0, 7.0)) == 7.0
    a = tiny_architecture(weight_bytes=1.0, quant_passes=2.0)
    assert float(quant_pass_bytes(10.0, a)) == 10 * (2 * 2 + 1)
    assert float(quant_pass_bytes(10.0, tiny_architecture())) == 0.0
    # Llama-3.1-70B FP8 (ModelOpt): one token reads the FP8 weights once.
    ll = dm.architecture("llama-3.1-70b", weight_dtype="fp8")
    weights = 80 * (2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672)
    _, b = linear_work(jnp.asarray(1.0), ll, 1.0)
    assert weights <= float(b) <= weights * 1.001  # + ~0.7 MB of activations a layer


def test_expert_parallel_splits_experts_not_ffn():
    a = tiny_architecture(n_experts=8, top_k=2, expert_ffn=8, ffn=0)
    # ep = t = 2: whole experts, 4 per GPU, T k / t slots; same FLOPs as TP-split.
    f_tp, _ = linear_work(jnp.asarray(16.0), a, 2.0, 1.0)
    f_ep, _ = linear_work(jnp.asarray(16.0), a, 2.0, 2.0)
    assert float(f_tp) == pytest.approx(float(f_ep), rel=1e-12)


def test_dsa_indexer_and_top_k_by_hand():
    # DeepSeek sparse attention: each query attends min(ctx, 2048) tokens, and the
    # indexer (64 heads of 128, FP8 keys) scores the whole context, in every layer.
    ds = tiny_architecture(
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
    s = one_step(decode_tokens=1, num_decode=1, kv_decode=1000)
    got = float(dm.step_time(s, dep, dm.default_factors()).attention_decode)
    # Absorbed MLA on 100 selected tokens: 2 H (c + r + c) pairs, (c + r) bf16 read;
    # indexer: 2 Hi di FLOPs per context token, di FP8 bytes per token, Hi di query.
    f = 3 * (2 * 2 * (20 + 16) * 100 + 2 * 2 * 4 * 1000)
    b = 3 * (20 * 2 * 100 + 2 * 36 * 2 + 4 * 1000 + 2 * 4 * 2)
    want = power_mean(f / (989.5e12 * 0.5) * 1e6, b / (3.35e12 * 0.7) * 1e6)
    assert got == pytest.approx(want, rel=1e-12)
