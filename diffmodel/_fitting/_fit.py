"""Fitting factor sets to measured step times on the log-ratio loss."""

from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jaxtyping import Array, Float

from .._fitting._factorsets import (
    GlobalFactors,
    HierarchicalFactors,
    PerGroupFactors,
    StepData,
    init_factor_set,
)
from .._fitting._optimise import minimise
from .._fitting._study import STUDY_PARAM_NAMES, StudyFactors, init_study
from .._frame import groups_from_frame, stats_from_frame
from .._metrics import log_ratio_loss
from .._model._factors import FACTOR_NAMES, FACTOR_SPECS, Factors


class FitResult(eqx.Module):
    """Outcome of :func:`fit` / :func:`fit_arrays`.

    Attributes:
        factor_set: the fitted set (global, per-group, hierarchical or seed).
        loss_history: objective at each optimiser step (NaN past ``n_steps``).
        valid_history: validation log-ratio loss at each step (NaN without one).
        n_steps: optimiser steps taken.
        converged: whether a convergence test stopped the fit (not the budget).
        wall_seconds: compile plus run time of the optimisation, s.
        compile_seconds: of which tracing and compiling, s.
        target: name of the fitted target (e.g. ``iteration_time_us``).
    """

    factor_set: Any
    loss_history: Float[Array, " max_steps"]
    valid_history: Float[Array, " max_steps"]
    n_steps: int = eqx.field(static=True)
    converged: bool = eqx.field(static=True)
    wall_seconds: float = eqx.field(static=True)
    compile_seconds: float = eqx.field(static=True, default=0.0)
    target: str = eqx.field(static=True, default="")

    @property
    def loss(self) -> float:
        """Final objective value."""
        h = np.asarray(self.loss_history)[: self.n_steps]
        return float(h[-1]) if h.size else float("nan")

    def factors_for(self, labels: Sequence[str]) -> Factors:
        """Physical factors for groups ``labels`` (see the factor set's method)."""
        if not hasattr(self.factor_set, "factors_for"):
            raise ValueError(
                "the study's factors are not roofline factors; evaluate them "
                "with their own predict(StepData)"
            )
        return self.factor_set.factors_for(labels)

    def table(self) -> pd.DataFrame:
        """Fitted values: one row per group (and ``global``); physical factors with
        their units in the column names, or the study's parameters."""
        fs = self.factor_set
        if isinstance(fs, StudyFactors):
            v = np.atleast_2d(np.asarray(fs.values()))
            names = fs.labels if fs.per_group else ("global",)
            return pd.DataFrame(v, index=list(names), columns=list(STUDY_PARAM_NAMES))
        rows: dict[str, Factors] = {}
        if isinstance(fs, HierarchicalFactors):
            rows["global"] = fs.global_physical()
        if isinstance(fs, GlobalFactors):
            rows["global"] = fs.physical()
        else:
            per = fs.physical().as_dict()
            for i, lab in enumerate(fs.labels):
                rows[lab] = Factors(**{n: v[i] for n, v in per.items()})
        return pd.DataFrame(
            {
                f"{n} [{FACTOR_SPECS[n][1]}]": [
                    float(getattr(f, n)) for f in rows.values()
                ]
                for n in FACTOR_NAMES
            },
            index=list(rows),
        )


def _check_target(y, name: str) -> np.ndarray:
    y = np.asarray(y, dtype=float)
    if y.ndim != 1 or y.size == 0:
        raise ValueError(f"target {name!r} must be a non-empty 1-D array")
    bad = ~(np.isfinite(y) & (y > 0))
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"target {name!r} must be finite and > 0 (microseconds); "
            f"{int(bad.sum())} of {y.size} rows are not (first at position {first});"
            " select the rows with a defined target first, e.g. "
            "frame.dropna(subset=[target])"
        )
    return y


