"""Which host costs to fit over the kernel-sum device time: chosen by leaving one
model out inside the training rows.

The device side of every step is its kernels summed on the H100 curves calibrated on
the kernel tables alone (:func:`diffmodel.kernels.kernel_step_time`); the host side
is some of a per-step, per-layer, per-request and per-request-per-layer cost
(``fit_host_on_kernels``).
Each candidate set of terms is fitted on the *training* rows (the study's temporal
split: the first 60% of each experiment's iteration-time rows) of one model and
scored (MAPE) on the training rows of the other model; no validation or test row is
read. The form with the lowest mean is ``fit_host_on_kernels``'s default.

    python experiments/host_terms.py [--data DIR] [--out DIR]

With ``--out`` the table is also written to ``DIR/host_terms.md`` (the README's
section).
"""

import argparse
import pathlib
import time
import warnings

import numpy as np

import diffmodel as dm
from diffmodel.data._splits import temporal_split
from diffmodel.data._traces import add_targets, load_steps
from diffmodel.kernels._calibrate import calibrate_kernels
from diffmodel.kernels._tables import load_kernel_tables

FORMS: tuple[tuple[str, ...], ...] = (
    ("step",),
    ("layer",),
    ("request",),
    ("step", "request"),
    ("layer", "request"),
    ("step", "layer"),
    ("step", "layer", "request"),
    ("layer_request",),
    ("layer", "layer_request"),
    ("step", "layer_request"),
    ("step", "layer", "layer_request"),
)
TARGET = "iteration_time_us"


def main(data: pathlib.Path, out: pathlib.Path | None) -> str:
    tick = time.perf_counter()
    steps = add_targets(load_steps(data / "stepml" / "steps.parquet"))
    rows = steps[steps[TARGET].notna()]
    train = rows[temporal_split(rows) == "train"]
    models = sorted(train["model"].map(dm.canonical_model).unique())
    model_of = train["model"].map(dm.canonical_model)
    curves = calibrate_kernels(load_kernel_tables(data))
    lines = [
        f"Iteration time, {len(train)} training rows (temporal split) of "
        f"{len(models)} models; fit on one model's rows, MAPE % on the other's. "
        "Device time: each step's kernels summed on the H100 curves (no trace data). "
        "Values: fitted on all training rows, us (posterior sd).",
        "",
        "| host terms | "
        + " | ".join(f"held out {m}" for m in models)
        + " | mean | fitted on all, us |",
        "|---|" + "---:|" * (len(models) + 2),
    ]
    device = dm.kernel_device_us(train, curves)
    alone = []
    for m in models:
        mask = (model_of == m).to_numpy()
        alone.append(f"{m} {dm.mape(train[TARGET].to_numpy()[mask], device[mask]):.2f}")
    lines.insert(2, f"No host cost (the kernel sum alone): {', '.join(alone)}% MAPE.\n")
    best = None
    for terms in FORMS:
        scores = []
        with warnings.catch_warnings():
            # One model cannot tell step and layer costs apart; the table shows it.
            warnings.simplefilter("ignore", dm.IdentifiabilityWarning)
            for held in models:
                fit = dm.fit_host_on_kernels(
                    train[model_of != held], target=TARGET, curves=curves, terms=terms
                )
                test = train[model_of == held]
                predicted = fit.predict(test)["predicted_us"].to_numpy()
                scores.append(dm.mape(test[TARGET].to_numpy(), predicted))
            whole = dm.fit_host_on_kernels(
                train, target=TARGET, curves=curves, terms=terms
            )
        values = ", ".join(
            f"{t} {r.value_us:.3g} ({r.sd_us:.2g})" for t, r in whole.table().iterrows()
        )
        mean = float(np.mean(scores))
        if best is None or mean < best[1]:
            best = (terms, mean)
        lines.append(
            f"| {' + '.join(terms)} | "
            + " | ".join(f"{s:.2f}" for s in scores)
            + f" | {mean:.2f} | {values} |"
        )
    lines += [
        "",
        f"Lowest mean: {' + '.join(best[0])} ({best[1]:.2f}%). "
        f"Run time {time.perf_counter() - tick:.0f} s.",
    ]
    text = "\n".join(lines)
    print(text)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "host_terms.md").write_text(text + "\n")
    return text


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=pathlib.Path, default=None, help="data folder")
    p.add_argument("--out", type=pathlib.Path, default=None, help="output folder")
    a = p.parse_args()
    main(pathlib.Path(a.data or dm.data.default_data_dir()), a.out)
