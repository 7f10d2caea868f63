"""The study's 9-parameter (global) and 36-parameter (per-model) step model.

Kept to reproduce the study exactly, not to be used: its backbone is compute-only (no
memory term, so decode steps cost almost nothing) and its decode attention is zero.

Components (us, per GPU), FLOPs at the dense 16-bit peak:
``prefill_gemm = 2 P W / (t peak)``, ``decode_gemm = 2 D W / (t peak)`` with ``W`` the
active linear weights (all layers), ``prefill_attention = 4 L (H/t) dh A_pf / peak``,
``decode_attention = 0``. Prediction: ``sum_i factor_i component_i / mfu_i +
overhead`` with factors in [0.01, 100], overhead in [0, 1e6] us and MFU discounts in
[0.01, 1], each mapped from an unconstrained parameter (log-sigmoid for the factors
and MFUs, sigmoid for the overhead).
"""

from collections.abc import Mapping, Sequence
from typing import Any, final

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jaxtyping import Array, ArrayLike, Float

from .._fitting._base import (
    AbstractFactorSet,
    FactorKind,
    StepData,
    json_array,
    json_labels,
    label_index,
)
from .._model._factors import Factors
from .._model._roofline import linear_work

STUDY_COMPONENTS = (
    "prefill_gemm",
    "decode_gemm",
    "prefill_attention",
    "decode_attention",
)
STUDY_PARAM_NAMES = (
    *(f"factor_{c}" for c in STUDY_COMPONENTS),
    "overhead_us",
    *(f"mfu_{c}" for c in STUDY_COMPONENTS),
)
# (low, high, log-scaled) bounds of the study's parameters.
STUDY_BOUNDS = np.array([[0.01, 100.0]] * 4 + [[0.0, 1e6]] + [[0.01, 1.0]] * 4)
_LOG = np.array([True] * 4 + [False] + [True] * 4)
# Start: factors 1, overhead 100 us, MFU 0.5.
STUDY_START = np.array([1.0] * 4 + [100.0] + [0.5] * 4)


def study_components(data: StepData) -> Float[Array, "steps 4"]:
    """The four compute-only components of every step, us."""
    dep = data.deployments.take(data.group)
    a, t, peak = dep.arch, dep.tp, dep.hw.flops_16
    s = data.stats
    pre_f, _ = linear_work(s.prefill_tokens, a, t)
    dec_f, _ = linear_work(s.decode_tokens, a, t)
    attn_f = 4.0 * a.n_layers * (a.n_heads / t) * a.head_dim * s.attn_prefill
    comps = [pre_f, dec_f, attn_f, jnp.zeros_like(attn_f)]
    return jnp.stack([c / peak * 1e6 for c in comps], axis=-1)


def study_to_values(raw: Float[Array, "*g 9"]) -> Float[Array, "*g 9"]:
    """Map unconstrained parameters to the study's bounded values."""
    # Bounds broadcast explicitly to raw's shape (no implicit rank promotion).
    lo = jnp.broadcast_to(jnp.asarray(STUDY_BOUNDS[:, 0]), raw.shape)
    hi = jnp.broadcast_to(jnp.asarray(STUDY_BOUNDS[:, 1]), raw.shape)
    is_log = jnp.broadcast_to(jnp.asarray(_LOG), raw.shape)
    s = jax.nn.sigmoid(raw)
    log_lo = jnp.log(jnp.where(is_log, lo, 1.0))
    log_hi = jnp.log(jnp.where(is_log, hi, 1.0))
    return jnp.where(
        is_log, jnp.exp(log_lo + (log_hi - log_lo) * s), lo + (hi - lo) * s
    )


def study_to_raw(values: Float[ArrayLike, "*g 9"]) -> Float[Array, "*g 9"]:
    """Inverse of :func:`study_to_values` (values strictly inside the bounds).

    JAX arrays (and tracers) give a JAX array; host values are converted in NumPy
    and moved to the device once (a fresh process then compiles nothing here)."""
    xp = jnp if isinstance(values, jax.Array) else np
    v = xp.asarray(values, dtype=float)
    lo = xp.broadcast_to(xp.asarray(STUDY_BOUNDS[:, 0]), v.shape)
    hi = xp.broadcast_to(xp.asarray(STUDY_BOUNDS[:, 1]), v.shape)
    is_log = xp.broadcast_to(xp.asarray(_LOG), v.shape)
    safe_lo = xp.where(is_log, lo, 1.0)
    frac = xp.where(
        is_log,
        xp.log(v / safe_lo) / xp.log(hi / safe_lo),
        (v - lo) / (hi - lo),
    )
    raw = xp.log(frac) - xp.log1p(-frac)
    return raw if xp is jnp else jax.device_put(raw)


