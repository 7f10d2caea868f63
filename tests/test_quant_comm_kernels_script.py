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


def test_block_gemm_host_floor_overlaps_the_roofline(script):
    """``overlap`` 1 is the roofline plus the floor, a large one their maximum, and
    the prior (latency 0) the plain roofline."""
    hw = dm.hardware("h100-sxm")
    rows = pd.DataFrame([{"m": 1, "n": 64, "k": 64}, {"m": 8192, "n": 8192, "k": 8192}])
    w = script.gemm_work("fp8_block", rows, hw)
    roof = np.asarray(
        dm.kernels.roofline_us(w["flops"], w["bytes"], w["peak"], w["bw"], 0.7, 0.8)
    )

    def at(overlap):
        return script.predict_us("gemm_block", [0.7, 0.8, 80.0, overlap], w)

    np.testing.assert_allclose(at(1.0), roof + 80.0, rtol=1e-9)
    np.testing.assert_allclose(at(30.0), np.maximum(roof, 80.0), rtol=0.03)
    assert np.all(at(2.0) < roof + 80.0) and np.all(at(2.0) > np.maximum(roof, 80.0))
    prior = script.FAMILIES["gemm_block"].prior
    np.testing.assert_allclose(
        script.predict_us("gemm_block", prior, w),
        dm.kernels.roofline_us(w["flops"], w["bytes"], w["peak"], w["bw"], *prior[:2]),
        rtol=1e-9,
    )


def test_block_gemm_note_compares_with_the_per_tensor_kernel(script, tmp_path):
    """Shapes long enough at the FP8 peak are compared with the per-tensor table's
    row of the same shape; the pair floor is over rows m, m + 1."""
    hw = dm.hardware("h100-sxm")
    big = {"n": 16384, "k": 16384}
    block = pd.DataFrame(
        [
            {"m": 4096, **big, "latency_us": 900.0},
            {"m": 4097, **big, "latency_us": 1100.0},
        ]
    )
    folder = tmp_path / "h100_sxm" / "gemm" / "vllm" / "0.24.0"
    folder.mkdir(parents=True)
    pd.DataFrame(
        [
            {
                "gemm_dtype": "fp8",
                "kernel_source": "cutlass",
                "m": 4096,
                **big,
                "latency": 1.0,
            },
            {
                "gemm_dtype": "fp8",
                "kernel_source": "cutlass",
                "m": 4097,
                **big,
                "latency": 1.0,
            },
        ]
    ).to_parquet(folder / "gemm_perf.parquet")
    tables = {
        ("gemm_block", "gemm_fp8_block", "fp8_block"): {"h100_sxm": (block, "0.24.0")}
    }
    note = script.block_gemm_note(tmp_path, tables, {"h100_sxm": hw})
    # |900 - 1000| / 900 and |1100 - 1000| / 1100: 11.1 and 9.1%
    assert "h100-sxm pairs 10.1% on 2 rows" in note
    assert "block / per-tensor 1.00 (0.92-1.08, 2 shapes)" in note
    assert script.block_gemm_note(tmp_path, {}, {}) == ""


def test_collective_rows_by_hand(script):
    """1 MiB elements of half over 4 GPUs: 3/4 of 2 MiB on the wire per GPU (all-gather,
    all-to-all), twice that for all-reduce; time = latency + 3 hops x hop latency +
    wire / (link_bw eta), eta the saturating link efficiency at the buffer's time on
    the link; the priors' pair: a fixed efficiency and latency."""
    hw = dm.hardware("h200")
    rows = pd.DataFrame([{"num_gpus": 4, "message_size": 2**20}])
    full = 2**20 * 2
    link_us = full / float(hw.link_bw) * 1e6
    eta_max, lat, hop, slope, log_half = 0.5, 10.0, 2.0, 0.6, np.log(3.0)
    eta = eta_max / (1.0 + np.exp(-slope * (np.log(link_us) - log_half)))
    for op, factor in [("all_gather", 0.75), ("alltoall", 0.75), ("all_reduce", 1.5)]:
        w = script.comm_work(op, "half", rows, hw)
        assert w["bytes"][0] == full
        params = [eta_max, lat, hop, slope, log_half, 1.0]
        t = script.predict_us("comm", params, w)[0]
        assert t == pytest.approx(lat + 3 * hop + factor * link_us / eta, rel=1e-9)
        t0 = script.predict_us("comm", script.FAMILIES["comm"].prior, w)[0]
        eta0, lat0 = script.FAMILIES["comm"].prior
        assert t0 == pytest.approx(lat0 + factor * link_us / eta0, rel=1e-9)
    w = script.comm_work("alltoall", "int8", rows, hw)
    assert w["bytes"][0] == 2**20
    # A PCIe card: the GPU exponent divides the efficiency by (n/2)^gamma.
    l40s = dm.hardware("l40s")
    w = script.comm_work("alltoall", "half", rows, l40s)
    assert w["shared_fabric"][0] == 1.0
    link_us = full / float(l40s.link_bw) * 1e6
    eta = eta_max / (1.0 + np.exp(-slope * (np.log(link_us) - log_half)))
    t = script.predict_us("comm", [eta_max, lat, hop, slope, log_half, 1.0], w)[0]
    assert t == pytest.approx(lat + 3 * hop + 0.75 * link_us / eta * 2.0, rel=1e-9)


