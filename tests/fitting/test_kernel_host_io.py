"""A KernelHostFit saved as JSON reads back exactly; a bad file is one clear line."""

import json

import numpy as np
import pytest

import diffmodel as dm
from diffmodel._fitting._kernel_host_io import host_fit_to_dict
from tests.kernels.test_step import CURVES, TRUTH, _frame, _with_target


@pytest.fixture(scope="module")
def fitted():
    frame = _with_target(_frame(n=60), TRUTH)
    return frame, dm.fit_host_on_kernels(
        frame, target="iteration_time_us", curves=CURVES
    )


def test_round_trip_is_exact(fitted, tmp_path):
    frame, fit = fitted
    path = dm.save_host_fit(fit, tmp_path / "host.json")
    back = dm.load_host_fit(path)
    assert back.terms == fit.terms and back.trained_on == fit.trained_on
    assert back.sd_us == fit.sd_us and back.noise_sd == fit.noise_sd
    np.testing.assert_array_equal(back.cov_raw, fit.cov_raw)
    for a, b in zip(
        back.host.as_dict().values(), fit.host.as_dict().values(), strict=True
    ):
        assert float(a) == float(b)
    want, got = (f.predict(frame, interval=0.9) for f in (fit, back))
    np.testing.assert_array_equal(got.to_numpy(), want.to_numpy())


@pytest.mark.parametrize(
    ("edit", "expect"),
    [
        (lambda d: d.pop("curves"), "missing field 'curves'"),
        (lambda d: d.update(format="diffmodel.factors/1"), "field 'format'"),
        (lambda d: d.update(terms=["gpu"]), "field 'terms'"),
        (lambda d: d["host_us"].update(layer=-1.0), "field 'host_us'"),
        (lambda d: d.update(cov_raw=[[1.0]]), "field 'cov_raw'"),
    ],
)
def test_a_bad_file_is_named(fitted, tmp_path, edit, expect):
    d = host_fit_to_dict(fitted[1])
    edit(d)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=f"host fit file {path}: .*{expect}"):
        dm.load_host_fit(path)


def test_not_json_and_not_a_fit(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        dm.load_host_fit(path)
    with pytest.raises(ValueError, match="file not found"):
        dm.load_host_fit(tmp_path / "none.json")
    with pytest.raises((ValueError, TypeError), match="KernelHostFit"):
        dm.save_host_fit("not a fit", path)


def test_a_calibrated_fit_round_trips_and_a_bad_block_is_named(fitted, tmp_path):
    frame, fit = fitted
    cal = fit.calibrate(frame, target="iteration_time_us")
    back = dm.load_host_fit(dm.save_host_fit(cal, tmp_path / "cal.json"))
    assert back.calibration == cal.calibration
    want, got = (f.predict(frame, interval=0.9) for f in (cal, back))
    np.testing.assert_array_equal(got.to_numpy(), want.to_numpy())
    d = host_fit_to_dict(cal)
    d["calibration"]["multipliers"][3] = -1.0
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="field 'calibration'"):
        dm.load_host_fit(path)
