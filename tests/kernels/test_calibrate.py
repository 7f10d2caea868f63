"""Kernel calibration: held-out splits, a small fit, an empty family, the step
model's prior factors."""

import equinox as eqx
import jax.numpy as jnp
import pandas as pd
import pytest

import diffmodel.kernels as dk
from diffmodel import mape
from diffmodel._model._factors import FACTOR_NAMES, Factors
from diffmodel._model._hardware import hardware
from diffmodel.kernels._calibrate import (
    FitOptions,
    family_rows,
    family_work,
    fit_roofline_curves,
    held_out_split,
    init_curves,
    kernel_prior_factors,
)
from diffmodel.kernels._curves import default_kernel_curves

from helpers import needs_db

H100 = hardware("h100-sxm")


def test_held_out_split_keeps_shapes_whole():
    rows = pd.DataFrame({"n": [1, 1, 2, 2, 3, 3, 4, 4], "k": [1] * 8, "m": range(8)})
    test = held_out_split(rows, ["n", "k"], frac=0.5)
    for _, g in rows.assign(t=test).groupby("n"):
        assert g["t"].nunique() == 1
    assert test.sum() == 4
    with pytest.raises(ValueError, match="not columns"):
        held_out_split(rows, ["q"])


@pytest.mark.slow
def test_small_calibration_improves_gemm(tables):
    rows = family_rows(tables, "gemm_bf16")
    rows = rows[rows["n"].isin([1024, 4096]) & rows["k"].isin([1024, 4096, 8192])]
    work = family_work("gemm_bf16", rows, H100)
    y = rows["latency_us"].to_numpy(float)
    before = mape(y, work.time_us((0.7, 0.8)))
    curves = fit_roofline_curves(
        work,
        y,
        init_curves("gemm_bf16"),
        options=FitOptions(adam_steps=150, lbfgs_steps=20),
    )
    after = mape(y, work.time_us(curves))
    assert after < 0.5 * before
    assert after < 15.0
    assert float(curves.flops.eta_max) <= 1.0 and float(curves.bandwidth.eta_max) <= 1.0


def test_kernel_prior_factors_are_physical():
    prior = kernel_prior_factors(default_kernel_curves())
    assert isinstance(prior, Factors)
    values = prior.as_dict()
    assert set(values) == set(FACTOR_NAMES)
    for name in ("gemm_flops", "mem_bw", "attn_flops", "attn_bw", "comm_bw"):
        assert 0.0 < float(values[name]) <= 1.0, name
    assert float(values["comm_latency_us"]) > 0
    with pytest.raises(ValueError, match="tp"):
        kernel_prior_factors(default_kernel_curves(), tp=0)


@pytest.mark.slow
@needs_db
def test_empty_family_is_an_error_and_calibration_says_skipped():
    tables = dk.load_system_tables("a100_sxm", "vllm")
    assert tables["gemm"].attrs["version"] == "0.14.0"
    with pytest.raises(ValueError, match="no rows for family gemm_fp8"):
        dk.family_rows(tables, "gemm_fp8")
    lines = []
    small = {k: t.sample(min(len(t), 60), random_state=0) for k, t in tables.items()}
    curves = dk.calibrate_kernels(
        small,
        hardware_name="a100",
        options=dk.FitOptions(adam_steps=3, lbfgs_steps=0),
        portable=True,
        progress=lines.append,
    )
    assert any(line.startswith("skipped gemm_fp8") for line in lines)
    assert not any("on 0 kernels" in line for line in lines)
    assert curves.gemm_bf16.portable and curves.hardware == "a100"


@pytest.mark.slow
def test_per_wave_cost_is_recovered_at_its_own_scale():
    """Decode-like kernels whose cost is 3 us per wave of blocks (H100's decode
    attention measures about that): the fit from the 1 us/wave start recovers it
    (a softplus parameter in ns stayed near its start, 1000x off)."""
    from diffmodel.kernels._work import decode_attention_work

    true = eqx.tree_at(
        lambda c: c.log_unit_ns,
        dk.default_roofline_curves(portable=True),
        jnp.log(3000.0),
    )
    batch = jnp.asarray([1.0, 8.0, 64.0, 256.0, 512.0, 1024.0, 2048.0] * 3)
    kv = jnp.repeat(jnp.asarray([1.0, 512.0, 8192.0]), 7)
    work = decode_attention_work(batch, kv, 32.0, 8.0, 128.0, hardware("h100-sxm"))
    fitted = dk.fit_roofline_curves(
        work,
        work.time_us(true),
        dk.default_roofline_curves(portable=True),
        options=dk.FitOptions(adam_steps=300, lbfgs_steps=50),
    )
    assert float(fitted.unit_ns) == pytest.approx(3000.0, rel=0.05)