def fit_arrays(
    factor_set,
    data: StepData,
    target,
    *,
    weights=None,
    valid: tuple[StepData, Any] | None = None,
    solver: str = "lbfgs",
    learning_rate: float = 0.05,
    max_steps: int = 500,
    gtol: float = 1e-7,
    rtol: float = 1e-10,
    patience: int = 50,
    callback: Callable[[int, float], None] | None = None,
    callback_every: int = 50,
    target_name: str = "target",
) -> FitResult:
    """Fit ``factor_set`` to ``target`` (us per step) on the log-ratio loss.

    The objective is :func:`log_ratio_loss` plus the set's prior term
    (``factor_set.penalty(N)``). Every group the set has must have rows: a group with
    none is an error, raised before any compilation. ``valid=(data, target)`` enables
    early stopping (best parameters on the validation loss are kept).
    """
    y = jnp.asarray(_check_target(target, target_name))
    n = y.shape[0]
    if np.shape(data.group) != (n,):
        raise ValueError(
            f"data has {np.shape(data.group)} group indices but target has {n} rows"
        )
    labels = getattr(factor_set, "labels", ())
    per_group = isinstance(factor_set, PerGroupFactors | HierarchicalFactors) or (
        isinstance(factor_set, StudyFactors) and factor_set.per_group
    )
    if per_group:
        counts = np.bincount(np.asarray(data.group), minlength=len(labels))
        empty = [lab for lab, c in zip(labels, counts, strict=False) if c == 0]
        if empty:
            raise ValueError(f"group(s) {empty} have no rows to fit")
    w = None
    if weights is not None:
        w = np.asarray(weights, dtype=float)
        if w.shape != (n,) or not np.all(np.isfinite(w) & (w >= 0)) or w.sum() <= 0:
            raise ValueError("weights must be finite, >= 0, not all 0, one per row")
        w = jnp.asarray(w)

    def objective(fs):
        return log_ratio_loss(fs.predict(data), y, w) + fs.penalty(n)

    valid_fn = None
    if valid is not None:
        vdata, vy = valid[0], jnp.asarray(_check_target(valid[1], "valid target"))

        def valid_fn(fs):
            return log_ratio_loss(fs.predict(vdata), vy)

    res = minimise(
        objective,
        factor_set,
        solver=solver,
        learning_rate=learning_rate,
        max_steps=max_steps,
        gtol=gtol,
        rtol=rtol,
        valid_fn=valid_fn,
        patience=patience,
        callback=callback,
        callback_every=callback_every,
    )
    return FitResult(
        factor_set=res.params,
        loss_history=res.loss_history,
        valid_history=res.valid_history,
        n_steps=int(res.n_steps),
        converged=bool(res.converged),
        wall_seconds=res.compile_seconds + res.run_seconds,
        compile_seconds=res.compile_seconds,
        target=target_name,
    )


def step_data(
    frame: pd.DataFrame,
    *,
    model: str | None = None,
    hardware: str | None = None,
    tp: int | None = None,
    labels: Sequence[str] | None = None,
) -> tuple[StepData, tuple[str, ...]]:
    """Array-level :class:`StepData` and group labels of a frame.

    With ``labels`` the group index refers to those labels (e.g. a fitted set's
    groups); rows of other groups raise ``ValueError``.
    """
    stats = stats_from_frame(frame)
    g = groups_from_frame(frame, model=model, hardware=hardware, tp=tp)
    index = np.asarray(g.index)
    deps = g.deployments
    own = g.labels
    if labels is not None:
        pos = {lab: i for i, lab in enumerate(labels)}
        missing = [lab for lab in own if lab not in pos]
        if missing:
            raise ValueError(f"rows of group(s) {missing} not in {list(labels)}")
        # Re-index the deployments into the requested label order.
        order = np.array([own.index(lab) if lab in own else 0 for lab in labels])
        deps = jax.tree.map(lambda x: x[order], deps)
        index = np.array([pos[own[i]] for i in range(len(own))])[index]
        own = tuple(labels)
    return StepData(stats=stats, deployments=deps, group=jnp.asarray(index)), own


