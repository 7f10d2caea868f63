"""Kernel table loaders (units, missing columns, bad values) and the work of their
rows."""

import numpy as np
import pandas as pd
import pytest

from diffmodel._model._hardware import hardware
from diffmodel.kernels._tables import (
    load_allreduce,
    load_attention,
    load_gemm,
    load_vidur_allreduce,
    load_vidur_operators,
    table_work,
    vidur_work,
)

H100 = hardware("h100-sxm")
B200 = hardware("b200")


def test_gemm_loader_converts_ms_to_us(data_dir):
    g = load_gemm(data_dir / "kernels/h100_sxm/gemm_perf.parquet")
    np.testing.assert_allclose(g["latency_us"], g["latency"] * 1e3)
    big = g[
        (g.m == 8192) & (g.n == 16384) & (g.k == 16384) & (g.gemm_dtype == "bfloat16")
    ]
    # 4.4 TFLOP at 0.3-1.0 of the 989.5 TFLOP/s peak: 4.4-15 ms (a unit check).
    assert 4400 < float(big["latency_us"].iloc[0]) < 15000


def test_allreduce_loader_counts_bytes(data_dir):
    a = load_allreduce(data_dir / "kernels/h100_sxm/custom_allreduce_perf.parquet")
    np.testing.assert_array_equal(a["bytes"], 2 * a["message_size"])  # bf16 elements
    v = load_vidur_allreduce(data_dir / "vidur/h100/all_reduce_dgx.csv")
    assert set(v["num_gpus"]) == {2.0, 4.0, 8.0} and (v["latency_us"] > 0).all()


def test_vidur_loader_long_form(data_dir):
    v = load_vidur_operators(data_dir / "vidur/h100/llama-2-7b-hf_mlp.csv", "7b")
    assert v["operator"].nunique() == 10 and (v["model"] == "7b").all()
    assert (v["latency_us"] > 0).all()


def test_loader_names_missing_columns(tmp_path):
    path = tmp_path / "gemm.parquet"
    pd.DataFrame({"m": [1], "n": [2], "latency": [0.1]}).to_parquet(path)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['k', 'gemm_dtype'\]"):
        load_gemm(path)
    with pytest.raises(ValueError, match="not found"):
        load_attention(tmp_path / "nope.parquet")


def test_loader_rejects_bad_values(tmp_path):
    path = tmp_path / "gemm.csv"
    pd.DataFrame(
        {"m": [1], "n": [2], "k": [3], "gemm_dtype": ["bfloat16"], "latency": [-1.0]}
    ).to_csv(path)
    with pytest.raises(ValueError, match="positive times"):
        load_gemm(path)


@pytest.mark.slow
def test_moe_table_work_models_power_law_routing(tables):
    rows = tables["moe"]
    rows = rows[(rows["moe_dtype"] == "bfloat16") & (rows["num_experts"] == 8)]
    bal = rows[rows["distribution"] == "balanced"]
    w = table_work("moe", bal, H100)
    assert w.tuned is not None and float(w.tuned.max()) == 1.0
    # Mixed routings in one table: the balanced rows keep their balanced work.
    mixed = table_work("moe", rows, H100)
    is_bal = (rows["distribution"] == "balanced").to_numpy()
    np.testing.assert_allclose(mixed.flops[is_bal], w.flops, rtol=1e-12)
    np.testing.assert_allclose(mixed.bytes[is_bal], w.bytes, rtol=1e-12)
    with pytest.raises(ValueError, match="'distribution'"):
        table_work("moe", bal.assign(distribution="zipf"), H100)


def test_vidur_work_shapes():
    table = pd.DataFrame(
        {
            "operator": ["attn_pre_proj", "add", "mlp_act"],
            "n_head": 64,
            "n_kv_head": 8,
            "n_embd": 8192,
            "n_expanded_embd": 28672,
            "num_tokens": 16,
            "num_tensor_parallel_workers": 8,
        }
    )
    w = vidur_work(table, H100)
    # QKV at TP8: 8 query heads + 2 x 1 KV head of 128 -> n = 1280.
    np.testing.assert_allclose(w.flops[0], 2 * 16 * 1280 * 8192)
    np.testing.assert_allclose(w.bytes[1:], [16 * 3 * 8192 * 2, 16 * 3 * 3584 * 2])
    assert float(w.flops[1]) == 0.0


def test_table_work_quantizes_only_per_tensor_fp8_and_nvfp4_rows():
    """The activation quantization pass: two for per-tensor FP8 (320 bytes of a
    4x16 activation), one for NVFP4 (164), none for 128-block FP8 (fused); NVFP4
    at the FP4 peak with 0.5625-byte weights (see test_work's hand values)."""
    t = pd.DataFrame(
        dict(m=[4, 4, 4, 4], n=[8, 8, 8, 8], k=[16, 16, 16, 16]),
    ).assign(gemm_dtype=["bfloat16", "fp8", "fp8_block", "nvfp4"])
    w = table_work("gemm", t, B200)
    np.testing.assert_array_equal(np.asarray(w.pre_bytes), [0.0, 320.0, 0.0, 164.0])
    np.testing.assert_array_equal(np.asarray(w.bytes), [448.0, 256.0, 256.0, 168.0])
    peaks = [B200.flops_16, B200.flops_8, B200.flops_8, B200.flops_4]
    np.testing.assert_array_equal(np.asarray(w.peak_flops), np.asarray(peaks))
    bf = table_work("gemm", t.iloc[:1], H100)
    assert bf.pre_bytes is None


