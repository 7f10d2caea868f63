"""Split-conformal interval calibration: multipliers from held-out scores, and a
KernelHostFit whose intervals cover their level on heavy-tailed residuals where the
Gaussian interval does not."""

import dataclasses
import json
import warnings

import numpy as np
import pytest

import diffmodel as dm
import diffmodel.kernels as dk
from diffmodel._fitting._intervals import CALIBRATION_LEVELS, calibration_from_scores
from tests.kernels.test_step import CURVES, TRUTH, _frame, _with_target


def test_multipliers_are_the_conformal_ranks_by_hand():
    # Scores 1..9 (n = 9): level 0.9 takes rank ceil(10 * 0.9) = 9, i.e. 9;
    # level 0.5 rank 5, i.e. 5; level 0.95 needs rank 10 > 9: not supported.
    cal = calibration_from_scores(np.arange(9, 0, -1.0))
    assert cal.n_rows == 9
    assert cal.multiplier(0.9) == 9.0
    assert cal.multiplier(0.5) == 5.0
    assert cal.multiplier(0.01) == 1.0
    # between two grid levels: linear (0.5 -> 5, 0.51 -> rank ceil(5.1) = 6)
    assert cal.multiplier(0.505) == pytest.approx(5.5)
    with pytest.raises(ValueError, match="9 held-out rows covers levels 0.01 to 0.9"):
        cal.multiplier(0.95)
    with pytest.raises(ValueError, match="covers levels"):
        cal.multiplier(0.005)


def test_multipliers_rise_with_the_level_and_match_the_normal_on_normal_scores():
    rng = np.random.default_rng(0)
    cal = calibration_from_scores(np.abs(rng.normal(size=200_000)))
    m = np.array(cal.multipliers, dtype=float)
    assert len(m) == len(CALIBRATION_LEVELS) and (np.diff(m) >= 0).all()
    assert cal.multiplier(0.9) == pytest.approx(1.6449, rel=0.01)
    assert cal.multiplier(0.5) == pytest.approx(0.6745, rel=0.01)


@pytest.mark.parametrize("scores", [[], [1.0, np.nan], [-0.1, 1.0], [np.inf]], ids=str)
def test_bad_scores_are_refused(scores):
    with pytest.raises(ValueError, match="calibration scores must be finite"):
        calibration_from_scores(np.asarray(scores, dtype=float))


def _heavy(frame, seed):
    """``frame`` with a target whose log residual is mostly tight (sd 0.01) with
    5% large misses (sd 0.2): rms 0.046, so the Gaussian 90% interval reaches
    +-0.075 and covers ~96.5%, while 90% of the residuals lie within ~0.019."""
    y = _with_target(frame, TRUTH, noise=0.0)["iteration_time_us"].to_numpy()
    rng = np.random.default_rng(seed)
    sd = np.where(rng.random(len(y)) < 0.05, 0.2, 0.01)
    return frame.assign(iteration_time_us=y * np.exp(rng.normal(0.0, sd)))


def _coverage(out, frame, column="iteration_time_us"):
    y = frame[column]
    inside = (out["predicted_lo_us"] <= y) & (y <= out["predicted_hi_us"])
    return float(inside.mean()), float(
        np.median(
            (out["predicted_hi_us"] - out["predicted_lo_us"]) / out["predicted_us"]
        )
    )


def test_calibrated_intervals_cover_their_level_on_heavy_tails():
    fit = dm.fit_host_on_kernels(
        _heavy(_frame(seed=0), 1), target="iteration_time_us", curves=CURVES
    )
    assert fit.calibration is None
    cal = fit.calibrate(_heavy(_frame(seed=2), 3), target="iteration_time_us")
    assert cal.calibration is not None and cal.calibration.n_rows == 400
    assert cal.host == fit.host  # only the intervals change
    test = _heavy(_frame(n=2000, seed=4), 5)
    gauss, gauss_width = _coverage(fit.predict(test, interval=0.9), test)
    calibrated, width = _coverage(cal.predict(test, interval=0.9), test)
    # The tail inflates the rms: the Gaussian interval covers too much.
    assert gauss > 0.955
    assert 0.86 <= calibrated <= 0.94 and width < 0.6 * gauss_width
    np.testing.assert_array_equal(
        cal.predict(test)["predicted_us"], fit.predict(test)["predicted_us"]
    )


