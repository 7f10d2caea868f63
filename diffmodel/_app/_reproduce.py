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
  (``canonical_model_name``), so the public traces give two folds.
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
  rows to convergence (no early stopping: see ``_factor_set``).
- ``diffmodel-roofline``: the roofline at its physical priors, nothing fitted.
- ``diffmodel-kernels``: the roofline with factors calibrated on the H100 kernel
  measurements alone (:func:`diffmodel.kernel_prior_factors`), no trace fitting
  (0 trace parameters).
- ``diffmodel-kernels-hierarchical``: hierarchical factors whose global level starts
  from, and is held near (``global_prior_scale`` 0.5), the kernel-calibrated ones.
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
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from .._fitting._factorsets import HierarchicalFactors, PerGroupFactors, StepData
from .._fitting._fit import fit, step_data
from .._fitting._study import StudyFactors, study_components, study_predict
from .._metrics import count_under, metrics_table
from .._model._factors import Factors, default_factors
from ..baselines._baselines import (
    STUDY_GRID,
    BlackBox,
    XGBoostBaseline,
    load_study_xgboost,
)
from ..data._splits import leave_one_out, temporal_split
from ..data._traces import add_targets, load_steps
from ._reproduce_host import HOST_METHODS, run_host_method

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
    "diffmodel-roofline",
    "diffmodel-global",
    "diffmodel-per-model",
    "diffmodel-hierarchical",
    "diffmodel-kernels",
    "diffmodel-kernels-hierarchical",
    *HOST_METHODS,
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
    "note",
)
"""Columns of ``results.csv``: percent for ``mape``/``mspe``/``p99_ape``, seconds for
``fit_seconds``."""

TRANSFER_GRID: dict[str, tuple] = {
    "max_depth": STUDY_GRID["max_depth"],
    "n_estimators": (100,),
    "learning_rate": STUDY_GRID["learning_rate"],
}
"""XGBoost grid of the lomo/lowo protocols (6 combinations)."""

_QUICK_GRID: dict[str, tuple] = {
    "max_depth": (3,),
    "n_estimators": (20,),
    "learning_rate": (0.3,),
}
_FOLD_COLUMN = {"lomo": "model", "lowo": "workload"}
_DIFFMODEL_KINDS = {
    "diffmodel-global": "global",
    "diffmodel-per-model": "per-model",
    "diffmodel-hierarchical": "hierarchical",
    "diffmodel-kernels-hierarchical": "hierarchical",
    "study-9": "study-9",
    "study-36": "study-36",
}
_UNSEEN = "not applicable: deployment group not in training"


class _Settings(NamedTuple):
    rows_per_experiment: int | None
    temporal_grid: dict
    transfer_grid: dict
    solver: str
    max_steps: int
    xgboost_threads: int
    kernel_prior: Any = None  # Factors calibrated on kernels, when a method needs them


class _Fold(NamedTuple):
    """One train/valid/test cut of one target's rows."""

    protocol: str
    name: str
    train: pd.DataFrame
    valid: pd.DataFrame
    test: pd.DataFrame


class _Outcome(NamedTuple):
    """A method's predictions on a fold's test rows (us; NaN where not applicable)."""

    predicted: np.ndarray
    n_params: dict[str, float]
    fit_seconds: dict[str, float]
    fit_steps: float = np.nan
    notes: Mapping[str, str] = types.MappingProxyType({})


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
      ``stepml/seed_xgboost_test_predictions.csv``).
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
    data, out = pathlib.Path(data), pathlib.Path(out)
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
    if {"diffmodel-kernels", "diffmodel-kernels-hierarchical"} & set(methods):
        settings = settings._replace(kernel_prior=_kernel_prior(data, out, say))
    study = load_study_xgboost(study_path)
    evaluator = _Evaluator(frame)
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
        outcome = _run_method(method, fold, column, settings, study, evaluator)
        rows = _score(fold, column, target, method, outcome)
        say(
            f"[{target}/{fold.protocol}/{fold.name}] {method}: mean MAPE "
            f"{_mean(rows)} ({time.perf_counter() - tick:.1f} s)"
        )
        return rows

    # Longest first: the XGBoost grids, then the compilations of the fits.
    tasks.sort(key=lambda task: -_expected_seconds(task[1], task[2], settings))
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        rows = [row for task_rows in pool.map(run, tasks) for row in task_rows]
    results = _order(pd.DataFrame(rows, columns=list(RESULT_COLUMNS)))
    out.mkdir(parents=True, exist_ok=True)
    results.to_csv(out / "results.csv", index=False)
    (out / "results.md").write_text(results_markdown(results))
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


