"""Host and device apart: efficiencies per GPU, host costs per serving stack.

A step's time mixes device work (the per-operator rooflines, whose efficiencies belong
to the GPU) and host work (per-step scheduling, per-layer launches, per-request
bookkeeping, all-reduce launch latency), which belongs to the serving stack on its
CPU. :class:`HostDeviceFactors` keeps them as separate parameter tables,

    device[gpu]   = (gemm_flops, mem_bw, attn_flops, attn_bw, comm_bw)   (fractions)
    host[stack]   = (comm_latency_us, step_overhead_us, layer_overhead_us,
                     request_overhead_us)                                (us)

and a group (a deployment on a stack) uses its GPU's row and its stack's row. So a new
deployment on a known GPU and a known stack is predicted with no new parameter, a new
GPU keeps the stack's host costs, and a new stack keeps the GPU's efficiencies.

Optionally the device efficiencies carry a Gaussian prior (raw units, one sd per
efficiency) around ``prior``, e.g. kernel-calibrated factors with the calibration's
own scatter: kernel data then pins the device side and the traces the host side.

Whether the data separate the two is a property of the data: one GPU with one stack
and one deployment generally does not (a constant per-step weight read and a per-step
overhead are the same column). :func:`fit_host_device` computes the Laplace summary per
GPU and per stack and warns (:class:`~diffmodel.IdentifiabilityWarning`) on each
direction it leaves open.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, final

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jaxtyping import Array, Float

from .._frame import groups_from_frame, parse_group_label, stats_from_frame
from .._metrics import log_ratio_loss
from .._model._deployment import stack_deployments
from .._model._factors import FACTOR_NAMES, FACTOR_SPECS, Factors
from ._base import (
    AbstractFactorSet,
    StepData,
    json_array,
    json_float,
    json_labels,
)
from ._factorsets import _prior_tuple, _read_prior, _roofline_dict, to_physical
from ._intervals import regime_noise_sd
from ._laplace import Laplace, flat, laplace, warn_identifiability

DEVICE_FACTORS: tuple[str, ...] = FACTOR_NAMES[:5]
"""Factors that belong to the GPU (efficiencies, fractions of a peak)."""
HOST_FACTORS: tuple[str, ...] = FACTOR_NAMES[5:]
"""Factors that belong to the serving stack on its host (microseconds)."""
DEFAULT_STACK = "default"
"""The stack of every row of a frame without a ``stack`` column."""
_ND, _NH = len(DEVICE_FACTORS), len(HOST_FACTORS)
assert all(FACTOR_SPECS[n][2] == "efficiency" for n in DEVICE_FACTORS)
assert all(FACTOR_SPECS[n][2] == "overhead" for n in HOST_FACTORS)


def split_label(label: str) -> tuple[str, str]:
    """``(gpu, stack)`` of a group label ``model/gpu/tpN@stack``; a label without
    ``@stack`` (a plain deployment label) is on :data:`DEFAULT_STACK`."""
    dep, sep, stack = label.rpartition("@")
    if not sep:
        dep, stack = label, DEFAULT_STACK
    try:
        gpu = parse_group_label(dep)[1]
    except ValueError:
        gpu = None
    if gpu is None or not stack:
        raise ValueError(
            f"host-device group label {label!r}: expected 'model/gpu/tpN[/epM]@stack'"
        )
    return gpu, stack


@final
class HostDeviceFactors(AbstractFactorSet):
    """Device efficiencies per GPU and host costs per stack (see the module doc).

    The objective adds, with ``device_prior_sd``, ``noise_scale^2 / N *
    sum((device_raw / device_prior_sd)^2)``: a Gaussian prior of sd
    ``device_prior_sd`` (raw units: log-odds, ~ relative change for small
    efficiencies) on each efficiency around ``prior``.
    """

    device_raw: Float[Array, "gpus 5"]
    host_raw: Float[Array, "stacks 4"]
    prior: tuple[float, ...] = eqx.field(static=True)
    gpus: tuple[str, ...] = eqx.field(static=True)
    stacks: tuple[str, ...] = eqx.field(static=True)
    labels: tuple[str, ...] = eqx.field(static=True)
    device_prior_sd: tuple[float, ...] | None = eqx.field(static=True, default=None)
    noise_scale: float = eqx.field(static=True, default=0.1)

    def kind(self) -> str:
        """``"host-device"`` (fitted by :func:`fit_host_device`, not ``fit``)."""
        return "host-device"

    def fitted_groups(self) -> tuple[str, ...]:
        return self.labels

    def unseen(self, labels: Sequence[str]) -> tuple[str, ...]:
        """None: a new deployment of a fitted GPU and stack takes their rows (and
        :meth:`factors_for` refuses an unknown GPU or stack)."""
        return ()

    def _index(self, labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        pairs = [split_label(lab) for lab in labels]
        gi = np.array([self.gpus.index(g) if g in self.gpus else -1 for g, _ in pairs])
        si = np.array(
            [self.stacks.index(s) if s in self.stacks else -1 for _, s in pairs]
        )
        return gi.astype(np.int32), si.astype(np.int32)

    def _raw_for(self, labels: Sequence[str]) -> Array:
        gi, si = self._index(labels)
        dev = self.device_raw[np.maximum(gi, 0)]
        host = self.host_raw[np.maximum(si, 0)]
        return jnp.concatenate([dev, host], axis=-1)

    def physical(self) -> Factors:
        """Physical :class:`Factors` per group (leading axis = ``labels``)."""
        return to_physical(self._raw_for(self.labels), self.prior)

    def factors_for(self, labels: Sequence[str]) -> Factors:
        """Factors of groups ``labels``; an unknown GPU or stack is an error."""
        gi, si = self._index(labels)
        for lab, g, s in zip(labels, gi, si, strict=True):
            if g < 0 or s < 0:
                gpu, stack = split_label(lab)
                what = f"GPU {gpu!r}" if g < 0 else f"stack {stack!r}"
                raise ValueError(
                    f"host-device factors have no {what} (group {lab!r}); fitted "
                    f"GPUs {list(self.gpus)}, stacks {list(self.stacks)}"
                )
        return to_physical(self._raw_for(labels), self.prior)

    def predict(self, data: StepData) -> Float[Array, " steps"]:
        """Predicted step times, us (``data.group`` indexes ``labels``)."""
        return data.breakdown(self.physical()).total

    def penalty(self, n_rows) -> Array:
        """The device prior (see the class doc); zero without one."""
        if self.device_prior_sd is None:
            return jnp.asarray(0.0)
        sd = jnp.broadcast_to(
            jnp.asarray(self.device_prior_sd, self.device_raw.dtype),
            self.device_raw.shape,
        )
        return self.noise_scale**2 / n_rows * jnp.sum((self.device_raw / sd) ** 2)

    def n_params(self) -> int:
        return int(self.device_raw.size + self.host_raw.size)

    def reindex(self, labels: Sequence[str]) -> tuple["HostDeviceFactors", np.ndarray]:
        gi, si = self._index(labels)
        known = (gi >= 0) & (si >= 0)
        return dataclasses.replace(self, labels=tuple(labels)), known

    def named(self) -> tuple[tuple[str, ...], Array]:
        """``(names, values)``: ``<gpu>.<efficiency>`` then ``<stack>.<cost>``."""
        zeros_h = jnp.zeros((len(self.gpus), _NH), self.device_raw.dtype)
        zeros_d = jnp.zeros((len(self.stacks), _ND), self.host_raw.dtype)
        dev = to_physical(jnp.concatenate([self.device_raw, zeros_h], -1), self.prior)
        host = to_physical(jnp.concatenate([zeros_d, self.host_raw], -1), self.prior)
        names = tuple(f"{g}.{n}" for g in self.gpus for n in DEVICE_FACTORS)
        names += tuple(f"{s}.{n}" for s in self.stacks for n in HOST_FACTORS)
        d = jnp.stack([getattr(dev, n) for n in DEVICE_FACTORS], -1).reshape(-1)
        h = jnp.stack([getattr(host, n) for n in HOST_FACTORS], -1).reshape(-1)
        return names, jnp.concatenate([d, h])

    def raw_names(self) -> tuple[str, ...]:
        """A name per raw parameter, in :func:`~._laplace.flat` order."""
        return self.named()[0]

    def to_dict(self) -> dict[str, Any]:
        names, values = self.named()
        return dict(
            kind=self.kind(),
            **_roofline_dict(self.prior),
            labels=list(self.labels),
            gpus=list(self.gpus),
            stacks=list(self.stacks),
            device_raw=np.asarray(self.device_raw, np.float64).tolist(),
            host_raw=np.asarray(self.host_raw, np.float64).tolist(),
            device_prior_sd=None
            if self.device_prior_sd is None
            else list(self.device_prior_sd),
            noise_scale=self.noise_scale,
            factors={n: float(v) for n, v in zip(names, values, strict=True)},
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "HostDeviceFactors":
        labels = json_labels(d)
        gpus = json_labels({"labels": d.get("gpus")})
        stacks = json_labels({"labels": d.get("stacks")})
        sd = d.get("device_prior_sd")
        return cls(
            device_raw=json_array(d, "device_raw", (len(gpus), _ND)),
            host_raw=json_array(d, "host_raw", (len(stacks), _NH)),
            prior=_read_prior(d),
            gpus=gpus,
            stacks=stacks,
            labels=labels,
            device_prior_sd=None
            if sd is None
            else tuple(float(x) for x in json_array(d, "device_prior_sd", (_ND,))),
            noise_scale=json_float(d, "noise_scale", default=0.1, positive=True),
        )

    def table(self) -> pd.DataFrame:
        """One row per GPU (its efficiencies) and per stack (its host costs); the
        other columns of a row are NaN."""
        names, values = self.named()
        cols = {f"{n} [{FACTOR_SPECS[n][1]}]": n for n in FACTOR_NAMES}
        rows = list(self.gpus) + [s for s in self.stacks if s not in self.gpus]
        out = pd.DataFrame(np.nan, index=rows, columns=list(cols))
        for name, v in zip(names, np.asarray(values), strict=True):
            row, factor = name.rsplit(".", 1)
            out.loc[row, f"{factor} [{FACTOR_SPECS[factor][1]}]"] = float(v)
        return out


def init_host_device(
    labels: Sequence[str],
    *,
    prior: Factors | None = None,
    device_prior_sd: float | Sequence[float] | None = None,
    noise_scale: float = 0.1,
) -> HostDeviceFactors:
    """A :class:`HostDeviceFactors` at ``prior`` for groups ``labels``
    (``model/gpu/tpN@stack``); GPUs and stacks in order of first appearance."""
    pairs = [split_label(lab) for lab in labels]
    gpus = tuple(dict.fromkeys(g for g, _ in pairs))
    stacks = tuple(dict.fromkeys(s for _, s in pairs))
    sd = None
    if device_prior_sd is not None:
        sd = tuple(float(x) for x in np.broadcast_to(device_prior_sd, (_ND,)))
        if not all(np.isfinite(x) and x > 0 for x in sd):
            raise ValueError(f"device_prior_sd must be > 0, got {device_prior_sd!r}")
    if not noise_scale > 0:
        raise ValueError(f"noise_scale must be > 0, got {noise_scale!r}")
    dtype = jnp.result_type(float)
    return HostDeviceFactors(
        device_raw=jnp.zeros((len(gpus), _ND), dtype),
        host_raw=jnp.zeros((len(stacks), _NH), dtype),
        prior=_prior_tuple(prior),
        gpus=gpus,
        stacks=stacks,
        labels=tuple(labels),
        device_prior_sd=sd,
        noise_scale=float(noise_scale),
    )


def host_device_data(
    frame: pd.DataFrame, *, stack: str = "stack", **deployment
) -> tuple[StepData, tuple[str, ...]]:
    """:class:`StepData` whose groups are (deployment, stack) pairs, labelled
    ``model/gpu/tpN@stack``; rows without a ``stack`` column are on
    :data:`DEFAULT_STACK`. ``deployment``: ``model``/``hardware``/``tp`` keywords
    as in :func:`diffmodel.predict`."""
    if stack in frame.columns:
        stacks = frame[stack]
        if stacks.isna().any():
            raise ValueError(f"column {stack!r} has missing values")
        stacks = stacks.astype(str).to_numpy()
    else:
        stacks = np.full(len(frame), DEFAULT_STACK, dtype=object)
    bad = [s for s in set(stacks) if not s or "@" in s or "/" in s]
    if bad:
        raise ValueError(f"column {stack!r}: expected names without '@' or '/', {bad}")
    groups = groups_from_frame(frame, **deployment)
    keys = np.array(
        [f"{groups.labels[i]}@{s}" for i, s in zip(groups.index, stacks, strict=True)]
    )
    index, labels = pd.factorize(keys, sort=True)
    dep_of = [groups.labels.index(lab.rpartition("@")[0]) for lab in labels]
    deps = [
        _take(groups.deployments, i) for i in dep_of
    ]  # one deployment per (dep, stack)
    data = StepData(
        stats=stats_from_frame(frame),
        deployments=stack_deployments(deps),
        group=jnp.asarray(index.astype(np.int32)),
    )
    return data, tuple(str(lab) for lab in labels)


def _take(tree, i: int):
    import jax

    return jax.tree.map(lambda x: x[i], tree)


def host_device_laplace(fs: HostDeviceFactors, data: StepData, target) -> Laplace:
    """The Laplace summary of a fitted :class:`HostDeviceFactors`, named per GPU and
    per stack (``h100-sxm.mem_bw``, ``vllm.step_overhead_us``)."""
    y = jnp.asarray(target)
    n = int(y.shape[0])
    vec, unflat = flat(fs)

    def objective(v):
        s = unflat(v)
        return log_ratio_loss(s.predict(data), y) + s.penalty(n)

    def physical(v):
        return unflat(v).named()

    def bounds(v):
        names, values = unflat(v).named()
        eff = np.array([nm.rsplit(".", 1)[1] in DEVICE_FACTORS for nm in names])
        prior = np.array([FACTOR_SPECS[nm.rsplit(".", 1)[1]][0] for nm in names])
        v = np.asarray(values)
        return np.where(eff, (v > 0.99) | (v < 0.01), v < 1e-3 * prior)

    pred = fs.predict(data)
    resid = np.asarray(jnp.log(pred) - jnp.log(y))
    noise = float(np.sqrt(np.mean(resid**2)))
    lap = laplace(
        objective,
        vec,
        n,
        raw_names=fs.raw_names(),
        physical=physical,
        bounds=bounds,
        noise_sd=max(noise, 1e-12),
    )
    by = regime_noise_sd(resid, np.asarray(data.stats.prefill_tokens) > 0)
    return dataclasses.replace(lap, regime_noise_sd=(by["prefill"], by["decode_only"]))


def fit_host_device(
    frame: pd.DataFrame,
    *,
    target: str,
    stack: str = "stack",
    prior: Factors | None = None,
    device_prior_sd: float | Sequence[float] | None = None,
    noise_scale: float = 0.1,
    start: HostDeviceFactors | None = None,
    max_steps: int = 500,
    solver: str = "lbfgs",
    uncertainty: bool = True,
    **deployment,
):
    """Fit :class:`HostDeviceFactors` to ``frame[target]`` (us) on the log-ratio
    loss; a :class:`~diffmodel.FitResult` whose ``laplace`` is named per GPU and
    stack. One :class:`~diffmodel.IdentifiabilityWarning` per undetermined direction
    and per factor at a bound. ``start``: parameters to start from (same groups)."""
    from ._fit import fit_arrays

    if target not in frame.columns:
        raise ValueError(f"missing target column {target!r}")
    data, labels = host_device_data(frame, stack=stack, **deployment)
    fs = init_host_device(
        labels, prior=prior, device_prior_sd=device_prior_sd, noise_scale=noise_scale
    )
    if start is not None:
        if (start.gpus, start.stacks, start.labels) != (fs.gpus, fs.stacks, labels):
            raise ValueError("start: expected a host-device set of the same groups")
        fs = eqx.tree_at(
            lambda s: (s.device_raw, s.host_raw),
            fs,
            (start.device_raw, start.host_raw),
        )
    y = frame[target].to_numpy(dtype=float, na_value=np.nan)
    result = fit_arrays(
        fs,
        data,
        y,
        max_steps=max_steps,
        solver=solver,
        target_name=target,
        uncertainty=False,
    )
    if not uncertainty:
        return result
    lap = host_device_laplace(result.factor_set, data, jnp.asarray(y))
    warn_identifiability(lap)
    return eqx.tree_at(lambda r: r.laplace, result, lap, is_leaf=lambda x: x is None)
