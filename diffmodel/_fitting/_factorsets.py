"""Learnable factor sets: global, per-group and hierarchical (partial pooling).

Each set keeps *unconstrained* parameters and maps them to physical :class:`Factors`
where they are used: efficiencies by a sigmoid (in (0, 1): never above a peak),
overheads by a scaled softplus (>= 0, in microseconds). A raw value of 0 maps to the
physical prior of :data:`~diffmodel.FACTOR_SPECS`.
"""

from collections.abc import Mapping, Sequence
from typing import Any, final

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jaxtyping import Array, Float

from .._arrays import device_array
from .._fitting._base import (
    AbstractFactorSet,
    StepData,
    json_array,
    json_bool,
    json_float,
    json_labels,
    label_index,
)
from .._fitting._kinds import FactorKind, check_kind
from .._fitting._study import StudyFactors, init_study
from .._model._factors import FACTOR_NAMES, FACTOR_SPECS, Factors

_IS_EFFICIENCY = np.array([FACTOR_SPECS[n][2] == "efficiency" for n in FACTOR_NAMES])
_PRIORS = np.array([FACTOR_SPECS[n][0] for n in FACTOR_NAMES])
_LN2 = float(np.log(2.0))


def to_physical(raw: Float[Array, "*g n"], prior) -> Factors:
    """Map raw parameters (last axis in ``FACTOR_NAMES`` order) to :class:`Factors`.

    Efficiency ``i``: ``sigmoid(raw_i + logit(prior_i))``; overhead ``i``:
    ``prior_i softplus(raw_i) / log 2``. So ``raw = 0`` gives ``prior``.
    """
    # Broadcast explicitly to raw's shape (no implicit rank promotion over groups).
    kinds = jnp.broadcast_to(jnp.asarray(_IS_EFFICIENCY), raw.shape)
    prior = jnp.broadcast_to(jnp.asarray(prior, raw.dtype), raw.shape)
    # Logit of the prior on efficiencies only (log1p(-1000) would poison gradients).
    eff_prior = jnp.where(kinds, prior, 0.5)
    eff = jax.nn.sigmoid(raw + jnp.log(eff_prior) - jnp.log1p(-eff_prior))
    ovh = prior * jax.nn.softplus(raw) / _LN2
    values = jnp.where(kinds, eff, ovh)
    return Factors(**{n: values[..., i] for i, n in enumerate(FACTOR_NAMES)})


def to_raw(factors: Factors, prior) -> Float[Array, "*g n"]:
    """Inverse of :func:`to_physical`: raw parameters of physical :class:`Factors`."""
    values = jnp.stack([getattr(factors, n) for n in FACTOR_NAMES], axis=-1)
    # Broadcast explicitly to the values' shape (no implicit rank promotion).
    kinds = jnp.broadcast_to(jnp.asarray(_IS_EFFICIENCY), values.shape)
    bad = ~((values > 0) & (jnp.where(kinds, values < 1, True)))
    if bool(jnp.any(bad)):
        raise ValueError(
            "factors out of their physical range: efficiencies must lie in (0, 1), "
            "overheads must be > 0 (microseconds)"
        )
    prior = jnp.broadcast_to(jnp.asarray(prior, values.dtype), values.shape)
    ev = jnp.where(kinds, values, 0.5)
    ep = jnp.where(kinds, prior, 0.5)
    eff = jnp.log(ev) - jnp.log1p(-ev) - (jnp.log(ep) - jnp.log1p(-ep))
    y = values * _LN2 / prior
    ovh = y + jnp.log(-jnp.expm1(-y))  # inverse softplus
    return jnp.where(kinds, eff, ovh)


def _prior_tuple(prior: Factors | None) -> tuple[float, ...]:
    if prior is None:
        return tuple(float(x) for x in _PRIORS)
    values = tuple(float(getattr(prior, n)) for n in FACTOR_NAMES)
    to_raw(prior, values)  # range check
    return values


def _anchor(raw: Array, scale: float | None, noise_scale: float, n_rows) -> Array:
    """Gaussian prior (sd ``scale``, raw units) pulling raw parameters to the prior
    values, scaled like the hierarchical prior; none when ``scale`` is None."""
    if scale is None:
        return jnp.asarray(0.0)
    return noise_scale**2 / n_rows * jnp.sum(raw**2) / scale**2


def _factor_table(rows: dict[str, Factors]) -> pd.DataFrame:
    """One row per entry of ``rows`` (scalar factors), units in the column names."""
    return pd.DataFrame(
        {
            f"{n} [{FACTOR_SPECS[n][1]}]": [float(getattr(f, n)) for f in rows.values()]
            for n in FACTOR_NAMES
        },
        index=list(rows),
    )


