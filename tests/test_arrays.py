"""Host values onto the device: the same arrays as ``jnp``, without compiles."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffmodel as dm
from diffmodel._arrays import device_array, on_host


@pytest.mark.parametrize(
    "value, dtype",
    [(2, float), (2.5, None), (np.arange(3), None), (np.ones(3), float), (7, None)],
)
def test_device_array_equals_jnp_asarray(value, dtype):
    ours = device_array(value, dtype)
    ref = jnp.asarray(value, jnp.result_type(float) if dtype is float else dtype)
    assert isinstance(ours, jax.Array)
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    np.testing.assert_array_equal(ours, ref)


def test_traced_values_take_the_jnp_path():
    seen = []

    @jax.jit
    def f(x):
        seen.append(on_host(x))
        return device_array(x, float) * 2

    np.testing.assert_allclose(f(3.0), 6.0)
    assert seen == [False] and on_host(np.ones(2), 1.0)


def test_host_values_compile_nothing():
    value = np.ones((13, 17)) + 0.25  # a shape no other test converts
    with jax.log_compiles(True):
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        logger = logging.getLogger("jax")
        logger.addHandler(handler)
        try:
            device_array(value)
            ref = len(records)
            jnp.asarray(value)  # the control: jnp.asarray of a host array compiles
        finally:
            logger.removeHandler(handler)
    assert ref == 0 and len(records) > 0


def test_stacked_deployments_equal_on_host_and_traced():
    deps = [
        dm.deployment("llama-2-7b", "h100-sxm", 1),
        dm.deployment("llama-2-70b", "a100-sxm-80gb", 4),
    ]
    host = dm.stack_deployments(deps)
    traced = jax.jit(lambda a, b: dm.stack_deployments([a, b]))(*deps)
    for x, y in zip(jax.tree.leaves(host), jax.tree.leaves(traced), strict=True):
        assert isinstance(x, jax.Array) and x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)