_KINDS = ("global", "per-model", "hierarchical", "study-9", "study-36")


def fit(
    frame: pd.DataFrame,
    *,
    target: str,
    factors: str = "global",
    model: str | None = None,
    hardware: str | None = None,
    tp: int | None = None,
    valid: pd.DataFrame | None = None,
    weights: str | None = None,
    prior: Factors | None = None,
    prior_scale: float = 0.1,
    noise_scale: float = 0.1,
    learn_prior_scale: bool = False,
    global_prior_scale: float | None = None,
    solver: str = "lbfgs",
    max_steps: int = 500,
    learning_rate: float = 0.05,
    callback: Callable[[int, float], None] | None = None,
    callback_every: int = 50,
) -> FitResult:
    """Fit factors to a frame of steps; the pandas-level entry point.

    Args:
        frame: steps (see :func:`diffmodel.predict` for the columns) with a
            ``target`` column in microseconds (every row finite and > 0).
        target: the column to fit, e.g. ``iteration_time_us``.
        factors: ``"global"`` (9 factors), ``"per-model"`` (9 per deployment group),
            ``"hierarchical"`` (global + shrunk per-group offsets), or the study
            study's ``"study-9"`` / ``"study-36"`` (compute-only backbone).
        model, hardware, tp: the deployment when the frame has no such columns.
        valid: optional validation frame for early stopping.
        weights: optional column of non-negative sample weights.
        prior: physical factors the fit starts from and (hierarchical) shrinks to the
            neighbourhood of, e.g. kernel-calibrated ones.
        prior_scale, noise_scale, learn_prior_scale: hierarchical prior settings
            (see :class:`diffmodel.HierarchicalFactors`).
        global_prior_scale: sd of a Gaussian prior keeping the global factors near
            ``prior`` (global and hierarchical; see :class:`diffmodel.GlobalFactors`).
        solver, max_steps, learning_rate: optimiser settings (``"lbfgs"`` or
            ``"adam"``).
        callback: ``callback(step, loss)`` every ``callback_every`` steps.

    Returns:
        A :class:`FitResult`, accepted by :func:`diffmodel.predict` as ``factors``.
    """
    if not isinstance(frame, pd.DataFrame):
        raise ValueError(f"expected a pandas DataFrame, got {type(frame).__name__}")
    if len(frame) == 0:
        raise ValueError("frame has no rows to fit")
    if factors not in _KINDS:
        raise ValueError(f"factors must be one of {_KINDS}, got {factors!r}")
    if target not in frame.columns:
        raise ValueError(f"missing target column {target!r}")
    y = _check_target(frame[target].to_numpy(dtype=float, na_value=np.nan), target)
    data, labels = step_data(frame, model=model, hardware=hardware, tp=tp)
    if factors.startswith("study"):
        fs = init_study(labels, per_group=factors == "study-36")
    else:
        fs = init_factor_set(
            factors,
            labels,
            prior=prior,
            prior_scale=prior_scale,
            noise_scale=noise_scale,
            learn_prior_scale=learn_prior_scale,
            global_prior_scale=global_prior_scale,
        )
    w = None
    if weights is not None:
        if weights not in frame.columns:
            raise ValueError(f"missing weights column {weights!r}")
        w = frame[weights].to_numpy(dtype=float)
    vpair = None
    if valid is not None:
        if target not in valid.columns:
            raise ValueError(f"validation frame is missing target column {target!r}")
        vdata, _ = step_data(
            valid, model=model, hardware=hardware, tp=tp, labels=labels
        )
        vpair = (vdata, valid[target].to_numpy(dtype=float, na_value=np.nan))
    return fit_arrays(
        fs,
        data,
        y,
        weights=w,
        valid=vpair,
        solver=solver,
        max_steps=max_steps,
        learning_rate=learning_rate,
        callback=callback,
        callback_every=callback_every,
        target_name=target,
    )
