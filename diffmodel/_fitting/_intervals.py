"""Predictive intervals of step times: parameter uncertainty plus residual noise.

On the log scale a prediction is ``log t(raw)``. With the posterior of the raw
parameters from :func:`~diffmodel._fitting._laplace.laplace` (covariance ``C``) and a
residual noise of sd ``s_k`` for the step's regime ``k`` (prefill-carrying or
decode-only; their residuals differ in size), the predictive sd of ``log t`` is

    sd = sqrt(g^T C g + s_k^2),    g = d log t / d raw,

and the central ``level`` interval is ``t * exp(+-z sd)`` with ``z`` the normal
quantile of ``(1 + level) / 2``. ``g`` for every step comes from one forward-mode
Jacobian (one JVP per raw parameter), so the whole computation is a few passes of the
step model, in JAX, with no sampling loop.

Step times' log residuals are heavier-tailed than a Gaussian, so ``z`` misstates the
coverage. A :class:`Calibration` replaces it by the ``level`` quantile of
``|log(actual / predicted)| / sd`` over held-out rows (split conformal): rows of
fitted deployments after :meth:`~diffmodel.FitResult.calibrate`.
"""

import dataclasses
import warnings
from collections.abc import Callable, Sequence
from statistics import NormalDist

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float

REGIMES: tuple[str, str] = ("prefill", "decode_only")
"""Residual-noise regimes: steps that carry prefill tokens, and decode-only steps."""


class UnseenGroupWarning(UserWarning):
    """Rows of a deployment a fit never saw: a grouped factor set predicts them at
    its global level, and intervals without transfer noise are too narrow there."""


@dataclasses.dataclass(frozen=True)
class IntervalModel:
    """What predictive intervals need of a fit (from a :class:`FitResult` or the
    ``uncertainty`` block of a factors file).

    Attributes:
        cov_raw: posterior covariance of the raw parameters.
        noise_sd: in-sample residual sd ``(prefill, decode_only)``, log scale.
        trained_on: deployment labels of the fitted rows (``()``: unknown, every
            deployment counts as seen).
        transfer_noise_sd: residual sd on left-out data (``fit(transfer_by=...)``),
            for rows of other deployments; None when not measured.
        transfer_by: the column the transfer noise was measured over, or None.
        calibration: interval multipliers measured on held-out rows of the fitted
            deployments (:class:`Calibration`), or None (the normal quantile).
    """

    cov_raw: np.ndarray
    noise_sd: tuple[float, float]
    trained_on: tuple[str, ...] = ()
    transfer_noise_sd: tuple[float, float] | None = None
    transfer_by: str | None = None
    calibration: "Calibration | None" = None

    def row_multiplier(
        self,
        labels: Sequence[str],
        group: np.ndarray,
        level: float,
        transfer: bool | None = None,
    ) -> np.ndarray:
        """Each row's interval half-width in predictive sds (log scale): the
        calibration's multiplier for ``level`` on rows of fitted deployments (all
        rows with ``transfer=False``), the normal quantile elsewhere, and everywhere
        without a calibration (the held-out rows measured no transfer)."""
        group = np.asarray(group)
        if transfer:
            seen = np.zeros(group.shape, bool)
        elif transfer is None and self.trained_on:
            seen = np.array([lab in self.trained_on for lab in labels], bool)
            seen = seen[group] if len(labels) else np.ones(group.shape, bool)
        else:
            seen = np.ones(group.shape, bool)
        return multipliers(level, seen, self.calibration)

    def row_noise(
        self,
        labels: Sequence[str],
        group: np.ndarray,
        has_prefill: np.ndarray,
        transfer: bool | None = None,
    ) -> np.ndarray:
        """Log-scale noise sd of each row (``group`` indexes ``labels``).

        ``transfer=None`` uses the transfer noise for rows of deployments outside
        :attr:`trained_on` and the in-sample noise elsewhere; ``True`` the transfer
        noise everywhere (e.g. a new workload on a fitted deployment); ``False`` the
        in-sample noise everywhere. Without transfer noise, ``True`` is an error and
        ``None`` warns (:class:`UnseenGroupWarning`) for each unseen deployment.
        """
        if transfer is None:
            new_label = np.array(
                [bool(self.trained_on) and lab not in self.trained_on for lab in labels]
            )
        else:
            new_label = np.full(len(labels), bool(transfer))
        if new_label.any() and self.transfer_noise_sd is None:
            if transfer:
                raise ValueError(
                    "interval transfer=True needs the fit's transfer noise: fit with "
                    "transfer_by=<a column such as experiment_id or model>"
                )
            for lab in np.asarray(labels)[new_label]:
                warnings.warn(
                    f"the fit never saw {lab}: its intervals use the in-sample noise "
                    "and are likely too narrow (fit with transfer_by=... to measure "
                    "the transfer noise)",
                    UnseenGroupWarning,
                    stacklevel=4,
                )
            new_label[:] = False
        rows_new = new_label[np.asarray(group)] if len(labels) else new_label
        pf = np.asarray(has_prefill, bool)
        fitted = np.where(pf, self.noise_sd[0], self.noise_sd[1])
        if self.transfer_noise_sd is None:
            return fitted
        moved = np.where(pf, self.transfer_noise_sd[0], self.transfer_noise_sd[1])
        return np.where(rows_new, moved, fitted)


