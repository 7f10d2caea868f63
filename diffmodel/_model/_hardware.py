"""GPU specifications as array data, and the hardware catalog.

Peaks, HBM bandwidth and links come from the system YAMLs of the ``aiconfigurator-core``
kernel database (``<system>.yaml``, read in place; the ``aic`` extra); four GPUs also
have a built-in vendor-datasheet entry, so they work without it. SM counts and clocks,
which the YAMLs lack, are written below with their public source.
"""

import dataclasses

import equinox as eqx
import numpy as np
from jaxtyping import Array, Float

from .._arrays import device_array


class Hardware(eqx.Module):
    """Peak rates of one GPU, as (broadcastable) float arrays.

    Attributes:
        flops_16: dense BF16/FP16 tensor-core peak, FLOP/s.
        flops_8: dense FP8 tensor-core peak, FLOP/s (the 16-bit peak where the GPU has
            no FP8 tensor cores: FP8 weights are then up-cast).
        flops_4: dense FP4 tensor-core peak, FLOP/s (Blackwell); the FP8 peak where
            the GPU has no FP4 tensor cores (Hopper, Ada: FP4 weights are then
            up-cast to FP8 for the matmul, so FP4 saves bytes, not FLOPs).
        hbm_bw: HBM bandwidth, bytes/s.
        link_bw: GPU-to-GPU bandwidth per direction (NVLink, else PCIe), bytes/s.
        sm_count: optional streaming multiprocessors (Intel: Xe cores), for waves of
            parallel work; ``None`` where unknown (portable curves then refuse it).
        clock_ghz: optional boost clock, GHz: with ``sm_count``, the rate of the
            special-function units (:attr:`exp_rate`).
        l2_bytes: optional last-level (L2) cache size, bytes, for operands that
            stay cached between repeated kernels; ``None`` where unknown.
    """

    flops_16: Float[Array, ""]
    flops_8: Float[Array, ""]
    flops_4: Float[Array, ""]
    hbm_bw: Float[Array, ""]
    link_bw: Float[Array, ""]
    sm_count: Float[Array, ""] | None
    clock_ghz: Float[Array, ""] | None
    l2_bytes: Float[Array, ""] | None

    def __init__(
        self,
        *,
        flops_16,
        flops_8=None,
        flops_4=None,
        hbm_bw,
        link_bw,
        sm_count=None,
        clock_ghz=None,
        l2_bytes=None,
    ):
        self.flops_16 = device_array(flops_16, float)
        self.flops_8 = device_array(flops_16 if flops_8 is None else flops_8, float)
        self.flops_4 = self.flops_8 if flops_4 is None else device_array(flops_4, float)
        self.hbm_bw = device_array(hbm_bw, float)
        self.link_bw = device_array(link_bw, float)
        self.sm_count = None if sm_count is None else device_array(sm_count, float)
        self.clock_ghz = None if clock_ghz is None else device_array(clock_ghz, float)
        self.l2_bytes = None if l2_bytes is None else device_array(l2_bytes, float)

    @property
    def exp_rate(self) -> Array | None:
        """Exponentials per second of the special-function units (the softmax's
        ``exp2`` in attention kernels): ``sm_count clock EXP_PER_SM_CLOCK``;
        ``None`` where the SM count or the clock is unknown."""
        if self.sm_count is None or self.clock_ghz is None:
            return None
        return self.sm_count * self.clock_ghz * 1e9 * EXP_PER_SM_CLOCK


# Results per clock per SM of the 32-bit exp2 (MUFU.EX2), from the throughput table
# of native arithmetic instructions in NVIDIA's CUDA C++ Programming Guide: 16 for
# every compute capability from 5.x to 12.x (Ampere, Ada, Hopper, Blackwell). Against
# 1024 dense 16-bit tensor FLOPs per clock per SM on H100 (and 2048 on B200), one exp
# per score element costs as much as ~64 (~128) FLOPs of the 4 dh per element that
# QK^T and PV do: FlashAttention-3 and -4 exist to hide it. Intel does not publish
# the rate of its Xe cores' extended-math unit; the same 16 is assumed for them.
EXP_PER_SM_CLOCK = 16.0


@dataclasses.dataclass(frozen=True)
class GpuSpec:
    """What the YAMLs lack, with its source: SMs, boost clock (GHz), L2 (MiB)."""

    system: str
    sm_count: int
    clock_ghz: float
    source: str
    l2_mib: int


