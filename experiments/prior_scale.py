"""The hierarchical factors' between-group scale: fixed (0.1) against empirical
Bayes (``prior_scale="auto"``), on the iteration-time benchmark's folds.

For each fold (``temporal``, ``lomo``, ``lowo``; the cuts of
``experiments/reproduce.py``) the hierarchical roofline factors are fitted on the
training steps, with the validation rows for early stopping, once at the default
scale and once with the scale of highest Laplace marginal likelihood over the grid
(:func:`diffmodel.fit`'s ``prior_scale="auto"``). MAPE % per test experiment, and
the log evidence of every scale (nats, up to a constant per fold).

    python experiments/prior_scale.py [--data DIR] [--out results/prior_scale]
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
from diffmodel import data as dmd

TARGET = "iteration_time_us"


def _mape(res, fold) -> dict[str, float]:
    pred = dm.predict(fold.test, factors=res)["predicted_us"].to_numpy()
    y = fold.test[TARGET].to_numpy()
    return {
        exp.split("-", 2)[-1]: 100 * float(np.mean(np.abs(pred[i] / y[i] - 1)))
        for exp, i in fold.test.groupby("experiment_id", sort=True).indices.items()
    }


def main(data: pathlib.Path | None, out: pathlib.Path) -> str:
    data = dmd.default_data_dir() if data is None else pathlib.Path(data)
    frame = dmd.add_targets(dmd.load_steps(data / "stepml" / "steps.parquet"))
    frame = frame[frame[TARGET].notna()]
    scores, evidence = [], []
    for fold in folds(frame):
        protocol = fold.protocol
        valid = fold.valid if len(fold.valid) else None
        held = "-" if protocol == "temporal" else fold.name
        tick = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", dm.IdentifiabilityWarning)
            warnings.simplefilter("ignore", dm.UnseenGroupWarning)
            fixed = dm.fit(
                fold.train, target=TARGET, factors="hierarchical", valid=valid
            )
            auto = dm.fit(
                fold.train,
                target=TARGET,
                factors="hierarchical",
                valid=valid,
                prior_scale="auto",
            )
            a, b = _mape(fixed, fold), _mape(auto, fold)
        seconds = time.perf_counter() - tick
        taus, values = zip(*auto.prior_scale_evidence, strict=True)
        chosen = taus[int(np.argmax(values))]
        print(f"prior_scale: {protocol} {held}: {seconds:.0f} s, chose {chosen:g}")
        for exp in a:
            scores.append(
                {
                    "protocol": protocol,
                    "test experiment": exp,
                    "MAPE, 0.1": f"{a[exp]:.2f}",
                    "MAPE, auto": f"{b[exp]:.2f}",
                    "auto's scale": f"{chosen:g}",
                }
            )
        top = max(values)
        evidence.append(
            {
                "protocol": protocol,
                "held out": held,
                **{
                    f"{t:g}": f"{v - top:+.1f}"
                    for t, v in zip(taus, values, strict=True)
                },
            }
        )
    md = "\n".join(
        [
            "Iteration time, hierarchical roofline factors, MAPE % per test "
            "experiment at the default between-group scale (0.1) and at the "
            "empirical-Bayes one:",
            "",
            markdown(pd.DataFrame(scores)),
            "",
            "Log evidence of each scale (nats, relative to the fold's best):",
            "",
            markdown(pd.DataFrame(evidence)),
        ]
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "prior_scale.md").write_text(md + "\n")
    print(md)
    return md


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=pathlib.Path, default=None)
    parser.add_argument(
        "--out", type=pathlib.Path, default=pathlib.Path("results/prior_scale")
    )
    args = parser.parse_args()
    main(args.data, args.out)
