"""Coverage of 90% predictive intervals on the iteration-time target (issue 13).

For each fold of the public traces (``temporal``, ``lomo``, ``lowo``: the folds of
``diffmodel reproduce``) and each factor set (``global``, ``hierarchical``): fit on the
fold's training rows (early stopping on its validation rows), then predict the test
rows with ``interval=0.9`` and report the share of test steps inside the interval
(``coverage``, %) and the median interval width relative to the prediction (``width``,
%, ``(hi - lo) / predicted``).

Two noise models per fit:

- ``in-sample``: the fit's own residual noise per regime (prefill-carrying and
  decode-only steps), the Laplace summary's ``regime_noise_sd``. It measures the
  scatter around the fitted deployments and is too small for transfer.
- ``calibrated``: the residual noise measured *inside the training data* on rows the
  calibrating fit did not see, never on test rows. Where the fold's training pool
  holds two or more experiments, by nested leave-one-experiment-out (refit on the
  others, predict the left-out one: a transfer within the training data); where it
  holds one, on the validation rows (the last 20% of the pool in step order). The
  noise sd of regime ``k`` is ``q_k / z``: ``q_k`` the ``level`` quantile of the
  absolute log-ratio residuals of those held-out rows, ``z`` the normal quantile of
  ``(1 + level) / 2`` (a split-conformal scale; the parameter posterior still adds
  its own variance on top).

    python experiments/intervals.py [--data DIR] [--max-steps N]
"""

import argparse
import dataclasses
import pathlib
import time
import warnings
from statistics import NormalDist

import equinox as eqx
import numpy as np
import pandas as pd

import diffmodel as dm
from diffmodel import data as dmd

TARGET = "iteration_time_us"
KINDS = ("global", "hierarchical")
FOLD_COLUMN = {"lomo": "model", "lowo": "workload"}


def folds(frame: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame, ...]]:
    """``(protocol, held_out, train, valid, test)`` as in ``diffmodel reproduce``."""
    out = []
    split = dmd.temporal_split(frame)
    out.append(("temporal", "all", *(frame[split == s] for s in dmd.SPLIT_LABELS)))
    for protocol, column in FOLD_COLUMN.items():
        for held, train_mask, test_mask in dmd.leave_one_out(frame, column):
            pool = frame[train_mask]
            cut = dmd.temporal_split(pool, fractions=(0.8, 0.2, 0.0))
            out.append(
                (
                    protocol,
                    held,
                    pool[cut == "train"],
                    pool[cut == "valid"],
                    frame[test_mask],
                )
            )
    return out


def _fit(kind: str, train: pd.DataFrame, valid: pd.DataFrame | None, max_steps: int):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dm.IdentifiabilityWarning)
        return dm.fit(
            train,
            target=TARGET,
            factors=kind,
            valid=valid if valid is not None and len(valid) else None,
            max_steps=max_steps,
        )


def _log_residuals(result, frame: pd.DataFrame) -> np.ndarray:
    pred = dm.predict(frame, factors=result)["predicted_us"].to_numpy()
    return np.log(pred) - np.log(frame[TARGET].to_numpy())


def calibration_residuals(
    protocol: str,
    kind: str,
    result,
    train: pd.DataFrame,
    valid: pd.DataFrame,
    max_steps: int,
) -> tuple[np.ndarray, np.ndarray, str]:
    """Log-ratio residuals of training-pool rows that the calibrating fit did not
    see, whether each row carries prefill, and how they were obtained."""
    pool = pd.concat([train, valid])
    experiments = list(dict.fromkeys(pool["experiment_id"]))
    if protocol == "temporal" or len(experiments) < 2:
        r = _log_residuals(result, valid)
        return r, valid["batch.prefill_tokens"].to_numpy() > 0, "validation rows"
    rs, pf = [], []
    for exp in experiments:
        inner_train = train[train["experiment_id"] != exp]
        inner_valid = valid[valid["experiment_id"] != exp]
        left_out = pool[pool["experiment_id"] == exp]
        inner = _fit(kind, inner_train, inner_valid, max_steps)
        rs.append(_log_residuals(inner, left_out))
        pf.append(left_out["batch.prefill_tokens"].to_numpy() > 0)
    how = f"nested leave-one-experiment-out ({len(experiments)} experiments)"
    return np.concatenate(rs), np.concatenate(pf), how


def conformal_noise(
    residuals: np.ndarray, has_prefill: np.ndarray, level: float
) -> tuple[float, float]:
    """Per-regime (prefill, decode-only) log-scale noise sd ``q / z`` (see module)."""
    z = NormalDist().inv_cdf(0.5 * (1 + level))
    a = np.abs(residuals)
    pooled = float(np.quantile(a, level)) / z
    out = []
    for sel in (has_prefill, ~has_prefill):
        out.append(float(np.quantile(a[sel], level)) / z if sel.sum() >= 10 else pooled)
    return out[0], out[1]


def with_noise(result, noise: tuple[float, float]):
    """The fit result with its regime noise replaced (intervals use it)."""
    lap = dataclasses.replace(result.laplace, regime_noise_sd=noise)
    return eqx.tree_at(lambda r: r.laplace, result, lap)


def coverage(result, test: pd.DataFrame, level: float) -> tuple[float, float]:
    """Share of test steps inside the interval and median relative width, %."""
    out = dm.predict(test, factors=result, interval=level)
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
        for kind in KINDS:
            tick = time.perf_counter()
            result = _fit(kind, train, valid, max_steps)
            r, pf, how = calibration_residuals(
                protocol, kind, result, train, valid, max_steps
            )
            noise = conformal_noise(r, pf, level)
            cov_in, w_in = coverage(result, test, level)
            cov_cal, w_cal = coverage(with_noise(result, noise), test, level)
            rows.append(
                dict(
                    protocol=protocol,
                    held_out=held,
                    kind=kind,
                    test_rows=len(test),
                    in_sample_cov=cov_in,
                    in_sample_width=w_in,
                    calibrated_cov=cov_cal,
                    calibrated_width=w_cal,
                    noise_in=f"{result.laplace.regime_noise_sd[0]:.3f}/"
                    f"{result.laplace.regime_noise_sd[1]:.3f}",
                    noise_cal=f"{noise[0]:.3f}/{noise[1]:.3f}",
                    calibration=how,
                    seconds=time.perf_counter() - tick,
                )
            )
            print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    print(markdown(table))
    return table


def markdown(table: pd.DataFrame) -> str:
    """A pipe table of ``table`` (floats to one decimal), without extra packages."""
    cells = [
        [f"{v:.1f}" if isinstance(v, float) else str(v) for v in row]
        for row in table.itertuples(index=False)
    ]
    lines = ["| " + " | ".join(map(str, table.columns)) + " |"]
    lines.append("|" + "---|" * table.shape[1])
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=pathlib.Path, default=None)
    parser.add_argument("--level", type=float, default=0.9)
    parser.add_argument("--max-steps", type=int, default=300)
    args = parser.parse_args()
    main(data=args.data, level=args.level, max_steps=args.max_steps)
