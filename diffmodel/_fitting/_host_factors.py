"""Learnable host factor sets (global, per-group, hierarchical) and the model that
predicts both targets from host and device factors.

Each set keeps unconstrained parameters and maps them to :class:`HostFactors` where
they are used: times by a scaled softplus (>= 0 us; raw 0 is the prior), the gate's
location and width by a sigmoid in log space between their bounds (raw 0 is the
prior). The hierarchical set adds per-group offsets with a Gaussian shrinkage prior,
as :class:`~diffmodel.HierarchicalFactors` does for the device factors.
"""

from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .._fitting._factorsets import StepData
from .._model._factors import Factors
from .._model._host import (
    GATE_VARIABLES,
    HOST_NAMES,
    HOST_SPECS,
    HostFactors,
    host_time,
    iteration_us,
)

HOST_TARGETS: tuple[str, ...] = ("step_duration", "iteration_time")
"""What a :class:`HostStepModel` predicts: the host timer or the iteration time."""

_LN2 = float(np.log(2.0))
_BOUNDED = np.array([HOST_SPECS[n][3] is not None for n in HOST_NAMES])
_PRIOR = np.array([HOST_SPECS[n][0] for n in HOST_NAMES])
_LO = np.array([HOST_SPECS[n][2] if HOST_SPECS[n][3] else 1.0 for n in HOST_NAMES])
_HI = np.array([HOST_SPECS[n][3] or 2.0 for n in HOST_NAMES])


def _frac_logit() -> np.ndarray:
    """Logit of the prior's position between the log bounds (0 where unbounded)."""
    frac = (np.log(_PRIOR) - np.log(_LO)) / (np.log(_HI) - np.log(_LO))
    frac = np.where(_BOUNDED, frac, 0.5)
    return np.log(frac) - np.log1p(-frac)


def host_to_physical(raw: Float[Array, "*g n"]) -> HostFactors:
    """Map raw parameters (last axis in ``HOST_NAMES`` order) to :class:`HostFactors`.

    Time ``i``: ``prior_i softplus(raw_i) / log 2``; bounded ``i``:
    ``exp(log lo + (log hi - log lo) sigmoid(raw_i + c_i))`` with ``c_i`` putting
    ``raw = 0`` at the prior.
    """
    raw = jnp.asarray(raw)
    prior = jnp.asarray(_PRIOR, raw.dtype)
    log_lo, log_hi = jnp.log(jnp.asarray(_LO)), jnp.log(jnp.asarray(_HI))
    s = jax.nn.sigmoid(raw + jnp.asarray(_frac_logit(), raw.dtype))
    bounded = jnp.exp(log_lo + (log_hi - log_lo) * s)
    times = prior * jax.nn.softplus(raw) / _LN2
    values = jnp.where(jnp.asarray(_BOUNDED), bounded, times)
    return HostFactors(**{n: values[..., i] for i, n in enumerate(HOST_NAMES)})


def host_to_raw(host: HostFactors) -> Float[Array, "*g n"]:
    """Inverse of :func:`host_to_physical` (times > 0, bounded values strictly
    inside their bounds)."""
    v = jnp.stack([getattr(host, n) for n in HOST_NAMES], axis=-1)
    inside = jnp.where(
        jnp.asarray(_BOUNDED), (v > jnp.asarray(_LO)) & (v < jnp.asarray(_HI)), v > 0
    )
    if not bool(jnp.all(inside)):
        ok = np.asarray(inside).reshape(-1, len(HOST_NAMES)).all(axis=0)
        bad = [n for n, good in zip(HOST_NAMES, ok, strict=True) if not good]
        raise ValueError(f"host factors {bad} out of range: see HOST_SPECS")
    log_lo, log_hi = jnp.log(jnp.asarray(_LO)), jnp.log(jnp.asarray(_HI))
    frac = (jnp.log(jnp.where(jnp.asarray(_BOUNDED), v, 1.5)) - log_lo) / (
        log_hi - log_lo
    )
    bounded = jnp.log(frac) - jnp.log1p(-frac) - jnp.asarray(_frac_logit())
    y = v * _LN2 / jnp.asarray(_PRIOR)
    times = y + jnp.log(-jnp.expm1(-y))
    return jnp.where(jnp.asarray(_BOUNDED), bounded, times)


def _check_gate(gate_on: str) -> str:
    if gate_on not in GATE_VARIABLES:
        raise ValueError(
            f"gate_on must be one of {list(GATE_VARIABLES)}, got {gate_on!r}"
        )
    return gate_on


