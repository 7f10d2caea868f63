"""experiments/mla_bmm_kernels.py: its MLA BMM work against hand-written FLOPs and
bytes, its loader (backend preference, a clear error for a missing system), and a run
on a small subset of aiconfigurator's tables."""

import numpy as np
import pandas as pd
import pytest

import diffmodel as dm

from helpers import load_experiment

# DeepSeek MLA: qk_nope 128, kv_lora_rank 512, v_head 128.
P, L, V = 128, 512, 128


@pytest.fixture(scope="module")
def script():
    return load_experiment("mla_bmm_kernels")


def _rows(source: str, dtype: str, heads: int, tokens: int) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "kernel_source": source,
                "bmm_dtype": dtype,
                "num_heads": heads,
                "num_tokens": tokens,
            }
        ]
    )


def test_bf16_pre_row_by_hand(script):
    """16 heads of [4, 128] @ [128, 512] in bf16 (vLLM torch.bmm): 2 H T k n FLOPs,
    H (T k + k n + T n) 2 bytes, the 16-bit peak, no quantization pass."""
    hw = dm.hardware("h100-sxm")
    w = script.bmm_work("mla_gen_pre", _rows("vllm_torch_bmm", "bfloat16", 16, 4), hw)
    assert w["flops"][0] == 2 * 16 * 4 * P * L
    assert w["bytes"][0] == 16 * (4 * P + P * L + 4 * L) * 2
    assert w["pre_bytes"][0] == 0.0
    assert w["peak"][0] == pytest.approx(float(hw.flops_16))
    assert w["bw"][0] == pytest.approx(float(hw.hbm_bw))


def test_fp8_post_row_by_hand(script):
    """2 heads of [8, 512] @ [512, 128] by SGLang's bmm_fp8: 1-byte operands, a bf16
    output, the FP8 peak, and the timed per-tensor quantization of the bf16
    activation (read twice at 2 bytes, written once at 1 byte)."""
    hw = dm.hardware("h200")
    rows = _rows("sglang_sgl_kernel_bmm_fp8", "fp8", 2, 8)
    w = script.bmm_work("mla_gen_post", rows, hw)
    assert w["flops"][0] == 2 * 2 * 8 * L * V
    assert w["bytes"][0] == 2 * (8 * L * 1 + L * V * 1 + 8 * V * 2)
    assert w["pre_bytes"][0] == 2 * 8 * L * (2 + 2 + 1)
    assert w["peak"][0] == pytest.approx(float(hw.flops_8))
    # Time: roofline + the quantization pass at mem_bw + latency.
    t = script.predict_us([0.5, 0.8, 3.0], w)[0]
    mem = w["bytes"][0] / float(hw.hbm_bw) * 1e6 / 0.8
    pre = w["pre_bytes"][0] / float(hw.hbm_bw) * 1e6 / 0.8
    assert t >= mem + pre + 3.0
    assert t == pytest.approx(mem + pre + 3.0, rel=0.05)  # memory-bound row


def test_trtllm_blackwell_fp8_rows_are_bf16_bmms(script):
    """TRT-LLM dequantizes fp8 weights at load on SM100: a bf16 BMM, 16-bit peak."""
    hw = dm.hardware("b200")
    rows = _rows("trtllm_bmm_out_dequant_bf16", "fp8", 4, 4)
    w = script.bmm_work("mla_gen_pre", rows, hw)
    assert w["bytes"][0] == 4 * (4 * P + P * L + 4 * L) * 2
    assert w["peak"][0] == pytest.approx(float(hw.flops_16))


def _write(root, system, backend, version, rows):
    folder = root / system / "mla_bmm" / backend / version
    folder.mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(folder / "mla_bmm_perf.parquet")


def _table(source, dtype, latency):
    return [
        {
            "op_name": op,
            "kernel_source": source,
            "bmm_dtype": dtype,
            "num_tokens": t,
            "num_heads": h,
            "latency": latency,
        }
        for op in ("mla_gen_pre", "mla_gen_post")
        for t in (1, 8)
        for h in (16, 128)
    ]


def test_loader_prefers_vllm_per_dtype(script, tmp_path):
    """bf16 from vLLM's table; fp8 (absent there) from SGLang's newest version; the
    backend and version named on every row; duplicates averaged."""
    _write(
        tmp_path,
        "h100_sxm",
        "vllm",
        "0.24.0",
        _table("vllm_torch_bmm", "bfloat16", 0.01),
    )
    sg = _table("sglang_torch_bmm", "bfloat16", 0.5) + _table(
        "sglang_sgl_kernel_bmm_fp8", "fp8", 0.02
    )
    _write(tmp_path, "h100_sxm", "sglang", "0.5.9", sg)
    _write(tmp_path, "h100_sxm", "sglang", "0.5.14", sg + [{**sg[-1], "latency": 0.04}])
    tables = script.load_tables(tmp_path)
    assert set(tables) == {
        (op, d) for op in ("mla_gen_pre", "mla_gen_post") for d in ("bfloat16", "fp8")
    }
    rows, backend = tables[("mla_gen_pre", "bfloat16")]["h100_sxm"]
    assert backend == "vllm 0.24.0" and set(rows["backend"]) == {"vllm 0.24.0"}
    assert rows["latency_us"].tolist() == pytest.approx([10.0] * 4)
    rows, backend = tables[("mla_gen_post", "fp8")]["h100_sxm"]
    assert backend == "sglang 0.5.14" and len(rows) == 4
    assert sorted(rows["latency_us"]) == pytest.approx([20.0, 20.0, 20.0, 30.0])


def test_loader_errors_on_a_missing_system(script, tmp_path):
    with pytest.raises(ValueError, match="no MLA BMM table for system 'h200_sxm'"):
        script.load_tables(tmp_path, ["h200_sxm"])
    with pytest.raises(ValueError, match="no package GPU"):
        script.load_tables(tmp_path, ["no_such_gpu"])


@pytest.mark.slow
def test_main_on_a_subset(script, tmp_path):
    pytest.importorskip("aiconfigurator_core")
    table = script.main(out=tmp_path, systems=["h100_sxm", "h200_sxm"], max_rows=40)
    md = (tmp_path / "mla_bmm_kernels.md").read_text()
    assert md.startswith("| op | system | dtype | protocol |")
    assert "h100_sxm (vllm 0.24.0)" in md and "h200_sxm (sglang 0.5.14)" in md
    summary = (tmp_path / "mla_bmm_kernels_summary.md").read_text()
    assert summary.startswith("| op | protocol | tables |")
    assert (tmp_path / "mla_bmm_kernels.csv").is_file()
    assert set(table["protocol"]) == {"held-out shapes", "leave-one-GPU-out"}
    assert set(table["op"]) == {
        "mla_gen_pre_bf16",
        "mla_gen_post_bf16",
        "mla_gen_pre_fp8",
        "mla_gen_post_fp8",
    }
    assert np.isfinite(table[["uncalibrated_mape", "calibrated_mape"]].to_numpy()).all()
