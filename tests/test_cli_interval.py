"""``diffmodel predict --interval P``, through the real entry point
(``python -m diffmodel`` in a subprocess)."""

import numpy as np
import pandas as pd
import pytest
from test_cli import fails, run_cli

import diffmodel as dm
from diffmodel._app._demo import synthetic_trace


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A folder with ``trace.csv`` and ``g.json``, a global fit saved by the CLI."""
    work = tmp_path_factory.mktemp("interval")
    synthetic_trace(steps_per_deployment=40, seed=5).to_csv(
        work / "trace.csv", index=False
    )
    argv = ["fit", "--data", "trace.csv", "--target", "step_time_us"]
    argv += ["--kind", "global", "--out", "g.json", "--max-iterations", "40"]
    code, _, err = run_cli(*argv, cwd=work)
    assert code == 0, err
    return work


@pytest.fixture(scope="module")
def trace_only(tmp_path_factory):
    """A folder with ``trace.csv`` only: usage errors are found before any file is
    read, so these tests need no fit."""
    work = tmp_path_factory.mktemp("usage")
    synthetic_trace(steps_per_deployment=4, seed=5).to_csv(
        work / "trace.csv", index=False
    )
    return work


@pytest.mark.slow
def test_predict_interval_adds_bounds_equal_to_the_library(fitted):
    argv = ["predict", "--data", "trace.csv", "--out", "p.csv", "--factors", "g.json"]
    code, out, err = run_cli(*argv, "--interval", "0.9", cwd=fitted)
    assert code == 0, err
    assert "0.9 interval in predicted_lo_us / predicted_hi_us" in out
    got = pd.read_csv(fitted / "p.csv")
    t, lo, hi = (
        got[c].to_numpy()
        for c in ("predicted_us", "predicted_lo_us", "predicted_hi_us")
    )
    assert np.all(lo < t) and np.all(t < hi)
    frame = pd.read_csv(fitted / "trace.csv")
    want = dm.predict(frame, factors=str(fitted / "g.json"), interval=0.9)
    for c in ("predicted_lo_us", "predicted_hi_us"):
        np.testing.assert_allclose(got[c], want[c], rtol=1e-9)
    # A wider level gives a wider interval, around the same prediction.
    code, _, err = run_cli(
        *argv[:-2],
        "--factors",
        "g.json",
        "--out",
        "q.csv",
        "--interval",
        "0.99",
        cwd=fitted,
    )
    assert code == 0, err
    wide = pd.read_csv(fitted / "q.csv")
    np.testing.assert_allclose(wide["predicted_us"], t, rtol=1e-12)
    assert np.all(wide["predicted_hi_us"] > hi) and np.all(wide["predicted_lo_us"] < lo)


@pytest.mark.slow
def test_predict_without_interval_has_no_bounds(fitted):
    argv = ["predict", "--data", "trace.csv", "--out", "n.csv", "--factors", "g.json"]
    code, _, err = run_cli(*argv, cwd=fitted)
    assert code == 0, err
    assert "predicted_lo_us" not in pd.read_csv(fitted / "n.csv").columns


@pytest.mark.parametrize("level", ["1.5", "0", "x"])
def test_interval_out_of_range_is_a_usage_error(trace_only, level):
    argv = ["predict", "--data", "trace.csv", "--out", "o.csv", "--factors", "g.json"]
    fails(
        trace_only,
        [*argv, "--interval", level],
        "expected a probability in (0, 1)",
        rc=2,
    )


def test_interval_needs_saved_factors(trace_only):
    argv = ["predict", "--data", "trace.csv", "--out", "o.csv", "--interval", "0.9"]
    fails(trace_only, argv, "--interval needs --factors")


@pytest.mark.slow
def test_transfer_by_and_transfer_match_the_library(fitted):
    fit = ["fit", "--data", "trace.csv", "--target", "step_time_us"]
    fit += ["--out", "t.json", "--max-iterations", "40"]
    code, _, err = run_cli(*fit, "--transfer-by", "experiment_id", cwd=fitted)
    assert code == 0, err
    argv = ["predict", "--data", "trace.csv", "--factors", "t.json"]
    argv += ["--interval", "0.9"]
    frame = pd.read_csv(fitted / "trace.csv")
    for flag, transfer in (("all", True), ("none", False)):
        code, _, err = run_cli(
            *argv, "--out", f"{flag}.csv", "--transfer", flag, cwd=fitted
        )
        assert code == 0, err
        got = pd.read_csv(fitted / f"{flag}.csv")["predicted_hi_us"]
        want = dm.predict(
            frame,
            factors=str(fitted / "t.json"),
            interval=0.9,
            transfer=transfer,
        )["predicted_hi_us"]
        np.testing.assert_allclose(got, want, rtol=1e-9)
    fails(fitted, [*fit, "--transfer-by", "nope"], "transfer_by 'nope': no such column")
    fails(
        fitted,
        ["predict", "--data", "trace.csv", "--out", "x.csv", "--transfer", "all"],
        "--transfer all selects --interval's noise",
    )
