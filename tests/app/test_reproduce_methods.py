"""The benchmark's methods: how an outcome's intervals are scored."""

import numpy as np
import pytest

from diffmodel._app._reproduce_methods import _coverage, _Outcome


def test_coverage_hand_computed():
    outcome = _Outcome(
        predicted=np.array([10.0, 10.0, 10.0, 10.0, 20.0]),
        n_params={},
        fit_seconds={},
        interval=(np.array([9.0, 9, 9, 9, 18]), np.array([11.0, 11, 11, 11, 24])),
    )
    actual = np.array([10.0, 12.0, 9.0, 8.9])
    got = _coverage(outcome, np.arange(4), actual)
    assert got == {"coverage90": 0.5, "width90": pytest.approx(0.2)}
    # Positions pick the rows: the last row alone, width (24 - 18) / 20.
    assert _coverage(outcome, np.array([4]), np.array([19.0])) == {
        "coverage90": 1.0,
        "width90": pytest.approx(0.3),
    }
    assert _coverage(outcome._replace(interval=None), np.arange(4), actual) == {}
