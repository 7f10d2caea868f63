"""Accuracy metrics for step-time predictions, in percent where they are relative.

All take ``(actual, predicted)`` as 1-D arrays of equal length, free of NaN, with
positive actual values (microseconds, or any one unit shared by both); anything else
is a ``ValueError``, never a NaN.

- ``mape``: mean absolute percentage error, ``mean(|pred - actual| / actual) * 100``.
- ``mspe``: signed mean percentage error, ``mean((pred - actual) / actual) * 100``;
  positive means over-prediction.
- ``p99_ape``: 99th percentile of ``|pred - actual| / actual * 100`` (linear
  interpolation between order statistics, numpy's default).
- ``pearson_r``: Pearson correlation of actual and predicted (unitless).
"""

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
import numpy.typing as npt
import pandas as pd

ArrayLike = npt.ArrayLike


def log_ratio_loss(predicted, actual, weights=None):
    """``mean(w (ln predicted - ln actual)^2) / mean(w)``, unitless, differentiable.

    The one loss every fit in the package minimises: symmetric in over- and
    under-prediction, scale-free. ``weights`` (default: all ones) are per-row.
    """
    r2 = (jnp.log(predicted) - jnp.log(actual)) ** 2
    if weights is None:
        return jnp.mean(r2)
    return jnp.sum(weights * r2) / jnp.sum(weights)


def _pair(
    actual: ArrayLike, predicted: ArrayLike, *, positive: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(actual, dtype=np.float64)
    p = np.asarray(predicted, dtype=np.float64)
    if a.ndim != 1 or p.ndim != 1:
        raise ValueError(
            f"actual and predicted must be 1-D, got shapes {a.shape} and {p.shape}"
        )
    if a.shape != p.shape:
        raise ValueError(
            f"actual and predicted differ in length: {a.shape[0]} != {p.shape[0]}"
        )
    if a.size == 0:
        raise ValueError("actual and predicted are empty")
    for name, values in (("actual", a), ("predicted", p)):
        bad = ~np.isfinite(values)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{name} has a NaN or infinite value at index {i}")
    if positive and (a <= 0).any():
        i = int(np.flatnonzero(a <= 0)[0])
        raise ValueError(f"actual must be positive; index {i} has {a[i]}")
    return a, p


def _ape(actual: ArrayLike, predicted: ArrayLike) -> np.ndarray:
    a, p = _pair(actual, predicted)
    return np.abs(p - a) / a * 100.0


def mape(actual: ArrayLike, predicted: ArrayLike) -> float:
    """Mean absolute percentage error, in percent."""
    return float(np.mean(_ape(actual, predicted)))


def mspe(actual: ArrayLike, predicted: ArrayLike) -> float:
    """Signed mean percentage error, ``mean((pred - actual) / actual) * 100``."""
    a, p = _pair(actual, predicted)
    return float(np.mean((p - a) / a) * 100.0)


def p99_ape(actual: ArrayLike, predicted: ArrayLike) -> float:
    """99th percentile of the absolute percentage error, in percent."""
    return float(np.percentile(_ape(actual, predicted), 99))


def pearson_r(actual: ArrayLike, predicted: ArrayLike) -> float:
    """Pearson correlation coefficient (unitless, in [-1, 1]).

    Needs at least two points and non-constant `actual` and `predicted`. Actual
    values need not be positive.
    """
    a, p = _pair(actual, predicted, positive=False)
    if a.size < 2:
        raise ValueError("pearson_r needs at least 2 points")
    da, dp = a - a.mean(), p - p.mean()
    scale = np.sqrt(np.sum(da * da) * np.sum(dp * dp))
    if scale == 0:
        raise ValueError("pearson_r is undefined when actual or predicted is constant")
    return float(np.clip(np.sum(da * dp) / scale, -1.0, 1.0))


def metrics_table(
    frame: pd.DataFrame,
    *,
    actual: str,
    predicted: str,
    by: str | Sequence[str] | None = "experiment_id",
) -> pd.DataFrame:
    """Per-group accuracy of column `predicted` against column `actual`.

    **Arguments:**

    - `frame`: one row per step.
    - `actual`, `predicted`: column names (same unit, e.g. microseconds).
    - `by`: the grouping column(s); ``None`` for one row named ``'all'``.

    **Returns:** a frame indexed by group with columns ``mape``, ``mspe``,
    ``pearson_r``, ``p99_ape`` (percent, except ``pearson_r``) and ``n`` (rows).
    ``pearson_r`` is NaN for a group where it is undefined (fewer than two rows or a
    constant column); every other problem raises ``ValueError``, naming the group.
    """
    keys = [] if by is None else [by] if isinstance(by, str) else list(by)
    missing = [c for c in [actual, predicted, *keys] if c not in frame.columns]
    if missing:
        raise ValueError(f"metrics_table: frame is missing columns {missing}")
    for key in keys:
        empty = frame[key].isna()
        if empty.any():
            raise ValueError(
                f"metrics_table: column {key!r} has no group at {int(empty.sum())} "
                f"rows (first: row {int(np.flatnonzero(empty.to_numpy())[0])}); every "
                "row must name its group (groupby would drop them)"
            )
    if keys:
        groups = frame.groupby(keys if len(keys) > 1 else keys[0], sort=True)
    else:
        groups = [("all", frame)]
    rows = {}
    for name, group in groups:
        try:
            rows[name] = _metrics_row(group[actual], group[predicted])
        except ValueError as err:
            raise ValueError(f"metrics_table: group {name!r}: {err}") from None
    out = pd.DataFrame.from_dict(rows, orient="index")
    if len(keys) > 1:
        out.index = pd.MultiIndex.from_tuples(out.index, names=keys)
    else:
        out.index.name = keys[0] if keys else None
    return out


def _metrics_row(actual: pd.Series, predicted: pd.Series) -> dict[str, float]:
    a = actual.to_numpy(dtype=np.float64)
    p = predicted.to_numpy(dtype=np.float64)
    try:
        r = pearson_r(a, p)
    except ValueError:
        _pair(a, p)  # Re-raise anything that is not pearson_r's own undefinedness.
        r = np.nan
    return {
        "mape": mape(a, p),
        "mspe": mspe(a, p),
        "pearson_r": r,
        "p99_ape": p99_ape(a, p),
        "n": len(a),
    }


def count_under(mapes: ArrayLike, threshold: float) -> int:
    """How many of `mapes` (percent) are strictly below `threshold` (percent)."""
    values = np.asarray(mapes, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"mapes must be 1-D, got shape {values.shape}")
    if np.isnan(values).any():
        raise ValueError(
            f"mapes has NaN at index {int(np.flatnonzero(np.isnan(values))[0])}"
        )
    if not np.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")
    return int(np.sum(values < threshold))
