"""Curves files: exact JSON round trips, absolute and portable."""

import math

import equinox as eqx
import jax
import pytest

import diffmodel.kernels as dk
from diffmodel.kernels._curves import KernelCurves, default_kernel_curves
from diffmodel.kernels._curves_io import (
    curves_from_json,
    curves_to_json,
    load_curves,
    save_curves,
)


def test_json_round_trip_is_exact(tmp_path):
    curves = default_kernel_curves()
    curves = jax.tree.map(lambda x: x + 0.1234567890123, curves)
    path = save_curves(curves, tmp_path / "curves.json")
    back = load_curves(path)
    assert isinstance(back, KernelCurves) and back.hardware == curves.hardware
    for a, b in zip(jax.tree.leaves(curves), jax.tree.leaves(back), strict=True):
        assert float(a) == float(b)
    assert jax.tree.structure(curves) == jax.tree.structure(back)
    obj = curves_to_json(curves)
    assert obj["gemm_bf16"]["flops"]["physical"]["x_half_unit"] == "FLOP"
    assert "latency_us" in obj["decode_attention"]["physical"]
    assert "tuned_eta_max" in obj["moe"]["physical"]
    assert "raw_tuned" not in obj["gemm_bf16"].get("raw", {})
    assert obj["gemm_fp8"]["prologue"]["physical"]["x_half_unit"] == "byte"
    assert "prologue" not in obj["gemm_bf16"]
    assert {"row_ns", "kloop_ns"} <= set(obj["gemm_fp8"]["physical"])
    assert "kloop_ns" not in obj["gemm_bf16"].get("physical", {})
    assert obj["moe_w4a16"]["physical"]["ep_latency_us"] == pytest.approx(
        5.0 * math.exp(0.1234567890123)
    )
    assert "ep_latency_us" not in obj["moe"].get("physical", {})
    del obj["moe"]
    with pytest.raises(ValueError, match="missing key 'moe'"):
        curves_from_json(obj)


def test_portable_json_round_trip_is_exact(tmp_path):
    curves = default_kernel_curves("b200", portable=True)
    curves = type(curves)(
        **{f: getattr(curves, f) for f in dk.KERNEL_FAMILIES if f != "gemm_bf16"},
        gemm_bf16=dk.default_roofline_curves(portable=True, cache=True),
        allreduce=dk.default_allreduce_curve(portable=True, hop=True),
        hardware="b200",
    )
    back = curves_from_json(curves_to_json(curves))
    assert back.allreduce.log_hop_us is not None
    assert back.gemm_bf16.portable and back.gemm_bf16.cache is not None
    assert back.allreduce.portable
    for a, b in zip(jax.tree.leaves(curves), jax.tree.leaves(back), strict=True):
        assert float(a) == float(b)
    path = dk.save_curves(curves, tmp_path / "c.json")
    assert dk.load_curves(path).gemm_bf16.portable


@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("family", ["moe_fp8", "moe_w4a16", "moe_nvfp4"])
def test_files_from_before_a_family_was_added_load_it_uncalibrated(family, portable):
    """Curves files written before ``moe_fp8`` or ``moe_w4a16`` existed load with
    that family at its uncalibrated priors, portable as the file's MoE curves;
    every other family as written."""
    curves = jax.tree.map(lambda x: x + 0.25, default_kernel_curves(portable=portable))
    obj = curves_to_json(curves)
    del obj[family]
    back = curves_from_json(obj)
    prior = dk.init_curves(family, portable=portable)
    assert getattr(back, family).portable == portable
    for a, b in zip(
        jax.tree.leaves(getattr(back, family)), jax.tree.leaves(prior), strict=True
    ):
        assert float(a) == float(b)
    for a, b in zip(
        jax.tree.leaves(back.moe), jax.tree.leaves(curves.moe), strict=True
    ):
        assert float(a) == float(b)


def test_files_with_the_softplus_unit_cost_still_load():
    """Curves saved before the per-unit cost and the kernel floor became logs
    (``raw_unit_ns``, ``raw_latency``: softplus-inverses) load with the same
    times."""
    obj = curves_to_json(default_kernel_curves())
    raw = obj["decode_attention"]["raw"]
    del raw["log_unit_ns"], raw["log_latency_us"]
    raw["raw_unit_ns"] = 2.5  # softplus(2.5) = 2.5789... ns
    raw["raw_latency"] = -1.0  # softplus(-1) = 0.3133 us
    back = curves_from_json(obj)
    assert float(back.decode_attention.unit_ns) == pytest.approx(
        float(jax.nn.softplus(2.5)), rel=1e-12
    )
    assert float(back.decode_attention.latency_us) == pytest.approx(
        float(jax.nn.softplus(-1.0)), rel=1e-12
    )


def test_portable_curves_port_to_another_gpu_and_time_at_its_specs():
    from diffmodel import hardware
    from diffmodel.kernels._work import gemm_us

    curves = default_kernel_curves("h200", portable=True)
    ported = curves.ported_to("A100")
    assert ported.hardware == "a100-sxm-80gb"
    # The same efficiencies; the all-reduce's GPU exponent (the interconnect's)
    # stays behind.
    assert ported.allreduce.gpu_exponent is None
    assert jax.tree.leaves(ported) == jax.tree.leaves(
        eqx.tree_at(
            lambda c: c.allreduce.gpu_exponent,
            curves,
            None,
            is_leaf=lambda x: x is None,
        )
    )
    big = (4096.0, 8192.0, 8192.0)
    h200 = float(gemm_us(*big, ported.gemm_bf16, hardware("h200")))
    a100 = float(gemm_us(*big, ported.gemm_bf16, hardware("a100")))
    peak = float(
        hardware("h200").flops_16 / hardware("a100").flops_16
    )  # A100 is compute-bound
    assert a100 / h200 == pytest.approx(peak, rel=0.1)


def test_absolute_curves_refuse_to_port():
    with pytest.raises(ValueError, match="absolute sizes.*portable"):
        default_kernel_curves().ported_to("a100")
    with pytest.raises(ValueError, match="unknown hardware 'tpu'"):
        default_kernel_curves("h200", portable=True).ported_to("tpu")


def test_files_from_before_the_serial_k_terms_load_without_them():
    """FP8 curves saved before the per-row and main-loop times load with neither
    (the times they were fitted with)."""
    obj = curves_to_json(default_kernel_curves())
    raw = obj["gemm_fp8"]["raw"]
    del raw["log_row_ns"], raw["log_kloop_ns"]
    back = curves_from_json(obj)
    assert back.gemm_fp8.log_row_ns is None and back.gemm_fp8.log_kloop_ns is None
    assert float(back.gemm_fp8.row_ns) == 0.0 and float(back.gemm_fp8.kloop_ns) == 0.0


def test_curves_saved_before_the_expert_parallel_cost_load_without_it():
    """A curves file written before ``log_ep_latency_us`` existed loads with no
    expert-parallel cost (0 us), and one with it round-trips it exactly."""
    obj = curves_to_json(default_kernel_curves())
    kept = float(obj["moe_fp8"]["raw"]["log_ep_latency_us"])
    assert float(curves_from_json(obj).moe_fp8.log_ep_latency_us) == kept
    del obj["moe_fp8"]["raw"]["log_ep_latency_us"]
    back = curves_from_json(obj)
    assert back.moe_fp8.log_ep_latency_us is None
    assert float(back.moe_fp8.ep_latency_us) == 0.0
