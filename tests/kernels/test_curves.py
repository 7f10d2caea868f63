"""Efficiency curves: monotone and bounded, gradients, the tuned shift, the
prologue, and the portable form that carries curves across GPUs."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffmodel.kernels as dk
from diffmodel._model._hardware import Hardware, hardware
from diffmodel.kernels._calibrate import init_curves
from diffmodel.kernels._curves import (
    Occupancy,
    SaturationCurve,
    default_kernel_curves,
    default_roofline_curves,
)
from diffmodel.kernels._work import gemm_kernel_work

H100 = hardware("h100-sxm")


def test_curves_monotone_and_below_one():
    curves = default_kernel_curves()
    x = jnp.logspace(0, 16, 200)
    for fam in ("gemm_bf16", "decode_attention"):
        c = getattr(curves, fam)
        for curve in (c.flops, c.bandwidth):
            eta = curve(x)
            assert jnp.all(eta > 0) and jnp.all(eta <= 1)
            assert jnp.all(jnp.diff(eta) >= 0)
    # Even extreme raw values stay in (0, 1].
    wild = SaturationCurve(jnp.asarray(50.0), jnp.asarray(50.0), jnp.asarray(-50.0))
    assert float(wild(1e20)) <= 1.0
    # Time x / eta(x) never decreases with the work (slope <= 1).
    t = x / curves.gemm_bf16.flops(x)
    assert jnp.all(jnp.diff(t) >= 0)


@pytest.mark.slow
def test_gradient_matches_finite_differences():
    work = family_work_small()
    actual = jnp.asarray([3.0, 10.0, 50.0, 400.0])
    curves = init_curves("decode_attention")

    def loss(c):
        return jnp.mean((jnp.log(work.time_us(c)) - jnp.log(actual)) ** 2)

    grads = jax.grad(loss)(curves)
    for path in (
        lambda c: c.flops.log_half,
        lambda c: c.bandwidth.raw_eta_max,
        lambda c: c.occupancy.raw_slope,
        lambda c: c.log_latency_us,
        lambda c: c.log_unit_ns,
    ):
        h = 1e-6
        x0 = path(curves)
        up = loss(eqx.tree_at(path, curves, x0 + h))
        down = loss(eqx.tree_at(path, curves, x0 - h))
        np.testing.assert_allclose(path(grads), (up - down) / (2 * h), rtol=1e-5)


def family_work_small():
    from diffmodel.kernels._work import decode_attention_work

    return decode_attention_work(
        jnp.asarray([1.0, 8.0, 64.0, 256.0]),
        jnp.asarray([16.0, 1024.0, 4096.0, 32768.0]),
        8.0,
        1.0,
        128.0,
        H100,
    )


def test_tuned_shift_raises_compute_efficiency_only():
    c = default_roofline_curves(tuned=True)
    c = eqx.tree_at(lambda c: c.raw_tuned, c, jnp.asarray(2.0))
    f, b, u = jnp.asarray([1e9, 1e12]), jnp.asarray([4e6, 4e9]), jnp.asarray([64.0])
    plain_f, plain_b = c.efficiencies(f, b, u)
    fast_f, fast_b = c.efficiencies(f, b, u, jnp.asarray([1.0, 1.0]))
    # Saturated efficiency sigmoid(logit(0.8) + 2), occupancy 1/2 at 64 units.
    eta_max = 1 / (1 + np.exp(-(np.log(0.8 / 0.2) + 2.0)))
    want = eta_max / (1 + np.exp(-0.8 * (np.log(f) - np.log(1e9)))) * 0.5
    np.testing.assert_allclose(fast_f, want, rtol=1e-12)
    assert jnp.all(fast_f > plain_f) and jnp.all(fast_f < 1.0)
    np.testing.assert_array_equal(fast_b, plain_b)
    # tuned = 0 or None is the plain curve, bit for bit.
    np.testing.assert_array_equal(c.efficiencies(f, b, u, jnp.zeros(2))[0], plain_f)
    assert default_roofline_curves().tuned_logit == 0.0


def test_physical_constructor_checks():
    with pytest.raises(ValueError, match="eta_max"):
        SaturationCurve.from_physical(eta_max=1.5, slope=0.5, x_half=1.0, unit="B")
    c = SaturationCurve.from_physical(eta_max=0.8, slope=0.5, x_half=1e6, unit="B")
    np.testing.assert_allclose(c(1e6), 0.4)


def test_prologue_curve_sets_the_quantization_pass_efficiency():
    curves = default_roofline_curves(prologue=True)
    w = gemm_kernel_work(
        jnp.array([1.0, 1024.0]), 64.0, 65536.0, H100, 1.0, 2.0, act_quant=1.0
    )
    base = gemm_kernel_work(jnp.array([1.0, 1024.0]), 64.0, 65536.0, H100, 1.0, 2.0)
    eta = curves.prologue(w.pre_bytes)
    assert bool(jnp.all((eta > 0) & (eta < 1)))
    want = w.pre_bytes / (H100.hbm_bw * eta) * 1e6
    got = w.time_us(curves) - base.time_us(curves)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-9)
    # more bytes: a higher efficiency but a longer pass (monotone time)
    assert float(eta[1]) > float(eta[0]) and float(got[1]) > float(got[0])


# ---------------------------------------------------------------------- portable form


def _gemm_batch(hw):
    m = jnp.array([1.0, 16.0, 256.0, 4096.0])
    return gemm_kernel_work(m, 4096.0, 4096.0, hw)


def test_portable_is_a_reparameterisation_on_one_gpu():
    """Absolute curves with x_half = (portable x_half) x peak x 1 us, u_half = (waves)
    x SMs give the same times."""
    port = dk.default_roofline_curves(latency=False, portable=True)
    peak, bw, sms = float(H100.flops_16), float(H100.hbm_bw), float(H100.sm_count)
    absolute = type(port)(
        flops=SaturationCurve(
            port.flops.raw_eta_max,
            port.flops.raw_slope,
            port.flops.log_half + math.log(peak * 1e-6),
        ),
        bandwidth=SaturationCurve(
            port.bandwidth.raw_eta_max,
            port.bandwidth.raw_slope,
            port.bandwidth.log_half + math.log(bw * 1e-6),
            unit="byte",
        ),
        occupancy=Occupancy(
            port.occupancy.raw_slope, port.occupancy.log_half + math.log(sms)
        ),
    )
    work = _gemm_batch(H100)
    np.testing.assert_allclose(work.time_us(port), work.time_us(absolute), rtol=1e-12)


def test_portable_curves_transfer_by_specs():
    """The same work on a GPU twice as fast everywhere (peaks, bandwidth, SMs) takes
    half the time under portable curves without a floor."""
    fast = Hardware(
        flops_16=2 * H100.flops_16,
        hbm_bw=2 * H100.hbm_bw,
        link_bw=H100.link_bw,
        sm_count=2 * H100.sm_count,
        l2_bytes=2 * H100.l2_bytes,
    )
    curves = dk.default_roofline_curves(latency=False, portable=True, cache=True)
    t_slow = _gemm_batch(H100).time_us(curves)
    # Twice the work in every size on the fast GPU: the same portable sizes.
    m = jnp.array([1.0, 16.0, 256.0, 4096.0])
    w2 = gemm_kernel_work(m, 4096.0, 4096.0, fast)
    w2 = type(w2)(
        flops=w2.flops * 2,
        bytes=w2.bytes * 2,
        peak_flops=w2.peak_flops,
        bandwidth=w2.bandwidth,
        units=w2.units * 2,
        sms=w2.sms,
        l2=w2.l2,
    )
    np.testing.assert_allclose(w2.time_us(curves), t_slow, rtol=1e-12)


def test_cache_lowers_memory_time_below_l2_only():
    port = dk.default_roofline_curves(latency=False, portable=True)
    cached = dk.default_roofline_curves(latency=False, portable=True, cache=True)
    small = gemm_kernel_work(1.0, 1024.0, 1024.0, H100)  # 2 MB of weights: in L2
    huge = gemm_kernel_work(1.0, 65536.0, 16384.0, H100)  # 2 GB: from HBM
    assert float(small.time_us(cached)) < float(small.time_us(port))
    np.testing.assert_allclose(huge.time_us(cached), huge.time_us(port), rtol=0.1)
    with pytest.raises(ValueError, match="portable"):
        dk.default_roofline_curves(cache=True)


def test_portable_gradient_matches_finite_differences_and_jit():
    work = _gemm_batch(H100)
    curves = dk.default_roofline_curves(latency=True, portable=True, cache=True)

    def total(log_half):
        c = dk.shifted(curves, jnp.zeros(4))
        c = type(c)(
            flops=SaturationCurve(c.flops.raw_eta_max, c.flops.raw_slope, log_half),
            bandwidth=c.bandwidth,
            occupancy=c.occupancy,
            log_latency_us=c.log_latency_us,
            log_unit_ns=c.log_unit_ns,
            cache=c.cache,
            portable=True,
        )
        return jnp.sum(jnp.log(work.time_us(c)))

    x0 = curves.flops.log_half
    g = jax.grad(total)(x0)
    h = 1e-6
    fd = (total(x0 + h) - total(x0 - h)) / (2 * h)
    np.testing.assert_allclose(g, fd, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(total)(x0), total(x0), rtol=1e-12)
    eta_f, eta_b = curves.efficiencies(1e3, 1e3, 1e3)
    assert float(eta_f) < 1.0 and float(eta_b) < 1.0
