"""The benchmark on the real traces, one call: every method, both targets, three
protocols, per experiment.

**Targets** (microseconds per step):

- ``step_duration``: ``step.duration_us``, the trace's host-side timer: what the study
  study fitted, and mostly far below the physical floor of a step.
- ``iteration_time``: ``iteration_time_us``, the start-to-start wall time of a step
  whose successor was sampled (1,967 rows of the public traces). Only the rows that
  have it take part: they are split by the same rules, in step order.

**Protocols** (the split of one target's rows):

- ``temporal``: the study's split, per experiment in ``step.id`` order: 60% train,
  20% validation, 20% test (``temporal_split``; matches ``seed_split_sizes.csv``).
- ``lomo``: leave one model out. Train on every row of the other models' experiments
  (cut per experiment in step order into 80% train, 20% validation), test on every row
  of the held-out model's experiments. ``llama-2-70b-hf`` is ``llama-2-70b``
  (``diffmodel.canonical_model``), so the public traces give two folds.
- ``lowo``: leave one workload out (``general``, ``codegen``), the same way.

**Methods** (metrics are always per test experiment):

- ``blackbox``: ``t = b0 + b1 P + b2 D`` by least squares on the training rows;
  temporal: one fit per experiment; lomo/lowo: one fit on the pooled training rows.
- ``xgboost``: ``XGBoostBaseline`` on the 30 ``study_features``, grid chosen by
  validation MAPE; temporal: one model per experiment (the study's 12-combination
  grid); lomo/lowo: one model on the pooled training rows, whose ``model_id`` and
  ``tp`` features are what tells deployments apart (its grid is ``TRANSFER_GRID``,
  the 100-tree half of the study grid, to keep the run short).
- ``study-xgboost``: the study's own XGBoost test predictions, matched to the
  test rows by ``(experiment_id, step.id)``; temporal ``step_duration`` only (no other
  predictions exist). A test split that does not match the study's gives NaN and a
  note.
- ``study-9`` / ``study-36``: the study's compute-only model (``StudyFactors``), one
  set of 9 parameters, or 9 per deployment group, fitted with ``fit`` on the training
  rows to convergence (no early stopping: see ``_reproduce_methods._factor_set``).
- ``aiconfigurator``: the field's estimator, aiconfigurator-core's per-step latency
  from its H100 vLLM kernel tables (table lookups, nothing fitted; see
  :mod:`diffmodel.baselines._aiconfigurator` for how each step is asked).
- ``diffmodel-roofline``: the roofline at its physical priors, nothing fitted.
- ``diffmodel-kernels``: the roofline with factors calibrated on the H100 kernel
  measurements alone, each deployment's at its own shapes (:func:`kernel_priors`),
  no trace fitting (0 trace parameters).
- ``diffmodel-kernels-hierarchical``: hierarchical factors whose global level starts
  from, and is held near (``global_prior_scale`` 0.5), the mean of the training
  deployments' kernel-calibrated ones.
- ``diffmodel-kernel-sum``: each step as the sum of its kernels (four GEMMs,
  attention, two all-reduces per layer, LM head) timed at its own shapes by the H100
  curves (:func:`diffmodel.kernels.kernel_step_time`), no host cost, nothing fitted
  to traces.
- ``diffmodel-kernel-sum-host``: the same device time plus the host costs (per
  layer, per request in each layer) fitted on the pooled training rows
  (:func:`diffmodel.fit_host_on_kernels`, 2 parameters); on lomo the held-out model
  gets the host costs of the other model and its own kernel shapes.
- ``diffmodel-kernel-sum-other-gpus`` / ``diffmodel-kernel-sum-host-other-gpus``:
  the same two with curves H100 gets from every other NVIDIA GPU of the installed
  kernel database (:func:`diffmodel.kernels.curves_from_other_gpus`: its sibling
  H200's curves for the kernels H200 runs, the pool's elsewhere; no H100 kernel
  time is read), the step model on a GPU its curves never measured; NaN with a note
  without the database.
- ``diffmodel-global`` / ``-per-model`` / ``-hierarchical``: ``fit`` with those factor
  sets on the training rows of all experiments together, early stopping on the
  validation rows.
- ``diffmodel-host-global`` / ``-per-model`` / ``-hierarchical``: the host model
  (host timer, and iteration time as the overlap of host and device work), see
  ``_reproduce_host``.

A per-group set (``study-36``, ``diffmodel-per-model``) cannot predict a deployment
group it never saw (every lomo fold; the CodeLlama experiment in the lowo fold that
holds out ``general``): those rows are NaN with a note. ``diffmodel-hierarchical``
predicts an unseen group with its global factors, by design.
"""

