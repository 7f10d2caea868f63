"""The joint kernel+trace objective against the two stages, on the benchmark's folds.

For each fold of the iteration-time benchmark (``temporal``, ``lomo``, ``lowo``;
the same cuts as ``experiments/reproduce.py``), the H100 curves and the host costs
(per layer, per request in each layer) are fitted

- in two stages: curves on the H100 kernel tables alone, then the host costs over
  them on the fold's training steps (``diffmodel-kernel-sum-host``);
- jointly (:func:`diffmodel.fit_joint`): both in one objective over the kernel rows
  and the training steps, each source with its own noise sd by maximum likelihood.

Both are calibrated on the fold's validation rows and scored on its test rows:
MAPE, 90% interval coverage and median width, per test experiment. A second table
gives each source's fitted noise and how far the traces moved each curve.

    python experiments/joint.py [--data DIR] [--out results/joint]
"""

import argparse
import pathlib
import time
import warnings

import numpy as np
import pandas as pd
from identifiability import markdown  # a sibling script: the same pipe table
from intervals import folds  # a sibling script: the benchmark's folds

import diffmodel as dm
from diffmodel import data as dmd, kernels as dmk

TARGET = "iteration_time_us"


LEVEL = 0.9


def _score(fit, fold) -> list[dict]:
    if len(fold.valid):
        fit = fit.calibrate(fold.valid, target=TARGET)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dm.UnseenGroupWarning)
        out = fit.predict(fold.test, interval=LEVEL)
    rows = []
    for exp, test in fold.test.groupby("experiment_id", sort=True):
        o = out.loc[test.index]
        y = test[TARGET].to_numpy()
        p, lo, hi = (o[c].to_numpy() for c in out.columns)
        rows.append(
            {
                "experiment": exp.split("-", 2)[-1],
                "mape": 100 * float(np.mean(np.abs(p / y - 1))),
                "coverage90": 100 * float(np.mean((y >= lo) & (y <= hi))),
                "width90": 100 * float(np.median((hi - lo) / p)),
            }
        )
    return rows


def main(data: pathlib.Path | None, out: pathlib.Path) -> str:
    data = dmd.default_data_dir() if data is None else pathlib.Path(data)
    frame = dmd.add_targets(dmd.load_steps(data / "stepml" / "steps.parquet"))
    frame = frame[frame[TARGET].notna()]
    tick = time.perf_counter()
    tables = dmk.load_kernel_tables(data)
    curves = dmk.calibrate_kernels(tables)
    print(f"joint: H100 curves calibrated in {time.perf_counter() - tick:.0f} s")
    scores, hosts, sources = [], [], []
    for fold in folds(frame):
        protocol = fold.protocol
        tick = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", dm.IdentifiabilityWarning)
            joint = dm.fit_joint(
                fold.train, target=TARGET, curves=curves, tables=tables
            )
        seconds = time.perf_counter() - tick
        held = "-" if protocol == "temporal" else fold.name
        print(f"joint: {protocol} {held}: {seconds:.0f} s, converged {joint.converged}")
        for method, fit in (
            ("two stages", joint.two_stage),
            ("joint", joint.host_fit),
        ):
            for row in _score(fit, fold):
                scores.append({"protocol": protocol, "method": method, **row})
        t = joint.table()
        for term in t.index:
            hosts.append(
                {
                    "protocol": protocol,
                    "held out": held,
                    "term": term,
                    "two stages, us": _pm(
                        t.loc[term, "two_stage_us"], t.loc[term, "two_stage_sd_us"]
                    ),
                    "joint, us": _pm(t.loc[term, "value_us"], t.loc[term, "sd_us"]),
                }
            )
        src = joint.sources
        sources.append(
            {
                "protocol": protocol,
                "held out": held,
                **{f"{s} sd": f"{src.loc[s, 'noise_sd']:.4f}" for s in src.index},
                **{
                    f"{s} shift": f"{src.loc[s, 'trace_shift']:+.4f}"
                    for s in src.index
                    if s != "trace"
                },
                "fit, s": f"{seconds:.0f}",
            }
        )
    md = _markdown(pd.DataFrame(scores), pd.DataFrame(hosts), pd.DataFrame(sources))
    out.mkdir(parents=True, exist_ok=True)
    (out / "joint.md").write_text(md)
    pd.DataFrame(scores).to_csv(out / "joint.csv", index=False)
    print(md)
    return md


def _pm(value: float, sd: float) -> str:
    return f"{value:.3g} ± {sd:.2g}"


def _markdown(scores: pd.DataFrame, hosts: pd.DataFrame, sources: pd.DataFrame) -> str:
    wide = scores.pivotmarkdown(
        index=["protocol", "experiment"],
        columns="method",
        values=["mape", "coverage90", "width90"],
        sort=False,
    )
    lines = [
        "Iteration time, H100 curves and host costs (per layer, per request in each "
        "layer) fitted on each fold's training steps; intervals calibrated on its "
        "validation rows. MAPE %, 90% coverage % and median width % per test "
        "experiment:",
        "",
        "| protocol | test experiment | MAPE two stages | MAPE joint "
        "| coverage two stages | coverage joint | width two stages | width joint |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for (protocol, exp), r in wide.iterrows():
        cells = [
            f"{r[(m, k)]:.1f}"
            for m in ("mape", "coverage90", "width90")
            for k in ("two stages", "joint")
        ]
        lines.append(f"| {protocol} | {exp} | " + " | ".join(cells) + " |")
    means = scores.groupby(["protocol", "method"], sort=False)[
        ["mape", "coverage90"]
    ].mean()
    lines += [
        "",
        "Means over the test experiments: "
        + "; ".join(
            f"{p} {m} {r['mape']:.2f}% MAPE, {r['coverage90']:.1f}% covered"
            for (p, m), r in means.iterrows()
        )
        + ".",
        "",
    ]
    lines += [
        "Host costs (posterior mean ± sd, us): the joint sd includes what the "
        "kernel rows leave open in the curves.",
        "",
        markdown(hosts),
        "",
        "Each source's fitted log-ratio noise sd, and `shift`: the mean log change of "
        "the training steps' device time when only that family's curve moves from "
        "its kernel-only fit to the joint one.",
        "",
        markdown(sources),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=pathlib.Path, default=None)
    parser.add_argument(
        "--out", type=pathlib.Path, default=pathlib.Path("results/joint")
    )
    args = parser.parse_args()
    main(args.data, args.out)
