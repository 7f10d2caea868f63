"""Train/validation/test splits of a step table, as in the study.

- ``temporal_split``: per experiment, in ``step.id`` order, the first 60% of rows for
  training, the next 20% for validation, the rest for testing.
- ``leave_one_out``: hold out every row of one model (or one workload) and train on
  the rest. Model names are canonicalised first (``diffmodel.canonical_model``,
  strict: a name that is not a known model is an error), so that
  ``llama-2-70b`` and ``llama-2-70b-hf``, one model under two names, form one fold.
"""

from collections.abc import Iterator

import numpy as np
import pandas as pd

from .._model._arch import canonical_model

SPLIT_LABELS: tuple[str, str, str] = ("train", "valid", "test")


def split_sizes(
    n: int, fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
) -> tuple[int, int, int]:
    """Rows for ``(train, valid, test)`` out of `n`.

    ``n_train = round(n * f_train)``, ``n_valid = round(n * f_valid)`` (Python's
    ``round``), and the test split takes the rest; this reproduces the study's
    ``seed_split_sizes.csv`` (e.g. 5992 rows -> 3595, 1198, 1199).
    """
    _check_fractions(fractions)
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    n_train = min(round(n * fractions[0]), n)
    n_valid = min(round(n * fractions[1]), n - n_train)
    return n_train, n_valid, n - n_train - n_valid


def temporal_split(
    frame: pd.DataFrame, *, fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
) -> pd.Series:
    """Label each row ``'train'``, ``'valid'`` or ``'test'``, per experiment in time.

    Within each ``experiment_id``, rows are ordered by ``step.id`` (stably) and cut by
    ``split_sizes``: the earliest rows train, the latest test.

    **Returns:** a string ``Series`` named ``split`` on `frame`'s index.
    """
    _check_fractions(fractions)
    missing = [c for c in ("experiment_id", "step.id") if c not in frame.columns]
    if missing:
        raise ValueError(f"temporal_split: frame is missing columns {missing}")
    labels = np.empty(len(frame), dtype=object)
    codes = pd.factorize(frame["experiment_id"])[0]
    step = frame["step.id"].to_numpy()
    for code in np.unique(codes):
        rows = np.flatnonzero(codes == code)
        rows = rows[np.argsort(step[rows], kind="stable")]
        n_train, n_valid, _ = split_sizes(len(rows), fractions)
        labels[rows[:n_train]] = "train"
        labels[rows[n_train : n_train + n_valid]] = "valid"
        labels[rows[n_train + n_valid :]] = "test"
    return pd.Series(labels, index=frame.index, name="split")


def leave_one_out(
    frame: pd.DataFrame, column: str
) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """Folds that each hold out one value of `column`.

    **Arguments:**

    - `frame`: a step table.
    - `column`: ``'model'`` (leave-one-model-out; names canonicalised by
      ``diffmodel.canonical_model``; an unknown model name is a ``ValueError``)
      or any other label column, e.g. ``'workload'``.

    **Returns:** an iterator of ``(held_out_value, train_mask, test_mask)``, one per
    distinct value in sorted order; the masks are boolean numpy arrays over `frame`'s
    rows and are complements of each other.
    """
    if column not in frame.columns:
        raise ValueError(f"leave_one_out: frame has no column {column!r}")
    values = frame[column]
    if values.isna().any():
        raise ValueError(f"leave_one_out: column {column!r} has missing values")
    if column == "model":
        values = values.map(canonical_model)
    values = values.astype(str).to_numpy(dtype=object)
    distinct = sorted(set(values))
    if len(distinct) < 2:
        raise ValueError(
            f"leave_one_out: column {column!r} needs at least 2 distinct values, "
            f"got {distinct}"
        )
    # Built eagerly so that bad arguments raise at the call, not at the first fold.
    folds = [
        (held_out, values != held_out, values == held_out) for held_out in distinct
    ]
    return iter(folds)


def _check_fractions(fractions: tuple[float, float, float]) -> None:
    if len(fractions) != 3 or any(f < 0 for f in fractions):
        raise ValueError(
            f"fractions must be three non-negative numbers, got {fractions!r}"
        )
    if not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"fractions must sum to 1, got {fractions!r}")
