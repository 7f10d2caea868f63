"""Learnable efficiency curves: efficiency as a smooth, monotone function of work.

A measured kernel reaches a fraction of the hardware peak that grows with its size: a
tiny GEMM is bound by launch and tile latency, a large one saturates near (but never
above) peak. :class:`SaturationCurve` writes that as a sigmoid in log problem size,

    eta(x) = eta_max * sigmoid(slope * (ln x - ln x_half)),

with ``eta_max`` in (0, 1) and ``slope`` in (0, 1) by reparameterisation (sigmoid of an
unconstrained value) and ``x_half`` (the size at which ``eta = eta_max / 2``) stored by
its log. ``slope <= 1`` keeps the time ``x / eta(x)`` non-decreasing in the work: below
``x_half`` it tends to ``x^(1 - slope)``, a latency floor when ``slope -> 1``.

:class:`RooflineCurves` pairs one curve on FLOPs (compute efficiency) with one on bytes
(bandwidth efficiency); :class:`AllReduceCurve` is a fixed latency plus a bandwidth
efficiency curve on message bytes. :class:`KernelCurves` holds one of each per operator
family. All save to and load from human-readable JSON with an exact round trip
(:mod:`diffmodel.kernels._curves_io`).
"""

import dataclasses
import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from .._kernel_families import ALL_FAMILIES, KERNEL_FAMILIES
from .._model._physics import SHARPNESS
from ._dsa import DsaCurves
from ._grid import ShapeGrid
from ._mla import MlaCurves

