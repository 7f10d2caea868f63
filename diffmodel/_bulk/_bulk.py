"""Prediction at scale: millions of steps, chunked, validated once, on many devices.

:func:`predict_steps` evaluates :func:`diffmodel.step_time` over arrays of steps from
several deployments with one compiled function of a fixed chunk shape; the inputs are
validated once (shapes and groups in NumPy, values inside the compiled loop, which
reads them anyway), and the hot loop runs without ``step_time``'s checks.
:func:`predict_requests` does the same from padded per-request batches, and
:func:`predict_frame_fast` from a pandas frame.

Rewrites make the compiled function fast on CPU without changing its value beyond
rounding:

- arithmetic on deployment values runs once per group, and sums of statistics times
  deployment constants are combined per group before they meet the steps (see
  :class:`_Evaluator`, :class:`_Affine`): about half the per-step operations go;
- per-step deployment values are picked from the (few) groups with a chain of
  ``where`` rather than a gather, so XLA fuses the whole step into one loop;
- ``pow`` is rewritten as multiplications and square roots for the constant
  exponents of the smooth maximum (``a^4``, ``s^(1/4)``) and as ``exp(y log x)``
  otherwise (the MoE expert count): XLA:CPU evaluates ``pow`` ~10x slower than ``exp``.
"""

import jax.numpy as jnp
import numpy as np
from jaxtyping import ArrayLike

from .._frame import groups_from_frame, stats_from_frame
from .._model._batch import BatchStats
from .._model._deployment import Deployment
from .._model._factors import Factors
from ._feeder import _requests_kernel, _run_chunks, _stats_kernel
from ._rewrite import STAT_FIELDS as STAT_FIELDS, step_time_fast as step_time_fast
from ._validate import (
    _as_array,
    _check_group,
    _check_out,
    _check_values,
    _float_dtype,
    _resolve,
)

# entries


def predict_steps(
    stats: BatchStats,
    deployments: Deployment,
    group: ArrayLike,
    factors: Factors | None = None,
    *,
    chunk_size: int | None = 2**18,
    dtype=jnp.float32,
    components: bool = False,
    devices=None,
    out: np.ndarray | None = None,
) -> np.ndarray | dict[str, np.ndarray]:
    """Step time of many steps, microseconds per GPU, as NumPy arrays.

    The values of :func:`diffmodel.step_time_batch`, for inputs too large to evaluate
    in one piece: the steps are cut into chunks of ``chunk_size`` (the last one padded
    with empty steps), so one compiled function serves every chunk and the device
    memory in use stays near one chunk's worth; results go into one preallocated
    output array.

    Args:
        stats: :class:`diffmodel.BatchStats` with 1-D fields of ``steps`` entries
            (tokens, requests, token pairs), finite and ``>= 0``.
        deployments: stacked deployments (:func:`diffmodel.stack_deployments`, or one
            unstacked :class:`diffmodel.Deployment`).
        group: each step's deployment, integers in ``[0, groups)``.
        factors: ``None`` (physical priors) or :class:`diffmodel.Factors`, shared
            (scalar fields) or per group (fields of shape ``(groups,)``).
        chunk_size: steps per compiled call (rounded up to a multiple of 16 times the
            number of devices); ``None`` evaluates all steps in one call.
        dtype: ``float32`` (default) or ``float64`` (needs ``jax_enable_x64``).
        components: also return each :data:`diffmodel.COMPONENTS` term.
        devices: devices to split each chunk's steps over (default ``jax.devices()``;
            with more than one, chunks are sharded over a 1-D mesh).
        out: a writeable, C-contiguous NumPy array of ``steps`` entries of
            ``dtype`` to write the totals into (and return), e.g. one buffer reused
            over many calls: a new 10-million-step array costs ~10 ms of page
            faults. Not with ``components=True``.

    Returns:
        The total step time per step, us, of ``dtype``; with ``components=True`` a
        dict of ``"total"`` and one array per component, us.

    Raises:
        ValueError: wrong shapes or dtypes, a negative or NaN statistic, or a group
            index out of range, naming the argument. Shapes, dtypes and groups are
            checked here; the values in the compiled loop, which reads them anyway
            (a bad step's total becomes NaN, and NumPy then names the first bad
            entry), in place of ``step_time``'s in-graph checks.
    """
    dt = _float_dtype(dtype)
    if not isinstance(stats, BatchStats):
        raise ValueError(f"stats must be a diffmodel.BatchStats, got {type(stats)}")
    cols = [_as_array(f"stats.{f}", getattr(stats, f), 1, "f") for f in STAT_FIELDS]
    n = cols[0].shape[0]
    for f, c in zip(STAT_FIELDS, cols, strict=True):
        if c.shape[0] != n:
            raise ValueError(
                f"stats.{f} has {c.shape[0]} steps, stats.{STAT_FIELDS[0]} has {n}"
            )
    deps, fac, n_groups = _resolve(deployments, factors, dt)
    g = _check_group(group, n, n_groups)

    def name_bad_value():  # the compiled loop saw one: find and name it
        for f, c in zip(STAT_FIELDS, cols, strict=True):
            _check_values(f"stats.{f}", c, "tokens, requests or token pairs")

    out = _check_out(out, n, dt, components)
    return _run_chunks(
        _stats_kernel,
        cols,
        [dt] * len(cols),
        [0] * len(cols),
        g,
        n,
        chunk_size,
        out_dtype=dt,
        deployments=deps,
        factors=fac,
        components=components,
        devices=devices,
        on_nan=name_bad_value,
        out=out,
    )


