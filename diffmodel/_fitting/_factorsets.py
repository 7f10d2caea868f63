"""Learnable factor sets: global, per-group and hierarchical (partial pooling).

Each set keeps *unconstrained* parameters and maps them to physical :class:`Factors`
where they are used: efficiencies by a sigmoid (in (0, 1): never above a peak),
overheads by a scaled softplus (>= 0, in microseconds). A raw value of 0 maps to the
physical prior of :data:`~diffmodel.FACTOR_SPECS`.
"""

from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from .._model._batch import BatchStats
from .._model._deployment import Deployment
from .._model._factors import FACTOR_NAMES, FACTOR_SPECS, Factors
from .._model._roofline import Breakdown, step_time_batch

_KINDS = np.array([FACTOR_SPECS[n][2] == "efficiency" for n in FACTOR_NAMES])
_PRIORS = np.array([FACTOR_SPECS[n][0] for n in FACTOR_NAMES])
_LN2 = float(np.log(2.0))


def to_physical(raw: Float[Array, "*g n"], prior) -> Factors:
    """Map raw parameters (last axis in ``FACTOR_NAMES`` order) to :class:`Factors`.

    Efficiency ``i``: ``sigmoid(raw_i + logit(prior_i))``; overhead ``i``:
    ``prior_i softplus(raw_i) / log 2``. So ``raw = 0`` gives ``prior``.
    """
    # Broadcast explicitly to raw's shape (no implicit rank promotion over groups).
    kinds = jnp.broadcast_to(jnp.asarray(_KINDS), raw.shape)
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
    bad = ~((values > 0) & (jnp.where(jnp.asarray(_KINDS), values < 1, True)))
    if bool(jnp.any(bad)):
        raise ValueError(
            "factors out of their physical range: efficiencies must lie in (0, 1), "
            "overheads must be > 0 (microseconds)"
        )
    kinds = jnp.asarray(_KINDS)
    prior = jnp.asarray(prior, values.dtype)
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


class StepData(eqx.Module):
    """Array-level steps to fit or predict: statistics, deployments, group per step."""

    stats: BatchStats
    deployments: Deployment
    group: Int[Array, " steps"]

    def breakdown(self, factors: Factors, *, check: bool = False) -> Breakdown:
        """Roofline breakdown, us, with per-group factors indexed by ``group``."""
        return step_time_batch(
            self.stats, self.deployments, self.group, factors, check=check
        )


