"""Fitting the host model to step traces: the form chosen on validation rows, the
host factors pinned by the host timer, the device factors by the iteration time.

1. **Form, by validation inside the training data.** The regime gate reads either the
   batch's request count or its decode KV tokens
   (:data:`~diffmodel._model._host.GATE_VARIABLES`). Both forms are fitted on the
   training rows (early stopping on the validation rows); the form with the lower
   validation MAPE on ``step.duration_us`` is kept.
2. **Host factors** of that form, on ``step.duration_us`` of the training rows (for
   the iteration-time target too: the host timer is what pins the host factors).
3. **Iteration time only:** the device factors (the roofline's set of the same kind)
   on ``iteration_time_us``, the host factors held.
"""

from typing import NamedTuple

import numpy as np
import pandas as pd

from .._fitting._factorsets import init_factor_set
from .._fitting._fit import fit_arrays, step_data
from .._fitting._host_factors import init_host_set
from .._fitting._host_model import HostStepModel
from .._metrics import mape
from .._model._host import GATE_VARIABLES

HOST_FIT_TARGETS: dict[str, str] = {
    "step_duration_us": "step_duration",
    "iteration_time_us": "iteration_time",
}
"""Target column (us) -> what the host model predicts for it."""

_TIMER = "step_duration_us"


class HostFit(NamedTuple):
    """A fitted host model and what was chosen on the way."""

    model: HostStepModel
    labels: tuple[str, ...]
    gate_on: str
    valid_mape: dict[str, float]
    n_steps: int


def fit_host(
    train: pd.DataFrame,
    valid: pd.DataFrame,
    *,
    kind: str,
    target: str,
    solver: str = "lbfgs",
    max_steps: int = 500,
    gates: tuple[str, ...] = tuple(GATE_VARIABLES),
) -> HostFit:
    """Fit the host model of ``kind`` for ``target`` (a column of ``HOST_FIT_TARGETS``).

    The gate variable is chosen among ``gates`` by the validation MAPE of the host
    timer (``valid`` rows, never test rows); see the module doc for the stages.
    """
    if target not in HOST_FIT_TARGETS:
        raise ValueError(
            f"target must be one of {list(HOST_FIT_TARGETS)}, got {target!r}"
        )
    dtrain, labels = step_data(train)
    dvalid, _ = step_data(valid, labels=labels)
    y, vy = train[_TIMER].to_numpy(float), valid[_TIMER].to_numpy(float)
    best, scores, steps = None, {}, 0
    for gate_on in gates:
        model = HostStepModel(
            host=init_host_set(kind, labels, gate_on=gate_on),
            device=None,
            target="step_duration",
        )
        res = fit_arrays(
            model,
            dtrain,
            y,
            valid=(dvalid, vy),
            solver=solver,
            max_steps=max_steps,
            target_name=_TIMER,
            uncertainty=False,  # HostFit keeps no posterior
        )
        scores[gate_on] = mape(vy, np.asarray(res.factor_set.predict(dvalid)))
        if best is None or scores[gate_on] < scores[best[0]]:
            best, steps = (gate_on, res.factor_set), res.n_steps
    gate_on, model = best
    if HOST_FIT_TARGETS[target] == "iteration_time":
        yi, vyi = train[target].to_numpy(float), valid[target].to_numpy(float)
        # Continuation: the device factors start from the roofline fitted without
        # the host (the host's overlap is a small correction while the GPU is the
        # slower side); early stopping on validation keeps that start if the
        # overlap does not improve it.
        start = fit_arrays(
            init_factor_set(kind, labels),
            dtrain,
            yi,
            valid=(dvalid, vyi),
            solver=solver,
            max_steps=max_steps,
            target_name=target,
            uncertainty=False,
        )
        model = HostStepModel(
            host=model.host, device=start.factor_set, target="iteration_time"
        )
        res = fit_arrays(
            model,
            dtrain,
            yi,
            valid=(dvalid, vyi),
            solver=solver,
            max_steps=max_steps,
            target_name=target,
            uncertainty=False,
        )
        model, steps = res.factor_set, start.n_steps + res.n_steps
    return HostFit(model, labels, gate_on, scores, steps)


def predict_host(fitted: HostFit, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Predicted target per row of ``frame``, us, and per row whether its deployment
    group is one the fit can predict (per-group sets cannot predict unseen groups)."""
    data, labels = step_data(frame)
    model, known = fitted.model.reindex(labels)
    total = np.asarray(model.predict(data))
    row_known = known[np.asarray(data.group)]
    return np.where(row_known, total, np.nan), row_known


def host_table(fitted: HostFit) -> pd.DataFrame:
    """Fitted host factors, one row per group (and ``global`` where pooled), units
    in the column names, and the gate variable."""
    return fitted.model.host.table()