def predict_requests(
    new_tokens: ArrayLike,
    context_tokens: ArrayLike,
    mask: ArrayLike,
    deployments: Deployment,
    group: ArrayLike,
    factors: Factors | None = None,
    *,
    chunk_size: int | None = 2**20,
    dtype=jnp.float32,
    components: bool = False,
    devices=None,
    out: np.ndarray | None = None,
) -> np.ndarray | dict[str, np.ndarray]:
    """Step time of many steps given as padded per-request batches, us per GPU.

    Each step's statistics come from :func:`diffmodel.from_requests` (the exact
    form), inside the same compiled, chunked loop as :func:`predict_steps`.

    Args:
        new_tokens: ``[steps, R]`` tokens each request processes this step.
        context_tokens: ``[steps, R]`` tokens already cached for each request.
        mask: ``[steps, R]`` booleans, ``True`` for real requests. Padding entries
            must still be finite and ``>= 0`` (e.g. 0).
        deployments, group, factors, dtype, components, devices, out: as in
            :func:`predict_steps`.
        chunk_size: request slots (``steps * R``) per compiled call; ``None``: all.

    Returns:
        As :func:`predict_steps`.
    """
    dt = _float_dtype(dtype)
    new = _as_array("new_tokens", new_tokens, 2, "f")
    ctx = _as_array("context_tokens", context_tokens, 2, "f")
    m = _as_array("mask", mask, 2, "b")
    for name, a in (("context_tokens", ctx), ("mask", m)):
        if a.shape != new.shape:
            raise ValueError(
                f"{name} has shape {a.shape}, new_tokens has shape {new.shape}"
            )
    _check_values("new_tokens", new, "tokens")
    _check_values("context_tokens", ctx, "tokens")
    n, width = new.shape
    deps, fac, n_groups = _resolve(deployments, factors, dt)
    g = _check_group(group, n, n_groups)
    if chunk_size is not None and (int(chunk_size) != chunk_size or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None: {chunk_size}")
    steps_per_chunk = (
        None if chunk_size is None else max(1, chunk_size // max(width, 1))
    )
    out = _check_out(out, n, dt, components)
    return _run_chunks(
        _requests_kernel,
        [new, ctx, m],
        [dt, dt, np.bool_],
        [0, 0, False],
        g,
        n,
        steps_per_chunk,
        out_dtype=dt,
        deployments=deps,
        factors=fac,
        components=components,
        devices=devices,
        out=out,
    )


def predict_frame_fast(
    frame,
    *,
    model: str | None = None,
    hardware: str | None = None,
    tp: int | None = None,
    factors=None,
    chunk_size: int | None = 2**18,
    dtype=jnp.float32,
    components: bool = False,
) -> np.ndarray | dict[str, np.ndarray]:
    """:func:`predict_steps` for a pandas frame of steps, us per GPU.

    Columns and deployments are read as in :func:`diffmodel.predict` (by
    :func:`diffmodel.stats_from_frame` and :func:`diffmodel.groups_from_frame`);
    ``factors`` as there. Returns NumPy arrays (one entry per row), not a frame.
    """
    from .._predict import resolve_factors  # the frame path's factor resolution

    stats = stats_from_frame(frame)
    groups = groups_from_frame(frame, model=model, hardware=hardware, tp=tp)
    fac = resolve_factors(factors, groups.labels)
    return predict_steps(
        stats,
        groups.deployments,
        groups.index,
        fac,
        chunk_size=chunk_size,
        dtype=dtype,
        components=components,
    )