# Catalog name -> database system, SM count, boost clock, L2 size (MiB), with the
# public source (whitepapers, datasheets; where a number is less certain, it says).
SPECS: dict[str, GpuSpec] = {
    "h100-sxm": GpuSpec(
        "h100_sxm", 132, 1.98, "NVIDIA H100 Tensor Core GPU Architecture whitepaper", 50
    ),
    "h200": GpuSpec("h200_sxm", 132, 1.98, "NVIDIA H200 datasheet (GH100)", 50),
    "a100-sxm-80gb": GpuSpec(
        "a100_sxm", 108, 1.41, "NVIDIA A100 Tensor Core GPU Architecture whitepaper", 40
    ),
    "l40s": GpuSpec("l40s", 142, 2.52, "NVIDIA L40S datasheet; Ada whitepaper", 96),
    "b200": GpuSpec(
        "b200_sxm",
        148,
        1.965,
        "TechPowerUp GPU database, B200 SXM; L2 from public microbenchmark reports "
        "(approximate)",
        126,
    ),
    "b300": GpuSpec(
        "b300_sxm",
        160,
        2.032,
        "NVIDIA 'Inside Blackwell Ultra' blog (160 SMs); L2 as B200 (approximate)",
        126,
    ),
    "gb200": GpuSpec("gb200", 148, 1.965, "as B200 (approximate L2)", 126),
    "gb300": GpuSpec("gb300", 160, 2.032, "as B300 (approximate L2)", 126),
    "rtx-pro-6000": GpuSpec(
        "rtx_pro_6000_server",
        188,
        2.617,
        "NVIDIA RTX PRO 6000 Blackwell Server Edition datasheet (24,064 cores, "
        "128 MB L2)",
        128,
    ),
    "b60": GpuSpec(
        "b60",
        20,
        2.4,
        "Intel Arc Pro B60 product brief (20 Xe cores); L2 as Arc B580 (BMG-G21)",
        18,
    ),
    "h100-pcie": GpuSpec("h100_pcie", 114, 1.755, "NVIDIA H100 whitepaper (PCIe)", 50),
    "a100-pcie": GpuSpec("a100_pcie", 108, 1.41, "NVIDIA A100 whitepaper (PCIe)", 40),
    "l4": GpuSpec("l4", 58, 2.04, "NVIDIA L4 datasheet; Ada whitepaper", 48),
    "a30": GpuSpec("a30", 56, 1.44, "NVIDIA A30 datasheet", 24),
}

_T = 1e12
# The GPU of the reference traces, used where no hardware is named.
DEFAULT_HARDWARE = "h100-sxm"
# Built-in entries (vendor datasheets, dense, i.e. without 2:4 sparsity): they work
# without the database. Their YAMLs agree, except H100's 989 / 1978 TFLOP/s against
# the datasheet's 989.5 / 1979 (a rounding, 0.05%); the datasheet figures are kept.
_DATASHEET: dict[str, dict[str, float]] = {
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
    "b200-sxm": "b200",
    "b300-sxm": "b300",
    "rtx-pro-6000-server": "rtx-pro-6000",
}
# Every database system name ("h100_sxm", "rtx_pro_6000_server") is an alias too.
_ALIASES.update({s.system.replace("_", "-"): name for name, s in SPECS.items()})
_ALIASES = {k: v for k, v in _ALIASES.items() if k != v}


def known_hardware() -> tuple[str, ...]:
    """Names in the hardware catalog (past the built-in four: need the database)."""
    return tuple(SPECS)


def canonical_hardware(name: str) -> str:
    """Map a hardware name or alias (``H100``, ``h100_sxm``...) to its catalog name."""
    key = str(name).strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in SPECS:
        raise ValueError(
            f"unknown hardware {name!r}; known hardware: {', '.join(SPECS)} "
            "(or build your own diffmodel.Hardware)"
        )
    return key


def hardware_system(name: str) -> str:
    """The kernel database's system name (``h100_sxm``) of a catalog name or alias."""
    return SPECS[canonical_hardware(name)].system


def spec_from_yaml(spec: dict) -> dict[str, float]:
    """``Hardware`` keyword arguments from a parsed system YAML: ``bfloat16_tc_flops``,
    ``fp8_tc_flops`` (the 16-bit peak where absent: no FP8 tensor cores),
    ``fp4_tc_flops`` (the FP8 peak where absent: no FP4 tensor cores), ``mem_bw``,
    ``intra_node_bw`` (NVLink, else PCIe, per direction)."""
    gpu, node = spec["gpu"], spec["node"]
    for key in ("bfloat16_tc_flops", "mem_bw"):
        if key not in gpu:
            raise ValueError(f"system YAML 'gpu' section lacks {key!r}")
    if "intra_node_bw" not in node:
        raise ValueError("system YAML 'node' section lacks 'intra_node_bw'")
    flops_8 = float(gpu.get("fp8_tc_flops", gpu["bfloat16_tc_flops"]))
    return dict(
        flops_16=float(gpu["bfloat16_tc_flops"]),
        flops_8=flops_8,
        flops_4=float(gpu.get("fp4_tc_flops", flops_8)),
        hbm_bw=float(gpu["mem_bw"]),
        link_bw=float(node["intra_node_bw"]),
    )


