"""Shared test helpers: per-dtype tolerances, tree comparison, finite differences.

Import as ``from helpers import tols`` (pytest puts ``tests/`` on ``sys.path``).
"""

import contextlib
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np

# (rtol, atol) for comparing two computations of the same quantity in a dtype: a few
# hundred ulps relative, so that a reordered sum or a fused multiply-add passes and a
# wrong formula does not.
_TOLS = {
    np.dtype(np.float64): (1e-10, 1e-12),
    np.dtype(np.float32): (1e-5, 1e-6),
    np.dtype(np.float16): (1e-2, 1e-3),
    np.dtype(jnp.bfloat16): (2e-2, 1e-2),
}

FLOAT_DTYPES = (jnp.float32, jnp.float64)


def tols(dtype) -> tuple[float, float]:
    """``(rtol, atol)`` for a floating dtype (a dtype, a type or an array)."""
    dt = getattr(dtype, "dtype", None)
    dt = dt if isinstance(dt, np.dtype) else np.dtype(dtype)
    if dt not in _TOLS:
        raise ValueError(f"dtype must be a floating dtype in {list(_TOLS)}, got {dt}")
    return _TOLS[dt]


def tree_allclose(x, y, *, rtol: float | None = None, atol: float | None = None):
    """Whether two pytrees have equal structure, dtypes and values within tolerance.

    Tolerances default to :func:`tols` of the first floating leaf of ``x``.
    """
    if rtol is None or atol is None:
        leaves = [
            leaf
            for leaf in jax.tree_util.tree_leaves(x)
            if eqx.is_array(leaf) and jnp.issubdtype(leaf.dtype, jnp.floating)
        ]
        r, a = tols(leaves[0].dtype) if leaves else tols(np.float64)
        rtol = r if rtol is None else rtol
        atol = a if atol is None else atol
    return bool(eqx.tree_equal(x, y, typematch=True, rtol=rtol, atol=atol))


def finite_difference_grad(
    f: Callable[[np.ndarray], float], x, *, eps: float = 1e-6
) -> np.ndarray:
    """Central-difference gradient of a scalar function of one float64 array.

    Each coordinate is stepped by ``eps * max(1, |x_i|)``; the truncation error is
    ``O(step^2)``, so with ``eps = 1e-6`` a smooth ``f`` matches its derivative to about
    ``1e-8`` relative in float64.
    """
    x = np.asarray(x, dtype=np.float64)
    grad = np.empty_like(x)
    for i in np.ndindex(x.shape):
        h = eps * max(1.0, abs(float(x[i])))
        up, down = x.copy(), x.copy()
        up[i] += h
        down[i] -= h
        grad[i] = (float(f(up)) - float(f(down))) / (2.0 * h)
    return grad


def assert_grad_matches_fd(
    f: Callable, x, *, rtol: float = 1e-6, atol: float = 1e-9, eps: float = 1e-6
) -> None:
    """Assert ``jax.grad(f)(x)`` equals the central finite difference, in float64."""
    x = np.asarray(x, dtype=np.float64)
    got = np.asarray(jax.grad(lambda v: f(v))(jnp.asarray(x)))
    want = finite_difference_grad(f, x, eps=eps)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


def cast_floats(tree, dtype):
    """``tree`` with every floating array leaf cast to ``dtype`` (others unchanged)."""

    def cast(leaf):
        if eqx.is_array(leaf) and jnp.issubdtype(leaf.dtype, jnp.floating):
            return leaf.astype(dtype)
        return leaf

    return jax.tree.map(cast, tree)


@contextlib.contextmanager
def unchecked():
    """Switch off the suite's runtime type checks (jaxtyping + beartype) inside.

    For tests of the ``ValueError`` a user, who runs without the checker, gets for an
    argument of the wrong type: under the checker the call would stop earlier, at a
    ``TypeCheckError`` naming the same parameter.
    """
    before = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        jaxtyping.config.update("jaxtyping_disable", before)
