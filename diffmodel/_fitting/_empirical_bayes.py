"""The hierarchical prior's between-group scale by empirical Bayes (type-II maximum
likelihood).

A :class:`~diffmodel.HierarchicalFactors` fit shrinks each group's log-offsets
towards the global factors with a Gaussian prior of sd ``tau`` (``prior_scale``).
Fixed, ``tau`` is a guess; fitted jointly with the offsets (``learn_prior_scale``)
it runs towards 0 (the offsets shrink, which lets ``tau`` shrink, ...). Empirical
Bayes chooses the ``tau`` under which the data are most probable, with the
parameters integrated out by the Laplace approximation at each fit's optimum:

    log p(y | tau) = -N J*(tau) / (2 s^2) - m log tau - 1/2 log det H(tau) + const

with ``J*`` the fit's objective at its optimum (mean squared log ratio plus the
shrinkage term, weighted by ``s^2 / N`` so that ``N J / (2 s^2)`` is the negative
log posterior), ``s`` the log-ratio noise sd (from a first fit), ``m`` the number
of offsets and ``H`` the objective's Hessian in the raw parameters (the Laplace
summary's eigenvalues; a flat direction's eigenvalue floored). The global factors
carry no prior (or the same one at every ``tau``), so the constant does not
depend on ``tau``. The score is evaluated on a grid of ``tau`` (a fit each).
"""

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

PRIOR_SCALE_GRID: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
"""The between-group sds (raw units: log-odds of efficiencies, ~log of overheads)
that ``prior_scale="auto"`` compares: from offsets of 1% to ones of a factor
``e``."""
EIGEN_FLOOR = 1e-6
"""Eigenvalues of the objective's Hessian below this fraction of the largest count
as this fraction (a direction the data and the prior leave flat: its log would be
rounding noise, the same at every ``tau``)."""


@dataclasses.dataclass(frozen=True)
class PriorScaleChoice:
    """The between-group scale empirical Bayes chose (:func:`choose_prior_scale`).

    Attributes:
        prior_scale: the chosen ``tau`` (raw units).
        noise_sd: the log-ratio noise sd ``s`` the evidence was computed with (and
            the chosen fit's ``noise_scale``).
        table: one row per ``tau`` of the grid: ``log_evidence`` (nats, up to a
            constant; higher is better), ``objective`` (``J*``) and
            ``offset_rms`` (root mean square of the fitted offsets, raw units).
    """

    prior_scale: float
    noise_sd: float
    table: pd.DataFrame


def log_evidence(
    objective: float,
    eigenvalues: np.ndarray,
    *,
    n_rows: int,
    n_offsets: int,
    noise_sd: float,
    prior_scale: float,
) -> float:
    """The Laplace log marginal likelihood of ``prior_scale``, up to a constant that
    does not depend on it (see the module doc)."""
    lam = np.asarray(eigenvalues, np.float64)
    floor = max(float(np.max(np.abs(lam))), 1e-300) * EIGEN_FLOOR
    lam = np.maximum(lam, floor)
    return float(
        -n_rows * objective / (2.0 * noise_sd**2)
        - n_offsets * np.log(prior_scale)
        - 0.5 * np.sum(np.log(lam))
    )


def choose_prior_scale(
    fit_at: Callable[[float, float], object],
    *,
    n_rows: int,
    noise_sd: float,
    grid: Sequence[float] = PRIOR_SCALE_GRID,
) -> PriorScaleChoice:
    """Evaluate the evidence of every ``tau`` in ``grid`` and pick the highest.

    Args:
        fit_at: ``fit_at(tau, s)`` returns a hierarchical :class:`FitResult` fitted
            with ``prior_scale=tau`` and ``noise_scale=s``, with its Laplace summary.
        n_rows: the rows fitted.
        noise_sd: the log-ratio noise sd ``s`` (from a first fit).
        grid: the candidate scales, each > 0.
    """
    grid = tuple(float(t) for t in grid)
    if not grid or not all(np.isfinite(t) and t > 0 for t in grid):
        raise ValueError(f"grid must hold scales > 0, got {grid}")
    if not (np.isfinite(noise_sd) and noise_sd > 0):
        raise ValueError(f"noise_sd must be > 0, got {noise_sd}")
    rows = []
    for tau in grid:
        res = fit_at(tau, noise_sd)
        offsets = np.asarray(res.factor_set.offsets, np.float64)
        rows.append(
            {
                "prior_scale": tau,
                "log_evidence": log_evidence(
                    res.loss,
                    np.asarray(res.laplace.eigenvalues),
                    n_rows=n_rows,
                    n_offsets=offsets.size,
                    noise_sd=noise_sd,
                    prior_scale=tau,
                ),
                "objective": res.loss,
                "offset_rms": float(np.sqrt(np.mean(offsets**2))),
            }
        )
    table = pd.DataFrame(rows).set_index("prior_scale")
    best = float(table["log_evidence"].idxmax())
    return PriorScaleChoice(prior_scale=best, noise_sd=float(noise_sd), table=table)
