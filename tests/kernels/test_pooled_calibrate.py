"""Curves pooled over several GPUs' tables, and the curves they give one GPU."""

import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

import diffmodel as dm
import diffmodel.kernels as dk
from diffmodel._model._hardware import hardware

from helpers import needs_db


def _pooled(shared=None) -> dk.PooledCurves:
    a, b = ("NVIDIA", "fa3"), ("NVIDIA", "trtllm")
    return dk.PooledCurves(
        shared=shared or dk.default_kernel_curves(portable=True),
        offsets={
            "h200": {"decode_attention": np.array([1.0, 0.0, 0.5, 0.0])},
            "b200": {"decode_attention": np.array([3.0, 0.0, 0.0, 0.0])},
            "gb200": {"decode_attention": np.array([0.0, 2.0, 0.5, 1.0])},
        },
        kernels={
            "h200": {"decode_attention": a},
            "b200": {"decode_attention": b},
            "gb200": {"decode_attention": a},
        },
        rows={g: {"decode_attention": 10} for g in ("h200", "b200", "gb200")},
    )


def test_kernel_key_reads_vendor_and_dominant_source():
    rows = pd.DataFrame(
        {"device": ["NVIDIA H100 80GB HBM3"] * 3, "kernel_source": ["x", "y", "y"]}
    )
    assert dk.kernel_key(rows) == ("NVIDIA", "y")
    assert dk.kernel_key(rows.drop(columns="device")) is None


def test_an_unseen_gpu_takes_the_offsets_of_gpus_running_its_kernel():
    p = _pooled()
    own, src = p.family_offset("b200", "decode_attention", ("NVIDIA", "fa3"))
    np.testing.assert_array_equal(
        own, [3.0, 0.0, 0.0, 0.0]
    )  # its own, not the kernel's
    assert src == ("b200",)
    mean, src = p.family_offset("h100-sxm", "decode_attention", ("NVIDIA", "fa3"))
    np.testing.assert_allclose(mean, [0.5, 1.0, 0.5, 0.5])  # mean of h200 and gb200
    assert src == ("h200", "gb200")
    for kernel in (("NVIDIA", "other"), None):
        zero, src = p.family_offset("h100-sxm", "decode_attention", kernel)
        np.testing.assert_array_equal(zero, np.zeros(4))
        assert src == ()


def test_an_unseen_gpu_prefers_the_gpus_of_its_class():
    """A PCIe card takes the offsets of the cards running its kernel, not those of
    the HBM modules running it; with no card running it, the modules'."""
    fa3 = ("NVIDIA", "fa3")
    p = _pooled()
    p.offsets["rtx-pro-6000"] = {"decode_attention": np.array([-2.0, 0.0, 0.0, 0.0])}
    p.kernels["rtx-pro-6000"] = {"decode_attention": fa3}
    card, src = p.family_offset("l40s", "decode_attention", fa3)
    np.testing.assert_array_equal(card, [-2.0, 0.0, 0.0, 0.0])
    assert src == ("rtx-pro-6000",)
    module, src = p.family_offset("h100-sxm", "decode_attention", fa3)
    np.testing.assert_allclose(module, [0.5, 1.0, 0.5, 0.5])
    assert src == ("h200", "gb200")
    assert dm.gpu_class("l40s") == "pcie" and dm.gpu_class("b200") == "nvlink"
    assert dm.gpu_class(hardware("rtx-pro-6000")) == "pcie"
    with pytest.raises(ValueError, match="nope"):
        dm.gpu_class("nope")


def test_for_gpu_shifts_the_shared_curves_and_times_them_at_its_specs():
    p = _pooled()
    c = p.for_gpu("h100", {"decode_attention": ("NVIDIA", "fa3")})
    assert c.hardware == "h100-sxm"
    want = dk.shifted(p.shared.decode_attention, jnp.array([0.5, 1.0, 0.5, 0.5]))
    np.testing.assert_allclose(
        c.decode_attention.bandwidth.raw_eta_max, want.bandwidth.raw_eta_max
    )
    np.testing.assert_allclose(c.decode_attention.latency_us, want.latency_us)
    # Families no pooled GPU has offsets for keep the shared curves.
    np.testing.assert_allclose(
        c.gemm_bf16.flops.raw_eta_max, p.shared.gemm_bf16.flops.raw_eta_max
    )
    with pytest.raises(ValueError, match="nope"):
        p.for_gpu("nope")


def test_bad_pooling_input_is_an_error():
    with pytest.raises(ValueError, match="tables: expected"):
        dk.calibrate_kernels_pooled({})
    with pytest.raises(ValueError, match="rows_per_gpu"):
        dk.calibrate_kernels_pooled({"h100-sxm": {}}, rows_per_gpu=0)
    with pytest.raises(ValueError, match="nope"):
        dk.calibrate_kernels_pooled({"nope": {}})


@pytest.mark.slow
def test_pooled_curves_beat_the_uncalibrated_roofline_on_a_pooled_gpu(tables):
    """The H100 tables as two GPUs (H100 and H200 specs): the pooled fit keeps each
    GPU's rows within the limit, says what it fitted, and H100's curves price its
    GEMMs better than the uncalibrated defaults."""
    said = []
    pooled = dk.calibrate_kernels_pooled(
        {"h100-sxm": tables, "h200": {k: t for k, t in tables.items() if k != "moe"}},
        rows_per_gpu=200,
        options=dk.FitOptions(adam_steps=150, lbfgs_steps=20),
        progress=said.append,
    )
    assert "calibrated gemm_bf16 on 400 kernels of 2 GPUs" in said
    assert "calibrated moe on 200 kernels of 1 GPUs" in said  # H200 has no MoE table
    assert "moe" not in pooled.offsets["h200"]
    assert pooled.rows["h100-sxm"]["gemm_bf16"] == 200
    assert pooled.offsets["h200"]["decode_attention"].shape == (4,)
    rows = dk.family_rows(tables, "gemm_bf16")
    work = dk.family_work("gemm_bf16", rows, hardware("h100-sxm"))
    y = rows["latency_us"].to_numpy(float)
    fitted = np.asarray(work.time_us(pooled.for_gpu("h100-sxm").gemm_bf16))
    default = np.asarray(
        work.time_us(dk.default_kernel_curves(portable=True).gemm_bf16)
    )
    assert dm.mape(y, fitted) < 0.7 * dm.mape(y, default)


@pytest.mark.slow
@needs_db
def test_curves_from_other_gpus_take_the_siblings_curves():
    """H200 is H100's sibling (its HBM alone differs), A100 is not: H100's families
    whose kernel H200 runs take curves pooled over H200 alone, and say so."""
    said = []
    curves = dk.curves_from_other_gpus(
        "h100_sxm",
        pool=["h200_sxm", "a100_sxm"],
        rows_per_gpu=40,
        options=dk.FitOptions(adam_steps=60, lbfgs_steps=5),
        progress=said.append,
    )
    assert "siblings of h100-sxm in the pool: ['h200']" in said
    assert "gemm_bf16: curves pooled over the siblings ['h200']" in said
    assert "mla: module curves pooled over the siblings ['h200']" in said
    assert curves.hardware == "h100-sxm"
    said_off = []
    dk.curves_from_other_gpus(
        "h100_sxm",
        pool=["a100_sxm"],
        rows_per_gpu=40,
        options=dk.FitOptions(adam_steps=60, lbfgs_steps=5),
        progress=said_off.append,
    )
    assert not any("sibling" in m for m in said_off)
