"""GPU specifications as array data, and the bundled hardware catalog."""

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float


class Hardware(eqx.Module):
    """Peak rates of one GPU, as (broadcastable) float arrays.

    Attributes:
        flops_16: dense BF16/FP16 tensor-core peak, FLOP/s.
        flops_8: dense FP8 tensor-core peak, FLOP/s (the 16-bit peak where the GPU has
            no FP8 tensor cores: FP8 weights are then up-cast).
        hbm_bw: HBM bandwidth, bytes/s.
        link_bw: GPU-to-GPU bandwidth per direction (NVLink, else PCIe), bytes/s.
    """

    flops_16: Float[Array, ""]
    flops_8: Float[Array, ""]
    hbm_bw: Float[Array, ""]
    link_bw: Float[Array, ""]

    def __init__(self, *, flops_16, flops_8=None, hbm_bw, link_bw):
        self.flops_16 = jnp.asarray(flops_16, float)
        self.flops_8 = jnp.asarray(flops_16 if flops_8 is None else flops_8, float)
        self.hbm_bw = jnp.asarray(hbm_bw, float)
        self.link_bw = jnp.asarray(link_bw, float)


_T = 1e12
# The GPU of the reference traces, used where no hardware is named.
DEFAULT_HARDWARE = "h100-sxm"
# Sources: vendor datasheets (dense, i.e. without 2:4 sparsity).
_CATALOG: dict[str, dict[str, float]] = {
    # NVIDIA H100 SXM5 80GB datasheet: 989.5 TFLOP/s BF16, 1979 FP8, 3.35 TB/s HBM3;
    # NVLink 4: 900 GB/s bidirectional = 450 GB/s per direction.
    "h100-sxm": dict(
        flops_16=989.5 * _T, flops_8=1979 * _T, hbm_bw=3.35e12, link_bw=450e9
    ),
    # NVIDIA H200 SXM 141GB datasheet: same compute as H100 SXM, 4.8 TB/s HBM3e,
    # NVLink 4 (450 GB/s per direction).
    "h200": dict(flops_16=989.5 * _T, flops_8=1979 * _T, hbm_bw=4.8e12, link_bw=450e9),
    # NVIDIA A100 SXM4 80GB datasheet: 312 TFLOP/s BF16, no FP8 tensor cores,
    # 2.039 TB/s HBM2e; NVLink 3: 600 GB/s bidirectional = 300 GB/s per direction.
    "a100-sxm-80gb": dict(flops_16=312 * _T, hbm_bw=2.039e12, link_bw=300e9),
    # NVIDIA L40S datasheet: 362.05 TFLOP/s BF16, 733 FP8 (dense), 864 GB/s GDDR6;
    # no NVLink: PCIe Gen4 x16, 32 GB/s per direction.
    "l40s": dict(flops_16=362.05 * _T, flops_8=733 * _T, hbm_bw=864e9, link_bw=32e9),
}

_ALIASES = {
    "h100": "h100-sxm",
    "h100-80gb": "h100-sxm",
    "h100-sxm5": "h100-sxm",
    "h100-sxm-80gb": "h100-sxm",
    "h200-sxm": "h200",
    "a100": "a100-sxm-80gb",
    "a100-80gb": "a100-sxm-80gb",
    "a100-sxm": "a100-sxm-80gb",
}


def known_hardware() -> tuple[str, ...]:
    """Names in the bundled hardware catalog."""
    return tuple(_CATALOG)


def canonical_hardware(name: str) -> str:
    """Map a hardware name or alias (``H100``, ``h100_sxm``...) to its catalog name."""
    key = str(name).strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in _CATALOG:
        raise ValueError(
            f"unknown hardware {name!r}; known hardware: {', '.join(_CATALOG)} "
            "(or build your own diffmodel.Hardware)"
        )
    return key


def hardware(name: str) -> Hardware:
    """The catalog's :class:`Hardware` for ``name``; define others with ``Hardware``."""
    return Hardware(**_CATALOG[canonical_hardware(name)])
