"""Host costs fitted on traces, device time from kernel curves: the two sides apart.

:func:`fit_host_on_kernels` keeps the device side of every step fixed at its kernel sum
(:func:`diffmodel.kernels.kernel_step_time` with a GPU's calibrated curves, fitted to
kernel tables only) and fits the serving stack's host costs (per step, per layer,
per request, per request in each layer; :class:`~diffmodel.kernels.HostCosts`) to a
trace on the log-ratio loss.
The host costs belong to the stack, so they carry over to models and GPUs the trace
never saw: a new model takes its device time from its own shapes, a new GPU from its
own curves.

The model is ``t = device + sum_j theta_j x_j`` with ``x`` the terms' multipliers
(``1``, ``L`` when the step runs a forward pass, ``Np + Nd``, their product) and
``theta = exp(raw)`` (microseconds, > 0). The posterior of ``raw`` is the Laplace
approximation at the optimum under Gaussian log-ratio noise and a weak prior
(:data:`PRIOR_LOG_SD`); a direction of ``raw`` the data do not determine (step and
per-layer cost on one model: both are constant per step) is named and warned about,
as is a term driven to zero.
"""

import dataclasses
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from .._arrays import device_array
from .._frame import parse_group_label
from .._model._hardware import canonical_hardware, hardware_system
from ..kernels._curves import KernelCurves
from ..kernels._step import (
    HOST_TERMS,
    HostCosts,
    check_supported,
    device_us,
    host_features,
    kernel_step_time,
)
from ._fit import _check_target, step_data
from ._intervals import (
    REGIMES,
    Calibration,
    UnseenGroupWarning,
    calibration_from_scores,
    check_calibration_rows,
    conformal_scores,
    multipliers,
    regime_noise_sd,
)
from ._laplace import IdentifiabilityWarning
from ._optimise import minimise

UNPINNED_RATIO = 1e-6
"""A Hessian eigenvalue below this fraction of the largest marks a direction the
data do not determine."""
PRIOR_LOG_SD = 3.0
"""Sd of the weak Gaussian prior on each ``log theta`` of the posterior (a factor of
``e^3 = 20`` either way): it keeps the covariance finite along a direction the rows
do not determine, so the intervals there are wide rather than undefined. It does not
move the fitted values (the fit is maximum likelihood)."""
AT_ZERO_SHARE = 1e-3
"""A fitted cost that makes up less than this share of the mean predicted step sits
at its bound, zero (its log runs off to minus infinity)."""


