"""The factor-set family: one abstract base, the kind names, and the JSON field readers.

Every factor set (global, per-model, hierarchical, the study's) is a final
``eqx.Module`` implementing :class:`AbstractFactorSet`; callers use its methods and
never ask for its type. The kind names are in :mod:`._kinds` (:data:`FactorKind`).
"""

import abc
import math
from collections.abc import Mapping, Sequence
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jaxtyping import Array, ArrayLike, Float, Int

from .._fitting._kinds import FactorKind
from .._model._batch import BatchStats
from .._model._deployment import Deployment
from .._model._factors import Factors
from .._model._roofline import Breakdown, step_time_batch


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


class AbstractFactorSet(eqx.Module):
    """Learnable parameters of a step-time model, kept unconstrained.

    ``predict(data)`` reads ``data.group`` as an index into :meth:`fitted_groups`
    (sets without per-group parameters ignore it); the fitting objective is the
    log-ratio loss plus :meth:`penalty`.
    """

    @abc.abstractmethod
    def kind(self) -> FactorKind:
        """This set's kind name (one of :data:`FACTOR_KINDS`)."""

    @abc.abstractmethod
    def fitted_groups(self) -> tuple[str, ...]:
        """Group labels with parameters of their own (``()`` for a shared set)."""

    def unseen(self, labels: Sequence[str]) -> tuple[str, ...]:
        """Those of ``labels`` this set predicts at a shared (global) level for want of
        parameters of their own: by default the labels outside :meth:`fitted_groups`
        of a set that has groups."""
        fitted = self.fitted_groups()
        return tuple(lab for lab in labels if fitted and lab not in fitted)

    @abc.abstractmethod
    def physical(self) -> Factors:
        """Physical roofline :class:`Factors` (leading axis = groups where per group).

        Raises ``ValueError`` for a set that is not a roofline (the study's)."""

    @abc.abstractmethod
    def factors_for(self, labels: Sequence[str]) -> Factors:
        """Physical factors for the groups ``labels`` (leading axis = labels)."""

    @abc.abstractmethod
    def predict(self, data: StepData) -> Float[Array, " steps"]:
        """Predicted step times, us."""

    def prepare(self, data: StepData) -> Any:
        """What :meth:`predict_prepared` needs of ``data`` that no parameter changes
        (computed once per fit, outside the optimiser's loop). By default the data
        itself; a set with parameter-free precomputation overrides both methods."""
        return data

    def predict_prepared(self, prepared: Any) -> Float[Array, " steps"]:
        """Predicted step times, us, from :meth:`prepare`'s output."""
        return self.predict(prepared)

    @abc.abstractmethod
    def penalty(self, n_rows: Any) -> Array:
        """Prior term added to the mean log-ratio loss over ``n_rows`` rows."""

    @abc.abstractmethod
    def n_params(self) -> int:
        """Number of parameters the optimiser moves."""

    @abc.abstractmethod
    def reindex(self, labels: Sequence[str]) -> tuple["AbstractFactorSet", np.ndarray]:
        """The same set with groups ``labels`` (for data indexed by them), and per
        label whether this set knows it (an unknown one predicts nothing useful)."""

    @abc.abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (see :mod:`diffmodel._fitting._io`)."""

    @classmethod
    @abc.abstractmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "AbstractFactorSet":
        """Inverse of :meth:`to_dict`; a bad field is a ``ValueError`` naming it."""

    @abc.abstractmethod
    def table(self) -> pd.DataFrame:
        """Fitted values, one row per group (and ``global``), units in the names."""


def label_index(own: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """Position of each of ``labels`` in ``own`` (``-1`` where absent)."""
    pos = {lab: i for i, lab in enumerate(own)}
    return np.array([pos.get(lab, -1) for lab in labels], dtype=np.int32)


# JSON field readers: each raises ValueError("field 'x': expected ..., got ...").


def check_covariance(cov: ArrayLike, key: str) -> np.ndarray:
    """``cov`` unless it is not a covariance: ``ValueError`` naming field ``key``
    for an asymmetric matrix or one with a negative variance or eigenvalue (it
    would give negative or imaginary predictive variances)."""
    c = np.asarray(cov, np.float64)
    if c.size == 0:
        return c
    scale = max(float(np.max(np.abs(c))), 1e-300)
    if not np.allclose(c, c.T, rtol=1e-8, atol=1e-10 * scale):
        raise ValueError(f"field {key!r}: expected a symmetric matrix")
    if (np.diag(c) < 0).any():
        raise ValueError(f"field {key!r}: variances (the diagonal) must be >= 0")
    if np.linalg.eigvalsh(c).min() < -1e-8 * scale:
        raise ValueError(f"field {key!r}: expected a positive semi-definite matrix")
    return c


def json_array(d: Mapping[str, Any], key: str, shape: tuple[int, ...]) -> Array:
    """Field ``key`` as a finite float array of ``shape``."""
    if key not in d:
        raise ValueError(f"field {key!r} is missing")
    value = d[key]
    want = "x".join(map(str, shape)) if shape else "a number"
    try:
        a = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(
            f"field {key!r}: expected numbers (shape {want}), got {_brief(value)}"
        ) from None
    if isinstance(value, bool) or a.dtype != np.float64 or _has_str(value):
        raise ValueError(f"field {key!r}: expected numbers, got {_brief(value)}")
    if a.shape != shape:
        raise ValueError(
            f"field {key!r}: expected shape ({want}), got shape "
            f"{'x'.join(map(str, a.shape)) or 'scalar'}"
        )
    if not np.all(np.isfinite(a)):
        raise ValueError(f"field {key!r}: expected finite numbers, got NaN or inf")
    return jnp.asarray(a, jnp.result_type(float))


def json_float(d: Mapping[str, Any], key: str, *, default=..., positive=False):
    """Field ``key`` as a finite float (``None`` allowed when ``default`` is)."""
    if key not in d or (d[key] is None and default is None):
        if default is ...:
            raise ValueError(f"field {key!r} is missing")
        return default
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ValueError(f"field {key!r}: expected a finite number, got {_brief(v)}")
    if positive and not v > 0:
        raise ValueError(f"field {key!r}: expected a number > 0, got {v!r}")
    return float(v)


def json_bool(d: Mapping[str, Any], key: str) -> bool:
    """Field ``key`` as a boolean."""
    v = d.get(key)
    if not isinstance(v, bool):
        raise ValueError(f"field {key!r}: expected true or false, got {_brief(v)}")
    return v


def json_labels(d: Mapping[str, Any]) -> tuple[str, ...]:
    """Field ``labels`` as distinct strings."""
    v = d.get("labels")
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise ValueError(f"field 'labels': expected a list of strings, got {_brief(v)}")
    if len(set(v)) != len(v):
        raise ValueError("field 'labels': expected distinct labels, got repeats")
    return tuple(v)


def _has_str(x) -> bool:
    if isinstance(x, str):
        return True
    return isinstance(x, list) and any(_has_str(e) for e in x)


def _brief(x) -> str:
    text = repr(x)
    return text if len(text) <= 40 else text[:37] + "..."
