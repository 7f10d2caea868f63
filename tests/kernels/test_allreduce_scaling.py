"""The all-reduce's scaling with the GPU count beyond the ring (``gpu_exponent``): by
hand, its gradient, and the curves file with and without it."""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import diffmodel.kernels as dk
from diffmodel._model._hardware import hardware
from diffmodel.kernels._curves_io import curves_from_json, curves_to_json
from diffmodel.kernels._work import allreduce_kernel_us

L40S = hardware("l40s")


def _curve(gamma):
    c = dk.default_allreduce_curve(portable=True)
    return eqx.tree_at(lambda c: c.gpu_exponent, c, jnp.asarray(gamma))


@pytest.mark.parametrize("n", [2.0, 4.0, 8.0])
def test_transfer_scales_by_n_over_2_to_the_gamma_by_hand(n):
    b = 64e6
    flat = _curve(0.0)
    x = b / float(L40S.link_bw) * 1e6  # us on the link
    ring = 2 * (n - 1) / n * x / float(flat.bandwidth(x))
    lat = float(flat.latency_us)
    assert float(allreduce_kernel_us(b, n, flat, L40S)) == pytest.approx(
        lat + ring, rel=1e-10
    )
    shared = _curve(1.0)  # one fabric for all: the transfer grows with n
    got = float(allreduce_kernel_us(b, n, shared, L40S))
    assert got == pytest.approx(lat + ring * n / 2, rel=1e-10)
    # Without the exponent (curves saved before it): the ring alone.
    none = eqx.tree_at(
        lambda c: c.gpu_exponent, flat, None, is_leaf=lambda x: x is None
    )
    assert float(allreduce_kernel_us(b, n, none, L40S)) == pytest.approx(
        lat + ring, rel=1e-10
    )
    assert float(allreduce_kernel_us(b, 1.0, shared, L40S)) == 0.0  # one GPU


def test_gradient_in_the_exponent_matches_finite_differences():
    def t(g):
        return jnp.log(allreduce_kernel_us(8e6, 8.0, _curve(g), L40S))

    g0, h = 0.4, 1e-6
    fd = (t(g0 + h) - t(g0 - h)) / (2 * h)
    assert float(jax.grad(t)(g0)) == pytest.approx(float(fd), rel=1e-6)
    assert float(jax.grad(t)(g0)) > 0  # at 8 GPUs a larger exponent is slower


def test_curves_file_keeps_the_exponent_and_loads_files_without_it():
    obj = curves_to_json(dk.default_kernel_curves(portable=True))
    assert obj["allreduce"]["physical"]["gpu_exponent"] == 0.0
    obj["allreduce"]["raw"]["gpu_exponent"] = 0.7
    assert float(curves_from_json(obj).allreduce.gpu_exponent) == 0.7
    del obj["allreduce"]["raw"]["gpu_exponent"]
    assert curves_from_json(obj).allreduce.gpu_exponent is None


def test_the_exponent_stays_with_its_interconnect():
    """Ported to another GPU, or pooled over GPUs on different fabrics, the
    all-reduce is the plain ring."""
    from diffmodel.kernels._pooled_calibrate import _init

    curves = dk.default_kernel_curves("l40s", portable=True)
    curves = eqx.tree_at(lambda c: c.allreduce.gpu_exponent, curves, jnp.asarray(1.5))
    assert curves.ported_to("h100-sxm").allreduce.gpu_exponent is None
    assert float(curves.ported_to("l40s").allreduce.gpu_exponent) == 1.5
    assert _init("allreduce").gpu_exponent is None
