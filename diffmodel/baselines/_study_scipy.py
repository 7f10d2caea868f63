"""The study's own fitter: scipy's ``least_squares`` (trf, box bounds) on the log
ratios of its 9-parameter model, the reference that ``diffmodel.fit`` is timed
against (``experiments/study_fit.py``, ``diffmodel bench``)."""

import time
from typing import NamedTuple

import numpy as np
import pandas as pd

from .._fitting._fit import step_data
from .._fitting._study import (
    STUDY_BOUNDS,
    STUDY_PARAM_NAMES,
    STUDY_START,
    study_components,
)


class StudyLeastSquares(NamedTuple):
    """A scipy fit of the study's 9-parameter model.

    Attributes:
        values: the fitted parameters by name (``factor_*`` unitless, ``overhead_us``
            microseconds, ``mfu_*`` in (0, 1]).
        loss: ``mean((log predicted - log measured)^2)`` at the fit.
        seconds: wall time of ``least_squares`` alone (the components already
            computed).
        n_evaluations: residual evaluations scipy made.
    """

    values: dict[str, float]
    loss: float
    seconds: float
    n_evaluations: int


def study_least_squares(frame: pd.DataFrame, target: str) -> StudyLeastSquares:
    """Fit the study's 9-parameter model (one set for all rows) to ``frame[target]``
    (microseconds, finite and > 0) the way the study did: ``scipy.optimize.
    least_squares``, method ``trf``, within the study's bounds, from its start
    (nudged strictly inside the bounds, as trf requires), in float64.

    Needs scipy (the ``app`` extra).
    """
    try:
        from scipy.optimize import least_squares
    except ModuleNotFoundError:
        raise ValueError(
            "the study's fitter needs scipy: pip install 'diffmodel[app]'"
        ) from None
    if target not in frame.columns:
        raise ValueError(f"missing target column {target!r}")
    y = frame[target].to_numpy(np.float64)
    if len(y) == 0 or not np.all(np.isfinite(y) & (y > 0)):
        raise ValueError(
            f"target {target!r} must be finite and > 0 (microseconds) on every row"
        )
    comps = np.asarray(study_components(step_data(frame)[0]), np.float64)
    lo, hi = STUDY_BOUNDS[:, 0], STUDY_BOUNDS[:, 1]
    log_y = np.log(y)

    def residuals(x):
        pred = (x[0:4] * comps / x[5:9]).sum(-1) + x[4]
        return np.log(np.maximum(pred, 1e-300)) - log_y

    x0 = np.clip(STUDY_START, lo + 1e-9, hi - 1e-9)
    tick = time.perf_counter()
    sol = least_squares(residuals, x0, bounds=(lo, hi), method="trf")
    seconds = time.perf_counter() - tick
    return StudyLeastSquares(
        values=dict(zip(STUDY_PARAM_NAMES, map(float, sol.x), strict=True)),
        loss=float(np.mean(residuals(sol.x) ** 2)),
        seconds=seconds,
        n_evaluations=int(sol.nfev),
    )
