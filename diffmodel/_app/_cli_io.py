"""What the command line reads and writes, checked before any work is done.

Every check raises a one-line ``ValueError`` (or ``FileNotFoundError``) naming the
flag and what was expected; :mod:`._cli` prints it. Outputs are checked up front
(suffix, folder, extras installed) and written only once everything they need has
been computed, so a command that fails writes nothing.
"""

import importlib.util
import pathlib
import sys

import numpy as np
import pandas as pd

from ._cli import APP_MODULES, TABLE_SUFFIXES

PLOT_SUFFIXES = (".png", ".pdf", ".svg")


def note(line: str) -> None:
    """A line on stderr (notes, warnings, progress)."""
    print(line, file=sys.stderr, flush=True)


def need(module: str, flag: str) -> None:
    """Raise unless ``module`` (of the ``[app]`` extra) is installed."""
    assert module in APP_MODULES
    try:
        spec = importlib.util.find_spec(module)
    except ValueError:  # in sys.modules as None: blocked
        spec = None
    if spec is None:
        raise ValueError(
            f"{flag} needs {module}, which is not installed: "
            "pip install 'diffmodel[app]'"
        )


# --------------------------------------------------------------------------- input


def read_table(path: str | pathlib.Path, flag: str = "--data") -> pd.DataFrame:
    """A ``.csv`` or ``.parquet`` (``.pq``) table with at least one row."""
    path = pathlib.Path(path)
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise ValueError(f"{flag} {path}: expected a .csv, .parquet or .pq file")
    if not path.is_file():
        raise _not_a_file(flag, path)
    try:
        if suffix == ".csv":
            frame = pd.read_csv(path)
        else:
            frame = pd.read_parquet(path)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{flag} {path}: the file is empty") from None
    except ValueError as err:  # pandas' parser errors, pyarrow's ArrowInvalid
        raise ValueError(f"{flag} {path}: cannot read it ({err})") from None
    if len(frame) == 0:
        raise ValueError(f"{flag} {path}: the table has a header but no rows")
    from .._frame import check_unique_columns

    # pandas renames a repeated CSV column ("kv_tokens.1"), which the model would
    # then ignore: check the file's own header.
    try:
        check_unique_columns(_csv_header(path) if suffix == ".csv" else frame.columns)
    except ValueError as err:
        raise ValueError(f"{flag} {path}: {err}") from None
    return frame


def _not_a_file(flag: str, path: str | pathlib.Path) -> FileNotFoundError:
    """The error for an input path that is not a file: a folder, or nothing."""
    folder = pathlib.Path(path).is_dir()
    what = "is a folder, expected a file" if folder else "file not found"
    return FileNotFoundError(f"{flag} {path}: {what}")


def _csv_header(path: pathlib.Path) -> list[str]:
    import csv

    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        return [c.strip() for c in next(csv.reader(f), [])]


def load_data(path: str | pathlib.Path) -> pd.DataFrame:
    """Steps for fit/evaluate: a trace table (every column of ``STEP_COLUMNS``) is
    validated as by :func:`diffmodel.data.load_steps`; targets ``step_duration_us``
    and ``iteration_time_us`` (us) are added when the columns they come from are
    there."""
    from ..data._traces import STEP_COLUMNS, add_targets, validate_steps

    frame = read_table(path)
    if set(STEP_COLUMNS) <= set(frame.columns):
        frame = validate_steps(frame)
    needed = {"step.duration_us", "experiment_id", "step.id", "step.ts_start_ns"}
    wanted = {"step_duration_us", "iteration_time_us"}
    if needed <= set(frame.columns) and not wanted <= set(frame.columns):
        frame = add_targets(frame)
    return frame


def check_temporal_columns(
    frame: pd.DataFrame, flag: str = "--split temporal", instead: str = "--split none"
) -> None:
    """``flag`` (``--split temporal``, ``--calibrate-tail``) orders each
    experiment's steps in time: it needs the ``experiment_id`` and ``step.id``
    columns; the error says what to use ``instead``."""
    missing = [c for c in ("experiment_id", "step.id") if c not in frame.columns]
    if missing:
        raise ValueError(
            f"{flag} orders each experiment's steps in time and needs the columns "
            f"{missing}; {instead}"
        )


