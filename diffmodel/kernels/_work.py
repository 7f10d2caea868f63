"""The work each measured kernel does (FLOPs, bytes, parallel units) and its predicted
time, from the step model's own operator formulas (:mod:`diffmodel._model._physics`),
with efficiencies either constants or curves (:mod:`diffmodel.kernels._curves`).

GEMMs, tiled causal prefill attention, paged decode attention and all-reduce; vLLM's
fused MoE (its tiles, tuned configurations and routing distributions) is in
:mod:`diffmodel.kernels._moe`.
"""

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from .._arrays import on_host
from .._model._hardware import Hardware
from .._model._physics import (
    all_to_all_us,
    allreduce_us,
    attention_work,
    gemm_act_quant_bytes,
    gemm_work,
    power_max,
    roofline_us,
    smooth_max,
    tensor_peak,
)
from ..kernels._curves import AllReduceCurve, RooflineCurves

# --------------------------------------------------------------- operator work and time


Efficiency = RooflineCurves | tuple[ArrayLike, ArrayLike]


class KernelWork(eqx.Module):
    """Work of a set of kernels, and the peaks it runs against (arrays, one per kernel).

    Attributes:
        flops: floating-point operations.
        bytes: bytes moved to or from HBM.
        peak_flops: FLOP/s of the tensor cores used (16-bit or FP8).
        bandwidth: HBM bandwidth, bytes/s.
        units: independent units of parallel work (thread blocks), for occupancy.
        blocks: optional thread blocks scheduled, for the per-block cost, where they
            differ from ``units`` (blocks that exit at once do no parallel work).
        tuned: optional 1 where the kernel runs a tuned tile configuration, else 0.
        pre_bytes: optional HBM bytes of memory-bound passes the operator runs before
            its kernel, serially (an unfused quantization of its activation), bytes.
        sms: optional SM count of the GPU, for portable curves (waves of blocks).
        l2: optional L2 cache size of the GPU, bytes, for curves with a ``cache``.
        rows: optional activation rows the quantization passes (``pre_bytes``) go
            over, for curves with a per-row cost (``RooflineCurves.row_ns``).
        depth: optional length of each output tile's main loop, K elements (GEMMs),
            for curves with a main-loop cost (``RooflineCurves.kloop_ns``).
        exps: optional exponentials the kernel computes (attention: one per score
            element), for curves with an exponential term.
        exp_rate: optional exponentials per second of the GPU's special-function
            units (``Hardware.exp_rate``).
        grid_a, grid_b, grid_c: optional sizes a shape grid reads
            (``RooflineCurves.shape_grid``): a GEMM's ``(m, n, k)``; attention's
            ``(batch x query heads, tokens per sequence, query heads per KV head)``
            (new tokens for prefill, cached ones for decode).
        expert_parallel: optional 1 where the kernel's experts are split over GPUs
            (fused MoE at ``ep > 1``), else 0, for curves with an expert-parallel
            cost (``RooflineCurves.ep_latency_us``).
    """

    flops: Float[Array, "*kernels"]
    bytes: Float[Array, "*kernels"]
    peak_flops: Float[Array, "*kernels"]
    bandwidth: Float[Array, "*kernels"]
    units: Float[Array, "*kernels"]
    blocks: Float[Array, "*kernels"] | None = None
    tuned: Float[Array, "*kernels"] | None = None
    pre_bytes: Float[Array, "*kernels"] | None = None
    sms: Float[Array, "*kernels"] | None = None
    l2: Float[Array, "*kernels"] | None = None
    rows: Float[Array, "*kernels"] | None = None
    depth: Float[Array, "*kernels"] | None = None
    exps: Float[Array, "*kernels"] | None = None
    exp_rate: Float[Array, "*kernels"] | None = None
    grid_a: Float[Array, "*kernels"] | None = None
    grid_b: Float[Array, "*kernels"] | None = None
    grid_c: Float[Array, "*kernels"] | None = None
    expert_parallel: Float[Array, "*kernels"] | None = None

    def time_us(self, eff: Efficiency) -> Float[Array, "*kernels"]:
        """Time, us: ``roofline_us`` with constant ``(eta_flops, eta_bw)``, or with
        :class:`RooflineCurves` (efficiencies of the work plus the kernel floor).

        ``pre_bytes`` add ``pre_bytes / (bw eta_pre)``: ``eta_pre`` is the curves'
        ``prologue`` efficiency at ``pre_bytes`` (their ``bandwidth`` curve without
        one), or the constant ``eta_bw``. Portable curves see the work as its time
        at peak (us) and blocks as waves of ``sms`` (:class:`RooflineCurves`).
        Curves with a per-row cost add ``rows row_ns``, those with an
        expert-parallel cost ``expert_parallel ep_latency_us``. With a main-loop cost,
        ``ceil(units / sms) depth kloop_ns`` (one serial main loop per wave of
        blocks: a GEMM's output tiles without split-K, a decode block walking its
        sequence's whole KV) is a third side of the maximum: a latency-bound walk
        that a busy GPU's bandwidth or compute time hides (chosen on held-out
        shapes of every GPU's tables, 75/25, seeds 0-2: the mean MAPE over the
        GPUs went 15.6 / 15.9 / 14.7 -> 14.8 / 14.7 / 13.7% for FP8 GEMMs and
        10.4 / 10.9 / 9.8 -> 9.9 / 9.5 / 9.2% for NVFP4 against adding it to the
        floor). Curves with an exponential term, on work with ``exps``, time
        the compute side as the tensor-core and exponential times overlapped
        (:class:`RooflineCurves`). Curves with a shape grid multiply the time by
        the grid's correction at the work's ``grid_a``, ``grid_b``, ``grid_c``
        (a GEMM's ``(m, n, k)``), never below the time at peak
        (:class:`~diffmodel.kernels.ShapeGrid`).

        Raises ``ValueError`` for portable or main-loop curves on work without
        ``sms``, and for an exponential term on work without ``exp_rate``."""
        serial = None
        if isinstance(eff, RooflineCurves):
            blocks = self.units if self.blocks is None else self.blocks
            f, b, u, pre_b = self.flops, self.bytes, self.units, self.pre_bytes
            if eff.portable:
                if self.sms is None:
                    raise ValueError(
                        "portable curves need the GPU's SM count: "
                        "Hardware(sm_count=...) or a catalog GPU"
                    )
                f = f / self.peak_flops * 1e6
                b = b / self.bandwidth * 1e6
                u, blocks = u / self.sms, blocks / self.sms
                if pre_b is not None:
                    pre_b = pre_b / self.bandwidth * 1e6
            eta_f, eta_b = eff.efficiencies(f, b, u, self.tuned)
            if eff.raw_exp_eta is not None and self.exps is not None:
                eta_f = eta_f / self._exp_factor(eff, u, eta_f)
            mem_bytes = self.bytes
            if eff.cache is not None:
                if self.l2 is None or not eff.portable:
                    raise ValueError(
                        "curves with a cache need portable=True and the GPU's L2 "
                        "size: Hardware(l2_bytes=...) or a catalog GPU"
                    )
                mem_bytes = mem_bytes * eff.cache(self.bytes / self.l2)
            floor = eff.latency_us + blocks * eff.unit_ns * 1e-3
            if eff.log_row_ns is not None and self.rows is not None:
                floor = floor + self.rows * eff.row_ns * 1e-3
            if eff.log_ep_latency_us is not None and self.expert_parallel is not None:
                floor = floor + self.expert_parallel * eff.ep_latency_us
            if eff.log_kloop_ns is not None and self.depth is not None:
                if self.sms is None:
                    raise ValueError(
                        "curves with a main-loop cost need the GPU's SM count: "
                        "Hardware(sm_count=...) or a catalog GPU"
                    )
                waves = jnp.ceil(self.units / self.sms)
                serial = waves * self.depth * eff.kloop_ns * 1e-3
            if self.pre_bytes is not None:
                pre = eff.bandwidth if eff.prologue is None else eff.prologue
                eta_pre = pre(pre_b)
        else:
            eta_f, eta_b = (jnp.asarray(e) for e in eff)
            floor = 0.0
            eta_pre = eta_b
            mem_bytes = self.bytes
        if self.pre_bytes is not None:
            floor = floor + self.pre_bytes / (self.bandwidth * eta_pre) * 1e6
        q = eff.overlap if isinstance(eff, RooflineCurves) else None
        if q is None:
            t = roofline_us(
                self.flops, mem_bytes, self.peak_flops, self.bandwidth, eta_f, eta_b
            )
        else:
            compute = self.flops / self.peak_flops * 1e6 / eta_f
            memory = mem_bytes / self.bandwidth * 1e6 / eta_b
            t = power_max(compute, memory, q)
        if serial is not None:  # a third side: one block's serial main loop
            t = smooth_max(t, serial) if q is None else power_max(t, serial, q)
        grid = eff.shape_grid if isinstance(eff, RooflineCurves) else None
        if grid is None or self.grid_a is None:
            return floor + t
        moved = (floor + t) * jnp.exp(grid(self.grid_a, self.grid_b, self.grid_c))
        at_peak = jnp.maximum(self.flops / self.peak_flops, self.bytes / self.bandwidth)
        return jnp.maximum(moved, at_peak * 1e6)

    def _exp_factor(self, eff: RooflineCurves, units, eta_f) -> Array:
        """``t_c / t_mm >= 1``: the compute time with the exponentials overlapped
        (``(t_mm^p + t_exp^p)^(1/p)``) over the tensor-core time alone (1 where
        the kernel has no FLOPs)."""
        if self.exp_rate is None:
            raise ValueError(
                "curves with an exponential term need the GPU's exponential rate: "
                "Hardware(sm_count=..., clock_ghz=...) or a catalog GPU"
            )
        occ = 1.0 if eff.occupancy is None else eff.occupancy(units)
        t_mm = self.flops / self.peak_flops * 1e6 / eta_f
        t_exp = self.exps / self.exp_rate * 1e6 / (eff.exp_eta * occ)
        busy = t_mm > 0
        r = jnp.where(busy, t_exp / jnp.where(busy, t_mm, 1.0), 0.0)
        return power_max(jnp.ones_like(r), r, eff.exp_overlap)