def _label_index(own: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    pos = {lab: i for i, lab in enumerate(own)}
    return np.array([pos.get(lab, -1) for lab in labels], dtype=np.int32)


def _anchor(raw: Array, scale: float | None, noise_scale: float, n_rows: int) -> Array:
    """Gaussian prior (sd ``scale``, raw units) pulling raw parameters to the prior
    values, scaled like the hierarchical prior; none when ``scale`` is None."""
    if scale is None:
        return jnp.asarray(0.0)
    return noise_scale**2 / n_rows * jnp.sum(raw**2) / scale**2


class GlobalFactors(eqx.Module):
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

    def physical(self) -> Factors:
        """The physical :class:`Factors`."""
        return to_physical(self.raw, self.prior)

    def factors_for(self, labels: Sequence[str]) -> Factors:
        """Factors for groups ``labels`` (the same for all)."""
        return self.physical()

    def predict(self, data: StepData) -> Float[Array, " steps"]:
        """Predicted step times, us."""
        return data.breakdown(self.physical()).total

    def penalty(self, n_rows: int) -> Array:
        """Prior term of the objective (see the class doc)."""
        return _anchor(self.raw, self.global_prior_scale, self.noise_scale, n_rows)


class PerGroupFactors(eqx.Module):
    """One independent set of factors per group (deployment)."""

    raw: Float[Array, "groups n"]
    prior: tuple[float, ...] = eqx.field(static=True)
    labels: tuple[str, ...] = eqx.field(static=True)

    def physical(self) -> Factors:
        """Physical :class:`Factors`, leading axis = groups."""
        return to_physical(self.raw, self.prior)

    def factors_for(self, labels: Sequence[str]) -> Factors:
        """Factors for groups ``labels``; a group never fitted is an error."""
        idx = _label_index(self.labels, labels)
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

    def penalty(self, n_rows: int) -> Array:
        """Prior term of the objective (none)."""
        return jnp.asarray(0.0)


class HierarchicalFactors(eqx.Module):
    """Global factors plus per-group log-offsets with a Gaussian shrinkage prior.

    Group ``g`` uses ``raw = global_raw + offsets[g]``. The objective adds
    ``noise_scale^2 / N * sum((offsets / prior_scale)^2)``: with the data term
    ``mean(r^2)`` over ``N`` rows this is ``2 noise_scale^2 / N`` times the negative
    log posterior of a Gaussian log-residual (sd ``noise_scale``) and Gaussian offsets
    (sd ``prior_scale``); ``global_prior_scale`` adds the same kind of prior on the
    global level (see :class:`GlobalFactors`). A group with few rows stays near the
    global values, one with
    many rows moves to its own. With ``learn_prior_scale`` the scale is fitted too
    (its ``log`` is a parameter, with the Gaussian normaliser in the objective). A group
    never seen in training predicts with the global values.
    """

    global_raw: Float[Array, " n"]
    offsets: Float[Array, "groups n"]
    log_prior_scale: Float[Array, ""]
    prior: tuple[float, ...] = eqx.field(static=True)
    noise_scale: float = eqx.field(static=True)
    learn_prior_scale: bool = eqx.field(static=True)
    labels: tuple[str, ...] = eqx.field(static=True)
    global_prior_scale: float | None = eqx.field(static=True, default=None)

    def physical(self) -> Factors:
        """Physical :class:`Factors`, leading axis = groups."""
        return to_physical(self.global_raw[None, :] + self.offsets, self.prior)

    def global_physical(self) -> Factors:
        """The global (pooled) physical :class:`Factors`."""
        return to_physical(self.global_raw, self.prior)

    def factors_for(self, labels: Sequence[str]) -> Factors:
        """Factors for groups ``labels``; unseen groups get the global values."""
        idx = _label_index(self.labels, labels)
        off = jnp.where(
            jnp.asarray(idx >= 0)[:, None], self.offsets[np.maximum(idx, 0)], 0.0
        )
        return to_physical(self.global_raw[None, :] + off, self.prior)

    def predict(self, data: StepData) -> Float[Array, " steps"]:
        """Predicted step times, us (``data.group`` indexes ``labels``)."""
        return data.breakdown(self.physical()).total

    def penalty(self, n_rows: int) -> Array:
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


def init_factor_set(
    kind: str,
    labels: Sequence[str],
    *,
    prior: Factors | None = None,
    prior_scale: float = 0.1,
    noise_scale: float = 0.1,
    learn_prior_scale: bool = False,
    global_prior_scale: float | None = None,
):
    """A factor set at its prior: ``kind`` in ``global``, ``per-model``,
    ``hierarchical``.

    Args:
        labels: group labels (deployments), in the order of the data's group index.
        prior: physical factors that raw 0 maps to (default the physical priors;
            e.g. kernel-calibrated factors).
        prior_scale: sd of hierarchical log-offsets (raw units, ~ relative change).
        noise_scale: assumed sd of the log-ratio residual (for the prior's weight).
        global_prior_scale: sd of a Gaussian prior on the global raw parameters
            around ``prior`` (global and hierarchical sets; None: no such prior).
    """
    p = _prior_tuple(prior)
    n = len(FACTOR_NAMES)
    g = len(labels)
    dtype = jnp.result_type(float)
    for name, v in (("prior_scale", prior_scale), ("noise_scale", noise_scale)):
        if not v > 0:
            raise ValueError(f"{name} must be > 0, got {v!r}")
    if global_prior_scale is not None and not global_prior_scale > 0:
        raise ValueError(f"global_prior_scale must be > 0, got {global_prior_scale!r}")
    if kind == "global":
        return GlobalFactors(
            raw=jnp.zeros(n, dtype),
            prior=p,
            global_prior_scale=global_prior_scale,
            noise_scale=float(noise_scale),
        )
    if kind in ("per-model", "per_model", "per-group"):
        return PerGroupFactors(
            raw=jnp.zeros((g, n), dtype), prior=p, labels=tuple(labels)
        )
    if kind == "hierarchical":
        return HierarchicalFactors(
            global_raw=jnp.zeros(n, dtype),
            offsets=jnp.zeros((g, n), dtype),
            log_prior_scale=jnp.log(jnp.asarray(prior_scale, dtype)),
            prior=p,
            noise_scale=float(noise_scale),
            learn_prior_scale=bool(learn_prior_scale),
            labels=tuple(labels),
            global_prior_scale=global_prior_scale,
        )
    raise ValueError(
        f"factors must be 'global', 'per-model' or 'hierarchical', got {kind!r}"
    )
