"""Pooled fits across GPUs: fold weights, per-GPU shifts, recovery of shared curves."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffmodel as dm
import diffmodel.kernels as dk
from diffmodel._model._hardware import Hardware, hardware
from diffmodel.kernels._pooled import fold_weights
from diffmodel.kernels._work import gemm_kernel_work

H100 = hardware("h100-sxm")


def test_fold_weights_count_each_gpu_once():
    gpu = np.array([0, 0, 0, 1, 2, 2])
    train = np.array([[True] * 6, [False, False, False, True, True, True]])
    w = np.asarray(fold_weights(train, gpu, 3))
    np.testing.assert_allclose(w[0], [1 / 9] * 3 + [1 / 3] + [1 / 6] * 2)
    np.testing.assert_allclose(w[1], [0, 0, 0, 1 / 2, 1 / 4, 1 / 4])
    with pytest.raises(ValueError, match="no training rows"):
        fold_weights(np.zeros((1, 6), bool), gpu, 3)


def test_shifted_moves_only_eta_max_latency_and_unit_cost():
    c = dk.default_roofline_curves(latency=True)
    s = dk.shifted(c, jnp.array([0.5, -0.25, 1.0, np.log(3.0)]))
    np.testing.assert_allclose(s.flops.raw_eta_max - c.flops.raw_eta_max, 0.5)
    np.testing.assert_allclose(s.bandwidth.raw_eta_max - c.bandwidth.raw_eta_max, -0.25)
    np.testing.assert_allclose(s.latency_us / c.latency_us, np.e)  # a factor
    np.testing.assert_allclose(s.unit_ns / c.unit_ns, 3.0)  # a factor on the cost
    assert float(s.flops.log_half) == float(c.flops.log_half)


@pytest.mark.slow
def test_pooled_fit_recovers_shared_curves_from_two_gpus():
    """Times drawn from known portable curves on two GPUs (one 20% less efficient):
    leaving each out, the pooled fit on the other predicts it within the gap."""
    true = dk.default_roofline_curves(latency=False, portable=True)
    hw_b = Hardware(
        flops_16=2.25e15, hbm_bw=7.7e12, link_bw=9e11, sm_count=148, l2_bytes=1e8
    )
    m = jnp.geomspace(1.0, 8192.0, 24)
    works = [gemm_kernel_work(m, 4096.0, 4096.0, hw) for hw in (H100, hw_b)]
    ys = [works[0].time_us(true), works[1].time_us(true)]
    work = jax.tree.map(lambda *x: jnp.concatenate(x), *works)
    y = np.concatenate(ys)
    gpu = np.repeat([0, 1], len(m))
    curves, off = dk.fit_folds(
        work.time_us,
        y,
        np.stack([gpu == 1, gpu == 0]),
        gpu,
        dk.default_roofline_curves(latency=False, portable=True),
        n_gpus=2,
        options=dk.FitOptions(adam_steps=200, lbfgs_steps=50),
    )
    for f, held in enumerate((0, 1)):
        pred = np.asarray(work.time_us(dk.fold(curves, f)))[gpu == held]
        assert dm.mape(y[gpu == held], pred) < 1.0
    assert off.shape == (2, 2, 4)
