"""The step model on a GPU its kernel curves never measured: the public H100 traces
priced with curves calibrated on another GPU's kernel tables.

For each source GPU (vLLM tables of the installed ``aiconfigurator-core`` database),
portable curves are calibrated on that GPU's kernels alone and ported to H100
(``KernelCurves.ported_to``: the same efficiencies at H100's peaks, bandwidths, SM
count and link). Each step's device time is its kernel sum on those curves; the
serving stack's host costs (``fit_host_on_kernels``, default terms) are fitted on the
iteration-time training rows of the study's temporal split (pooled over the three
experiments) and scored on the test rows, beside the kernel sum alone. The H100 row
is the reference: curves from the traces' own GPU.

    python experiments/other_gpu_curves.py [--data DIR] [--out DIR] [--systems ...]

With ``--out`` the table is also written to ``DIR/other_gpu_curves.md`` (the README's
section) and each GPU's curves to ``DIR/curves_<system>.json``.
"""

import argparse
import pathlib
import sys
import time
import warnings

import numpy as np

import diffmodel as dm
from diffmodel._model._hardware import canonical_hardware
from diffmodel.data._splits import temporal_split
from diffmodel.data._traces import add_targets, load_steps
from diffmodel.kernels._calibrate import calibrate_kernels
from diffmodel.kernels._curves_io import save_curves
from diffmodel.kernels._database import load_system_tables

SYSTEMS = ("h100_sxm", "h200_sxm", "a100_sxm", "b200_sxm", "l40s")
TARGET = "iteration_time_us"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(data: pathlib.Path, out: pathlib.Path | None, systems) -> str:
    tick = time.perf_counter()
    steps = add_targets(load_steps(data / "stepml" / "steps.parquet"))
    rows = steps[steps[TARGET].notna()]
    split = temporal_split(rows)
    train, test = rows[split == "train"], rows[split == "test"]
    exps = sorted(test["experiment_id"].unique())
    short = [e.split("-", 2)[2] for e in exps]
    lines = [
        f"Iteration time of the public H100 traces ({len(train)} training, "
        f"{len(test)} test rows, temporal split), device side from curves "
        "calibrated on one GPU's vLLM kernel tables and ported to H100. MAPE % "
        "per test experiment; 'kernel sum' has no host cost, '+ host' adds the "
        "host costs fitted on the training rows (per layer, per request in each "
        "layer; us).",
        "",
        "| curves from | kernels | "
        + " | ".join(f"kernel sum {s}" for s in short)
        + " | "
        + " | ".join(f"+ host {s}" for s in short)
        + " | + host mean | host costs, us |",
        "|---|---:|" + "---:|" * (2 * len(exps) + 2),
    ]
    for system in systems:
        t0 = time.perf_counter()
        tables = load_system_tables(system, "vllm", skip_missing=True)
        n_kernels = sum(len(t) for t in tables.values())
        curves = calibrate_kernels(
            tables, hardware_name=canonical_hardware(system), portable=True
        )
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            save_curves(curves, out / f"curves_{system}.json")
        ported = curves.ported_to("h100-sxm")
        alone, hosted = [], []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", dm.IdentifiabilityWarning)
            fit = dm.fit_host_on_kernels(train, target=TARGET, curves=ported)
        device = dm.kernel_device_us(test, ported)
        predicted = fit.predict(test)["predicted_us"].to_numpy()
        for e in exps:
            mask = (test["experiment_id"] == e).to_numpy()
            actual = test[TARGET].to_numpy()[mask]
            alone.append(dm.mape(actual, device[mask]))
            hosted.append(dm.mape(actual, predicted[mask]))
        costs = ", ".join(
            f"{t} {r.value_us:.3g} ({r.sd_us:.2g})" for t, r in fit.table().iterrows()
        )
        lines.append(
            f"| {system} | {n_kernels} | "
            + " | ".join(f"{v:.2f}" for v in alone + hosted)
            + f" | {np.mean(hosted):.2f} | {costs} |"
        )
        _log(
            f"{system}: {n_kernels} kernels, + host mean {np.mean(hosted):.2f}% "
            f"({time.perf_counter() - t0:.0f} s)"
        )
    lines += ["", f"Run time {time.perf_counter() - tick:.0f} s."]
    text = "\n".join(lines)
    print(text)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "other_gpu_curves.md").write_text(text + "\n")
    return text


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=pathlib.Path, default=None, help="data folder")
    p.add_argument("--out", type=pathlib.Path, default=None, help="output folder")
    p.add_argument(
        "--systems",
        nargs="+",
        default=list(SYSTEMS),
        help=f"source GPUs of the kernel database (default: {' '.join(SYSTEMS)})",
    )
    a = p.parse_args()
    main(pathlib.Path(a.data or dm.data.default_data_dir()), a.out, a.systems)
