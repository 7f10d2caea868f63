"""The host model: hand values, the regime gate, the iteration composition,
gradients against finite differences, jit/vmap, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffmodel as dm
from diffmodel._model._host import (
    HOST_NAMES,
    HostFactors,
    eager_launches,
    host_time,
    iteration_us,
    kernels_per_layer,
)
from diffmodel._model._physics import smooth_max

HOST = HostFactors(
    schedule_us=50.0,
    prepare_us=4.0,
    replay_us=20.0,
    launch_us=5.0,
    eager_request_us=30.0,
    graph_limit=48.0,
    gate_width=2.0,
)


def decode(n, kv_per_request=1000.0):
    n = jnp.asarray(n, float)
    zero = jnp.zeros_like(n)
    return dm.from_aggregates(
        prefill_tokens=zero,
        decode_tokens=n,
        num_prefill=zero,
        num_decode=n,
        kv_tokens=n * kv_per_request,
    )


def test_kernels_per_layer_dense_moe_and_tp():
    llama = dm.deployment("llama-2-70b", "h100-sxm", 4)
    # 7 attention-block kernels + 3 dense MLP + 2 all-reduces.
    assert float(kernels_per_layer(llama.arch, 4)) == 12.0
    assert float(kernels_per_layer(llama.arch, 1)) == 10.0
    assert float(eager_launches(llama.arch, 4)) == 80 * 12 + 8
    mixtral = dm.deployment("mixtral-8x7b", "h100-sxm", 2)
    # 7 attention + 7 routed-expert kernels + 2 all-reduces, no dense MLP.
    assert float(kernels_per_layer(mixtral.arch, 2)) == 16.0


def test_host_time_hand_values_in_both_regimes():
    arch = dm.deployment("llama-2-70b", "h100-sxm", 4).arch
    small = host_time(decode(8.0), arch, 4, HOST)  # 20 widths below the limit
    g = float(small.gate)
    assert g < 1e-8
    eager_small = 5 * (80 * 12 + 8) + 30 * 8
    want = 50 + 4 * 8 + (1 - g) * 20 + g * eager_small
    assert float(small.timed) == pytest.approx(want, rel=1e-12)
    assert float(small.timed) == pytest.approx(50 + 4 * 8 + 20, rel=1e-6)
    big = host_time(decode(128.0), arch, 4, HOST)
    assert float(big.gate) == pytest.approx(1.0, abs=1e-12)
    expected = 50 + 4 * 128 + 5 * (80 * 12 + 8) + 30 * 128
    assert float(big.timed) == pytest.approx(expected, rel=1e-7)
    at = host_time(decode(48.0), arch, 4, HOST)
    assert float(at.gate) == pytest.approx(0.5)
    eager = 5 * (80 * 12 + 8) + 30 * 48
    assert float(at.timed) == pytest.approx(50 + 4 * 48 + 0.5 * (20 + eager))


def test_gate_on_kv_tokens_reads_thousands_of_decode_tokens():
    arch = dm.deployment("llama-2-70b", "h100-sxm", 4).arch
    host = HostFactors(**{**HOST.as_dict(), "graph_limit": 30.0})
    # 40 requests x 750 = 30,000 KV tokens: exactly at the limit.
    out = host_time(decode(40.0, 750.0), arch, 4, host, gate_on="kv_tokens")
    assert float(out.gate) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="gate_on"):
        host_time(decode(40.0), arch, 4, host, gate_on="tokens")


def test_timer_rises_with_the_batch():
    arch = dm.deployment("codellama-34b", "h100-sxm", 2).arch
    n = jnp.arange(1.0, 129.0)
    timed = host_time(decode(n), arch, 2, HOST).timed
    assert bool(jnp.all(jnp.diff(timed) > 0))


def test_iteration_is_smooth_max_of_gpu_and_host_plus_overhead():
    dep = dm.deployment("llama-2-70b", "h100-sxm", 4)
    stats = decode(64.0)
    device = dm.step_time(stats, dep, dm.Factors())
    gpu = device.total - device.overhead
    for host_us in (1.0, float(gpu), 3 * float(gpu)):
        got = iteration_us(device, jnp.asarray(host_us))
        want = smooth_max(gpu, host_us) + device.overhead
        assert float(got) == pytest.approx(float(want), rel=1e-12)
    # A host far below the GPU leaves the roofline's total (almost) unchanged.
    near = iteration_us(device, 0.2 * gpu)
    assert float(near) == pytest.approx(float(device.total), rel=1e-3)


def test_gradient_matches_finite_differences():
    arch = dm.deployment("llama-2-70b", "h100-sxm", 4).arch
    stats = decode(jnp.asarray([30.0, 46.0, 49.0, 90.0]))

    def loss(values):
        host = HostFactors(**dict(zip(HOST_NAMES, values, strict=True)))
        return jnp.sum(jnp.log(host_time(stats, arch, 4, host).timed))

    x = jnp.stack([HOST.as_dict()[n] for n in HOST_NAMES])
    grad = jax.grad(loss)(x)
    eps = 1e-5
    for i in range(len(HOST_NAMES)):
        step = jnp.zeros_like(x).at[i].set(eps * jnp.maximum(1.0, jnp.abs(x[i])))
        fd = (loss(x + step) - loss(x - step)) / (2 * step[i])
        assert float(grad[i]) == pytest.approx(float(fd), rel=1e-5, abs=1e-9)


def test_jit_and_vmap_match_eager():
    arch = dm.deployment("llama-2-70b", "h100-sxm", 4).arch
    n = jnp.asarray([4.0, 40.0, 47.5, 60.0, 120.0])

    def one(k):
        return host_time(decode(k), arch, 4, HOST).timed

    eager = one(n)
    np.testing.assert_allclose(jax.jit(one)(n), eager, rtol=1e-12)
    np.testing.assert_allclose(jax.vmap(one)(n), eager, rtol=1e-12)
    loop = np.array([float(one(k)) for k in n])
    np.testing.assert_allclose(eager, loop, rtol=1e-12)


def test_host_factors_reject_unknown_names():
    with pytest.raises(ValueError, match="unknown host factor"):
        HostFactors(launch=5.0)
