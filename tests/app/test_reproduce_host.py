"""The diffmodel-host-* benchmark methods, on a small slice of the real traces."""

import types

import numpy as np
import pytest

from diffmodel._app._reproduce import METHODS
from diffmodel._app._reproduce_host import HOST_METHODS, run_host_method
from diffmodel.data import add_targets, load_steps, temporal_split
from diffmodel.host import fit_host, host_table, predict_host

QUICK = types.SimpleNamespace(solver="adam", max_steps=15)


@pytest.fixture(scope="module")
def frame(data_dir):
    steps = load_steps(data_dir / "stepml" / "steps.parquet")
    return add_targets(steps.groupby("experiment_id", sort=False).head(300))


def _fold(frame, protocol="temporal"):
    split = temporal_split(frame)
    return types.SimpleNamespace(
        protocol=protocol,
        train=frame[split == "train"],
        valid=frame[split == "valid"],
        test=frame[split == "test"],
    )


def test_host_methods_are_registered():
    assert set(HOST_METHODS) <= set(METHODS)


@pytest.mark.slow
def test_hierarchical_step_duration_outcome(frame):
    fold = _fold(frame)
    out = run_host_method(
        "diffmodel-host-hierarchical", fold, "step_duration_us", QUICK
    )
    assert out.predicted.shape == (len(fold.test),)
    assert np.all(np.isfinite(out.predicted)) and np.all(out.predicted > 0)
    assert set(out.n_params.values()) == {21}  # 7 global + 7 per each of 2 groups
    assert all("gate on" in note for note in out.notes.values())


@pytest.mark.slow
def test_iteration_time_counts_host_and_device_numbers(frame):
    rows = frame.dropna(subset=["iteration_time_us"])
    fold = _fold(rows)
    fitted = fit_host(
        fold.train,
        fold.valid,
        kind="global",
        target="iteration_time_us",
        solver="adam",
        max_steps=10,
    )
    predicted, known = predict_host(fitted, fold.test)
    assert known.all() and np.all(np.isfinite(predicted))
    # Iteration times are milliseconds: the roofline carries them, not the host.
    assert np.median(predicted) > 5_000
    table = host_table(fitted)
    assert list(table.index) == ["global"]  # one shared set of host factors
    assert set(table["gate_on"]) == {fitted.gate_on}
    assert table["graph_limit [gate variable units (see gate_on)]"].iloc[0] > 0


@pytest.mark.slow
def test_per_model_cannot_predict_an_unseen_deployment(frame):
    split = temporal_split(frame, fractions=(0.8, 0.2, 0.0))
    llama = frame["model"].str.startswith("llama").to_numpy()
    fold = types.SimpleNamespace(
        protocol="lomo",
        train=frame[llama & (split == "train").to_numpy()],
        valid=frame[llama & (split == "valid").to_numpy()],
        test=frame[~llama],
    )
    out = run_host_method("diffmodel-host-per-model", fold, "step_duration_us", QUICK)
    assert np.all(np.isnan(out.predicted))
    assert all("not in training" in note for note in out.notes.values())
    out = run_host_method("diffmodel-host-global", fold, "step_duration_us", QUICK)
    assert np.all(np.isfinite(out.predicted))


def test_unknown_target_is_a_value_error(frame):
    fold = _fold(frame)
    with pytest.raises(ValueError, match="target"):
        fit_host(fold.train, fold.valid, kind="global", target="ttft_us")
