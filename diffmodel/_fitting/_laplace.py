"""The Laplace approximation at a fit's optimum: what the data pins and what it doesn't.

A fit minimises ``J(raw) = mean(r^2) + penalty(raw)`` over unconstrained parameters
``raw``, with ``r`` the log-ratio residuals of ``N`` rows. Read as a posterior, with
log-residuals Gaussian of variance ``s2`` (estimated by the mean squared residual at the
optimum) and the penalty as the prior (the factor sets scale it that way), the negative
log posterior is ``N J(raw) / (2 s2)``, so near the optimum

    raw ~ Normal(raw*, C),    C = (2 s2 / N) H^-1,    H = Hessian of J at raw*.

``H`` comes from JAX (exact second derivatives, no finite differences). Its
eigen-directions say what the data determines: a direction whose posterior sd in raw
units is large (``> unpinned_sd``, i.e. the factors along it could change by a factor
of ``e`` or more without the fit noticing) is *unpinned*; it is reported with the
factors it mixes ("step_overhead_us vs layer_overhead_us: only a combination is
determined"). Physical standard deviations follow by the delta method through the
map from raw to physical values (sigmoid, softplus), in the factors' own units.

A direction with zero curvature (a factor that no row's time depends on, with no prior
on it) has infinite variance: it is reported as unpinned and its sd as ``inf``.
"""

import dataclasses
import warnings
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, ArrayLike, Float

from ._intervals import Calibration, regime_noise_sd

UNPINNED_SD = 1.0
"""Posterior sd (raw units: log-odds for efficiencies, ~log for overheads) above which
a direction counts as not determined by the data."""
FLAT_LOAD = 1e-3
"""A quantity moves along a flat direction of the Hessian when that direction's share
of its raw gradient (the cosine between them) is above this. The eigenvectors of a
float32 Hessian carry ~1e-5 of every parameter by rounding alone; a quantity they
touch only that way keeps its finite sd (before, every quantity of a fit with one
collinear pair read ``inf``)."""


class Laplace(eqx.Module):
    """Posterior summary of a fitted factor set (see the module doc).

    Attributes:
        names: names of the physical quantities, e.g. ``global.mem_bw`` or
            ``llama-2-70b|h100-sxm|tp4.step_overhead_us``.
        values: their fitted values, in the factors' units.
        sd: their posterior standard deviations, same units (``inf`` when a
            direction through them is flat; NaN for one at its bound that no longer
            moves with the raw parameters: the approximation says nothing there).
        cov_raw: posterior covariance of the raw (unconstrained) parameters.
        raw_names: name of each raw parameter (flattened order).
        eigenvalues: of the objective's Hessian in raw space (ascending).
        noise_sd: estimated sd of the log-ratio residual (unitless).
        unpinned: human-readable descriptions of the directions the data leaves open.
        at_bound: names of quantities at a bound of their range (an efficiency within
            1% of 1 or 0, an overhead below 1e-3 of its prior scale).
        regime_noise_sd: root-mean-square log-ratio residual of the fitted rows that
            carry prefill tokens and of the decode-only ones (unitless), for
            predictive intervals (None when not computed).
        trained_on: the deployment labels of the fitted rows (intervals for rows of
            other deployments use ``transfer_noise_sd``).
        transfer_noise_sd: the same two regimes' residual on rows left out of nested
            refits (see :mod:`diffmodel._fitting._transfer`), or None.
        transfer_by: the column those refits left out one value at a time, or None.
        calibration: interval multipliers measured on held-out rows
            (:meth:`~diffmodel.FitResult.calibrate`), or None.
    """

    names: tuple[str, ...] = eqx.field(static=True)
    values: Float[Array, " q"]
    sd: Float[Array, " q"]
    cov_raw: Float[Array, "p p"]
    raw_names: tuple[str, ...] = eqx.field(static=True)
    eigenvalues: Float[Array, " p"]
    noise_sd: float = eqx.field(static=True)
    unpinned: tuple[str, ...] = eqx.field(static=True)
    at_bound: tuple[str, ...] = eqx.field(static=True)
    regime_noise_sd: tuple[float, float] | None = eqx.field(static=True, default=None)
    trained_on: tuple[str, ...] = eqx.field(static=True, default=())
    transfer_noise_sd: tuple[float, float] | None = eqx.field(static=True, default=None)
    transfer_by: str | None = eqx.field(static=True, default=None)
    calibration: Calibration | None = eqx.field(static=True, default=None)

    def summary(self) -> dict[str, tuple[float, float]]:
        """``name -> (value, sd)`` in physical units."""
        v, s = np.asarray(self.values), np.asarray(self.sd)
        return {n: (float(v[i]), float(s[i])) for i, n in enumerate(self.names)}