def study_predict(
    values: Float[ArrayLike, "*b 9"], comps: Float[ArrayLike, "steps 4"]
) -> Float[Array, " steps"]:
    """``sum_i factor_i component_i / mfu_i + overhead``, us.

    The ratios ``factor_i / mfu_i`` are formed once per parameter set, so one set
    for all steps is a matrix-vector product (no division per step: five times
    faster for the loss and its gradient on CPU).
    """
    values = jnp.asarray(values)
    comps = jnp.asarray(comps)
    ratio = values[..., 0:4] / values[..., 5:9]
    if ratio.ndim == 1:
        return comps @ ratio + values[4]
    ratio = jnp.broadcast_to(ratio, comps.shape)
    overhead = jnp.broadcast_to(values[..., 4], comps.shape[:-1])
    return jnp.sum(ratio * comps, axis=-1) + overhead


@final
class StudyFactors(AbstractFactorSet):
    """The study's parameters: one set (9) or one per group (9 per group).

    Not a roofline: :meth:`physical` and :meth:`factors_for` raise; evaluate with
    :meth:`predict`.
    """

    raw: Float[Array, "*g 9"]
    labels: tuple[str, ...] = eqx.field(static=True)
    per_group: bool = eqx.field(static=True)

    def kind(self) -> FactorKind:
        return "study-36" if self.per_group else "study-9"

    def fitted_groups(self) -> tuple[str, ...]:
        return self.labels if self.per_group else ()

    def values(self) -> Float[Array, "*g 9"]:
        """Bounded parameter values in ``STUDY_PARAM_NAMES`` order."""
        return study_to_values(self.raw)

    def physical(self) -> Factors:
        raise ValueError(
            "the study's factors are not roofline factors; evaluate them "
            "with their own predict(StepData)"
        )

    def factors_for(self, labels: Sequence[str]) -> Factors:
        return self.physical()

    def predict(self, data: StepData) -> Float[Array, " steps"]:
        """Predicted step times, us."""
        return self.predict_prepared(self.prepare(data))

    def prepare(self, data: StepData) -> tuple[Array, Array]:
        """The components (they do not depend on the parameters) and groups."""
        return study_components(data), data.group

    def predict_prepared(self, prepared: tuple[Array, Array]) -> Float[Array, " steps"]:
        comps, group = prepared
        v = self.values()
        if self.per_group:  # the ratios per group, then one row per step
            ratio = (v[:, 0:4] / v[:, 5:9])[group]
            return jnp.sum(ratio * comps, axis=-1) + v[group, 4]
        return study_predict(v, comps)

    def penalty(self, n_rows) -> Array:
        """No prior."""
        return jnp.asarray(0.0)

    def n_params(self) -> int:
        return int(self.raw.size)

    def reindex(self, labels: Sequence[str]) -> tuple["StudyFactors", np.ndarray]:
        if not self.per_group:
            return StudyFactors(self.raw, tuple(labels), False), np.ones(
                len(labels), bool
            )
        idx = label_index(self.labels, labels)
        raw = self.raw[np.maximum(idx, 0)]
        return StudyFactors(raw, tuple(labels), True), idx >= 0

    def to_dict(self) -> dict[str, Any]:
        return dict(
            kind=self.kind(),
            parameter_names=list(STUDY_PARAM_NAMES),
            labels=list(self.labels),
            raw=np.asarray(self.raw, np.float64).tolist(),
            values=np.asarray(self.values(), np.float64).tolist(),
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "StudyFactors":
        per_group = d.get("kind") == "study-36"
        labels = json_labels(d)
        n = len(STUDY_PARAM_NAMES)
        shape = (len(labels), n) if per_group else (n,)
        return cls(raw=json_array(d, "raw", shape), labels=labels, per_group=per_group)

    def table(self) -> pd.DataFrame:
        v = np.atleast_2d(np.asarray(self.values()))
        names = self.labels if self.per_group else ("global",)
        return pd.DataFrame(v, index=list(names), columns=list(STUDY_PARAM_NAMES))


def init_study(labels: Sequence[str], *, per_group: bool) -> StudyFactors:
    """The study's model at its start values: 9 parameters, or 9 per group."""
    raw = np.asarray(STUDY_START, float)
    if per_group:
        raw = np.tile(raw, (len(labels), 1))
    raw = study_to_raw(raw)
    return StudyFactors(raw=raw, labels=tuple(labels), per_group=per_group)