def defined_target(
    frame: pd.DataFrame, target: str, *, dropna: bool
) -> tuple[pd.DataFrame, str | None]:
    """The rows whose ``target`` is finite and > 0; others are an error unless
    ``dropna`` (then dropped, and a note for stderr returned with the rows)."""
    if target not in frame.columns:
        numeric = [c for c in frame.columns if pd.api.types.is_numeric_dtype(frame[c])]
        raise ValueError(
            f"--target: no column {target!r}; numeric columns are {numeric}"
        )
    from .._frame import holds_booleans

    if holds_booleans(frame[target]):
        raise ValueError(f"--target {target}: booleans, not step times (us)")
    y = pd.to_numeric(frame[target], errors="coerce").to_numpy(dtype=float)
    bad = ~(np.isfinite(y) & (y > 0))
    n, k = len(frame), int(bad.sum())
    if not k:
        return frame, None
    if k == n:
        raise ValueError(
            f"--target {target}: undefined (NaN, text or <= 0) in every row"
        )
    if not dropna:
        raise ValueError(
            f"--target {target}: undefined (NaN, text or <= 0) in {k} of {n} rows; "
            f"pass --dropna-target to use the {n - k} rows that have it"
        )
    dropped = f"dropped {k} of {n} rows with an undefined {target} (--dropna-target)"
    return frame.loc[~bad], dropped


def load_factor_file(path: str | pathlib.Path | None):
    """A saved factors file, or ``None`` (the physical priors) for no path."""
    from .._fitting._io import load_factors

    if path is None:
        return None
    if not pathlib.Path(path).is_file():
        raise _not_a_file("--factors", path)
    try:
        return load_factors(path)
    except (KeyError, TypeError, AttributeError) as err:
        raise ValueError(
            f"--factors {path}: not a valid diffmodel factors file "
            f"({type(err).__name__}: {err})"
        ) from None


def deployment_groups(frame: pd.DataFrame, args):
    """Each row's deployment from the table and ``--model/--hardware/--tp/--ep``:
    flags are checked (unknown names, a flag contradicting a column are errors).

    Returns the frame (with ``--ep`` as its ``ep`` column), the library keywords
    and the :class:`~diffmodel._frame.Groups`.
    """
    from .._frame import groups_from_frame

    ep = getattr(args, "ep", None)
    flags = {"model": args.model, "hardware": args.hardware, "tp": args.tp}
    groups = groups_from_frame(frame, ep=ep, spell=lambda name: f"--{name} ", **flags)
    # The library's entry points read the expert-parallel degree from the table.
    return (frame if ep is None else frame.assign(ep=ep)), flags, groups


def row_labels(groups) -> np.ndarray:
    """Each row's deployment label (``model/hardware/tpN``)."""
    return np.asarray(groups.labels, dtype=object)[np.asarray(groups.index)]


# --------------------------------------------------------------------------- output


def out_file(path: str | pathlib.Path, flag: str, suffixes: tuple[str, ...]):
    """Check an output file's suffix and folder before any work is done."""
    path = pathlib.Path(path)
    if path.suffix.lower() not in suffixes:
        raise ValueError(f"{flag} {path}: expected a {', '.join(suffixes)} file")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{flag} {path}: folder {path.parent} not found")
    if path.is_dir():
        raise ValueError(f"{flag} {path}: is a folder, expected a file")
    return path


def out_dir(path: str | pathlib.Path, flag: str = "--out-dir") -> pathlib.Path:
    """Check an output folder (it may not exist yet) before any work is done."""
    path = pathlib.Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path}: exists and is not a folder")
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ValueError(f"{flag} {path}: {parent} is not a folder")
    return path


def plot_file(path: str | pathlib.Path | None) -> pathlib.Path | None:
    """``--plot``: a .png/.pdf/.svg in an existing folder, matplotlib installed."""
    if path is None:
        return None
    path = out_file(path, "--plot", PLOT_SUFFIXES)
    need("matplotlib", "--plot")
    return path


def write_table(frame: pd.DataFrame, path: pathlib.Path) -> None:
    if path.suffix.lower() == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path, index=False)


def figure(frame: pd.DataFrame, labels, *, actual, title=None):
    """The diagnostic figure (built in memory; :func:`save` writes it)."""
    from ._plots import diagnostic_figure

    frame = frame.assign(deployment=labels)
    return diagnostic_figure(frame, actual=actual, by="deployment", title=title)


def save(fig, path: pathlib.Path) -> None:
    from ._plots import save_figure

    note(f"wrote {save_figure(fig, path)}")


def factor_table(result) -> str:
    """Fitted factors as text: one row per factor with its unit, one column per
    group (``global`` first) and, when the fit has a posterior, a ``<group> sd``
    column beside each; then what the data leave undetermined, one line each."""
    from .._model._factors import FACTOR_NAMES, FACTOR_SPECS

    table = result.table()
    rows = {}
    for name in FACTOR_NAMES:
        col = f"{name} [{FACTOR_SPECS[name][1]}]"
        rows[name] = {g: table.at[g, col] for g in table.index}
        if f"{col} sd" in table.columns:
            for g in table.index:
                rows[name][f"{g} sd"] = table.at[g, f"{col} sd"]
    out = pd.DataFrame(rows).T
    out.insert(0, "unit", [FACTOR_SPECS[n][1] for n in FACTOR_NAMES])
    out.index.name = "factor"
    text = out.to_string(float_format=lambda v: f"{v:.4g}")
    open_ = result.identifiability()
    return text + ("\n" + open_ if open_ else "")


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
