"""The ``diffmodel`` command line: its vocabulary, parser and error handling.

One vocabulary across subcommands (the README lists them side by side):

- ``--data``: the input. A ``.csv``/``.parquet``/``.pq`` table of steps for
  ``predict``, ``fit`` and ``evaluate``; the reference data folder (or its
  ``stepml/`` folder) for ``reproduce``.
- ``--out FILE``: the one file a command writes (``predict``: a table; ``fit``:
  factors JSON; ``bench``: figures JSON). ``--out-dir DIR``: the folder a command
  writes several files into (``demo``, ``reproduce``).
- ``--factors FILE``: a saved factors JSON to predict with; ``--kind KIND``: which
  factor set ``fit`` fits.
- *rows* are steps of a table (``--rows``, ``--rows-per-deployment``); the
  optimiser's steps are *iterations* (``--max-iterations``, ``--progress-every``).
- ``--model``/``--hardware``/``--tp``: the deployment; given with a column of the
  same name, they must agree with it on every row. Unknown names are an error.

``main(argv)`` parses the arguments and runs one subcommand. Bad input prints one
line, ``diffmodel: error: ...``, on stderr and returns 1 (nothing written); a usage
error returns 2. Anything else is a bug and keeps its traceback. Step times are
microseconds throughout; the command line computes in float64. This module imports
neither JAX nor the library, so ``--help`` is fast: the subcommands' modules are
imported when one runs.
"""

import argparse
import sys
import warnings
from collections.abc import Sequence

from .._fitting._kinds import ROOFLINE_KINDS

PROG = "diffmodel"
FIT_KINDS = ROOFLINE_KINDS
SOLVERS = ("lbfgs", "adam")
TABLE_SUFFIXES = (".csv", ".parquet", ".pq")
# Modules of the [app] extra: a command that needs a missing one says how to get it.
APP_MODULES = ("matplotlib", "xgboost", "sklearn", "scipy")


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors as one line (the same form as every other error)
    and no abbreviated options (``--out`` must never mean ``--out-dir``)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{PROG}: error: {self.prog}: {message} (see --help)\n")


class _Formatter(argparse.HelpFormatter):
    """Help with ``(default: X)`` appended once, only where there is a default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and (
            "default" not in text
        ):
            text += " (default: %(default)s)"
        return text


def _number(kind, *, low: float, strict: bool, what: str, finite: bool = False):
    """An argparse type: a ``kind`` (int/float) > ``low`` (``strict``) or >= it
    (and not infinite with ``finite``)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value != value or (value <= low if strict else value < low):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        if finite and value == float("inf"):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = what  # argparse names the type in its messages
    return parse


POSITIVE_INT = _number(int, low=0, strict=True, what="a positive integer")
COUNT = _number(int, low=0, strict=False, what="an integer >= 0")
POSITIVE = _number(float, low=0.0, strict=True, what="a number > 0")
NONNEGATIVE = _number(float, low=0.0, strict=False, what="a number >= 0")
FINITE_NONNEGATIVE = _number(
    float, low=0.0, strict=False, what="a finite number >= 0", finite=True
)
_FINITE_POSITIVE = _number(
    float, low=0.0, strict=True, what="a finite number > 0 or 'auto'", finite=True
)


def PRIOR_SCALE(text: str):  # noqa: N802 (an argparse type, named like the others)
    """``--prior-scale``: a finite number > 0, or ``auto`` (empirical Bayes)."""
    return "auto" if text == "auto" else _FINITE_POSITIVE(text)


PRIOR_SCALE.__name__ = "a finite number > 0 or 'auto'"


