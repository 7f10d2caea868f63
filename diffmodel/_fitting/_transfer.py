"""Transfer noise: how far a fit's predictions miss on data it never saw.

A fit's own residuals measure the scatter around the deployments it was fitted to;
predicting a new model, workload or GPU misses by more. :func:`transfer_noise`
measures that miss *inside the training data*, by nested leave-one-out over a column
(``experiment_id``, ``model``, ``workload``...): refit without each of its values,
predict the left-out rows, and take the root-mean-square log-ratio residual per
regime (prefill-carrying, decode-only steps) of all left-out rows together. Predictive
intervals for rows of deployments outside the training data use it in place of the
fit's in-sample noise (see :func:`diffmodel.predict`).

No test row is touched: the estimate is a property of the training frame, and is only
as good as the variety it holds (two deployments of one model say nothing about a
third model).
"""

from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
import pandas as pd

from ._intervals import regime_noise_sd


def transfer_values(frame: pd.DataFrame, by: str) -> list:
    """The distinct values of column ``by`` (two or more, none missing)."""
    if by not in frame.columns:
        raise ValueError(
            f"transfer_by {by!r}: no such column; columns are {list(frame.columns)}"
        )
    col = frame[by]
    if col.isna().any():
        raise ValueError(
            f"transfer_by {by!r}: {int(col.isna().sum())} rows have no value; every "
            "row must name its group"
        )
    values = list(dict.fromkeys(col))
    if len(values) < 2:
        raise ValueError(
            f"transfer_by {by!r}: needs two or more values to leave one out, the frame "
            f"has {values}"
        )
    return values


def transfer_noise(
    frame: pd.DataFrame,
    valid: pd.DataFrame | None,
    *,
    by: str,
    target: str,
    refit: Callable[[pd.DataFrame, pd.DataFrame | None], object],
    step_data: Callable[[pd.DataFrame], tuple[object, tuple[str, ...]]],
) -> tuple[float, float]:
    """Per-regime ``(prefill, decode_only)`` log-scale transfer noise sd (unitless).

    Args:
        frame: the training rows (with ``target`` and column ``by``).
        valid: optional validation rows of the same fit (early stopping of the
            refits: each refit drops the left-out value's rows from it too).
        by: column whose values are left out one at a time.
        target: target column, us.
        refit: ``(train, valid) -> FitResult``, the fit's own settings.
        step_data: ``frame -> (StepData, labels)`` with the fit's deployment flags.

    Raises:
        ValueError: a bad ``by`` column (see :func:`transfer_values`), or no left-out
            row the refits can predict (per-model factors, one row per deployment).
    """
    residuals, prefill = [], []
    for value in transfer_values(frame, by):
        keep = frame[by] != value
        inner_valid = None
        if valid is not None and by in valid.columns:
            inner_valid = valid[valid[by] != value]
            inner_valid = inner_valid if len(inner_valid) else None
        result = refit(frame[keep], inner_valid)
        left = frame[~keep]
        data, labels = step_data(left)
        fs, known = result.factor_set.reindex(labels)
        ok = np.asarray(known)[np.asarray(data.group)]
        if not ok.any():
            continue
        pred = np.asarray(fs.predict(data))
        y = left[target].to_numpy(dtype=float)
        residuals.append((np.log(pred) - np.log(y))[ok])
        prefill.append(np.asarray(jnp.asarray(data.stats.prefill_tokens) > 0)[ok])
    if not residuals:
        raise ValueError(
            f"transfer_by {by!r}: no left-out row could be predicted (per-model "
            "factors know only the deployments they were fitted to; use hierarchical)"
        )
    by_regime = regime_noise_sd(np.concatenate(residuals), np.concatenate(prefill))
    return by_regime["prefill"], by_regime["decode_only"]
