"""Learnable host factor sets (global, per-group, hierarchical) and the model that
predicts both targets from host and device factors.

Each set keeps unconstrained parameters and maps them to :class:`HostFactors` where
they are used: times by a scaled softplus (>= 0 us; raw 0 is the prior), the gate's
location and width by a sigmoid in log space between their bounds (raw 0 is the
prior). The hierarchical set adds per-group offsets with a Gaussian shrinkage prior,
as :class:`~diffmodel.HierarchicalFactors` does for the device factors.
"""

import abc
from collections.abc import Mapping, Sequence
from typing import Any, final

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jaxtyping import Array, Float

from .._fitting._base import (
    StepData,
    json_array,
    json_float,
    json_labels,
    label_index,
)
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

    def per_factor(x):  # explicit broadcast over groups (no rank promotion)
        return jnp.broadcast_to(jnp.asarray(x, raw.dtype), raw.shape)

    prior = per_factor(_PRIOR)
    log_lo, log_hi = per_factor(np.log(_LO)), per_factor(np.log(_HI))
    s = jax.nn.sigmoid(raw + per_factor(_frac_logit()))
    bounded = jnp.exp(log_lo + (log_hi - log_lo) * s)
    times = prior * jax.nn.softplus(raw) / _LN2
    values = jnp.where(per_factor(_BOUNDED), bounded, times)
    return HostFactors(**{n: values[..., i] for i, n in enumerate(HOST_NAMES)})


def host_to_raw(host: HostFactors) -> Float[Array, "*g n"]:
    """Inverse of :func:`host_to_physical` (times > 0, bounded values strictly
    inside their bounds)."""
    v = jnp.stack([getattr(host, n) for n in HOST_NAMES], axis=-1)

    def per_factor(x):  # explicit broadcast over groups (no rank promotion)
        return jnp.broadcast_to(jnp.asarray(x, v.dtype), v.shape)

    is_b = jnp.broadcast_to(jnp.asarray(_BOUNDED), v.shape)
    inside = jnp.where(is_b, (v > per_factor(_LO)) & (v < per_factor(_HI)), v > 0)
    if not bool(jnp.all(inside)):
        ok = np.asarray(inside).reshape(-1, len(HOST_NAMES)).all(axis=0)
        bad = [n for n, good in zip(HOST_NAMES, ok, strict=True) if not good]
        raise ValueError(f"host factors {bad} out of range: see HOST_SPECS")
    log_lo, log_hi = per_factor(np.log(_LO)), per_factor(np.log(_HI))
    frac = (jnp.log(jnp.where(is_b, v, 1.5)) - log_lo) / (log_hi - log_lo)
    bounded = jnp.log(frac) - jnp.log1p(-frac) - per_factor(_frac_logit())
    y = v * _LN2 / per_factor(_PRIOR)
    times = y + jnp.log(-jnp.expm1(-y))
    return jnp.where(is_b, bounded, times)


def _check_gate(gate_on: str) -> str:
    if gate_on not in GATE_VARIABLES:
        raise ValueError(
            f"gate_on must be one of {list(GATE_VARIABLES)}, got {gate_on!r}"
        )
    return gate_on


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


