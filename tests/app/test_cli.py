"""The command line. The happy paths run ``main`` in-process (one JAX for all);
every case of issue 17 runs the real entry point, ``python -m diffmodel``, in a
subprocess and checks its exit code, its one-line message on stderr (no traceback)
and that it wrote nothing."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import diffmodel as dm
from diffmodel._app._cli import build_parser, main
from diffmodel._app._demo import synthetic_trace

from helpers import ROOT, trace_table

SUBCOMMANDS = (
    "demo",
    "predict",
    "fit",
    "evaluate",
    "reproduce",
    "bench",
    "models",
    "gpus",
    "fit-host",
)


def run_cli(*argv, cwd, env=None, pre: str = ""):
    """``python -m diffmodel ARGV`` in ``cwd``: (exit code, stdout, stderr).

    ``pre``: Python run first in the same process (e.g. hiding a package)."""
    code = pre + "import sys; from diffmodel._app._cli import main; "
    code += "sys.exit(main(sys.argv[1:]))"
    cmd = [sys.executable, "-c", code, *map(str, argv)] if pre else None
    cmd = cmd or [sys.executable, "-m", "diffmodel", *map(str, argv)]
    environ = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    res = subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env=environ
    )
    return res.returncode, res.stdout, res.stderr


def one_line(err: str) -> str:
    """The single stderr line of a failed command."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("diffmodel: error: "), err
    assert "Traceback" not in err and "np.float64" not in err
    return lines[0]