# --------------------------------------------------------------------------- methods


def _kernel_prior(data: pathlib.Path, out: pathlib.Path, say) -> Factors:
    """Kernel-calibrated factors: read from ``out/kernel_prior_factors.json`` when a
    previous run left them, else calibrated on ``data/kernels`` (~1 minute) and saved.
    """
    import json

    from ..kernels._calibrate import calibrate_kernels, kernel_prior_factors
    from ..kernels._tables import load_kernel_tables

    cache = out / "kernel_prior_factors.json"
    if cache.is_file():
        say(f"reproduce: kernel-calibrated factors from {cache}")
        return Factors(**json.loads(cache.read_text()))
    say("reproduce: calibrating the roofline on the H100 kernel measurements")
    curves = calibrate_kernels(load_kernel_tables(data))
    prior = kernel_prior_factors(curves)
    out.mkdir(parents=True, exist_ok=True)
    values = {k: float(v) for k, v in prior.as_dict().items()}
    cache.write_text(json.dumps(values, indent=2) + "\n")
    return prior


def _run_method(
    method: str,
    fold: _Fold,
    target: str,
    settings: _Settings,
    study: pd.DataFrame,
    evaluator: "_Evaluator",
) -> _Outcome:
    if method == "blackbox":
        return _blackbox(fold, target)
    if method == "xgboost":
        return _xgboost(fold, target, settings)
    if method == "study-xgboost":
        return _study_xgboost(fold, study)
    if method in HOST_METHODS:
        return _Outcome(*run_host_method(method, fold, target, settings))
    if method in ("diffmodel-roofline", "diffmodel-kernels"):
        prior = settings.kernel_prior if method == "diffmodel-kernels" else None
        predicted, _ = evaluator.predict(fold.test, prior)
        return _Outcome(predicted, _each(fold.test, 0), _each(fold.test, 0.0))
    return _factor_set(method, fold, target, settings, evaluator)


def _each(frame: pd.DataFrame, value: float) -> dict[str, float]:
    """The same value for every experiment of `frame`."""
    return {e: value for e in frame["experiment_id"].unique()}


def _per_experiment(fold: _Fold):
    """``(experiment_id, train, valid, test)`` of each test experiment (temporal)."""
    for exp, test in fold.test.groupby("experiment_id", sort=True):
        yield (
            exp,
            fold.train[fold.train["experiment_id"] == exp],
            fold.valid[fold.valid["experiment_id"] == exp],
            test,
        )


def _blackbox(fold: _Fold, target: str) -> _Outcome:
    """OLS on the training rows: per experiment (temporal) or pooled (lomo/lowo)."""
    predicted = pd.Series(np.nan, index=fold.test.index)
    seconds: dict[str, float] = {}
    if fold.protocol == "temporal":
        for exp, train, _, test in _per_experiment(fold):
            tick = time.perf_counter()
            model = BlackBox().fit(train, target)
            seconds[exp] = time.perf_counter() - tick
            predicted[test.index] = model.predict(test)
    else:
        tick = time.perf_counter()
        model = BlackBox().fit(fold.train, target)
        seconds = _each(fold.test, time.perf_counter() - tick)
        predicted[:] = model.predict(fold.test)
    return _Outcome(predicted.to_numpy(), _each(fold.test, BlackBox.n_params), seconds)


