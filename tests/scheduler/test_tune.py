"""Tuning the scheduler's knobs by the smoothed gradient: the grid's optimum, bad
arguments named."""

import numpy as np
import pytest

from diffmodel import default_factors
from diffmodel.scheduler import Knobs, serving_objective, tune_knobs

from helpers import SCHEDULER_STEPS


def test_tune_knobs_reaches_grid_optimum(workload, dep, run):
    # A 7 x 5 grid of the exact simulator (35 runs) against 13 runs of the smoothed
    # gradient from a seat-starved, budget-starved start.
    grid = [
        float(serving_objective(run(Knobs(b, s))))
        for b in (16, 32, 64, 128, 256, 512, 1024)
        for s in (1, 2, 4, 8, 16)
    ]
    res = tune_knobs(
        workload, dep, default_factors(), Knobs(32, 2), num_steps=SCHEDULER_STEPS
    )
    assert res.evaluations == 13
    assert res.log_knobs.shape == (4, 2) and res.gradients.shape == (3, 2)
    assert np.all(np.isfinite(np.asarray(res.gradients)))
    # The first step leaves the starved corner: both knobs want to grow.
    assert np.all(np.asarray(res.gradients[0]) < 0)
    obj = float(res.objective_us)
    assert obj < 0.5 * float(res.start_objective_us)
    assert obj <= 1.05 * min(grid)
    # The reported objective is the exact simulator's at the returned knobs.
    np.testing.assert_allclose(obj, float(serving_objective(run(res.knobs))))
    for k in (res.knobs.max_num_batched_tokens, res.knobs.max_num_seqs):
        assert float(k) == round(float(k)) and float(k) >= 1


@pytest.mark.parametrize(
    "field, kwargs",
    [
        ("iterations", dict(iterations=0)),
        ("sigma", dict(sigma=0.0)),
        ("learning_rate", dict(learning_rate=-1.0)),
        ("max_step", dict(max_step=np.inf)),
    ],
)
def test_bad_tune_arguments(workload, dep, field, kwargs):
    with pytest.raises(ValueError, match=field):
        tune_knobs(
            workload, dep, default_factors(), Knobs(32, 2), num_steps=4, **kwargs
        )
