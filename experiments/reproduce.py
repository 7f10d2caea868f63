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
import tempfile
from collections.abc import Sequence

import pandas as pd

import diffmodel
from diffmodel._app._reproduce import (
    METHODS,
    order_results,
    reproduce,
    results_markdown,
)


def main(
    *,
    data: pathlib.Path | None = None,
    out: pathlib.Path = pathlib.Path("results/reproduce"),
    experiments: Sequence[str] | None = None,
    quick: bool = False,
    update: Sequence[str] | None = None,
) -> None:
    """Run the benchmark, write ``out/results.{csv,md}`` and print the tables.

    ``update``: rerun only these methods and replace their rows in the existing
    ``out/results.csv`` (the other methods' rows are kept as they are)."""
    data = diffmodel.data.default_data_dir() if data is None else data
    if not update:
        results = reproduce(data=data, out=out, experiments=experiments, quick=quick)
        print(results_markdown(results))
        return
    old = out / "results.csv"
    if not old.is_file():
        raise SystemExit(f"--update needs an earlier run's {old}")
    kept = pd.read_csv(old)
    with tempfile.TemporaryDirectory() as tmp:
        new = reproduce(
            data=data,
            out=pathlib.Path(tmp),
            experiments=experiments,
            quick=quick,
            methods=update,
        )
    results = order_results(
        pd.concat([kept[~kept["method"].isin(update)], new], ignore_index=True)
    )
    results.to_csv(old, index=False)
    (out / "results.md").write_text(results_markdown(results))
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
    parser.add_argument(
        "--update",
        nargs="+",
        metavar="METHOD",
        choices=METHODS,
        help="rerun only these methods and merge their rows into the existing "
        "OUT/results.csv",
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = _parse()
    main(
        data=args.data,
        out=args.out,
        experiments=args.experiments,
        quick=args.quick,
        update=args.update,
    )
