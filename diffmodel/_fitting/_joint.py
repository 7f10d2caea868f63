"""One objective over kernel tables and step traces: the device curves and the host
costs fitted together, each data source with its own noise scale.

:func:`fit_host_on_kernels` fits the host costs over device times held at curves
calibrated on kernel tables alone (two stages). :func:`fit_joint` fits both at once:
the curves of the families a step runs (``gemm_bf16``, ``prefill_attention``,
``decode_attention``, ``allreduce`` by default) on their kernel tables *and* on the
traces, the host costs on the traces. Every source ``s`` (a family's kernel rows;
the trace rows) has a Gaussian log-ratio noise of its own sd ``sigma_s``, profiled
out by maximum likelihood, so the objective is

    J = sum_s n_s / 2 * log(mean_s((ln pred - ln actual)^2))

(``n_s`` rows, up to a constant): a source is weighted by how well the model
explains it, and no weight is chosen by hand. The kernel rows pin the device side
(thousands of shapes per family), the traces pin what the kernels cannot see (the
host costs); where a family's tables are thin, the traces move its curve too.
The Laplace approximation at the optimum covers both: the host costs' posterior
sd then includes what the device side leaves undetermined.
"""

import dataclasses
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jax.flatten_util import ravel_pytree

from .._arrays import device_array
from .._metrics import log_ratio_loss
from .._model._hardware import hardware
from ..kernels._calibrate import family_rows, family_work
from ..kernels._curves import KERNEL_FAMILIES, KernelCurves
from ..kernels._step import HOST_TERMS, device_us, host_features
from ..kernels._work import allreduce_kernel_us
from ._intervals import REGIMES, regime_noise_sd
from ._kernel_host import (
    PRIOR_LOG_SD,
    KernelHostFit,
    _checked_data,
    _unpinned,
    fit_host_on_kernels,
    host_costs,
    target_values,
)
from ._laplace import IdentifiabilityWarning
from ._optimise import minimise

JOINT_FAMILIES: tuple[str, ...] = (
    "gemm_bf16",
    "prefill_attention",
    "decode_attention",
    "allreduce",
)
"""The kernel families a bf16 dense GQA step runs (the public traces' Llama
models): the default curves :func:`fit_joint` refits."""
RTOL = 1e-10
"""Converged when an L-BFGS step changes ``J / N`` by less than this relative
amount: ``|J| ~ 2-5`` per row, so a change below ``1e-10 N |J / N|`` nats over all
rows (~1e-5 at 20,000 rows), far below what moves an interval."""
TRACE = "trace"
"""The name of the trace rows' source in :attr:`JointFit.sources`."""


@dataclasses.dataclass(frozen=True)
class JointFit:
    """Curves and host costs fitted in one objective (:func:`fit_joint`).

    Attributes:
        host_fit: the result as a :class:`KernelHostFit` (its ``curves`` the jointly
            fitted ones, its ``cov_raw`` the host block of the joint posterior, so
            the device side's uncertainty is in the host costs' sd and the
            intervals): ``predict``, ``calibrate``, ``table`` and
            :func:`~diffmodel.save_host_fit` as for a two-stage fit.
        two_stage: the two-stage fit it started from: the curves fitted on the
            kernel rows alone (the same per-source objective without the trace),
            the host costs over them (:func:`fit_host_on_kernels`).
        sources: one row per data source (``family`` names and ``"trace"``):
            ``n_rows``, ``noise_sd`` (the fitted log-ratio sd, the source's
            maximum-likelihood scale), ``noise_sd_two_stage`` (the same residual of
            the two-stage fit), and for the families ``trace_shift`` (the mean
            log change of the family's kernels on the trace rows' steps, joint over
            two-stage: how far the traces moved that curve where the steps run).
        objective: the final value of ``J / N`` (see the module doc; lower is
            better; ``N`` all rows).
        converged: whether the optimiser met its convergence test.
    """

    host_fit: KernelHostFit
    two_stage: KernelHostFit
    sources: pd.DataFrame
    objective: float
    converged: bool

    def table(self) -> pd.DataFrame:
        """The host costs (us) with their joint posterior sd, and the two-stage
        values beside them."""
        out = self.host_fit.table()
        two = self.two_stage.table()
        return out.assign(two_stage_us=two["value_us"], two_stage_sd_us=two["sd_us"])