@dataclasses.dataclass(frozen=True)
class KernelHostFit:
    """Host costs fitted over kernel-sum device times (:func:`fit_host_on_kernels`).

    Attributes:
        curves: the kernel curves that give the device side (their GPU).
        terms: the fitted host terms (of :data:`~diffmodel.kernels.HOST_TERMS`).
        host: the fitted costs, us (terms not fitted are 0).
        sd_us: posterior sd of each fitted term, us (delta method from ``cov_raw``).
        cov_raw: posterior covariance of ``log theta``, in ``terms`` order.
        noise_sd: in-sample log-ratio residual sd ``(prefill, decode_only)``.
        loss: final mean squared log-ratio on the fitted rows.
        n_rows: fitted rows.
        trained_on: deployment labels (``model/gpu/tpN``) of the fitted rows.
        converged: whether the optimiser met its convergence test.
        unpinned: directions the data do not determine, in words.
        calibration: interval multipliers measured on held-out rows
            (:meth:`calibrate`), or None (the normal quantile).
        transfer_calibration: interval multipliers for rows of deployments the fit
            never saw, measured by refitting without each fitted deployment in turn
            (``fit_host_on_kernels(..., transfer=True)``), or None.
    """

    curves: KernelCurves
    terms: tuple[str, ...]
    host: HostCosts
    sd_us: dict[str, float]
    cov_raw: np.ndarray
    noise_sd: tuple[float, float]
    loss: float
    n_rows: int
    trained_on: tuple[str, ...]
    converged: bool
    unpinned: tuple[str, ...]
    calibration: Calibration | None = None
    transfer_calibration: Calibration | None = None

    def table(self) -> pd.DataFrame:
        """One row per fitted term: value and posterior sd, us."""
        values = self.host.as_dict()
        return pd.DataFrame(
            {
                "term": list(self.terms),
                "value_us": [float(values[t]) for t in self.terms],
                "sd_us": [self.sd_us[t] for t in self.terms],
            }
        ).set_index("term")

    def predict(
        self,
        frame: pd.DataFrame,
        *,
        interval: float | None = None,
        curves: KernelCurves | None = None,
    ):
        """Predicted step times of ``frame``'s rows, us, as a DataFrame (same index):
        ``predicted_us``, and with ``interval`` (a level in (0, 1)) the central
        predictive interval ``predicted_lo_us`` / ``predicted_hi_us``: the posterior
        of the host costs plus the in-sample residual noise of the row's regime, its
        width ``z sd`` on the log scale with ``z`` the normal quantile, or, after
        :meth:`calibrate`, the multiplier the held-out rows measured (for rows of the
        fitted deployments). Rows of deployments outside ``trained_on`` take the
        multiplier the fit's leave-one-deployment-out refits measured
        (``transfer=True``); without it they warn
        (:class:`~diffmodel.UnseenGroupWarning`) and keep the normal quantile: their
        miss is a transfer, which neither the fitted nor the held-out rows measure.

        ``curves``: another GPU's curves, for rows on that GPU: the device side
        comes from them, the host costs (the serving stack's) from this fit."""
        if interval is not None and not (
            isinstance(interval, float | int) and 0.0 < interval < 1.0
        ):
            raise ValueError(f"interval must be a level in (0, 1), got {interval!r}")
        rows = self._rows(frame, curves)
        out = pd.DataFrame({"predicted_us": rows.pred}, index=frame.index)
        if interval is None:
            return out
        labels = rows.labels
        unseen = sorted(set(labels) - set(self.trained_on))
        if unseen and self.transfer_calibration is None:
            warnings.warn(
                f"rows of {unseen} were not fitted (trained on "
                f"{list(self.trained_on)}): the interval holds the in-sample noise "
                "and the host costs' posterior; nothing measured what a transfer "
                "adds (fit with transfer=True on two or more deployments)",
                UnseenGroupWarning,
                stacklevel=2,
            )
        z = multipliers(
            float(interval),
            self._seen(rows),
            self.calibration,
            self.transfer_calibration,
        )
        half = z * self._sd(rows)
        out["predicted_lo_us"] = rows.pred * np.exp(-half)
        out["predicted_hi_us"] = rows.pred * np.exp(half)
        return out

    def calibrate(
        self,
        frame: pd.DataFrame,
        *,
        target: str,
        curves: KernelCurves | None = None,
    ) -> "KernelHostFit":
        """This fit with its intervals calibrated on ``frame``: held-out rows of the
        fitted deployments (later steps of the same traces, say), never rows it was
        fitted on.

        The scores ``|log(actual / predicted)| / sd`` of those rows set the interval
        multiplier of each level (:class:`~diffmodel.Calibration`, split conformal),
        so the intervals cover their level on rows like them rather than assuming
        Gaussian log residuals. Only the intervals change.

        Raises:
            ValueError: a bad frame or target, or rows of deployments the fit never
                saw (a transfer: calibrating on it would widen every interval).
        """
        y = target_values(frame, target)
        rows = self._rows(frame, curves)
        check_calibration_rows(rows.labels, self.trained_on)
        if not (rows.pred > 0.0).all():
            raise ValueError(
                f"calibrate: {int((rows.pred <= 0).sum())} rows are predicted no "
                "time (no forward pass and no host term for them)"
            )
        scores = conformal_scores(y, rows.pred, self._sd(rows))
        return dataclasses.replace(self, calibration=calibration_from_scores(scores))

    def _rows(self, frame: pd.DataFrame, curves: KernelCurves | None) -> "_Rows":
        """``frame``'s rows evaluated: prediction (us) and what its interval needs."""
        dev, x, labels, has_prefill, group = _prepare(
            frame, self.curves if curves is None else curves
        )
        cols = [HOST_TERMS.index(t) for t in self.terms]
        theta = np.array([float(self.host.as_dict()[t]) for t in self.terms])
        x = x[:, cols]
        return _Rows(dev + x @ theta, x, theta, labels, has_prefill, group)

    def _sd(self, rows: "_Rows") -> np.ndarray:
        """Each row's predictive sd of ``log t``."""
        return _row_sd(
            rows.x, rows.theta, rows.pred, self.cov_raw, self.noise_sd, rows.prefill
        )

    def _seen(self, rows: "_Rows") -> np.ndarray:
        """Whether each row's deployment was fitted."""
        seen = np.array([lab in self.trained_on for lab in rows.labels], bool)
        return seen[rows.group] if len(rows.labels) else np.ones(len(rows.pred), bool)