def _flags(x: ArrayLike, name: str, per: str) -> Array:
    """``x`` as a float array of 0/1 flags; ``ValueError`` naming ``name`` for any
    other value (checked where known, not under a trace)."""
    if on_host(x):
        v = np.asarray(x, float)
        if not np.isin(v, (0.0, 1.0)).all():
            raise ValueError(
                f"{name} must be 0 or 1 per {per}, got {np.unique(v).tolist()}"
            )
    return jnp.asarray(x, float)


def _peak(hw: Hardware, dtype_bytes: ArrayLike) -> Array:
    return tensor_peak(dtype_bytes, hw.flops_16, hw.flops_8, hw.flops_4)


# The tensor cores compute a GEMM's rows in whole slices of 32: ``m = 257`` costs
# the FLOPs of 288. Chosen on held-out shapes of every GPU's 16-bit GEMM tables
# (75/25 by (n, k), seeds 0-2; no padding, slices of 16, 32, 64, 128): the mean MAPE
# over the ten GPUs went 11.1 / 11.8 / 12.9% -> 10.7 / 11.5 / 12.5% with 32, the
# best; FP8 and FP4 GEMMs moved by under 0.2 points. The tables time each
# ``m = 64 j`` beside ``m = 64 j + 1``, which is 3-9% slower on every GPU between
# ``m`` 128 and 1024 where the work was the same but for one row.
GEMM_M_SLICE = 32.0