def _kernel_sources(tables, families, hw):
    """Each family's (work or all-reduce sizes, measured us) from ``tables``."""
    data = {}
    for fam in families:
        rows = family_rows(tables, fam)
        y = device_array(rows["latency_us"].to_numpy(float))
        if fam == "allreduce":
            sizes = (
                device_array(rows["bytes"].to_numpy(float)),
                device_array(rows["num_gpus"].to_numpy(float)),
            )
            data[fam] = (sizes, y)
        else:
            data[fam] = (family_work(fam, rows, hw), y)
    return data


def _family_times(curves: KernelCurves, fam: str, work, hw):
    if fam == "allreduce":
        return allreduce_kernel_us(work[0], work[1], curves.allreduce, hw)
    return work.time_us(getattr(curves, fam))


def _spec(curve):
    """Which leaves of one family's curve the joint fit moves: its arrays, not its
    shape grid's (one GPU's residual table, kept as it is)."""
    spec = jax.tree.map(eqx.is_inexact_array, curve)
    if getattr(curve, "shape_grid", None) is None:
        return spec
    return eqx.tree_at(
        lambda z: z.shape_grid,
        spec,
        replace_fn=lambda g: jax.tree.map(lambda _: False, g),
    )


def _free(curves: KernelCurves, families: Iterable[str]):
    """The arrays of ``families``' curves that the joint fit moves (a dict)."""
    out = {}
    for fam in families:
        c = getattr(curves, fam)
        out[fam] = eqx.partition(c, _spec(c))[0]
    return out


def _with(curves: KernelCurves, free) -> KernelCurves:
    """``curves`` with the arrays of ``free`` (from :func:`_free`) put back."""
    for fam, arrays in free.items():
        old = getattr(curves, fam)
        new = eqx.combine(arrays, eqx.partition(old, _spec(old))[1])
        curves = eqx.tree_at(lambda z, f=fam: getattr(z, f), curves, new)
    return curves


def _kernel_mse(curves: KernelCurves, kernels, hw):
    """Mean squared log ratio of each family's kernel rows."""
    return jnp.stack(
        [
            log_ratio_loss(_family_times(curves, f, w, hw), y)
            for f, (w, y) in kernels.items()
        ]
    )


def _source_mse(params, args):
    """Mean squared log ratio of every source: the families', then the trace's."""
    free, raw = params
    curves, kernels, stats, dep, x, log_y, hw = args
    c = _with(curves, free)
    pred = device_us(stats, dep, c, check=False) + x @ jnp.exp(raw)
    trace = jnp.mean((jnp.log(pred) - log_y) ** 2)
    return jnp.append(_kernel_mse(c, kernels, hw), trace)


def _profiled_nll(mse, n):
    """``J / N`` from each source's mean squared log ratio and rows."""
    return jnp.sum(n * jnp.log(mse)) / (2 * jnp.sum(n))


def _kernel_objective(free, args):
    """The kernel sources' part of ``J / N`` (stage one: no trace)."""
    curves, kernels, hw, n = args
    return _profiled_nll(_kernel_mse(_with(curves, free), kernels, hw), n)


def _objective(params, args):
    """``J / N``: the profiled Gaussian negative log-likelihood per row."""
    return _profiled_nll(_source_mse(params, args[:-1]), args[-1])


def _fixed_noise_nll(flat_params, unravel, args, mse_at_optimum):
    """The negative log-likelihood with every source's noise at its fitted value
    (the Laplace approximation's curvature in the parameters)."""
    n = args[-1]
    mse = _source_mse(unravel(flat_params), args[:-1])
    return jnp.sum(n * mse / (2.0 * mse_at_optimum))


