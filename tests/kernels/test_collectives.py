"""NCCL collectives on the all-reduce curve (``collective_kernel_us``): by hand for
each operation, the all-reduce as a special case, jit and gradient, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffmodel.kernels as dk
from diffmodel._model._hardware import hardware
from tests.helpers import check_scalar_grad

H200 = hardware("h200")
CURVE = dk.default_allreduce_curve(portable=True, hop=True, gpu_exponent=False)


@pytest.mark.parametrize(
    ("op", "share"),
    [
        ("all_reduce", 2.0),
        ("all_gather", 1.0),
        ("reduce_scatter", 1.0),
        ("alltoall", 1.0),
    ],
)
@pytest.mark.parametrize("n", [2.0, 8.0])
def test_each_collective_by_hand(op, share, n):
    b = 3e6  # bytes of the full buffer
    x = b / float(H200.link_bw) * 1e6  # its time on the link at full bandwidth, us
    lat = float(CURVE.latency_us) + (n - 1) * float(CURVE.hop_us)
    want = lat + share * (n - 1) / n * x / float(CURVE.bandwidth(x))
    got = float(dk.collective_kernel_us(op, b, n, CURVE, H200.link_bw))
    assert got == pytest.approx(want, rel=1e-10)
    # A pair: a fixed efficiency and latency, no hop term.
    pair = float(dk.collective_kernel_us(op, b, n, (0.5, 7.0), H200.link_bw))
    assert pair == pytest.approx(7.0 + share * (n - 1) / n * x / 0.5, rel=1e-10)
    assert float(dk.collective_kernel_us(op, b, 1.0, CURVE, H200.link_bw)) == 0.0


def test_the_all_reduce_kernel_is_the_all_reduce_collective():
    b, n = np.array([1e4, 1e6, 1e9]), np.array([2.0, 4.0, 8.0])
    np.testing.assert_array_equal(
        dk.allreduce_kernel_us(b, n, CURVE, H200),
        dk.collective_kernel_us("all_reduce", b, n, CURVE, H200.link_bw),
    )


def test_jit_and_gradient_in_the_bytes():
    def t(b):
        return dk.collective_kernel_us("alltoall", b, 4.0, CURVE, H200.link_bw)

    np.testing.assert_allclose(jax.jit(t)(2e6), t(2e6), rtol=1e-6)
    check_scalar_grad(lambda b: t(b), jnp.asarray(2e6))


def test_an_unknown_collective_is_named():
    with pytest.raises(ValueError, match="op must be one of.*'broadcast'"):
        dk.collective_kernel_us("broadcast", 1e6, 2.0, CURVE, H200.link_bw)


def test_the_gpu_exponent_applies_where_the_fabric_is_shared():
    """``(n/2)^gamma`` on the transfer of the rows with ``shared_fabric`` 1, none on
    those with 0 (own links: the ring alone)."""
    import equinox as eqx

    curve = eqx.tree_at(
        lambda c: c.gpu_exponent,
        dk.default_allreduce_curve(portable=True),
        jnp.asarray(1.0),
    )
    b, n = 64e6, 8.0
    ring = dk.collective_kernel_us("all_gather", b, n, curve, H200.link_bw)
    flat = eqx.tree_at(lambda c: c.gpu_exponent, curve, jnp.asarray(0.0))
    own = dk.collective_kernel_us("all_gather", b, n, flat, H200.link_bw)
    got = dk.collective_kernel_us(
        "all_gather", np.full(2, b), n, curve, H200.link_bw, shared_fabric=np.eye(2)[0]
    )
    lat = float(curve.latency_us)
    assert float(got[0]) == pytest.approx(float(ring), rel=1e-10)
    assert float(got[1]) == pytest.approx(float(own), rel=1e-10)
    assert float(ring) - lat == pytest.approx((float(own) - lat) * n / 2, rel=1e-10)
