"""Shared test helpers: per-dtype tolerances, tree comparison, finite differences,
and the inputs and checks that tests of more than one module share.

Import as ``from helpers import tols`` (pyproject.toml's pytest options put ``tests/``
on ``sys.path``).
"""

import contextlib
import os
import pathlib
import subprocess
import sys
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pandas as pd
import pytest

import diffmodel as dm
import diffmodel.kernels as dk
from diffmodel._model._physics import SHARPNESS
from diffmodel._model._roofline import COMPONENTS, step_time_batch

# The project folder (for subprocesses' PYTHONPATH) and the tests' data files.
ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_experiment(name: str):
    """The script ``experiments/<name>.py`` as a module, its sibling scripts importable
    as when it runs (Python puts the script's folder first on the path)."""
    import importlib.util

    folder = str(ROOT / "experiments")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(
        f"{name}_script", f"{folder}/{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_python(code: str, env: dict | None = None, timeout: int = 120) -> str:
    """Run Python ``code`` in a fresh CPU process (the package and the test
    modules importable from this checkout; ``env`` added to the environment); its
    standard output. Fails the test, with the process's error output, if it exits
    non-zero."""
    env = {**os.environ, **(env or {})}
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")]
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def run_on_host_devices(code: str, n: int = 2, timeout: int = 120) -> str:
    """:func:`run_python` in a process that sees ``n`` forced host devices."""
    flag = f" --xla_force_host_platform_device_count={n}"
    return run_python(
        code, {"XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + flag}, timeout
    )


FIXTURES = pathlib.Path(__file__).parent / "fixtures"

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


# -------------------------------------------------------------- optional extras


needs_db = pytest.mark.skipif(
    not dk.database_available(),
    reason="aiconfigurator-core is not installed (pip install 'diffmodel[aic]')",
)


# ------------------------------------------------------------ the step model


def power_mean(a, b):
    """The smooth maximum of two costs, written out."""
    return (a**SHARPNESS + b**SHARPNESS) ** (1 / SHARPNESS)


def tiny_architecture(**kw):
    """A 3-layer toy architecture (d 8, 2 heads of 4, FFN 16), ``kw`` overriding."""
    base = dict(n_layers=3, hidden=8, n_heads=2, n_kv_heads=2, head_dim=4, ffn=16)
    return dm.Architecture(vocab=32, **{**base, **kw})


def one_step(**kw):
    """One step's statistics: zeros but for ``kw`` (scalars)."""
    z = dict(
        prefill_tokens=0.0,
        decode_tokens=0.0,
        num_prefill=0.0,
        num_decode=0.0,
        kv_decode=0.0,
        attn_prefill=0.0,
        kv_prefill=0.0,
    )
    return dm.BatchStats(**{k: jnp.asarray(float(v)) for k, v in {**z, **kw}.items()})


def feature_stats(scale=1.0, kv=2.0e5, pf=700.0):
    """A mixed step (one prefill chunk after 300 cached, ~96 decodes)."""
    return dm.from_aggregates(
        prefill_tokens=pf,
        decode_tokens=96.0 * scale,
        num_prefill=1.0,
        num_decode=96.0 * scale,
        kv_tokens=kv,
        prefill_context_tokens=300.0,
    )


def check_scalar_grad(f, x0, rel=1e-6, rtol=2e-5):
    """Assert ``jax.grad(f)(x0)`` of a scalar is non-zero and equals the central
    difference."""
    x0 = jnp.asarray(x0, float)
    g = float(jax.grad(f)(x0))
    h = rel * max(abs(float(x0)), 1.0)
    fd = (float(f(x0 + h)) - float(f(x0 - h))) / (2 * h)
    assert g == pytest.approx(fd, rel=rtol, abs=1e-9), (g, fd)
    assert g != 0.0


# ---------------------------------------------------------- bulk prediction


BULK_RTOL = {np.float32: 2e-5, np.float64: 1e-11}


def random_stats(n: int, seed: int = 0) -> dm.BatchStats:
    """``n`` random steps of mixed prefill and decode work (NumPy leaves)."""
    rng = np.random.default_rng(seed)
    n_pf = rng.integers(0, 4, n).astype(float)
    n_dec = rng.integers(0, 200, n).astype(float)
    p = np.where(n_pf > 0, rng.integers(1, 4096, n), 0).astype(float)
    k_pf = np.where(n_pf > 0, rng.integers(0, 2000, n), 0).astype(float)
    stats = dm.from_aggregates(
        prefill_tokens=p,
        decode_tokens=n_dec,
        num_prefill=n_pf,
        num_decode=n_dec,
        kv_tokens=n_dec * rng.uniform(100, 3000, n),
        prefill_context_tokens=k_pf,
    )
    return jax.tree.map(np.asarray, stats)


def direct_step_time(stats, deps, group, factors=None):
    """Totals and components of ``step_time_batch``: the bulk paths' reference."""
    factors = dm.default_factors() if factors is None else factors
    b = step_time_batch(
        jax.tree.map(jnp.asarray, stats), deps, jnp.asarray(group), factors
    )
    return {c: np.asarray(getattr(b, c)) for c in COMPONENTS} | {
        "total": np.asarray(b.total)
    }


def random_requests(steps: int, width: int, seed: int = 0):
    """Padded random request batches: (new tokens, contexts, mask)."""
    rng = np.random.default_rng(seed)
    real = rng.integers(0, width + 1, steps)
    mask = np.arange(width)[None, :] < real[:, None]
    decode = rng.random((steps, width)) < 0.9
    new = np.where(decode, 1, rng.integers(1, 512, (steps, width))).astype(float)
    ctx = rng.integers(0, 4000, (steps, width)).astype(float)
    ctx = np.where(decode, np.maximum(ctx, 1), ctx)
    return np.where(mask, new, 0.0), np.where(mask, ctx, 0.0), mask


# -------------------------------------------------------------- the scheduler


SCHEDULER_STEPS = 120  # steps of the simulated scheduler (fixtures and tune_knobs)


# ------------------------------------------------------------------- traces


def trace_table(**overrides) -> pd.DataFrame:
    """Four hand-made steps of two experiments, deliberately out of order."""
    columns = {
        "step.id": [5, 3, 4, 1],
        "step.ts_start_ns": [9_000_000, 1_000_000, 4_000_000, 2_000_000],
        "step.ts_end_ns": [9_500_000, 1_300_000, 4_100_000, 2_200_000],
        "step.duration_us": [500, 300, 100, 200],
        "queue.running_depth": [2, 1, 1, 3],
        "queue.waiting_depth": [0, 1, 0, 0],
        "batch.num_prefill_reqs": [1, 1, 0, 1],
        "batch.num_decode_reqs": [1, 0, 1, 2],
        "batch.scheduled_tokens": [11, 64, 1, 34],
        "batch.prefill_tokens": [10, 64, 0, 32],
        "batch.decode_tokens": [1, 0, 1, 2],
        "batch.num_finished": [0, 0, 0, 0],
        "batch.num_preempted": [0, 0, 0, 0],
        "kv.usage_gpu_ratio": [0.2, 0.1, 0.1, 0.5],
        "kv.blocks_total_gpu": [10, 10, 10, 10],
        "kv.blocks_free_gpu": [8, 9, 9, 5],
        "experiment_id": ["b", "a", "a", "b"],
        "model": ["m", "m", "m", "m"],
        "workload": ["general"] * 4,
        "tp": [1, 1, 1, 1],
    }
    columns.update(overrides)
    return pd.DataFrame(columns)


# ------------------------------------------------- synthetic traces for host costs


def host_frame(n=400, seed=0, models=(("codellama-34b", 2),)) -> pd.DataFrame:
    """``n`` random steps per (model, tp) on H100: 1-119 decode requests of 200-3000
    context tokens each, half of the steps with one prefill chunk of 16-1500."""
    rng = np.random.default_rng(seed)
    parts = []
    for model, tp in models:
        n_dec = rng.integers(1, 120, n)
        n_pf = rng.integers(0, 2, n)
        parts.append(
            pd.DataFrame(
                {
                    "model": model,
                    "hardware": "h100-sxm",
                    "tp": tp,
                    "prefill_tokens": n_pf * rng.integers(16, 1500, n),
                    "decode_tokens": n_dec,
                    "num_prefill_reqs": n_pf,
                    "num_decode_reqs": n_dec,
                    "kv_tokens": n_dec * rng.uniform(200, 3000, n),
                }
            )
        )
    return pd.concat(parts, ignore_index=True)


def stats_and_deployments(frame: pd.DataFrame):
    """The rows' batch statistics and per-row deployments."""
    from diffmodel._fitting._fit import step_data

    data, _ = step_data(frame)
    return data.stats, data.deployments.take(data.group)


def with_host_target(frame, host, curves, noise=0.02, seed=1) -> pd.DataFrame:
    """``frame`` with ``iteration_time_us``: its kernel sum on ``curves`` plus the
    host costs ``host`` (a ``HostCosts``), times log-normal noise of sd ``noise``."""
    from diffmodel.kernels._step import host_features

    dev = dm.kernel_device_us(frame, curves)
    x = np.asarray(host_features(*stats_and_deployments(frame)), dtype=float)
    theta = np.array([float(v) for v in host.as_dict().values()])
    rng = np.random.default_rng(seed)
    y = (dev + x @ theta) * np.exp(rng.normal(0.0, noise, len(frame)))
    return frame.assign(iteration_time_us=y)