def _held_out_fit(family, rows, keys, hw, lbfgs_steps=60):
    """A family's curves fitted on 75% of the ``keys`` shapes of ``rows``: the
    fitted rows, and the held-out MAPE % of the priors and of the fit."""
    test = held_out_split(rows, keys)
    fit, held = rows[~test], rows[test]
    init = init_curves(family)
    curves = fit_roofline_curves(
        family_work(family, fit, hw),
        fit["latency_us"].to_numpy(float),
        init,
        options=FitOptions(adam_steps=300, lbfgs_steps=lbfgs_steps),
    )
    work = family_work(family, held, hw)
    y = held["latency_us"].to_numpy(float)
    return fit, mape(work.time_us(init), y), mape(work.time_us(curves), y)


@needs_db
def test_mxfp4_experts_are_calibrated_on_their_own_rows():
    """gpt-oss's MXFP4 MoE rows (OpenAI's Triton kernel, vLLM 0.24.0 on H100) make
    the ``moe_w4a16`` family; calibrated on 75% of the expert layouts it predicts
    the other 25% far better than its priors. ``families=`` fits only the named
    ones and says so for the rest."""
    tables = dk.load_system_tables("h100_sxm", "vllm", families=("moe",))
    rows = dk.family_rows(tables, "moe_w4a16")
    assert set(rows["moe_dtype"]) == {"w4a16_mxfp4"}
    assert rows["kernel_source"].str.contains("oaitriton").all()
    keys = ["num_experts", "moe_tp_size", "moe_ep_size"]
    fit, before, after = _held_out_fit("moe_w4a16", rows, keys, H100, 100)
    assert after < 30.0 and after < 0.6 * before
    lines = []
    only = dk.calibrate_kernels(
        {"moe": fit},
        families=("moe_w4a16",),
        options=FitOptions(adam_steps=3, lbfgs_steps=0),
        progress=lines.append,
    )
    assert "skipped allreduce: not asked for (its curve stays uncalibrated)" in lines
    assert lines[-2].startswith("skipped mla: not asked for")
    assert lines[-1].startswith("skipped dsa: not asked for")
    assert only.mla is None and only.dsa is None
    assert any(line.startswith("calibrated moe_w4a16 on") for line in lines)
    assert eqx.tree_equal(only.moe, init_curves("moe"))
    with pytest.raises(ValueError, match=r"families \['mxfp4'\] are unknown"):
        dk.calibrate_kernels({"moe": fit}, families=("mxfp4",))


@needs_db
def test_fp8_experts_take_block_rows_else_per_tensor_ones():
    """``moe_fp8``: H100's 128-block FP8 MoE rows (FlashInfer's CUTLASS kernel, the
    most measured); RTX PRO 6000 has only per-tensor FP8 rows, which it takes."""
    h100 = dk.family_rows(
        dk.load_system_tables("h100_sxm", families=("moe",)), "moe_fp8"
    )
    assert set(h100["moe_dtype"]) == {"fp8_block"}
    assert h100["kernel_source"].str.contains("flashinfer_cutlass").all()
    rtx = dk.load_system_tables("rtx_pro_6000_server", families=("moe",))
    assert set(dk.family_rows(rtx, "moe_fp8")["moe_dtype"]) == {"fp8"}


@needs_db
def test_nvfp4_gemms_are_calibrated_on_blackwell_rows():
    """``gemm_nvfp4``: B200's NVFP4 GEMM rows (FlashInfer's CuTe DSL kernel, vLLM
    0.24.0), at the FP4 peak with their one-pass activation quantization; on 75% of
    the (n, k) shapes of 600 sampled rows it predicts the other 25% within 15% and
    far better than its priors. H100 has no FP4 tensor cores and no such rows."""
    tables = dk.load_system_tables("b200_sxm", "vllm", families=("gemm",))
    rows = dk.family_rows(tables, "gemm_nvfp4")
    assert set(rows["gemm_dtype"]) == {"nvfp4"}
    rows = rows.sample(600, random_state=0).reset_index(drop=True)
    assert init_curves("gemm_nvfp4").prologue is not None
    _, before, after = _held_out_fit("gemm_nvfp4", rows, ["n", "k"], hardware("b200"))
    assert after < 15.0 and after < 0.5 * before
    h100 = dk.load_system_tables("h100_sxm", "vllm", families=("gemm",))
    with pytest.raises(ValueError, match="no rows for family gemm_nvfp4"):
        dk.family_rows(h100, "gemm_nvfp4")
