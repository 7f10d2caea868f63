"""A GPU's shape effects, read from its kernel tables: a smooth grid of log-time
corrections over three log sizes, a GEMM's ``(log2 m, log2 n, log2 k)`` (attention:
batch x heads, tokens per sequence, heads per KV head).

Which kernel cuBLAS (or CUTLASS) runs for a GEMM, its tile shape, split-K and wave
count, depends on all three of ``m``, ``n`` and ``k`` at once, and moves the time by
+-10-30% from one shape to the next in ways no size, wave or padding term of the
curves follows (tried: low-order polynomials in the three log sizes took the held-out
shapes' median MAPE over the database's GPUs from 10.8 to 10.1% for bf16 GEMMs; the
grid below takes it to about 8.8%). The kernel tables measure those effects on a grid
of shapes, so a GPU's own tables can carry them: :class:`ShapeGrid` is the residual
``log(measured / curves)`` of the GPU's GEMMs, fitted on a regular grid in log2 space
(``step`` octaves per cell) with a penalty on the differences between neighbouring
cells, and read back by trilinear interpolation (continuous, piecewise-linear in the
log sizes, so ``jax.grad`` flows through it). Shapes beyond the grid take its edge.

The same holds for attention kernels (tiling of the query heads a KV head serves,
KV splits): a grid over ``(batch x heads, tokens, heads per KV head)`` takes prefill
attention's held-out shapes from 12.7 to about 10% median, decode attention's from
11.6 to about 10% (scratch, same split). It belongs to one GPU (and one library
version): a GPU whose tables were not measured has no grid, and curves pooled from
other GPUs carry none.
"""

from typing import Any

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

GRID_STEP = 2.0
"""Octaves of each size per grid cell of a :class:`ShapeGrid` made by hand."""

GRID_STEPS = (1.0, 2.0, 3.0)
"""Candidate octaves per cell; :func:`fit_shape_grid` picks one by K-fold over
shapes, with the smoothing."""

GRID_SMOOTHING = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
"""Candidate penalties on neighbouring cells' differences (relative to one row's
squared log residual); :func:`fit_shape_grid` picks one by K-fold over shapes."""