def regime_noise_sd(
    log_residuals: Float[np.ndarray, " steps"],
    has_prefill: Bool[np.ndarray, " steps"],
) -> dict[str, float]:
    """Root-mean-square log-ratio residual per regime (unitless).

    A regime with no rows takes the pooled value.
    """
    r = np.asarray(log_residuals, dtype=np.float64)
    m = np.asarray(has_prefill, dtype=bool)
    if r.shape != m.shape or r.ndim != 1:
        raise ValueError(
            f"log_residuals and has_prefill must be 1-D of one length, got "
            f"{r.shape} and {m.shape}"
        )
    if r.size == 0 or not np.all(np.isfinite(r)):
        raise ValueError("log_residuals must be non-empty and finite")
    pooled = float(np.sqrt(np.mean(r**2)))
    out = {}
    for name, sel in (("prefill", m), ("decode_only", ~m)):
        out[name] = float(np.sqrt(np.mean(r[sel] ** 2))) if sel.any() else pooled
    return out


def predictive_sd(
    log_predict: Callable[[Array], Float[Array, " steps"]],
    raw: Float[Array, " p"],
    cov_raw: Float[ArrayLike, "p p"],
    noise_sd: Float[ArrayLike, " steps"],
) -> tuple[np.ndarray, np.ndarray]:
    """``(t, sd)``: the prediction, in the units of ``exp`` of ``log_predict``
    (microseconds for step times), and the predictive sd of its log,
    ``sqrt(g^T C g + noise_sd^2)`` (see the module docstring)."""
    raw = jnp.asarray(raw)
    log_t, jac = _value_and_jacobian(log_predict, raw)
    cov = jnp.asarray(cov_raw, log_t.dtype)
    var_param = jnp.einsum("si,ij,sj->s", jac, cov, jac)
    sd = jnp.sqrt(jnp.maximum(var_param, 0.0) + jnp.asarray(noise_sd) ** 2)
    return np.asarray(jnp.exp(log_t)), np.asarray(sd)


def interval(
    log_predict: Callable[[Array], Float[Array, " steps"]],
    raw: Float[Array, " p"],
    cov_raw: Float[ArrayLike, "p p"],
    noise_sd: Float[ArrayLike, " steps"],
    *,
    level: float = 0.9,
    multiplier: Float[ArrayLike, " steps"] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Prediction and its central ``level`` interval, in the units of ``exp`` of
    ``log_predict`` (microseconds for step times).

    Args:
        log_predict: ``raw -> log t`` for every step (natural log of microseconds).
        raw: the fitted raw parameters (flat).
        cov_raw: their posterior covariance.
        noise_sd: residual log-scale sd of each step (e.g. by regime).
        level: the interval's probability, in (0, 1).
        multiplier: the half-width of each step's interval in predictive sds
            (:meth:`IntervalModel.row_multiplier`); default the normal quantile of
            ``(1 + level) / 2``.

    Returns:
        ``(predicted, lo, hi)`` as NumPy arrays.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"interval level must lie in (0, 1), got {level!r}")
    t, sd = predictive_sd(log_predict, raw, cov_raw, noise_sd)
    if multiplier is None:
        multiplier = NormalDist().inv_cdf(0.5 * (1.0 + level))
    half = np.asarray(multiplier) * sd
    return t, t * np.exp(-half), t * np.exp(half)