def _xgboost(fold: _Fold, target: str, settings: _Settings) -> _Outcome:
    """Grid-searched XGBoost: per experiment (temporal) or pooled (lomo/lowo)."""
    predicted = pd.Series(np.nan, index=fold.test.index)
    seconds: dict[str, float] = {}
    params: dict[str, float] = {}
    if fold.protocol == "temporal":
        for exp, train, valid, test in _per_experiment(fold):
            tick = time.perf_counter()
            model = XGBoostBaseline(
                grid=settings.temporal_grid, n_jobs=settings.xgboost_threads
            )
            model.fit(train, valid, target)
            seconds[exp] = time.perf_counter() - tick
            params[exp] = model.n_params
            predicted[test.index] = model.predict(test)
    else:
        tick = time.perf_counter()
        model = XGBoostBaseline(
            grid=settings.transfer_grid, by=None, n_jobs=settings.xgboost_threads
        )
        model.fit(fold.train, fold.valid, target)
        seconds = _each(fold.test, time.perf_counter() - tick)
        params = _each(fold.test, model.n_params)
        predicted[:] = model.predict(fold.test)
    return _Outcome(predicted.to_numpy(), params, seconds)


def _study_xgboost(fold: _Fold, study: pd.DataFrame) -> _Outcome:
    """The study's own predictions, where its test rows are exactly this fold's."""
    predicted = pd.Series(np.nan, index=fold.test.index)
    notes = {}
    for exp, _, _, test in _per_experiment(fold):
        rows = study[study["experiment_id"] == exp]
        ours = test["step.id"].to_numpy()
        theirs = rows["step.id"].to_numpy()
        if len(ours) != len(theirs) or set(ours) != set(theirs):
            notes[exp] = (
                f"not applicable: the study's {len(theirs)} test rows are not this "
                f"split's {len(ours)}"
            )
            continue
        notes[exp] = "the study's own predictions"
        by_step = rows.set_index("step.id")["predicted_us"]
        predicted[test.index] = by_step.loc[ours].to_numpy()
    return _Outcome(
        predicted.to_numpy(),
        _each(fold.test, np.nan),
        _each(fold.test, np.nan),
        notes=notes,
    )


def _factor_set(
    method: str,
    fold: _Fold,
    target: str,
    settings: _Settings,
    evaluator: "_Evaluator",
) -> _Outcome:
    """A factor set fitted on all training rows, early stopping on validation."""
    kind = _DIFFMODEL_KINDS[method]
    per_group = kind in ("per-model", "study-36")
    if per_group and not evaluator.labels_of(fold.train) & evaluator.labels_of(
        fold.test
    ):
        nan = np.full(len(fold.test), np.nan)
        return _Outcome(
            nan,
            _each(fold.test, np.nan),
            _each(fold.test, np.nan),
            notes=_each(fold.test, _UNSEEN),
        )
    tick = time.perf_counter()
    anchor = (
        {"prior": settings.kernel_prior, "global_prior_scale": 0.5}
        if method == "diffmodel-kernels-hierarchical"
        else {}
    )
    # The study's forms are fitted to convergence on the training rows, as the study
    # did: on the temporal split the validation rows (later, larger batches) favour
    # the start values, and early stopping would report the unfitted start as both
    # "study-9" and "study-36".
    result = fit(
        fold.train,
        target=target,
        factors=kind,
        valid=None if kind.startswith("study") else fold.valid,
        solver=settings.solver,
        max_steps=settings.max_steps,
        **anchor,
    )
    seconds = time.perf_counter() - tick
    predicted, known = evaluator.predict(fold.test, result.factor_set)
    best = np.asarray(result.valid_history)[: result.n_steps]
    note = ""
    if best.size and np.all(np.isfinite(best)) and int(np.argmin(best)) == 0:
        note = "early stopping kept the start values (validation loss lowest there)"
    notes = {}
    for exp, rows in pd.Series(known, index=fold.test.index).groupby(
        fold.test["experiment_id"]
    ):
        notes[exp] = note if rows.all() else _UNSEEN
    n_params = _count_params(result.factor_set)
    return _Outcome(
        predicted,
        _each(fold.test, n_params),
        _each(fold.test, seconds),
        fit_steps=float(result.n_steps),
        notes=notes,
    )


def _count_params(factor_set: Any) -> int:
    """Fitted parameters of a factor set (array elements the optimiser moves)."""
    if isinstance(factor_set, HierarchicalFactors):
        extra = 1 if factor_set.learn_prior_scale else 0
        return int(factor_set.global_raw.size + factor_set.offsets.size + extra)
    return int(factor_set.raw.size)


# --------------------------------------------------------------------------- evaluate


@eqx.filter_jit
def _roofline_total(data: StepData, factors) -> jax.Array:
    return data.breakdown(factors).total