class ShapeGrid(eqx.Module):
    """Log-time correction of one kernel family on one GPU, over three sizes: a
    GEMM ``[m, k] @ [k, n]``'s ``(m, n, k)`` (attention:
    ``KernelWork.grid_a, grid_b, grid_c``).

    ``t -> t exp(g(log2 m, log2 n, log2 k))``, ``g`` the trilinear interpolation of
    ``values`` at the sizes clipped to the grid.

    Attributes:
        values: ``[cells_m, cells_n, cells_k]`` log corrections (dimensionless).
        lo: static ``(log2 m, log2 n, log2 k)`` of the first cell.
        step: static octaves per cell.
        smoothing: static penalty the grid was fitted with (for the record).
    """

    values: Float[Array, "a b c"]
    lo: tuple[float, float, float] = eqx.field(static=True)
    step: float = eqx.field(static=True, default=GRID_STEP)
    smoothing: float = eqx.field(static=True, default=0.0)

    def __call__(
        self, m: ArrayLike, n: ArrayLike, k: ArrayLike
    ) -> Float[Array, "*kernels"]:
        """The log correction of each kernel (sizes ``>= 1``; smaller ones, e.g.
        an empty GEMM's ``m = 0``, take the first cell)."""
        values = jnp.asarray(self.values)
        shape = values.shape
        pos, frac = [], []
        for axis, x in enumerate((m, n, k)):
            lx = jnp.log2(jnp.maximum(jnp.asarray(x, values.dtype), 1.0))
            f = jnp.clip((lx - self.lo[axis]) / self.step, 0.0, shape[axis] - 1.0)
            i0 = jnp.clip(jnp.floor(f), 0.0, max(shape[axis] - 2.0, 0.0))
            pos.append(i0.astype(jnp.int32))
            frac.append(f - i0)
        pos = jnp.broadcast_arrays(*pos)
        frac = jnp.broadcast_arrays(*frac)
        out = jnp.zeros(pos[0].shape, values.dtype)
        for corner in range(8):
            bits = [(corner >> a) & 1 for a in range(3)]
            if any(b and shape[a] == 1 for a, b in enumerate(bits)):
                continue
            w = 1.0
            idx = []
            for a, b in enumerate(bits):
                w = w * (frac[a] if b else 1.0 - frac[a])
                idx.append(pos[a] + b)
            out = out + w * values[idx[0], idx[1], idx[2]]
        return out

    def to_json(self) -> dict[str, Any]:
        v = np.asarray(self.values, np.float64)
        return {
            "unit": "log(time) correction at (log2 m, log2 n, log2 k)",
            "lo": [float(x) for x in self.lo],
            "step": float(self.step),
            "smoothing": float(self.smoothing),
            "shape": list(v.shape),
            "values": [float(x) for x in v.ravel()],
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "ShapeGrid":
        try:
            shape = tuple(int(s) for s in obj["shape"])
            values = np.asarray(obj["values"], np.float64)
            lo = tuple(float(x) for x in obj["lo"])
            step = float(obj["step"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"shape_grid: malformed ({err!r})") from err
        if (
            len(shape) != 3
            or len(lo) != 3
            or values.size != int(np.prod(shape))
            or min(shape) < 1
            or not step > 0
            or not np.all(np.isfinite(values))
        ):
            raise ValueError(
                "shape_grid: expected 3 positive 'shape' sizes, 3 'lo' values, a "
                "positive 'step' and prod(shape) finite 'values'"
            )
        return cls(
            values=jnp.asarray(values.reshape(shape), jnp.result_type(float)),
            lo=lo,
            step=step,
            smoothing=float(obj.get("smoothing", 0.0)),
        )


def _interp_matrix(coords: np.ndarray, lo: np.ndarray, step: float, shape):
    """Sparse ``[rows, cells]`` trilinear weights of each row's log2 sizes (the
    same interpolation as :meth:`ShapeGrid.__call__`)."""
    import scipy.sparse as sp

    f = np.clip((coords - lo) / step, 0.0, np.asarray(shape, float) - 1.0)
    i0 = np.clip(np.floor(f), 0.0, np.maximum(np.asarray(shape, float) - 2.0, 0.0))
    t = f - i0
    i0 = i0.astype(int)
    n = len(coords)
    rows, cols, vals = [], [], []
    for corner in range(8):
        bits = np.array([(corner >> a) & 1 for a in range(3)])
        if any(b and shape[a] == 1 for a, b in enumerate(bits)):
            continue
        w = np.prod([t[:, a] if b else 1.0 - t[:, a] for a, b in enumerate(bits)], 0)
        flat = np.ravel_multi_index((i0 + bits).T, shape)
        rows.append(np.arange(n))
        cols.append(flat)
        vals.append(w)
    return sp.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
        shape=(n, int(np.prod(shape))),
    )


def _solve(a, r, shape, smoothing: float) -> np.ndarray:
    """Cell values minimising ``|a v - r|^2 + smoothing * sum of squared
    neighbour differences`` (plus a tiny ridge for cells no row touches)."""
    import scipy.sparse as sp
    import scipy.sparse.linalg as sla

    eye = [sp.identity(s, format="csr") for s in shape]
    penalty = []
    for axis, s in enumerate(shape):
        if s < 2:
            continue
        diff = sp.diags([-np.ones(s - 1), np.ones(s - 1)], [0, 1], shape=(s - 1, s))
        mats = list(eye)
        mats[axis] = diff
        penalty.append(np.sqrt(smoothing) * sp.kron(sp.kron(mats[0], mats[1]), mats[2]))
    penalty.append(1e-3 * sp.identity(a.shape[1]))
    m = sp.vstack([a, *penalty]).tocsr()
    b = np.concatenate([r, np.zeros(m.shape[0] - a.shape[0])])
    return sla.lsqr(m, b, atol=1e-10, btol=1e-10, iter_lim=20_000)[0]


def fit_shape_grid(
    m: ArrayLike,
    n: ArrayLike,
    k: ArrayLike,
    log_residual: ArrayLike,
    *,
    step: float | tuple[float, ...] = GRID_STEPS,
    smoothing: float | tuple[float, ...] = GRID_SMOOTHING,
    folds: int = 5,
    seed: int = 0,
    groups: ArrayLike | None = None,
) -> tuple[ShapeGrid, dict[tuple[float, float], float]]:
    """A :class:`ShapeGrid` fitted to ``log_residual = log(measured / predicted)``
    of kernels of sizes ``m, n, k`` (``>= 1``; a GEMM's, or ``KernelWork``'s
    ``grid_a, grid_b, grid_c``).

    With several ``(step, smoothing)`` pairs (each a value or a tuple of
    candidates), each pair is scored by ``folds``-fold cross-validation over whole
    shapes (``groups``: each row's shape, e.g. an attention layer's head layout;
    default the GEMMs' ``(n, k)``: the rows of a shape are left out together, as an
    unmeasured layer would be) and the one of lowest mean absolute left-out residual
    is refitted on every row.

    Returns:
        ``(grid, scores)``: scores maps each ``(step, smoothing)`` to its
        cross-validated mean absolute log residual (empty with one pair).

    Raises:
        ValueError: sizes below 1, non-finite residuals, mismatched lengths, a bad
            step or smoothing.
    """
    sizes = [np.asarray(x, np.float64).ravel() for x in (m, n, k)]
    r = np.asarray(log_residual, np.float64).ravel()
    if len({len(s) for s in sizes} | {len(r)}) != 1 or len(r) == 0:
        raise ValueError(
            "fit_shape_grid: m, n, k and log_residual must be 1-D arrays of one "
            "length, non-empty"
        )
    for name, s in zip("mnk", sizes, strict=True):
        if not np.all(np.isfinite(s)) or (s < 1).any():
            raise ValueError(f"fit_shape_grid: {name} must be finite and >= 1")
    if not np.all(np.isfinite(r)):
        raise ValueError("fit_shape_grid: log_residual must be finite")
    steps = (step,) if np.isscalar(step) else tuple(step)
    if not steps or any(not x > 0 for x in steps):
        raise ValueError(f"fit_shape_grid: step must be > 0, got {step!r}")
    smooths = (smoothing,) if np.isscalar(smoothing) else tuple(smoothing)
    if not smooths or any(not x > 0 for x in smooths):
        raise ValueError(f"fit_shape_grid: smoothing must be > 0, got {smoothing!r}")
    coords = np.log2(np.stack(sizes, axis=1))
    lo = np.floor(coords.min(axis=0))

    def layout(st):
        shape = tuple(int(x) for x in np.ceil((coords.max(axis=0) - lo) / st) + 1)
        return shape, _interp_matrix(coords, lo, st, shape)

    scores: dict[tuple[float, float], float] = {}
    if len(steps) * len(smooths) > 1:
        if groups is None:
            _, weight = np.unique(coords[:, 1:], axis=0, return_inverse=True)
        else:
            g = np.asarray(groups).ravel()
            if g.shape != r.shape:
                raise ValueError("fit_shape_grid: groups must give each row's shape")
            _, weight = np.unique(g, return_inverse=True)
        weight = weight.ravel()
        order = np.random.default_rng(seed).permutation(weight.max() + 1)
        fold_of = order[weight] % max(2, folds)
        for st in steps:
            shape, a = layout(st)
            for sm in smooths:
                err = np.empty(len(r))
                for f in range(max(2, folds)):
                    out = fold_of == f
                    if not out.any() or out.all():
                        err[out] = np.abs(r[out])
                        continue
                    v = _solve(a[~out], r[~out], shape, sm)
                    err[out] = np.abs(a[out] @ v - r[out])
                scores[(float(st), float(sm))] = float(err.mean())
        best_step, best_smooth = min(scores, key=scores.get)
    else:
        best_step, best_smooth = float(steps[0]), float(smooths[0])
    shape, a = layout(best_step)
    v = _solve(a, r, shape, best_smooth)
    grid = ShapeGrid(
        values=jnp.asarray(v.reshape(shape), jnp.result_type(float)),
        lo=tuple(float(x) for x in lo),
        step=best_step,
        smoothing=best_smooth,
    )
    return grid, scores