def _group_rows(labels: Sequence[str], per: Factors) -> dict[str, Factors]:
    return {lab: jax.tree.map(lambda v, i=i: v[i], per) for i, lab in enumerate(labels)}


def _roofline_dict(prior: tuple[float, ...]) -> dict[str, Any]:
    units = {n: FACTOR_SPECS[n][1] for n in FACTOR_NAMES}
    return dict(factor_names=list(FACTOR_NAMES), units=units, prior=list(prior))


def _read_prior(d: Mapping[str, Any]) -> tuple[float, ...]:
    """The ``factor_names`` and ``prior`` fields of a roofline set, checked."""
    if list(d.get("factor_names") or []) != list(FACTOR_NAMES):
        raise ValueError(
            f"field 'factor_names': expected {list(FACTOR_NAMES)}, "
            f"got {d.get('factor_names')!r}"
        )
    prior = tuple(float(x) for x in json_array(d, "prior", (len(FACTOR_NAMES),)))
    try:
        _prior_tuple(Factors(**dict(zip(FACTOR_NAMES, prior, strict=True))))
    except ValueError as e:
        raise ValueError(f"field 'prior': {e}") from None
    return prior


@final
class GlobalFactors(AbstractFactorSet):
    """One set of factors shared by every step.

    With ``global_prior_scale`` the objective adds ``noise_scale^2 / N *
    sum((raw / global_prior_scale)^2)``: a Gaussian prior centred on the prior
    factors (e.g. kernel-calibrated ones), which keeps directions the data cannot
    pin down (say, per-step against per-layer overhead) at physical values.
    """

    raw: Float[Array, " n"]
    prior: tuple[float, ...] = eqx.field(static=True)
    global_prior_scale: float | None = eqx.field(static=True, default=None)
    noise_scale: float = eqx.field(static=True, default=0.1)

    def kind(self) -> FactorKind:
        return "global"

    def fitted_groups(self) -> tuple[str, ...]:
        return ()

    def physical(self) -> Factors:
        """The physical :class:`Factors`."""
        return to_physical(self.raw, self.prior)

    def factors_for(self, labels: Sequence[str]) -> Factors:
        """Factors for groups ``labels``: the shared set (scalar fields)."""
        return self.physical()

    def predict(self, data: StepData) -> Float[Array, " steps"]:
        """Predicted step times, us."""
        return data.breakdown(self.physical()).total

    def penalty(self, n_rows) -> Array:
        """Prior term of the objective (see the class doc)."""
        return _anchor(self.raw, self.global_prior_scale, self.noise_scale, n_rows)

    def n_params(self) -> int:
        return int(self.raw.size)

    def reindex(self, labels: Sequence[str]) -> tuple["GlobalFactors", np.ndarray]:
        return self, np.ones(len(labels), bool)

    def to_dict(self) -> dict[str, Any]:
        phys = {n: float(v) for n, v in self.physical().as_dict().items()}
        return dict(
            kind=self.kind(),
            **_roofline_dict(self.prior),
            raw=np.asarray(self.raw, np.float64).tolist(),
            global_prior_scale=self.global_prior_scale,
            noise_scale=self.noise_scale,
            factors=phys,
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GlobalFactors":
        return cls(
            raw=json_array(d, "raw", (len(FACTOR_NAMES),)),
            prior=_read_prior(d),
            global_prior_scale=json_float(
                d, "global_prior_scale", default=None, positive=True
            ),
            noise_scale=json_float(d, "noise_scale", default=0.1, positive=True),
        )

    def table(self) -> pd.DataFrame:
        return _factor_table({"global": self.physical()})


@final
class PerGroupFactors(AbstractFactorSet):
    """One independent set of factors per group (deployment)."""

    raw: Float[Array, "groups n"]
    prior: tuple[float, ...] = eqx.field(static=True)
    labels: tuple[str, ...] = eqx.field(static=True)

    def kind(self) -> FactorKind:
        return "per-model"

    def fitted_groups(self) -> tuple[str, ...]:
        return self.labels

    def physical(self) -> Factors:
        """Physical :class:`Factors`, leading axis = groups."""
        return to_physical(self.raw, self.prior)

    def factors_for(self, labels: Sequence[str]) -> Factors:
        """Factors for groups ``labels``; a group never fitted is an error."""
        idx = label_index(self.labels, labels)
        if (idx < 0).any():
            missing = [lab for lab, i in zip(labels, idx, strict=True) if i < 0]
            raise ValueError(
                f"per-model factors have no group {missing}; fitted groups: "
                f"{list(self.labels)} (use hierarchical factors to predict new groups)"
            )
        return to_physical(self.raw[idx], self.prior)

    def predict(self, data: StepData) -> Float[Array, " steps"]:
        """Predicted step times, us (``data.group`` indexes ``labels``)."""
        return data.breakdown(self.physical()).total

    def penalty(self, n_rows) -> Array:
        """Prior term of the objective (none)."""
        return jnp.asarray(0.0)

    def n_params(self) -> int:
        return int(self.raw.size)

    def reindex(self, labels: Sequence[str]) -> tuple["PerGroupFactors", np.ndarray]:
        idx = label_index(self.labels, labels)
        raw = self.raw[np.maximum(idx, 0)]
        return PerGroupFactors(raw, self.prior, tuple(labels)), idx >= 0

    def to_dict(self) -> dict[str, Any]:
        rows = _group_rows(self.labels, self.physical())
        return dict(
            kind=self.kind(),
            **_roofline_dict(self.prior),
            labels=list(self.labels),
            raw=np.asarray(self.raw, np.float64).tolist(),
            factors={
                lab: {n: float(v) for n, v in f.as_dict().items()}
                for lab, f in rows.items()
            },
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PerGroupFactors":
        labels = json_labels(d)
        return cls(
            raw=json_array(d, "raw", (len(labels), len(FACTOR_NAMES))),
            prior=_read_prior(d),
            labels=labels,
        )

    def table(self) -> pd.DataFrame:
        return _factor_table(_group_rows(self.labels, self.physical()))


@final
class HierarchicalFactors(AbstractFactorSet):
    """Global factors plus per-group log-offsets with a Gaussian shrinkage prior.

    Group ``g`` uses ``raw = global_raw + offsets[g]``. The objective adds
    ``noise_scale^2 / N * sum((offsets / prior_scale)^2)``: with the data term
    ``mean(r^2)`` over ``N`` rows this is ``2 noise_scale^2 / N`` times the negative
    log posterior of a Gaussian log-residual (sd ``noise_scale``) and Gaussian offsets
    (sd ``prior_scale``); ``global_prior_scale`` adds the same kind of prior on the
    global level (see :class:`GlobalFactors`). A group with few rows stays near the
    global values, one with
    many rows moves to its own. With ``learn_prior_scale`` the scale is fitted too
    (its ``log`` is a parameter, with the Gaussian normaliser in the objective): a
    joint maximum a posteriori, which favours small scales (shrunk offsets allow a
    smaller scale, which shrinks them further); ``fit(..., prior_scale="auto")``
    chooses the scale by marginal likelihood instead. A group never seen in training
    predicts with the global values.
    """

    global_raw: Float[Array, " n"]
    offsets: Float[Array, "groups n"]
    log_prior_scale: Float[Array, ""]
    prior: tuple[float, ...] = eqx.field(static=True)
    noise_scale: float = eqx.field(static=True)
    learn_prior_scale: bool = eqx.field(static=True)
    labels: tuple[str, ...] = eqx.field(static=True)
    global_prior_scale: float | None = eqx.field(static=True, default=None)

    def kind(self) -> FactorKind:
        return "hierarchical"

    def fitted_groups(self) -> tuple[str, ...]:
        return self.labels

    def physical(self) -> Factors:
        """Physical :class:`Factors`, leading axis = groups."""
        return to_physical(self.global_raw[None, :] + self.offsets, self.prior)

    def global_physical(self) -> Factors:
        """The global (pooled) physical :class:`Factors`."""
        return to_physical(self.global_raw, self.prior)

    def factors_for(self, labels: Sequence[str]) -> Factors:
        """Factors for groups ``labels``; unseen groups get the global values."""
        return self.reindex(labels)[0].physical()

    def predict(self, data: StepData) -> Float[Array, " steps"]:
        """Predicted step times, us (``data.group`` indexes ``labels``)."""
        return data.breakdown(self.physical()).total

    def penalty(self, n_rows) -> Array:
        """Shrinkage prior, scaled to the mean log-ratio loss (see class doc)."""
        log_s = self.log_prior_scale
        if not self.learn_prior_scale:
            log_s = jax.lax.stop_gradient(log_s)
        quad = jnp.sum(self.offsets**2) * jnp.exp(-2 * log_s)
        norm = self.offsets.size * 2 * log_s if self.learn_prior_scale else 0.0
        anchor = _anchor(
            self.global_raw, self.global_prior_scale, self.noise_scale, n_rows
        )
        return self.noise_scale**2 / n_rows * (quad + norm) + anchor

    def n_params(self) -> int:
        extra = 1 if self.learn_prior_scale else 0
        return int(self.global_raw.size + self.offsets.size + extra)

    def reindex(
        self, labels: Sequence[str]
    ) -> tuple["HierarchicalFactors", np.ndarray]:
        """Unseen groups get zero offsets (the global values); all count as known."""
        idx = label_index(self.labels, labels)
        off = jnp.where(
            jnp.asarray(idx >= 0)[:, None], self.offsets[np.maximum(idx, 0)], 0.0
        )
        new = HierarchicalFactors(
            self.global_raw,
            off,
            self.log_prior_scale,
            self.prior,
            self.noise_scale,
            self.learn_prior_scale,
            tuple(labels),
            self.global_prior_scale,
        )
        return new, np.ones(len(labels), bool)

    def to_dict(self) -> dict[str, Any]:
        rows = {"global": self.global_physical()}
        rows.update(_group_rows(self.labels, self.physical()))
        return dict(
            kind=self.kind(),
            **_roofline_dict(self.prior),
            labels=list(self.labels),
            global_raw=np.asarray(self.global_raw, np.float64).tolist(),
            offsets=np.asarray(self.offsets, np.float64).tolist(),
            log_prior_scale=float(self.log_prior_scale),
            noise_scale=self.noise_scale,
            learn_prior_scale=self.learn_prior_scale,
            global_prior_scale=self.global_prior_scale,
            factors={
                lab: {n: float(v) for n, v in f.as_dict().items()}
                for lab, f in rows.items()
            },
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "HierarchicalFactors":
        labels = json_labels(d)
        n = len(FACTOR_NAMES)
        return cls(
            global_raw=json_array(d, "global_raw", (n,)),
            offsets=json_array(d, "offsets", (len(labels), n)),
            log_prior_scale=json_array(d, "log_prior_scale", ()),
            prior=_read_prior(d),
            noise_scale=json_float(d, "noise_scale", positive=True),
            learn_prior_scale=json_bool(d, "learn_prior_scale"),
            labels=labels,
            global_prior_scale=json_float(
                d, "global_prior_scale", default=None, positive=True
            ),
        )

    def table(self) -> pd.DataFrame:
        rows = {"global": self.global_physical()}
        rows.update(_group_rows(self.labels, self.physical()))
        return _factor_table(rows)


# Each kind's class, for reading files (the only place a kind name picks a class).
FACTOR_SET_CLASSES: dict[str, type[AbstractFactorSet]] = {
    "global": GlobalFactors,
    "per-model": PerGroupFactors,
    "hierarchical": HierarchicalFactors,
    "study-9": StudyFactors,
    "study-36": StudyFactors,
}


def init_factor_set(
    kind: FactorKind,
    labels: Sequence[str],
    *,
    prior: Factors | None = None,
    prior_scale: float = 0.1,
    noise_scale: float = 0.1,
    learn_prior_scale: bool = False,
    global_prior_scale: float | None = None,
) -> AbstractFactorSet:
    """A factor set of ``kind`` (see :data:`FactorKind`) at its prior / start values.

    Args:
        labels: group labels (deployments), in the order of the data's group index.
        prior: physical factors that raw 0 maps to (default the physical priors;
            e.g. kernel-calibrated factors). Roofline kinds only.
        prior_scale: sd of hierarchical log-offsets (raw units, ~ relative change).
        noise_scale: assumed sd of the log-ratio residual (for the prior's weight).
        global_prior_scale: sd of a Gaussian prior on the global raw parameters
            around ``prior`` (global and hierarchical sets; None: no such prior).
    """
    check_kind(kind)
    for name, v in (("prior_scale", prior_scale), ("noise_scale", noise_scale)):
        if not v > 0:
            raise ValueError(f"{name} must be > 0, got {v!r}")
    if global_prior_scale is not None and not global_prior_scale > 0:
        raise ValueError(f"global_prior_scale must be > 0, got {global_prior_scale!r}")
    if kind == "host-device":
        raise ValueError(
            "factors 'host-device' groups steps by GPU and serving stack: fit it with "
            "diffmodel._fitting._split.fit_host_device"
        )
    if kind in ("study-9", "study-36"):
        return init_study(labels, per_group=kind == "study-36")
    p = _prior_tuple(prior)
    n = len(FACTOR_NAMES)
    g = len(labels)
    dtype = jnp.result_type(float)
    if kind == "global":
        return GlobalFactors(
            raw=device_array(np.zeros(n), dtype),
            prior=p,
            global_prior_scale=global_prior_scale,
            noise_scale=float(noise_scale),
        )
    if kind == "per-model":
        return PerGroupFactors(
            raw=device_array(np.zeros((g, n)), dtype), prior=p, labels=tuple(labels)
        )
    return HierarchicalFactors(
        global_raw=device_array(np.zeros(n), dtype),
        offsets=device_array(np.zeros((g, n)), dtype),
        log_prior_scale=device_array(np.log(prior_scale), dtype),
        prior=p,
        noise_scale=float(noise_scale),
        learn_prior_scale=bool(learn_prior_scale),
        labels=tuple(labels),
        global_prior_scale=global_prior_scale,
    )
