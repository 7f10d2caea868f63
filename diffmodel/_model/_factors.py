"""The roofline's physical factors: efficiencies and overheads, in physical units."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

# name -> (default, unit, kind). kind "efficiency": a fraction of a peak, in (0, 1];
# kind "overhead": a non-negative time. Defaults are physical priors, so an unfitted
# model is already a sensible roofline: large bf16 GEMMs reach ~0.7-0.95 of peak on
# H100 (aiconfigurator's kernels reach 937/989.5), streaming kernels ~0.8 of HBM
# bandwidth, FlashAttention ~0.5 of peak, paged KV reads ~0.7, NCCL ~0.7 of NVLink.
FACTOR_SPECS: dict[str, tuple[float, str, str]] = {
    "gemm_flops": (0.7, "fraction of peak FLOP/s", "efficiency"),
    "mem_bw": (0.8, "fraction of HBM bandwidth", "efficiency"),
    "attn_flops": (0.5, "fraction of peak FLOP/s", "efficiency"),
    "attn_bw": (0.7, "fraction of HBM bandwidth", "efficiency"),
    "comm_bw": (0.7, "fraction of link bandwidth", "efficiency"),
    "comm_latency_us": (8.0, "us per all-reduce", "overhead"),
    "step_overhead_us": (1000.0, "us per step", "overhead"),
    "layer_overhead_us": (5.0, "us per layer per step", "overhead"),
    "request_overhead_us": (10.0, "us per request per step", "overhead"),
}
FACTOR_NAMES: tuple[str, ...] = tuple(FACTOR_SPECS)


def set_named_fields(obj, values: dict, specs: dict, what: str) -> None:
    """Set each field named in ``specs`` on ``obj`` from ``values`` (default: the
    spec's first entry, its prior) as a float array; an unknown name is an error."""
    unknown = set(values) - set(specs)
    if unknown:
        raise ValueError(f"unknown {what}(s) {sorted(unknown)}; expected {list(specs)}")
    for name, spec in specs.items():
        value = values.get(name, spec[0])
        setattr(obj, name, jnp.asarray(value, dtype=jnp.result_type(float)))


class Factors(eqx.Module):
    """Physical factors of the roofline (what :func:`diffmodel.step_time` consumes).

    Efficiencies are fractions of a hardware peak in (0, 1]; overheads are in
    microseconds. Each field is an array: a scalar for one set, or with a leading axis
    (one set per step) after indexing a per-group set.

    Attributes:
        gemm_flops: linear layers and LM head, fraction of peak FLOP/s.
        mem_bw: weight, activation and KV-write traffic, fraction of HBM bandwidth.
        attn_flops: attention math, fraction of peak FLOP/s.
        attn_bw: KV-cache reads by attention, fraction of HBM bandwidth.
        comm_bw: tensor-parallel all-reduce, fraction of link bandwidth.
        comm_latency_us: fixed latency of one all-reduce, us.
        step_overhead_us: host work per step (scheduling, input preparation,
            sampling), us.
        layer_overhead_us: kernel launches per layer, us.
        request_overhead_us: host work per request in the batch, us.
    """

    gemm_flops: Float[Array, "*g"]
    mem_bw: Float[Array, "*g"]
    attn_flops: Float[Array, "*g"]
    attn_bw: Float[Array, "*g"]
    comm_bw: Float[Array, "*g"]
    comm_latency_us: Float[Array, "*g"]
    step_overhead_us: Float[Array, "*g"]
    layer_overhead_us: Float[Array, "*g"]
    request_overhead_us: Float[Array, "*g"]

    def __init__(self, **values):
        set_named_fields(self, values, FACTOR_SPECS, "factor")
        _check_ranges(self)

    def as_dict(self) -> dict[str, Array]:
        """The factors by name."""
        return {n: getattr(self, n) for n in FACTOR_NAMES}


def _check_ranges(factors: "Factors") -> None:
    """``ValueError`` naming the first concrete factor outside its range: an
    efficiency outside (0, 1] (a negative one gives negative or infinite times), an
    overhead below 0, or a value that is not finite. Traced values (inside ``jit``,
    ``grad`` or ``vmap``) are not checked."""
    for name, (_, unit, kind) in FACTOR_SPECS.items():
        value = getattr(factors, name)
        if isinstance(value, jax.core.Tracer):
            continue
        v = np.asarray(value)
        if kind == "efficiency":
            bad, want = ~((v > 0) & (v <= 1)), f"in (0, 1] ({unit})"
        else:
            bad, want = ~((v >= 0) & np.isfinite(v)), f">= 0 and finite ({unit})"
        if bad.any():
            got = v[bad].ravel()[0]
            raise ValueError(f"Factors.{name} must be {want}, got {got:g}")


def default_factors() -> Factors:
    """The physical priors of :data:`FACTOR_SPECS`."""
    return Factors()