def files(folder: pathlib.Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


STEPS = {
    "prefill_tokens": [0, 512, 0],
    "decode_tokens": [32, 4, 8],
    "num_prefill_reqs": [0, 1, 0],
    "num_decode_reqs": [32, 4, 8],
    "kv_tokens": [32_000, 4_000, 9_000],
    "measured_us": [20_000.0, np.nan, 15_000.0],
}
DEPLOY = ("--model", "llama-2-70b", "--tp", "4")


@pytest.fixture
def work(tmp_path) -> pathlib.Path:
    """A folder with ``steps.csv`` (canonical columns, one NaN target) and
    ``cols.csv`` (the same rows with model and tp columns)."""
    pd.DataFrame(STEPS).to_csv(tmp_path / "steps.csv", index=False)
    frame = pd.DataFrame(STEPS).assign(model="llama-2-70b", tp=4)
    frame.to_csv(tmp_path / "cols.csv", index=False)
    return tmp_path


@pytest.fixture(scope="module")
def trace(tmp_path_factory) -> pathlib.Path:
    """A small synthetic trace (canonical columns, experiment_id and step.id)."""
    path = tmp_path_factory.mktemp("cli") / "trace.csv"
    synthetic_trace(steps_per_deployment=40, seed=3).to_csv(path, index=False)
    return path


def with_rows(work: pathlib.Path, **columns) -> str:
    """``bad.csv``: the steps with some columns replaced."""
    pd.DataFrame(STEPS).assign(**columns).to_csv(work / "bad.csv", index=False)
    return "bad.csv"


# --------------------------------------------------------------------------- happy


@pytest.mark.slow
def test_fit_save_predict_evaluate(trace, tmp_path, capsys):
    factors, plot = tmp_path / "factors.json", tmp_path / "fit.png"
    argv = ["fit", "--data", trace, "--target", "step_time_us", "--kind", "per-model"]
    argv += ["--split", "temporal", "--out", factors, "--max-iterations", "40"]
    assert main([*map(str, argv), "--progress-every", "10", "--plot", str(plot)]) == 0
    out, err = capsys.readouterr()
    for name, (_, unit, _) in dm.FACTOR_SPECS.items():
        assert name in out and unit in out
    assert "accuracy on the test rows" in out and "MAPE %" in out
    assert "fit: iteration    10  loss" in err and "temporal split" in err
    assert plot.stat().st_size > 10_000
    saved = json.loads(factors.read_text())
    assert saved["kind"] == "per-model" and len(saved["labels"]) == 4
    # the intervals calibrated on the validation 20 %, kept in the file
    assert "90% interval calibrated on the" in out and "of the test rows" in out
    assert saved["uncertainty"]["calibration"]["n_rows"] > 0

    ev = ["evaluate", "--data", str(trace), "--target", "step_time_us"]
    assert main([*ev, "--factors", str(factors), "--by", "model"]) == 0
    out = capsys.readouterr().out
    assert "llama-2-70b" in out and "p99 APE %" in out and "Pearson r" in out

    output = tmp_path / "pred.parquet"
    pr = ["predict", "--data", str(trace), "--out", str(output)]
    assert main([*pr, "--factors", str(factors)]) == 0
    capsys.readouterr()
    got, frame = pd.read_parquet(output), pd.read_csv(trace)
    assert list(got.columns[: frame.shape[1]]) == list(frame.columns)
    want = dm.predict(frame, factors=dm.load_factors(factors))
    np.testing.assert_allclose(got["predicted_us"], want["predicted_us"], rtol=1e-12)


def test_predict_trace_names_and_plot(tmp_path, capsys):
    path = tmp_path / "trace_names.csv"
    frame = pd.DataFrame(STEPS).drop(columns="measured_us")
    frame.columns = [c if c == "kv_tokens" else f"batch.{c}" for c in frame.columns]
    frame.to_csv(path, index=False)
    output, plot = tmp_path / "out.csv", tmp_path / "breakdown.svg"
    argv = ["predict", *DEPLOY, "--data", str(path), "--out", str(output)]
    assert main([*argv, "--plot", str(plot)]) == 0
    capsys.readouterr()
    want = dm.predict(pd.read_csv(path), model="llama-2-70b", tp=4)
    got = pd.read_csv(output)["predicted_us"]
    np.testing.assert_allclose(got, want["predicted_us"], rtol=1e-9)
    assert plot.stat().st_size > 1_000


def test_flags_that_agree_with_the_columns_are_accepted(work, capsys):
    # A flag naming what the column says (in another spelling) is fine.
    argv = ["predict", "--data", str(work / "cols.csv"), "--out", str(work / "o.csv")]
    assert main([*argv, "--model", "Llama-2-70b-hf", "--tp", "4"]) == 0
    assert capsys.readouterr().err == ""


def test_nan_target_dropped_with_a_note(work, capsys):
    ev = ["evaluate", "--data", str(work / "steps.csv"), "--target", "measured_us"]
    assert main([*ev, *DEPLOY, "--dropna-target"]) == 0
    out, err = capsys.readouterr()
    assert "dropped 1 of 3 rows" in err and "(2 rows, us)" in out


def test_real_trace_targets(data_dir, tmp_path, capsys):
    steps = dm.data.load_steps(data_dir / "stepml" / "steps.parquet")
    path = tmp_path / "steps.parquet"
    steps.groupby("experiment_id").head(100).to_parquet(path, index=False)
    ev = ["evaluate", "--data", str(path), "--target", "iteration_time_us"]
    assert main([*ev, "--dropna-target"]) == 0
    out, err = capsys.readouterr()
    assert "physical priors" in out and "20260218-150304-codellama-34b" in out
    assert "rows with an undefined iteration_time_us" in err


@pytest.mark.slow
def test_demo(tmp_path, capsys):
    argv = ["demo", "--out-dir", str(tmp_path / "demo"), "--seed", "1"]
    argv += ["--rows-per-deployment", "20", "--max-iterations", "30"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in dm.FACTOR_NAMES)
    assert "recovered" in out and "example step" in out
    want = {"demo_trace.csv", "demo_factors.json", "demo_parity.png"}
    assert want <= files(tmp_path / "demo")


def test_models_and_gpus_list_the_catalog(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in dm.known_models())
    assert "69.0B" in out  # llama-2-70b's parameters
    assert main(["gpus"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in dm.known_hardware()) and "989.5" in out


# --------------------------------------------------------------------------- help


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_texts(command, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "%%" not in out and "(default: None)" not in out
    assert out.count("(default:") == len(set(out.split("(default:")[1:]))
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    for action in sub._actions:
        if action.help != "==SUPPRESS==":
            assert action.help, f"{command} {action.option_strings} has no help"


def test_help_is_fast_because_it_imports_no_jax(tmp_path):
    code = "import sys, diffmodel._app._cli as c; c.build_parser(); "
    code += "print('jax' in sys.modules, 'pandas' in sys.modules)"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env
    )
    assert res.stdout.split() == ["False", "False"], res.stderr
    rc, out, _ = run_cli("--help", cwd=tmp_path)
    assert rc == 0 and all(c in out for c in SUBCOMMANDS)


# --------------------------------------------------------------------- issue 17


def fails(work, argv, expect, rc=1, **kw) -> str:
    """Run a failing command: exit ``rc``, one line containing ``expect``, no file
    written in ``work``."""
    before = files(work)
    code, out, err = run_cli(*argv, cwd=work, **kw)
    line = one_line(err)
    assert code == rc, err
    assert expect in line, line
    assert files(work) == before, "a failed command wrote files"
    assert out == ""
    return line


RENAMED = {
    "fit --factors KIND": (["fit", "--factors", "global"], "--factors is now --kind"),
    "demo --out DIR": (["demo", "--out", "d"], "--out is now --out-dir"),
    "predict --input": (["predict", "--input", "steps.csv"], "now --data"),
    "predict --output": (["predict", "--output", "o.csv"], "--output is now --out"),
    "demo --steps": (["demo", "--steps", "5"], "now --rows-per-deployment"),
    "fit --max-steps": (["fit", "--max-steps", "5"], "now --max-iterations"),
    "bench --n-steps": (["bench", "--n-steps", "5"], "--n-steps is now --rows"),
    "reproduce --out": (["reproduce", "--out", "r"], "--out is now --out-dir"),
    "no abbreviations": (["demo", "--out-d", "x"], "unrecognized arguments"),
}


@pytest.mark.parametrize("case", list(RENAMED))
def test_item2_one_vocabulary(case, work):
    argv, expect = RENAMED[case]
    fails(work, argv, expect, rc=2)


def test_item2_reproduce_data_accepts_the_stepml_folder(data_dir, tmp_path):
    from diffmodel._app._reproduce import data_root

    assert data_root(data_dir / "stepml") == data_dir
    assert data_root(data_dir) == data_dir
    argv = ["reproduce", "--data", tmp_path, "--out-dir", tmp_path / "r"]
    line = fails(tmp_path, argv, "no stepml/steps.parquet")
    assert "or its stepml/ folder" in line


PREDICT = ["predict", "--data", "cols.csv", "--out", "o.csv"]
CASES = {
    # item 3: explicit flags are checked, and win or are an error
    "unknown --model beside a model column": (
        [*PREDICT, "--model", "gpt-5", "--tp", "4"],
        "--model gpt-5: unknown model 'gpt-5'",
    ),
    "--model contradicting the column": (
        [*PREDICT, "--model", "codellama-34b"],
        "--model codellama-34b contradicts the table's 'model' column",
    ),
    "--tp contradicting the column": (
        [*PREDICT, "--tp", "2"],
        "--tp 2 contradicts the table's 'tp' column (4)",
    ),
    "unknown --hardware": ([*PREDICT, "--hardware", "tpu-v9"], "unknown hardware"),
    # item 5: messages
    "header-only CSV": (
        ["predict", "--data", "header.csv", "--out", "o.csv", *DEPLOY],
        "--data header.csv: the table has a header but no rows",
    ),
    "--plot with a wrong suffix": (
        [*PREDICT, "--plot", "p.txt"],
        "--plot p.txt: expected a .png, .pdf, .svg file",
    ),
    "--plot without a suffix": (
        [*PREDICT, "--plot", "plotfile"],
        "--plot plotfile: expected a .png, .pdf, .svg file",
    ),
    "evaluate --by an absent column": (
        ["evaluate", "--data", "steps.csv", "--target", "measured_us", *DEPLOY]
        + ["--dropna-target", "--by", "workload"],
        "--by workload: no such column",
    ),
    "demo --out-dir on a file": (
        ["demo", "--out-dir", "steps.csv"],
        "--out-dir steps.csv: exists and is not a folder",
    ),
    # item 4: silently accepted before
    "fit --out f.csv": (
        ["fit", "--data", "steps.csv", "--target", "measured_us", *DEPLOY]
        + ["--dropna-target", "--out", "f.csv"],
        "--out f.csv: expected a .json file",
    ),
    "9-factor fit on one row": (
        ["fit", "--data", "one.csv", "--target", "measured_us", *DEPLOY]
        + ["--out", "f.json"],
        "--kind global fits 9 factors from 1 training rows; give at least 9",
    ),
    "per-model fit on too few rows of a deployment": (
        ["fit", "--data", "cols.csv", "--target", "measured_us", "--dropna-target"]
        + ["--kind", "per-model", "--out", "f.json"],
        "--kind per-model fits 9 factors per deployment and llama-2-70b/h100-sxm/tp4",
    ),
    "--learning-rate with L-BFGS": (
        ["fit", "--data", "steps.csv", "--target", "measured_us", *DEPLOY]
        + ["--out", "f.json", "--learning-rate", "0.1"],
        "--learning-rate is the step size of --solver adam only",
    ),
    "missing factors file": (
        [*PREDICT, "--factors", "none.json"],
        "--factors none.json: file not found",
    ),
    "undefined target": (
        ["fit", "--data", "steps.csv", "--target", "measured_us", *DEPLOY]
        + ["--out", "f.json"],
        "--target measured_us: undefined (NaN, text or <= 0) in 1 of 3 rows; pass "
        "--dropna-target",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_issue17_case(case, work):
    (work / "header.csv").write_text(",".join(STEPS) + "\n")
    pd.DataFrame(STEPS).iloc[:1].to_csv(work / "one.csv", index=False)
    argv, expect = CASES[case]
    fails(work, argv, expect)


BAD_VALUES = {
    "fractional tokens": (
        {"prefill_tokens": [0, 512.5, 0]},
        "column 'prefill_tokens' must be a whole number >= 0 (tokens); row 1 has 512.5",
    ),
    "decode tokens without decode requests": (
        {"num_decode_reqs": [0, 4, 8]},
        "row 0: decode_tokens is 32 but num_decode_reqs is 0 (decode tokens need a "
        "decode request)",
    ),
    "more prefill requests than tokens": (
        {"prefill_tokens": [0, 10, 0], "num_prefill_reqs": [0, 20, 0]},
        "row 1: prefill_tokens is 10 but num_prefill_reqs is 20 (each prefill "
        "request brings at least one token)",
    ),
    "negative count, no NumPy repr": (
        {"decode_tokens": [-64, 4, 8]},
        "column 'decode_tokens' must be a whole number >= 0 (tokens); row 0 has -64",
    ),
    "text in a count": (
        {"kv_tokens": ["a", "1", "2"]},
        "column 'kv_tokens' must be numeric; row 0 has 'a'",
    ),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_item4_and_5_bad_values(case, work):
    columns, expect = BAD_VALUES[case]
    bad = with_rows(work, **columns)
    fails(work, ["predict", "--data", bad, "--out", "o.csv", *DEPLOY], expect)


def test_item4_kv_usage_ratio_above_one(work):
    frame = pd.DataFrame(STEPS).drop(columns="kv_tokens")
    frame["kv.usage_gpu_ratio"] = [0.5, 1.7, 0.1]
    frame["kv.blocks_total_gpu"] = 10_000
    frame.to_csv(work / "usage.csv", index=False)
    argv = ["predict", "--data", "usage.csv", "--out", "o.csv", *DEPLOY]
    expect = "column 'kv.usage_gpu_ratio' must be a fraction in [0, 1]; row 1 has 1.7"
    fails(work, argv, expect)


def test_item4_negative_learning_rate_is_a_usage_error(work):
    argv = ["fit", "--data", "steps.csv", "--target", "measured_us", "--out", "f.json"]
    fails(work, [*argv, "--learning-rate", "-1"], "expected a number > 0", rc=2)


@pytest.mark.slow
def test_item4_hierarchical_factors_warn_on_an_unseen_deployment(trace, tmp_path):
    frame = pd.read_csv(trace)
    seen = frame[frame["model"] != "codellama-34b"]
    seen.to_csv(tmp_path / "seen.csv", index=False)
    fit = ["fit", "--data", "seen.csv", "--target", "step_time_us"]
    fit += ["--kind", "hierarchical", "--out", "h.json", "--max-iterations", "5"]
    assert run_cli(*fit, cwd=tmp_path)[0] == 0
    predict = ["predict", "--data", trace, "--out", "p.csv", "--factors", "h.json"]
    code, out, err = run_cli(*predict, cwd=tmp_path)
    assert code == 0 and "wrote" in out
    assert err.strip() == (
        "warning: the factors were not fitted on codellama-34b/h100-sxm/tp2; its "
        "rows get the global level (fitted groups: llama-2-70b/h100-sxm/tp4, "
        "llama-3.1-8b/h100-sxm/tp1, llama-3.1-8b/h100-sxm/tp2)"
    )


def test_item5_trace_and_canonical_paths_word_a_problem_alike(work):
    from diffmodel.data import validate_steps

    trace = trace_table(**{"batch.decode_tokens": [1.5, 0, 1, 2]})
    with pytest.raises(ValueError) as trace_err:
        validate_steps(trace)
    frame = pd.DataFrame(STEPS).assign(decode_tokens=[1.5, 4, 8])
    with pytest.raises(ValueError) as frame_err:
        dm.predict(frame, model="llama-2-70b", tp=4)
    want = "must be a whole number >= 0 (tokens); row 0 has 1.5"
    assert str(trace_err.value) == f"column 'batch.decode_tokens' {want}"
    assert str(frame_err.value) == f"column 'decode_tokens' {want}"


def test_item7_a_missing_extra_is_named(work):
    hide = "sys.modules['matplotlib'] = None; "
    argv = [*PREDICT, "--plot", "p.png"]
    fails(
        work,
        argv,
        "--plot needs matplotlib, which is not installed: pip install 'diffmodel[app]'",
        pre="import sys; " + hide,
    )


# ------------------------------------------------------------ predict --interval
# Through the real entry point (``python -m diffmodel`` in a subprocess).


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


def test_predict_ep_flag_sets_expert_parallelism(tmp_path, capsys):
    """``--ep 8``: DeepSeek-V3 at TP 8 with whole experts per GPU, the library's
    ``ep`` column; a flag contradicting the column is refused, naming both."""
    frame = pd.DataFrame(
        [dict(prefill_tokens=2048, decode_tokens=64, num_prefill_reqs=1,
              num_decode_reqs=64, kv_tokens=64 * 2048)]
    )  # fmt: skip
    path, out = tmp_path / "ds.csv", tmp_path / "o.csv"
    frame.to_csv(path, index=False)
    argv = ["predict", "--data", path, "--out", out, "--model", "deepseek-v3"]
    argv = [str(a) for a in (*argv, "--hardware", "h200", "--tp", "8")]
    assert main([*argv, "--ep", "8"]) == 0
    got = pd.read_csv(out)
    want = dm.predict(frame.assign(ep=8), model="deepseek-v3", hardware="h200", tp=8)
    np.testing.assert_allclose(got["predicted_us"], want["predicted_us"], rtol=1e-9)
    assert (got["ep"] == 8).all()
    assert main(argv) == 0
    assert pd.read_csv(out)["predicted_us"][0] != got["predicted_us"][0]
    capsys.readouterr()
    frame.assign(ep=1).to_csv(path, index=False)
    assert main([*argv, "--ep", "8"]) == 1
    assert "--ep 8 contradicts the table's 'ep' column (1)" in capsys.readouterr().err


def test_predict_pp_flag_prices_pipeline_stages(tmp_path, capsys):
    """``--pp 2``: the library's ``pp`` column, with the pipeline columns; a flag
    contradicting the column, and ``--pp`` with ``--host``, are refused."""
    frame = pd.DataFrame(
        [dict(prefill_tokens=2048, decode_tokens=64, num_prefill_reqs=1,
              num_decode_reqs=64, kv_tokens=64 * 2048)]
    )  # fmt: skip
    path, out = tmp_path / "s.csv", tmp_path / "o.csv"
    frame.to_csv(path, index=False)
    argv = ["predict", "--data", path, "--out", out, "--model", "llama-3.1-70b"]
    argv = [str(a) for a in (*argv, "--tp", "4")]
    assert main([*argv, "--pp", "2"]) == 0
    got = pd.read_csv(out)
    want = dm.predict(frame, model="llama-3.1-70b", tp=4, pp=2)
    np.testing.assert_allclose(got["predicted_us"], want["predicted_us"], rtol=1e-9)
    assert got["pp_bubble_us"][0] > 0 and (got["pp"] == 2).all()
    capsys.readouterr()
    frame.assign(pp=1).to_csv(path, index=False)
    assert main([*argv, "--pp", "2"]) == 1
    assert "--pp 2 contradicts the table's 'pp' column (1)" in capsys.readouterr().err
    frame.assign(pp=2).to_csv(path, index=False)
    assert main([*argv, "--host", str(tmp_path / "h.json")]) == 1
    assert "priced by the roofline: not with --host" in capsys.readouterr().err


@pytest.mark.slow
def test_fit_prior_scale_auto_prints_the_evidence(trace, tmp_path):
    fit = ["fit", "--data", trace, "--target", "step_time_us", "--kind"]
    fit += ["hierarchical", "--prior-scale", "auto", "--out", "h.json"]
    code, out, _ = run_cli(*fit, "--max-iterations", "20", cwd=tmp_path)
    assert code == 0
    line = next(x for x in out.splitlines() if "empirical Bayes" in x)
    assert "0.01" in line and "+0.0" in line


def test_fit_prior_scale_bad_values(trace, tmp_path):
    base = ["fit", "--data", trace, "--target", "step_time_us", "--out", "f.json"]
    fails(
        tmp_path,
        [*base, "--prior-scale", "0"],
        "--prior-scale: expected a finite number > 0 or 'auto', got '0'",
        rc=2,
    )
    for scale in ("auto", "0.3"):
        fails(
            tmp_path,
            [*base, "--prior-scale", scale],
            "--prior-scale is the spread of --kind hierarchical's per-deployment "
            "offsets; --kind global has none",
        )
