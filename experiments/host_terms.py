"""Which host costs to fit over the kernel-sum device time: chosen by leaving one
model out inside the training rows.

The device side of every step is its kernels summed on the H100 curves calibrated on
the kernel tables alone (:func:`diffmodel.kernels.kernel_step_time`); the host side
is some of a per-step, per-layer, per-request and per-request-per-layer cost
(``fit_host_on_kernels``).
Each candidate set of terms is fitted on the *training* rows (the study's temporal
split: the first 60% of each experiment's iteration-time rows) of one model and
scored (MAPE) on the training rows of the other model; no validation or test row is
read. The candidates and the rule are :func:`diffmodel.select_host_terms`'s
(``diffmodel fit-host --terms auto``); its choice here is ``fit_host_on_kernels``'s
default.

    python experiments/host_terms.py [--data DIR] [--out DIR]

With ``--out`` the table is also written to ``DIR/host_terms.md`` (the README's
section).
"""

import argparse
import pathlib
import time
import warnings

import diffmodel as dm
from diffmodel.data._splits import temporal_split
from diffmodel.data._traces import add_targets, load_steps
from diffmodel.kernels._calibrate import calibrate_kernels
from diffmodel.kernels._tables import load_kernel_tables

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
    # Each model is one deployment here, so leaving a deployment out (what
    # select_host_terms does) is leaving a model out.
    choice = dm.select_host_terms(train, target=TARGET, curves=curves)
    if len(choice.folds) != len(models):
        raise SystemExit(f"expected one deployment per model, got {choice.folds}")
    for name, row in choice.table.iterrows():
        terms = tuple(name.split(" + "))
        with warnings.catch_warnings():
            # One model cannot tell step and layer costs apart; the table shows it.
            warnings.simplefilter("ignore", dm.IdentifiabilityWarning)
            whole = dm.fit_host_on_kernels(
                train, target=TARGET, curves=curves, terms=terms
            )
        values = ", ".join(
            f"{t} {r.value_us:.3g} ({r.sd_us:.2g})" for t, r in whole.table().iterrows()
        )
        lines.append(
            f"| {name} | "
            + " | ".join(f"{row[f]:.2f}" for f in choice.folds)
            + f" | {row['mean']:.2f} | {values} |"
        )
    lines += [
        "",
        "Chosen by dm.select_host_terms (lowest mean; near-ties to the fewest "
        "terms): "
        f"{' + '.join(choice.terms)} "
        f"({choice.table.loc[' + '.join(choice.terms), 'mean']:.2f}%). "
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