PCIE_LINK_BW = 100e9
"""Bytes/s per direction: a GPU whose GPU-to-GPU link is slower is a PCIe card (L40S,
RTX PRO 6000, B60, L4, A30, the PCIe H100 and A100: a board power cap of 72-600 W,
most with GDDR memory), the others are NVLink modules (HBM, 400-1,400 W). The gap is
wide: 28-64 GB/s against 300-900."""


def gpu_class(gpu: "str | Hardware") -> str:
    """``"pcie"`` for a PCIe card, ``"nvlink"`` for an NVLink module
    (:data:`PCIE_LINK_BW`), from the link bandwidth alone: known before the GPU's
    kernels are measured. ``gpu``: a catalog name or alias, or a :class:`Hardware`."""
    hw = gpu if isinstance(gpu, Hardware) else hardware(gpu)
    return "pcie" if float(hw.link_bw) < PCIE_LINK_BW else "nvlink"


# Another GPU within this factor on every published spec (:func:`sibling_gpus`) is
# a sibling. In the kernel database's GPUs, H100 / H200 (1.43: the HBM) and the four
# Blackwell modules B200 / B300 / GB200 / GB300 (1.08-1.11) are siblings; every
# other GPU's nearest is 2.07x away or more (L40S / RTX PRO 6000), so any factor
# from 1.45 to 2 draws the same pairs.
SIBLING_RATIO = 1.5


def _spec_vector(name: str) -> np.ndarray:
    h = hardware(name)
    fields = (h.flops_16, h.hbm_bw, h.link_bw, h.sm_count, h.clock_ghz, h.l2_bytes)
    if any(f is None for f in fields):
        raise ValueError(
            f"{name}: sibling_gpus needs its SM count, clock and L2 size (a catalog "
            "GPU with a spec entry)"
        )
    return np.log([float(f) for f in fields])


def sibling_gpus(gpu: str, candidates, ratio: float = SIBLING_RATIO) -> tuple[str, ...]:
    """The GPUs of ``candidates`` (catalog names or aliases; ``gpu`` itself left out)
    within ``ratio`` of ``gpu`` on every published spec: 16-bit tensor peak, HBM
    and link bandwidth (bytes/s), SM count, boost clock (GHz) and L2 size (bytes).
    Siblings share an architecture and a memory system, so a kernel's curves on
    one time it on the other (``experiments/gpus.py``: leave one GPU out). Known
    before the GPU is measured. Raises ``ValueError`` for an unknown GPU or a
    ``ratio`` below 1."""
    if not ratio >= 1.0:
        raise ValueError(f"ratio must be at least 1, got {ratio}")
    name = canonical_hardware(gpu)
    mine = _spec_vector(name)
    out = []
    for c in candidates:
        other = canonical_hardware(c)
        if other == name or other in out:
            continue
        if np.abs(_spec_vector(other) - mine).max() <= np.log(ratio):
            out.append(other)
    return tuple(out)


def hardware(name: str) -> Hardware:
    """The catalog's :class:`Hardware` for ``name``; define others with ``Hardware``.

    The built-in datasheet entries need nothing; the others read their system YAML
    from the installed kernel database (``ValueError`` naming the extra without it).
    """
    key = canonical_hardware(name)
    sp = SPECS[key]
    extra = dict(
        sm_count=sp.sm_count, clock_ghz=sp.clock_ghz, l2_bytes=sp.l2_mib * 2**20
    )
    if key in _DATASHEET:
        return Hardware(**_DATASHEET[key], **extra)
    from ..kernels._database import system_spec  # the database layer, loaded lazily

    return Hardware(**spec_from_yaml(system_spec(SPECS[key].system)), **extra)


def system_info(name: str) -> dict:
    """Everything the catalog knows of one GPU, for listings: peaks, bandwidths, its
    class (:func:`gpu_class`), GPUs per node and memory (from the YAML where
    installed), SMs, clock, sources."""
    key = canonical_hardware(name)
    s = SPECS[key]
    hw = hardware(key)
    out = dict(
        name=key,
        system=s.system,
        bf16_tflops=float(hw.flops_16) / _T,
        fp8_tflops=float(hw.flops_8) / _T,
        hbm_tb_s=float(hw.hbm_bw) / _T,
        link_gb_s=float(hw.link_bw) / 1e9,
        gpu_class=gpu_class(hw),
        sm_count=s.sm_count,
        clock_ghz=s.clock_ghz,
        l2_mib=s.l2_mib,
        sm_source=s.source,
        peaks_source="vendor datasheet" if key in _DATASHEET else f"{s.system}.yaml",
    )
    try:
        from ..kernels._database import system_spec

        spec = system_spec(s.system)
        out["gpus_per_node"] = int(spec["node"].get("num_gpus_per_node", 0))
        out["mem_gib"] = float(spec["gpu"].get("mem_capacity", 0)) / 2**30
    except ValueError:
        pass
    return out
