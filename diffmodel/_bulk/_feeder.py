"""The chunked engine: host arrays fed to devices chunk by chunk, without a copy
where possible, with chunks kept in flight while results are copied out."""

import collections
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .._model._batch import BatchStats, request_terms
from .._model._roofline import COMPONENTS
from ._rewrite import _ALIGN_ELEMS, _evaluate, _group_tables, _table_plan

# Host buffers handed to XLA:CPU without a copy must be 64-byte aligned; chunk lengths
# are multiples of this many elements so that chunk starts stay aligned.
_ALIGN_BYTES = 64
# Chunks dispatched ahead of the one being copied out (see _run_chunks).
_IN_FLIGHT = 3
# Staging buffers the feeder cycles through: one per chunk that may be in flight
# while the next is staged (see _Feeder).
_N_STAGING = _IN_FLIGHT + 1


def _stats_kernel(cols, group, tables, deployments, factors, components):
    stats = BatchStats(*cols)
    out = _evaluate(stats, deployments, group, factors, components, tables)[0]
    # The value check, fused into the loop that reads the statistics anyway: a step
    # with a negative or NaN statistic gets a NaN total (named afterwards, in NumPy).
    # Comparisons and ``and`` rather than a NaN-propagating minimum, which XLA:CPU
    # expands into several instructions (``NaN >= 0`` is false).
    ok = functools.reduce(jnp.logical_and, [c >= 0 for c in cols])
    total = out[0] if components else out
    total = jnp.where(ok, total, jnp.full_like(total, jnp.nan))
    return (total, out[1]) if components else total


def _requests_kernel(cols, group, tables, deployments, factors, components):
    new, ctx, mask = cols
    stats = _sum_requests(request_terms(new, ctx, mask))
    stats = jax.tree.map(lambda x: x.astype(new.dtype), stats)  # float64 under x64
    return _evaluate(stats, deployments, group, factors, components, tables)[0]


@functools.partial(jax.jit, static_argnames=("kernel", "plan", "shapes", "components"))
def _chunk(
    windows, offsets, tables, deployments, factors, *, kernel, plan, shapes, components
):
    """One chunk: ``kernel`` on the arrays of ``shapes`` found in ``windows``.

    A window is either the array itself or a flat run of its elements that starts at
    a 64-byte boundary at or before it, the array beginning ``offsets[k]`` elements
    in: that lets XLA:CPU read a misaligned host array without a copy (see
    :class:`_Feeder`).
    """
    arrays = []
    for k, (w, shape) in enumerate(zip(windows, shapes, strict=True)):
        if w.shape != shape:
            size = int(np.prod(shape))
            w = jax.lax.dynamic_slice(w, (offsets[k],), (size,)).reshape(shape)
        arrays.append(w)
    *cols, group = arrays
    tables = (tables, plan)
    return kernel(tuple(cols), group, tables, deployments, factors, components)


def _sum_requests(terms) -> BatchStats:
    """:func:`diffmodel.from_requests`'s sums over the request axis, in one pass.

    One variadic reduction: XLA:CPU fuses the per-slot terms into a single loop over
    the slots that keeps all seven sums in registers, where seven separate sums
    (each a reduction over the minor axis) re-read the inputs and run ~8x slower.
    """
    zeros = tuple(jnp.zeros((), x.dtype) for x in terms)
    sums = jax.lax.reduce(
        tuple(terms),
        zeros,
        lambda a, b: tuple(x + y for x, y in zip(a, b, strict=True)),
        (terms[0].ndim - 1,),
    )
    return BatchStats(*sums)


# chunked engine


def _resolve_devices(devices) -> list:
    if devices is None:
        return list(jax.devices())
    devices = list(devices) if isinstance(devices, Sequence) else [devices]
    if not devices:
        raise ValueError("devices must name at least one device")
    return devices


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _chunk_len(n: int, chunk_size: int | None, multiple: int) -> int:
    """Fixed chunk length: ``chunk_size`` (or ``n``), never far above ``n``."""
    if chunk_size is not None and (int(chunk_size) != chunk_size or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None: {chunk_size}")
    want = max(n, 1) if chunk_size is None else min(int(chunk_size), max(n, 1))
    if chunk_size is not None and want < chunk_size:
        # Short inputs: the next power of two, so few shapes are ever compiled.
        want = 1 << (want - 1).bit_length()
    return _round_up(want, multiple)


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]  # ~100x cheaper than ``a.ctypes.data``