def gemm_kernel_work(
    m: ArrayLike,
    n: ArrayLike,
    k: ArrayLike,
    hw: Hardware,
    dtype_bytes: ArrayLike = 2.0,
    out_bytes: ArrayLike | None = None,
    act_quant: ArrayLike | None = None,
    weight_bytes: ArrayLike | None = None,
) -> KernelWork:
    """A GEMM ``[m, k] @ [k, n]`` in ``dtype_bytes`` (1: FP8 peak, 0.5: FP4) on ``hw``.

    ``f = 2 m' n k`` with ``m' = ceil(m / 32) 32`` (:data:`GEMM_M_SLICE`: the rows
    the tensor cores compute); ``b = k n weight_bytes + m k dtype_bytes + m n
    out_bytes`` (``gemm_work``; ``weight_bytes`` and ``out_bytes`` default to
    ``dtype_bytes``; a weight-only quantized GEMM, e.g. 4-bit weights with 16-bit
    operands, reads fewer weight bytes at the ``dtype_bytes`` peak). ``act_quant``
    (1 or 0 per GEMM, ``None``: none) marks GEMMs that first quantize their bf16
    activation in separate passes: to per-tensor FP8 in two, ``pre_bytes = m k (2 2
    + 1)``, to NVFP4 (``dtype_bytes`` 0.5) in one, ``m k (2 + 0.5625)``
    (``gemm_act_quant_bytes``), over ``rows = m``. ``depth = k``: the length of each
    output tile's main loop.

    Raises ``ValueError`` naming ``act_quant`` if it holds a value other than 0 or 1.
    """
    w = dtype_bytes if weight_bytes is None else weight_bytes
    m = jnp.asarray(m, float)
    _, b = gemm_work(m, n, k, w, dtype_bytes, out_bytes)
    # FLOPs of the rows computed (no division: m = 0 gives 0, not NaN).
    f, _ = gemm_work(jnp.ceil(m / GEMM_M_SLICE) * GEMM_M_SLICE, n, k)
    tiles = jnp.ceil(m / 64.0) * jnp.ceil(jnp.asarray(n) / 128.0)
    pre = rows = None
    if act_quant is not None:
        q = _flags(act_quant, "act_quant", "GEMM")
        pre = q * gemm_act_quant_bytes(m, k, dtype_bytes)
        rows = q * m
    return _work(
        f,
        b,
        _peak(hw, dtype_bytes),
        hw,
        tiles,
        pre=pre,
        rows=rows,
        depth=k,
        grid=(m, n, k),
    )