def _value_and_jacobian(f, raw):
    """``f(raw)`` and its Jacobian (steps x p), by one JVP per parameter."""
    basis = jnp.eye(raw.shape[0], dtype=raw.dtype)

    def column(v):
        return jax.jvp(f, (raw,), (v,))

    values, cols = jax.vmap(column)(basis)
    return values[0], cols.T


def _set_log_predict(factor_set, cov_raw, data, labels):
    """``(raw -> log t, raw)`` of a fitted factor set on ``data`` (group index into
    ``labels``): the map runs through the set's own parameters (those the
    covariance describes), re-indexed to ``labels`` inside it."""
    from ._laplace import flat

    vec, unflat = flat(factor_set)
    if np.shape(cov_raw) != (vec.shape[0], vec.shape[0]):
        raise ValueError(
            f"the covariance has shape {np.shape(cov_raw)}, expected "
            f"{(vec.shape[0], vec.shape[0])} for this factor set's parameters"
        )

    def log_predict(v):
        fs, _ = unflat(v).reindex(labels)
        return jnp.log(fs.predict(data))

    return log_predict, vec


def set_predictive_sd(
    factor_set,
    cov_raw: Float[ArrayLike, "p p"],
    noise_sd: Float[ArrayLike, " steps"],
    data,
    labels,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`predictive_sd` of a fitted factor set's predictions on ``data`` (whose
    group index refers to ``labels``), with a log-scale noise sd per row (see
    :meth:`IntervalModel.row_noise`)."""
    log_predict, vec = _set_log_predict(factor_set, cov_raw, data, labels)
    return predictive_sd(log_predict, vec, cov_raw, noise_sd)


def set_interval(
    factor_set,
    cov_raw: Float[ArrayLike, "p p"],
    noise_sd: Float[ArrayLike, " steps"],
    data,
    labels,
    *,
    level: float,
    multiplier: Float[ArrayLike, " steps"] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`interval` of a fitted factor set's predictions on ``data``, as
    :func:`set_predictive_sd` computes their sd."""
    log_predict, vec = _set_log_predict(factor_set, cov_raw, data, labels)
    return interval(
        log_predict, vec, cov_raw, noise_sd, level=level, multiplier=multiplier
    )


