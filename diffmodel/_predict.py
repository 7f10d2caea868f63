"""The pandas-level prediction entry point."""

import dataclasses
import functools
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from ._fitting._base import AbstractFactorSet, StepData
from ._fitting._fit import FitResult
from ._fitting._intervals import (
    IntervalModel,
    UnseenGroupWarning,
    set_interval,
    set_predictive_sd,
)
from ._fitting._io import load_factors, load_uncertainty
from ._frame import groups_from_frame, pipeline_degrees, stats_from_frame
from ._model._factors import Factors, default_factors
from ._model._features import pipeline_step
from ._model._roofline import COMPONENTS, step_time_batch


@functools.partial(jax.jit, static_argnames=("check",))
def _evaluate(stats, deployments, group, factors, check=True):
    b = step_time_batch(stats, deployments, group, factors, check=check)
    return b.total, b.as_dict()


def _warn_unseen(factor_set: AbstractFactorSet, labels: tuple[str, ...]) -> None:
    for label in factor_set.unseen(labels):
        warnings.warn(
            f"the factors were not fitted on {label}; its rows get the global "
            f"level (fitted groups: {', '.join(factor_set.fitted_groups())})",
            UnseenGroupWarning,
            stacklevel=3,
        )


def resolve_factors(factors, labels: tuple[str, ...]) -> Factors:
    """Physical :class:`Factors` for the groups ``labels`` from what a user passed.

    ``None`` gives the physical priors; a :class:`Factors` is used as is (shared by
    all groups, or one row per group in ``labels`` order). Fitted factor sets and fit
    results resolve themselves (``factors_for(labels)``); a path to a saved JSON
    file is loaded first. A hierarchical set warns (:class:`UnseenGroupWarning`)
    for each of ``labels`` it has no group for.
    """
    if factors is None:
        return default_factors()
    if isinstance(factors, Factors):
        return factors
    if isinstance(factors, str | os.PathLike):
        factors = load_factors(factors)
    if isinstance(factors, FitResult):
        factors = factors.factor_set
    if isinstance(factors, AbstractFactorSet):
        out = factors.factors_for(labels)  # per-model sets refuse unseen groups
        _warn_unseen(factors, labels)
        return out
    raise ValueError(
        "factors must be None, a diffmodel.Factors, a fitted factor set or fit result, "
        f"or a path to a saved factors JSON file; got {type(factors).__name__}"
    )