# FlashAttention-3 (vLLM's ``vllm_flash_attn`` on H100) tiles head_dim-128 causal
# attention in 128 x 128 blocks (query rows x keys).
ATTN_TILE = 128.0


def causal_tile_pairs(
    isl: ArrayLike, group: ArrayLike, tile: float = ATTN_TILE
) -> tuple[Array, Array]:
    """Query-key pairs a tiled causal kernel computes for one sequence and KV head.

    FlashAttention packs the ``group = H / Hkv`` query heads that share a KV head into
    its query tiles (``isl group`` rows in ``n_q = ceil(isl group / tile)`` tiles);
    query tile ``i`` covers positions below ``(i + 1) tile / group`` and computes
    ``ceil(min(isl / tile, (i + 1) / group))`` full ``tile x tile`` key blocks,
    masked or not. Summed in closed form over the ``J = min(n_q, floor(isl group /
    tile))`` full tiles (``sum_{j<=J} ceil(j / group) = g q (q + 1) / 2 + r (q + 1)``
    with ``J = q g + r``), the rest reading all ``ceil(isl / tile)`` blocks.

    Returns ``(pairs, tiles)``: computed pairs over all ``group`` heads (about
    ``group isl (isl + tile) / 2`` for long sequences, ``tile^2`` at least), and the
    query tiles ``n_q`` (thread blocks).
    """
    isl, g = jnp.asarray(isl), jnp.asarray(group)
    n_q = jnp.ceil(isl * g / tile)
    full = jnp.minimum(n_q, jnp.floor(isl * g / tile))
    q = jnp.floor(full / g)
    r = full - q * g
    blocks = g * q * (q + 1.0) / 2.0 + r * (q + 1.0)
    blocks = blocks + (n_q - full) * jnp.ceil(isl / tile)
    return tile * tile * blocks, n_q


def prefill_attention_work(
    batch: ArrayLike,
    isl: ArrayLike,
    heads: ArrayLike,
    kv_heads: ArrayLike,
    head_dim: ArrayLike,
    hw: Hardware,
    kv_bytes: ArrayLike = 2.0,
) -> KernelWork:
    """Causal attention of ``batch`` sequences of ``isl`` new tokens (per-GPU heads).

    FLOPs count the pairs the tiled kernel computes (:func:`causal_tile_pairs`:
    ``isl^2 / 2`` per head plus the masked halves of the diagonal blocks and the
    padding of short sequences to a full tile); KV read ``batch isl``; queries
    ``batch isl`` (``attention_work``). Thread blocks: ``batch Hkv n_q``.
    Exponentials: one per computed score element and query head (``f / (4 dh)``).
    """
    batch, isl = jnp.asarray(batch), jnp.asarray(isl)
    heads, kv_heads = jnp.asarray(heads), jnp.asarray(kv_heads)
    group = heads / kv_heads
    pairs, tiles = causal_tile_pairs(isl, group)
    tokens = batch * isl
    f, b = attention_work(
        batch * pairs / group, tokens, tokens, heads, kv_heads, head_dim, kv_bytes
    )
    exps = batch * pairs / group * heads  # one per computed score element
    return _work(
        f,
        b,
        hw.flops_16,
        hw,
        batch * kv_heads * tiles,
        exps=exps,
        grid=(batch * heads, isl, group),
    )


