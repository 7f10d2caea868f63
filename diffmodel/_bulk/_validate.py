"""Boundary validation of bulk inputs: shapes, dtypes, groups, values (NumPy)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from .._model._deployment import Deployment, stack_deployments
from .._model._factors import FACTOR_NAMES, Factors, default_factors


def _float_dtype(dtype) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dt}")
    if dt == np.float64 and not jax.config.read("jax_enable_x64"):
        raise ValueError(
            "dtype=float64 needs 64-bit JAX: call "
            "jax.config.update('jax_enable_x64', True) before using diffmodel"
        )
    return dt


def _check_values(name: str, x: np.ndarray, unit: str) -> None:
    """Raise ``ValueError`` naming ``name`` if a value is negative, NaN or
    infinite."""
    if x.size == 0:
        return
    # NaN propagates through min and max: two passes catch NaN, negative and
    # infinite values alike.
    if not (x.min() >= 0 and np.isfinite(x.max())):
        bad = np.flatnonzero(~((x >= 0) & np.isfinite(x)))
        where = tuple(int(i) for i in np.unravel_index(int(bad[0]), x.shape))
        at = where[0] if len(where) == 1 else where
        raise ValueError(
            f"{name} must be finite and >= 0 ({unit}); index {at} has {x[where]}"
        )


def _as_array(name: str, x, ndim: int, kind: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {a.shape}")
    if kind == "f" and a.dtype.kind not in "fiu":
        raise ValueError(f"{name} must be numeric, got dtype {a.dtype}")
    if kind == "i" and a.dtype.kind not in "iu":
        raise ValueError(f"{name} must be an integer array, got dtype {a.dtype}")
    if kind == "b" and a.dtype.kind != "b":
        raise ValueError(f"{name} must be a boolean array, got dtype {a.dtype}")
    return a


def _check_out(out, n: int, dtype: np.dtype, components: bool) -> np.ndarray | None:
    """``out`` checked as a destination for ``n`` totals of ``dtype``."""
    if out is None:
        return None
    if components:
        raise ValueError(
            "out is for the totals only: it cannot be used with components"
        )
    if not isinstance(out, np.ndarray):
        raise ValueError(f"out must be a NumPy array, got {type(out).__name__}")
    if out.shape != (n,) or out.dtype != dtype:
        raise ValueError(
            f"out must have shape ({n},) and dtype {dtype}, got shape {out.shape} "
            f"and dtype {out.dtype}"
        )
    if not (out.flags.c_contiguous and out.flags.writeable):
        raise ValueError("out must be C-contiguous and writeable")
    return out


def _check_group(group, n: int, n_groups: int) -> np.ndarray:
    g = _as_array("group", group, 1, "i")
    if g.shape[0] != n:
        raise ValueError(f"group must have one entry per step ({n}), got {g.shape[0]}")
    g = np.ascontiguousarray(g, dtype=np.int32) if g.dtype != np.int32 else g
    # Negative int32 values become huge as uint32: one pass checks both bounds.
    if n and int(g.view(np.uint32).max()) >= n_groups:
        i = int(np.flatnonzero((g < 0) | (g >= n_groups))[0])
        raise ValueError(
            f"group must index the {n_groups} deployment(s), in [0, {n_groups}); "
            f"step {i} has {int(g[i])}"
        )
    return g


def _resolve(deployments, factors, dtype) -> tuple[Deployment, Factors, int]:
    if not isinstance(deployments, Deployment):
        raise ValueError(
            "deployments must be a diffmodel.Deployment (see diffmodel.deployment and "
            f"diffmodel.stack_deployments), got {type(deployments).__name__}"
        )
    if jnp.ndim(deployments.tp) == 0:
        deployments = stack_deployments([deployments])
    if jnp.ndim(deployments.tp) != 1:
        raise ValueError(
            "deployments must be stacked along one leading (group) axis, got tp shape "
            f"{jnp.shape(deployments.tp)}"
        )
    n_groups = int(jnp.shape(deployments.tp)[0])
    factors = default_factors() if factors is None else factors
    if not isinstance(factors, Factors):
        raise ValueError(
            f"factors must be None or a diffmodel.Factors, got {type(factors).__name__}"
        )
    for name in FACTOR_NAMES:
        shape = jnp.shape(getattr(factors, name))
        if shape not in ((), (n_groups,)):
            raise ValueError(
                f"factors.{name} must be a scalar (shared) or one value per group "
                f"(shape ({n_groups},)), got shape {shape}"
            )
    cast = functools.partial(jax.tree.map, lambda x: np.asarray(x, dtype))
    return cast(deployments), cast(factors), n_groups