CALIBRATION_LEVELS: tuple[float, ...] = tuple(round(0.01 * i, 2) for i in range(1, 100))
"""The interval levels a :class:`Calibration` stores its multipliers at (0.01 to
0.99); a level between two of them interpolates linearly."""


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Interval multipliers measured on rows a fit did not see (split conformal).

    The Gaussian interval ``t * exp(+-z sd)`` assumes log-ratio residuals of sd
    ``sd``. The residuals of step times are heavier-tailed than that, and later rows
    of a trace miss by more than the fitted ones; both set the coverage off its level.
    A calibration replaces ``z`` by the ``level`` quantile of the scores
    ``|log(actual / predicted)| / sd`` of held-out rows (the finite-sample conformal
    rank ``ceil((n + 1) level)`` of ``n`` scores), so on rows like those the interval
    covers ``level`` of them.

    Attributes:
        multipliers: the multiplier at each of :data:`CALIBRATION_LEVELS` (unitless;
            None where the rows are too few for that level).
        n_rows: the held-out rows scored.
    """

    multipliers: tuple[float | None, ...]
    n_rows: int

    def multiplier(self, level: float) -> float:
        """The multiplier of ``sd`` for a central ``level`` interval.

        Raises:
            ValueError: ``level`` outside the calibrated range (0.01 up to the
                highest level the rows support).
        """
        grid = np.asarray(CALIBRATION_LEVELS)
        top = max(
            (lv for lv, m in zip(grid, self.multipliers, strict=True) if m is not None),
            default=None,
        )
        if top is None or not grid[0] <= level <= top:
            raise ValueError(
                f"interval level {level!r}: the calibration on {self.n_rows} held-out "
                f"rows covers levels {grid[0]} to {top}"
            )
        values = np.array([np.inf if m is None else m for m in self.multipliers])
        return float(np.interp(level, grid, values))


def multipliers(
    level: float,
    seen: Bool[np.ndarray, " rows"],
    calibration: Calibration | None = None,
    transfer_calibration: Calibration | None = None,
) -> np.ndarray:
    """Each row's interval half-width in predictive sds for a central ``level``
    interval: ``calibration``'s multiplier on rows of fitted deployments
    (``seen``), ``transfer_calibration``'s on the others, the normal quantile of
    ``(1 + level) / 2`` where the matching calibration is None."""
    out = np.full(np.shape(seen), NormalDist().inv_cdf(0.5 * (1.0 + level)))
    if calibration is not None:
        out[seen] = calibration.multiplier(float(level))
    if transfer_calibration is not None:
        out[~seen] = transfer_calibration.multiplier(float(level))
    return out


def conformal_scores(
    actual: Float[ArrayLike, " rows"],
    predicted: Float[ArrayLike, " rows"],
    sd: Float[ArrayLike, " rows"],
) -> np.ndarray:
    """``|log(actual / predicted)| / sd`` per row: how many predictive sds (log
    scale) each held-out row missed by, the scores of
    :func:`calibration_from_scores`."""
    return np.abs(np.log(np.asarray(actual) / np.asarray(predicted))) / np.asarray(sd)


def check_calibration_rows(labels: Sequence[str], trained_on: Sequence[str]) -> None:
    """``ValueError`` unless every deployment of ``labels`` was fitted (calibration
    rows are held-out rows of the fitted deployments; ``trained_on`` empty: unknown,
    every deployment counts as fitted)."""
    unseen = sorted(set(labels) - set(trained_on)) if trained_on else []
    if unseen:
        raise ValueError(
            f"calibrate: rows of {unseen} were not fitted (trained on "
            f"{list(trained_on)}); calibrate on held-out rows of the fitted "
            "deployments"
        )


def calibration_from_scores(scores: Float[ArrayLike, " rows"]) -> Calibration:
    """A :class:`Calibration` from held-out scores ``|log(actual / predicted)| / sd``
    (finite, >= 0, at least one)."""
    s = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    if s.size == 0 or not np.all(np.isfinite(s)) or (s < 0).any():
        raise ValueError(
            "calibration scores must be finite, >= 0 and at least one, got "
            f"{s.size} values"
        )
    n = s.size
    ranks = np.ceil((n + 1) * np.asarray(CALIBRATION_LEVELS) - 1e-9).astype(int)
    return Calibration(
        multipliers=tuple(float(s[r - 1]) if r <= n else None for r in ranks),
        n_rows=n,
    )


def calibration_to_dict(cal: Calibration | None) -> dict | None:
    """The JSON form of a calibration (None stays None): its levels, multipliers
    (null where the rows were too few) and row count."""
    if cal is None:
        return None
    return {
        "levels": list(CALIBRATION_LEVELS),
        "multipliers": list(cal.multipliers),
        "n_rows": int(cal.n_rows),
    }


def calibration_from_dict(block, field: str = "calibration") -> Calibration | None:
    """Inverse of :func:`calibration_to_dict`; ``ValueError`` naming ``field`` for
    a bad block."""
    if block is None:
        return None
    if not isinstance(block, dict):
        raise ValueError(f"field {field!r}: expected null or an object")
    levels = block.get("levels")
    values = block.get("multipliers")
    n_rows = block.get("n_rows")
    ok = isinstance(levels, list) and isinstance(values, list)
    ok = ok and [float(v) for v in levels] == list(CALIBRATION_LEVELS)
    ok = ok and len(values) == len(CALIBRATION_LEVELS)
    ok = ok and all(
        v is None
        or (isinstance(v, int | float) and not isinstance(v, bool) and v >= 0)
        and np.isfinite(v)
        for v in values
    )
    if not ok or not isinstance(n_rows, int) or isinstance(n_rows, bool) or n_rows < 1:
        raise ValueError(
            f"field {field!r}: expected levels 0.01, 0.02, ..., 0.99, one "
            "multiplier >= 0 (or null) per level and n_rows >= 1"
        )
    return Calibration(
        multipliers=tuple(None if v is None else float(v) for v in values),
        n_rows=n_rows,
    )
