"""Fitting factor sets to measured step times on the log-ratio loss."""

import dataclasses
import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import numpy as np
import optax
import pandas as pd
from jaxtyping import Array, Float

from .._arrays import device_array
from .._fitting._base import AbstractFactorSet, StepData
from .._fitting._empirical_bayes import choose_prior_scale
from .._fitting._factorsets import init_factor_set
from .._fitting._kinds import ROOFLINE_KINDS, FactorKind, check_kind
from .._fitting._laplace import (
    IdentifiabilityWarning,
    Laplace,
    factor_set_laplace,
    warn_identifiability,
)
from .._fitting._optimise import Result, minimise
from .._fitting._transfer import transfer_noise, transfer_values
from .._frame import groups_from_frame, holds_booleans, stats_from_frame
from .._metrics import log_ratio_loss
from .._model._factors import Factors


class FitResult(eqx.Module):
    """Outcome of :func:`fit` / :func:`fit_arrays`.

    Attributes:
        factor_set: the fitted set (an :class:`AbstractFactorSet`).
        result: why the optimiser stopped: ``"successful"``, ``"max_steps_reached"``
            or ``"nonfinite"`` (only with ``throw=False``).
        loss_history: objective at each optimiser step (NaN past ``n_steps``).
        valid_history: validation log-ratio loss at each step (NaN without one).
        n_steps: optimiser steps taken.
        wall_seconds: compile plus run time of the optimisation, s.
        compile_seconds: of which tracing and compiling, s (0 when reused).
        target: name of the fitted target (e.g. ``iteration_time_us``).
        laplace: the posterior at the optimum (:class:`Laplace`: per-factor sds in
            physical units, covariance, unpinned directions, factors at a bound), or
            None when the fit was run with ``uncertainty=False``.
        prior_scale_evidence: with ``fit(..., prior_scale="auto")``, each
            between-group scale compared and its log marginal likelihood
            (``(tau, log_evidence)``, nats up to a constant; the fit took the
            highest), else None.
    """

    factor_set: AbstractFactorSet
    result: Result = eqx.field(static=True)
    loss_history: Float[Array, " max_steps"]
    valid_history: Float[Array, " max_steps"]
    n_steps: int = eqx.field(static=True)
    wall_seconds: float = eqx.field(static=True)
    compile_seconds: float = eqx.field(static=True, default=0.0)
    target: str = eqx.field(static=True, default="")
    laplace: Laplace | None = None
    prior_scale_evidence: tuple[tuple[float, float], ...] | None = eqx.field(
        static=True, default=None
    )

    @classmethod
    def from_optimiser(
        cls, res, target: str, laplace: Laplace | None = None
    ) -> "FitResult":
        """The result of a :func:`~diffmodel.minimise` run over a factor set."""
        return cls(
            laplace=laplace,
            factor_set=res.params,
            result=res.result,
            loss_history=res.loss_history,
            valid_history=res.valid_history,
            n_steps=int(res.n_steps),
            wall_seconds=res.compile_seconds + res.run_seconds,
            compile_seconds=res.compile_seconds,
            target=target,
        )

    @property
    def converged(self) -> bool:
        """Whether a convergence test (or early stopping) stopped the fit."""
        return self.result == "successful"

    @property
    def status(self) -> str:
        """How the fit ended, in words: ``"converged"``, ``"iteration budget
        reached"``, and with factors at a bound (a vanishing gradient there is the
        bound's, not an interior optimum's) how many, e.g. ``"converged; 9 of 9
        factors at a bound"``."""
        text = "converged" if self.converged else "iteration budget reached"
        if self.laplace is not None and self.laplace.at_bound:
            n, total = len(self.laplace.at_bound), len(self.laplace.names)
            text += f"; {n} of {total} factors at a bound"
        return text

    @property
    def loss(self) -> float:
        """Final objective value."""
        h = np.asarray(self.loss_history)[: self.n_steps]
        return float(h[-1]) if h.size else float("nan")

    def calibrate(self, frame: pd.DataFrame, *, target: str | None = None):
        """This fit with its predictive intervals calibrated on ``frame``: held-out
        rows of the fitted deployments (later steps of the same traces, say), never
        rows it was fitted on.

        The scores ``|log(actual / predicted)| / sd`` of those rows (``sd`` the
        predictive sd of the log: posterior plus in-sample noise) set each level's
        interval multiplier (:class:`~diffmodel.Calibration`, split conformal), so
        the intervals cover their level on rows like them rather than assuming
        Gaussian log residuals. Rows of deployments the fit never saw keep the
        normal quantile. Only the intervals change; a saved fit keeps the
        calibration.

        Args:
            frame: held-out steps with the target column.
            target: the column, us (default: the fitted target).

        Raises:
            ValueError: a fit without its posterior (``uncertainty=False``), a bad
                frame or target, or rows of deployments the fit never saw.
        """
        from .._predict import calibrated

        return calibrated(self, frame, target or self.target)

    def factors_for(self, labels: Sequence[str]) -> Factors:
        """Physical factors for groups ``labels`` (see the factor set's method)."""
        return self.factor_set.factors_for(labels)

    def table(self) -> pd.DataFrame:
        """Fitted values: one row per group (and ``global``); physical factors with
        their units in the column names, or the study's parameters. With a
        :attr:`laplace` summary, each factor column ``c`` is followed by ``c sd``
        (posterior standard deviation, same unit; ``inf`` where the data leave the
        factor undetermined); :meth:`identifiability` says why."""
        table = self.factor_set.table()
        if self.laplace is None:
            return table
        lap = self.laplace
        sds = {n: float(v) for n, v in zip(lap.names, lap.sd, strict=True)}
        out = {}
        for col in table.columns:
            out[col] = table[col]
            factor = col.split(" [")[0]
            vals = [sds.get(f"{row}.{factor}", np.nan) for row in table.index]
            if not np.all(np.isnan(vals)):
                out[f"{col} sd"] = vals
        return pd.DataFrame(out, index=table.index)

    def identifiability(self) -> str:
        """What the data leave open: unpinned directions and factors at a bound, one
        per line ("" when everything is determined or no summary was computed)."""
        if self.laplace is None:
            return ""
        lines = [f"unpinned: {u}" for u in self.laplace.unpinned]
        lines += [f"at a bound: {b}" for b in self.laplace.at_bound]
        return "\n".join(lines)