def predict(
    frame: pd.DataFrame,
    *,
    model: str | None = None,
    hardware: str | None = None,
    tp: int | None = None,
    factors=None,
    interval: float | None = None,
    transfer: bool | None = None,
    pp: int | None = None,
) -> pd.DataFrame:
    """Predict the step time of every row of ``frame``, microseconds per GPU.

    Args:
        frame: one row per step, with ``prefill_tokens``, ``decode_tokens``,
            ``num_prefill_reqs``, ``num_decode_reqs`` (or the trace names
            ``batch.prefill_tokens``, ...) and ``kv_tokens`` (``K_dec``, context tokens
            read by decode attention; else derived from ``kv.usage_gpu_ratio *
            kv.blocks_total_gpu * 16``); optionally ``prefill_context_tokens``
            (``K_pf``, tokens cached before this step's prefill chunks; 0 when
            absent). With only these aggregates, prefill attention assumes equal
            chunks: ``n = P/Np`` new tokens after ``s = K_pf/Np`` cached ones each.
        model, hardware, tp: the deployment, unless the frame has per-row ``model``,
            ``hardware``, ``tp`` columns (which win). Hardware defaults to H100-SXM
            only when neither gives one.
        factors: ``None`` (physical priors), :class:`Factors`, a fitted factor set or
            fit result, or a path to a saved factors JSON file.
        interval: with a probability in (0, 1), e.g. 0.9, add ``predicted_lo_us`` and
            ``predicted_hi_us``: the central interval from the fit's posterior
            (Laplace approximation) and its residual noise, which differs between
            prefill-carrying and decode-only steps (log scale; see
            :mod:`diffmodel._fitting._intervals`). Needs ``factors`` from a fit: a
            :class:`FitResult` or a file saved from one. After
            :meth:`FitResult.calibrate` the half-width on rows of fitted
            deployments is the calibrated multiplier of the predictive sd rather
            than the normal quantile (levels 0.01 up to what the held-out rows
            support, at most 0.99).
        transfer: which residual noise the interval uses. ``None``: the fit's
            transfer noise (``fit(transfer_by=...)``, the miss on data left out of
            nested refits) for rows of deployments the fit never saw, its
            in-sample noise for the others (with a :class:`UnseenGroupWarning`
            where an unseen deployment has no transfer noise to use); ``True``: the
            transfer noise for every row (a new workload on a fitted deployment);
            ``False``: the in-sample noise for every row.
        pp: the pipeline-parallel degree, unless the frame has a per-row ``pp``
            column (both only when they agree). Rows with ``pp > 1`` are priced
            by :func:`diffmodel.serving.pipeline_step` (``pp`` stages of ``tp``
            GPUs each, the batch in ``pp`` microbatches): ``predicted_us`` is the
            whole step, ``(pp + pp - 1)`` stage times plus the host overhead.

    Returns:
        A copy of ``frame`` with ``predicted_us`` and one ``<component>_us`` column per
        component (see :class:`diffmodel.Breakdown`), and the interval columns when
        asked for. With ``pp`` (keyword or column) also ``pp_p2p_us`` (the
        microbatches' sends between stages) and ``pp_bubble_us`` (the pipeline's
        fill and drain, ``pp - 1`` stage times); the GPU components of a ``pp > 1``
        row are one stage's, summed over its microbatches, so the columns still add
        up to ``predicted_us``.
    """
    if interval is not None and not (
        isinstance(interval, float | int) and 0.0 < interval < 1.0
    ):
        raise ValueError(f"interval must be a probability in (0, 1), got {interval!r}")
    if transfer is not None and interval is None:
        raise ValueError("transfer selects the interval's noise: it needs interval")
    stats = stats_from_frame(frame)
    groups = groups_from_frame(frame, model=model, hardware=hardware, tp=tp)
    stages = pipeline_degrees(frame, pp)
    if stages is not None:
        _check_pipeline(stages, groups, interval)
    post = posterior(factors) if interval is not None else None
    fac = resolve_factors(factors, groups.labels)
    total, parts = _evaluate(stats, groups.deployments, jnp.asarray(groups.index), fac)
    out = frame.copy()
    out["predicted_us"] = np.asarray(total)
    for c in COMPONENTS:
        out[f"{c}_us"] = np.asarray(parts[c])
    if stages is not None:
        _with_pipeline(out, stats, groups, fac, stages)
    if post is not None:
        data = StepData(
            stats=stats, deployments=groups.deployments, group=jnp.asarray(groups.index)
        )
        lo, hi = posterior_interval(post, data, groups.labels, interval, transfer)
        out["predicted_lo_us"] = lo
        out["predicted_hi_us"] = hi
    return out


def _check_pipeline(stages: np.ndarray, groups, interval) -> None:
    """``pp`` must leave every stage at least one layer; no intervals (the fit's
    noise model is of single-stage steps)."""
    layers = np.asarray(groups.deployments.arch.n_layers)[groups.index]
    bad = np.flatnonzero(stages > layers)
    if len(bad):
        i = int(bad[0])
        raise ValueError(
            f"pp must be at most the model's layers: row {i} has pp {stages[i]} for "
            f"{groups.labels[groups.index[i]]} ({layers[i]:.0f} layers)"
        )
    if interval is not None and np.any(stages > 1):
        raise ValueError(
            "interval is not available for pipeline-parallel rows (pp > 1): the "
            "fit's residual noise is of single-stage steps"
        )