class _Rows(NamedTuple):
    """Rows evaluated by a :class:`KernelHostFit`: ``pred`` (us), the fitted terms'
    multipliers ``x`` and costs ``theta`` (us), the deployments present, the
    prefill flags and each row's index into ``labels``."""

    pred: np.ndarray
    x: np.ndarray
    theta: np.ndarray
    labels: list
    prefill: np.ndarray
    group: np.ndarray


def _row_sd(x, theta, pred, cov_raw, noise_sd, has_prefill) -> np.ndarray:
    """Each row's predictive sd of ``log t``: the host costs' posterior (delta
    method through ``t = device + x theta``) plus the regime's residual noise."""
    # d log t / d raw; a step with no forward pass and no cost stays at 0.
    safe = np.where(pred > 0.0, pred, 1.0)
    grad = np.where(pred[:, None] > 0.0, x * theta / safe[:, None], 0.0)
    var = np.einsum("ni,ij,nj->n", grad, cov_raw, grad)
    noise = np.where(has_prefill, noise_sd[0], noise_sd[1])
    return np.sqrt(np.maximum(var, 0.0) + noise**2)


def _transfer_scores(dev, x, y, group, sd, max_steps) -> np.ndarray:
    """``|log(actual / predicted)| / sd`` of each deployment's rows predicted by
    host costs refitted without them (one refit per deployment)."""
    scores = []
    for g in np.unique(group):
        out = group == g
        res, _ = _fit_arrays(dev[~out], x[~out], y[~out], max_steps)
        theta = np.exp(np.asarray(res.params, dtype=np.float64))
        scores.append(conformal_scores(y[out], dev[out] + x[out] @ theta, sd[out]))
    return np.concatenate(scores)


def _checked_data(frame: pd.DataFrame, curves: KernelCurves):
    """``step_data`` of ``frame``, checked against the curves' GPU and the kernel
    sum's supported architectures."""
    if not isinstance(frame, pd.DataFrame):
        raise ValueError(f"expected a pandas DataFrame, got {type(frame).__name__}")
    if not isinstance(curves, KernelCurves):
        raise ValueError(
            f"curves must be KernelCurves (diffmodel.kernels.calibrate_kernels), "
            f"got {type(curves).__name__}"
        )
    data, labels = step_data(frame)
    gpus = sorted({parse_group_label(lab)[1] for lab in labels})
    other = [g for g in gpus if g != canonical_hardware(curves.hardware)]
    if other:
        raise ValueError(
            f"the curves were calibrated on {curves.hardware!r} but the rows run on "
            f"{other}: calibrate curves for that GPU ('diffmodel calibrate --system "
            f"{hardware_system(other[0])}', or '--pool others' where its tables are "
            "not measured) and pass them as --curves / curves="
        )
    # The statistics were checked by step_data.
    check_supported(data.deployments, curves)
    return data, labels


def _prepare(frame: pd.DataFrame, curves: KernelCurves):
    """Device time (us), host multipliers, the labels of the deployments present,
    prefill flags and each row's index into those labels."""
    data, labels = _checked_data(frame, curves)
    dev, x = _device_features(data.stats, data.deployments, data.group, curves)
    dev, x = np.asarray(dev, np.float64), np.asarray(x, np.float64)
    has_prefill = np.asarray(data.stats.prefill_tokens) > 0
    codes, group = np.unique(np.asarray(data.group), return_inverse=True)
    present = [labels[i] for i in codes]
    return dev, x, present, has_prefill, group


@eqx.filter_jit
def _device_features(stats, deployments, group, curves):
    """Kernel-sum device time and host multipliers per step, in one compiled call
    (eager, the sum's hundreds of small operations would each compile)."""
    dep = deployments.take(group)
    return device_us(stats, dep, curves, check=False), host_features(stats, dep)


def kernel_device_us(frame: pd.DataFrame, curves: KernelCurves) -> np.ndarray:
    """The kernel-sum device time of each row of ``frame``, us (no host cost)."""
    return _prepare(frame, curves)[0]


