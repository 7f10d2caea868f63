"""experiments/quant_comm_kernels.py: its GEMM, collective and quantization work against
hand-written FLOPs and bytes, and a run on a small subset of aiconfigurator's tables."""

import numpy as np
import pandas as pd
import pytest

import diffmodel as dm

from helpers import load_experiment


@pytest.fixture(scope="module")
def script():
    return load_experiment("quant_comm_kernels")


GEMM = pd.DataFrame([{"m": 2, "n": 256, "k": 128}])


def test_fp8_block_gemm_row_by_hand(script):
    """m=2, n=256, k=128: 2 m n k FLOPs; 1-byte operands plus fp32 scales (two
    128x128 weight blocks, two 1x128 activation groups); bf16 output; FP8 peak."""
    hw = dm.hardware("h100-sxm")
    w = script.gemm_work("fp8_block", GEMM, hw)
    assert w["flops"][0] == 2 * 2 * 256 * 128
    weights = 128 * 256 * 1 + 2 * 4  # 32768 fp8 + 2 fp32 block scales
    acts = 2 * 128 * 1 + 2 * 4  # 256 fp8 + 2 fp32 group scales
    out = 2 * 256 * 2
    assert w["bytes"][0] == pytest.approx(weights + acts + out, rel=1e-12)
    assert w["peak"][0] == pytest.approx(float(hw.flops_8))
    assert w["bw"][0] == pytest.approx(float(hw.hbm_bw))


def test_prior_gemm_time_is_at_least_the_compute_time(script):
    hw = dm.hardware("h200")
    rows = pd.DataFrame([{"m": 4096, "n": 8192, "k": 8192}])
    w = script.gemm_work("fp8_block", rows, hw)
    prior = script.FAMILIES["gemm"].prior
    t = script.predict_us("gemm", prior, w)[0]
    assert t >= 2 * 4096 * 8192 * 8192 / float(hw.flops_8) * 1e6 / prior[0]
    assert np.isfinite(t)


def test_collective_rows_by_hand(script):
    """1 MiB elements of half over 4 GPUs: 3/4 of 2 MiB on the wire per GPU (all-gather,
    all-to-all), twice that for all-reduce; time = latency + wire / (link_bw eta)."""
    hw = dm.hardware("h200")
    rows = pd.DataFrame([{"num_gpus": 4, "message_size": 2**20}])
    full = 2**20 * 2
    for op, factor in [("all_gather", 0.75), ("alltoall", 0.75), ("all_reduce", 1.5)]:
        w = script.comm_work(op, "half", rows, hw)
        assert w["wire"][0] == pytest.approx(factor * full, rel=1e-12)
    w = script.comm_work("alltoall", "int8", rows, hw)
    assert w["wire"][0] == pytest.approx(0.75 * 2**20, rel=1e-12)
    t = script.predict_us("comm", [0.5, 10.0], w)[0]
    assert t == pytest.approx(10.0 + 0.75 * 2**20 / float(hw.link_bw) * 1e6 / 0.5)


def test_quantize_rows_by_hand(script):
    """bf16 in (2 bytes) for compute_scale; plus fp8 out (1 byte) for scale_matrix."""
    hw = dm.hardware("h200")
    rows = pd.DataFrame([{"m": 8, "k": 4096}])
    assert script.quant_work("compute_scale", rows, hw)["bytes"][0] == 2 * 8 * 4096
    assert script.quant_work("scale_matrix", rows, hw)["bytes"][0] == 3 * 8 * 4096


@pytest.mark.slow
def test_main_on_a_subset(script, tmp_path):
    pytest.importorskip("aiconfigurator_core")
    table = script.main(out=tmp_path, systems=["h200_sxm", "b200_sxm"], max_rows=60)
    md = (tmp_path / "quant_comm_kernels.md").read_text()
    assert md.startswith("| op | system | dtype | protocol |")
    summary = (tmp_path / "quant_comm_kernels_summary.md").read_text()
    assert summary.startswith("| op | protocol | tables |")
    assert (tmp_path / "quant_comm_kernels.csv").is_file()
    assert set(table["protocol"]) == {"held-out shapes", "leave-one-GPU-out"}
    assert {"gemm_fp8_block", "alltoall", "all_gather"} <= set(table["op"])
    assert np.isfinite(table[["uncalibrated_mape", "calibrated_mape"]].to_numpy()).all()


def test_impossible_quantization_rows_are_counted(script):
    """H100 (3.35 TB/s, 50 MB L2): compute_scale reads 2 m k bytes. m = k = 8192
    is 134 MB (over twice the L2), at least 40 us from HBM: a 2.3 us row is
    impossible, a 50 us row is not; a 1 MB row is cache-sized and not counted."""
    hw = {"h100_sxm": dm.hardware("h100-sxm")}
    rows = pd.DataFrame(
        {"m": [8192, 8192, 512], "k": [8192, 8192, 1024], "latency_us": [2.3, 50, 0.1]}
    )
    tables = {("quantize", "compute_scale", "fp8"): {"h100_sxm": (rows, "0.24.0")}}
    note = script.impossible_rows_note(tables, hw)
    assert "compute_scale h100-sxm 50% of 2" in note