def test_quantize_rows_by_hand(script):
    """bf16 in (2 bytes) for compute_scale; plus fp8 out (1 byte) for scale_matrix."""
    hw = dm.hardware("h200")
    rows = pd.DataFrame([{"m": 8, "k": 4096}])
    assert script.quant_work("compute_scale", rows, hw)["bytes"][0] == 2 * 8 * 4096
    assert script.quant_work("scale_matrix", rows, hw)["bytes"][0] == 3 * 8 * 4096


def test_quantization_time_by_hand(script):
    """H200: 132 SMs, 4.8 TB/s, 50 MiB L2. m = 528, k = 4096: 3 m k = 6.49 MB.

    Priors (no walk, every byte from HBM): latency 0 + bytes / (bw mem_bw).
    Fitted form: 2 waves (ceil(528 / 264)) of 0.5 + 4096 * 0.2 ns = 1.3192 us:
    2.6384 us; a cache floor of 0.25 with its midpoint at the L2 and slope 1: the
    HBM share is 0.25 + 0.75 / (1 + l2 / bytes); sharpness 1 adds the two."""
    hw = dm.hardware("h200")
    rows = pd.DataFrame([{"m": 528, "k": 4096}])
    w = script.quant_work("scale_matrix", rows, hw)
    bytes_, bw, l2 = 3 * 528 * 4096, float(hw.hbm_bw), float(hw.l2_bytes)
    assert float(hw.sm_count) == 132
    prior = script.FAMILIES["quantize"].prior
    t0 = script.predict_us("quantize", prior, w)[0]
    assert t0 == pytest.approx(bytes_ / bw * 1e6 / prior[0], rel=1e-12)
    params = [0.8, 1.5, 0.5, 0.2, 1.0, 0.25, 1.0, 1.0]
    share = 0.25 + 0.75 / (1.0 + l2 / bytes_)
    want = 1.5 + bytes_ / bw * 1e6 / 0.8 * share + 2 * (0.5 + 4096 * 0.2e-3)
    assert script.predict_us("quantize", params, w)[0] == pytest.approx(want, rel=1e-9)


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
    """H100 (3.35 TB/s, 50 MB L2): scale_matrix reads 2 m k and writes m k bytes.
    m = k = 8192 is 201 MB (over twice the L2), at least 60 us from HBM: a 2.3 us
    row is impossible, a 70 us row is not; a 1.5 MB row is cache-sized and not
    counted."""
    hw = {"h100_sxm": dm.hardware("h100-sxm")}
    rows = pd.DataFrame(
        {"m": [8192, 8192, 512], "k": [8192, 8192, 1024], "latency_us": [2.3, 70, 0.1]}
    )
    tables = {("quantize", "scale_matrix", "fp8"): {"h100_sxm": (rows, "0.24.0")}}
    note = script.impossible_rows_note(tables, hw)
    assert "scale_matrix h100-sxm 50% of 2" in note
    assert "compute_scale" not in note


def test_compute_scale_is_described_as_a_difference_with_its_pair_floor(script):
    """compute_scale (dynamic minus static kernel): the large rows below one read of
    the input (134 MB at 3.35 TB/s: 40 us) are counted, and the pairs (m, m + 1):
    rows 8192 and 8193 at k = 8192 with 30 and 50 us have mean 40, so APEs 1/3 and
    1/5: 26.7% on 2 rows."""
    hw = {"h100_sxm": dm.hardware("h100-sxm")}
    rows = pd.DataFrame(
        {"m": [8192, 8193, 512], "k": [8192, 8192, 1024], "latency_us": [30, 50, 0.1]}
    )
    tables = {("quantize", "compute_scale", "fp8"): {"h100_sxm": (rows, "0.24.0")}}
    note = script.impossible_rows_note(tables, hw)
    assert "not one kernel" in note and "faster than their bytes" not in note
    assert "h100-sxm 50% of 2, pairs 26.7% on 2 rows" in note


def test_a_table_of_several_kernels_keeps_the_one_on_most_rows(script):
    """Block-FP8 GEMM tables time DeepGEMM, FlashInfer and CUTLASS on one shape: the
    mean of alternatives is no kernel's time, so only the most measured stays."""
    d = pd.DataFrame(
        {
            "kernel_source": ["deepgemm", "deepgemm", "cutlass"],
            "m": [8, 16, 8],
            "latency": [0.01, 0.02, 0.05],
        }
    )
    kept = script.dominant_kernel(d)
    assert kept["kernel_source"].tolist() == ["deepgemm", "deepgemm"]
    assert script.dominant_kernel(d.iloc[:0]).empty


def test_gemm_floor_note_names_each_tables_fastest_row(script):
    rows = pd.DataFrame({"m": [1, 64], "n": [64, 64], "k": [64, 64]})
    tables = {
        ("gemm_block", "gemm_fp8_block", "fp8_block"): {
            "h100_sxm": (rows.assign(latency_us=[77.4, 90.0]), "0.24.0")
        },
        ("quantize", "scale_matrix", "fp8"): {"h100_sxm": (rows, "0.24.0")},
    }
    assert "gemm_fp8_block h100-sxm 77 us." in script.gemm_floor_note(tables)
    assert script.gemm_floor_note({}) == ""