def test_calibration_refuses_rows_of_another_deployment_and_bad_targets():
    fit = dm.fit_host_on_kernels(
        _with_target(_frame(n=60), TRUTH), target="iteration_time_us", curves=CURVES
    )
    other = _with_target(_frame(n=30, models=(("llama-2-70b", 4),)), TRUTH)
    with pytest.raises(ValueError, match="llama-2-70b.* were not fitted"):
        fit.calibrate(other, target="iteration_time_us")
    with pytest.raises(ValueError, match="target 'wall_us': no such column"):
        fit.calibrate(other, target="wall_us")
    bad = other.assign(iteration_time_us=-1.0)
    with pytest.raises(ValueError, match="iteration_time_us"):
        fit.calibrate(bad, target="iteration_time_us")


def test_rows_of_an_unseen_deployment_keep_the_normal_quantile():
    frame = _with_target(_frame(n=80), TRUTH)
    fit = dm.fit_host_on_kernels(frame, target="iteration_time_us", curves=CURVES)
    cal = fit.calibrate(
        _with_target(_frame(n=80, seed=3), TRUTH, seed=4), target="iteration_time_us"
    )
    other = _with_target(_frame(n=20, models=(("llama-2-70b", 4),)), TRUTH)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dm.UnseenGroupWarning)
        a, b = (f.predict(other, interval=0.8) for f in (fit, cal))
    np.testing.assert_array_equal(a.to_numpy(), b.to_numpy())
    seen_a, seen_b = (f.predict(frame, interval=0.8) for f in (fit, cal))
    assert not np.allclose(seen_a["predicted_hi_us"], seen_b["predicted_hi_us"])


def _heavy_trace(n, seed):
    """The demo's synthetic trace (known factors, several deployments) with the
    same tight-plus-rare-miss log residual as :func:`_heavy`."""
    from diffmodel._app._demo import synthetic_trace

    frame = synthetic_trace(steps_per_deployment=n, noise=0.0, seed=seed)
    rng = np.random.default_rng(seed + 100)
    sd = np.where(rng.random(len(frame)) < 0.05, 0.2, 0.01)
    return frame.assign(step_time_us=frame["step_time_us"] * np.exp(rng.normal(0, sd)))


@pytest.mark.slow
def test_a_factor_fit_calibrated_on_held_out_rows_covers_its_level(tmp_path):
    """``FitResult.calibrate``: the Gaussian interval over-covers heavy-tailed
    residuals, the calibrated one covers ~90%; the multipliers survive a save, and
    rows of a deployment the fit never saw keep the normal quantile."""
    frame = _heavy_trace(200, 0)
    fit = dm.fit(frame, target="step_time_us", factors="global")
    cal = fit.calibrate(_heavy_trace(200, 1))
    assert cal.laplace.calibration.n_rows == len(frame)
    test = _heavy_trace(400, 2)
    gauss, gauss_width = _coverage(
        dm.predict(test, factors=fit, interval=0.9), test, "step_time_us"
    )
    covered, width = _coverage(
        dm.predict(test, factors=cal, interval=0.9), test, "step_time_us"
    )
    assert gauss > 0.955
    assert 0.86 <= covered <= 0.94 and width < 0.6 * gauss_width
    path = dm.save_factors(cal, tmp_path / "f.json")
    again = dm.predict(test, factors=path, interval=0.9)
    want = dm.predict(test, factors=cal, interval=0.9)
    np.testing.assert_allclose(again["predicted_hi_us"], want["predicted_hi_us"])
    one = frame["experiment_id"] == frame["experiment_id"].iloc[0]
    part = dm.fit(frame[one], target="step_time_us", factors="global").calibrate(
        _heavy_trace(200, 1).loc[
            lambda f: f["experiment_id"] == f["experiment_id"].iloc[0]
        ]
    )
    with pytest.raises(ValueError, match="were not fitted"):
        part.calibrate(test)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dm.UnseenGroupWarning)
        other = test[test["experiment_id"] != frame["experiment_id"].iloc[0]]
        a = dm.predict(other, factors=part, interval=0.9)
        b = dm.predict(
            other,
            factors=dataclasses.replace(
                part, laplace=dataclasses.replace(part.laplace, calibration=None)
            ),
            interval=0.9,
        )
    np.testing.assert_allclose(a["predicted_hi_us"], b["predicted_hi_us"])


