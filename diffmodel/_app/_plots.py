"""Diagnostic plots of predictions: parity, residuals vs batch size, step breakdown.

Every function draws onto a matplotlib ``Axes`` (a new figure when none is given)
and returns the figure. Figures are built without pyplot and rendered by the Agg
backend, so plotting never needs a display and leaves no global state behind.
"""

import pathlib

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

from .._frame import stats_from_frame
from .._model._roofline import COMPONENTS

_COLOURS = {
    "linear": "#4e79a7",
    "attention_prefill": "#f28e2b",
    "attention_decode": "#e15759",
    "kv_write": "#76b7b2",
    "lm_head": "#59a14f",
    "allreduce": "#edc948",
    "overhead": "#9c755f",
}


def _axes(ax: Axes | None, size=(6.0, 5.0)) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _log_axis(axis, lo: float, hi: float) -> None:
    """Plain numbers (``20``, not ``2 x 10^1``) on a log axis; minor ticks labelled
    too when the range is under a decade and a half, where majors are scarce."""
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    axis.set_major_formatter(plain)
    axis.set_minor_formatter(plain if hi / lo < 30 else NullFormatter())


def _pair(actual, predicted) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(actual, dtype=float)
    p = np.asarray(predicted, dtype=float)
    if a.shape != p.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(
            "actual and predicted must be non-empty 1-D arrays of one length, got "
            f"shapes {a.shape} and {p.shape}"
        )
    if not (np.all(np.isfinite(a) & (a > 0)) and np.all(np.isfinite(p) & (p > 0))):
        raise ValueError("actual and predicted must be finite and > 0 (microseconds)")
    return a, p


def _groups(groups, n: int) -> np.ndarray:
    if groups is None:
        return np.full(n, "", dtype=object)
    g = np.asarray(groups, dtype=object)
    if g.shape != (n,):
        raise ValueError(f"groups must have one label per step ({n}), got {g.shape}")
    return g.astype(str).astype(object)


def _short(label: str) -> str:
    """``llama-2-70b/h100-sxm/tp4`` -> ``llama-2-70b tp4``; other labels unchanged."""
    parts = str(label).split("/")
    return " ".join([parts[0], *parts[2:]]) if len(parts) in (3, 4) else str(label)


