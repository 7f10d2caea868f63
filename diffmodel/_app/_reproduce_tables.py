"""The benchmark's vocabulary (targets, protocols, methods, result columns) and its
results as ordered tables and markdown."""

import numpy as np
import pandas as pd

from .._metrics import count_under

TARGETS: dict[str, str] = {
    "step_duration": "step_duration_us",
    "iteration_time": "iteration_time_us",
}
"""Target name -> column of ``add_targets`` (microseconds)."""

PROTOCOLS: tuple[str, ...] = ("temporal", "lomo", "lowo")
"""The splits: the study's temporal one, leave-one-model/workload-out."""

METHODS: tuple[str, ...] = (
    "blackbox",
    "xgboost",
    "study-xgboost",
    "study-9",
    "study-36",
    "aiconfigurator",
    "diffmodel-roofline",
    "diffmodel-global",
    "diffmodel-per-model",
    "diffmodel-hierarchical",
    "diffmodel-kernels",
    "diffmodel-kernels-hierarchical",
    "diffmodel-kernel-sum",
    "diffmodel-kernel-sum-host",
    "diffmodel-kernel-sum-other-gpus",
    "diffmodel-kernel-sum-host-other-gpus",
    "diffmodel-host-global",
    "diffmodel-host-per-model",
    "diffmodel-host-hierarchical",
)
"""Every method, in table order."""

RESULT_COLUMNS: tuple[str, ...] = (
    "target",
    "protocol",
    "fold",
    "method",
    "experiment_id",
    "mape",
    "mspe",
    "p99_ape",
    "pearson_r",
    "n_test",
    "n_params",
    "fit_seconds",
    "fit_steps",
    "coverage90",
    "width90",
    "note",
)
"""Columns of ``results.csv``: percent for ``mape``/``mspe``/``p99_ape``, seconds for
``fit_seconds``; for methods that give predictive intervals (diffmodel's fitted factor
sets), ``coverage90``: the share of test steps inside the 90% interval (0-1), and
``width90``: the median of ``(hi - lo) / predicted`` (empty for the others)."""

METRICS = ("mape", "mspe", "p99_ape", "pearson_r")


def order_results(results: pd.DataFrame) -> pd.DataFrame:
    key = {
        "target": list(TARGETS),
        "protocol": list(PROTOCOLS),
        "method": list(METHODS),
    }
    order = results.assign(
        **{
            f"_{k}": results[k].map({v: i for i, v in enumerate(vs)})
            for k, vs in key.items()
        }
    ).sort_values(["_target", "_protocol", "_method", "experiment_id"], kind="stable")
    return order[list(RESULT_COLUMNS)].reset_index(drop=True)


# --------------------------------------------------------------------------- table


def short_name(experiment_id: str) -> str:
    """An experiment id without its ``YYYYMMDD-HHMMSS-`` timestamp prefix."""
    parts = experiment_id.split("-", 2)
    if len(parts) == 3 and parts[0].isdigit() and parts[1].isdigit():
        return parts[2]
    return experiment_id


def results_markdown(results: pd.DataFrame) -> str:
    """Markdown tables of `results` (as returned by ``reproduce``): one per target and
    protocol; rows are methods, columns each experiment's MAPE (percent), the mean
    over experiments and how many experiments are under 15% and 25% MAPE. ``n/a``:
    the method cannot predict that experiment; a mean over fewer experiments says how
    many, e.g. ``12.3 (2/3)``."""
    missing = [c for c in RESULT_COLUMNS if c not in results.columns]
    if missing:
        raise ValueError(f"results_markdown: results are missing columns {missing}")
    lines = []
    for (target, protocol), block in results.groupby(
        ["target", "protocol"], sort=False
    ):
        exps = sorted(block["experiment_id"].unique())
        head = [short_name(e) for e in exps]
        lines += [
            f"### {target} — {protocol} (MAPE %, per test experiment)",
            "",
            "| method | " + " | ".join(head) + " | mean | <15% | <25% | params |",
            "|---|" + "---:|" * (len(exps) + 4),
        ]
        for method, rows in block.groupby("method", sort=False):
            mape = rows.set_index("experiment_id")["mape"].reindex(exps)
            have = mape.dropna().to_numpy()
            cells = [_cell(v) for v in mape]
            if have.size == 0:
                mean, under15, under25 = "n/a", "n/a", "n/a"
            else:
                mean = _cell(have.mean())
                if have.size < len(exps):
                    mean += f" ({have.size}/{len(exps)})"
                under15 = str(count_under(have, 15.0))
                under25 = str(count_under(have, 25.0))
            params = rows["n_params"].dropna()
            n_params = "" if params.empty else f"{int(params.max())}"
            lines.append(
                f"| {method} | "
                + " | ".join([*cells, mean, under15, under25, n_params])
                + " |"
            )
        lines.append("")
    return "\n".join(lines + _coverage_markdown(results))


def _coverage_markdown(results: pd.DataFrame) -> list[str]:
    """One table per target of the methods with intervals: per protocol, the share
    of test steps inside the 90% interval (mean over test experiments, %) and the
    median relative width (%)."""
    have = results[np.isfinite(results["coverage90"].astype(float))]
    lines = []
    for target, block in have.groupby("target", sort=False):
        protocols = [p for p in PROTOCOLS if p in set(block["protocol"])]
        lines += [
            f"### {target} — 90% intervals: coverage % (median width %), mean over "
            "test experiments",
            "",
            "| method | " + " | ".join(protocols) + " |",
            "|---|" + "---:|" * len(protocols),
        ]
        for method, rows in block.groupby("method", sort=False):
            cells = []
            for protocol in protocols:
                r = rows[rows["protocol"] == protocol]
                cells.append(
                    "n/a"
                    if r.empty
                    else f"{100 * r['coverage90'].mean():.1f} "
                    f"({100 * r['width90'].mean():.1f})"
                )
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _cell(value: float) -> str:
    return "n/a" if not np.isfinite(value) else f"{value:.1f}"