def _open_unit(what: str):
    """An argparse type: a number strictly between 0 and 1, called ``what``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not 0.0 < value < 1.0:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = what  # argparse names the type in its messages
    return parse


PROBABILITY = _open_unit("a probability in (0, 1)")
FRACTION = _open_unit("a fraction in (0, 1)")


class _Renamed(argparse.Action):
    """A flag of the old vocabulary: a usage error naming its new spelling."""

    def __init__(self, option_strings, dest, new: str, **kwargs):
        self.new = new
        super().__init__(option_strings, dest, nargs="?", help=argparse.SUPPRESS)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is now {self.new}")


def _renamed(p: argparse.ArgumentParser, **names: str) -> None:
    for old, new in names.items():
        p.add_argument(f"--{old.replace('_', '-')}", action=_Renamed, new=new)


# --------------------------------------------------------------------------- groups


def _add_data_file(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        required=True,
        metavar="FILE",
        help="table of steps, .csv, .parquet or .pq: columns prefill_tokens, "
        "decode_tokens, num_prefill_reqs, num_decode_reqs, kv_tokens (or the "
        "trace's batch.* and kv.* columns), optionally prefill_context_tokens",
    )


def _add_deployment(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "deployment",
        "Flags, or the table's model/hardware/tp/ep columns; a flag given beside a "
        "column of the same name must agree with it on every row.",
    )
    g.add_argument(
        "--model", help="model name, e.g. llama-2-70b (list: 'diffmodel models')"
    )
    g.add_argument(
        "--hardware",
        help="GPU, e.g. h100-sxm (list: 'diffmodel gpus'); h100-sxm when neither "
        "this flag nor a 'hardware' column says otherwise",
    )
    g.add_argument("--tp", type=POSITIVE_INT, help="tensor-parallel degree (GPUs)")
    g.add_argument(
        "--ep",
        type=POSITIVE_INT,
        help="expert-parallel degree of MoE models: 1 experts split over the TP "
        "GPUs, tp whole experts spread over them (default: 1, or the table's 'ep' "
        "column)",
    )


def _add_target(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--target",
        required=True,
        metavar="COLUMN",
        help="measured step time column, us (trace files get step_duration_us and "
        "iteration_time_us added)",
    )
    p.add_argument(
        "--dropna-target",
        action="store_true",
        help="drop rows whose target is NaN or <= 0 instead of refusing",
    )


def _add_plot(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--plot", metavar="FILE", help=f"also write {what} (.png, .pdf or .svg)"
    )


def _add_optimiser(p: argparse.ArgumentParser, *, max_iterations: int) -> None:
    g = p.add_argument_group("optimiser")
    g.add_argument(
        "--solver", choices=SOLVERS, default="lbfgs", help="optax L-BFGS or Adam"
    )
    g.add_argument(
        "--max-iterations",
        type=POSITIVE_INT,
        default=max_iterations,
        metavar="N",
        help="optimiser iterations at most",
    )
    g.add_argument(
        "--progress-every",
        type=COUNT,
        default=50,
        metavar="N",
        help="iterations between progress lines on stderr (0: none)",
    )


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``diffmodel`` command."""
    parser = _Parser(
        prog=PROG,
        description="A differentiable, fittable roofline of LLM inference step time. "
        "Times are microseconds per step.",
        epilog="Start with 'diffmodel demo'. Each subcommand has --help.",
    )
    sub = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=_Parser
    )

    p = sub.add_parser(
        "demo",
        help="fit factors back from a synthetic trace (no data needed)",
        description="Draw a synthetic trace from the roofline with known factors "
        "(llama-2-70b TP4, codellama-34b TP2, llama-3.1-8b TP1 and TP2 on H100; "
        "decode-heavy and prefill-heavy steps; log-normal noise), fit global "
        "factors back, print true vs recovered factors and an example step's "
        "breakdown, and write the trace, the factors and parity/diagnostic plots "
        "into --out-dir.",
    )
    p.add_argument(
        "--out-dir", default="diffmodel-demo", metavar="DIR", help="output folder"
    )
    p.add_argument("--seed", type=COUNT, default=0, help="random seed of the trace")
    p.add_argument(
        "--rows-per-deployment",
        type=POSITIVE_INT,
        default=250,
        metavar="N",
        help="steps (rows) drawn per deployment",
    )
    p.add_argument(
        "--noise", type=FINITE_NONNEGATIVE, default=0.05, help="log-sd of the noise"
    )
    _add_optimiser(p, max_iterations=500)
    _renamed(p, out="--out-dir", steps="--rows-per-deployment")
    _renamed(p, max_steps="--max-iterations")
    p.set_defaults(run="demo")

    p = sub.add_parser(
        "predict",
        help="predict step times of a table of steps",
        description="Predict the step time (us) of every row of a table of steps. "
        "Writes the same rows with predicted_us and one <component>_us column per "
        "component to --out.",
    )
    _add_data_file(p)
    p.add_argument(
        "--out", required=True, metavar="FILE", help="output table, .csv/.parquet/.pq"
    )
    p.add_argument(
        "--factors",
        metavar="FILE",
        help="saved factors JSON (from 'diffmodel fit'); the physical priors "
        "when not given",
    )
    p.add_argument(
        "--interval",
        type=PROBABILITY,
        metavar="P",
        help="add predicted_lo_us and predicted_hi_us, the central P interval "
        "(e.g. 0.9) from the fit's posterior and residual noise; needs --factors "
        "saved from a fit, or --host",
    )
    p.add_argument(
        "--host",
        metavar="FILE",
        help="host costs saved by 'diffmodel fit-host' (instead of --factors): "
        "each step is its kernel sum plus those costs (overhead_us)",
    )
    p.add_argument(
        "--curves",
        metavar="CURVES.json",
        help="with --host: another GPU's kernel curves ('diffmodel calibrate') for "
        "rows on that GPU; the host costs stay the stack's (default: the curves "
        "the host costs were fitted over)",
    )
    p.add_argument(
        "--transfer",
        choices=("auto", "all", "none"),
        default="auto",
        help="which residual noise --interval uses: 'auto' the fit's transfer noise "
        "(fit --transfer-by) for deployments it never saw and its in-sample noise "
        "for the others; 'all' the transfer noise for every row (a new workload on "
        "a fitted deployment); 'none' the in-sample noise for every row",
    )
    _add_deployment(p)
    p.add_argument(
        "--pp",
        type=POSITIVE_INT,
        help="pipeline-parallel stages of tp GPUs each (default: 1, or the table's "
        "'pp' column): rows with pp > 1 are priced as pp stages over pp "
        "microbatches, with pp_p2p_us and pp_bubble_us columns (roofline only: not "
        "with --host or --interval)",
    )
    _add_plot(p, "a component breakdown plot")
    _renamed(p, input="--data", output="--out")
    p.set_defaults(run="predict")

    p = sub.add_parser(
        "fit",
        help="fit factors to measured step times and save them",
        description="Fit the roofline's factors to a measured step time column on "
        "the log-ratio loss, print them with their units and save them as JSON. "
        "With --split temporal: fit on the first 60 % of each experiment's steps, "
        "stop early on the next 20 %, report metrics on the last 20 %.",
    )
    _add_data_file(p)
    _add_target(p)
    p.add_argument(
        "--kind",
        choices=FIT_KINDS,
        default="global",
        help="one factor set for all deployments, one per deployment, or "
        "hierarchical (global values plus per-deployment offsets pulled to zero)",
    )
    p.add_argument(
        "--split",
        choices=("temporal", "none"),
        default="none",
        help="'temporal': fit on the first 60 %% of each experiment's steps, stop "
        "early and calibrate the predictive intervals on the next 20 %%, score on "
        "the last 20 %% (needs experiment_id and step.id columns); 'none': fit and "
        "score on every row",
    )
    p.add_argument(
        "--prior-scale",
        type=PRIOR_SCALE,
        default=None,
        metavar="SD",
        help="--kind hierarchical only: the sd of each deployment's log-offsets "
        "around the global factors (default: 0.1); 'auto': chosen by empirical "
        "Bayes (a fit at each of 0.01 ... 1, the highest Laplace marginal "
        "likelihood; the comparison is printed)",
    )
    p.add_argument(
        "--transfer-by",
        metavar="COLUMN",
        help="measure the transfer noise for --interval predictions on unseen "
        "deployments: refit once without each value of COLUMN (e.g. experiment_id "
        "or model; two or more values) and keep the miss on the left-out rows",
    )
    _add_deployment(p)
    p.add_argument(
        "--out", required=True, metavar="FILE", help="factors file to write, .json"
    )
    _add_optimiser(p, max_iterations=500)
    p.add_argument(
        "--learning-rate",
        type=POSITIVE,
        metavar="RATE",
        help="step size of Adam, --solver adam only (default: 0.05)",
    )
    _add_plot(p, "parity, residual and breakdown plots")
    _renamed(p, factors="--kind", max_steps="--max-iterations")
    p.set_defaults(run="fit")

    p = sub.add_parser(
        "evaluate",
        help="accuracy of saved factors on measured step times",
        description="Predict every row and print MAPE, MSPE (signed), Pearson r, "
        "p99 APE (percent) and n, per group and overall.",
    )
    _add_data_file(p)
    p.add_argument(
        "--factors",
        metavar="FILE",
        help="saved factors JSON; the physical priors when not given",
    )
    _add_target(p)
    p.add_argument(
        "--by",
        metavar="COLUMN",
        help="group the metrics by this column, or 'none' for the overall row only "
        "(default: experiment_id when the table has it)",
    )
    _add_deployment(p)
    _add_plot(p, "parity, residual and breakdown plots")
    _renamed(p, input="--data")
    p.set_defaults(run="evaluate")

    p = sub.add_parser(
        "reproduce",
        help="the benchmark on the real traces (results.csv, results.md)",
        description="Run every method on both targets and all protocols on the "
        "reference traces and write results.csv and results.md into --out-dir.",
    )
    p.add_argument(
        "--data",
        metavar="DIR",
        help="reference data folder or its stepml/ folder (default: "
        "$DIFFMODEL_DATA, else ../shared/data)",
    )
    p.add_argument("--out-dir", default="results", metavar="DIR", help="output folder")
    p.add_argument("--quick", action="store_true", help="a small, fast run")
    for name in ("experiments", "targets", "protocols", "methods"):
        p.add_argument(
            f"--{name}", metavar="A,B", help=f"comma-separated {name} (default: all)"
        )
    _renamed(p, out="--out-dir")
    p.set_defaults(run="reproduce")

    p = sub.add_parser(
        "bench",
        help="throughput of bulk prediction (same as experiments/throughput.py)",
        description="Steps/s of bulk prediction against NumPy, XGBoost and the "
        "memory-bandwidth bound. Needs the [app] extra (XGBoost).",
    )
    p.add_argument(
        "--rows",
        type=POSITIVE_INT,
        default=10_000_000,
        metavar="N",
        help="steps (rows) predicted per timed call",
    )
    p.add_argument(
        "--repeats",
        type=POSITIVE_INT,
        default=5,
        metavar="N",
        help="timed rounds (the median is reported)",
    )
    p.add_argument("--out", metavar="FILE", help="also write the figures as .json")
    p.add_argument(
        "--markdown", metavar="FILE", help="also write a README section, .md"
    )
    p.add_argument(
        "--scale",
        action="store_true",
        help="also loss + gradient by rows (1e4 to 1e7) and devices, and a fit of "
        "10M synthetic steps (about 2 minutes more)",
    )
    _renamed(p, n_steps="--rows", json="--out")
    p.set_defaults(run="bench")

    p = sub.add_parser(
        "models",
        help="list the model names the catalog knows",
        description="List the catalog's models with their size (parameters), "
        "layers and attention heads. Aliases (trace spellings, Hugging Face ids) "
        "map to these names.",
    )
    p.set_defaults(run="models")

    p = sub.add_parser(
        "gpus",
        help="list the GPU names the catalog knows",
        description="List the catalog's GPUs with their peak rates.",
    )
    p.set_defaults(run="gpus")

    from ._host_cmd import add_parser as _add_host_parser
    from ._kernels_cmd import add_parser as _add_kernels_parsers

    _add_host_parser(
        sub,
        {"data": _add_data_file, "target": _add_target, "deployment": _add_deployment},
    )
    _add_kernels_parsers(sub)
    return parser


