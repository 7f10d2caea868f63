"""The benchmark on the real traces: every method, both targets, three protocols.

Writes ``results.csv`` (long form, one row per target, protocol, method and
experiment; MAPE/MSPE/P99 APE in percent) and ``results.md`` (MAPE per experiment,
mean, counts under 15% and 25%) and prints the markdown. Progress goes to stderr.

    .venv/bin/python experiments/reproduce.py [--data DIR] [--out DIR] [--quick]

The full run takes several minutes on 2 cores (the XGBoost grids and the XLA
compilation of each fit dominate); ``--quick`` is a small smoke run.
"""

import argparse
import pathlib
from collections.abc import Sequence

import diffmodel
from diffmodel._app._reproduce import reproduce, results_markdown


def main(
    *,
    data: pathlib.Path | None = None,
    out: pathlib.Path = pathlib.Path("results/reproduce"),
    experiments: Sequence[str] | None = None,
    quick: bool = False,
) -> None:
    """Run the benchmark, write ``out/results.{csv,md}`` and print the tables."""
    data = diffmodel.data.default_data_dir() if data is None else data
    results = reproduce(data=data, out=out, experiments=experiments, quick=quick)
    print(results_markdown(results))


def _parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        type=pathlib.Path,
        default=diffmodel.data.default_data_dir(),
        help="reference data folder holding stepml/ (default: %(default)s)",
    )
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=pathlib.Path("results/reproduce"),
        help="output folder (default: %(default)s)",
    )
    parser.add_argument(
        "--experiment",
        action="append",
        dest="experiments",
        help="an experiment_id to use (repeatable; default: all)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a small smoke run: 1500 steps per experiment, tiny grids, short fits",
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = _parse()
    main(data=args.data, out=args.out, experiments=args.experiments, quick=args.quick)
