"""``diffmodel fit-host`` and ``diffmodel predict --host``: host costs over the
kernel sum from the command line, and their bad inputs (one line each, no file)."""

import json

import numpy as np
import pandas as pd
import pytest

import diffmodel as dm
from diffmodel._app._cli import main
from diffmodel._fitting._fit import step_data
from diffmodel.kernels import default_kernel_curves
from diffmodel.kernels._curves_io import save_curves
from diffmodel.kernels._step import HostCosts, host_features
from tests.app.test_cli import fails

CURVES = default_kernel_curves()
TRUTH = HostCosts(layer_us=15.0, layer_request_us=0.4)


def _steps(n=120, seed=0):
    rng = np.random.default_rng(seed)
    parts = []
    for model, tp in (("codellama-34b", 2), ("llama-2-70b", 4)):
        n_dec = rng.integers(1, 120, n)
        n_pf = rng.integers(0, 2, n)
        parts.append(
            pd.DataFrame(
                {
                    "model": model,
                    "tp": tp,
                    "prefill_tokens": n_pf * rng.integers(16, 1500, n),
                    "decode_tokens": n_dec,
                    "num_prefill_reqs": n_pf,
                    "num_decode_reqs": n_dec,
                    "kv_tokens": n_dec * rng.uniform(200, 3000, n),
                }
            )
        )
    frame = pd.concat(parts, ignore_index=True)
    data, _ = step_data(frame)
    dep = data.deployments.take(data.group)
    x = np.asarray(host_features(data.stats, dep), dtype=float)
    theta = np.array([float(v) for v in TRUTH.as_dict().values()])
    y = dm.kernel_device_us(frame, CURVES) + x @ theta
    return frame.assign(wall_us=y * np.exp(rng.normal(0.0, 0.01, len(frame))))


@pytest.fixture
def folder(tmp_path):
    _steps().to_csv(tmp_path / "steps.csv", index=False)
    save_curves(CURVES, tmp_path / "h100.json")
    return tmp_path


def _fit(folder, *extra):
    argv = ["fit-host", "--data", folder / "steps.csv", "--target", "wall_us"]
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
    inside = (got["predicted_lo_us"] <= got["wall_us"]) & (
        got["wall_us"] <= got["predicted_hi_us"]
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
}


@pytest.mark.parametrize("case", list(FIT_BAD))
def test_fit_host_bad_input(case, folder):
    extra, expect, rc = FIT_BAD[case]
    argv = ["fit-host", "--data", "steps.csv", "--target", "wall_us"]
    argv += ["--curves", "h100.json", "--out", "host.json"]
    fails(folder, [*argv, *extra], expect, rc=rc)


def test_the_command_line_knows_every_host_term():
    from diffmodel._app._host_cmd import TERMS

    assert TERMS == dm.kernels.HOST_TERMS
