"""The test helpers and the suite's strict settings are themselves working."""

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest

import diffmodel as dm

from helpers import (
    assert_grad_matches_fd,
    cast_floats,
    finite_difference_grad,
    tols,
    tree_allclose,
    unchecked,
)


def test_tols_per_dtype():
    r32, a32 = tols(jnp.float32)
    r64, a64 = tols(np.float64)
    assert r64 < r32 and a64 < a32
    assert tols(jnp.ones(2, jnp.float32)) == (r32, a32)  # an array gives its dtype
    with pytest.raises(ValueError, match="floating dtype"):
        tols(np.int32)


def test_tree_allclose_uses_the_dtype_tolerance():
    x = {"a": jnp.ones(3, jnp.float32), "b": 2}
    assert tree_allclose(x, {"a": x["a"] * (1 + 1e-7), "b": 2})
    assert not tree_allclose(x, {"a": x["a"] * (1 + 1e-3), "b": 2})
    # float64 is held to a tighter tolerance than the same perturbation in float32.
    y = jnp.ones(3, jnp.float64)
    assert not tree_allclose(y, y * (1 + 1e-7))
    assert not tree_allclose(y, y.astype(jnp.float32))  # dtypes must match


def test_finite_differences_of_a_known_gradient():
    def f(x):
        return jnp.sum(jnp.sin(x) * x**2)

    x = np.array([0.3, -1.2, 4.0])
    want = np.cos(x) * x**2 + 2 * x * np.sin(x)
    np.testing.assert_allclose(finite_difference_grad(f, x), want, rtol=1e-8)
    assert_grad_matches_fd(f, x)
    with pytest.raises(AssertionError):
        assert_grad_matches_fd(lambda v: jax.lax.stop_gradient(f(v)) + 0 * v[0], x)


def test_cast_floats_leaves_other_leaves():
    tree = {"f": jnp.ones(2), "i": jnp.arange(2), "s": "name"}
    out = cast_floats(tree, jnp.float32)
    assert out["f"].dtype == jnp.float32
    assert out["i"].dtype == tree["i"].dtype and out["s"] == "name"


def test_runtime_type_checks_are_on_and_unchecked_switches_them_off():
    # The suite checks annotations at run time (pyproject's --jaxtyping-packages): a
    # model name that is not a str is a TypeCheckError naming the parameter...
    with pytest.raises(jaxtyping.TypeCheckError, match="name"):
        dm.architecture(3)
    # ...which unchecked() switches off (the library's own check answers), and on
    # again after.
    with pytest.raises(ValueError), unchecked():
        dm.architecture(3)
    with pytest.raises(jaxtyping.TypeCheckError):
        dm.architecture(3)


def test_implicit_rank_promotion_is_an_error():
    with pytest.raises(ValueError, match="rank_promotion"):
        jnp.ones(3) + jnp.ones((2, 3))
