"""Kernel work and its times: GEMM, attention and all-reduce by hand, causal tiles,
scheduled blocks, FP8 activation quantization, serial-K GEMMs' rows and main loop."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

import diffmodel.kernels as dk
from diffmodel._model._hardware import hardware
from diffmodel.kernels._curves import default_roofline_curves
from diffmodel.kernels._moe import moe_kernel_work
from diffmodel.kernels._work import (
    allreduce_kernel_us,
    causal_tile_pairs,
    decode_attention_us,
    decode_attention_work,
    fa2_splits_kv,
    gemm_kernel_work,
    gemm_us,
    prefill_attention_us,
)

H100 = hardware("h100-sxm")
B200 = hardware("b200")


def test_gemm_prediction_by_hand():
    m, n, k = 4096, 4096, 4096
    got = gemm_us(m, n, k, (0.5, 1e-3), H100)
    compute = 2 * m * n * k / (989.5e12 * 0.5) * 1e6
    memory = (k * n + m * k + m * n) * 2 / (3.35e12 * 1e-3) * 1e6
    np.testing.assert_allclose(got, (compute**4 + memory**4) ** 0.25, rtol=1e-12)
    # FP8 uses the FP8 peak and one byte per element.
    fp8 = gemm_us(m, n, k, (0.5, 1.0), H100, dtype_bytes=1.0)
    mem8 = (k * n + m * k + m * n) / 3.35e12 * 1e6
    c8 = 2 * m * n * k / (1979e12 * 0.5) * 1e6
    np.testing.assert_allclose(fp8, (c8**4 + mem8**4) ** 0.25, rtol=1e-12)


def test_attention_predictions_by_hand():
    b, s, h, kvh, dh = 2, 1024, 16, 2, 128
    pf = prefill_attention_us(b, s, h, kvh, dh, (1.0, 1.0), H100)
    # 8 query heads per KV head packed into 64 query tiles of 128 rows; tile i
    # computes ceil((i + 1) / 8) key blocks of 128: 288 blocks per KV head
    # (1.125 x the 256 blocks of the ideal isl^2 / 2 per head).
    flops = 4 * dh * kvh * b * 288 * 128 * 128
    bytes_ = 2 * kvh * dh * 2 * b * s + 2 * h * dh * 2 * b * s
    want = ((flops / 989.5e12) ** 4 + (bytes_ / 3.35e12) ** 4) ** 0.25 * 1e6
    np.testing.assert_allclose(pf, want, rtol=1e-12)
    dec = decode_attention_us(b, s, h, kvh, dh, (1.0, 1.0), H100)
    flops = 4 * h * dh * b * s
    bytes_ = 2 * kvh * dh * 2 * b * s + 2 * h * dh * 2 * b
    want = ((flops / 989.5e12) ** 4 + (bytes_ / 3.35e12) ** 4) ** 0.25 * 1e6
    np.testing.assert_allclose(dec, want, rtol=1e-12)


@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("isl", [1, 16, 100, 128, 129, 1000, 4096])
def test_causal_tile_pairs_match_a_loop(isl, group):
    pairs, tiles = causal_tile_pairs(float(isl), float(group))
    n_q = -(-isl * group // 128)
    blocks = sum(-(-min(isl, -(-128 * (i + 1) // group)) // 128) for i in range(n_q))
    assert float(tiles) == n_q
    assert float(pairs) == 128 * 128 * blocks
    assert float(pairs) >= group * isl * isl / 2  # never fewer than the ideal


def test_allreduce_prediction_by_hand():
    got = allreduce_kernel_us(1e6, 4, (0.5, 7.0), H100)
    np.testing.assert_allclose(got, 7.0 + 2 * 3 / 4 * 1e6 / (450e9 * 0.5) * 1e6)
    assert float(allreduce_kernel_us(1e6, 1, (0.5, 7.0), H100)) == 0.0


def test_allreduce_hop_latency_by_hand():
    """A curve with a hop term: 8 us fixed plus 2.5 us per further GPU, so 8 + 3 x 2.5
    = 15.5 us of latency on 4 GPUs, added to the ring transfer; the step model's
    comm_latency_us at TP 4 is the same 15.5 us."""
    c = eqx.tree_at(
        lambda c: c.log_hop_us,
        dk.default_allreduce_curve(hop=True),
        jnp.log(2.5),
        is_leaf=lambda x: x is None,
    )
    c = eqx.tree_at(lambda c: c.raw_latency, c, jnp.log(jnp.expm1(8.0)))
    plain = eqx.tree_at(lambda c: c.log_hop_us, c, None, is_leaf=lambda x: x is None)
    for n in (2.0, 4.0, 8.0):
        got = allreduce_kernel_us(1e6, n, c, H100)
        want = allreduce_kernel_us(1e6, n, plain, H100) + (n - 1) * 2.5
        np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(c.latency_at(4), 15.5, rtol=1e-6)
    curves = eqx.tree_at(lambda k: k.allreduce, dk.default_kernel_curves(), c)
    factors = dk.kernel_prior_factors(curves, model="llama-2-70b", tp=4)
    np.testing.assert_allclose(factors.comm_latency_us, 15.5, rtol=1e-6)


def test_scheduled_blocks_cost_time():
    c = eqx.tree_at(
        lambda c: c.log_unit_ns,
        default_roofline_curves(occupancy=False),
        jnp.asarray(np.log(2.0)),  # 2 ns per block
    )
    w = moe_kernel_work(64.0, 4096.0, 14336.0, 2.0, 8.0, H100)
    no_blocks = eqx.tree_at(lambda w: w.blocks, w, replace=None)
    extra = w.time_us(c) - no_blocks.time_us(c)
    np.testing.assert_allclose(extra, (w.blocks - w.units) * 2e-3, rtol=1e-9)


def test_fp8_gemm_work_counts_bf16_output_and_quantization_pass():
    # m=4, n=8, k=16 FP8 GEMM, bf16 output, dynamic activation quantization:
    # bytes = 16*8*1 + 4*16*1 + 4*8*2 = 128 + 64 + 64 = 256;
    # pre_bytes = 4*16*(2*2 + 1) = 320 (absmax read, re-read, FP8 write);
    # the same GEMM in bf16: 256 + 128 + 64 = 448 bytes.
    # FLOPs: the 4 rows are computed as one slice of 32 (GEMM_M_SLICE).
    w = gemm_kernel_work(4.0, 8.0, 16.0, H100, 1.0, out_bytes=2.0, act_quant=1.0)
    assert float(w.flops) == 2 * 32 * 8 * 16
    assert float(w.bytes) == 256.0
    assert float(w.pre_bytes) == 320.0
    assert float(w.peak_flops) == H100.flops_8
    # constant efficiencies: the pass runs at eta_bw, serially, before the GEMM
    plain = gemm_kernel_work(4.0, 8.0, 16.0, H100, 1.0, out_bytes=2.0)
    assert plain.pre_bytes is None
    extra = float(w.time_us((0.5, 0.25)) - plain.time_us((0.5, 0.25)))
    assert extra == pytest.approx(320.0 / (float(H100.hbm_bw) * 0.25) * 1e6, rel=1e-6)


def test_nvfp4_gemm_work_at_the_fp4_peak_with_a_one_pass_quantization():
    # m=4, n=8, k=16 NVFP4 GEMM (4-bit operands, FP8 scale per 16: 0.5625 bytes a
    # weight), bf16 output: bytes = 16*8*0.5625 + 4*16*0.5 + 4*8*2 = 72 + 32 + 64;
    # the activation quantized in one pass: 4*16*(2 + 0.5625) = 164 bytes.
    w = gemm_kernel_work(
        4.0, 8.0, 16.0, B200, 0.5, out_bytes=2.0, act_quant=1.0, weight_bytes=0.5625
    )
    assert float(w.flops) == 2 * 32 * 8 * 16  # one slice of 32 rows
    assert float(w.bytes) == 168.0
    assert float(w.pre_bytes) == 164.0
    assert float(w.peak_flops) == float(B200.flops_4)
    assert float(B200.flops_4) > float(B200.flops_8)


def test_fp8_gemm_act_quant_must_be_0_or_1():
    with pytest.raises(ValueError, match="act_quant"):
        gemm_kernel_work(4.0, 8.0, 16.0, H100, 1.0, act_quant=2.0)


def _roofline_side(w, c):
    """The compute/memory maximum of portable curves ``c`` on work ``w``, us (by
    hand: efficiencies at the work's time at peak and waves of the SMs)."""
    f_us = w.flops / w.peak_flops * 1e6
    b_us = w.bytes / w.bandwidth * 1e6
    eta_f, eta_b = c.efficiencies(f_us, b_us, w.units / w.sms)
    q = 4.0 if c.overlap is None else c.overlap
    return ((f_us / eta_f) ** q + (b_us / eta_b) ** q) ** (1.0 / q), q


def test_serial_k_gemm_pays_its_rows_and_main_loop_by_hand():
    # A per-tensor FP8 GEMM m=300, n=256, k=4096 on H100 (132 SMs): 5*2 = 10
    # output tiles of 64x128, one wave; rows 300 at 5 ns add 1.5 us to the floor;
    # the main loop, ceil(10/132) * 4096 * 0.5 ns = 2.048 us, is a third side of
    # the maximum: t = floor + (t_r^q + t_loop^q)^(1/q), t_r the compute/memory side.
    w = gemm_kernel_work(300.0, 256.0, 4096.0, H100, 1.0, out_bytes=2.0, act_quant=1.0)
    assert float(w.rows) == 300.0 and float(w.depth) == 4096.0
    base = dk.init_curves("gemm_fp8", portable=True)

    def curves(row_ns, kloop_ns):
        return eqx.tree_at(
            lambda c: (c.log_row_ns, c.log_kloop_ns),
            base,
            tuple(None if v is None else jnp.log(v) for v in (row_ns, kloop_ns)),
            is_leaf=lambda x: x is None,
        )

    without = curves(None, None)
    t0 = float(w.time_us(without))
    assert float(w.time_us(curves(5.0, None))) - t0 == pytest.approx(1.5, rel=1e-9)
    side, q = _roofline_side(w, without)
    side = float(side)
    for kernel, waves in ((w, 1), (None, 2)):
        if kernel is None:  # 133 SMs' worth of tiles (m = 64 * 133, n = 128): 2 waves
            kernel = gemm_kernel_work(64.0 * 133, 128.0, 4096.0, H100, 1.0)
            t0 = float(kernel.time_us(without))
            side = float(_roofline_side(kernel, without)[0])
        loop = waves * 4096 * 0.5e-3
        want = t0 - side + (side**q + loop**q) ** (1.0 / q)
        got = float(kernel.time_us(curves(None, 0.5)))
        assert got == pytest.approx(float(want), rel=1e-9)
    # A GEMM that quantizes nothing has no rows to pay for.
    plain = gemm_kernel_work(300.0, 256.0, 4096.0, H100, 1.0)
    assert plain.rows is None
    assert float(plain.time_us(curves(5.0, None))) == float(plain.time_us(without))
    # A loop far longer than the rest is the time, above the floor.
    slow = float(plain.time_us(curves(None, 50.0)))
    side = float(_roofline_side(plain, without)[0])
    floor = float(plain.time_us(without)) - side
    assert slow - floor == pytest.approx(4096 * 50e-3, rel=1e-3)


def test_main_loop_curves_need_the_sm_count():
    hw = dataclasses.replace(H100, sm_count=None, l2_bytes=None)
    w = gemm_kernel_work(300.0, 256.0, 4096.0, hw, 1.0, act_quant=1.0)
    absolute = dk.init_curves("gemm_fp8", portable=False)
    with pytest.raises(ValueError, match="main-loop cost need the GPU's SM count"):
        w.time_us(absolute)


def test_gemm_flops_count_whole_slices_of_32_rows():
    # m = 257: 9 slices of 32 = 288 rows computed; m = 256: exactly 8 slices.
    # Bytes count the real rows: 256 * 64 * 2 (weight) + m * 256 * 2 + m * 64 * 2.
    w = gemm_kernel_work(jnp.array([256.0, 257.0]), 64.0, 256.0, H100)
    np.testing.assert_array_equal(
        np.asarray(w.flops), [2 * 256 * 64 * 256, 2 * 288 * 64 * 256]
    )
    np.testing.assert_array_equal(
        np.asarray(w.bytes),
        [256 * 64 * 2 + m * 256 * 2 + m * 64 * 2 for m in (256, 257)],
    )


def test_fa2_splits_the_kv_only_for_packed_query_groups():
    split = fa2_splits_kv(
        ["vllm_flash_attn", "vllm_flash_attn", "vllm_flash_attn_fa2",
         "vllm_flash_attn_fa3", "vllm_flash_attn", "vllm_flashinfer_trtllmdecode"],
        ["NVIDIA A100-SXM4-80GB", "NVIDIA A100-SXM4-80GB", "NVIDIA L40S",
         "NVIDIA H100 80GB HBM3", "Intel(R) Arc(TM) Pro B60 Graphics", "NVIDIA B200"],
        [8, 8, 32, 8, 8, 8],
        [8, 1, 32, 8, 8, 8],
    )  # fmt: skip
    # FA2 multi-head: unsplit; FA2 GQA, FA3, the XPU's kernel, FlashInfer: split.
    np.testing.assert_array_equal(split, [0, 1, 0, 1, 1, 1])


def test_unsplit_decode_walks_the_whole_cache_per_wave_of_blocks():
    # 4 sequences x 8 KV heads = 32 blocks on A100 (108 SMs): one wave, each block
    # walking 16383 cached tokens; with kloop_ns = 23 ns that is 376.8 us, the
    # third side of the maximum.
    a100 = hardware("a100-sxm-80gb")
    args = (4.0, 16383.0, 8.0, 8.0, 128.0, a100)
    split = decode_attention_work(*args, 2.0, 1.0)
    walk = decode_attention_work(*args, 2.0, 0.0)
    assert float(split.depth) == 0.0 and float(walk.depth) == 16383.0
    assert decode_attention_work(*args).depth is None
    c = dk.init_curves("decode_attention", portable=True)
    assert c.log_kloop_ns is not None and c.log_row_ns is None
    c = eqx.tree_at(lambda c: c.log_kloop_ns, c, jnp.log(23.0))
    floor = float(split.time_us(c)) - float(_roofline_side(split, c)[0])
    side = float(_roofline_side(walk, c)[0])
    loop = 16383 * 23e-3
    want = floor + (side**4 + loop**4) ** 0.25
    assert float(walk.time_us(c)) == pytest.approx(want, rel=1e-9)
    # The public helper takes the same flag.
    got = decode_attention_us(*args[:5], c, a100, 2.0, 0.0)
    assert float(got) == pytest.approx(want, rel=1e-9)
    assert float(decode_attention_us(*args[:5], c, a100)) == float(split.time_us(c))


def test_decode_split_kv_must_be_0_or_1():
    with pytest.raises(ValueError, match="split_kv"):
        decode_attention_work(1.0, 100.0, 8.0, 8.0, 128.0, H100, 2.0, 0.5)


def test_table_rows_mark_fa2_multi_head_decode_unsplit():
    rows = pd.DataFrame(
        {
            "batch_size": [4, 4],
            "step": [1023, 1023],
            "num_heads": [8, 32],
            "num_key_value_heads": [8, 8],
            "head_dim": [128, 128],
            "kv_bytes": [2.0, 2.0],
            "kernel_source": ["vllm_flash_attn", "vllm_flash_attn"],
            "device": ["NVIDIA A100-SXM4-80GB"] * 2,
        }
    )
    w = dk.family_work("decode_attention", rows, hardware("a100-sxm-80gb"))
    np.testing.assert_array_equal(np.asarray(w.depth), [1023.0, 0.0])
    # Tables without the kernel's name: every kernel splits (no main loop).
    bare = rows.drop(columns=["kernel_source", "device"])
    assert (
        dk.family_work("decode_attention", bare, hardware("a100-sxm-80gb")).depth
        is None
    )


def test_a_gemm_without_rows_has_no_flops_and_finite_gradients():
    c = dk.init_curves("gemm_bf16", portable=True)
    assert float(gemm_kernel_work(0.0, 128.0, 256.0, H100).flops) == 0.0

    def t(m):
        w = gemm_kernel_work(m, 128.0, 256.0, H100)
        return jnp.where(m > 0, w.time_us(c), 0.0)

    assert np.isfinite(float(jax.grad(t)(0.0)))
