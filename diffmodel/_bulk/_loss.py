"""The log-ratio loss, its gradient and Hessian-vector products over millions of steps.

The fast path of :func:`diffmodel.predict_steps`, differentiated: the step model is
evaluated with the same rewrites (:class:`~diffmodel._bulk._bulk._Evaluator`: per-group
tables, affine folding, no ``pow``), chunk by chunk in a ``lax.scan`` over rows that
live on the device(s), and the gradient is accumulated across chunks:

- the parameters map to per-group factors, then to the per-group *tables* the step
  loop reads (a few numbers per group, computed once per evaluation);
- each chunk returns its squared log-ratio sum and its gradient with respect to
  the tables (one forward and one reverse pass over the chunk, nothing kept);
- the table gradients are summed over chunks and pulled back to the parameters
  once (a ``custom_vjp``), so the memory in use stays near one chunk's worth.

Rows are padded (weight 0) to a bucket of whole chunks, the number of chunks rounded
up to a power of two below 8 and to a multiple of 8 above, so data of nearby sizes
share one compiled loop. With several devices the rows of every chunk are sharded
over a 1-D mesh and XLA reduces the sums and gradients across devices.
"""

import functools
from typing import Any

import equinox as eqx
import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, ArrayLike

from .._fitting._base import AbstractFactorSet
from .._fitting._fit import FitResult
from .._fitting._kinds import ROOFLINE_KINDS
from .._fitting._optimise import minimise
from .._model._batch import BatchStats
from .._model._deployment import Deployment
from .._model._factors import Factors
from ._feeder import _resolve_devices
from ._rewrite import _ALIGN_ELEMS, STAT_FIELDS, _evaluate
from ._validate import (
    _as_array,
    _check_group,
    _check_values,
    _float_dtype,
    _resolve,
)


class BulkData(eqx.Module):
    """Steps laid out for the chunked loss: ``[chunks, chunk]`` arrays, padded.

    Attributes:
        cols: the seven :class:`~diffmodel.BatchStats` fields (tokens, requests,
            token pairs), padding rows 0.
        group: each step's deployment group (padding rows 0), or, with rows laid
            out by group (every chunk holds one group's rows), ``[chunks]``: the
            group of each chunk. Then a chunk reads its tables as scalars and the
            gradient sums each table over the chunk instead of selecting per row.
        log_target: ``log`` of the measured step time, us (padding rows 0).
        weight: per-row weight (0 on padding rows).
        deployments: stacked deployments, one per group.
        n_rows: rows before padding (an array: not part of the compile key).
        total_weight: sum of the weights (the loss is a weighted mean).
        mesh: the 1-D device mesh (axis ``"steps"``) the rows are sharded over, or
            ``None`` on one device (static).
        zero_tables: per table the step loop reads, whether it is 0 in every group
            without depending on the factors (static): the terms it multiplies are
            left out of the loop (a sliding window, experts or a sparse index that
            no deployment has), as in prediction.
    """

    cols: tuple[Array, ...]
    group: Array
    log_target: Array
    weight: Array
    deployments: Deployment
    total_weight: Array
    n_rows: Array
    mesh: Mesh | None = eqx.field(static=True, default=None)
    zero_tables: tuple[bool, ...] = eqx.field(static=True, default=())