@eqx.filter_jit
def _study_total(data: StepData, values: jax.Array) -> jax.Array:
    return study_predict(values[data.group], study_components(data))


class _Evaluator:
    """Predictions of any factor set on any rows of one step table.

    The whole table is evaluated each time (the cost is milliseconds) so that every
    call has the same shapes: one compilation per kind of set, not per fold.
    """

    def __init__(self, frame: pd.DataFrame) -> None:
        self.data, self.labels = step_data(frame)
        self.group = np.asarray(self.data.group)
        self.position = pd.Series(np.arange(len(frame)), index=frame.index)

    def labels_of(self, frame: pd.DataFrame) -> set[str]:
        """The deployment groups of the rows of `frame`."""
        rows = self.group[self.position.loc[frame.index].to_numpy()]
        return {self.labels[i] for i in np.unique(rows)}

    def predict(self, frame: pd.DataFrame, factor_set) -> tuple[np.ndarray, np.ndarray]:
        """Predicted us per row of `frame` (NaN for a group `factor_set` lacks), and
        per row whether its group was known."""
        n = len(self.labels)
        if isinstance(factor_set, StudyFactors):
            values, known = _per_label(factor_set, factor_set.values(), self.labels)
            total = _study_total(self.data, values)
        else:
            if factor_set is None:
                factors, known = default_factors(), np.ones(n, bool)
            elif isinstance(factor_set, Factors):
                factors, known = factor_set, np.ones(n, bool)
            elif isinstance(factor_set, PerGroupFactors):
                factors, known = _per_label(
                    factor_set, factor_set.physical(), self.labels
                )
            else:  # Global, or hierarchical with unseen groups at the global values.
                factors, known = factor_set.factors_for(self.labels), np.ones(n, bool)
            factors = jax.tree.map(lambda x: jnp.broadcast_to(x, (n,)), factors)
            total = _roofline_total(self.data, factors)
        rows = self.position.loc[frame.index].to_numpy()
        row_known = known[self.group[rows]]
        return np.where(row_known, np.asarray(total)[rows], np.nan), row_known


def _per_label(factor_set, values, labels: Sequence[str]):
    """Per-group `values` (leading axis = the set's groups) re-indexed to `labels`;
    a set with one shared set of values is broadcast."""
    own = getattr(factor_set, "labels", ())
    per_group = isinstance(factor_set, PerGroupFactors) or getattr(
        factor_set, "per_group", False
    )
    if not per_group:
        shape = (len(labels), *jnp.shape(values))
        return jnp.broadcast_to(values, shape), np.ones(len(labels), bool)
    known = np.array([lab in own for lab in labels])
    idx = np.array([own.index(lab) if lab in own else 0 for lab in labels])
    return jax.tree.map(lambda x: x[idx], values), known


# --------------------------------------------------------------------------- score


def _score(
    fold: _Fold, column: str, target: str, method: str, outcome: _Outcome
) -> list[dict]:
    """One result row per test experiment of `fold`."""
    test = fold.test.assign(_predicted=outcome.predicted)
    rows = []
    for exp, group in test.groupby("experiment_id", sort=True):
        row = dict(
            target=target,
            protocol=fold.protocol,
            fold=fold.name,
            method=method,
            experiment_id=exp,
            n_test=len(group),
            n_params=outcome.n_params.get(exp, np.nan),
            fit_seconds=outcome.fit_seconds.get(exp, np.nan),
            fit_steps=outcome.fit_steps,
            note=outcome.notes.get(exp, ""),
        )
        if group["_predicted"].notna().all():
            metrics = metrics_table(
                group, actual=column, predicted="_predicted", by=None
            ).iloc[0]
            row.update({k: float(metrics[k]) for k in _METRICS})
        else:
            row.update({k: np.nan for k in _METRICS})
            row["note"] = row["note"] or "not applicable"
        rows.append(row)
    return rows


_METRICS = ("mape", "mspe", "p99_ape", "pearson_r")


def _order(results: pd.DataFrame) -> pd.DataFrame:
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
    return "\n".join(lines)


def _cell(value: float) -> str:
    return "n/a" if not np.isfinite(value) else f"{value:.1f}"