@eqx.filter_jit
def _breakdown(stats, deployments, group, curves, host):
    dep = deployments.take(group)
    return kernel_step_time(stats, dep, curves, host, check=False).as_dict()


def kernel_breakdown(
    frame: pd.DataFrame, curves: KernelCurves, host: HostCosts | None = None
) -> pd.DataFrame:
    """Each row's kernel-sum step time by component, us, as ``<component>_us``
    columns (same index; ``overhead_us`` holds the host costs ``host``)."""
    data, _ = _checked_data(frame, curves)
    parts = _breakdown(data.stats, data.deployments, data.group, curves, host)
    return pd.DataFrame(
        {f"{k}_us": np.asarray(v, np.float64) for k, v in parts.items()},
        index=frame.index,
    )


def _loss(raw, args):
    dev, x, log_y = args
    pred = dev + x @ jnp.exp(raw)
    return jnp.mean((jnp.log(pred) - log_y) ** 2)


_loss_value = jax.jit(_loss)
_loss_hessian = jax.jit(jax.hessian(_loss))


def target_values(frame: pd.DataFrame, target: str) -> np.ndarray:
    """``frame[target]`` as float64 us, every value finite and > 0 (``ValueError``
    naming the column otherwise, or listing the columns where it is missing)."""
    if not isinstance(frame, pd.DataFrame) or target not in frame.columns:
        columns = list(frame.columns) if isinstance(frame, pd.DataFrame) else None
        raise ValueError(f"target {target!r}: no such column; columns are {columns}")
    return _check_target(frame[target], target)


