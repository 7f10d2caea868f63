"""The methods of the benchmark (see ``_reproduce``): black boxes, the study's
forms and diffmodel's factor sets, each fitted on a fold and scored per test
experiment."""

import time
import types
from collections.abc import Mapping
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from .._fitting._base import AbstractFactorSet, StepData
from .._fitting._fit import fit, step_data
from .._fitting._kernel_host import fit_host_on_kernels, kernel_device_us
from .._fitting._kinds import PER_GROUP_KINDS
from .._metrics import metrics_table
from .._model._factors import Factors, default_factors
from .._predict import posterior, posterior_interval
from ..baselines._aiconfigurator import aiconfigurator_step_us
from ..baselines._baselines import STUDY_GRID, BlackBox, XGBoostBaseline
from ._reproduce_host import HOST_METHODS, run_host_method
from ._reproduce_tables import METRICS

TRANSFER_GRID: dict[str, tuple] = {
    "max_depth": STUDY_GRID["max_depth"],
    "n_estimators": (100,),
    "learning_rate": STUDY_GRID["learning_rate"],
}
"""XGBoost grid of the lomo/lowo protocols (6 combinations)."""

_DIFFMODEL_KINDS = {
    "diffmodel-global": "global",
    "diffmodel-per-model": "per-model",
    "diffmodel-hierarchical": "hierarchical",
    "diffmodel-kernels-hierarchical": "hierarchical",
    "study-9": "study-9",
    "study-36": "study-36",
}
_UNSEEN = "not applicable: deployment group not in training"
INTERVAL_LEVEL = 0.9
"""The predictive interval scored in ``coverage90`` / ``width90``."""


class _Settings(NamedTuple):
    rows_per_experiment: int | None
    temporal_grid: dict
    transfer_grid: dict
    solver: str
    max_steps: int
    xgboost_threads: int
    # Kernel-calibrated Factors per deployment label, when a method needs them.
    kernel_prior: Any = None
    # The H100 KernelCurves themselves (the kernel-sum methods).
    kernel_curves: Any = None
    # H100 curves pooled over the other GPUs' database tables, or why there are none.
    other_gpu_curves: Any = None


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
    # The 90% predictive interval per test row (us), where the method gives one.
    interval: tuple[np.ndarray, np.ndarray] | None = None


def _run_method(
    method: str,
    fold: _Fold,
    target: str,
    settings: _Settings,
    study: pd.DataFrame,
    evaluator: "_Evaluator",
) -> _Outcome:
    if method == "aiconfigurator":  # the field's table lookups: nothing to fit
        predicted = aiconfigurator_step_us(fold.test)
        return _Outcome(predicted, _each(fold.test, 0), _each(fold.test, 0.0))
    if method == "blackbox":
        return _blackbox(fold, target)
    if method == "xgboost":
        return _xgboost(fold, target, settings)
    if method == "study-xgboost":
        return _study_xgboost(fold, study)
    if method in HOST_METHODS:
        return _Outcome(*run_host_method(method, fold, target, settings))
    if method in KERNEL_SUM_METHODS:
        return _kernel_sum(method, fold, target, settings)
    if method in ("diffmodel-roofline", "diffmodel-kernels"):
        prior = None
        if method == "diffmodel-kernels":  # each deployment's own kernel prior
            prior = _stack([settings.kernel_prior[lab] for lab in evaluator.labels])
        predicted, _ = evaluator.predict(fold.test, prior)
        return _Outcome(predicted, _each(fold.test, 0), _each(fold.test, 0.0))
    return _factor_set(method, fold, target, settings, evaluator)


KERNEL_SUM_METHODS = (
    "diffmodel-kernel-sum",
    "diffmodel-kernel-sum-host",
    "diffmodel-kernel-sum-other-gpus",
    "diffmodel-kernel-sum-host-other-gpus",
)
"""Methods whose device side is each step's kernels summed on curves: the H100's,
or (``-other-gpus``) those H100 gets from every other GPU of its vendor in the
kernel database (:func:`diffmodel.kernels.curves_from_other_gpus`)."""


def _kernel_sum(method: str, fold: _Fold, target: str, settings: _Settings):
    """The kernel sum alone (nothing fitted), or with its host costs fitted on the
    pooled training rows (``fit_host_on_kernels``) and its 90% intervals calibrated
    on the fold's validation rows (later steps of the training deployments, never
    fitted; ``KernelHostFit.calibrate``)."""
    curves = settings.kernel_curves
    if method.endswith("-other-gpus"):
        curves = settings.other_gpu_curves
        if isinstance(curves, str):
            return _no_predictions(fold, curves)
        method = method.removesuffix("-other-gpus")
    if method == "diffmodel-kernel-sum":
        predicted = kernel_device_us(fold.test, curves)
        return _Outcome(predicted, _each(fold.test, 0), _each(fold.test, 0.0))
    if target != "iteration_time_us":
        return _no_predictions(
            fold,
            "not applicable: host costs complete a wall time (iteration_time); "
            "the host timer is not one",
        )
    tick = time.perf_counter()
    result = fit_host_on_kernels(fold.train, target=target, curves=curves)
    if len(fold.valid):
        result = result.calibrate(fold.valid, target=target)
    seconds = time.perf_counter() - tick
    out = result.predict(fold.test, interval=INTERVAL_LEVEL)
    return _Outcome(
        out["predicted_us"].to_numpy(),
        _each(fold.test, len(result.terms)),
        _each(fold.test, seconds),
        interval=(
            out["predicted_lo_us"].to_numpy(),
            out["predicted_hi_us"].to_numpy(),
        ),
    )