def fit_joint(
    frame: pd.DataFrame,
    *,
    target: str,
    curves: KernelCurves,
    tables: Mapping[str, pd.DataFrame],
    families: Sequence[str] = JOINT_FAMILIES,
    terms: Sequence[str] = ("layer", "layer_request"),
    max_steps: int = 500,
    progress: Callable[[str], None] | None = None,
) -> JointFit:
    """Fit ``families``' curves and the host costs in one objective over the kernel
    rows of ``tables`` and the steps of ``frame`` (see the module doc).

    Args:
        frame: steps (the columns of :func:`diffmodel.predict`) with ``target``, all
            on ``curves``' GPU; any mix of deployments.
        target: the column to fit, us (the iteration time), every row finite, > 0.
        curves: the GPU's curves (:func:`diffmodel.kernels.calibrate_kernels`,
            best on the same ``tables``): the start of ``families``' curves, which
            are first refitted on the kernel rows alone, and the curves of every
            other family, kept.
        tables: that GPU's kernel tables (:func:`diffmodel.kernels.load_kernel_tables`
            or :func:`~diffmodel.kernels.load_system_tables`).
        families: the kernel families refitted, each a source of its own (names of
            :data:`~diffmodel.kernels.KERNEL_FAMILIES` or ``"allreduce"``, each with
            rows in ``tables``).
        terms: the host costs fitted (as :func:`fit_host_on_kernels`).
        max_steps: L-BFGS steps at most (the start is the two-stage fit).
        progress: optional callable receiving one line per stage (the kernel-only
            curves, the host costs over them, the joint fit, its posterior), with
            the seconds each took: the whole runs for minutes on a CPU.

    Returns:
        A :class:`JointFit`: ``host_fit`` predicts and saves like a two-stage fit;
        ``sources`` says each source's fitted noise and how far the traces moved
        each curve.

    Raises:
        ValueError: a bad frame, target, term list, curves of another GPU, an unknown
            family or one without rows in ``tables``.

    Warns:
        IdentifiabilityWarning: as :func:`fit_host_on_kernels`, for the joint
        posterior of the host costs.
    """
    known = (*KERNEL_FAMILIES, "allreduce")
    families = tuple(families) if not isinstance(families, str) else (families,)
    bad = [f for f in families if f not in known]
    if not families or bad or len(set(families)) != len(families):
        raise ValueError(
            f"families must be distinct names from {known}, got {families}"
        )
    if not isinstance(tables, Mapping):
        raise ValueError(
            "tables must be the GPU's kernel tables (a mapping of table name to "
            f"DataFrame, diffmodel.kernels.load_kernel_tables), got {type(tables)}"
        )
    y = target_values(frame, target)
    data, _ = _checked_data(frame, curves)
    hw = hardware(curves.hardware)
    kernels = _kernel_sources(tables, families, hw)
    say = _Progress(progress)
    # Stage one, the kernel rows alone (the same per-source objective): a start that
    # is the two-stage answer even where ``curves`` were not fitted on ``tables``.
    n_k = device_array(np.array([len(kernels[f][1]) for f in kernels], np.float64))
    k_args = (curves, kernels, hw, n_k)
    res = minimise(
        _kernel_objective, _free(curves, kernels), k_args, solver="lbfgs",
        max_steps=max_steps, rtol=RTOL,
    )  # fmt: skip
    curves = _with(curves, res.params)
    say(
        f"curves of {', '.join(kernels)} on {int(sum(n_k))} kernel rows alone: "
        f"{_ended(res)}"
    )
    with warnings.catch_warnings():
        # The two-stage start's warnings would repeat the joint fit's own.
        warnings.simplefilter("ignore", IdentifiabilityWarning)
        two = fit_host_on_kernels(
            frame, target=target, curves=curves, terms=terms, max_steps=500
        )
    terms = two.terms
    say(f"host costs {' + '.join(terms)} over them on {len(y)} steps")
    dep = data.deployments.take(data.group)
    cols = [HOST_TERMS.index(t) for t in terms]
    x = jnp.asarray(host_features(data.stats, dep))[:, cols]
    n = jnp.append(n_k, len(y))
    args = (curves, kernels, data.stats, dep, x, device_array(np.log(y)), hw, n)
    raw0 = device_array(np.log([float(two.host.as_dict()[t]) for t in terms]))
    start = (_free(curves, kernels), raw0)
    res = minimise(
        _objective, start, args, solver="lbfgs", max_steps=max_steps, rtol=RTOL
    )
    free, raw = res.params
    say(f"curves and host costs jointly: {_ended(res)}")
    joint_curves = _with(curves, free)
    mse0 = np.asarray(_source_mse(start, args[:-1]), np.float64)
    mse = _source_mse(res.params, args[:-1])

    flat, unravel = ravel_pytree(res.params)
    # Eager: compiling the Hessian through the step model takes a minute or more,
    # its eager evaluation seconds (measured on the public traces' folds).
    hess = jax.hessian(_fixed_noise_nll)(flat, unravel, args, mse)
    precision = np.array(hess, np.float64)  # a writable copy
    say(f"posterior (Laplace) over {flat.size} parameters")
    n_host = len(terms)
    precision[-n_host:, -n_host:] += np.eye(n_host) / PRIOR_LOG_SD**2
    cov = np.linalg.pinv(precision, hermitian=True)[-n_host:, -n_host:]
    cov = (cov + cov.T) / 2.0
    theta = np.exp(np.asarray(raw, np.float64))
    sd = {
        t: float(theta[i] * np.sqrt(max(cov[i, i], 0.0))) for i, t in enumerate(terms)
    }
    dev = np.asarray(device_us(data.stats, dep, joint_curves, check=False), np.float64)
    x_np = np.asarray(x, np.float64)
    pred = dev + x_np @ theta
    has_prefill = np.asarray(data.stats.prefill_tokens) > 0
    noise = regime_noise_sd(np.log(pred) - np.log(y), has_prefill)
    # The marginal precision of the host costs: what is left undetermined once the
    # device side is integrated out.
    unpinned = _unpinned(np.linalg.pinv(cov, hermitian=True), terms)
    host_fit = dataclasses.replace(
        two,
        curves=joint_curves,
        host=host_costs(terms, theta),
        sd_us=sd,
        cov_raw=cov,
        noise_sd=tuple(noise[r] for r in REGIMES),
        loss=float(mse[-1]),
        converged=res.result == "successful",
        unpinned=unpinned,
        calibration=None,
        transfer_calibration=None,
    )
    for line in unpinned:
        warnings.warn(line, IdentifiabilityWarning, stacklevel=2)
    names = [*kernels, TRACE]
    shift = _trace_shift(data.stats, dep, curves, joint_curves, kernels)
    sources = pd.DataFrame(
        {
            "n_rows": np.asarray(n, np.int64),
            "noise_sd": np.sqrt(np.asarray(mse, np.float64)),
            "noise_sd_two_stage": np.sqrt(mse0),
            "trace_shift": [shift.get(f, np.nan) for f in names],
        },
        index=pd.Index(names, name="source"),
    )
    return JointFit(
        host_fit=host_fit,
        two_stage=two,
        sources=sources,
        objective=float(_objective(res.params, args)),
        converged=res.result == "successful",
    )