def _check_target(y, name: str) -> np.ndarray:
    """``y`` (an array or a frame's column) as float64 us, finite and > 0."""
    if holds_booleans(y):
        raise ValueError(
            f"target {name!r} must be step times (microseconds), got booleans"
        )
    if isinstance(y, pd.Series):
        y = y.to_numpy(dtype=float, na_value=np.nan)
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
    f32 = np.finfo(np.float32)
    out = (y > f32.max) | (y < f32.tiny)
    if out.any():
        first = int(np.flatnonzero(out)[0])
        raise ValueError(
            f"target {name!r} must lie within float32's range (about 1.2e-38 to "
            f"3.4e38 microseconds: the fit works in float32); row {first} has "
            f"{y[first]:g}"
        )
    return y


UNIT_RATIO = 200.0
""":func:`fit` warns when the fit started this factor or more from its target (root
mean square of the log ratio): a target in milliseconds (or nanoseconds) reads as
1000x off. The public host timer ``step_duration_us`` starts about 30x off."""


def _check_scale(result: "FitResult", fs, data: StepData, y, name: str) -> None:
    """Warn when the fit started orders of magnitude from its target (units, most
    likely). The loss at the start (the mean squared log ratio) decides, at no
    cost; only then is the start predicted again, for the median ratio the
    message gives."""
    start = float(np.asarray(result.loss_history)[0])
    if not (np.isfinite(start) and start > np.log(UNIT_RATIO) ** 2):
        return
    pred = np.asarray(fs.predict(data), dtype=float)
    ok = np.isfinite(pred) & (pred > 0)
    ratio = float(np.median(y[ok] / pred[ok])) if ok.any() else float("nan")
    warnings.warn(
        f"target {name!r} is {ratio:.3g} times the starting factors' prediction "
        "(median over the rows): is it in microseconds? A fit this far from "
        "the start drives the factors to their bounds",
        UserWarning,
        stacklevel=3,
    )


def _objective(fs: AbstractFactorSet, args) -> Array:
    """Mean log-ratio loss plus the set's prior term; the data are arguments."""
    prepared, y, w, n = args
    return log_ratio_loss(fs.predict_prepared(prepared), y, w) + fs.penalty(n)


def _valid_loss(fs: AbstractFactorSet, args) -> Array:
    prepared, y = args
    return log_ratio_loss(fs.predict_prepared(prepared), y)


def _prepare(fs: AbstractFactorSet, args):
    """The data's part of ``args`` in the set's prepared form (inside the loop)."""
    data, *rest = args
    return (fs.prepare(data), *rest)


