"""The command line, end to end in-process: fit, save, predict, evaluate, demo,
every error path (one line on stderr, non-zero exit, no traceback), --help."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import diffmodel as dm
from diffmodel._app import _cli
from diffmodel._app._cli import main
from diffmodel._app._demo import synthetic_trace

SUBCOMMANDS = ("demo", "predict", "fit", "evaluate", "reproduce", "bench")


@pytest.fixture(scope="module")
def trace(tmp_path_factory) -> pathlib.Path:
    """A small synthetic trace (canonical columns, experiment_id and step.id)."""
    path = tmp_path_factory.mktemp("cli") / "trace.csv"
    synthetic_trace(steps_per_deployment=40, seed=3).to_csv(path, index=False)
    return path


@pytest.fixture
def steps_csv(tmp_path) -> pathlib.Path:
    path = tmp_path / "steps.csv"
    pd.DataFrame(
        {
            "prefill_tokens": [0, 512, 0],
            "decode_tokens": [32, 4, 8],
            "num_prefill_reqs": [0, 1, 0],
            "num_decode_reqs": [32, 4, 8],
            "kv_tokens": [32_000, 4_000, 9_000],
            "measured_us": [20_000.0, np.nan, 15_000.0],
        }
    ).to_csv(path, index=False)
    return path


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("diffmodel: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.slow
def test_fit_save_predict_evaluate(trace, tmp_path, capsys):
    factors = tmp_path / "factors.json"
    plot = tmp_path / "fit.png"
    argv = ["fit", "--data", str(trace), "--target", "step_time_us"]
    argv += ["--factors", "per-model"]
    argv += ["--split", "temporal", "--out", str(factors), "--max-steps", "40"]
    argv += ["--progress-every", "10", "--plot", str(plot)]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    for name, (_, unit, _) in dm.FACTOR_SPECS.items():
        assert name in out and unit in out
    assert "accuracy on the test rows" in out and "MAPE %" in out
    assert "fit: step    10  loss" in err and "temporal split" in err
    assert plot.stat().st_size > 10_000

    # The JSON round trip through the CLI: evaluate and predict load what fit saved.
    saved = json.loads(factors.read_text())
    assert saved["kind"] == "per-model" and saved["target"] == "step_time_us"
    assert len(saved["labels"]) == 4
    fitted = dm.load_factors(factors)
    assert (
        main(
            ["evaluate", "--data", str(trace), "--target", "step_time_us"]
            + ["--factors", str(factors), "--by", "model"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "llama-2-70b" in out and "p99 APE %" in out and "Pearson r" in out

    output = tmp_path / "pred.parquet"
    assert (
        main(
            ["predict", "--input", str(trace), "--output", str(output)]
            + ["--factors", str(factors)]
        )
        == 0
    )
    capsys.readouterr()
    got = pd.read_parquet(output)
    frame = pd.read_csv(trace)
    assert len(got) == len(frame)
    assert list(got.columns[: frame.shape[1]]) == list(frame.columns)
    want = dm.predict(frame, factors=fitted)
    np.testing.assert_allclose(got["predicted_us"], want["predicted_us"], rtol=1e-12)
    parts = got[[f"{c}_us" for c in dm.COMPONENTS]].sum(axis=1)
    np.testing.assert_allclose(parts, got["predicted_us"], rtol=1e-12)


def test_predict_flags_and_trace_names(tmp_path, capsys):
    path = tmp_path / "trace_names.csv"
    pd.DataFrame(
        {
            "batch.prefill_tokens": [0, 512],
            "batch.decode_tokens": [32, 4],
            "batch.num_prefill_reqs": [0, 1],
            "batch.num_decode_reqs": [32, 4],
            "kv_tokens": [32_000, 4_000],
        }
    ).to_csv(path, index=False)
    output, plot = tmp_path / "out.csv", tmp_path / "breakdown.png"
    argv = ["predict", "--model", "llama-2-70b", "--tp", "4", "--input", str(path)]
    assert main([*argv, "--output", str(output), "--plot", str(plot)]) == 0
    capsys.readouterr()
    got = pd.read_csv(output)
    want = dm.predict(pd.read_csv(path), model="llama-2-70b", tp=4)
    np.testing.assert_allclose(got["predicted_us"], want["predicted_us"], rtol=1e-9)
    assert plot.stat().st_size > 10_000


def test_row_columns_override_flags(trace, tmp_path, capsys):
    output = tmp_path / "out.csv"
    argv = ["predict", "--input", str(trace), "--output", str(output)]
    assert main([*argv, "--model", "llama-3.1-8b", "--tp", "1"]) == 0
    err = capsys.readouterr().err
    assert "'model' column overrides --model" in err
    want = dm.predict(pd.read_csv(trace))
    got = pd.read_csv(output)
    np.testing.assert_allclose(got["predicted_us"], want["predicted_us"], rtol=1e-9)


def test_nan_target_refused_then_dropped(steps_csv, tmp_path, capsys):
    flags = ["--data", str(steps_csv), "--target", "measured_us"]
    flags += ["--model", "llama-2-70b", "--tp", "4"]
    assert main(["fit", *flags, "--out", str(tmp_path / "f.json")]) == 1
    line = one_error_line(capsys)
    assert "1 of 3 rows" in line and "--dropna-target" in line
    assert main(["evaluate", *flags]) == 1
    one_error_line(capsys)
    assert main(["evaluate", *flags, "--dropna-target"]) == 0
    out, err = capsys.readouterr()
    assert "dropped 1 of 3 rows" in err
    assert "(2 steps, us)" in out


def test_real_trace_targets(data_dir, tmp_path, capsys):
    """A trace table gets its targets; iteration_time_us is undefined on most rows."""
    steps = dm.data.load_steps(data_dir / "stepml" / "steps.parquet")
    path = tmp_path / "steps.parquet"
    steps.groupby("experiment_id").head(100).to_parquet(path, index=False)
    argv = ["fit", "--data", str(path), "--out", str(tmp_path / "f.json")]
    assert main([*argv, "--target", "iteration_time_us"]) == 1
    assert "--dropna-target" in one_error_line(capsys)
    ev = ["evaluate", "--data", str(path), "--target", "iteration_time_us"]
    assert main([*ev, "--dropna-target"]) == 0
    out, err = capsys.readouterr()
    assert "physical priors" in out and "20260218-150304-codellama-34b" in out
    assert "rows with an undefined iteration_time_us" in err
    assert main(["evaluate", "--data", str(path), "--target", "step_duration_us"]) == 0
    assert "300" in capsys.readouterr().out


@pytest.mark.slow
def test_demo(tmp_path, capsys):
    argv = ["demo", "--out", str(tmp_path / "demo"), "--steps", "20", "--seed", "1"]
    assert main([*argv, "--max-steps", "30"]) == 0
    out = capsys.readouterr().out
    for name in dm.FACTOR_NAMES:
        assert name in out
    assert "recovered" in out and "example step" in out and "attention_decode" in out
    for f in ("demo_trace.csv", "demo_factors.json", "demo_parity.png"):
        assert (tmp_path / "demo" / f).stat().st_size > 0
    assert isinstance(
        dm.load_factors(tmp_path / "demo" / "demo_factors.json"), dm.GlobalFactors
    )


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help(command, capsys):
    assert main([command, "--help"]) == 0
    assert "--help" in capsys.readouterr().out


def test_top_level_help_and_usage_error(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(c in out for c in SUBCOMMANDS)
    assert main([]) == 2
    one_error_line(capsys)
    assert (
        main(["predict", "--tp", "abc", "--input", "a.csv", "--output", "b.csv"]) == 2
    )
    assert "--tp" in one_error_line(capsys)


def _write(path: pathlib.Path, text: str) -> str:
    path.write_text(text)
    return str(path)


ERRORS = {
    "missing file": (["--input", "{tmp}/nope.csv"], "not found"),
    "bad suffix": (["--input", "{tmp}/steps.txt"], ".csv, .parquet"),
    "bad output": (["--output", "{tmp}/out.json"], "--output"),
    "output folder": (["--output", "{tmp}/no/out.csv"], "not found"),
    "unknown model": (["--model", "gpt-9"], "unknown model 'gpt-9'"),
    "unknown hardware": (["--hardware", "tpu-v9"], "unknown hardware"),
    "bad tp": (["--tp", "3"], "tp=3"),
    "zero tp": (["--tp", "0"], "positive integer"),
    "no model": (["--model", None], "--model"),
    "factors missing": (["--factors", "{tmp}/none.json"], "not found"),
    "factors not json": (["--factors", "{tmp}/steps.csv"], "not valid JSON"),
    "factors list": (["--factors", "{tmp}/list.json"], "not a valid diffmodel"),
    "factors format": (["--factors", "{tmp}/other.json"], "not a diffmodel"),
    "factors keys": (["--factors", "{tmp}/partial.json"], "not a valid diffmodel"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_predict_errors(case, steps_csv, tmp_path, capsys):
    _write(tmp_path / "steps.txt", "x\n")
    _write(tmp_path / "list.json", "[1, 2]")
    _write(tmp_path / "other.json", '{"format": "something else"}')
    partial = {"format": "diffmodel.factors/1", "kind": "global"}
    partial["factor_names"] = list(dm.FACTOR_NAMES)  # but no "prior" nor "raw"
    _write(tmp_path / "partial.json", json.dumps(partial))
    opts = {
        "--model": "llama-2-70b",
        "--tp": "4",
        "--input": str(steps_csv),
        "--output": str(tmp_path / "out.csv"),
    }
    change, expect = ERRORS[case]
    flag, value = change
    if value is None:
        del opts[flag]
    else:
        opts[flag] = value.format(tmp=tmp_path)
    argv = ["predict", *[x for kv in opts.items() for x in kv]]
    assert main(argv) == 1
    assert expect in one_error_line(capsys)


def test_fit_and_evaluate_errors(steps_csv, tmp_path, capsys):
    base = ["--data", str(steps_csv), "--model", "llama-2-70b", "--tp", "4"]
    out = ["--out", str(tmp_path / "f.json")]
    assert main(["fit", *base, *out, "--target", "nope"]) == 1
    assert "no column 'nope'" in one_error_line(capsys)
    assert (
        main(
            [
                "fit",
                *base,
                *out,
                "--target",
                "measured_us",
                "--split",
                "temporal",
                "--dropna-target",
            ]
        )
        == 1
    )
    assert "--split temporal" in one_error_line(capsys)
    assert (
        main(
            [
                "fit",
                *base,
                "--target",
                "kv_tokens",
                "--out",
                str(tmp_path / "no" / "f.json"),
            ]
        )
        == 1
    )
    one_error_line(capsys)
    assert main(["evaluate", *base, "--target", "measured_us"]) == 1
    assert "--dropna-target" in one_error_line(capsys)
    assert main(["evaluate", *base, "--target", "kv_tokens", "--by", "nope"]) == 1
    assert "nope" in one_error_line(capsys)
    assert (
        main(
            [
                "fit",
                *base,
                "--target",
                "decode_tokens",
                *out,
                "--data",
                str(tmp_path / "missing.parquet"),
            ]
        )
        == 1
    )
    assert "not found" in one_error_line(capsys)


def test_reproduce_missing_data(tmp_path, capsys):
    argv = ["reproduce", "--data", str(tmp_path / "none"), "--out", str(tmp_path)]
    assert main([*argv, "--quick"]) == 1
    assert "not found" in one_error_line(capsys)


def test_bench_is_part_of_the_package():
    assert callable(_cli.load_benchmark().main)


@pytest.mark.slow
def test_console_script():
    script = pathlib.Path(sys.executable).parent / "diffmodel"
    if not script.is_file():
        pytest.skip("console script not installed")
    res = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert "demo" in res.stdout and "fit" in res.stdout
    res = subprocess.run(
        [sys.executable, "-m", "diffmodel", "fit", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0 and "--dropna-target" in res.stdout