def test_calibrating_needs_the_posterior():
    from diffmodel._app._demo import synthetic_trace

    frame = synthetic_trace(steps_per_deployment=20, noise=0.02, seed=0)
    res = dm.fit(
        frame, target="step_time_us", factors="global", uncertainty=False, max_steps=5
    )
    with pytest.raises(ValueError, match="uncertainty=False"):
        res.calibrate(frame)
    with pytest.raises(ValueError, match="target 'wall_us': no such column"):
        res.calibrate(frame, target="wall_us")


def _biased(models, bias, n=150, seed=0):
    """Steps of ``models`` whose wall time is the kernel sum plus the true host
    costs, times a per-deployment factor (``bias``, in ``models`` order: what a
    new deployment's device side misses by) and 1% log-normal noise."""
    frame = _with_target(_frame(n=n, seed=seed, models=models), TRUTH, seed=seed + 1)
    per_row = np.repeat(np.asarray(bias, float), n)
    return frame.assign(iteration_time_us=frame["iteration_time_us"] * per_row)


def test_transfer_calibration_widens_the_intervals_of_unseen_deployments(tmp_path):
    """Two deployments that miss by -4% and +4% (in-sample sd ~4%): leaving each
    out measures a miss of ~8%, and a third deployment that misses by 8% takes
    that wider interval (no warning) and is covered; the plain fit's +-6.6% is
    not enough."""
    train = _biased((("codellama-34b", 2), ("llama-2-70b", 4)), (0.96, 1.04))
    plain = dm.fit_host_on_kernels(train, target="iteration_time_us", curves=CURVES)
    fit = dm.fit_host_on_kernels(
        train, target="iteration_time_us", curves=CURVES, transfer=True
    )
    assert plain.transfer_calibration is None
    assert fit.transfer_calibration.n_rows == len(train)
    assert fit.transfer_calibration.multiplier(0.9) > 1.3 * 1.645
    new = _biased((("llama-2-70b", 8),), (1.08,), seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", dm.UnseenGroupWarning)
        wide = fit.predict(new, interval=0.9)
    with pytest.warns(dm.UnseenGroupWarning):
        narrow = plain.predict(new, interval=0.9)
    assert _coverage(wide, new)[0] > 0.85 > 0.5 > _coverage(narrow, new)[0]
    # rows of the fitted deployments keep their own (in-sample) interval
    np.testing.assert_array_equal(
        fit.predict(train, interval=0.9).to_numpy(),
        plain.predict(train, interval=0.9).to_numpy(),
    )
    back = dm.load_host_fit(dm.save_host_fit(fit, tmp_path / "t.json"))
    assert back.transfer_calibration == fit.transfer_calibration
    # A file whose interval parts were edited into nonsense is refused, by field.
    saved = json.loads((tmp_path / "t.json").read_text())
    unused = next(t for t in dk.HOST_TERMS if t not in fit.terms)
    for change, match in (
        (lambda d: d.update(noise_sd_prefill=-1.0), "finite sds > 0"),
        (lambda d: d["cov_raw"][0].__setitem__(0, -1.0), "variances .the diagonal."),
        (lambda d: d["host_us"].update({unused: 5.0}), f"{unused!r} is not among"),
        (lambda d: d["host_us"].update(bogus=1.0), "costs named from"),
    ):
        d = json.loads(json.dumps(saved))
        change(d)
        (tmp_path / "bad.json").write_text(json.dumps(d))
        with pytest.raises(ValueError, match=match):
            dm.load_host_fit(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="two deployments or more"):
        dm.fit_host_on_kernels(
            train[train["model"] == "llama-2-70b"],
            target="iteration_time_us",
            curves=CURVES,
            transfer=True,
        )