def _label_index(own: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    pos = {lab: i for i, lab in enumerate(own)}
    return np.array([pos.get(lab, -1) for lab in labels], dtype=np.int32)


def host_target(
    data: StepData,
    target: str,
    host: HostFactors,
    *,
    gate_on: str = "requests",
    device: Factors | None = None,
) -> Float[Array, " steps"]:
    """One of :data:`HOST_TARGETS` for every step of ``data``, us, from physical
    factors (per-group factors, leading axis = groups, are indexed by
    ``data.group``): the host timer, or :func:`~diffmodel._model._host.iteration_us`
    of the roofline with ``device`` factors and the host timer."""
    if target not in HOST_TARGETS:
        raise ValueError(f"target must be one of {list(HOST_TARGETS)}, got {target!r}")
    timed = _timed(data, host, gate_on)
    if target == "step_duration":
        return timed
    if device is None:
        raise ValueError("target 'iteration_time' needs device factors")
    return iteration_us(data.breakdown(device), timed)


def _timed(data: StepData, host: HostFactors, gate_on: str) -> Array:
    """Host timer of every step of ``data``; per-group factors indexed by group."""
    dep = data.deployments.take(data.group)
    per_step = jax.tree.map(lambda x: x if jnp.ndim(x) == 0 else x[data.group], host)
    return host_time(data.stats, dep.arch, dep.tp, per_step, gate_on=gate_on).timed


class HostGlobal(eqx.Module):
    """One set of host factors shared by every deployment (7 numbers)."""

    raw: Float[Array, " n"]
    gate_on: str = eqx.field(static=True, default="requests")

    def physical(self) -> HostFactors:
        """The physical :class:`HostFactors`."""
        return host_to_physical(self.raw)

    def factors_for(self, labels: Sequence[str]) -> HostFactors:
        """Host factors for groups ``labels``: the same for all, leading axis."""
        return host_to_physical(
            jnp.broadcast_to(self.raw, (len(labels), len(HOST_NAMES)))
        )

    def timed(self, data: StepData) -> Float[Array, " steps"]:
        """Host timer per step, us."""
        return _timed(data, self.physical(), self.gate_on)

    def penalty(self, n_rows: int) -> Array:
        """No prior."""
        return jnp.asarray(0.0)

    def covers(self, labels: Sequence[str]) -> np.ndarray:
        """Whether the set can predict each group of ``labels`` (all: unseen groups
        get the global values)."""
        return np.ones(len(labels), bool)

    def n_params(self) -> int:
        """Fitted numbers."""
        return int(self.raw.size)


class HostPerGroup(eqx.Module):
    """One independent set of host factors per deployment group."""

    raw: Float[Array, "groups n"]
    labels: tuple[str, ...] = eqx.field(static=True)
    gate_on: str = eqx.field(static=True, default="requests")

    def physical(self) -> HostFactors:
        """Physical :class:`HostFactors`, leading axis = groups."""
        return host_to_physical(self.raw)

    def factors_for(self, labels: Sequence[str]) -> HostFactors:
        """Host factors for groups ``labels``; a group never fitted is an error."""
        idx = _label_index(self.labels, labels)
        if (idx < 0).any():
            missing = [lab for lab, i in zip(labels, idx, strict=True) if i < 0]
            raise ValueError(
                f"per-group host factors have no group {missing}; fitted groups: "
                f"{list(self.labels)}"
            )
        return host_to_physical(self.raw[idx])

    def timed(self, data: StepData) -> Float[Array, " steps"]:
        """Host timer per step, us (``data.group`` indexes ``labels``)."""
        return _timed(data, self.physical(), self.gate_on)

    def penalty(self, n_rows: int) -> Array:
        """No prior."""
        return jnp.asarray(0.0)

    def covers(self, labels: Sequence[str]) -> np.ndarray:
        """Whether the set can predict each group of ``labels`` (fitted groups)."""
        return _label_index(self.labels, labels) >= 0

    def n_params(self) -> int:
        """Fitted numbers."""
        return int(self.raw.size)


class HostHierarchical(eqx.Module):
    """Global host factors plus per-group raw offsets, shrunk towards zero.

    Group ``g`` uses ``raw = global_raw + offsets[g]``; the objective adds
    ``noise_scale^2 / N * sum((offsets / prior_scale)^2)`` (a Gaussian prior on the
    offsets, sd ``prior_scale`` in raw units, against a log-residual of sd
    ``noise_scale``). An unseen group predicts with the global values.
    """

    global_raw: Float[Array, " n"]
    offsets: Float[Array, "groups n"]
    labels: tuple[str, ...] = eqx.field(static=True)
    prior_scale: float = eqx.field(static=True, default=1.0)
    noise_scale: float = eqx.field(static=True, default=0.5)
    gate_on: str = eqx.field(static=True, default="requests")

    def physical(self) -> HostFactors:
        """Physical :class:`HostFactors`, leading axis = groups."""
        return host_to_physical(self.global_raw + self.offsets)

    def global_physical(self) -> HostFactors:
        """The pooled (global) :class:`HostFactors`."""
        return host_to_physical(self.global_raw)

    def factors_for(self, labels: Sequence[str]) -> HostFactors:
        """Host factors for groups ``labels``; unseen groups get the global values."""
        idx = _label_index(self.labels, labels)
        off = jnp.where(
            jnp.asarray(idx >= 0)[:, None], self.offsets[np.maximum(idx, 0)], 0.0
        )
        return host_to_physical(self.global_raw + off)

    def timed(self, data: StepData) -> Float[Array, " steps"]:
        """Host timer per step, us (``data.group`` indexes ``labels``)."""
        return _timed(data, self.physical(), self.gate_on)

    def penalty(self, n_rows: int) -> Array:
        """Shrinkage prior on the offsets, scaled to the mean log-ratio loss."""
        quad = jnp.sum(self.offsets**2) / self.prior_scale**2
        return self.noise_scale**2 / n_rows * quad

    def covers(self, labels: Sequence[str]) -> np.ndarray:
        """Whether the set can predict each group of ``labels`` (all: unseen groups
        get the global values)."""
        return np.ones(len(labels), bool)

    def n_params(self) -> int:
        """Fitted numbers."""
        return int(self.global_raw.size + self.offsets.size)


HOST_KINDS: tuple[str, ...] = ("global", "per-model", "hierarchical")


def init_host_set(
    kind: str,
    labels: Sequence[str],
    *,
    gate_on: str = "requests",
    start: HostFactors | None = None,
    prior_scale: float = 1.0,
    noise_scale: float = 0.5,
):
    """A host factor set at its start: ``kind`` in :data:`HOST_KINDS`.

    Args:
        labels: deployment group labels, in the order of the data's group index.
        gate_on: the gate variable (:data:`~diffmodel._model._host.GATE_VARIABLES`).
        start: physical host factors to start from (default the priors of
            ``HOST_SPECS``); a scalar set, used for every group.
        prior_scale, noise_scale: hierarchical shrinkage (see
            :class:`HostHierarchical`).
    """
    _check_gate(gate_on)
    for name, v in (("prior_scale", prior_scale), ("noise_scale", noise_scale)):
        if not v > 0:
            raise ValueError(f"{name} must be > 0, got {v!r}")
    dtype = jnp.result_type(float)
    raw0 = (
        jnp.zeros(len(HOST_NAMES), dtype)
        if start is None
        else jnp.asarray(host_to_raw(start), dtype)
    )
    if raw0.shape != (len(HOST_NAMES),):
        raise ValueError("start must hold one scalar value per host factor")
    g = len(labels)
    if kind == "global":
        return HostGlobal(raw=raw0, gate_on=gate_on)
    if kind == "per-model":
        return HostPerGroup(
            raw=jnp.tile(raw0, (g, 1)), labels=tuple(labels), gate_on=gate_on
        )
    if kind == "hierarchical":
        return HostHierarchical(
            global_raw=raw0,
            offsets=jnp.zeros((g, len(HOST_NAMES)), dtype),
            labels=tuple(labels),
            prior_scale=float(prior_scale),
            noise_scale=float(noise_scale),
            gate_on=gate_on,
        )
    raise ValueError(f"kind must be one of {list(HOST_KINDS)}, got {kind!r}")


class HostStepModel(eqx.Module):
    """Host and device factor sets, predicting either target (us per step).

    - ``target="step_duration"``: the host timer, ``host.timed(data)``; the device
      set takes no part (and may be None).
    - ``target="iteration_time"``: :func:`~diffmodel._model._host.iteration_us` of the
      device set's roofline breakdown and the host timer. With ``freeze_host`` the
      host factors are held (no gradient): they are pinned by the host timer, the
      device factors by the iteration time.
    """

    host: eqx.Module
    device: eqx.Module | None
    target: str = eqx.field(static=True)
    freeze_host: bool = eqx.field(static=True, default=True)

    def __check_init__(self):
        if self.target not in HOST_TARGETS:
            raise ValueError(
                f"target must be one of {list(HOST_TARGETS)}, got {self.target!r}"
            )
        if self.target == "iteration_time" and self.device is None:
            raise ValueError("target 'iteration_time' needs a device factor set")

    def predict(self, data: StepData) -> Float[Array, " steps"]:
        """Predicted target per step, us."""
        host = self.host
        if self.freeze_host and self.target == "iteration_time":
            host = jax.lax.stop_gradient(host)
        device = None if self.device is None else self.device.physical()
        return host_target(
            data, self.target, host.physical(), gate_on=host.gate_on, device=device
        )

    def penalty(self, n_rows: int) -> Array:
        """The sets' prior terms (the host's only while it is fitted)."""
        total = jnp.asarray(0.0)
        if not (self.freeze_host and self.target == "iteration_time"):
            total = total + self.host.penalty(n_rows)
        if self.device is not None and self.target == "iteration_time":
            total = total + self.device.penalty(n_rows)
        return total