def _idle(dev: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Rows with no device time that the chosen host terms give no cost either."""
    return (dev <= 0.0) & (x.sum(axis=1) <= 0.0)


def _fit_arrays(dev: np.ndarray, x: np.ndarray, y: np.ndarray, max_steps: int):
    """L-BFGS on the log-ratio loss of ``dev + x exp(raw)`` against ``y`` (us), from
    the median gap between wall and device time shared by the terms. Returns the
    optimiser's result and the device arrays it was fitted on."""
    gap = max(float(np.median(y - dev)), 1.0)
    start = np.log(gap / (x.shape[1] * np.maximum(x.mean(axis=0), 1e-9)))
    args = tuple(device_array(a) for a in (dev, x, np.log(y)))
    res = minimise(
        _loss, device_array(start), args, solver="lbfgs", max_steps=max_steps
    )
    return res, args


def fit_host_on_kernels(
    frame: pd.DataFrame,
    *,
    target: str,
    curves: KernelCurves,
    terms: Sequence[str] = ("layer", "layer_request"),
    max_steps: int = 500,
    transfer: bool = False,
) -> KernelHostFit:
    """Fit the serving stack's host costs to ``frame``'s ``target`` (us per step),
    with each step's device time fixed at its kernel sum on ``curves``' GPU.

    Args:
        frame: steps (the columns of :func:`diffmodel.predict`) with ``target``.
        target: the column to fit, us; every row finite and > 0 (the iteration time:
            host costs are what the device time leaves of a step's wall time).
        curves: calibrated kernel curves of the GPU the rows ran on.
        terms: which host costs to fit, of ``step``, ``layer``, ``request``,
            ``layer_request``. The default, a cost per layer and one per request in
            each layer, is the form leave-one-model-out validation inside the
            training rows chose on the public traces (``experiments/host_terms.py``):
            on vLLM's piecewise CUDA graphs every layer pays the engine's dispatch
            around attention, and its per-sequence work (attention metadata, the KV
            write, elementwise kernels) grows with the batch, while the per-step
            work overlaps the previous step.
        max_steps: L-BFGS steps at most.
        transfer: also refit without each deployment in turn and keep the interval
            multipliers its rows measured (split conformal,
            :class:`~diffmodel.Calibration`) for rows of deployments the fit never
            saw (``transfer_calibration``). Needs rows of two deployments or more;
            one refit each.

    Returns:
        A :class:`KernelHostFit` (``table()``, ``predict(frame, interval=0.9)``).

    Raises:
        ValueError: a bad frame, target, term list or curves for another GPU;
            ``transfer=True`` on one deployment.

    Warns:
        IdentifiabilityWarning: a direction of the costs the rows do not determine
        (e.g. ``step`` and ``layer`` on one model), or a cost driven to zero.
    """
    terms = tuple(terms) if not isinstance(terms, str) else (terms,)
    unknown = [t for t in terms if t not in HOST_TERMS]
    if not terms or unknown or len(set(terms)) != len(terms):
        raise ValueError(
            f"terms must be distinct names from {HOST_TERMS}, got {list(terms)}"
        )
    y = target_values(frame, target)
    dev, x, labels, has_prefill, group = _prepare(frame, curves)
    if transfer and len(labels) < 2:
        raise ValueError(
            "transfer=True refits without each deployment in turn: it needs rows of "
            f"two deployments or more, got {labels}"
        )
    cols = [HOST_TERMS.index(t) for t in terms]
    x = x[:, cols]
    idle = _idle(dev, x)
    if idle.any():
        raise ValueError(
            f"{int(idle.sum())} rows run no forward pass (no tokens) and the terms "
            f"{list(terms)} give them no cost: add 'step' or 'request' to terms, or "
            "drop those rows"
        )
    res, args = _fit_arrays(dev, x, y, max_steps)
    raw = np.asarray(res.params, dtype=np.float64)
    theta = np.exp(raw)
    loss = float(_loss_value(res.params, args))
    hessian = np.asarray(_loss_hessian(res.params, args), dtype=np.float64)
    # Gaussian log-ratio noise of variance `loss`: the negative log-likelihood is
    # n loss / (2 sigma^2), so its Hessian is n H / (2 loss).
    precision = len(y) * hessian / (2.0 * max(loss, 1e-12))
    precision = precision + np.eye(len(terms)) / PRIOR_LOG_SD**2
    cov = np.linalg.inv(precision)
    sd = {
        t: float(theta[i] * np.sqrt(max(cov[i, i], 0.0))) for i, t in enumerate(terms)
    }
    unpinned = _unpinned(hessian, terms)
    pred = dev + x @ theta
    noise = regime_noise_sd(np.log(pred) - np.log(y), has_prefill)
    noise = tuple(noise[r] for r in REGIMES)
    moved = None
    if transfer:
        row_sd = _row_sd(x, theta, pred, cov, noise, has_prefill)
        scores = _transfer_scores(dev, x, y, group, row_sd, max_steps)
        moved = calibration_from_scores(scores)
    fit = KernelHostFit(
        curves=curves,
        terms=terms,
        host=host_costs(terms, theta),
        sd_us=sd,
        cov_raw=cov,
        noise_sd=noise,
        loss=loss,
        n_rows=len(y),
        trained_on=tuple(labels),
        converged=res.result == "successful",
        unpinned=unpinned,
        transfer_calibration=moved,
    )
    for line in unpinned:
        warnings.warn(line, IdentifiabilityWarning, stacklevel=2)
    share = theta * x.mean(axis=0) / float(np.mean(pred))
    for i, t in enumerate(terms):
        if share[i] < AT_ZERO_SHARE:
            warnings.warn(
                f"host cost {t!r} fitted to {theta[i]:.2g} us ({100 * share[i]:.2g}% "
                "of the mean step), at its bound 0: the rows do not support it; "
                "fit without it",
                IdentifiabilityWarning,
                stacklevel=2,
            )
    return fit


def host_costs(terms: Sequence[str], theta: np.ndarray) -> HostCosts:
    """:class:`HostCosts` with ``theta`` (us) for ``terms``, 0 for the others."""
    return HostCosts(
        **{
            f"{t}_us": float(theta[terms.index(t)]) if t in terms else 0.0
            for t in HOST_TERMS
        }
    )


def _unpinned(hessian: np.ndarray, terms: tuple[str, ...]) -> tuple[str, ...]:
    """Directions of ``log theta`` with (relatively) zero curvature, in words."""
    values, vectors = np.linalg.eigh(hessian)
    top = max(float(values.max()), 1e-300)
    lines = []
    for value, vec in zip(values, vectors.T, strict=True):
        if value < UNPINNED_RATIO * top:
            parts = [
                f"{vec[i]:+.2f} log {t}"
                for i, t in enumerate(terms)
                if abs(vec[i]) > 0.1
            ]
            lines.append(
                "host costs: only some combination is determined; undetermined "
                f"direction {' '.join(parts)} (the rows cannot tell these terms apart)"
            )
    return tuple(lines)
