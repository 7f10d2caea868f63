"""Coverage of 90% predictive intervals on the iteration-time target (issue 13).

For each fold of the public traces (``temporal``, ``lomo``, ``lowo``: the folds of
``diffmodel reproduce``) and each factor set (``global``, ``hierarchical``): fit on the
fold's training rows (early stopping on its validation rows), then predict the test
rows with ``interval=0.9`` and report the share of test steps inside the interval
(``cov``, %) and the median interval width relative to the prediction (``width``, %,
``(hi - lo) / predicted``).

Two noise models per fit, both from the library:

- ``in-sample`` (``transfer=False``): the fit's own residual noise per regime
  (prefill-carrying and decode-only steps). It measures the scatter around the fitted
  deployments and is too small for transfer.
- ``transfer``: ``fit(transfer_by="experiment_id")`` measures the miss on each
  training experiment left out of a nested refit, inside the training data, never on
  test rows; ``predict`` uses it for rows of deployments the fit never saw
  (``lomo``), and for every row on ``lowo`` (``transfer=True``: a new workload on a
  fitted deployment). A training pool of one experiment has nothing to leave out: its
  fold keeps the in-sample noise and says so (``n/a``).

    python experiments/intervals.py [--data DIR] [--max-steps N]
"""

import argparse
import pathlib
import time
import warnings
from typing import NamedTuple

import numpy as np
import pandas as pd
from identifiability import markdown  # a sibling script: the same pipe table

import diffmodel as dm
from diffmodel import data as dmd

TARGET = "iteration_time_us"
KINDS = ("global", "hierarchical")
FOLD_COLUMN = {"lomo": "model", "lowo": "workload"}


class Fold(NamedTuple):
    """One cut of the benchmark: its protocol, the held-out value (``all`` for
    ``temporal``) and its rows."""

    protocol: str
    name: str
    train: pd.DataFrame
    valid: pd.DataFrame
    test: pd.DataFrame


def folds(frame: pd.DataFrame) -> list[Fold]:
    """``(protocol, held_out, train, valid, test)`` as in ``diffmodel reproduce``."""
    out = []
    split = dmd.temporal_split(frame)
    out.append(Fold("temporal", "all", *(frame[split == s] for s in dmd.SPLIT_LABELS)))
    for protocol, column in FOLD_COLUMN.items():
        for held, train_mask, test_mask in dmd.leave_one_out(frame, column):
            pool = frame[train_mask]
            cut = dmd.temporal_split(pool, fractions=(0.8, 0.2, 0.0))
            out.append(
                Fold(
                    protocol,
                    held,
                    pool[cut == "train"],
                    pool[cut == "valid"],
                    frame[test_mask],
                )
            )
    return out


def _fit(
    kind: str,
    train: pd.DataFrame,
    valid: pd.DataFrame | None,
    max_steps: int,
    transfer_by: str | None,
):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dm.IdentifiabilityWarning)
        return dm.fit(
            train,
            target=TARGET,
            factors=kind,
            valid=valid if valid is not None and len(valid) else None,
            max_steps=max_steps,
            transfer_by=transfer_by,
        )


def coverage(
    result, test: pd.DataFrame, level: float, transfer: bool | None
) -> tuple[float, float]:
    """Share of test steps inside the interval and median relative width, %."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dm.UnseenGroupWarning)
        out = dm.predict(test, factors=result, interval=level, transfer=transfer)
    y = test[TARGET].to_numpy()
    lo, hi = out["predicted_lo_us"].to_numpy(), out["predicted_hi_us"].to_numpy()
    inside = (y >= lo) & (y <= hi)
    width = (hi - lo) / out["predicted_us"].to_numpy()
    return 100 * float(inside.mean()), 100 * float(np.median(width))


def main(*, data: pathlib.Path | None = None, level: float = 0.9, max_steps=300):
    """Run every fold and kind; print and return the table."""
    data = dmd.default_data_dir() if data is None else pathlib.Path(data)
    steps = dmd.add_targets(dmd.load_steps(data / "stepml" / "steps.parquet"))
    frame = steps[steps[TARGET].notna()].copy()
    rows = []
    for protocol, held, train, valid, test in folds(frame):
        n_exp = train["experiment_id"].nunique()
        by = "experiment_id" if n_exp >= 2 else None
        for kind in KINDS:
            tick = time.perf_counter()
            result = _fit(kind, train, valid, max_steps, by)
            lap = result.laplace
            cov_in, w_in = coverage(result, test, level, False)
            row = dict(
                protocol=protocol,
                held_out=held,
                kind=kind,
                test_rows=len(test),
                in_sample_cov=cov_in,
                in_sample_width=w_in,
                transfer_cov="n/a",
                transfer_width="n/a",
                noise_in=f"{lap.regime_noise_sd[0]:.3f}/{lap.regime_noise_sd[1]:.3f}",
                noise_transfer="n/a",
                train_experiments=n_exp,
            )
            if by is not None:
                transfer = True if protocol == "lowo" else None
                cov_t, w_t = coverage(result, test, level, transfer)
                sd = lap.transfer_noise_sd
                row.update(
                    transfer_cov=cov_t,
                    transfer_width=w_t,
                    noise_transfer=f"{sd[0]:.3f}/{sd[1]:.3f}",
                )
            row["seconds"] = time.perf_counter() - tick
            rows.append(row)
            print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    print(markdown(table))
    return table


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=pathlib.Path, default=None)
    parser.add_argument("--level", type=float, default=0.9)
    parser.add_argument("--max-steps", type=int, default=300)
    args = parser.parse_args()
    main(data=args.data, level=args.level, max_steps=args.max_steps)