def _no_predictions(fold: _Fold, why: str) -> _Outcome:
    """NaN predictions with ``why`` as every test experiment's note."""
    nan = np.full(len(fold.test), np.nan)
    return _Outcome(
        nan,
        _each(fold.test, np.nan),
        _each(fold.test, np.nan),
        notes=_each(fold.test, why),
    )


def _stack(factors: list[Factors]) -> Factors:
    """Factors with a leading axis over ``factors``."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *factors)


def _each(frame: pd.DataFrame, value: float | str) -> dict[str, float | str]:
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
    """A factor set fitted on all training rows, early stopping on validation, its
    intervals calibrated on the validation rows."""
    kind = _DIFFMODEL_KINDS[method]
    per_group = kind in PER_GROUP_KINDS
    if per_group and not evaluator.labels_of(fold.train) & evaluator.labels_of(
        fold.test
    ):
        return _no_predictions(fold, _UNSEEN)
    tick = time.perf_counter()
    anchor = {}
    if method == "diffmodel-kernels-hierarchical":
        trained = sorted(evaluator.labels_of(fold.train))
        mean = jax.tree.map(
            lambda x: jnp.mean(x, axis=0),
            _stack([settings.kernel_prior[lab] for lab in trained]),
        )
        anchor = {"prior": mean, "global_prior_scale": 0.5}
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
    if len(fold.valid) and result.laplace is not None:
        # Intervals calibrated on the validation rows (their only other use is as
        # the early-stopping criterion, one number per step, not their spread).
        result = result.calibrate(fold.valid)
    predicted, known = evaluator.predict(fold.test, result.factor_set)
    bounds = evaluator.interval(fold.test, result, INTERVAL_LEVEL)
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
        interval=bounds,
    )


def _count_params(factor_set: AbstractFactorSet) -> int:
    """Fitted parameters of a factor set (array elements the optimiser moves)."""
    return factor_set.n_params()


# --------------------------------------------------------------------------- evaluate


@eqx.filter_jit
def _roofline_total(data: StepData, factors) -> jax.Array:
    return data.breakdown(factors).total


@eqx.filter_jit
def _set_total(data: StepData, factor_set: AbstractFactorSet) -> jax.Array:
    return factor_set.predict(data)


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
        if factor_set is None:
            factor_set = default_factors()
        if isinstance(factor_set, Factors):  # physical factors: known everywhere
            factors = jax.tree.map(lambda x: jnp.broadcast_to(x, (n,)), factor_set)
            total, known = _roofline_total(self.data, factors), np.ones(n, bool)
        else:  # a factor set, re-indexed to this table's groups
            factor_set, known = factor_set.reindex(self.labels)
            total = _set_total(self.data, factor_set)
        rows = self.position.loc[frame.index].to_numpy()
        row_known = known[self.group[rows]]
        return np.where(row_known, np.asarray(total)[rows], np.nan), row_known

    def interval(
        self, frame: pd.DataFrame, result, level: float
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """``(lo, hi)`` per row of `frame`, us: ``result``'s central `level` interval
        as ``predict(..., interval=level)`` gives it (its posterior and in-sample
        residual noise per regime, with the calibration's multiplier on rows of the
        fitted deployments; no transfer noise: the fits here do not measure it, so
        rows of unseen deployments get the in-sample noise and the normal
        quantile), or None when the fit has no posterior."""
        if result.laplace is None or result.laplace.regime_noise_sd is None:
            return None
        post = posterior(result)
        lo, hi = posterior_interval(post, self.data, self.labels, level, None)
        rows = self.position.loc[frame.index].to_numpy()
        return lo[rows], hi[rows]


# --------------------------------------------------------------------------- score


def _coverage(outcome: _Outcome, at: np.ndarray, actual: np.ndarray) -> dict:
    """``coverage90`` (share of the measured `actual` inside the interval, 0-1) and
    ``width90`` (median ``(hi - lo) / predicted``) of the outcome's interval on the
    test rows at positions `at`; nothing without an interval."""
    if outcome.interval is None:
        return {}
    lo, hi = (np.asarray(b)[at] for b in outcome.interval)
    predicted = np.asarray(outcome.predicted)[at]
    inside = (actual >= lo) & (actual <= hi)
    return {
        "coverage90": float(np.mean(inside)),
        "width90": float(np.median((hi - lo) / predicted)),
    }


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
            coverage90=np.nan,
            width90=np.nan,
            note=outcome.notes.get(exp, ""),
        )
        if group["_predicted"].notna().all():
            metrics = metrics_table(
                group, actual=column, predicted="_predicted", by=None
            ).iloc[0]
            row.update({k: float(metrics[k]) for k in METRICS})
            at = test.index.get_indexer(group.index)
            row.update(_coverage(outcome, at, group[column].to_numpy(float)))
        else:
            row.update({k: np.nan for k in METRICS})
            row["note"] = row["note"] or "not applicable"
        rows.append(row)
    return rows
