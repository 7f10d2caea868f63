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

Then the curves of every GPU of H100's vendor but H100 at once
(``calibrate_kernels_pooled``: shared curves plus a small offset per GPU), given to
H100 with the mean offsets of the pooled GPUs that run H100's kernels (read from the
kernel names of H100's tables, never their times), and as the shared curves alone;
and the same pooled over every GPU of the database but H100, other vendors' included.
Beside them, what ``curves_from_other_gpus`` gives H100 from the same pool of its
vendor's GPUs: the curves of its siblings (``diffmodel.sibling_gpus``: H200) for each
family whose kernel they run, the pooled ones elsewhere.

    python experiments/other_gpu_curves.py [--data DIR] [--out DIR] [--systems ...]

With ``--out`` the table is also written to ``DIR/other_gpu_curves.md`` (the README's
section), each GPU's curves to ``DIR/curves_<system>.json`` and the pooled ones
given to H100 to ``DIR/curves_pooled_without_h100.json``.
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
from diffmodel.kernels._database import list_systems, load_system_tables
from diffmodel.kernels._pooled_calibrate import (
    calibrate_kernels_pooled,
    curves_from_other_gpus,
    kernels_vendor,
    table_kernels,
)

SYSTEMS = ("h100_sxm", "h200_sxm", "a100_sxm", "b200_sxm", "l40s")
TARGET = "iteration_time_us"
TRACES_GPU = "h100-sxm"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _sources(systems, pooled: bool, out: pathlib.Path | None):
    """``(label, kernels fitted on, curves ported to H100)``: one row per source GPU,
    then (``pooled``) curves pooled over the database's GPUs but H100."""
    for system in systems:
        tables = load_system_tables(system, "vllm", skip_missing=True)
        curves = calibrate_kernels(
            tables, hardware_name=canonical_hardware(system), portable=True
        )
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            save_curves(curves, out / f"curves_{system}.json")
        yield system, sum(len(t) for t in tables.values()), curves.ported_to(TRACES_GPU)
    if not pooled:
        return
    tables = {}
    for system in list_systems():
        if system == "h100_sxm":
            continue
        try:
            tables[system] = load_system_tables(system, "vllm", skip_missing=True)
        except ValueError as err:
            _log(f"pooled: skipped {system}: {err}")
    # Only the names of the kernels H100's tables time are read, never their times.
    h100 = table_kernels(load_system_tables("h100_sxm", "vllm", skip_missing=True))
    vendor = kernels_vendor(h100)
    same = {
        s: t for s, t in tables.items() if kernels_vendor(table_kernels(t)) == vendor
    }
    for label, pool in ((f"every {vendor} GPU", same), ("every GPU", tables)):
        _log(f"pooled: fitting on {list(pool)}")
        fit = calibrate_kernels_pooled(pool, progress=_log)
        n_rows = sum(sum(fams.values()) for fams in fit.rows.values())
        for fam, kernel in h100.items():
            _, like = fit.family_offset(TRACES_GPU, fam, kernel)
            _log(f"pooled: {fam} on H100 ({kernel}) takes the offsets of {list(like)}")
        mine = fit.for_gpu(TRACES_GPU, h100)
        if out is not None and pool is same:
            save_curves(mine, out / "curves_pooled_without_h100.json")
        yield f"{label} but H100 ({len(pool)}, pooled)", n_rows, mine
        if pool is same:
            yield (
                f"{label} but H100 ({len(pool)}, pooled), shared curves only",
                n_rows,
                fit.for_gpu(TRACES_GPU),
            )
            # What the package gives H100 from the same pool: its siblings' curves
            # (H200's) where they run its kernels, the pooled ones elsewhere.
            yield (
                f"{label} but H100 ({len(pool)}), siblings first "
                "(curves_from_other_gpus)",
                n_rows,
                curves_from_other_gpus("h100_sxm", list(pool), progress=_log),
            )


def main(
    data: pathlib.Path, out: pathlib.Path | None, systems, pooled: bool = True
) -> str:
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
    for label, n_kernels, ported in _sources(systems, pooled, out):
        t0 = time.perf_counter()
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
            f"| {label} | {n_kernels} | "
            + " | ".join(f"{v:.2f}" for v in alone + hosted)
            + f" | {np.mean(hosted):.2f} | {costs} |"
        )
        _log(
            f"{label}: + host mean {np.mean(hosted):.2f}% "
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
    p.add_argument(
        "--no-pooled",
        action="store_true",
        help="leave out the rows of curves pooled over other GPUs",
    )
    a = p.parse_args()
    main(
        pathlib.Path(a.data or dm.data.default_data_dir()),
        a.out,
        a.systems,
        pooled=not a.no_pooled,
    )