def decode_attention_work(
    batch: ArrayLike,
    kv_len: ArrayLike,
    heads: ArrayLike,
    kv_heads: ArrayLike,
    head_dim: ArrayLike,
    hw: Hardware,
    kv_bytes: ArrayLike = 2.0,
    split_kv: ArrayLike | None = None,
) -> KernelWork:
    """One query token for each of ``batch`` sequences over ``kv_len`` cached tokens.

    Pairs and KV read ``batch kv_len``; queries ``batch`` (``attention_work``).
    Thread blocks: ``batch Hkv``. ``split_kv`` (1 or 0 per kernel; ``None``: 1):
    0 where the kernel does not split the KV over several blocks, so that each
    block walks its sequence's whole cache alone (``depth = kv_len``, for curves
    with a main-loop cost): FlashAttention-2 splits only when it packs a query
    group (``heads > kv_heads``; :func:`fa2_splits_kv`), and without the split a
    block of multi-head attention takes ~20-30 ns a cached token on A100, L40S and
    RTX PRO 6000, several times its bandwidth time.
    """
    k_dec = jnp.asarray(batch) * jnp.asarray(kv_len)
    f, b = attention_work(k_dec, k_dec, batch, heads, kv_heads, head_dim, kv_bytes)
    depth = None
    if split_kv is not None:
        split = _flags(split_kv, "split_kv", "kernel")
        depth = (1.0 - split) * jnp.asarray(kv_len, float)
    units = jnp.asarray(batch) * kv_heads
    grid = (jnp.asarray(batch) * heads, kv_len, jnp.asarray(heads) / kv_heads)
    return _work(f, b, hw.flops_16, hw, units, depth=depth, grid=grid)


# vLLM's FlashAttention-2 kernels by ``kernel_source`` (A100's tables name it
# ``vllm_flash_attn``; on Intel's XPU that name is another kernel).
FA2_SOURCES = ("vllm_flash_attn", "vllm_flash_attn_fa2")


def fa2_splits_kv(kernel_source, device, heads, kv_heads) -> np.ndarray:
    """1 where a decode kernel splits the KV over blocks, 0 where it does not.

    FlashAttention-2 (``FA2_SOURCES`` on an NVIDIA ``device``) decodes one query
    token with split-KV only when it swaps a GQA group into the query rows
    (``heads > kv_heads``, its ``seqlenq_ngroups_swapped``); multi-head attention
    runs one block per sequence and head over the whole cache. Every other kernel
    (FlashAttention-3, FlashInfer, the XPU's) splits (1). Arrays of equal length."""
    src = np.asarray(kernel_source, dtype=object).astype(str)
    nvidia = np.char.find(np.asarray(device, dtype=object).astype(str), "NVIDIA") >= 0
    fa2 = np.isin(src, FA2_SOURCES) & nvidia
    mha = np.asarray(heads, float) <= np.asarray(kv_heads, float)
    return np.where(fa2 & mha, 0.0, 1.0)


def _work(
    f,
    b,
    peak,
    hw,
    units=1.0,
    blocks=None,
    tuned=None,
    pre=None,
    rows=None,
    depth=None,
    exps=None,
    grid=None,
    expert_parallel=None,
) -> KernelWork:
    core = jnp.broadcast_arrays(
        *(jnp.asarray(x, float) for x in (f, b, peak, hw.hbm_bw, units))
    )

    def opt(x):  # an optional per-kernel field, on the kernels' shape
        return (
            None
            if x is None
            else jnp.broadcast_to(jnp.asarray(x, float), core[0].shape)
        )

    return KernelWork(
        *core,
        blocks=opt(blocks),
        tuned=opt(tuned),
        pre_bytes=opt(pre),
        sms=opt(hw.sm_count),
        l2=opt(hw.l2_bytes),
        rows=opt(rows),
        depth=opt(depth),
        exps=opt(exps),
        exp_rate=None if exps is None else opt(hw.exp_rate),
        expert_parallel=opt(expert_parallel),
        **(
            {}
            if grid is None
            else {f"grid_{x}": opt(v) for x, v in zip("abc", grid, strict=True)}
        ),
    )


def gemm_us(m, n, k, eff: Efficiency, hw: Hardware, dtype_bytes=2.0) -> Array:
    """Predicted GEMM time, us (see :func:`gemm_kernel_work`)."""
    return gemm_kernel_work(m, n, k, hw, dtype_bytes).time_us(eff)


def prefill_attention_us(
    batch, isl, heads, kv_heads, head_dim, eff: Efficiency, hw: Hardware, kv_bytes=2.0
) -> Array:
    """Predicted prefill attention time, us (see :func:`prefill_attention_work`)."""
    work = prefill_attention_work(batch, isl, heads, kv_heads, head_dim, hw, kv_bytes)
    return work.time_us(eff)


