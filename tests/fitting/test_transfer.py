"""Transfer noise (nested leave-one-out inside the training data) and the intervals
that use it for deployments a fit never saw."""

import numpy as np
import pandas as pd
import pytest

import diffmodel as dm
from diffmodel._fitting._intervals import IntervalModel
from diffmodel._fitting._transfer import transfer_values


def _biased(n=60, noise=0.03, bias=0.15, seed=0) -> pd.DataFrame:
    """The demo trace with a per-deployment multiplicative bias exp(+-bias): what
    no shared factor set can fit, so that transfer misses by about ``bias``."""
    from diffmodel._app._demo import synthetic_trace

    frame = synthetic_trace(steps_per_deployment=n, noise=noise, seed=seed)
    ids = list(dict.fromkeys(frame["experiment_id"]))
    sign = frame["experiment_id"].map({e: (-1) ** i for i, e in enumerate(ids)})
    frame["step_time_us"] = frame["step_time_us"] * np.exp(bias * sign)
    return frame


def test_transfer_values_name_the_column_and_what_was_expected():
    frame = pd.DataFrame({"a": ["x", "x"], "b": ["x", None]})
    with pytest.raises(ValueError, match="'nope': no such column"):
        transfer_values(frame, "nope")
    with pytest.raises(ValueError, match="'a': needs two or more values"):
        transfer_values(frame, "a")
    with pytest.raises(ValueError, match="'b': 1 rows have no value"):
        transfer_values(frame, "b")
    assert transfer_values(pd.DataFrame({"a": ["y", "x", "y"]}), "a") == ["y", "x"]


def test_fit_rejects_a_bad_transfer_column_before_fitting():
    frame = _biased(n=10)
    with pytest.raises(ValueError, match="transfer_by 'model_name': no such column"):
        dm.fit(frame, target="step_time_us", transfer_by="model_name")
    with pytest.raises(ValueError, match="needs uncertainty=True"):
        dm.fit(frame, target="step_time_us", transfer_by="model", uncertainty=False)


@pytest.mark.slow
def test_transfer_noise_measures_the_miss_the_in_sample_noise_hides():
    frame = _biased()
    res = dm.fit(frame, target="step_time_us", transfer_by="experiment_id")
    lap = res.laplace
    assert lap.trained_on == tuple(
        sorted(set(lap.trained_on), key=lap.trained_on.index)
    )
    assert len(lap.trained_on) == frame["experiment_id"].nunique()
    assert lap.transfer_by == "experiment_id"
    inside, moved = np.array(lap.regime_noise_sd), np.array(lap.transfer_noise_sd)
    # A shared fit splits the +-0.15 biases: in-sample ~0.15; a left-out deployment
    # is missed by its own bias plus the shift the others pull the fit by.
    assert np.all(inside > 0.1) and np.all(moved > inside)
    # By hand for one left-out value: refit without it, RMS log residual on it.
    first = frame["experiment_id"].iloc[0]
    inner = dm.fit(
        frame[frame["experiment_id"] != first],
        target="step_time_us",
        uncertainty=False,
    )
    left = frame[frame["experiment_id"] == first]
    r = np.log(dm.predict(left, factors=inner)["predicted_us"] / left["step_time_us"])
    assert np.sqrt(np.mean(r**2)) < 3 * moved.max()


@pytest.mark.slow
def test_intervals_use_the_transfer_noise_for_unseen_deployments(tmp_path):
    frame = _biased(n=40)
    seen_id = frame["experiment_id"].iloc[0]
    train, test = frame[frame["model"] != "llama-3.1-8b"], frame
    res = dm.fit(train, target="step_time_us", transfer_by="experiment_id")
    out = dm.predict(test, factors=res, interval=0.9)
    width = np.log(out["predicted_hi_us"] / out["predicted_lo_us"]).to_numpy()
    unseen = test["model"].eq("llama-3.1-8b").to_numpy()
    assert width[unseen].min() > width[~unseen].max()  # transfer noise is wider
    # transfer=True widens every row alike; False narrows every row to in-sample.
    every = dm.predict(test, factors=res, interval=0.9, transfer=True)
    none = dm.predict(test, factors=res, interval=0.9, transfer=False)
    w_every = np.log(every["predicted_hi_us"] / every["predicted_lo_us"]).to_numpy()
    w_none = np.log(none["predicted_hi_us"] / none["predicted_lo_us"]).to_numpy()
    np.testing.assert_allclose(w_every[unseen], width[unseen], rtol=1e-9)
    assert np.all(w_every[~unseen] > width[~unseen])
    np.testing.assert_allclose(w_none[~unseen], width[~unseen], rtol=1e-9)
    # The file keeps all of it.
    path = dm.save_factors(res, tmp_path / "f.json")
    again = dm.predict(test, factors=path, interval=0.9)
    np.testing.assert_allclose(again["predicted_hi_us"], out["predicted_hi_us"])
    assert seen_id in set(train["experiment_id"])


@pytest.mark.slow
def test_without_transfer_noise_unseen_rows_warn_and_true_is_an_error():
    frame = _biased(n=30)
    train = frame[frame["model"] != "llama-3.1-8b"]
    res = dm.fit(train, target="step_time_us")
    with pytest.warns(dm.UnseenGroupWarning, match="never saw llama-3.1-8b"):
        dm.predict(frame, factors=res, interval=0.9)
    dm.predict(train, factors=res, interval=0.9)  # seen rows only: no warning
    with pytest.raises(ValueError, match="transfer=True needs the fit's transfer"):
        dm.predict(frame, factors=res, interval=0.9, transfer=True)
    with pytest.raises(ValueError, match="it needs interval"):
        dm.predict(frame, factors=res, transfer=True)


def test_row_noise_by_hand():
    m = IntervalModel(
        cov_raw=np.zeros((1, 1)),
        noise_sd=(0.1, 0.2),
        trained_on=("a",),
        transfer_noise_sd=(0.3, 0.4),
    )
    group, prefill = np.array([0, 1, 1]), np.array([True, True, False])
    np.testing.assert_allclose(m.row_noise(("a", "b"), group, prefill), [0.1, 0.3, 0.4])
    np.testing.assert_allclose(
        m.row_noise(("a", "b"), group, prefill, True), [0.3, 0.3, 0.4]
    )
    np.testing.assert_allclose(
        m.row_noise(("a", "b"), group, prefill, False), [0.1, 0.1, 0.2]
    )
