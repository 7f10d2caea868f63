"""The host model as a factor set: host and device factors, either target.

:class:`HostStepModel` is what a host fit optimises and what predicts: the host timer
(``step.duration_us``) from the host factors, the iteration time from the roofline's
device factors and the host factors overlapped
(:func:`~diffmodel._model._host.iteration_us`).
"""

from collections.abc import Mapping, Sequence
from typing import Any, final

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jaxtyping import Array, Float

from .._fitting._base import AbstractFactorSet, StepData
from .._fitting._host_factors import (
    HOST_TARGETS,
    AbstractHostSet,
    host_set_from_dict,
    host_target,
)
from .._fitting._kinds import FactorKind
from .._model._factors import Factors


@final
class HostStepModel(AbstractFactorSet):
    """Host and device factor sets, predicting either target (us per step): the
    factor set a host fit optimises.

    - ``target="step_duration"``: the host timer, ``host.timed(data)``; the device
      set takes no part (and may be None).
    - ``target="iteration_time"``: :func:`~diffmodel._model._host.iteration_us` of the
      device set's roofline breakdown and the host timer. With ``freeze_host`` the
      host factors are held (no gradient): they are pinned by the host timer, the
      device factors by the iteration time.
    """

    host: AbstractHostSet
    device: AbstractFactorSet | None
    target: str = eqx.field(static=True)
    freeze_host: bool = eqx.field(static=True, default=True)

    def __check_init__(self):
        if self.target not in HOST_TARGETS:
            raise ValueError(
                f"target must be one of {list(HOST_TARGETS)}, got {self.target!r}"
            )
        if self.target == "iteration_time" and self.device is None:
            raise ValueError("target 'iteration_time' needs a device factor set")

    def kind(self) -> FactorKind:
        """The host set's kind (and the device set's, for iteration time)."""
        return self.host.kind()

    def fitted_groups(self) -> tuple[str, ...]:
        groups = self.host.fitted_groups()
        if not groups and self.device is not None:
            groups = self.device.fitted_groups()
        return groups

    def physical(self) -> Factors:
        """The device set's roofline factors; a timer-only model has none."""
        if self.device is None:
            raise ValueError(
                "a host model of the step_duration target has no roofline factors"
            )
        return self.device.physical()

    def factors_for(self, labels: Sequence[str]) -> Factors:
        """The device set's roofline factors for groups ``labels``."""
        if self.device is None:
            raise ValueError(
                "a host model of the step_duration target has no roofline factors"
            )
        return self.device.factors_for(labels)

    def predict(self, data: StepData) -> Float[Array, " steps"]:
        """Predicted target per step, us."""
        host = self.host
        if self.freeze_host and self.target == "iteration_time":
            host = jax.lax.stop_gradient(host)
        device = None if self.device is None else self.device.physical()
        return host_target(
            data, self.target, host.physical(), gate_on=host.gate_on, device=device
        )

    def penalty(self, n_rows: Any) -> Array:
        """The sets' prior terms (the host's only while it is fitted)."""
        total = jnp.asarray(0.0)
        if not (self.freeze_host and self.target == "iteration_time"):
            total = total + self.host.penalty(n_rows)
        if self.device is not None and self.target == "iteration_time":
            total = total + self.device.penalty(n_rows)
        return total

    def n_params(self) -> int:
        """Host numbers, plus the device set's for iteration time (the host ones
        count too: they were fitted on the timer first)."""
        count = self.host.n_params()
        if self.device is not None and self.target == "iteration_time":
            count += self.device.n_params()
        return count

    def reindex(self, labels: Sequence[str]) -> tuple["HostStepModel", np.ndarray]:
        host, known = self.host.reindex(labels)
        device = self.device
        if device is not None:
            device, dev_known = device.reindex(labels)
            known = known & dev_known
        return HostStepModel(host, device, self.target, self.freeze_host), known

    def to_dict(self) -> dict[str, Any]:
        return dict(
            kind=self.kind(),
            model="host",
            target=self.target,
            host=self.host.to_dict(),
            device=None if self.device is None else self.device.to_dict(),
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "HostStepModel":
        from .._fitting._factorsets import FACTOR_SET_CLASSES

        if d.get("model") != "host":
            raise ValueError(f"field 'model': expected 'host', got {d.get('model')!r}")
        host = host_set_from_dict(d.get("host") or {})
        device = d.get("device")
        if device is not None:
            device = FACTOR_SET_CLASSES[device.get("kind")].from_dict(device)
        return cls(host, device, d.get("target"))

    def table(self) -> pd.DataFrame:
        """Host factors per group, and the device set's factors beside them."""
        table = self.host.table()
        if self.device is None or self.target != "iteration_time":
            return table
        return table.join(self.device.table(), how="left")
