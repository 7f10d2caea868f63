"""``diffmodel fit-host`` and ``diffmodel predict --host``: host costs over the
kernel sum from the command line, and their bad inputs (one line each, no file)."""

import json

import numpy as np
import pandas as pd
import pytest

import diffmodel as dm
from diffmodel._app._cli import main
from diffmodel.kernels._curves_io import save_curves
from tests.app.test_cli import fails
from tests.kernels.test_step import CURVES, TRUTH, _frame, _with_target


def _steps():
    models = (("codellama-34b", 2), ("llama-2-70b", 4))
    return _with_target(_frame(n=120, models=models), TRUTH, noise=0.01)


@pytest.fixture
def folder(tmp_path):
    _steps().to_csv(tmp_path / "steps.csv", index=False)
    save_curves(CURVES, tmp_path / "h100.json")
    return tmp_path


def _fit(folder, *extra):
    argv = ["fit-host", "--data", folder / "steps.csv", "--target", "iteration_time_us"]
    argv += ["--curves", folder / "h100.json", "--out", folder / "host.json"]
    return main([str(a) for a in (*argv, *extra)])


def test_fit_host_saves_a_fit_that_predict_uses(folder, capsys):
    assert _fit(folder) == 0
    out = capsys.readouterr().out
    assert "layer_request" in out and "sd_us" in out and "MAPE %" in out
    fit = dm.load_host_fit(folder / "host.json")
    assert float(fit.host.layer_us) == pytest.approx(15.0, rel=0.1)
    assert json.loads((folder / "host.json").read_text())["terms"] == [
        "layer",
        "layer_request",
    ]
    argv = ["predict", "--data", folder / "steps.csv", "--out", folder / "p.csv"]
    argv += ["--host", folder / "host.json", "--interval", "0.9"]
    assert main([str(a) for a in argv]) == 0
    got = pd.read_csv(folder / "p.csv")
    frame = pd.read_csv(folder / "steps.csv")
    want = fit.predict(frame, interval=0.9)
    for c in ("predicted_us", "predicted_lo_us", "predicted_hi_us"):
        np.testing.assert_allclose(got[c], want[c], rtol=1e-9)
    parts = got[[f"{c}_us" for c in dm.COMPONENTS]].sum(axis=1)
    np.testing.assert_allclose(parts, got["predicted_us"], rtol=1e-9)
    inside = (got["predicted_lo_us"] <= got["iteration_time_us"]) & (
        got["iteration_time_us"] <= got["predicted_hi_us"]
    )
    assert inside.mean() > 0.8


def test_predict_host_on_another_gpu_takes_its_curves(folder, capsys):
    assert _fit(folder, "--terms", "layer") == 0
    other = folder / "a100.json"
    save_curves(dataclasses_replace(CURVES, hardware="a100"), other)
    frame = pd.read_csv(folder / "steps.csv").assign(hardware="a100")
    frame.to_csv(folder / "a100.csv", index=False)
    argv = ["predict", "--data", folder / "a100.csv", "--out", folder / "p.csv"]
    assert main([str(a) for a in (*argv, "--host", folder / "host.json")]) == 1
    assert "calibrated on 'h100-sxm'" in capsys.readouterr().err
    argv += ["--host", folder / "host.json", "--curves", other]
    assert main([str(a) for a in argv]) == 0
    got = pd.read_csv(folder / "p.csv")
    fit = dm.load_host_fit(folder / "host.json")
    want = dm.kernel_device_us(frame, dm.kernels.load_curves(other)) + float(
        fit.host.layer_us
    ) * np.where(frame["model"] == "llama-2-70b", 80, 48)
    np.testing.assert_allclose(got["predicted_us"], want, rtol=1e-9)


def dataclasses_replace(curves, **kw):
    import dataclasses

    return dataclasses.replace(curves, **kw)


