"""A deployment: a model on a GPU type at a tensor-parallel degree, as array data."""

import inspect
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from .._arrays import device_array, on_host
from .._model._arch import Architecture, architecture, from_hf_config
from .._model._hardware import (
    DEFAULT_HARDWARE,
    Hardware,
    hardware as hardware_spec,
)


class Deployment(eqx.Module):
    """Architecture, hardware and tensor-parallel degree ``t`` (all array data).

    A stack of deployments (leading axis: groups) is indexed per step with
    :meth:`take`, so one compiled roofline serves steps of many deployments.

    ``ep`` is the expert-parallel degree (1: experts tensor-parallel like the rest;
    ``ep = t``: whole experts spread over the tensor-parallel GPUs; ``ep = m t``:
    ``m`` data-parallel attention ranks with all-to-all expert dispatch).
    """

    arch: Architecture
    hw: Hardware
    tp: Float[Array, "*g"]
    ep: Float[Array, "*g"] = eqx.field(default_factory=lambda: jnp.asarray(1.0))

    def take(self, group: Int[Array, " steps"]) -> "Deployment":
        """Per-step deployment from a stacked one and each step's group index."""
        return jax.tree.map(lambda x: jnp.take(x, group, axis=0), self)


def positive_degree(name: str, value) -> int:
    """``value`` as a positive integer parallel degree; a one-line ``ValueError``
    naming ``name`` for booleans (``True`` is not a degree), text, NaN, infinities,
    fractions and values below 1."""
    if isinstance(value, bool | np.bool_):
        raise ValueError(f"{name} must be a positive integer, got {bool(value)}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive integer, got {value!r}") from None
    if not (np.isfinite(v) and v.is_integer() and v >= 1):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(v)


def check_tp(arch: Architecture, tp: int | float) -> None:
    """Raise ``ValueError`` unless ``tp`` splits the attention heads evenly.

    Query heads must divide by ``tp``; KV heads must divide by ``tp`` or, when
    ``tp`` exceeds them, ``tp`` must divide by the KV heads (vLLM then replicates each
    KV head). Needs concrete (not traced) architecture values.
    """
    tp = positive_degree("tp", tp)
    heads = int(np.asarray(arch.n_heads))
    kv = int(np.asarray(arch.n_kv_heads))
    if heads % tp:
        raise ValueError(f"tp={tp} does not divide the model's {heads} attention heads")
    if kv % tp and tp % kv:
        raise ValueError(
            f"tp={tp} neither divides nor is a multiple of the model's {kv} KV heads"
        )


def check_ep(arch: Architecture, tp: int | float, ep: int | float) -> None:
    """Raise ``ValueError`` unless ``ep`` is 1 or a multiple of ``tp`` that divides
    the routed experts (needs concrete architecture values)."""
    ep = positive_degree("ep", ep)
    if ep == 1:
        return
    experts = int(np.asarray(arch.n_experts))
    if experts == 0:
        raise ValueError(f"ep={ep} needs an MoE model; this one has no routed experts")
    if int(ep) % int(tp) or experts % int(ep):
        raise ValueError(
            f"ep={ep} must be a multiple of tp={tp} and divide the {experts} experts"
        )


# The keyword options of a catalog model (``from_hf_config``'s).
_ARCH_OPTIONS = tuple(
    name
    for name, p in inspect.signature(from_hf_config).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY
)


def deployment(
    model: str | Architecture,
    hardware: str | Hardware = DEFAULT_HARDWARE,
    tp: int | float = 1,
    *,
    ep: int | float = 1,
    **dtype_overrides: str | bool,
) -> Deployment:
    """Build a validated :class:`Deployment`.

    Args:
        model: a catalog name or alias, or an :class:`Architecture`.
        hardware: a catalog name or alias (see :func:`diffmodel.known_hardware`),
            or a :class:`Hardware`; H100-SXM by default.
        tp: tensor-parallel degree (GPUs the model is split over).
        ep: expert-parallel degree (see :class:`Deployment`).
        **dtype_overrides: ``weight_dtype``, ``kv_dtype``, ``text_only`` for a
            catalog model (:func:`diffmodel.from_hf_config`); an unknown keyword
            is a ``TypeError`` naming it, one with an :class:`Architecture` a
            ``ValueError``.
    """
    unknown = sorted(set(dtype_overrides) - set(_ARCH_OPTIONS))
    if unknown:  # a TypeError, as for any unexpected keyword, but one that says why
        raise TypeError(
            f"deployment: unknown keyword {unknown[0]!r}; it takes model, hardware, "
            f"tp, ep and the model options {', '.join(_ARCH_OPTIONS)}"
        )
    if dtype_overrides and isinstance(model, Architecture):
        raise ValueError(
            f"deployment: {sorted(dtype_overrides)[0]} applies to a catalog model "
            "name; this model is already an Architecture (pass the option to "
            "Architecture.from_hf_config)"
        )
    arch = (
        model
        if isinstance(model, Architecture)
        else architecture(model, **dtype_overrides)
    )
    hw = hardware if isinstance(hardware, Hardware) else hardware_spec(hardware)
    check_tp(arch, tp)
    check_ep(arch, tp, ep)
    return Deployment(
        arch=arch,
        hw=hw,
        tp=device_array(float(tp), float),
        ep=device_array(float(ep), float),
    )


def stack_deployments(deployments: Sequence[Deployment]) -> Deployment:
    """Stack deployments along a new leading (group) axis."""
    if not deployments:
        raise ValueError("stack needs at least one deployment")
    return jax.tree.map(_stack, *deployments)


def _stack(*xs):
    """``jnp.stack``; values known on the host are stacked there and moved once."""
    if not on_host(*xs):
        return jnp.stack(xs)
    return jax.device_put(np.stack([np.asarray(x) for x in xs]))
