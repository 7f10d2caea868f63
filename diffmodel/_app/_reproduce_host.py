"""The ``diffmodel-host-*`` methods of ``diffmodel reproduce``: the host model.

One model predicts both targets (:class:`~diffmodel._fitting._host_factors.
HostStepModel`): the host timer ``step.duration_us`` from the host factors alone, the
iteration time as ``smooth_max(device, host) + overhead`` from the roofline's device
factors and the host factors. Per fold:

1. **Form, by validation inside the training data.** The regime gate reads either the
   batch's request count or its decode KV tokens
   (:data:`~diffmodel._model._host.GATE_VARIABLES`). Both forms are fitted on the
   fold's training rows (early stopping on its validation rows); the form with the
   lower validation MAPE on ``step.duration_us`` is kept. Test rows take no part.
2. **Host factors** of that form, on ``step.duration_us`` of the training rows (for
   the iteration-time target too: the host timer is what pins the host factors).
3. **Iteration time only:** the device factors (the roofline's set of the same kind)
   on ``iteration_time_us``, host factors held.

Methods: ``diffmodel-host-global`` (one set of 7 host numbers), ``-per-model`` (7 per
deployment group; cannot predict an unseen group), ``-hierarchical`` (7 global plus 7
shrunk offsets per group; an unseen group gets the global values).
"""

import time
from typing import NamedTuple

import numpy as np
import pandas as pd

from .._fitting._fit import step_data
from .._fitting._host_fit import fit_host, predict_host

HOST_METHODS: dict[str, str] = {
    "diffmodel-host-global": "global",
    "diffmodel-host-per-model": "per-model",
    "diffmodel-host-hierarchical": "hierarchical",
}
"""Method name -> kind of the host (and, for iteration time, device) factor set."""

_UNSEEN = "not applicable: deployment group not in training"


class HostOutcome(NamedTuple):
    """Predictions on a fold's test rows (us; NaN where not applicable), as the
    benchmark's outcome: per experiment parameter counts, fit seconds and notes."""

    predicted: np.ndarray
    n_params: dict[str, float]
    fit_seconds: dict[str, float]
    fit_steps: float
    notes: dict[str, str]


def run_host_method(method: str, fold, target: str, settings) -> HostOutcome:
    """Fit ``method`` on ``fold`` (train/valid/test frames) and predict its test
    rows; ``settings`` gives ``solver`` and ``max_steps``."""
    kind = HOST_METHODS[method]
    exps = fold.test["experiment_id"].unique()
    tick = time.perf_counter()
    fitted = fit_host(
        fold.train,
        fold.valid,
        kind=kind,
        target=target,
        solver=settings.solver,
        max_steps=settings.max_steps,
    )
    seconds = time.perf_counter() - tick
    predicted, known = predict_host(fitted, fold.test)
    data, labels = step_data(fold.test)
    host = fitted.model.reindex(labels)[0].host.physical()
    limit, width = (
        np.broadcast_to(np.asarray(v), (len(labels),))
        for v in (host.graph_limit, host.gate_width)
    )
    chosen = ", ".join(f"{g} {v:.1f}%" for g, v in fitted.valid_mape.items())
    notes = {}
    for exp, rows in pd.Series(np.asarray(data.group), index=fold.test.index).groupby(
        fold.test["experiment_id"]
    ):
        g = int(rows.iloc[0])
        if not known[fold.test.index.get_indexer(rows.index)].all():
            notes[exp] = _UNSEEN
            continue
        notes[exp] = (
            f"gate on {fitted.gate_on} at {limit[g]:.1f} "
            f"(width {width[g]:.2f}); validation MAPE {chosen}"
        )
    count = fitted.model.n_params()
    return HostOutcome(
        predicted,
        {e: count for e in exps},
        {e: seconds for e in exps},
        float(fitted.n_steps),
        notes,
    )
