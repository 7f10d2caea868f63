"""The ``diffmodel`` command line: demo, predict, fit, evaluate, reproduce, bench.

``main(argv)`` parses the arguments and runs one subcommand. Bad input (a missing or
unreadable file, a missing column, an unknown model or hardware, a TP degree that
does not split the model, a bad factors file, an undefined target) prints one line,
``diffmodel: error: ...``, on stderr and returns 1; a usage error returns 2. Anything
else is a bug and keeps its traceback. Step times are microseconds throughout.

The command line computes in float64 (it turns on ``jax_enable_x64``).
"""

import argparse
import pathlib
import sys
from collections.abc import Sequence

import numpy as np
import pandas as pd

PROG = "diffmodel"
_FIT_KINDS = ("global", "per-model", "hierarchical")


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one line (the same form as every other
    error) instead of the usage text and the message."""

    def error(self, message: str):
        self.exit(2, f"{PROG}: error: {self.prog}: {message} (see --help)\n")


def _note(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- input


def read_table(path: str | pathlib.Path) -> pd.DataFrame:
    """A ``.csv`` or ``.parquet`` (``.pq``) file as a frame, rows in file order."""
    path = pathlib.Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet", ".pq"):
        raise ValueError(f"{path}: expected a .csv, .parquet or .pq file")
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    try:
        if suffix == ".csv":
            return pd.read_csv(path)
        return pd.read_parquet(path)
    except ValueError as err:  # pandas' parser errors, pyarrow's ArrowInvalid
        raise ValueError(f"cannot read {path}: {err}") from None


def _check_output(path: str | pathlib.Path) -> pathlib.Path:
    path = pathlib.Path(path)
    if path.suffix.lower() not in (".csv", ".parquet", ".pq"):
        raise ValueError(f"--output {path}: expected a .csv, .parquet or .pq file")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"--output {path}: folder {path.parent} not found")
    return path


def _check_plot(path: str | pathlib.Path | None) -> pathlib.Path | None:
    if path is None:
        return None
    path = pathlib.Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"--plot {path}: folder {path.parent} not found")
    return path


def load_data(path: str | pathlib.Path) -> pd.DataFrame:
    """Read steps for fit/evaluate: a trace table (every column of
    ``STEP_COLUMNS``) is validated as by :func:`diffmodel.load_steps`; targets
    ``step_duration_us`` and ``iteration_time_us`` (us) are added when the columns
    they come from are there."""
    from ..data._traces import STEP_COLUMNS, add_targets, validate_steps

    frame = read_table(path)
    if set(STEP_COLUMNS) <= set(frame.columns):
        frame = validate_steps(frame)
    needed = {"step.duration_us", "experiment_id", "step.id", "step.ts_start_ns"}
    wanted = {"step_duration_us", "iteration_time_us"}
    if needed <= set(frame.columns) and not wanted <= set(frame.columns):
        frame = add_targets(frame)
    return frame


def defined_target(frame: pd.DataFrame, target: str, *, dropna: bool) -> pd.DataFrame:
    """The rows whose ``target`` is finite and > 0; others are an error unless
    ``dropna`` (then dropped, with a note on stderr)."""
    if target not in frame.columns:
        numeric = [c for c in frame.columns if pd.api.types.is_numeric_dtype(frame[c])]
        raise ValueError(
            f"--target: no column {target!r}; numeric columns are {numeric}"
        )
    y = pd.to_numeric(frame[target], errors="coerce").to_numpy(dtype=float)
    bad = ~(np.isfinite(y) & (y > 0))
    n, k = len(frame), int(bad.sum())
    if not k:
        return frame
    if k == n:
        raise ValueError(f"target {target!r} is undefined (NaN or <= 0) in every row")
    if not dropna:
        raise ValueError(
            f"target {target!r} is undefined (NaN or <= 0) in {k} of {n} rows; pass "
            f"--dropna-target to use the {n - k} rows that have it"
        )
    _note(f"dropped {k} of {n} rows with an undefined {target} (--dropna-target)")
    return frame.loc[~bad]


def load_factor_file(path: str | pathlib.Path | None):
    """A saved factors file, or ``None`` (the physical priors) for no path."""
    from .._fitting._io import load_factors

    if path is None:
        return None
    try:
        return load_factors(path)
    except (KeyError, TypeError, AttributeError) as err:
        raise ValueError(
            f"factors file {path} is not a valid diffmodel factors file "
            f"({type(err).__name__}: {err})"
        ) from None


def _deployment_flags(frame: pd.DataFrame, args) -> dict:
    """``model``/``hardware``/``tp`` keywords; a note when a column overrides one."""
    flags = {"model": args.model, "hardware": args.hardware, "tp": args.tp}
    for name, value in flags.items():
        if value is not None and name in frame.columns:
            _note(f"note: the file's {name!r} column overrides --{name} {value}")
        elif value is None and name != "hardware" and name not in frame.columns:
            raise ValueError(
                f"no {name}: pass --{name} or give the file a {name!r} column"
            )
    return flags


def _groups(frame: pd.DataFrame, flags: dict) -> np.ndarray:
    from .._frame import groups_from_frame

    g = groups_from_frame(frame, **flags)
    return np.asarray(g.labels, dtype=object)[np.asarray(g.index)]


# --------------------------------------------------------------------------- output


def factor_table(result) -> str:
    """Fitted factors as text: one row per factor with its unit, one column per
    group (``global`` first)."""
    from .._model._factors import FACTOR_NAMES, FACTOR_SPECS

    table = result.table()
    table.columns = list(FACTOR_NAMES)
    out = table.T
    out.insert(0, "unit", [FACTOR_SPECS[n][1] for n in FACTOR_NAMES])
    out.index.name = "factor"
    return out.to_string(float_format=lambda v: f"{v:.4g}")


def metrics_text(
    frame: pd.DataFrame, target: str, by: str | None, *, predicted="predicted_us"
) -> str:
    """The metrics table per ``by`` value plus an ``all`` row, as text."""
    from .._metrics import metrics_table

    overall = metrics_table(frame, actual=target, predicted=predicted, by=None)
    if by is None:
        table = overall
    else:
        table = pd.concat(
            [metrics_table(frame, actual=target, predicted=predicted, by=by), overall]
        )
        table.index.name = by
    table = table.rename(
        columns={
            "mape": "MAPE %",
            "mspe": "MSPE %",
            "pearson_r": "Pearson r",
            "p99_ape": "p99 APE %",
        }
    )
    table["n"] = table["n"].astype(int)
    return table.to_string(float_format=lambda v: f"{v:.3f}")


def _plot(frame, path, *, actual, groups, title=None) -> None:
    from .._app._plots import diagnostic_figure, save_figure

    frame = frame.assign(deployment=groups)
    fig = diagnostic_figure(frame, actual=actual, by="deployment", title=title)
    _note(f"wrote {save_figure(fig, path)}")


def _write_table(frame: pd.DataFrame, path: pathlib.Path) -> None:
    if path.suffix.lower() == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path, index=False)


# --------------------------------------------------------------------------- commands


def _cmd_demo(args) -> int:
    from .._app._demo import run_demo

    run_demo(
        out=args.out,
        seed=args.seed,
        steps_per_deployment=args.steps,
        noise=args.noise,
        solver=args.solver,
        max_steps=args.max_steps,
    )
    return 0


def _cmd_predict(args) -> int:
    from .._predict import predict

    output = _check_output(args.output)
    plot = _check_plot(args.plot)
    frame = read_table(args.input)
    flags = _deployment_flags(frame, args)
    factors = load_factor_file(args.factors)
    out = predict(frame, factors=factors, **flags)
    _write_table(out, output)
    t = out["predicted_us"]
    print(
        f"wrote {len(out)} rows to {output} with predicted_us and the component "
        f"columns; predicted step time median {t.median():,.0f} us "
        f"(min {t.min():,.0f}, max {t.max():,.0f})"
    )
    if plot is not None:
        _plot(out, plot, actual=None, groups=_groups(frame, flags))
    return 0


def _cmd_fit(args) -> int:
    from .._fitting._fit import fit
    from .._fitting._io import save_factors
    from .._predict import predict
    from ..data._splits import temporal_split

    out_path = pathlib.Path(args.out)
    if not out_path.parent.is_dir():
        raise FileNotFoundError(f"--out {out_path}: folder {out_path.parent} not found")
    plot = _check_plot(args.plot)
    frame = load_data(args.data)
    if args.split == "temporal":
        missing = [c for c in ("experiment_id", "step.id") if c not in frame.columns]
        if missing:
            raise ValueError(
                f"--split temporal orders each experiment's steps in time and needs "
                f"the columns {missing}; use --split none"
            )
    frame = defined_target(frame, args.target, dropna=args.dropna_target)
    flags = _deployment_flags(frame, args)
    valid = test = None
    if args.split == "temporal":
        split = temporal_split(frame)
        train, valid, test = (frame[split == s] for s in ("train", "valid", "test"))
        _note(
            f"temporal split per experiment: {len(train)} train, {len(valid)} valid, "
            f"{len(test)} test rows"
        )
        if len(train) == 0 or len(test) == 0:
            raise ValueError("the temporal split left no training or no test rows")
        valid = valid if len(valid) else None
    else:
        train = frame

    def progress(step, loss):
        _note(f"fit: step {int(step):>5d}  loss {float(loss):.6g}")

    result = fit(
        train,
        target=args.target,
        factors=args.factors,
        valid=valid,
        solver=args.solver,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        callback=progress if args.progress_every > 0 else None,
        callback_every=max(args.progress_every, 1),
        **flags,
    )
    status = "converged" if result.converged else "step budget reached"
    print(
        f"fitted {args.factors} factors to {args.target} on {len(train)} steps: "
        f"{result.n_steps} {args.solver} steps in {result.wall_seconds:.1f} s "
        f"({status}), loss {result.loss:.5g} (mean squared log ratio)"
    )
    print(factor_table(result))
    save_factors(result, out_path)
    print(f"saved {out_path}")
    scored, which = (test, "test") if test is not None else (train, "training")
    pred = predict(scored, factors=result, **flags)
    by = "experiment_id" if "experiment_id" in pred.columns else None
    print(f"\naccuracy on the {which} rows ({args.target}, us):")
    print(metrics_text(pred, args.target, by))
    if plot is not None:
        title = f"{args.factors} fit, {which} rows"
        _plot(
            pred, plot, actual=args.target, groups=_groups(scored, flags), title=title
        )
    return 0


def _cmd_evaluate(args) -> int:
    from .._predict import predict

    plot = _check_plot(args.plot)
    frame = defined_target(load_data(args.data), args.target, dropna=args.dropna_target)
    flags = _deployment_flags(frame, args)
    factors = load_factor_file(args.factors)
    pred = predict(frame, factors=factors, **flags)
    by = args.by
    if by == "experiment_id" and by not in pred.columns:
        by = None
    elif by == "none":
        by = None
    what = args.factors or "the physical priors"
    print(f"accuracy of {what} on {args.target} ({len(pred)} steps, us):")
    print(metrics_text(pred, args.target, by))
    if plot is not None:
        _plot(pred, plot, actual=args.target, groups=_groups(frame, flags))
    return 0


def _cmd_reproduce(args) -> int:
    from .._app._reproduce import reproduce  # deferred: the whole benchmark
    from .._paths import default_data_dir

    def names(text):
        return None if text is None else [s for s in text.split(",") if s]

    data = pathlib.Path(args.data) if args.data else default_data_dir()
    out = pathlib.Path(args.out)
    reproduce(
        data=data,
        out=out,
        quick=args.quick,
        experiments=names(args.experiments),
        targets=names(args.targets),
        protocols=names(args.protocols),
        methods=names(args.methods),
    )
    md = out / "results.md"
    if md.is_file():
        print(md.read_text())
    print(f"wrote {out / 'results.csv'} and {md}")
    return 0


def load_benchmark():
    """The throughput benchmark module (``diffmodel._app._bench``)."""
    from . import _bench as _throughput

    return _throughput


def _cmd_bench(args) -> int:
    bench = load_benchmark()
    try:
        bench.main(
            n_steps=args.n_steps,
            repeats=args.repeats,
            json_path=args.json,
            markdown_path=args.markdown,
        )
    except ImportError as err:  # xgboost, imported by the benchmark when it runs
        raise ValueError(f"the benchmark needs a missing package: {err}") from None
    return 0


# --------------------------------------------------------------------------- parser


def _add_deployment(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "deployment (per-row model/hardware/tp columns of the file win)"
    )
    g.add_argument("--model", help="model name, e.g. llama-2-70b (see known_models)")
    g.add_argument(
        "--hardware", help="GPU, e.g. h100-sxm (default h100-sxm when no column)"
    )
    g.add_argument("--tp", type=int, help="tensor-parallel degree (GPUs)")


def _add_target(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    p.add_argument(
        "--target",
        required=required,
        metavar="COLUMN",
        help="measured step time column, us (trace files get step_duration_us and "
        "iteration_time_us added)",
    )
    p.add_argument(
        "--dropna-target",
        action="store_true",
        help="drop rows whose target is NaN or <= 0 instead of refusing",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``diffmodel`` command."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = _Parser(
        prog=PROG,
        description="A differentiable, fittable roofline of LLM inference step time. "
        "Times are microseconds per step.",
        epilog="Start with 'diffmodel demo'. Each subcommand has --help.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "demo",
        help="fit factors back from a synthetic trace (no data needed)",
        description="Draw a synthetic trace from the roofline with known factors "
        "(llama-2-70b TP4, codellama-34b TP2, llama-3.1-8b TP1 and TP2 on H100; "
        "decode-heavy and prefill-heavy steps; log-normal noise), fit global "
        "factors back, print true vs recovered factors and an example step's "
        "breakdown, and write the trace, the factors and parity/diagnostic plots.",
        formatter_class=fmt,
    )
    p.add_argument("--out", default="diffmodel-demo", help="output folder")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--steps", type=int, default=250, help="steps per deployment")
    p.add_argument("--noise", type=float, default=0.05, help="log-sd of the noise")
    p.add_argument("--solver", choices=("lbfgs", "adam"), default="lbfgs")
    p.add_argument("--max-steps", type=int, default=500, help="optimiser steps")
    p.set_defaults(run=_cmd_demo)

    p = sub.add_parser(
        "predict",
        help="predict step times of a table of steps",
        description="Predict the step time (us) of every row of a CSV or parquet "
        "file. Columns: prefill_tokens, decode_tokens, num_prefill_reqs, "
        "num_decode_reqs, kv_tokens (or the trace's batch.* and kv.* columns); "
        "optionally prefill_context_tokens. Writes the same rows with predicted_us "
        "and one <component>_us column per component.",
        formatter_class=fmt,
    )
    p.add_argument("--input", required=True, metavar="FILE", help=".csv or .parquet")
    p.add_argument("--output", required=True, metavar="FILE", help=".csv or .parquet")
    p.add_argument(
        "--factors", metavar="FILE", help="saved factors JSON (default: priors)"
    )
    _add_deployment(p)
    p.add_argument("--plot", metavar="PNG", help="write a component breakdown plot")
    p.set_defaults(run=_cmd_predict)

    p = sub.add_parser(
        "fit",
        help="fit factors to measured step times and save them",
        description="Fit the roofline's factors to a measured step time column on "
        "the log-ratio loss, print them with their units and save them as JSON. "
        "With --split temporal: fit on the first 60 %% of each experiment's steps, "
        "stop early on the next 20 %%, report metrics on the last 20 %%.",
        formatter_class=fmt,
    )
    p.add_argument("--data", required=True, metavar="FILE", help=".csv or .parquet")
    _add_target(p)
    p.add_argument("--factors", choices=_FIT_KINDS, default="global")
    p.add_argument("--split", choices=("temporal", "none"), default="none")
    _add_deployment(p)
    p.add_argument("--out", required=True, metavar="FACTORS.json")
    p.add_argument("--solver", choices=("lbfgs", "adam"), default="lbfgs")
    p.add_argument("--max-steps", type=int, default=500, help="optimiser steps")
    p.add_argument("--learning-rate", type=float, default=0.05, help="Adam only")
    p.add_argument(
        "--progress-every", type=int, default=50, help="steps between progress lines"
    )
    p.add_argument("--plot", metavar="PNG", help="write parity/residual/breakdown")
    p.set_defaults(run=_cmd_fit)

    p = sub.add_parser(
        "evaluate",
        help="accuracy of saved factors on measured step times",
        description="Predict every row and print MAPE, MSPE (signed), Pearson r, "
        "p99 APE (percent) and n, per group and overall.",
        formatter_class=fmt,
    )
    p.add_argument("--data", required=True, metavar="FILE", help=".csv or .parquet")
    p.add_argument(
        "--factors", metavar="FILE", help="saved factors JSON (default: priors)"
    )
    _add_target(p)
    p.add_argument(
        "--by",
        default="experiment_id",
        metavar="COLUMN",
        help="group the metrics by this column ('none': overall only)",
    )
    _add_deployment(p)
    p.add_argument("--plot", metavar="PNG", help="write parity/residual/breakdown")
    p.set_defaults(run=_cmd_evaluate)

    p = sub.add_parser(
        "reproduce",
        help="the benchmark on the real traces (results.csv, results.md)",
        description="Run every method on both targets and all protocols on the "
        "reference traces and write results.csv and results.md.",
        formatter_class=fmt,
    )
    p.add_argument(
        "--data",
        metavar="DIR",
        help="reference data folder (default: $DIFFMODEL_DATA or ../shared/data)",
    )
    p.add_argument("--out", default="results", metavar="DIR", help="output folder")
    p.add_argument("--quick", action="store_true", help="a small, fast run")
    for name in ("experiments", "targets", "protocols", "methods"):
        p.add_argument(f"--{name}", metavar="A,B", help=f"comma-separated {name}")
    p.set_defaults(run=_cmd_reproduce)

    p = sub.add_parser(
        "bench",
        help="throughput of bulk prediction (same as experiments/throughput.py)",
        description="Steps/s of bulk prediction against NumPy, XGBoost and the "
        "memory-bandwidth bound.",
        formatter_class=fmt,
    )
    p.add_argument("--n-steps", type=int, default=10_000_000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    p.add_argument("--markdown", metavar="PATH", help="write a README section")
    p.set_defaults(run=_cmd_bench)

    from ._kernels_cmd import add_parser as _add_kernels_parsers

    _add_kernels_parsers(sub)
    return parser


def _message(err: BaseException) -> str:
    if isinstance(err, KeyError) and err.args:
        text = f"missing key {err.args[0]!r}"
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``diffmodel`` command line; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error (2, already printed)
        return exit_.code if isinstance(exit_.code, int) else 1

    import jax

    jax.config.update("jax_enable_x64", True)
    try:
        return args.run(args)
    except (ValueError, KeyError, OSError) as err:
        print(f"{PROG}: error: {_message(err)}", file=sys.stderr)
        return 1
