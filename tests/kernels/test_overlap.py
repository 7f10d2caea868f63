"""The fitted sharpness of the compute/memory maximum (``RooflineCurves.log_overlap``):
the time by hand, its limits, gradients, the curves file, and which families fit it;
and ``power_max`` where both sides vanish."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffmodel.kernels as dk
from diffmodel._model._hardware import hardware
from diffmodel._model._physics import SHARPNESS, power_max
from diffmodel.kernels._curves import OVERLAP_FAMILIES
from diffmodel.kernels._curves_io import curves_from_json, curves_to_json
from diffmodel.kernels._work import gemm_kernel_work

from ..helpers import assert_grad_matches_fd

H100 = hardware("h100-sxm")


def _plain(q=None):
    """Curves without floor or occupancy (constant efficiencies in effect), with a
    fitted sharpness ``q`` or the fixed one (``None``)."""
    c = dk.default_roofline_curves(
        occupancy=False, latency=False, overlap=q is not None
    )
    if q is not None:
        c = eqx.tree_at(lambda c: c.log_overlap, c, jnp.log(jnp.asarray(q - 1.0)))
    return c


def test_sharpness_times_the_maximum_by_hand():
    # A GEMM near H100's ridge point; with the curves' efficiencies eta_f, eta_b the
    # two sides are t_c = f / (peak eta_f), t_m = b / (bw eta_b), us.
    w = gemm_kernel_work(2048.0, 4096.0, 512.0, H100)
    eta_f, eta_b = _plain().efficiencies(w.flops, w.bytes)
    t_c = float(w.flops / w.peak_flops * 1e6 / eta_f)
    t_m = float(w.bytes / w.bandwidth * 1e6 / eta_b)
    for q in (1.0 + 1e-9, 1.5, 4.0, 12.0):
        want = (t_c**q + t_m**q) ** (1.0 / q)
        assert float(w.time_us(_plain(q))) == pytest.approx(want, rel=1e-9)
    # q = 4 is the fixed sharpness: the same time as curves without the parameter.
    assert SHARPNESS == 4.0
    assert float(w.time_us(_plain(4.0))) == pytest.approx(float(w.time_us(_plain())))
    # q -> 1: the sum; large q: the maximum.
    assert float(w.time_us(_plain(1.0 + 1e-9))) == pytest.approx(t_c + t_m, rel=1e-6)
    assert float(w.time_us(_plain(200.0))) == pytest.approx(max(t_c, t_m), rel=1e-2)


def test_gradient_in_the_sharpness_matches_finite_differences():
    w = gemm_kernel_work(jnp.array([8.0, 2048.0, 8192.0]), 4096.0, 512.0, H100)
    base = _plain(3.0)

    def total(v):
        c = eqx.tree_at(lambda c: c.log_overlap, base, v[0])
        return jnp.sum(jnp.log(w.time_us(c)))

    assert_grad_matches_fd(total, np.array([0.4]), rtol=1e-6)


def test_power_max_is_zero_with_finite_gradients_where_both_sides_vanish():
    assert float(power_max(0.0, 0.0, 2.5)) == 0.0
    g = jax.grad(lambda a, b, p: power_max(a, b, p), argnums=(0, 1, 2))(0.0, 0.0, 2.5)
    assert all(np.isfinite(float(x)) for x in g)
    assert np.isnan(float(power_max(jnp.nan, 1.0, 2.0)))
    assert float(power_max(3.0, 4.0, 2.0)) == pytest.approx(5.0)


def test_the_curves_file_keeps_the_sharpness_and_older_files_keep_four():
    curves = dk.default_kernel_curves(portable=True)
    assert curves.prefill_attention.log_overlap is not None
    back = curves_from_json(curves_to_json(curves))
    assert float(back.prefill_attention.overlap) == pytest.approx(SHARPNESS)
    obj = curves_to_json(curves)
    phys = obj["prefill_attention"]["physical"]
    assert phys["overlap_q"] == pytest.approx(4.0)
    del obj["prefill_attention"]["raw"]["log_overlap"]
    assert curves_from_json(obj).prefill_attention.log_overlap is None


def test_families_that_fit_the_sharpness():
    for fam in dk.KERNEL_FAMILIES:
        fitted = dk.init_curves(fam).log_overlap is not None
        assert fitted == (fam in OVERLAP_FAMILIES), fam
    assert "decode_attention" not in OVERLAP_FAMILIES
    assert "gemm_bf16" not in OVERLAP_FAMILIES  # chosen on the traces' training rows