def fit_arrays(
    factor_set: AbstractFactorSet,
    data: StepData,
    target,
    *,
    weights=None,
    valid: tuple[StepData, Any] | None = None,
    solver: str | optax.GradientTransformation = "lbfgs",
    learning_rate: float = 0.05,
    max_steps: int = 500,
    gtol: float = 1e-7,
    rtol: float = 1e-10,
    patience: int = 50,
    callback: Callable[[int, float], None] | None = None,
    callback_every: int = 50,
    target_name: str = "target",
    throw: bool = True,
    uncertainty: bool = True,
) -> FitResult:
    """Fit ``factor_set`` to ``target`` (us per step) on the log-ratio loss.

    The objective is :func:`log_ratio_loss` plus the set's prior term
    (``factor_set.penalty(N)``). Every group the set has must have rows: a group with
    none is an error, raised before any compilation. ``valid=(data, target)`` enables
    early stopping (best parameters on the validation loss are kept). ``solver`` and
    ``throw`` as in :func:`diffmodel.minimise`; the data are the compiled loop's
    arguments, so a refit on data of the same shapes compiles nothing.

    With ``uncertainty`` (default) the result carries the Laplace approximation at
    the optimum (:attr:`FitResult.laplace`), and an :class:`IdentifiabilityWarning`
    is issued for each direction the data leave undetermined and each factor at a
    bound of its range.
    """
    if not isinstance(factor_set, AbstractFactorSet):
        raise ValueError(
            f"factor_set must be a diffmodel factor set, got {type(factor_set)}"
        )
    y = device_array(_check_target(target, target_name))
    n = y.shape[0]
    if np.shape(data.group) != (n,):
        raise ValueError(
            f"data has {np.shape(data.group)} group indices but target has {n} rows"
        )
    labels = factor_set.fitted_groups()
    if labels:
        counts = np.bincount(np.asarray(data.group), minlength=len(labels))
        empty = [lab for lab, c in zip(labels, counts, strict=False) if c == 0]
        if empty:
            raise ValueError(f"group(s) {empty} have no rows to fit")
    w = None
    if weights is not None:
        w = np.asarray(weights, dtype=float)
        if w.shape != (n,) or not np.all(np.isfinite(w) & (w >= 0)) or w.sum() <= 0:
            raise ValueError("weights must be finite, >= 0, not all 0, one per row")
        w = device_array(w)

    valid_fn = valid_args = None
    if valid is not None:
        vy = device_array(_check_target(valid[1], "valid target"))
        valid_fn, valid_args = _valid_loss, (valid[0], vy)
    res = minimise(
        _objective,
        factor_set,
        (data, y, w, device_array(float(n), float)),
        prepare=_prepare,
        solver=solver,
        learning_rate=learning_rate,
        max_steps=max_steps,
        gtol=gtol,
        rtol=rtol,
        valid_fn=valid_fn,
        valid_args=valid_args,
        patience=patience,
        callback=callback,
        callback_every=callback_every,
        throw=throw,
    )
    lap = None
    if uncertainty and np.isfinite(float(res.loss_history[res.n_steps - 1])):
        lap = factor_set_laplace(res.params, data, y, w)
        warn_identifiability(lap)
    return FitResult.from_optimiser(res, target_name, lap)


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
    return StepData(stats=stats, deployments=deps, group=device_array(index)), own


