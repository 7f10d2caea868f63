"""The softmax's exponentials on the special-function units: the GPU's rate, prefill
attention's count, the overlapped compute time by hand and in its limits, gradients,
refusals and the curves file."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffmodel.kernels as dk
from diffmodel._model._hardware import EXP_PER_SM_CLOCK, hardware
from diffmodel._model._physics import smooth_max
from diffmodel.kernels._curves import EXP_FAMILIES
from diffmodel.kernels._curves_io import curves_from_json, curves_to_json
from diffmodel.kernels._work import _work, causal_tile_pairs, prefill_attention_work

H100 = hardware("h100-sxm")
B200 = hardware("b200")


def _with(curves, eta, p):
    """``curves`` with the exponential term at efficiency ``eta`` and overlap ``p``."""
    return eqx.tree_at(
        lambda c: (c.raw_exp_eta, c.log_exp_overlap),
        curves,
        (jnp.log(eta / (1 - eta)), jnp.log(p - 1.0)),
        is_leaf=lambda x: x is None,
    )


def _without(curves):
    return eqx.tree_at(
        lambda c: (c.raw_exp_eta, c.log_exp_overlap),
        curves,
        (None, None),
        is_leaf=lambda x: x is None,
    )


def test_exp_rate_is_sms_times_clock_times_16():
    assert EXP_PER_SM_CLOCK == 16.0
    assert float(H100.exp_rate) == pytest.approx(132 * 1.98e9 * 16, rel=1e-12)
    assert float(B200.exp_rate) == pytest.approx(148 * 1.965e9 * 16, rel=1e-12)
    assert dataclasses.replace(H100, clock_ghz=None).exp_rate is None


def test_prefill_attention_counts_one_exponential_per_score_element():
    # 2 sequences of 1000 tokens, 32 query heads over 8 KV heads, dh 128.
    w = prefill_attention_work(2.0, 1000.0, 32.0, 8.0, 128.0, H100)
    pairs, _ = causal_tile_pairs(1000.0, 4.0)
    assert float(w.exps) == pytest.approx(2 * float(pairs) / 4 * 32, rel=1e-12)
    assert float(w.exps) == pytest.approx(float(w.flops) / (4 * 128), rel=1e-12)
    assert float(w.exp_rate) == pytest.approx(float(H100.exp_rate), rel=1e-12)
    assert "prefill_attention" in EXP_FAMILIES
    assert dk.init_curves("prefill_attention").raw_exp_eta is not None
    assert dk.init_curves("decode_attention").raw_exp_eta is None


@pytest.mark.parametrize("portable", [False, True])
def test_compute_time_is_the_p_norm_of_tensor_and_exp_time_by_hand(portable):
    w = prefill_attention_work(4.0, 2048.0, 32.0, 8.0, 64.0, B200)
    base = dk.init_curves("prefill_attention", portable=portable)
    curves = _with(base, 0.6, 2.0)
    f, b, u = w.flops, w.bytes, w.units
    if portable:
        f, b, u = f / w.peak_flops * 1e6, b / w.bandwidth * 1e6, u / w.sms
    eta_f, eta_b = curves.efficiencies(f, b, u)
    occ = curves.occupancy(u)
    t_mm = w.flops / w.peak_flops * 1e6 / eta_f
    t_exp = w.exps / (148 * 1.965e9 * 16) * 1e6 / (0.6 * occ)
    t_mem = w.bytes / w.bandwidth * 1e6 / eta_b
    floor = curves.latency_us + u * curves.unit_ns * 1e-3
    want = floor + smooth_max(jnp.sqrt(t_mm**2 + t_exp**2), t_mem)
    assert float(w.time_us(curves)) == pytest.approx(float(want), rel=1e-10)
    # dh 64 on B200: the exponentials take longer than the matmuls at these rates.
    assert float(t_exp) > float(t_mm)


def test_overlap_limits_sum_and_max():
    w = prefill_attention_work(1.0, 4096.0, 64.0, 8.0, 128.0, H100)
    base = dk.init_curves("prefill_attention")
    plain = float(w.time_us(_without(base)))
    serial = float(w.time_us(_with(base, 0.5, 1.0 + 1e-9)))
    hidden = float(w.time_us(_with(base, 0.5, 200.0)))
    # p = 1: the exponentials add their time; p -> inf: the longer of the two.
    assert serial > hidden >= plain
    assert hidden == pytest.approx(plain, rel=1e-6)  # tensor time is the longer here
    # Work without exponentials (or curves without the term) is timed as before.
    no_exp = eqx.tree_at(lambda x: x.exps, w, None, is_leaf=lambda x: x is None)
    assert float(no_exp.time_us(_with(base, 0.5, 1.5))) == plain


def test_gradients_match_finite_differences_and_stay_finite_without_work():
    base = dk.init_curves("prefill_attention", portable=True)
    w = prefill_attention_work(
        jnp.array([1.0, 3.0, 0.0]), jnp.array([512.0, 8192.0, 0.0]), 32.0, 8.0, 128.0,
        B200,
    )  # fmt: skip

    def total(raw):
        c = eqx.tree_at(lambda c: (c.raw_exp_eta, c.log_exp_overlap), base, raw)
        t = w.time_us(c)
        return jnp.sum(jnp.where(w.flops > 0, jnp.log(t), 0.0))

    x = (jnp.asarray(0.3), jnp.asarray(0.2))
    g = jax.grad(total)(x)
    assert all(np.isfinite(float(v)) for v in g)
    for i in range(2):
        h = 1e-6
        up = tuple(v + h if j == i else v for j, v in enumerate(x))
        dn = tuple(v - h if j == i else v for j, v in enumerate(x))
        fd = (total(up) - total(dn)) / (2 * h)
        assert float(g[i]) == pytest.approx(float(fd), rel=1e-5, abs=1e-9)
    assert float(g[0]) < 0  # a faster exponential unit, a shorter kernel


def test_the_term_refuses_work_without_the_exp_rate():
    hw = dataclasses.replace(H100, clock_ghz=None)
    w = prefill_attention_work(1.0, 1024.0, 32.0, 8.0, 128.0, hw)
    assert w.exp_rate is None
    with pytest.raises(ValueError, match="exponential rate"):
        w.time_us(dk.init_curves("prefill_attention"))
    # Constant efficiencies (the uncalibrated roofline) need no rate.
    assert float(w.time_us((0.5, 0.5))) > 0
    assert _work(1.0, 1.0, 1.0, hw).exps is None


def test_curves_file_round_trip_and_files_from_before_the_term():
    curves = dk.default_kernel_curves(portable=True)
    obj = curves_to_json(curves)
    pf = obj["prefill_attention"]
    assert pf["physical"]["exp_eta"] == pytest.approx(0.7)
    assert pf["physical"]["exp_overlap_p"] == pytest.approx(2.0)
    back = curves_from_json(obj)
    assert float(back.prefill_attention.raw_exp_eta) == float(
        curves.prefill_attention.raw_exp_eta
    )
    del pf["raw"]["raw_exp_eta"], pf["raw"]["log_exp_overlap"]
    old = curves_from_json(obj).prefill_attention
    assert old.raw_exp_eta is None and old.log_exp_overlap is None