def _n_chunks(n: int, chunk: int) -> int:
    """Chunks for ``n`` rows, bucketed: few distinct shapes, at most 1/8 padding
    beyond 8 chunks."""
    k = max(1, -(-n // chunk))
    if k <= 8:
        return 1 << (k - 1).bit_length()
    return -(-k // 8) * 8


def _by_group(group: np.ndarray, counts: np.ndarray, chunk: int):
    """A layout in which every chunk holds one group's rows (``counts`` rows per
    group): ``(order, at, chunk_group)``: row ``order[i]`` goes to flat position
    ``at[i]``; each chunk's group (padding chunks: 0), over :func:`_group_chunks`."""
    order = np.argsort(group, kind="stable")
    per = -(-counts // chunk)  # whole chunks per group
    first = np.concatenate([[0], np.cumsum(per)[:-1]])  # its first chunk
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])  # its first sorted row
    gs = group[order]
    at = first[gs] * chunk + (np.arange(len(order)) - starts[gs])
    chunk_group = np.zeros(_group_chunks(counts, chunk), np.int64)
    chunk_group[: per.sum()] = np.repeat(np.arange(len(counts)), per)
    return order, at, chunk_group


def _group_chunks(counts: np.ndarray, chunk: int) -> int:
    """Chunks of the by-group layout (whole chunks per group, bucketed like
    :func:`_n_chunks`)."""
    return _n_chunks(int((-(-counts // chunk)).sum()) * chunk, chunk)


def bulk_data(
    stats: BatchStats,
    deployments: Deployment,
    group: ArrayLike,
    target: ArrayLike,
    weights: ArrayLike | None = None,
    *,
    chunk_size: int = 2**11,
    dtype=jnp.float32,
    devices=None,
    by_group: bool | None = None,
) -> BulkData:
    """Validate steps and their targets once and lay them out for :func:`bulk_loss`.

    Args:
        stats: 1-D statistics of ``steps`` entries, finite and ``>= 0``.
        deployments: stacked deployments (or one).
        group: each step's deployment, integers in ``[0, groups)``.
        target: measured step time per step, us, finite and ``> 0``.
        weights: optional non-negative weights per step (not all 0).
        chunk_size: steps per chunk of the scan (rounded up to a multiple of 16 times
            the number of devices). The default keeps a chunk's intermediates in
            cache: on a 2-core x86 VM, loss and gradient ran at 8.5e7 steps/s with
            2048, 6.0e7 with 4096, 6.3e7 with 512 (float32, 1e6 rows).
        dtype: ``float32`` (default) or ``float64`` (needs ``jax_enable_x64``).
        devices: devices to shard every chunk's rows over (default all JAX sees).
        by_group: lay rows out by group, every chunk one group's rows (its tables
            read as scalars: the gradient about twice as fast as with per-row
            selection); ``None`` (default): by group unless that pads the rows by
            more than a quarter (many small groups), then in the given order.
    """
    dt = _float_dtype(dtype)
    if not isinstance(stats, BatchStats):
        raise ValueError(f"stats must be a diffmodel.BatchStats, got {type(stats)}")
    cols = [_as_array(f"stats.{f}", getattr(stats, f), 1, "f") for f in STAT_FIELDS]
    n = cols[0].shape[0]
    for f, c in zip(STAT_FIELDS, cols, strict=True):
        if c.shape[0] != n:
            raise ValueError(f"stats.{f} has {c.shape[0]} steps, expected {n}")
        _check_values(f"stats.{f}", c, "tokens, requests or token pairs")
    deps, _, n_groups = _resolve(deployments, None, dt)
    g = _check_group(group, n, n_groups)
    y = _as_array("target", target, 1, "f").astype(np.float64)
    if y.shape[0] != n or n == 0:
        raise ValueError(f"target must have one entry per step ({n}), got {y.shape}")
    if not np.all(np.isfinite(y) & (y > 0)):
        i = int(np.flatnonzero(~(np.isfinite(y) & (y > 0)))[0])
        raise ValueError(
            f"target must be finite and > 0 (microseconds); step {i} has {y[i]}"
        )
    w = np.ones(n) if weights is None else _as_array("weights", weights, 1, "f")
    if w.shape != (n,) or not np.all(np.isfinite(w) & (w >= 0)) or w.sum() <= 0:
        raise ValueError("weights must be finite, >= 0, not all 0, one per step")
    devs = _resolve_devices(devices)
    multiple = _ALIGN_ELEMS * len(devs)
    if int(chunk_size) != chunk_size or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    chunk = -(-min(int(chunk_size), max(n, 1)) // multiple) * multiple
    k = _n_chunks(n, chunk)
    counts = np.bincount(g, minlength=n_groups)
    k_by_group = _group_chunks(counts, chunk)
    if by_group is None:  # decided from the counts: the sort only when it is used
        by_group = n_groups > 1 and k_by_group <= k + k // 4
    if by_group:
        k = k_by_group
        order, at, chunk_group = _by_group(g, counts, chunk)
    rows = k * chunk

    def lay_out(a, dtype_):
        out = np.zeros(rows, dtype_)
        if by_group:
            out[at] = a[order]
        else:
            out[:n] = a
        return out.reshape(k, chunk)

    arrays = dict(
        cols=tuple(lay_out(c, dt) for c in cols),
        log_target=lay_out(np.log(y), dt),
        weight=lay_out(w, dt),
    )
    if not by_group:
        arrays["group"] = lay_out(g, np.int32)
    mesh = None
    if len(devs) > 1:
        mesh = Mesh(np.asarray(devs), ("steps",))
        rows_sharding = NamedSharding(mesh, PartitionSpec(None, "steps"))
        replicated = NamedSharding(mesh, PartitionSpec())
    else:
        rows_sharding = replicated = devs[0]
    arrays = jax.device_put(arrays, rows_sharding)
    if by_group:  # one group per chunk: the same on every device
        arrays["group"] = jax.device_put(chunk_group.astype(np.int32), replicated)
    return BulkData(
        zero_tables=_zero_tables(deps, n_groups, dt),
        cols=arrays["cols"],
        group=arrays["group"],
        log_target=arrays["log_target"],
        weight=arrays["weight"],
        deployments=jax.device_put(jax.tree.map(jnp.asarray, deps), replicated),
        total_weight=jax.device_put(jnp.asarray(w.sum(), dt), replicated),
        n_rows=jax.device_put(jnp.asarray(float(n), dt), replicated),
        mesh=mesh,
    )


def _per_group(factors: Factors, n_groups: int, dtype) -> Factors:
    """Factors with a leading group axis: every field then reaches the steps through
    a per-group table (a shared scalar would be folded in as a constant)."""
    return jax.tree.map(
        lambda x: jnp.broadcast_to(jnp.asarray(x, dtype), (n_groups,)), factors
    )


def _tables(deployments: Deployment, factors: Factors, dtype) -> tuple[Array, ...]:
    """The per-group tables the step loop reads (see ``_group_tables``), traceable."""
    stats = BatchStats(*(jnp.full(_ALIGN_ELEMS, i, dtype) for i in range(7)))
    group = jnp.zeros(_ALIGN_ELEMS, jnp.int32)
    _, tables = _evaluate(stats, deployments, group, factors, False, keep_factors=True)
    return tuple(tables)


def _zero_tables(deployments: Deployment, n_groups: int, dtype) -> tuple[bool, ...]:
    """Per table, whether it is 0 in every group whatever the factors (read at the
    priors, in one compiled call: op by op it took ~0.5 s in a fresh process)."""
    priors = _per_group(Factors(), n_groups, dtype)
    kinds = _depends_on_factors(deployments, priors, dtype)
    tables = _tables_jit(deployments, priors, dtype)
    return tuple(
        not k and bool(np.all(np.asarray(t) == 0))
        for t, k in zip(tables, kinds, strict=True)
    )


def _depends_on_factors(deployments: Deployment, factors: Factors, dtype) -> tuple:
    """Per table, whether it depends on the factors (a forward pass over the jaxpr
    of :func:`_tables`): only those carry gradients; the others are constants of
    the fit (deployment arithmetic) and need no reduction over the steps."""
    closed = jax.make_jaxpr(lambda f: _tables(deployments, f, dtype))(factors)
    live = set(closed.jaxpr.invars)
    for eqn in closed.jaxpr.eqns:
        if any(not isinstance(v, jex.Literal) and v in live for v in eqn.invars):
            live.update(eqn.outvars)
    return tuple(
        not isinstance(v, jex.Literal)
        and v in live
        and jnp.issubdtype(v.aval.dtype, jnp.inexact)
        for v in closed.jaxpr.outvars
    )


_tables_jit = jax.jit(_tables, static_argnums=2)


def _split(tables, kinds) -> tuple[tuple, tuple]:
    """The tables that carry the factors (differentiated) and the others."""
    f = tuple(t for t, k in zip(tables, kinds, strict=True) if k)
    o = tuple(t for t, k in zip(tables, kinds, strict=True) if not k)
    return f, o


def _merge(ftables, otables, kinds) -> tuple:
    f, o = iter(ftables), iter(otables)
    return tuple(next(f) if k else next(o) for k in kinds)


def _chunk_sum(ftables, otables, kinds, factors, deployments, chunk, zeros=()):
    """Weighted sum of squared log ratios over one chunk, from the tables; terms
    whose table is marked in ``zeros`` (:attr:`BulkData.zero_tables`) left out."""
    cols, group, log_target, weight = chunk
    tables = _merge(ftables, otables, kinds)
    zeros = zeros or (False,) * len(tables)
    if len(zeros) != len(tables):
        raise ValueError(f"{len(zeros)} zero marks for {len(tables)} tables")
    plan = tuple((False, i, z) for i, z in enumerate(zeros))  # no merges by value
    stats = BatchStats(*cols)
    pred = _evaluate(
        stats, deployments, group, factors, False, (tables, plan), keep_factors=True
    )[0]
    r = jnp.log(pred) - log_target
    return jnp.sum(weight * r * r)


def _chunks(data: BulkData):
    return (data.cols, data.group, data.log_target, data.weight)


def _over_rows(fn, data: BulkData, replicated):
    """``fn(replicated, chunks)``: sums over the rows of every chunk.

    With rows sharded over several devices, each device runs ``fn`` over its own
    rows of every chunk (``shard_map``) and the sums are added across devices once,
    at the end: one all-reduce per evaluation. (Left to XLA's automatic
    partitioning, the loop over chunks reduced the gradient across devices at every
    chunk: on two host devices the loss and gradient ran ~20x slower than on one.)
    """
    chunks = _chunks(data)
    if data.mesh is None:
        return fn(replicated, chunks)
    rows = PartitionSpec(None, "steps")

    def local(rep, ch):
        return jax.tree.map(lambda x: jax.lax.psum(x, "steps"), fn(rep, ch))

    specs = (
        jax.tree.map(lambda _: PartitionSpec(), replicated),
        jax.tree.map(lambda x: rows if x.ndim == 2 else PartitionSpec(), chunks),
    )
    # check_vma=False: the step model combines per-row (varying) values with
    # tables and constants that are the same on every device in single operations.
    return jax.shard_map(
        local,
        mesh=data.mesh,
        in_specs=specs,
        out_specs=PartitionSpec(),
        check_vma=False,
    )(replicated, chunks)


# Chunks per iteration of the loop over chunks. Two halve the loop's per-iteration
# cost. On a 2-core x86 VM (float32, alternating fresh processes), loss and gradient
# ran at 9.3-9.9e7 steps/s on 1e6 rows, against 7.9-8.1e7 with one, and at 1.13e8
# against 8.5-9.0e7 on 1e7 rows. Four were no faster than two.
_UNROLL = 2


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _sum_sq(ftables, otables, kinds, factors, data: BulkData):
    def run(rep, chunks):
        f, o, fac, deps = rep

        def step(acc, chunk):
            value = _chunk_sum(f, o, kinds, fac, deps, chunk, data.zero_tables)
            return acc + value, None

        zero = jnp.zeros((), data.log_target.dtype)
        return jax.lax.scan(step, zero, chunks, unroll=_UNROLL)[0]

    return _over_rows(run, data, (ftables, otables, factors, data.deployments))


def _sum_sq_fwd(ftables, otables, kinds, factors, data):
    grad_fn = jax.value_and_grad(_chunk_sum)

    def run(rep, chunks):
        f, o, fac, deps = rep

        def step(acc, chunk):
            value, g = grad_fn(f, o, kinds, fac, deps, chunk, data.zero_tables)
            return (acc[0] + value, jax.tree.map(jnp.add, acc[1], g)), None

        zero = (jnp.zeros((), data.log_target.dtype), jax.tree.map(jnp.zeros_like, f))
        return jax.lax.scan(step, zero, chunks, unroll=_UNROLL)[0]

    total, grad = _over_rows(run, data, (ftables, otables, factors, data.deployments))
    return total, grad


def _sum_sq_bwd(kinds, grad, ct):
    # Only the floating tables carry the parameters: the factors reach the steps
    # through them, and the data are constants.
    return jax.tree.map(lambda g: g * ct, grad), None, None, None


_sum_sq.defvjp(_sum_sq_fwd, _sum_sq_bwd)


def _physical(fs: AbstractFactorSet, data: BulkData) -> Factors:
    n_groups = int(jnp.shape(data.deployments.tp)[0])
    return _per_group(fs.physical(), n_groups, data.log_target.dtype)


def bulk_loss(fs: AbstractFactorSet, data: BulkData) -> Array:
    """Weighted mean squared log ratio of ``fs``'s predictions to the targets, plus
    ``fs.penalty``: the objective of :func:`diffmodel.fit`, over
    :func:`bulk_data`'s chunks, with the gradient accumulated across chunks.

    ``fs`` must be a roofline set (global, per-model, hierarchical) whose groups are
    ``data``'s groups (``data.group`` indexes them).
    """
    factors = _physical(fs, data)
    tables = _tables(data.deployments, factors, data.log_target.dtype)
    kinds = _depends_on_factors(data.deployments, factors, data.log_target.dtype)
    ftables, otables = _split(tables, kinds)
    total = _sum_sq(ftables, otables, kinds, factors, data)
    return total / data.total_weight + fs.penalty(data.n_rows)


def _plain_loss(fs: AbstractFactorSet, data: BulkData) -> Array:
    """:func:`bulk_loss` without the custom gradient: for higher derivatives."""
    factors = _physical(fs, data)
    dtype = data.log_target.dtype

    def run(rep, chunks):
        fac, deps = rep

        @jax.checkpoint
        def step(acc, chunk):
            tables = _tables(deps, fac, dtype)
            kinds = tuple(jnp.issubdtype(t.dtype, jnp.inexact) for t in tables)
            f, o = _split(tables, kinds)
            value = _chunk_sum(f, o, kinds, fac, deps, chunk, data.zero_tables)
            return acc + value, None

        return jax.lax.scan(step, jnp.zeros((), dtype), chunks)[0]

    total = _over_rows(run, data, (factors, data.deployments))
    return total / data.total_weight + fs.penalty(data.n_rows)


@eqx.filter_jit
def bulk_value_and_grad(fs: AbstractFactorSet, data: BulkData) -> tuple[Array, Any]:
    """``(bulk_loss, its gradient)`` with respect to ``fs``'s arrays."""
    return eqx.filter_value_and_grad(bulk_loss)(fs, data)


@eqx.filter_jit
def bulk_hvp(fs: AbstractFactorSet, data: BulkData, v: AbstractFactorSet) -> Any:
    """Hessian of :func:`bulk_loss` times ``v`` (a pytree like ``fs``), chunk by
    chunk (forward over reverse): for a Laplace approximation at the optimum."""
    dyn, static = eqx.partition(fs, eqx.is_inexact_array)
    vdyn = eqx.filter(v, eqx.is_inexact_array)

    def grad_of(d):
        return jax.grad(lambda d_: _plain_loss(eqx.combine(d_, static), data))(d)

    return jax.jvp(grad_of, (dyn,), (vdyn,))[1]


def fit_steps(
    factor_set: AbstractFactorSet,
    stats: BatchStats,
    deployments: Deployment,
    group: ArrayLike,
    target: ArrayLike,
    *,
    weights: ArrayLike | None = None,
    solver="lbfgs",
    max_steps: int = 500,
    learning_rate: float = 0.05,
    gtol: float | None = None,
    rtol: float | None = None,
    chunk_size: int = 2**11,
    dtype=jnp.float32,
    devices=None,
    throw: bool = True,
    target_name: str = "target",
) -> FitResult:
    """Fit a roofline factor set to millions of steps: :func:`diffmodel.fit` on the
    bulk evaluator (chunked loss, gradient accumulated across chunks, rows sharded
    over ``devices``).

    Args:
        factor_set: a global, per-model or hierarchical set whose groups are the
            deployments' (``group`` indexes both).
        stats, deployments, group, target, weights: as in :func:`bulk_data`.
        solver, max_steps, learning_rate, throw: as in :func:`diffmodel.minimise`.
        gtol, rtol: convergence tolerances (default by dtype: ``1e-7``/``1e-10``
            in float64, ``1e-5``/``1e-6`` in float32).
        chunk_size, dtype, devices: as in :func:`bulk_data`.

    Returns:
        A :class:`diffmodel.FitResult`; ``wall_seconds`` covers the optimisation
        (not the layout of the data).
    """
    if factor_set.kind() not in ROOFLINE_KINDS:
        raise ValueError(
            f"fit_steps fits roofline factor sets {ROOFLINE_KINDS}, got "
            f"{factor_set.kind()!r} (fit the study's sets with diffmodel.fit)"
        )
    data = bulk_data(
        stats,
        deployments,
        group,
        target,
        weights,
        chunk_size=chunk_size,
        dtype=dtype,
        devices=devices,
    )
    n_groups = int(jnp.shape(data.deployments.tp)[0])
    own = factor_set.fitted_groups()
    if own and len(own) != n_groups:
        raise ValueError(
            f"factor_set has {len(own)} groups, deployments have {n_groups}"
        )
    if own:
        counts = np.bincount(np.asarray(group), minlength=n_groups)
        empty = [lab for lab, c in zip(own, counts, strict=True) if c == 0]
        if empty:
            raise ValueError(f"group(s) {empty} have no rows to fit")
    f64 = np.dtype(dtype) == np.float64
    res = minimise(
        bulk_loss,
        factor_set,
        data,
        solver=solver,
        learning_rate=learning_rate,
        max_steps=max_steps,
        gtol=(1e-7 if f64 else 1e-5) if gtol is None else gtol,
        rtol=(1e-10 if f64 else 1e-6) if rtol is None else rtol,
        throw=throw,
    )
    return FitResult.from_optimiser(res, target_name)