def fit(
    frame: pd.DataFrame,
    *,
    target: str,
    factors: FactorKind = "global",
    model: str | None = None,
    hardware: str | None = None,
    tp: int | None = None,
    valid: pd.DataFrame | None = None,
    weights: str | None = None,
    prior: Factors | None = None,
    prior_scale: float | str = 0.1,
    noise_scale: float = 0.1,
    learn_prior_scale: bool = False,
    global_prior_scale: float | None = None,
    solver: str | optax.GradientTransformation = "lbfgs",
    max_steps: int = 500,
    learning_rate: float = 0.05,
    callback: Callable[[int, float], None] | None = None,
    callback_every: int = 50,
    throw: bool = True,
    uncertainty: bool = True,
    transfer_by: str | None = None,
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
            (see :class:`diffmodel.HierarchicalFactors`). ``prior_scale="auto"``:
            the between-group scale by empirical Bayes, the highest Laplace
            marginal likelihood over scales from 0.01 to 1 (a fit each; see
            :mod:`diffmodel._fitting._empirical_bayes`), with ``noise_scale`` the
            noise sd of a first fit; the comparison is in
            :attr:`FitResult.prior_scale_evidence`.
        global_prior_scale: sd of a Gaussian prior keeping the global factors near
            ``prior`` (global and hierarchical; see :class:`diffmodel.GlobalFactors`).
        solver, max_steps, learning_rate: optimiser settings: ``"lbfgs"``,
            ``"adam"`` or any optax transformation (see :func:`diffmodel.minimise`).
        callback: ``callback(step, loss)`` every ``callback_every`` steps.
        throw: raise when the loss becomes non-finite (else the result says so).
        uncertainty: compute the Laplace summary and warn about undetermined
            directions and factors at a bound (see :func:`fit_arrays`).
        transfer_by: a column of ``frame`` (e.g. ``experiment_id``, ``model``) with
            two or more values: refit once without each value and record the
            residual on the left-out rows as the fit's transfer noise, which
            predictive intervals use for deployments outside the training data
            (see :mod:`diffmodel._fitting._transfer`). Costs one refit per value;
            needs ``uncertainty``.

    Returns:
        A :class:`FitResult`, accepted by :func:`diffmodel.predict` as ``factors``.
    """
    if not isinstance(frame, pd.DataFrame):
        raise ValueError(f"expected a pandas DataFrame, got {type(frame).__name__}")
    if len(frame) == 0:
        raise ValueError("frame has no rows to fit")
    check_kind(factors)
    if target not in frame.columns:
        raise ValueError(f"missing target column {target!r}")
    y = _check_target(frame[target], target)
    if transfer_by is not None:
        if not uncertainty:
            raise ValueError("transfer_by needs uncertainty=True (it feeds intervals)")
        transfer_values(frame, transfer_by)  # a bad column fails before any fit
    # What a refit of these rows repeats (the scale search, the transfer refits).
    settings = dict(
        target=target, factors=factors, model=model, hardware=hardware, tp=tp,
        weights=weights, prior=prior, global_prior_scale=global_prior_scale,
        solver=solver, max_steps=max_steps, learning_rate=learning_rate, throw=throw,
    )  # fmt: skip
    evidence = None
    if isinstance(prior_scale, str):
        choice = _auto_prior_scale(frame, prior_scale, learn_prior_scale, settings)
        prior_scale, noise_scale = choice.prior_scale, choice.noise_sd
        evidence = tuple(
            (float(t), float(v)) for t, v in choice.table["log_evidence"].items()
        )
    data, labels = step_data(frame, model=model, hardware=hardware, tp=tp)
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
    result = fit_arrays(
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
        throw=throw,
        uncertainty=uncertainty,
    )
    if factors in ROOFLINE_KINDS:
        _check_scale(result, fs, data, y, target)
    if evidence is not None:
        result = dataclasses.replace(result, prior_scale_evidence=evidence)
    if result.laplace is None:
        return result
    lap = dataclasses.replace(result.laplace, trained_on=tuple(labels))
    if transfer_by is not None:
        settings.update(
            prior_scale=prior_scale,
            noise_scale=noise_scale,
            learn_prior_scale=learn_prior_scale,
        )
        lap = dataclasses.replace(
            lap,
            transfer_by=transfer_by,
            transfer_noise_sd=transfer_noise(
                frame,
                valid,
                by=transfer_by,
                target=target,
                refit=lambda f, v: fit(f, valid=v, uncertainty=False, **settings),
                step_data=functools.partial(
                    step_data, model=model, hardware=hardware, tp=tp
                ),
            ),
        )
    return eqx.tree_at(lambda r: r.laplace, result, lap)


def _auto_prior_scale(frame, how, learn_prior_scale, settings):
    """The empirical-Bayes choice of ``prior_scale="auto"`` (see :func:`fit`)."""
    factors = settings["factors"]
    if how != "auto":
        raise ValueError(f"prior_scale must be a number > 0 or 'auto', got {how!r}")
    if factors != "hierarchical":
        raise ValueError(
            "prior_scale='auto' chooses the between-group scale of "
            f"factors='hierarchical'; factors is {factors!r}"
        )
    if learn_prior_scale:
        raise ValueError(
            "prior_scale='auto' and learn_prior_scale=True both set the "
            "between-group scale: choose one"
        )
    first = fit(frame, uncertainty=False, **settings)
    with warnings.catch_warnings():
        # Each grid fit would repeat the final fit's identifiability warnings.
        warnings.simplefilter("ignore", IdentifiabilityWarning)
        return choose_prior_scale(
            lambda tau, s: fit(frame, prior_scale=tau, noise_scale=s, **settings),
            n_rows=len(frame),
            noise_sd=float(np.sqrt(first.loss)),
        )
