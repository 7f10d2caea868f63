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

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float

UNPINNED_SD = 1.0
"""Posterior sd (raw units: log-odds for efficiencies, ~log for overheads) above which
a direction counts as not determined by the data."""


class Laplace(eqx.Module):
    """Posterior summary of a fitted factor set (see the module doc).

    Attributes:
        names: names of the physical quantities, e.g. ``global.mem_bw`` or
            ``llama-2-70b|h100-sxm|tp4.step_overhead_us``.
        values: their fitted values, in the factors' units.
        sd: their posterior standard deviations, same units (``inf`` when a
            direction through them is flat).
        cov_raw: posterior covariance of the raw (unconstrained) parameters.
        raw_names: name of each raw parameter (flattened order).
        eigenvalues: of the objective's Hessian in raw space (ascending).
        noise_sd: estimated sd of the log-ratio residual (unitless).
        unpinned: human-readable descriptions of the directions the data leaves open.
        at_bound: names of quantities at a bound of their range (an efficiency within
            1% of 1 or 0, an overhead below 1e-3 of its prior scale).
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
    j = float(objective(raw))
    if not np.isfinite(j):
        raise ValueError(f"the objective is not finite at the optimum ({j})")
    s2 = float(noise_sd) ** 2 if noise_sd is not None else j
    hess = np.asarray(jax.hessian(objective)(raw), dtype=np.float64)
    hess = 0.5 * (hess + hess.T)
    evals, evecs = np.linalg.eigh(hess)
    scale = 2.0 * s2 / n_rows
    tiny = max(float(np.max(np.abs(evals))), 1e-300) * 1e-12
    with np.errstate(divide="ignore"):
        inv = np.where(evals > tiny, 1.0 / np.maximum(evals, tiny), np.inf)
    var_dir = scale * inv  # posterior variance along each eigen-direction
    finite = np.isfinite(var_dir)
    cov = (evecs[:, finite] * var_dir[finite]) @ evecs[:, finite].T
    names, values = physical(raw)
    jac = np.asarray(jax.jacfwd(lambda r: physical(r)[1])(raw), dtype=np.float64)
    var_phys = np.einsum("qi,ij,qj->q", jac, cov, jac)
    # A flat direction makes every quantity that moves along it unbounded.
    flat_load = np.abs(jac @ evecs[:, ~finite]) if (~finite).any() else None
    sd = np.sqrt(np.maximum(var_phys, 0.0))
    if flat_load is not None:
        sd = np.where((flat_load > 1e-12).any(axis=1), np.inf, sd)
    unpinned = tuple(
        _describe(evecs[:, k], raw_names, float(np.sqrt(var_dir[k])))
        for k in range(len(evals))
        if not finite[k] or np.sqrt(var_dir[k]) > unpinned_sd
    )
    at_bound: tuple[str, ...] = ()
    if bounds is not None:
        mask = np.asarray(bounds(raw))
        at_bound = tuple(n for n, m in zip(names, mask, strict=True) if m)
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