def _describe(vec: np.ndarray, raw_names: tuple[str, ...], sd: float) -> str:
    """One line for an unpinned direction: the factors it moves, with their signs."""
    w = np.abs(vec) / np.max(np.abs(vec))
    idx = [int(i) for i in np.argsort(-w) if w[i] >= 0.3][:4]
    sd_text = "unbounded" if not np.isfinite(sd) else f"sd {sd:.2g} (raw units)"
    if len(idx) == 1:
        return f"{raw_names[idx[0]]}: not determined by the data ({sd_text})"
    signs = np.sign(vec[idx])
    same = bool(np.all(signs == signs[0]))
    joined = " vs ".join(raw_names[i] for i in idx)
    how = (
        "they move together (only their ratio to the rest is determined)"
        if same
        else "they trade off (only a combination is determined)"
    )
    return f"{joined}: {how}; {sd_text}"


def laplace(
    objective: Callable[[Array], Array],
    raw: Float[Array, " p"],
    n_rows: int,
    *,
    raw_names: tuple[str, ...],
    physical: Callable[[Array], tuple[tuple[str, ...], Array]],
    bounds: Callable[[Array], Array] | None = None,
    noise_sd: float | None = None,
    unpinned_sd: float = UNPINNED_SD,
) -> Laplace:
    """Laplace approximation of a fit at its optimum ``raw`` (a flat vector).

    Args:
        objective: ``J(raw)``, the fit's objective: mean squared log-ratio residual
            plus the prior penalty (the factor sets' ``penalty``), unitless.
        raw: the optimum, flat (see :func:`jax.flatten_util.ravel_pytree`).
        n_rows: number of rows the mean runs over.
        raw_names: a name per raw parameter, for the unpinned-direction report.
        physical: ``raw -> (names, values)``: the named physical quantities.
        bounds: optional ``raw -> bool mask`` over the physical quantities, true where
            a quantity sits at a bound of its range.
        noise_sd: sd of the log-ratio residual; default ``sqrt(J(raw))`` (the data
            term dominates J at a fit with weak priors).
        unpinned_sd: raw-unit posterior sd above which a direction is unpinned.

    Returns:
        A :class:`Laplace` summary.
    """
    raw = jnp.asarray(raw)
    if raw.ndim != 1 or raw.shape[0] != len(raw_names):
        raise ValueError(
            f"raw must be a flat vector with one entry per raw name "
            f"({len(raw_names)}), got shape {raw.shape}"
        )
    if n_rows < 1:
        raise ValueError(f"n_rows must be >= 1, got {n_rows}")
    # Compiled, not op by op: an eager Hessian of the step model dispatches (and in a
    # fresh process compiles) every primitive separately, seconds per fit.
    j = jax.jit(objective)(raw)
    hess = jax.jit(jax.hessian(objective))(raw)
    names, values = physical(raw)
    jac = jax.jit(jax.jacfwd(lambda r: physical(r)[1]))(raw)
    mask = None if bounds is None else np.asarray(bounds(raw))
    return summarise(
        j,
        hess,
        names,
        values,
        jac,
        n_rows,
        raw_names=raw_names,
        at_bound_mask=mask,
        noise_sd=noise_sd,
        unpinned_sd=unpinned_sd,
    )