import concurrent.futures
import pathlib
import sys
import time
import warnings
from collections.abc import Callable, Sequence

import jax
import numpy as np
import pandas as pd

from .._fitting._intervals import UnseenGroupWarning
from .._fitting._laplace import IdentifiabilityWarning
from .._frame import parse_group_label
from .._model._factors import Factors
from ..baselines._baselines import STUDY_GRID, load_study_xgboost
from ..data._splits import leave_one_out, temporal_split
from ..data._traces import add_targets, load_steps
from ..kernels._curves_io import load_curves, save_curves
from ._reproduce_host import HOST_METHODS
from ._reproduce_methods import (
    _DIFFMODEL_KINDS,
    KERNEL_SUM_METHODS,
    TRANSFER_GRID,
    _Evaluator,
    _Fold,
    _no_predictions,
    _run_method,
    _score,
    _Settings,
)
from ._reproduce_tables import (
    METHODS,
    PROTOCOLS,
    RESULT_COLUMNS,
    TARGETS,
    order_results,
    results_markdown,
    short_name,
)

__all__ = [
    "METHODS",
    "PROTOCOLS",
    "RESULT_COLUMNS",
    "TARGETS",
    "TRANSFER_GRID",
    "reproduce",
    "results_markdown",
    "short_name",
]

_QUICK_GRID: dict[str, tuple] = {
    "max_depth": (3,),
    "n_estimators": (20,),
    "learning_rate": (0.3,),
}
_FOLD_COLUMN = {"lomo": "model", "lowo": "workload"}


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- entry


