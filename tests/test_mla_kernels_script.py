"""experiments/mla_kernels.py: its module work against hand-written FLOPs and bytes,
and a run on a small subset of aiconfigurator's vLLM MLA module tables."""

import numpy as np
import pandas as pd
import pytest

import diffmodel as dm

from helpers import load_experiment

# DeepSeek-V3: hidden, q_lora, kv_lora (latent), rope, qk head (nope + rope), v head.
D, QL, C, R, DH, V = 7168, 1536, 512, 64, 192, 128


@pytest.fixture(scope="module")
def script():
    return load_experiment("mla_kernels")


def _row(**kw) -> pd.DataFrame:
    base = dict(mla_dtype="bfloat16", kv_cache_dtype="bfloat16", gemm_type="bfloat16")
    return pd.DataFrame([{**base, **kw}])


def _proj_flops(tokens: int, heads: int) -> float:
    """2 T (d (q_lora + c + r) + q_lora H dh + c H (dh - r + v) + H v d), FLOPs."""
    h = heads
    per_token = D * (QL + C + R) + QL * h * DH + C * h * (DH - R + V) + h * V * D
    return 2.0 * tokens * per_token


def test_context_row_work_by_hand(script):
    """One request of 2 new tokens at 128 heads (tp 1), all bf16."""
    rows = _row(num_heads=128, batch_size=1, isl=2, step=0)
    w = script.module_work("context", rows, dm.hardware("h100-sxm"))
    assert w["proj_f"][0] == pytest.approx(_proj_flops(2, 128), rel=1e-12)
    # Causal pairs b s^2 / 2 = 2; 2 H (qk + v) FLOPs a pair.
    assert w["attn_f"][0] == pytest.approx(2 * 128 * (DH + V) * 2, rel=1e-12)
    # Latent KV write: (c + r) elements of 2 bytes per new token.
    assert w["kv_b"][0] == pytest.approx((C + R) * 2 * 2, rel=1e-12)
    # Attention bytes: 2 KV tokens read (c + r, 2 bytes) + Q and O of 2 tokens.
    assert w["attn_b"][0] == pytest.approx(
        (C + R) * 2 * 2 + 128 * (DH + V) * 2 * 2, rel=1e-12
    )


def test_generation_row_work_by_hand(script):
    """Four requests of sequence 10 at 16 heads (tp 8): absorbed latent attention."""
    rows = _row(num_heads=16, batch_size=4, isl=1, step=10)
    w = script.module_work("generation", rows, dm.hardware("h100-sxm"))
    assert w["proj_f"][0] == pytest.approx(_proj_flops(4, 16), rel=1e-12)
    # b step = 40 pairs; qk = c + r, v = c in the latent space.
    assert w["attn_f"][0] == pytest.approx(2 * 16 * ((C + R) + C) * 40, rel=1e-12)


def test_prior_prediction_is_the_sum_of_rooflines(script):
    """With latency 0 the prediction is at least each part's compute time."""
    rows = _row(num_heads=128, batch_size=8, isl=4096, step=0)
    hw = dm.hardware("h100-sxm")
    w = script.module_work("context", rows, hw)
    t = script.predict_us(script.PRIOR, w)[0]
    attn_compute = w["attn_f"][0] / float(hw.flops_16) * 1e6 / script.PRIOR[2]
    proj_compute = w["proj_f"][0] / float(hw.flops_16) * 1e6 / script.PRIOR[0]
    assert t >= attn_compute + proj_compute
    assert np.isfinite(t)


def test_kernel_sum_prices_the_module_rows_and_the_fixed_cost_is_recovered(script):
    """The kernel sum of a module row is one MLA layer's projections and attention
    (no MLP, no all-reduce); the fixed cost fitted to times that exceed it by a
    constant is that constant."""
    hw = dm.hardware("h100-sxm")
    curves = dm.kernels.default_kernel_curves("h100-sxm")
    ctx = _row(num_heads=16, batch_size=2, isl=1000, step=0, gemm_type="fp8_block")
    gen = _row(num_heads=16, batch_size=64, isl=1, step=4000)
    ks_ctx = script.kernel_sum_us("context", ctx, hw, curves)
    ks_gen = script.kernel_sum_us("generation", gen, hw, curves)
    assert ks_ctx.shape == ks_gen.shape == (1,)
    assert np.all(ks_ctx > 0) and np.all(ks_gen > 0)
    # A longer context costs more in decode; more prompt tokens more in prefill.
    longer = script.kernel_sum_us("generation", gen.assign(step=8000), hw, curves)
    assert longer[0] > ks_gen[0]
    ks = np.array([10.0, 50.0, 200.0, 1000.0])
    assert script.fit_fixed_us(ks, ks + 40.0) == pytest.approx(40.0, rel=1e-6)


@pytest.mark.slow
def test_main_on_a_subset(script, tmp_path):
    pytest.importorskip("aiconfigurator_core")
    table = script.main(out=tmp_path, systems=["h100_sxm", "h200_sxm"], max_rows=60)
    md = (tmp_path / "mla_kernels.md").read_text()
    assert md.startswith("| op | system | dtype | protocol |")
    assert (tmp_path / "mla_kernels.csv").is_file()
    assert set(table["protocol"]) == {
        "held-out shapes",
        "leave-one-GPU-out",
        "kernel sum",
        "kernel sum + fixed cost (other GPUs)",
        "kernel sum, MLA module curves (held-out shapes)",
        "kernel sum, MLA module curves (other GPUs)",
    }
    assert np.isfinite(table[["uncalibrated_mape", "calibrated_mape"]].to_numpy()).all()