def summarise(
    objective_value: ArrayLike,
    hessian: ArrayLike,
    names: tuple[str, ...],
    values: ArrayLike,
    jacobian: ArrayLike,
    n_rows: int,
    *,
    raw_names: tuple[str, ...],
    at_bound_mask: np.ndarray | None = None,
    noise_sd: float | None = None,
    unpinned_sd: float = UNPINNED_SD,
) -> Laplace:
    """The :class:`Laplace` summary from the objective's value and Hessian at the
    optimum and the Jacobian of the physical quantities (``names``, ``values``) in
    the raw parameters (see :func:`laplace` for the arguments)."""
    j = float(objective_value)
    if not np.isfinite(j):
        raise ValueError(f"the objective is not finite at the optimum ({j})")
    s2 = float(noise_sd) ** 2 if noise_sd is not None else j
    hess = np.asarray(hessian, dtype=np.float64)
    hess = 0.5 * (hess + hess.T)
    evals, evecs = np.linalg.eigh(hess)
    scale = 2.0 * s2 / n_rows
    tiny = max(float(np.max(np.abs(evals))), 1e-300) * 1e-12
    with np.errstate(divide="ignore", over="ignore"):  # a flat Hessian: all inf
        inv = np.where(evals > tiny, 1.0 / np.maximum(evals, tiny), np.inf)
    var_dir = scale * inv  # posterior variance along each eigen-direction
    finite = np.isfinite(var_dir)
    cov = (evecs[:, finite] * var_dir[finite]) @ evecs[:, finite].T
    jac = np.asarray(jacobian, dtype=np.float64)
    var_phys = np.einsum("qi,ij,qj->q", jac, cov, jac)
    # A flat direction makes every quantity that moves along it unbounded: those
    # whose raw gradient has a share above FLAT_LOAD along it (not rounding's).
    sd = np.sqrt(np.maximum(var_phys, 0.0))
    if (~finite).any():
        norm = np.maximum(np.linalg.norm(jac, axis=1), 1e-300)
        share = np.abs(jac @ evecs[:, ~finite]) / norm[:, None]
        sd = np.where((share > FLAT_LOAD).any(axis=1), np.inf, sd)
    unpinned = tuple(
        _describe(evecs[:, k], raw_names, float(np.sqrt(var_dir[k])))
        for k in range(len(evals))
        if not finite[k] or np.sqrt(var_dir[k]) > unpinned_sd
    )
    at_bound: tuple[str, ...] = ()
    if at_bound_mask is not None:
        at_bound = tuple(n for n, m in zip(names, at_bound_mask, strict=True) if m)
        # Pinned to its bound so hard that it no longer moves with the raw
        # parameters (a saturated sigmoid): the delta method's sd of 0 would claim
        # certainty the data never gave. Undefined instead.
        stuck = np.asarray(at_bound_mask, bool) & ~(np.abs(jac) > 0.0).any(axis=1)
        sd = np.where(stuck, np.nan, sd)
    return Laplace(
        names=tuple(names),
        values=jnp.asarray(values),
        sd=jnp.asarray(sd),
        cov_raw=jnp.asarray(cov),
        raw_names=tuple(raw_names),
        eigenvalues=jnp.asarray(evals),
        noise_sd=float(np.sqrt(s2)),
        unpinned=unpinned,
        at_bound=at_bound,
    )


def flat(tree) -> tuple[Array, Callable]:
    """The array leaves of an equinox module as one flat vector, and the inverse."""
    params, static = eqx.partition(tree, eqx.is_inexact_array)
    vec, unravel = ravel_pytree(params)
    return vec, lambda v: eqx.combine(unravel(v), static)


class IdentifiabilityWarning(UserWarning):
    """A fit left a direction of its factors undetermined, or put a factor at a bound
    of its physical range (see :attr:`diffmodel.FitResult.laplace`)."""


def warn_identifiability(lap: "Laplace", stacklevel: int = 3) -> None:
    """One :class:`IdentifiabilityWarning` per unpinned direction and per quantity
    at a bound of ``lap`` (``stacklevel`` 3: the caller of the fit)."""
    for line in (*lap.unpinned, *(f"{b} is at a bound" for b in lap.at_bound)):
        warnings.warn(
            f"identifiability: {line}", IdentifiabilityWarning, stacklevel=stacklevel
        )


_BOUND_EFF = 0.01  # an efficiency within this of 0 or 1
_BOUND_OVH = 1e-3  # an overhead below this fraction of its prior