class _Progress:
    """``progress`` lines prefixed ``joint:``, each with the seconds since the last."""

    def __init__(self, progress: Callable[[str], None] | None):
        self.progress = progress
        self.tick = time.perf_counter()

    def __call__(self, line: str) -> None:
        now = time.perf_counter()
        if self.progress is not None:
            self.progress(f"joint: {line} ({now - self.tick:.0f} s)")
        self.tick = now


def _ended(res) -> str:
    """How an L-BFGS run ended, in words."""
    how = "converged" if res.result == "successful" else "iteration budget reached"
    return f"{int(res.n_steps)} L-BFGS steps, {how}"


def _trace_shift(stats, dep, before: KernelCurves, after: KernelCurves, kernels):
    """Each family's mean log change of the steps' device time when only that
    family's curve moves from ``before`` to ``after`` (0: the traces left it)."""
    base = np.log(np.asarray(device_us(stats, dep, before, check=False), np.float64))
    out = {}
    for fam in kernels:
        one = eqx.tree_at(lambda z, f=fam: getattr(z, f), before, getattr(after, fam))
        moved = np.log(np.asarray(device_us(stats, dep, one, check=False), np.float64))
        ok = np.isfinite(base) & np.isfinite(moved)
        out[fam] = float(np.mean(moved[ok] - base[ok])) if ok.any() else 0.0
    return out