# --------------------------------------------------------------------------- main


def _message(err: BaseException) -> str:
    if isinstance(err, KeyError) and err.args:
        text = f"missing key {err.args[0]!r}"
    elif isinstance(err, ModuleNotFoundError):
        text = (
            f"this command needs {err.name}, which is not installed: "
            "pip install 'diffmodel[app]'"
        )
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``diffmodel`` command line; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error (2, already printed)
        return exit_.code if isinstance(exit_.code, int) else 1
    try:
        from . import _cli_commands  # deferred: JAX and the library

        with warnings.catch_warnings():
            # The library's warnings (an unseen deployment, an undetermined fit
            # direction) as one plain line each, without Python's source echo.
            warnings.showwarning = _show_warning
            if callable(args.run):  # subcommands registered by their own module
                return args.run(args)
            return getattr(_cli_commands, f"cmd_{args.run}")(args)
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] not in APP_MODULES:
            raise
        print(f"{PROG}: error: {_message(err)}", file=sys.stderr)
        return 1
    except (ValueError, KeyError, OSError) as err:
        print(f"{PROG}: error: {_message(err)}", file=sys.stderr)
        return 1
    except MemoryError:
        print(
            f"{PROG}: error: out of memory: the work asked for does not fit this "
            "machine (fewer rows or steps)",
            file=sys.stderr,
        )
        return 1
