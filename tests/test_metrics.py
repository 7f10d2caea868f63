import numpy as np
import pandas as pd
import pytest

from diffmodel._metrics import (
    count_under,
    mape,
    metrics_table,
    mspe,
    p99_ape,
    pearson_r,
)

# Absolute percentage errors 10, 10, 0, 20; signed errors +10, -10, 0, +20.
ACTUAL = np.array([100.0, 200.0, 400.0, 50.0])
PREDICTED = np.array([110.0, 180.0, 400.0, 60.0])


def test_mape_hand_computed():
    assert mape(ACTUAL, PREDICTED) == pytest.approx(10.0)


def test_mspe_hand_computed():
    assert mspe(ACTUAL, PREDICTED) == pytest.approx(5.0)
    assert mspe([10.0], [5.0]) == pytest.approx(-50.0)


def test_p99_ape_hand_computed():
    # Sorted APE 0, 10, 10, 20; the 99th percentile sits at position 0.99 * 3 = 2.97.
    assert p99_ape(ACTUAL, PREDICTED) == pytest.approx(10.0 + 0.97 * 10.0)


def test_pearson_r_hand_computed():
    # Deviations from the mean 187.5 of both: sums of products 69375, squares 71875
    # (actual) and 67475 (predicted).
    expected = 69_375.0 / np.sqrt(71_875.0 * 67_475.0)
    assert pearson_r(ACTUAL, PREDICTED) == pytest.approx(expected, rel=1e-12)
    assert pearson_r([1.0, 2.0, 3.0], [6.0, 4.0, 2.0]) == pytest.approx(-1.0)
    assert pearson_r([-1.0, 0.0, 1.0], [0.0, 1.0, 2.0]) == pytest.approx(1.0)


def test_perfect_prediction():
    assert mape(ACTUAL, ACTUAL) == 0.0
    assert mspe(ACTUAL, ACTUAL) == 0.0
    assert p99_ape(ACTUAL, ACTUAL) == 0.0


def test_accepts_lists_and_returns_floats():
    value = mape([100, 200], [110, 220])
    assert isinstance(value, float) and value == pytest.approx(10.0)


@pytest.mark.parametrize("metric", [mape, mspe, p99_ape, pearson_r])
def test_length_mismatch(metric):
    with pytest.raises(ValueError, match="differ in length: 4 != 3"):
        metric(ACTUAL, PREDICTED[:3])


@pytest.mark.parametrize("metric", [mape, mspe, p99_ape, pearson_r])
def test_nan(metric):
    with pytest.raises(ValueError, match="predicted has a NaN.*index 1"):
        metric(ACTUAL, [1.0, np.nan, 1.0, 2.0])
    with pytest.raises(ValueError, match="actual has a NaN.*index 0"):
        metric([np.inf, 1.0, 2.0, 3.0], PREDICTED)


@pytest.mark.parametrize("metric", [mape, mspe, p99_ape, pearson_r])
def test_empty_and_not_1d(metric):
    with pytest.raises(ValueError, match="empty"):
        metric([], [])
    with pytest.raises(ValueError, match="1-D"):
        metric(ACTUAL.reshape(2, 2), PREDICTED.reshape(2, 2))


@pytest.mark.parametrize("metric", [mape, mspe, p99_ape])
def test_non_positive_actual(metric):
    with pytest.raises(ValueError, match="actual must be positive; index 2 has 0.0"):
        metric([1.0, 2.0, 0.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="index 0 has -1.0"):
        metric([-1.0, 2.0], [1.0, 2.0])


def test_pearson_undefined():
    with pytest.raises(ValueError, match="at least 2 points"):
        pearson_r([1.0], [2.0])
    with pytest.raises(ValueError, match="constant"):
        pearson_r([1.0, 2.0, 3.0], [5.0, 5.0, 5.0])


def _frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "experiment_id": ["x", "x", "x", "x", "y", "z"],
            "actual_us": [*ACTUAL, 10.0, 20.0],
            "predicted_us": [*PREDICTED, 12.0, 10.0],
        }
    )


def test_metrics_table_per_group():
    table = metrics_table(_frame(), actual="actual_us", predicted="predicted_us")
    assert list(table.index) == ["x", "y", "z"]
    assert table.index.name == "experiment_id"
    assert list(table.columns) == ["mape", "mspe", "pearson_r", "p99_ape", "n"]
    x = table.loc["x"]
    assert (x["mape"], x["mspe"]) == pytest.approx((10.0, 5.0))
    assert x["p99_ape"] == pytest.approx(19.7)
    assert x["pearson_r"] == pytest.approx(pearson_r(ACTUAL, PREDICTED))
    assert table.loc["y", "mape"] == pytest.approx(20.0)
    assert table.loc["z", "mspe"] == pytest.approx(-50.0)
    # One row: correlation undefined, reported as NaN rather than raised.
    assert np.isnan(table.loc["y", "pearson_r"])
    assert list(table["n"]) == [4, 1, 1]
    assert table["n"].dtype == np.int64


def test_metrics_table_all_rows_and_two_keys():
    frame = _frame()
    whole = metrics_table(frame, actual="actual_us", predicted="predicted_us", by=None)
    assert list(whole.index) == ["all"] and whole.loc["all", "n"] == 6
    frame["workload"] = ["a", "b", "a", "b", "a", "a"]
    table = metrics_table(
        frame,
        actual="actual_us",
        predicted="predicted_us",
        by=["experiment_id", "workload"],
    )
    assert table.index.names == ["experiment_id", "workload"]
    assert table.loc[("x", "a"), "mape"] == pytest.approx(5.0)


def test_metrics_table_errors():
    frame = _frame()
    with pytest.raises(ValueError, match=r"missing columns \['pred'\]"):
        metrics_table(frame, actual="actual_us", predicted="pred")
    frame.loc[4, "actual_us"] = 0.0
    with pytest.raises(ValueError, match="group 'y': actual must be positive"):
        metrics_table(frame, actual="actual_us", predicted="predicted_us")
    frame.loc[4, "actual_us"] = 10.0
    frame.loc[0, "predicted_us"] = np.nan
    with pytest.raises(ValueError, match="group 'x': predicted has a NaN"):
        metrics_table(frame, actual="actual_us", predicted="predicted_us")


def test_count_under():
    assert count_under([5.0, 9.9, 10.0, 34.0], 10.0) == 2
    assert count_under(np.array([]), 10.0) == 0


def test_count_under_errors():
    with pytest.raises(ValueError, match="NaN at index 1"):
        count_under([1.0, np.nan], 10.0)
    with pytest.raises(ValueError, match="1-D"):
        count_under([[1.0]], 10.0)
    with pytest.raises(ValueError, match="threshold must be finite"):
        count_under([1.0], np.nan)


def test_study_xgboost_mape_is_34_percent(data_dir):
    seed = pd.read_csv(data_dir / "stepml" / "seed_xgboost_test_predictions.csv")
    table = metrics_table(seed, actual="step.duration_us", predicted="predicted_us")
    assert len(table) == 16
    assert table["mape"].mean() == pytest.approx(34.0, abs=0.05)