def reproduce(
    *,
    data: pathlib.Path,
    out: pathlib.Path,
    experiments: Sequence[str] | None = None,
    quick: bool = False,
    targets: Sequence[str] | None = None,
    protocols: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    workers: int = 2,
    progress: Callable[[str], None] | None = _stderr,
) -> pd.DataFrame:
    """Run the benchmark and write ``results.csv`` and ``results.md`` under `out`.

    **Arguments:**

    - `data`: the reference data folder (holding ``stepml/steps.parquet`` and
      ``stepml/seed_xgboost_test_predictions.csv``), or its ``stepml/`` folder.
    - `out`: output folder, created if needed.
    - `experiments`: ``experiment_id`` values to use; ``None`` for all.
    - `quick`: a small run for tests: the first 1500 steps of each experiment, a
      one-combination XGBoost grid, and 30 Adam steps per fit instead of up to 500
      L-BFGS steps (Adam's loop compiles about twice as fast).
    - `targets`, `protocols`, `methods`: subsets of ``TARGETS``, ``PROTOCOLS``,
      ``METHODS``; ``None`` for all.
    - `workers`: methods run at once, in threads (XLA compilation and XGBoost release
      the GIL). Each XGBoost fit gets ``2 // workers`` threads (at least 1): the run
      is sized for 2 cores. Results do not depend on it.
    - `progress`: called with one line per fitted method (default: print to stderr);
      ``None`` for silence.

    **Returns:** the long-form results, one row per (target, protocol, method,
    experiment_id), with the columns of ``RESULT_COLUMNS``: ``mape``, ``mspe`` and
    ``p99_ape`` in percent, ``pearson_r`` unitless, ``n_test`` rows, ``n_params`` the
    fitted parameters of the model(s) that predict that experiment (a per-experiment
    model's own; a factor set's whole count, as the study counted 9 and 36),
    ``fit_seconds`` the wall time of that fit (compilation included; shared by the
    rows of one pooled fit), ``fit_steps`` the optimiser steps, ``fold`` the held-out
    value (``all`` for temporal), ``note`` why a value is missing or unusual. A method
    that does not apply has NaN metrics and a note.

    **Raises:** ``ValueError`` for an unknown target, protocol, method or experiment,
    or a missing data file.
    """
    targets = _choose("targets", targets, tuple(TARGETS))
    protocols = _choose("protocols", protocols, PROTOCOLS)
    methods = _choose("methods", methods, METHODS)
    data, out = data_root(data), pathlib.Path(out)
    say = progress if progress is not None else (lambda line: None)
    if not (isinstance(workers, int) and workers >= 1):
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    settings = _Settings(
        rows_per_experiment=1500 if quick else None,
        temporal_grid=_QUICK_GRID if quick else dict(STUDY_GRID),
        transfer_grid=_QUICK_GRID if quick else TRANSFER_GRID,
        solver="adam" if quick else "lbfgs",
        max_steps=30 if quick else 500,
        xgboost_threads=max(1, 2 // workers),
    )
    steps_path = data / "stepml" / "steps.parquet"
    study_path = data / "stepml" / "seed_xgboost_test_predictions.csv"
    for path in (steps_path, study_path):
        if not path.is_file():
            raise ValueError(f"data: {path} not found")
    frame = _load(steps_path, experiments, settings.rows_per_experiment)
    evaluator = _Evaluator(frame)
    curves = None
    if {
        "diffmodel-kernels",
        "diffmodel-kernels-hierarchical",
        *KERNEL_SUM_METHODS,
    } & set(methods):
        curves, fresh_curves = _kernel_curves(data, out, say)
        settings = settings._replace(
            kernel_prior=kernel_priors(curves, evaluator.labels),
            kernel_curves=curves,
        )
    if any(m.endswith("-other-gpus") for m in methods):
        settings = settings._replace(other_gpu_curves=_other_gpu_curves(out, say))
    study = load_study_xgboost(study_path)
    say(
        f"reproduce: {len(frame)} steps of {frame['experiment_id'].nunique()} "
        f"experiments{' (quick)' if quick else ''}; targets {list(targets)}, "
        f"protocols {list(protocols)}"
    )
    tasks = []
    for target in targets:
        defined = frame[frame[TARGETS[target]].notna()]
        for protocol in protocols:
            for fold in _folds(defined, protocol):
                tasks += [
                    (target, fold, method)
                    for method in methods
                    if method != "study-xgboost"
                    or (protocol == "temporal" and target == "step_duration")
                ]

    def run(task: tuple[str, _Fold, str]) -> list[dict]:
        target, fold, method = task
        tick = time.perf_counter()
        column = TARGETS[target]
        try:
            outcome = _run_method(method, fold, column, settings, study, evaluator)
        except Exception as err:  # one failed method must not end a long run
            why = f"failed: {type(err).__name__}: {str(err)[:120]}"
            outcome = _no_predictions(fold, why)
            say(f"[{target}/{fold.protocol}/{fold.name}] {method}: {why}")
        rows = _score(fold, column, target, method, outcome)
        # Each compiled XLA CPU executable keeps its code in memory mappings until
        # it is dropped; a whole run compiles thousands and met Linux's per-process
        # limit (vm.max_map_count, 65530) after ~150 tasks ("LLVM ERROR: Unable to
        # allocate section memory"). Dropping them after each task costs little:
        # the persistent compilation cache serves the recompiles.
        jax.clear_caches()
        say(
            f"[{target}/{fold.protocol}/{fold.name}] {method}: mean MAPE "
            f"{_mean(rows)} ({time.perf_counter() - tick:.1f} s)"
        )
        return rows

    # Longest first: the XGBoost grids, then the compilations of the fits.
    tasks.sort(key=lambda task: -_expected_seconds(task[1], task[2], settings))
    start = time.perf_counter()
    # The fits' identifiability warnings (hundreds over a run) are not repeated
    # here: experiments/identifiability.py reports what each fit pins. Set once,
    # before the threads start.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IdentifiabilityWarning)
        # Nor the kernel-host fit's note that a lomo fold's held-out model was not
        # fitted: that is the protocol, and its coverage is scored.
        warnings.simplefilter("ignore", UnseenGroupWarning)
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            rows = [row for task_rows in pool.map(run, tasks) for row in task_rows]
    results = order_results(pd.DataFrame(rows, columns=list(RESULT_COLUMNS)))
    out.mkdir(parents=True, exist_ok=True)
    results.to_csv(out / "results.csv", index=False)
    (out / "results.md").write_text(results_markdown(results))
    if curves is not None and fresh_curves:
        save_curves(curves, out / _KERNEL_CACHE)
    say(f"reproduce: done in {time.perf_counter() - start:.0f} s; wrote {out}")
    return results


def _expected_seconds(fold: _Fold, method: str, settings: _Settings) -> float:
    """A rough cost of a task, to start the long ones first (s on one core)."""
    if method == "xgboost":
        grid = (
            settings.temporal_grid
            if fold.protocol == "temporal"
            else (settings.transfer_grid)
        )
        combos = int(np.prod([len(v) for v in grid.values()]))
        return 2e-3 * len(fold.train) * combos
    if method in HOST_METHODS:
        return 20.0
    return {"diffmodel-hierarchical": 8.0, "study-9": 3.0, "study-36": 3.0}.get(
        method, 5.0 if method in _DIFFMODEL_KINDS else 0.0
    )


def _choose(name: str, given: Sequence[str] | None, known: Sequence[str]) -> tuple:
    if given is None:
        return tuple(known)
    if isinstance(given, str):
        given = (given,)
    unknown = [g for g in given if g not in known]
    if unknown or not given:
        raise ValueError(f"{name}: expected a non-empty subset of {list(known)}")
    return tuple(given)


def _load(
    path: pathlib.Path, experiments: Sequence[str] | None, rows: int | None
) -> pd.DataFrame:
    """The step table with both targets; optionally some experiments, first rows."""
    frame = load_steps(path)
    if experiments is not None:
        if isinstance(experiments, str):
            experiments = (experiments,)
        known = set(frame["experiment_id"])
        unknown = [e for e in experiments if e not in known]
        if unknown or not experiments:
            raise ValueError(
                f"experiments: unknown {unknown}; known: {sorted(known)}"
                if unknown
                else "experiments: expected at least one experiment_id"
            )
        frame = frame[frame["experiment_id"].isin(experiments)]
    if rows is not None:
        frame = frame.groupby("experiment_id", sort=False).head(rows)
    # Targets after the cut: an iteration time needs its successor in the table.
    return add_targets(frame.reset_index(drop=True))


def _mean(rows: list[dict]) -> str:
    values = [r["mape"] for r in rows if np.isfinite(r["mape"])]
    if not values:
        return "n/a"
    return f"{np.mean(values):.1f}%"


# --------------------------------------------------------------------------- folds


def _folds(frame: pd.DataFrame, protocol: str) -> list[_Fold]:
    """The folds of `protocol` over the rows of one target (frame index kept)."""
    if protocol == "temporal":
        split = temporal_split(frame)
        return [_Fold(protocol, "all", *(frame[split == s] for s in _SPLITS))]
    folds = []
    for held_out, train_mask, test_mask in leave_one_out(frame, _FOLD_COLUMN[protocol]):
        pool = frame[train_mask]
        split = temporal_split(pool, fractions=(0.8, 0.2, 0.0))
        folds.append(
            _Fold(
                protocol,
                held_out,
                pool[split == "train"],
                pool[split == "valid"],
                frame[test_mask],
            )
        )
    return folds


_SPLITS = ("train", "valid", "test")


# ------------------------------------------------------------------- kernel prior


def _kernel_curves(data: pathlib.Path, out: pathlib.Path, say):
    """Kernel curves calibrated on ``data/kernels`` (~1 minute; the caller saves them
    with the results), or read from ``out/kernel_curves.json`` that a previous run
    left; and whether they are new."""
    from ..kernels._calibrate import calibrate_kernels
    from ..kernels._tables import load_kernel_tables

    cache = out / _KERNEL_CACHE
    if cache.is_file():
        say(f"reproduce: kernel curves from {cache}")
        return load_curves(cache), False
    say("reproduce: calibrating kernel curves on the H100 kernel measurements")
    return calibrate_kernels(load_kernel_tables(data)), True


def _other_gpu_curves(out: pathlib.Path, say):
    """H100 curves from every other NVIDIA GPU's vLLM tables of the installed
    database (its sibling H200's where H200 runs its kernels, pooled over all of
    them elsewhere; ~2 minutes, saved with the results), or read from
    ``out/kernel_curves_other_gpus.json`` that a previous run left; without the
    database, the note the methods' rows carry instead."""
    from ..kernels._database import database_available
    from ..kernels._pooled_calibrate import curves_from_other_gpus

    cache = out / _OTHER_GPU_CACHE
    if cache.is_file():
        say(f"reproduce: other GPUs' curves from {cache}")
        return load_curves(cache)
    if not database_available():
        return (
            "not applicable: needs aiconfigurator-core's kernel database "
            "(pip install 'diffmodel[aic]')"
        )
    say("reproduce: pooling every other NVIDIA GPU's kernel tables for H100")
    curves = curves_from_other_gpus(
        "h100_sxm", progress=lambda line: say(f"reproduce: other GPUs: {line}")
    )
    out.mkdir(parents=True, exist_ok=True)
    save_curves(curves, cache)
    return curves


def kernel_priors(curves, labels: Sequence[str]) -> dict[str, Factors]:
    """Kernel-calibrated factors of each deployment ``model/gpu/tpN`` in ``labels``,
    at that deployment's own shapes (:func:`diffmodel.kernels.kernel_prior_factors`
    with its model and TP): a 34B model at TP 2 runs larger GEMMs, nearer the
    bandwidth peak, than a 70B model at TP 4."""
    from ..kernels._calibrate import kernel_prior_factors

    out = {}
    for label in labels:
        model, _, tp, _ = parse_group_label(label)
        out[label] = kernel_prior_factors(curves, model=model, tp=tp)
    return out


_KERNEL_CACHE = "kernel_curves.json"
_OTHER_GPU_CACHE = "kernel_curves_other_gpus.json"


def data_root(data: str | pathlib.Path) -> pathlib.Path:
    """The reference data folder from itself or its ``stepml/`` folder."""
    data = pathlib.Path(data)
    if data.name == "stepml" and (data / "steps.parquet").is_file():
        return data.parent
    return data