def parity_plot(
    actual,
    predicted,
    *,
    groups=None,
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """Predicted against actual step time on log-log axes, milliseconds.

    The diagonal is a perfect prediction; dotted lines mark +-20 %. ``groups`` (one
    label per step, e.g. deployment or experiment) colours the points. The title
    carries the MAPE (percent) and the number of steps.
    """
    a, p = _pair(actual, predicted)
    g = _groups(groups, a.size)
    fig, ax = _axes(ax)
    for label in sorted(set(g)):
        m = g == label
        ax.scatter(
            a[m] / 1e3,
            p[m] / 1e3,
            s=8,
            alpha=0.5,
            linewidths=0,
            label=_short(label) or None,
        )
    lo = min(a.min(), p.min()) / 1e3 / 1.1
    hi = max(a.max(), p.max()) / 1e3 * 1.1
    line = np.array([lo, hi])
    ax.plot(line, line, color="black", lw=1)
    for k in (0.8, 1.2):
        ax.plot(line, k * line, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    _log_axis(ax.xaxis, lo, hi)
    _log_axis(ax.yaxis, lo, hi)
    ax.set_aspect("equal")
    ax.set_xlabel("actual step time (ms)")
    ax.set_ylabel("predicted step time (ms)")
    mape = float(np.mean(np.abs(p - a) / a) * 100)
    head = title or "parity"
    ax.set_title(f"{head}: MAPE {mape:.1f} %, n = {a.size}")
    if len(set(g)) > 1 or g[0]:
        ax.legend(loc="upper left", fontsize="small", markerscale=2)
    ax.grid(True, which="major", alpha=0.3)
    return fig


def residual_plot(
    actual,
    predicted,
    batch_size,
    *,
    groups=None,
    ax: Axes | None = None,
) -> Figure:
    """Relative error ``(predicted - actual) / actual`` (percent) against batch size
    (requests in the step); positive is over-prediction."""
    a, p = _pair(actual, predicted)
    b = np.asarray(batch_size, dtype=float)
    if b.shape != a.shape:
        raise ValueError(f"batch_size must have {a.size} values, got shape {b.shape}")
    g = _groups(groups, a.size)
    fig, ax = _axes(ax)
    r = (p - a) / a * 100
    for label in sorted(set(g)):
        m = g == label
        ax.scatter(
            b[m], r[m], s=8, alpha=0.5, linewidths=0, label=_short(label) or None
        )
    ax.axhline(0.0, color="black", lw=1)
    top = max(float(b.max()), 1.0) * 1.2
    if b.min() >= 1:
        ax.set_xscale("log")
        ax.set_xlim(b.min() / 1.2, top)
        _log_axis(ax.xaxis, b.min() / 1.2, top)
    else:  # steps with no requests: linear around 0, log above 1
        ax.set_xscale("symlog", linthresh=1.0, linscale=0.3)
        ax.set_xlim(0.0, top)
    ax.set_xlabel("batch size (requests in the step; log scale)")
    ax.set_ylabel("relative error (%)")
    ax.set_title("residuals vs batch size")
    if len(set(g)) > 1 or g[0]:
        ax.legend(fontsize="small", markerscale=2)
    ax.grid(True, alpha=0.3)
    return fig


def pick_steps(
    frame: pd.DataFrame, n: int = 12, *, by: str | None = None
) -> np.ndarray:
    """Positions of ``n`` steps spread over the range of ``predicted_us`` (evenly
    spaced ranks), split evenly between the values of column ``by`` when given."""
    if "predicted_us" not in frame.columns:
        raise ValueError("frame has no 'predicted_us' column (run predict first)")
    total = frame["predicted_us"].to_numpy(dtype=float)
    keys = frame[by].astype(str).to_numpy() if by else np.zeros(len(frame), dtype=str)
    values = sorted(set(keys))
    per = max(1, n // len(values))
    chosen = []
    for v in values:
        rows = np.flatnonzero(keys == v)
        rows = rows[np.argsort(total[rows], kind="stable")]
        ranks = np.unique(np.linspace(0, len(rows) - 1, min(per, len(rows))).round())
        chosen.extend(rows[ranks.astype(int)])
    return np.asarray(chosen, dtype=int)


def breakdown_plot(
    frame: pd.DataFrame,
    *,
    rows=None,
    by: str | None = None,
    shares: bool = True,
    ax: Axes | None = None,
) -> Figure:
    """Stacked bars of the per-component time of some steps.

    ``frame`` is the output of :func:`diffmodel.predict` (``<component>_us``
    columns). ``rows`` are positions to show (default :func:`pick_steps`, a dozen
    steps from the fastest to the slowest, per value of ``by``). With ``shares`` the
    bars are each component's share of the step (percent) with the step's total
    (ms) written above, so fast and slow steps read alike; otherwise milliseconds.
    Each bar is labelled with its prefill (P) and decode (D) tokens, groups of ``by``
    are named underneath.
    """
    cols = [f"{c}_us" for c in COMPONENTS]
    missing = [c for c in cols if c not in frame.columns]
    if missing:
        raise ValueError(f"frame is missing breakdown columns {missing}")
    rows = pick_steps(frame, by=by) if rows is None else np.asarray(rows, dtype=int)
    sub = frame.iloc[rows]
    stats = stats_from_frame(sub)
    pf = np.asarray(stats.prefill_tokens).astype(int)
    dec = np.asarray(stats.decode_tokens).astype(int)
    keys = sub[by].astype(str).to_numpy() if by else np.full(len(rows), "")
    # A gap between groups: x advances by one more at each change of group.
    x = np.arange(len(rows)) + np.concatenate([[0], np.cumsum(keys[1:] != keys[:-1])])
    fig, ax = _axes(ax, size=(max(6.0, 0.6 * len(rows) + 2), 5.0))
    parts = sub[cols].to_numpy(dtype=float) / 1e3
    total = parts.sum(axis=1)
    if shares:
        parts = parts / np.where(total > 0, total, 1.0)[:, None] * 100
    bottom = np.zeros(len(rows))
    for j, c in enumerate(COMPONENTS):
        ax.bar(x, parts[:, j], bottom=bottom, color=_COLOURS[c], label=c, width=0.8)
        bottom += parts[:, j]
    if shares:
        for xi, t in zip(x, total, strict=True):
            ax.text(xi, 101, f"{t:.3g}", ha="center", va="bottom", fontsize="x-small")
        ax.set_ylim(0, 112)
        ax.set_ylabel("share of predicted step time (%); total (ms) above")
    else:
        ax.set_ylabel("predicted step time (ms)")
    labels = [f"P {p}\nD {d}" for p, d in zip(pf, dec, strict=True)]
    ax.set_xticks(x, labels, fontsize="x-small")
    if by:
        names = list(dict.fromkeys(keys))
        centres = [x[keys == k].mean() for k in names]
        sec = ax.secondary_xaxis("bottom")
        sec.set_xticks(centres, [_short(k) for k in names], fontsize="small")
        sec.tick_params(axis="x", length=0, pad=26)
        for k in names[1:]:
            ax.axvline(x[keys == k].min() - 1, color="grey", lw=0.8, ls=":")
    ax.set_title("component breakdown of steps (P: prefill tokens, D: decode tokens)")
    ax.legend(
        fontsize="small",
        ncols=len(COMPONENTS),
        loc="lower center",
        bbox_to_anchor=(0.5, 1.06),
        frameon=False,
    )
    return fig


def diagnostic_figure(
    frame: pd.DataFrame,
    *,
    actual: str | None,
    predicted: str = "predicted_us",
    by: str | None = None,
    title: str | None = None,
) -> Figure:
    """One figure for a predicted frame: parity and residuals vs batch size (when the
    ``actual`` column is given) above the component breakdown of a dozen steps.
    ``by`` names the column that colours points and labels bars."""
    if actual is not None and actual not in frame.columns:
        raise ValueError(f"frame has no column {actual!r}")
    groups = frame[by].to_numpy() if by else None
    if actual is None:
        fig = Figure(figsize=(11.0, 5.5), layout="constrained")
        FigureCanvasAgg(fig)
        breakdown_plot(frame, by=by, ax=fig.add_subplot())
    else:
        fig = Figure(figsize=(12.0, 11.0), layout="constrained")
        FigureCanvasAgg(fig)
        grid = fig.add_gridspec(2, 2)
        a, p = frame[actual].to_numpy(), frame[predicted].to_numpy()
        parity_plot(a, p, groups=groups, ax=fig.add_subplot(grid[0, 0]), title=title)
        batch = np.asarray(stats_from_frame(frame).requests)
        residual_plot(a, p, batch, groups=groups, ax=fig.add_subplot(grid[0, 1]))
        breakdown_plot(frame, by=by, ax=fig.add_subplot(grid[1, :]))
    return fig


def save_figure(fig: Figure, path: str | pathlib.Path) -> pathlib.Path:
    """Write ``fig`` to ``path`` (format from the suffix, e.g. ``.png``); returns
    the path."""
    path = pathlib.Path(path)
    fig.savefig(path, dpi=110)
    return path