def decode_attention_us(
    batch,
    kv_len,
    heads,
    kv_heads,
    head_dim,
    eff: Efficiency,
    hw: Hardware,
    kv_bytes=2.0,
    split_kv=None,
) -> Array:
    """Predicted decode attention time, us (see :func:`decode_attention_work`;
    ``split_kv`` 0 where the kernel walks each cache in one block)."""
    work = decode_attention_work(
        batch, kv_len, heads, kv_heads, head_dim, hw, kv_bytes, split_kv
    )
    return work.time_us(eff)


_RING = {
    "all_reduce": allreduce_us,
    "all_gather": all_to_all_us,
    "reduce_scatter": all_to_all_us,
    "alltoall": all_to_all_us,
}
COLLECTIVES: tuple[str, ...] = tuple(_RING)
"""NCCL collectives :func:`collective_kernel_us` times. Each GPU's link carries
``2 (n-1)/n`` of the buffer in an all-reduce (a reduce-scatter, then an all-gather:
``allreduce_us``), ``(n-1)/n`` in the others (an all-gather and a reduce-scatter
move every other GPU's share once; an all-to-all sends the share bound for the other
GPUs: ``all_to_all_us``)."""


def collective_kernel_us(
    op: str,
    bytes_: ArrayLike,
    n_gpus: ArrayLike,
    eff: AllReduceCurve | tuple[ArrayLike, ArrayLike],
    link_bw: ArrayLike,
    *,
    shared_fabric: ArrayLike = 1.0,
) -> Array:
    """Predicted time of one collective ``op`` (:data:`COLLECTIVES`) of a
    ``bytes_``-byte buffer over ``n_gpus`` GPUs with ``link_bw`` bytes/s per
    direction, us; 0 on one GPU.

    ``latency + (n-1) hop_us + s (n-1)/n bytes / (link_bw eta(x)) (n/2)^gamma``, ``s``
    2 for an all-reduce and 1 for the others,
    with an :class:`AllReduceCurve` (``x`` the buffer's bytes, or for a portable
    curve its time on the link at full bandwidth, ``bytes / link_bw`` in us; the
    GPU exponent and hop term where the curve has them), or with ``eff`` a pair
    (link efficiency, latency in us): a fixed efficiency, no hop term. The
    saturating efficiency covers NCCL's choice of protocol by size: small buffers
    go at a fraction of the link (the low-latency protocols), large ones near it.

    ``shared_fabric`` (per row, 0 to 1) scales the GPU exponent: 1 (default) where
    it applies, e.g. PCIe cards whose traffic all crosses their host
    (:func:`diffmodel.gpu_class` ``"pcie"``), 0 where every GPU has its own links
    and the ring's ``(n-1)/n`` is the whole story.
    """
    if op not in _RING:
        raise ValueError(f"op must be one of {list(COLLECTIVES)}, got {op!r}")
    n = jnp.asarray(n_gpus)
    if isinstance(eff, AllReduceCurve):
        x = jnp.asarray(bytes_) / link_bw * 1e6 if eff.portable else bytes_
        eta, latency = eff.bandwidth(x), eff.latency_at(n)
        if eff.gpu_exponent is not None:
            gamma = eff.gpu_exponent * jnp.asarray(shared_fabric)
            eta = eta * jnp.exp(-gamma * jnp.log(n / 2.0))
    else:
        eta, latency = eff
    return _RING[op](bytes_, n, link_bw, eta, latency)


def allreduce_kernel_us(
    bytes_: ArrayLike,
    n_gpus: ArrayLike,
    eff: AllReduceCurve | tuple[ArrayLike, ArrayLike],
    hw: Hardware,
) -> Array:
    """Predicted all-reduce time, us: ``allreduce_us`` with a curve or ``(eta, lat)``.

    ``eff`` is an :class:`AllReduceCurve` or a pair (link efficiency, latency in us);
    a portable curve takes the message's time on the link, ``bytes / link_bw`` (us);
    one with a GPU exponent scales the transfer by ``(n_gpus / 2)^gamma``; one with
    a hop term adds ``(n_gpus - 1) hop_us`` to its latency
    (:func:`collective_kernel_us` with ``op="all_reduce"``).
    """
    return collective_kernel_us("all_reduce", bytes_, n_gpus, eff, hw.link_bw)