def _aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + _ALIGN_BYTES, np.uint8)
    off = (-_address(raw)) % _ALIGN_BYTES
    return raw[off : off + nbytes].view(dtype).reshape(shape)


class _Feeder:
    """Hands chunks of host arrays to devices, without a copy where possible.

    XLA:CPU reads a host buffer in place (``jax.device_put`` aliases it) only if it
    starts at a 64-byte boundary; NumPy's own arrays usually start 16 bytes past one.
    On one device, chunk ``k`` of a contiguous array of the right dtype therefore goes
    as a *window*: a flat run of its elements from the boundary at or before the
    chunk, ``chunk + pad`` long, with the chunk's offset into it, sliced out inside
    the compiled function. Where no such window lies inside the array (the first
    chunk of a misaligned array, the last, padded chunk), and for strided arrays,
    other dtypes, or several devices (a window would straddle shards), the chunk is
    copied into one of ``_IN_FLIGHT + 1`` reused aligned staging buffers. XLA reads
    a staged buffer in place and asynchronously, so a buffer may be refilled only
    once the chunk it held has been collected: chunk ``i`` is staged while chunks
    ``i - _IN_FLIGHT .. i - 1`` may still be computing, hence one buffer more than
    chunks in flight.
    """

    def __init__(self, arrays, dtypes, chunk: int, sharding, pad_values, windows):
        self.arrays, self.dtypes, self.chunk = arrays, dtypes, chunk
        self.sharding, self.pad_values = sharding, pad_values
        self.windows = windows
        self.shapes = tuple((chunk, *a.shape[1:]) for a in arrays)
        self.flat = []
        for a, dt in zip(arrays, dtypes, strict=True):
            ok = a.dtype == dt and a.flags.c_contiguous
            ok = ok and _address(a) % a.itemsize == 0
            self.flat.append(a.reshape(-1) if ok else None)
        self.pad = [
            _ALIGN_BYTES // np.dtype(dt).itemsize if windows else 0 for dt in dtypes
        ]
        self.window_shapes = tuple(
            (int(np.prod(s)) + p,) if windows else s
            for s, p in zip(self.shapes, self.pad, strict=True)
        )
        # Allocated on first use: most chunks of a large aligned array need none.
        self.staging = [[None] * len(arrays) for _ in range(_N_STAGING)]

    def __call__(self, i: int, start: int) -> tuple[list, np.ndarray]:
        out, offsets = [], np.zeros(len(self.arrays), np.int32)
        for k, (a, flat) in enumerate(zip(self.arrays, self.flat, strict=True)):
            part = self._window(k, a, flat, start, offsets)
            if part is None:
                slot = self.staging[i % _N_STAGING]
                if slot[k] is None:
                    slot[k] = _aligned_empty(self.window_shapes[k], self.dtypes[k])
                buf = slot[k]
                rows = a[start : start + self.chunk]
                m = rows.size
                view = buf.reshape(-1)
                view[:m] = rows.reshape(-1)
                view[m:] = self.pad_values[k]
                part = buf
            # On one device the jitted call takes NumPy arrays as they are (in place
            # when aligned): ~10x less overhead per chunk than jax.device_put.
            out.append(part if self.windows else jax.device_put(part, self.sharding))
        return out, offsets

    def _window(self, k, a, flat, start, offsets):
        if flat is None:
            return None
        if not self.windows:  # several devices: the chunk itself, if aligned
            part = a[start : start + self.chunk]
            whole = part.shape[0] == self.chunk
            return part if whole and _address(part) % _ALIGN_BYTES == 0 else None
        size = self.window_shapes[k][0] - self.pad[k]
        lo = start * (size // self.chunk)
        off = ((_address(flat) + lo * a.itemsize) % _ALIGN_BYTES) // a.itemsize
        first, stop = lo - off, lo - off + size + self.pad[k]
        if first < 0 or stop > flat.size:
            return None
        offsets[k] = off
        return flat[first:stop]


# Deployments, factors and their per-group tables, on the devices, of the last few
# calls: a caller that predicts batch after batch for the same deployments (a
# simulator, a scheduler) pays their transfer and the tables once, not per call.
_PREPARED: collections.OrderedDict = collections.OrderedDict()
_PREPARED_MAX = 8


def _prepared(deployments, factors, components, dtype, devices, replicated):
    """``(deployments, factors, distinct tables, plan)`` on ``devices``, cached by
    value: the bytes of every (host, already cast) leaf, the tree, the dtype, the
    components flag and the devices."""
    leaves, tree = jax.tree.flatten((deployments, factors))
    key = (
        tree,
        tuple((x.dtype.str, x.shape, x.tobytes()) for x in map(np.asarray, leaves)),
        components,
        dtype.str,
        tuple(d.id for d in devices),
    )
    hit = _PREPARED.get(key)
    if hit is not None:
        _PREPARED.move_to_end(key)
        return hit
    deployments = jax.device_put(deployments, replicated)
    factors = jax.device_put(factors, replicated)
    tables = _group_tables(deployments, factors, components=components, dtype=dtype)
    hit = (deployments, factors, *_table_plan(tables))
    _PREPARED[key] = hit
    if len(_PREPARED) > _PREPARED_MAX:
        _PREPARED.popitem(last=False)
    return hit


def _run_chunks(
    kernel,
    arrays,
    dtypes,
    pad_values,
    group,
    n: int,
    steps_per_chunk: int | None,
    *,
    out_dtype,
    deployments,
    factors,
    components: bool,
    devices,
    on_nan=None,
    out=None,
):
    devices = _resolve_devices(devices)
    if len(devices) > 1:
        mesh = Mesh(np.asarray(devices), ("steps",))
        sharding = NamedSharding(mesh, PartitionSpec("steps"))
        replicated = NamedSharding(mesh, PartitionSpec())
    else:
        sharding = replicated = devices[0]
    chunk = _chunk_len(n, steps_per_chunk, _ALIGN_ELEMS * len(devices))
    deployments, factors, tables, plan = _prepared(
        deployments, factors, components, np.dtype(out_dtype), devices, replicated
    )
    feeder = _Feeder(
        [*arrays, group],
        [*dtypes, np.int32],
        chunk,
        sharding,
        [*pad_values, 0],
        windows=len(devices) == 1,
    )
    fn = functools.partial(
        _chunk, kernel=kernel, plan=plan, shapes=feeder.shapes, components=components
    )
    names = ("total", *COMPONENTS) if components else ("total",)
    outs = {k: np.empty(n, out_dtype) for k in names} if out is None else {"total": out}
    nan = [False]

    def collect(start, result):
        stop = min(start + chunk, n)
        parts = {"total": result[0], **result[1]} if components else {"total": result}
        for k in names:
            outs[k][start:stop] = np.asarray(parts[k])[: stop - start]
        # A maximum is NaN or infinite if any entry is (NumPy's maximum propagates
        # NaN; times are >= 0): one read, in cache, ~4x faster than a sum.
        nan[0] = nan[0] or not np.isfinite(np.max(outs["total"][start:stop]))

    # Keep ``_IN_FLIGHT`` chunks dispatched: XLA:CPU runs independent executions
    # on its thread pool, so with two in flight both cores compute while the host
    # copies finished results out.
    pending: collections.deque = collections.deque()
    for i, start in enumerate(range(0, n, chunk)):
        windows, offsets = feeder(i, start)
        pending.append(
            (start, fn(tuple(windows), offsets, tables, deployments, factors))
        )
        if len(pending) > _IN_FLIGHT:
            collect(*pending.popleft())
    while pending:
        collect(*pending.popleft())
    if nan[0] and on_nan is not None:
        on_nan()
    if nan[0]:
        total = outs["total"]
        i = int(np.flatnonzero(~np.isfinite(total))[0])
        raise ValueError(
            f"the step time of step {i} is {total[i]} (not finite): its inputs are "
            f"too large for {np.dtype(out_dtype).name} (or the factors or tables "
            "are not finite)"
        )
    return outs if components else outs["total"]