FORMAT_VERSION = 1
# The smallest size a curve takes (its unit: FLOP, byte, us at peak, waves).
MIN_SIZE = 1e-9


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def _softplus_inv(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class SaturationCurve(eqx.Module):
    """``eta(x) = eta_max sigmoid(slope (ln x - log_half))``: efficiency vs work size.

    Attributes:
        raw_eta_max: logit of the saturated efficiency ``eta_max`` (fraction of peak).
        raw_slope: logit of ``slope`` in (0, 1), per unit of ``ln x``.
        log_half: ``ln x_half``, with ``x`` in the curve's unit (FLOPs or bytes).
        unit: what ``x`` counts (static metadata, e.g. ``"FLOP"``, ``"byte"``).
    """

    raw_eta_max: Float[Array, ""]
    raw_slope: Float[Array, ""]
    log_half: Float[Array, ""]
    unit: str = eqx.field(static=True, default="FLOP")

    @classmethod
    def from_physical(
        cls, *, eta_max: float, slope: float, x_half: float, unit: str
    ) -> "SaturationCurve":
        """A curve from its physical parameters (``0 < eta_max, slope < 1``)."""
        for name, v in (("eta_max", eta_max), ("slope", slope)):
            if not 0.0 < v < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {v}")
        if not x_half > 0:
            raise ValueError(f"x_half must be > 0 ({unit}), got {x_half}")
        f = jnp.result_type(float)
        return cls(
            raw_eta_max=jnp.asarray(_logit(eta_max), f),
            raw_slope=jnp.asarray(_logit(slope), f),
            log_half=jnp.asarray(math.log(x_half), f),
            unit=unit,
        )

    @property
    def eta_max(self) -> Array:
        """Saturated efficiency, fraction of peak, in (0, 1)."""
        return jax.nn.sigmoid(self.raw_eta_max)

    @property
    def slope(self) -> Array:
        """Slope of ``logit(eta / eta_max)`` per unit of ``ln x``, in (0, 1)."""
        return jax.nn.sigmoid(self.raw_slope)

    def __call__(self, x: ArrayLike, logit_shift: ArrayLike = 0.0) -> Array:
        """Efficiency at work ``x`` (FLOPs or bytes, ``x > 0``), in (0, eta_max).

        ``logit_shift`` moves the saturated efficiency to ``sigmoid(logit(eta_max) +
        logit_shift)``, still below 1 (a faster variant of the same kernel).
        """
        # log of a non-positive size is undefined; sizes are floored far below any
        # real work (portable sizes, us at peak, are often below 1).
        lx = jnp.log(jnp.maximum(jnp.asarray(x), MIN_SIZE))
        eta_max = jax.nn.sigmoid(self.raw_eta_max + logit_shift)
        return eta_max * jax.nn.sigmoid(self.slope * (lx - self.log_half))

    def to_json(self) -> dict[str, Any]:
        """Raw (exact) and physical (readable) parameters as a JSON-able dict."""
        return {
            "unit": self.unit,
            "raw": {
                "raw_eta_max": float(self.raw_eta_max),
                "raw_slope": float(self.raw_slope),
                "log_half": float(self.log_half),
            },
            "physical": {
                "eta_max": float(self.eta_max),
                "slope": float(self.slope),
                "x_half": float(jnp.exp(self.log_half)),
                "x_half_unit": self.unit,
            },
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "SaturationCurve":
        """Inverse of :meth:`to_json` (reads the exact raw values)."""
        raw = _need(obj, "raw", "SaturationCurve")
        f = jnp.result_type(float)
        return cls(
            **{
                k: jnp.asarray(float(_need(raw, k, "SaturationCurve.raw")), f)
                for k in ("raw_eta_max", "raw_slope", "log_half")
            },
            unit=str(_need(obj, "unit", "SaturationCurve")),
        )


class Occupancy(eqx.Module):
    """``o(u) = sigmoid(slope (ln u - log_half))``: the fraction of the GPU kept busy.

    ``u`` counts independent units of parallel work (thread blocks: sequences times
    KV heads for decode attention, query tiles for prefill, output tiles for a GEMM).

    Attributes:
        raw_slope: logit of ``slope`` in (0, 1), per unit of ``ln u``.
        log_half: ``ln u_half``, the work units at which half the GPU is busy.
    """

    raw_slope: Float[Array, ""]
    log_half: Float[Array, ""]

    def __call__(self, units: ArrayLike) -> Array:
        """Occupancy in (0, 1) at ``units`` parallel work units."""
        lu = jnp.log(jnp.maximum(jnp.asarray(units), MIN_SIZE))
        return jax.nn.sigmoid(jax.nn.sigmoid(self.raw_slope) * (lu - self.log_half))

    def to_json(self) -> dict[str, Any]:
        return {
            "unit": "parallel work units",
            "raw": {
                "raw_slope": float(self.raw_slope),
                "log_half": float(self.log_half),
            },
            "physical": {
                "slope": float(jax.nn.sigmoid(self.raw_slope)),
                "u_half": float(jnp.exp(self.log_half)),
            },
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "Occupancy":
        raw = _need(obj, "raw", "Occupancy")
        f = jnp.result_type(float)
        return cls(
            **{
                k: jnp.asarray(float(_need(raw, k, "Occupancy.raw")), f)
                for k in ("raw_slope", "log_half")
            }
        )


class RooflineCurves(eqx.Module):
    """Efficiency curves and launch floor of one operator family (8-15 params).

    ``t = latency_us + s unit_ns / 1000 + smooth_max(f / (peak eta_f o),
    b / (bw eta_b o))`` with ``eta_f = flops(f)``, ``eta_b = bandwidth(b)``,
    occupancy ``o = occupancy(u)`` at ``u`` parallel work units and ``s`` scheduled
    thread blocks (``s = u`` unless the kernel says otherwise; ``o = 1`` without
    ``occupancy``; ``latency_us``, ``unit_ns`` are 0 when their raw value is
    ``None``). Kernels run with a tuned tile configuration (``tuned = 1``) saturate
    at ``sigmoid(logit(eta_max) + tuned_logit)`` of the compute peak instead
    (``tuned_logit`` 0 when ``raw_tuned`` is ``None``). Curves with an exponential
    term (attention's softmax) time the compute side as ``(t_mm^p +
    t_exp^p)^(1/p)``: ``t_mm = f / (peak eta_f o)`` on the tensor cores, ``t_exp
    = e / (exp_rate eta_exp o)`` on the special-function units (``e``
    exponentials, :attr:`KernelWork.exps`), ``p >= 1`` how well the kernel
    overlaps the two (``p = 1``: one after the other; ``p -> inf``: fully hidden).
    Expert-parallel MoE calls add ``ep_latency_us`` where the curves have it.

    Attributes:
        flops: compute efficiency (fraction of peak FLOP/s) vs the operator's FLOPs.
        bandwidth: bandwidth efficiency (fraction of HBM bandwidth) vs its bytes.
        occupancy: optional fraction of the GPU busy vs parallel work units.
        log_latency_us: optional log of the fixed time of one kernel (launch,
            prologue and epilogue), us (a log for the same reason as the per-unit
            cost: kernel floors run from ~2 us on H100 to ~60 us on Intel's B60).
        log_unit_ns: optional log of the time per parallel work unit (per-block
            setup, e.g. a sequence's block table in decode attention), amortised
            over the GPU, ns. A log: the per-block cost (~1 ns) and the per-wave
            cost of portable curves (~1000 ns) differ by the SM count, and a
            gradient step must move either by a factor, not by nanoseconds (a
            softplus parameter started at 1 ns stayed near 15 ns per wave where
            decode attention's data say about 3 us).
        raw_tuned: optional shift of the logit of the saturated compute efficiency
            of kernels with a tuned tile configuration (dimensionless).
        prologue: optional bandwidth efficiency (fraction of HBM bandwidth) vs bytes
            of the memory-bound passes an operator runs before its kernel (an
            unfused activation quantization: ``KernelWork.pre_bytes``); without it
            those bytes run at the ``bandwidth`` curve's efficiency.
        log_row_ns: optional log of the time per activation row of the
            quantization passes, ns (``KernelWork.rows``): vLLM's dynamic per-tensor
            FP8 quantization reduces each row to its maximum and folds it into one
            scale with an atomic, serialized over the rows (~5 ns each on H100 and
            B200, whatever the SM count), so a tall, thin activation costs
            ``m row_ns`` however few its bytes.
        log_kloop_ns: optional log of the time per K element of one output tile's
            main loop, ns (``KernelWork.depth``), per wave of tiles: a GEMM without
            split-K (CUTLASS FP8 and FP4) runs each tile's K loop serially on one SM,
            so a GEMM of few tiles and a long K takes ``ceil(tiles / SMs) k
            kloop_ns`` (~0.3-0.7 ns on H100 and B200) however few its FLOPs.
        cache: optional (portable curves only) fraction of the bytes that come
            from HBM vs the bytes over the GPU's L2 size, ``m(b / L2)`` in (0, 1)
            (an :class:`Occupancy` curve of that ratio): operands that fit in L2
            stay cached between the benchmark's repeated kernels, so memory time
            is ``m b / (bw eta_b o)``.
        raw_exp_eta: optional logit of the efficiency of the special-function units
            on the kernel's exponentials (fraction of ``Hardware.exp_rate``).
        log_exp_overlap: optional ``ln(p - 1)`` of the overlap exponent ``p`` of
            tensor-core and exponential time (dimensionless).
        log_overlap: optional ``ln(q - 1)`` of the sharpness ``q`` of the smooth
            maximum of compute and memory time, ``(t_c^q + t_m^q)^(1/q)``
            (dimensionless; without it ``q = 4``, :data:`SHARPNESS`): how well the
            kernel overlaps its loads with its math near the ridge point (``q = 1``:
            one after the other, ``q -> inf``: fully hidden).
        log_ep_latency_us: optional log of the fixed cost a kernel adds when its
            experts are split over GPUs (expert parallelism, ``KernelWork.
            expert_parallel``), us: vLLM's expert-parallel MoE maps the global
            expert ids to this GPU's and masks the other GPUs' slots, whatever the
            batch. Every GPU's tables show it at one token: H100 (OpenAI's Triton
            MXFP4 kernel) 67-69 us at EP 4-128 against 38-43 at TP 4-32, B200
            (FlashInfer) 23-25 against 20-21, L40S 38-39 against 28-30, RTX PRO
            6000 50 against 29-30.
        portable: static; ``False``: the curves take FLOPs, bytes and thread blocks
            (absolute sizes, meaningful on one GPU). ``True``: they take sizes that
            mean the same on every GPU (:meth:`KernelWork.time_us` converts): the
            work's time at peak in us (``f / peak``, ``b / bw``; their ratio is the
            intensity relative to the ridge point), and waves of the SM count
            (``u / SMs``; ``unit_ns`` is then the cost of one wave of blocks).
        shape_grid: optional (GEMM and attention families) one GPU's log-time
            corrections over three log sizes (:class:`~diffmodel.kernels.ShapeGrid`,
            fitted on its tables' residuals after the curves), applied to work
            that names them (``KernelWork.grid_a``, ``grid_b``, ``grid_c``).
    """

    flops: SaturationCurve
    bandwidth: SaturationCurve
    occupancy: Occupancy | None = None
    log_latency_us: Float[Array, ""] | None = None
    log_unit_ns: Float[Array, ""] | None = None
    raw_tuned: Float[Array, ""] | None = None
    prologue: SaturationCurve | None = None
    cache: Occupancy | None = None
    log_row_ns: Float[Array, ""] | None = None
    log_kloop_ns: Float[Array, ""] | None = None
    raw_exp_eta: Float[Array, ""] | None = None
    log_exp_overlap: Float[Array, ""] | None = None
    log_overlap: Float[Array, ""] | None = None
    log_ep_latency_us: Float[Array, ""] | None = None
    portable: bool = eqx.field(static=True, default=False)
    shape_grid: ShapeGrid | None = None

    @property
    def unit_ns(self) -> Array:
        """Time per parallel work unit, ns (>= 0)."""
        if self.log_unit_ns is None:
            return jnp.zeros((), jnp.result_type(float))
        return jnp.exp(self.log_unit_ns)

    @property
    def row_ns(self) -> Array:
        """Time per activation row of the quantization passes, ns (>= 0)."""
        return _exp_or_zero(self.log_row_ns)

    @property
    def kloop_ns(self) -> Array:
        """Time per K element of a wave of output tiles' main loop, ns (>= 0)."""
        return _exp_or_zero(self.log_kloop_ns)

    @property
    def ep_latency_us(self) -> Array:
        """Fixed cost of an expert-parallel call, us (>= 0; 0 without the term)."""
        return _exp_or_zero(self.log_ep_latency_us)

    @property
    def exp_eta(self) -> Array | None:
        """Efficiency of the special-function units on exponentials, in (0, 1);
        ``None`` without the exponential term."""
        return None if self.raw_exp_eta is None else jax.nn.sigmoid(self.raw_exp_eta)

    @property
    def exp_overlap(self) -> Array | None:
        """Overlap exponent ``p > 1`` of tensor-core and exponential time; ``None``
        without the exponential term."""
        if self.log_exp_overlap is None:
            return None
        return 1.0 + jnp.exp(self.log_exp_overlap)

    @property
    def overlap(self) -> Array | None:
        """Sharpness ``q > 1`` of the smooth maximum of compute and memory time;
        ``None`` without a fitted one (the fixed :data:`SHARPNESS`)."""
        if self.log_overlap is None:
            return None
        return 1.0 + jnp.exp(self.log_overlap)

    @property
    def latency_us(self) -> Array:
        """Fixed time of one kernel, us (>= 0)."""
        if self.log_latency_us is None:
            return jnp.zeros((), jnp.result_type(float))
        return jnp.exp(self.log_latency_us)

    @property
    def tuned_logit(self) -> Array:
        """Logit shift of the saturated compute efficiency of tuned kernels."""
        if self.raw_tuned is None:
            return jnp.zeros((), jnp.result_type(float))
        return self.raw_tuned

    def efficiencies(
        self,
        flops: ArrayLike,
        bytes_: ArrayLike,
        units: ArrayLike = 1.0,
        tuned: ArrayLike | None = None,
    ) -> tuple[Array, Array]:
        """``(eta_flops, eta_bw)`` in (0, 1) at the given work (FLOPs, bytes, units);
        ``tuned`` (0 or 1 per kernel, ``None``: 0) marks tuned tile configurations."""
        occ = 1.0 if self.occupancy is None else self.occupancy(units)
        if tuned is None or self.raw_tuned is None:
            eta_f = self.flops(flops)
        else:
            eta_f = self.flops(flops, jnp.asarray(tuned) * self.raw_tuned)
        return eta_f * occ, self.bandwidth(bytes_) * occ

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "flops": self.flops.to_json(),
            "bandwidth": self.bandwidth.to_json(),
        }
        raw, phys = {}, {}
        if self.log_latency_us is not None:
            raw["log_latency_us"] = float(self.log_latency_us)
            phys["latency_us"] = float(self.latency_us)
        if self.log_unit_ns is not None:
            raw["log_unit_ns"] = float(self.log_unit_ns)
            phys["unit_ns"] = float(self.unit_ns)
        if self.log_row_ns is not None:
            raw["log_row_ns"] = float(self.log_row_ns)
            phys["row_ns"] = float(self.row_ns)
        if self.log_kloop_ns is not None:
            raw["log_kloop_ns"] = float(self.log_kloop_ns)
            phys["kloop_ns"] = float(self.kloop_ns)
        if self.log_ep_latency_us is not None:
            raw["log_ep_latency_us"] = float(self.log_ep_latency_us)
            phys["ep_latency_us"] = float(self.ep_latency_us)
        if self.raw_exp_eta is not None:
            raw["raw_exp_eta"] = float(self.raw_exp_eta)
            phys["exp_eta"] = float(self.exp_eta)
        if self.log_exp_overlap is not None:
            raw["log_exp_overlap"] = float(self.log_exp_overlap)
            phys["exp_overlap_p"] = float(self.exp_overlap)
        if self.log_overlap is not None:
            raw["log_overlap"] = float(self.log_overlap)
            phys["overlap_q"] = float(self.overlap)
        if self.raw_tuned is not None:
            raw["raw_tuned"] = float(self.raw_tuned)
            phys["tuned_eta_max"] = float(
                jax.nn.sigmoid(self.flops.raw_eta_max + self.raw_tuned)
            )
        if raw:
            out["raw"], out["physical"] = raw, phys
        if self.occupancy is not None:
            out["occupancy"] = self.occupancy.to_json()
        if self.prologue is not None:
            out["prologue"] = self.prologue.to_json()
        if self.cache is not None:
            out["cache"] = self.cache.to_json()
        if self.portable:
            out["portable"] = True
        if self.shape_grid is not None:
            out["shape_grid"] = self.shape_grid.to_json()
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "RooflineCurves":
        occ = obj.get("occupancy") if isinstance(obj, dict) else None
        pro = obj.get("prologue") if isinstance(obj, dict) else None
        cch = obj.get("cache") if isinstance(obj, dict) else None
        raw = (obj.get("raw") if isinstance(obj, dict) else None) or {}
        f = jnp.result_type(float)

        def opt(key):
            return jnp.asarray(float(raw[key]), f) if key in raw else None

        return cls(
            flops=SaturationCurve.from_json(_need(obj, "flops", "RooflineCurves")),
            bandwidth=SaturationCurve.from_json(
                _need(obj, "bandwidth", "RooflineCurves")
            ),
            occupancy=None if occ is None else Occupancy.from_json(occ),
            log_latency_us=_log_of_softplus(raw, "log_latency_us", "raw_latency"),
            log_unit_ns=_log_of_softplus(raw, "log_unit_ns", "raw_unit_ns"),
            raw_tuned=opt("raw_tuned"),
            prologue=None if pro is None else SaturationCurve.from_json(pro),
            cache=None if cch is None else Occupancy.from_json(cch),
            log_row_ns=opt("log_row_ns"),
            log_kloop_ns=opt("log_kloop_ns"),
            raw_exp_eta=opt("raw_exp_eta"),
            log_exp_overlap=opt("log_exp_overlap"),
            log_overlap=opt("log_overlap"),
            log_ep_latency_us=opt("log_ep_latency_us"),
            portable=bool(obj.get("portable", False)),
            shape_grid=(
                ShapeGrid.from_json(obj["shape_grid"])
                if isinstance(obj, dict) and "shape_grid" in obj
                else None
            ),
        )


class AllReduceCurve(eqx.Module):
    """All-reduce: a fixed latency plus a ring transfer at a size-dependent efficiency.

    ``t = latency_us + (n-1) hop_us + 2 (n-1)/n bytes / (link_bw eta(x)) (n /
    2)^gamma``, ``x`` the
    message bytes, or (``portable``) its time on the link at full bandwidth, us
    (``bytes / link_bw``). ``gamma`` is how the transfer scales with the GPU count
    beyond the ring's ``2 (n-1)/n``: 0 where every GPU has its own links, about 1
    where all traffic crosses one shared fabric (PCIe GPUs through their host:
    L40S's 1 GB all-reduce takes 56 ms on 2 GPUs, 431 ms on 4 and 961 ms on 8),
    below 0 where more GPUs bring more links (NVSwitch); 0 without it.

    Attributes:
        raw_latency: softplus-inverse of the fixed latency of one all-reduce, us.
        bandwidth: efficiency of the link bandwidth vs message size.
        gpu_exponent: optional ``gamma`` (dimensionless).
        portable: static; whether the curve takes link time (us) instead of bytes.
        log_hop_us: optional log of the latency each further GPU adds, us (a ring's
            ``n - 1`` steps; 0 without it).
    """

    raw_latency: Float[Array, ""]
    bandwidth: SaturationCurve
    gpu_exponent: Float[Array, ""] | None = None
    portable: bool = eqx.field(static=True, default=False)
    log_hop_us: Float[Array, ""] | None = None

    @property
    def hop_us(self) -> Array:
        """Latency each further GPU adds, us (0 without a hop term)."""
        return _exp_or_zero(self.log_hop_us)

    def latency_at(self, n_gpus: ArrayLike) -> Array:
        """Fixed latency of one all-reduce over ``n_gpus`` GPUs, us."""
        return self.latency_us + (jnp.asarray(n_gpus) - 1.0) * self.hop_us

    @property
    def latency_us(self) -> Array:
        """Fixed latency of one all-reduce, us (> 0)."""
        return jax.nn.softplus(self.raw_latency)

    def to_json(self) -> dict[str, Any]:
        raw = {"raw_latency": float(self.raw_latency)}
        phys = {"latency_us": float(self.latency_us)}
        if self.gpu_exponent is not None:
            raw["gpu_exponent"] = phys["gpu_exponent"] = float(self.gpu_exponent)
        if self.log_hop_us is not None:
            raw["log_hop_us"] = float(self.log_hop_us)
            phys["hop_us"] = float(self.hop_us)
        return {
            "raw": raw,
            "physical": phys,
            "bandwidth": self.bandwidth.to_json(),
            "portable": self.portable,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "AllReduceCurve":
        raw = _need(obj, "raw", "AllReduceCurve")
        return cls(
            raw_latency=jnp.asarray(
                float(_need(raw, "raw_latency", "AllReduceCurve.raw")),
                jnp.result_type(float),
            ),
            bandwidth=SaturationCurve.from_json(
                _need(obj, "bandwidth", "AllReduceCurve")
            ),
            gpu_exponent=jnp.asarray(float(raw["gpu_exponent"]), jnp.result_type(float))
            if "gpu_exponent" in raw
            else None,
            portable=bool(obj.get("portable", False)),
            log_hop_us=jnp.asarray(float(raw["log_hop_us"]), jnp.result_type(float))
            if "log_hop_us" in raw
            else None,
        )


# Families with a fixed kernel floor; a GEMM's floor is already its occupancy at one
# tile (fitting one gives ~0), so GEMMs keep 8 parameters.
LATENCY_FAMILIES: tuple[str, ...] = (
    "prefill_attention",
    "decode_attention",
    "moe",
    "moe_fp8",
    "moe_w4a16",
    "moe_nvfp4",
)

# Families whose kernels come with tuned tile configurations for some shapes (vLLM's
# fused MoE), and so a compute-efficiency shift for those.
TUNED_FAMILIES: tuple[str, ...] = ("moe",)

# Families whose measured operator runs memory-bound passes outside its kernel,
# serially (vLLM's dynamic per-tensor FP8 linear quantizes its activation first; a
# fused MoE sums, or expands and finalizes, its routed slots), and so an efficiency
# curve of those passes of their own.
PROLOGUE_FAMILIES: tuple[str, ...] = (
    "gemm_fp8",
    "gemm_nvfp4",
    "moe",
    "moe_fp8",
    "moe_w4a16",
    "moe_nvfp4",
)

# Families whose kernels run each output tile's K loop serially (CUTLASS FP8 and
# FlashInfer FP4 linears, no split-K) and pay a per-row cost in their quantization
# passes, and so the main-loop and per-row times (``kloop_ns``, ``row_ns``). Fitted
# on 16-bit GEMMs (cuBLAS, which splits K) the main-loop time goes to ~0.
SERIAL_K_FAMILIES: tuple[str, ...] = ("gemm_fp8", "gemm_nvfp4")

# Families whose kernels walk a whole sequence's KV in one block where they do not
# split it (FlashAttention-2's multi-head decode: ``decode_attention_work``'s
# ``split_kv``), and so a main-loop time per cached token and wave of blocks
# (``kloop_ns``; no per-row cost). On held-out shapes of every GPU's vLLM tables
# (75/25, seeds 0-2) the mean MAPE over the GPUs went 14.7 / 14.5 / 12.2 -> 12.5 /
# 14.1 / 11.8% (A100 34.9 -> 16.7% on seed 0, where its multi-head shapes were
# held out: its kernel takes ~23 ns a cached token, which the curves without the
# term priced at about a fifth of that on long caches).
KLOOP_FAMILIES: tuple[str, ...] = ("decode_attention",)

# Families whose kernels pay a fixed cost of their own under expert parallelism
# (``ep_latency_us``), chosen on held-out shapes of every GPU's vLLM tables
# (experiments/gpus.py, 75/25, seeds 0 / 1 / 2; mean MAPE over the GPUs): MXFP4
# experts 15.8 / 16.1 / 14.7 -> 13.5 / 13.8 / 13.6%, FP8 ones 14.1 / 14.9 / 13.5 ->
# 14.1 / 14.2 / 13.4%. One kernel floor for both had priced tensor-parallel calls
# too slow and expert-parallel ones too fast at small batches. Not for 16-bit
# experts (14.8 / 14.1 / 14.4 -> 14.8 / 14.0 / 15.3%) nor NVFP4 ones (14.8 / 14.8
# / 13.2 -> 14.8 / 14.9 / 13.1%), where the term did not help.
EP_LATENCY_FAMILIES: tuple[str, ...] = ("moe_fp8", "moe_w4a16")

# Families whose sharpness of the compute/memory maximum is fitted
# (``RooflineCurves.log_overlap``) instead of fixed at 4. Chosen on held-out shapes
# of every GPU's vLLM tables (75/25, seeds 0-2, the GPU table's protocol): the mean
# MAPE over the GPUs went, without -> with it, 14.2 / 14.8 -> 13.8 / 13.7% (prefill
# attention, seeds 1-2) and 17.0 / 17.6 -> 16.6 / 17.2% (16-bit MoE), and by under
# 0.2 points either way on decode attention and the low-precision MoE, which keep
# 4. The GEMMs keep 4 too, although their held-out shapes gained (16-bit 11.9 /
# 12.2 / 13.1 -> 11.1 / 11.8 / 12.9%): pooled over the other GPUs, the fitted
# sharpness (1.85 for 16-bit GEMMs) priced the training rows of the public H100
# traces (the temporal split's first 60%, never fitted by the kernel sum) at 8.7 /
# 8.3 / 6.1% MAPE against 6.3 / 4.2 / 2.4% with 4 (Llama-2-70B general, codegen,
# CodeLlama-34B): a sharpness fitted on benchmarked kernels in isolation does not
# carry to the GEMMs of a serving step.
OVERLAP_FAMILIES: tuple[str, ...] = ("prefill_attention", "moe")

# Families whose kernels compute one exponential per score element (the softmax of
# causal prefill attention), and so an efficiency of the special-function units and
# an overlap exponent. Chosen on held-out shapes of every GPU's vLLM tables (75/25,
# seed 0, the GPU table's protocol): prefill attention's median MAPE 14.4% without
# the term, 13.2% with it (the fitted ``p`` is 1.2-1.7 on Ampere, Ada and Hopper,
# 6-30 on Blackwell, whose FlashInfer kernels hide it). Decode attention reads its
# KV cache at a few exponentials per byte: memory time hides them.
EXP_FAMILIES: tuple[str, ...] = ("prefill_attention",)


class KernelCurves(eqx.Module):
    """Calibrated curves of every kernel family of one GPU.

    Attributes:
        gemm_bf16, gemm_fp8: dense GEMMs (FP8 against the FP8 peak).
        gemm_nvfp4: dense NVFP4 GEMMs against the FP4 peak, with the one-pass
            quantization of their bf16 activation (Blackwell).
        prefill_attention: causal FlashAttention over new tokens.
        decode_attention: paged attention of one query token over its KV cache.
        moe: fused MoE (gated MLP of the routed experts), 16-bit or FP8 experts.
        moe_fp8: fused MoE of FP8 experts at the FP8 peak (DeepSeek-V3, Qwen3 FP8;
            calibrated on 128-block FP8 rows where measured, else per-tensor,
            the GPU's dominant kernel: FlashInfer's CUTLASS or TRT-LLM MoE, which
            take only local experts).
        moe_w4a16: fused MoE of 4-bit MXFP4 experts at the 16-bit peak (gpt-oss;
            vLLM's OpenAI Triton MXFP4 kernel, which takes only local experts).
        moe_nvfp4: fused MoE of NVFP4 experts (weights and activations) at the FP4
            peak (DeepSeek-V3.1 NVFP4, Qwen3 NVFP4; Blackwell: FlashInfer's TRT-LLM
            or CUTLASS kernels, which take only local experts).
        allreduce: tensor-parallel all-reduce.
        mla: vLLM's MLA attention module (DeepSeek) fitted on its measured modules
            (:class:`~diffmodel.kernels.MlaCurves`), or ``None`` where the GPU's
            tables have none: the kernel sum then times MLA layers on the GEMM and
            attention curves.
        dsa: vLLM's DeepSeek sparse attention module (DeepSeek-V3.2, GLM-5) fitted
            on its measured modules (:class:`~diffmodel.kernels.DsaCurves`), or
            ``None``: the kernel sum then refuses sparse-attention layers.
        hardware: the GPU the curves were measured on (static, a catalog name).
    """

    gemm_bf16: RooflineCurves
    gemm_fp8: RooflineCurves
    gemm_nvfp4: RooflineCurves
    prefill_attention: RooflineCurves
    decode_attention: RooflineCurves
    moe: RooflineCurves
    moe_fp8: RooflineCurves
    moe_w4a16: RooflineCurves
    moe_nvfp4: RooflineCurves
    allreduce: AllReduceCurve
    mla: "MlaCurves | None" = None
    dsa: "DsaCurves | None" = None
    hardware: str = eqx.field(static=True, default="h100-sxm")

    def n_params(self, family: str) -> int:
        """Learnable scalars of one family's curves."""
        return sum(jnp.size(x) for x in jax.tree.leaves(getattr(self, family)))

    def ported_to(self, hardware: str) -> "KernelCurves":
        """These curves used for another GPU: the same efficiencies, timed at that
        GPU's peaks, bandwidths, SM count and link (a GPU the kernel tables never
        measured). Only portable curves carry over (``diffmodel calibrate``'s
        default; ``calibrate_kernels(..., portable=True)``): curves in absolute
        sizes hold the measured GPU's scale and raise ``ValueError``. MLA and DSA
        module curves (``mla``, ``dsa``: efficiencies relative to the peaks, a
        fixed cost in us)
        carry over as they are; ``experiments/mla_kernels.py``'s leave-one-GPU-out
        lines measure what a module model fitted on other GPUs misses. The
        all-reduce's GPU exponent does not carry (it is the interconnect's): on
        another GPU the all-reduce is the plain ring."""
        from .._model._hardware import canonical_hardware

        absolute = [f for f in ALL_FAMILIES if not getattr(self, f).portable]
        if absolute:
            raise ValueError(
                f"curves of {self.hardware!r} for {absolute} are in absolute sizes "
                "and do not carry to another GPU; calibrate them portable "
                "(calibrate_kernels(..., portable=True) or 'diffmodel calibrate')"
            )
        target = canonical_hardware(hardware)
        out = dataclasses.replace(self, hardware=target)
        if target != canonical_hardware(self.hardware):
            # The all-reduce's scaling with the GPU count is the interconnect's (L40S's
            # PCIe fabric is not H100's NVSwitch): another GPU gets the plain ring.
            out = eqx.tree_at(
                lambda c: c.allreduce.gpu_exponent,
                out,
                None,
                is_leaf=lambda x: x is None,
            )
        return out


def default_roofline_curves(
    *,
    occupancy: bool = True,
    latency: bool = True,
    tuned: bool = False,
    prologue: bool = False,
    portable: bool = False,
    cache: bool = False,
    serial_k: bool = False,
    exp: bool = False,
    overlap: bool = False,
    kloop: bool = False,
    ep_latency: bool = False,
) -> RooflineCurves:
    """Starting curves: large kernels near 0.8 of peak, half of it at 1 GFLOP / 4 MB;
    optionally half the GPU busy at 64 work units, a 2 us kernel floor and 1 ns per
    work unit, a tuned-configuration shift (starting at 0: no gain), and a prologue
    bandwidth curve (0.5 of HBM bandwidth at large sizes, half of it at 4 MB).

    ``portable``: the same starting point in portable sizes (about H100's): half of
    the saturated efficiency at 1 us of work at peak, half the GPU busy at 0.5 waves,
    1 us per wave of blocks; ``cache`` (portable only): half the bytes from HBM at
    the L2 size; ``serial_k``: 1 ns per activation row of the quantization passes
    and 0.3 ns per K element of a wave's main loop (absolute times in both forms);
    ``exp``: an exponential term at 0.7 of the special-function units' rate,
    overlapped with ``p = 2``; ``overlap``: a fitted sharpness of the compute/memory
    maximum, starting at the fixed one (``q = 4``); ``kloop``: the main-loop time
    alone (0.3 ns per K element, no per-row cost), as ``serial_k`` has it;
    ``ep_latency``: a fixed cost of expert-parallel calls, starting at 5 us."""
    if cache and not portable:
        raise ValueError("cache=True needs portable=True (bytes relative to L2)")
    f = jnp.result_type(float)
    x_f, x_b, u_half = (1.0, 1.0, 0.5) if portable else (1e9, 4e6, 64.0)
    unit_f, unit_b = ("us at peak", "us at peak") if portable else ("FLOP", "byte")
    occ = Occupancy(
        raw_slope=jnp.asarray(_logit(0.8), f), log_half=jnp.asarray(math.log(u_half), f)
    )
    return RooflineCurves(
        occupancy=occ if occupancy else None,
        log_latency_us=jnp.asarray(math.log(2.0), f) if latency else None,
        log_unit_ns=jnp.asarray(math.log(1000.0 if portable else 1.0), f)
        if latency
        else None,
        raw_tuned=jnp.zeros((), f) if tuned else None,
        prologue=SaturationCurve.from_physical(
            eta_max=0.5, slope=0.8, x_half=x_b, unit=unit_b
        )
        if prologue
        else None,
        flops=SaturationCurve.from_physical(
            eta_max=0.8, slope=0.8, x_half=x_f, unit=unit_f
        ),
        bandwidth=SaturationCurve.from_physical(
            eta_max=0.8, slope=0.8, x_half=x_b, unit=unit_b
        ),
        cache=Occupancy(
            raw_slope=jnp.asarray(_logit(0.8), f), log_half=jnp.asarray(0.0, f)
        )
        if cache
        else None,
        log_row_ns=jnp.asarray(0.0, f) if serial_k else None,
        log_kloop_ns=jnp.asarray(math.log(0.3), f) if serial_k or kloop else None,
        raw_exp_eta=jnp.asarray(_logit(0.7), f) if exp else None,
        log_exp_overlap=jnp.zeros((), f) if exp else None,
        log_overlap=jnp.asarray(math.log(SHARPNESS - 1.0), f) if overlap else None,
        log_ep_latency_us=jnp.asarray(math.log(5.0), f) if ep_latency else None,
        portable=portable,
    )


def default_allreduce_curve(
    *, portable: bool = False, gpu_exponent: bool = True, hop: bool = False
) -> AllReduceCurve:
    """Starting all-reduce curve: 8 us latency, 0.7 of the link at large messages,
    half of it at 1 MB (``portable``: at 2 us on the link), (``gpu_exponent``)
    the ring's scaling with the GPU count (``gamma = 0``), and (``hop``) 1 us of
    latency per further GPU."""
    return AllReduceCurve(
        raw_latency=jnp.asarray(_softplus_inv(8.0), jnp.result_type(float)),
        bandwidth=SaturationCurve.from_physical(
            eta_max=0.7,
            slope=0.8,
            x_half=2.0 if portable else 1e6,
            unit="us on the link" if portable else "byte",
        ),
        gpu_exponent=jnp.zeros((), jnp.result_type(float)) if gpu_exponent else None,
        portable=portable,
        log_hop_us=jnp.zeros((), jnp.result_type(float)) if hop else None,
    )


def init_curves(family: str, *, portable: bool = False) -> RooflineCurves:
    """Starting curves of a family: a kernel floor where one is physical, a
    tuned-configuration gain where the kernels have tuned tile configurations, and
    a prologue curve where the operator quantizes its activation first, and
    main-loop and per-row times where its GEMM does not split K, a fixed cost of
    expert-parallel calls where held-out shapes chose one, an
    exponential term where its kernel computes a softmax over many pairs, and a
    fitted sharpness of the compute/memory maximum where held-out shapes chose one
    (:data:`OVERLAP_FAMILIES`)."""
    return default_roofline_curves(
        latency=family in LATENCY_FAMILIES,
        tuned=family in TUNED_FAMILIES,
        prologue=family in PROLOGUE_FAMILIES,
        serial_k=family in SERIAL_K_FAMILIES,
        exp=family in EXP_FAMILIES,
        overlap=family in OVERLAP_FAMILIES,
        kloop=family in KLOOP_FAMILIES,
        ep_latency=family in EP_LATENCY_FAMILIES,
        portable=portable,
    )


def default_kernel_curves(
    hardware: str = "h100-sxm", *, portable: bool = False
) -> KernelCurves:
    """Uncalibrated starting point for :func:`diffmodel.calibrate_kernels`."""
    return KernelCurves(
        **{f: init_curves(f, portable=portable) for f in KERNEL_FAMILIES},
        allreduce=default_allreduce_curve(portable=portable),
        hardware=hardware,
    )


def _exp_or_zero(log_value: Array | None) -> Array:
    if log_value is None:
        return jnp.zeros((), jnp.result_type(float))
    return jnp.exp(log_value)


def _log_of_softplus(raw: dict[str, Any], key: str, legacy: str) -> Array | None:
    """A log-parametrised time (``key``) from a curves file; files written before it
    was a log hold ``legacy``, the softplus-inverse of the same time (converted)."""
    f = jnp.result_type(float)
    if key in raw:
        return jnp.asarray(float(raw[key]), f)
    if legacy in raw:
        return jnp.asarray(math.log(float(jax.nn.softplus(float(raw[legacy])))), f)
    return None


def _need(obj: Any, key: str, what: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise ValueError(f"{what} JSON is missing key {key!r}")
    return obj[key]