def test_flashinfer_mxfp4_rows_are_padded_to_256():
    from diffmodel.kernels._moe import moe_kernel_work
    from diffmodel.kernels._tables import mxfp4_alignment

    rows = pd.DataFrame(
        {
            "moe_dtype": ["w4a16_mxfp4", "w4a16_mxfp4", "bfloat16"],
            "kernel_source": [
                "vllm_gptossmxfp4moe_flashinfer_trtllm_mxfp4_bf16",
                "vllm_gptossmxfp4moe_triton_oaitritonmxfp4experts",
                "vllm_unquantizedfusedmoe_flashinfer_trtllm",
            ],
            "hidden_size": [2880, 2880, 2880],
            "inter_size": [2880, 2880, 2880],
            "moe_tp_size": [32, 32, 32],
        }
    )
    np.testing.assert_array_equal(mxfp4_alignment(rows), [256.0, 0.0, 0.0])
    # 2880 / 32 = 90 per GPU -> 256; 2880 -> 3072. Triton and 16-bit rows as they are.
    hidden, inter = np.array([3072, 2880, 2880]), np.array([256 * 32, 2880, 2880])
    kw = dict(tp=32.0, routing="balanced")
    padded = moe_kernel_work(64.0, 2880.0, 2880.0, 4.0, 128.0, B200, **kw,
                             width_align=256.0)  # fmt: skip
    by_hand = moe_kernel_work(64.0, hidden[0], inter[0], 4.0, 128.0, B200, **kw)
    np.testing.assert_allclose(padded.bytes, by_hand.bytes, rtol=1e-12)
    np.testing.assert_allclose(padded.flops, by_hand.flops, rtol=1e-12)
    plain = moe_kernel_work(64.0, hidden[1], inter[1], 4.0, 128.0, B200, **kw)
    unpadded = moe_kernel_work(64.0, 2880.0, 2880.0, 4.0, 128.0, B200, **kw,
                               width_align=0.0)  # fmt: skip
    np.testing.assert_allclose(unpadded.bytes, plain.bytes, rtol=1e-12)


def test_moe_token_tiles_follow_each_kernels_rule():
    """OpenAI's Triton MoE: ``T k // E`` to the next power of 2 in [16, 128] (the
    H200 tables' steps, E 32, k 4: 128 tokens -> 16 rows, 160 -> 32, 320 -> 64,
    768 -> 128, 1536 -> 128); Marlin: the first of 8..64 with ``T k / E_local /
    BM < 0.9``; vLLM's default: 16 rows up to the local experts, 64 above."""
    from diffmodel.kernels._moe import (
        TILE_MARLIN,
        TILE_OAI_TRITON,
        moe_block_m,
        moe_kernel_work,
        moe_tile_rule,
        power_law_loads,
    )

    t = np.array([1.0, 128.0, 160.0, 320.0, 768.0, 1536.0])
    np.testing.assert_array_equal(
        moe_block_m(TILE_OAI_TRITON, t, 4.0, 32.0), [16, 16, 32, 64, 128, 128]
    )
    # Marlin, E 32 on one GPU: slots per expert 0.125, 16, 20, 40, 96, 192.
    np.testing.assert_array_equal(
        moe_block_m(TILE_MARLIN, t, 4.0, 32.0), [8, 32, 32, 48, 64, 64]
    )
    # With 4-way EP Marlin sees 8 local experts: 4x the slots per expert.
    np.testing.assert_array_equal(moe_block_m(TILE_MARLIN, 128.0, 4.0, 32.0, 4.0), 64)
    # vLLM's default: 16 rows while the tokens are at most the 32 experts, 64 above.
    np.testing.assert_array_equal(
        moe_block_m(0.0, t, 4.0, 32.0), [16, 64, 64, 64, 64, 64]
    )
    rows = pd.DataFrame(
        {
            "kernel_source": [
                "vllm_gptossmxfp4moe_triton_oaitritonmxfp4expertsmonolithic",
                "vllm_gptossmxfp4moe_marlin_marlinexperts",
                "vllm_fused_moe",
            ]
        }
    )
    np.testing.assert_array_equal(moe_tile_rule(rows), [1.0, 2.0, 0.0])
    # 64 balanced tokens, k 4 over 32 experts: 8 slots each. Default tiles (64 >
    # 32 experts: 64 rows) compute 64 rows per expert, OpenAI's kernel 16.
    kw = dict(routing="balanced")
    own = moe_kernel_work(64.0, 2880.0, 2880.0, 4.0, 32.0, H100, **kw,
                          tile_rule=TILE_OAI_TRITON)  # fmt: skip
    default = moe_kernel_work(64.0, 2880.0, 2880.0, 4.0, 32.0, H100, **kw)
    np.testing.assert_allclose(own.flops / default.flops, 16.0 / 64.0, rtol=1e-12)
    np.testing.assert_allclose(own.bytes, default.bytes, rtol=1e-12)
    # Skewed loads: tiles at the kernel's own rows (16 here: the default small ones).
    pl = power_law_loads(np.array([8.0, 64.0]), 32.0, 4.0, 1.0, 1.2, block_m=16.0)
    np.testing.assert_array_equal(pl.tiles_own, pl.tiles_small)