def _with_pipeline(out: pd.DataFrame, stats, groups, fac: Factors, stages) -> None:
    """Replace the totals and components of the ``pp > 1`` rows of ``out`` by
    :func:`~diffmodel.serving.pipeline_step`'s, and add its two columns."""
    out["pp_p2p_us"] = 0.0
    out["pp_bubble_us"] = 0.0
    rows = np.flatnonzero(stages > 1)
    if not len(rows):
        return
    idx = jnp.asarray(groups.index[rows])
    dep = jax.tree.map(lambda x: x[idx], groups.deployments)
    per_row = jax.tree.map(lambda x: x[idx] if jnp.ndim(x) else x, fac)
    sub = jax.tree.map(lambda x: x[jnp.asarray(rows)], stats)
    pb = pipeline_step(sub, dep, per_row, pp=jnp.asarray(stages[rows], float))
    m = np.asarray(pb.microbatches)
    col = out.columns.get_loc
    for c in COMPONENTS:
        v = pb.overhead_us if c == "overhead" else m * getattr(pb.stage, c)
        out.iloc[rows, col(f"{c}_us")] = np.asarray(v)
    out.iloc[rows, col("pp_p2p_us")] = np.asarray(m * pb.p2p_us)
    out.iloc[rows, col("pp_bubble_us")] = np.asarray(pb.bubble_us)
    out.iloc[rows, col("predicted_us")] = np.asarray(pb.total)


def posterior_interval(
    post: tuple[AbstractFactorSet, IntervalModel],
    data: StepData,
    labels: tuple[str, ...],
    level: float,
    transfer: bool | None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(lo, hi)`` of every step of ``data`` (group index into ``labels``), us: the
    central ``level`` interval of a fit's posterior (:func:`posterior`) plus its
    residual noise per regime, chosen by ``transfer`` as in :func:`predict`."""
    factor_set, model = post
    has_prefill = np.asarray(data.stats.prefill_tokens) > 0
    group = np.asarray(data.group)
    noise = model.row_noise(labels, group, has_prefill, transfer)
    mult = model.row_multiplier(labels, group, level, transfer)
    _, lo, hi = set_interval(
        factor_set, model.cov_raw, noise, data, labels, level=level, multiplier=mult
    )
    return lo, hi


def calibrated(result: FitResult, frame: pd.DataFrame, target: str) -> FitResult:
    """``result`` with its intervals calibrated on ``frame`` (see
    :meth:`FitResult.calibrate`)."""
    from ._fitting._fit import step_data
    from ._fitting._intervals import (
        calibration_from_scores,
        check_calibration_rows,
        conformal_scores,
    )
    from ._fitting._kernel_host import target_values

    y = target_values(frame, target)
    factor_set, model = posterior(result)
    data, labels = step_data(frame)
    check_calibration_rows(labels, model.trained_on)
    has_prefill = np.asarray(data.stats.prefill_tokens) > 0
    noise = model.row_noise(labels, np.asarray(data.group), has_prefill, False)
    t, sd = set_predictive_sd(factor_set, model.cov_raw, noise, data, labels)
    cal = calibration_from_scores(conformal_scores(y, t, sd))
    lap = dataclasses.replace(result.laplace, calibration=cal)
    return dataclasses.replace(result, laplace=lap)


def posterior(factors) -> tuple[AbstractFactorSet, IntervalModel]:
    """``(factor set, interval model)`` of a fit, for intervals."""
    if isinstance(factors, str | os.PathLike):
        return load_factors(factors), load_uncertainty(factors)
    if isinstance(factors, FitResult):
        lap = factors.laplace
        if lap is None or lap.regime_noise_sd is None:
            raise ValueError(
                "interval needs the fit's posterior: this FitResult was fitted with "
                "uncertainty=False"
            )
        return factors.factor_set, IntervalModel(
            cov_raw=np.asarray(lap.cov_raw),
            noise_sd=lap.regime_noise_sd,
            trained_on=lap.trained_on,
            transfer_noise_sd=lap.transfer_noise_sd,
            transfer_by=lap.transfer_by,
            calibration=lap.calibration,
        )
    raise ValueError(
        "interval needs factors from a fit (a FitResult or a factors file saved from "
        f"one), got {type(factors).__name__}"
    )