BAD = {
    "host and factors": (
        ["--host", "host.json", "--factors", "f.json"],
        "--host and --factors",
    ),
    "curves without host": (["--curves", "h100.json"], "--curves gives the device"),
    "missing host file": (["--host", "nope.json"], "host fit file not found"),
    "host file of factors": (["--host", "h100.json"], "field 'format'"),
    "transfer with host": (
        ["--host", "host.json", "--interval", "0.9", "--transfer", "all"],
        "--transfer all selects",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_predict_host_bad_input(case, folder):
    assert _fit(folder) == 0
    extra, expect = BAD[case]
    argv = ["predict", "--data", "steps.csv", "--out", "p.csv", *extra]
    fails(folder, argv, expect)


FIT_BAD = {
    "unknown term": (["--terms", "gpu"], "invalid choice: 'gpu'", 2),
    "curves missing": (["--curves", "nope.json"], "curves file not found", 1),
    "curves not json": (["--curves", "steps.csv"], "--curves steps.csv", 1),
    "no such target": (["--target", "t_us"], "t_us", 1),
    "bad out suffix": (["--out", "host.txt"], "expected a .json file", 1),
    "tail not a fraction": (["--calibrate-tail", "1.5"], "fraction in (0, 1)", 2),
    "tail without time": (["--calibrate-tail", "0.2"], "step.id", 1),
    "tail and temporal": (
        ["--calibrate-tail", "0.2", "--split", "temporal"],
        "--calibrate-tail goes with --split none",
        1,
    ),
    "joint from nowhere": (["--joint", "nowhere"], "expected 'database'", 1),
    "joint and transfer": (
        ["--joint", "database", "--transfer"],
        "--joint with --transfer",
        1,
    ),
}


@pytest.mark.parametrize("case", list(FIT_BAD))
def test_fit_host_bad_input(case, folder):
    extra, expect, rc = FIT_BAD[case]
    argv = ["fit-host", "--data", "steps.csv", "--target", "iteration_time_us"]
    argv += ["--curves", "h100.json", "--out", "host.json"]
    fails(folder, [*argv, *extra], expect, rc=rc)


def test_the_command_line_knows_every_host_term():
    from diffmodel._app._host_cmd import TERMS

    assert TERMS == dm.kernels.HOST_TERMS


def test_fit_host_terms_auto_prints_the_comparison_and_fits_the_choice(folder, capsys):
    """``--terms auto`` on two models whose stack costs 15 us a layer and 0.4 us a
    request in each layer: the held-out comparison is printed, the chosen set is
    fitted and saved; 'auto' beside a term is refused."""
    assert _fit(folder, "--terms", "auto") == 0
    captured = capsys.readouterr()
    assert "host terms chosen by held-out MAPE %" in captured.out
    assert "codellama-34b/h100-sxm/tp2" in captured.out
    assert "host terms step: held-out MAPE" in captured.err
    saved = json.loads((folder / "host.json").read_text())["terms"]
    assert saved == ["layer", "layer_request"]
    assert _fit(folder, "--terms", "auto", "layer") == 1
    assert "'auto' stands alone" in capsys.readouterr().err


def _timed(folder):
    """The steps with an experiment per model and a step counter, as a trace has."""
    frame = pd.read_csv(folder / "steps.csv")
    frame = frame.assign(
        experiment_id=frame["model"], **{"step.id": frame.groupby("model").cumcount()}
    )
    frame.to_csv(folder / "timed.csv", index=False)
    return frame


def test_fit_host_calibrates_its_intervals_on_held_out_rows(folder, capsys):
    """``--split temporal`` calibrates on the validation 20 %% and reports the test
    coverage; ``--calibrate-tail`` holds the last rows out of the fit for it; the
    saved fit carries the multipliers that ``predict --host`` then uses."""
    frame = _timed(folder)
    argv = ["fit-host", "--data", folder / "timed.csv", "--target"]
    argv += ["iteration_time_us", "--curves", folder / "h100.json"]
    argv += ["--out", folder / "host.json"]
    assert main([str(a) for a in (*argv, "--split", "temporal")]) == 0
    out = capsys.readouterr().out
    assert "intervals calibrated on 48 held-out rows" in out
    assert "90% interval: covers" in out
    fit = dm.load_host_fit(folder / "host.json")
    assert fit.calibration is not None and fit.calibration.n_rows == 48
    assert fit.n_rows == 144
    assert (
        main([str(a) for a in (*argv, "--calibrate-tail", "0.25", "--transfer")]) == 0
    )
    assert "refits without each of the 2 deployments" in capsys.readouterr().out
    fit = dm.load_host_fit(folder / "host.json")
    assert fit.transfer_calibration.n_rows == 180
    assert (fit.n_rows, fit.calibration.n_rows) == (180, 60)
    argv = ["predict", "--data", folder / "timed.csv", "--out", folder / "p.csv"]
    argv += ["--host", folder / "host.json", "--interval", "0.8"]
    assert main([str(a) for a in argv]) == 0
    got = pd.read_csv(folder / "p.csv")
    want = fit.predict(frame, interval=0.8)
    for c in ("predicted_lo_us", "predicted_hi_us"):
        np.testing.assert_allclose(got[c], want[c], rtol=1e-9)


def test_fit_host_transfer_needs_two_deployments(folder):
    frame = pd.read_csv(folder / "steps.csv")
    frame[frame["model"] == "llama-2-70b"].to_csv(folder / "one.csv", index=False)
    argv = ["fit-host", "--data", "one.csv", "--target", "iteration_time_us"]
    argv += ["--curves", "h100.json", "--out", "host.json", "--transfer"]
    fails(folder, argv, "two deployments or more")


@pytest.mark.slow
def test_fit_host_joint_refits_the_curves_on_the_kernel_tables(
    folder, data_dir, capsys
):
    assert _fit(folder, "--joint", data_dir, "--max-iterations", "100") == 0
    out = capsys.readouterr().out
    assert "joint fit: each source's noise sd" in out
    for source in ("gemm_bf16", "prefill_attention", "allreduce", "trace"):
        assert source in out
    fit = dm.load_host_fit(folder / "host.json")
    assert fit.curves != CURVES  # the refitted curves travel with the fit
    assert float(fit.host.layer_us) > 0.0