class AbstractHostSet(eqx.Module):
    """Learnable host factors, kept unconstrained (see the module doc).

    A component of :class:`HostStepModel` (the factor set the fit sees), not a
    factor set of its own: it predicts the host timer, not a step time.
    """

    gate_on: eqx.AbstractVar[str]

    @abc.abstractmethod
    def kind(self) -> str:
        """``"global"``, ``"per-model"`` or ``"hierarchical"``."""

    @abc.abstractmethod
    def fitted_groups(self) -> tuple[str, ...]:
        """Group labels with parameters of their own (``()`` for a shared set)."""

    @abc.abstractmethod
    def physical(self) -> HostFactors:
        """Physical :class:`HostFactors` (leading axis = groups where per group)."""

    @abc.abstractmethod
    def reindex(self, labels: Sequence[str]) -> tuple["AbstractHostSet", np.ndarray]:
        """The same set for groups ``labels`` and per label whether it is known
        (unseen groups take the global values where there are any)."""

    @abc.abstractmethod
    def penalty(self, n_rows: Any) -> Array:
        """Prior term added to the mean log-ratio loss over ``n_rows`` rows."""

    @abc.abstractmethod
    def n_params(self) -> int:
        """Fitted numbers."""

    @abc.abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description."""

    def factors_for(self, labels: Sequence[str]) -> HostFactors:
        """Host factors for groups ``labels`` (leading axis = labels); a group the
        set cannot predict is a ``ValueError``."""
        new, known = self.reindex(labels)
        if not known.all():
            missing = [lab for lab, k in zip(labels, known, strict=True) if not k]
            raise ValueError(
                f"per-group host factors have no group {missing}; fitted groups: "
                f"{list(self.fitted_groups())}"
            )
        return jax.tree.map(
            lambda x: jnp.broadcast_to(x, (len(labels),)), new.physical()
        )

    def covers(self, labels: Sequence[str]) -> np.ndarray:
        """Whether the set can predict each group of ``labels``."""
        return self.reindex(labels)[1]

    def timed(self, data: StepData) -> Float[Array, " steps"]:
        """Host timer per step, us (``data.group`` indexes the set's groups)."""
        return _timed(data, self.physical(), self.gate_on)

    def table(self) -> pd.DataFrame:
        """Physical host factors, one row per group (and ``global`` where pooled),
        units in the column names."""
        rows = {}
        groups = self.fitted_groups()
        pooled = host_to_physical(self._global_raw())
        if not groups or self.kind() == "hierarchical":
            rows["global"] = pooled
        per = self.physical()
        for i, lab in enumerate(groups):
            rows[lab] = jax.tree.map(lambda v, i=i: v[i], per)
        return pd.DataFrame(
            {
                f"{n} [{HOST_SPECS[n][1]}]": [
                    float(getattr(f, n)) for f in rows.values()
                ]
                for n in HOST_NAMES
            },
            index=list(rows),
        ).assign(gate_on=self.gate_on)

    def _global_raw(self) -> Array:
        return jnp.zeros(len(HOST_NAMES))


@final
class HostGlobal(AbstractHostSet):
    """One set of host factors shared by every deployment (7 numbers)."""

    raw: Float[Array, " n"]
    gate_on: str = eqx.field(static=True, default="requests")

    def kind(self) -> str:
        return "global"

    def fitted_groups(self) -> tuple[str, ...]:
        return ()

    def physical(self) -> HostFactors:
        return host_to_physical(self.raw)

    def reindex(self, labels: Sequence[str]) -> tuple["HostGlobal", np.ndarray]:
        return self, np.ones(len(labels), bool)

    def penalty(self, n_rows: Any) -> Array:
        """No prior."""
        return jnp.asarray(0.0)

    def n_params(self) -> int:
        return int(self.raw.size)

    def to_dict(self) -> dict[str, Any]:
        return dict(kind="global", gate_on=self.gate_on, raw=_list(self.raw))

    def _global_raw(self) -> Array:
        return self.raw


@final
class HostPerGroup(AbstractHostSet):
    """One independent set of host factors per deployment group; an unseen group
    cannot be predicted."""

    raw: Float[Array, "groups n"]
    labels: tuple[str, ...] = eqx.field(static=True)
    gate_on: str = eqx.field(static=True, default="requests")

    def kind(self) -> str:
        return "per-model"

    def fitted_groups(self) -> tuple[str, ...]:
        return self.labels

    def physical(self) -> HostFactors:
        return host_to_physical(self.raw)

    def reindex(self, labels: Sequence[str]) -> tuple["HostPerGroup", np.ndarray]:
        idx = label_index(self.labels, labels)
        return (
            HostPerGroup(self.raw[np.maximum(idx, 0)], tuple(labels), self.gate_on),
            idx >= 0,
        )

    def penalty(self, n_rows: Any) -> Array:
        """No prior."""
        return jnp.asarray(0.0)

    def n_params(self) -> int:
        return int(self.raw.size)

    def to_dict(self) -> dict[str, Any]:
        return dict(
            kind="per-model",
            gate_on=self.gate_on,
            labels=list(self.labels),
            raw=_list(self.raw),
        )


@final
class HostHierarchical(AbstractHostSet):
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

    def kind(self) -> str:
        return "hierarchical"

    def fitted_groups(self) -> tuple[str, ...]:
        return self.labels

    def physical(self) -> HostFactors:
        return host_to_physical(self.global_raw[None, :] + self.offsets)

    def global_physical(self) -> HostFactors:
        """The pooled (global) :class:`HostFactors`."""
        return host_to_physical(self.global_raw)

    def reindex(self, labels: Sequence[str]) -> tuple["HostHierarchical", np.ndarray]:
        """Unseen groups get zero offsets (the global values); all count as known."""
        idx = label_index(self.labels, labels)
        off = jnp.where(
            jnp.asarray(idx >= 0)[:, None], self.offsets[np.maximum(idx, 0)], 0.0
        )
        new = HostHierarchical(
            self.global_raw,
            off,
            tuple(labels),
            self.prior_scale,
            self.noise_scale,
            self.gate_on,
        )
        return new, np.ones(len(labels), bool)

    def penalty(self, n_rows: Any) -> Array:
        """Shrinkage prior on the offsets, scaled to the mean log-ratio loss."""
        quad = jnp.sum(self.offsets**2) / self.prior_scale**2
        return self.noise_scale**2 / n_rows * quad

    def n_params(self) -> int:
        return int(self.global_raw.size + self.offsets.size)

    def to_dict(self) -> dict[str, Any]:
        return dict(
            kind="hierarchical",
            gate_on=self.gate_on,
            labels=list(self.labels),
            global_raw=_list(self.global_raw),
            offsets=_list(self.offsets),
            prior_scale=self.prior_scale,
            noise_scale=self.noise_scale,
        )

    def _global_raw(self) -> Array:
        return self.global_raw


def _list(x) -> list:
    return np.asarray(x, np.float64).tolist()


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


def host_set_from_dict(d: Mapping[str, Any]) -> AbstractHostSet:
    """Inverse of ``AbstractHostSet.to_dict``; a bad field is a ``ValueError``."""
    kind = d.get("kind")
    gate_on = _check_gate(d.get("gate_on"))
    n = len(HOST_NAMES)
    if kind == "global":
        return HostGlobal(json_array(d, "raw", (n,)), gate_on)
    labels = json_labels(d)
    if kind == "per-model":
        return HostPerGroup(json_array(d, "raw", (len(labels), n)), labels, gate_on)
    if kind == "hierarchical":
        return HostHierarchical(
            json_array(d, "global_raw", (n,)),
            json_array(d, "offsets", (len(labels), n)),
            labels,
            json_float(d, "prior_scale", positive=True),
            json_float(d, "noise_scale", positive=True),
            gate_on,
        )
    raise ValueError(f"field 'kind': expected one of {list(HOST_KINDS)}, got {kind!r}")
