"""Our optax fitter against the study's own fitter, on its 9-parameter model.

The study fitted ``sum(factor_i component_i / mfu_i) + overhead`` (compute-only
backbone, see ``diffmodel.StudyFactors``) with ``scipy.optimize.least_squares``
(method ``trf``, box bounds) on log-ratio residuals
(``diffmodel.baselines.study_least_squares``). This script fits the same model, to the
same rows, from the same start, with both, and prints the loss
``mean((log pred - log actual)^2)`` and the wall time of each (ours: L-BFGS and
Adam, compile time shown separately).

    python experiments/study_fit.py [--data DIR] [--target step_duration|iteration_time]
"""

import argparse
import pathlib
import sys

import jax
import numpy as np

import diffmodel as dm

TARGETS = {"step_duration": "step_duration_us", "iteration_time": "iteration_time_us"}


def main(
    *,
    data: pathlib.Path | None = None,
    target: str = "step_duration",
    max_steps: int = 2000,
    out: pathlib.Path | None = None,
) -> dict:
    """Fit the study's model both ways on the three public experiments; print and
    return the losses and times."""
    data = pathlib.Path(data or dm.data.default_data_dir())
    col = TARGETS[target]
    frame = dm.data.add_targets(dm.data.load_steps(data / "stepml" / "steps.parquet"))
    frame = frame[frame[col].notna() & (frame[col] > 0)]
    print(f"{len(frame)} rows, target {col}", file=sys.stderr)

    scipy = dm.baselines.study_least_squares(frame, col)
    rows = {"scipy-trf": (scipy.loss, scipy.seconds, float("nan"))}
    for solver in ("lbfgs", "adam"):
        res = dm.fit(
            frame,
            target=col,
            factors="study-9",
            solver=solver,
            max_steps=max_steps,
            learning_rate=0.1,
            uncertainty=False,  # timed against scipy, which gives none
        )
        rows[f"diffmodel-{solver}"] = (res.loss, res.wall_seconds, res.compile_seconds)
    scipy_s = scipy.seconds
    lines = [
        f"Target `{col}`, {len(frame)} rows of the three public experiments; "
        "ours compiles once per fit (the run column is what a refit costs).",
        "",
        "| fitter | loss | wall s | compile s | run s | wall / scipy | run / scipy |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, (loss, secs, comp) in rows.items():
        run = secs - (comp if np.isfinite(comp) else 0.0)
        lines.append(
            f"| {name} | {loss:.8f} | {secs:.2f} | {comp:.2f} | {run:.3f} "
            f"| {secs / scipy_s:.2f} | {run / scipy_s:.3f} |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    if out is not None:
        out = pathlib.Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "study_fit.md").write_text(table + "\n")
    print(f"\nscipy's values: {scipy.values}")
    return {k: {"loss": v[0], "seconds": v[1]} for k, v in rows.items()}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=pathlib.Path, default=None, help="data folder")
    p.add_argument("--target", choices=sorted(TARGETS), default="step_duration")
    p.add_argument("--max-steps", type=int, default=2000)
    p.add_argument("--out", type=pathlib.Path, default=None, help="write study_fit.md")
    a = p.parse_args()
    jax.config.update("jax_enable_x64", True)  # same precision as scipy
    main(data=a.data, target=a.target, max_steps=a.max_steps, out=a.out)