def _leaf_names(fs, vec_size: int) -> tuple[str, ...]:
    """A name per raw parameter of a factor set, in :func:`flat` order: factor names
    on arrays whose last axis runs over the factors, group labels on their leading
    axis; ``field[i]`` otherwise."""
    from .._model._factors import FACTOR_NAMES

    params, _ = eqx.partition(fs, eqx.is_inexact_array)
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    groups = fs.fitted_groups()
    names: list[str] = []
    for path, leaf in leaves:
        field = ".".join(
            str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k))))
            for k in path
        )
        shape = np.shape(leaf)
        if shape and shape[-1] == len(FACTOR_NAMES):
            rows = groups if len(shape) == 2 and len(groups) == shape[0] else None
            for idx in np.ndindex(shape):
                head = rows[idx[0]] if rows is not None else field
                factor = FACTOR_NAMES[idx[-1]]
                names.append(factor if head == "raw" else f"{head}.{factor}")
        else:
            names += [
                field if not shape else f"{field}{list(i)}" for i in np.ndindex(shape)
            ]
    if len(names) != vec_size:  # pragma: no cover - a leaf layout flat() did not see
        names = [f"raw[{i}]" for i in range(vec_size)]
    return tuple(names)


def _physical_named(fs):
    """``(names, values, bound mask)`` of a factor set's physical factors, or None for
    a set that has none (the study's)."""
    from .._model._factors import FACTOR_NAMES, FACTOR_SPECS

    try:
        f = fs.physical()
    except ValueError:
        return None
    values = jnp.stack([jnp.atleast_1d(getattr(f, n)) for n in FACTOR_NAMES], -1)
    groups = fs.fitted_groups()
    heads = groups if values.shape[0] == len(groups) and groups else ("global",)
    names = tuple(f"{h}.{n}" for h in heads for n in FACTOR_NAMES)
    eff = np.array([FACTOR_SPECS[n][2] == "efficiency" for n in FACTOR_NAMES])
    prior = np.array([FACTOR_SPECS[n][0] for n in FACTOR_NAMES])
    v = values.reshape(-1)
    eff_all = np.tile(eff, values.shape[0])
    prior_all = np.tile(prior, values.shape[0])
    at_bound = jnp.where(
        eff_all,
        (v > 1.0 - _BOUND_EFF) | (v < _BOUND_EFF),
        v < _BOUND_OVH * prior_all,
    )
    return names, v, at_bound


def factor_set_laplace(fs, data, target, weights=None) -> Laplace:
    """:func:`laplace` of a fitted :class:`~diffmodel.AbstractFactorSet` on the rows it
    was fitted to (``data``: :class:`StepData`; ``target`` in microseconds).

    The derivatives come from one compiled function of the set and the data (as
    arguments), so a refit on data of the same shapes reuses it."""
    y = jnp.asarray(target)
    n = int(y.shape[0])
    w = None if weights is None else jnp.asarray(weights)
    vec, _ = flat(fs)
    raw_names = _leaf_names(fs, int(vec.shape[0]))
    named = _physical_named(fs)
    j, hess, values, jac, pred, data_loss = _set_derivatives(
        fs, data, y, w, jnp.asarray(float(n), y.dtype)
    )
    if named is None:  # no physical factors (the study's set): the raw ones
        names, mask = raw_names, np.zeros(len(raw_names), bool)
    else:
        names, mask = named[0], np.asarray(named[2])
    # The noise sd is the data term's, not the penalty's.
    resid = np.asarray(jnp.log(pred) - jnp.log(y))
    by_regime = regime_noise_sd(resid, np.asarray(data.stats.prefill_tokens) > 0)
    lap = summarise(
        j,
        hess,
        names,
        values,
        jac,
        n,
        raw_names=raw_names,
        at_bound_mask=mask,
        noise_sd=max(float(np.sqrt(data_loss)), 1e-12),
    )
    return dataclasses.replace(
        lap, regime_noise_sd=(by_regime["prefill"], by_regime["decode_only"])
    )


@eqx.filter_jit
def _set_derivatives(fs, data, y, w, n):
    """Objective, its Hessian, the physical values and their Jacobian in the raw
    parameters, the predictions and the data term, at ``fs`` (one compilation)."""
    from .._metrics import log_ratio_loss

    vec, unflat = flat(fs)

    def objective(v):
        s = unflat(v)
        return log_ratio_loss(s.predict(data), y, w) + s.penalty(n)

    def physical(v):
        named = _physical_named(unflat(v))
        return v if named is None else named[1]

    pred = fs.predict(data)
    return (
        objective(vec),
        jax.hessian(objective)(vec),
        physical(vec),
        jax.jacfwd(physical)(vec),
        pred,
        log_ratio_loss(pred, y, w),
    )
